"""A small CUDA-backend workload for compute-sanitizer (benchmarks/gpu_check.sh runs it under
memcheck, racecheck and synccheck): every weight dtype, vector and scalar paths, layers over
many tiles in both directions, unaligned and strided operands, float32 and float64 vectors,
n_iter 1 and 2.  Every output is checked, not only sigma: sigma, every v and every gradient,
float32/float64 against spectral_ext.reference (relative 2e-5 / 1e-12), bfloat16/float16 by the
2x rule against a float64 oracle (tests/conftest.py's assert_lowp_close: at most twice the error
of plain PyTorch at the same precision plus 8 sqrt(k) float32 roundoffs).  Exits non-zero on a
wrong result.

racecheck cannot see the ordering between blocks (the "last block" steps), so --repeat N also
runs a many-tile step N times and requires every result to be bitwise the first (every sum has a
fixed order; a block that read another's partial sum too early would show up as a difference).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_cuda.py
    python benchmarks/sanitize_cuda.py --repeat 300 --modes phases,persistent
(without the caching allocator every tensor is its own allocation, so memcheck sees overruns)
"""

import argparse
import sys
from typing import Callable, List

import torch

import spectral_ext as se
from spectral_ext import reference

SHAPES = [(300, 1100), (40, 1104), (33, 1101), (2100, 3), (3000, 1), (1, 3000), (16, 3, 3, 3),
          (64, 64)]
# for a check of the checks through the CPU emulation (tests/test_cuda.py): still several tiles
SMALL_SHAPES = [(300, 70), (40, 72), (9, 33), (2100, 3), (1, 1100)]


def cuda_step(ws, vs, gs, lam, n_iter):
    return se.fused_step(ws, vs, lam=lam, n_iter=n_iter, grads=gs, backend="cuda")


def _inputs(dtype, device, shapes, gen):
    ws = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    # an unaligned weight (offset by one element) and a transposed one
    m, n = (96, 200) if shapes is SHAPES else (24, 40)
    ws.append(torch.randn(1 + m * n, generator=gen).to(dtype).to(device)[1:].view(m, n))
    ws.append(torch.randn(n, m, generator=gen).to(dtype).to(device).t())
    gs = [torch.randn(w.shape, generator=gen).to(dtype).to(device) for w in ws]
    n0 = ws[0].numel()
    gs[0] = torch.randn(1 + n0, generator=gen).to(dtype).to(device)[1:].view(ws[0].shape)
    vs = se.init_vectors(ws)
    vs[1] = vs[1].double()                                  # a float64 v
    buf = torch.zeros(2 * vs[2].numel(), dtype=vs[2].dtype, device=device)
    buf[::2].copy_(vs[2])
    vs[2] = buf[::2]                                        # a strided v
    return ws, vs, gs


def _lowp_error(out, ref, oracle, k):
    """(error, bound) of tests/conftest.py's assert_lowp_close."""
    oracle = oracle.detach().double().cpu()
    err = (out.detach().double().cpu() - oracle).abs().max().item()
    ref_err = (ref.detach().double().cpu() - oracle).abs().max().item()
    floor = 8 * k ** 0.5 * torch.finfo(torch.float32).eps * oracle.abs().max().item()
    return err, 2 * ref_err + floor


