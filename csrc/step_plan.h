// The tensors of a persistent step plan (issue 14 item 1), shared by the CPU plan
// (csrc/cpu/fused_step_cpu.cpp) and the CUDA plan (csrc/cuda/binding.cpp).
//
// An eager step through the op passes 3 x L tensors through the dispatcher (boxed into an
// IValue list each), runs every input check and rebuilds the layer table: for 512 small layers
// that is hundreds of microseconds of host work per step.  A plan is built once from the
// weights and their vectors and keeps them (strong references: the memory it points into cannot
// be freed under it) with a snapshot of every tensor's metadata.  A reference to a weight makes
// torch.utils.swap_tensors refuse it (it wants no other holder of the TensorImpl), and
// Module._apply swaps Parameters under torch.__future__.set_swap_module_params_on_conversion:
// the regularizer uses no plan while that flag is set (regularizer.py).  (Weak references would
// not help: swap_tensors refuses those too, and locking 512 of them per step cost 30-50 us.)  Its step takes no tensor: it
// reads each weight's current .grad in C++ (zero_grad(set_to_none=True) makes new ones every
// step) and compares the metadata with the snapshot.  What it finds:
//   * kAll: the first step, a .grad that is None (created here as the op path creates it), or
//     a change of a weight's or vector's pointer, shape, strides, dtype or device (p.data = ...,
//     set_(), a cast), or of a gradient's shape, strides, dtype or device.  The full input checks
//     (check_inputs: the op's rules and messages) ran and passed; the backend prepares its table
//     again.
//   * kGradsMoved: gradients at new addresses with the snapshot's layouts (set_to_none).  Only
//     the rules relating tensors to each other (the same tensor twice, memory overlap) could
//     change their answer, and only if some storage holds two of the tensors: one hash pass
//     (check_no_overlap with detect_only) answers that, and the full checks run (kAll) only then.
//   * kNone: nothing changed, nothing checked.  Weights and vectors are held, so their memory
//     cannot be reused, and each gradient covers exactly the bytes of the one checked before.
// Gradients are not held between steps (that would keep a freed .grad alive across
// zero_grad(set_to_none=True)); only their metadata is kept, and their old pointers are compared,
// never followed.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <c10/util/SmallVector.h>

#include <cstdint>
#include <exception>
#include <vector>

#include "spectral_ext.h"

namespace spectral_ext {

class PlanTensors {
 public:
  enum class Change { kDeclined, kNone, kGradsMoved, kAll };

  PlanTensors(std::vector<at::Tensor> weights, std::vector<at::Tensor> vs)
      : weights_(std::move(weights)), vs_(std::move(vs)) {
    TORCH_CHECK_VALUE(weights_.size() == vs_.size(), "got ", weights_.size(), " weights but ",
                      vs_.size(), " vectors (vs): one v per weight");
    TORCH_CHECK_VALUE(!weights_.empty(), "the spectral_ext ops need at least one layer");
    for (size_t i = 0; i < weights_.size(); ++i) {
      TORCH_CHECK_VALUE(weights_[i].defined() && vs_[i].defined(), "a step plan needs defined "
                        "tensors; weights[", i, "] or vs[", i, "] is undefined");
    }
  }

  // Reads this step's gradients and says what changed (see above).  kDeclined, having done
  // nothing, when the weights are no longer on `type` or some weight does not require grad:
  // the caller then takes the op path, which knows what to do with frozen weights (skip them)
  // or another device.  Throws, having changed nothing, when the full checks fail.  Pair with
  // end() (Step below does).  The common case, kNone, touches each tensor's metadata once and
  // copies no tensor handle: for 512 layers this loop is most of the plan's host time.
  Change begin(int64_t n_iter, c10::DeviceType type) {
    if (weights_[0].device().type() != type) return Change::kDeclined;
    const size_t L = weights_.size();
    bool same = valid_, moved = false;
    for (size_t i = 0; i < L; ++i) {
      const c10::TensorImpl* w = weights_[i].unsafeGetTensorImpl();
      if (!w->requires_grad()) return Change::kDeclined;
      if (!same) continue;
      const at::Tensor& g = w->grad();   // (at::Tensor::grad() adds a non-leaf warning test)
      const LayerMeta& m = meta_[i];
      same = m.w.same(weights_[i], true) && m.v.same(vs_[i], true) && m.g.same(g, false);
      moved |= same && Meta::address(g) != m.g.ptr;
    }
    if (same && !moved) return Change::kNone;
    grads_.resize(L);
    bool missing = false;
    for (size_t i = 0; i < L; ++i) {
      grads_[i] = weights_[i].grad();
      missing |= !grads_[i].defined();
    }
    const at::TensorList grads(grads_);
    if (same && !check_no_overlap(weights_, vs_, &grads, /*detect_only=*/true)) {
      for (size_t i = 0; i < L; ++i) meta_[i].g.ptr = Meta::address(grads_[i]);
      return Change::kGradsMoved;
    }
    full_check(n_iter);   // throws before anything is changed
    if (missing) create_missing_grads();
    snapshot();
    ++full_checks_;
    return Change::kAll;
  }

  void end() { grads_.clear(); }

