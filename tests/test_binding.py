"""The regularizer follows the model: a replaced parameter is rebound (its vector kept), a frozen
one is skipped, anything unsound raises, and no path leaves the model unregularized while
reporting success.  Also: which weights are collected (RNNs, attention, any parameter by name,
parametrized weights) and the value checks (lam >= 0, loaded vectors)."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import spectral_ext as se

from conftest import assert_rel_close


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _expected(reg, model_weights, grads, vs=None):
    """What one step must add: the reference step on the regularizer's vectors."""
    vs = [v.clone() for v in (vs if vs is not None else reg.vs())]
    grads = [g.clone() for g in grads]
    sig = se.reference.fused_step(model_weights, vs, lam=reg.lam, n_iter=reg.n_iter, grads=grads)
    return sig, grads, vs


def _check_step_regularizes(model, reg):
    """One step must add the reference's lam*sigma*u v^T into the model's own current .grad."""
    weights = [dict(model.named_parameters())[n] for n in reg.covered_names()]
    for w in weights:
        w.grad = torch.randn_like(w)
    sig_ref, g_ref, v_ref = _expected(reg, weights, [w.grad for w in weights],
                                      [reg.vs()[reg.names.index(n)] for n in reg.covered_names()])
    sig = reg.step()
    assert_rel_close(sig, sig_ref, 1e-5, "sigma")
    for w, g in zip(weights, g_ref):
        assert_rel_close(w.grad, g, 1e-5, "grad")


# ---- rebinding --------------------------------------------------------------------------------

def test_load_state_dict_assign_rebinds_and_keeps_vectors():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.3)
    reg.step()
    vs = [v.clone() for v in reg.vs()]
    new = {k: torch.randn_like(t) for k, t in model.state_dict().items()}
    model.load_state_dict(new, assign=True)       # new Parameter objects
    assert reg.weights[0] is model[0].weight
    assert all(torch.equal(a, b) for a, b in zip(reg.vs(), vs))
    _check_step_regularizes(model, reg)


def test_meta_init_then_to_empty():
    with torch.device("meta"):
        model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.2, seed=4)
    assert reg.vs()[0].device.type == "meta"
    model.to_empty(device="cpu")                 # replaces every Parameter
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    _check_step_regularizes(model, reg)
    # the vectors were drawn from the seed, as if the regularizer had been built on CPU
    fresh = se.init_vectors(reg.weights, seed=4)
    reg2 = se.SpectralNormRegularizer(model, lam=0.2, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(reg2.vs(), fresh))


def test_checkpoint_loaded_after_a_meta_init_is_kept():
    """Resuming with a meta-device init: the regularizer's checkpoint, loaded after to_empty and
    before any step, is what the next step uses (copying into the meta vectors was a no-op, and
    the first step drew them again from the seed)."""
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    for _ in range(3):
        reg.step()
    ckpt_m, ckpt_r = model.state_dict(), copy.deepcopy(reg.state_dict())
    with torch.device("meta"):
        m2 = _mlp()
    r2 = se.SpectralNormRegularizer(m2, lam=0.5)
    m2.to_empty(device="cpu")
    m2.load_state_dict(ckpt_m)
    r2.load_state_dict(ckpt_r)
    assert torch.equal(r2.sigmas(), ckpt_r["last_sigma"])
    for name, v in zip(r2._keys, r2.vs()):
        assert torch.equal(v, ckpt_r[f"vectors.{name}"])     # loaded, not drawn from the seed
    _check_step_regularizes(m2, r2)              # and the step starts from them


def test_deepcopy_of_a_container_holding_the_regularizer_before_the_model():
    """A module that registers the regularizer before the model: deepcopy copies the regularizer
    first, when the model's copy does not exist yet; the copy must still follow the copy."""
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            net = _mlp()
            self.reg = se.SpectralNormRegularizer(net, lam=0.4)   # registered first
            self.net = net

    w = Wrapper()
    w2 = copy.deepcopy(w)
    assert w2.reg.weights[0] is w2.net[0].weight
    _check_step_regularizes(w2.net, w2.reg)
    assert all(p.grad is None for p in w.net.parameters())
    r, m = copy.deepcopy((w.reg, w.net))           # the same, in a tuple
    assert r.weights[1] is m[2].weight


def test_deepcopy_of_the_regularizer_follows_the_same_model():
    model = _mlp()
    reg = copy.deepcopy(se.SpectralNormRegularizer(model, lam=0.4))
    _check_step_regularizes(model, reg)


