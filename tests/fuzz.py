"""A differential fuzzer: every backend that runs here against an independent float64 oracle.

Each case is drawn from its own seed (printed on a failure, with the command that replays it):
1 to 4 layers of float32 / float64 / bfloat16 / float16 weights, mixed in one call; awkward shapes
(1, primes, block sizes +-1, 3-D/4-D); contiguous, transposed, strided, channels-last, offset
(unaligned) and non-viewable layouts of weights and gradients; float32 or float64 vectors,
contiguous or strided; gradients given or taken from ``.grad`` (present or created); n_iter 1
to 4; lam from 0 to 2; magnitudes across the whole finite range of each weight dtype (from
subnormal to where sigma or the gradient would overflow); zero, NaN and Inf layers.

The oracle (``oracle``) is a few lines of float64 torch, written independently of
spectral_ext.reference: the power iteration on W scaled by a power of two (exact), so it is
right at every magnitude.  A backend passes a case when, for sigma, every v and every gradient,

    max |backend - oracle| - rounding(output dtype)  <=  2 * max |reference - oracle| + floor

the flash-attention rule (at most twice the error of plain PyTorch at the same precision,
spectral_ext.reference) plus a floor taken from an explicit rounding-error model: the oracle is
run again with the errors of acc-precision arithmetic injected (each k-term sum perturbed by
N(0, 1) * sqrt(k) * (u * sum|terms| + eta), u the unit roundoff and eta the smallest subnormal of
the accumulation type; every division, normalization and the gradient's product likewise; the
norms, which every backend sums in float64, by sqrt(k) float64 roundoffs), 8 times, and the floor is 8 x the RMS deviation that this causes in the output.  So the floor
follows the conditioning of each case (a slowly converging power iteration amplifies rounding
errors, and the model amplifies them the same way) and the subnormal range (where a float32
computation can only be as good as eta allows), instead of a fixed number.  Zero layers must
give sigma = 0 and keep v and the gradient bit for bit; NaN/Inf layers a non-finite sigma and
gradient and v kept bit for bit.

    python -P tests/fuzz.py                                     # every backend that runs here
    python -P tests/fuzz.py --backends cpu --cases 20000 --seed 7
    python -P tests/fuzz.py --backends cpu --case-seed 123 -v   # replay one case
tests/test_fuzz.py runs a quick mode in `make test`; `make fuzz` runs a long one.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

if __name__ == "__main__":
    # the tests folder (cuda_emulation.py) at the END of sys.path: the installed spectral_ext
    # must not be shadowed; Triton runs in its interpreter on CPU tensors where there is no GPU
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import spectral_ext as se  # noqa: E402

import cuda_emulation  # noqa: E402

ALL_BACKENDS = ("cpu", "reference", "triton", "cuda-emulated", "cuda")
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# sizes near the block sizes of the kernels (GPU tiles of 64 KiB, Triton blocks of 32/64/128/256,
# CPU row bands of 256 rows), primes and the degenerate 1
SIZES = (1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
         300, 511, 513, 1023, 1024, 1025, 1100, 2049)
# largest layer (elements) per backend: the interpreter and the fiber emulation are slow
MAX_NUMEL = {"cpu": 400_000, "reference": 200_000, "triton": 12_000, "cuda-emulated": 40_000,
             "cuda": 2_000_000}
# the quick mode (tests/test_fuzz.py, in `make test`): smaller layers
QUICK_MAX_NUMEL = {"cpu": 30_000, "reference": 30_000, "triton": 5_000, "cuda-emulated": 20_000,
                   "cuda": 30_000}
# cases per backend of the long mode (`make fuzz`, about 20 minutes on the 2-core machine)
LONG_CASES = {"cpu": 5000, "reference": 1500, "triton": 400, "cuda-emulated": 800, "cuda": 3000}
# where each backend's tensors live: the GPU backends on the GPU where there is one (Triton on
# CPU tensors in its interpreter otherwise)
DEVICE = {"cuda": "cuda", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
NOISE_RUNS = 8
FLOOR_FACTOR = 8.0


# ---- the oracle --------------------------------------------------------------------------------

def _acc(wdtype):
    return torch.float64 if wdtype == torch.float64 else torch.float32


def _ldexp(x: torch.Tensor, k: int) -> torch.Tensor:
    """x * 2^k exactly (in two halves: torch.ldexp forms 2^k, which overflows for k > 1023)."""
    h = k // 2
    return torch.ldexp(torch.ldexp(x, torch.tensor(float(h), dtype=x.dtype)),
                       torch.tensor(float(k - h), dtype=x.dtype))


def _subnormal_min(dtype):
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


@dataclass
class Expected:
    sigma: torch.Tensor      # [S] float64 (S = 1 clean run, or NOISE_RUNS noisy ones)
    v: torch.Tensor          # [cols, S]
    grad: torch.Tensor       # [rows, cols, S]


def oracle(W, v0, g0, lam, n_iter, acc, noise_runs=0, gen=None, gain=1.0) -> Expected:
    """n_iter power iterations and the gradient update, in float64, on W scaled by 2^k so that
    max|W| is in [0.5, 1) (exact, and undone at the end), from v0 (float64 [cols]) and g0
    (float64 [rows, cols]).  With noise_runs > 0, that many runs at once (as columns) with the
    rounding errors of `acc` arithmetic injected (see the module docstring), multiplied by
    `gain`: the errors of float64 arithmetic are below float64's own resolution, so they are
    injected 2^20 times larger and the caller divides the deviations by 2^20 (first-order
    perturbation theory: the deviation is linear in the noise)."""
    rows, cols = W.shape
    S = max(1, noise_runs)
    m = W.abs().max().item()
    k = 0 if m == 0 else -math.frexp(m)[1]
    Ws = _ldexp(W, k)
    fi = torch.finfo(acc)
    u_ro, eta = gain * fi.eps / 2, gain * _subnormal_min(acc)
    u_norm = gain * torch.finfo(torch.float64).eps / 2   # every backend sums squares in float64
    eta_s = math.ldexp(eta, k)              # the backends' absolute error, in scaled units

    def noisy(x, scale):
        if noise_runs == 0:
            return x
        return x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale

    V = v0.reshape(cols, 1).expand(cols, S).clone()
    V = noisy(V, u_ro * V.abs())            # v read into the accumulation type
    updated = torch.zeros(S, dtype=torch.bool)
    sig_s = torch.zeros(S, dtype=torch.float64)
    P = torch.zeros(cols, S, dtype=torch.float64)
    Uh = torch.zeros(rows, S, dtype=torch.float64)
    absW = Ws.abs()
    for _ in range(n_iter):
        U = noisy(Ws @ V, math.sqrt(cols) * (u_ro * (absW @ V.abs()) + eta_s))
        nu = torch.linalg.vector_norm(U, dim=0)
        nu = noisy(nu, math.sqrt(rows) * u_norm * nu)
        Uh = torch.where(nu == 0, 0.0, U / torch.where(nu == 0, 1.0, nu))
        Uh = noisy(Uh, u_ro * Uh.abs())
        P = noisy(Ws.t() @ Uh, math.sqrt(rows) * (u_ro * (absW.t() @ Uh.abs()) + eta_s))
        sig_s = torch.linalg.vector_norm(P, dim=0)
        sig_s = noisy(sig_s, math.sqrt(cols) * u_norm * sig_s)
        ok = (sig_s > 0) & torch.isfinite(sig_s)
        Vn = noisy(P / torch.where(ok, sig_s, 1.0), u_ro * (P / torch.where(ok, sig_s, 1.0)).abs())
        V = torch.where(ok, Vn, V)
        updated |= ok
    sigma = _ldexp(sig_s, -k)
    vp = _ldexp(P, -k)                      # v' = W^T u
    step = lam * Uh.unsqueeze(1) * vp.unsqueeze(0)                       # lam sigma u v^T
    grad = g0.unsqueeze(2) + step
    grad = noisy(grad, u_ro * (g0.abs().unsqueeze(2) + step.abs()))
    V = torch.where(updated, V, v0.reshape(cols, 1))
    return Expected(sigma, V, grad)


# ---- cases -------------------------------------------------------------------------------------

@dataclass
class LayerSpec:
    shape: tuple
    wdtype: torch.dtype
    layout: str          # contig | t | cols | rows | channels_last | no_view | offset
    exp: int             # W = randn * 2^exp
    special: str         # none | zero | nan | inf
    vdtype: torch.dtype
    vstrided: bool
    grad: str            # given | dotgrad (a .grad is there) | created (.grad is None)
    glayout: str         # contig | t | no_view | offset
    gexp: Optional[int]  # None: zeros


@dataclass
class Case:
    seed: int
    backend: str
    layers: List[LayerSpec]
    lam: float
    n_iter: int
    grads_given: bool
    quick: bool = False

    def describe(self):
        parts = [f"{tuple(L.shape)} {str(L.wdtype)[6:]} {L.layout} 2^{L.exp} {L.special} "
                 f"v={str(L.vdtype)[6:]}{'/strided' if L.vstrided else ''} "
                 f"grad={L.grad}/{L.glayout}/{L.gexp}" for L in self.layers]
        return (f"lam={self.lam} n_iter={self.n_iter} grads={'given' if self.grads_given else '.grad'}"
                f"\n    " + "\n    ".join(parts))


def _draw_shape(rng, max_numel):
    for _ in range(100):
        rows = rng.choice(SIZES)
        nd = rng.choices((2, 3, 4), weights=(6, 1, 2))[0]
        if nd == 2:
            shape = (rows, rng.choice(SIZES))
        elif nd == 3:
            shape = (rows, rng.choice(SIZES[:12]), rng.choice(SIZES[:14]))
        else:
            shape = (rows, rng.choice(SIZES[:14]), rng.choice((1, 2, 3, 5)), rng.choice((1, 3, 4)))
        if math.prod(shape) <= max_numel:
            return shape
    return (rng.choice(SIZES[:10]), rng.choice(SIZES[:10]))


def _exp_range(wdtype, numel, lam):
    """(lowest, highest) exponent e for W = randn * 2^e: from where a few entries stay non-zero
    in wdtype to where sigma (<= 5 sqrt(numel) 2^e), the entries or lam * sigma (the gradient,
    in wdtype) would come within a factor 64 of overflowing."""
    fi, acc = torch.finfo(wdtype), torch.finfo(_acc(wdtype))
    lo = math.floor(math.log2(_subnormal_min(wdtype))) + 3
    top = min(acc.max, fi.max) / 64 / (5 * math.sqrt(numel))
    if lam > 0:
        top = min(top, fi.max / 64 / lam / 5)
    top = min(top, fi.max / 64 / 5)
    return lo, math.floor(math.log2(top))


def draw_case(seed: int, backend: str, quick: bool = False) -> Case:
    rng = random.Random(seed)
    max_numel = (QUICK_MAX_NUMEL if quick else MAX_NUMEL)[backend]
    dtypes = [d for d in WEIGHT_DTYPES if not (backend == "triton" and d == torch.float64)]
    n_layers = rng.choices((1, 2, 3, 4), weights=(4, 3, 2, 1))[0]
    lam = rng.choice((0.0, 0.01, 0.37, 1.0, 2.0, round(10 ** rng.uniform(-4, 0.3), 6)))
    n_iter = rng.choices((1, 2, 3, 4), weights=(4, 3, 2, 1))[0]
    grads_given = backend == "cuda-emulated" or rng.random() < 0.6
    layers = []
    for _ in range(n_layers):
        wdtype = rng.choice(dtypes)
        shape = _draw_shape(rng, max_numel)
        numel = math.prod(shape)
        if rng.random() < 0.3:
            lo, hi = _exp_range(wdtype, numel, lam)
            exp = rng.randint(lo, hi)
        else:
            exp = rng.randint(-4, 4)
        special = rng.choices(("none", "zero", "nan", "inf"), weights=(90, 4, 3, 3))[0]
        layouts = ["contig", "contig", "offset", "rows"]
        if len(shape) == 2:
            layouts += ["t", "cols"]
        if len(shape) == 4:
            layouts += ["channels_last"]
        if len(shape) >= 3:
            layouts += ["no_view"]
        layout = rng.choice(layouts)
        vdtype = torch.float64 if (wdtype == torch.float64 and rng.random() < 0.8) or \
            rng.random() < 0.15 else torch.float32
        if grads_given:
            grad = "given"
        else:
            grad = rng.choice(("dotgrad", "created"))
        glayouts = ["contig", "contig", "offset"] + (["t"] if len(shape) == 2 else []) + \
            (["no_view"] if len(shape) >= 3 else [])
        glayout = rng.choice(glayouts) if grad == "given" else "contig"
        gexp = None if rng.random() < 0.2 or grad == "created" else rng.randint(-3, 3)
        layers.append(LayerSpec(shape, wdtype, layout, exp, special, vdtype,
                                rng.random() < 0.2, grad, glayout, gexp))
    return Case(seed, backend, layers, lam, n_iter, grads_given, quick)


def _in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to `values` in the given memory layout (a view of a larger buffer for the
    strided ones), on values' device."""
    shape, dt, dev = values.shape, values.dtype, values.device
    if layout == "contig":
        return values.clone()
    if layout == "t":
        return values.t().contiguous().t()
    if layout == "cols":
        buf = torch.zeros(shape[0], 2 * shape[1], dtype=dt, device=dev)
        out = buf[:, ::2]
    elif layout == "rows":
        buf = torch.zeros(2 * shape[0], *shape[1:], dtype=dt, device=dev)
        out = buf[::2]
    elif layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    elif layout == "no_view":
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "offset":
        out = torch.zeros(1 + values.numel(), dtype=dt, device=dev)[1:].view(shape)
    else:
        raise ValueError(layout)
    out.copy_(values)
    return out


