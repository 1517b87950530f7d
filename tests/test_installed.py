"""The suite runs against the installed package (the wheel `make test` builds), with its C++
kernels, not against the source tree."""

import os
import pathlib

import pytest

import spectral_ext as se

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("SPECTRAL_EXT_ALLOW_SOURCE_TREE") == "1",
                    reason="SPECTRAL_EXT_ALLOW_SOURCE_TREE=1: testing an in-place build on purpose")
def test_imported_package_is_the_installed_one():
    path = pathlib.Path(se.__file__).resolve()
    assert path.parent != REPO / "spectral_ext", f"imported from the source tree: {path}"
    assert "site-packages" in path.parts, path


def test_cpu_extension_is_built_with_openmp():
    info = se.available_backends()["cpu"]
    assert info.available, info.detail
    assert "OpenMP" in info.detail and "WITHOUT" not in info.detail, info.detail


def _dynamic_needed(path):
    """The DT_NEEDED library names of a 64-bit little-endian ELF shared object."""
    import struct
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not ELF64 LE"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    names = []
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type != 6:   # SHT_DYNAMIC
            continue
        strtab = sections[link]
        for k in range(size // entsize):
            tag, val = struct.unpack_from("<qQ", data, off + k * entsize)
            if tag == 1:   # DT_NEEDED
                start = strtab[4] + val
                names.append(data[start:data.index(b"\0", start)].decode())
    return names


def test_extension_links_the_shared_libstdcxx():
    """A compiler wrapper that links libstdc++ statically (the lent GPU machine's CXX did) gives
    _C a private libstdc++ whose locale is never initialized: the first error message that
    formats a number crashed the process.  _C must use the libstdc++ torch uses."""
    from spectral_ext import _C
    needed = _dynamic_needed(_C.__file__)
    assert any(n.startswith("libstdc++.so") for n in needed), \
        f"{_C.__file__} does not load the shared libstdc++ (DT_NEEDED: {needed}); rebuild with " \
        "a compiler that links it dynamically (CXX=/usr/bin/g++)"