def test_deepcopy_with_the_model_follows_the_copy_and_attach():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.4)
    m2, r2 = copy.deepcopy((model, reg))
    assert r2.weights[0] is m2[0].weight
    _check_step_regularizes(m2, r2)
    m3 = copy.deepcopy(model)
    r3 = copy.deepcopy(reg).attach(m3)
    _check_step_regularizes(m3, r3)
    with pytest.raises(RuntimeError, match="changed from a 7 x 5 to a 7 x 4 matrix"):
        copy.deepcopy(reg).attach(nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)))


def test_pickled_regularizer_must_be_attached():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model)
    buf = io.BytesIO()
    torch.save(reg, buf)
    buf.seek(0)
    r2 = torch.load(buf, weights_only=False)
    with pytest.raises(RuntimeError, match=r"follows no model .* reg.attach\(model\)"):
        r2.step()
    r2.attach(model)
    _check_step_regularizes(model, r2)


def test_swapped_submodule_is_followed():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    model[2] = nn.Linear(7, 3)                    # same name, same shape, a new module
    assert reg.weights[1] is model[2].weight
    _check_step_regularizes(model, reg)


@pytest.mark.parametrize("how", ["del", "modules_dict"])
def test_submodule_moved_without_a_registration_hook_is_noticed(how):
    """del seq[0] renumbers a Sequential's children, and parent._modules[name] = new (what
    torch.ao.quantization's convert does) swaps one: neither fires a registration hook.  The
    step must follow the module now under each name, or raise; never regularize the old one."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    new = nn.Linear(4, 4)                          # built before the last step: no hook after
    reg.step()
    old = list(model)
    for m in old:
        m.weight.grad = None
    if how == "del":
        del model[0]
        with pytest.raises(RuntimeError, match="2.weight no longer resolves"):
            reg.step()
    else:
        model._modules["1"] = new
        assert reg.weights[1] is new.weight
        _check_step_regularizes(model, reg)
        old = old[1:2]                             # the one no longer in the model
    assert all(m.weight.grad is None for m in old)


def test_device_move_that_keeps_the_parameters_is_followed():
    """model.to(device) between CPU and CUDA keeps each Parameter object (it sets .data); the
    vectors must follow anyway.  Emulated on CPU -> meta with the swap-tensors flag, which keeps
    the Parameters too."""
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    reg.step()                  # (a step plan, if any, is dropped by the next step under the flag)
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        reg.step()              # no plan under the flag: it would make the swap below fail
        p = model[0].weight
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    assert model[0].weight is p and p.device.type == "meta"
    reg.step()
    assert all(v.device.type == "meta" for v in reg.vs())


def test_attach_that_fails_keeps_the_model_it_followed():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    reg.step()
    with pytest.raises(RuntimeError, match=r"cannot attach this model: 2.weight changed from a "
                       r"3 x 7 to a 4 x 7 matrix"):
        reg.attach(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)))
    _check_step_regularizes(model, reg)


def test_weights_tied_after_building_raise():
    tied = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    reg = se.SpectralNormRegularizer(tied)
    tied[1].weight = tied[0].weight
    with pytest.raises(RuntimeError, match=r"0.weight and 1.weight are now the same Parameter"):
        reg.step()


def test_hook_based_weight_norm_is_refused_not_skipped():
    """The old torch.nn.utils.weight_norm leaves no Parameter named weight (it is computed by a
    forward pre-hook): never skipped without a word, at construction or after."""
    model = _mlp()
    torch.nn.utils.weight_norm(model[0])
    with pytest.raises(ValueError, match=r"0.weight \(Linear\) is not a Parameter: .*forward "
                       r"pre-hook .*parametrizations.weight_norm"):
        se.SpectralNormRegularizer(model)
    assert se.SpectralNormRegularizer(model, exclude_names="0").names == ["2.weight"]
    model = _mlp()
    reg = se.SpectralNormRegularizer(model)
    torch.nn.utils.weight_norm(model[2])
    with pytest.raises(RuntimeError, match=r"2.weight is no longer a parameter of the model: it "
                       r"is a plain tensor computed by a forward pre-hook"):
        reg.step()


def test_unsound_changes_raise_before_anything_changes():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    model[2] = nn.Linear(7, 4)                    # another shape
    vs = [v.clone() for v in reg.vs()]
    model[0].weight.grad = g0 = torch.randn(7, 5)
    g0c = g0.clone()
    with pytest.raises(RuntimeError, match=r"2.weight changed from a 3 x 7 to a 4 x 7 matrix"):
        reg.step()
    assert torch.equal(model[0].weight.grad, g0c)
    assert all(torch.equal(a, b) for a, b in zip(reg.vs(), vs))
    del model[2]                                   # the name no longer resolves
    with pytest.raises(RuntimeError, match="2.weight no longer resolves"):
        reg.step()
    model.append(nn.Linear(7, 3))
    model[2].weight = None                         # registered as None
    with pytest.raises(RuntimeError, match="2.weight is no longer a parameter"):
        reg.penalty()


def test_parametrization_added_after_building_is_followed():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    parametrizations.weight_norm(model[0])        # weight -> g, v (original0, original1)
    orig = list(model[0].parametrizations.weight.parameters())
    for p in orig:
        p.grad = torch.zeros_like(p)
    w = model[0].weight.detach()
    v = reg.vs()[0].clone()
    _, u, v_new = se.reference.power_iteration(w, v)
    # d/d(originals) of lam/2 sigma^2 through the parametrization, with u, v held fixed
    originals = [p.detach().clone().requires_grad_() for p in orig]
    W = torch._weight_norm(originals[1], originals[0], 0)
    (0.5 * reg.lam * (u @ W.reshape(7, -1) @ v_new) ** 2).backward()
    reg.step()
    for p, ref in zip(orig, originals):
        assert_rel_close(p.grad, ref.grad, 1e-5, "grad through weight_norm")
    assert "0.weight" in reg.covered_names()


def test_parametrized_weights_are_collected_and_regularized_through_penalty():
    model = _mlp()
    parametrizations.orthogonal(model[2])
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    assert reg.names == ["0.weight", "2.weight"]
    reg.penalty().backward()
    assert model[2].parametrizations.weight.original.grad is not None
    # an orthogonal 3 x 7 matrix has sigma = 1 after enough iterations
    reg.n_iter = 50
    reg.penalty()
    assert abs(float(reg.sigmas()[1]) - 1.0) < 1e-4


def test_frozen_weights_are_skipped_and_unfrozen_ones_come_back():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    model[0].weight.requires_grad_(False)
    assert reg.covered_names() == ["2.weight"]
    sig = reg.step()
    assert sig.shape == (1,) and model[0].weight.grad is None     # no .grad created
    assert float(reg.sigmas()[0]) == 0.0 and float(reg.sigmas()[1]) == float(sig[0])
    w = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.step()
    assert torch.equal(model[0].weight, w)                        # it did not move
    model[0].weight.requires_grad_(True)
    _check_step_regularizes(model, reg)


def test_all_frozen_gives_an_empty_step():
    model = _mlp().requires_grad_(False)
    reg = se.SpectralNormRegularizer(model)
    assert reg.covered_names() == [] and reg.step().shape == (0,)
    assert all(p.grad is None for p in model.parameters())


def test_vectors_follow_the_model_device_without_reg_to():
    model = _mlp()
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    model.double()          # a cast replaces nothing but changes dtype: vectors stay float32
    _check_step_regularizes(model, reg)
    model.to("meta")        # the weights move: the vectors follow
    reg.vs()
    assert reg.weights[0].device.type == "meta"


# ---- which weights ----------------------------------------------------------------------------

def test_rnn_and_attention_weights_are_collected():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
            self.gru = nn.GRU(4, 5)
            self.attn = nn.MultiheadAttention(8, 2)
            self.cross = nn.MultiheadAttention(8, 2, kdim=5, vdim=6)
            self.emb = nn.Embedding(10, 4)

    m = M()
    reg = se.SpectralNormRegularizer(m)
    lstm = [f"lstm.weight_{k}_l{i}{s}" for i in range(2) for s in ("", "_reverse")
            for k in ("ih", "hh", "hr")]
    assert sorted(n for n in reg.names if n.startswith("lstm")) == sorted(lstm)
    assert [n for n in reg.names if n.startswith("gru")] == ["gru.weight_ih_l0",
                                                            "gru.weight_hh_l0"]
    assert [n for n in reg.names if n.startswith("attn")] == ["attn.in_proj_weight",
                                                             "attn.out_proj.weight"]
    assert [n for n in reg.names if n.startswith("cross")] == [
        "cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight",
        "cross.out_proj.weight"]
    assert "emb.weight" not in reg.names
    assert "emb.weight" in se.SpectralNormRegularizer(
        m, include_types=(nn.Embedding,)).names
    x = torch.randn(3, 2, 8)
    m.attn(x, x, x)[0].sum().backward()
    _check_step_regularizes(m, reg)


def test_any_parameter_by_name_and_bare_strings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 4)
            self.proj = nn.Parameter(torch.randn(3, 4))
            self.scale = nn.Parameter(torch.ones(4))

    m = M()
    assert se.SpectralNormRegularizer(m, include_names="fc2").names == ["fc2.weight"]
    with pytest.raises(ValueError, match="found no weight"):
        se.SpectralNormRegularizer(m, exclude_names="fc")
    assert se.SpectralNormRegularizer(m, exclude_names="fc2").names == ["fc.weight"]
    assert se.SpectralNormRegularizer(m, include_params="^proj$").names == [
        "fc.weight", "fc2.weight", "proj"]
    with pytest.raises(ValueError, match=r"scale \(M\) has shape \(4,\)"):
        se.SpectralNormRegularizer(m, include_params="scale")
    with pytest.raises(TypeError, match="include_names must be a regular expression"):
        se.SpectralNormRegularizer(m, include_names=[3])


def test_exclude_names_bare_string_is_one_pattern():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(11)])
    # 'fc' as a list of characters would have matched every name containing 'f' or 'c'
    names = se.SpectralNormRegularizer(model, exclude_names="1").names
    assert names == [f"{i}.weight" for i in range(11) if "1" not in str(i)]


# ---- value checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["fused_step", "module", "reference"])
def test_negative_lam_is_refused_everywhere(where):
    model = _mlp()
    w = [model[0].weight.detach()]
    if where == "module":
        with pytest.raises(ValueError, match="lam must be >= 0"):
            se.SpectralNormRegularizer(model, lam=-0.1)
        return
    fn = se.fused_step if where == "fused_step" else se.reference.fused_step
    with pytest.raises(ValueError, match="lam must be >= 0"):
        fn(w, se.init_vectors(w), lam=-0.1, grads=[torch.zeros(7, 5)])


def test_native_ops_refuse_negative_and_non_finite_lam():
    if not se.available_backends()["cpu"].available:
        pytest.skip("the C++ CPU backend is not built here")
    w = [torch.randn(4, 3)]
    for lam, msg in ((-1.0, "lam must be >= 0"), (float("nan"), "lam must be finite")):
        g = [torch.zeros(4, 3)]
        with pytest.raises(ValueError, match=msg):
            torch.ops.spectral_ext.fused_step(w, se.init_vectors(w), g, lam, 1)
        assert not g[0].any()


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_loading_a_zero_or_non_finite_vector_is_refused(bad):
    model = _mlp()
    reg = se.SpectralNormRegularizer(model)
    state = reg.state_dict()
    state["vectors.2/weight"] = torch.zeros(7) if bad == "zero" else torch.full((7,), float("nan"))
    before = [t.clone() for t in reg.state_dict().values()]
    with pytest.raises(ValueError, match=f"loaded vector of 2.weight is "
                                         f"{'zero' if bad == 'zero' else 'not finite'}"):
        reg.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(reg.state_dict().values(), before))


# ---- the per-step identity tests in C (csrc/module.cpp: _C.dict_is, _C.lookups_are) ----------

@pytest.mark.skipif(se._ops.dict_is is None, reason="no C++ extension: the Python forms are used")
def test_the_c_identity_tests_answer_like_their_python_forms():
    """The regularizer's binding check and plan check call these instead of Python loops; on
    random dicts with random edits they must give the Python expressions' answers."""
    from collections import OrderedDict
    dict_is, lookups_are = se._ops.dict_is, se._ops.lookups_are
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    objs = [object() for _ in range(6)]

    def rand(n):
        return int(torch.randint(0, n, (), generator=gen))

    for _ in range(300):
        n = rand(5)
        d = {f"k{i}": objs[rand(6)] for i in range(n)}
        keys, values = list(d), list(d.values())
        edit = rand(6)
        if edit == 1 and n:                  # a value replaced
            d[keys[rand(n)]] = object()
        elif edit == 2 and n:                # a key removed
            del d[keys[rand(n)]]
        elif edit == 3:                      # a key added
            d["new"] = objs[0]
        elif edit == 4 and n > 1:            # the same items in another order
            d = dict(reversed(list(d.items())))
        elif edit == 5 and n:                # an equal key that is another str object
            keys[0] = "".join(["k", keys[0][1:]])
        py = list(d) == keys and len(d) == len(values) and all(
            a is b for a, b in zip(d.values(), values))
        assert dict_is(d, keys, values) == py
        assert dict_is(d, None, values) == (len(d) == len(values) and all(
            a is b for a, b in zip(d.values(), values)))
        ds = [d if rand(2) else {k: v for k, v in d.items()} for _ in range(len(keys))]
        probe = [k if rand(4) else "missing" for k in keys]
        vals = [dd.get(k) for dd, k in zip(ds, probe)]
        if vals and rand(3) == 0:
            vals[rand(len(vals))] = object()
        assert lookups_are(ds, probe, vals) == all(
            dd.get(k) is v for dd, k, v in zip(ds, probe, vals))
    from spectral_ext.regularizer import _dict_is
    od = OrderedDict(a=objs[0], b=objs[1])
    od.move_to_end("a")                 # its order is not the storage's: C cannot tell (None),
    assert dict_is(od, ["b", "a"], [objs[1], objs[0]]) is None          # Python answers
    assert _dict_is(od, ["b", "a"], [objs[1], objs[0]])
    assert not _dict_is(od, ["a", "b"], [objs[0], objs[1]])
    assert lookups_are([od], ["a"], [objs[0]])
    with pytest.raises(TypeError, match="must be lists"):
        dict_is({}, (), [])
    with pytest.raises(TypeError, match="three lists"):
        lookups_are([{}], ("a",), [None])
    with pytest.raises(ValueError, match="lists of one length"):
        lookups_are([{}], ["a", "b"], [None])
    with pytest.raises(TypeError, match="dicts must hold dicts and keys str"):
        lookups_are([{}], [1], [None])
    with pytest.raises(TypeError, match="takes 3 arguments"):
        dict_is({}, None)


