"""The benchmark table: the fused step against the naive per-layer loop and the memory floor.

    python -m benchmarks [--sets a,b] [--backends cpu,reference] [--n-iter 1] [--json PATH]
    make bench ARGS="--sets resnet50"

For each weight set: median time per step of the naive loop (spectral_ext.experiments.naive) and
of each backend, the speed-up over naive, and time over the memory floor.  The floor is
bytes / bandwidth, with bytes = itemsize * (n_iter + 3) per parameter (W read n_iter + 1 times in
the two-pass formulation, the gradient read and written once: 16 bytes per float32 parameter for
n_iter = 1) and the bandwidth measured by a 256 MiB copy (2 * size bytes moved) in the same
interleaved rounds as the steps.  CPU timings: time.perf_counter around batches of whole steps
after warm-up, float32 weights; each number is the median over rounds.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import spectral_ext as se
from spectral_ext.experiments.naive import naive_step

from .models import SETS, numel


def interleaved_medians(impls, rounds: int = 15, batch_seconds: float = 0.03):
    """Median seconds per call of each implementation, measured in interleaved rounds (each
    round runs a batch of every implementation in turn), so that all of them see the same
    machine conditions; on a shared 2-core machine that matters more than the repetition count."""
    batch = {}
    for name, fn in impls.items():
        fn()
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        batch[name] = max(1, int(batch_seconds / max(time.perf_counter() - t0, 1e-9)))
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / batch[name])
    return {name: statistics.median(ts) for name, ts in samples.items()}


def run_set(name, backends, n_iter, copy_bytes):
    shapes = SETS[name]()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) / s[0] ** 0.5 for s in shapes]
    for w in weights:
        w.grad = torch.zeros_like(w)
    src = torch.randn(copy_bytes // 4)
    dst = torch.empty_like(src)
    impls = {"copy": lambda: dst.copy_(src)}
    vs = {b: se.init_vectors(weights) for b in ["naive"] + backends}
    impls["naive"] = lambda: naive_step(weights, vs["naive"], lam=0.01, n_iter=n_iter)
    for b in backends:
        impls[b] = (lambda b=b: se.fused_step(weights, vs[b], lam=0.01, n_iter=n_iter, backend=b))
    t = interleaved_medians(impls)
    bandwidth = 2 * copy_bytes / t.pop("copy")      # read + write
    n = numel(shapes)
    row = {"set": name, "layers": len(shapes), "params": n, "bandwidth_Bps": bandwidth,
           "floor_s": 4 * (n_iter + 3) * n / bandwidth}
    row.update({f"{k}_s": v for k, v in t.items()})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--backends", default=None, help="default: every available native backend")
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    avail = se.available_backends()
    backends = (args.backends.split(",") if args.backends else
                [b for b in ("cpu",) if avail[b].available])
    sets = args.sets.split(",")
    for s in sets:
        if s not in SETS:
            sys.exit(f"unknown set {s!r}; choose from {', '.join(SETS)}")

    info = (f"spectral_ext {se.__version__} ({se.__file__}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(info)
    print(f"device cpu: float32 weights, n_iter={args.n_iter}; medians of interleaved rounds; "
          "floor = bytes / bandwidth of a 256 MiB copy measured in the same rounds")
    rows = [run_set(s, backends, args.n_iter, 256 << 20) for s in sets]

    # (header, width, value of a row): one spec for the header and every row
    columns = [("set", 13, lambda r: f"{r['set']:13s}"),
               ("layers", 6, lambda r: f"{r['layers']:6d}"),
               ("params", 9, lambda r: f"{r['params'] / 1e6:8.2f}M"),
               ("GB/s", 6, lambda r: f"{r['bandwidth_Bps'] / 1e9:6.1f}"),
               ("floor ms", 9, lambda r: f"{r['floor_s'] * 1e3:9.3f}")]
    for c in ["naive"] + backends:
        columns.append((c + " ms", 10, lambda r, c=c: f"{r[c + '_s'] * 1e3:10.3f}"))
    for b in backends:
        columns.append((b + " vs naive", 14, lambda r, b=b: f"{r['naive_s'] / r[b + '_s']:13.2f}x"))
        columns.append((b + "/floor", 10, lambda r, b=b: f"{r[b + '_s'] / r['floor_s']:10.2f}"))
    columns.append(("naive/floor", 11, lambda r: f"{r['naive_s'] / r['floor_s']:11.2f}"))
    print(" ".join(f"{h:{'<' if h == 'set' else '>'}{w}s}" for h, w, _ in columns))
    for r in rows:
        print(" ".join(fmt(r) for _, _, fmt in columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "n_iter": args.n_iter, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
