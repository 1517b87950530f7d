// CPU kernels of spectral_ext: the fused step and the spectral norms for all layers in one call.
//
// One pass over W per power iteration.  For each row r of W (rows x cols, row-major):
//     u_raw[r]  = W[r,:] . v                (the row is now in L1)
//     vp_raw   += u_raw[r] * W[r,:]          (the same row, still in L1)
// so vp_raw = W^T (W v) is ready when the pass ends, and
//     u = u_raw / ||u_raw||,  v' = W^T u = vp_raw / ||u_raw||,  sigma = ||v'||,  v = v' / sigma.
// The gradient update then needs no W at all:  lam * sigma * u v^T = lam * u v'^T.
// Memory traffic for n_iter = 1 is therefore 4 bytes (W) + 8 bytes (G read and written) per
// float32 parameter, below the 16-byte floor of the two-pass formulation.
//
// Row bands and determinism.  A layer's rows are cut into bands fixed by its shape alone
// (band_count: about 128 Ki elements each, at least 256 rows, at most 64 bands); each band sums its
// own partial vp_raw, and the bands' partials are added in band order.  Parallelism
// (at::parallel_for, i.e. OpenMP) only decides who computes which band: "small" layers run whole
// on one thread (bins balanced by cost, largest first), "large" ones (more than 1/(2T) of the
// total work, and more than one band) have their bands spread over the T threads.  Both paths
// run the same (not inlined) band and reduction code on 64-byte aligned buffers, so the results
// are bitwise the same for any number of threads.
//
// Range.  Forming W^T W v before normalizing squares the scale: in float32, sigma^2 leaves the
// range for sigma < 1e-19 or > 1e19 (float64: 1e-154, 1e154).  After each pass the norms of
// u_raw and vp_raw are checked (in double); when either leaves [2^-60, 2^60] (float64:
// [2^-400, 2^400]), or is not finite, the layer's max |W| is found and the pass is redone on
// 2^k W (k making max |2^k W| lie in [0.5, 1); exact), and sigma and v' are scaled back.  So the
// whole finite range of each weight dtype works, at the cost of two more passes only for
// layers whose sums leave the range (and for NaN/Inf weights, which keep their NaN).
//
// Accumulation is in at::opmath_type<scalar_t>: float for float/bfloat16/half, double for double.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define SPECTRAL_EXT_F16C 1
#endif

#include "../spectral_ext.h"
#include "../step_plan.h"

