"""The CUDA backend's own properties (its numerics against the reference, for every shape and
dtype, are in test_backends.py, for "cuda" on a GPU and "cuda-emulated" everywhere).

Here, without a GPU: the build compiled the kernels, the backend says why it cannot run, the
architecture check, and through the CPU emulation of the same source (cuda_emulation.py): the
launch count, the cached layer table and bad input.  On a GPU: launches counted by
torch.profiler, CUDA-graph capture and replay, opcheck, poisoned outputs, streams, a second
device (torch.compile of a training step with backend "cuda": test_ops.py).
"""

import os
import re

import pytest
import torch

import spectral_ext as se
from spectral_ext import functional, reference

from conftest import (assert_lowp_layers, assert_rel_close, assert_replay_equals_eager,
                      emulation_or_skip, warm_up_on_a_side_stream)

GPU = se.available_backends()["cuda"].available
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and the CUDA kernels: "
                               + se.available_backends()["cuda"].detail)


def _emu():
    return emulation_or_skip()


def _inputs(shapes, dtype=torch.float32, device="cpu"):
    ws = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return ws, se.init_vectors(ws), [torch.randn_like(w) for w in ws]


# ---- the build and backend selection (any machine) ----------------------------------------------

def test_cuda_kernels_are_compiled_where_nvcc_is():
    """setup.py compiles csrc/cuda/ whenever nvcc is found (SPECTRAL_EXT_CUDA=auto): CI, which has
    nvcc and no GPU, must really build them."""
    from spectral_ext import _C, _build_config
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        pytest.skip(f"no nvcc under {home}: the CUDA kernels are not built here")
    if os.environ.get("SPECTRAL_EXT_CUDA", "auto") == "0":
        pytest.skip("SPECTRAL_EXT_CUDA=0: CUDA build disabled on purpose")
    assert _build_config.CUDA and _C.cuda_compiled()
    expected = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0+PTX"
    assert _build_config.CUDA_ARCHS == expected
    assert _C.cuda_archs() == expected.replace(";", "/").replace(" ", "/")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("spectral_ext::fused_step", "CUDA")
    runtime, _, devices = _C.cuda_runtime()      # the module's static runtime answers, GPU or not
    assert runtime >= 12000 and devices == torch.cuda.device_count()


def test_backend_says_why_it_cannot_run():
    info = se.available_backends()["cuda"]
    if GPU:
        assert "CUDA kernels" in info.detail
        return
    assert not info.available
    assert "no CUDA GPU" in info.detail or "without its CUDA kernels" in info.detail
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        se.fused_step([torch.randn(3, 4)], [torch.randn(4)], backend="cuda")
    assert se.resolve_backend([torch.randn(2, 2)]) == "cpu"     # CPU tensors: never cuda


@pytest.mark.parametrize("runtime, driver, devices, fragment", [
    (13000, 12080, 1, "needs a driver for CUDA 13.0 or newer (R580+); this driver supports CUDA 12.8"),
    (13000, 0, 0, "this driver was not found"),
    (13000, 13000, 0, "sees no GPU")])
def test_old_driver_makes_the_cuda_backend_unavailable(monkeypatch, runtime, driver, devices,
                                                        fragment):
    """Item 7: the kernels' static CUDA 13 runtime needs an R580+ driver; with an older one the
    backend says so (and auto falls back to triton) instead of failing at the first launch."""
    from spectral_ext import _C
    if not _C.cuda_compiled():
        pytest.skip("the CUDA kernels are not built here")
    monkeypatch.setattr(_C, "cuda_runtime", lambda: (runtime, driver, devices))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    functional._cuda_driver_error.cache_clear()
    try:
        info = se.available_backends()["cuda"]
        assert not info.available and fragment in info.detail, info
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*" + re.escape(fragment)):
            se.fused_step([torch.randn(3, 4)], [torch.randn(4)], backend="cuda")
    finally:
        functional._cuda_driver_error.cache_clear()


@needs_gpu
def test_cuda_backend_rejects_cpu_tensors_and_auto_picks_it():
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        se.fused_step([torch.randn(3, 4)], [torch.randn(4)], backend="cuda")
    w = [torch.randn(3, 4, device="cuda", dtype=dt) for dt in (torch.float32, torch.float64)]
    assert se.resolve_backend(w) == "cuda"      # float64 too (triton would not take it)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).cuda()
    assert se.SpectralNormRegularizer(model).active_backend == "cuda"


