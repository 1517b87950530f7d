"""The benchmark table: the fused step against the naive loop, the grouped (bmm) loop and the
memory floor, on the weight sets of real models; then whole training steps.

    python -m benchmarks [--sets a,b] [--backends cpu,reference] [--dtype float32,bfloat16]
                         [--n-iter 1] [--devices cpu,cuda] [--no-step] [--no-estimators]
                         [--json PATH]
    make bench ARGS="--sets resnet50 --dtype bfloat16"

One table per device and dtype.  Rows: weight sets (benchmarks/models.py).  Columns: median time
per step of the naive loop, the grouped loop (spectral_ext.experiments.naive) and each backend
(`cpu-plan` / `cuda-plan`: that backend's persistent step plan, the regularizer's eager path;
on CUDA also `cuda-1launch`: the cuda backend in one launch per step, set_cuda_launch_mode);
each backend's speed-up over naive and its time over the memory floor; ops that reach a kernel
(CPU, counted by a TorchDispatchMode) or device launches (CUDA, torch.profiler) per step.  The floor is bytes / bandwidth, with
bytes = (itemsize(W) * (n_iter + 1) + 2 * itemsize(grad)) per parameter (16 bytes per float32
parameter for n_iter = 1) and the bandwidth of a large copy (2 * size bytes moved) measured in
the same interleaved rounds as the steps.  CPU: time.perf_counter around batches of steps; CUDA:
CUDA events around batches after warm-up; each number is a median over rounds.

Then, per device: whole training steps without a regularizer, with the naive loop and with the
fused step (benchmarks/step.py), and one iteration of the Hessian and Jacobian estimators against
one forward+backward pass (benchmarks/estimators.py).
"""

import argparse
import json
import os
import platform
import sys

import torch

import spectral_ext as se
from spectral_ext import _ops

from . import estimators, harness, step
from .models import SETS


def run_set(name, impl_names, dtype, device, n_iter, copy_bytes):
    weights = harness.make_weights(name, dtype, device)
    impls = harness.make_impls(weights, impl_names, n_iter)
    counts = {k: harness.count_per_step(fn, device) for k, fn in impls.items()}
    t = harness.interleaved_medians({"copy": harness.copy_impl(copy_bytes, device), **impls},
                                    device)
    bandwidth = 2 * copy_bytes / t.pop("copy")      # read + write
    row = {"set": name, "layers": len(weights), "params": sum(w.numel() for w in weights),
           "bandwidth_Bps": bandwidth,
           "floor_s": harness.floor_bytes(weights, n_iter) / bandwidth}
    row.update({f"{k}_s": v for k, v in t.items()})
    row.update({f"{k}_count": v for k, v in counts.items()})
    del weights, impls
    return row


def print_table(rows, impl_names, backends, count_label):
    # (header, width, value of a row): one spec for the header and every row
    columns = [("set", 12, lambda r: f"{r['set']:12s}"),
               ("layers", 6, lambda r: f"{r['layers']:6d}"),
               ("params", 9, lambda r: f"{r['params'] / 1e6:8.2f}M"),
               ("GB/s", 7, lambda r: f"{r['bandwidth_Bps'] / 1e9:7.1f}"),
               ("floor ms", 9, lambda r: f"{r['floor_s'] * 1e3:9.3f}")]
    for c in impl_names:
        columns.append((c + " ms", 11, lambda r, c=c: f"{r[c + '_s'] * 1e3:11.3f}"))
    for b in [n for n in impl_names if n != "naive" and "naive" in impl_names]:
        columns.append((b + " vs naive", 14, lambda r, b=b: f"{r['naive_s'] / r[b + '_s']:13.2f}x"))
    for b in backends:
        columns.append((b + "/floor", 10, lambda r, b=b: f"{r[b + '_s'] / r['floor_s']:10.2f}"))
    for c in impl_names:
        h = f"{c} {count_label}"
        columns.append((h, len(h), lambda r, c=c, w=len(h): f"{r[c + '_count']:{w}d}"))
    print(" ".join(f"{h:{'<' if h == 'set' else '>'}{w}s}" for h, w, _ in columns))
    for r in rows:
        print(" ".join(fmt(r) for _, _, fmt in columns))


STEP_COLUMNS = ("none", "naive", "fused", "naive alone", "fused alone")


def run_steps(device):
    rows = []
    for name in step.models_for(device):
        shape = step.MODELS[name][1]
        impls, _ = step.train_step_impls(name, device)
        t = harness.interleaved_medians(impls, device, rounds=11)
        share = {k: t[k + " alone"] / (t["none"] + t[k + " alone"]) for k in ("naive", "fused")}
        rows.append({"model": name, "input": list(shape), **{f"{k}_s": v for k, v in t.items()},
                     **{f"{k}_share": v for k, v in share.items()}})
        print(f"{name:11s} {str(tuple(shape)):17s}" +
              "".join(f" {t[k] * 1e3:11.3f}" for k in STEP_COLUMNS) +
              "".join(f" {100 * share[k]:11.2f}%" for k in ("naive", "fused")))
    return rows


