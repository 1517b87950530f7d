"""Host-side cost of one CUDA-backend call, measurable without a GPU.

Builds the CUDA backend's binding (csrc/cuda/binding.cpp) in its CPU-emulation form
(tests/cuda_emulation.py) and times `spectral_ext_emu::fused_step` and the persistent step plan
(issue 14 item 1; called as the custom-class method `CudaStepPlan.step` and through
`plan_step`, csrc/plan_entry.cpp, as the regularizer calls it) with the kernel launches switched
off: what remains is everything the host does per step: the Python -> dispatcher call with three
lists of tensors, the input checks (csrc/spectral_ext.h), the layer descriptions,
the cached-table lookup and the workspace allocation.  On a GPU the kernels run asynchronously
behind it, so for many small layers this is the floor of an eager step; a CUDA graph of the
step (see README) does not pay it.

    make setup && .venv/bin/python -P benchmarks/cuda_host_path.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import cuda_emulation  # noqa: E402


def main():
    reason = cuda_emulation.unavailable_reason()
    if reason:
        sys.exit(reason)
    ops = cuda_emulation.load()
    ops.skip_kernels(True)
    try:
        print(f"host path of one fused_step call (CUDA backend's binding, kernels not run), "
              f"{torch.get_num_threads()} threads, median of 7 rounds x 200 calls, the "
              "columns interleaved")
        print("  'op': the op from Python with 3 lists of tensors (what functional.fused_step "
              "calls); 'plan': the plan's method, CudaStepPlan.step(lam, n_iter); 'plan_step': "
              "plan_step(plan, lam, n_iter), the regularizer's eager path")
        for n in (1, 40, 512):
            ws = [torch.randn(64, 64).requires_grad_() for _ in range(n)]
            vs = [torch.randn(64) for _ in range(n)]
            gs = [torch.zeros(64, 64) for _ in range(n)]
            for w, g in zip(ws, gs):
                w.grad = g
            plan = torch.classes.spectral_ext_emu.CudaStepPlan(ws, vs)
            calls = {"op": lambda: ops.fused_step(ws, vs, gs, 0.01, 1),
                     "plan": lambda: plan.step(0.01, 1),
                     "plan_step": lambda: cuda_emulation.plan_step(plan, 0.01, 1)}
            times = {k: [] for k in calls}
            for fn in calls.values():
                fn()                                   # the table is built once
            for _ in range(7):
                for k, fn in calls.items():
                    t = time.perf_counter()
                    for _ in range(200):
                        fn()
                    times[k].append((time.perf_counter() - t) / 200)
            med = {k: sorted(v)[3] * 1e6 for k, v in times.items()}
            print(f"  {n:4d} layers of 64x64: op {med['op']:8.1f} us, plan {med['plan']:8.1f} us, "
                  f"plan_step {med['plan_step']:8.1f} us per call")
    finally:
        ops.skip_kernels(False)


if __name__ == "__main__":
    main()