@dataclass
class Inputs:
    weights: List[torch.Tensor]
    vs: List[torch.Tensor]
    grads: Optional[List[torch.Tensor]]     # None: the backend takes each weight's .grad


def build(case: Case, device="cpu") -> Inputs:
    """The case's tensors, freshly built (every call gives identical values and layouts)."""
    gen = torch.Generator().manual_seed(case.seed)
    weights, vs, grads = [], [], []
    for L in case.layers:
        vals = torch.randn(L.shape, generator=gen, dtype=torch.float64)
        vals = _ldexp(vals, L.exp)
        fmax = torch.finfo(L.wdtype).max
        vals = vals.clamp(-fmax / 2, fmax / 2).to(L.wdtype)
        flat = vals.view(-1)
        pos = int(torch.randint(vals.numel(), (1,), generator=gen))
        if L.special == "zero":
            vals.zero_()
        elif L.special == "nan":
            flat[pos] = float("nan")
        elif L.special == "inf":
            flat[pos] = float("inf") if pos % 2 else -float("inf")
        w = _in_layout(vals.to(device), L.layout)
        cols = vals.numel() // L.shape[0]
        v = torch.randn(cols, generator=gen, dtype=torch.float64)
        v = (v / torch.linalg.vector_norm(v)).to(L.vdtype)
        v = v.to(device)
        if L.vstrided:
            buf = torch.zeros(2 * cols, dtype=L.vdtype, device=device)
            buf[::2].copy_(v)
            v = buf[::2]
        g = torch.zeros(L.shape, dtype=torch.float64) if L.gexp is None else \
            _ldexp(torch.randn(L.shape, generator=gen, dtype=torch.float64), L.gexp)
        g = _in_layout(g.to(L.wdtype).to(device), L.glayout)
        if L.grad != "given":
            w = w.detach().requires_grad_(True)    # a leaf (a view of its buffer, for layouts)
            w.grad = g if L.grad == "dotgrad" else None
        weights.append(w)
        vs.append(v)
        grads.append(g)
    return Inputs(weights, vs, grads if case.grads_given else None)


