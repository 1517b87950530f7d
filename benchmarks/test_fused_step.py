"""One regularization step per weight set x implementation x dtype x n_iter x device.

extra_info carries what the timing is judged against: bytes a two-pass step must move, the
copy bandwidth measured in this session, the floor (bytes / bandwidth) and the ops (CPU) or
device launches (CUDA) per step.  Timing per round is wall-clock around one step; on CUDA the
step is followed by a synchronize (the CLI's CUDA-event timing has no such overhead)."""

import pytest
import torch

from . import harness

# Relative error bounds of one step against spectral_ext.reference (max |diff| / max |ref|).
# Backends accumulate in float32 with float32 vectors; their bfloat16 gradient is within 2 ulps
# of the reference's.  The baselines compute in the weights' dtype (bf16 matvecs and vectors),
# as a user's loop does.
TOL = {  # (is a baseline, dtype) -> (sigma, grad)
    (False, "float32"): (1e-5, 1e-4), (False, "bfloat16"): (1e-5, 2 ** -6),
    (True, "float32"): (1e-5, 1e-4), (True, "bfloat16"): (2e-2, 6e-2),
}


def _synced(fn, device):
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step(benchmark, bandwidth, set_name, device_impl, dtype, n_iter):
    dev, impl = device_impl
    device = torch.device(dev)
    err = harness.check_against_reference(set_name, impl, harness.DTYPES[dtype], device, n_iter)
    tol_sigma, tol_grad = TOL[(impl in harness.BASELINES, dtype)]
    assert err["sigma"] <= tol_sigma and err["grad"] <= tol_grad, \
        f"{impl} on {set_name} ({dtype}, n_iter={n_iter}) against the reference: {err}"

    weights = harness.make_weights(set_name, harness.DTYPES[dtype], device)
    fn = harness.make_impls(weights, [impl], n_iter)[impl]
    nbytes, bw = harness.floor_bytes(weights, n_iter), bandwidth(device)
    benchmark.group = f"{set_name} {dtype} n_iter={n_iter} {dev}"
    benchmark.extra_info.update({
        "layers": len(weights), "params": sum(w.numel() for w in weights),
        "floor_bytes": nbytes, "copy_bandwidth_Bps": bw, "floor_s": nbytes / bw,
        ("launches" if device.type == "cuda" else "ops") + "_per_step":
            harness.count_per_step(fn, device),
        "max_rel_err_sigma": err["sigma"], "max_rel_err_grad": err["grad"]})
    benchmark(_synced(fn, device))
