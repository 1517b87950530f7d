"""Bad input raises a clear error naming the problem and leaves every tensor unchanged."""

import re

import pytest
import torch

import spectral_ext as se

BACKENDS = ["reference"] + [b for b in ("cpu", "cuda", "triton")
                             if se.available_backends()[b].available]
# triton runs on CPU tensors only in the interpreter; on a GPU it (and cuda) gets CUDA tensors
DEVICE = {"cuda": "cuda", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def _good(backend="reference"):
    dev = DEVICE.get(backend, "cpu")
    ws = [torch.randn(4, 6, device=dev), torch.randn(3, 2, 2, 2, device=dev)]
    return ws, se.init_vectors(ws), [torch.randn_like(w) for w in ws]


def _like(ws, *shape):
    """A tensor of ones on the weights' device (the cases run on CUDA tensors on a GPU)."""
    return torch.ones(shape, device=ws[0].device)


def _overlapping(ws, shapes, start):
    """Views of one buffer: the second starts at element `start`, inside the first."""
    n0 = 1
    for d in shapes[0]:
        n0 *= d
    n1 = 1
    for d in shapes[1]:
        n1 *= d
    buf = torch.randn(start + n1, device=ws[0].device)
    return [buf[:n0].view(shapes[0]), buf[start:start + n1].view(shapes[1])]


def _interleaved(ws):
    """grads[0] on the even, grads[1] on the odd elements of one buffer: no element is shared,
    but the byte ranges cross (refused: the rule compares byte ranges)."""
    buf = torch.randn(48, device=ws[0].device)
    return [buf[0::2].view(4, 6), buf[1::2].view(3, 2, 2, 2)]


# A negated vector or gradient (written in place): the native ops' dispatcher refuses it with its
# own RuntimeError before the kernel's checks run; the Python checks and the step plans say this.
NEGATED = (r"(?:{} is a lazily negated view \(is_neg\(\) is True\) and is updated in place"
           r"|doesn't currently support mutable TensorLists with negation inputs)")


def _cases():
    """(id, mutate(ws, vs, grads) -> kwargs, exception type, message fragment)."""
    return [
        ("length_mismatch", lambda ws, vs, gs: dict(weights=ws, vs=vs[:1]), ValueError,
         "2 weights but 1 vectors"),
        ("grads_length", lambda ws, vs, gs: dict(grads=gs[:1]), ValueError, "2 weights but 1 grads"),
        ("wrong_v_length", lambda ws, vs, gs: dict(vs=[vs[0], _like(ws, 5)]), ValueError,
         "v must have shape (8,)"),
        ("v_2d", lambda ws, vs, gs: dict(vs=[vs[0].reshape(2, 3), vs[1]]), ValueError,
         "vs[0] has shape (2, 3)"),
        ("v_dtype", lambda ws, vs, gs: dict(vs=[vs[0].half(), vs[1]]), TypeError,
         "v must be float32 or float64"),
        ("integer_weight", lambda ws, vs, gs: dict(weights=[ws[0].long(), ws[1]]), TypeError,
         "weights[0] has dtype torch.int64"),
        ("one_d_weight", lambda ws, vs, gs: dict(weights=[_like(ws, 6), ws[1]]), ValueError,
         "weights[0] is 1-D"),
        ("empty_weight", lambda ws, vs, gs: dict(weights=[_like(ws, 0, 6), ws[1]]), ValueError,
         "no elements"),
        ("weights_on_two_devices", lambda ws, vs, gs: dict(weights=[ws[0], ws[1].to("meta")]),
         ValueError, "weights[1] is on meta"),
        ("v_on_other_device", lambda ws, vs, gs: dict(vs=[vs[0], vs[1].to("meta")]), ValueError,
         "vs[1] is on meta"),
        ("grad_shape", lambda ws, vs, gs: dict(grads=[gs[0].t(), gs[1]]), ValueError,
         "grads[0] has shape (6, 4)"),
        ("grad_dtype", lambda ws, vs, gs: dict(grads=[gs[0].double(), gs[1]]), TypeError,
         "grads[0] has dtype torch.float64"),
        ("shared_v", lambda ws, vs, gs: dict(weights=[ws[0], ws[0].clone()], vs=[vs[0], vs[0]],
                                             grads=[gs[0], gs[0].clone()]),
         ValueError, "vs[1] is the same tensor"),
        ("repeated_weight", lambda ws, vs, gs: dict(weights=[ws[0], ws[0]],
                                                    vs=[vs[0], vs[0].clone()],
                                                    grads=[gs[0], gs[0].clone()]),
         ValueError, "weights[1] is the same tensor"),
        ("expanded_grad", lambda ws, vs, gs: dict(grads=[_like(ws, 1, 6).expand(4, 6), gs[1]]),
         ValueError, "grads[0] has overlapping memory"),
        ("expanded_v", lambda ws, vs, gs: dict(vs=[vs[0], _like(ws, 1).expand(8)]), ValueError,
         "vs[1] has overlapping memory"),
        # the kernels use memory directly: dense tensors without the negative bit only (the step
        # plans bypass the dispatcher, which refuses these on the op path)
        ("sparse_weight", lambda ws, vs, gs: dict(weights=[ws[0].detach().to_sparse(), ws[1]]),
         ValueError, "weights[0] has layout torch.sparse_coo"),
        ("negated_v", lambda ws, vs, gs: dict(vs=[torch._neg_view(vs[0]), vs[1]]),
         (ValueError, RuntimeError), NEGATED.format(re.escape("vs[0]"))),
        ("sparse_grad", lambda ws, vs, gs: dict(grads=[gs[0], gs[1].to_sparse()]), ValueError,
         "grads[1] has layout torch.sparse_coo"),
        ("negated_grad", lambda ws, vs, gs: dict(grads=[torch._neg_view(gs[0]), gs[1]]),
         (ValueError, RuntimeError), NEGATED.format(re.escape("grads[0]"))),
        # memory overlap (issue 13 item 12): refused before anything is written
        ("grad_is_weight", lambda ws, vs, gs: dict(grads=[ws[0], gs[1]]), ValueError,
         "weights[0] and grads[0] overlap in memory"),
        ("grad_views_other_weight", lambda ws, vs, gs: dict(grads=[gs[0], ws[0].view(3, 2, 2, 2)]),
         ValueError, "weights[0] and grads[1] overlap in memory"),
        ("v_views_its_weight", lambda ws, vs, gs: dict(vs=[vs[0], ws[1].view(-1)[:8]]), ValueError,
         "weights[1] and vs[1] overlap in memory"),
        ("v_views_a_grad", lambda ws, vs, gs: dict(vs=[gs[0][1], vs[1]]), ValueError,
         "vs[0] and grads[0] overlap in memory"),
        ("vs_overlap", lambda ws, vs, gs: dict(vs=_overlapping(ws, [(6,), (8,)], 4)), ValueError,
         "vs[0] and vs[1] overlap in memory"),
        ("grads_overlap", lambda ws, vs, gs: dict(grads=_overlapping(ws, [(4, 6), (3, 2, 2, 2)], 20)),
         ValueError, "grads[0] and grads[1] overlap in memory"),
        ("grads_interleaved", lambda ws, vs, gs: dict(grads=_interleaved(ws)), ValueError,
         "grads[0] and grads[1] overlap in memory"),
        ("n_iter_zero", lambda ws, vs, gs: dict(n_iter=0), ValueError, "n_iter must be >= 1"),
        ("n_iter_float", lambda ws, vs, gs: dict(n_iter=1.5), TypeError, "n_iter must be an int"),
        ("lam_nan", lambda ws, vs, gs: dict(lam=float("nan")), ValueError, "lam must be finite"),
        ("lam_tensor", lambda ws, vs, gs: dict(lam=torch.tensor(0.1)), TypeError, "lam must be"),
        ("not_a_list", lambda ws, vs, gs: dict(weights=ws[0]), TypeError, "weights must be a list"),
        ("unknown_backend", lambda ws, vs, gs: dict(backend="tpu"), ValueError,
         "unknown backend 'tpu'"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_raises_and_changes_nothing(case, backend):
    _, mutate, exc, fragment = case
    ws, vs, gs = _good(backend)
    kwargs = dict(weights=ws, vs=vs, grads=gs, lam=0.1, n_iter=1, backend=backend)
    kwargs.update(mutate(ws, vs, gs))
    snapshot = [t.clone() for t in ws + vs + gs]
    with pytest.raises(exc, match=fragment if fragment.startswith("(?:") else re.escape(fragment)):
        se.fused_step(kwargs.pop("weights"), kwargs.pop("vs"), **kwargs)
    for before, after in zip(snapshot, ws + vs + gs):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_and_shared_weights_are_accepted(backend):
    """Gradients (and vectors) that are disjoint slices of one flat buffer, as in a flattened
    parameter, are fine, and so are weights that share memory (they are only read)."""
    dev = DEVICE.get(backend, "cpu")
    big = torch.randn(60, device=dev)
    ws = [big[:24].view(4, 6), big[12:36].view(3, 2, 2, 2)]     # overlapping weights: allowed
    flat = torch.zeros(48, device=dev)
    gs = [flat[:24].view(4, 6), flat[24:].view(3, 2, 2, 2)]
    vflat = torch.zeros(14, device=dev)
    vs = [vflat[:6], vflat[6:]]
    for v, v0 in zip(vs, se.init_vectors(ws)):
        v.copy_(v0)
    g_ref = [torch.zeros_like(w) for w in ws]
    v_ref = [v.clone() for v in vs]
    s = se.fused_step(ws, vs, grads=gs, lam=0.1, backend=backend)
    s_ref = se.fused_step(ws, v_ref, grads=g_ref, lam=0.1, backend="reference")
    assert torch.allclose(s, s_ref, rtol=2e-5)
    for a, b in zip(gs + vs, g_ref + v_ref):
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-7)


def test_existing_grad_overlapping_a_vector_is_reported_before_any_grad_is_created():
    ws = [torch.randn(3, 4, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    vs = se.init_vectors(ws)
    ws[1].grad = torch.zeros(2, 2)
    vs[0] = ws[1].grad.view(-1)                          # v of layer 0 inside layer 1's .grad
    for backend in BACKENDS:
        if DEVICE.get(backend, "cpu") != "cpu":
            continue
        with pytest.raises(ValueError, match=re.escape("vs[0] and grads[1] overlap in memory")):
            se.fused_step(ws, vs, backend=backend)
        assert ws[0].grad is None


def test_existing_bad_grad_is_reported_before_any_grad_is_created():
    ws = [torch.randn(3, 4, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    ws[1].grad_dtype = None                                # torch allows it when asked to
    ws[1].grad = torch.zeros(2, 2, dtype=torch.float64)   # wrong dtype for our kernels
    vs = se.init_vectors(ws)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.float64"):
        se.fused_step(ws, vs)
    assert ws[0].grad is None


def test_non_leaf_weight_without_grads_is_rejected():
    w = torch.randn(3, 4, requires_grad=True) * 2
    with pytest.raises(ValueError, match="not a leaf tensor"):
        se.fused_step([w], se.init_vectors([w]))


def test_backend_cpu_rejects_other_devices():
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU backend is not built here")
    w = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, but the weights are on meta"):
        se.fused_step([w], [torch.empty(4, device="meta")], grads=[torch.empty_like(w)],
                      backend="cpu")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend cannot run here")
def test_backend_triton_rejects_float64_and_other_devices():
    ws, vs, gs = _good("triton")
    w64 = [ws[0].double(), ws[1]]
    v64 = [vs[0].double(), vs[1]]
    g64 = [gs[0].double(), gs[1]]
    snapshot = [t.clone() for t in v64 + g64]
    with pytest.raises(TypeError, match=re.escape("backend 'triton' takes float32, float16 and "
                                                  "bfloat16 weights; weights[0] is torch.float64")):
        se.fused_step(w64, v64, grads=g64, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(snapshot, v64 + g64))
    w = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        se.fused_step([w], [torch.empty(4, device="meta")], grads=[torch.empty_like(w)],
                      backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists_return_empty_sigma(backend):
    assert se.fused_step([], [], backend=backend).shape == (0,)
    assert se.spectral_norms([], [], backend=backend).shape == (0,)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not built here")
def test_cpp_kernel_checks_direct_op_calls():
    """The C++ kernel's own checks (the only ones on the native path): same exception types and
    messages as the Python checks, and nothing changed."""
    ws, vs, gs = _good()
    snapshot = [t.clone() for t in ws + vs + gs]
    bad = [
        ((ws, [vs[0], torch.ones(5)], gs, 0.1, 1), ValueError, "v must have shape (8,)"),
        ((ws, vs[:1], gs, 0.1, 1), ValueError, "2 weights but 1 vectors"),
        (([ws[0].long(), ws[1]], vs, gs, 0.1, 1), TypeError, "weights[0] has dtype torch.int64"),
        ((ws, vs, [gs[0].double(), gs[1]], 0.1, 1), TypeError, "grads[0] has dtype torch.float64"),
        ((ws, vs, [gs[0].t(), gs[1]], 0.1, 1), ValueError, "grads[0] has shape (6, 4)"),
        (([ws[0], ws[0]], [vs[0], vs[0].clone()], gs, 0.1, 1), ValueError,
         "weights[1] is the same tensor as weights[0]"),
        ((ws, vs, [ws[0], gs[1]], 0.1, 1), ValueError, "weights[0] and grads[0] overlap in memory"),
        ((ws, [vs[0], gs[1].view(-1)[:8]], gs, 0.1, 1), ValueError,
         "vs[1] and grads[1] overlap in memory"),
        ((ws, vs, gs, 0.1, 0), ValueError, "n_iter must be >= 1"),
        (([ws[0], ws[1].detach().to_sparse()], vs, gs, 0.1, 1), ValueError,
         "weights[1] has layout torch.sparse_coo"),
        ((ws, [vs[0], torch._neg_view(vs[1])], gs, 0.1, 1), ValueError,
         "vs[1] is a lazily negated view"),
        ((ws, vs, [torch._neg_view(gs[0]), gs[1]], 0.1, 1), ValueError,
         "grads[0] is a lazily negated view"),
    ]
    for args, exc, fragment in bad:
        with pytest.raises(exc, match=re.escape(fragment)):
            torch.ops.spectral_ext.fused_step.default.redispatch(
                torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
    for before, after in zip(snapshot, ws + vs + gs):
        assert torch.equal(before, after)


def test_backend_is_checked_without_weights():
    """A regularizer checks its backend before its model may be moved to the device: with no
    weights only the name and the build count (on a GPU this used to reject 'cuda')."""
    for name, info in se.available_backends().items():
        if info.available:
            assert se.resolve_backend([], name) == name
        else:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable"):
                se.resolve_backend([], name)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not built here")
def test_cpp_and_python_overlap_rules_agree():
    """Random views of a few shared buffers as weights, vectors and gradients: the C++ check
    (csrc/spectral_ext.h) and the Python one (_checks.check_no_overlap) refuse exactly the same
    calls, with the same message, and each refusal names two tensors that really share bytes."""
    import random
    from spectral_ext import _checks
    rng = random.Random(zlib_seed())
    refused = 0
    for _ in range(300):
        bufs = [torch.zeros(64) for _ in range(3)]

        def view(n, bufs=bufs):
            b = rng.choice(bufs + [None])
            if b is None:
                return torch.zeros(n)
            step = rng.choice((1, 1, 2))
            start = rng.randrange(0, 64 - step * (n - 1))
            return b[start:start + step * (n - 1) + 1:step]
        ws = [view(12).view(3, 4), view(6).view(2, 3)]
        vs = [view(4), view(3)]
        gs = [view(12).view(3, 4), view(6).view(2, 3)]
        try:
            _checks.check_no_overlap(ws, vs, gs)
            py = None
        except ValueError as e:
            py = str(e)
        try:
            torch.ops.spectral_ext.fused_step.default.redispatch(
                torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), ws, vs, gs, 0.1, 1)
            cpp = None
        except ValueError as e:
            cpp = str(e).split("\n")[0]
        assert (py is None) == (cpp is None), (py, cpp)
        if py is not None:
            refused += 1
            assert py == cpp
    assert 30 < refused < 270      # both kinds of case were drawn


def zlib_seed():
    import zlib
    from conftest import SEED
    return SEED ^ zlib.crc32(b"overlap")
