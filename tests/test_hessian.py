"""spectral_ext.hessian against dense Hessians (torch.func.hessian + eigvalsh), float64."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from spectral_ext import _power, hessian


def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _smooth_mlp():
    """The MLP with tanh: the finite-difference gradient differences gradients eps ~ 1e-4 apart
    along v, which is only accurate where the loss is smooth there (a ReLU kink crossed by some
    sample made the error 4e5 with SPECTRAL_EXT_TEST_SEED=7919)."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()


def _problem(kind):
    model = {"mlp": _mlp, "smooth": _smooth_mlp, "cnn": _cnn}[kind]()
    x = torch.randn(12, 4, dtype=torch.float64) if kind != "cnn" else \
        torch.randn(12, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    params = list(model.parameters())
    return model, params, (lambda: nn.functional.cross_entropy(model(x), y)), x, y


def _dense(model, x, y):
    """The dense Hessian of the loss as a function of the flat parameter vector, and that
    function (for autograd of dense quantities)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def flat_loss(theta):
        ps, i = [], 0
        for s in shapes:
            ps.append(theta[i:i + s.numel()].view(s))
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return torch.func.hessian(flat_loss)(theta), flat_loss, theta


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_spectral_radius_matches_dense_eigvalsh(kind, method):
    model, params, loss_fn, x, y = _problem(kind)
    H, _, _ = _dense(model, x, y)
    ev = torch.linalg.eigvalsh(H)
    rho_ref = ev.abs().max()
    # power iteration converges as (lambda_2 / lambda_1)^k: random problems can have small gaps
    rho, v = hessian.spectral_radius(loss_fn, params, n_iter=5000 if method == "power" else 60,
                                     tol=1e-14, method=method)
    assert rho.shape == () and len(v) == len(params)
    assert abs(rho.item() - rho_ref.item()) <= 1e-6 * rho_ref.item()
    # v is the eigenvector: H v = lambda v with |lambda| = rho
    vf = torch.cat([t.flatten() for t in v])
    lam = vf @ H @ vf
    assert abs(abs(lam.item()) - rho_ref.item()) <= 1e-6 * rho_ref.item()
    assert torch.linalg.vector_norm(H @ vf - lam * vf) <= 1e-3 * rho_ref
    assert all(p.grad is None for p in params), "the estimator must not touch .grad"


def test_rayleigh_quotient_is_signed_eigenvalue():
    model, params, loss_fn, x, y = _problem("mlp")
    H, _, _ = _dense(model, x, y)
    ev, vecs = torch.linalg.eigh(H)
    for k in (0, -1):
        v, i = [], 0
        for p in params:
            v.append(vecs[i:i + p.numel(), k].view(p.shape))
            i += p.numel()
        q = hessian.rayleigh_quotient(loss_fn, params, v)
        assert abs(q.item() - ev[k].item()) <= 1e-8 * ev.abs().max().item()


def test_power_iteration_on_negative_dominant_eigenvalue():
    """The largest |lambda| may be negative: rho is its magnitude."""
    A = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))
    res = _power.power_iteration(lambda v: [A @ v[0]], [torch.ones(3, dtype=torch.float64)], 200)
    assert abs(res.value.item() - 3.0) < 1e-9
    assert abs(abs(res.vector[0][1].item()) - 1.0) < 1e-6


def test_warm_start_needs_fewer_iterations():
    """After a small parameter step, 3 iterations from the previous eigenvector are far closer
    to the dense rho than 3 from a random vector (so a tolerance is met sooner).  A smooth
    network: a ReLU pattern may flip under the step and move the Hessian discontinuously."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    params = list(model.parameters())
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
    _, v = hessian.spectral_radius(loss_fn, params, n_iter=60, tol=1e-13, method="lanczos")
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    exact = torch.linalg.eigvalsh(_dense(model, x, y)[0]).abs().max().item()
    err = lambda rho: abs(rho.item() - exact) / exact
    warm = err(hessian.spectral_radius(loss_fn, params, n_iter=3, tol=None, v0=v)[0])
    cold = err(hessian.spectral_radius(loss_fn, params, n_iter=3, tol=None)[0])
    assert warm <= 1e-3 and warm < cold / 10, (warm, cold)


def test_tolerance_stops_early_and_none_runs_all():
    model, params, loss_fn, _, _ = _problem("mlp")
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    hvp = hessian.hvp_operator(grads, params)
    calls = []
    counted = lambda v: (calls.append(1), hvp(v))[1]
    res = _power.power_iteration(counted, _power.random_like(params), 1000, tol=1e-3, check_every=5)
    assert res.iterations < 1000 and res.iterations % 5 == 0 and len(calls) == res.iterations
    calls.clear()
    res = _power.power_iteration(counted, _power.random_like(params), 7, tol=None)
    assert res.iterations == 7 and len(calls) == 7


@pytest.mark.parametrize("grad_method", ["autograd", "finite_difference"])
def test_regularizer_gradient_matches_autograd_of_dense_rho(grad_method):
    """d/dtheta [loss + mu * rho(theta)] against autograd through the dense Hessian's
    eigvalsh (the top eigenvalue is simple for these random problems)."""
    model, params, loss_fn, x, y = _problem("smooth")
    mu = 0.3
    # Lanczos over the whole (51-dimensional) space: v exact to rounding, whatever the gap
    reg = hessian.SpectralRadiusRegularizer(mu=mu, n_iter=60, method="lanczos",
                                            grad_method=grad_method)
    total = reg(loss_fn, params)
    total.backward()
    got = torch.cat([p.grad.flatten() for p in params])

    H, flat_loss, theta = _dense(model, x, y)
    theta = theta.clone().requires_grad_(True)
    ev = torch.linalg.eigvalsh(torch.func.hessian(flat_loss)(theta))
    ref_total = flat_loss(theta) + mu * ev.abs().max()
    (ref,) = torch.autograd.grad(ref_total, theta)
    assert abs(total.item() - ref_total.item()) <= 1e-8 * abs(ref_total.item())
    tol = 1e-6 if grad_method == "autograd" else 1e-4   # O(eps^2) truncation of the difference
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= tol, f"relative gradient error {err:.2e}"
    assert reg.last_rho is not None and abs(reg.last_rho.item() - ev.abs().max().item()) < 1e-8


def test_finite_difference_restores_parameters_exactly():
    model, params, loss_fn, _, _ = _problem("mlp")
    before = [p.detach().clone() for p in params]
    reg = hessian.SpectralRadiusRegularizer(mu=0.1, n_iter=3, grad_method="finite_difference")
    reg(loss_fn, params).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_regularizer_warm_starts_and_state_dict_round_trips():
    """A regularizer loaded from another's state_dict continues from its vector: both make the
    same next step (a cold start would draw a new random vector)."""
    model, params, loss_fn, _, _ = _problem("mlp")
    reg = hessian.SpectralRadiusRegularizer(mu=0.1, n_iter=3)
    reg(loss_fn, params)
    other = hessian.SpectralRadiusRegularizer(mu=0.1, n_iter=3)
    other.load_state_dict(reg.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.v, reg.v))
    assert torch.equal(other.last_rho, reg.last_rho)
    a, b = reg(loss_fn, params), other(loss_fn, params)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(reg.v, other.v))
    cold = hessian.SpectralRadiusRegularizer(mu=0.1, n_iter=3)
    cold(loss_fn, params)
    assert not all(torch.equal(x, y) for x, y in zip(reg.v, cold.v))


