"""`make sanitize` runs this first: the spectral_ext it tests is the ASan/UBSan build (the
sanitizers really are in the loaded extension, and no other copy shadows it)."""

import os

import pytest

import spectral_ext
from spectral_ext import _build_config


@pytest.mark.skipif(os.environ.get("LD_PRELOAD", "").find("libasan") < 0,
                    reason="only under `make sanitize` (libasan preloaded)")
def test_sanitized_build_is_loaded():
    assert _build_config.SANITIZE, spectral_ext.__file__
    import spectral_ext._C as C
    with open(C.__file__, "rb") as f:
        assert b"__asan_" in f.read(), "the loaded _C has no ASan instrumentation"
