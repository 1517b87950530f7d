"""The persistent step plan (issue 14 item 1): ``functional.make_step_plan`` and the regularizer's
eager fast path.  Every result is compared bit for bit with the op path (``spectral_ext::fused_step``
through ``functional.fused_step``) on the same inputs; errors must be the op path's, with nothing
mutated.  Inputs are random, seeded per test from conftest's SEED (printed in pytest's header)."""

import copy
import re

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import _ops
from spectral_ext.functional import make_step_plan, plan_step

from conftest import emulation_or_skip

pytestmark = pytest.mark.skipif(_ops.CpuStepPlan is None,
                                reason=f"no C++ extension: {_ops.CPU_EXTENSION_ERROR}")

LAM = 0.01


def _leaf(t):
    return t.detach().requires_grad_(True)


def _awkward_weights():
    """Weights of awkward shapes, layouts and dtypes, each a leaf that requires grad."""
    return [
        _leaf(torch.randn(1, 97)),                                   # 1 x N
        _leaf(torch.randn(131, 1)),                                  # N x 1
        _leaf(torch.randn(65, 257)),                                 # not multiples of 64/256
        _leaf(torch.randn(300, 70) / 10),                            # more than 256 rows
        _leaf(torch.randn(8, 3, 3, 3)),                              # conv, contiguous
        _leaf(torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last)),  # conv, copied
        _leaf(torch.randn(40, 33).t()),                              # transposed (33 x 40)
        _leaf(torch.randn(48, 80)[:, ::2]),                          # column stride 2
        _leaf(torch.randn(17, 29, dtype=torch.float64)),
        _leaf(torch.randn(33, 65).to(torch.bfloat16)),
        _leaf(torch.randn(19, 70).to(torch.float16)),
        _leaf(torch.randn(2000, 300) / 40),                          # banded (several bands)
    ]


def _awkward_grads(weights):
    """Gradients of the weights' shapes and dtypes, some non-contiguous or oddly laid out."""
    out = []
    for i, w in enumerate(weights):
        if i % 3 == 1 and w.dim() == 2:     # transposed storage
            g = torch.randn(w.shape[1], w.shape[0], dtype=w.dtype).t()
        elif i % 3 == 2 and w.dim() == 4:   # channels_last (no 2-D view: copied, written back)
            g = torch.randn(w.shape, dtype=w.dtype).to(memory_format=torch.channels_last)
        else:
            g = torch.randn(w.shape, dtype=w.dtype)
        out.append(g)
    return out


def _vectors(weights):
    vs = se.init_vectors(weights)
    vs[2] = vs[2].double()          # a float64 v of a float32 layer
    return vs


