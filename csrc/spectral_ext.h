// Shared declarations and input checks of the spectral_ext kernels, written once and used by every
// C++ backend.  They are the checks of the C++ path: the Python API leaves them to the kernel
// (a Python loop over 500 layers costs more than the kernel) and runs spectral_ext/_checks.py,
// the same rules with the same messages, for the Python backends and the fake kernels.
//
// Semantics (see spectral_ext/reference.py, the oracle): each weight W is matricized along dim 0,
// rows = W.size(0), cols = W.numel() / rows, and one power iteration is
//     u = normalize(W v);  v' = W^T u;  sigma = ||v'||;  v = v' / sigma
// with the zero-matrix and non-finite rules documented there.
#pragma once

#include <cmath>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

namespace spectral_ext {

// float64 weights accumulate in float64; float32, bfloat16 and float16 in float32.
inline at::ScalarType acc_type(at::ScalarType weight_type) {
  return weight_type == at::kDouble ? at::kDouble : at::kFloat;
}

// sigma is float64 if any weight is float64, else float32.
inline at::ScalarType sigma_type(at::TensorList weights) {
  for (const auto& w : weights) {
    if (w.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// csrc/cpu/fused_step_cpu.cpp: whether the CPU kernels were compiled with OpenMP.
bool cpu_openmp();

inline int64_t matrix_cols(const at::Tensor& w) { return w.numel() / w.size(0); }

// Python-style spellings, so that messages read the same as those of spectral_ext/_checks.py.
inline std::string py_shape(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    s += std::to_string(sizes[i]);
    if (i + 1 < sizes.size() || sizes.size() == 1) s += ",";
    if (i + 1 < sizes.size()) s += " ";
  }
  return s + ")";
}

inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// lam of fused_step: a finite number >= 0 (a negative lam would maximize the spectral norm).
inline void check_lam(double lam) {
  TORCH_CHECK_VALUE(std::isfinite(lam), "lam must be finite, got ", lam);
  TORCH_CHECK_VALUE(lam >= 0, "lam must be >= 0 (it scales the penalty lam/2 * sigma^2), got ",
                    lam);
}

// The tensors of one call must not overlap in memory where one of them is written: every v and
// every gradient needs memory of its own (a gradient that is its weight would change the weight
// mid-step; a v inside its weight or gradient gives answers that depend on the order of the
// writes; two overlapping gradients lose updates on a GPU).  Weights may share memory with each
// other: they are only read.  Tensors of the same storage are compared by byte range (from the
// first to the last element), so interleaved views of one buffer count as overlapping; the same
// rule as spectral_ext/_checks.py.  Metadata only: a hash of the storages finds those shared by
// two tensors (usually none), and only those are sorted (about 5 us for 512 layers).
//
// With detect_only, nothing is checked: the function only answers whether any storage holds two
// of the tensors (a step plan, csrc/cpu/fused_step_cpu.cpp, whose gradients moved but kept their
// layout, runs the full checks only then).  Otherwise it returns the same answer after checking.
inline bool check_no_overlap(at::TensorList weights, at::TensorList vs,
                             const at::TensorList* grads, bool detect_only = false) {
  struct Span {
    const void* storage;
    int64_t lo, hi;  // bytes within the storage
    int kind;        // 0 weights, 1 vs, 2 grads
    size_t index;
    size_t rank;     // of the storage, by first appearance (weights, vs, grads): report order
  };
  std::vector<Span> spans;
  spans.reserve(weights.size() * 3);
  auto add = [&spans](const at::Tensor& t, int kind, size_t index) {
    if (t.numel() == 0) return;
    int64_t lo = 0, hi = 0;   // element offsets of the lowest and highest element
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t extent = (t.size(d) - 1) * t.stride(d);
      (extent < 0 ? lo : hi) += extent;
    }
    const int64_t item = static_cast<int64_t>(t.itemsize());
    const int64_t start = t.storage_offset() * item;
    spans.push_back(Span{t.storage().unsafeGetStorageImpl(), start + lo * item,
                         start + (hi + 1) * item, kind, index, 0});
  };
  for (size_t i = 0; i < weights.size(); ++i) add(weights[i], 0, i);
  for (size_t i = 0; i < vs.size(); ++i) add(vs[i], 1, i);
  if (grads != nullptr) {
    for (size_t i = 0; i < grads->size(); ++i) add((*grads)[i], 2, i);
  }
  // storages seen more than once (open addressing, power-of-two table)
  size_t cap = 16;
  while (cap < 2 * spans.size()) cap *= 2;
  struct Slot {
    const void* storage = nullptr;
    size_t count = 0, rank = 0;
  };
  std::vector<Slot> table(cap);
  auto slot = [&](const void* storage) -> Slot& {
    size_t h = (reinterpret_cast<uintptr_t>(storage) >> 4) * 0x9E3779B97F4A7C15ull & (cap - 1);
    while (table[h].storage != nullptr && table[h].storage != storage) h = (h + 1) & (cap - 1);
    return table[h];
  };
  bool shared = false;
  size_t storages = 0;
  for (const Span& s : spans) {
    Slot& e = slot(s.storage);
    if (e.storage == nullptr) {
      e.storage = s.storage;
      e.rank = storages++;
    }
    shared |= ++e.count > 1;
  }
  if (!shared || detect_only) return shared;
  std::vector<Span> same;
  for (const Span& s : spans) {
    const Slot& e = slot(s.storage);
    if (e.count > 1) {
      same.push_back(s);
      same.back().rank = e.rank;
    }
  }
  std::sort(same.begin(), same.end(), [](const Span& a, const Span& b) {
    if (a.rank != b.rank) return a.rank < b.rank;
    return a.lo != b.lo ? a.lo < b.lo : (a.kind != b.kind ? a.kind < b.kind : a.index < b.index);
  });
  // sweep each storage: the span reaching furthest so far, among all and among the written ones
  const Span* far_any = nullptr;
  const Span* far_written = nullptr;
  const void* storage = nullptr;
  static const char* const kNames[] = {"weights", "vs", "grads"};
  for (const Span& s : same) {
    if (s.storage != storage) {
      storage = s.storage;
      far_any = far_written = nullptr;
    }
    const Span* other = s.kind != 0 ? far_any : far_written;
    if (other != nullptr && s.lo < other->hi) {
      const Span* a = other;
      const Span* b = &s;
      if (std::make_pair(b->kind, b->index) < std::make_pair(a->kind, a->index)) std::swap(a, b);
      TORCH_CHECK_VALUE(false, kNames[a->kind], "[", a->index, "] and ", kNames[b->kind], "[",
                        b->index, "] overlap in memory; every v and every gradient of a call "
                        "needs memory of its own (they are written by the step)");
    }
    if (far_any == nullptr || s.hi > far_any->hi) far_any = &s;
    if (s.kind != 0 && (far_written == nullptr || s.hi > far_written->hi)) far_written = &s;
  }
  return true;
}

inline std::string py_layout(at::Layout l) {
  switch (l) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: return "an unsupported layout";
  }
}

// The kernels read and write a tensor's memory directly: it must be dense (strided), and one
// that is written (a vector, a gradient) must carry no lazy negation bit (torch._neg_view).
// On the op path the dispatcher resolves a negated weight (read only) and refuses a negated
// vector or gradient before the kernel runs; the step plans call the kernels without it: they
// decline a negated weight (the caller takes the op path) and refuse the rest here.  Complex
// tensors (conjugate bit) fail the dtype rules.
inline void check_dense(const char* name, size_t i, const at::Tensor& t, bool written) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, "[", i, "] has layout ",
                    py_layout(t.layout()), "; the spectral_ext ops need dense (torch.strided) "
                    "tensors");
  TORCH_CHECK_VALUE(!written || !t.is_neg(), name, "[", i, "] is a lazily negated view (is_neg() "
                    "is True) and is updated in place: pass t.resolve_neg()");
}

