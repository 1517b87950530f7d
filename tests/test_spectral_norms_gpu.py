"""The GPU kernels of spectral_norms (forward: sigma, u, v of every layer; backward:
grad_W (+)= grad_sigma * u v^T of every layer in one launch) against spectral_ext.reference.

Backends: "cuda" (a GPU), "cuda-emulated" (the CUDA backend's own source, csrc/cuda/binding.cpp
and fused_step.cu, on CPU tensors through the CPU emulation: tests/cuda_emulation.py) and
"triton" (Triton's interpreter on CPU tensors without a GPU).  Each runs the ops directly:
``forward`` returns (sigma, us, vs_new), ``backward`` fills the gradients."""

import pytest
import torch

import spectral_ext as se
from spectral_ext import _ops, reference

import cuda_emulation
from conftest import (assert_lowp_close, assert_lowp_layers, assert_rel_close, backend_or_skip,
                      degenerate_layers, emulation_or_skip, gap_matrix)

GPU = torch.cuda.is_available()
BACKENDS = [("cuda", "cuda"), ("cuda-emulated", "cpu"), ("triton", "cuda" if GPU else "cpu")]


@pytest.fixture(params=BACKENDS, ids=[b for b, _ in BACKENDS])
def backend(request):
    return backend_or_skip(*request.param)


def forward(name, weights, vs, n_iter):
    if name == "cuda-emulated":
        return cuda_emulation.load().spectral_norms(list(weights), list(vs), n_iter)
    if name == "triton":
        return _ops.spectral_norms_triton(list(weights), list(vs), n_iter)
    return _ops.spectral_norms(list(weights), list(vs), n_iter)


def backward(name, grad_sigma, us, vs, grads, accumulate):
    if name == "cuda-emulated":
        return cuda_emulation.load().spectral_norms_backward(grad_sigma, list(us), list(vs),
                                                             list(grads), accumulate)
    if name == "triton":
        return _ops.spectral_norms_backward_triton(grad_sigma, list(us), list(vs), list(grads),
                                                   accumulate)
    return _ops.spectral_norms_backward(grad_sigma, list(us), list(vs), list(grads), accumulate)


def reference_backward(grad_sigma, us, vs, grads, accumulate):
    """The reference formula (the op's default kernel)."""
    _ops._spectral_norms_backward_default(grad_sigma, us, vs, grads, accumulate)


def _skip_float64(name):
    if name == "triton":
        pytest.skip("the triton backend takes float32/float16/bfloat16 weights")


# awkward shapes: row and column vectors, non-multiples of every tile size, conv 3-D/4-D; and
# layers that span several tiles of the CUDA kernels (rows and columns), 16-byte vector widths
# and not (1100 columns: float32 vectors; 1104: also 2-byte types; 1101: never)
SHAPES = [(1, 300), (300, 1), (3, 1000), (37, 129), (16, 3, 3, 3), (8, 4, 3), (1, 1), (5, 4)]
TILED = [(300, 1100), (40, 1104), (300, 1101), (2100, 3), (1, 5000), (33, 64, 3, 3)]