namespace spectral_ext {
namespace {

// One layer, prepared for the kernel: raw pointers and strides, so that the common case
// (contiguous weight, gradient and vector) costs no ATen call per layer.
struct Layer {
  int64_t index = 0;           // position in the caller's lists
  int64_t rows = 0, cols = 0;
  const void* W = nullptr;     // rows x cols, element (r, c) at W[r * ldw + c]
  int64_t ldw = 0;
  void* G = nullptr;           // element (r, c) at G[r * ldg + c * scg]
  int64_t ldg = 0, scg = 1;
  at::Tensor W_hold, G_hold;   // keep-alive of a copy made for a layout that is not 2-D strided
  at::Tensor G_out;            // defined when G_hold is a copy to be written back
  bool W_copied = false, G_strided = false;   // a step plan must prepare these again each step
  int64_t ws_offset = 0;       // into the dtype group's workspace: v [cols], vp [cols], u [rows]
  int64_t bands = 1;           // row bands (band_count)
  int64_t part_offset = 0;     // into the group's partial sums: bands x part_ld (bands > 1)
  int64_t part_ld = 0;
  int scale_exp = 0;           // W is read as 2^scale_exp W (see "Range" above)
  bool scaled = false;         // scale_exp decided (no more range checks)
  bool updated = false;        // some iteration gave a new v (else v is left untouched)
  double sigma = 0.0;
};

// Bands of a rows x cols layer: a function of the shape only (see "Row bands" above).
// At least 256 rows per band: a band's partial sum costs one write and one read of `cols` values
// against the band's rows * cols reads of W (under 1 % of the traffic).
constexpr int64_t kBandRows = 256, kBandWork = int64_t{1} << 17, kMaxBands = 64;
inline int64_t band_count(int64_t rows, int64_t cols) {
  return std::clamp<int64_t>(std::min(rows / kBandRows, rows * cols / kBandWork), 1, kMaxBands);
}

// A 64-byte aligned scratch buffer of n elements, grown on demand (one per thread).
template <typename T>
struct Scratch {
  std::vector<T> data;
  T* get(int64_t n) {
    constexpr size_t kPad = 64 / sizeof(T);
    if (data.size() < static_cast<size_t>(n) + kPad) data.resize(static_cast<size_t>(n) + kPad);
    auto p = reinterpret_cast<uintptr_t>(data.data());
    return reinterpret_cast<T*>((p + 63) / 64 * 64);
  }
};

// Element conversions to and from the accumulation type.  c10's BFloat16/Half conversions are
// scalar code the compiler does not vectorize (a 2048x2048 step took 3.9 ms in bf16 against
// 1.2 ms in float32).  bf16 uses plain bit operations, which vectorize (round to nearest even,
// NaN -> 0x7FC0, bit-identical to c10::BFloat16).  Half uses F16C 8-wide conversions where the
// build has them (-march=x86-64-v3: see convert_row / add_row_f16c), else c10's conversion.
template <typename T>
inline at::opmath_type<T> to_acc(T x) {
  return static_cast<at::opmath_type<T>>(x);
}
template <typename T>
inline T from_acc(at::opmath_type<T> x) {
  return static_cast<T>(x);
}
template <>
inline float to_acc<c10::BFloat16>(c10::BFloat16 x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16>(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// dst[c] = src[c] as acc_t, c < n.
template <typename T>
inline void convert_row(const T* src, at::opmath_type<T>* dst, int64_t n) {
  int64_t c = 0;
#ifdef SPECTRAL_EXT_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    for (; c + 8 <= n; c += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
      _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(h));
    }
  }
#endif
#pragma omp simd
  for (int64_t i = c; i < n; ++i) dst[i] = to_acc(src[i]);
}

// g[c] = g[c] + a * vp[c] rounded once to T, c < n (g contiguous).
template <typename T>
inline void add_row(T* g, at::opmath_type<T> a, const at::opmath_type<T>* vp, int64_t n) {
  int64_t c = 0;
#ifdef SPECTRAL_EXT_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    const __m256 av = _mm256_set1_ps(a);
    for (; c + 8 <= n; c += 8) {
      __m128i* p = reinterpret_cast<__m128i*>(g + c);
      const __m256 x = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)),
                                     _mm256_mul_ps(av, _mm256_loadu_ps(vp + c)));
      _mm_storeu_si128(p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
#endif
#pragma omp simd
  for (int64_t i = c; i < n; ++i) g[i] = from_acc<T>(to_acc(g[i]) + a * vp[i]);
}

template <typename scalar_t>
struct Kernel {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same<scalar_t, acc_t>::value;

