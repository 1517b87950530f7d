"""The demo (make demo's main job) and the naive baseline it compares against."""

import pytest
import torch

import spectral_ext as se
from spectral_ext.experiments import digits
from spectral_ext.experiments.naive import GroupPlan, grouped_step, naive_outer_step, naive_step

from conftest import assert_rel_close


@pytest.mark.parametrize("baseline", ["naive", "naive-outer", "grouped", "grouped-plan"])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_baselines_match_reference(baseline, n_iter):
    """The baselines of the benchmarks compute the same thing (apples to apples): repeated
    shapes (stacked groups), a conv, 1xN and Nx1, and a shape seen once."""
    shapes = [(37, 129), (16, 3, 3, 3), (1, 40), (40, 1), (37, 129), (16, 27), (37, 129), (1, 40)]
    weights = [torch.randn(s) for s in shapes]
    vs = se.init_vectors(weights)
    v_ref = [v.clone() for v in vs]
    for w in weights:
        w.grad = torch.randn_like(w)
    g_ref = [w.grad.clone() for w in weights]
    if baseline.startswith("naive"):
        step = naive_step if baseline == "naive" else naive_outer_step
        s = step(weights, vs, lam=0.2, n_iter=n_iter)
    else:
        plan = GroupPlan(weights) if baseline == "grouped-plan" else None
        s = grouped_step(weights, vs, lam=0.2, n_iter=n_iter, plan=plan)
    s_ref = se.reference.fused_step(weights, v_ref, lam=0.2, n_iter=n_iter, grads=g_ref)
    assert_rel_close(s, s_ref, 1e-5, "sigma")
    for w, g, a, b in zip(weights, g_ref, vs, v_ref):
        assert_rel_close(w.grad, g, 1e-5, "grad")
        assert_rel_close(a, b, 1e-5, "v")


def test_grouped_plan_groups_by_shape_and_dtype():
    weights = [torch.randn(4, 6), torch.randn(4, 2, 3), torch.randn(4, 6, dtype=torch.float64),
               torch.randn(6, 4), torch.randn(4, 6)]
    assert GroupPlan(weights).groups == [[0, 1, 4], [2], [3]]


def test_digits_demo_runs(capsys):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (make test installs it)")
    digits.main(["--epochs", "1", "--reps", "5", "--train-size", "200"])
    out = capsys.readouterr().out
    assert "== no regularizer ==" in out and "== lam=0.03 ==" in out
    assert "spectral_ext.fused_step" in out and "naive per-layer loop" in out
