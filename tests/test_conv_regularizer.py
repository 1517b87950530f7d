"""SpectralNormRegularizer(conv_norm="operator"): input sizes, vectors, the step's gradient
against autograd of the dense operator norm, step == penalty, batching, resume, reporting."""

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils._python_dispatch import TorchDispatchMode

import spectral_ext as se
from spectral_ext import conv as C

from conftest import assert_rel_close
from test_conv import dense, dense_sigma, plant
from test_conv import _one_thread  # noqa: F401  (autouse: one intra-op thread, restored)


class Net(nn.Module):
    """Convs of several geometries (two equal ones, batched together) and a Linear."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(3, 3, 3, stride=2, padding=1)          # same geometry as c2
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(2 * 6 * 6, 3)
        self.to(dtype)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y)) + self.c3(y)
        return self.fc(self.up(y).flatten(1))


SIZES = {"c1": (2, 6, 6), "c2": (3, 6, 6), "c3": (3, 6, 6), "up": (3, 3, 3)}


def planted_net(dtype=torch.float64):
    net = Net(dtype)
    for m in (net.c1, net.c2, net.c3, net.up):
        plant(m)
    # the Linear too: sigma_1 = 2, the others <= 1, so 400 iterations converge whatever the
    # draw (a random 3 x 72 matrix can have sigma_2 / sigma_1 near 1: then u, v, and the
    # gradient lam * sigma * u v^T, were off by up to 1e-7 after 400 iterations)
    with torch.no_grad():
        w = net.fc.weight
        u, _ = torch.linalg.qr(torch.randn(w.shape[0], w.shape[0], dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[0], dtype=torch.float64))
        s = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
        w.copy_((u * s) @ v.t())
    return net


def x_batch(dtype=torch.float64):
    return torch.randn(4, 2, 6, 6, dtype=dtype)


def test_input_sizes_are_recorded_on_the_first_forward_and_the_hooks_removed():
    net = Net()
    hooks_before = {n: len(m._forward_hooks) for n, m in net.named_modules()}
    reg = se.SpectralNormRegularizer(net, conv_norm="operator")
    assert len(net.c1._forward_hooks) == hooks_before["c1"] + 1
    assert not reg.operator_vectors._buffers            # nothing known yet
    with pytest.raises(RuntimeError, match="run one forward pass .* not known yet for: c1, c2, "
                                           "c3, up"):
        reg.step()
    assert all(p.grad is None for p in net.parameters())  # refused before anything changed
    net(x_batch())
    assert {n: len(m._forward_hooks) for n, m in net.named_modules()} == hooks_before
    reg.step()
    shapes = {k: tuple(v.shape) for k, v in reg.state_dict().items() if "operator" in k}
    assert shapes == {f"operator_vectors.{k}/weight": s for k, s in SIZES.items()}
    # the matricized vectors are kept for every weight (the Linear's is used)
    assert {k for k in reg.state_dict() if k.startswith("vectors.")} == {
        "vectors.c1/weight", "vectors.c2/weight", "vectors.c3/weight", "vectors.up/weight",
        "vectors.fc/weight"}


def test_input_sizes_given_by_the_user_and_bad_ones_refused():
    net = Net()
    reg = se.SpectralNormRegularizer(net, conv_norm="operator",
                                     input_sizes={"c1": (2, 6, 6), "c2.weight": (3, 6, 6),
                                                  "c3": (3, 6, 6), "up": (3, 3, 3)})
    assert {k: tuple(v.shape) for k, v in reg.operator_vectors._buffers.items()} == {
        f"{k}/weight": s for k, s in SIZES.items()}
    assert not net.c1._forward_hooks                    # all known: no hook
    reg.step()                                          # no forward needed
    bad = [({"fc": (2, 3)}, ValueError, "not a conv whose weight this regularizer holds"),
           ({"c9": (2, 3, 3)}, ValueError, "names 'c9'"),
           ({"c1": (3, 6, 6)}, ValueError, "c1.weight .Conv2d. takes 2 input channels"),
           ({"c1": (4, 2, 6, 6)}, ValueError, "without the batch dimension"),
           ({"c1": (2, 1, 6)}, ValueError, "reflect padding 1 needs an input larger than 1"),
           ({"up": (3, 0, 3)}, ValueError, "must be positive"),
           ([("c1", (2, 6, 6))], TypeError, "input_sizes must be a dict")]
    for sizes, exc, match in bad:
        with pytest.raises(exc, match=match):
            se.SpectralNormRegularizer(net, conv_norm="operator", input_sizes=sizes)
    with pytest.raises(ValueError, match="conv_norm must be 'matricized' or 'operator'"):
        se.SpectralNormRegularizer(net, conv_norm="exact")
    with pytest.raises(ValueError, match="input_sizes is used only with conv_norm='operator'"):
        se.SpectralNormRegularizer(net, input_sizes=SIZES)


def test_step_gradient_is_autograd_of_the_dense_norms():
    """lam/2 * sum sigma^2 over the convs (dense operator norms) and the Linear (matricized):
    after the power iteration converged (planted gaps, 400 iterations), step() adds its
    gradient."""
    net = planted_net()
    lam = 0.7
    reg = se.SpectralNormRegularizer(net, lam=lam, n_iter=400, conv_norm="operator",
                                     input_sizes=SIZES)
    sig = reg.step()
    total, expected_sig = 0, []
    leaves = {}
    for name in ("c1", "c2", "c3", "up"):
        m = getattr(net, name)
        leaves[name] = m.weight.detach().clone().requires_grad_(True)
        s = dense_sigma(m, SIZES[name], leaves[name])
        expected_sig.append(s.detach())
        total = total + lam / 2 * s ** 2
    leaves["fc"] = net.fc.weight.detach().clone().requires_grad_(True)
    s_fc = torch.linalg.matrix_norm(leaves["fc"], ord=2)
    total = total + lam / 2 * s_fc ** 2
    total.backward()
    assert reg.names == ["c1.weight", "c2.weight", "c3.weight", "up.weight", "fc.weight"]
    assert_rel_close(sig, torch.stack(expected_sig + [s_fc.detach()]), 1e-9, "sigmas")
    for name, leaf in leaves.items():
        assert_rel_close(getattr(net, name).weight.grad, leaf.grad, 1e-7, f"{name} gradient")
    assert net.c1.bias.grad is None                     # biases untouched
    assert_rel_close(reg.exact_sigmas(), sig, 1e-9, "exact_sigmas (operator for the convs)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_penalty_gives_the_steps_gradient(dtype):
    a, b = planted_net(dtype), planted_net(dtype)
    b.load_state_dict(a.state_dict())
    x = x_batch(dtype)
    ra = se.SpectralNormRegularizer(a, lam=0.3, n_iter=2, conv_norm="operator")
    rb = se.SpectralNormRegularizer(b, lam=0.3, n_iter=2, conv_norm="operator")
    for _ in range(2):
        for p in list(a.parameters()) + list(b.parameters()):
            p.grad = None
        (a(x).sum() + ra.penalty()).backward()
        b(x).sum().backward()
        rb.step()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert_rel_close(pa.grad, pb.grad, tol, n)
        assert torch.equal(ra.sigmas(), rb.sigmas())
        for va, vb in zip(ra.state_dict().values(), rb.state_dict().values()):
            assert torch.equal(va, vb)


def test_batched_groups_match_one_call_per_conv():
    """c2 and c3 share a geometry: one grouped conv per iteration gives what two calls give."""
    a, b = planted_net(), planted_net()
    b.load_state_dict(a.state_dict())
    ra = se.SpectralNormRegularizer(a, lam=0.5, n_iter=3, conv_norm="operator",
                                    input_sizes=SIZES)
    rb = se.SpectralNormRegularizer(b, lam=0.5, n_iter=3, conv_norm="operator",
                                    input_sizes=SIZES)
    rb._conv.batch = False
    b_ = rb._bind()
    groups = {len(g.idx) for g in ra._conv.plan(ra, ra._bind(), [0, 1, 2, 3])}
    assert groups == {1, 2} and {len(g.idx) for g in rb._conv.plan(rb, b_, [0, 1, 2, 3])} == {1}
    sa, sb = ra.step(), rb.step()
    assert_rel_close(sa, sb, 1e-13, "sigmas")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert_rel_close(pa.grad, pb.grad, 1e-12, n)
    for k, v in ra.operator_vectors._buffers.items():
        assert_rel_close(v, rb.operator_vectors._buffers[k], 1e-12, k)


@pytest.mark.parametrize("batch", [True, False])
def test_stacked_geometries_step_equals_penalty(batch):
    """Pairs of equal transposed, grouped, 1-D and 3-D convs (stacked as groups of the grouped
    call): the step's gradient (convolution_backward) equals autograd's through the penalty,
    and stacked equals one call per conv."""
    def build():
        torch.manual_seed(5)
        return nn.ModuleList([
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"),
            nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"),
            nn.Conv1d(3, 2, 3, stride=2, padding=1, padding_mode="replicate"),
            nn.Conv1d(3, 2, 3, stride=2, padding=1, padding_mode="replicate"),
            nn.Conv3d(2, 2, 2, dilation=2, padding=1),
            nn.Conv3d(2, 2, 2, dilation=2, padding=1)]).double()

    sizes = {"0": (4, 3, 4), "1": (4, 3, 4), "2": (4, 5, 4), "3": (4, 5, 4), "4": (3, 7),
             "5": (3, 7), "6": (2, 3, 3, 4), "7": (2, 3, 3, 4)}
    a, b = build(), build()
    ra = se.SpectralNormRegularizer(a, lam=0.2, n_iter=3, conv_norm="operator", input_sizes=sizes)
    rb = se.SpectralNormRegularizer(b, lam=0.2, n_iter=3, conv_norm="operator", input_sizes=sizes)
    ra._conv.batch = rb._conv.batch = batch
    calls = len(ra._conv.plan(ra, ra._bind(), list(range(8))))
    assert calls == (4 if batch else 8)
    sa = ra.step()
    rb.penalty().backward()
    assert torch.equal(sa, rb.sigmas())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
        else:
            assert_rel_close(pa.grad, pb.grad, 1e-12, n)
    for i, (m, size) in enumerate(zip(a, sizes.values())):   # and sigma is the operator's
        res = se.conv_operator_norm(m, size, n_iter=3, method="power",
                                    v0=se.SpectralNormRegularizer(
                                        b, conv_norm="operator",
                                        input_sizes=sizes).operator_vectors._buffers[f"{i}/weight"])
        assert_rel_close(sa[i], res.sigma, 1e-12, f"sigma of conv {i}")


def _train(model, reg, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reg.step()
        opt.step()


def test_resume_is_bit_identical_even_before_the_first_forward():
    torch.manual_seed(0)
    data = [(torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))) for _ in range(6)]

    def build():
        net = Net(torch.float32)
        reg = se.SpectralNormRegularizer(net, lam=0.1, conv_norm="operator")
        return net, reg, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(1)
    net, reg, opt = build()
    _train(net, reg, opt, data[:3])
    state = copy.deepcopy((net.state_dict(), reg.state_dict(), opt.state_dict()))
    _train(net, reg, opt, data[3:])

    torch.manual_seed(2)                      # another init: everything comes from the state
    net2, reg2, opt2 = build()
    assert not reg2.operator_vectors._buffers
    net2.load_state_dict(state[0])
    reg2.load_state_dict(state[1])            # registers the input-shaped vectors
    opt2.load_state_dict(state[2])
    _train(net2, reg2, opt2, data[3:])
    for (n, p), p2 in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(p, p2), n
    assert torch.equal(reg.sigmas(), reg2.sigmas())
    for (k, v), v2 in zip(reg.state_dict().items(), reg2.state_dict().values()):
        assert torch.equal(v, v2), k


def test_loaded_vectors_are_checked():
    net = Net()
    reg = se.SpectralNormRegularizer(net, conv_norm="operator", input_sizes=SIZES)
    state = reg.state_dict()
    fresh = se.SpectralNormRegularizer(Net(), conv_norm="operator")
    bad = dict(state)
    bad["operator_vectors.c1/weight"] = torch.zeros(2, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="operator vector of c1.weight is zero"):
        fresh.load_state_dict(bad)
    bad["operator_vectors.c1/weight"] = torch.ones(2, 1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="reflect padding 1 needs an input larger than 1"):
        fresh.load_state_dict(bad)
    assert not fresh.operator_vectors._buffers            # nothing registered on failure
    other = dict(state)
    other["operator_vectors.c2/weight"] = torch.ones(3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input size \(3, 8, 8\), but this regularizer "
                                         r"recorded \(3, 6, 6\)"):
        reg.load_state_dict(other)


def test_parametrized_and_frozen_convs():
    """weight_norm on a conv: step() and penalty() carry the operator-norm gradient to the
    underlying parameters; a frozen conv is skipped."""
    def build():
        torch.manual_seed(3)
        net = Net()
        parametrizations.weight_norm(net.c1)
        net.c3.weight.requires_grad_(False)
        return net

    a, b = build(), build()
    ra = se.SpectralNormRegularizer(a, lam=0.4, conv_norm="operator", input_sizes=SIZES)
    rb = se.SpectralNormRegularizer(b, lam=0.4, conv_norm="operator", input_sizes=SIZES)
    assert ra.covered_names() == ["c1.weight", "c2.weight", "up.weight", "fc.weight"]
    sig = ra.step()
    rb.penalty().backward()
    assert sig.shape == (4,)
    assert torch.equal(ra.sigmas(), rb.sigmas())
    assert a.c3.weight.grad is None
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:                              # biases, the frozen conv
            assert pb.grad is None, n
        else:
            assert_rel_close(pa.grad, pb.grad, 1e-12, n)
    assert a.c1.parametrizations.weight.original0.grad.abs().sum() > 0


def test_zero_and_nonfinite_weights():
    net = Net()
    reg = se.SpectralNormRegularizer(net, conv_norm="operator", input_sizes=SIZES)
    v_before = reg.operator_vectors._buffers["c1/weight"].clone()
    with torch.no_grad():
        net.c1.weight.zero_()
        net.c2.weight[0, 0, 0, 0] = float("nan")
    sig = reg.step()
    assert sig[0] == 0 and torch.equal(net.c1.weight.grad, torch.zeros_like(net.c1.weight))
    assert torch.equal(reg.operator_vectors._buffers["c1/weight"], v_before)   # kept
    assert torch.isnan(sig[1]) and torch.isnan(net.c2.weight.grad).any()
    assert torch.isfinite(reg.operator_vectors._buffers["c2/weight"]).all()    # kept
    assert torch.isfinite(sig[2:]).all()


class _NoHostSync(TorchDispatchMode):
    """Fails on the ops that read a value back to the host (.item(), bool(tensor), ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func not in (torch.ops.aten._local_scalar_dense.default,
                            torch.ops.aten.item.default), f"host sync: {func}"
        return func(*args, **(kwargs or {}))


def test_the_step_reads_nothing_back():
    net = Net(torch.float32)
    reg = se.SpectralNormRegularizer(net, conv_norm="operator", n_iter=2)
    net(x_batch(torch.float32))
    reg.step()                                # the first step builds the plan
    with _NoHostSync():
        reg.step()
        reg.penalty().backward()


def test_exact_sigmas_report_and_deepcopy():
    net = planted_net()
    reg = se.SpectralNormRegularizer(net, conv_norm="operator", input_sizes=SIZES)
    dense_sig = [torch.linalg.matrix_norm(dense(getattr(net, n), s), ord=2)
                 for n, s in SIZES.items()]
    exact = reg.exact_sigmas()
    assert_rel_close(exact[:4], torch.stack(dense_sig), 1e-9, "converged operator norms")
    assert_rel_close(exact[4], torch.linalg.matrix_norm(net.fc.weight.detach(), ord=2), 1e-12,
                     "the Linear: matricized")
    out = io.StringIO()
    rows = se.conv_norm_report(reg, file=out)
    assert [r["name"] for r in rows] == ["c1", "c2", "c3", "up"]
    for r, s in zip(rows, dense_sig):
        assert r["operator"] == pytest.approx(float(s), rel=1e-9)
    mats = [torch.linalg.matrix_norm(getattr(net, n).weight.detach().reshape(
        getattr(net, n).weight.shape[0], -1), ord=2) for n in SIZES]
    for r, s in zip(rows, mats):
        assert r["matricized"] == pytest.approx(float(s), rel=1e-12)
    text = out.getvalue()
    assert "matricized" in text and "operator" in text and "c1" in text
    # the same from the model and an example input
    rows2 = se.conv_norm_report(net, example_input=x_batch(), file=False)
    assert [r["operator"] for r in rows2] == pytest.approx([r["operator"] for r in rows],
                                                           rel=1e-9)
    with pytest.raises(ValueError, match="exactly one of input_sizes and example_input"):
        se.conv_norm_report(net, file=False)
    with pytest.raises(ValueError, match="not convs of the model: fc"):
        se.conv_norm_report(net, input_sizes={"fc": (72,)}, file=False)
    # a deep copy follows the same model with its own state and plan
    reg.step()
    twin = copy.deepcopy(reg)
    assert twin._conv._plan is None
    s1, s2 = reg.step(), twin.step()
    assert torch.equal(s1, s2)


def test_matricized_default_is_unchanged():
    """conv_norm='matricized' (default) keeps the state_dict and the step of before."""
    net = Net()
    reg = se.SpectralNormRegularizer(net)
    assert reg._conv is None and not hasattr(reg, "operator_vectors")
    assert set(reg.state_dict()) == {"vectors.c1/weight", "vectors.c2/weight",
                                     "vectors.c3/weight", "vectors.up/weight",
                                     "vectors.fc/weight", "last_sigma"}
    vs = se.init_vectors(reg.weights, seed=0)
    grads = [torch.zeros_like(w) for w in reg.weights]
    expected = se.reference.fused_step(reg.weights, vs, lam=reg.lam, grads=grads)
    assert_rel_close(reg.step(), expected, 1e-12, "sigmas")
    assert not math.isnan(float(reg.exact_sigmas().sum()))
