"""conv_norm="operator" (issue 15): how far apart the matricized and the operator norms of real
networks' convs are, and what an operator-mode step costs against the matricized step.

    make bench-conv ARGS="--what sigmas,digits,cost --models vgg16-cifar,resnet50"

- ``sigmas``: per conv of each model at its random init (seed 0), the matricized sigma (SVD of
  out x in*kh*kw) and the operator sigma on the model's input size (converged:
  spectral_ext.conv_norm_report), and the spread of their ratio.
- ``digits``: the CNN of ``make demo`` trained on scikit-learn's digits without a regularizer,
  with the matricized one and with the operator one (same lam), then the same table per trained
  model, and test accuracy.
- ``cost``: medians (interleaved rounds, benchmarks/harness.py) of one ``reg.step()``
  (n_iter=1) in each mode on the same model and gradients, the operator step with and without
  batching equal geometries, and one forward+backward of a training batch for scale.
- ``batching``: the operator step on L equal convs, stacked into one grouped conv per
  iteration or one call per conv (what spectral_ext.conv.BATCH_MAX_NUMEL is set from).

Models: ``vgg16-cifar`` (benchmarks/models.py's set as a network: 13 3x3 convs with padding 1,
max-pool between stages, on 3x32x32), ``resnet50`` (torchvision's layout: bottlenecks with the
stride on the 3x3 conv, 1x1 downsampling shortcuts, on 3x224x224), ``digits`` (1x8x8).
"""

import argparse
import statistics
import time

import torch
from torch import nn

import spectral_ext as se

from . import harness


def vgg16_cifar() -> nn.Module:
    widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]
    layers, cin = [], 3
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
            cin = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 10))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet50() -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
              nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
    cin = 64
    for blocks, width, stride in zip([3, 4, 6, 3], [64, 128, 256, 512], [1, 2, 2, 2]):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def digits_cnn() -> nn.Module:
    from spectral_ext.experiments.digits import make_cnn
    return make_cnn()


# name: (builder, input size without batch, training batch for the cost table, classes)
MODELS = {
    "vgg16-cifar": (vgg16_cifar, (3, 32, 32), 64, 10),
    "resnet50": (resnet50, (3, 224, 224), 8, 1000),
    "digits": (digits_cnn, (1, 8, 8), 32, 10),
}


def build(name):
    make, size, batch, classes = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
        x = torch.randn(batch, *size)
        y = torch.randint(0, classes, (batch,))
    return model, x, y


def summary(rows) -> str:
    r = [row["ratio"] for row in rows]
    return (f"{len(r)} convs; operator / matricized sigma: min {min(r):.3f}, median "
            f"{statistics.median(r):.3f}, max {max(r):.3f}; largest sigma: matricized "
            f"{max(row['matricized'] for row in rows):.3f}, operator "
            f"{max(row['operator'] for row in rows):.3f}")


def run_sigmas(names):
    for name in names:
        model, x, _ = build(name)
        print(f"\n== {name}, random init (seed 0), input {tuple(x.shape[1:])} ==")
        t0 = time.perf_counter()
        rows = se.conv_norm_report(model, example_input=x[:1])
        print(summary(rows))
        print(f"(converged operator norms: {time.perf_counter() - t0:.1f} s)")


def run_digits(epochs, lam, train_size=400, seed=0):
    from spectral_ext.experiments.digits import accuracy, load_digits, make_cnn, train_epoch
    (xtr, ytr), (xte, yte) = load_digits(train_size, seed)
    for mode in ("none", "matricized", "operator"):
        torch.manual_seed(seed)
        model = make_cnn()
        reg = (None if mode == "none" else
               se.SpectralNormRegularizer(model, lam=lam, conv_norm=mode))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(epochs):
            train_epoch(model, opt, reg, xtr, ytr, 32, gen)
        label = "no regularizer" if mode == "none" else f"conv_norm={mode!r}, lam={lam:g}"
        print(f"\n== digits CNN after {epochs} epochs, {label} "
              f"({time.perf_counter() - t0:.1f} s): train acc {accuracy(model, xtr, ytr):.3f}, "
              f"test acc {accuracy(model, xte, yte):.3f} ==")
        rows = se.conv_norm_report(model, example_input=xtr[:1])
        print(summary(rows))


