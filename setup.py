"""Build of spectral_ext: the Python package plus the C++ extension ``spectral_ext._C``.

No network, pip or git calls and no hardware sniffing here.  The CPU kernels always build (no GPU
needed).  Knobs: ``MAX_JOBS`` (ninja parallelism, read by torch.utils.cpp_extension).
See ../shared/TOOLCHAIN.md for why the flags are what they are.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# -fopenmp in BOTH compile and link arguments, or at::parallel_for silently runs on one thread.
# -g0: debug info triples the compile time of each translation unit that includes torch headers.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
LINK_FLAGS = ["-fopenmp"]


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
