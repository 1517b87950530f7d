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
