"""The main job of `make demo`: a small CNN on scikit-learn's bundled digits (8x8 images, no
download), trained with and without spectral norm regularization (Yoshida & Miyato 2017).

Prints per epoch the train/test accuracy, the generalization gap and the largest sigma, then the
regularizer's cost per training step: the fused step against the naive per-layer loop.

    python -P -m spectral_ext.experiments.digits [--epochs N] [--lam L] [--train-size N]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import spectral_ext as se
from spectral_ext.experiments.naive import naive_step


def load_digits(train_size: int, seed: int):
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - the demo's set-up installs it
        raise SystemExit("the digits demo needs scikit-learn (pip install scikit-learn)") from exc
    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def train_epoch(model, opt, reg, xtr, ytr, batch: int, gen) -> None:
    """One epoch of SGD over shuffled minibatches (order drawn from ``gen``), with
    ``reg.step()`` between backward and the optimizer step when ``reg`` is given; leaves the
    model in eval mode."""
    model.train()
    for idx in torch.randperm(len(ytr), generator=gen).split(batch):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        if reg is not None:
            reg.step()
        opt.step()
    model.eval()


def train(lam, args, train_set, test_set):
    torch.manual_seed(args.seed)
    model = make_cnn()
    reg = se.SpectralNormRegularizer(model, lam=lam) if lam > 0 else None
    monitor = reg or se.SpectralNormRegularizer(model, lam=0.0)   # for sigma_max only
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    (xtr, ytr), (xte, yte) = train_set, test_set
    gen = torch.Generator().manual_seed(args.seed)
    label = f"lam={lam:g}" if lam > 0 else "no regularizer"
    print(f"\n== {label} ==")
    print(f"{'epoch':>5} {'train acc':>9} {'test acc':>8} {'gap':>7} {'max sigma':>9}")
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, opt, reg, xtr, ytr, args.batch, gen)
        tr, te = accuracy(model, xtr, ytr), accuracy(model, xte, yte)
        smax = monitor.exact_sigmas().max().item()     # monitoring, outside the training step
        print(f"{epoch:5d} {tr:9.3f} {te:8.3f} {tr - te:7.3f} {smax:9.3f}")
    return model


def cost_per_step(params, reps: int):
    """Median time of the regularizer alone, fused versus the naive loop, on these weights."""
    for p in params:
        p.grad = torch.zeros_like(p)
    results = {}
    for name, fn in (("naive per-layer loop", None), ("spectral_ext.fused_step", "auto")):
        vs = se.init_vectors(params)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if fn is None:
                naive_step(params, vs, lam=0.01)
            else:
                se.fused_step(params, vs, lam=0.01, backend=fn)
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times[reps // 5:])
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--lam", type=float, default=0.03)
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args(argv)

    print(f"spectral_ext {se.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, b in se.available_backends().items():
        print(f"  backend {name:9s} {'yes' if b.available else 'no ':3s}  {b.detail}")
    train_set, test_set = load_digits(args.train_size, args.seed)
    print(f"digits: {len(train_set[1])} train / {len(test_set[1])} test images (8x8)")
    t0 = time.perf_counter()
    train(0.0, args, train_set, test_set)
    model = train(args.lam, args, train_set, test_set)
    print(f"\n(training took {time.perf_counter() - t0:.1f} s)")

    params = [w for _, w in se.collect_weights(model)]
    print(f"\nregularizer cost per step on this CNN ({len(params)} weights, "
          f"{sum(w.numel() for w in params)} parameters), median of {args.reps}; "
          f"backend auto = {se.resolve_backend(params)}")
    res = cost_per_step(params, args.reps)
    naive = res["naive per-layer loop"]
    for name, t in res.items():
        print(f"  {name:26s} {t * 1e6:9.1f} us   {naive / t:5.1f}x")


if __name__ == "__main__":
    main()