@pytest.mark.parametrize("archs, cap, ok", [
    ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 6), True), ("8.0;9.0+PTX", (8, 9), True),
    ("8.0;9.0+PTX", (9, 0), True), ("8.0;9.0+PTX", (10, 0), True), ("8.0;9.0+PTX", (12, 0), True),
    ("8.0;9.0+PTX", (7, 5), False), ("8.0;9.0", (10, 0), False), ("8.6", (8, 0), False),
    ("9.0a", (9, 0), True), ("9.0a+PTX", (10, 0), False), ("7.5+PTX", (8, 0), True)])
def test_architecture_check(monkeypatch, archs, cap, ok):
    monkeypatch.setattr(functional._ops, "CUDA_ARCHS", archs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a test GPU")
    err = functional._cuda_arch_error.__wrapped__(0)
    assert (err is None) == ok, err
    if not ok:
        assert archs in err and f"{cap[0]}.{cap[1]}" in err


# ---- the CUDA code path in the CPU emulation (any machine with the CUDA headers) -----------------

@pytest.mark.parametrize("n_layers", [1, 7, 100])     # (the emulation runs a block in ~4 ms)
@pytest.mark.parametrize("n_iter", [1, 2])
def test_launches_do_not_grow_with_layers(n_layers, n_iter):
    """2 * n_iter + 1 launches per weight dtype: 3 per step for n_iter = 1, whatever the number
    of layers (counted by the emulation's launcher; on a GPU by torch.profiler, below)."""
    ops = _emu()
    shapes = [(3 + i % 5, 4 + i % 7) for i in range(n_layers)]
    ws, vs, gs = _inputs(shapes)
    before = ops.launches()
    ops.fused_step(ws, vs, gs, 0.1, n_iter)
    assert ops.launches() - before == 2 * n_iter + 1
    w16, v16, g16 = _inputs(shapes[:2], torch.bfloat16)
    before = ops.launches()
    ops.fused_step(ws + w16, vs + v16, gs + g16, 0.1, n_iter)
    assert ops.launches() - before == 2 * (2 * n_iter + 1)      # two dtype groups


def test_layer_table_is_cached_while_tensors_stay():
    ops = _emu()
    ws, vs, gs = _inputs([(5, 7), (3, 2, 2)])
    ops.clear_plans()
    ops.fused_step(ws, vs, gs, 0.1, 1)
    ops.fused_step(ws, vs, gs, 0.1, 1)
    assert ops.cached_plans() == 1
    ops.fused_step([w.clone() for w in ws], vs, gs, 0.1, 1)   # new pointers: a new table
    assert ops.cached_plans() == 2
    ops.fused_step(ws, vs, [gs[0].t().contiguous().t(), gs[1]], 0.1, 1)   # new strides
    assert ops.cached_plans() == 3


def test_copied_operands_are_not_cached_and_refuse_capture():
    """A weight or gradient that cannot be viewed as rows x cols (a permuted conv weight) is
    copied on every call: its table is built for that call only (it used to be cached under a
    key that never repeats, evicting the tables that do), and capturing such a step says why it
    cannot work (it used to say "run one step before capturing", which could not help)."""
    ops = _emu()
    ops.clear_plans()
    ws, vs, gs = _inputs([(5, 7), (4, 3, 2, 2)])
    ws[1] = torch.randn(4, 2, 2, 3).permute(0, 3, 1, 2)
    ref_v, ref_g = [v.clone() for v in vs], [g.clone() for g in gs]
    for _ in range(3):
        ops.fused_step(ws, vs, gs, 0.1, 1)
        reference.fused_step(ws, ref_v, grads=ref_g, lam=0.1)
    assert ops.cached_plans() == 0
    for a, b in zip(vs + gs, ref_v + ref_g):
        assert_rel_close(a, b, 1e-5, "copied weight")
    ops.capture(True)
    try:
        with pytest.raises(RuntimeError, match=r"weights\[1\] or its gradient cannot be viewed "
                           r"as a rows x cols matrix .* which a CUDA graph cannot capture"):
            ops.fused_step(ws, vs, gs, 0.1, 1)
    finally:
        ops.capture(False)
    ops.destroy_graphs()


def test_repeated_calls_are_bitwise_deterministic():
    """Every sum is taken in a fixed order, so the same inputs give the same bits."""
    ops = _emu()
    ws, vs, gs = _inputs([(300, 1100), (2100, 3), (1, 5000)])
    out = []
    for _ in range(2):
        v, g = [x.clone() for x in vs], [x.clone() for x in gs]
        out.append((ops.fused_step(ws, v, g, 0.1, 2), v, g))
    for a, b in zip([out[0][0], *out[0][1], *out[0][2]], [out[1][0], *out[1][1], *out[1][2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["short_v", "bad_dtype", "grad_shape", "n_iter_zero",
                                  "duplicate_v", "n_iter_huge"])
def test_bad_input_changes_nothing(case):
    """The binding checks everything (csrc/spectral_ext.h) before it launches or copies."""
    ops = _emu()
    ws, vs, gs = _inputs([(5, 7), (4, 3)])
    n_iter, exc, msg = 1, ValueError, None
    if case == "short_v":
        vs[1] = torch.randn(2)
        msg = "vs[1] has shape (2,)"
    elif case == "bad_dtype":
        ws[1] = ws[1].to(torch.int32)
        exc, msg = TypeError, "weights[1] has dtype torch.int32"
    elif case == "grad_shape":
        gs[1] = torch.randn(3, 4)
        msg = "grads[1] has shape (3, 4)"
    elif case == "n_iter_zero":
        n_iter, msg = 0, "n_iter must be >= 1"
    elif case == "duplicate_v":
        vs[1] = vs[0]
        ws[1] = torch.randn(4, 7)
        gs[1] = torch.randn(4, 7)
        msg = "vs[1] is the same tensor as vs[0]"
    elif case == "n_iter_huge":
        n_iter, msg = 10**7, "n_iter must be <= 1000000"
    snapshot = [t.clone() for t in ws + vs + gs]
    with pytest.raises(exc, match=re.escape(msg)):
        ops.fused_step(ws, vs, gs, 0.1, n_iter)
    for a, b in zip(ws + vs + gs, snapshot):
        assert torch.equal(a, b)


@pytest.fixture
def persistent_mode():
    """The emulation's kernels in one launch per step (LaunchMode::kPersistent) for one test."""
    ops = _emu()
    ops.launch_mode("persistent")
    try:
        yield ops
    finally:
        ops.launch_mode("phases")


@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_one_launch_per_step_equals_the_phases_bitwise(persistent_mode, n_iter, dtype):
    """LaunchMode::kPersistent (step_kernel: the tiles of every pass taken in ticket order, each
    after its layer's previous pass) gives the bits of the kernel-per-pass launches, in one
    launch, for fused_step and spectral_norms.  Block-order seed 0 runs the tickets in counter
    order; a nonzero seed runs them in a random order among those whose wait is satisfied (the
    emulation's stand-in for blocks running at once: any tile interleaving across passes and
    layers the waits allow), so a dependency the waits miss changes the bits (seen failing with
    the column pass's or the row pass's wait weakened).  Memory ordering needs a GPU."""
    ops = persistent_mode
    shapes = [(300, 130), (37, 129), (1, 300), (300, 1), (16, 3, 3, 3), (2100, 3), (12, 2001)]
    ws, vs0, gs0 = _inputs(shapes, dtype)
    out = {}
    for mode in ("phases", "persistent"):
        ops.launch_mode(mode)
        for seed in (0, 7, 8):
            ops.block_order(seed)
            vs, gs = [v.clone() for v in vs0], [g.clone() for g in gs0]
            before = ops.launches()
            sigma = ops.fused_step(ws, vs, gs, 0.3, n_iter)
            launches = ops.launches() - before
            norms = ops.spectral_norms(ws, [v.clone() for v in vs0], n_iter)
            out[mode, seed] = [sigma, *vs, *gs, norms[0], *norms[1], *norms[2]]
        assert launches == (1 if mode == "persistent" else 2 * n_iter + 1)
    ops.block_order(int(os.environ["SPECTRAL_EXT_EMU_ORDER_SEED"]))
    first = out["phases", 0]
    for key, got in out.items():
        assert all(torch.equal(a, b) for a, b in zip(first, got)), key
    # and against the reference, as every step of the phases is (test_backends.py)
    sig_ref, v_ref, g_ref = _ref_step(ws, vs0, gs0, 0.3, n_iter)
    if dtype == torch.float32:
        assert_rel_close(out["persistent", 7][0], sig_ref, 2e-5)


def test_launch_mode_is_checked_and_reported():
    ops = _emu()
    with pytest.raises(ValueError, match="'phases' or 'persistent', got 'fast'"):
        ops.launch_mode("fast")
    assert se.cuda_launch_mode() == "phases"
    with pytest.raises(ValueError, match="one of"):
        se.set_cuda_launch_mode("fast")
    if functional._ops.CUDA_KERNELS_ERROR is None:
        se.set_cuda_launch_mode("persistent")
        try:
            assert se.cuda_launch_mode() == "persistent"
        finally:
            se.set_cuda_launch_mode("phases")
        assert se.cuda_launch_mode() == "phases"


def _ref_step(ws, vs, gs, lam, n_iter):
    v, g = [x.clone() for x in vs], [x.clone() for x in gs]
    return reference.fused_step(ws, v, lam=lam, n_iter=n_iter, grads=g), v, g


def _step_in_block_orders(ops, ws, vs, gs, lam, seeds):
    """One emulated step (n_iter 2) from the same inputs per block-order seed; asserts that
    every seed ran a different order and that all gave the same bits; returns the first
    (sigma, vs, grads).  The test seed's order is restored."""
    out, hashes = [], set()
    try:
        for seed in seeds:
            ops.block_order(seed)
            v, g = [x.clone() for x in vs], [x.clone() for x in gs]
            out.append((ops.fused_step(ws, v, g, lam, 2), v, g))
            hashes.add(ops.last_order_hash())
    finally:
        ops.block_order(int(os.environ["SPECTRAL_EXT_EMU_ORDER_SEED"]))
    assert len(hashes) == len(seeds)      # different orders of the same grid (seed 0: in order)
    for a in out[1:]:
        for x, y in zip([out[0][0], *out[0][1], *out[0][2]], [a[0], *a[1], *a[2]]):
            assert torch.equal(x, y)
    return out[0]


def test_blocks_run_in_a_seeded_random_order():
    """The emulation runs the blocks of a launch in a random order (SPECTRAL_EXT_EMU_ORDER_SEED,
    from the test seed): results, whose sums all have a fixed order, are bitwise the same for
    every order."""
    ops = _emu()
    ws, vs, gs = _inputs([(300, 1100), (2100, 3), (1, 5000)])
    _step_in_block_orders(ops, ws, vs, gs, 0.1, (0, 1, 2, 12345))


# Deep "last block" sums (fused_step.cu, sum_partials): a column strip's last tile sums n_rb
# partials per column, a row block's last tile n_cb partials per row.  float32: 4000 x 512 has
# 125 row blocks of 32 rows (8 row-block slices of the block's threads, four accumulators each,
# and a remainder), 2000 x 130 has 16 (unvectorized, two strips), 9000 x 1 nine (a single column:
# every thread along the row blocks), 12 x 20001 has 157 strips of 12 rows, 3 x 40000 79 strips of
# 3 rows; in bfloat16 4000 x 512 has 63 row blocks of 64 rows, in float64 125 of 32 rows x 256.
DEEP = [(4000, 512), (2000, 130), (9000, 1), (12, 20001), (3, 40000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_deep_last_block_sums_match_reference_in_every_block_order(dtype):
    """The last tile of a strip / row block sums the other tiles' partials with all its threads,
    in an order fixed by the layer's shape: the results match the reference and are bitwise the
    same for every emulated block order (so whichever block arrives last)."""
    ops = _emu()
    ws = [torch.randn(s).to(dtype) for s in DEEP]
    ws.append(torch.randn(1 + 700 * 260).to(dtype)[1:].view(700, 260))  # not 16-byte aligned
    ws.append(torch.randn(300, 8, 3, 3).to(dtype))                      # conv, 300 x 72
    vs = se.init_vectors(ws, seed=3)
    gs = [torch.randn_like(w) for w in ws]
    s, v, g = _step_in_block_orders(ops, ws, vs, gs, 0.37, (0, 7, 12345))
    s_ref, v_ref, g_ref = _ref_step(ws, vs, gs, 0.37, 2)
    if dtype != torch.bfloat16:
        tol = 2e-5 if dtype == torch.float32 else 1e-12
        assert_rel_close(s, s_ref, tol, "sigma")
        for i in range(len(ws)):
            assert_rel_close(v[i], v_ref[i], tol, f"v[{i}]")
            assert_rel_close(g[i], g_ref[i], tol, f"grad[{i}]")
        return
    s64, v64, g64 = _ref_step([w.double() for w in ws], [x.double() for x in vs],
                              [x.double() for x in gs], 0.37, 2)
    assert_lowp_layers(ws, (s, s_ref, s64), {"v": (v, v_ref, v64), "grad": (g, g_ref, g64)})


def test_a_step_that_failed_half_way_leaves_no_stale_counter():
    """Item 5: the "last block" counters are per call and zeroed at the start of every step (they
    were in the cached table, zeroed once at upload: a step that died half-way, or two streams
    on one table, left counts that made the wrong block "last" on every later step)."""
    ops = _emu()
    ws, vs, gs = _inputs([(300, 1100), (2100, 3), (64, 64)])
    ops.fused_step(ws, [v.clone() for v in vs], [g.clone() for g in gs], 0.1, 1)  # table cached
    ops.fail_after(5)
    with pytest.raises(RuntimeError, match="launch failed"):
        ops.fused_step(ws, [v.clone() for v in vs], [g.clone() for g in gs], 0.1, 1)
    s_ref, v_ref, g_ref = _ref_step(ws, vs, gs, 0.1, 2)
    s = ops.fused_step(ws, vs, gs, 0.1, 2)
    assert_rel_close(s, s_ref, 2e-5, "sigma after a failed step")
    for a, b in zip(vs + gs, v_ref + g_ref):
        assert_rel_close(a, b, 2e-5, "v / grad after a failed step")


def test_tables_of_captured_graphs_are_pinned():
    """Item 1: a table used while a graph is captured stays cached (not evicted, not cleared)
    until the graph is destroyed, since a replay uses its pointers; others go least recently
    used first.  (Capture is emulated: the emulation's capture hook makes the binding see a
    capturing stream, and its "graphs" own the pins until destroy_graphs; on a GPU a CUDA user
    object owned by the graph does this: test_cuda_graph_survives_table_eviction below.)"""
    ops = _emu()
    ops.clear_plans()
    ws, vs, gs = _inputs([(5, 7), (3, 2, 2)])
    ops.fused_step(ws, vs, gs, 0.1, 1)                      # warm-up: uploads the table
    ops.capture(True)
    try:
        ops.fused_step(ws, vs, gs, 0.1, 1)                  # "captured": pins the table
    finally:
        ops.capture(False)
    assert ops.pinned_plans() == 1
    ops.clear_plans()
    for _ in range(20):                                      # 20 other tables: evictions
        ops.fused_step([w.clone() for w in ws], vs, gs, 0.1, 1)
    ops.capture(True)
    try:   # a second capture with the same tensors still finds the table (no upload needed)
        ops.fused_step(ws, vs, gs, 0.1, 1)
    finally:
        ops.capture(False)
    assert ops.destroy_graphs() == 2
    assert ops.pinned_plans() == 0
    ops.clear_plans()
    assert ops.cached_plans() == 0


def test_tables_are_evicted_least_recently_used():
    ops = _emu()
    ops.clear_plans()
    ws, vs, gs = _inputs([(5, 7)])
    ops.fused_step(ws, vs, gs, 0.1, 1)
    others = [[w.clone() for w in ws] for _ in range(15)]
    for o in others:
        ops.fused_step(o, vs, gs, 0.1, 1)
    ops.fused_step(ws, vs, gs, 0.1, 1)                      # the oldest table, used again
    ops.fused_step([w.clone() for w in ws], vs, gs, 0.1, 1)   # a 17th table: evicts others[0]
    assert ops.cached_plans() == 16
    ops.capture(True)
    try:   # under capture a missing table raises: ws's table must still be there
        ops.fused_step(ws, vs, gs, 0.1, 1)
        with pytest.raises(RuntimeError, match="before capturing"):
            ops.fused_step(others[0], vs, gs, 0.1, 1)
    finally:
        ops.capture(False)
    ops.destroy_graphs()
    ops.clear_plans()


def test_tensors_on_another_device_than_the_current_one():
    """Item 4: the binding makes the tensors' device current in its own CUDA runtime before it
    creates the table's event, memsets or launches, and restores the previous device (the event
    was created on the current device, then used on the other one's stream: "invalid resource
    handle" on the first call).  The emulation fails a runtime call made with another device
    current, as a GPU does."""
    ops = _emu()
    ws, vs, gs = _inputs([(37, 129), (5, 3, 3, 3)])
    s_ref, v_ref, g_ref = _ref_step(ws, vs, gs, 0.1, 2)
    assert ops.runtime_device() == 0
    ops.clear_plans()
    try:
        ops.tensor_device(1)
        s = ops.fused_step(ws, vs, gs, 0.1, 2)
        assert ops.runtime_device() == 0                    # restored
    finally:
        ops.tensor_device(0)
    assert_rel_close(s, s_ref, 2e-5, "sigma on device 1")
    for a, b in zip(vs + gs, v_ref + g_ref):
        assert_rel_close(a, b, 2e-5, "v / grad on device 1")
    ops.fused_step(ws, vs, gs, 0.1, 1)                      # and device 0 again


def _sanitize_module():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "sanitize_cuda.py")
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("corrupt", [None, "v", "grad", "order"])
def test_sanitize_workload_checks_every_output(corrupt):
    """Item 6: benchmarks/sanitize_cuda.py (run under compute-sanitizer on a GPU) checks sigma,
    every v and every gradient, tightly, and --repeat checks bitwise repeatability; here through
    the emulation, on smaller shapes, and with a step that corrupts one output (the workload
    checked sigma only, with 2e-2 in low precision, before)."""
    ops = _emu()
    sz = _sanitize_module()
    calls = []

    def step(ws, vs, gs, lam, n_iter):
        s = ops.fused_step(ws, vs, gs, lam, n_iter)
        calls.append(1)
        if corrupt == "v":
            vs[3].mul_(1 + 1e-3)
        elif corrupt == "grad" and gs[-1].dtype == torch.bfloat16:
            gs[-1].view(-1)[0] += gs[-1].abs().max() * 0.05
        elif corrupt == "grad":
            gs[-1].view(-1)[0] += gs[-1].abs().max() * 1e-4
        elif corrupt == "order" and len(calls) == 3:
            vs[0].view(-1)[0] = torch.nextafter(vs[0].view(-1)[0], torch.tensor(2.0))
        return s
    if corrupt == "order":
        problems = sz.check_repeatable(step, "cpu", 3, shapes=[(300, 130), (2100, 3), (1, 1100)])
    else:
        problems = sz.check_workload(step, "cpu", shapes=sz.SMALL_SHAPES)
    if corrupt is None:
        assert problems == []
    else:
        assert problems, "the corrupted output was not noticed"
        assert (corrupt == "order") == ("differs" in problems[0]), problems[0]


# ---- on a GPU ------------------------------------------------------------------------------------

@needs_gpu
def test_opcheck_on_cuda_tensors():
    """Schema (declared mutations), fake kernel and dispatch of the op with its CUDA kernel."""
    ws, vs, gs = _inputs([(37, 129), (8, 3, 3, 3), (1, 20), (20, 1)], device="cuda")
    torch.library.opcheck(torch.ops.spectral_ext.fused_step, (ws, vs, gs, 0.25, 2))


def _count_kernels(fn):
    """CUDA kernel launches made by fn(), from torch.profiler's device activity."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if "Memcpy" not in n and "Memset" not in n]


@needs_gpu
@pytest.mark.parametrize("n_layers", [1, 40, 512])
def test_profiler_launches_per_step(n_layers):
    ws, vs, gs = _inputs([(64, 64)] * n_layers, device="cuda")
    se.fused_step(ws, vs, grads=gs, backend="cuda")       # uploads the table once
    kernels = _count_kernels(lambda: se.fused_step(ws, vs, grads=gs, backend="cuda"))
    assert len(kernels) == 3, kernels
    assert all(re.search("rows_kernel|cols_kernel|grad_kernel", k) for k in kernels), kernels


@needs_gpu
@pytest.mark.parametrize("n_layers", [1, 40, 512])
def test_profiler_one_launch_per_step(n_layers):
    """set_cuda_launch_mode("persistent"): one kernel per step (step_kernel), the phases' bits."""
    ws, vs, gs = _inputs([(64, 64)] * n_layers, device="cuda")
    vs2, gs2 = [v.clone() for v in vs], [g.clone() for g in gs]
    s1 = se.fused_step(ws, vs, grads=gs, backend="cuda", n_iter=2)
    se.set_cuda_launch_mode("persistent")
    try:
        s2 = se.fused_step(ws, vs2, grads=gs2, backend="cuda", n_iter=2)
        kernels = _count_kernels(lambda: se.fused_step(ws, vs, grads=gs, backend="cuda"))
    finally:
        se.set_cuda_launch_mode("phases")
    assert len(kernels) == 1 and "step_kernel" in kernels[0], kernels
    assert torch.equal(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(vs + gs, vs2 + gs2))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_one_launch_per_step_on_the_gpu_is_the_phases_bitwise(dtype):
    """On a GPU the blocks of step_kernel really run at once and wait on each other: 20 steps
    from the same inputs, every one bitwise the kernel-per-pass step (a tile that read another
    layer's pass too early, or a stale value, would differ), fused_step and spectral_norms."""
    ws, vs0, gs0 = _inputs([(300, 1100), (2100, 3), (1, 5000), (5000, 1), (33, 64, 3, 3),
                            (64, 64), (4000, 512)], dtype, device="cuda")

    def run():
        vs, gs = [v.clone() for v in vs0], [g.clone() for g in gs0]
        sigma = se.fused_step(ws, vs, grads=gs, lam=0.3, n_iter=2, backend="cuda")
        norms = se.spectral_norms_with_vectors(ws, [v.clone() for v in vs0], 2, backend="cuda")
        return [sigma, *vs, *gs, norms[0], *norms[1], *norms[2]]
    want = run()
    se.set_cuda_launch_mode("persistent")
    try:
        for _ in range(20):
            got = run()
            assert all(torch.equal(a, b) for a, b in zip(want, got))
    finally:
        se.set_cuda_launch_mode("phases")


@needs_gpu
def test_cuda_graph_replay_equals_eager():
    ws, vs, gs = _inputs([(300, 1100), (64, 64), (1, 5000), (5000, 1), (33, 64, 3, 3)],
                         device="cuda")
    ws += [torch.randn(40, 1104, device="cuda").bfloat16()]
    vs += se.init_vectors(ws[-1:])
    gs += [torch.randn_like(ws[-1])]
    v0, g0 = [v.clone() for v in vs], [g.clone() for g in gs]
    eager_v, eager_g = [v.clone() for v in vs], [g.clone() for g in gs]
    eager_s = se.fused_step(ws, eager_v, grads=eager_g, n_iter=2, backend="cuda")

    # warm-up: uploads the layer table
    warm_up_on_a_side_stream(lambda: se.fused_step(ws, vs, grads=gs, n_iter=2, backend="cuda"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sigma = se.fused_step(ws, vs, grads=gs, n_iter=2, backend="cuda")
    assert_replay_equals_eager(graph, sigma, vs + gs, v0 + g0, eager_s, eager_v + eager_g)


@needs_gpu
def test_cuda_graph_survives_table_eviction():
    """Item 1 on a GPU: a captured graph replays correctly after clear_plans() and 20 other
    tables (evictions) and after the freed memory was reused: the table it uses is pinned by a
    CUDA user object the graph owns, and released when the graph is destroyed."""
    from spectral_ext import _C
    import gc
    ws, vs, gs = _inputs([(300, 1100), (64, 64), (1, 5000), (33, 64, 3, 3)], device="cuda")
    v0, g0 = [v.clone() for v in vs], [g.clone() for g in gs]
    eager_v, eager_g = [v.clone() for v in vs], [g.clone() for g in gs]
    eager_s = se.fused_step(ws, eager_v, grads=eager_g, n_iter=2, backend="cuda")
    warm_up_on_a_side_stream(lambda: se.fused_step(ws, vs, grads=gs, n_iter=2, backend="cuda"))
    _C.cuda_clear_plans()    # the warm-up's table, unpinned so far: re-uploaded by the next step
    se.fused_step(ws, [v.clone() for v in vs], grads=[g.clone() for g in gs], n_iter=2,
                  backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sigma = se.fused_step(ws, vs, grads=gs, n_iter=2, backend="cuda")
    assert _C.cuda_pinned_plans() >= 1
    _C.cuda_clear_plans()
    for _ in range(20):
        o = _inputs([(64, 64)], device="cuda")
        se.fused_step(o[0], o[1], grads=o[2], backend="cuda")
    poison = torch.full((1 << 22,), float("nan"), device="cuda")
    del poison
    assert_replay_equals_eager(graph, sigma, vs + gs, v0 + g0, eager_s, eager_v + eager_g)
    del graph
    gc.collect()
    torch.cuda.synchronize()
    # the user object's release runs on a CUDA thread, asynchronously: wait a little for it
    import time
    for _ in range(100):
        if _C.cuda_pinned_plans() == 0:
            break
        time.sleep(0.01)
    assert _C.cuda_pinned_plans() == 0


@needs_gpu
def test_many_tile_step_is_bitwise_repeatable():
    """Item 6: the "last block" steps order the blocks' partial sums across the whole grid, which
    racecheck cannot see; a many-tile step repeated 300 times gives the same bits every time."""
    sz = _sanitize_module()
    assert sz.check_repeatable(sz.cuda_step, "cuda", 300) == []


@needs_gpu
def test_capture_without_warm_up_says_so():
    from spectral_ext import _C
    ws, vs, gs = _inputs([(7, 9)], device="cuda")
    _C.cuda_clear_plans()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(graph):
            se.fused_step(ws, vs, grads=gs, backend="cuda")


@needs_gpu
def test_poisoned_memory_and_streams():
    """Outputs come from a caching allocator full of NaN; the first step runs on a side stream,
    the next one on the current stream with the table the first one uploaded."""
    poison = torch.full((1 << 24,), float("nan"), device="cuda")
    del poison
    ws, vs, gs = _inputs([(512, 768), (3, 5), (4096, 64)], device="cuda")
    v_ref, g_ref = [v.clone() for v in vs], [g.clone() for g in gs]
    s_ref = reference.fused_step(ws, v_ref, lam=0.3, n_iter=2, grads=g_ref)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s = se.fused_step(ws, vs, lam=0.3, n_iter=2, grads=gs, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert_rel_close(s, s_ref, 2e-5, "sigma")
    for a, b in zip(vs + gs, v_ref + g_ref):
        assert_rel_close(a, b, 2e-5, "v / grad")
    # the table was uploaded on `side`; a step on the current stream orders itself after it
    s = se.fused_step(ws, vs, lam=0.3, grads=gs, backend="cuda")
    s_ref = reference.fused_step(ws, v_ref, lam=0.3, grads=g_ref)
    assert_rel_close(s, s_ref, 2e-5, "sigma, second stream")
    for a, b in zip(vs + gs, v_ref + g_ref):
        assert_rel_close(a, b, 2e-5, "v / grad, second stream")


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    """Item 4: tensors on a GPU that is not the current one (the first call failed with "invalid
    resource handle"); the current device is unchanged after the call, and device 0 works
    again after device 1 (the kernels' runtime device was never restored)."""
    from spectral_ext import _C
    _C.cuda_clear_plans()
    assert torch.cuda.current_device() == 0
    ws, vs, gs = _inputs([(37, 129), (5, 3, 3, 3)], device="cuda:1")
    v_ref, g_ref = [v.clone() for v in vs], [g.clone() for g in gs]
    s = se.fused_step(ws, vs, grads=gs, backend="cuda")
    s_ref = reference.fused_step(ws, v_ref, grads=g_ref)
    assert torch.cuda.current_device() == 0
    assert s.device == torch.device("cuda:1")
    assert_rel_close(s, s_ref, 2e-5, "sigma on cuda:1")
    w0, v0, g0 = _inputs([(7, 9)], device="cuda:0")
    s0 = se.fused_step(w0, v0, grads=g0, backend="cuda")
    assert_rel_close(s0, reference.fused_step(w0, se.init_vectors(w0), grads=[torch.zeros_like(w0[0])]),
                     2e-5, "sigma on cuda:0 after cuda:1")
