// The torch side of the CUDA backend: registers spectral_ext::fused_step, spectral_norms and
// spectral_norms_backward for CUDA tensors, and the persistent step plan (CudaStepPlan).
//
// Per call: the same input checks as the CPU kernel (csrc/spectral_ext.h), the tensors' device
// made current (torch's and this library's runtime, restored on return), layers grouped by
// weight dtype, and per group a cached device table (layer descriptors and tiles; see
// fused_step_cuda.h), a workspace from torch's caching allocator (partial sums, counters, flags),
// and a memset plus 2 * n_iter + 1 launches on torch's current stream (fused_step.cu).  No host
// synchronisation; a step whose table is cached copies nothing to the device and can be
// captured in a CUDA graph.
//
// Table lifetime.  A captured graph holds raw pointers into a table, so a table used during a
// capture is pinned: it stays cached (never evicted, not dropped by clear_plans) until every
// graph that uses it is destroyed (a CUDA user object owned by the graph unpins it).  Other
// tables are evicted least-recently-used beyond kMaxPlans.
//
// The kernels are compiled by nvcc into plain objects without torch headers and linked with a
// static CUDA runtime (../shared/TOOLCHAIN.md: the CPU torch used for building has no CUDA
// libraries).  That runtime keeps its own current device, so the launcher sets it, and the stream
// comes from c10's device guard interface, which needs no c10_cuda at link time.
//
// With -DSPECTRAL_EXT_EMULATE (tests only: tests/cuda_emulation.py) the same file registers the
// op spectral_ext_emu::fused_step for CPU tensors, run by the CPU emulation of the kernels
// (emulation.h): the table lives in host memory and there is no stream.

#include <ATen/TensorUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/split_with_sizes_copy.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "../build_info.h"
#include "../spectral_ext.h"
#include "../step_plan.h"
#include "fused_step_cuda.h"


namespace spectral_ext {
namespace cuda {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported weight dtype ", py_dtype(t));
  }
  return DType::kFloat32;  // not reached
}

// (row stride, column stride) of t seen as a rows x cols matrix, or nothing when no view exists.
std::optional<std::pair<int64_t, int64_t>> matrix_strides(const at::Tensor& t, int64_t rows,
                                                          int64_t cols) {
  if (t.is_contiguous()) return std::make_pair(cols, int64_t{1});  // the common case, no allocation
  const int64_t shape[2] = {rows, cols};
  auto st = at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef(shape, 2));
  if (!st) return std::nullopt;
  return std::make_pair((*st)[0], (*st)[1]);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A layer's tensors as the kernels address them; copies (and write-backs) only for a weight or
// gradient that cannot be viewed as a strided rows x cols matrix.
struct Operand {
  at::Tensor W_hold, G_hold, G_out;
};

LayerDesc describe(const at::Tensor& w, const at::Tensor& g, const at::Tensor& v, int64_t out,
                   Operand& keep) {
  LayerDesc d;
  std::memset(&d, 0, sizeof(d));  // the descriptor's bytes are the cache key: no stray padding
  d.rows = w.size(0);
  d.cols = matrix_cols(w);
  if (auto s = matrix_strides(w, d.rows, d.cols)) {
    d.W = w.const_data_ptr();
    std::tie(d.ldw, d.scw) = *s;
  } else {
    keep.W_hold = w.reshape({d.rows, d.cols}).contiguous();
    d.W = keep.W_hold.const_data_ptr();
    d.ldw = d.cols;
    d.scw = 1;
  }
  if (!g.defined()) {   // spectral_norms: no gradient (d.G stays null)
  } else if (auto s = matrix_strides(g, d.rows, d.cols)) {
    d.G = g.mutable_data_ptr();
    std::tie(d.ldg, d.scg) = *s;
  } else {
    keep.G_hold = g.reshape({d.rows, d.cols}).contiguous();
    keep.G_out = g;
    d.G = keep.G_hold.mutable_data_ptr();
    d.ldg = d.cols;
    d.scg = 1;
  }
  // strides of size-1 dimensions are arbitrary: make them canonical (they are never stepped)
  if (d.rows == 1) d.ldw = d.ldg = 0;
  if (d.cols == 1) d.scw = d.scg = 1;
  d.v = v.data_ptr();
  d.vstride = v.stride(0);
  d.v_double = v.scalar_type() == at::kDouble;
  d.out = out;
  const DType t = dtype_of(w.scalar_type());
  const int vec = dtype_vec(t);
  d.wvec = aligned16(d.W) && d.scw == 1 && d.ldw % vec == 0 && d.cols % vec == 0;
  d.gvec = g.defined() && aligned16(d.G) && d.scg == 1 && d.ldg % vec == 0 && d.cols % vec == 0;
  // tiles: up to kMaxStripGroups column groups wide, about kTileBytes of W, <= kMaxTileRows rows
  d.cb_size = static_cast<int32_t>(std::min<int64_t>(d.cols, kMaxStripGroups * (d.wvec ? vec : 1)));
  int64_t rb = kTileBytes / dtype_size(t) / d.cb_size;
  rb = std::clamp<int64_t>(rb / 8 * 8, 8, kMaxTileRows);
  d.rb_size = static_cast<int32_t>(std::min<int64_t>(rb, d.rows));
  const int64_t n_rb = (d.rows + d.rb_size - 1) / d.rb_size;
  const int64_t n_cb = (d.cols + d.cb_size - 1) / d.cb_size;
  TORCH_CHECK(n_rb * n_cb <= INT_MAX, "weights[", out, "] is too large for the CUDA kernels");
  d.n_rb = static_cast<int32_t>(n_rb);
  d.n_cb = static_cast<int32_t>(n_cb);
  return d;
}

