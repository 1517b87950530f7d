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
// Parallelism (at::parallel_for, i.e. OpenMP): layers are split into "small" ones, each handled
// whole by one thread (bins balanced by cost, largest first), and "large" ones (more than
// 1/(2T) of the total work), whose rows are split over the T threads with per-thread partial
// sums of vp_raw reduced in a fixed order.  Results are deterministic for a given thread count.
//
// Accumulation is in at::opmath_type<scalar_t>: float for float/bfloat16/half, double for double.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define SPECTRAL_EXT_F16C 1
#endif

#include "../spectral_ext.h"

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
  int64_t ws_offset = 0;       // into the dtype group's workspace: v [cols], vp [cols], u [rows]
  double sigma = 0.0;
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

  // Row r of W as acc_t: W itself when no conversion is needed, else converted into buf.
  static const acc_t* row(const scalar_t* W, int64_t ld, int64_t r, int64_t cols, acc_t* buf) {
    const scalar_t* src = W + r * ld;
    if constexpr (!kConvert) {
      (void)cols;
      (void)buf;
      return src;
    } else {
            convert_row(src, buf, cols);
      return buf;
    }
  }

  // u[r] = W[r,:] . v and vp += u[r] W[r,:] for r in [r0, r1), reading each row once.
  // buf holds 4 * cols acc_t when kConvert.
  static void fused_rows(const scalar_t* W, int64_t ld, int64_t cols, const acc_t* v, acc_t* u,
                         acc_t* vp, int64_t r0, int64_t r1, acc_t* buf) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {  // four rows at a time: one load of v and vp serves four rows
      const acc_t* w0 = row(W, ld, r, cols, buf);
      const acc_t* w1 = row(W, ld, r + 1, cols, buf + cols);
      const acc_t* w2 = row(W, ld, r + 2, cols, buf + 2 * cols);
      const acc_t* w3 = row(W, ld, r + 3, cols, buf + 3 * cols);
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
      const acc_t* w0 = row(W, ld, r, cols, buf);
      acc_t d0 = 0;
#pragma omp simd reduction(+ : d0)
      for (int64_t c = 0; c < cols; ++c) d0 += w0[c] * v[c];
      u[r] = d0;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) vp[c] += d0 * w0[c];
    }
  }

  // From u = u_raw and vp = W^T u_raw: normalizes u, makes vp = W^T u, and returns sigma = ||vp||.
  // v becomes vp / sigma unless sigma is 0 (zero matrix) or not finite (NaN/Inf weights), in
  // which case v is kept.  Norms are summed in double (O(rows + cols) work).
  static double finalize(acc_t* u, int64_t rows, acc_t* vp, acc_t* v, int64_t cols) {
    double s = 0;
    for (int64_t r = 0; r < rows; ++r) s += static_cast<double>(u[r]) * u[r];
    const acc_t nrm = static_cast<acc_t>(std::sqrt(s));
    // `nrm == 0`, not `nrm > 0`: a NaN norm must propagate (as in reference.py)
    const acc_t inv = nrm == acc_t(0) ? acc_t(0) : acc_t(1) / nrm;
    for (int64_t r = 0; r < rows; ++r) u[r] *= inv;
    double s2 = 0;
    for (int64_t c = 0; c < cols; ++c) {
      vp[c] *= inv;
      s2 += static_cast<double>(vp[c]) * vp[c];
    }
    const double sigma = std::sqrt(s2);
    if (sigma > 0 && std::isfinite(sigma)) {
      const acc_t sg = static_cast<acc_t>(sigma);
      for (int64_t c = 0; c < cols; ++c) v[c] = vp[c] / sg;
    }
    return sigma;
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
  static void run_whole(Layer& L, acc_t* ws, int64_t n_iter, bool update, acc_t lam,
                        acc_t* buf) {
    const scalar_t* W = static_cast<const scalar_t*>(L.W);
    const int64_t ld = L.ldw, rows = L.rows, cols = L.cols;
    acc_t* v = ws + L.ws_offset;
    acc_t* vp = v + cols;
    acc_t* u = vp + cols;
    for (int64_t it = 0; it < n_iter; ++it) {
      std::fill(vp, vp + cols, acc_t(0));
      fused_rows(W, ld, cols, v, u, vp, 0, rows, buf);
      L.sigma = finalize(u, rows, vp, v, cols);
    }
    if (update) {
      grad_rows(static_cast<scalar_t*>(L.G), L.ldg, L.scg, cols, u, vp, lam, 0, rows);
    }
  }

  // A large layer: rows split over T threads, partial vp sums reduced in a fixed order.
  static void run_split(Layer& L, acc_t* ws, int64_t n_iter, bool update, acc_t lam, int T) {
    const scalar_t* W = static_cast<const scalar_t*>(L.W);
    const int64_t ld = L.ldw, rows = L.rows, cols = L.cols;
    acc_t* v = ws + L.ws_offset;
    acc_t* vp = v + cols;
    acc_t* u = vp + cols;
    std::vector<acc_t> part(static_cast<size_t>(T) * cols);
    std::vector<acc_t> bufs(kConvert ? static_cast<size_t>(T) * 4 * cols : 0);
    for (int64_t it = 0; it < n_iter; ++it) {
      at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          acc_t* p = part.data() + t * cols;
          std::fill(p, p + cols, acc_t(0));
          fused_rows(W, ld, cols, v, u, p, rows * t / T, rows * (t + 1) / T,
                     kConvert ? bufs.data() + t * 4 * cols : nullptr);
        }
      });
      for (int64_t c = 0; c < cols; ++c) {
        acc_t s = 0;
        for (int t = 0; t < T; ++t) s += part[t * cols + c];
        vp[c] = s;
      }
      L.sigma = finalize(u, rows, vp, v, cols);
    }
    if (update) {
      scalar_t* G = static_cast<scalar_t*>(L.G);
      const int64_t ldg = L.ldg, scg = L.scg;
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        grad_rows(G, ldg, scg, cols, u, vp, lam, r0, r1);
      });
    }
  }

  // All layers of one weight dtype; ws is the group's workspace with each v already loaded.
  static void run_group(std::vector<Layer*>& layers, acc_t* ws, int64_t n_iter, bool update,
                        double lam) {
    const int T = std::max(1, at::get_num_threads());
    const acc_t lam_acc = static_cast<acc_t>(lam);
    double total = 0;
    for (Layer* L : layers) total += static_cast<double>(L->rows) * L->cols;
    std::vector<Layer*> large, small;
    for (Layer* L : layers) {
      const double cost = static_cast<double>(L->rows) * L->cols;
      (T > 1 && cost > total / (2.0 * T) ? large : small).push_back(L);
    }
    // small layers: longest-processing-time-first into T bins
    std::sort(small.begin(), small.end(), [](const Layer* a, const Layer* b) {
      return a->rows * a->cols > b->rows * b->cols;
    });
    std::vector<std::vector<Layer*>> bins(T);
    std::vector<double> load(T, 0.0);
    int64_t max_cols = 0;
    for (Layer* L : small) {
      const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
      bins[t].push_back(L);
      load[t] += static_cast<double>(L->rows) * L->cols;
      max_cols = std::max(max_cols, L->cols);
    }
    if (!small.empty()) {
      at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> buf(kConvert ? 4 * max_cols : 0);
        for (int64_t t = b; t < e; ++t) {
          const auto& bin = bins[t];
          for (size_t k = 0; k < bin.size(); ++k) {
            // small layers are separate allocations: start fetching the next one now, so its
            // first lines do not each pay the full memory latency
            if (k + 1 < bin.size()) prefetch_layer(*bin[k + 1], update);
            run_whole(*bin[k], ws, n_iter, update, lam_acc, buf.data());
          }
        }
      });
    }
    for (Layer* L : large) run_split(*L, ws, n_iter, update, lam_acc, T);
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
void prepare_weight(Layer& l, const at::Tensor& w) {
  if (w.is_contiguous()) {
    l.W = w.const_data_ptr();
    l.ldw = l.cols;
    return;
  }
  at::Tensor m = w.reshape({l.rows, l.cols});
  if (l.cols > 1 && m.stride(1) != 1) m = m.contiguous();
  l.W_hold = m;
  l.W = m.const_data_ptr();
  l.ldw = m.stride(0);
}

