"""Triton kernels of the fused spectral-norm step, for all layers of one dtype per launch.

Layers are described by a table on the device (pointers as int64, rows, cols, row strides, and
offsets into a float32 workspace) and by tile maps (tile -> layer, first row or column), in the
spirit of apex's multi_tensor_apply: one launch per phase covers every layer, so the launch count
does not grow with the number of layers (it grows with the number of weight dtypes in the call).

Phases of one power iteration (semantics: spectral_ext.reference):
  1. ``_rows_kernel``      u_raw = W v, and each tile's part of ||u_raw||^2 (float64)
                           tiles = (layer, block of rows)
  2. ``_cols_kernel``      v' = W^T (u_raw / ||u_raw||)   tiles = (layer, block of columns,
                           chunk of rows); each tile sums the layer's parts of ||u_raw||^2 in
                           order.  A layer of at most CHUNK rows is one chunk: its tiles write
                           v' and their part of ||v'||^2.  A taller layer's column blocks are
                           split over chunks of CHUNK rows (without the split, a 128256 x 2048
                           layer would be 16 programs, each streaming 128256 rows), whose
                           partial v' go to a workspace, and
  2b. ``_cols_reduce_kernel``  sums them in chunk order (a fixed order: the results are
                           bitwise repeatable) into v' and the parts of ||v'||^2
                           tiles = (split layer, block of columns); launched only when some
                           layer of the group is split
  3. ``_finalize_kernel``  sigma = ||v'||, v = v' / sigma, and grad += lam * u v'^T
                           (= lam * sigma * u v^T, no W needed)     tiles = (layer, block of rows)
n_iter = 1 is three launches (four with a split layer); each further iteration adds as many
(its finalize updates v only).

spectral_norms (the differentiable op) runs the same three phases: its finalize writes v into an
output buffer (through a table of output addresses instead of the caller's v) and, after the
last iteration, u (WRITE_U) instead of the gradient.  Its backward is the finalize kernel's
gradient phase alone (FINALIZE=False): grad (+)= grad_sigma[l] * u v^T with the per-layer scale
read from device memory (SCALE_PER_LAYER), u and v given (u_raw = u, u_norm = 1, v' = v).
Arithmetic is float32, squared norms are summed in float64 (as in the reference), and nothing
forms W^T W v unnormalized, so there is no sigma^2 range limit.  The divisions by a norm
(u = u_raw / ||u_raw||, v = v' / sigma) are done in float64 and never as a product with the
inverse, which overflows float32 when ||u_raw|| < 3e-39.  bf16/fp16 values are upcast to float32
before any arithmetic (the interpreter's bf16 arithmetic is not exact); bf16 from its bits
(``_to_f32``: ``.to(tl.float32)`` turned bf16 subnormals into wrong values in the interpreter),
and gradients are rounded to their dtype once.

ALIGNED (a constexpr the host sets only after checking every layer of the launch: weight and
gradient addresses 16-byte aligned, their row strides and the column count multiples of
VEC = 16 bytes / element, every v 16-byte aligned; then every workspace offset of v' is a
multiple of 4 floats) tells the compiler so through ``tl.multiple_of`` on those scalars: the
tiles' masked loads and stores then become 16-byte vector accesses (``ld.global.v4.b32``,
benchmarks/triton_compile.py counts them); without it every element is its own 4- or 2-byte
access.  A hint that is not true would be undefined behaviour, hence the host check
(``_Plan.aligned``).  The hints are written in the kernels' bodies: on the values a helper
function returns they are lost (a hint marks the op that made the value, and a call is
inlined away), so the layers' pointers are also made in the kernels' bodies.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounded to nearest even.  bfloat16 by bit operations (NaN -> 0x7FC0, as
    torch rounds), because Triton's interpreter truncates float32 -> bfloat16 casts."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _to_f32(x, DTYPE: tl.constexpr):
    """DTYPE -> float32, exactly.  bfloat16 from its bits (a bf16 is the top half of a float32),
    so subnormals convert the same on every platform (the interpreter's .to(tl.float32) gave
    8.27e-39 for 1.001e-38)."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _div(x, d):
    """x / d in float64, rounded once to float32 (x float32, d float64), 0 where d is 0 (a NaN d
    propagates)."""
    q = x.to(tl.float64) / tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, 0.0, q).to(tl.float32)


@triton.jit
def _norm_of_parts(parts, start, count, BLOCK_P: tl.constexpr):
    """sqrt of the sum of the float64 parts [start, start + count), in a fixed order."""
    acc = tl.zeros((BLOCK_P,), dtype=tl.float64)
    for j in range(0, count, BLOCK_P):
        jj = j + tl.arange(0, BLOCK_P)
        acc += tl.load(parts + start + jj, mask=jj < count, other=0.0)
    return tl.sqrt(tl.sum(acc, axis=0))


@triton.jit
def _load_tile(W, ldw, r, rmask, c, cmask, DTYPE: tl.constexpr):
    """W[r, c] (row stride ldw, unit column stride) as float32, zero outside the masks."""
    return _to_f32(tl.load(W + r[:, None].to(tl.int64) * ldw + c[None, :],
                           mask=rmask[:, None] & cmask[None, :], other=0.0), DTYPE)


