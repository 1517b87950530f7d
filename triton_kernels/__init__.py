"""spectral_ext.triton_kernels: the Triton backend (installed under spectral_ext; the source
folder is the top-level triton_kernels/, never importable as a top-level `triton_kernels`).

Layers: ``fused_step.py`` holds the private @triton.jit kernels; this module the host function
``fused_step_forward`` (tables, tiles, block sizes, launches); ``spectral_ext/_ops.py`` registers
it as the op ``spectral_ext::fused_step_triton`` (an opaque custom op: see there why not
``torch.library.triton_op``).
"""

import os
from itertools import accumulate
from typing import Dict, List, Sequence, Tuple

import torch
import triton.language as tl

from .fused_step import _cols_kernel, _finalize_kernel, _rows_kernel

__all__ = ["fused_step_forward", "SUPPORTED_DTYPES", "block_sizes"]

SUPPORTED_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                    torch.bfloat16: tl.bfloat16}


def block_sizes() -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_C).  Under TRITON_INTERPRET=1 larger blocks: the interpreter's cost grows
    with program instances and loop trips, not with the block size."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 64, 256
    return 32, 128


def _tiles(extents: Sequence[int], block: int) -> Tuple[List[int], List[int]]:
    """tile -> (layer, first row/column) for extents split into blocks."""
    layer, start = [], []
    for i, n in enumerate(extents):
        for s in range(0, n, block):
            layer.append(i)
            start.append(s)
    return layer, start


def _offsets(sizes: Sequence[int]) -> List[int]:
    """[0, s0, s0 + s1, ..., total]: where each layer's slice of a concatenated buffer starts."""
    return [0, *accumulate(sizes)]


class _Plan:
    """Everything of one dtype group that depends only on pointers, shapes and strides: the
    device tables and tile maps, built once and cached while they stay the same (a step then
    copies nothing to the device, as CUDA-graph capture requires)."""

    def __init__(self, Ws, Gs, Vs, out_index, device):
        BR, BC = block_sizes()
        rows = [w.shape[0] for w in Ws]
        cols = [w.shape[1] for w in Ws]
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
        self.w_tab = i64([w.data_ptr() for w in Ws])
        self.g_tab = i64([g.data_ptr() for g in Gs])
        self.v_tab = i64([v.data_ptr() for v in Vs])
        self.rows, self.cols = i64(rows), i64(cols)
        self.ldw = i64([w.stride(0) for w in Ws])
        self.ldg = i64([g.stride(0) for g in Gs])
        uoff, voff = _offsets(rows), _offsets(cols)
        self.uoff, self.voff = i64(uoff[:-1]), i64(voff[:-1])
        self.n_u, self.n_v = uoff[-1], voff[-1]
        rl, rs = _tiles(rows, BR)
        cl, cs = _tiles(cols, BC)
        self.row_layer, self.row_start = i32(rl), i32(rs)
        self.col_layer, self.col_start = i32(cl), i32(cs)
        # each layer's column tiles are consecutive: its partial sums of ||v'||^2 are the slots
        # [pstart, pstart + pcount) of the column-tile grid
        pcount = [-(-c // BC) for c in cols]
        self.pstart, self.pcount = i64(_offsets(pcount)[:-1]), i64(pcount)
        self.first_layer = i32(list(range(len(Ws))))
        self.zeros = i32([0] * len(Ws))
        self.layer_out = i64(out_index)
        self.n_row_tiles, self.n_col_tiles = len(rl), len(cl)


_PLANS: Dict[tuple, _Plan] = {}
_MAX_PLANS = 16


def _plan(Ws, Gs, Vs, out_index, device) -> _Plan:
    key = (str(device), tuple(out_index),
           tuple((w.data_ptr(), tuple(w.shape), w.stride(0), w.dtype) for w in Ws),
           tuple((g.data_ptr(), g.stride(0), g.dtype) for g in Gs),
           tuple(v.data_ptr() for v in Vs))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = _Plan(Ws, Gs, Vs, out_index, device)
    return plan


def _as_2d(t: torch.Tensor, rows: int, cols: int):
    """(t as rows x cols with unit column stride, is_a_copy): a view when the layout allows,
    else a contiguous copy (to be written back when t is an output)."""
    try:
        m = t.view(rows, cols)
        if m.stride(1) == 1 or cols == 1:
            return m, False
    except RuntimeError:
        pass
    return t.reshape(rows, cols).contiguous(), True


def fused_step_forward(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                       grads: Sequence[torch.Tensor], lam: float, n_iter: int) -> torch.Tensor:
    """The fused step with the Triton kernels (inputs already checked by the caller): returns
    sigma [L] (float32) and updates vs and grads in place."""
    device = weights[0].device
    sigma = torch.empty(len(weights), dtype=torch.float32, device=device)
    BR, BC = block_sizes()
    groups: Dict[tuple, List[int]] = {}
    for i, (w, g) in enumerate(zip(weights, grads)):
        groups.setdefault((w.dtype, g.dtype), []).append(i)
    for (wdt, gdt), idx in groups.items():
        Ws, Gs, Vs, write_back = [], [], [], []
        for i in idx:
            w, g, v = weights[i], grads[i], vs[i]
            rows = w.shape[0]
            cols = w.numel() // rows
            Ws.append(_as_2d(w, rows, cols)[0])
            g2, copied = _as_2d(g, rows, cols)
            Gs.append(g2)
            if copied:
                write_back.append((g, g2))
            if v.dtype == torch.float32 and v.is_contiguous():
                Vs.append(v)
            else:   # float64 or strided vectors: a float32 working copy, written back after
                vw = v.to(torch.float32).contiguous()
                Vs.append(vw)
                write_back.append((v, vw))
        p = _plan(Ws, Gs, Vs, idx, device)
        u_raw = torch.empty(p.n_u, dtype=torch.float32, device=device)
        v_prime = torch.empty(p.n_v, dtype=torch.float32, device=device)
        u_inv = torch.empty(len(idx), dtype=torch.float32, device=device)
        partial = torch.empty(p.n_col_tiles, dtype=torch.float64, device=device)
        wt, gt = SUPPORTED_DTYPES[wdt], SUPPORTED_DTYPES[gdt]
        for it in range(n_iter):
            last = it == n_iter - 1
            _rows_kernel[(p.n_row_tiles,)](
                p.row_layer, p.row_start, p.w_tab, p.v_tab, p.rows, p.cols, p.ldw, p.uoff,
                u_raw, W_DTYPE=wt, BLOCK_R=BR, BLOCK_C=BC)
            _cols_kernel[(p.n_col_tiles,)](
                p.col_layer, p.col_start, p.w_tab, p.rows, p.cols, p.ldw, p.uoff,
                p.voff, u_raw, v_prime, u_inv, partial, W_DTYPE=wt, BLOCK_R=BR, BLOCK_C=BC)
            # the last iteration also updates the gradients, over every row tile; earlier ones
            # only finalize sigma and v, one program per layer
            tl_, ts_, n = ((p.row_layer, p.row_start, p.n_row_tiles) if last else
                           (p.first_layer, p.zeros, len(idx)))
            _finalize_kernel[(n,)](
                tl_, ts_, p.v_tab, p.g_tab, p.rows, p.cols, p.ldg, p.uoff, p.voff, p.pstart,
                p.pcount, p.layer_out, u_raw, v_prime, u_inv, partial, sigma, lam,
                G_DTYPE=gt, UPDATE_GRAD=last, BLOCK_R=BR, BLOCK_C=BC, BLOCK_P=64)
        for dst, src in write_back:
            dst.copy_(src.reshape(dst.shape))
    return sigma
