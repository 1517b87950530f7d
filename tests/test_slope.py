"""spectral_ext.slope against dense Jacobians, float64."""

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from spectral_ext import slope


def _grads(out, params):
    """Gradients with zeros for parameters the quantity does not depend on (the Jacobian does
    not depend on the last layer's bias)."""
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def _dense(model, x):
    J = vmap(jacrev(lambda xi: model(xi.unsqueeze(0)).squeeze(0)))(x)
    return J.reshape(x.shape[0], -1, x[0].numel()).detach()


def test_scalar_output_is_gradient_norm():
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 1)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    ref = _dense(model, x)[:, 0, :].norm(dim=1)
    torch.testing.assert_close(slope.slope(model, x), ref, rtol=1e-10, atol=0)


def test_default_is_the_authors_uncentered_top_singular_value():
    """The authors' get_sing: sigma_max of the Jacobian of the logits, no centring."""
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = torch.linalg.svdvals(_dense(model, x))[:, 0]
    torch.testing.assert_close(slope.slope(model, x), ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["exact", "power", "auto-beyond-threshold"])
@pytest.mark.parametrize("center", [True, False])
def test_logits_slope_is_top_singular_value(center, method):
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    J = _dense(model, x)
    if center:   # the softmax ignores the all-ones direction of the logits
        J = (torch.eye(4, dtype=torch.float64) - 1 / 4) @ J
    ref = torch.linalg.svdvals(J)[:, 0]
    if method == "exact":
        # K VJPs + svdvals: exact to rounding, no iteration
        got = slope.slope(model, x, center=center, method="exact")
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    else:
        kw = dict(method="power") if method == "power" else dict(exact_max_outputs=3)
        got = slope.slope(model, x, n_iter=500, tol=1e-12, center=center, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_slope_of_a_linear_map_and_rescaling():
    """An affine network has the same slope everywhere, and scaling its output by c scales the
    slope by c (the paper's rescaling check)."""
    lin = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    s = slope.slope(lin, x, n_iter=300, tol=1e-12)
    torch.testing.assert_close(s, s[:1].expand(8), rtol=1e-8, atol=0)
    s3 = slope.slope(lambda t: 3.0 * lin(t), x, n_iter=300, tol=1e-12)
    torch.testing.assert_close(s3, 3.0 * s, rtol=1e-8, atol=0)


@pytest.mark.parametrize("method, center", [("exact", False), ("power", False), ("exact", True),
                                            ("power", True)])
def test_slope_loss_gradient_matches_dense(method, center):
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    loss = slope.slope_loss(model, x, n_iter=500, method=method, center=center)
    grads = _grads(loss, list(model.parameters()))
    P = torch.eye(3, dtype=torch.float64) - (1 / 3 if center else 0)
    params = dict(model.named_parameters())
    from torch.func import functional_call
    J = vmap(jacrev(lambda xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)))(x)
    sv = torch.linalg.svdvals(P @ J)
    ref_loss = sv[:, 0].pow(2).mean()
    ref = _grads(ref_loss, list(params.values()))
    if method == "exact":     # rounding only
        rtol_loss, rtol = 1e-10, 1e-9
    else:
        # 500 power iterations on J^T J: the singular vectors' angle shrinks like
        # (s2/s1)^(2k) (times the starting angle's tangent: 100 covers a random start), the
        # gradient (fixed-vector u^T J v) errs by that angle, sigma by its square
        ratio = torch.where(sv[:, 0] > 0, sv[:, 1] / sv[:, 0], 0.0)   # J = 0: every ReLU off
        angle = 100 * ratio.max().item() ** (2 * 500)
        rtol_loss, rtol = 1e-10 + angle ** 2, 1e-9 + angle
    torch.testing.assert_close(loss, ref_loss, rtol=rtol_loss, atol=0)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=rtol, atol=1e-9 * max(1.0, rtol / 1e-9))


def test_local_variation_against_dense_slopes():
    """|s(x) - s(x + r u)| / s(x), each slope from the dense Jacobian, with the same directions
    (the generator draws u per sample for each radius and direction, in that order)."""
    from spectral_ext import _power
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    radii = (0.05, 0.5)
    got = slope.local_variation(model, x, radii=radii, n_directions=3,
                                generator=torch.Generator().manual_seed(7))
    assert got.shape == (4, 2, 3)
    s = lambda z: torch.linalg.svdvals(_dense(model, z))[:, 0]
    s0, gen = s(x), torch.Generator().manual_seed(7)
    for j, r in enumerate(radii):
        for d in range(3):
            u = _power.random_like([x], batched=True, generator=gen)[0]
            assert torch.allclose(u.norm(dim=1), torch.ones(4, dtype=torch.float64))
            ref = (s0 - s(x + r * u)).abs() / s0
            ref = torch.where(s0 > 0, ref, torch.nan)   # a point where every ReLU is off: s = 0
            torch.testing.assert_close(got[:, j, d], ref, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_local_variation_of_an_affine_map_is_zero():
    lin = nn.Linear(6, 4).double()
    v = slope.local_variation(lin, torch.randn(3, 6, dtype=torch.float64), radii=(0.1, 10.0))
    assert v.abs().max() <= 1e-12
    with pytest.raises(ValueError, match="radii"):
        slope.local_variation(lin, torch.randn(3, 6), radii=(0.0,))
    with pytest.raises(ValueError, match="method"):
        slope.slope(lin, torch.randn(3, 6), method="svd")


def test_distribution_over_batches():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    xs = torch.randn(20, 3, dtype=torch.float64)
    loader = [(xs[:8], None), (xs[8:],)]
    stats = slope.distribution(model, loader, bins=5, quantiles=(0.5,))
    ref = slope.slope(model, xs)
    torch.testing.assert_close(stats.values, ref.cpu(), rtol=1e-12, atol=0)
    assert abs(stats.mean - ref.mean().item()) < 1e-12
    assert stats.quantiles[0.5] == pytest.approx(torch.quantile(ref.cpu(), 0.5).item(), rel=1e-12)
    counts, edges = stats.histogram
    assert counts.sum().item() == 20 and len(edges) == 6
    with pytest.raises(ValueError, match="no inputs"):
        slope.distribution(model, [])


def test_early_stopping_criterion():
    stop = slope.SlopeEarlyStopping(patience=2, rel_increase=0.1)
    seq = [1.0, 0.8, 0.7, 0.75, 0.78, 0.72, 0.9, 0.95]
    decisions = [stop.update(s) for s in seq]
    # 0.78 is within 10% of 0.7 (0.77 is the bound: above it), 0.72 resets, 0.9 and 0.95 stop
    assert decisions == [False, False, False, False, False, False, False, True]
    assert stop.best_epoch == 2 and stop.best == 0.7
    with pytest.raises(ValueError, match="patience"):
        slope.SlopeEarlyStopping(patience=0)
