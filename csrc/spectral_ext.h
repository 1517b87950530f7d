// Shared declarations and input checks of the spectral_ext kernels, written once and used by every
// C++ backend.  The Python API runs the same checks (spectral_ext/_checks.py) before it reaches an
// op; these protect the kernels from direct `torch.ops.spectral_ext.*` calls.
//
// Semantics (see spectral_ext/reference.py, the oracle): each weight W is matricized along dim 0,
// rows = W.size(0), cols = W.numel() / rows, and one power iteration is
//     u = normalize(W v);  v' = W^T u;  sigma = ||v'||;  v = v' / sigma
// with the zero-matrix and non-finite rules documented there.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <unordered_set>

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

inline int64_t matrix_cols(const at::Tensor& w) { return w.numel() / w.size(0); }

// Checks metadata only (no device synchronisation).  `grads` may be null (spectral_norms).
inline void check_inputs(at::TensorList weights, at::TensorList vs, const at::TensorList* grads,
                         int64_t n_iter) {
  TORCH_CHECK(weights.size() == vs.size(), "spectral_ext: got ", weights.size(),
              " weights but ", vs.size(), " vectors (vs): one v per weight");
  TORCH_CHECK(!weights.empty(), "spectral_ext: the ops need at least one layer");
  TORCH_CHECK(n_iter >= 1, "spectral_ext: n_iter must be >= 1, got ", n_iter);
  if (grads != nullptr) {
    TORCH_CHECK(grads->size() == weights.size(), "spectral_ext: got ", weights.size(),
                " weights but ", grads->size(), " grads");
  }
  const auto device = weights[0].device();
  std::unordered_set<const void*> seen_v;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const auto& v = vs[i];
    const auto t = w.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                "spectral_ext: weights[", i, "] has dtype ", t,
                "; supported weight dtypes are float32, float64, bfloat16 and float16");
    TORCH_CHECK(w.dim() >= 2, "spectral_ext: weights[", i, "] is ", w.dim(), "-D with shape ",
                w.sizes(), "; the spectral norm needs a matrix (at least 2 dimensions)");
    TORCH_CHECK(w.numel() > 0, "spectral_ext: weights[", i, "] has shape ", w.sizes(),
                " with no elements");
    TORCH_CHECK(w.device() == device, "spectral_ext: weights[", i, "] is on ", w.device(),
                " but weights[0] is on ", device);
    TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
                "spectral_ext: vs[", i, "] has dtype ", v.scalar_type(),
                "; v must be float32 or float64");
    TORCH_CHECK(v.dim() == 1 && v.size(0) == matrix_cols(w), "spectral_ext: vs[", i,
                "] has shape ", v.sizes(), " but weights[", i, "] of shape ", w.sizes(),
                " matricizes to ", w.size(0), " x ", matrix_cols(w), ", so v must have shape (",
                matrix_cols(w), ",)");
    TORCH_CHECK(v.device() == device, "spectral_ext: vs[", i, "] is on ", v.device(),
                " but weights[0] is on ", device);
    TORCH_CHECK(seen_v.insert(v.unsafeGetTensorImpl()).second, "spectral_ext: vs[", i,
                "] is the same tensor as an earlier v: each layer needs its own vector");
    if (grads != nullptr) {
      const auto& g = (*grads)[i];
      TORCH_CHECK(g.sizes() == w.sizes(), "spectral_ext: grads[", i, "] has shape ", g.sizes(),
                  " but weights[", i, "] has shape ", w.sizes());
      TORCH_CHECK(g.scalar_type() == t, "spectral_ext: grads[", i, "] has dtype ",
                  g.scalar_type(), " but weights[", i, "] has dtype ", t);
      TORCH_CHECK(g.device() == device, "spectral_ext: grads[", i, "] is on ", g.device(),
                  " but weights[0] is on ", device);
    }
  }
}

}  // namespace spectral_ext