def run_estimators(device):
    rows = []
    for name in step.models_for(device):
        shape = step.MODELS[name][1]
        t = harness.interleaved_medians(estimators.estimator_impls(name, device), device,
                                        rounds=11)
        rows.append({"model": name, "input": list(shape), **{f"{k}_s": v for k, v in t.items()}})
        print(f"{name:11s} {str(tuple(shape)):17s} {t['fwd+bwd'] * 1e3:11.3f} "
              f"{t['hvp'] * 1e3:11.3f} {t['jvp+vjp'] * 1e3:11.3f} "
              f"{t['hvp'] / t['fwd+bwd']:11.2f}x {t['jvp+vjp'] / t['fwd+bwd']:11.2f}x")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--backends", default=None,
                   help="default: every available native backend of each device")
    p.add_argument("--baselines", default=",".join(harness.BASELINES),
                   help="comma list of " + ", ".join(harness.ALL_BASELINES) + " (naive: the "
                   "tightest loop; naive-outer: the paper-literal one)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or both (comma list)")
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument("--devices", default=None, help="default: cpu, and cuda when there is a GPU")
    p.add_argument("--no-step", action="store_true", help="skip the whole-training-step table")
    p.add_argument("--no-estimators", action="store_true",
                   help="skip the Hessian/Jacobian estimator iteration table")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if _ops.CPU_EXTENSION_ERROR is not None:
        sys.exit(f"spectral_ext at {os.path.dirname(se.__file__)} has no kernels "
                 f"({_ops.CPU_EXTENSION_ERROR}): the table would compare nothing.  Install the "
                 "package first (`make install`), or run `make bench ARGS=\"...\"`.")
    baselines = [b for b in args.baselines.split(",") if b]
    for b in baselines:
        if b not in harness.ALL_BASELINES:
            sys.exit(f"unknown baseline {b!r}; choose from {', '.join(harness.ALL_BASELINES)}")
    sets = args.sets.split(",")
    for s in sets:
        if s not in SETS:
            sys.exit(f"unknown set {s!r}; choose from {', '.join(SETS)}")
    dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in harness.DTYPES:
            sys.exit(f"unknown dtype {d!r}; choose from {', '.join(harness.DTYPES)}")
    devices = (args.devices.split(",") if args.devices else
               ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    avail = se.available_backends()
    if args.backends:
        for b in args.backends.split(","):
            b = harness.backend_of(b)
            if b not in avail:
                sys.exit(f"unknown backend {b!r}; choose from {', '.join(avail)}")
            if not avail[b].available:
                sys.exit(f"backend {b!r} is unavailable here: {avail[b].detail}")

    info = {"spectral_ext": f"{se.__version__} ({se.__file__})", "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(", ".join(f"{k} {v}" for k, v in info.items()))
    out = {"info": info, "n_iter": args.n_iter, "tables": [], "steps": [], "estimators": []}
    for dev in devices:
        device = torch.device(dev)
        backends = (args.backends.split(",") if args.backends else harness.native_backends(device))
        impl_names = baselines + backends
        copy_bytes = (512 if device.type == "cuda" else 256) << 20
        count_label = "launches" if device.type == "cuda" else "ops"
        for d in dtypes:
            print(f"\ndevice {dev}: {d} weights, n_iter={args.n_iter}, lam={harness.LAM}; "
                  f"medians of interleaved rounds; floor = bytes / bandwidth of a "
                  f"{copy_bytes >> 20} MiB copy in the same rounds; {count_label} per step")
            rows = [run_set(s, impl_names, harness.DTYPES[d], device, args.n_iter, copy_bytes)
                    for s in sets]
            print_table(rows, impl_names, backends, count_label)
            out["tables"].append({"device": dev, "dtype": d, "rows": rows})
        if not args.no_step:
            print(f"\ndevice {dev}: whole SGD training step (forward, backward, regularizer, "
                  "optimizer), float32, ms; 'alone' = the regularizer by itself; "
                  "share = alone / (none + alone)")
            print(f"{'model':11s} {'input':17s}" + "".join(f" {k:>11s}" for k in STEP_COLUMNS)
                  + f" {'naive share':>12s} {'fused share':>12s}")
            out["steps"].append({"device": dev, "rows": run_steps(device)})
        if not args.no_estimators:
            print(f"\ndevice {dev}: one estimator iteration against one forward+backward pass, "
                  "float32, ms (spectral_ext.hessian / spectral_ext.jacobian)")
            print(f"{'model':11s} {'input':17s} {'fwd+bwd':>11s} {'hvp':>11s} {'jvp+vjp':>11s} "
                  f"{'hvp/fb':>12s} {'jvp+vjp/fb':>12s}")
            out["estimators"].append({"device": dev, "rows": run_estimators(device)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
