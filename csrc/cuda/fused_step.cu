// CUDA kernels of the fused spectral-norm step: every layer of one weight dtype per launch.
// No torch headers: binding.cpp prepares the tables and passes the stream.
//
// Semantics (spectral_ext/reference.py): u = normalize(W v); v' = W^T u; sigma = ||v'||;
// v = v' / sigma (kept when sigma is 0 or not finite); grad += lam * sigma * u v^T = lam * u v'^T.
//
// Work decomposition.  Each layer (rows x cols) is cut into tiles of rb_size rows x cb_size
// columns (about 64 KiB of W each, at most 1024 rows and 128 column groups); one thread block
// per tile, and the tiles of all layers form one grid, so the launch count does not grow with
// the number of layers.  Tall-skinny and short-wide layers both give many tiles.
//
//   rows_kernel    Pu[cb][r] = W[r, strip cb] . v[strip cb]        (warps along rows)
//                  the last tile of a row block to finish (atomic counter) sums Pu over the
//                  strips in a fixed order into u_raw and ||u_raw||^2 of the block; the last row
//                  block of a layer sums those into ||u_raw||.
//   cols_kernel    Pv[rb][c] = sum over the tile's rows of W[r, c] u[r], u = u_raw / ||u_raw||
//                  (threads along columns); the last tile of a column strip sums Pv over the row
//                  blocks into v' and ||v'||^2 of the strip; the last strip of a layer forms
//                  sigma and v = v' / sigma: into the caller's v after the last iteration, into
//                  the workspace (acc precision) before the others.
//   grad_kernel    G[r, c] += lam * u[r] * v'[c]   (only after the last iteration)
// spectral_norms (the differentiable op) runs the same memset and 2 * n_iter kernels without
// grad_kernel; the last cols_kernel writes u and the new v into per-call output buffers
// (StepArgs.u_out, v_out_*) instead of the caller's v.  Its backward is grad_kernel alone, one
// launch: G (+)= grad_sigma[l] * u v^T with grad_sigma read from device memory (no host sync)
// and u, v, G addressed through a table of that call.
// A step is a memset (counters and flags, per call) and 2 * n_iter + 1 kernels.  Every sum is
// taken in a fixed order (the "last block" only decides which block does it), so results do not
// depend on the order in which blocks run (the CPU emulation runs them in a random order), and a
// CUDA-graph replay equals the eager run.  Arithmetic is in float32 (float64 for float64
// weights); gradients are rounded to their dtype once.  Numerics over the whole range: squared
// norms are summed in float64, with an exponent kept aside for float64 values (SquareSum); u is
// u_raw divided by its norm in float64 (never times 1/||u_raw||, which overflows float32 below
// 3e-39), and normalized before W^T u, so there is no sigma^2 range limit; v = v' / sigma in
// float64.  16-byte vector loads where the layer's pointer, row stride and width allow (flags
// computed by the host).
//
// The grid visits tiles forward in one W pass and backward in the next, so the second pass
// starts on the tiles the first one read last (still in L2).

#ifdef SPECTRAL_EXT_EMULATE
#include "emulation.h"  // tests without a GPU: the same source on the CPU (emulated.cpp)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "fused_step_cuda.h"

#ifdef SPECTRAL_EXT_EMULATE
#define SPECTRAL_EXT_LAUNCH(kernel, grid, stream, ...) \
  ::spectral_ext::cuda::emu::launch(grid, kThreads, [&] { kernel(__VA_ARGS__); })
#else
#define SPECTRAL_EXT_LAUNCH(kernel, grid, stream, ...) \
  kernel<<<grid, kThreads, 0, stream>>>(__VA_ARGS__)
#endif

