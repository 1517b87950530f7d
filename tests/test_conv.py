"""The operator norm of a convolution (spectral_ext/conv.py) against the dense matrix of the map.

The oracle: the module itself applied to every basis vector of a small input (its bias
removed by subtracting the response to zero), in float64, and ``matrix_norm(., 2)``.  Convergence
tests plant a spectral gap (a rank-1 channel matrix times a constant kernel, plus 20 % noise:
over 200 seeds the largest sigma2/sigma1 of these configurations was 0.987), so a fixed number
of power iterations converges whatever the seed; Lanczos over the whole (small) input space is
exact without a gap.
"""

import math

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import conv as C

from conftest import assert_rel_close


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run thousands of ops on tensors of a few hundred elements: a second intra-op
    thread gains nothing, and on a loaded 2-core machine its barrier waits made one test take
    44 s instead of 0.3 s (measured).  Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# (id, module builder, input size (C, *spatial)): every conv type; stride 1, 2, 3; padding 0, 1,
# 2, "same" (odd and even extents); every padding mode; dilation 2; groups 2; output_padding
CONFIGS = [
    ("conv2d-valid", lambda: nn.Conv2d(3, 4, 3), (3, 6, 5)),
    ("conv2d-s2-p1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 6, 5)),
    ("conv2d-same", lambda: nn.Conv2d(3, 4, 3, padding="same"), (3, 6, 5)),
    ("conv2d-same-even-dilated", lambda: nn.Conv2d(3, 4, (2, 3), padding="same",
                                                   dilation=(2, 1)), (3, 5, 4)),
    ("conv2d-reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 6, 5)),
    ("conv2d-replicate-s2", lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="replicate",
                                              stride=2), (3, 6, 5)),
    ("conv2d-circular", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 6, 5)),
    ("conv2d-circular-s2", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular",
                                             stride=2), (3, 6, 5)),
    ("conv2d-circular-same-dilated", lambda: nn.Conv2d(3, 4, 2, padding="same", dilation=2,
                                                       padding_mode="circular"), (3, 6, 5)),
    ("conv2d-groups-reflect", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, stride=(2, 1),
                                                padding_mode="reflect"), (4, 5, 5)),
    ("conv2d-circular-valid", lambda: nn.Conv2d(3, 4, 3, padding_mode="circular"), (3, 6, 5)),
    ("conv1d-circular", lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (3, 9)),
    ("conv1d-reflect-dilated", lambda: nn.Conv1d(3, 4, 3, padding=2, dilation=2,
                                                 padding_mode="reflect"), (3, 9)),
    ("conv1d-reflect-s2", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1,
                                            padding_mode="reflect"), (3, 9)),
    ("conv3d-replicate", lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate"),
     (2, 3, 4, 4)),
    ("conv3d-circular", lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"),
     (2, 3, 4, 4)),
    ("conv3d-s2-groups", lambda: nn.Conv3d(2, 4, 2, stride=2, groups=2), (2, 4, 4, 3)),
    ("convT2d-s2", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
     (3, 4, 3)),
    ("convT2d-dilated-groups", lambda: nn.ConvTranspose2d(4, 6, 3, padding=0, dilation=2,
                                                          output_padding=1, groups=2), (4, 3, 2)),
    ("convT1d-s3", lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1, output_padding=2),
     (3, 5)),
    ("convT3d-s2", lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1), (2, 2, 3, 3)),
]
IDS = [c[0] for c in CONFIGS]
# the configurations whose planted gap holds (dilation and groups split the map into copies on
# sub-lattices, whose top singular values nearly coincide: Lanczos covers those)
GAPPED = ["conv2d-valid", "conv2d-s2-p1", "conv2d-same", "conv2d-reflect", "conv2d-replicate-s2",
          "conv2d-circular", "conv2d-circular-s2", "conv1d-reflect-s2", "conv3d-replicate",
          "convT2d-s2", "convT1d-s3", "convT3d-s2"]
BY_ID = {c[0]: c for c in CONFIGS}


def make(cid, dtype=torch.float64, planted=False):
    _, build, size = BY_ID[cid]
    m = build().to(dtype)
    if planted:
        plant(m)
    return m, size


def plant(m, noise=0.2):
    """weight = a b^T (x) ones(kernel) + noise: a low-pass map with a clear top singular value."""
    w = m.weight
    with torch.no_grad():
        a, b = torch.randn(w.shape[0], dtype=w.dtype), torch.randn(w.shape[1], dtype=w.dtype)
        p = (a[:, None] * b[None, :]).reshape(*w.shape[:2], *([1] * (w.dim() - 2))).expand(w.shape)
        w.copy_(p + noise * p.abs().mean() * torch.randn_like(w))


