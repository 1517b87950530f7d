"""`python -m benchmarks` (make bench) prints its table and writes consistent JSON."""

import json

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
