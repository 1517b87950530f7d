"""The reference itself: against the exact SVD, independent formulas, and the edge-case rules."""

import math

import pytest
import torch

import spectral_ext as se
from spectral_ext import reference

from conftest import assert_rel_close


def _matrix_with_gap(m, n, dtype=torch.float64):
    """A random m x n matrix whose top two singular values are well separated (2 : 1)."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=dtype))
    s = torch.linspace(1.0, 0.1, k, dtype=dtype)
    s[0] = 2.0
    return (U * s) @ V.T


@pytest.mark.parametrize("shape", [(37, 129), (129, 37), (16, 3, 3, 3), (1, 50), (50, 1)])
def test_converges_to_svd(shape):
    m, n = shape[0], math.prod(shape[1:])
    W = _matrix_with_gap(m, n).reshape(shape)
    v = se.init_vectors([W])
    g = torch.zeros_like(W)
    lam = 0.3
    sigma = reference.fused_step([W], v, lam=lam, n_iter=200, grads=[g])
    W2 = W.reshape(m, n)
    U, S, Vh = torch.linalg.svd(W2)
    assert abs(sigma[0].item() - torch.linalg.matrix_norm(W2, 2).item()) < 1e-10
    expected = lam * S[0] * torch.outer(U[:, 0], Vh[0])  # sign-invariant: both vectors flip
    assert_rel_close(g.reshape(m, n), expected, 1e-8, "gradient vs lam*sigma1*u1 v1^T")
    assert abs(abs(torch.dot(v[0], Vh[0]).item()) - 1) < 1e-10


def test_one_iteration_matches_closed_form():
    # sigma after one iteration from v is ||W^T W v|| / ||W v||: an independent formula, and
    # the paper's literal ||u|| / ||v|| (which would be 1/sigma for normalized u) is NOT it.
    W = torch.randn(20, 30, dtype=torch.float64)
    v0 = torch.randn(30, dtype=torch.float64)
    v0 /= v0.norm()
    sigma, u, v = reference.power_iteration(W, v0, 1)
    expected = (W.T @ (W @ v0)).norm() / (W @ v0).norm()
    assert abs(sigma.item() - expected.item()) < 1e-12
    assert_rel_close(u, W @ v0 / (W @ v0).norm(), 1e-12, "u")
    assert_rel_close(v, W.T @ u / sigma, 1e-12, "v")
    assert abs(v.norm().item() - 1) < 1e-12


def test_row_and_column_vectors_are_exact_after_one_iteration():
    r = torch.randn(1, 77, dtype=torch.float64)
    c = torch.randn(77, 1, dtype=torch.float64)
    sig = reference.spectral_norms([r, c], se.init_vectors([r, c]), 1)[0]
    assert abs(sig[0].item() - r.norm().item()) < 1e-12
    assert abs(sig[1].item() - c.norm().item()) < 1e-12


def test_zero_matrix_gives_zero_sigma_and_keeps_v():
    W = torch.zeros(5, 7)
    v = se.init_vectors([W])
    v0 = v[0].clone()
    g = torch.randn(5, 7)
    g0 = g.clone()
    sigma = reference.fused_step([W], v, lam=1.0, n_iter=3, grads=[g])
    assert sigma[0].item() == 0.0
    assert torch.equal(v[0], v0) and abs(v[0].norm().item() - 1) < 1e-6
    assert torch.equal(g, g0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_propagates_but_keeps_v(bad):
    W = torch.randn(6, 4)
    W[2, 1] = bad
    ok = torch.randn(3, 3)
    vs = se.init_vectors([W, ok])
    v0 = [v.clone() for v in vs]
    grads = [torch.zeros(6, 4), torch.zeros(3, 3)]
    sigma = reference.fused_step([W, ok], vs, lam=0.5, grads=grads)
    assert not torch.isfinite(sigma[0])
    assert not torch.isfinite(grads[0]).all()
    assert torch.equal(vs[0], v0[0])          # state kept, so it recovers with the weights
    assert torch.isfinite(sigma[1]) and torch.isfinite(grads[1]).all()   # other layers unaffected
    assert not torch.equal(vs[1], v0[1])


def test_low_precision_is_accumulated_in_float32():
    W = torch.randn(64, 300).to(torch.bfloat16)
    v = se.init_vectors([W])
    assert v[0].dtype == torch.float32
    sigma, us, vs_new = reference.spectral_norms([W], v, 2)
    assert sigma.dtype == torch.float32 and us[0].dtype == torch.float32
    s32 = reference.spectral_norms([W.float()], v, 2)[0]
    assert torch.equal(sigma, s32)     # the same float32 arithmetic on the upcast weight


def test_weight_without_grad_gets_one():
    W = torch.randn(4, 6, requires_grad=True)
    v = se.init_vectors([W])
    u = W.detach() @ v[0]          # from the vector before the step
    sigma = reference.fused_step([W], v, lam=2.0)
    assert W.grad is not None
    assert_rel_close(W.grad, 2.0 * sigma[0] * torch.outer(u / u.norm(), v[0]), 1e-5, "new grad")


def test_init_vectors_are_seeded_unit_vectors():
    ws = [torch.randn(3, 8), torch.randn(2, 4, 3, 3, dtype=torch.float64)]
    a, b = se.init_vectors(ws, seed=7), se.init_vectors(ws, seed=7)
    c = se.init_vectors(ws, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert [x.shape[0] for x in a] == [8, 36] and a[1].dtype == torch.float64
    assert all(abs(x.norm().item() - 1) < 1e-6 for x in a)
