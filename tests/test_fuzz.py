"""The differential fuzzer's quick mode (tests/fuzz.py): every backend that runs here against the
float64 oracle, on small layers, with the test seed (SPECTRAL_EXT_TEST_SEED reproduces a run;
each failure prints the command that replays its case).  `make fuzz` runs the long mode."""

import pytest
import torch

import fuzz
from conftest import SEED

# cases per backend: about 30 s in all on the project's 2-core machine (cuda: on a GPU only)
QUICK_CASES = {"cpu": 200, "reference": 60, "triton": 40, "cuda-emulated": 80, "cuda": 200}


@pytest.mark.parametrize("backend", list(QUICK_CASES))
def test_quick_fuzz(backend):
    why = fuzz.available(backend)
    if why:
        pytest.skip(f"{backend}: {why}")
    failures = fuzz.fuzz(backend, QUICK_CASES[backend], SEED, quick=True)
    assert not failures, "\n".join(str(f) for f in failures[:10])


@pytest.mark.parametrize("wrong", ["sigma", "v", "grad", "kept_v"])
def test_the_fuzzer_catches_a_wrong_result(monkeypatch, wrong):
    """The checks can fail: a backend whose sigma, v or gradient is off by 1e-4 relative, or
    that rewrites a kept v (of a zero layer) in float32, is reported."""
    run = fuzz.run
    calls = []

    def broken(backend, inputs, lam, n_iter):   # the first call is the backend under test
        s, vs, gs = run(backend, inputs, lam, n_iter)
        calls.append(backend)
        if len(calls) > 1:
            return s, vs, gs
        if wrong == "sigma":
            s = s * (1 + 1e-4)
        elif wrong == "v":
            vs[0].mul_(1 + 1e-4)
        elif wrong == "grad":
            gs[0].add_(1e-4 * gs[0].abs().max())
        else:
            vs[0].copy_(vs[0].float())
        return s, vs, gs
    monkeypatch.setattr(fuzz, "run", broken)
    layer = fuzz.LayerSpec((7, 9), torch.float32, "contig", 0, "zero" if wrong == "kept_v" else
                           "none", torch.float64, False, "given", "contig", 0)
    case = fuzz.Case(SEED, "reference", [layer], 0.37, 2, True)
    failure = fuzz.check_case(case)
    assert failure is not None and ("v" if wrong == "kept_v" else wrong) in failure.what
