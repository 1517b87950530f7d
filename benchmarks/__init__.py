"""spectral_ext benchmarks: `python -m benchmarks` (or `make bench`) prints the comparison table.

Run from the repository root, ``python -m benchmarks`` puts the source tree first on sys.path,
where ``spectral_ext`` has no compiled kernels: the table would silently lack the native
backends.  So before anything imports spectral_ext, the root moves to the END of sys.path (the
installed package wins; ``benchmarks`` itself is already imported), and ``__main__`` stops with a
message if the package it got still has no C++ extension.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "spectral_ext" not in sys.modules:
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    if len(_rest) != len(sys.path):
        sys.path[:] = _rest + [_ROOT]