// Everything of one dtype group that depends only on pointers, shapes and strides: the device
// table [layers | tiles] and the workspace sizes.
struct Plan {
  at::Tensor host;    // pinned copy of the table (the source of the upload; kept alive)
  at::Tensor table;   // on the device
  cudaStream_t stream = nullptr;  // the upload's stream, and an event recorded after it
  void* uploaded = nullptr;
  std::atomic<int64_t> graph_refs{0};   // captured graphs using the table: pinned while > 0
  ~Plan() { destroy_event(uploaded); }
  int64_t n_layers = 0, n_tiles = 0, total_rb = 0, total_cb = 0;
  int64_t n_pu = 0, n_u = 0, n_pv = 0, n_v = 0;
  int64_t tiles_at = 0;
};

// Called by a CUDA-internal thread when the last graph using the plan is destroyed: no CUDA
// call, no free (the cache frees the plan later, on a caller's thread).
void release_plan_from_graph(void* plan) {
  static_cast<Plan*>(plan)->graph_refs.fetch_sub(1, std::memory_order_acq_rel);
}

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Fills offsets and bases in place and builds the plan; uploads the table on `stream`.
std::shared_ptr<Plan> build_plan(std::vector<LayerDesc>& descs, const at::Device& device,
                                 cudaStream_t stream) {
  auto p = std::make_shared<Plan>();
  p->n_layers = static_cast<int64_t>(descs.size());
  for (auto& d : descs) {
    d.u_off = p->n_u;
    d.v_off = p->n_v;
    d.pu_off = p->n_pu;
    d.pv_off = p->n_pv;
    TORCH_CHECK(p->total_rb + d.n_rb <= INT_MAX && p->total_cb + d.n_cb <= INT_MAX &&
                    p->n_tiles + int64_t{d.n_rb} * d.n_cb <= INT_MAX,
                "too many tiles for one launch of the CUDA kernels");
    d.rb_base = static_cast<int32_t>(p->total_rb);
    d.cb_base = static_cast<int32_t>(p->total_cb);
    p->n_u += d.rows;
    p->n_v += d.cols;
    p->n_pu += int64_t{d.n_cb} * d.rows;
    p->n_pv += int64_t{d.n_rb} * d.cols;
    p->total_rb += d.n_rb;
    p->total_cb += d.n_cb;
    p->n_tiles += int64_t{d.n_rb} * d.n_cb;
  }
  // tiles of the largest layers first (their reductions finish while small layers run)
  std::vector<int32_t> order(descs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return descs[a].rows * descs[a].cols > descs[b].rows * descs[b].cols;
  });
  std::vector<Tile> tiles;
  tiles.reserve(p->n_tiles);
  for (int32_t l : order) {
    for (int32_t rb = 0; rb < descs[l].n_rb; ++rb) {
      for (int32_t cb = 0; cb < descs[l].n_cb; ++cb) tiles.push_back(Tile{l, rb, cb, 0});
    }
  }
  const int64_t layer_bytes = round16(p->n_layers * int64_t{sizeof(LayerDesc)});
  const int64_t tile_bytes = round16(p->n_tiles * int64_t{sizeof(Tile)});
  p->tiles_at = layer_bytes;
  const int64_t bytes = layer_bytes + tile_bytes;
#ifdef SPECTRAL_EXT_EMULATE
  (void)device;
  p->host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
#else
  p->host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
#endif
  auto* h = p->host.mutable_data_ptr<uint8_t>();
  std::memset(h, 0, bytes);
  std::memcpy(h, descs.data(), descs.size() * sizeof(LayerDesc));
  std::memcpy(h + p->tiles_at, tiles.data(), tiles.size() * sizeof(Tile));
#ifdef SPECTRAL_EXT_EMULATE
  p->table = p->host;
#else
  p->table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  p->table.copy_(p->host, /*non_blocking=*/true);   // on torch's current stream, i.e. `stream`
#endif
  p->stream = stream;
  const cudaError_t e = record_event(stream, &p->uploaded);
  TORCH_CHECK(e == cudaSuccess, "spectral_ext: recording the table upload failed: ",
              cudaGetErrorString(e));
  return p;
}

