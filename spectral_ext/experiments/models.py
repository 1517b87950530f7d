"""The three model families of Yoshida & Miyato's Section 4 (VGG-style, NIN, DenseNet), for
inputs with one spatial dimension (MNIST-1D: Conv1d) or two (images: Conv2d), sized by flags.

- ``vgg``: 3x3 convolutions (+ batch norm + ReLU) in the stages of ``config`` (numbers are
  output channels, "M" a 2x2 max pool), then global average pooling and a two-layer classifier.
  The default config is VGG-16's convolutions.  Pools that would shrink a side below 1 are
  left out, so small inputs (8x8 digits) work.
- ``nin``: Network in Network (Lin et al. 2014, the CIFAR variant): three mlpconv blocks
  (5x5, 5x5, 3x3 convolutions, each followed by two 1x1), max / average pools between them,
  the last 1x1 convolution giving the class scores, global average pooling; no batch norm.
- ``densenet``: DenseNet (Huang et al. 2017, the basic CIFAR variant without bottleneck or
  compression): a 3x3 convolution with 16 channels, three dense blocks of (depth - 4) / 3
  BN-ReLU-3x3 layers of ``growth`` channels each, 1x1 transitions with 2x2 average pooling,
  BN-ReLU, global average pooling and a linear classifier.  Depth 40, growth 12 is
  DenseNet-40 (about 1.0M parameters for CIFAR-10, as Huang et al. report).

Dropout is left out of all three (the runner compares regularizers; see the README).
"""

from typing import Sequence, Tuple, Union

import torch
from torch import nn

MODELS = ("vgg", "nin", "densenet")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _ops(dim: int):
    if dim not in (1, 2):
        raise ValueError(f"inputs must have 1 or 2 spatial dimensions, got {dim}")
    if dim == 1:
        return (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
    return (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def parse_vgg_config(text: Union[str, Sequence]) -> Tuple:
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for it in items:
        it = str(it).strip()
        if it.upper() == "M":
            out.append("M")
        elif it.isdigit() and int(it) > 0:
            out.append(int(it))
        else:
            raise ValueError(f"VGG config items are positive channel counts or 'M', got {it!r}")
    if not any(isinstance(i, int) for i in out):
        raise ValueError("the VGG config needs at least one convolution")
    return tuple(out)


class VGG(nn.Module):
    def __init__(self, input_shape, num_classes: int, config=VGG16, width: float = 1.0,
                 batchnorm: bool = True):
        super().__init__()
        c, *spatial = input_shape
        Conv, BN, MaxPool, _, GAP = _ops(len(spatial))
        size = min(spatial)
        layers = []
        for item in parse_vgg_config(config):
            if item == "M":
                if size >= 2:
                    layers.append(MaxPool(2))
                    size //= 2
                continue
            out = _scaled(item, width)
            layers.append(Conv(c, out, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(BN(out))
            layers.append(nn.ReLU())
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(GAP(1), nn.Flatten(), nn.Linear(c, c), nn.ReLU(),
                                        nn.Linear(c, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class NIN(nn.Module):
    def __init__(self, input_shape, num_classes: int, width: float = 1.0):
        super().__init__()
        c, *spatial = input_shape
        Conv, _, MaxPool, AvgPool, GAP = _ops(len(spatial))
        w = lambda n: _scaled(n, width)
        size = min(spatial)

        def pool(cls):
            nonlocal size
            if size < 2:
                return []
            size = (size - 1) // 2 + 1
            return [cls(3, stride=2, padding=1)]

        def mlpconv(cin, cmid, k, c1, c2, last_relu=True):
            layers = [Conv(cin, cmid, k, padding=k // 2), nn.ReLU(), Conv(cmid, c1, 1), nn.ReLU(),
                      Conv(c1, c2, 1)]
            return layers + ([nn.ReLU()] if last_relu else [])

        self.features = nn.Sequential(
            *mlpconv(c, w(192), 5, w(160), w(96)), *pool(MaxPool),
            *mlpconv(w(96), w(192), 5, w(192), w(192)), *pool(AvgPool),
            *mlpconv(w(192), w(192), 3, w(192), num_classes, last_relu=False),
            GAP(1), nn.Flatten())

    def forward(self, x):
        return self.features(x)


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, ops):
        super().__init__()
        Conv, BN = ops[0], ops[1]
        self.body = nn.Sequential(BN(cin), nn.ReLU(), Conv(cin, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, input_shape, num_classes: int, depth: int = 40, growth: int = 12):
        super().__init__()
        if not isinstance(depth, int) or depth < 7 or (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n + 4 with n >= 1 (40, 22, ...), got {depth!r}")
        if not isinstance(growth, int) or growth < 1:
            raise ValueError(f"DenseNet growth rate must be a positive int, got {growth!r}")
        c, *spatial = input_shape
        ops = _ops(len(spatial))
        Conv, BN, _, AvgPool, GAP = ops
        n = (depth - 4) // 3
        size = min(spatial)
        layers = [Conv(c, 16, 3, padding=1, bias=False)]
        c = 16
        for block in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth, ops))
                c += growth
            if block < 2:
                layers += [BN(c), nn.ReLU(), Conv(c, c, 1, bias=False)]
                if size >= 2:
                    layers.append(AvgPool(2))
                    size //= 2
        layers += [BN(c), nn.ReLU(), GAP(1), nn.Flatten(), nn.Linear(c, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build(name: str, input_shape, num_classes: int, width: float = 1.0, vgg_config=VGG16,
          densenet_depth: int = 40, densenet_growth: int = 12) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choices: {', '.join(MODELS)}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if name == "vgg":
        return VGG(input_shape, num_classes, vgg_config, width)
    if name == "nin":
        return NIN(input_shape, num_classes, width)
    return DenseNet(input_shape, num_classes, densenet_depth, densenet_growth)
