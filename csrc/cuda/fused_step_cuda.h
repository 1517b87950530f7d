// The CUDA kernels' interface: plain C++ (no torch headers), shared by fused_step.cu (nvcc) and
// binding.cpp (the torch side, g++).  See fused_step.cu for the algorithm.
//
// A call describes one weight-dtype group of layers:
//   * a device table of LayerDesc (one per layer) and of Tile (one per thread block and phase),
//     built by the host once and cached while pointers, shapes and strides stay the same;
//   * a workspace allocated per call: partial sums, the counters of the "last block" steps and a
//     flag per layer, the latter two zeroed by the first operation of every step.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace spectral_ext {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline int dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}
// elements per 16-byte vector access
inline int dtype_vec(DType t) { return 16 / dtype_size(t); }
// the accumulation type's size: float64 for float64 weights, else float32
inline int acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

// Largest tile: at most kMaxTileRows rows and kMaxStripGroups column groups (a group is one
// 16-byte vector when the layer allows vector access, else one element).
constexpr int kThreads = 256;
constexpr int kMaxTileRows = 1024;
constexpr int kMaxStripGroups = 128;
constexpr int64_t kTileBytes = 64 * 1024;   // target bytes of W per tile

// One layer.  W element (r, c) is at W[r * ldw + c * scw]; likewise G with (ldg, scg); v[c] is at
// v[c * vstride] (float32, or float64 when v_double).  All 8-byte fields first.
struct LayerDesc {
  const void* W;
  void* G;
  void* v;
  int64_t rows, cols;
  int64_t ldw, scw, ldg, scg, vstride;
  int64_t u_off;    // this layer's rows in u_raw
  int64_t v_off;    // this layer's columns in vp
  int64_t pu_off;   // its n_cb x rows partial sums of W v in Pu
  int64_t pv_off;   // its n_rb x cols partial sums of W^T u in Pv
  int64_t out;      // its index in sigma (the caller's list position)
  int32_t rb_size, cb_size;  // tile rows, tile columns
  int32_t n_rb, n_cb;        // tiles along rows and columns
  int32_t rb_base, cb_base;  // index of its first row block / column strip in the group
  int32_t v_double;
  int32_t wvec, gvec;        // 16-byte vector access allowed for W / G
  int32_t pad_;
};

struct Tile {
  int32_t layer, rb, cb, pad_;
};

// A partial sum of squares: s * 2^(2e).  The exponent keeps sums of float64 squares in range
// (1e-170^2 underflows a double; float32 squares always fit, and their e is 0).
struct SquareSum {
  double s;
  int32_t e;
  int32_t pad_;
};

// Pointers into the device table and the per-call workspace, by value to every kernel.
struct StepArgs {
  const LayerDesc* layers;
  const Tile* tiles;
  int32_t n_layers, n_tiles;
  // Per call, in the workspace, and zeroed by the launcher before the first kernel: the counters
  // (one per row block, per column strip, and two per layer) and the per-layer flag "an earlier
  // iteration of this call gave a new v" (`updated`).  Per call, not per cached table: two
  // streams or graphs stepping the same tensors, or a step that failed half-way, cannot leave
  // another step a counter that makes the wrong block "last".
  unsigned int* cnt_rb;
  unsigned int* cnt_cb;
  unsigned int* cnt_layer_a;
  unsigned int* cnt_layer_b;
  // one launch per step (LaunchMode::kPersistent, step_kernel): the ticket counter, and per
  // layer how many of its row passes (done_a) and column passes (done_b) are complete; counted
  // in both modes (one atomic per layer and pass), read only by step_kernel
  unsigned int* ticket;
  unsigned int* done_a;
  unsigned int* done_b;
  int32_t* updated;
  void* zero_begin;          // [zero_begin, zero_begin + zero_bytes): counters and flags
  int64_t zero_bytes;
  // workspace (acc = float32, or float64 for float64 weights)
  void* Pu;        // acc [sum n_cb * rows]
  void* u_raw;     // acc [sum rows]
  SquareSum* pu2;  // [total row blocks]   partial ||u_raw||^2
  double* unrm;    // [n_layers]            ||u_raw|| (u = u_raw / ||u_raw||, 0 for a zero matrix)
  void* Pv;        // acc [sum n_rb * cols]
  void* vp;        // acc [sum cols]        v' = W^T u
  void* vcur;      // acc [sum cols]        v between the iterations of one call
  SquareSum* pv2;  // [total column strips] partial ||v'||^2
  void* sigma;     // [caller's L]          float32, or float64 when sigma_double
  int32_t sigma_double;
  DType dtype;
  double lam;
  // spectral_norms (launch_spectral_norms): the last iteration writes u (acc, at L.u_off of
  // u_out) and the new v (in v's own dtype, at L.v_off of v_out_f or, for a float64 v, v_out_d;
  // the caller's v bit for bit when no iteration updated it) there; the caller's v is only read.
  void* u_out = nullptr;
  void* v_out_f = nullptr;
  void* v_out_d = nullptr;
  // spectral_norms' backward (launch_norms_backward): grad_kernel forms
  // G (+)= grad_scale[L.out] * u v^T, u read from L.W (acc type, contiguous) and v from L.v;
  // grad_scale is float32, or float64 when scale_double.  Reads no workspace.
  const void* grad_scale = nullptr;
  int32_t scale_double = 0;
  int32_t accumulate = 1;    // 0: G is overwritten (never read)
};