namespace spectral_ext {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC consecutive elements, loaded or stored as one access (16 bytes when VEC = 16/sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T x[VEC];
};

template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Explicit global-memory accesses (the pointers come from the table, so the compiler cannot tell
// their address space).  W is never written by these kernels: the read-only path (__ldg).  G is
// read and written once: streaming (__ldcs / __stcs), so it does not push W out of L2.
enum class Load { kReadOnly, kStreaming };

template <Load kind, typename X>
__device__ __forceinline__ X load_global(const X* p) {
  if constexpr (kind == Load::kReadOnly) {
    return __ldg(p);
  } else {
    return __ldcs(p);
  }
}

template <typename T, int VEC, Load kind>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  Pack<T, VEC> r;
  if constexpr (sizeof(r) == 16) {
    const uint4 u = load_global<kind>(reinterpret_cast<const uint4*>(p));
    memcpy(&r, &u, 16);
  } else {
    static_assert(VEC == 1, "a vector access is 16 bytes");
    r.x[0] = load_global<kind>(p);
  }
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_g(T* p, const Pack<T, VEC>& r) {
  if constexpr (sizeof(r) == 16) {
    uint4 u;
    memcpy(&u, &r, 16);
    __stcs(reinterpret_cast<uint4*>(p), u);
  } else {
    static_assert(VEC == 1, "a vector access is 16 bytes");
    __stcs(p, r.x[0]);
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int pow2_ceil(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Running sums of squares.  float32 values: a double sum (their squares cannot leave the double
// range).  float64 values: s * 2^(2e) with every term scaled by 2^-e, e the largest exponent so
// far (powers of two: exact), so 1e-170 or 1e160 square without under- or overflow.  NaN and Inf
// go into s and propagate.  combine() is commutative bit for bit, so a butterfly of shuffles
// gives every lane the same value.
template <typename acc_t> struct SqSum;

template <> struct SqSum<float> {
  double s = 0.0;
  __device__ __forceinline__ void add(float x) { s += static_cast<double>(x) * x; }
  __device__ __forceinline__ void add(const SquareSum& p) { s += p.s; }
  __device__ __forceinline__ void combine(const SqSum& o) { s += o.s; }
  __device__ __forceinline__ SqSum shfl_xor(int off) const {
    SqSum r;
    r.s = __shfl_xor_sync(0xffffffffu, s, off);
    return r;
  }
  __device__ __forceinline__ SquareSum pack() const { return SquareSum{s, 0, 0}; }
  __device__ __forceinline__ double norm() const { return sqrt(s); }
};

constexpr int kNoExponent = -8192;   // the exponent of an empty sum

template <> struct SqSum<double> {
  double s = 0.0;
  int e = kNoExponent;
  __device__ __forceinline__ void rescale_to(int e_new) {
    s = ldexp(s, 2 * (e - e_new));
    e = e_new;
  }
  __device__ __forceinline__ void add(double x) {
    if (!isfinite(x)) {
      s += x * x;       // NaN / Inf propagate
      return;
    }
    if (x == 0.0) return;
    int ex;
    frexp(x, &ex);
    if (ex > e) rescale_to(ex);
    const double y = ldexp(x, -e);
    s += y * y;
  }
  __device__ __forceinline__ void combine_raw(double os, int oe) {
    const int e_new = e > oe ? e : oe;
    s = ldexp(s, 2 * (e - e_new)) + ldexp(os, 2 * (oe - e_new));
    e = e_new;
  }
  __device__ __forceinline__ void add(const SquareSum& p) { combine_raw(p.s, p.e); }
  __device__ __forceinline__ void combine(const SqSum& o) { combine_raw(o.s, o.e); }
  __device__ __forceinline__ SqSum shfl_xor(int off) const {
    SqSum r;
    r.s = __shfl_xor_sync(0xffffffffu, s, off);
    r.e = __shfl_xor_sync(0xffffffffu, e, off);
    return r;
  }
  __device__ __forceinline__ SquareSum pack() const { return SquareSum{s, e, 0}; }
  __device__ __forceinline__ double norm() const { return ldexp(sqrt(s), e); }
};

// Another block's partial sum, read through L2 (see arrive_last).
__device__ __forceinline__ SquareSum load_cg(const SquareSum* p) {
  return SquareSum{__ldcg(&p->s), __ldcg(&p->e), 0};
}

// Combines the threads' sums over the block in a fixed order; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ SqSum<acc_t> block_sum(SqSum<acc_t> x,
                                                  SquareSum* red /* [kThreads / 32] */) {
  for (int off = 16; off > 0; off >>= 1) x.combine(x.shfl_xor(off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x.pack();
  __syncthreads();
  SqSum<acc_t> total;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total.add(red[w]);
  }
  __syncthreads();  // red may be reused
  return total;
}

// x / d in float64, rounded once to acc_t (0 when d is 0: a zero matrix).  Never x * (1 / d):
// for float32, 1 / d overflows when d < 3e-39.
template <typename acc_t>
__device__ __forceinline__ acc_t div_by(acc_t x, double d) {
  return d == 0.0 ? acc_t(0) : static_cast<acc_t>(static_cast<double>(x) / d);
}

// The "last block" step: every thread has written its results; returns (in every thread)
// whether this block is the n-th and last to arrive at *counter, and resets the counter if so.
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int n, bool* flag) {
  __threadfence();  // this thread's writes are visible device-wide before the block arrives
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int ticket = atomicAdd(counter, 1u);
    *flag = ticket == n - 1;
    if (*flag) *counter = 0;  // every other block of this counter has arrived
  }
  __syncthreads();
  const bool last = *flag;
  if (last) __threadfence();  // order the reads of the other blocks' results after the ticket
  return last;
}

// The end of a layer's pass, in its last block: every thread's results are visible device-wide
// before the layer's pass count moves (step_kernel's tiles of the next pass wait on it).
__device__ __forceinline__ void publish(unsigned int* done) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(done, 1u);
}

// Until *done >= need (step_kernel): thread 0 polls, then orders the block's reads after it.
// In the emulation blocks run one after the other, so a wait that is not already satisfied
// would never end: it is reported as a launch failure instead.  False: give up the kernel.
__device__ __forceinline__ bool wait_for(unsigned int* done, unsigned int need) {
#ifdef SPECTRAL_EXT_EMULATE
  if (*done < need) {
    emu::g_error = cudaErrorLaunchFailure;
    return false;
  }
#else
  if (threadIdx.x == 0) {
    // a volatile load reads L2 (no read-modify-write on counters that neighbour each other)
    while (*static_cast<volatile unsigned int*>(done) < need) __nanosleep(32);
    __threadfence();
  }
#endif
  __syncthreads();
  return true;
}

// The "last block" sums: out[i] = sum over k < n of P[k * ld + i] for every i < m (n partial sums
// of m values each, written by other blocks: read through L2), by the whole block in a fixed
// order, and ss += the squares of the out[i].  TX threads along i (consecutive i: coalesced), TY = kThreads / TX along k,
// TY = min(pow2 >= n, kThreads / min(32, pow2 >= m)), so a narrow or a deep sum still uses every
// thread.  Thread (tx, ty) sums k = ty, ty + TY, ... into four accumulators (k-th term into
// accumulator k % 4: four independent loads in flight), adds them as (a0 + a1) + (a2 + a3), and
// a fixed-shape tree in shared memory adds the TY partials (ty + s into ty, s = TY/2, ..., 1).
// The shape depends only on n and m, never on which block runs it or when: the bits do not
// depend on block scheduling.  The ty = 0 thread of each i writes out[i] and adds it to its ss
// (in increasing i; block_sum then combines the threads' ss).  red_s: kThreads values; every
// thread must call this (it synchronizes).
template <typename acc_t>
__device__ __forceinline__ void sum_partials(const acc_t* P, int64_t ld, int n, int m,
                                             acc_t* red_s, acc_t* out, SqSum<acc_t>& ss) {
  const int ty_n = min(pow2_ceil(n), kThreads / min(32, pow2_ceil(m)));
  const int tx_n = kThreads / ty_n;
  const int tx = threadIdx.x % tx_n, ty = threadIdx.x / tx_n;
  for (int base = 0; base < m; base += tx_n) {  // the same trip count in every thread
    const int i = base + tx;
    acc_t x = 0;
    if (i < m) {
      const acc_t* p = P + i;
      const int64_t step = static_cast<int64_t>(ty_n) * ld;
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int k = ty;
      for (; k + 3 * ty_n < n; k += 4 * ty_n) {
        const acc_t* q = p + static_cast<int64_t>(k) * ld;
        a0 += __ldcg(q);
        a1 += __ldcg(q + step);
        a2 += __ldcg(q + 2 * step);
        a3 += __ldcg(q + 3 * step);
      }
      if (k < n) a0 += __ldcg(p + static_cast<int64_t>(k) * ld);
      if (k + ty_n < n) a1 += __ldcg(p + static_cast<int64_t>(k + ty_n) * ld);
      if (k + 2 * ty_n < n) a2 += __ldcg(p + static_cast<int64_t>(k + 2 * ty_n) * ld);
      x = (a0 + a1) + (a2 + a3);
    }
    if (ty_n > 1) {  // the same in every thread
      red_s[threadIdx.x] = x;  // = red_s[ty * tx_n + tx]
      __syncthreads();
      for (int s = ty_n / 2; s > 0; s >>= 1) {
        if (ty < s) red_s[threadIdx.x] += red_s[threadIdx.x + s * tx_n];
        __syncthreads();
      }
      x = red_s[threadIdx.x];  // the total in the ty = 0 threads
    }
    if (ty == 0 && i < m) {
      out[i] = x;
      ss.add(x);
    }
  }
}

// This block's tile: its layer, first row r0 and row count rn, first column c0 and width cn.
struct TileSpan {
  Tile tile;
  const LayerDesc* layer;
  int64_t r0;
  int rn;
  int64_t c0;
  int cn;
};

__device__ __forceinline__ TileSpan tile_span(const StepArgs& a, bool reverse, int block) {
  const int t = reverse ? a.n_tiles - 1 - block : block;
  const Tile tile = a.tiles[t];
  const LayerDesc* L = a.layers + tile.layer;
  const int64_t r0 = static_cast<int64_t>(tile.rb) * L->rb_size;
  const int64_t c0 = static_cast<int64_t>(tile.cb) * L->cb_size;
  return TileSpan{tile, L, r0, static_cast<int>(min64(L->rb_size, L->rows - r0)), c0,
                  static_cast<int>(min64(L->cb_size, L->cols - c0))};
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_v(const LayerDesc& L, int64_t c) {
  return L.v_double ? static_cast<acc_t>(static_cast<const double*>(L.v)[c * L.vstride])
                    : static_cast<acc_t>(static_cast<const float*>(L.v)[c * L.vstride]);
}

template <typename acc_t>
__device__ __forceinline__ void store_v(const LayerDesc& L, int64_t c, acc_t x) {
  if (L.v_double) {
    static_cast<double*>(L.v)[c * L.vstride] = static_cast<double>(x);
  } else {
    static_cast<float*>(L.v)[c * L.vstride] = static_cast<float>(x);
  }
}

// spectral_norms: the new v into the output buffer of v's dtype, and the caller's v copied there
// bit for bit (a v that no iteration updated)
template <typename acc_t>
__device__ __forceinline__ void store_v_out(const StepArgs& a, const LayerDesc& L, int64_t c,
                                            acc_t x) {
  if (L.v_double) {
    static_cast<double*>(a.v_out_d)[L.v_off + c] = static_cast<double>(x);
  } else {
    static_cast<float*>(a.v_out_f)[L.v_off + c] = static_cast<float>(x);
  }
}

__device__ __forceinline__ void copy_v_out(const StepArgs& a, const LayerDesc& L, int64_t c) {
  if (L.v_double) {
    static_cast<double*>(a.v_out_d)[L.v_off + c] = static_cast<const double*>(L.v)[c * L.vstride];
  } else {
    static_cast<float*>(a.v_out_f)[L.v_off + c] = static_cast<const float*>(L.v)[c * L.vstride];
  }
}

// ---- phase 1: u_raw = W v --------------------------------------------------------------------

// Partial dot products of the tile's rows with v_s (the tile's slice of v).  LPR lanes per row
// (a power of two <= 32, so the shuffles stay inside aligned lane groups); the row loop bound is
// the same for every thread, so every lane of a warp reaches every shuffle.
template <typename T, int VEC>
__device__ __forceinline__ void rows_tile(const LayerDesc& L, int64_t r0, int rn, int64_t c0,
                                          int cn, const typename Acc<T>::type* v_s,
                                          typename Acc<T>::type* pu_out) {
  using acc_t = typename Acc<T>::type;
  const T* W = static_cast<const T*>(L.W);
  const int groups = (cn + VEC - 1) / VEC;
  const int lpr = min(32, pow2_ceil(groups));
  const int per_pass = kThreads / lpr;
  const int lane = threadIdx.x % lpr, slot = threadIdx.x / lpr;
  for (int base = 0; base < rn; base += per_pass) {
    const int r = base + slot;
    acc_t acc = 0;
    if (r < rn) {
      const T* row = W + (r0 + r) * L.ldw;
#pragma unroll 4
      for (int g = lane; g < groups; g += lpr) {
        const int c = g * VEC;
        if constexpr (VEC > 1) {
          const Pack<T, VEC> p = load_pack<T, VEC, Load::kReadOnly>(row + c0 + c);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc += to_acc(p.x[k]) * v_s[c + k];
        } else {
          acc += to_acc(load_pack<T, 1, Load::kReadOnly>(row + (c0 + c) * L.scw).x[0]) * v_s[c];
        }
      }
    }
    for (int off = lpr / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (r < rn && lane == 0) pu_out[r] = acc;
  }
}

// One tile of phase 1: the tile of position `block` in this pass's visiting order.
template <typename T>
__device__ __forceinline__ void rows_phase(const StepArgs& a, bool reverse, int block) {
  using acc_t = typename Acc<T>::type;
  constexpr int VEC = kVec<T>;
  __shared__ acc_t v_s[kMaxStripGroups * VEC];
  __shared__ acc_t red_s[kThreads];
  __shared__ SquareSum red[kThreads / 32];
  __shared__ bool flag;

  const auto [tile, layer, r0, rn, c0, cn] = tile_span(a, reverse, block);
  const LayerDesc& L = *layer;

  // v: the caller's, or the one an earlier iteration of this call left in the workspace (in the
  // accumulation type: a float64 layer's v is not rounded to a float32 v between iterations)
  if (a.updated[tile.layer]) {
    const acc_t* vc = static_cast<const acc_t*>(a.vcur) + L.v_off + c0;
    for (int c = threadIdx.x; c < cn; c += kThreads) v_s[c] = vc[c];
  } else {
    for (int c = threadIdx.x; c < cn; c += kThreads) v_s[c] = load_v<acc_t>(L, c0 + c);
  }
  __syncthreads();
  acc_t* Pu = static_cast<acc_t*>(a.Pu) + L.pu_off + tile.cb * L.rows + r0;
  if (L.wvec) {
    rows_tile<T, VEC>(L, r0, rn, c0, cn, v_s, Pu);
  } else {
    rows_tile<T, 1>(L, r0, rn, c0, cn, v_s, Pu);
  }

  // the row block's last tile: u_raw = sum over strips (sum_partials), and its ||u_raw||^2
  const int rb_global = L.rb_base + tile.rb;
  if (!arrive_last(a.cnt_rb + rb_global, L.n_cb, &flag)) return;
  const acc_t* Pu_rows = static_cast<const acc_t*>(a.Pu) + L.pu_off + r0;
  acc_t* u_raw = static_cast<acc_t*>(a.u_raw) + L.u_off + r0;
  SqSum<acc_t> ss;
  sum_partials<acc_t>(Pu_rows, L.rows, L.n_cb, rn, red_s, u_raw, ss);
  ss = block_sum(ss, red);
  if (threadIdx.x == 0) a.pu2[rb_global] = ss.pack();

  // the layer's last row block: ||u_raw|| (0 for a zero matrix, whose u is 0; NaN propagates)
  if (!arrive_last(a.cnt_layer_a + tile.layer, L.n_rb, &flag)) return;
  SqSum<acc_t> s;
  for (int b = threadIdx.x; b < L.n_rb; b += kThreads) s.add(load_cg(a.pu2 + L.rb_base + b));
  s = block_sum(s, red);
  if (threadIdx.x == 0) a.unrm[tile.layer] = s.norm();
  publish(a.done_a + tile.layer);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_kernel(StepArgs a, bool reverse) {
  rows_phase<T>(a, reverse, static_cast<int>(blockIdx.x));
}

// ---- phase 2: v' = W^T u ---------------------------------------------------------------------

// Partial sums over the tile's rows for each column: TX threads along the column groups (one
// group each: groups <= kMaxStripGroups <= TX), TY = kThreads / TX along the rows, then the TY
// partials are summed in a fixed order through shared memory.
template <typename T, int VEC>
__device__ __forceinline__ void cols_tile(const LayerDesc& L, int64_t r0, int rn, int64_t c0,
                                          int cn, const typename Acc<T>::type* u_s,
                                          typename Acc<T>::type* red_s,
                                          typename Acc<T>::type* pv_out) {
  using acc_t = typename Acc<T>::type;
  const T* W = static_cast<const T*>(L.W);
  const int groups = (cn + VEC - 1) / VEC;
  const int tx_n = pow2_ceil(groups);
  const int ty_n = kThreads / tx_n;
  const int tx = threadIdx.x % tx_n, ty = threadIdx.x / tx_n;
  acc_t acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0;
  if (tx < groups) {
    const int c = tx * VEC;
#pragma unroll 4
    for (int r = ty; r < rn; r += ty_n) {
      const T* row = W + (r0 + r) * L.ldw;
      const acc_t u = u_s[r];
      if constexpr (VEC > 1) {
        const Pack<T, VEC> p = load_pack<T, VEC, Load::kReadOnly>(row + c0 + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += to_acc(p.x[k]) * u;
      } else {
        acc[0] += to_acc(load_pack<T, 1, Load::kReadOnly>(row + (c0 + c) * L.scw).x[0]) * u;
      }
    }
  }
  const int width = tx_n * VEC;
#pragma unroll
  for (int k = 0; k < VEC; ++k) red_s[ty * width + tx * VEC + k] = acc[k];
  __syncthreads();
  for (int c = threadIdx.x; c < cn; c += kThreads) {
    acc_t s = 0;
    for (int y = 0; y < ty_n; ++y) s += red_s[y * width + c];
    pv_out[c] = s;
  }
}

template <typename T>
__device__ __forceinline__ void cols_phase(const StepArgs& a, bool reverse, int block, bool last) {
  using acc_t = typename Acc<T>::type;
  constexpr int VEC = kVec<T>;
  __shared__ acc_t u_s[kMaxTileRows];
  __shared__ acc_t red_s[kThreads * VEC];
  __shared__ SquareSum red[kThreads / 32];
  __shared__ bool flag;

  const auto [tile, layer, r0, rn, c0, cn] = tile_span(a, reverse, block);
  const LayerDesc& L = *layer;

  const double nrm = a.unrm[tile.layer];
  const acc_t* u_raw = static_cast<const acc_t*>(a.u_raw) + L.u_off + r0;
  for (int r = threadIdx.x; r < rn; r += kThreads) u_s[r] = div_by(u_raw[r], nrm);
  // spectral_norms: the final u, written once per row block (by its first strip's tile)
  const bool norms = a.u_out != nullptr;
  if (norms && last && tile.cb == 0) {
    acc_t* u_out = static_cast<acc_t*>(a.u_out) + L.u_off + r0;
    for (int r = threadIdx.x; r < rn; r += kThreads) u_out[r] = u_s[r];
  }
  __syncthreads();
  acc_t* Pv = static_cast<acc_t*>(a.Pv) + L.pv_off + tile.rb * L.cols + c0;
  if (L.wvec) {
    cols_tile<T, VEC>(L, r0, rn, c0, cn, u_s, red_s, Pv);
  } else {
    cols_tile<T, 1>(L, r0, rn, c0, cn, u_s, red_s, Pv);
  }

  // the column strip's last tile: v' = sum over row blocks (sum_partials: red_s is free again
  // after arrive_last's barrier), and its ||v'||^2
  const int cb_global = L.cb_base + tile.cb;
  if (!arrive_last(a.cnt_cb + cb_global, L.n_rb, &flag)) return;
  const acc_t* Pv_cols = static_cast<const acc_t*>(a.Pv) + L.pv_off + c0;
  acc_t* vp = static_cast<acc_t*>(a.vp) + L.v_off;
  SqSum<acc_t> ss;
  sum_partials<acc_t>(Pv_cols, L.cols, L.n_rb, cn, red_s, vp + c0, ss);
  ss = block_sum(ss, red);
  if (threadIdx.x == 0) a.pv2[cb_global] = ss.pack();

  // the layer's last strip: sigma = ||v'||, and v = v' / sigma
  if (!arrive_last(a.cnt_layer_b + tile.layer, L.n_cb, &flag)) return;
  SqSum<acc_t> s;
  for (int b = threadIdx.x; b < L.n_cb; b += kThreads) s.add(load_cg(a.pv2 + L.cb_base + b));
  s = block_sum(s, red);
  __shared__ double sigma_s;
  if (threadIdx.x == 0) {
    sigma_s = s.norm();
    if (a.sigma_double) {
      static_cast<double*>(a.sigma)[L.out] = sigma_s;
    } else {
      static_cast<float*>(a.sigma)[L.out] = static_cast<float>(sigma_s);
    }
  }
  __syncthreads();
  const double sigma = sigma_s;
  // v = v' / sigma, kept when sigma is 0 (zero matrix) or not finite (NaN/Inf weights): between
  // iterations in the workspace (`updated` tells the next rows_kernel), after the last one in
  // the caller's v, which is written only if some iteration gave a new v (so a kept v stays
  // exactly what it was, in its own dtype).  spectral_norms writes the output v instead: the
  // new one, or the caller's copied bit for bit.
  acc_t* vc = static_cast<acc_t*>(a.vcur) + L.v_off;
  if (sigma > 0.0 && isfinite(sigma)) {
    for (int64_t c = threadIdx.x; c < L.cols; c += kThreads) {
      const acc_t x = div_by(__ldcg(vp + c), sigma);
      if (!last) {
        vc[c] = x;
      } else if (norms) {
        store_v_out<acc_t>(a, L, c, x);
      } else {
        store_v<acc_t>(L, c, x);
      }
    }
    if (!last && threadIdx.x == 0) a.updated[tile.layer] = 1;
  } else if (last && a.updated[tile.layer]) {
    for (int64_t c = threadIdx.x; c < L.cols; c += kThreads) {
      if (norms) {
        store_v_out<acc_t>(a, L, c, __ldcg(vc + c));
      } else {
        store_v<acc_t>(L, c, __ldcg(vc + c));
      }
    }
  } else if (last && norms) {
    for (int64_t c = threadIdx.x; c < L.cols; c += kThreads) copy_v_out(a, L, c);
  }
  publish(a.done_b + tile.layer);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cols_kernel(StepArgs a, bool reverse, bool last) {
  cols_phase<T>(a, reverse, static_cast<int>(blockIdx.x), last);
}

// ---- phase 3: grad += lam * u v'^T -----------------------------------------------------------
// (spectral_norms' backward: grad (+)= grad_sigma[l] * u v^T, u and v from the table)

template <typename T, int VEC>
__device__ __forceinline__ void grad_tile(const LayerDesc& L, int64_t r0, int rn, int64_t c0,
                                          int cn, const typename Acc<T>::type* a_s,
                                          const typename Acc<T>::type* vp_s, bool accumulate) {
  using acc_t = typename Acc<T>::type;
  T* G = static_cast<T*>(L.G);
  const int groups = (cn + VEC - 1) / VEC;
  const int tx_n = min(kThreads, pow2_ceil(groups));
  const int ty_n = kThreads / tx_n;
  const int tx = threadIdx.x % tx_n, ty = threadIdx.x / tx_n;
  for (int g = tx; g < groups; g += tx_n) {
    const int c = g * VEC;
#pragma unroll 4
    for (int r = ty; r < rn; r += ty_n) {
      T* row = G + (r0 + r) * L.ldg;
      const acc_t ar = a_s[r];
      T* e = VEC > 1 ? row + c0 + c : row + (c0 + c) * L.scg;
      Pack<T, VEC> p;
      if (accumulate) {
        p = load_pack<T, VEC, Load::kStreaming>(e);
#pragma unroll
        for (int k = 0; k < VEC; ++k) p.x[k] = from_acc<T>(to_acc(p.x[k]) + ar * vp_s[c + k]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) p.x[k] = from_acc<T>(ar * vp_s[c + k]);
      }
      store_g<T, VEC>(e, p);
    }
  }
}

template <typename T>
__device__ __forceinline__ void grad_phase(const StepArgs& a, int block) {
  using acc_t = typename Acc<T>::type;
  constexpr int VEC = kVec<T>;
  __shared__ acc_t a_s[kMaxTileRows];
  __shared__ acc_t vp_s[kMaxStripGroups * VEC];

  const auto [tile, layer, r0, rn, c0, cn] = tile_span(a, false, block);
  const LayerDesc& L = *layer;

  if (a.grad_scale != nullptr) {
    // spectral_norms' backward: grad_sigma[l] rounded to acc_t (as the reference's
    // grad_sigma.to(u.dtype)), u from L.W, v from L.v (rounded to acc_t)
    const acc_t s = a.scale_double
                        ? static_cast<acc_t>(static_cast<const double*>(a.grad_scale)[L.out])
                        : static_cast<acc_t>(static_cast<const float*>(a.grad_scale)[L.out]);
    const acc_t* u = static_cast<const acc_t*>(L.W) + r0;
    for (int r = threadIdx.x; r < rn; r += kThreads) a_s[r] = s * u[r];
    for (int c = threadIdx.x; c < cn; c += kThreads) vp_s[c] = load_v<acc_t>(L, c0 + c);
  } else {
    const double nrm = a.unrm[tile.layer];
    const acc_t* u_raw = static_cast<const acc_t*>(a.u_raw) + L.u_off + r0;
    const acc_t* vp = static_cast<const acc_t*>(a.vp) + L.v_off + c0;
    for (int r = threadIdx.x; r < rn; r += kThreads) {
      a_s[r] = static_cast<acc_t>(a.lam * static_cast<double>(div_by(u_raw[r], nrm)));
    }
    for (int c = threadIdx.x; c < cn; c += kThreads) vp_s[c] = vp[c];
  }
  __syncthreads();
  const bool accumulate = a.accumulate != 0;
  if (L.gvec) {
    grad_tile<T, VEC>(L, r0, rn, c0, cn, a_s, vp_s, accumulate);
  } else {
    grad_tile<T, 1>(L, r0, rn, c0, cn, a_s, vp_s, accumulate);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_kernel(StepArgs a) {
  grad_phase<T>(a, static_cast<int>(blockIdx.x));
}

// ---- one launch per step (LaunchMode::kPersistent) ---------------------------------------------
//
// The same tiles and phases in one kernel of as many blocks as fit on the GPU at once.  Each
// block takes tickets from a counter: ticket k is tile k % n_tiles of pass k / n_tiles, the
// passes in launch order (rows, columns per iteration, then the gradient), every pass visited
// forward (largest layers first: the first column tiles are those of the layers whose row tiles
// were handed out first, so they wait least; the phases' backward second pass, for L2 reuse,
// would start on the layers that were handed out last).  A tile first waits until its layer finished the pass before (done_a:
// row passes complete, done_b: column passes complete, counted by the layer's last block of
// each pass after its results are written).  Tickets are taken in increasing order, and a tile
// waits only on tiles of an earlier pass, i.e. lower tickets, all taken by blocks already
// running: the lowest unfinished ticket never waits, so the schedule cannot deadlock, whether
// or not every block of the grid is resident.  The sums are the phases' own (fixed order):
// results are bitwise those of the kernel-per-phase launches.  Data another block wrote during
// the kernel is read after an acquire (wait_for) through coherent loads; only W, never written,
// goes through the read-only path.
// What ticket k waits for: its layer's count of completed row passes (done_a) or column passes
// (done_b) reaching `need` (need 0: nothing).
struct Need {
  unsigned int* done;
  unsigned int need;
};

__device__ __forceinline__ Need ticket_need(const StepArgs& a, unsigned int k, int n_iter) {
  const unsigned int per = static_cast<unsigned int>(a.n_tiles);
  const unsigned int pass = k / per, it = pass / 2;
  const int layer = a.tiles[k % per].layer;
  if (pass == 2u * static_cast<unsigned int>(n_iter)) {  // the gradient: after the last column pass
    return Need{a.done_b + layer, static_cast<unsigned int>(n_iter)};
  }
  if (pass % 2 == 0) return Need{a.done_b + layer, it};  // rows: after the column pass before
  return Need{a.done_a + layer, it + 1};                  // columns: after their row pass
}

template <typename T>
__device__ __forceinline__ void run_ticket(const StepArgs& a, unsigned int k, int n_iter) {
  const unsigned int per = static_cast<unsigned int>(a.n_tiles);
  const unsigned int pass = k / per;
  const int i = static_cast<int>(k % per);
  if (pass == 2u * static_cast<unsigned int>(n_iter)) {
    grad_phase<T>(a, i);
  } else if (pass % 2 == 0) {
    rows_phase<T>(a, false, i);
  } else {
    cols_phase<T>(a, false, i, pass / 2 + 1 == static_cast<unsigned int>(n_iter));
  }
}

#ifdef SPECTRAL_EXT_EMULATE
// The emulation runs blocks one after the other, so the tickets would run in counter order and
// no wait could ever matter.  With a block-order seed the first block instead runs every ticket
// in a random order among those whose wait is satisfied: any interleaving of tiles across
// passes and layers that the waits allow on a GPU.  A tile that depends on something the waits
// do not cover then changes the results (the tests compare them with the phases' bits).
template <typename T>
void emulated_schedule(const StepArgs& a, int n_iter, unsigned int total) {
  __shared__ unsigned int pick_s;
  static std::vector<char> taken;
  static uint64_t rng = 0;
  if (threadIdx.x == 0) {
    pick_s = atomicAdd(a.ticket, total);   // 0 in the first block, which claims every ticket
    taken.assign(total, 0);
    rng = emu::g_order_seed ^ (static_cast<uint64_t>(emu::g_launches) * 0x9E3779B97F4A7C15ull);
  }
  __syncthreads();
  if (pick_s != 0) return;
  __syncthreads();
  for (unsigned int n = 0; n < total; ++n) {
    if (threadIdx.x == 0) {
      std::vector<unsigned int> ready;
      for (unsigned int k = 0; k < total; ++k) {
        if (taken[k]) continue;
        const Need w = ticket_need(a, k, n_iter);
        if (*w.done >= w.need) ready.push_back(k);
      }
      if (ready.empty()) {   // a wait no ticket can satisfy: a deadlock on a GPU
        emu::g_error = cudaErrorLaunchFailure;
        pick_s = UINT_MAX;
      } else {
        pick_s = ready[emu::splitmix64(rng) % ready.size()];
        taken[pick_s] = 1;
      }
    }
    __syncthreads();
    const unsigned int k = pick_s;
    __syncthreads();
    if (k == UINT_MAX) return;
    run_ticket<T>(a, k, n_iter);
  }
}
#endif

template <typename T>
__global__ void __launch_bounds__(kThreads) step_kernel(StepArgs a, int n_iter, bool grad) {
  __shared__ unsigned int ticket_s;
  const unsigned int per = static_cast<unsigned int>(a.n_tiles);
  const unsigned int total = per * (2u * static_cast<unsigned int>(n_iter) + (grad ? 1u : 0u));
#ifdef SPECTRAL_EXT_EMULATE
  if (emu::g_order_seed != 0) {
    emulated_schedule<T>(a, n_iter, total);
    return;
  }
#endif
  for (;;) {
    if (threadIdx.x == 0) ticket_s = atomicAdd(a.ticket, 1u);
    __syncthreads();
    const unsigned int k = ticket_s;
    __syncthreads();  // read by every thread before thread 0 takes the next one
    if (k >= total) return;
    const Need w = ticket_need(a, k, n_iter);
    if (w.need > 0 && !wait_for(w.done, w.need)) return;
    run_ticket<T>(a, k, n_iter);
  }
}

#ifdef SPECTRAL_EXT_EMULATE
cudaError_t zero_async(void* p, int64_t bytes, cudaStream_t) {
  if (emu::g_device != emu::g_tensor_device) return cudaErrorInvalidResourceHandle;
  std::memset(p, 0, static_cast<size_t>(bytes));
  return cudaSuccess;
}
#else
cudaError_t zero_async(void* p, int64_t bytes, cudaStream_t stream) {
  return cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), stream);
}
#endif

std::atomic<int> g_launch_mode{static_cast<int>(LaunchMode::kPhases)};

// step_kernel's grid: the blocks that fit on the current device at once (its SM count times
// the kernel's occupancy, asked once per device and dtype), at most one per ticket.  The
// emulation runs blocks one after the other: a few, of which the first takes every ticket.
template <typename T>
unsigned int persistent_grid(int64_t tickets) {
#ifdef SPECTRAL_EXT_EMULATE
  return static_cast<unsigned int>(std::min<int64_t>(tickets, 3));
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int> fit[kMaxDevices];   // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  int n = fit[device].load(std::memory_order_relaxed);
  if (n == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel<T>, kThreads, 0) !=
            cudaSuccess) {
      return 0;
    }
    n = std::max(1, sms * per_sm);
    fit[device].store(n, std::memory_order_relaxed);
  }
  return static_cast<unsigned int>(std::min<int64_t>(tickets, n));
#endif
}

// grad: the gradient kernel after the iterations (fused_step), or not (spectral_norms)
template <typename T>
cudaError_t launch_all(const StepArgs& a, int n_iter, cudaStream_t stream, bool grad) {
  const unsigned int grid = static_cast<unsigned int>(a.n_tiles);
  if (cudaError_t e = zero_async(a.zero_begin, a.zero_bytes, stream); e != cudaSuccess) return e;
  const int64_t tickets = int64_t{a.n_tiles} * (2 * int64_t{n_iter} + (grad ? 1 : 0));
  if (launch_mode() == LaunchMode::kPersistent) {
    const unsigned int blocks = persistent_grid<T>(tickets);
    if (blocks == 0) return cudaErrorInvalidDevice;
    // every block takes one ticket past the last: the 32-bit counter must not wrap (else late
    // blocks would take tickets of the first pass again); beyond that, the phases
    if (tickets + blocks <= int64_t{UINT_MAX}) {
      SPECTRAL_EXT_LAUNCH(step_kernel<T>, blocks, stream, a, n_iter, grad);
      return cudaGetLastError();
    }
  }
  bool reverse = false;  // alternate the direction of consecutive passes over W (L2 reuse)
  for (int it = 0; it < n_iter; ++it) {
    SPECTRAL_EXT_LAUNCH(rows_kernel<T>, grid, stream, a, reverse);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    reverse = !reverse;
    SPECTRAL_EXT_LAUNCH(cols_kernel<T>, grid, stream, a, reverse, it == n_iter - 1);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    reverse = !reverse;
  }
  if (!grad) return cudaSuccess;
  SPECTRAL_EXT_LAUNCH(grad_kernel<T>, grid, stream, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad(const StepArgs& a, cudaStream_t stream) {
  const unsigned int grid = static_cast<unsigned int>(a.n_tiles);
  SPECTRAL_EXT_LAUNCH(grad_kernel<T>, grid, stream, a);
  return cudaGetLastError();
}

}  // namespace

void set_launch_mode(LaunchMode mode) {
  g_launch_mode.store(static_cast<int>(mode), std::memory_order_relaxed);
}
LaunchMode launch_mode() {
  return static_cast<LaunchMode>(g_launch_mode.load(std::memory_order_relaxed));
}

namespace {
// f(T{}) for the element type T of dtype dt
template <typename F>
cudaError_t with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t launch_fused_step(const StepArgs& args, int n_iter, cudaStream_t stream) {
  return with_dtype(args.dtype, [&](auto t) {
    return launch_all<decltype(t)>(args, n_iter, stream, true);
  });
}

cudaError_t launch_spectral_norms(const StepArgs& args, int n_iter, cudaStream_t stream) {
  return with_dtype(args.dtype, [&](auto t) {
    return launch_all<decltype(t)>(args, n_iter, stream, false);
  });
}

cudaError_t launch_norms_backward(const StepArgs& args, cudaStream_t stream) {
  return with_dtype(args.dtype, [&](auto t) { return launch_grad<decltype(t)>(args, stream); });
}

#ifdef SPECTRAL_EXT_EMULATE
namespace {
bool g_capturing = false;
std::vector<std::pair<void*, void (*)(void*)>> g_graph_objects;   // owned by "graphs"
}  // namespace

int64_t emulated_launches() { return emu::g_launches; }
void emulate_skip_kernels(bool skip) { emu::g_skip_kernels = skip; }
void emulate_block_order(uint64_t seed) { emu::g_order_seed = seed; }
uint64_t emulated_last_order_hash() { return emu::g_last_order_hash; }
void emulate_fail_after(int64_t n_blocks) { emu::g_fail_after = n_blocks; }
void emulate_capture(bool on) { g_capturing = on; }
int64_t emulate_destroy_graphs() {
  const int64_t n = static_cast<int64_t>(g_graph_objects.size());
  for (auto& [object, release] : g_graph_objects) release(object);
  g_graph_objects.clear();
  return n;
}
void emulate_tensor_device(int device) { emu::g_tensor_device = device; }
int emulated_runtime_device() { return emu::g_device; }

cudaError_t exchange_device(int device, int* previous) {
  *previous = emu::g_device;
  emu::g_device = device;
  return cudaSuccess;
}
cudaError_t set_device(int device) {
  emu::g_device = device;
  return cudaSuccess;
}
bool stream_is_capturing(cudaStream_t) { return g_capturing; }
cudaError_t retain_for_graph(cudaStream_t, void* object, void (*release)(void*)) {
  if (!g_capturing) return cudaErrorStreamCaptureImplicit;
  g_graph_objects.emplace_back(object, release);
  return cudaSuccess;
}
cudaError_t record_event(cudaStream_t, void** event) {
  *event = nullptr;
  // an event created on one device and recorded on a stream of another fails on a GPU
  return emu::g_device == emu::g_tensor_device ? cudaSuccess : cudaErrorInvalidResourceHandle;
}
cudaError_t wait_event(cudaStream_t, void*) { return cudaSuccess; }
void destroy_event(void*) {}
void runtime_info(int* runtime_version, int* driver_version, int* device_count) {
  *runtime_version = *driver_version = *device_count = 0;
}
#else
cudaError_t exchange_device(int device, int* previous) {
  if (cudaError_t e = cudaGetDevice(previous); e != cudaSuccess) return e;
  return *previous == device ? cudaSuccess : cudaSetDevice(device);
}

cudaError_t set_device(int device) { return cudaSetDevice(device); }

cudaError_t retain_for_graph(cudaStream_t stream, void* object, void (*release)(void*)) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  if (cudaError_t e = cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph); e != cudaSuccess) {
    return e;
  }
  if (status != cudaStreamCaptureStatusActive || graph == nullptr) return cudaErrorIllegalState;
  cudaUserObject_t handle = nullptr;
  if (cudaError_t e = cudaUserObjectCreate(&handle, object, release, 1,
                                           cudaUserObjectNoDestructorSync);
      e != cudaSuccess) {
    return e;
  }
  // the graph takes our reference; executable graphs instantiated from it take their own
  return cudaGraphRetainUserObject(graph, handle, 1, cudaGraphUserObjectMove);
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return status != cudaStreamCaptureStatusNone;
}

cudaError_t record_event(cudaStream_t stream, void** event) {
  cudaEvent_t e = nullptr;
  if (cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming); err != cudaSuccess) {
    return err;
  }
  *event = e;
  return cudaEventRecord(e, stream);
}

cudaError_t wait_event(cudaStream_t stream, void* event) {
  return cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(event), 0);
}

void destroy_event(void* event) {
  if (event != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

void runtime_info(int* runtime_version, int* driver_version, int* device_count) {
  *runtime_version = *driver_version = *device_count = 0;
  cudaRuntimeGetVersion(runtime_version);
  cudaDriverGetVersion(driver_version);
  if (cudaGetDeviceCount(device_count) != cudaSuccess) {
    *device_count = 0;
    cudaGetLastError();  // no driver / no device: clear the error
  }
}
#endif

}  // namespace cuda
}  // namespace spectral_ext
