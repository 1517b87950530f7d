"""spectral_ext.triton_kernels: the Triton backend (installed under spectral_ext; the source
folder is the top-level triton_kernels/, never importable as a top-level `triton_kernels`).

Layers: ``fused_step.py`` holds the private @triton.jit kernels; this module the host function
``fused_step_forward`` (tables, tiles, block sizes, launches); ``spectral_ext/_ops.py`` registers
it as the op ``spectral_ext::fused_step_triton`` (an opaque custom op: see there why not
``torch.library.triton_op``).  ``spectral_norms_forward`` / ``spectral_norms_backward`` are the
same kernels for the differentiable op (``spectral_ext::spectral_norms_triton``).
"""

import contextlib
import os
from collections import OrderedDict
from itertools import accumulate
from typing import Dict, List, Sequence, Tuple

import torch
import triton.language as tl

from .fused_step import _cols_kernel, _cols_reduce_kernel, _finalize_kernel, _rows_kernel

__all__ = ["fused_step_forward", "spectral_norms_forward", "spectral_norms_backward",
           "SUPPORTED_DTYPES", "block_sizes", "row_chunk", "clear_plans"]

SUPPORTED_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                    torch.bfloat16: tl.bfloat16}


def block_sizes() -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_C).  Under TRITON_INTERPRET=1 larger blocks: the interpreter's cost grows
    with program instances and loop trips, not with the block size."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 64, 256
    return 32, 128


def row_chunk() -> int:
    """CHUNK: a layer with more rows has its column phase split over chunks of this many rows
    (fused_step.py).  On a GPU 32 row blocks of 32 (a tile then streams 1024 x 128 elements);
    under TRITON_INTERPRET=1 two row blocks, so that the tests' tall layers are split."""
    BR, _ = block_sizes()
    return 2 * BR if os.environ.get("TRITON_INTERPRET") == "1" else 32 * BR


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


def _aligned(ms: Sequence[torch.Tensor]) -> bool:
    """Whether every matrix (rows x cols, unit column stride) starts 16-byte aligned and has a row
    stride and a column count that are multiples of VEC = 16 bytes / element: what the kernels'
    ALIGNED hints state (fused_step.py), so that their tiles are read and written 16 bytes at a
    time.  With cols a multiple of VEC >= 4, every layer's offset into the v' workspace is a
    multiple of 4 floats too."""
    for m in ms:
        vec = 16 // m.element_size()
        if m.data_ptr() % 16 or m.stride(0) % vec or m.shape[1] % vec:
            return False
    return True