// Plans keyed by (device, dtype, the descriptors' bytes before offsets are filled in): a hit
// means the same pointers, shapes, strides and flags, so the cached table is exactly right.
// Least recently used first out, never a pinned plan (one a captured graph may still replay).
class PlanCache {
 public:
  std::shared_ptr<Plan> get(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(key);
    if (it == plans_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second.second);   // most recently used
    return it->second.first;
  }
  void put(const std::string& key, std::shared_ptr<Plan> plan) {
    std::lock_guard<std::mutex> lock(mu_);
    if (plans_.count(key)) return;
    for (auto it = order_.end(); plans_.size() >= kMaxPlans && it != order_.begin();) {
      --it;   // from the least recently used, skipping pinned plans
      auto found = plans_.find(*it);
      if (found->second.first->graph_refs.load(std::memory_order_acquire) > 0) continue;
      plans_.erase(found);
      it = order_.erase(it);
    }
    order_.push_front(key);
    plans_.emplace(key, std::make_pair(std::move(plan), order_.begin()));
  }
  // Drops every plan that no captured graph uses.
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = order_.begin(); it != order_.end();) {
      auto found = plans_.find(*it);
      if (found->second.first->graph_refs.load(std::memory_order_acquire) > 0) {
        ++it;
        continue;
      }
      plans_.erase(found);
      it = order_.erase(it);
    }
  }
  int64_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(plans_.size());
  }
  int64_t pinned() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (const auto& kv : plans_) n += kv.second.first->graph_refs.load() > 0;
    return n;
  }

 private:
  static constexpr size_t kMaxPlans = 16;
  std::mutex mu_;
  std::list<std::string> order_;   // most recently used first
  std::unordered_map<std::string,
                     std::pair<std::shared_ptr<Plan>, std::list<std::string>::iterator>> plans_;
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();  // never destroyed: no CUDA frees at exit
  return *cache;
}

void check_launch(cudaError_t e) {
  if (e == cudaSuccess) return;
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) {
    TORCH_CHECK(false, "spectral_ext's CUDA kernels were not built for this GPU (built for "
                "TORCH_CUDA_ARCH_LIST=\"", SPECTRAL_EXT_CUDA_ARCHS, "\"): ",
                cudaGetErrorString(e), "; rebuild with its architecture in TORCH_CUDA_ARCH_LIST "
                "or use backend='triton'");
  }
  TORCH_CHECK(false, "spectral_ext CUDA kernel launch failed: ", cudaGetErrorString(e));
}

// The position (in the group) of the first layer whose weight or gradient describe() copied,
// or -1.
int64_t first_copied(const std::vector<Operand>& keep, size_t n) {
  for (size_t j = keep.size() - n; j < keep.size(); ++j)
    if (keep[j].W_hold.defined() || keep[j].G_hold.defined())
      return static_cast<int64_t>(j - (keep.size() - n));
  return -1;
}

// The layer table of one dtype group (the layers `idx`; `grads` empty for spectral_norms):
// described, then found in the cache or built and uploaded.  Copies made for layouts with no
// strided view go to `keep`; the cache key to `key_out` when given (empty for a table built for
// this call only).
std::shared_ptr<Plan> table_for(const std::vector<int64_t>& idx, at::TensorList weights,
                                at::TensorList vs, at::TensorList grads, cudaStream_t stream,
                                std::vector<Operand>& keep, std::string* key_out = nullptr) {
  const char* op = grads.empty() ? "spectral_norms" : "fused_step";
  const at::Device device = weights[0].device();
  const DType dt = dtype_of(weights[idx[0]].scalar_type());
  std::vector<LayerDesc> descs;
  descs.reserve(idx.size());
  for (int64_t i : idx) {
    keep.emplace_back();
    descs.push_back(describe(weights[i], grads.empty() ? at::Tensor() : grads[i], vs[i], i,
                             keep.back()));
  }
  const bool capturing = stream_is_capturing(stream);
  // A weight or gradient that cannot be viewed as a strided rows x cols matrix is copied into a
  // new buffer every call (describe()), so its table's pointers never repeat: such a table is
  // built for this call only (caching it would evict the tables that do repeat), and a graph
  // cannot capture it (the copy is made, and the table uploaded, on every call).  Freed when the
  // caller drops it: the caching allocator reuses the table's memory only for work ordered after
  // this step's kernels on the same stream.
  const int64_t first_copy = first_copied(keep, idx.size());
  if (first_copy >= 0) {
    TORCH_CHECK(!capturing,
                "spectral_ext.", op, " (CUDA): weights[", idx[first_copy], "]",
                grads.empty() ? "" : " or its gradient", " cannot be viewed as a rows x cols "
                "matrix (e.g. a permuted conv weight), so each call copies it, which a CUDA graph "
                "cannot capture; make it", grads.empty() ? "" : " (and its .grad)",
                " contiguous, or call it outside the graph");
    if (key_out != nullptr) key_out->clear();
    return build_plan(descs, device, stream);
  }
  std::string key(reinterpret_cast<const char*>(descs.data()), descs.size() * sizeof(LayerDesc));
  key += '/' + std::to_string(device.index()) + '/' + std::to_string(static_cast<int>(dt));
  std::shared_ptr<Plan> plan = plan_cache().get(key);
  if (!plan) {
    TORCH_CHECK(!capturing,
                "spectral_ext.", op, " (CUDA): these tensors have no cached layer table yet, "
                "and uploading one is not allowed while the stream is captured into a CUDA "
                "graph; call ", op, " once with the same tensors before capturing (warm-up)");
    plan = build_plan(descs, device, stream);
    plan_cache().put(key, plan);
  }
  if (key_out != nullptr) *key_out = std::move(key);
  return plan;
}

// spectral_norms' output buffers of one dtype group (u in the accumulation type, v by v's dtype),
// addressed by each layer's u_off / v_off in the table.
struct NormsOut {
  void* u = nullptr;
  void* v_float = nullptr;
  void* v_double = nullptr;
};