  // Row r of W as acc_t: W itself when no conversion or scale is needed, else converted (and
  // multiplied by s1 * s2, two exact powers of two) into buf.
  template <bool kScaled>
  static const acc_t* row(const scalar_t* W, int64_t ld, int64_t r, int64_t cols, acc_t* buf,
                          acc_t s1, acc_t s2) {
    const scalar_t* src = W + r * ld;
    if constexpr (!kConvert && !kScaled) {
      (void)cols;
      (void)buf;
      (void)s1;
      (void)s2;
      return src;
    } else {
      convert_row(src, buf, cols);
      if constexpr (kScaled) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) buf[c] = buf[c] * s1 * s2;
      }
      return buf;
    }
  }

  // u[r] = W[r,:] . v and vp += u[r] W[r,:] for r in [r0, r1), reading each row once.
  // buf holds 4 * cols acc_t when kConvert or kScaled.
  template <bool kScaled>
  static void fused_rows(const scalar_t* W, int64_t ld, int64_t cols, const acc_t* v, acc_t* u,
                         acc_t* vp, int64_t r0, int64_t r1, acc_t* buf, acc_t s1, acc_t s2) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {  // four rows at a time: one load of v and vp serves four rows
      const acc_t* w0 = row<kScaled>(W, ld, r, cols, buf, s1, s2);
      const acc_t* w1 = row<kScaled>(W, ld, r + 1, cols, buf + cols, s1, s2);
      const acc_t* w2 = row<kScaled>(W, ld, r + 2, cols, buf + 2 * cols, s1, s2);
      const acc_t* w3 = row<kScaled>(W, ld, r + 3, cols, buf + 3 * cols, s1, s2);
      acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t c = 0; c < cols; ++c) {
        d0 += w0[c] * v[c];
        d1 += w1[c] * v[c];
        d2 += w2[c] * v[c];
        d3 += w3[c] * v[c];
      }
      u[r] = d0;
      u[r + 1] = d1;
      u[r + 2] = d2;
      u[r + 3] = d3;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        vp[c] += d0 * w0[c] + d1 * w1[c] + d2 * w2[c] + d3 * w3[c];
      }
    }
    for (; r < r1; ++r) {
      const acc_t* w0 = row<kScaled>(W, ld, r, cols, buf, s1, s2);
      acc_t d0 = 0;
#pragma omp simd reduction(+ : d0)
      for (int64_t c = 0; c < cols; ++c) d0 += w0[c] * v[c];
      u[r] = d0;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) vp[c] += d0 * w0[c];
    }
  }

  // Band b of the fused pass: u[r] for its rows, and dst = its partial vp_raw.  Not inlined:
  // every caller (whole layer or bands over threads) runs the same machine code.
  __attribute__((noinline)) static void band_pass(const Layer& L, const acc_t* v, acc_t* u,
                                                  acc_t* dst, int64_t b, Scratch<acc_t>& scratch) {
    const scalar_t* W = static_cast<const scalar_t*>(L.W);
    const int64_t r0 = L.rows * b / L.bands, r1 = L.rows * (b + 1) / L.bands, cols = L.cols;
    std::fill(dst, dst + cols, acc_t(0));
    if (L.scale_exp == 0) {
      acc_t* buf = kConvert ? scratch.get(4 * cols) : nullptr;
      fused_rows<false>(W, L.ldw, cols, v, u, dst, r0, r1, buf, acc_t(1), acc_t(1));
    } else {
      const int h = L.scale_exp / 2;
      const acc_t s1 = std::ldexp(acc_t(1), h), s2 = std::ldexp(acc_t(1), L.scale_exp - h);
      fused_rows<true>(W, L.ldw, cols, v, u, dst, r0, r1, scratch.get(4 * cols), s1, s2);
    }
  }

  // vp = the bands' partials added in band order.
  __attribute__((noinline)) static void reduce_bands(const acc_t* parts, int64_t ld, int64_t bands,
                                                     acc_t* vp, int64_t cols) {
    std::copy(parts, parts + cols, vp);
    for (int64_t b = 1; b < bands; ++b) {
      const acc_t* p = parts + b * ld;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) vp[c] += p[c];
    }
  }

  // One fused pass over the whole layer: u = u_raw (of 2^scale_exp W) and vp = vp_raw, its bands
  // on this thread (buf) or spread over the threads.
  static void layer_pass(const Layer& L, acc_t* ws, acc_t* parts, bool parallel,
                         Scratch<acc_t>& scratch) {
    acc_t* v = ws + L.ws_offset;
    acc_t* vp = v + L.cols;
    acc_t* u = vp + L.cols;
    if (L.bands == 1) {
      band_pass(L, v, u, vp, 0, scratch);
      return;
    }
    acc_t* P = parts + L.part_offset;
    if (parallel) {
      at::parallel_for(0, L.bands, 1, [&](int64_t b0, int64_t b1) {
        Scratch<acc_t> local;
        for (int64_t b = b0; b < b1; ++b) band_pass(L, v, u, P + b * L.part_ld, b, local);
      });
    } else {
      for (int64_t b = 0; b < L.bands; ++b) band_pass(L, v, u, P + b * L.part_ld, b, scratch);
    }
    reduce_bands(P, L.part_ld, L.bands, vp, L.cols);
  }

  // The exponent k that brings max |W| into [0.5, 1) (0 for a zero or non-finite W).
  static int scale_exponent(const Layer& L, Scratch<acc_t>& scratch) {
    const scalar_t* W = static_cast<const scalar_t*>(L.W);
    acc_t m = 0;
    bool finite = true;
    acc_t* buf = scratch.get(L.cols);
    for (int64_t r = 0; r < L.rows; ++r) {
      const acc_t* w = row<false>(W, L.ldw, r, L.cols, buf, acc_t(1), acc_t(1));
      for (int64_t c = 0; c < L.cols; ++c) {
        finite &= std::isfinite(w[c]);
        m = std::max(m, std::abs(w[c]));
      }
    }
    if (!finite || m == 0) return 0;
    int e = 0;
    std::frexp(m, &e);
    return -e;
  }

  // From u = u_raw and vp = vp_raw = W^T u_raw (of 2^scale_exp W): u = u_raw / ||u_raw||,
  // vp = W^T u, sigma = ||vp||, v = vp / sigma unless sigma is 0 (zero matrix) or not finite
  // (NaN/Inf weights: v is kept).  With `check`, returns false when ||u_raw|| or ||vp_raw|| is
  // outside the safe range or not finite: then v and sigma are untouched, but u and vp may not
  // be (the caller redoes the pass).  Norms in double.
  static bool finalize(Layer& L, acc_t* u, acc_t* vp, acc_t* v, bool check) {
    constexpr bool kDouble = std::is_same_v<acc_t, double>;
    const double lo = kDouble ? 0x1p-400 : 0x1p-60, hi = kDouble ? 0x1p400 : 0x1p60;
    const double inv_ok = kDouble ? 0x1p-1000 : 0x1p-120;   // 1 / nrm representable in acc_t
    const int64_t rows = L.rows, cols = L.cols;
    double s = 0;
    for (int64_t r = 0; r < rows; ++r) s += static_cast<double>(u[r]) * u[r];
    const double nrm = std::sqrt(s);
    if (check && !(nrm >= lo && nrm <= hi)) return false;   // NaN fails too
    // u = u_raw / ||u_raw||, vp = vp_raw / ||u_raw|| (0 for a zero matrix; `nrm == 0`, not
    // `nrm > 0`: NaN propagates).  Times the inverse where it is representable (always in range).
    double s2 = 0;
    if (nrm == 0 || nrm >= inv_ok) {
      const acc_t inv = nrm == 0 ? acc_t(0) : static_cast<acc_t>(1.0 / nrm);
      for (int64_t r = 0; r < rows; ++r) u[r] *= inv;
      for (int64_t c = 0; c < cols; ++c) {
        vp[c] *= inv;
        s2 += static_cast<double>(vp[c]) * vp[c];
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) u[r] = static_cast<acc_t>(u[r] / nrm);
      for (int64_t c = 0; c < cols; ++c) {
        vp[c] = static_cast<acc_t>(vp[c] / nrm);
        s2 += static_cast<double>(vp[c]) * vp[c];
      }
    }
    const double sigma_s = std::sqrt(s2);   // of 2^scale_exp W
    // ||vp_raw|| = sigma_s * ||u_raw|| (an overflow of vp_raw shows as Inf here)
    if (check && !(sigma_s * nrm >= lo && sigma_s * nrm <= hi)) return false;
    const double sigma = std::ldexp(sigma_s, -L.scale_exp);
    L.sigma = sigma;
    const acc_t sigma_acc = static_cast<acc_t>(sigma);
    if (sigma_acc > 0 && std::isfinite(sigma_acc) && sigma_s > 0 && std::isfinite(sigma_s)) {
      if (check) {   // in range: as fast as before
        const acc_t sg = static_cast<acc_t>(sigma_s);
        for (int64_t c = 0; c < cols; ++c) v[c] = vp[c] / sg;
      } else {
        for (int64_t c = 0; c < cols; ++c) v[c] = static_cast<acc_t>(vp[c] / sigma_s);
      }
      L.updated = true;
    }
    if (L.scale_exp != 0) {   // v' of W itself, for the gradient
      for (int64_t c = 0; c < cols; ++c) vp[c] = std::ldexp(vp[c], -L.scale_exp);
    }
    return true;
  }

  // n_iter power iterations of one layer, each pass checked (see "Range") until the layer is
  // known to need a scale (or not to).
  static void iterate(Layer& L, acc_t* ws, acc_t* parts, int64_t n_iter, bool parallel,
                      Scratch<acc_t>& scratch) {
    acc_t* v = ws + L.ws_offset;
    acc_t* vp = v + L.cols;
    acc_t* u = vp + L.cols;
    for (int64_t it = 0; it < n_iter; ++it) {
      layer_pass(L, ws, parts, parallel, scratch);
      if (L.scaled) {
        finalize(L, u, vp, v, false);
        continue;
      }
      if (finalize(L, u, vp, v, true)) continue;
      // out of range: redo the pass on 2^k W (k = 0 for a zero or non-finite W, whose result
      // is then taken as it is: sigma 0, or NaN propagated)
      L.scaled = true;
      L.scale_exp = scale_exponent(L, scratch);
      layer_pass(L, ws, parts, parallel, scratch);
      finalize(L, u, vp, v, false);
    }
  }

  // G[r,:] += lam * u[r] * vp  (= lam * sigma * u v^T) for r in [r0, r1), one rounding per element.
  static void grad_rows(scalar_t* G, int64_t ldg, int64_t scg, int64_t cols, const acc_t* u,
                        const acc_t* vp, acc_t lam, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t a = lam * u[r];
      scalar_t* g = G + r * ldg;
      if (scg == 1) {
        add_row(g, a, vp, cols);
      } else {
        for (int64_t c = 0; c < cols; ++c) {
          g[c * scg] = from_acc<scalar_t>(to_acc(g[c * scg]) + a * vp[c]);
        }
      }
    }
  }

  // Software prefetch of a (small, contiguous) layer's W and G, at most 64 KiB of each.
  static void prefetch_layer(const Layer& L, bool update) {
    const int64_t bytes = std::min<int64_t>(L.rows * L.cols * sizeof(scalar_t), 64 * 1024);
    if (L.ldw == L.cols) {
      for (int64_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(static_cast<const char*>(L.W) + i, 0, 3);
    }
    if (update && L.ldg == L.cols && L.scg == 1) {
      for (int64_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(static_cast<const char*>(L.G) + i, 1, 3);
    }
  }

  // A small layer, entirely on the calling thread.
  static void run_whole(Layer& L, acc_t* ws, acc_t* parts, int64_t n_iter, bool update,
                        acc_t lam, Scratch<acc_t>& scratch) {
    iterate(L, ws, parts, n_iter, /*parallel=*/false, scratch);
    if (update) {
      const acc_t* vp = ws + L.ws_offset + L.cols;
      grad_rows(static_cast<scalar_t*>(L.G), L.ldg, L.scg, L.cols, vp + L.cols, vp, lam, 0,
                L.rows);
    }
  }

  // A large layer: its bands spread over the threads.
  static void run_split(Layer& L, acc_t* ws, acc_t* parts, int64_t n_iter, bool update,
                        acc_t lam) {
    Scratch<acc_t> scratch;
    iterate(L, ws, parts, n_iter, /*parallel=*/true, scratch);
    if (update) {
      scalar_t* G = static_cast<scalar_t*>(L.G);
      const acc_t* vp = ws + L.ws_offset + L.cols;
      const acc_t* u = vp + L.cols;
      const int64_t ldg = L.ldg, scg = L.scg, cols = L.cols;
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
      at::parallel_for(0, L.rows, grain, [&](int64_t r0, int64_t r1) {
        grad_rows(G, ldg, scg, cols, u, vp, lam, r0, r1);
      });
    }
  }

  // All layers of one weight dtype; ws is the group's workspace with each v already loaded.
  static void run_group(std::vector<Layer*>& layers, acc_t* ws, acc_t* parts, int64_t n_iter,
                        bool update, double lam) {
    const int T = std::max(1, at::get_num_threads());
    const acc_t lam_acc = static_cast<acc_t>(lam);
    double total = 0;
    for (Layer* L : layers) total += static_cast<double>(L->rows) * L->cols;
    std::vector<Layer*> large, small;
    for (Layer* L : layers) {
      const double cost = static_cast<double>(L->rows) * L->cols;
      (T > 1 && L->bands > 1 && cost > total / (2.0 * T) ? large : small).push_back(L);
    }
    // small layers: longest-processing-time-first into T bins
    std::sort(small.begin(), small.end(), [](const Layer* a, const Layer* b) {
      return a->rows * a->cols > b->rows * b->cols;
    });
    std::vector<std::vector<Layer*>> bins(T);
    std::vector<double> load(T, 0.0);
    for (Layer* L : small) {
      const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
      bins[t].push_back(L);
      load[t] += static_cast<double>(L->rows) * L->cols;
    }
    if (!small.empty()) {
      at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
        Scratch<acc_t> scratch;
        for (int64_t t = b; t < e; ++t) {
          const auto& bin = bins[t];
          for (size_t k = 0; k < bin.size(); ++k) {
            // small layers are separate allocations: start fetching the next one now, so its
            // first lines do not each pay the full memory latency
            if (k + 1 < bin.size()) prefetch_layer(*bin[k + 1], update);
            run_whole(*bin[k], ws, parts, n_iter, update, lam_acc, scratch);
          }
        }
      });
    }
    for (Layer* L : large) run_split(*L, ws, parts, n_iter, update, lam_acc);
  }
};