def _copy(t):
    """A copy with the same values and strides (clone does not keep non-dense layouts)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    return out.copy_(t.detach())


def _twin(weights, vs):
    """Copies of the weights (and their .grad) and vectors, in the same layouts."""
    ws2 = [_leaf(_copy(w)) for w in weights]
    for w, w2 in zip(weights, ws2):
        assert w2.stride() == w.stride()
        if w.grad is not None:
            w2.grad = _copy(w.grad)
            assert w2.grad.stride() == w.grad.stride()
    return ws2, [v.clone() for v in vs]


def _assert_same(ws, vs, ws2, vs2, sig=None, sig2=None):
    for i, (w, w2) in enumerate(zip(ws, ws2)):
        assert torch.equal(w, w2), f"weight {i}"
        assert (w.grad is None) == (w2.grad is None), f"grad {i} presence"
        if w.grad is not None:
            assert w.grad.dtype == w2.grad.dtype and w.grad.stride() == w2.grad.stride()
            assert torch.equal(w.grad, w2.grad), f"grad {i} differs from the op path"
    for i, (v, v2) in enumerate(zip(vs, vs2)):
        assert v.dtype == v2.dtype and torch.equal(v, v2), f"v {i} differs from the op path"
    if sig is not None:
        assert sig.dtype == sig2.dtype and torch.equal(sig, sig2), "sigma differs from the op path"


def _sgd(weights, lr=0.1):
    with torch.no_grad():
        for w in weights:
            w.sub_(lr * w.grad)


def _awkward_pair():
    """The awkward weights with gradients and vectors, and their twins for the op path."""
    ws = _awkward_weights()
    for w, g in zip(ws, _awkward_grads(ws)):
        w.grad = g
    vs = _vectors(ws)
    return (ws, vs, *_twin(ws, vs))


def test_plan_step_equals_op_bitwise_on_awkward_inputs():
    ws, vs, ws2, vs2 = _awkward_pair()
    plan = make_step_plan(ws, vs)
    assert plan is not None
    for it in range(4):     # the method and the direct call (plan_step) in turn
        sig = plan.step(LAM, 1 + it % 2) if it < 2 else plan_step(plan, LAM, 1 + it % 2)
        sig2 = se.fused_step(ws2, vs2, lam=LAM, n_iter=1 + it % 2, backend="cpu")
        _assert_same(ws, vs, ws2, vs2, sig, sig2)
        _sgd(ws)        # the weights change in place between steps: the plan reads them anew
        _sgd(ws2)       # (the channels_last conv is copied each step, never a stale copy)
        _assert_same(ws, vs, ws2, vs2)
    assert plan.full_checks() == 1      # nothing changed but the values: checked once


def test_missing_grads_are_created_like_the_op_path():
    ws = _awkward_weights()
    vs = _vectors(ws)
    ws2, vs2 = _twin(ws, vs)
    plan = make_step_plan(ws, vs)
    sig = plan.step(LAM, 1)
    sig2 = se.fused_step(ws2, vs2, lam=LAM, backend="cpu")
    _assert_same(ws, vs, ws2, vs2, sig, sig2)
    for w in ws:
        assert w.grad.stride() == torch.zeros_like(w).stride()
    # only some missing, the others kept
    for k in (0, 5, 9):
        ws[k].grad = None
        ws2[k].grad = None
    kept = ws[1].grad
    sig = plan.step(LAM, 1)
    sig2 = se.fused_step(ws2, vs2, lam=LAM, backend="cpu")
    _assert_same(ws, vs, ws2, vs2, sig, sig2)
    assert ws[1].grad is kept


def test_replaced_grads_are_followed():
    ws, vs, ws2, vs2 = _awkward_pair()
    plan = make_step_plan(ws, vs)
    plan.step(LAM, 1)
    se.fused_step(ws2, vs2, lam=LAM, backend="cpu")
    checks = plan.full_checks()
    for rnd in range(3):
        old = [w.grad for w in ws]
        old_vals = [g.clone() for g in old]
        new = _awkward_grads(ws)           # same layouts, new memory (zero_grad(set_to_none))
        for w, w2, g in zip(ws, ws2, new):
            w.grad = g
            w2.grad = _copy(g)
        sig = plan.step(LAM, 1)
        sig2 = se.fused_step(ws2, vs2, lam=LAM, backend="cpu")
        _assert_same(ws, vs, ws2, vs2, sig, sig2)
        for g, before in zip(old, old_vals):
            assert torch.equal(g, before), "a replaced .grad was written"
    # new memory of the same layouts, no storage shared: no full checks
    assert plan.full_checks() == checks
    # a gradient of another layout (contiguous instead of transposed): checked and re-prepared
    assert not ws[7].grad.is_contiguous()
    ws[7].grad = ws[7].grad.contiguous()
    ws2[7].grad = ws2[7].grad.contiguous()
    sig = plan.step(LAM, 1)
    sig2 = se.fused_step(ws2, vs2, lam=LAM, backend="cpu")
    _assert_same(ws, vs, ws2, vs2, sig, sig2)
    assert plan.full_checks() == checks + 1


def _small():
    ws = [_leaf(torch.randn(4, 6)), _leaf(torch.randn(3, 2, 2, 2))]
    for w in ws:
        w.grad = torch.randn_like(w)
    return ws, se.init_vectors(ws)


def _snapshot(ws, vs):
    return ([w.detach().clone() for w in ws], [w.grad.clone() if w.grad is not None else None
                                               for w in ws], [v.clone() for v in vs])


def _unchanged(ws, vs, snap):
    w0, g0, v0 = snap
    for w, a, b in zip(ws, w0, g0):
        assert torch.equal(w, a)
        assert (w.grad is None and b is None) or torch.equal(w.grad, b)
    for v, a in zip(vs, v0):
        assert torch.equal(v, a)


@pytest.mark.parametrize("case", ["wrong_dtype", "wrong_shape_via_data", "overlap_v",
                                  "same_grad_twice", "grads_interleaved"])
@pytest.mark.parametrize("after_a_step", [False, True])
def test_bad_grads_raise_the_op_paths_error_and_mutate_nothing(case, after_a_step):
    # v of weight 0 inside a buffer that a gradient can reach (the overlap case)
    buf = torch.randn(64)
    ws, vs = _small()
    buf[:6].copy_(vs[0])
    vs[0] = buf[:6]
    plan = make_step_plan(ws, vs)
    if after_a_step:
        plan.step(LAM, 1)
        ws[0].grad, ws[1].grad = torch.randn_like(ws[0]), torch.randn_like(ws[1])

    if case == "wrong_dtype":
        # .grad's setter refuses a wrong dtype: put one behind its back with .data
        ws[1].grad = torch.randn(3, 2, 2, 2)
        ws[1].grad.data = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    elif case == "wrong_shape_via_data":
        ws[0].grad = torch.randn(4, 6)
        ws[0].grad.data = torch.randn(24, 1)
    elif case == "overlap_v":
        ws[0].grad = buf[3:27].view(4, 6)   # crosses v of weight 0 (buf[:6])
    elif case == "same_grad_twice":
        w2 = _leaf(torch.randn(4, 6))
        ws.append(w2)
        vs.append(se.init_vectors([w2])[0])
        plan = make_step_plan(ws, vs)
        if after_a_step:
            w2.grad = torch.randn_like(w2)
            plan.step(LAM, 1)
        w2.grad = ws[0].grad
    elif case == "grads_interleaved":
        big = torch.randn(48)
        ws[0].grad = big[0::2].view(4, 6)
        ws[1].grad = big[1::2].view(3, 2, 2, 2)

    snap = _snapshot(ws, vs)
    with pytest.raises((ValueError, TypeError)) as op_err:
        se.fused_step(ws, vs, lam=LAM, backend="cpu")
    _unchanged(ws, vs, snap)
    with pytest.raises(op_err.type) as plan_err:
        plan.step(LAM, 1)
    assert str(plan_err.value) == str(op_err.value)
    _unchanged(ws, vs, snap)


def _reallocate(t):
    """t's storage freed and allocated again (as FSDP does with a parameter's storage), with the
    same values and layout at (almost surely) another address: the freed bytes are taken first."""
    vals = t.detach().clone()
    st = t.untyped_storage()
    nbytes = st.nbytes()
    st.resize_(0)
    taken = torch.empty(nbytes, dtype=torch.uint8)
    st.resize_(nbytes)
    t.detach().copy_(vals)
    return taken


@pytest.mark.parametrize("change", ["weight_transposed", "weight_reallocated", "v_replaced",
                                    "grad_reallocated", "grad_transposed"])
def test_changes_behind_the_plans_back_are_followed(change):
    """Between steps the plan compares each tensor's layout and address with its snapshot
    (csrc/step_plan.h): a change that keeps the address (p.data = p.data.t() of a square weight)
    or keeps the layout (a storage reallocated) must give the op path's result, bit for bit."""
    ws = [_leaf(torch.randn(6, 6)), _leaf(torch.randn(4, 6))]
    for w in ws:
        w.grad = torch.randn_like(w)
    vs = se.init_vectors(ws)
    ws2, vs2 = _twin(ws, vs)
    plan = make_step_plan(ws, vs)
    _assert_same(ws, vs, ws2, vs2, plan.step(LAM, 1), se.fused_step(ws2, vs2, lam=LAM))
    held = []
    for w, v in ((ws, vs), (ws2, vs2)):
        if change == "weight_transposed":
            w[0].data = w[0].data.t()                # same address and shape, strides swapped
        elif change == "weight_reallocated":
            held.append(_reallocate(w[0]))
        elif change == "v_replaced":
            v[1].data = v[1].data.clone()
        elif change == "grad_reallocated":
            held.append(_reallocate(w[1].grad))
        elif change == "grad_transposed":
            w[0].grad.data = w[0].grad.data.t().contiguous().t()
    checks = plan.full_checks()
    for _ in range(2):
        _assert_same(ws, vs, ws2, vs2, plan.step(LAM, 1), se.fused_step(ws2, vs2, lam=LAM))
    assert plan.full_checks() >= checks + (change != "grad_reallocated")