def dense(m, size):
    """The matrix of x -> m(x) - m(0) on inputs of this size (rows: outputs), by the module."""
    n = math.prod(size)
    eye = torch.eye(n, dtype=m.weight.dtype).reshape(n, *size)
    with torch.no_grad():
        out = m(eye) - m(torch.zeros(1, *size, dtype=m.weight.dtype))
    return out.reshape(n, -1).T


def dense_of(fn, size, dtype=torch.float64):
    n = math.prod(size)
    return fn(torch.eye(n, dtype=dtype).reshape(n, *size)).reshape(n, -1).T


def dense_sigma(m, size, weight):
    """sigma of the dense map as a differentiable function of ``weight``."""
    n = math.prod(size)
    eye = torch.eye(n, dtype=weight.dtype).reshape(n, *size)
    out = torch.func.functional_call(m, {"weight": weight, "bias": None}, (eye,))
    return torch.linalg.matrix_norm(out.reshape(n, -1), ord=2)


@pytest.mark.parametrize("cid", IDS)
def test_operator_and_adjoint_are_the_modules_map(cid):
    m, size = make(cid)
    g = C.geometry(m, size)
    w = m.weight.detach()
    A = dense(m, size)
    assert tuple(g.out_size) == tuple(m(torch.zeros(1, *size, dtype=torch.float64)).shape[1:])
    assert_rel_close(dense_of(lambda x: C.apply(g, x, w), size), A, 1e-13, "A")
    # the adjoint: <A x, y> = <x, A^T y> for all x, y, i.e. the dense A^T is the transpose
    assert_rel_close(dense_of(lambda y: C.adjoint(g, y, w), g.out_size), A.T, 1e-13, "A^T")


@pytest.mark.parametrize("cid", IDS)
def test_lanczos_and_fft_give_the_dense_norm(cid):
    m, size = make(cid)
    sigma = torch.linalg.matrix_norm(dense(m, size), ord=2)
    n = math.prod(size)
    res = se.conv_operator_norm(m, size, n_iter=n, method="lanczos")   # the whole input space
    assert res.method == "lanczos" and res.v.shape == size
    assert_rel_close(res.sigma, sigma, 1e-9, "lanczos")
    g = C.geometry(m, size)
    assert g.fft_exact == (cid in ("conv2d-circular", "conv2d-circular-same-dilated",
                                   "conv1d-circular", "conv3d-circular"))
    if g.fft_exact:
        auto = se.conv_operator_norm(m, size)
        assert auto.method == "fft" and auto.v is None
        assert_rel_close(auto.sigma, sigma, 1e-12, "fft")
    else:
        with pytest.raises(ValueError, match="exact only for padding_mode='circular' at stride 1"):
            se.conv_operator_norm(m, size, method="fft")


@pytest.mark.parametrize("cid", IDS)
def test_power_iteration_is_the_dense_power_iteration(cid):
    """Whatever the spectrum: k iterations through conv/adjoint are k iterations on the dense
    matrix (u = normalize(A v), v' = A^T u, sigma = ||v'||)."""
    m, size = make(cid)
    A = dense(m, size)
    v0 = torch.randn(size, dtype=torch.float64)
    res = se.conv_operator_norm(m, size, n_iter=25, method="power", v0=v0)
    v = v0.reshape(-1) / v0.norm()
    for _ in range(25):
        u = A @ v
        u = u / u.norm()
        vp = A.T @ u
        s = vp.norm()
        v = vp / s
    assert res.iterations == 25
    assert_rel_close(res.sigma, s, 1e-11, "sigma")
    assert_rel_close(res.v.reshape(-1), v, 1e-9, "v")


@pytest.mark.parametrize("cid", GAPPED)
def test_power_iteration_converges_to_the_dense_norm(cid):
    m, size = make(cid, planted=True)
    sigma = torch.linalg.matrix_norm(dense(m, size), ord=2)
    res = se.conv_operator_norm(m, size, n_iter=600, method="power")
    assert_rel_close(res.sigma, sigma, 1e-9, "power, 600 iterations")
    # warm start: from the converged vector one iteration stays converged
    again = se.conv_operator_norm(m, size, n_iter=1, method="power", v0=res.v)
    assert_rel_close(again.sigma, sigma, 1e-9, "warm start")


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_a_tolerance_stops_early(method):
    m, size = make("conv2d-s2-p1", planted=True)
    sigma = torch.linalg.matrix_norm(dense(m, size), ord=2)
    res = se.conv_operator_norm(m, size, n_iter=600, tol=1e-12, method=method)
    assert res.iterations < 600 and res.iterations % 5 == 0
    assert_rel_close(res.sigma, sigma, 1e-6, f"{method}, tol=1e-12")


