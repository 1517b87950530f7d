// A CPU emulation of the few CUDA features fused_step.cu uses, for tests on machines without a
// GPU: the same kernel source, compiled by g++ with SPECTRAL_EXT_EMULATE (csrc/cuda/emulated.cpp),
// runs every block of a grid one after the other, each CUDA thread as a fiber (ucontext).
// The blocks of a launch run in a random order drawn from a seed (emulate_block_order), so that a
// result that depends on the order of the blocks (only the "last block" steps may see the others'
// results) shows up as a difference between seeds.
//
// * __syncthreads waits until every live thread of the block arrives; __shfl_xor_sync until every
//   live lane of the warp arrives (so a shuffle that not all lanes reach deadlocks, which is
//   reported as an error instead of the undefined behaviour it is on a GPU);
// * __shared__ is `static`: blocks run one at a time, so one copy per kernel is per block;
// * atomics, fences and __ldcg are plain memory operations (one OS thread).
// What it cannot show: timing, the memory model across concurrently running blocks, alignment
// faults, and anything of the real compiler.  Those need a GPU (benchmarks/gpu_check.sh).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#undef __global__
#undef __device__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(n)

namespace spectral_ext {
namespace cuda {
namespace emu {

struct Dim {
  unsigned int x = 0, y = 0, z = 0;
};

class Block {
 public:
  static constexpr size_t kStack = 64 * 1024;

  // Runs body() as n threads of one block; returns false on a deadlock.
  bool run(int n, const std::function<void()>& body) {
    if (static_cast<int>(fibers_.size()) != n) {
      fibers_.assign(n, Fiber{});
      stacks_.reset(new char[static_cast<size_t>(n) * kStack]);  // untouched until used
      lane_gen_.assign(n, 0);
      shfl_.assign(static_cast<size_t>((n + 31) / 32) * 2 * 32, 0);
    }
    n_ = n;
    body_ = &body;
    std::fill(lane_gen_.begin(), lane_gen_.end(), 0);
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers_[t];
      f.state = kRunnable;
      f.waiting_on = -1;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks_.get() + static_cast<size_t>(t) * kStack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &sched_;
      makecontext(&f.ctx, &Block::entry, 0);
    }
    for (;;) {
      bool ran = false;
      for (int t = 0; t < n; ++t) {
        if (fibers_[t].state != kRunnable) continue;
        current_ = t;
        swapcontext(&sched_, &fibers_[t].ctx);
        ran = true;
      }
      if (release()) continue;
      bool all_done = true;
      for (int t = 0; t < n; ++t) all_done &= fibers_[t].state == kDone;
      if (all_done) return true;
      if (!ran) return false;  // every live thread waits on a barrier that cannot complete
    }
  }

  int tid() const { return current_; }

  // Barrier 0: the block; 1 + w: warp w.
  void wait(int barrier) {
    Fiber& f = fibers_[current_];
    f.state = kWaiting;
    f.waiting_on = barrier;
    swapcontext(&f.ctx, &sched_);
  }

  template <typename T>
  T shfl_xor(T x, int mask) {
    const int t = current_, warp = t / 32, lane = t % 32;
    const int parity = lane_gen_[t]++ & 1;  // double buffer: see the comment in release()
    uint64_t* buf = shfl_.data() + (static_cast<size_t>(warp) * 2 + parity) * 32;
    std::memcpy(&buf[lane], &x, sizeof(T));
    wait(1 + warp);
    T y;
    std::memcpy(&y, &buf[lane ^ mask], sizeof(T));
    return y;
  }

 private:
  enum State { kRunnable, kWaiting, kDone };
  struct Fiber {
    ucontext_t ctx;
    State state = kRunnable;
    int waiting_on = -1;
  };

  static void entry();

  // Wakes the threads of every barrier that all its live participants have reached.  A lane
  // writes shuffle buffer (k mod 2) only after every lane passed shuffle k-1's barrier, i.e.
  // after all reads of shuffle k-2 (the same buffer): two buffers suffice.
  bool release() {
    bool any = false;
    const int warps = (n_ + 31) / 32;
    for (int b = 0; b <= warps; ++b) {
      const int lo = b == 0 ? 0 : (b - 1) * 32, hi = b == 0 ? n_ : std::min(n_, b * 32);
      int live = 0, waiting = 0;
      for (int t = lo; t < hi; ++t) {
        if (fibers_[t].state == kDone) continue;
        ++live;
        waiting += fibers_[t].state == kWaiting && fibers_[t].waiting_on == b;
      }
      if (live > 0 && waiting == live) {
        for (int t = lo; t < hi; ++t) {
          if (fibers_[t].state == kWaiting) fibers_[t].state = kRunnable;
        }
        any = true;
      }
    }
    return any;
  }