def _all_16(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


class _Plan:
    """Everything of one dtype group that depends only on pointers, shapes and strides: the
    device tables and tile maps, built once and cached while they stay the same (a step then
    copies nothing to the device, as CUDA-graph capture requires).

    Lifetime: a graph captured with a plan replays with the addresses of its tables, so a plan
    used while capturing is pinned (never evicted, and kept by clear_plans()) for the life of the
    process, or until ``clear_plans(pinned=True)`` once the graphs are destroyed (Triton has no
    hook that tells when a graph dies); the others are evicted least recently used first beyond
    _MAX_PLANS.  A group with a per-call working copy gets a plan that is not cached (_plan).  A plan used on a stream other than the
    one that built it records that stream on its tables, so the caching allocator does not hand
    their memory out (after an eviction) while that stream may still read them."""

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
        self.row_layer, self.row_start = i32(rl), i32(rs)
        # each layer's row tiles are consecutive: its parts of ||u_raw||^2 are the slots
        # [uq_start, uq_start + uq_count) of the row-tile grid
        uq = [-(-r // BR) for r in rows]
        self.uq_start, self.uq_count = i64(_offsets(uq)[:-1]), i64(uq)
        # column tiles (layer, first column, first row of their chunk): a layer of more than
        # `chunk` rows has each column block split over chunks of `chunk` rows, whose parts of
        # v' (nchunk x cols floats per split layer, from chunk_base) _cols_reduce_kernel sums
        self.chunk = CH = row_chunk()
        nchunk = [1 if r <= CH else -(-r // CH) for r in rows]
        cl, cs, crs = [], [], []
        for i, (c, n) in enumerate(zip(cols, nchunk)):
            for c0 in range(0, c, BC):
                for k in range(n):
                    cl.append(i)
                    cs.append(c0)
                    crs.append(k * CH)
        self.col_layer, self.col_start, self.col_rstart = i32(cl), i32(cs), i32(crs)
        self.nchunk = i64(nchunk)
        base = _offsets([n * c if n > 1 else 0 for n, c in zip(nchunk, cols)])
        self.chunk_base, self.n_vp_part = i64(base[:-1]), base[-1]
        red = [(i, c0) for i, (c, n) in enumerate(zip(cols, nchunk)) if n > 1
               for c0 in range(0, c, BC)]
        self.red_layer, self.red_start = i32([i for i, _ in red]), i32([c0 for _, c0 in red])
        self.n_red_tiles = len(red)
        # a layer's parts of ||v'||^2 (one per column block) are the slots
        # [pstart, pstart + pcount)
        pcount = [-(-c // BC) for c in cols]
        self.pstart, self.pcount = i64(_offsets(pcount)[:-1]), i64(pcount)
        self.n_partials = sum(pcount)
        self.first_layer = i32(list(range(len(Ws))))
        self.zeros = i32([0] * len(Ws))
        self.layer_out = i64(out_index)
        self.n_row_tiles, self.n_col_tiles = len(rl), len(cl)
        # the ALIGNED facts of the layers (a launch adds those of its workspace buffers)
        self.aligned = _aligned(Ws) and _aligned(Gs) and _all_16(*Vs)
        self.pinned = False
        self.streams = set()
        if device.type == "cuda":
            self.streams.add(torch.cuda.current_stream(device))

    def tables(self):
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

    def used_on(self, stream):
        """Records `stream` on the tables (once per stream)."""
        if stream not in self.streams:
            for t in self.tables():
                t.record_stream(stream)
            self.streams.add(stream)


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()   # least recently used first
_MAX_PLANS = 16


def clear_plans(pinned: bool = False):
    """Drops the cached plans, except those pinned by a captured CUDA graph; with
    ``pinned=True`` those too: call it only once every graph captured with a Triton step is
    destroyed (a replay would read freed tables)."""
    for key in [k for k, p in _PLANS.items() if pinned or not p.pinned]:
        del _PLANS[key]


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _plan(Ws, Gs, Vs, out_index, device, copied=None) -> _Plan:
    """The cached plan of these tensors, or a new one.  ``copied`` names a tensor of the group
    that is a per-call working copy (a float64 or strided v, a weight or gradient that cannot be
    viewed as rows x cols): its pointer never repeats, so the plan is built for this call only
    (caching it would evict the plans that do repeat), and a graph cannot capture it."""
    if copied is not None:
        if _capturing(device):
            raise RuntimeError(
                f"spectral_ext.fused_step (triton): {copied} needs a working copy on every step "
                "(the Triton kernels read contiguous float32 vectors, and weights and gradients "
                "viewable as rows x cols with unit column stride), which a CUDA graph cannot "
                "capture; use contiguous float32 vectors and contiguous weights and gradients, "
                "or step outside the graph")
        return _Plan(Ws, Gs, Vs, out_index, device)
    key = (str(device), tuple(out_index),
           tuple((w.data_ptr(), tuple(w.shape), w.stride(0), w.dtype) for w in Ws),
           tuple((g.data_ptr(), g.stride(0), g.dtype) for g in Gs),
           tuple(v.data_ptr() for v in Vs))
    capturing = _capturing(device)
    plan = _PLANS.get(key)
    if plan is None:
        if capturing:
            raise RuntimeError(
                "spectral_ext.fused_step (triton): these tensors have no cached layer table yet, "
                "and uploading one is not allowed while the stream is captured into a CUDA "
                "graph; run one step with the same tensors before capturing (warm-up)")
        unpinned = [k for k, p in _PLANS.items() if not p.pinned]
        while len(_PLANS) >= _MAX_PLANS and unpinned:
            del _PLANS[unpinned.pop(0)]
        plan = _PLANS[key] = _Plan(Ws, Gs, Vs, out_index, device)
    else:
        _PLANS.move_to_end(key)
        if device.type == "cuda" and not capturing:
            plan.used_on(torch.cuda.current_stream(device))
    if capturing:
        plan.pinned = True
    return plan


def _power_phases(p: _Plan, v_tab: torch.Tensor, u_raw, v_prime, u_norm, partial, wt,
                  aligned: bool) -> None:
    """Phases 1, 2 (and 2b when a layer is split) of one power iteration: u_raw, u_norm, v'
    and the parts of ||v'||^2 from the vectors at v_tab."""
    BR, BC = block_sizes()
    device = u_raw.device
    u2_part = torch.empty(p.n_row_tiles, dtype=torch.float64, device=device)
    vp_part = (torch.empty(p.n_vp_part, dtype=torch.float32, device=device) if p.n_vp_part
               else v_prime)    # not written when no layer is split
    _rows_kernel[(p.n_row_tiles,)](
        p.row_layer, p.row_start, p.w_tab, v_tab, p.rows, p.cols, p.ldw, p.uoff, u_raw, u2_part,
        W_DTYPE=wt, BLOCK_R=BR, BLOCK_C=BC, ALIGNED=aligned)
    _cols_kernel[(p.n_col_tiles,)](
        p.col_layer, p.col_start, p.col_rstart, p.w_tab, p.rows, p.cols, p.ldw, p.uoff, p.voff,
        p.uq_start, p.uq_count, p.pstart, p.nchunk, p.chunk_base, u_raw, u2_part, v_prime,
        vp_part, u_norm, partial, W_DTYPE=wt, BLOCK_R=BR, BLOCK_C=BC, BLOCK_P=64, CHUNK=p.chunk,
        ALIGNED=aligned)
    if p.n_red_tiles:
        _cols_reduce_kernel[(p.n_red_tiles,)](
            p.red_layer, p.red_start, p.cols, p.voff, p.pstart, p.nchunk, p.chunk_base, vp_part,
            v_prime, partial, BLOCK_C=BC)


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
    # the tensors' device, current for the launches and allocations (it need not be the current
    # one: Triton launches on the current device's stream)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _fused_step_forward(weights, vs, grads, lam, n_iter, device)


def _fused_step_forward(weights, vs, grads, lam, n_iter, device) -> torch.Tensor:
    sigma = torch.empty(len(weights), dtype=torch.float32, device=device)
    BR, BC = block_sizes()
    groups: Dict[tuple, List[int]] = {}
    for i, (w, g) in enumerate(zip(weights, grads)):
        groups.setdefault((w.dtype, g.dtype), []).append(i)
    for (wdt, gdt), idx in groups.items():
        Ws, Gs, Vs, write_back, v_copies = [], [], [], [], []
        copied = None    # the first tensor of the group that needs a per-call working copy
        for i in idx:
            w, g, v = weights[i], grads[i], vs[i]
            rows = w.shape[0]
            cols = w.numel() // rows
            w2, w_copied = _as_2d(w, rows, cols)
            Ws.append(w2)
            g2, g_copied = _as_2d(g, rows, cols)
            Gs.append(g2)
            if g_copied:
                write_back.append((g, g2))
            v_copied = not (v.dtype == torch.float32 and v.is_contiguous())
            if not v_copied:
                Vs.append(v)
            else:   # float64 or strided vectors: a float32 working copy, written back after,
                # where some iteration updated it (a kept v stays exactly as it was)
                vw = v.to(torch.float32).contiguous()
                Vs.append(vw)
                v_copies.append((len(Vs) - 1, v, vw))
            if copied is None:
                copied = (f"weights[{i}]" if w_copied else f"grads[{i}]" if g_copied else
                          f"vs[{i}] ({v.dtype}, stride {v.stride(0)})" if v_copied else None)
        p = _plan(Ws, Gs, Vs, idx, device, copied)
        u_raw = torch.empty(p.n_u, dtype=torch.float32, device=device)
        v_prime = torch.empty(p.n_v, dtype=torch.float32, device=device)
        u_norm = torch.empty(len(idx), dtype=torch.float64, device=device)
        partial = torch.empty(p.n_partials, dtype=torch.float64, device=device)
        v_updated = torch.zeros(len(idx), dtype=torch.int32, device=device) if v_copies \
            else u_norm      # not read without TRACK_UPDATES
        wt, gt = SUPPORTED_DTYPES[wdt], SUPPORTED_DTYPES[gdt]
        aligned = p.aligned and _all_16(v_prime)
        for it in range(n_iter):
            last = it == n_iter - 1
            _power_phases(p, p.v_tab, u_raw, v_prime, u_norm, partial, wt, aligned)
            # the last iteration also updates the gradients, over every row tile; earlier ones
            # only finalize sigma and v, one program per layer
            tl_, ts_, n = ((p.row_layer, p.row_start, p.n_row_tiles) if last else
                           (p.first_layer, p.zeros, len(idx)))
            _finalize_kernel[(n,)](
                tl_, ts_, p.v_tab, p.g_tab, p.rows, p.cols, p.ldg, p.uoff, p.voff, p.pstart,
                p.pcount, p.layer_out, u_raw, v_prime, u_norm, partial, sigma, v_updated, lam,
                u_raw, G_DTYPE=gt, UPDATE_GRAD=last, TRACK_UPDATES=bool(v_copies), BLOCK_R=BR,
                BLOCK_C=BC, BLOCK_P=64, ALIGNED=aligned)
        for dst, src in write_back:
            dst.copy_(src.reshape(dst.shape))
        for j, v, vw in v_copies:
            v.copy_(torch.where(v_updated[j] != 0, vw.to(v.dtype), v))
    return sigma


def _group_inputs(weights, vs, idx):
    """Ws (rows x cols views or copies), Vs (float32 contiguous, or working copies), the working
    copies of v (position, v, copy) and the first tensor that needs a per-call copy."""
    Ws, Vs, v_copies = [], [], []
    copied = None
    for i in idx:
        w, v = weights[i], vs[i]
        rows = w.shape[0]
        w2, w_copied = _as_2d(w, rows, w.numel() // rows)
        Ws.append(w2)
        v_copied = not (v.dtype == torch.float32 and v.is_contiguous())
        if v_copied:
            vw = v.to(torch.float32).contiguous()
            Vs.append(vw)
            v_copies.append((len(Vs) - 1, v, vw))
        else:
            Vs.append(v)
        if copied is None:
            copied = (f"weights[{i}]" if w_copied else
                      f"vs[{i}] ({v.dtype}, stride {v.stride(0)})" if v_copied else None)
    return Ws, Vs, v_copies, copied


def spectral_norms_forward(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                           n_iter: int):
    """spectral_norms with the Triton kernels (inputs already checked by the caller):
    ``(sigma [L] float32, us, vs_new)``; nothing is mutated.  The phases of fused_step without
    the gradient: v goes to an output buffer (filled with the current v first, so a v that no
    iteration updated stays as it was), u is written after the last iteration.  us and vs_new
    are copied out of one buffer per weight dtype (float32) by one split_with_sizes_copy each (a
    custom op's outputs may not alias each other); a float64 v's new value is converted back to
    float64 (its old bits where no iteration updated it)."""
    device = weights[0].device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _spectral_norms_forward(weights, vs, n_iter, device)


def _spectral_norms_forward(weights, vs, n_iter, device):
    L = len(weights)
    sigma = torch.empty(L, dtype=torch.float32, device=device)
    us: List[torch.Tensor] = [None] * L
    vs_new: List[torch.Tensor] = [None] * L
    BR, BC = block_sizes()
    groups: Dict[torch.dtype, List[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    for wdt, idx in groups.items():
        Ws, Vs, v_copies, copied = _group_inputs(weights, vs, idx)
        # the gradient table is never read (UPDATE_GRAD=False): the weights stand in for it
        p = _plan(Ws, Ws, Vs, idx, device, copied)
        u_raw = torch.empty(p.n_u, dtype=torch.float32, device=device)
        v_prime = torch.empty(p.n_v, dtype=torch.float32, device=device)
        u_norm = torch.empty(len(idx), dtype=torch.float64, device=device)
        partial = torch.empty(p.n_partials, dtype=torch.float64, device=device)
        u_out = torch.empty(p.n_u, dtype=torch.float32, device=device)
        v_out = torch.cat(Vs)                     # the current v of every layer
        v_out_tab = p.voff * 4 + v_out.data_ptr()  # each layer's slice of v_out (bytes)
        v_updated = torch.zeros(len(idx), dtype=torch.int32, device=device) if v_copies \
            else u_norm      # not read without TRACK_UPDATES
        wt = SUPPORTED_DTYPES[wdt]
        aligned = p.aligned and _all_16(v_prime, v_out)
        for it in range(n_iter):
            last = it == n_iter - 1
            _power_phases(p, p.v_tab if it == 0 else v_out_tab, u_raw, v_prime, u_norm, partial,
                          wt, aligned)
            # the last iteration also writes u, over every row tile
            tl_, ts_, n = ((p.row_layer, p.row_start, p.n_row_tiles) if last else
                           (p.first_layer, p.zeros, len(idx)))
            _finalize_kernel[(n,)](
                tl_, ts_, v_out_tab, p.g_tab, p.rows, p.cols, p.ldg, p.uoff, p.voff, p.pstart,
                p.pcount, p.layer_out, u_raw, v_prime, u_norm, partial, sigma, v_updated, 0.0,
                u_out, G_DTYPE=wt, UPDATE_GRAD=False, TRACK_UPDATES=bool(v_copies),
                BLOCK_R=BR, BLOCK_C=BC, BLOCK_P=64, WRITE_U=last, ALIGNED=aligned)
        # tensors of their own (a custom op's outputs may not alias each other): one
        # split_with_sizes_copy per buffer
        u_split = torch.split_with_sizes_copy(u_out, [w.shape[0] for w in Ws])
        v_split = torch.split_with_sizes_copy(v_out, [w.shape[1] for w in Ws])
        for j, i in enumerate(idx):
            us[i] = u_split[j]
            vs_new[i] = v_split[j]
        for j, v, _ in v_copies:
            if v.dtype != torch.float32:   # a float64 v: its own bits where not updated
                vs_new[idx[j]] = torch.where(v_updated[j] != 0, vs_new[idx[j]].to(v.dtype), v)
    return sigma, us, vs_new


def spectral_norms_backward(grad_sigma: torch.Tensor, us: Sequence[torch.Tensor],
                            vs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                            accumulate: bool) -> None:
    """grads[l] (+)= grad_sigma[l] * u_l v_l^T for every layer: the finalize kernel's gradient
    phase, one launch per gradient dtype, with u and v concatenated into its workspace (u_norm 1,
    exact) and the scale read from device memory.  The table is built per call (the tensors are
    new every step), so it cannot be captured in a CUDA graph."""
    device = grads[0].device
    if _capturing(device):
        raise RuntimeError(
            "spectral_ext.spectral_norms backward (triton): the fused backward builds its table "
            "per call, which a CUDA graph cannot capture; under capture the autograd formula "
            "uses the reference, or run the backward outside the graph")
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        BR, BC = block_sizes()
        scale = grad_sigma.to(torch.float32).contiguous()
        groups: Dict[torch.dtype, List[int]] = {}
        for i, g in enumerate(grads):
            groups.setdefault(g.dtype, []).append(i)
        for gdt, idx in groups.items():
            Gs, write_back = [], []
            for i in idx:
                g = grads[i]
                rows = g.shape[0]
                g2, g_copied = _as_2d(g, rows, g.numel() // rows)
                if g_copied:
                    write_back.append((g, g2))
                Gs.append(g2)
            u_cat = torch.cat([us[i].to(torch.float32) for i in idx])
            v_cat = torch.cat([vs[i].to(torch.float32) for i in idx])
            p = _Plan(Gs, Gs, [v_cat] * len(idx), idx, device)   # for this call only
            ones = torch.ones(len(idx), dtype=torch.float64, device=device)
            _finalize_kernel[(p.n_row_tiles,)](
                p.row_layer, p.row_start, p.v_tab, p.g_tab, p.rows, p.cols, p.ldg, p.uoff,
                p.voff, p.pstart, p.pcount, p.layer_out, u_cat, v_cat, ones, ones, scale,
                p.zeros, scale, u_cat, G_DTYPE=SUPPORTED_DTYPES[gdt], UPDATE_GRAD=True,
                TRACK_UPDATES=False, BLOCK_R=BR, BLOCK_C=BC, BLOCK_P=64, FINALIZE=False,
                SCALE_PER_LAYER=True, ACCUMULATE=bool(accumulate), ALIGNED=p.aligned)
            for dst, src in write_back:
                dst.copy_(src.reshape(dst.shape))