@pytest.mark.parametrize("cid", ["conv2d-s2-p1", "conv2d-reflect", "conv3d-replicate",
                                 "convT2d-s2", "conv2d-circular"])
def test_sigma_gradient_is_autograd_of_the_dense_norm(cid):
    m, size = make(cid, planted=True)
    w = m.weight.detach().clone().requires_grad_(True)
    dense_sigma(m, size, w).backward()
    expected = w.grad.clone()
    for method in ("power", "fft") if C.geometry(m, size).fft_exact else ("power",):
        m.weight.grad = None
        res = se.conv_operator_norm(m, size, n_iter=600, method=method)
        res.sigma.backward()
        assert_rel_close(m.weight.grad, expected, 1e-7, f"d sigma / dW ({method})")


def test_float32_and_low_precision_weights():
    m, size = make("conv2d-reflect", dtype=torch.float32, planted=True)
    sigma = torch.linalg.matrix_norm(dense(m.double(), size), ord=2)
    m.float()
    res = se.conv_operator_norm(m, size, n_iter=600)
    assert res.sigma.dtype == torch.float32 and res.v.dtype == torch.float32
    # float32 arithmetic over sums of ~100 terms: a few ulp of sigma
    assert_rel_close(res.sigma, sigma, 1e-5, "float32")
    res16 = se.conv_operator_norm(m.to(torch.bfloat16), size, n_iter=600)
    sigma16 = torch.linalg.matrix_norm(dense(m.double(), size), ord=2)   # the rounded weights
    assert res16.sigma.dtype == torch.float32
    assert_rel_close(res16.sigma, sigma16, 1e-5, "bfloat16 weights, float32 arithmetic")


def test_matricized_norm_differs_from_the_operator_norm():
    """The reason for the mode: on a 3x3 conv with padding 1 the matricized sigma is below the
    operator's (the kernel's positions overlap)."""
    torch.manual_seed(0)
    m = nn.Conv2d(4, 4, 3, padding=1).double()
    size = (4, 6, 6)
    op = torch.linalg.matrix_norm(dense(m, size), ord=2)
    mat = torch.linalg.matrix_norm(m.weight.detach().reshape(4, -1), ord=2)
    assert mat < 0.95 * op
    assert op <= 3 * mat      # sqrt(kh * kw) * the matricized norm bounds it


@pytest.mark.parametrize("module,size,exc,match", [
    (nn.Linear(3, 4), (3,), TypeError, "nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d, got Linear"),
    (nn.Conv2d(3, 4, 3), (4, 8, 8), ValueError, "takes 3 input channels, but input_size"),
    (nn.Conv2d(3, 4, 3), (1, 3, 8, 8), ValueError, "without the batch dimension"),
    (nn.Conv2d(3, 4, 3), (3, 8.0, 8), TypeError, "must hold ints"),
    (nn.Conv2d(3, 4, 3), torch.tensor([3, 8, 8]), TypeError, "must be a tuple"),
    (nn.Conv2d(3, 4, 3), (3, 0, 8), ValueError, "must be positive"),
    (nn.Conv2d(3, 4, 5), (3, 4, 8), ValueError, "the kernel spans 5 along spatial dim 0 but the "
                                                "padded input is only 4"),
    (nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), (3, 2, 8), ValueError,
     "reflect padding 2 needs an input larger than 2"),
    (nn.Conv1d(3, 4, 5, padding=4, padding_mode="circular"), (3, 3), ValueError,
     "circular padding 4 needs an input of at least 4"),
    (nn.ConvTranspose1d(3, 4, 1, padding=1), (3, 1), ValueError, "its output would have size -1"),
])
def test_bad_input_is_refused(module, size, exc, match):
    with pytest.raises(exc, match=match):
        se.conv_operator_norm(module, size)


def test_bad_arguments_are_refused():
    m = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match="method must be one of"):
        se.conv_operator_norm(m, (2, 4, 4), method="svd")
    with pytest.raises(ValueError, match=r"v0 must be a tensor of the input size \(2, 4, 4\)"):
        se.conv_operator_norm(m, (2, 4, 4), v0=torch.randn(32))
    with pytest.raises(ValueError, match="n_iter must be >= 1"):
        se.conv_operator_norm(m, (2, 4, 4), n_iter=0)
    with pytest.raises(ValueError, match="tol must be None or a positive number"):
        se.conv_operator_norm(m, (2, 4, 4), tol=-1.0)
    with pytest.raises(ValueError, match="uninitialized .lazy. weight"):
        se.conv_operator_norm(nn.LazyConv2d(2, 3), (2, 4, 4))