def _rel_error(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    return err / scale if scale > 0 else err


def check_workload(step: Callable, device, shapes=SHAPES, seed=0) -> List[str]:
    """Runs the workload with step(ws, vs, gs, lam, n_iter); returns what was wrong."""
    problems = []
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ws, vs0, gs0 = _inputs(dtype, device, shapes, gen)
        for n_iter in (1, 2):
            vs, gs = [v.clone() for v in vs0], [g.clone() for g in gs0]
            v_ref, g_ref = [v.clone() for v in vs0], [g.clone() for g in gs0]
            s = step(ws, vs, gs, 0.3, n_iter)
            s_ref = reference.fused_step(ws, v_ref, lam=0.3, n_iter=n_iter, grads=g_ref)
            outs = [("sigma", s, s_ref)] + [(f"v[{i}]", a, b) for i, (a, b) in
                                            enumerate(zip(vs, v_ref))] + \
                [(f"grad[{i}]", a, b) for i, (a, b) in enumerate(zip(gs, g_ref))]
            worst = 0.0
            if dtype in (torch.float32, torch.float64):
                tol = 2e-5 if dtype == torch.float32 else 1e-12
                for what, a, b in outs:
                    err = _rel_error(a, b)
                    worst = max(worst, err)
                    if not err <= tol or a.dtype != b.dtype:
                        problems.append(f"{dtype} n_iter={n_iter} {what}: relative error "
                                        f"{err:.3g} > {tol}")
            else:   # the 2x rule against the float64 oracle of the same inputs
                v64 = [v.double() for v in vs0]
                g64 = [g.double() for g in gs0]
                s64 = reference.fused_step([w.double() for w in ws], v64, lam=0.3, n_iter=n_iter,
                                           grads=g64)
                k_all = max(max(w.shape[0], w[0].numel()) for w in ws)
                oracles = [("sigma", s, s_ref, s64, k_all)] + [
                    (f"v[{i}]", vs[i], v_ref[i], v64[i], max(w.shape[0], w[0].numel()))
                    for i, w in enumerate(ws)] + [
                    (f"grad[{i}]", gs[i], g_ref[i], g64[i], max(w.shape[0], w[0].numel()))
                    for i, w in enumerate(ws)]
                for what, a, b, o, k in oracles:
                    err, bound = _lowp_error(a, b, o, k)
                    worst = max(worst, err / bound if bound > 0 else err)
                    if not err <= bound:
                        problems.append(f"{dtype} n_iter={n_iter} {what}: error {err:.3g} > "
                                        f"{bound:.3g} (2 x plain PyTorch's + floor)")
            print(f"{str(dtype):15s} n_iter={n_iter}: worst "
                  f"{'relative error' if dtype in (torch.float32, torch.float64) else 'error/bound'}"
                  f" {worst:.2e}", flush=True)
    return problems


REPEAT_SHAPES = [(2048, 1100), (300, 4100), (5000, 1), (1, 5000), (64, 64)]


def check_repeatable(step: Callable, device, repeats: int, shapes=REPEAT_SHAPES,
                     seed=0) -> List[str]:
    """A many-tile step `repeats` times from the same inputs: every result bitwise the first."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).to(device) for s in shapes]
    ws.append(torch.randn(shapes[0], generator=gen).bfloat16().to(device))
    vs0 = se.init_vectors(ws)
    gs0 = [torch.randn(w.shape, generator=gen).to(w.dtype).to(device) for w in ws]
    first = None
    for r in range(repeats):
        vs, gs = [v.clone() for v in vs0], [g.clone() for g in gs0]
        out = [step(ws, vs, gs, 0.3, 2), *vs, *gs]
        if first is None:
            first = out
        elif not all(torch.equal(a, b) for a, b in zip(first, out)):
            return [f"repeat {r}: the result differs from the first run's"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=0,
                   help="also run a many-tile step this many times, bitwise equal each time")
    p.add_argument("--modes", default="phases",
                   help="CUDA launch modes to run it in (spectral_ext.set_cuda_launch_mode), "
                        "comma-separated: phases,persistent")
    a = p.parse_args(argv)
    assert se.available_backends()["cuda"].available, se.available_backends()["cuda"].detail
    problems = []
    try:
        for mode in a.modes.split(","):
            se.set_cuda_launch_mode(mode)
            found = check_workload(cuda_step, "cuda")
            if a.repeat:
                found += check_repeatable(cuda_step, "cuda", a.repeat)
                print(f"{mode}: {a.repeat} repeats of a many-tile step: "
                      f"{'bitwise identical' if not found else 'DIFFERENT'}")
            problems += [f"{mode}: {line}" for line in found]
    finally:
        se.set_cuda_launch_mode("phases")
    torch.cuda.synchronize()
    for line in problems:
        print("WRONG:", line)
    if problems:
        return 1
    print("sanitize workload: every sigma, v and gradient matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
