"""`python -m benchmarks` (make bench) prints its table and writes consistent JSON."""

import json

import pytest

from .__main__ import main


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--sets", "nin", "--dtype", "float32,bfloat16", "--no-step", "--no-estimators",
          "--devices", "cpu",
          "--json", str(out)])
    text = capsys.readouterr().out
    assert "naive ms" in text and "grouped ms" in text and "\nnin " in text
    data = json.loads(out.read_text())
    assert [t["dtype"] for t in data["tables"]] == ["float32", "bfloat16"]
    for table in data["tables"]:
        (row,) = table["rows"]
        assert row["layers"] == 9 and row["params"] == 965568
        assert row["floor_s"] > 0 and row["bandwidth_Bps"] > 0
        for name in ("naive", "grouped"):
            assert row[f"{name}_s"] > 0
            assert row[f"{name}_count"] > row["layers"]   # several ops per layer
        for key in [k for k in row if k.endswith("_count") and k[:-6] not in ("naive", "grouped")]:
            if key.endswith("-plan_count"):   # no op dispatched, only its allocations
                assert 1 <= row[key] <= 3, f"{key}: a step plan allocates sigma and workspace"
            else:
                assert row[key] == 1, f"{key}: a native backend is one op per step"


def test_cli_from_the_repository_root_uses_the_installed_package():
    """`python -m benchmarks` in the checkout (what a README reader types) must not pick up the
    source tree's spectral_ext, which has no compiled kernels."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import benchmarks, spectral_ext, "
                          "spectral_ext._ops as o; print(spectral_ext.__file__, "
                          "o.CPU_EXTENSION_ERROR)"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, err = out.stdout.split()[0], out.stdout.split(maxsplit=1)[1].strip()
    assert not path.startswith(os.path.join(root, "spectral_ext")), path
    assert err == "None", err


@pytest.mark.parametrize("frozen", [0, 2])
def test_step_plan_script_prints_every_column(monkeypatch, capsys, frozen):
    """benchmarks/step_plan.py (the plan's and reg.step()'s numbers in RESULTS.md) on a tiny set:
    every column measured, and the regularizer really stepped through its plan (with frozen
    weights: a plan of the active ones)."""
    import sys
    from . import step_plan
    monkeypatch.setattr(sys, "argv", ["step_plan.py", "--layers", "6", "--size", "3",
                                      "--rounds", "5", "--threads", "1", "--frozen", str(frozen)])
    step_plan.main()
    text = capsys.readouterr().out
    for column in ("naive", "functional", "reg op path", "reg plan", "plan.step", "plan_step"):
        assert f"\n  {column} " in text, column
    assert "full input checks run 1 time(s)" in text


def test_cuda_host_path_script_prints_every_column(capsys):
    """benchmarks/cuda_host_path.py (the host-path target's measurement) through the CUDA
    emulation: the three columns for each layer count."""
    from . import cuda_host_path       # the script's own cuda_emulation module, loaded once
    reason = cuda_host_path.cuda_emulation.unavailable_reason()
    if reason:
        pytest.skip(reason)    # the emulation needs the CUDA headers and libcudart_static.a
    cuda_host_path.main()
    text = capsys.readouterr().out
    for n in (1, 40, 512):
        assert f"{n:4d} layers of 64x64: op" in text and "plan_step" in text
