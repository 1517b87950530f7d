"""The torch.library ops: opcheck, gradcheck, the penalty/fused-step identity, torch.compile."""

import pytest
import torch

import spectral_ext as se
from spectral_ext import _ops, reference

from conftest import assert_rel_close, gap_matrix

NATIVE = [b for b in ("cpu",) if se.available_backends()[b].available]
ALL = ["reference"] + NATIVE
# fused_step backends for the compiled training step (triton: CPU tensors in the interpreter
# without a GPU; the model then stays on the CPU)
STEP_BACKENDS = ALL + [b for b in ("cuda", "triton") if se.available_backends()[b].available]


def _step_device(backend):
    """Where the compiled training step runs for this backend."""
    gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def _weights(dtype=torch.float32, requires_grad=False):
    shapes = [(37, 129), (8, 3, 3, 3), (1, 20), (20, 1)]
    return [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


def test_kernels_are_registered():
    for op in ("spectral_ext::fused_step", "spectral_ext::spectral_norms"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta")       # fake impl
        if "cpu" in NATIVE:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    for op in ("spectral_ext::fused_step", "spectral_ext::spectral_norms",
               "spectral_ext::spectral_norms_backward"):
        if _ops.CUDA_KERNELS_ERROR is None:     # built with nvcc: the CUDA kernels registered
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    op = "spectral_ext::spectral_norms_backward"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta")


@pytest.mark.parametrize("accumulate", [False, True])
def test_opcheck_spectral_norms_backward(accumulate):
    ws = _weights()
    _, us, vs = reference.spectral_norms_values(ws, se.init_vectors(ws), 2)
    grads = [torch.randn_like(w) for w in ws]
    torch.library.opcheck(torch.ops.spectral_ext.spectral_norms_backward,
                          (torch.randn(len(ws)), us, vs, grads, accumulate))


def test_opcheck_spectral_norms_triton():
    if not se.available_backends()["triton"].available:
        pytest.skip(se.available_backends()["triton"].detail)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ws = [w.to(dev) for w in _weights(requires_grad=True)]
    torch.library.opcheck(torch.ops.spectral_ext.spectral_norms_triton,
                          (ws, se.init_vectors(ws), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_fused_step(dtype):
    ws = _weights(dtype)
    vs = se.init_vectors(ws)
    grads = [torch.randn_like(w) for w in ws]
    torch.library.opcheck(torch.ops.spectral_ext.fused_step, (ws, vs, grads, 0.25, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_spectral_norms(dtype):
    ws = _weights(dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.spectral_ext.spectral_norms, (ws, se.init_vectors(ws), 2))


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_float64(backend):
    """With converged vectors, sigma is sigma_1(W) and d sigma_1 / dW = u_1 v_1^T exactly, so the
    op's backward (u v^T) must match finite differences of the function it computes."""
    ws = [gap_matrix(6, 5).requires_grad_(), gap_matrix(4, 18).reshape(4, 2, 3, 3).requires_grad_()]
    vs = se.init_vectors(ws)
    se.spectral_norms(ws, vs, 100, backend=backend)           # converge the vectors

    def f(a, b):
        return se.spectral_norms([a, b], [v.clone() for v in vs], 30, backend=backend,
                                 update=False)

    assert torch.autograd.gradcheck(f, tuple(ws))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_penalty_gradient_equals_fused_step(backend, n_iter):
    lam = 0.2
    ws = _weights(requires_grad=True)
    vs = se.init_vectors(ws)
    v2 = [v.clone() for v in vs]
    sig = se.spectral_norms(ws, vs, n_iter, backend=backend)
    (lam / 2 * (sig ** 2).sum()).backward()
    penalty_grads = [w.grad.clone() for w in ws]
    fused_grads = [torch.zeros_like(w) for w in ws]
    sig2 = se.fused_step(ws, v2, lam=lam, n_iter=n_iter, grads=fused_grads, backend=backend)
    assert_rel_close(sig.detach(), sig2, 1e-6, "sigma")
    for i, (a, b) in enumerate(zip(penalty_grads, fused_grads)):
        assert_rel_close(a, b, 1e-5, f"grad[{i}]")
    for a, b in zip(vs, v2):
        assert torch.equal(a, b)


def test_spectral_norms_updates_vectors_only_when_asked():
    ws = _weights()
    vs = se.init_vectors(ws)
    before = [v.clone() for v in vs]
    se.spectral_norms(ws, vs, 1, update=False)
    assert all(torch.equal(a, b) for a, b in zip(vs, before))
    se.spectral_norms(ws, vs, 1)
    assert not any(torch.equal(a, b) for a, b in zip(vs[:1], before[:1]))


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_torch_compile_training_step(backend):
    """A training step with a compiled model and a compiled regularizer step (fullgraph: no graph
    break around the op) matches eager.  (Dynamo does not trace .backward() itself.)"""
    torch._dynamo.reset()
    device = _step_device(backend)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 4 * 4, 3)).to(device)

    x = torch.randn(5, 2, 6, 6, device=device)
    results = []
    for compiled in (False, True):
        model = make()
        reg = se.SpectralNormRegularizer(model, lam=0.1, backend=backend).to(device)
        assert reg.active_backend == backend
        forward = torch.compile(model) if compiled else model
        reg_step = torch.compile(reg.step, fullgraph=True) if compiled else reg.step
        sig = []
        for _ in range(2):
            model.zero_grad()
            forward(x).square().mean().backward()
            sig.append(reg_step())
        results.append((sig, [p.grad.clone() for p in model.parameters()], reg.vs()))
    (s0, g0, v0), (s1, g1, v1) = results
    for a, b in zip(s0 + g0 + v0, s1 + g1 + v1):
        assert_rel_close(b, a, 1e-5, "compiled vs eager")


@pytest.mark.parametrize("backend", ALL)
def test_torch_compile_differentiable_penalty(backend):
    """loss + reg.penalty() compiled with fullgraph (the spectral_norms op, its fake kernel and
    its registered autograd) gives eager's loss, gradients and vectors."""
    torch._dynamo.reset()
    x = torch.randn(4, 6)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        reg = se.SpectralNormRegularizer(model, lam=0.1, backend=backend)

        def loss_fn():
            return model(x).square().mean() + reg.penalty()

        fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
        for _ in range(2):
            model.zero_grad()
            loss = fn()
            loss.backward()
        results.append([loss.detach().reshape(1)] + [p.grad.clone() for p in model.parameters()]
                       + reg.vs())
    for a, b in zip(*results):
        assert_rel_close(b, a, 1e-5, "compiled vs eager")
