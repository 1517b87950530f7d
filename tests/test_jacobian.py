"""spectral_ext.jacobian against dense per-sample Jacobians (torch.func.jacrev + svdvals), float64."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from spectral_ext import jacobian


def _grads(out, params):
    """Gradients with zeros for parameters the quantity does not depend on (the Jacobian does
    not depend on the last layer's bias)."""
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).double()


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4)).double()


def _case(kind, batch=6):
    if kind == "mlp":
        return _mlp(), torch.randn(batch, 5, dtype=torch.float64)
    return _cnn(), torch.randn(batch, 2, 5, 5, dtype=torch.float64)


def _dense_jacobians(model, x, params=None):
    f = model if params is None else (lambda xi: functional_call(model, params, (xi,)))
    J = vmap(jacrev(lambda xi: f(xi.unsqueeze(0)).squeeze(0)))(x)
    return J.reshape(x.shape[0], -1, x[0].numel())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_spectral_norm_matches_svdvals(kind):
    model, x = _case(kind)
    ref = torch.linalg.svdvals(_dense_jacobians(model, x))[:, 0]
    sig = jacobian.spectral_norm(model, x, n_iter=500, tol=1e-12, check_every=1)
    assert sig.shape == (x.shape[0],)
    torch.testing.assert_close(sig, ref.detach(), rtol=1e-6, atol=0)


def test_singular_vectors_satisfy_jv_eq_sigma_u():
    model, x = _case("mlp")
    sig, u, v, _ = jacobian.spectral_norm_with_vectors(model, x, n_iter=500, tol=1e-12,
                                                        check_every=1)
    J = _dense_jacobians(model, x).detach()
    torch.testing.assert_close(torch.einsum("bij,bj->bi", J, v.reshape(len(x), -1)),
                               sig[:, None] * u, rtol=1e-5, atol=1e-8)