def _check_forward(got, ref, tol, what=""):
    (s, us, vn), (s_ref, us_ref, vn_ref) = got, ref
    assert s.dtype == s_ref.dtype and s.shape == s_ref.shape
    assert_rel_close(s, s_ref, tol, f"{what} sigma")
    for i, (a, b) in enumerate(zip(us, us_ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"u[{i}]"
        assert_rel_close(a, b, tol, f"{what} u[{i}]")
    for i, (a, b) in enumerate(zip(vn, vn_ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"v[{i}]"
        assert_rel_close(a, b, tol, f"{what} v[{i}]")


@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_matches_reference(backend, dtype, n_iter):
    name, dev = backend
    if dtype == torch.float64:
        _skip_float64(name)
    weights = [torch.randn(s, dtype=dtype, device=dev) for s in SHAPES + TILED]
    vs = se.init_vectors(weights, seed=5)
    v0 = [v.clone() for v in vs]
    got = forward(name, weights, vs, n_iter)
    _check_forward(got, reference.spectral_norms_values(weights, vs, n_iter),
                   2e-5 if dtype == torch.float32 else 1e-12)
    assert all(torch.equal(a, b) for a, b in zip(vs, v0)), "the op must not change its inputs"


@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_forward_against_upcast_reference(backend, dtype, n_iter):
    """The 2x rule of conftest: error against the float64 oracle (the same inputs, upcast) at
    most twice that of the reference at the same precision, plus the float32 sum floor."""
    name, dev = backend
    weights = [torch.randn(s, device=dev).to(dtype) for s in SHAPES + TILED[:3]]
    vs = se.init_vectors(weights, seed=5)
    s, us, vn = forward(name, weights, vs, n_iter)
    s_ref, us_ref, vn_ref = reference.spectral_norms_values(weights, vs, n_iter)
    s64, us64, vn64 = reference.spectral_norms_values([w.double() for w in weights],
                                                      [v.double() for v in vs], n_iter)
    assert s.dtype == torch.float32 and all(u.dtype == torch.float32 for u in us)
    assert_lowp_layers(weights, (s, s_ref, s64), {"u": (us, us_ref, us64),
                                                  "v": (vn, vn_ref, vn64)})


def test_mixed_dtypes_and_awkward_layouts(backend):
    """Several weight dtypes in one call; transposed, strided, channels-last and not-viewable
    weights; strided and float64 vectors (vs_new in v's dtype, us in the accumulation dtype)."""
    name, dev = backend
    wide = torch.float32 if name == "triton" else torch.float64
    conv = torch.randn(16, 8, 3, 3, device=dev)
    weights = [torch.randn(129, 37, device=dev).t(),
               torch.randn(40, 90, device=dev)[:, ::3],
               torch.randn(30, 20, device=dev).to(torch.bfloat16)[::2],
               conv.to(memory_format=torch.channels_last),
               conv.transpose(0, 1).to(wide),                       # not viewable as 2-D
               torch.randn(6, 5, device=dev).to(torch.float16)]
    v0 = se.init_vectors(weights, seed=2)
    store = torch.zeros(2 * v0[0].numel(), device=dev)
    strided = store[::2]
    strided.copy_(v0[0])
    vs = [strided, v0[1].double(), v0[2], v0[3].double(), v0[4], v0[5]]
    got = forward(name, weights, vs, 2)
    ref = reference.spectral_norms_values(weights, vs, 2)
    # low-precision layers: the same float32 arithmetic on the same inputs, sums in another order
    _check_forward(got, ref, 1e-4)
    assert torch.equal(store[1::2], torch.zeros_like(store[1::2]))


@pytest.mark.parametrize("vdtype", [torch.float32, torch.float64], ids=str)
def test_zero_and_nan_layers(backend, vdtype):
    """Zero matrix: sigma 0, u 0, v kept bit for bit (in its own dtype); NaN/Inf weights:
    non-finite sigma, v kept; the other layers unaffected; and their gradients."""
    name, dev = backend
    weights = degenerate_layers(dev)
    vs = [torch.randn(w[0].numel(), dtype=torch.float64, device=dev) for w in weights]
    vs = [(v / v.norm()).to(vdtype) for v in vs]
    for n_iter in (1, 3):
        s, us, vn = forward(name, weights, vs, n_iter)
        s_ref, us_ref, vn_ref = reference.spectral_norms_values(weights, vs, n_iter)
        assert s[0] == 0 and torch.equal(us[0], torch.zeros_like(us[0]))
        assert torch.equal(vn[0], vs[0]) and vn[0].dtype == vdtype
        for i in (1, 2):
            assert not torch.isfinite(s[i]) and not torch.isfinite(s_ref[i])
            assert torch.equal(vn[i], vs[i]) and vn[i].dtype == vdtype
        assert not torch.equal(vn[3], vs[3])
        assert_rel_close(s[3:], s_ref[3:], 2e-5, "sigma of the finite layer")
        assert_rel_close(us[3], us_ref[3], 2e-5, "u of the finite layer")
        assert_rel_close(vn[3], vn_ref[3], 2e-5, "v of the finite layer")
    grads = [torch.full_like(w, 7.0) for w in weights]
    backward(name, torch.ones(4, device=dev), us, vn, grads, False)
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))        # overwritten, u = 0
    assert not torch.isfinite(grads[1]).all() and not torch.isfinite(grads[2]).all()
    assert torch.isfinite(grads[3]).all()


def _backward_inputs(weights, dev, n_iter=2):
    vs = se.init_vectors(weights, seed=7)
    _, us, vn = reference.spectral_norms_values(weights, vs, n_iter)
    sdtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    grad_sigma = torch.randn(len(weights), dtype=sdtype, device=dev)
    return grad_sigma, us, vn


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_backward_matches_reference(backend, dtype, accumulate):
    name, dev = backend
    if dtype == torch.float64:
        _skip_float64(name)
    weights = [torch.randn(s, device=dev).to(dtype) for s in SHAPES + TILED]
    grad_sigma, us, vn = _backward_inputs(weights, dev)
    vn[1] = vn[1].double()                                          # a float64 v
    start = [torch.randn(w.shape, device=dev).to(dtype) for w in weights]
    start[0] = torch.randn(2 * weights[0].numel(), device=dev).to(dtype)[::2].view(
        weights[0].shape)                                           # a strided gradient
    start[-1] = start[-1].to(memory_format=torch.channels_last)
    grads = [g.clone() if g.is_contiguous() else g for g in start]
    before = [g.clone() for g in grads]
    backward(name, grad_sigma, us, vn, grads, accumulate)
    expect = [g.clone() for g in before]
    reference_backward(grad_sigma, us, vn, expect, accumulate)
    if dtype in (torch.float32, torch.float64):
        tol = 2e-6 if dtype == torch.float32 else 1e-14
        for i, (a, b) in enumerate(zip(grads, expect)):
            assert a.dtype == dtype and a.shape == b.shape
            assert_rel_close(a, b, tol, f"grad[{i}]")
        return
    # low precision: against the float64 oracle of the same inputs, the 2x rule
    oracle = [g.double() for g in before]
    reference_backward(grad_sigma.double(), [u.double() for u in us],
                       [v.double() for v in vn], oracle, accumulate)
    for i, (a, b, o) in enumerate(zip(grads, expect, oracle)):
        assert a.dtype == dtype
        assert_lowp_close(a, b, o, f"grad[{i}]", 1)


def test_backward_float32_against_float64_gradient(backend):
    """Gradcheck-style: the float32 kernels' gradient of sigma (forward, then the fused backward)
    against the exact gradient computed in float64, u_1 v_1^T of well-separated matrices (top
    singular value 3x the next, converged vectors)."""
    name, dev = backend
    mats = [gap_matrix(6, 5), gap_matrix(4, 18), gap_matrix(40, 33), gap_matrix(1, 7)]
    w64 = [mats[0], mats[1].reshape(4, 2, 3, 3), mats[2], mats[3]]
    vs = se.init_vectors(w64)
    _, _, vs = reference.spectral_norms_values(w64, vs, 200)       # converged in float64
    weights = [w.float().to(dev) for w in w64]
    s, us, vn = forward(name, weights, [v.float().to(dev) for v in vs], 5)
    grad_sigma = torch.randn(len(weights))
    grads = [torch.empty_like(w) for w in weights]
    backward(name, grad_sigma.to(dev), us, vn, grads, False)
    for i, w in enumerate(w64):
        m = w.reshape(w.shape[0], -1)
        U, S, Vh = torch.linalg.svd(m)
        # u_1 v_1^T does not depend on the singular vectors' common sign
        exact = (grad_sigma[i].double() * torch.outer(U[:, 0], Vh[0])).reshape(w.shape)
        assert_rel_close(s[i:i + 1].cpu(), S[:1].float(), 1e-5, f"sigma[{i}]")
        assert_rel_close(grads[i].cpu(), exact, 1e-5, f"grad[{i}] (float32 vs float64)")


def test_float64_finite_differences(backend):
    """The fused backward is the derivative of the fused forward: a central difference of sigma
    along random directions (float64, converged vectors) equals <grad, D>."""
    name, dev = backend
    _skip_float64(name)
    w64 = [gap_matrix(6, 5).to(dev), gap_matrix(4, 18).reshape(4, 2, 3, 3).to(dev)]
    vs = se.init_vectors(w64)
    _, _, vs = reference.spectral_norms_values(w64, vs, 200)
    s, us, vn = forward(name, w64, vs, 30)
    grads = [torch.empty_like(w) for w in w64]
    grad_sigma = torch.tensor([0.7, -1.3], dtype=torch.float64, device=dev)
    backward(name, grad_sigma, us, vn, grads, False)
    eps = 1e-6
    for _ in range(3):
        D = [torch.randn_like(w) for w in w64]
        plus = forward(name, [w + eps * d for w, d in zip(w64, D)], vn, 30)[0]
        minus = forward(name, [w - eps * d for w, d in zip(w64, D)], vn, 30)[0]
        numeric = ((plus - minus) / (2 * eps) * grad_sigma).sum()
        analytic = sum((g * d).sum() for g, d in zip(grads, D))
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic.item())), \
            (numeric.item(), analytic.item())


