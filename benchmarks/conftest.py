"""pytest-benchmark suites over weight set x implementation x dtype x n_iter (x device).

    pytest benchmarks --benchmark-only                        # every set (minutes; llama-1b: GBs)
    pytest benchmarks --benchmark-only --bench-sets resnet50  # one set
    pytest benchmarks --benchmark-disable                     # CI: each case once, small sets

With --benchmark-disable (how `make test` runs them) each case runs once as a plain test on the
small sets (QUICK_SETS) unless --bench-sets says otherwise.  Every case first checks one step
of the implementation against spectral_ext.reference, so a fast wrong result fails.
"""

import pytest
import torch

from . import harness, step
from .models import SETS

QUICK_SETS = ("nin", "512x64x64")


def pytest_addoption(parser):
    parser.addoption("--bench-sets", default=None,
                     help="comma list of weight sets (benchmarks/models.py), or 'all'; default: "
                          f"all, or {','.join(QUICK_SETS)} under --benchmark-disable")
    parser.addoption("--bench-devices", default=None,
                     help="comma list of devices; default: cpu, and cuda when there is a GPU")


def _sets(config):
    opt = config.getoption("--bench-sets")
    if opt is None:
        return list(QUICK_SETS) if config.getoption("benchmark_disable") else list(SETS)
    names = list(SETS) if opt == "all" else opt.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        raise pytest.UsageError(f"unknown --bench-sets {unknown}; choose from {', '.join(SETS)}")
    return names


def _devices(config):
    opt = config.getoption("--bench-devices")
    return opt.split(",") if opt else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "set_name" in metafunc.fixturenames:
        metafunc.parametrize("set_name", _sets(metafunc.config))
    if "device_impl" in metafunc.fixturenames:
        # the implementations that run on each device: the two baselines, the reference, and
        # every available native backend of that device (tests/ checks availability itself)
        pairs = [(d, i) for d in _devices(metafunc.config) for i in
                 list(harness.BASELINES) + ["reference"] + harness.native_backends(torch.device(d))]
        metafunc.parametrize("device_impl", pairs, ids=[f"{d}-{i}" for d, i in pairs])
    if "device_model" in metafunc.fixturenames:
        pairs = [(d, m) for d in _devices(metafunc.config) for m in step.models_for(d)]
        metafunc.parametrize("device_model", pairs, ids=[f"{d}-{m}" for d, m in pairs])


_BANDWIDTH = {}


@pytest.fixture
def bandwidth():
    """Bytes per second of a large copy on a device, measured once per session and device."""
    def measure(device):
        device = torch.device(device)
        if device not in _BANDWIDTH:
            nbytes = (512 if device.type == "cuda" else 256) << 20
            t = harness.interleaved_medians({"copy": harness.copy_impl(nbytes, device)}, device,
                                            rounds=5)
            _BANDWIDTH[device] = 2 * nbytes / t["copy"]
        return _BANDWIDTH[device]
    return measure