// The launches of one dtype group with its table, on `stream`: fused_step, or spectral_norms
// (the table built without gradients, `norms` set).
void launch_group(Plan* plan, DType dt, const at::Device& device, double lam, int64_t n_iter,
                  const at::Tensor& sigma, const std::optional<c10::Stream>& torch_stream,
                  cudaStream_t stream, const NormsOut* norms = nullptr) {
  const bool capturing = stream_is_capturing(stream);
  if (plan->stream != stream && !capturing) {
    // a table uploaded on another stream: order this stream after the upload (no host sync).
    // Under capture the caller has already made the capturing stream wait for the warm-up.
    const cudaError_t e = wait_event(stream, plan->uploaded);
    TORCH_CHECK(e == cudaSuccess, "spectral_ext: waiting for the table upload failed: ",
                cudaGetErrorString(e));
    // and the caching allocator must not reuse the table (if evicted) before this stream is done
    if (torch_stream) plan->table.record_stream(*torch_stream);
  }
  if (capturing) {
    // the graph being captured will replay with this table's pointers: pin it until the graph
    // (and every executable graph made from it) is destroyed.  Should the runtime refuse the
    // user object, the table stays pinned for the life of the process instead.
    plan->graph_refs.fetch_add(1, std::memory_order_acq_rel);
    if (retain_for_graph(stream, plan, &release_plan_from_graph) != cudaSuccess) {
#ifndef SPECTRAL_EXT_EMULATE
      cudaGetLastError();
#endif
    }
  }

  const int64_t acc = acc_size(dt);
  int64_t at = 0;
  auto carve = [&at](int64_t bytes) {
    const int64_t start = at;
    at += round16(bytes);
    return start;
  };
  const int64_t ss = sizeof(SquareSum);
  const int64_t o_pu = carve(plan->n_pu * acc), o_u = carve(plan->n_u * acc),
                o_nrm = carve(plan->n_layers * 8), o_pv = carve(plan->n_pv * acc),
                o_vp = carve(plan->n_v * acc), o_vc = carve(plan->n_v * acc),
                o_pu2 = carve(plan->total_rb * ss), o_pv2 = carve(plan->total_cb * ss);
  // zeroed by the launcher at the start of every step: the counters (per row block, per column
  // strip, two per layer; the ticket and two pass counts per layer of the one-launch mode), then
  // the flags
  const int64_t n_counters = plan->total_rb + plan->total_cb + 2 * plan->n_layers + 1 +
                             2 * plan->n_layers;
  const int64_t o_zero = carve(n_counters * 4 + plan->n_layers * 4);
  at::Tensor ws = at::empty({at}, at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* w = ws.mutable_data_ptr<uint8_t>();
  uint8_t* table = plan->table.mutable_data_ptr<uint8_t>();
  auto* counters = reinterpret_cast<unsigned int*>(w + o_zero);

  StepArgs a;
  a.layers = reinterpret_cast<const LayerDesc*>(table);
  a.tiles = reinterpret_cast<const Tile*>(table + plan->tiles_at);
  a.n_layers = static_cast<int32_t>(plan->n_layers);
  a.n_tiles = static_cast<int32_t>(plan->n_tiles);
  a.cnt_rb = counters;
  a.cnt_cb = counters + plan->total_rb;
  a.cnt_layer_a = a.cnt_cb + plan->total_cb;
  a.cnt_layer_b = a.cnt_layer_a + plan->n_layers;
  a.ticket = a.cnt_layer_b + plan->n_layers;
  a.done_a = a.ticket + 1;
  a.done_b = a.done_a + plan->n_layers;
  a.updated = reinterpret_cast<int32_t*>(counters + n_counters);
  a.zero_begin = w + o_zero;
  a.zero_bytes = (n_counters + plan->n_layers) * 4;
  a.Pu = w + o_pu;
  a.u_raw = w + o_u;
  a.unrm = reinterpret_cast<double*>(w + o_nrm);
  a.Pv = w + o_pv;
  a.vp = w + o_vp;
  a.vcur = w + o_vc;
  a.pu2 = reinterpret_cast<SquareSum*>(w + o_pu2);
  a.pv2 = reinterpret_cast<SquareSum*>(w + o_pv2);
  a.sigma = sigma.mutable_data_ptr();
  a.sigma_double = sigma.scalar_type() == at::kDouble;
  a.dtype = dt;
  a.lam = lam;
  if (norms != nullptr) {
    a.u_out = norms->u;
    a.v_out_f = norms->v_float;
    a.v_out_d = norms->v_double;
    check_launch(launch_spectral_norms(a, static_cast<int>(n_iter), stream));
    return;
  }
  check_launch(launch_fused_step(a, static_cast<int>(n_iter), stream));
}

// This library's CUDA runtime has its own current device: `device` is made current for the
// call (the table upload's event, the memsets and the launches) and the previous one restored.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    const cudaError_t e = exchange_device(device, &previous_);
    TORCH_CHECK(e == cudaSuccess, "spectral_ext: cannot make CUDA device ", device,
                " current: ", cudaGetErrorString(e));
  }
  ~DeviceScope() { set_device(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

#ifdef SPECTRAL_EXT_EMULATE
int g_emulated_device = 0;   // the device index the emulation treats its CPU tensors as on
#endif

// The device the kernels run on (the emulation: a CPU "device"), made current for a call in
// torch (allocations, copies) and in this library's runtime (events, memsets, launches), both
// restored on return, and torch's current stream there.
#ifdef SPECTRAL_EXT_EMULATE
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#endif
class OnDevice {
 public:
  explicit OnDevice(const at::Device& device)
#ifdef SPECTRAL_EXT_EMULATE
      : runtime_device_(g_emulated_device) {
  }
#else
      : torch_device_(device), runtime_device_(device.index()) {
    const auto* guard = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    torch_stream = guard->getStream(device);
    stream = static_cast<cudaStream_t>(torch_stream->native_handle());
  }
#endif
  std::optional<c10::Stream> torch_stream;
  cudaStream_t stream = nullptr;

 private:
#ifndef SPECTRAL_EXT_EMULATE
  const c10::DeviceGuard torch_device_;
#endif
  DeviceScope runtime_device_;
};

void check_device(const at::Device& device, const char* op) {
#ifdef SPECTRAL_EXT_EMULATE
  (void)op;
  TORCH_CHECK_VALUE(device.is_cpu(), "the emulated CUDA kernels take CPU tensors, got ", device);
#else
  TORCH_CHECK_VALUE(device.is_cuda(), "the CUDA kernel of spectral_ext::", op, " got tensors "
                    "on ", device);
#endif
}

void check_device_and_n_iter(const at::Device& device, int64_t n_iter, const char* op) {
  TORCH_CHECK_VALUE(n_iter <= 1000000, "n_iter must be <= 1000000, got ", n_iter);
  check_device(device, op);
}

// spectral_ext::fused_step(Tensor[] weights, Tensor(a!)[] vs, Tensor(b!)[] grads, float lam,
//                          int n_iter) -> Tensor
at::Tensor fused_step_cuda(at::TensorList weights, at::TensorList vs, at::TensorList grads,
                           double lam, int64_t n_iter) {
  check_lam(lam);
  check_inputs(weights, vs, &grads, n_iter);
  const at::Device device = weights[0].device();
  check_device_and_n_iter(device, n_iter, "fused_step");
  const OnDevice on(device);
  const auto& torch_stream = on.torch_stream;
  cudaStream_t stream = on.stream;

  at::Tensor sigma = at::empty({static_cast<int64_t>(weights.size())},
                               weights[0].options().dtype(sigma_type(weights)));
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < weights.size(); ++i) {
    groups[weights[i].scalar_type()].push_back(static_cast<int64_t>(i));
  }
  std::vector<Operand> keep;
  keep.reserve(weights.size());
  for (const auto& kv : groups) {
    std::shared_ptr<Plan> plan = table_for(kv.second, weights, vs, grads, stream, keep);
    launch_group(plan.get(), dtype_of(kv.first), device, lam, n_iter, sigma, torch_stream, stream);
  }
  for (auto& k : keep) {   // gradients that had to be copied: write the result back
    if (k.G_out.defined()) k.G_out.copy_(k.G_hold.view(k.G_out.sizes()));
  }
  return sigma;
}

// spectral_ext::spectral_norms(Tensor[] weights, Tensor[] vs, int n_iter)
//     -> (Tensor sigma, Tensor[] us, Tensor[] vs_new)
// fused_step's checks, tables and kernels without the gradient kernel: 2 * n_iter launches per
// weight dtype (plus one split_with_sizes_copy per output buffer).  The kernels write u and v
// into one buffer per dtype group (u: accumulation type; v: float32 and/or float64, as each v);
// the returned us and vs_new are copies of their own (a custom op's outputs may not alias each
// other); vs is only read.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> spectral_norms_cuda(
    at::TensorList weights, at::TensorList vs, int64_t n_iter) {
  check_inputs(weights, vs, nullptr, n_iter);
  const at::Device device = weights[0].device();
  check_device_and_n_iter(device, n_iter, "spectral_norms");
  const OnDevice scope(device);
  const int64_t L = static_cast<int64_t>(weights.size());
  at::Tensor sigma = at::empty({L}, weights[0].options().dtype(sigma_type(weights)));
  std::vector<at::Tensor> us(L), vs_new(L);
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < L; ++i) groups[weights[i].scalar_type()].push_back(i);
  std::vector<Operand> keep;
  keep.reserve(weights.size());
  for (const auto& kv : groups) {
    int64_t n_u = 0, n_v = 0;
    bool any_float = false, any_double = false;
    for (int64_t i : kv.second) {
      n_u += weights[i].size(0);
      n_v += matrix_cols(weights[i]);
      (vs[i].scalar_type() == at::kDouble ? any_double : any_float) = true;
    }
    const auto opts = weights[0].options();
    at::Tensor U = at::empty({n_u}, opts.dtype(acc_type(kv.first)));
    at::Tensor VF = any_float ? at::empty({n_v}, opts.dtype(at::kFloat)) : at::Tensor();
    at::Tensor VD = any_double ? at::empty({n_v}, opts.dtype(at::kDouble)) : at::Tensor();
    NormsOut out;
    out.u = U.data_ptr();
    out.v_float = any_float ? VF.data_ptr() : nullptr;
    out.v_double = any_double ? VD.data_ptr() : nullptr;
    std::shared_ptr<Plan> plan = table_for(kv.second, weights, vs, {}, scope.stream, keep);
    launch_group(plan.get(), dtype_of(kv.first), device, 0.0, n_iter, sigma, scope.torch_stream,
                 scope.stream, &out);
    // The outputs of a custom op may not alias each other (PyTorch refuses that under CI and
    // deprecates it): each layer's u and v are copied out of the group's buffers, one
    // split_with_sizes_copy per buffer (the plan's offsets: the group's order, prefix sums).
    std::vector<int64_t> rows, cols;
    for (int64_t i : kv.second) {
      rows.push_back(weights[i].size(0));
      cols.push_back(matrix_cols(weights[i]));
    }
    const std::vector<at::Tensor> u_split = at::split_with_sizes_copy(U, rows);
    const std::vector<at::Tensor> vf_split =
        any_float ? at::split_with_sizes_copy(VF, cols) : std::vector<at::Tensor>();
    const std::vector<at::Tensor> vd_split =
        any_double ? at::split_with_sizes_copy(VD, cols) : std::vector<at::Tensor>();
    for (size_t j = 0; j < kv.second.size(); ++j) {
      const int64_t i = kv.second[j];
      us[i] = u_split[j];
      vs_new[i] = vs[i].scalar_type() == at::kDouble ? vd_split[j] : vf_split[j];
    }
  }
  return {sigma, std::move(us), std::move(vs_new)};
}

