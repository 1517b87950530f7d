"""The README's recipe for CUDA graphs (issue 14 item 5): a whole training step (forward,
backward, reg.step(), optimizer step) captured once and replayed gives the eager run's weights,
vectors and sigmas, for each GPU backend.  Needs a CUDA GPU: skipped elsewhere (the CUDA
kernels' graph behaviour without one is covered through the emulation in test_cuda.py)."""

import pytest
import torch
from torch import nn

import spectral_ext as se

from conftest import assert_rel_close, warm_up_on_a_side_stream

BACKENDS = [b for b in ("cuda", "triton") if se.available_backends()[b].available]
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not BACKENDS,
    reason="needs a CUDA GPU with the cuda or triton backend: "
           + se.available_backends()["cuda"].detail)


def _setup(backend, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg = se.SpectralNormRegularizer(model, lam=0.1, backend=backend)
    data = [(torch.randn(16, 3, 6, 6, device="cuda"), torch.randint(0, 10, (16,), device="cuda"))
            for _ in range(8)]
    return model, opt, reg, data


def _step(model, opt, reg, x, y):
    opt.zero_grad(set_to_none=False)       # the same .grad tensors every step (graph-safe)
    nn.functional.cross_entropy(model(x), y).backward()
    sig = reg.step()
    opt.step()
    return sig


@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_training_step_replays_the_eager_run(backend):
    # eager: 3 warm-up steps then 5 more
    model, opt, reg, data = _setup(backend, 0)
    for x, y in data[:3]:
        _step(model, opt, reg, x, y)
    eager_sig = [_step(model, opt, reg, x, y).clone() for x, y in data[3:]]
    eager_w = [p.detach().clone() for p in model.parameters()]
    eager_v = [v.clone() for v in reg.vs()]

    # graphed: the same 3 warm-up steps on a side stream (they create the .grad tensors and the
    # kernels' cached layer table), then one captured step replayed on static inputs
    model, opt, reg, data = _setup(backend, 0)
    warmup = iter(data[:3])
    warm_up_on_a_side_stream(lambda: _step(model, opt, reg, *next(warmup)), times=3)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_sig = _step(model, opt, reg, static_x, static_y)
    # capturing ran nothing: the state is still that after the warm-up
    graphed_sig = []
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        graphed_sig.append(static_sig.clone())
    torch.cuda.synchronize()

    # the same kernels on the same data: equal up to the nondeterminism of the model's own
    # kernels (cuDNN/cuBLAS may pick other algorithms under capture), far below these tolerances
    for a, b in zip(graphed_sig, eager_sig):
        assert_rel_close(a, b, 1e-4, "sigma")
    for a, b in zip(model.parameters(), eager_w):
        assert_rel_close(a.detach(), b, 1e-4, "weight")
    for a, b in zip(reg.vs(), eager_v):
        assert_rel_close(a, b, 1e-4, "v")
