"""Host cost of the regularizer's binding check (issue 11): ``reg.step()`` against the bare
``fused_step`` call it wraps (the same weights, vectors and gradients; what ``step()`` did
before it followed the model), on L layers of 64x64, interleaved, medians.

    .venv/bin/python -P benchmarks/regularizer_overhead.py [--layers 512] [--rounds 200]

`reg.step()` runs through the regularizer's step plan (issue 14 item 1: no tensor lists, no
repeated checks), `reg.step() op path` with the plan switched off (what step() did before).  The
difference of the op path's median and the bare call's is what following the model costs per
step: one identity test per weight (is the Parameter under each name still the one bound?) and
one requires_grad read per weight.  Run on an idle machine: all sides share the CPU kernel's time.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import spectral_ext as se


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    model = nn.ModuleList([nn.Linear(args.size, args.size, bias=False)
                           for _ in range(args.layers)])
    reg = se.SpectralNormRegularizer(model, backend=args.backend)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weights, vs, sig_buf = reg.weights, reg.vs(), reg.last_sigma

    def bare():
        sig_buf.copy_(se.fused_step(weights, vs, lam=reg.lam, backend=args.backend))

    reg_op = se.SpectralNormRegularizer(model, backend=args.backend)
    reg_op._step_plan = lambda b, active=None: None          # the op path, as before the plan
    fns = {"bare fused_step": bare, "reg.step() op path": reg_op.step, "reg.step()": reg.step}
    for fn in fns.values():
        for _ in range(10):
            fn()
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(f"{args.layers} x {args.size}x{args.size}, backend {reg.active_backend}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians):")
    for k, v in med.items():
        print(f"  {k:20s} {v:9.1f} us")
    print(f"  binding check        {med['reg.step() op path'] - med['bare fused_step']:9.1f} us "
          "per step")


if __name__ == "__main__":
    main()