// spectral_ext::spectral_norms_backward(Tensor grad_sigma, Tensor[] us, Tensor[] vs,
//                                       Tensor(a!)[] grads, bool accumulate) -> ()
// grads[l] (+)= grad_sigma[l] * u_l v_l^T for every layer: one launch per gradient dtype, on a
// table built for this call (u, v and the gradients are new tensors every step, so their
// pointers never repeat); not capturable in a CUDA graph (the autograd formula uses the
// reference there).
void spectral_norms_backward_cuda(const at::Tensor& grad_sigma, at::TensorList us,
                                  at::TensorList vs, at::TensorList grads, bool accumulate) {
  const size_t n = grads.size();
  TORCH_CHECK_VALUE(n > 0 && us.size() == n && vs.size() == n, "spectral_norms_backward: got ",
                    n, " grads, ", us.size(), " us and ", vs.size(), " vs; one of each per layer");
  TORCH_CHECK_VALUE(grad_sigma.dim() == 1 && grad_sigma.size(0) == static_cast<int64_t>(n),
                    "spectral_norms_backward: grad_sigma has shape ", py_shape(grad_sigma.sizes()),
                    ", expected (", n, ",)");
  TORCH_CHECK_TYPE(grad_sigma.scalar_type() == at::kFloat || grad_sigma.scalar_type() == at::kDouble,
                   "spectral_norms_backward: grad_sigma must be float32 or float64, got ",
                   py_dtype(grad_sigma.scalar_type()));
  const at::Device device = grads[0].device();
  TORCH_CHECK_VALUE(grad_sigma.device() == device, "spectral_norms_backward: grad_sigma is on ",
                    grad_sigma.device(), " but grads[0] is on ", device);
  std::vector<at::Tensor> u_hold(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& g = grads[i];
    TORCH_CHECK_VALUE(g.dim() >= 2 && g.numel() > 0, "spectral_norms_backward: grads[", i,
                      "] has shape ", py_shape(g.sizes()), "; need a non-empty matrix");
    (void)dtype_of(g.scalar_type());
    const int64_t rows = g.size(0), cols = matrix_cols(g);
    TORCH_CHECK_VALUE(us[i].dim() == 1 && us[i].size(0) == rows && vs[i].dim() == 1 &&
                          vs[i].size(0) == cols,
                      "spectral_norms_backward: us[", i, "] ", py_shape(us[i].sizes()), " and vs[",
                      i, "] ", py_shape(vs[i].sizes()), " do not match grads[", i, "] of shape ",
                      py_shape(g.sizes()), " (", rows, " x ", cols, ")");
    TORCH_CHECK_TYPE(us[i].scalar_type() == acc_type(g.scalar_type()),
                     "spectral_norms_backward: us[", i, "] has dtype ",
                     py_dtype(us[i].scalar_type()), "; expected ",
                     py_dtype(acc_type(g.scalar_type())));
    TORCH_CHECK_TYPE(vs[i].scalar_type() == at::kFloat || vs[i].scalar_type() == at::kDouble,
                     "spectral_norms_backward: vs[", i, "] must be float32 or float64");
    TORCH_CHECK_VALUE(g.device() == device && us[i].device() == device &&
                          vs[i].device() == device,
                      "spectral_norms_backward: every tensor must be on ", device);
    TORCH_CHECK_VALUE(at::has_internal_overlap(g) != at::MemOverlap::Yes,
                      "spectral_norms_backward: grads[", i, "] has overlapping memory");
    u_hold[i] = us[i].contiguous();
  }
  check_device(device, "spectral_norms_backward");
  const OnDevice scope(device);
  TORCH_CHECK(!stream_is_capturing(scope.stream),
              "spectral_ext.spectral_norms backward (CUDA): the fused backward uploads a table "
              "per call, which a CUDA graph cannot capture; under capture the autograd formula "
              "uses the reference (eager capture), or run the backward outside the graph");
  const at::Tensor scale = grad_sigma.contiguous();
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < n; ++i) groups[grads[i].scalar_type()].push_back(static_cast<int64_t>(i));
  std::vector<Operand> keep;
  keep.reserve(n);
  for (const auto& kv : groups) {
    std::vector<LayerDesc> descs;
    descs.reserve(kv.second.size());
    for (int64_t i : kv.second) {
      keep.emplace_back();
      // the gradient's layout and tiles, as fused_step's; W is not read: the table's W is u
      LayerDesc d = describe(grads[i], grads[i], vs[i], i, keep.back());
      keep.back().W_hold = at::Tensor();
      d.W = u_hold[i].const_data_ptr();
      d.ldw = d.scw = 0;
      d.wvec = 0;
      descs.push_back(d);
    }
    std::shared_ptr<Plan> plan = build_plan(descs, device, scope.stream);
    uint8_t* table = plan->table.mutable_data_ptr<uint8_t>();
    StepArgs a{};
    a.layers = reinterpret_cast<const LayerDesc*>(table);
    a.tiles = reinterpret_cast<const Tile*>(table + plan->tiles_at);
    a.n_layers = static_cast<int32_t>(plan->n_layers);
    a.n_tiles = static_cast<int32_t>(plan->n_tiles);
    a.dtype = dtype_of(kv.first);
    a.grad_scale = scale.const_data_ptr();
    a.scale_double = scale.scalar_type() == at::kDouble;
    a.accumulate = accumulate;
    check_launch(launch_norms_backward(a, scope.stream));
  }
  for (auto& k : keep) {   // gradients that had to be copied: write the result back
    if (k.G_out.defined()) k.G_out.copy_(k.G_hold.view(k.G_out.sizes()));
  }
}

