"""The CUDA backend's kernels and binding, built for the CPU emulation (csrc/cuda/emulation.h).

``load()`` compiles csrc/cuda/binding.cpp and csrc/cuda/fused_step.cu (through emulated.cpp) as
C++ with -DSPECTRAL_EXT_EMULATE, once per session, and returns ``torch.ops.spectral_ext_emu``,
whose ``fused_step`` is the CUDA backend's code path on CPU tensors: the same checks, layer
table, tiling and kernels, each CUDA thread run as a fiber, the blocks of each launch in a random
order drawn from SPECTRAL_EXT_EMU_ORDER_SEED (tests/conftest.py sets it from the test seed).  It shows the indexing, the
reductions and the numerics without a GPU; it cannot show speed or the GPU memory model.
Needs the CUDA headers (cuda_fp16.h, cuda_runtime_api.h) and libcudart_static.a, not a GPU.
"""

import os
import random
import tempfile
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
_state = {}


def unavailable_reason():
    """None if the emulation can be built here, else why not."""
    need = [os.path.join(ROOT, "csrc", "cuda", "binding.cpp"),
            os.path.join(CUDA_HOME, "include", "cuda_fp16.h"),
            os.path.join(CUDA_HOME, "lib64", "libcudart_static.a")]
    missing = [p for p in need if not os.path.exists(p)]
    if missing:
        return f"the CUDA emulation needs {', '.join(missing)}"
    return None


def load():
    """torch.ops.spectral_ext_emu (building it on first use); raises if it cannot be built."""
    if "ops" not in _state:
        from torch.utils import cpp_extension
        # one build folder per checkout: worktrees side by side must not load each other's build
        build = os.path.join(tempfile.gettempdir(), f"spectral_ext_cuda_emu_{os.getuid()}_"
                             f"{zlib.crc32(ROOT.encode()):08x}")
        os.makedirs(build, exist_ok=True)
        flags = ["-DSPECTRAL_EXT_EMULATE", "-O3", "-g0", "-std=c++20", "-Wno-unknown-pragmas"]
        module = cpp_extension.load(
            name="spectral_ext_cuda_emu",
            sources=[os.path.join(ROOT, "csrc", "cuda", "binding.cpp"),
                     os.path.join(ROOT, "csrc", "cuda", "emulated.cpp"),
                     os.path.join(ROOT, "csrc", "plan_entry.cpp")],
            extra_cflags=flags,
            extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(CUDA_HOME, "include")],
            extra_ldflags=[f"-L{os.path.join(CUDA_HOME, 'lib64')}", "-l:libcudart_static.a",
                           "-ldl", "-lrt", "-lpthread"],
            build_directory=build, is_python_module=True, with_cuda=False, verbose=False)
        ops = torch.ops.spectral_ext_emu
        seed = os.environ.get("SPECTRAL_EXT_EMU_ORDER_SEED")
        ops.block_order(int(seed) if seed else random.SystemRandom().randrange(1, 2**62))
        _state["ops"] = ops
        _state["module"] = module
    return _state["ops"]


def plan_step(plan, lam, n_iter):
    """csrc/plan_entry.cpp's plan_step (spectral_ext._C.plan_step in the real build) for the
    emulation's CudaStepPlan: plan.step(lam, n_iter) without torchbind's method call."""
    load()
    return _state["module"].plan_step(plan, lam, n_iter)