// Checks metadata only (no device synchronisation), in the same order and with the same
// messages and exception types (ValueError / TypeError) as spectral_ext/_checks.py, so a
// rejected call mutates nothing.  `grads` may be null (spectral_norms).
inline void check_inputs(at::TensorList weights, at::TensorList vs, const at::TensorList* grads,
                         int64_t n_iter) {
  TORCH_CHECK_VALUE(weights.size() == vs.size(), "got ", weights.size(), " weights but ",
                    vs.size(), " vectors (vs): one v per weight");
  TORCH_CHECK_VALUE(!weights.empty(), "the spectral_ext ops need at least one layer");
  TORCH_CHECK_VALUE(n_iter >= 1, "n_iter must be >= 1, got ", n_iter);
  if (grads != nullptr) {
    TORCH_CHECK_VALUE(grads->size() == weights.size(), "got ", weights.size(), " weights but ",
                      grads->size(), " grads");
  }
  const auto device = weights[0].device();
  std::unordered_map<const void*, size_t> seen_w, seen_v, seen_g;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const auto& v = vs[i];
    const auto t = w.scalar_type();
    auto dup = seen_w.emplace(w.unsafeGetTensorImpl(), i);
    TORCH_CHECK_VALUE(dup.second, "weights[", i, "] is the same tensor as weights[",
                      dup.first->second,
                      "]; pass each weight once (tied weights must be de-duplicated)");
    check_dense("weights", i, w, /*written=*/false);
    TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                     "weights[", i, "] has dtype ", py_dtype(t),
                     "; supported weight dtypes are float32, float64, bfloat16 and float16");
    TORCH_CHECK_VALUE(w.dim() >= 2, "weights[", i, "] is ", w.dim(), "-D with shape ",
                      py_shape(w.sizes()), "; the spectral norm needs a matrix (a weight with at "
                      "least 2 dimensions, matricized along dim 0)");
    TORCH_CHECK_VALUE(w.numel() > 0, "weights[", i, "] has shape ", py_shape(w.sizes()),
                      " with no elements");
    TORCH_CHECK_VALUE(w.device() == device, "weights[", i, "] is on ", w.device(),
                      " but weights[0] is on ", device,
                      ": all tensors of one call must be on the same device");
    check_dense("vs", i, v, /*written=*/true);
    TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, "vs[", i,
                     "] has dtype ", py_dtype(v.scalar_type()), "; v must be float32 or float64");
    const int64_t cols = matrix_cols(w);
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == cols, "vs[", i, "] has shape ",
                      py_shape(v.sizes()), " but weights[", i, "] of shape ", py_shape(w.sizes()),
                      " matricizes to ", w.size(0), " x ", cols, ", so v must have shape (", cols,
                      ",)");
    TORCH_CHECK_VALUE(v.device() == device, "vs[", i, "] is on ", v.device(),
                      " but weights[0] is on ", device,
                      ": all tensors of one call must be on the same device");
    TORCH_CHECK_VALUE(at::has_internal_overlap(v) != at::MemOverlap::Yes, "vs[", i,
                      "] has overlapping memory (an expanded tensor); it is updated in place");
    dup = seen_v.emplace(v.unsafeGetTensorImpl(), i);
    TORCH_CHECK_VALUE(dup.second, "vs[", i, "] is the same tensor as vs[", dup.first->second,
                      "]: each layer needs its own vector");
  }
  if (grads == nullptr) {
    check_no_overlap(weights, vs, nullptr);
    return;
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const auto& g = (*grads)[i];
    check_dense("grads", i, g, /*written=*/true);
    TORCH_CHECK_VALUE(g.sizes() == w.sizes(), "grads[", i, "] has shape ", py_shape(g.sizes()),
                      " but weights[", i, "] has shape ", py_shape(w.sizes()));
    TORCH_CHECK_TYPE(g.scalar_type() == w.scalar_type(), "grads[", i, "] has dtype ",
                     py_dtype(g.scalar_type()), " but weights[", i, "] has dtype ",
                     py_dtype(w.scalar_type()));
    TORCH_CHECK_VALUE(g.device() == w.device(), "grads[", i, "] is on ", g.device(),
                      " but weights[", i, "] is on ", w.device());
    TORCH_CHECK_VALUE(at::has_internal_overlap(g) != at::MemOverlap::Yes, "grads[", i,
                      "] has overlapping memory (an expanded tensor); it is updated in place");
    auto dup = seen_g.emplace(g.unsafeGetTensorImpl(), i);
    TORCH_CHECK_VALUE(dup.second, "grads[", i, "] is the same tensor as grads[", dup.first->second,
                      "]; pass each weight once (tied weights must be de-duplicated)");
  }
  check_no_overlap(weights, vs, grads);
}

}  // namespace spectral_ext
