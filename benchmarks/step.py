"""Whole training steps with no regularizer, with the naive loop and with the fused step: what
share of a real step the regularizer costs.

Models: a small CNN on CIFAR-sized inputs (both devices) and, on a GPU, a 12-layer stack shaped
like GPT-2 small (d_model 768, 12 heads, MLP 3072, 256 tokens x batch 8)."""

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import spectral_ext as se
from .naive import naive_step


def small_cnn() -> nn.Module:
    # 4 convs (3x3, widths 32-64-128-128) and 2 linear layers on 3x32x32 inputs
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))


class Block(nn.Module):
    """A pre-norm GPT-2 block (causal attention, GELU MLP) with nn.Linear projections, so the
    regularizer sees all four weight matrices: qkv 2304x768, proj 768x768, fc 3072x768, down
    768x3072."""

    def __init__(self, d: int = 768, heads: int = 12, mlp: int = 3072):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.down = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT2Stack(nn.Module):
    """12 GPT-2-small blocks (no embeddings) and a 10-way head: its weight matrices are the
    gpt2-small set of benchmarks/models.py plus the head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(12)])
        self.head = nn.Linear(768, 10)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


MODELS = {
    # name: (builder, input shape, devices it runs on by default)
    "small-cnn": (small_cnn, (64, 3, 32, 32), ("cpu", "cuda")),
    "gpt2-stack": (GPT2Stack, (8, 256, 768), ("cuda",)),
}


def models_for(device) -> List[str]:
    """The models of MODELS that run on this device by default."""
    return [m for m, (_, _, devices) in MODELS.items() if torch.device(device).type in devices]


def build(model_name: str, device) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, inputs, labels) from seed 0, without touching the global RNG: the same on every
    call."""
    make, shape, _ = MODELS[model_name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make().to(device)
        x = torch.randn(shape).to(device)
        y = torch.randint(0, 10, (shape[0],)).to(device)
    return model, x, y


def train_step_impls(model_name: str, device) -> Tuple[Dict[str, Callable[[], None]], nn.Module]:
    """The model (``build``: the same model, batch and vectors on every call) and its step
    functions:

    - 'none' / 'naive' / 'fused': one SGD training step (forward, backward, regularizer,
      optimizer step) on a fixed random batch; 'fused' is a SpectralNormRegularizer with its
      default (auto) backend, 'naive' the per-layer loop on the same weights (every conv and
      linear weight: spectral_ext.collect_weights) from the same initial vectors;
    - 'naive alone' / 'fused alone': the regularizer by itself.
    """
    model, x, y = build(model_name, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    reg = se.SpectralNormRegularizer(model, lam=0.01)
    weights = [w for _, w in se.collect_weights(model)]
    naive_vs = [v.clone() for v in reg.vs()]

    def step(regularize):
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        regularize()
        opt.step()

    return {
        "none": lambda: step(lambda: None),
        "naive": lambda: step(lambda: naive_step(weights, naive_vs, lam=0.01)),
        "fused": lambda: step(reg.step),
        # the regularizer alone (on the gradients of the last step): its share of a step is
        # measured more precisely this way than as the difference of two whole steps
        "naive alone": lambda: naive_step(weights, naive_vs, lam=0.01),
        "fused alone": reg.step,
    }, model