@pytest.mark.parametrize("bad, match", [
    (dict(n_iter=0), "n_iter"), (dict(tol=-1.0), "tol"), (dict(method="qr"), "method"),
])
def test_spectral_radius_rejects_bad_arguments(bad, match):
    _, params, loss_fn, _, _ = _problem("mlp")
    with pytest.raises(ValueError, match=match):
        hessian.spectral_radius(loss_fn, params, **bad)


def test_rejects_bad_params_and_loss():
    _, params, loss_fn, _, _ = _problem("mlp")
    with pytest.raises(ValueError, match="requires_grad"):
        hessian.spectral_radius(loss_fn, [torch.zeros(3)])
    with pytest.raises(ValueError, match="empty"):
        hessian.spectral_radius(loss_fn, [])
    with pytest.raises(ValueError, match="scalar"):
        hessian.spectral_radius(lambda: torch.ones(2, requires_grad=True) * params[0].sum(), params)
    with pytest.raises(ValueError, match="shaped like params"):
        hessian.spectral_radius(loss_fn, params, v0=[torch.ones(2)])
    with pytest.raises(ValueError, match="mu"):
        hessian.SpectralRadiusRegularizer(mu=-1.0)


class _Attention(nn.Module):
    """One self-attention layer, through scaled_dot_product_attention or written out."""

    def __init__(self, fused, d=8):
        super().__init__()
        self.fused, self.qkv, self.out = fused, nn.Linear(d, 3 * d), nn.Linear(d, 3)

    def forward(self, x):   # x: [batch, tokens, d], 2 heads
        b, t, d = x.shape
        q, k, v = (z.view(b, t, 2, d // 2).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        if self.fused:
            a = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        return self.out(a.transpose(1, 2).reshape(b, t, d)).mean(1)


def test_attention_model_hessian_matches_written_out_attention():
    """The fused SDPA kernels have no double backward (CPU: flash_attention_for_cpu; CUDA:
    efficient/flash): the HVP used to raise 'derivative ... is not implemented'."""
    models = [_Attention(fused) for fused in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    v0 = _power.random_like(list(models[0].parameters()))
    rho = []
    for m in models:
        params = list(m.parameters())
        r, _ = hessian.spectral_radius(lambda: nn.functional.cross_entropy(m(x), y), params,
                                       n_iter=10, tol=None, v0=v0)
        rho.append(r)
    # the same function in two float32 implementations: rounding only
    assert torch.allclose(rho[0], rho[1], rtol=1e-4), rho


# --- Sandler et al.'s definition: bounds, Rayleigh estimate, residual test, skip-if-unconverged

@pytest.mark.parametrize("lam, upper, lower, g, coef", [
    (2.0, 0.0, 0.0, 2.0, 1.0), (-2.0, 0.0, 0.0, 2.0, -1.0), (0.0, 0.0, 0.0, 0.0, 0.0),
    (3.0, 1.0, -1.0, 2.0, 1.0), (0.5, 1.0, -1.0, 0.0, 0.0), (-1.5, 1.0, -1.0, 0.5, -1.0),
    (0.5, 1.0, 1.0, 0.5, -1.0), (-5.0, 1.0, float("-inf"), 4.0, -1.0),
    (-0.5, 1.0, 1.0, 0.5, 1.0), (-0.5, 1.0, 0.0, 0.0, 0.0),
])
def test_penalty_on_hand_values(lam, upper, lower, g, coef):
    got_g, got_c = hessian.penalty(torch.tensor(lam, dtype=torch.float64), upper, lower)
    assert got_g.item() == g and got_c.item() == coef


def test_top_eigenvalue_is_the_signed_dominant_eigenvalue():
    model, params, loss_fn, x, y = _problem("mlp")
    ev = torch.linalg.eigvalsh(_dense(model, x, y)[0])
    top = ev[ev.abs().argmax()]
    est = hessian.top_eigenvalue(loss_fn, params, n_iter=20000, tol=1e-9, check_every=10)
    # residual r = ||Hv - qv|| / |q| bounds the eigenvalue error: |q - lambda| <= r |q|
    # (Bauer-Fike for symmetric H), and r^2 |q| for the Rayleigh quotient near a simple eigenvalue
    assert est.residual.item() <= 1e-9
    assert abs(est.eigenvalue.item() - top.item()) <= 1e-9 * abs(top.item())
    assert est.iterations < 20000 and est.iterations % 10 == 0


def test_residual_criterion_stops_when_the_residual_is_small():
    A = torch.diag(torch.tensor([4.0, -1.0, 2.0, 0.5], dtype=torch.float64))
    calls = []
    mv = lambda v: (calls.append(1), [A @ v[0]])[1]
    res = _power.power_iteration(mv, [torch.ones(4, dtype=torch.float64)], 1000, tol=1e-8,
                                 check_every=1, criterion="residual")
    # (2/4)^k convergence: the residual of the vector before the last step is <= 1e-8
    assert res.iterations < 60 and len(calls) == res.iterations
    q, r = _power.residual(res.vector, [A @ res.vector[0]])
    assert r.item() <= 1e-8 and abs(q.item() - 4.0) <= 1e-12
    with pytest.raises(ValueError, match="criterion"):
        _power.power_iteration(mv, [torch.ones(4)], 3, criterion="norm")


@pytest.mark.parametrize("where", ["above", "inside", "below"])
@pytest.mark.parametrize("grad_method", ["autograd", "finite_difference"])
def test_bounded_penalty_gradient_matches_dense(where, grad_method):
    """loss + mu * max(0, rho - K, K_min - rho), rho = |lambda| of the dominant eigenvalue,
    against autograd through the dense Hessian: bounds put rho above, inside or below."""
    model, params, loss_fn, x, y = _problem("smooth")
    H, flat_loss, theta = _dense(model, x, y)
    ev = torch.linalg.eigvalsh(H)
    lam = ev[ev.abs().argmax()].item()
    a = abs(lam)
    upper, lower = {"above": (0.7 * a, 0.4 * a), "inside": (1.1 * a, 0.9 * a),
                    "below": (1.6 * a, 1.3 * a)}[where]
    mu = 0.3
    reg = hessian.SpectralRadiusRegularizer(mu=mu, n_iter=60, method="lanczos", upper=upper,
                                            lower=lower, grad_method=grad_method)
    total = reg(loss_fn, params)
    total.backward()
    got = torch.cat([p.grad.flatten() for p in params])

    theta = theta.clone().requires_grad_(True)
    e = torch.linalg.eigvalsh(torch.func.hessian(flat_loss)(theta))
    rho = e.abs().max()
    g = torch.clamp_min(torch.maximum(rho - upper, lower - rho), 0)
    ref_total = flat_loss(theta) + mu * g
    (ref,) = torch.autograd.grad(ref_total, theta)
    assert abs(total.item() - ref_total.item()) <= 1e-8 * abs(ref_total.item())
    tol = 1e-6 if grad_method == "autograd" else 1e-4   # O(eps^2) truncation of the difference
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= tol, f"relative gradient error {err:.2e}"
    assert abs(reg.last_eigenvalue.item() - lam) <= 1e-8 * a


@pytest.mark.parametrize("converges", [True, False])
def test_skip_unconverged_adds_no_penalty(converges):
    """The step's penalty is kept exactly when the final residual passes the test.  A huge tol
    always passes; tol = 1e-30 after one iteration never does."""
    model, params, loss_fn, _, _ = _problem("mlp")
    tol = 1e30 if converges else 1e-30
    reg = hessian.SpectralRadiusRegularizer(mu=0.5, n_iter=1, tol=tol, check_every=1000,
                                            convergence="residual", skip_unconverged=True)
    total = reg(loss_fn, params)
    assert bool(reg.last_converged) == converges
    loss = loss_fn()
    if converges:
        expected = loss + 0.5 * reg.last_eigenvalue.abs()
        assert torch.allclose(total, expected, rtol=1e-12, atol=0)
    else:
        assert torch.equal(total.detach(), loss.detach())
        total.backward()
        got = [p.grad.clone() for p in params]
        ref = torch.autograd.grad(loss_fn(), params)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_sandler_options_reject_bad_combinations():
    with pytest.raises(ValueError, match="lower"):
        hessian.SpectralRadiusRegularizer(mu=0.1, upper=1.0, lower=2.0)
    with pytest.raises(ValueError, match="skip_unconverged"):
        hessian.SpectralRadiusRegularizer(mu=0.1, skip_unconverged=True)
    with pytest.raises(ValueError, match="skip_unconverged"):
        hessian.SpectralRadiusRegularizer(mu=0.1, tol=1e-3, skip_unconverged=True)
    with pytest.raises(ValueError, match="residual"):
        hessian.SpectralRadiusRegularizer(mu=0.1, method="lanczos", convergence="residual")
    with pytest.raises(ValueError, match="convergence"):
        hessian.SpectralRadiusRegularizer(mu=0.1, convergence="exact")
