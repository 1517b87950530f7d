"""One iteration of the Hessian and Jacobian estimators next to one forward+backward pass
(benchmarks/estimators.py); the group's table shows the ratios."""

import pytest
import torch

from . import estimators


@pytest.mark.parametrize("what", ["fwd+bwd", "hvp", "jvp+vjp"])
def test_estimator_iteration(benchmark, device_model, what):
    device, model = device_model
    fn = estimators.estimator_impls(model, device)[what]
    benchmark.group = f"estimators {model} {device}"
    out = benchmark(fn if torch.device(device).type != "cuda" else
                    (lambda: (fn(), torch.cuda.synchronize())[0]))
    assert all(torch.isfinite(t).all() for t in out)