// The vector v (float32 or float64, any stride) into the acc-typed workspace, and back.
template <typename From, typename To>
void strided_copy(const From* src, int64_t src_stride, To* dst, int64_t dst_stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = static_cast<To>(src[i * src_stride]);
}

template <typename acc_t>
void load_vector(const at::Tensor& v, acc_t* dst) {
  if (v.scalar_type() == at::kDouble) {
    strided_copy(v.const_data_ptr<double>(), v.stride(0), dst, 1, v.numel());
  } else {
    strided_copy(v.const_data_ptr<float>(), v.stride(0), dst, 1, v.numel());
  }
}

template <typename acc_t>
void store_vector(const acc_t* src, const at::Tensor& v) {
  if (v.scalar_type() == at::kDouble) {
    strided_copy(src, 1, v.mutable_data_ptr<double>(), v.stride(0), v.numel());
  } else {
    strided_copy(src, 1, v.mutable_data_ptr<float>(), v.stride(0), v.numel());
  }
}

// The weight as a rows x cols matrix with column stride 1 (a copy only if no such view exists).
// Called again before every step of a plan: a copy holds the values of the time it was made.
void prepare_weight(Layer& l, const at::Tensor& w) {
  l.W_hold = at::Tensor();
  l.W_copied = false;
  if (w.is_contiguous()) {
    l.W = w.const_data_ptr();
    l.ldw = l.cols;
    return;
  }
  at::Tensor m = w.reshape({l.rows, l.cols});
  if (l.cols > 1 && m.stride(1) != 1) m = m.contiguous();
  l.W_hold = m;
  l.W_copied = !m.is_alias_of(w);
  l.W = m.const_data_ptr();
  l.ldw = m.stride(0);
}