def test_a_leaf_view_that_requires_grad_through_its_base_is_stepped():
    """A view made under no_grad of a tensor that requires grad is a leaf that requires grad
    (DifferentiableViewMeta): the plan steps it like the op path, it does not decline it."""
    base = torch.randn(8, 6, requires_grad=True)
    with torch.no_grad():
        w = base[:4]
    assert w.requires_grad and w.is_leaf
    w.grad = torch.randn(4, 6)
    ws = [w, _leaf(torch.randn(3, 5))]
    ws[1].grad = torch.randn(3, 5)
    vs = se.init_vectors(ws)
    ws2, vs2 = _twin(ws, vs)
    sig = make_step_plan(ws, vs).step(LAM, 1)
    assert sig is not None
    _assert_same(ws, vs, ws2, vs2, sig, se.fused_step(ws2, vs2, lam=LAM))


def test_negated_tensors_behind_the_plans_back():
    """A negated view (torch._neg_view) has the same layout as the tensor it negates but other
    dispatch keys: a negated weight makes the plan decline (the op path's dispatcher resolves
    it), a negated gradient is refused (the op path refuses it too), and nothing is changed."""
    ws, vs = _small()
    plan = make_step_plan(ws, vs)
    plan.step(LAM, 1)
    ws[0].grad = torch._neg_view(torch.randn_like(ws[0]))
    snap = _snapshot(ws, vs)
    with pytest.raises(ValueError, match=re.escape("grads[0] is a lazily negated view")):
        plan.step(LAM, 1)
    _unchanged(ws, vs, snap)
    with pytest.raises(RuntimeError, match="negation"):
        se.fused_step(ws, vs, lam=LAM)
    _unchanged(ws, vs, snap)
    ws[0].grad = torch.randn_like(ws[0])
    ws[1].data = torch._neg_view(ws[1].data.neg())   # the same values, negated lazily
    snap = _snapshot(ws, vs)
    assert plan.step(LAM, 1) is None
    _unchanged(ws, vs, snap)