@pytest.mark.parametrize("n_layers", [1, 7])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_launch_counts(n_layers, n_iter):
    """The emulation counts kernel launches: the forward is 2 * n_iter launches and the backward
    one, whatever the number of layers (one weight dtype)."""
    ops = emulation_or_skip()
    weights = [torch.randn(s) for s in (SHAPES * 2)[:n_layers]]
    vs = se.init_vectors(weights)
    n0 = ops.launches()
    _, us, vn = ops.spectral_norms(weights, vs, n_iter)
    assert ops.launches() - n0 == 2 * n_iter
    n0 = ops.launches()
    ops.spectral_norms_backward(torch.ones(n_layers), us, vn,
                                [torch.empty_like(w) for w in weights], False)
    assert ops.launches() - n0 == 1


# ---- bad input: the errors of fused_step's checks -----------------------------------------------

def _bad_inputs(dev):
    ok = torch.randn(4, 5, device=dev)
    v = se.init_vectors([ok])[0]
    return {
        "lengths": ([ok], [v, v.clone()]),
        "empty": ([], []),
        "int weight": ([torch.ones(4, 5, dtype=torch.int32, device=dev)], [v]),
        "1-D weight": ([torch.randn(5, device=dev)], [v]),
        "empty weight": ([torch.randn(0, 5, device=dev)], [v]),
        "v shape": ([ok], [torch.randn(4, device=dev)]),
        "v dtype": ([ok], [v.half()]),
        "same v twice": ([ok, ok.clone()], [v, v]),
        "same weight twice": ([ok, ok], [v, v.clone()]),
        "expanded v": ([ok], [torch.ones(1, device=dev).expand(5)]),
    }