// The gradient as a rows x cols strided matrix, or a copy that is written back afterwards.
void prepare_grad(Layer& l, const at::Tensor& g) {
  l.G_hold = at::Tensor();
  l.G_out = at::Tensor();
  l.G_strided = false;
  if (g.is_contiguous()) {
    l.G = g.mutable_data_ptr();
    l.ldg = l.cols;
    l.scg = 1;
    return;
  }
  at::Tensor m = g.reshape({l.rows, l.cols});
  if (!m.is_alias_of(g)) l.G_out = g;  // reshape had to copy: write the result back
  l.G_strided = true;
  l.G_hold = m;
  l.G = m.mutable_data_ptr();
  l.ldg = m.stride(0);
  l.scg = m.stride(1);
}

// The layers of one weight dtype and the sizes of their workspaces.
struct Group {
  at::ScalarType dtype;
  std::vector<Layer*> layers;   // into Prepared::layers, in the caller's order
  int64_t ws_size = 0, part_size = 0;
};

// What a call needs besides the values: the layer table (matricized shapes, pointers, bands,
// workspace offsets) and the dtype groups.  A function of the tensors' metadata only, so a step
// plan (below) keeps it across steps and refreshes only the pointers (refresh_pointers).
struct Prepared {
  std::vector<Layer> layers;
  std::vector<Group> groups;    // in ScalarType order
  at::ScalarType sigma_dtype = at::kFloat;
  at::TensorOptions options;    // of the workspaces and sigma (the weights' device)
};

