"""Build of spectral_ext: the Python package plus the C++ extension ``spectral_ext._C``.

No network, pip or git calls and no hardware sniffing here.  The CPU kernels always build (no GPU
needed).  Knobs:

* ``MAX_JOBS``: ninja parallelism (read by torch.utils.cpp_extension);
* ``SPECTRAL_EXT_CPU_ARCH``: the ``-march`` of the CPU kernels.  Default ``x86-64-v3`` on x86-64
  (AVX2 + FMA: twice the speed of the SSE2 baseline, measured in benchmarks/RESULTS.md); set it
  empty for a portable build.  The choice is recorded in ``spectral_ext/_build_config.py`` so the
  package refuses to load a v3 extension on a CPU without AVX2 (falling back to the reference)
  instead of crashing.
See ../shared/TOOLCHAIN.md for why the flags are what they are.
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# -fopenmp in BOTH compile and link arguments, or at::parallel_for silently runs on one thread.
# -g0: debug info triples the compile time of each translation unit that includes torch headers.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
LINK_FLAGS = ["-fopenmp"]

CPU_ARCH = os.environ.get(
    "SPECTRAL_EXT_CPU_ARCH", "x86-64-v3" if platform.machine() in ("x86_64", "AMD64") else "")
if CPU_ARCH:
    CXX_FLAGS.append(f"-march={CPU_ARCH}")
with open(os.path.join(HERE, "spectral_ext", "_build_config.py"), "w") as f:
    f.write("# written by setup.py: the -march the C++ CPU kernels were compiled for\n"
            f"CPU_ARCH = {CPU_ARCH!r}\n")


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    return [
        CppExtension(
            name="spectral_ext._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
