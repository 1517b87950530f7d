"""The experiments of Yoshida & Miyato 2017 (arXiv:1705.10941, Section 4), runnable on a CPU and
ready for a GPU: Table 1 (test accuracy and generalization gap at threshold alpha) and the
figures, for spectral norm regularization against the paper's baselines and the related methods
of this library.

    python -m spectral_ext.experiments.paper --quick --out DIR        # every output, < 60 s
    python -m spectral_ext.experiments.paper --dataset mnist1d --model vgg --seeds 0,1,2 ...

Methods: vanilla; decay (weight decay); adversarial (eq. 3: alpha L(x) + (1 - alpha) L(x + eta),
eta = eps g / ||g||_2, g the input gradient); spectral (SpectralNormRegularizer); and, beyond the
paper, jacobian (exact Jacobian spectral norm), hessian (Hessian spectral radius) and slope (the
slope loss).  Regimes: a small and a large batch (the paper's 64 and 4096, the large batch with
a 10x learning rate), Nesterov momentum 0.9, learning rate / 10 at 1/2 and 3/4 of training,
global contrast normalization.  Outputs in --out: table1.md, table1.csv, results.json (every
number of every epoch, the config, seeds, versions, device, wall time), figures (PNG), and
per-run checkpoints (--resume continues from them).  See the README for what each measures.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import spectral_ext as se
from spectral_ext import hessian, jacobian, slope
from spectral_ext.experiments import datasets, models, table1

METHODS = ("vanilla", "decay", "adversarial", "spectral", "jacobian", "hessian", "slope")
PAPER_METHODS = METHODS[:4]
REGIMES = ("small", "large")

#: the settings --quick changes (anything given on the command line wins)
QUICK = dict(dataset="digits", model="vgg", vgg_config="16,M,32,M", width=1.0, epochs=3,
             batch_small=32, batch_large=256, analysis_samples=64, curvature_iters=5,
             slope_samples=64, eval_batch=512, threads=1)

#: the per-run settings a checkpoint must match to be resumed, by method (besides COMMON)
METHOD_KEYS = {
    "vanilla": [], "decay": ["decay_lambda"], "adversarial": ["adv_alpha", "adv_eps"],
    "spectral": ["spectral_lambda", "spectral_iters"],
    "jacobian": ["jacobian_lambda", "jacobian_iters", "jacobian_warm_start"],
    "hessian": ["hessian_mu", "hessian_iters", "hessian_upper", "hessian_lower", "hessian_tol",
                "hessian_skip_unconverged"],
    "slope": ["slope_lambda", "slope_iters"],
}
COMMON_KEYS = ["epochs", "lr", "lr_large_factor", "momentum", "batch_small", "batch_large",
               "width", "vgg_config", "densenet_depth", "densenet_growth", "gcn", "data_seed",
               "mnist1d_samples", "digits_test_fraction", "analysis_samples", "curvature_iters",
               "curvature_tol", "curvature_every", "slope_samples", "spectrum_layer",
               "eval_batch"]


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spectral_ext.experiments.paper", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("what to run")
    g.add_argument("--dataset", default="digits",
                   help=f"comma-separated, of: {', '.join(datasets.DATASETS)} (default digits)")
    g.add_argument("--model", default="vgg",
                   help=f"comma-separated, of: {', '.join(models.MODELS)} (default vgg)")
    g.add_argument("--methods", default="all",
                   help=f"comma-separated, of: {', '.join(METHODS)}; 'all' (default) or 'paper' "
                        f"({', '.join(PAPER_METHODS)})")
    g.add_argument("--regimes", default="small,large", help="small, large or both (default)")
    g.add_argument("--seeds", default="0", help="comma-separated ints (default 0): mean ± std")
    g.add_argument("--data-dir", default=None,
                   help="local folder with CIFAR-10/100 (python pickles) or STL-10 (binary)")
    g.add_argument("--out", default="paper-out", help="output folder (default paper-out)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the per-run checkpoints in --out (a run whose settings "
                        "changed is refused)")
    g.add_argument("--quick", action="store_true",
                   help="tiny settings that write every output in under a minute on 2 CPU cores")
    g.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; --quick: 1, as small "
                        "models gain nothing from more and lose much on a busy machine)")
    t = p.add_argument_group("training (defaults: the paper's values where it gives them)")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-small", type=int, default=64)
    t.add_argument("--batch-large", type=int, default=4096,
                   help="(a training set smaller than this is used as one batch; recorded)")
    t.add_argument("--lr", type=float, default=0.01, help="initial learning rate, small batch")
    t.add_argument("--lr-large-factor", type=float, default=10.0,
                   help="the large batch's learning rate is lr times this (default 10)")
    t.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    t.add_argument("--no-gcn", dest="gcn", action="store_false",
                   help="no global contrast normalization")
    m = p.add_argument_group("methods")
    m.add_argument("--decay-lambda", type=float, default=1e-4, help="weight decay (lambda/2 ||W||^2)")
    m.add_argument("--adv-alpha", type=float, default=0.5, help="adversarial: weight of L(x)")
    m.add_argument("--adv-eps", type=float, default=1.0, help="adversarial: ||eta||_2")
    m.add_argument("--spectral-lambda", type=float, default=0.01)
    m.add_argument("--spectral-iters", type=int, default=1, help="power iterations per step")
    m.add_argument("--jacobian-lambda", type=float, default=0.01)
    m.add_argument("--jacobian-iters", type=int, default=1,
                   help="power iterations per step (warm-started per sample)")
    m.add_argument("--no-jacobian-warm-start", dest="jacobian_warm_start", action="store_false")
    m.add_argument("--hessian-mu", type=float, default=0.01)
    m.add_argument("--hessian-iters", type=int, default=1,
                   help="power iterations per step (warm-started)")
    m.add_argument("--hessian-upper", type=float, default=0.0,
                   help="Sandler et al.'s K: penalty max(0, lambda-K, K_min-lambda)")
    m.add_argument("--hessian-lower", type=float, default=0.0, help="Sandler et al.'s K_min")
    m.add_argument("--hessian-tol", type=float, default=None,
                   help="residual convergence test (stops early; a host sync per check)")
    m.add_argument("--hessian-skip-unconverged", action="store_true",
                   help="a step whose estimate fails the residual test adds no penalty")
    m.add_argument("--slope-lambda", type=float, default=0.01)
    m.add_argument("--slope-iters", type=int, default=10,
                   help="power iterations when the outputs exceed slope's exact limit")
    d = p.add_argument_group("models and data")
    d.add_argument("--width", type=float, default=1.0, help="channel multiplier (VGG, NIN)")
    d.add_argument("--vgg-config", default=",".join(map(str, models.VGG16)),
                   help="channels per 3x3 conv, M = max pool (default VGG-16)")
    d.add_argument("--densenet-depth", type=int, default=None,
                   help="3n+4 (default 40; 22 for STL-10)")
    d.add_argument("--densenet-growth", type=int, default=12)
    d.add_argument("--mnist1d-samples", type=int, default=40000,
                   help="MNIST-1D samples generated (80%% train)")
    d.add_argument("--digits-test-fraction", type=float, default=0.2)
    d.add_argument("--data-seed", type=int, default=0, help="data split / generation seed")
    e = p.add_argument_group("measurements")
    e.add_argument("--alpha", type=float, default=None,
                   help="threshold for the gap (default: chosen so that every run exceeds it)")
    e.add_argument("--analysis-samples", type=int, default=1000,
                   help="train and test samples for input gradients and the Hessian")
    e.add_argument("--curvature-every", type=int, default=1,
                   help="largest Hessian eigenvalue every N epochs (and the last)")
    e.add_argument("--curvature-iters", type=int, default=20)
    e.add_argument("--curvature-tol", type=float, default=1e-3)
    e.add_argument("--slope-samples", type=int, default=500,
                   help="test samples for the final slope distribution")
    e.add_argument("--spectrum-layer", type=int, default=None,
                   help="index of the weight whose singular values are plotted (default middle)")
    e.add_argument("--eval-batch", type=int, default=1024)
    return p


def _names(parser, text: str, choices, what: str, aliases=None) -> List[str]:
    aliases = aliases or {}
    items = []
    for t in str(text).split(","):
        t = t.strip()
        if not t:
            continue
        items += aliases.get(t, [t])
    bad = [t for t in items if t not in choices]
    if bad or not items:
        parser.error(f"unknown {what} {bad[0] if bad else text!r}; choices: {', '.join(choices)}")
    return list(dict.fromkeys(items))


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.datasets = _names(parser, args.dataset, datasets.DATASETS, "dataset")
    args.models = _names(parser, args.model, models.MODELS, "model")
    args.method_list = _names(parser, args.methods, METHODS, "method",
                              {"all": list(METHODS), "paper": list(PAPER_METHODS)})
    args.regime_list = _names(parser, args.regimes, REGIMES, "regime")
    try:
        args.seed_list = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        parser.error("--seeds is empty")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("epochs", "batch_small", "batch_large", "analysis_samples", "curvature_every",
                 "curvature_iters", "slope_samples", "eval_batch", "spectral_iters",
                 "jacobian_iters", "hessian_iters", "slope_iters", "mnist1d_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "lr_large_factor", "width"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("decay_lambda", "spectral_lambda", "jacobian_lambda", "hessian_mu",
                 "slope_lambda", "adv_eps"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.adv_alpha <= 1:
        parser.error(f"--adv-alpha must lie in [0, 1], got {args.adv_alpha}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must lie in [0, 1), got {args.momentum}")
    if args.hessian_skip_unconverged and args.hessian_tol is None:
        parser.error("--hessian-skip-unconverged needs --hessian-tol")
    if args.hessian_lower > args.hessian_upper:
        parser.error("--hessian-lower must be <= --hessian-upper")
    try:
        args.vgg_config = ",".join(map(str, models.parse_vgg_config(args.vgg_config)))
    except ValueError as e:
        parser.error(f"--vgg-config: {e}")
    if args.densenet_depth is not None and ((args.densenet_depth - 4) % 3 or args.densenet_depth < 7):
        parser.error(f"--densenet-depth must be 3n+4 (40, 22, ...), got {args.densenet_depth}")
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    try:
        args.torch_device = torch.device(dev)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r}; use auto, cpu or cuda[:N]")
    if args.torch_device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.torch_device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
    args.parser = parser
    return args


# --------------------------------------------------------------------------- methods

@contextlib.contextmanager
def eval_mode(model):
    """Batch norm on its running statistics (samples independent), restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class Vanilla:
    """Cross-entropy only.  Every method: ``loss(x, y, idx)`` (the objective to backward) and
    ``after_backward()`` (before the optimizer step); none synchronises with the host."""
    weight_decay = 0.0

    def __init__(self, model, args, n_train, seed):
        self.model = model

    def loss(self, x, y, idx):
        return F.cross_entropy(self.model(x), y)

    def after_backward(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Decay(Vanilla):
    """Weight decay on every parameter (the optimizer's ``weight_decay``: the gradient of
    lambda/2 ||theta||^2)."""

    def __init__(self, model, args, n_train, seed):
        super().__init__(model, args, n_train, seed)
        self.weight_decay = args.decay_lambda


def adversarial_loss(model, x, y, alpha: float, eps: float) -> torch.Tensor:
    """Eq. 3 of the paper: alpha L(x) + (1 - alpha) L(x + eta), eta = eps g / ||g||_2 per
    sample, g = d L / d x (Goodfellow et al.'s objective with an l2 perturbation).  eta is a
    constant (no gradient through it)."""
    xr = x.detach().requires_grad_(True)
    clean = F.cross_entropy(model(xr), y)
    (g,) = torch.autograd.grad(clean, xr, retain_graph=True)
    norm = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    eta = eps * g / norm.reshape((-1,) + (1,) * (g.dim() - 1))
    return alpha * clean + (1 - alpha) * F.cross_entropy(model(x.detach() + eta), y)


class Adversarial(Vanilla):
    def __init__(self, model, args, n_train, seed):
        super().__init__(model, args, n_train, seed)
        self.alpha, self.eps = args.adv_alpha, args.adv_eps

    def loss(self, x, y, idx):
        return adversarial_loss(self.model, x, y, self.alpha, self.eps)


class Spectral(Vanilla):
    """lambda/2 sum sigma^2 through SpectralNormRegularizer's fused step."""

    def __init__(self, model, args, n_train, seed):
        super().__init__(model, args, n_train, seed)
        self.reg = se.SpectralNormRegularizer(model, lam=args.spectral_lambda,
                                              n_iter=args.spectral_iters, seed=seed)

    def after_backward(self):
        self.reg.step()

    def state_dict(self):
        return self.reg.state_dict()

    def load_state_dict(self, state):
        self.reg.load_state_dict(state)


class Jacobian(Vanilla):
    """lambda * mean_i sigma_max(J_i)^2 (JacobianSpectralNormRegularizer), per-sample vectors
    kept across epochs; the term is evaluated with batch norm on running statistics (the
    per-sample Jacobian needs independent samples)."""

    def __init__(self, model, args, n_train, seed):
        super().__init__(model, args, n_train, seed)
        self.warm = args.jacobian_warm_start
        self.reg = jacobian.JacobianSpectralNormRegularizer(
            args.jacobian_lambda, args.jacobian_iters,
            num_samples=n_train if self.warm else None)

    def loss(self, x, y, idx):
        ce = F.cross_entropy(self.model(x), y)
        with eval_mode(self.model):
            term = self.reg(self.model, x, index=idx if self.warm else None)
        return ce + term

    def state_dict(self):
        return self.reg.state_dict()

    def load_state_dict(self, state):
        self.reg.load_state_dict(state)


class Hessian(Vanilla):
    """loss + mu * max(0, lambda - K, K_min - lambda) (SpectralRadiusRegularizer), lambda the
    dominant eigenvalue of the batch loss's Hessian, the vector warm-started across steps."""

    def __init__(self, model, args, n_train, seed):
        super().__init__(model, args, n_train, seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reg = hessian.SpectralRadiusRegularizer(
            args.hessian_mu, n_iter=args.hessian_iters, tol=args.hessian_tol,
            upper=args.hessian_upper, lower=args.hessian_lower,
            convergence="residual" if args.hessian_tol is not None else "change",
            skip_unconverged=args.hessian_skip_unconverged)

    def loss(self, x, y, idx):
        return self.reg(lambda: F.cross_entropy(self.model(x), y), self.params)

    def state_dict(self):
        return self.reg.state_dict()

    def load_state_dict(self, state):
        self.reg.load_state_dict(state)


class Slope(Vanilla):
    """loss + lambda * mean slope^2 (slope.slope_loss: exact for up to 32 classes), evaluated
    with batch norm on running statistics, as for the Jacobian."""

    def __init__(self, model, args, n_train, seed):
        super().__init__(model, args, n_train, seed)
        self.lam, self.n_iter = args.slope_lambda, args.slope_iters

    def loss(self, x, y, idx):
        ce = F.cross_entropy(self.model(x), y)
        with eval_mode(self.model):
            term = slope.slope_loss(self.model, x, n_iter=self.n_iter)
        return ce + self.lam * term


METHOD_CLASSES = {"vanilla": Vanilla, "decay": Decay, "adversarial": Adversarial,
                  "spectral": Spectral, "jacobian": Jacobian, "hessian": Hessian, "slope": Slope}


# --------------------------------------------------------------------------- measurements

@torch.no_grad()
def accuracy_and_loss(model, x, y, batch: int):
    correct, total = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        correct += (out.argmax(1) == y[i:i + batch]).sum()
        total += F.cross_entropy(out, y[i:i + batch], reduction="sum")
    return correct.item() / len(y), total.item() / len(y)


def input_gradient_norm(model, x, y, batch: int) -> float:
    """Mean over samples of ||d loss(f(x_i), y_i) / d x_i||_2 (Fig. 2/6)."""
    total = 0.0
    for i in range(0, len(y), batch):
        xb = x[i:i + batch].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), y[i:i + batch], reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
        total += g.reshape(len(xb), -1).norm(dim=1).sum().item()
    return total / len(y)


def largest_hessian_eigenvalue(model, x, y, args, seed: int) -> dict:
    """The dominant eigenvalue of the Hessian of the mean loss on (x, y) (Fig. 3): power
    iteration with Sandler et al.'s residual test (hessian.top_eigenvalue)."""
    params = [p for p in model.parameters() if p.requires_grad]
    est = hessian.top_eigenvalue(lambda: F.cross_entropy(model(x), y), params,
                                 n_iter=args.curvature_iters, tol=args.curvature_tol,
                                 generator=torch.Generator().manual_seed(seed))
    return dict(eigenvalue=est.eigenvalue.item(), residual=est.residual.item(),
                iterations=est.iterations)


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def weight_sigmas(model) -> List[float]:
    """The exact spectral norm of every collected weight (matricized along dim 0); NaN for a
    weight with non-finite entries (a diverged run), which the SVD would refuse."""
    out = []
    for _, w in se.collect_weights(model):
        m = w.detach().reshape(w.shape[0], -1).double()
        out.append(torch.linalg.matrix_norm(m, ord=2).item() if torch.isfinite(m).all()
                   else float("nan"))
    return out


# --------------------------------------------------------------------------- one run

def run_name(spec: dict) -> str:
    return f"{spec['dataset']}-{spec['model']}-{spec['method']}-{spec['regime']}-seed{spec['seed']}"


def run_config(args, spec: dict) -> dict:
    cfg = {k: getattr(args, k) for k in COMMON_KEYS + METHOD_KEYS[spec["method"]]}
    cfg.update(spec)
    return cfg


def _diff(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _after_epoch(spec: dict, epoch: int) -> None:
    """Called after each epoch's checkpoint is written (a hook for tests)."""


def _progress(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Quiet:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        if enabled:
            print(f"{desc}: tqdm is not installed, no progress bar", file=sys.stderr)
        return _Quiet()
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                dynamic_ncols=True)


def train_run(args, data: datasets.Dataset, subsets: dict, spec: dict, ckpt_dir: str) -> dict:
    """One training run: returns the run's record (history, final measurements, timing)."""
    device = args.torch_device
    cfg = run_config(args, spec)
    path = os.path.join(ckpt_dir, run_name(spec) + ".pt")
    ckpt = None
    if args.resume and os.path.exists(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        old = ckpt["config"]
        changed = _diff(old, cfg)
        if changed:
            what = ", ".join(f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in changed)
            raise SystemExit(
                f"--resume: the checkpoint {path} was made with other settings ({what}); "
                "run without --resume (or with another --out) to start over")
        if ckpt.get("result") is not None:
            return dict(ckpt["result"], resumed="complete")
    n_train = len(data.y_train)
    batch = min(spec["batch_size"], n_train)
    lr0 = spec["lr"]
    steps = math.ceil(n_train / batch)
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]
    dev_rng = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=dev_rng):
        torch.manual_seed(spec["seed"])
        model = models.build(spec["model"], data.input_shape, data.num_classes, width=args.width,
                             vgg_config=args.vgg_config, densenet_depth=spec["densenet_depth"],
                             densenet_growth=args.densenet_growth).to(device)
        method = METHOD_CLASSES[spec["method"]](model, args, n_train, spec["seed"])
        opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=args.momentum, nesterov=True,
                              weight_decay=method.weight_decay)
        gen = torch.Generator().manual_seed(spec["seed"])
        history, start, elapsed, state = [], 0, 0.0, ckpt
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            method.load_state_dict(ckpt["method"])
            gen.set_state(ckpt["shuffle_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            if dev_rng and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
            history, start, elapsed = ckpt["history"], ckpt["epoch"], ckpt["elapsed"]
        xtr, ytr = data.x_train, data.y_train
        bar = _progress(args.epochs * steps, start * steps, run_name(spec), args.progress)
        for epoch in range(start, args.epochs):
            t0 = time.perf_counter()
            lr = lr0 * 0.1 ** sum(epoch >= m for m in milestones if m > 0)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            objective = torch.zeros((), device=device)
            # one host-to-device copy per epoch (a copy per step from pageable memory would
            # wait for the device)
            for idx in torch.randperm(n_train, generator=gen).to(device).split(batch):
                x, y = xtr[idx], ytr[idx]
                opt.zero_grad(set_to_none=True)
                loss = method.loss(x, y, idx)
                loss.backward()
                method.after_backward()
                opt.step()
                objective += loss.detach() * len(idx)
                bar.update()
            train_time = time.perf_counter() - t0
            rec = evaluate(model, data, subsets, args, spec, epoch)
            rec.update(epoch=epoch + 1, lr=lr, objective=objective.item() / n_train,
                       train_time=train_time, epoch_time=time.perf_counter() - t0)
            history.append(rec)
            bar.set_postfix_str(f"train {rec['train_acc']:.3f} test {rec['test_acc']:.3f}")
            elapsed += time.perf_counter() - t0
            state = dict(config=cfg, epoch=epoch + 1, elapsed=elapsed, history=history,
                         model=model.state_dict(), optimizer=opt.state_dict(),
                         method=method.state_dict(), shuffle_rng=gen.get_state(),
                         torch_rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state(device) if dev_rng else None,
                         result=None)
            _save(state, path)
            _after_epoch(spec, epoch + 1)
        bar.close()
        t_final = time.perf_counter()
        final = final_measurements(model, data, subsets, args)
        elapsed += time.perf_counter() - t_final
    # wall_time: training and measurements of every epoch, over all sessions of a resumed run
    result = dict(spec, batch_size_effective=batch, steps_per_epoch=steps, history=history,
                  final=final, wall_time=elapsed,
                  resumed="partial" if ckpt is not None else "no")
    state["result"] = result
    _save(state, path)
    return result


def evaluate(model, data, subsets, args, spec, epoch) -> dict:
    """The per-epoch numbers: accuracies and losses on the whole train and test sets, the input
    gradient norm on the analysis subsets, every weight's spectral norm and (every
    --curvature-every epochs and at the last) the largest Hessian eigenvalue."""
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        tr_acc, tr_loss = accuracy_and_loss(model, data.x_train, data.y_train, args.eval_batch)
        te_acc, te_loss = accuracy_and_loss(model, data.x_test, data.y_test, args.eval_batch)
        rec = dict(train_acc=tr_acc, test_acc=te_acc, train_loss=tr_loss, test_loss=te_loss,
                   gap=tr_acc - te_acc)
        for part in ("train", "test"):
            x, y = subsets[part]
            rec[f"input_grad_{part}"] = input_gradient_norm(model, x, y, args.eval_batch)
        sig = weight_sigmas(model)
        rec.update(sigmas=sig, max_sigma=float("nan") if any(map(math.isnan, sig)) else max(sig))
        if (epoch + 1) % args.curvature_every == 0 or epoch + 1 == args.epochs:
            for part in ("train", "test"):
                x, y = subsets[part]
                seed = spec["seed"] * 100003 + epoch * 2 + (part == "test")
                rec[f"hessian_{part}"] = largest_hessian_eigenvalue(model, x, y, args, seed)
    return rec


def final_measurements(model, data, subsets, args) -> dict:
    """After training: the singular values of one weight (Fig. 4) and the slope of the network
    at --slope-samples test inputs (slope distribution, arXiv:2107.01473)."""
    weights = se.collect_weights(model)
    layer = len(weights) // 2 if args.spectrum_layer is None else args.spectrum_layer
    if not -len(weights) <= layer < len(weights):
        raise SystemExit(f"--spectrum-layer {layer}: the model has {len(weights)} weights "
                         f"(0..{len(weights) - 1})")
    name, w = weights[layer]
    xs = data.x_test[:args.slope_samples]
    if not _finite(model):      # a diverged run: nothing to decompose, no slope
        nan = float("nan")
        return dict(spectrum_layer=name, spectrum_shape=list(w.shape),
                    singular_values=[nan] * min(w.shape[0], w[0].numel()),
                    slope_values=[nan] * len(xs), slope_mean=nan, slope_quantiles={},
                    diverged=True)
    sv = torch.linalg.svdvals(w.detach().reshape(w.shape[0], -1).double()).tolist()
    with eval_mode(model):
        stats = slope.distribution(model, list(xs.split(args.eval_batch)))
    return dict(spectrum_layer=name, spectrum_shape=list(w.shape), singular_values=sv,
                slope_values=stats.values.tolist(), slope_mean=stats.mean,
                slope_quantiles={str(q): v for q, v in stats.quantiles.items()},
                diverged=False)


# --------------------------------------------------------------------------- the whole job

def _versions(device) -> dict:
    import numpy
    v = dict(spectral_ext=se.__version__, torch=torch.__version__, numpy=numpy.__version__,
             python=platform.python_version(), platform=platform.platform(),
             threads=torch.get_num_threads(), device=str(device))
    if device.type == "cuda":
        v["device_name"] = torch.cuda.get_device_name(device)
    else:
        v["device_name"] = platform.processor() or platform.machine()
    from importlib import metadata
    # the installed distributions' versions (mnist1d has no __version__ attribute)
    for mod, dist in (("sklearn", "scikit-learn"), ("mnist1d", "mnist1d"),
                      ("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        try:
            v[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:      # absent: recorded as such
            v[mod] = None
    return v


def _load(args, name):
    try:
        return datasets.load(name, args.data_dir, gcn=args.gcn, data_seed=args.data_seed,
                             mnist1d_samples=args.mnist1d_samples,
                             digits_test_fraction=args.digits_test_fraction)
    except (FileNotFoundError, ImportError, ValueError) as e:
        args.parser.error(str(e))


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    device = args.torch_device
    print(f"spectral_ext {se.__version__}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads; out: {args.out}", flush=True)
    runs: List[dict] = []
    data_info: Dict[str, dict] = {}
    for ds in args.datasets:
        data = _load(args, ds)
        sub_gen = torch.Generator().manual_seed(args.data_seed)
        subsets = {}
        for part, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            idx = torch.randperm(len(y), generator=sub_gen)[:args.analysis_samples]
            subsets[part] = (x[idx].to(device), y[idx].to(device))
        data = data._replace(x_train=data.x_train.to(device), y_train=data.y_train.to(device),
                             x_test=data.x_test.to(device), y_test=data.y_test.to(device))
        data_info[ds] = dict(train=len(data.y_train), test=len(data.y_test),
                             input_shape=list(data.input_shape), classes=data.num_classes)
        print(f"{ds}: {len(data.y_train)} train / {len(data.y_test)} test, input "
              f"{tuple(data.input_shape)}, {data.num_classes} classes", flush=True)
        for model in args.models:
            depth = args.densenet_depth or (22 if ds == "stl10" else 40)
            for regime in args.regime_list:
                bs = args.batch_small if regime == "small" else args.batch_large
                lr = args.lr * (1 if regime == "small" else args.lr_large_factor)
                if bs > len(data.y_train):
                    print(f"  note: batch {bs} > {len(data.y_train)} training samples: the "
                          f"{regime}-batch regime uses the whole training set as one batch",
                          flush=True)
                for method in args.method_list:
                    for seed in args.seed_list:
                        spec = dict(dataset=ds, model=model, method=method, regime=regime,
                                    batch_size=bs, lr=lr, seed=seed,
                                    densenet_depth=depth if model == "densenet" else None)
                        r = train_run(args, data, subsets, spec, ckpt_dir)
                        last = r["history"][-1]
                        print(f"  {run_name(spec):45s} train {last['train_acc']:.3f} test "
                              f"{last['test_acc']:.3f} ({r['wall_time']:.1f} s"
                              f"{', resumed' if r['resumed'] != 'no' else ''})", flush=True)
                        runs.append(r)
    rows = table1.summarize(runs, args.alpha)
    md = table1.to_markdown(rows)
    with open(os.path.join(args.out, "table1.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "table1.csv"), "w") as f:
        f.write(table1.to_csv(rows))
    from spectral_ext.experiments import figures
    figs, why_not = figures.write_all(runs, args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("parser", "torch_device")}
    out = dict(command=["python", "-m", "spectral_ext.experiments.paper"] +
               list(sys.argv[1:] if argv is None else argv),
               config=config, seeds=args.seed_list, versions=_versions(device), data=data_info,
               wall_time=time.perf_counter() - t0, table1=rows, figures=figs,
               figures_skipped=why_not, runs=runs)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_strict_json(out), f, indent=1, default=_json_default, allow_nan=False)
    print("\n" + md)
    print(f"wrote {args.out}/table1.md, table1.csv, results.json and {len(figs)} figures "
          f"in {out['wall_time']:.1f} s" + (f" (figures skipped: {why_not})" if why_not else ""))
    return out


def _strict_json(o):
    """NaN and infinities as null (strict JSON; a NaN gap means no epoch exceeded alpha)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    main()