// Matricizes weights (and gradients), groups layers by dtype, lays out the workspaces.  The
// inputs must have passed check_inputs.
void prepare(Prepared& p, at::TensorList weights, const at::TensorList* grads) {
  const int64_t L = static_cast<int64_t>(weights.size());
  p.layers.assign(L, Layer{});
  p.groups.clear();
  std::map<at::ScalarType, std::vector<Layer*>> groups;
  for (int64_t i = 0; i < L; ++i) {
    Layer& l = p.layers[i];
    l.index = i;
    l.rows = weights[i].size(0);
    l.cols = matrix_cols(weights[i]);
    prepare_weight(l, weights[i]);
    if (grads != nullptr) prepare_grad(l, (*grads)[i]);
    groups[weights[i].scalar_type()].push_back(&l);
  }
  for (auto& kv : groups) {
    Group g{kv.first, std::move(kv.second)};
    for (Layer* l : g.layers) {
      l->ws_offset = g.ws_size;
      g.ws_size += 2 * l->cols + l->rows;
      l->bands = band_count(l->rows, l->cols);
      if (l->bands > 1) {   // 64-byte aligned rows of partial sums (at::empty is 64-byte aligned)
        l->part_ld = (l->cols + 15) / 16 * 16;
        l->part_offset = g.part_size;
        g.part_size += l->bands * l->part_ld;
      }
    }
    p.groups.push_back(std::move(g));
  }
  p.sigma_dtype = sigma_type(weights);
  p.options = weights[0].options();
}