// The gradient as a rows x cols strided matrix, or a copy that is written back afterwards.
void prepare_grad(Layer& l, const at::Tensor& g) {
  if (g.is_contiguous()) {
    l.G = g.mutable_data_ptr();
    l.ldg = l.cols;
    l.scg = 1;
    return;
  }
  at::Tensor m = g.reshape({l.rows, l.cols});
  if (!m.is_alias_of(g)) l.G_out = g;  // reshape had to copy: write the result back
  l.G_hold = m;
  l.G = m.mutable_data_ptr();
  l.ldg = m.stride(0);
  l.scg = m.stride(1);
}

// Matricizes weights (and gradients), groups layers by dtype, runs every group, writes v back.
// Returns sigma [L]; fills us / vs_new when `outputs` is set (spectral_norms).
at::Tensor run(at::TensorList weights, at::TensorList vs, const at::TensorList* grads,
               double lam, int64_t n_iter,
               std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>* outputs) {
  check_inputs(weights, vs, grads, n_iter);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<Layer> layers(L);
  std::map<at::ScalarType, std::vector<Layer*>> groups;
  for (int64_t i = 0; i < L; ++i) {
    Layer& l = layers[i];
    l.index = i;
    l.rows = weights[i].size(0);
    l.cols = matrix_cols(weights[i]);
    prepare_weight(l, weights[i]);
    if (grads != nullptr) prepare_grad(l, (*grads)[i]);
    groups[weights[i].scalar_type()].push_back(&l);
  }

  for (auto& kv : groups) {
    const at::ScalarType acc = acc_type(kv.first);
    int64_t size = 0;
    for (Layer* l : kv.second) {
      l->ws_offset = size;
      size += 2 * l->cols + l->rows;
    }
    at::Tensor ws = at::empty({size}, weights[0].options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv.first, "spectral_ext_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* w = ws.mutable_data_ptr<acc_t>();
      for (Layer* l : kv.second) load_vector(vs[l->index], w + l->ws_offset);
      Kernel<scalar_t>::run_group(kv.second, w, n_iter, grads != nullptr, lam);
      if (outputs == nullptr) {
        for (Layer* l : kv.second) store_vector(w + l->ws_offset, vs[l->index]);
      }
    });
    for (Layer* l : kv.second) {
      if (outputs != nullptr) {
        outputs->first[l->index] = ws.narrow(0, l->ws_offset + 2 * l->cols, l->rows).clone();
        outputs->second[l->index] =
            ws.narrow(0, l->ws_offset, l->cols).to(vs[l->index].scalar_type(), false, true);
      }
      if (l->G_out.defined()) l->G_out.copy_(l->G_hold.view(l->G_out.sizes()));
    }
  }

  at::Tensor sigma = at::empty({L}, weights[0].options().dtype(sigma_type(weights)));
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "spectral_ext_sigma", [&] {
    scalar_t* s = sigma.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < L; ++i) s[i] = static_cast<scalar_t>(layers[i].sigma);
  });
  return sigma;
}

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
