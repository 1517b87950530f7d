"""The loops users write today, as baselines for the demo and the benchmarks (not backends).

- :func:`naive_step`: the tightest plain loop a careful user writes, one layer at a time: the
  two matvecs, the norms, and ``G.addr_(lam * sigma * u, v)`` (no full-size temporary, no host
  synchronisation): about ten small kernels per layer.
- :func:`naive_outer_step`: the paper's Algorithm 1 read literally (in our normalized
  semantics): the same loop with ``G += lam * sigma * torch.outer(u, v)``, which materializes a
  full-size temporary (8 more bytes per float32 parameter).
- :func:`grouped_step`: what a careful PyTorch user writes instead: layers grouped by matrix
  shape and dtype, each group stacked so that one ``torch.bmm`` does the matvecs of the whole
  group, and ``torch._foreach_*`` writes the vectors and gradients back.  Stacking copies every
  weight once per step; that is the price of batching weights that live in separate tensors.

Both follow ``spectral_ext.reference`` (``tests/test_experiments.py`` checks it): vectors are
updated in place, ``grad += lam * sigma * u v^T`` goes into ``W.grad`` (created if None), and
sigma per layer is returned.  Vectors must have the weights' dtype (what a user's ``W @ v``
needs).  Unlike the reference, a zero matrix gives NaN (0/0), as the paper's loop does.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _grads(weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    for w in weights:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
    return [w.grad for w in weights]


@torch.no_grad()
def naive_step(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], lam: float = 0.01,
               n_iter: int = 1) -> torch.Tensor:
    sigmas = []
    for w, v, g in zip(weights, vs, _grads(weights)):
        W = w.reshape(w.shape[0], -1)
        for _ in range(n_iter):
            u = F.normalize(W @ v, dim=0)
            v_prime = W.t() @ u
            sigma = v_prime.norm()
            v.copy_(v_prime / sigma)
        # the rank-1 update in place; the scale goes on the short vector u (a tensor: no sync)
        g.view(W.shape).addr_(u * (lam * sigma), v)
        sigmas.append(sigma)
    return torch.stack(sigmas)


@torch.no_grad()
def naive_outer_step(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                     lam: float = 0.01, n_iter: int = 1) -> torch.Tensor:
    sigmas = []
    for w, v, g in zip(weights, vs, _grads(weights)):
        W = w.reshape(w.shape[0], -1)
        for _ in range(n_iter):
            u = F.normalize(W @ v, dim=0)
            v_prime = W.t() @ u
            sigma = v_prime.norm()
            v.copy_(v_prime / sigma)
        g.add_((lam * sigma * torch.outer(u, v)).reshape(w.shape))
        sigmas.append(sigma)
    return torch.stack(sigmas)


class GroupPlan:
    """Layers grouped by (matrix shape, dtype), computed once for a list of weights (a careful
    user builds it once, not every step).  ``order`` maps the concatenated per-group sigmas back
    to the layers' order."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        groups: Dict[Tuple, List[int]] = {}
        for i, w in enumerate(weights):
            groups.setdefault((w.shape[0], w[0].numel(), w.dtype), []).append(i)
        self.groups = list(groups.values())
        flat = [i for idx in self.groups for i in idx]
        device = weights[0].device if len(weights) else torch.device("cpu")
        self.order = torch.tensor(flat, dtype=torch.long, device=device)
        self.n = len(weights)


@torch.no_grad()
def grouped_step(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], lam: float = 0.01,
                 n_iter: int = 1, plan: Optional[GroupPlan] = None) -> torch.Tensor:
    plan = GroupPlan(weights) if plan is None else plan
    grads = _grads(weights)
    out = []
    for idx in plan.groups:
        rows = weights[idx[0]].shape[0]
        Ws = torch.stack([weights[i].reshape(rows, -1) for i in idx])      # [G, m, n] (a copy)
        V = torch.stack([vs[i] for i in idx])                               # [G, n]
        for _ in range(n_iter):
            U = F.normalize(torch.bmm(Ws, V.unsqueeze(2)).squeeze(2), dim=1)    # [G, m]
            V_prime = torch.bmm(U.unsqueeze(1), Ws).squeeze(1)                  # [G, n] = W^T u
            S = torch.linalg.vector_norm(V_prime, dim=1)                        # [G]
            V = V_prime / S.unsqueeze(1)
        torch._foreach_copy_([vs[i] for i in idx], list(V.unbind(0)))
        upd = torch.bmm((lam * S).unsqueeze(1).unsqueeze(2) * U.unsqueeze(2), V.unsqueeze(1))
        torch._foreach_add_([grads[i].view(rows, -1) for i in idx], list(upd.unbind(0)))
        out.append(S)
    sigma = torch.empty(plan.n, dtype=out[0].dtype if out else torch.float32,
                        device=plan.order.device)
    return sigma.index_copy_(0, plan.order, torch.cat(out)) if out else sigma