// The pointers of a step plan's prepared table for the tensors as they are now, whose layouts
// and (except for moved gradients) addresses are those the table was prepared for: a weight's
// copy is made again (it holds the values of its time), a gradient (each weight's .grad)
// prepared again if it moved or is not contiguous (its view or copy is of the tensor of its time).
void refresh_pointers(Prepared& p, at::TensorList weights, bool moved) {
  for (Layer& l : p.layers) {
    if (l.W_copied) prepare_weight(l, weights[l.index]);
    if (moved || l.G_strided) prepare_grad(l, weights[l.index].grad());
  }
}

// Runs every group of a prepared table, writes v back (fused_step) or fills `outputs`
// (spectral_norms), writes back gradient copies.  Returns sigma [L].
at::Tensor execute(Prepared& p, at::TensorList vs, bool update, double lam, int64_t n_iter,
                   std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>* outputs) {
  for (Layer& l : p.layers) {   // the per-call state of each layer
    l.scale_exp = 0;
    l.scaled = false;
    l.updated = false;
    l.sigma = 0.0;
  }
  for (Group& g : p.groups) {
    const at::ScalarType acc = acc_type(g.dtype);
    at::Tensor ws = at::empty({g.ws_size}, p.options.dtype(acc));
    at::Tensor parts = at::empty({g.part_size}, p.options.dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.dtype, "spectral_ext_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* w = ws.mutable_data_ptr<acc_t>();
      for (Layer* l : g.layers) load_vector(vs[l->index], w + l->ws_offset);
      Kernel<scalar_t>::run_group(g.layers, w, parts.mutable_data_ptr<acc_t>(), n_iter, update,
                                  lam);
      if (outputs == nullptr) {   // a v that no iteration updated is left exactly as it was
        for (Layer* l : g.layers) {
          if (l->updated) store_vector(w + l->ws_offset, vs[l->index]);
        }
      }
    });
    for (Layer* l : g.layers) {
      if (outputs != nullptr) {
        outputs->first[l->index] = ws.narrow(0, l->ws_offset + 2 * l->cols, l->rows).clone();
        outputs->second[l->index] =
            l->updated ? ws.narrow(0, l->ws_offset, l->cols).to(vs[l->index].scalar_type(), false, true)
                       : vs[l->index].clone();
      }
      if (l->G_out.defined()) l->G_out.copy_(l->G_hold.view(l->G_out.sizes()));
    }
  }
  const int64_t L = static_cast<int64_t>(p.layers.size());
  at::Tensor sigma = at::empty({L}, p.options.dtype(p.sigma_dtype));
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "spectral_ext_sigma", [&] {
    scalar_t* s = sigma.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < L; ++i) s[i] = static_cast<scalar_t>(p.layers[i].sigma);
  });
  return sigma;
}

// The op path: checks, prepares and executes in one call.
// Returns sigma [L]; fills us / vs_new when `outputs` is set (spectral_norms).
at::Tensor run(at::TensorList weights, at::TensorList vs, const at::TensorList* grads,
               double lam, int64_t n_iter,
               std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>* outputs) {
  check_inputs(weights, vs, grads, n_iter);
  Prepared p;
  prepare(p, weights, grads);
  return execute(p, vs, grads != nullptr, lam, n_iter, outputs);
}

