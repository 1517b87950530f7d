"""Build of spectral_ext: the Python package plus the C++ extension ``spectral_ext._C``.

No network, pip or git calls and no hardware sniffing here.  The CPU kernels always build (no GPU
needed).  Knobs:

* ``MAX_JOBS``: ninja parallelism (read by torch.utils.cpp_extension);
* ``SPECTRAL_EXT_CPU_ARCH``: the ``-march`` of the CPU kernels.  Default ``x86-64-v3`` on x86-64
  (AVX2 + FMA: twice the speed of the SSE2 baseline, measured in benchmarks/RESULTS.md); set it
  empty for a portable build.  The choice is recorded in ``spectral_ext/_build_config.py`` so the
  package refuses to load a v3 extension on a CPU without AVX2 (falling back to the reference)
  instead of crashing.
* ``SPECTRAL_EXT_CUDA`` = ``auto`` (default) | ``0`` | ``1``: compile the CUDA kernels
  (``csrc/cuda/``) when nvcc is found / never / always (a missing nvcc is then an error).  Gated on
  nvcc only, never on a visible GPU: the kernels build on a CPU machine, and the module imports
  where there is no GPU.  nvcc is ``$CUDA_HOME/bin/nvcc`` (default ``/usr/local/cuda``).
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures, default ``8.0;9.0+PTX`` (sm_80 and sm_90
  binaries plus compute_90 PTX for newer GPUs).
* ``SPECTRAL_EXT_SANITIZE=1``: build the C++ code with AddressSanitizer and UndefinedBehavior-
  Sanitizer (``make sanitize``; the process must preload libasan, see the Makefile).
The ``.cu`` files include no torch header: nvcc compiles them to objects that are linked, with a
static CUDA runtime, into the same extension as the CPU kernels (torch's CUDAExtension cannot
be used with the CPU build of torch).  A compile error in a ``.cu`` file fails the build.
See ../shared/TOOLCHAIN.md for why the flags are what they are.
"""

import glob
import os
import platform
import re
import shutil
import subprocess

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# -fopenmp in BOTH compile and link arguments, or at::parallel_for silently runs on one thread.
# -g0: debug info triples the compile time of each translation unit that includes torch headers.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
LINK_FLAGS = ["-fopenmp"]

SANITIZE = os.environ.get("SPECTRAL_EXT_SANITIZE", "0") == "1"
if SANITIZE:
    SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
           "-fno-omit-frame-pointer"]
    CXX_FLAGS = ["-O1", "-g1", "-fopenmp", "-std=c++20", *SAN]
    LINK_FLAGS = ["-fopenmp", *SAN]

CPU_ARCH = os.environ.get(
    "SPECTRAL_EXT_CPU_ARCH", "x86-64-v3" if platform.machine() in ("x86_64", "AMD64") else "")
if CPU_ARCH:
    CXX_FLAGS.append(f"-march={CPU_ARCH}")


def find_cuda():
    """CUDA_HOME if the CUDA kernels are to be built, else None (SPECTRAL_EXT_CUDA decides)."""
    mode = os.environ.get("SPECTRAL_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SPECTRAL_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        # /usr/local/bin/nvcc may be a wrapper script: prefer the usual install location
        home = "/usr/local/cuda"
        if not os.path.exists(os.path.join(home, "bin", "nvcc")) and shutil.which("nvcc"):
            home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    missing = [p for p in ("bin/nvcc", "include/cuda_runtime_api.h", "lib64/libcudart_static.a")
               if not os.path.exists(os.path.join(home, p))]
    if missing:
        if mode == "1":
            raise SystemExit(f"SPECTRAL_EXT_CUDA=1 but CUDA_HOME={home} lacks {', '.join(missing)}")
        print(f"spectral_ext: building without the CUDA kernels (no {missing[0]} under {home}; "
              "set CUDA_HOME or SPECTRAL_EXT_CUDA=0 to silence)")
        return None
    return home


def cuda_gencode_flags(arch_list):
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST such as "8.0;9.0+PTX" or "8.6 9.0a"."""
    flags = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item)
        if not m:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r} (expected e.g. 8.0 or "
                             "9.0+PTX)")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


CUDA_HOME = find_cuda()
CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0+PTX"
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC",
              *cuda_gencode_flags(CUDA_ARCHS)] if CUDA_HOME else []

with open(os.path.join(HERE, "spectral_ext", "_build_config.py"), "w") as f:
    f.write("# written by setup.py: how the C++/CUDA extension was built\n"
            f"CPU_ARCH = {CPU_ARCH!r}   # -march of the CPU kernels\n"
            f"CUDA = {CUDA_HOME is not None!r}   # the CUDA kernels are compiled in\n"
            f"CUDA_ARCHS = {CUDA_ARCHS if CUDA_HOME else ''!r}   # TORCH_CUDA_ARCH_LIST they were built for\n"
            f"SANITIZE = {SANITIZE!r}   # built with ASan/UBSan (make sanitize)\n")


class BuildExt(BuildExtension):
    """BuildExtension, plus the .cu files compiled by nvcc into objects linked into _C."""

    def build_extensions(self):
        if CUDA_HOME:
            nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
            out_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(out_dir, exist_ok=True)
            objects = []
            for src in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))):
                obj = os.path.join(out_dir, os.path.basename(src) + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-I", os.path.join(HERE, "csrc"), *NVCC_FLAGS]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)   # a compile error fails the build
                objects.append(obj)
            for ext in self.extensions:
                ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extensions()


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + ["csrc/module.cpp",
                                                                          "csrc/plan_entry.cpp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx_flags, link_flags = list(CXX_FLAGS), list(LINK_FLAGS)
    if CUDA_HOME:
        sources.append("csrc/cuda/binding.cpp")
        include_dirs.append(os.path.join(CUDA_HOME, "include"))
        # the arch list as a macro token sequence (stringified in C++: no shell quoting needed)
        cxx_flags += ["-DSPECTRAL_EXT_WITH_CUDA",
                      "-DSPECTRAL_EXT_CUDA_ARCH_TOKENS=" + CUDA_ARCHS.replace(";", "/").replace(" ", "/")]
        # static cudart, its symbols kept private to _C (torch's own cudart is a different copy)
        link_flags += [f"-L{os.path.join(CUDA_HOME, 'lib64')}", "-l:libcudart_static.a", "-ldl",
                       "-lrt", "-lpthread", "-Wl,--exclude-libs,libcudart_static.a"]
    return [
        CppExtension(
            name="spectral_ext._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
