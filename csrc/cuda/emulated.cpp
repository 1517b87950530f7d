// Test-only: the CUDA kernels compiled as C++ and run by the CPU emulation in emulation.h.
// tests/cuda_emulation.py builds this file with binding.cpp (both with -DSPECTRAL_EXT_EMULATE)
// into an extension that registers the op spectral_ext_emu::fused_step for CPU tensors.
#ifndef SPECTRAL_EXT_EMULATE
#error "emulated.cpp is built only with -DSPECTRAL_EXT_EMULATE (tests/cuda_emulation.py)"
#endif
#include "fused_step.cu"
