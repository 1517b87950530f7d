"""Whole SGD training steps: no regularizer, the naive loop, the fused step (benchmarks/step.py).
The small CNN runs on every device, the GPT-2-small-shaped stack on CUDA only."""

import pytest
import torch

from . import step


@pytest.mark.parametrize("variant", ["none", "naive", "fused"])
def test_train_step(benchmark, device_model, variant):
    device, model = device_model
    impls, _ = step.train_step_impls(model, device)
    benchmark.group = f"train step {model} {device}"
    fn = impls[variant]
    benchmark(fn if torch.device(device).type != "cuda" else
              (lambda: (fn(), torch.cuda.synchronize())))


def test_naive_and_fused_train_steps_agree(device_model):
    """The two regularized steps are the same computation: from the same model, batch and
    vectors, one step of each leaves the same parameters, and not those of an unregularized
    step."""
    device, model = device_model
    (naive, m1), (fused, m2), (none, m3) = (step.train_step_impls(model, device) for _ in range(3))
    naive["naive"]()
    fused["fused"]()
    none["none"]()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters())), \
        "the regularizer changed nothing"