  // The scalar checks of a plan's step, in the op's order and with its messages (the op checks
  // n_iter in check_inputs, which a plan runs only when a tensor changed).
  static void check_scalars(double lam, int64_t n_iter) {
    check_lam(lam);
    TORCH_CHECK_VALUE(n_iter >= 1, "n_iter must be >= 1, got ", n_iter);
  }

  // begin() in the constructor, end() on every way out.
  // If the step fails after begin() (the backend's preparation threw: a refused capture, out of
  // memory), the snapshot no longer describes what the backend has prepared: it is dropped, so
  // the next step runs the full checks and the backend prepares everything again (kAll).
  struct Step {
    Step(PlanTensors& t, int64_t n_iter, c10::DeviceType type)
        : t(t), change(t.begin(n_iter, type)), exceptions_(std::uncaught_exceptions()) {}
    ~Step() {
      if (std::uncaught_exceptions() > exceptions_) t.valid_ = false;
      t.end();
    }
    PlanTensors& t;
    const Change change;

   private:
    const int exceptions_;
  };

  const std::vector<at::Tensor>& weights() const { return weights_; }
  const std::vector<at::Tensor>& vs() const { return vs_; }
  // This step's gradients (between begin and end; begin reads them only when something changed)
  const std::vector<at::Tensor>& grads() {
    if (grads_.empty()) {
      grads_.reserve(weights_.size());
      for (const auto& w : weights_) grads_.push_back(w.grad());
    }
    return grads_;
  }
  // The number of layers
  size_t size() const { return weights_.size(); }
  // How many steps ran the full input checks (tests: the fast path must skip them).
  int64_t full_checks() const { return full_checks_; }

 private:
  // A tensor's layout as the checks and the table saw it.
  struct Meta {
    const void* ptr = nullptr;
    at::ScalarType dtype = at::kFloat;
    c10::Device device{c10::kCPU};
    // inline up to 5 dimensions: the table of all layers' metadata is one array, read in order
    c10::SmallVector<int64_t, 5> sizes, strides;

    // The address of t's first element, read from the TensorImpl and its storage directly
    // (const_data_ptr() adds checks that cost more than the whole comparison); nullptr for
    // a tensor without storage (a sparse .grad: never the same as a checked one).
    static const void* address(const at::Tensor& t) {
      const c10::TensorImpl* i = t.unsafeGetTensorImpl();
      if (!t.defined() || !i->has_storage()) return nullptr;
      return static_cast<const char*>(i->unsafe_storage().data()) +
             i->storage_offset() * static_cast<int64_t>(i->itemsize());
    }
    void take(const at::Tensor& t) {
      ptr = address(t);
      dtype = t.scalar_type();
      device = t.device();
      sizes.assign(t.sizes().begin(), t.sizes().end());
      strides.assign(t.strides().begin(), t.strides().end());
    }
    // same layout (and, with with_ptr, same address)
    bool same(const at::Tensor& t, bool with_ptr) const {
      if (!t.defined()) return false;
      const c10::TensorImpl* i = t.unsafeGetTensorImpl();
      const auto sz = i->sizes();
      const auto st = i->strides();
      if (sz.size() != sizes.size()) return false;
      for (size_t d = 0; d < sizes.size(); ++d) {
        if (sz[d] != sizes[d] || st[d] != strides[d]) return false;
      }
      return i->dtype() == dtype && i->device() == device && (!with_ptr || address(t) == ptr);
    }
  };

  // The op path's checks, with the op path's messages.  A missing .grad is checked as the
  // zeros the op path would create for it (fresh memory of the weight's layout: it passes
  // every rule), after the leaf rule of spectral_ext/_checks.py's resolve_grads.
  void full_check(int64_t n_iter) {
    std::vector<at::Tensor> grads(grads_);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) {
        TORCH_CHECK_VALUE(weights_[i].is_leaf(), "weights[", i, "] is not a leaf tensor, so it "
                          "has no .grad to add into; pass grads=... explicitly");
        grads[i] = at::empty_like(weights_[i]);
      }
    }
    const at::TensorList gl(grads);
    check_inputs(weights_, vs_, &gl, n_iter);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads_[i].defined()) grads_[i] = grads[i];   // zeroed and attached on success only
    }
  }

  // .grad = zeros_like(weight), as the op path does (at::zeros_like is empty_like + zero_).
  void create_missing_grads() {
    for (size_t i = 0; i < grads_.size(); ++i) {
      if (!weights_[i].grad().defined()) {
        grads_[i].zero_();
        weights_[i].mutable_grad() = grads_[i];
      }
    }
  }

  void snapshot() {
    const size_t L = weights_.size();
    meta_.resize(L);
    for (size_t i = 0; i < L; ++i) {
      meta_[i].w.take(weights_[i]);
      meta_[i].v.take(vs_[i]);
      meta_[i].g.take(grads_[i]);
    }
    valid_ = true;
  }

  std::vector<at::Tensor> weights_, vs_;
  std::vector<at::Tensor> grads_;   // this step's gradients (cleared by end())
  struct LayerMeta {
    Meta w, v, g;
  };
  std::vector<LayerMeta> meta_;
  bool valid_ = false;
  int64_t full_checks_ = 0;
};

}  // namespace spectral_ext
