"""The Triton backend's own properties (its numerics against the reference are in
test_backends.py): the op, one launch per phase whatever the number of layers, the cached layer
table.  Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py)."""

import collections

import pytest
import torch

import spectral_ext as se
from spectral_ext import reference

from conftest import assert_rel_close, assert_replay_equals_eager, warm_up_on_a_side_stream

if not se.available_backends()["triton"].available:
    pytest.skip(f"the triton backend cannot run here: {se.available_backends()['triton'].detail}",
                allow_module_level=True)

from spectral_ext import triton_kernels as tk  # noqa: E402  (after the availability check)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(shapes, dtype=torch.float32):
    ws = [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]
    return ws, se.init_vectors(ws), [torch.randn_like(w) for w in ws]


def _spy_launches(monkeypatch):
    """[(kernel name, launch kwargs)] of every launch of the Triton backend from now on."""
    launches = []
    for name in ("_rows_kernel", "_cols_kernel", "_cols_reduce_kernel", "_finalize_kernel"):
        kernel = getattr(tk, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    launches.append((name, kwargs))
                    return launch(*args, **kwargs)
                return run
        monkeypatch.setattr(tk, name, Spy())
    return launches


def test_opcheck_fused_step_triton():
    ws, vs, gs = _inputs([(37, 129), (8, 3, 3, 3), (1, 20), (20, 1)])
    torch.library.opcheck(torch.ops.spectral_ext.fused_step_triton, (ws, vs, gs, 0.25, 2))


@pytest.mark.parametrize("n_layers", [1, 7, 40])
@pytest.mark.parametrize("n_iter", [1, 2])
def test_launches_do_not_grow_with_layers(monkeypatch, n_layers, n_iter):
    """3 launches per iteration and weight dtype, for 1 or 40 layers (none taller than a chunk:
    see test_tall_layers_split_their_column_phase)."""
    launches = _spy_launches(monkeypatch)
    shapes = [(3 + i % 5, 4 + i % 7) for i in range(n_layers)]
    ws, vs, gs = _inputs(shapes)
    ws16, vs16, gs16 = _inputs(shapes[:2], torch.bfloat16)
    se.fused_step(ws + ws16, vs + vs16, grads=gs + gs16, n_iter=n_iter, backend="triton")
    assert len(launches) == 3 * n_iter * 2      # two dtype groups


@pytest.mark.parametrize("spectral_norms", [False, True])
def test_tall_layers_split_their_column_phase(monkeypatch, spectral_norms):
    """A layer of more than row_chunk() rows has its column phase split over chunks of rows
    (_cols_kernel writes partial v', _cols_reduce_kernel sums them in chunk order): one more
    launch per iteration, results against the reference (test_backends.py's tolerance for
    float32), and bitwise the same on a second call (the fixed order)."""
    chunk = tk.row_chunk()
    launches = _spy_launches(monkeypatch)
    shapes = [(chunk * 3 + 5, 70), (chunk, 40), (17, 9), (2 * chunk + 1, 1)]
    ws = [torch.randn(s, device=DEVICE) for s in shapes]
    vs0 = se.init_vectors(ws)
    gs0 = [torch.randn_like(w) for w in ws]
    outs = []
    for _ in range(2):
        vs = [v.clone() for v in vs0]
        gs = [g.clone() for g in gs0]
        if spectral_norms:
            sigma = se.spectral_norms(ws, vs, 2, backend="triton")
        else:
            sigma = se.fused_step(ws, vs, grads=gs, lam=0.3, n_iter=2, backend="triton")
        outs.append((sigma, vs, gs))
    counts = collections.Counter(name for name, _ in launches)
    assert counts["_cols_reduce_kernel"] == 2 * 2       # two iterations, two calls
    assert counts["_cols_kernel"] == counts["_rows_kernel"] == 4
    (s1, v1, g1), (s2, v2, g2) = outs
    assert torch.equal(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(v1 + g1, v2 + g2))
    ref_vs = [v.clone() for v in vs0]
    ref_gs = [g.clone() for g in gs0]
    if spectral_norms:
        ref, _, ref_vs = reference.spectral_norms(ws, ref_vs, 2)
    else:
        ref = reference.fused_step(ws, ref_vs, lam=0.3, n_iter=2, grads=ref_gs)
    assert_rel_close(s1, ref, 2e-5, "sigma")
    for i, (v, rv) in enumerate(zip(v1, ref_vs)):
        assert_rel_close(v, rv, 2e-5, f"v {i}")
    if not spectral_norms:
        for i, (g, rg) in enumerate(zip(g1, ref_gs)):
            assert_rel_close(g, rg, 2e-5, f"grad {i}")


def _aligned_by_hand(m):
    """The ALIGNED facts of one matrix view, computed here from their definition."""
    vec = 16 // m.element_size()
    return m.data_ptr() % 16 == 0 and m.stride(0) % vec == 0 and m.shape[1] % vec == 0


@pytest.mark.parametrize("case", ["aligned", "cols_not_multiple", "offset_view", "row_stride",
                                  "bf16_aligned", "bf16_cols_4", "v_offset", "grad_offset"])
def test_aligned_hints_are_set_exactly_where_they_hold(monkeypatch, case):
    """The kernels are told ALIGNED (16-byte vector accesses, fused_step.py) only when every
    layer's weight and gradient start 16-byte aligned with row strides and column counts that
    are multiples of 16 bytes' worth of elements, and every v starts 16-byte aligned: a false
    hint is undefined behaviour on a GPU.  The interpreter ignores hints, so this checks the
    host's decision; the numerics of both kinds of layers are test_backends.py's."""
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    cols = {"cols_not_multiple": 130, "bf16_aligned": 72, "bf16_cols_4": 68}.get(case, 128)
    buf = torch.randn(40 * (cols + 8) + 8, device=DEVICE).to(dtype)
    if case == "offset_view":
        w = buf[1:1 + 40 * cols].view(40, cols)               # 4 or 2 bytes past the start
    elif case == "row_stride":
        w = buf[:40 * (cols + 2)].view(40, cols + 2)[:, :cols]  # row stride cols + 2
    else:
        w = buf[:40 * cols].view(40, cols)
    ws = [w, torch.randn(24, 64, device=DEVICE).to(dtype)]
    gbuf = torch.randn(40 * cols + 8, device=DEVICE).to(dtype)
    gs = [gbuf[(1 if case == "grad_offset" else 0):][:40 * cols].view(40, cols),
          torch.randn(24, 64, device=DEVICE).to(dtype)]
    vs = se.init_vectors(ws)
    if case == "v_offset":
        vbuf = torch.empty(cols + 1, device=DEVICE)
        vbuf[1:].copy_(vs[0])
        vs[0] = vbuf[1:]
    expected = (all(_aligned_by_hand(m) for m in ws + gs)
                and all(v.data_ptr() % 16 == 0 for v in vs))
    assert expected == (case in ("aligned", "bf16_aligned"))
    launches = _spy_launches(monkeypatch)
    se.fused_step(ws, vs, grads=gs, lam=0.5, backend="triton")
    assert [kwargs["ALIGNED"] for _, kwargs in launches] == [expected] * 3


def test_layer_table_is_cached_while_tensors_stay():
    ws, vs, gs = _inputs([(5, 7), (3, 2, 2)])
    tk._PLANS.clear()
    se.fused_step(ws, vs, grads=gs, backend="triton")
    se.fused_step(ws, vs, grads=gs, backend="triton")
    assert len(tk._PLANS) == 1
    ws2 = [w.clone() for w in ws]
    se.fused_step(ws2, vs, grads=gs, backend="triton")
    assert len(tk._PLANS) == 2


def test_tables_are_evicted_least_recently_used_and_pinned_by_capture(monkeypatch):
    """Item 1: a table used while a CUDA graph is captured is never evicted (a replay reads its
    addresses); the others go least recently used first (it was first in, first out).  Capture
    is simulated here (tk._capturing); on a GPU test_cuda_graph_replay_survives_eviction below."""
    tk._PLANS.clear()
    ws, vs, gs = _inputs([(5, 7), (3, 2, 2)])
    se.fused_step(ws, vs, grads=gs, backend="triton")                    # warm-up
    monkeypatch.setattr(tk, "_capturing", lambda device: True)
    se.fused_step(ws, vs, grads=gs, backend="triton")                    # "captured": pinned
    with pytest.raises(RuntimeError, match="before capturing"):
        se.fused_step([w.clone() for w in ws], vs, grads=gs, backend="triton")
    monkeypatch.setattr(tk, "_capturing", lambda device: False)
    pinned = next(iter(tk._PLANS.values()))
    first = _inputs([(5, 7)])
    se.fused_step(*first[:2], grads=first[2], backend="triton")
    alive = []   # every input stays alive: a freed tensor's address can come back, and with it
    for _ in range(14):   # the same key (a correct hit, but not a new table)
        o = _inputs([(5, 7)])
        alive.append(o)
        se.fused_step(*o[:2], grads=o[2], backend="triton")
    assert len(tk._PLANS) == 16
    se.fused_step(*first[:2], grads=first[2], backend="triton")         # used again: kept
    keys = list(tk._PLANS)
    for _ in range(5):
        o = _inputs([(5, 7)])
        alive.append(o)
        se.fused_step(*o[:2], grads=o[2], backend="triton")
    assert len(tk._PLANS) == 16
    assert pinned in tk._PLANS.values()
    assert keys[-1] in tk._PLANS and keys[1] not in tk._PLANS
    tk.clear_plans()
    assert list(tk._PLANS.values()) == [pinned]
    tk._PLANS.clear()


def test_working_copies_are_not_cached_and_refuse_capture(monkeypatch):
    """A float64 or strided v, or a gradient that cannot be viewed as rows x cols, is copied on
    every step: its plan is built for that call only (it used to be cached under a key that
    never repeats, evicting the plans that do), and capturing it says why it cannot work (it
    used to say "run one step before capturing", which could not help)."""
    tk._PLANS.clear()
    cases = []
    ws, vs, gs = _inputs([(5, 7), (3, 2, 2)])
    cases.append(("vs\\[1\\] \\(torch.float64", ws, [vs[0], vs[1].double()], gs))
    ws, vs, gs = _inputs([(5, 7), (6, 4)])
    cases.append(("vs\\[0\\] \\(torch.float32, stride 2",
                  ws, [torch.stack([vs[0], vs[0]], 1)[:, 0], vs[1]], gs))
    ws, vs, gs = _inputs([(4, 3, 2, 2)])
    cases.append(("grads\\[0\\]", ws, vs, [torch.randn(4, 2, 2, 3, device=DEVICE).permute(0, 3, 1, 2)]))
    for match, ws, vs, gs in cases:
        ref_v, ref_g = [v.clone() for v in vs], [g.clone() for g in gs]
        for _ in range(3):
            se.fused_step(ws, vs, grads=gs, backend="triton")
            reference.fused_step(ws, ref_v, grads=ref_g)
        assert len(tk._PLANS) == 0, match
        for a, b in zip(vs + gs, ref_v + ref_g):
            assert_rel_close(a, b, 1e-5, match)
        monkeypatch.setattr(tk, "_capturing", lambda device: True)
        with pytest.raises(RuntimeError, match=match + ".* which a CUDA graph cannot capture"):
            se.fused_step(ws, vs, grads=gs, backend="triton")
        monkeypatch.setattr(tk, "_capturing", lambda device: False)
    # clear_plans(pinned=True) also drops a pinned plan (once the user's graphs are gone)
    ws, vs, gs = _inputs([(5, 7)])
    se.fused_step(ws, vs, grads=gs, backend="triton")
    monkeypatch.setattr(tk, "_capturing", lambda device: True)
    se.fused_step(ws, vs, grads=gs, backend="triton")
    monkeypatch.setattr(tk, "_capturing", lambda device: False)
    tk.clear_plans()
    assert len(tk._PLANS) == 1
    tk.clear_plans(pinned=True)
    assert len(tk._PLANS) == 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (graph capture)")
def test_cuda_graph_replay_survives_eviction():
    """A graph captured with the triton backend replays right after its table would have been
    evicted by 20 other tables and the memory reused (item 1, on a GPU)."""
    ws, vs, gs = _inputs([(300, 1100), (64, 64), (33, 64, 3, 3)])
    v0, g0 = [v.clone() for v in vs], [g.clone() for g in gs]
    eager_v, eager_g = [v.clone() for v in vs], [g.clone() for g in gs]
    eager_s = se.fused_step(ws, eager_v, grads=eager_g, n_iter=2, backend="triton")
    warm_up_on_a_side_stream(lambda: se.fused_step(ws, vs, grads=gs, n_iter=2, backend="triton"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sigma = se.fused_step(ws, vs, grads=gs, n_iter=2, backend="triton")
    tk.clear_plans()
    for _ in range(20):
        o = _inputs([(64, 64)])
        se.fused_step(*o[:2], grads=o[2], backend="triton")
    poison = torch.full((1 << 22,), float("nan"), device="cuda")
    del poison
    assert_replay_equals_eager(graph, sigma, vs + gs, v0 + g0, eager_s, eager_v + eager_g)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_a_gpu_that_is_not_the_current_one():
    """Item 4: the host path makes the tensors' device current (Triton launches on the current
    device's stream: an illegal address before)."""
    from spectral_ext import reference
    ws = [torch.randn(37, 129, device="cuda:1"), torch.randn(5, 3, 3, 3, device="cuda:1")]
    vs = se.init_vectors(ws)
    gs = [torch.randn_like(w) for w in ws]
    v_ref, g_ref = [v.clone() for v in vs], [g.clone() for g in gs]
    assert torch.cuda.current_device() == 0
    s = se.fused_step(ws, vs, grads=gs, backend="triton")
    s_ref = reference.fused_step(ws, v_ref, grads=g_ref)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert torch.allclose(s, s_ref, rtol=2e-5)
    for a, b in zip(vs + gs, v_ref + g_ref):
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-6)


def test_auto_picks_triton_for_cuda_tensors():
    if DEVICE.type != "cuda":
        assert se.resolve_backend([torch.randn(2, 2)]) != "triton"   # CPU tensors: never auto
    else:
        # the CUDA kernels come first where they are built; triton is auto's choice otherwise
        want = "cuda" if se.available_backends()["cuda"].available else "triton"
        assert se.resolve_backend([torch.randn(2, 2, device="cuda")]) == want


def test_imports_without_triton():
    """Triton is optional: without it spectral_ext imports and says why the backend is off."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # import triton now raises ImportError
        import torch
        import spectral_ext as se
        b = se.available_backends()["triton"]
        assert not b.available and "Triton is not importable" in b.detail, b
        w = [torch.randn(3, 4)]
        try:
            se.fused_step(w, se.init_vectors(w), backend="triton")
        except RuntimeError as e:
            assert "unavailable" in str(e), e
        else:
            raise AssertionError("no error")
    """)
    subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd="/")
