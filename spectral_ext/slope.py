"""The slope of a network (Johansson et al., arXiv:2107.01473): how steeply a classifier's
output changes with its input, at each input, its distribution over a dataset, a loss term and
an early-stopping criterion.

Definition used here.  For a network with one output per sample, the slope at x is the norm of
the gradient of the output with respect to the input, ||grad_x f(x)||.  For K > 1 outputs (the
logits of a classifier) it is the largest stretch of the input-to-output map,
sigma_max(P J(x)), where J is the Jacobian of the logits and P = I - 1 1^T / K removes the
all-ones direction, to which the softmax probabilities are blind (adding a constant to every
logit changes nothing).  ``center=False`` takes sigma_max(J(x)) instead.  For a ReLU network,
which is affine on each linear region, this is the norm of that region's linear map.
NOTE: the paper's text was not at hand when this module was written; the definition above is
written out so that it can be checked against the paper, and the tests pin this definition.
"""

from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch

from . import _checks
from .jacobian import JacobianOperators, _check_input, _top_singular

__all__ = ["slope", "slope_loss", "SlopeStats", "distribution", "SlopeEarlyStopping"]


def _centered(model: Callable, center: bool) -> Callable:
    def fn(x):
        y = model(x)
        y = y.reshape(y.shape[0], -1)
        return y - y.mean(1, keepdim=True) if center and y.shape[1] > 1 else y
    return fn


def slope(model: Callable, x: torch.Tensor, n_iter: int = 20, tol: Optional[float] = None,
          center: bool = True) -> torch.Tensor:
    """The slope at each input: a [B] tensor (no gradient).  One output per sample: the exact
    gradient norm (one iteration).  Several: n_iter power iterations per sample (see the module
    docstring), exact at convergence; tol stops early (a host sync per check)."""
    _checks.check_n_iter(n_iter)
    _checks.check_optional_positive("tol", tol)
    ops = JacobianOperators(_centered(model, center), _check_input(x))
    return _top_singular(ops, n_iter, None, tol, 5)[0]


def slope_loss(model: Callable, x: torch.Tensor, n_iter: int = 10, center: bool = True,
               power: int = 2) -> torch.Tensor:
    """mean_i slope(x_i)^power, differentiable with respect to the model's parameters (the
    singular vectors of the power iteration held fixed, as the Jacobian regularizer does): a
    loss term.  Multiply by a weight and add it to the training loss."""
    _checks.check_n_iter(n_iter)
    ops = JacobianOperators(_centered(model, center), _check_input(x))
    _, u, v, _ = _top_singular(ops, n_iter, None, None, 1)
    return ops.fixed_vector_sigma(u, v).abs().pow(power).mean()


class SlopeStats(NamedTuple):
    values: torch.Tensor            # the slope at every input, [N]
    mean: float
    quantiles: dict                 # q -> value, for the requested quantiles
    histogram: tuple                # (counts [bins], edges [bins + 1])


def distribution(model: Callable, data: Union[torch.Tensor, Iterable], n_iter: int = 20,
                 center: bool = True, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
                 bins: int = 30) -> SlopeStats:
    """The slope over a dataset: ``data`` is a tensor of inputs or an iterable of batches
    (tensors, or tuples whose first item is the inputs, as a DataLoader yields).  For
    monitoring, outside the training step: the summary reads values back to the host."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    values: List[torch.Tensor] = []
    for b in batches:
        xb = b[0] if isinstance(b, (tuple, list)) else b
        values.append(slope(model, xb, n_iter=n_iter, center=center))
    if not values:
        raise ValueError("data holds no inputs")
    vals = torch.cat(values).double().cpu()
    qs = torch.quantile(vals, torch.tensor(list(quantiles), dtype=torch.float64))
    counts, edges = torch.histogram(vals, bins=bins)
    return SlopeStats(vals, vals.mean().item(), {q: v.item() for q, v in zip(quantiles, qs)},
                      (counts, edges))


class SlopeEarlyStopping:
    """An early-stopping criterion on the mean slope measured after each epoch (on training or
    held-out inputs): the slope of a network that starts to memorise individual points rises.
    ``update(mean_slope)`` returns True (stop) once the mean slope has stayed more than
    ``rel_increase`` above its lowest value for ``patience`` consecutive updates; ``best_epoch``
    is the update at which the lowest value was seen (restore that checkpoint)."""

    def __init__(self, patience: int = 3, rel_increase: float = 0.05):
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        if not rel_increase >= 0:
            raise ValueError(f"rel_increase must be >= 0, got {rel_increase!r}")
        self.patience, self.rel_increase = patience, float(rel_increase)
        self.best = float("inf")
        self.best_epoch = -1
        self.epoch = -1
        self.bad = 0

    def update(self, mean_slope: float) -> bool:
        mean_slope = float(mean_slope)
        self.epoch += 1
        if mean_slope < self.best:
            self.best, self.best_epoch = mean_slope, self.epoch
        if mean_slope > self.best * (1 + self.rel_increase):
            self.bad += 1
        else:
            self.bad = 0
        return self.bad >= self.patience