def run(backend: str, inputs: Inputs, lam: float, n_iter: int):
    """(sigma, vs, grads) after one step of `backend` on `inputs` (mutated)."""
    w, vs = inputs.weights, inputs.vs
    if backend == "cuda-emulated":
        s = cuda_emulation.load().fused_step(w, vs, inputs.grads, float(lam), int(n_iter))
        return s, vs, inputs.grads
    s = se.fused_step(w, vs, lam=lam, n_iter=n_iter, grads=inputs.grads, backend=backend)
    grads = inputs.grads if inputs.grads is not None else [x.grad for x in w]
    return s, vs, grads


# ---- the comparison ----------------------------------------------------------------------------

@dataclass
class Failure:
    case: Case
    what: str

    def __str__(self):
        return (f"[{self.case.backend}] case seed {self.case.seed}: {self.what}\n    "
                f"{self.case.describe()}\n    replay: python -P tests/fuzz.py --backends "
                f"{self.case.backend} --case-seed {self.case.seed}"
                f"{' --quick' if self.case.quick else ''} -v")


def _rounding(o: torch.Tensor, dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    return fi.eps * o.abs() + _subnormal_min(dtype)


def _check_close(what, got, ref, clean, dev, out_dtype, errors):
    """The 2x rule with the modelled floor (see the module docstring); appends to errors.  dev:
    the modelled error (RMS over the noisy runs) of each element."""
    got, ref = got.detach().double().reshape(clean.shape), ref.detach().double().reshape(clean.shape)
    if not torch.isfinite(got).all():
        errors.append(f"{what}: non-finite values for a finite layer")
        return
    excess = ((got - clean).abs() - _rounding(clean, out_dtype)).max().item()
    ref_err = (ref - clean).abs().max().item()
    dev = dev.max().item()
    bound = 2 * ref_err + FLOOR_FACTOR * dev
    if not excess <= bound:
        errors.append(f"{what}: error {excess:.3g} > 2 x reference's {ref_err:.3g} + floor "
                      f"{FLOOR_FACTOR * dev:.3g} (max |oracle| {clean.abs().max().item():.3g})")


@contextlib.contextmanager
def _one_thread():
    """The oracle's small float64 matmuls: on one thread (with two threads on a busy 2-core
    machine each took 25 ms of OpenMP waiting instead of 0.06 ms)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_case(case: Case, verbose=False) -> Optional[Failure]:
    s, vs, gs = run(case.backend, build(case, DEVICE.get(case.backend, "cpu")), case.lam,
                    case.n_iter)
    got = (s.cpu(), [v.cpu() for v in vs], [g.cpu() for g in gs])
    with _one_thread():
        return _check(case, got, verbose)


def _check(case: Case, got, verbose) -> Optional[Failure]:
    base = build(case)
    originals = [(v.clone(), g.clone() if g is not None else None) for v, g in
                 zip(base.vs, base.grads if base.grads is not None else
                     [w.grad for w in base.weights])]
    ref = run("reference", build(case), case.lam, case.n_iter)
    gen = torch.Generator().manual_seed(case.seed ^ 0x5EED)
    sig_dtype = torch.float64 if any(L.wdtype == torch.float64 for L in case.layers) \
        else torch.float32
    errors = []
    if got[0].dtype != sig_dtype:
        errors.append(f"sigma has dtype {got[0].dtype}, expected {sig_dtype}")
    for i, (L, w) in enumerate(zip(case.layers, base.weights)):
        W = w.detach().double().reshape(L.shape[0], -1)
        v0, g0 = originals[i]
        g0 = torch.zeros(L.shape, dtype=torch.float64) if g0 is None else g0.double()
        s_b, v_b, g_b = got[0][i], got[1][i], got[2][i]
        s_r, v_r, g_r = ref[0][i], ref[1][i], ref[2][i]
        if v_b.dtype != L.vdtype or g_b.dtype != L.wdtype or g_b.shape != L.shape:
            errors.append(f"layer {i}: v/grad dtype or shape changed")
            continue
        if not torch.isfinite(W).all():
            if torch.isfinite(s_b):
                errors.append(f"layer {i} (non-finite W): sigma {s_b.item()} is finite")
            if torch.isfinite(g_b).all():
                errors.append(f"layer {i} (non-finite W): the gradient is finite")
            if not torch.equal(v_b, v0):
                errors.append(f"layer {i} (non-finite W): v was not kept bit for bit")
            continue
        if (W == 0).all():
            if s_b.item() != 0:
                errors.append(f"layer {i} (zero W): sigma {s_b.item()} != 0")
            if not torch.equal(v_b, v0):
                errors.append(f"layer {i} (zero W): v was not kept bit for bit")
            if not torch.equal(g_b, originals[i][1] if originals[i][1] is not None
                               else torch.zeros_like(g_b)):
                errors.append(f"layer {i} (zero W): the gradient changed")
            continue
        acc = _acc(L.wdtype)
        clean = oracle(W, v0.double(), g0.reshape(W.shape), case.lam, case.n_iter, acc)
        gain = 2.0 ** 20 if acc == torch.float64 else 1.0
        noisy = oracle(W, v0.double(), g0.reshape(W.shape), case.lam, case.n_iter, acc,
                       NOISE_RUNS, gen, gain)
        def rms(x, x0):   # the modelled error of each element, from the noisy runs (scaled:
            d = (x - x0) / gain          # squares of 1e-300 underflow)
            m = d.abs().amax(-1, keepdim=True)
            return m.squeeze(-1) * (d / torch.where(m > 0, m, 1.0)).pow(2).mean(-1).sqrt()

        _check_close(f"layer {i} sigma", s_b.reshape(1), s_r.reshape(1), clean.sigma,
                     rms(noisy.sigma, clean.sigma), sig_dtype, errors)
        _check_close(f"layer {i} v", v_b, v_r, clean.v[:, 0], rms(noisy.v, clean.v), L.vdtype,
                     errors)
        _check_close(f"layer {i} grad", g_b.reshape(W.shape), g_r.reshape(W.shape),
                     clean.grad[..., 0], rms(noisy.grad, clean.grad), L.wdtype, errors)
        if verbose:
            print(f"  layer {i}: sigma {s_b.item():.9g} (oracle {clean.sigma.item():.9g}, "
                  f"reference {s_r.item():.9g})")
    return Failure(case, "; ".join(errors)) if errors else None


def available(backend: str) -> Optional[str]:
    """None if the backend runs here, else why not."""
    if backend == "cuda-emulated":
        return cuda_emulation.unavailable_reason()
    b = se.available_backends()[backend]
    if not b.available:
        return b.detail
    return None


def fuzz(backend: str, cases: int, seed: int, quick: bool = False,
         verbose=False) -> List[Failure]:
    """Runs `cases` cases of one backend; returns the failures."""
    failures = []
    rng = random.Random(f"{seed}/{backend}/{quick}")
    for _ in range(cases):
        case = draw_case(rng.randrange(2**62), backend, quick)
        f = check_case(case, verbose)
        if f is not None:
            failures.append(f)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(b for b in ALL_BACKENDS))
    p.add_argument("--cases", type=int, default=None,
                   help=f"cases per backend (default {LONG_CASES})")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--case-seed", type=int, default=None, help="replay this one case")
    p.add_argument("--quick", action="store_true", help="the quick mode's smaller layers")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"fuzz seed {seed} (--seed {seed} reproduces this run)")
    status = 0
    for b in a.backends.split(","):
        why = available(b)
        if why:
            print(f"{b:14s} skipped: {why}")
            continue
        if b == "cuda-emulated":
            cuda_emulation.load()
        if a.case_seed is not None:
            case = draw_case(a.case_seed, b, a.quick)
            print(case.describe())
            f = check_case(case, verbose=True)
            print(f or "passed")
            status |= f is not None
            continue
        t0 = time.monotonic()
        n = a.cases if a.cases is not None else LONG_CASES[b]
        fails = fuzz(b, n, seed, a.quick, verbose=a.verbose)
        print(f"{b:14s} {n} cases, {len(fails)} failed ({time.monotonic() - t0:.1f} s)",
              flush=True)
        for f in fails[:20]:
            print(f)
        status |= bool(fails)
    return status


if __name__ == "__main__":
    sys.exit(main())