// The persistent step plan of this backend (issue 14 item 1; the tensors, the change test and
// the checks: ../step_plan.h; why a torch custom class: csrc/cpu/fused_step_cpu.cpp).  It keeps
// each dtype group's table (the same cached, uploaded table the op would find): while nothing
// changed (PlanTensors::Change::kNone) a step only allocates the workspace and launches, with
// no description, key or cache lookup.  Gradients that moved, a full check, or any layer whose
// weight or gradient needs a copy (its table points into the copy, made anew each step) take
// the op's way to the tables (table_for).  The launches are the op's: results are bitwise the
// op's.
class CudaStepPlan final : public StepPlan {
 public:
  CudaStepPlan(std::vector<at::Tensor> weights, std::vector<at::Tensor> vs)
      : t_(std::move(weights), std::move(vs)) {}

  // As CpuStepPlan::step; None (nothing done) when the weights left the kernels' device or a
  // weight is frozen.
  std::optional<at::Tensor> step(double lam, int64_t n_iter) override {
    PlanTensors::check_scalars(lam, n_iter);
    TORCH_CHECK_VALUE(n_iter <= 1000000, "n_iter must be <= 1000000, got ", n_iter);
    const PlanTensors::Step s(t_, n_iter, kKernelDevice);
    if (s.change == PlanTensors::Change::kDeclined) return std::nullopt;
    const auto& weights = t_.weights();
    const at::Device device = weights[0].device();
    const OnDevice on(device);
    if (s.change != PlanTensors::Change::kNone || !reusable_) {
      // not reusable until every group is built: a throw below (a refused capture, out of
      // memory) must not leave a partial groups_ for the next step to launch
      reusable_ = false;
      const at::TensorList grads(t_.grads());
      std::map<at::ScalarType, std::vector<int64_t>> by_dtype;
      for (size_t i = 0; i < weights.size(); ++i) {
        by_dtype[weights[i].scalar_type()].push_back(static_cast<int64_t>(i));
      }
      groups_.clear();
      keep_.clear();
      keep_.reserve(weights.size());
      for (const auto& kv : by_dtype) {
        Group g{dtype_of(kv.first), {}, nullptr};
        g.table = table_for(kv.second, weights, t_.vs(), grads, on.stream, keep_, &g.key);
        groups_.push_back(std::move(g));
      }
      bool reusable = true;
      for (const auto& k : keep_) reusable &= !k.W_hold.defined() && !k.G_hold.defined();
      reusable_ = reusable;
      sigma_dtype_ = sigma_type(weights);
    }
    if (stream_is_capturing(on.stream)) {
      // A captured graph pins its table through the cache (never evicted while a graph uses
      // it).  A table this plan holds may have been evicted since: the graph must use the
      // cache's entry, so the held one (uploaded, equal for the same key) goes back in first.
      for (auto& g : groups_) {
        if (auto cached = plan_cache().get(g.key)) {
          g.table = std::move(cached);
        } else {
          plan_cache().put(g.key, g.table);
        }
      }
    }
    at::Tensor sigma = at::empty({static_cast<int64_t>(weights.size())},
                                 weights[0].options().dtype(sigma_dtype_));
    for (const auto& g : groups_) {
      launch_group(g.table.get(), g.dtype, device, lam, n_iter, sigma, on.torch_stream,
                   on.stream);
    }
    for (auto& k : keep_) {   // gradients that had to be copied: write the result back
      if (k.G_out.defined()) k.G_out.copy_(k.G_hold.view(k.G_out.sizes()));
    }
    keep_.clear();            // made again next step (reusable_ is false when there were any)
    return sigma;
  }