def test_batched_equals_per_sample():
    model, x = _case("cnn")
    v0 = torch.randn_like(x)
    batched = jacobian.spectral_norm(model, x, n_iter=30, v0=v0)
    single = torch.cat([jacobian.spectral_norm(model, x[i:i + 1], n_iter=30, v0=v0[i:i + 1])
                        for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=0)


def test_warm_start_converges_in_fewer_iterations():
    """After a small parameter step, 3 iterations from the previous singular vectors are far
    closer to the exact sigma than 3 from random vectors (so a tolerance is met sooner).  A
    smooth network (a ReLU pattern may flip under the step, moving J discontinuously), and the
    median error over the batch (one sample may have nearly equal top singular values)."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    _, _, v, it = jacobian.spectral_norm_with_vectors(model, x, n_iter=2000, tol=1e-12,
                                                      check_every=1)
    assert it < 2000
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    exact = torch.linalg.svdvals(_dense_jacobians(model, x))[:, 0].detach()
    err = lambda s: ((s - exact).abs() / exact).median().item()
    warm = err(jacobian.spectral_norm(model, x, n_iter=3, v0=v))
    cold = err(jacobian.spectral_norm(model, x, n_iter=3))
    assert warm <= 1e-4 and warm < cold / 10, (warm, cold)


def test_regularizer_gradient_matches_autograd_of_dense_svdvals():
    model, x = _case("mlp")
    lam = 0.7
    reg = jacobian.JacobianSpectralNormRegularizer(lam=lam, n_iter=500)
    term = reg(model, x)
    params = dict(model.named_parameters())
    grads = _grads(term, list(params.values()))

    ref_term = lam * torch.linalg.svdvals(_dense_jacobians(model, x, params))[:, 0].pow(2).mean()
    ref = _grads(ref_term, list(params.values()))
    torch.testing.assert_close(term, ref_term, rtol=1e-8, atol=0)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9)


def test_regularizer_keeps_per_sample_vectors():
    model, x = _case("mlp", batch=4)
    reg = jacobian.JacobianSpectralNormRegularizer(lam=0.1, n_iter=2, num_samples=10)
    idx = torch.tensor([7, 2, 5, 0])
    reg(model, x, index=idx)
    kept = reg.vectors.clone()
    untouched = [i for i in range(10) if i not in idx.tolist()]
    reg(model, x, index=idx)            # 2 more iterations from the kept vectors
    assert torch.equal(reg.vectors[untouched], kept[untouched])
    sig = jacobian.spectral_norm(model, x, n_iter=2, v0=kept[idx])
    torch.testing.assert_close(reg.last_sigma, sig, rtol=1e-12, atol=0)
    other = jacobian.JacobianSpectralNormRegularizer(lam=0.1, n_iter=2, num_samples=10)
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.vectors, reg.vectors)


def test_frobenius_estimate_is_unbiased():
    """With many projections the random-projection estimate approaches ||J||_F^2 (each term
    has relative std about sqrt(2 / outputs); 4000 of them give about 1%)."""
    model, x = _case("mlp")
    ref = torch.linalg.matrix_norm(_dense_jacobians(model, x)).pow(2).detach()
    gen = torch.Generator().manual_seed(0)
    est = jacobian.frobenius_norm_sq(model, x, n_proj=4000, generator=gen)
    torch.testing.assert_close(est, ref, rtol=0.05, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exact_frobenius_and_jacobian_matrix_match_dense(kind):
    model, x = _case(kind)
    J = _dense_jacobians(model, x).detach()
    torch.testing.assert_close(jacobian.jacobian_matrix(model, x), J, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jacobian.frobenius_norm_sq_exact(model, x),
                               torch.linalg.matrix_norm(J).pow(2), rtol=1e-12, atol=0)


def test_exact_frobenius_regularizer_gradient_matches_dense():
    model, x = _case("mlp")
    params = dict(model.named_parameters())
    term = jacobian.JacobianFrobeniusRegularizer(lam=0.5, exact=True)(model, x)
    got = _grads(term, list(params.values()))
    ref_term = 0.5 * torch.linalg.matrix_norm(_dense_jacobians(model, x, params)).pow(2).mean()
    ref = _grads(ref_term, list(params.values()))
    torch.testing.assert_close(term, ref_term, rtol=1e-12, atol=0)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_frobenius_regularizer_is_differentiable():
    model, x = _case("mlp")
    term = jacobian.JacobianFrobeniusRegularizer(lam=0.5, n_proj=2)(model, x)
    grads = _grads(term, list(model.parameters()))
    assert term.item() > 0 and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_bad_input():
    model, x = _case("mlp")
    with pytest.raises(ValueError, match="n_iter"):
        jacobian.spectral_norm(model, x, n_iter=0)
    with pytest.raises(ValueError, match="v0"):
        jacobian.spectral_norm(model, x, v0=torch.ones(3))
    with pytest.raises(ValueError, match="non-empty"):
        jacobian.spectral_norm(model, x[:0])
    with pytest.raises(TypeError, match="floating"):
        jacobian.spectral_norm(model, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not depend"):
        jacobian.spectral_norm(lambda t: torch.ones(t.shape[0], 2), x)
    with pytest.raises(ValueError, match="num_samples"):
        jacobian.JacobianSpectralNormRegularizer(lam=0.1)(model, x, index=torch.arange(6))


def test_attention_model_matches_written_out_attention():
    """J v comes from differentiating J^T w: a double backward, which the fused SDPA kernels
    lack (it used to raise 'derivative ... is not implemented')."""
    from test_hessian import _Attention
    models = [_Attention(fused) for fused in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(4, 5, 8)
    v0 = torch.randn(4, 5, 8)
    s = [jacobian.spectral_norm(m, x, n_iter=10, v0=v0) for m in models]
    assert torch.allclose(s[0], s[1], rtol=1e-4), s
    reg = jacobian.JacobianSpectralNormRegularizer(lam=0.1, n_iter=3)
    reg(models[0], x).backward()
    grad = models[0].qkv.weight.grad   # (the output bias does not change J: no gradient)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
