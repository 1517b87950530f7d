"""Every Triton kernel, in every specialization the host launches, compiled for sm_80 and sm_90
by Triton's real pipeline without a GPU (benchmarks/triton_compile.py, in a subprocess: the
tests run the kernels in the interpreter, which replaces them).  A compile error fails; the
registers, spills and shared memory of each are printed at the end of the test run, and the
aligned variants must issue 16-byte vector loads."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernels_compile_for_sm80_and_sm90():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Triton is not installed: {exc}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        out = subprocess.run([sys.executable, "-P",
                              os.path.join(ROOT, "benchmarks", "triton_compile.py"),
                              "--archs", "80,90", "--json", report],
                             capture_output=True, text=True, env=env, cwd="/")
        conftest.REPORTS.append("Triton kernels compiled for sm_80 / sm_90 (triton.compile, no "
                                "GPU):\n" + out.stdout.strip())
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "110 compiles: 0 failed" in out.stdout
        with open(report) as f:
            reports = json.load(f)
    # The ALIGNED hints (set by the host only where they hold) are what makes the tiles' W and
    # gradient accesses 16-byte vector loads: every W-reading variant has them with the flag and
    # none without (hints moved into a helper function are lost: this fails then).
    for r in reports:
        if r["kernel"] in ("_rows_kernel", "_cols_kernel") or (
                "UPDATE_GRAD=True" in r["variant"] and "ACCUMULATE=False" not in r["variant"]):
            aligned = "ALIGNED=True" in r["variant"]
            assert (r["vector_loads"] > 0) == aligned, r