  int64_t full_checks() const { return t_.full_checks(); }
  int64_t num_layers() const { return static_cast<int64_t>(t_.size()); }

 private:
  struct Group {
    DType dtype;
    std::string key;               // of the table in the cache
    std::shared_ptr<Plan> table;   // held: valid while the tensors' layouts are unchanged
  };
  PlanTensors t_;
  std::vector<Group> groups_;
  std::vector<Operand> keep_;
  bool reusable_ = false;
  at::ScalarType sigma_dtype_ = at::kFloat;
};

}  // namespace

// The launch mode (LaunchMode in fused_step_cuda.h) by index, for spectral_ext._C
// (spectral_ext.set_cuda_launch_mode checks the name): 0 "phases", 1 "persistent".
int launch_mode_index() { return static_cast<int>(launch_mode()); }
void set_launch_mode_index(int mode) {
  set_launch_mode(mode == 1 ? LaunchMode::kPersistent : LaunchMode::kPhases);
}
#ifdef SPECTRAL_EXT_EMULATE
// ... and by name, for the emulation's tests
void set_mode(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "phases" || mode == "persistent", "the CUDA launch mode is "
                    "'phases' or 'persistent', got '", mode, "'");
  set_launch_mode_index(mode == "persistent" ? 1 : 0);
}
#endif

