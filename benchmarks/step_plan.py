"""The persistent step plan (issue 14 item 1) against the op path, the memory floor and the
tightest naive loop, on L layers of SxS float32 (default 512 x 64x64), in one run of interleaved
rounds (benchmarks/harness.py: medians; each round runs a batch of every column in turn).

    make install && .venv/bin/python -P benchmarks/step_plan.py [--layers 512] [--size 64]
                                    [--rounds 15] [--threads N] [--device cpu|cuda]
                                    [--frozen N]

Columns (all on the same weights and .grad tensors, each with its own vectors):
  copy           a 256 MiB copy: the bandwidth the floor is computed from (not printed)
  naive          benchmarks/naive.py's naive_step (two matvecs and addr_ per layer)
  functional     spectral_ext.fused_step(weights, vs): the op, called from Python
  reg op path    SpectralNormRegularizer.step() with the plan switched off (what step() did
                 before the plan: binding check + functional.fused_step)
  reg plan       SpectralNormRegularizer.step() as shipped (binding check + the plan through
                 plan_step)
  plan.step      the plan alone (functional.make_step_plan(...).step(lam, 1)), the method
  plan_step      the plan alone through functional.plan_step(plan, lam, 1) (what reg.step()
                 calls: no custom-class method machinery)
  reg graph      (--device cuda) reg.step() captured in a CUDA graph (README's recipe: a warm-up
                 on a side stream, then torch.cuda.graph), one replay per step: no host work
The issue-14 targets on a GPU for 512 x 64x64 are read from `reg plan` (eager, <= 40 us) and
`reg graph` (<= 20 us).
The floor is benchmarks/harness.floor_bytes (16 bytes per float32 parameter) over the copy's
bandwidth.  With --frozen N the first N weights are frozen: the regularizer skips them (through a
plan of the active weights), and every other column and the floor take the active weights.  With --size 2 the kernel does almost nothing, so the times are the host path.
"""

import argparse
import os
import sys

import torch
from torch import nn

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import spectral_ext as se  # noqa: E402
from spectral_ext.functional import make_step_plan, plan_step  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.naive import naive_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--frozen", type=int, default=0,
                    help="freeze the first N weights (requires_grad False): the regularizer "
                         "skips them, the other columns take the active weights")
    args = ap.parse_args()
    if not 0 <= args.frozen < args.layers:
        ap.error(f"--frozen must be in [0, --layers) = [0, {args.layers}), got {args.frozen}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(args.size, args.size, bias=False)
                           for _ in range(args.layers)]).to(device)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.zeros_like(p)
        p.requires_grad_(i >= args.frozen)
    weights = [p for p in model.parameters() if p.requires_grad]   # the active ones
    reg_plan = se.SpectralNormRegularizer(model, lam=harness.LAM)
    reg_op = se.SpectralNormRegularizer(model, lam=harness.LAM)
    reg_op._step_plan = lambda b, active=None: None          # the op path: what step() did before
    vs_fn = se.init_vectors(weights)
    vs_naive = [v.to(w.dtype) for v, w in zip(se.init_vectors(weights), weights)]
    plan = make_step_plan(weights, se.init_vectors(weights))
    copy_bytes = 256 << 20
    impls = {
        "copy": harness.copy_impl(copy_bytes, device),
        "naive": lambda: naive_step(weights, vs_naive, lam=harness.LAM),
        "functional": lambda: se.fused_step(weights, vs_fn, lam=harness.LAM),
        "reg op path": reg_op.step,
        "reg plan": reg_plan.step,
        "plan.step": lambda: plan.step(harness.LAM, 1),
        "plan_step": lambda: plan_step(plan, harness.LAM, 1),
    }
    capture_error = None
    if device.type == "cuda":
        reg_graph = se.SpectralNormRegularizer(model, lam=harness.LAM)
        try:
            impls["reg graph"] = _graphed(reg_graph.step, device)
        except RuntimeError as exc:     # reported below, and the exit status says so
            capture_error = f"{type(exc).__name__}: {exc}"
    t = harness.interleaved_medians(impls, device, rounds=args.rounds)
    bandwidth = 2 * copy_bytes / t.pop("copy")
    floor = harness.floor_bytes(weights, 1) / bandwidth
    reg_plan.step()
    assert reg_plan._plan_state is not None and reg_plan._plan_state[3] is not None
    assert reg_plan._plan_state[4] == (tuple(range(args.frozen, args.layers)) if args.frozen
                                       else None), "reg.step() did not step the plan expected"
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    frozen = f" ({args.frozen} frozen)" if args.frozen else ""
    print(f"{args.layers}{frozen} x {args.size}x{args.size} float32, {where}, "
          f"torch {torch.__version__}; medians of interleaved rounds; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, floor {floor * 1e6:.1f} us")
    print(f"  {'':14s} {'us':>10s} {'/ floor':>8s} {'naive /':>8s}")
    for k, v in t.items():
        print(f"  {k:14s} {v * 1e6:10.1f} {v / floor:8.2f} {t['naive'] / v:7.1f}x")
    print(f"  plan: full input checks run {plan.full_checks()} time(s) over all its steps")
    if capture_error is not None:
        sys.exit(f"reg graph: the capture of reg.step() failed: {capture_error}")


def _graphed(step, device):
    """step() captured in a CUDA graph as the README's recipe does (three warm-up calls on a side
    stream, then the capture); returns the replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


if __name__ == "__main__":
    main()