@triton.jit
def _rows_kernel(tile_layer, tile_start, w_tab, v_tab, rows_tab, cols_tab, ldw_tab, uoff_tab,
                 u_raw, u2_part, W_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr = False):
    # u2_part[t]: this tile's sum of u_raw^2, in float64 (a float32 square is exact there, and
    # tiny or huge entries neither underflow nor overflow)
    t = tl.program_id(0)
    layer = tl.load(tile_layer + t)
    r0 = tl.load(tile_start + t)
    rows = tl.load(rows_tab + layer)
    cols = tl.load(cols_tab + layer)
    ldw = tl.load(ldw_tab + layer)
    W = tl.load(w_tab + layer).to(tl.pointer_type(W_DTYPE), bitcast=True)
    v = tl.load(v_tab + layer).to(tl.pointer_type(tl.float32), bitcast=True)
    if ALIGNED:
        VEC: tl.constexpr = 128 // W_DTYPE.primitive_bitwidth
        W, ldw, cols = tl.multiple_of(W, 16), tl.multiple_of(ldw, VEC), tl.multiple_of(cols, VEC)
        v = tl.multiple_of(v, 16)
    r = r0 + tl.arange(0, BLOCK_R)
    rmask = r < rows
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < cols
        x = tl.load(v + c, mask=cmask, other=0.0)
        acc += _load_tile(W, ldw, r, rmask, c, cmask, W_DTYPE) * x[None, :]
    u_off = tl.load(uoff_tab + layer)
    u = tl.sum(acc, axis=1)     # 0 in the masked rows
    tl.store(u_raw + u_off + r, u, mask=rmask)
    u64 = u.to(tl.float64)
    tl.store(u2_part + t, tl.sum(u64 * u64, axis=0))


