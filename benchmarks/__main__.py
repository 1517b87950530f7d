"""The benchmark table: the fused step against the naive per-layer loop and the memory floor.

    python -m benchmarks [--sets a,b] [--backends cpu,reference] [--n-iter 1] [--json PATH]
    make bench ARGS="--sets resnet50"

For each weight set: median time per step of the naive loop (spectral_ext.experiments.naive) and
of each backend, the speed-up over naive, and time over the memory floor.  The floor is
bytes / bandwidth, with bytes = itemsize * (n_iter + 3) per parameter (W read n_iter + 1 times in
the two-pass formulation, the gradient read and written once: 16 bytes per float32 parameter for
n_iter = 1) and the bandwidth measured by a large copy in the same run (2 * size bytes moved).
CPU timings: time.perf_counter around whole steps after warm-up (float32 weights).
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


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])


def time_step(fn, min_reps: int = 5, min_seconds: float = 0.5) -> float:
    fn()
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_set(name, backends, n_iter, bandwidth):
    shapes = SETS[name]()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) / s[0] ** 0.5 for s in shapes]
    for w in weights:
        w.grad = torch.zeros_like(w)
    n = numel(shapes)
    floor = 4 * (n_iter + 3) * n / bandwidth
    row = {"set": name, "layers": len(shapes), "params": n, "floor_s": floor}
    vs = se.init_vectors(weights)
    row["naive_s"] = time_step(lambda: naive_step(weights, vs, lam=0.01, n_iter=n_iter))
    for b in backends:
        vs = se.init_vectors(weights)
        row[f"{b}_s"] = time_step(
            lambda: se.fused_step(weights, vs, lam=0.01, n_iter=n_iter, backend=b))
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

    bw = copy_bandwidth()
    info = (f"spectral_ext {se.__version__} ({se.__file__}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(info)
    print(f"device cpu: copy bandwidth {bw / 1e9:.2f} GB/s; float32 weights; n_iter={args.n_iter}")
    rows = [run_set(s, backends, args.n_iter, bw) for s in sets]

    cols = ["naive"] + backends
    head = f"{'set':13s} {'layers':>6s} {'params':>9s} {'floor ms':>9s}"
    for c in cols:
        head += f" {c + ' ms':>10s}"
    for b in backends:
        head += f" {b + ' vs naive':>14s} {b + '/floor':>10s}"
    head += f" {'naive/floor':>11s}"
    print(head)
    for r in rows:
        line = f"{r['set']:13s} {r['layers']:6d} {r['params'] / 1e6:8.2f}M {r['floor_s'] * 1e3:9.3f}"
        for c in cols:
            line += f" {r[c + '_s'] * 1e3:10.3f}"
        for b in backends:
            line += f" {r['naive_s'] / r[b + '_s']:13.2f}x {r[b + '_s'] / r['floor_s']:10.2f}"
        line += f" {r['naive_s'] / r['floor_s']:11.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "bandwidth_Bps": bw, "n_iter": args.n_iter, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
