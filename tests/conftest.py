"""Shared fixtures and comparison helpers.

Inputs are fresh random numbers every run: the seed is drawn at start-up (or taken from
SPECTRAL_EXT_TEST_SEED), printed in pytest's header, and mixed with each test's id, so a failure
can be reproduced with the printed seed.  Tests never change global state without restoring it.
"""

import os
import random
import zlib

import pytest
import torch

# Without a GPU the Triton backend's kernels run in Triton's interpreter on CPU tensors.  The
# variable must be set before the @triton.jit kernels are defined, i.e. before spectral_ext is
# imported (test modules import it after this file); it is process-wide on purpose.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED = int(os.environ.get("SPECTRAL_EXT_TEST_SEED", random.SystemRandom().randrange(2**31)))
# the order in which the CUDA emulation runs the blocks of a launch (tests/cuda_emulation.py)
os.environ.setdefault("SPECTRAL_EXT_EMU_ORDER_SEED", str(SEED + 1))


def pytest_report_header(config):
    return f"spectral_ext test seed: {SEED} (set SPECTRAL_EXT_TEST_SEED={SEED} to reproduce)"


# reports a test wants printed at the end of the run (e.g. the Triton compile check's table)
REPORTS = []


def pytest_terminal_summary(terminalreporter):
    for report in REPORTS:
        terminalreporter.write_line(report)
    # also under -q, where the header is not shown
    terminalreporter.write_line(f"spectral_ext test seed: {SEED} "
                                f"(SPECTRAL_EXT_TEST_SEED={SEED} reproduces this run)")


@pytest.fixture(autouse=True)
def _seed_each_test(request):
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 when both are 0), in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_rel_close(out, ref, tol, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = max_rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def assert_lowp_close(out, ref_same_precision, oracle, what="", k=1):
    """flash-attention's rule for low precision: the error of `out` against an upcast (float64)
    oracle is at most twice the error of plain PyTorch at the same precision
    (`ref_same_precision`), plus a floor for the float32 accumulation both do.

    The floor: our kernels and plain PyTorch accumulate the k-term sums of W v and W^T u in
    float32, in different orders; rounding errors of such sums grow like sqrt(k) * eps32 of the
    result (the probabilistic bound, Higham & Mary 2019), so the floor is 8 * sqrt(k) * eps32 *
    max|oracle|, with k the longest reduction (max of rows and columns over the layers).  A
    float32 output (sigma, v) of low-precision weights carries only this error; the gradient,
    rounded to its low dtype, is judged by the 2x rule.  (A fixed 8 * eps32 floor, without
    sqrt(k), failed on a 5000 x 1 layer: 11 ulp of sigma, seed 2043754652.)"""
    oracle = oracle.detach().double()
    err = (out.detach().double() - oracle).abs().max().item()
    ref_err = (ref_same_precision.detach().double() - oracle).abs().max().item()
    floor = 8 * k ** 0.5 * torch.finfo(torch.float32).eps * oracle.abs().max().item()
    assert err <= 2 * ref_err + floor, (
        f"{what}: error {err:.3g} vs plain PyTorch's {ref_err:.3g} (floor {floor:.3g}, k={k})")


def lowp_k(w) -> int:
    """The longest float32 reduction of one layer's step (assert_lowp_close's k)."""
    return max(w.shape[0], w[0].numel())


def assert_lowp_layers(weights, sigma, per_layer):
    """assert_lowp_close of a step's outputs: ``sigma = (out, ref, oracle)`` with the longest
    reduction of all layers, and per layer each ``name: (outs, refs, oracles)`` with its own."""
    assert_lowp_close(*sigma, "sigma", max(lowp_k(w) for w in weights))
    for name, (outs, refs, oracles) in per_layer.items():
        for i, w in enumerate(weights):
            assert_lowp_close(outs[i], refs[i], oracles[i], f"{name}[{i}]", lowp_k(w))


def degenerate_layers(device):
    """A zero matrix, one with a NaN, one with an Inf and a finite one (in that order): the
    kernels' edge cases (sigma 0 or not finite: v kept)."""
    zero = torch.zeros(6, 5, device=device)
    nan = torch.randn(4, 7, device=device)
    nan[2, 3] = float("nan")
    inf = torch.randn(3, 7, device=device)
    inf[0, 0] = float("inf")
    return [zero, nan, inf, torch.randn(5, 3, device=device)]


def gap_matrix(m: int, n: int) -> torch.Tensor:
    """A float64 m x n matrix with singular values 3 and 1 ... 0.2: a large top gap, so a few
    power iterations converge."""
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), dtype=torch.float64))
    s = torch.linspace(1.0, 0.2, min(m, n), dtype=torch.float64)
    s[0] = 3.0
    return (U * s) @ V.T


def assert_replay_equals_eager(graph, sigma, outs, starts, eager_sigma, eager_outs):
    """Resets the step's outputs (vs and grads) to their values before the eager step, replays
    a CUDA graph of the same step, and checks that it gave the eager step's bits."""
    for t, s in zip(outs, starts):
        t.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(sigma, eager_sigma)
    for a, b in zip(outs, eager_outs):
        assert torch.equal(a, b)


def emulation_or_skip():
    """torch.ops.spectral_ext_emu, the CUDA kernels' CPU emulation (cuda_emulation.py, built on
    first use), or a skip saying why it cannot be built here."""
    import cuda_emulation
    reason = cuda_emulation.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cuda_emulation.load()


def warm_up_on_a_side_stream(fn, times: int = 1):
    """``fn()`` run ``times`` times on a side stream, ordered after and before the current
    stream: PyTorch's warm-up before a CUDA-graph capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def backend_or_skip(name: str, device: str):
    """(name, torch.device) of a backend a parametrized test runs on, or a skip saying why it
    cannot run here; "cuda-emulated" is the CUDA kernels' CPU emulation (cuda_emulation.py)."""
    if name == "cuda-emulated":
        emulation_or_skip()
        return name, torch.device(device)
    import spectral_ext as se
    info = se.available_backends()[name]
    if not info.available:
        pytest.skip(f"backend {name!r} unavailable here: {info.detail}")
    return name, torch.device(device)