@triton.jit
def _cols_kernel(tile_layer, tile_start, tile_rstart, w_tab, rows_tab, cols_tab, ldw_tab,
                 uoff_tab, voff_tab, uq_start_tab, uq_count_tab, pstart_tab, nchunk_tab,
                 chunk_base_tab, u_raw, u2_part, v_prime, vp_part, u_norm, partial_v2,
                 W_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_P: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr = False):
    t = tl.program_id(0)
    layer = tl.load(tile_layer + t)
    c0 = tl.load(tile_start + t)
    rstart = tl.load(tile_rstart + t)
    rows = tl.load(rows_tab + layer)
    u_off = tl.load(uoff_tab + layer)
    v_off = tl.load(voff_tab + layer)
    nchunk = tl.load(nchunk_tab + layer)
    cols = tl.load(cols_tab + layer)
    ldw = tl.load(ldw_tab + layer)
    W = tl.load(w_tab + layer).to(tl.pointer_type(W_DTYPE), bitcast=True)
    if ALIGNED:   # (column tiles start at multiples of BLOCK_C)
        VEC: tl.constexpr = 128 // W_DTYPE.primitive_bitwidth
        W, ldw, cols = tl.multiple_of(W, 16), tl.multiple_of(ldw, VEC), tl.multiple_of(cols, VEC)
        c0, v_off = tl.multiple_of(c0, BLOCK_C), tl.multiple_of(v_off, 4)
    # ||u_raw|| from the row tiles' parts, summed in a fixed order (the same in every tile of
    # the layer); then v' = W^T (u_raw / ||u_raw||) with the normalized u, which keeps the
    # products in range
    # (kept in float64: a zero matrix gives u = 0, not NaN; a NaN norm propagates)
    nrm = _norm_of_parts(u2_part, tl.load(uq_start_tab + layer), tl.load(uq_count_tab + layer),
                         BLOCK_P)
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < cols
    r_end = rows
    if nchunk > 1:
        r_end = tl.minimum(rstart + CHUNK, rows)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(rstart, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < r_end
        u = _div(tl.load(u_raw + u_off + r, mask=rmask, other=0.0), nrm)
        acc += _load_tile(W, ldw, r, rmask, c, cmask, W_DTYPE) * u[:, None]
    vp = tl.sum(acc, axis=0)
    if nchunk == 1:
        tl.store(v_prime + v_off + c, vp, mask=cmask)
        vp64 = vp.to(tl.float64)
        tl.store(partial_v2 + tl.load(pstart_tab + layer) + c0 // BLOCK_C,
                 tl.sum(vp64 * vp64, axis=0))
    else:   # this chunk's part of v', summed by _cols_reduce_kernel
        part = tl.load(chunk_base_tab + layer) + (rstart // CHUNK) * cols
        tl.store(vp_part + part + c, vp, mask=cmask)
    if (c0 == 0) & (rstart == 0):
        tl.store(u_norm + layer, nrm)


@triton.jit
def _cols_reduce_kernel(tile_layer, tile_start, cols_tab, voff_tab, pstart_tab, nchunk_tab,
                        chunk_base_tab, vp_part, v_prime, partial_v2, BLOCK_C: tl.constexpr):
    # v' of a split layer's column block: its chunks' parts summed in chunk order, and its part
    # of ||v'||^2 (as _cols_kernel writes them for a layer of one chunk)
    t = tl.program_id(0)
    layer = tl.load(tile_layer + t)
    c0 = tl.load(tile_start + t)
    cols = tl.load(cols_tab + layer)
    n = tl.load(nchunk_tab + layer)
    base = tl.load(chunk_base_tab + layer)
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < cols
    vp = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k in range(0, n):
        vp += tl.load(vp_part + base + k * cols + c, mask=cmask, other=0.0)
    tl.store(v_prime + tl.load(voff_tab + layer) + c, vp, mask=cmask)
    vp64 = vp.to(tl.float64)
    tl.store(partial_v2 + tl.load(pstart_tab + layer) + c0 // BLOCK_C, tl.sum(vp64 * vp64, axis=0))


@triton.jit
def _finalize_kernel(tile_layer, tile_start, v_tab, g_tab, rows_tab, cols_tab, ldg_tab,
                     uoff_tab, voff_tab, pstart_tab, pcount_tab, layer_out, u_raw, v_prime,
                     u_norm, partial_v2, sigma_out, v_updated, lam, u_out,
                     G_DTYPE: tl.constexpr, UPDATE_GRAD: tl.constexpr,
                     TRACK_UPDATES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_P: tl.constexpr, WRITE_U: tl.constexpr = False,
                     FINALIZE: tl.constexpr = True, SCALE_PER_LAYER: tl.constexpr = False,
                     ACCUMULATE: tl.constexpr = True, ALIGNED: tl.constexpr = False):
    # UPDATE_GRAD: grad (+)= s * u v'^T over the tile's rows, s = lam (a float), or
    # lam[layer_out[layer]] with SCALE_PER_LAYER (lam is then a float32 pointer);
    # ACCUMULATE=False overwrites grad without reading it.  WRITE_U: u into u_out at the layer's
    # u offset (spectral_norms).  FINALIZE: sigma and v (the tile at row 0).
    t = tl.program_id(0)
    layer = tl.load(tile_layer + t)
    r0 = tl.load(tile_start + t)
    rows = tl.load(rows_tab + layer)
    cols = tl.load(cols_tab + layer)
    v_off = tl.load(voff_tab + layer)
    if ALIGNED:
        v_off = tl.multiple_of(v_off, 4)
    if UPDATE_GRAD or WRITE_U:
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < rows
        u_off = tl.load(uoff_tab + layer)
        u = _div(tl.load(u_raw + u_off + r, mask=rmask, other=0.0), tl.load(u_norm + layer))
        if WRITE_U:
            tl.store(u_out + u_off + r, u, mask=rmask)
    if UPDATE_GRAD:
        G = tl.load(g_tab + layer).to(tl.pointer_type(G_DTYPE), bitcast=True)
        ldg = tl.load(ldg_tab + layer)
        if ALIGNED:
            VEC: tl.constexpr = 128 // G_DTYPE.primitive_bitwidth
            G, ldg, cols = tl.multiple_of(G, 16), tl.multiple_of(ldg, VEC), tl.multiple_of(cols, VEC)
        if SCALE_PER_LAYER:
            u = u * tl.load(lam + tl.load(layer_out + layer))
        else:
            u = u * lam
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < cols
            m = rmask[:, None] & cmask[None, :]
            ptr = G + r[:, None].to(tl.int64) * ldg + c[None, :]
            vp = tl.load(v_prime + v_off + c, mask=cmask, other=0.0)
            if ACCUMULATE:
                g = _to_f32(tl.load(ptr, mask=m, other=0.0), G_DTYPE)
                tl.store(ptr, _round_to(g + u[:, None] * vp[None, :], G_DTYPE), mask=m)
            else:
                tl.store(ptr, _round_to(u[:, None] * vp[None, :], G_DTYPE), mask=m)
    if FINALIZE and r0 == 0:
        # sigma = ||v'|| from the column tiles' partial sums, in a fixed order
        sigma64 = _norm_of_parts(partial_v2, tl.load(pstart_tab + layer),
                                 tl.load(pcount_tab + layer), BLOCK_P)
        sigma = sigma64.to(tl.float32)
        tl.store(sigma_out + tl.load(layer_out + layer), sigma)
        # v = v' / sigma, unless sigma is 0 (zero matrix) or not finite (NaN/Inf weights)
        # (sigma * 0 == 0 is false for Inf and NaN)
        if (sigma > 0.0) & (sigma * 0.0 == 0.0):
            v = tl.load(v_tab + layer).to(tl.pointer_type(tl.float32), bitcast=True)
            if ALIGNED:
                v = tl.multiple_of(v, 16)
            for c0 in range(0, cols, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cmask = c < cols
                vp = tl.load(v_prime + v_off + c, mask=cmask, other=0.0)
                tl.store(v + c, _div(vp, sigma64), mask=cmask)
            if TRACK_UPDATES:   # the host writes a working copy of v back only where updated
                tl.store(v_updated + layer, 1)
