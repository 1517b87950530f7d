"""What the CLI (``python -m benchmarks``) and the pytest-benchmark suites share: the inputs, the
implementations compared, the memory floor, timing and op/launch counting."""

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spectral_ext as se
from spectral_ext.functional import make_step_plan, plan_step

from .models import SETS
from .naive import GroupPlan, grouped_step, naive_outer_step, naive_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINES = ("naive", "grouped")          # the default columns
ALL_BASELINES = BASELINES + ("naive-outer",)
LAM = 0.01


def native_backends(device: torch.device) -> List[str]:
    """The available non-reference backends that run on this device."""
    avail = se.available_backends()
    by_device = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
    out = []
    for b in by_device.get(device.type, ()):
        if b in avail and avail[b].available:
            out.append(b)
            if b in ("cpu", "cuda"):   # its persistent step plan (the regularizer's eager path)
                out.append(b + PLAN)
            if b == "cuda":            # and the kernels in one launch per step
                out.append(ONE_LAUNCH)
    return out


#: "<backend>-plan": the backend's persistent step plan (functional.make_step_plan), as a column
PLAN = "-plan"
#: the "cuda" backend with spectral_ext.set_cuda_launch_mode("persistent"), as a column
ONE_LAUNCH = "cuda-1launch"


def backend_of(column: str) -> str:
    """The backend a column runs (cpu-plan -> cpu, cuda-1launch -> cuda)."""
    return "cuda" if column == ONE_LAUNCH else column[:-len(PLAN)] if column.endswith(PLAN) \
        else column


def make_weights(set_name: str, dtype: torch.dtype, device, seed: int = 0) -> List[torch.Tensor]:
    """The set's weights (random, scaled like a default init, never zeros) with zeroed .grad."""
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for s in SETS[set_name]():
        w = (torch.randn(s, generator=gen) / s[0] ** 0.5).to(device=device, dtype=dtype)
        w.grad = torch.zeros_like(w)
        weights.append(w)
    return weights


def floor_bytes(weights: Sequence[torch.Tensor], n_iter: int) -> int:
    """The floor's byte count: W read n_iter + 1 times (twice for n_iter = 1, the W v and W^T u
    passes; each further iteration one more read, its W^T u sharing a pass with the next W v) and
    the gradient read and written once: 16 bytes per float32 parameter for n_iter = 1, 8 for
    bfloat16.  A fused kernel can go below it (the CPU kernel reads W once per iteration)."""
    total = 0
    for w in weights:
        g = w.grad if w.grad is not None else w
        total += w.numel() * (w.element_size() * (n_iter + 1) + 2 * g.element_size())
    return total


def make_impls(weights: Sequence[torch.Tensor], names: Sequence[str], n_iter: int,
               lam: float = LAM) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a callable running one step on ``weights`` with its own vectors (all of them add
    into the same .grad, which only makes the gradients drift, never zero).  Baselines keep their
    vectors in the weights' dtype (what ``W @ v`` needs); backends take ``init_vectors``."""
    impls = {}
    for name in names:
        vs = se.init_vectors(weights)
        if name in ("naive", "naive-outer"):
            vs = [v.to(w.dtype) for v, w in zip(vs, weights)]
            fn = naive_step if name == "naive" else naive_outer_step
            impls[name] = lambda vs=vs, fn=fn: fn(weights, vs, lam=lam, n_iter=n_iter)
        elif name == "grouped":
            vs = [v.to(w.dtype) for v, w in zip(vs, weights)]
            plan = GroupPlan(weights)
            impls[name] = lambda vs=vs, plan=plan: grouped_step(weights, vs, lam=lam,
                                                                n_iter=n_iter, plan=plan)
        elif name == ONE_LAUNCH:
            impls[name] = lambda vs=vs: _one_launch(weights, vs, lam, n_iter)
        elif name.endswith(PLAN):
            impls[name] = _plan_step(weights, vs, backend_of(name), lam, n_iter)
        else:
            impls[name] = lambda vs=vs, b=name: se.fused_step(weights, vs, lam=lam,
                                                              n_iter=n_iter, backend=b)
    return impls