// For tests and diagnostics (spectral_ext._C): the number of cached layer tables (and of those
// pinned by captured graphs), and dropping the unpinned ones.
int64_t cached_plans() { return plan_cache().size(); }
int64_t pinned_plans() { return plan_cache().pinned(); }
void clear_plans() { plan_cache().clear(); }

}  // namespace cuda

#ifdef SPECTRAL_EXT_EMULATE
TORCH_LIBRARY(spectral_ext_emu, m) {
  m.def("fused_step(Tensor[] weights, Tensor(a!)[] vs, Tensor(b!)[] grads, float lam, "
        "int n_iter) -> Tensor");
  m.def("spectral_norms(Tensor[] weights, Tensor[] vs, int n_iter) "
        "-> (Tensor, Tensor[], Tensor[])");
  m.def("spectral_norms_backward(Tensor grad_sigma, Tensor[] us, Tensor[] vs, "
        "Tensor(a!)[] grads, bool accumulate) -> ()");
  m.def("cached_plans() -> int", [] { return cuda::cached_plans(); });
  m.def("pinned_plans() -> int", [] { return cuda::pinned_plans(); });
  m.def("clear_plans() -> ()", [] { cuda::clear_plans(); });
  m.def("launches() -> int", [] { return cuda::emulated_launches(); });
  m.def("skip_kernels(bool skip) -> ()", [](bool skip) { cuda::emulate_skip_kernels(skip); });
  m.def("launch_mode(str mode) -> ()", [](const std::string& mode) { cuda::set_mode(mode); });
  m.def("block_order(int seed) -> ()",
        [](int64_t seed) { cuda::emulate_block_order(static_cast<uint64_t>(seed)); });
  m.def("last_order_hash() -> int",
        [] { return static_cast<int64_t>(cuda::emulated_last_order_hash() >> 1); });
  m.def("fail_after(int n_blocks) -> ()", [](int64_t n) { cuda::emulate_fail_after(n); });
  m.def("capture(bool on) -> ()", [](bool on) { cuda::emulate_capture(on); });
  m.def("destroy_graphs() -> int", [] { return cuda::emulate_destroy_graphs(); });
  m.def("tensor_device(int device) -> ()", [](int64_t d) {
    cuda::g_emulated_device = static_cast<int>(d);
    cuda::emulate_tensor_device(static_cast<int>(d));
  });
  m.def("runtime_device() -> int", [] { return static_cast<int64_t>(cuda::emulated_runtime_device()); });
  m.class_<cuda::CudaStepPlan>("CudaStepPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &cuda::CudaStepPlan::step)
      .def("full_checks", &cuda::CudaStepPlan::full_checks)
      .def("num_layers", &cuda::CudaStepPlan::num_layers);
}
TORCH_LIBRARY_IMPL(spectral_ext_emu, CPU, m) {
  m.impl("fused_step", &cuda::fused_step_cuda);
  m.impl("spectral_norms", &cuda::spectral_norms_cuda);
  m.impl("spectral_norms_backward", &cuda::spectral_norms_backward_cuda);
}
#else
TORCH_LIBRARY_IMPL(spectral_ext, CUDA, m) {
  m.impl("fused_step", &cuda::fused_step_cuda);
  m.impl("spectral_norms", &cuda::spectral_norms_cuda);
  m.impl("spectral_norms_backward", &cuda::spectral_norms_backward_cuda);
}
// torch.classes.spectral_ext.CudaStepPlan(weights, vs): the eager fast path of the regularizer
// on CUDA tensors (spectral_ext/functional.py, make_step_plan)
TORCH_LIBRARY_FRAGMENT(spectral_ext, m) {
  m.class_<cuda::CudaStepPlan>("CudaStepPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &cuda::CudaStepPlan::step)
      .def("full_checks", &cuda::CudaStepPlan::full_checks)
      .def("num_layers", &cuda::CudaStepPlan::num_layers);
}
#endif

}  // namespace spectral_ext