@pytest.mark.skipif(se._ops.requires_grad_indices is None,
                    reason="no C++ extension: the Python form is used")
def test_requires_grad_indices_answers_like_python():
    """_C.requires_grad_indices (the regularizer's active set when some weights are frozen):
    the indices of the tensors that require grad, the previous tuple itself when unchanged."""
    rgi = se._ops.requires_grad_indices
    ps = [nn.Parameter(torch.randn(2, 2)) for _ in range(40)]
    base = torch.randn(3, 3, requires_grad=True)
    previous = None
    for _ in range(50):
        for p in ps:
            p.requires_grad_(bool(torch.randint(0, 4, ()) > 0))
        ts = ps + [base[:2], torch.randn(2), base.detach()]   # a non-leaf view, plain tensors
        want = tuple(i for i, t in enumerate(ts) if t.requires_grad)
        got = rgi(ts, previous)
        assert got == want
        if previous is not None and previous == want:
            assert got is previous
        again = rgi(ts, got)
        assert again is got
        assert rgi(ts, tuple(reversed(got))) == want or len(want) < 2
        previous = got
    with pytest.raises(TypeError, match="not a tensor"):
        rgi([ps[0], 1], None)
    with pytest.raises(TypeError, match="a list of tensors and a tuple or None"):
        rgi((ps[0],), None)
    with pytest.raises(TypeError, match="a list of tensors and a tuple or None"):
        rgi([ps[0]], [0])


def test_ordered_dict_children_keep_the_binding_and_the_plan():
    """A model whose _modules are OrderedDicts (pickled whole by torch < 2.0): the C test cannot
    tell (csrc/module.cpp: dict_is gives None) and Python answers, so the binding and the plan
    are kept from step to step, and a child swapped in the OrderedDict is still noticed."""
    from collections import OrderedDict
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)), nn.Linear(3, 2))
    for m in model.modules():
        m._modules = OrderedDict(m._modules)
    reg = se.SpectralNormRegularizer(model, lam=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.step()
    binding, plan_state = reg._binding, reg._plan_state
    for _ in range(2):
        reg.step()
        assert reg._binding is binding and reg._plan_state is plan_state
    model[0]._modules["1"] = nn.Linear(5, 3)    # no hook fires
    assert reg.weights[1] is model[0][1].weight
    _check_step_regularizes(model, reg)
