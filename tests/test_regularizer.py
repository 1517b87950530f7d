"""SpectralNormRegularizer: collection rules, state, devices/dtypes, and the two usage forms."""

import copy

import pytest
import torch
from torch import nn

import spectral_ext as se

from conftest import assert_rel_close

BACKENDS = ["reference"] + [b for b in ("cpu",) if se.available_backends()[b].available]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv1 = nn.Conv1d(6, 5, 3)
        self.conv2 = nn.Conv2d(1, 4, 3)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.deconv = nn.ConvTranspose2d(4, 3, 3, groups=1)
        self.norm = nn.BatchNorm2d(3)
        self.ln = nn.LayerNorm(7)
        self.head = nn.Linear(7, 7)
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)
        self.out = nn.Linear(7, 7, bias=False)
        self.out.weight = self.head.weight           # tied


def test_collects_weights_by_default_types():
    reg = se.SpectralNormRegularizer(Net())
    # frozen weights are collected (a step skips them while they do not require grad)
    assert reg.names == ["conv1.weight", "conv2.weight", "conv3.weight", "deconv.weight",
                         "head.weight", "frozen.weight"]
    assert reg.covered_names() == reg.names[:5]
    # ConvTranspose: matricized along dim 0 as stored (in x out*kh*kw)
    assert [v.shape[0] for v in reg.vs()] == [18, 9, 8, 27, 7, 3]


def test_include_exclude_by_type_and_name():
    net = Net()
    assert se.SpectralNormRegularizer(net, include_types=(nn.Linear, nn.Embedding)).names == [
        "emb.weight", "head.weight", "frozen.weight"]
    assert se.SpectralNormRegularizer(net, exclude_types=(nn.ConvTranspose2d, nn.Conv3d)).names == [
        "conv1.weight", "conv2.weight", "head.weight", "frozen.weight"]
    assert se.SpectralNormRegularizer(net, include_names=[r"^conv"]).names == [
        "conv1.weight", "conv2.weight", "conv3.weight"]
    assert se.SpectralNormRegularizer(net, exclude_names=[r"conv\d"]).names == [
        "deconv.weight", "head.weight", "frozen.weight"]
    with pytest.raises(ValueError, match="no weight to regularize"):
        se.SpectralNormRegularizer(net, include_names=["nothing"])
    with pytest.raises(ValueError, match="ln.weight .LayerNorm. has shape .7,."):
        se.SpectralNormRegularizer(net, include_types=(nn.LayerNorm,))
    with pytest.raises(ValueError, match="unknown backend"):
        se.SpectralNormRegularizer(net, backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_adds_the_fused_gradient(backend):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reg = se.SpectralNormRegularizer(net, lam=0.5, n_iter=2, backend=backend, seed=3)
    x = torch.randn(4, 5)
    net(x).sum().backward()
    base = [p.grad.clone() for p in reg.weights]
    vs = se.init_vectors(reg.weights, seed=3)
    expected = [g.clone() for g in base]
    sig_ref = se.reference.fused_step(reg.weights, vs, lam=0.5, n_iter=2, grads=expected)
    sig = reg.step()
    assert_rel_close(sig, sig_ref, 1e-5, "sigma")
    assert torch.equal(reg.sigmas(), sig)
    for p, e in zip(reg.weights, expected):
        assert_rel_close(p.grad, e, 1e-5, "grad")
    assert net[0].bias.grad is not None      # biases untouched but present from backward


def test_step_creates_missing_grads():
    net = nn.Linear(4, 3)
    reg = se.SpectralNormRegularizer(net, lam=1.0)
    assert net.weight.grad is None
    sig = reg.step()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert sig.shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_and_step_give_the_same_gradient(backend):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))

    a, b = make(), make()
    ra = se.SpectralNormRegularizer(a, lam=0.3, backend=backend)
    rb = se.SpectralNormRegularizer(b, lam=0.3, backend=backend)
    x = torch.randn(2, 2, 4, 4)
    (a(x).sum() + ra.penalty()).backward()
    b(x).sum().backward()
    rb.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_rel_close(pa.grad, pb.grad, 1e-5, "grad")
    assert torch.equal(ra.sigmas(), rb.sigmas())


def test_exact_sigmas_and_convergence():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10))
    reg = se.SpectralNormRegularizer(net, lam=0.0, n_iter=100)
    reg.step()
    exact = reg.exact_sigmas()
    expected = torch.stack([torch.linalg.svdvals(m.weight.detach())[0] for m in net])
    assert_rel_close(exact, expected, 1e-6, "exact")
    assert_rel_close(reg.sigmas(), exact, 1e-4, "estimate after 100 iterations")


def _train(model, reg, opt, steps, data):
    for x, y in data[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reg.step()
        opt.step()


def test_state_dict_round_trip_resumes_bit_identically():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
        reg = se.SpectralNormRegularizer(model, lam=0.05, seed=5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, reg, opt

    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(6)]
    model, reg, opt = make()
    _train(model, reg, opt, 3, data)
    saved = copy.deepcopy({"model": model.state_dict(), "reg": reg.state_dict(),
                           "opt": opt.state_dict()})
    _train(model, reg, opt, 3, data[3:])               # steps 4..6
    m2, r2, o2 = make()
    m2.load_state_dict(saved["model"])
    r2.load_state_dict(saved["reg"])
    o2.load_state_dict(saved["opt"])
    _train(m2, r2, o2, 3, data[3:])
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(reg.vs(), r2.vs()):
        assert torch.equal(a, b)
    assert torch.equal(reg.sigmas(), r2.sigmas())
    assert set(reg.state_dict()) == {"last_sigma", "vectors.0/weight", "vectors.3/weight"}


def test_vectors_keep_their_precision_under_casts_and_follow_devices():
    model = nn.Linear(4, 3)
    reg = se.SpectralNormRegularizer(model)
    before = reg.vs()[0].clone()
    reg.to(torch.bfloat16)
    reg.half()
    assert reg.vs()[0].dtype == torch.float32 and torch.equal(reg.vs()[0], before)
    reg.double()
    assert reg.vs()[0].dtype == torch.float64
    reg.to("meta")                    # a device move is followed
    assert reg.vs()[0].device.type == "meta"
    # the vectors follow the weights back: values lost on meta are drawn again from the seed
    v0 = se.init_vectors([model.weight], seed=0)[0].double()
    s_ref = se.reference.fused_step([model.weight], [v0], lam=reg.lam,
                                    grads=[torch.zeros_like(model.weight)])
    s = reg.step()
    assert reg.vs()[0].device.type == "cpu" and reg.vs()[0].dtype == torch.float64
    assert_rel_close(reg.vs()[0], v0, 1e-6, "v")
    assert_rel_close(s, s_ref, 1e-6, "sigma")


def test_low_precision_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).to(torch.bfloat16)
    reg = se.SpectralNormRegularizer(model)
    model(torch.randn(3, 6, dtype=torch.bfloat16)).sum().backward()
    sig = reg.step()
    assert sig.dtype == torch.float32 and torch.isfinite(sig).all()
    assert all(p.grad.dtype == torch.bfloat16 for p in reg.weights)


def test_initial_vectors_are_seeded():
    a = se.SpectralNormRegularizer(nn.Linear(5, 5), seed=1)
    b = se.SpectralNormRegularizer(nn.Linear(5, 5), seed=1)
    c = se.SpectralNormRegularizer(nn.Linear(5, 5), seed=2)
    assert torch.equal(a.vs()[0], b.vs()[0]) and not torch.equal(a.vs()[0], c.vs()[0])