def run_cost(names, rounds):
    print(f"\n== one regularizer step (n_iter=1), {torch.get_num_threads()} threads, medians of "
          "interleaved rounds ==")
    header = (f"{'model':12s} {'convs':>5s} {'conv params':>11s} {'matricized ms':>13s} "
              f"{'operator ms':>11s} {'op unbatched ms':>15s} {'op/mat':>7s} "
              f"{'fwd+bwd ms (batch)':>19s}")
    print(header)
    for name in names:
        model, x, y = build(name)
        reg_m = se.SpectralNormRegularizer(model)
        reg_o = se.SpectralNormRegularizer(model, conv_norm="operator")
        reg_u = se.SpectralNormRegularizer(model, conv_norm="operator")
        reg_u._conv.batch = False

        def train():
            model.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()

        train()                              # records the input sizes, creates the .grads
        impls = {"matricized": reg_m.step, "operator": reg_o.step, "unbatched": reg_u.step,
                 "fwd+bwd": train}
        t = harness.interleaved_medians(impls, "cpu", rounds=rounds)
        convs = [i for i in reg_o._conv.idx]
        params = sum(reg_o.weights[i].numel() for i in convs)
        groups = len(reg_o._conv.plan(reg_o, reg_o._bind(), convs))
        print(f"{name:12s} {len(convs):5d} {params / 1e6:10.2f}M {t['matricized'] * 1e3:13.2f} "
              f"{t['operator'] * 1e3:11.2f} {t['unbatched'] * 1e3:15.2f} "
              f"{t['operator'] / t['matricized']:7.1f} "
              f"{t['fwd+bwd'] * 1e3:13.1f} ({x.shape[0]:3d})   [{groups} conv calls per iteration]")


def run_batching(rounds):
    """Stacking equal geometries into one grouped conv (conv.BATCH_MAX_NUMEL) against one call
    per conv, on L equal convs c->c (3x3, padding 1) with given input sizes."""
    print(f"\n== operator step, equal convs stacked or not, {torch.get_num_threads()} threads ==")
    print(f"{'convs':>14s} {'input':>8s} {'stacked ms':>10s} {'one call each ms':>16s}")
    for L, c, n in [(24, 16, 8), (24, 32, 8), (12, 128, 8), (6, 512, 4)]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for _ in range(L)])
        sizes = {str(i): (c, n, n) for i in range(L)}
        regs = {}
        for mode in ("stacked", "alone"):
            reg = se.SpectralNormRegularizer(net, conv_norm="operator", input_sizes=sizes)
            reg._conv.batch = mode == "stacked"
            regs[mode] = reg
        old = se.conv.BATCH_MAX_NUMEL
        se.conv.BATCH_MAX_NUMEL = 1 << 62            # stack whatever the size, to compare
        try:
            t = harness.interleaved_medians({k: r.step for k, r in regs.items()}, "cpu",
                                            rounds=rounds)
        finally:
            se.conv.BATCH_MAX_NUMEL = old
        print(f"{L:3d} x {c:3d}->{c:3d} {n:3d}x{n:<3d} {t['stacked'] * 1e3:10.2f} "
              f"{t['alone'] * 1e3:16.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="sigmas,digits,cost,batching")
    ap.add_argument("--models", default="vgg16-cifar,digits")
    ap.add_argument("--cost-models", default="vgg16-cifar,resnet50,digits")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lam", type=float, default=0.03)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    what = args.what.split(",")
    print(f"spectral_ext {se.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if "sigmas" in what:
        run_sigmas(args.models.split(","))
    if "digits" in what:
        run_digits(args.epochs, args.lam)
    if "cost" in what:
        run_cost(args.cost_models.split(","), args.rounds)
    if "batching" in what:
        run_batching(args.rounds)


if __name__ == "__main__":
    main()
