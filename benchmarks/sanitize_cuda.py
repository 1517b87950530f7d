"""A small CUDA-backend workload for compute-sanitizer (benchmarks/gpu_check.sh runs it under
memcheck, racecheck and synccheck): every weight dtype, vector and scalar paths, layers over
many tiles in both directions, unaligned and strided operands, n_iter 1 and 2, and a check of
each result against spectral_ext.reference.  Exits non-zero on a wrong result.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_cuda.py
(without the caching allocator every tensor is its own allocation, so memcheck sees overruns)
"""

import sys

import torch

import spectral_ext as se
from spectral_ext import reference


def main() -> int:
    assert se.available_backends()["cuda"].available, se.available_backends()["cuda"].detail
    torch.manual_seed(0)
    shapes = [(300, 1100), (40, 1104), (33, 1101), (2100, 3), (3000, 1), (1, 3000),
              (16, 3, 3, 3), (64, 64)]
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ws = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
        ws.append(torch.randn(1 + 96 * 200, device="cuda").to(dtype)[1:].view(96, 200))
        ws.append(torch.randn(200, 96, device="cuda").to(dtype).t())
        gs = [torch.randn(w.shape, device="cuda").to(dtype) for w in ws]
        gs[0] = torch.randn(1 + 300 * 1100, device="cuda").to(dtype)[1:].view(300, 1100)
        for n_iter in (1, 2):
            vs = se.init_vectors(ws)
            vs[1] = vs[1].double()
            v_ref = [v.clone() for v in vs]
            g, g_ref = [x.clone() for x in gs], [x.clone() for x in gs]
            s = se.fused_step(ws, vs, lam=0.3, n_iter=n_iter, grads=g, backend="cuda")
            s_ref = reference.fused_step([w.double() for w in ws], [v.double() for v in v_ref],
                                         lam=0.3, n_iter=n_iter,
                                         grads=[x.double() for x in g_ref])
            err = ((s.double() - s_ref).abs() / s_ref.abs()).max().item()
            worst = max(worst, err)
            tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
            print(f"{str(dtype):15s} n_iter={n_iter}: max rel. sigma error {err:.2e} (tol {tol})")
            if not err <= tol:
                return 1
    torch.cuda.synchronize()
    print("sanitize workload: all results match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
