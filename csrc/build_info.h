// The CUDA architecture list the build used, as a string.  setup.py / CMakeLists.txt pass it as a
// token sequence (SPECTRAL_EXT_CUDA_ARCH_TOKENS=8.0/9.0+PTX), which needs no shell quoting.
#pragma once

#define SPECTRAL_EXT_STR2(x) #x
#define SPECTRAL_EXT_STR(x) SPECTRAL_EXT_STR2(x)
#ifdef SPECTRAL_EXT_CUDA_ARCH_TOKENS
#define SPECTRAL_EXT_CUDA_ARCHS SPECTRAL_EXT_STR(SPECTRAL_EXT_CUDA_ARCH_TOKENS)
#else
#define SPECTRAL_EXT_CUDA_ARCHS ""
#endif