// How the launchers below run a step.  kPhases: a kernel per pass (rows and columns per
// iteration, then the gradient): 2 * n_iter + 1 kernels.  kPersistent: one kernel (step_kernel
// in fused_step.cu) of as many blocks as fit on the GPU, whose tiles wait on their layer's
// previous pass; the same sums, bitwise the same results.  kPhases is the default: the one
// measured on a GPU (see README, "Performance"); `make gpu-check STAGES=bench` times both.
// Process-wide (set by spectral_ext.set_cuda_launch_mode).
enum class LaunchMode : int { kPhases = 0, kPersistent = 1 };
void set_launch_mode(LaunchMode mode);
LaunchMode launch_mode();

// Zeroes the counters and flags, then launches n_iter x (rows, columns) and one gradient kernel
// on `stream`: a memset and 2 * n_iter + 1 kernels (kPhases), or a memset and one kernel
// (kPersistent).  The caller has made the tensors' device
// current in this library's runtime (DeviceScope in binding.cpp).  Returns the first error (no
// synchronisation).
cudaError_t launch_fused_step(const StepArgs& args, int n_iter, cudaStream_t stream);

// spectral_norms' forward: the memset and 2 * n_iter kernels of launch_fused_step without the
// gradient kernel; args.u_out and the v_out of every v dtype present are set.
cudaError_t launch_spectral_norms(const StepArgs& args, int n_iter, cudaStream_t stream);

// spectral_norms' backward: one gradient kernel over every layer (args.grad_scale set).
cudaError_t launch_norms_backward(const StepArgs& args, cudaStream_t stream);

// This library's (static) CUDA runtime keeps its own current device, separate from torch's:
// makes `device` current and returns the previous one in *previous (restore with set_device).
cudaError_t exchange_device(int device, int* previous);
cudaError_t set_device(int device);

// Whether `stream` is being captured into a CUDA graph (false on error).
bool stream_is_capturing(cudaStream_t stream);

// Ties `object` to the lifetime of the graph being captured on `stream`: release(object) is
// called (by a CUDA-internal thread; it must make no CUDA call) once that graph and every
// executable graph instantiated from it are destroyed.
cudaError_t retain_for_graph(cudaStream_t stream, void* object, void (*release)(void*));

// An event recorded on `stream` after the table upload, so that another stream can wait for the
// upload without a host synchronisation; destroyed with the table.
cudaError_t record_event(cudaStream_t stream, void** event);
cudaError_t wait_event(cudaStream_t stream, void* event);
void destroy_event(void* event);

// Versions and device count, as seen by this library's CUDA runtime (for diagnostics).
void runtime_info(int* runtime_version, int* driver_version, int* device_count);

#ifdef SPECTRAL_EXT_EMULATE
// Test hooks of the CPU emulation (tests/cuda_emulation.py):
// kernel launches so far; with skip, launches run nothing (to time the host path)
int64_t emulated_launches();
void emulate_skip_kernels(bool skip);
// blocks of a launch run in a random order drawn from this seed (0: in order)
void emulate_block_order(uint64_t seed);
uint64_t emulated_last_order_hash();   // of the last launch's block order
// the next launch runs only its first n blocks, then fails (a step that dies half-way)
void emulate_fail_after(int64_t n_blocks);
// stream capture: while on, stream_is_capturing is true and retain_for_graph keeps the object
// until emulate_destroy_graphs(); the device the binding treats CPU tensors as on, and the
// runtime's current device (a runtime call made with another device current fails, as an
// event or stream of another device does on a GPU)
void emulate_capture(bool on);
int64_t emulate_destroy_graphs();
void emulate_tensor_device(int device);
int emulated_runtime_device();
#endif

}  // namespace cuda
}  // namespace spectral_ext