def test_sparse_grad_behind_the_plans_back_is_refused():
    ws, vs = _small()
    plan = make_step_plan(ws, vs)
    plan.step(LAM, 1)
    ws[1].grad = torch.randn_like(ws[1]).to_sparse()
    sparse = ws[1].grad.to_dense()
    ws[1].grad = None
    snap = _snapshot(ws, vs)
    ws[1].grad = sparse.to_sparse()
    with pytest.raises(ValueError, match=re.escape("grads[1] has layout torch.sparse_coo")):
        plan.step(LAM, 1)
    assert torch.equal(ws[1].grad.to_dense(), sparse)
    ws[1].grad = None
    _unchanged(ws, vs, snap)


def test_missing_and_bad_grads_together_create_nothing():
    ws, vs = _small()
    plan = make_step_plan(ws, vs)
    plan.step(LAM, 1)
    ws[0].grad = None
    ws[1].grad = torch.randn(3, 2, 2, 2)
    ws[1].grad.data = torch.randn(3, 8)
    with pytest.raises(ValueError) as op_err:
        se.fused_step(ws, vs, lam=LAM, backend="cpu")
    with pytest.raises(ValueError) as plan_err:
        plan.step(LAM, 1)
    assert str(plan_err.value) == str(op_err.value)
    assert ws[0].grad is None


def _scalars_raise_like_the_op(op, plan, ws, vs, cases, direct=plan_step):
    """For each (lam, n_iter): the op and the plan, through its method and through the direct
    call `direct`, raise the same ValueError, changing nothing."""
    for lam, n_iter in cases:
        snap = _snapshot(ws, vs)
        with pytest.raises(ValueError) as op_err:
            op(ws, vs, [w.grad for w in ws], lam, n_iter)
        for entry in (plan.step, lambda lam, n_iter: direct(plan, lam, n_iter)):
            with pytest.raises(ValueError) as plan_err:
                entry(lam, n_iter)
            assert str(plan_err.value) == str(op_err.value)
        _unchanged(ws, vs, snap)


