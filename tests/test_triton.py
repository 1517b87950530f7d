"""The Triton backend's own properties (its numerics against the reference are in
test_backends.py): the op, one launch per phase whatever the number of layers, the cached layer
table.  Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py)."""

import pytest
import torch

import spectral_ext as se

if not se.available_backends()["triton"].available:
    pytest.skip(f"the triton backend cannot run here: {se.available_backends()['triton'].detail}",
                allow_module_level=True)

from spectral_ext import triton_kernels as tk  # noqa: E402  (after the availability check)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(shapes, dtype=torch.float32):
    ws = [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]
    return ws, se.init_vectors(ws), [torch.randn_like(w) for w in ws]


def test_opcheck_fused_step_triton():
    ws, vs, gs = _inputs([(37, 129), (8, 3, 3, 3), (1, 20), (20, 1)])
    torch.library.opcheck(torch.ops.spectral_ext.fused_step_triton, (ws, vs, gs, 0.25, 2))


@pytest.mark.parametrize("n_layers", [1, 7, 40])
@pytest.mark.parametrize("n_iter", [1, 2])
def test_launches_do_not_grow_with_layers(monkeypatch, n_layers, n_iter):
    """3 launches per iteration and weight dtype, for 1 or 40 layers."""
    launches = []
    for name in ("_rows_kernel", "_cols_kernel", "_finalize_kernel"):
        kernel = getattr(tk, name)

        class Counting:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]
        monkeypatch.setattr(tk, name, Counting())
    shapes = [(3 + i % 5, 4 + i % 7) for i in range(n_layers)]
    ws, vs, gs = _inputs(shapes)
    ws16, vs16, gs16 = _inputs(shapes[:2], torch.bfloat16)
    se.fused_step(ws + ws16, vs + vs16, grads=gs + gs16, n_iter=n_iter, backend="triton")
    assert len(launches) == 3 * n_iter * 2      # two dtype groups


def test_layer_table_is_cached_while_tensors_stay():
    ws, vs, gs = _inputs([(5, 7), (3, 2, 2)])
    tk._PLANS.clear()
    se.fused_step(ws, vs, grads=gs, backend="triton")
    se.fused_step(ws, vs, grads=gs, backend="triton")
    assert len(tk._PLANS) == 1
    ws2 = [w.clone() for w in ws]
    se.fused_step(ws2, vs, grads=gs, backend="triton")
    assert len(tk._PLANS) == 2


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