def _plan_step(weights, vs, backend, lam, n_iter) -> Callable[[], torch.Tensor]:
    """A step through the backend's persistent plan, called as the regularizer calls it
    (functional.plan_step).  A plan steps weights that require grad (it declines others): leaves
    sharing each weight's memory, with the weight's own .grad tensor as theirs, so it adds into
    the same gradients as the other columns."""
    leaves = []
    for w in weights:
        leaf = w.detach().requires_grad_()
        leaf.grad = w.grad
        leaves.append(leaf)
    plan = make_step_plan(leaves, vs, backend=backend)

    def step():
        sigma = plan_step(plan, lam, n_iter)
        if sigma is None:
            raise RuntimeError(f"the {backend} step plan declined the benchmark's weights")
        return sigma
    return step


def _one_launch(weights, vs, lam, n_iter):
    se.set_cuda_launch_mode("persistent")
    try:
        return se.fused_step(weights, vs, lam=lam, n_iter=n_iter, backend="cuda")
    finally:
        se.set_cuda_launch_mode("phases")


def copy_impl(nbytes: int, device) -> Callable[[], torch.Tensor]:
    """A device copy of nbytes (2 * nbytes moved): the bandwidth the floor is measured against."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(impls: Dict[str, Callable], device, rounds: int = 15,
                        batch_seconds: float = 0.03, max_seconds: float = 60.0
                        ) -> Dict[str, float]:
    """Median seconds per call of each implementation, measured in interleaved rounds (each
    round runs a batch of every implementation in turn) so that all see the same machine
    conditions.  CPU: time.perf_counter around the batch; CUDA: CUDA events around the batch,
    read after the round (no sync inside a batch).  Rounds are cut (to at least 5) when one
    round would take longer than max_seconds / rounds."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    batch = {}
    per_call = {}
    for name, fn in impls.items():
        fn()
        fn()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        per_call[name] = max(time.perf_counter() - t0, 1e-9)
        batch[name] = max(1, int(batch_seconds / per_call[name]))
    round_s = sum(per_call[n] * batch[n] for n in impls)
    rounds = max(5, min(rounds, int(max_seconds / max(round_s, 1e-9))))
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        events = {}
        for name, fn in impls.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(batch[name]):
                    fn()
                end.record()
                events[name] = (start, end)
            else:
                t0 = time.perf_counter()
                for _ in range(batch[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) / batch[name])
        if cuda:
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                samples[name].append(start.elapsed_time(end) / 1e3 / batch[name])
    return {name: statistics.median(ts) for name, ts in samples.items()}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_per_step(fn: Callable, device) -> int:
    """On CUDA: device activities (kernels, memcpys, memsets) of one call of fn, from
    torch.profiler.  On CPU: the ops that reach a kernel (ATen ops after autograd and composite
    decomposition, and spectral_ext's own ops), counted by a TorchDispatchMode: each is one
    dispatcher round trip and one kernel."""
    device = torch.device(device)
    fn()
    if device.type != "cuda":
        with _OpCounter() as counter:
            fn()
        return counter.count
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def check_against_reference(set_name: str, name: str, dtype: torch.dtype, device, n_iter: int,
                            seed: int = 1) -> Dict[str, float]:
    """One step of implementation `name` on fresh weights of the set (zeroed gradients, so the
    gradient is exactly the added lam * sigma * u v^T) against spectral_ext.reference on the
    same inputs: the max relative error of sigma, and the worst layer's max |diff| / max |ref|
    of the gradient.  The benchmark suites assert on these, so a benchmark of a wrong result
    fails."""
    weights = make_weights(set_name, dtype, device, seed)
    grads_ref = [torch.zeros_like(w) for w in weights]
    vs_ref = se.init_vectors(weights)
    sigma = make_impls(weights, [name], n_iter)[name]()
    sigma_ref = se.reference.fused_step(weights, vs_ref, lam=LAM, n_iter=n_iter, grads=grads_ref)

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {"sigma": rel(sigma, sigma_ref),
            "grad": max(rel(w.grad, g) for w, g in zip(weights, grads_ref))}