def test_bad_lam_and_n_iter_raise_like_the_op():
    ws, vs = _small()
    _scalars_raise_like_the_op(_ops.fused_step, make_step_plan(ws, vs), ws, vs,
                               ((-1.0, 1), (float("nan"), 1), (LAM, 0)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_plan_step_refuses_what_is_not_a_plan_or_its_arguments():
    """plan_step's own checks (csrc/plan_entry.cpp): a clear TypeError/ValueError for anything
    but a plan and two numbers, never a crash; nothing is stepped.  It converts the numbers as
    the method does (what has __float__ / __index__)."""
    ws, vs = _small()
    plan = make_step_plan(ws, vs)
    snap = _snapshot(ws, vs)
    not_plans = [None, ws[0], "plan", torch.classes.spectral_ext.CpuStepPlan,
                 torch.jit.script(nn.Linear(2, 2))._c]   # a ScriptObject of many slots
    try:    # a custom-class object of one slot that is not a StepPlan (the dynamic_cast)
        not_plans.append(torch.ops.quantized.linear_prepack(
            torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8), None))
    except (RuntimeError, AttributeError, NotImplementedError):  # pragma: no cover
        pass    # a torch without a quantized engine: the other cases still run
    for obj in not_plans:
        with pytest.raises(TypeError, match="expected a step plan"):
            _ops.plan_step(obj, LAM, 1)
    for lam, n_iter, err, msg in (("0.1", 1, TypeError, "lam must be a float, got str"),
                                  (None, 1, TypeError, "lam must be a float, got NoneType"),
                                  (LAM, 1.0, TypeError, "n_iter must be an int, got float"),
                                  (LAM, "1", TypeError, "n_iter must be an int, got str"),
                                  (LAM, 2**64, ValueError, "does not fit in 64 bits")):
        with pytest.raises(err, match=msg):
            _ops.plan_step(plan, lam, n_iter)
    for args in ((), (plan,), (plan, LAM), (plan, LAM, 1, 1)):
        with pytest.raises(TypeError, match="takes 3 arguments"):
            _ops.plan_step(*args)
    _unchanged(ws, vs, snap)
    # numbers the method takes too: an int lam, a 0-d tensor lam, an __index__ n_iter
    ws2, vs2 = _twin(ws, vs)
    plan2 = make_step_plan(ws2, vs2)

    class Two:
        def __index__(self):
            return 2

    for lam, n_iter in ((1, 1), (torch.tensor(LAM), Two())):
        _assert_same(ws, vs, ws2, vs2, plan_step(plan, lam, n_iter), plan2.step(lam, n_iter))


@pytest.mark.parametrize("backend", ["cpu", "cuda-emulated"])
def test_steps_of_one_plan_from_two_threads_are_serialized(backend):
    """Both ways of calling a step release the GIL; two threads stepping one plan must not race
    on its snapshot and tables (csrc/step_plan.h: a Step holds the plan's mutex).  Serialized,
    40 steps from two threads end where 40 steps in a row end, bit for bit."""
    import threading
    if backend == "cpu":
        ws, vs, ws2, vs2 = _awkward_pair()
        plan, plan2 = make_step_plan(ws, vs), make_step_plan(ws2, vs2)
        direct = plan_step
    else:
        _, Plan = _emu()
        ws = _emu_weights()
        for w, g in zip(ws, _awkward_grads(ws)):
            w.grad = g
        vs = _vectors(ws)
        ws2, vs2 = _twin(ws, vs)
        plan, plan2 = Plan(ws, vs), Plan(ws2, vs2)
        direct = _emu_plan_step
    errors = []

    def run(entry):
        try:
            for _ in range(20):
                assert entry(LAM, 1) is not None
        except Exception as exc:    # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(plan.step,)),
               threading.Thread(target=run, args=(lambda lam, n: direct(plan, lam, n),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for _ in range(40):
        plan2.step(LAM, 1)
    _assert_same(ws, vs, ws2, vs2)
    assert plan.full_checks() == plan2.full_checks()


def test_no_plan_for_other_backends():
    ws, vs = _small()
    assert make_step_plan(ws, vs, backend="reference") is None
    with pytest.raises(ValueError, match="unknown backend"):
        make_step_plan(ws, vs, backend="nope")


# ---- the regularizer --------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc1 = nn.Linear(5 * 6 * 6, 70)
        self.fc2 = nn.Linear(70, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _op_only(reg):
    """Force the op path (what step() did before the plan): the reference for the plan."""
    reg._step_plan = lambda b, active=None: None
    return reg


def _plan_of(reg):
    st = reg._plan_state
    return None if st is None else st[3]


def _backward(model, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()


def test_training_loop_matches_the_op_path_exactly():
    model = Net()
    model2 = copy.deepcopy(model)
    reg = se.SpectralNormRegularizer(model, lam=0.05)
    reg2 = _op_only(se.SpectralNormRegularizer(model2, lam=0.05))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    for it in range(6):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        for m, r, o in ((model, reg, opt), (model2, reg2, opt2)):
            o.zero_grad(set_to_none=True)
            _backward(m, x, y)
        sig, sig2 = reg.step(), reg2.step()
        assert torch.equal(sig, sig2)
        opt.step()
        opt2.step()
        for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
            assert torch.equal(p, p2), f"step {it}: {n}"
        for v, v2 in zip(reg.vs(), reg2.vs()):
            assert torch.equal(v, v2)
        assert torch.equal(reg.last_sigma, reg2.last_sigma)
    plan = _plan_of(reg)
    assert plan is not None and _plan_of(reg2) is None
    # set_to_none gave new gradients each step; no storage is shared, so one full check
    assert plan.full_checks() == 1


def test_grad_none_created_by_the_regularizer():
    model = Net()
    model2 = copy.deepcopy(model)
    reg = se.SpectralNormRegularizer(model)
    reg2 = _op_only(se.SpectralNormRegularizer(model2))
    assert torch.equal(reg.step(), reg2.step())
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert (p.grad is None) == (p2.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, p2.grad)
    assert model.fc1.bias.grad is None      # not covered: not created


def test_frozen_weights_are_skipped():
    """Frozen weights: a plan of the active ones (the op path's results, bit for bit), kept
    while the same ones are active; one unfrozen comes back, another frozen leaves."""
    model = Net()
    model.fc1.weight.requires_grad_(False)
    model2 = copy.deepcopy(model)
    reg = se.SpectralNormRegularizer(model)
    reg2 = _op_only(se.SpectralNormRegularizer(model2))
    plans = []
    for _ in range(3):
        assert torch.equal(reg.step(), reg2.step())
        plans.append(_plan_of(reg))
    assert reg._plan_state[4] == (0, 2)          # conv and fc2: a plan of the active weights
    assert plans[0] is plans[1] is plans[2] and plans[0].full_checks() == 1
    assert model.fc1.weight.grad is None
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert (p.grad is None) == (p2.grad is None)
        assert p.grad is None or torch.equal(p.grad, p2.grad)
    assert torch.equal(reg.last_sigma, reg2.last_sigma)
    for v, v2 in zip(reg.vs(), reg2.vs()):
        assert torch.equal(v, v2)
    # unfreezing: the plan covers every weight from now on
    model.fc1.weight.requires_grad_(True)
    model2.fc1.weight.requires_grad_(True)
    assert torch.equal(reg.step(), reg2.step())
    assert torch.equal(model.fc1.weight.grad, model2.fc1.weight.grad)
    assert reg._plan_state[4] is None
    # another weight frozen: a plan of the others again
    model.conv.weight.requires_grad_(False)
    model2.conv.weight.requires_grad_(False)
    for _ in range(2):
        assert torch.equal(reg.step(), reg2.step())
    assert reg._plan_state[4] == (1, 2)
    assert torch.equal(reg.last_sigma, reg2.last_sigma)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert p.grad is None or torch.equal(p.grad, p2.grad)
    # all frozen: nothing to step, as on the op path
    for p, p2 in zip(model.parameters(), model2.parameters()):
        p.requires_grad_(False)
        p2.requires_grad_(False)
    assert reg.step().numel() == 0 and reg2.step().numel() == 0


def _copy_with_grads(model):
    model2 = copy.deepcopy(model)
    for p, p2 in zip(model.parameters(), model2.parameters()):     # deepcopy drops .grad
        p2.grad = None if p.grad is None else p.grad.clone()
    return model2


def _steps_equal(reg, model, reg2, model2):
    sig, sig2 = reg.step(), reg2.step()
    assert torch.equal(sig, sig2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert (p.grad is None) == (p2.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, p2.grad)
    for v, v2 in zip(reg.vs(), reg2.vs()):
        assert torch.equal(v, v2)


def _change(how, model, reg, sd):
    """Apply change `how` to a model and its regularizer; returns the model reg follows."""
    if how == "setattr":
        model.fc1.weight = nn.Parameter(sd["fc1.weight"].clone())
    elif how == "load_state_dict_assign":
        model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    elif how == "attach":
        model = _copy_with_grads(model)
        reg.attach(model)
    elif how == "double":          # same Parameters, new data of another dtype (p.data = ...)
        model.double()
    elif how == "reg_apply":       # the vectors are replaced (as a device move replaces them)
        reg._apply(lambda t: t.clone())
    elif how == "vector_assigned":
        key = reg._keys[1]
        reg.vectors._buffers[key] = reg.vectors._buffers[key].clone()
    elif how == "parameters_dict":  # no hook fires (what fully_shard and to_empty do)
        model.fc1._parameters["weight"] = nn.Parameter(sd["fc1.weight"].clone())
    return model


@pytest.mark.parametrize("c_checks", [True, False], ids=["C checks", "Python checks"])
@pytest.mark.parametrize("how", ["setattr", "load_state_dict_assign", "attach", "double",
                                 "reg_apply", "vector_assigned", "parameters_dict"])
def test_the_plan_is_rebuilt_when_the_binding_changes(how, c_checks, monkeypatch):
    if not c_checks:    # the regularizer's Python forms of its identity tests (no C helpers)
        monkeypatch.setattr(_ops, "dict_is", None)
        monkeypatch.setattr(_ops, "lookups_are", None)
    model = Net()
    reg = se.SpectralNormRegularizer(model)
    reg.step()
    model2 = _copy_with_grads(model)
    reg2 = _op_only(se.SpectralNormRegularizer(model2))
    reg2.load_state_dict(reg.state_dict())
    _steps_equal(reg, model, reg2, model2)   # (building reg2 made reg bind again: a new plan)
    plan = _plan_of(reg)
    assert plan is not None and plan.full_checks() == 1
    old_weight = model.fc1.weight
    old_grad = old_weight.grad.clone()
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model = _change(how, model, reg, sd)
    model2 = _change(how, model2, reg2, sd)
    _steps_equal(reg, model, reg2, model2)
    if how == "double":
        assert _plan_of(reg) is plan and plan.full_checks() == 2, \
            "the plan did not check the weights' new data"
    else:
        assert _plan_of(reg) is not plan, "the plan was not rebuilt"
    if how in ("setattr", "load_state_dict_assign", "attach", "parameters_dict"):
        assert torch.equal(old_weight.grad, old_grad), "the replaced weight's .grad was written"
    _steps_equal(reg, model, reg2, model2)   # and keeps working


def test_the_plan_is_bypassed_under_compile(monkeypatch):
    model = Net()
    reg = se.SpectralNormRegularizer(model)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reg.step()
    assert reg._plan_state is None


def test_a_plan_of_non_cpu_weights_does_nothing():
    ws = [_leaf(torch.randn(4, 6, device="meta"))]
    plan = _ops.CpuStepPlan(ws, se.init_vectors([torch.randn(4, 6)]))
    assert plan.step(LAM, 1) is None       # did nothing: the caller takes the op path
    assert plan_step(plan, LAM, 1) is None
    assert ws[0].grad is None
    assert make_step_plan(ws, [torch.randn(6, device="meta")]) is None


def test_parameters_can_be_swapped_once_the_plan_is_gone():
    """swap_tensors (what Module._apply uses under set_swap_module_params_on_conversion) refuses
    a weight a plan holds, and accepts it once the plan is dropped; the regularizer holds no plan
    while that flag is set (test_binding.py: test_device_move_that_keeps_the_parameters...)."""
    import gc
    ws = [_leaf(torch.randn(5, 4)), _leaf(torch.randn(3, 5))]
    plan = make_step_plan(ws, se.init_vectors(ws))
    assert plan.step(LAM, 1) is not None
    with pytest.raises(RuntimeError):
        torch.utils.swap_tensors(ws[0], torch.nn.Parameter(torch.randn(5, 4)))
    del plan
    gc.collect()
    torch.utils.swap_tensors(ws[0], torch.nn.Parameter(torch.randn(5, 4)))


def test_deepcopy_and_pickle_drop_the_plan():
    model = Net()
    reg = se.SpectralNormRegularizer(model)
    reg.step()
    assert _plan_of(reg) is not None
    assert copy.deepcopy(reg)._plan_state is None
    assert reg.__getstate__()["_plan_state"] is None


# ---- the CUDA plan (csrc/cuda/binding.cpp), through the CPU emulation of the CUDA binding -------

def _emu():
    return emulation_or_skip(), torch.classes.spectral_ext_emu.CudaStepPlan


def _emu_weights():
    """Awkward shapes and layouts, small enough for the emulation (a fiber per CUDA thread)."""
    return [
        _leaf(torch.randn(1, 97)),
        _leaf(torch.randn(131, 1)),
        _leaf(torch.randn(65, 130)),
        _leaf(torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last)),   # copied
        _leaf(torch.randn(40, 33).t()),
        _leaf(torch.randn(48, 80)[:, ::2]),
        _leaf(torch.randn(17, 29, dtype=torch.float64)),
        _leaf(torch.randn(33, 64).to(torch.bfloat16)),
        _leaf(torch.randn(19, 72).to(torch.float16)),
    ]


def _emu_plan_step(plan, lam, n_iter):
    import cuda_emulation
    return cuda_emulation.plan_step(plan, lam, n_iter)


def _emu_op_step(ops, ws, vs, n_iter):
    """The emulated op on the weights' .grad (created as the op path creates them)."""
    from spectral_ext import _checks
    grads = _checks.resolve_grads(ws, None, vs)
    return ops.fused_step(ws, vs, grads, LAM, n_iter)


@pytest.mark.parametrize("copied_layer", [True, False])
def test_cuda_plan_equals_the_cuda_op_bitwise(copied_layer):
    ops, Plan = _emu()
    ws = _emu_weights()
    if not copied_layer:        # every table reusable: the fast path without descriptions
        del ws[3]
    for w, g in zip(ws, _awkward_grads(ws)):
        w.grad = g
    ws[1].grad = None           # created by the plan
    vs = _vectors(ws)
    ws2, vs2 = _twin(ws, vs)
    plan = Plan(ws, vs)
    for it in range(4):
        if it == 2:             # new gradients, same layouts (zero_grad(set_to_none=True))
            for w, w2 in zip(ws, ws2):
                g = _copy(torch.randn(w.shape, dtype=w.dtype).as_strided(w.grad.shape,
                                                                          w.grad.stride()))
                w.grad, w2.grad = g, _copy(g)
        # the method, and csrc/plan_entry.cpp's direct call (the emulation's own module)
        sig = plan.step(LAM, 1 + it % 2) if it % 2 else _emu_plan_step(plan, LAM, 1 + it % 2)
        sig2 = _emu_op_step(ops, ws2, vs2, 1 + it % 2)
        _assert_same(ws, vs, ws2, vs2, sig, sig2)
        _sgd(ws)
        _sgd(ws2)
    assert plan.full_checks() == 1


@pytest.mark.parametrize("change", ["grads moved", "grads replaced by another layout"])
def test_cuda_plan_recovers_from_a_step_that_failed_half_way(change):
    """A step whose preparation throws after the plan took its new snapshot (here: new gradients
    under an emulated capture, which refuses to upload their table) must not leave the next step
    a partial set of tables: it launched nothing, returned uninitialized sigmas and added
    nothing, silently.  The next eager step equals the op's."""
    ops, Plan = _emu()
    ws = [_leaf(torch.randn(8, 6)), _leaf(torch.randn(5, 7, dtype=torch.float64))]
    for w in ws:
        w.grad = torch.zeros_like(w)
    vs = se.init_vectors(ws)
    plan = Plan(ws, vs)
    ops.clear_plans()
    plan.step(LAM, 1)                       # reusable tables
    for w in ws:
        w.grad = (torch.zeros_like(w) if change == "grads moved"
                  else torch.zeros(w.shape[::-1], dtype=w.dtype).t())
    ops.capture(True)
    try:
        with pytest.raises(RuntimeError, match="no cached layer table"):
            plan.step(LAM, 1)
    finally:
        ops.capture(False)
    ops.destroy_graphs()
    ws2, vs2 = _twin(ws, vs)
    for w, w2 in zip(ws, ws2):
        w2.grad = _copy(w.grad)
    sig = plan.step(LAM, 1)
    sig2 = _emu_op_step(ops, ws2, vs2, 1)
    _assert_same(ws, vs, ws2, vs2, sig, sig2)
    assert all(w.grad.abs().sum() > 0 for w in ws)


def test_cuda_plan_reuses_its_tables_and_raises_the_ops_errors():
    ops, Plan = _emu()
    ws, vs = _small()
    plan = Plan(ws, vs)
    ops.clear_plans()
    plan.step(LAM, 1)
    assert ops.cached_plans() == 1
    plan.step(LAM, 1)                 # nothing changed: the plan's own table, no lookup
    assert ops.cached_plans() == 1 and plan.full_checks() == 1
    ws[0].grad = torch.randn(6, 4).t()   # a new layout: checked again, a new table
    plan.step(LAM, 1)
    assert ops.cached_plans() == 2 and plan.full_checks() == 2
    _scalars_raise_like_the_op(ops.fused_step, plan, ws, vs,
                               ((-1.0, 1), (LAM, 0), (LAM, 2000000)), direct=_emu_plan_step)
    buf = torch.randn(64)             # a gradient overlapping another: the op's error
    ws[0].grad, ws[1].grad = buf[:24].view(4, 6), buf[20:44].view(3, 2, 2, 2)
    snap = _snapshot(ws, vs)
    with pytest.raises(ValueError) as op_err:
        ops.fused_step(ws, vs, [w.grad for w in ws], LAM, 1)
    with pytest.raises(ValueError) as plan_err:
        plan.step(LAM, 1)
    assert str(plan_err.value) == str(op_err.value)
    _unchanged(ws, vs, snap)
    ws[0].requires_grad_(False)       # frozen: the plan declines, the caller takes the op path
    assert plan.step(LAM, 1) is None
    assert _emu_plan_step(plan, LAM, 1) is None


def test_cuda_plan_under_capture_pins_through_the_cache():
    """A captured step pins its table through the cache, as the op's does: a table the plan
    holds but the cache evicted goes back into the cache before the capture uses it, so it
    stays alive while the graph does."""
    ops, Plan = _emu()
    ws, vs = _small()
    plan = Plan(ws, vs)
    ops.clear_plans()
    plan.step(LAM, 1)                        # warm-up: uploads the table
    ops.capture(True)
    try:
        plan.step(LAM, 1)                    # "captured": pins the cached table
    finally:
        ops.capture(False)
    assert ops.pinned_plans() == 1
    assert ops.destroy_graphs() == 1 and ops.pinned_plans() == 0
    ops.clear_plans()                        # the plan still holds its table; the cache does not
    assert ops.cached_plans() == 0
    plan.step(LAM, 1)                        # eager: the plan's own table, no lookup
    assert ops.cached_plans() == 0
    ops.capture(True)
    try:
        plan.step(LAM, 1)                    # captured: the table back in the cache, pinned
    finally:
        ops.capture(False)
    assert ops.cached_plans() == 1 and ops.pinned_plans() == 1
    ops.clear_plans()
    assert ops.cached_plans() == 1           # pinned: not dropped
    assert ops.destroy_graphs() == 1 and ops.pinned_plans() == 0
    ops.clear_plans()


GPU = se.available_backends()["cuda"].available


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and the CUDA kernels")
def test_regularizer_on_cuda_uses_the_plan_and_matches_the_op_path():
    model = Net().cuda()
    model2 = copy.deepcopy(model)
    reg = se.SpectralNormRegularizer(model, backend="cuda")
    reg2 = _op_only(se.SpectralNormRegularizer(model2, backend="cuda"))
    for _ in range(4):
        x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
        for m in (model, model2):
            m.zero_grad(set_to_none=True)
            _backward(m, x, y)
        assert torch.equal(reg.step(), reg2.step())
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p.grad, p2.grad)
    assert _plan_of(reg) is not None and _plan_of(reg).full_checks() >= 1
