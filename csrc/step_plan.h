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
#include <ATen/core/ivalue.h>
#include <ATen/ops/empty_like.h>

#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <vector>

#include "spectral_ext.h"

namespace spectral_ext {

// What the CPU and CUDA plans (CpuStepPlan, CudaStepPlan: torch custom classes) have in common:
// the step.  Python calls it either as a custom-class method (plan.step(lam, n_iter): torch's
// binding code converts the arguments, about 3-4 us per call) or through plan_entry.cpp's
// spectral_ext._C.plan_step(plan, lam, n_iter), which finds this base in the ScriptObject and
// calls it directly (the regularizer's eager path).
class StepPlan : public torch::CustomClassHolder {
 public:
  // One step: adds lam * sigma * u v^T to each weight's .grad (created as zeros where it is
  // None) and updates the vectors; returns sigma [L].  None, having done nothing, when the
  // weights are no longer on the plan's device or some weight does not require grad (frozen):
  // the caller then takes the op path.
  virtual std::optional<at::Tensor> step(double lam, int64_t n_iter) = 0;
};

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
  // nothing, when the weights are no longer on `type`, some weight does not require grad or
  // is a negated view:
  // the caller then takes the op path, which knows what to do with frozen weights (skip them)
  // or another device.  Throws, having changed nothing, when the full checks fail.  Pair with
  // end() (Step below does).  The common case, kNone, touches each tensor's metadata once and
  // copies no tensor handle: for 512 layers this loop is most of the plan's host time.
  Change begin(int64_t n_iter, c10::DeviceType type) {
    if (weights_[0].device().type() != type) return Change::kDeclined;
    const size_t L = weights_.size();
    bool same = valid_, moved = false;
    const int64_t* dims = dims_.data();
    for (size_t i = 0; i < L; ++i) {
      prefetch(i);
      // the weight's AutogradMeta, read directly: TensorImpl::requires_grad() and grad() are
      // two out-of-line and two virtual calls each, for the same two fields
      const auto* am = autograd_meta(i);
      if (am == nullptr || !requires_grad(am)) return Change::kDeclined;
      if (!same) continue;
      const LayerMeta& m = meta_[i];
      const void* g_at = nullptr;
      same = m.w.same_at(weights_[i].unsafeGetTensorImpl(), dims) &&
             m.v.same_at(vs_[i].unsafeGetTensorImpl(), dims) &&
             m.g.same(grad_of(am), dims, &g_at);
      moved |= same && g_at != m.g.ptr;
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
      for (size_t i = 0; i < L; ++i) {
        meta_[i].g.ptr = Meta::address(grads_[i].unsafeGetTensorImpl());
      }
      return Change::kGradsMoved;
    }
    // A negated weight (torch._neg_view) is resolved by the op path's dispatcher; the kernels
    // would read its memory unnegated: the op path takes it.
    for (const auto& w : weights_) {
      if (w.is_neg()) return Change::kDeclined;
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
  // Steps of one plan are serialized: both ways of calling a step release the GIL, so two
  // threads stepping the same plan would otherwise race on its snapshot and tables (the lock is
  // taken before begin() and released after end(); uncontended it costs a few nanoseconds).
  struct Step {
    Step(PlanTensors& t, int64_t n_iter, c10::DeviceType type)
        : lock_(t.mutex_), t(t), change(t.begin(n_iter, type)),
          exceptions_(std::uncaught_exceptions()) {}
    ~Step() {
      if (std::uncaught_exceptions() > exceptions_) t.valid_ = false;
      t.end();
    }

   private:
    std::unique_lock<std::mutex> lock_;   // first: held for the whole step of the caller

   public:
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
  // begin() is a chain of dependent loads per layer (weight -> AutogradMeta -> .grad -> its
  // storage; the weight's and the vector's storage), most of them cache misses when the steps
  // are apart: the links of layers further ahead are prefetched, each from the one fetched a
  // stage before, so that the comparison of layer i finds them in cache.
  const torch::autograd::AutogradMeta* autograd_meta(size_t i) const {
    return static_cast<const torch::autograd::AutogradMeta*>(
        weights_[i].unsafeGetTensorImpl()->autograd_meta());
  }
  // TensorImpl::requires_grad(), with its fields read directly; a view's (the virtual
  // DifferentiableViewMeta::requires_grad: a leaf view of a base that requires grad, made under
  // no_grad, requires grad too) through the call
  static bool requires_grad(const torch::autograd::AutogradMeta* am) {
    return am->requires_grad_ || am->grad_fn_ || (am->is_view_ && am->requires_grad());
  }
  static const c10::TensorImpl* grad_of(const torch::autograd::AutogradMeta* am) {
    return am->grad_.defined() ? am->grad_.unsafeGetTensorImpl() : nullptr;
  }
  // begin() follows a chain of dependent loads per layer (weight -> AutogradMeta -> .grad ->
  // its storage; the weight's and the vector's storage), each most likely an L1 miss for 512
  // layers: the links of the layers ahead are prefetched, each stage from the one fetched a
  // stage before, so that layer i finds its objects in cache.
  void prefetch(size_t i) const {
    constexpr size_t kImpl = 8, kMeta = 6, kGrad = 4, kGradStorage = 2;
    const size_t L = weights_.size();
    auto lines = [](const void* p, size_t bytes) {   // every cache line of an object
      for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
    };
    auto storage = [&](const c10::TensorImpl* t) {
      const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl();
      if (s != nullptr) lines(s, sizeof(c10::StorageImpl));
    };
    if (i + kImpl < L) {
      lines(weights_[i + kImpl].unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
      lines(vs_[i + kImpl].unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
    }
    if (i + kMeta < L) {
      if (const auto* am = autograd_meta(i + kMeta)) {   // the lines of the fields read
        __builtin_prefetch(&am->grad_);
        __builtin_prefetch(&am->requires_grad_);
      }
      storage(weights_[i + kMeta].unsafeGetTensorImpl());
      storage(vs_[i + kMeta].unsafeGetTensorImpl());
    }
    if (i + kGrad < L) {
      const auto* am = autograd_meta(i + kGrad);
      if (am != nullptr && am->grad_.defined()) lines(grad_of(am), sizeof(c10::TensorImpl));
    }
    if (i + kGradStorage < L) {
      const auto* am = autograd_meta(i + kGradStorage);
      if (am != nullptr && am->grad_.defined()) storage(grad_of(am));
    }
  }

  // A tensor's layout as the checks and the table saw it.  Compared for 3 tensors of every
  // layer at every step, so it reads only what TensorImpl and StorageImpl return inline, and
  // is always inlined: the dispatch keys (backend, layout, the conj/neg/Python bits: a tensor
  // with the snapshot's keys is a dense, strided one without custom size policies), dtype,
  // sizes and strides, and the storage's device and address.
  struct Meta {
    const void* ptr = nullptr;
    c10::DispatchKeySet keys;
    caffe2::TypeMeta dtype;
    c10::Device device{c10::kCPU};
    uint32_t ndim = 0;
    uint32_t at = 0;   // sizes then strides in dims_[at, at + 2 * ndim)

    // The address of i's first element, or nullptr for a tensor without storage (a sparse .grad:
    // never the same as a checked one).  Read from the TensorImpl and its storage directly
    // (const_data_ptr() adds checks that cost more than the whole comparison).
    C10_ALWAYS_INLINE static const void* address(const c10::TensorImpl* i) {
      const c10::StorageImpl* s = i->unsafe_storage().unsafeGetStorageImpl();
      if (s == nullptr) return nullptr;
      return static_cast<const char*>(s->data_ptr().get()) +
             i->storage_offset() * static_cast<int64_t>(i->dtype().itemsize());
    }
    void take(const at::Tensor& t, std::vector<int64_t>& dims) {
      const c10::TensorImpl* i = t.unsafeGetTensorImpl();
      const c10::StorageImpl* s = i->unsafe_storage().unsafeGetStorageImpl();
      ptr = address(i);
      keys = i->key_set();
      dtype = i->dtype();
      device = s != nullptr ? s->data_ptr().device() : t.device();
      ndim = static_cast<uint32_t>(t.dim());
      at = static_cast<uint32_t>(dims.size());
      dims.insert(dims.end(), t.sizes().begin(), t.sizes().end());
      dims.insert(dims.end(), t.strides().begin(), t.strides().end());
    }
    // Whether i (nullptr: none) has the snapshot's layout; if so, *addr is its address.
    C10_ALWAYS_INLINE bool same(const c10::TensorImpl* i, const int64_t* dims,
                                const void** addr) const {
      if (i == nullptr || i->key_set() != keys || i->dtype() != dtype) return false;
      const auto sz = i->sizes();
      if (sz.size() != ndim) return false;
      const auto st = i->strides();
      dims += at;
      for (size_t d = 0; d < ndim; ++d) {
        if (sz[d] != dims[d] || st[d] != dims[ndim + d]) return false;
      }
      const c10::StorageImpl* s = i->unsafe_storage().unsafeGetStorageImpl();
      if (s == nullptr) return false;
      const at::DataPtr& dp = s->data_ptr();
      if (dp.device() != device) return false;
      *addr = static_cast<const char*>(dp.get()) +
              i->storage_offset() * static_cast<int64_t>(dtype.itemsize());
      return true;
    }
    // the same layout at the same address
    C10_ALWAYS_INLINE bool same_at(const c10::TensorImpl* i, const int64_t* dims) const {
      const void* a = nullptr;
      return same(i, dims, &a) && a == ptr;
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
    dims_.clear();
    for (size_t i = 0; i < L; ++i) {
      meta_[i].w.take(weights_[i], dims_);
      meta_[i].v.take(vs_[i], dims_);
      meta_[i].g.take(grads_[i], dims_);
    }
    valid_ = true;
  }

  std::vector<at::Tensor> weights_, vs_;
  std::vector<at::Tensor> grads_;   // this step's gradients (cleared by end())
  struct LayerMeta {
    Meta w, v, g;
  };
  std::vector<LayerMeta> meta_;
  std::vector<int64_t> dims_;   // the snapshot's sizes and strides, in the order of meta_
  bool valid_ = false;
  std::mutex mutex_;   // held by a Step
  int64_t full_checks_ = 0;
};

}  // namespace spectral_ext