  std::vector<Fiber> fibers_;
  std::unique_ptr<char[]> stacks_;
  std::vector<int> lane_gen_;
  std::vector<uint64_t> shfl_;
  ucontext_t sched_;
  const std::function<void()>* body_ = nullptr;
  int n_ = 0, current_ = 0;

  friend Block& block();
};

inline Block& block() {
  static Block b;
  return b;
}

inline void Block::entry() {
  Block& b = block();
  (*b.body_)();
  b.fibers_[b.current_].state = kDone;  // uc_link returns to the scheduler
}

inline Dim g_block_idx;
inline cudaError_t g_error = cudaSuccess;
inline int64_t g_launches = 0;  // kernel launches so far (tests count them per step)
inline bool g_skip_kernels = false;  // count launches but run nothing (to time the host path)
inline uint64_t g_order_seed = 0;    // 0: blocks in order; else a random order per launch
inline uint64_t g_last_order_hash = 0;
inline int64_t g_fail_after = -1;    // >= 0: the next launch fails after this many blocks
// the runtime's current device, and the device of the (CPU) tensors as the binding sees them:
// a launch, memset or event made while another device is current fails, as on a GPU
inline int g_device = 0;
inline int g_tensor_device = 0;

inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline Dim thread_idx() { return Dim{static_cast<unsigned int>(block().tid()), 0, 0}; }

// kernel<<<grid, threads>>>(...) as `launch(grid, threads, [&] { kernel(...); })`
inline void launch(unsigned int grid, int threads, const std::function<void()>& body) {
  ++g_launches;
  if (g_skip_kernels) return;
  if (g_device != g_tensor_device) {
    g_error = cudaErrorInvalidResourceHandle;   // a stream of another device
    return;
  }
  std::vector<unsigned int> order(grid);
  std::iota(order.begin(), order.end(), 0u);
  if (g_order_seed != 0) {   // Fisher-Yates, a fresh order per launch
    uint64_t state = g_order_seed ^ (static_cast<uint64_t>(g_launches) * 0xD1B54A32D192ED03ull);
    for (unsigned int i = grid; i > 1; --i) std::swap(order[i - 1], order[splitmix64(state) % i]);
  }
  uint64_t hash = 1469598103934665603ull;   // FNV-1a of the order, for tests
  for (unsigned int b : order) hash = (hash ^ b) * 1099511628211ull;
  g_last_order_hash = hash;
  int64_t ran = 0;
  for (unsigned int b : order) {
    if (g_error != cudaSuccess) break;
    if (g_fail_after >= 0 && ran == g_fail_after) {
      g_fail_after = -1;
      g_error = cudaErrorLaunchFailure;
      break;
    }
    g_block_idx.x = b;
    ++ran;
    if (!block().run(threads, body)) {
      std::fprintf(stderr, "spectral_ext CUDA emulation: deadlock in block %u\n", b);
      g_error = cudaErrorLaunchFailure;
    }
  }
}

inline cudaError_t last_error() {
  const cudaError_t e = g_error;
  g_error = cudaSuccess;
  return e;
}

}  // namespace emu

// the device built-ins fused_step.cu uses
using std::frexp;
using std::isfinite;
using std::ldexp;
using std::min;
using std::sqrt;
inline void __syncthreads() { emu::block().wait(0); }
inline void __threadfence() {}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  const unsigned int old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T x) { *p = x; }
template <typename T>
inline T __shfl_xor_sync(unsigned int /*mask*/, T x, int lane_mask) {
  return emu::block().shfl_xor(x, lane_mask);
}

}  // namespace cuda
}  // namespace spectral_ext

#define threadIdx (::spectral_ext::cuda::emu::thread_idx())
#define blockIdx (::spectral_ext::cuda::emu::g_block_idx)
#define cudaGetLastError ::spectral_ext::cuda::emu::last_error