def _error(fn):
    try:
        fn()
    except Exception as exc:   # noqa: BLE001 - the type and message are compared
        return type(exc), str(exc).split("\n")[0]
    return None


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")), ids=str)
def test_bad_input_gives_fused_steps_errors(backend, case):
    name, dev = backend
    if case == "empty" and name != "triton":
        pytest.skip("no tensor to dispatch on: the dispatcher's error, before any kernel")
    weights, vs = _bad_inputs(dev)[case]
    grads = [torch.zeros_like(w) for w in weights]
    if name == "cuda-emulated":
        ops = cuda_emulation.load()
        got = _error(lambda: ops.spectral_norms(weights, vs, 1))
        want = _error(lambda: ops.fused_step(weights, vs, grads, 0.1, 1))
    else:   # the public API: Python checks before the op
        got = _error(lambda: se.spectral_norms(weights, vs, 1, backend=name))
        want = _error(lambda: se.fused_step(weights, vs, grads=grads, lam=0.1, backend=name))
    if case == "empty":
        assert got is None     # the public spectral_norms of no layers is an empty sigma
        return
    assert got is not None and want is not None
    assert got == want
    if name == "cuda-emulated":
        n_iter_err = _error(lambda: ops.spectral_norms([torch.randn(3, 3)], [torch.ones(3)], 0))
        assert n_iter_err == _error(lambda: ops.fused_step([torch.randn(3, 3)], [torch.ones(3)],
                                                           [torch.zeros(3, 3)], 0.1, 0))


# ---- the public API and the regularizer use the fused kernels -----------------------------------

def test_public_api_and_penalty_use_the_triton_kernels(monkeypatch):
    """backend="triton": spectral_norms' forward and its autograd backward run the Triton
    kernels (counted), with the reference's values and gradients."""
    if not se.available_backends()["triton"].available:
        pytest.skip(se.available_backends()["triton"].detail)
    from spectral_ext import triton_kernels as tk
    calls = {"forward": 0, "backward": 0}
    real_f, real_b = tk.spectral_norms_forward, tk.spectral_norms_backward

    def count_f(*a):
        calls["forward"] += 1
        return real_f(*a)

    def count_b(*a):
        calls["backward"] += 1
        return real_b(*a)

    monkeypatch.setattr(tk, "spectral_norms_forward", count_f)
    monkeypatch.setattr(tk, "spectral_norms_backward", count_b)
    dev = torch.device("cuda" if GPU else "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3)).to(dev)
    grads = []
    for backend in ("triton", "reference"):
        reg = se.SpectralNormRegularizer(model, lam=0.3, n_iter=2, backend=backend)
        model.zero_grad()
        reg.penalty().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert calls == {"forward": 1, "backward": 1}
    assert len(grads[0]) == len(grads[1]) == 2          # the two weights (not the biases)
    for a, b in zip(*grads):
        assert_rel_close(a, b, 2e-5, "penalty gradient")


def test_autograd_on_cuda_uses_the_fused_backward():
    """On a GPU: backend="cuda" runs the CUDA kernels forward and backward; the gradient of
    sum(c * sigma) is the reference's."""
    if not se.available_backends()["cuda"].available:
        pytest.skip(se.available_backends()["cuda"].detail)
    ws = [torch.randn(s, device="cuda", requires_grad=True) for s in SHAPES + TILED[:2]]
    vs = se.init_vectors(ws)
    c = torch.randn(len(ws), device="cuda")
    grads = []
    for backend in ("cuda", "reference"):
        for w in ws:
            w.grad = None
        (c * se.spectral_norms(ws, [v.clone() for v in vs], 2, backend=backend)).sum().backward()
        grads.append([w.grad.clone() for w in ws])
    with torch.profiler.profile() as prof:
        (c * se.spectral_norms(ws, [v.clone() for v in vs], 2, backend="cuda")).sum().backward()
    names = " ".join(e.name for e in prof.events())
    assert "spectral_norms_backward" in names
    for a, b in zip(*grads):
        assert_rel_close(a, b, 2e-5, "gradient")
