"""Compiles every Triton kernel of spectral_ext, in every specialization the host code launches,
for real GPU targets (sm_80 and sm_90 by default) with Triton's own pipeline (TTIR -> PTX ->
cubin, its bundled ptxas), no GPU needed; prints registers, spills (stack + local bytes), shared
memory and the number of 16-byte vector loads, and exits non-zero on a compile error.

    python -P benchmarks/triton_compile.py [--archs 80,90] [--json out.json]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the @triton.jit functions);
tests/test_triton_compile.py runs it in a subprocess in `make test`.
"""

import argparse
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# the GPU block sizes of spectral_ext.triton_kernels.block_sizes(), and Triton's launch defaults
BLOCK_R, BLOCK_C, BLOCK_P = 32, 128, 64
NUM_WARPS, NUM_STAGES = 4, 3
DTYPES = ("fp32", "fp16", "bf16")

ROWS = dict(tile_layer="*i32", tile_start="*i32", w_tab="*i64", v_tab="*i64", rows_tab="*i64",
            cols_tab="*i64", ldw_tab="*i64", uoff_tab="*i64", u_raw="*fp32", u2_part="*fp64")
COLS = dict(tile_layer="*i32", tile_start="*i32", tile_rstart="*i32", w_tab="*i64",
            rows_tab="*i64", cols_tab="*i64", ldw_tab="*i64", uoff_tab="*i64", voff_tab="*i64",
            uq_start_tab="*i64", uq_count_tab="*i64", pstart_tab="*i64", nchunk_tab="*i64",
            chunk_base_tab="*i64", u_raw="*fp32", u2_part="*fp64", v_prime="*fp32",
            vp_part="*fp32", u_norm="*fp64", partial_v2="*fp64")
REDUCE = dict(tile_layer="*i32", tile_start="*i32", cols_tab="*i64", voff_tab="*i64",
              pstart_tab="*i64", nchunk_tab="*i64", chunk_base_tab="*i64", vp_part="*fp32",
              v_prime="*fp32", partial_v2="*fp64")
CHUNK = 32 * BLOCK_R   # spectral_ext.triton_kernels.row_chunk() on a GPU
FINALIZE = dict(tile_layer="*i32", tile_start="*i32", v_tab="*i64", g_tab="*i64",
                rows_tab="*i64", cols_tab="*i64", ldg_tab="*i64", uoff_tab="*i64",
                voff_tab="*i64", pstart_tab="*i64", pcount_tab="*i64", layer_out="*i64",
                u_raw="*fp32", v_prime="*fp32", u_norm="*fp64", partial_v2="*fp64",
                sigma_out="*fp32", v_updated="*i32", lam="fp32", u_out="*fp32")
# spectral_norms' backward: the scale per layer is read from device memory
FINALIZE_SCALED = dict(FINALIZE, lam="*fp32")


def variants():
    """(kernel name, signature, constexprs) of every specialization the host launches."""
    out = []
    for dt in DTYPES:
        out.append(("_rows_kernel", ROWS, dict(W_DTYPE=dt, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)))
        out.append(("_cols_kernel", COLS, dict(W_DTYPE=dt, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                               BLOCK_P=BLOCK_P, CHUNK=CHUNK)))
        for update, track in itertools.product((True, False), (True, False)):
            out.append(("_finalize_kernel", FINALIZE,
                        dict(G_DTYPE=dt, UPDATE_GRAD=update, TRACK_UPDATES=track,
                             BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)))
        # spectral_norms: the last iteration writes u (earlier ones are the variants above)
        for track in (True, False):
            out.append(("_finalize_kernel", FINALIZE,
                        dict(G_DTYPE=dt, UPDATE_GRAD=False, TRACK_UPDATES=track,
                             BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, WRITE_U=True)))
        # spectral_norms' backward: the gradient phase alone, overwriting the gradient
        out.append(("_finalize_kernel", FINALIZE_SCALED,
                    dict(G_DTYPE=dt, UPDATE_GRAD=True, TRACK_UPDATES=False, BLOCK_R=BLOCK_R,
                         BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, FINALIZE=False, SCALE_PER_LAYER=True,
                         ACCUMULATE=False)))
    # every one again with ALIGNED=True (the host's 16-byte alignment facts: vector accesses)
    out += [(n, s, dict(c, ALIGNED=True)) for n, s, c in out]
    # the sum of a split layer's chunks of v' (float32 workspace, any weight dtype)
    return out + [("_cols_reduce_kernel", REDUCE, dict(BLOCK_C=BLOCK_C))]


def _tl_dtype(name):
    import triton.language as tl
    return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[name]


def compile_one(job):
    """Compiles one (kernel, constexprs, arch); returns its report (a dict)."""
    name, signature, constexprs, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spectral_ext.triton_kernels import fused_step as kernels

    fn = getattr(kernels, name)
    # every constexpr with a default value explicitly: ASTSource does not apply defaults (an
    # omitted FINALIZE or ACCUMULATE compiled as falsy, i.e. another variant than the launch's)
    defaults = {k: p.default for k, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    consts = {k: (_tl_dtype(v) if k.endswith("DTYPE") else v)
              for k, v in {**defaults, **constexprs}.items()}
    sig = dict(signature)
    sig.update({k: "constexpr" for k in consts})
    report = dict(kernel=name, arch=f"sm_{arch}",
                  variant=",".join(f"{k}={v}" for k, v in constexprs.items()
                                   if not k.startswith("BLOCK")))
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES))
    except Exception as exc:   # a compile error: reported, and the run fails
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return report
    report["shared"] = k.metadata.shared
    ptx = k.asm["ptx"]
    report["vector_loads"] = len(re.findall(r"ld\.global[^\n]*\.v4\.b32", ptx))
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage",
                                f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m:
        report.update(registers=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))
    else:
        report["error"] = f"cuobjdump gave no resource usage: {usage[:500]}"
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="80,90")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1 (the interpreter replaces the kernels)")
        return 2
    jobs = [(n, s, c, int(arch)) for arch in a.archs.split(",") for n, s, c in variants()]
    with ProcessPoolExecutor(a.jobs) as pool:
        reports = list(pool.map(compile_one, jobs))
    bad = spills = 0
    print(f"{'kernel':17s} {'arch':6s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'v4 ld':>5s}  variant")
    for r in reports:
        if "error" in r:
            bad += 1
            print(f"{r['kernel']:17s} {r['arch']:6s} COMPILE ERROR ({r['variant']}): {r['error']}")
            continue
        spill = r["stack"] + r["local"]
        spills += spill > 0
        print(f"{r['kernel']:17s} {r['arch']:6s} {r['registers']:4d} {spill:5d} {r['shared']:6d} "
              f"{r['vector_loads']:5d}  {r['variant']}")
    print(f"{len(reports)} compiles: {bad} failed, {spills} spill registers")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