// ---- The persistent step plan (issue 14 item 1) ---------------------------------------------
//
// The plan's tensors and the test of what changed since the last step are shared with the CUDA
// plan (../step_plan.h).  This backend keeps the prepared layer table across steps: prepared
// again after the full checks ran (PlanTensors::Change::kAll), only its pointers refreshed
// otherwise.  The kernel is the op path's (execute), so the results are bitwise the op's.
//
// Why a torch custom class (torch::class_ in a TORCH_LIBRARY_FRAGMENT) and not an object of
// the plain Python module (module.cpp): the arguments of a custom-class method are converted by
// torch's own binding code (the constructor's Tensor lists once), so no Python-tensor unwrapping
// is needed here, c10 errors reach Python as ValueError / TypeError like the op's, and the plan
// is usable from C++ and TorchScript alike.  The method call costs 3.5-4.5 us before step()
// starts; the regularizer calls step() through spectral_ext._C.plan_step (../plan_entry.cpp,
// about 1 us), which finds the StepPlan base in the custom-class object.
class CpuStepPlan final : public StepPlan {
 public:
  CpuStepPlan(std::vector<at::Tensor> weights, std::vector<at::Tensor> vs)
      : t_(std::move(weights), std::move(vs)) {}

  // StepPlan::step (../step_plan.h) on CPU tensors.
  std::optional<at::Tensor> step(double lam, int64_t n_iter) override {
    PlanTensors::check_scalars(lam, n_iter);
    const PlanTensors::Step s(t_, n_iter, c10::DeviceType::CPU);
    if (s.change == PlanTensors::Change::kDeclined) return std::nullopt;
    if (s.change == PlanTensors::Change::kAll) {
      const at::TensorList grads(t_.grads());
      prepare(prep_, t_.weights(), &grads);
    } else {
      refresh_pointers(prep_, t_.weights(), s.change == PlanTensors::Change::kGradsMoved);
    }
    at::Tensor sigma = execute(prep_, t_.vs(), /*update=*/true, lam, n_iter, nullptr);
    for (Layer& l : prep_.layers) {   // views and copies of odd layouts: made again next step
      if (l.W_copied) l.W_hold = at::Tensor();
      if (l.G_strided) l.G_hold = l.G_out = at::Tensor();
    }
    return sigma;
  }

  int64_t full_checks() const { return t_.full_checks(); }
  int64_t num_layers() const { return static_cast<int64_t>(t_.size()); }

 private:
  PlanTensors t_;
  Prepared prep_;
};

// spectral_ext::fused_step(Tensor[] weights, Tensor(a!)[] vs, Tensor(b!)[] grads, float lam,
//                          int n_iter) -> Tensor
at::Tensor fused_step_cpu(at::TensorList weights, at::TensorList vs, at::TensorList grads,
                          double lam, int64_t n_iter) {
  check_lam(lam);
  return run(weights, vs, &grads, lam, n_iter, nullptr);
}

// spectral_ext::spectral_norms(Tensor[] weights, Tensor[] vs, int n_iter)
//     -> (Tensor sigma, Tensor[] us, Tensor[] vs_new)
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> spectral_norms_cpu(
    at::TensorList weights, at::TensorList vs, int64_t n_iter) {
  std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> out;
  out.first.resize(weights.size());
  out.second.resize(weights.size());
  at::Tensor sigma = run(weights, vs, nullptr, 0.0, n_iter, &out);
  return {sigma, std::move(out.first), std::move(out.second)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) {
  m.impl("fused_step", &fused_step_cpu);
  m.impl("spectral_norms", &spectral_norms_cpu);
}

// torch.classes.spectral_ext.CpuStepPlan(weights, vs): the eager fast path of the regularizer
// (spectral_ext/functional.py, make_step_plan); the schemas of the ops stay in _ops.py.
TORCH_LIBRARY_FRAGMENT(spectral_ext, m) {
  m.class_<CpuStepPlan>("CpuStepPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &CpuStepPlan::step)
      .def("full_checks", &CpuStepPlan::full_checks)
      .def("num_layers", &CpuStepPlan::num_layers);
}

}  // namespace spectral_ext

// Whether this translation unit was compiled with OpenMP: without -fopenmp, at::parallel_for (a
// header template) silently runs on one thread.  Exposed as spectral_ext._C.openmp() (module.cpp).
bool spectral_ext::cpu_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}
