"""The per-layer loop users write today: the paper's Algorithm 1 (in our normalized semantics)
as plain PyTorch ops, one layer at a time.  Not a backend of spectral_ext: it is the baseline the
demo and the benchmarks compare against (about ten small kernels per layer).  Weights and
vectors must share a dtype (float32 in the comparisons)."""

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def naive_step(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], lam: float = 0.01,
               n_iter: int = 1) -> torch.Tensor:
    sigmas = []
    for w, v in zip(weights, vs):
        W = w.reshape(w.shape[0], -1)
        for _ in range(n_iter):
            u = F.normalize(W @ v, dim=0)
            v_prime = W.t() @ u
            sigma = v_prime.norm()
            v.copy_(v_prime / sigma)
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        w.grad.add_((lam * sigma * torch.outer(u, v)).reshape(w.shape))
        sigmas.append(sigma)
    return torch.stack(sigmas)
