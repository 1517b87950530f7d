"""The slope of a network (Johansson et al., arXiv:2107.01473): how steeply a classifier's
output changes with its input, at each input; its distribution over a dataset; how much it varies
around an input; a loss term and an early-stopping criterion.

Definition.  The slope at x is the largest singular value of the Jacobian of the network's
outputs (the logits of a classifier, not the softmax) with respect to its input,
sigma_max(J(x)), as the authors' code computes it (github.com/antonFJohansson/
slope_and_generalization, ``experiment_code/geometric.py``: ``get_jacobian``, one backward per
output, and ``get_sing``, sqrt of the largest eigenvalue of J^T J; read for this).  For one
output it is the gradient norm ||grad_x f(x)||.  For a ReLU network, which is affine on each
linear region, it is the norm of that region's linear map.  It is computed exactly for up to
``exact_max_outputs`` outputs (K VJPs, then ``svdvals``) and by power iteration on J^T J beyond
(``method`` picks).  ``center=True`` (an option, not the paper's) takes sigma_max(P J) with
P = I - 1 1^T / K instead, the stretch the softmax can see (adding a constant to every logit
changes no probability).

:func:`local_variation` is the paper's measure of how constant the slope is near an input:
|s(x) - s(x + r u)| / s(x) for random unit directions u and radii r.  :func:`slope_loss` (a
training penalty) and :class:`SlopeEarlyStopping` are uses of the slope that the paper discusses,
not experiments it ran.
"""

from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch

from . import _checks, _power
from .jacobian import JacobianOperators, _check_input, _forward, _rows, _top_singular

__all__ = ["slope", "slope_loss", "local_variation", "SlopeStats", "distribution",
           "SlopeEarlyStopping", "METHODS"]

METHODS = ("auto", "exact", "power")


def _centered(model: Callable, center: bool) -> Callable:
    def fn(x):
        y = model(x)
        y = y.reshape(y.shape[0], -1)
        return y - y.mean(1, keepdim=True) if center and y.shape[1] > 1 else y
    return fn


def _check_method(method, exact_max_outputs):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(exact_max_outputs, bool) or not isinstance(exact_max_outputs, int) or \
            exact_max_outputs < 1:
        raise ValueError(f"exact_max_outputs must be a positive int, got {exact_max_outputs!r}")


def _use_exact(method: str, outputs: int, exact_max_outputs: int) -> bool:
    return method == "exact" or (method == "auto" and outputs <= exact_max_outputs)


def slope(model: Callable, x: torch.Tensor, n_iter: int = 20, tol: Optional[float] = None,
          center: bool = False, method: str = "auto", exact_max_outputs: int = 32
          ) -> torch.Tensor:
    """The slope at each input: a [B] tensor (no gradient).  ``method="exact"`` (or "auto"
    with at most exact_max_outputs outputs): K VJPs and ``svdvals``, exact to rounding.
    ``"power"`` (or "auto" beyond): n_iter power iterations per sample, exact at convergence;
    tol stops early (a host sync per check).  One output: the gradient norm."""
    _checks.check_n_iter(n_iter)
    _checks.check_optional_positive("tol", tol)
    _check_method(method, exact_max_outputs)
    fn = _centered(model, center)
    xr, y = _forward(fn, _check_input(x))
    if _use_exact(method, y.shape[1], exact_max_outputs):
        return torch.linalg.svdvals(_rows(xr, y, False))[:, 0].detach()
    return _top_singular(JacobianOperators(fn, x, (xr, y)), n_iter, None, tol, 5)[0]


def slope_loss(model: Callable, x: torch.Tensor, n_iter: int = 10, center: bool = False,
               power: int = 2, method: str = "auto", exact_max_outputs: int = 32
               ) -> torch.Tensor:
    """mean_i slope(x_i)^power, differentiable with respect to the model's parameters: a loss
    term (multiply by a weight and add it to the training loss).  Exact (see :func:`slope`):
    through ``svdvals`` of the Jacobian built with create_graph; power iteration: u^T J v with
    the singular vectors of n_iter iterations held fixed, as the Jacobian regularizer does."""
    _checks.check_n_iter(n_iter)
    _check_method(method, exact_max_outputs)
    fn = _centered(model, center)
    xr, y = _forward(fn, _check_input(x))
    if _use_exact(method, y.shape[1], exact_max_outputs):
        s = torch.linalg.svdvals(_rows(xr, y, True))[:, 0]
        return s.pow(power).mean()
    ops = JacobianOperators(fn, x, (xr, y))
    _, u, v, _ = _top_singular(ops, n_iter, None, None, 1)
    return ops.fixed_vector_sigma(u, v).abs().pow(power).mean()


def local_variation(model: Callable, x: torch.Tensor, radii: Sequence[float] = (0.1, 1.0),
                    n_directions: int = 8, center: bool = False, method: str = "auto",
                    n_iter: int = 20, generator: Optional[torch.Generator] = None
                    ) -> torch.Tensor:
    """How much the slope changes near each input: a [B, len(radii), n_directions] tensor of
    |s(x) - s(x + r u)| / s(x), with u drawn uniformly on the unit sphere of the input space
    (all of a sample's input dimensions, Euclidean norm) independently per sample and direction,
    and s the slope (:func:`slope`, same center/method).  NaN where s(x) = 0.  Draws u on the
    CPU when a generator is given (the same directions on every device)."""
    x = _check_input(x)
    radii = [float(r) for r in radii]
    if not radii or any(not r > 0 for r in radii):
        raise ValueError(f"radii must be a non-empty list of positive numbers, got {radii!r}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive int, got {n_directions!r}")
    s0 = slope(model, x, n_iter=n_iter, center=center, method=method)
    out = torch.empty((x.shape[0], len(radii), n_directions), dtype=s0.dtype, device=s0.device)
    for j, r in enumerate(radii):
        for d in range(n_directions):
            u = _power.random_like([x.detach()], batched=True, generator=generator)[0]
            s1 = slope(model, x.detach() + r * u, n_iter=n_iter, center=center, method=method)
            out[:, j, d] = (s0 - s1).abs() / s0
    return torch.where(s0.reshape(-1, 1, 1) > 0, out, torch.full_like(out, float("nan")))


class SlopeStats(NamedTuple):
    values: torch.Tensor            # the slope at every input, [N]
    mean: float
    quantiles: dict                 # q -> value, for the requested quantiles
    histogram: tuple                # (counts [bins], edges [bins + 1])


def distribution(model: Callable, data: Union[torch.Tensor, Iterable], n_iter: int = 20,
                 center: bool = False, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
                 bins: int = 30, method: str = "auto") -> SlopeStats:
    """The slope over a dataset: ``data`` is a tensor of inputs or an iterable of batches
    (tensors, or tuples whose first item is the inputs, as a DataLoader yields).  For
    monitoring, outside the training step: the summary reads values back to the host."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    values: List[torch.Tensor] = []
    for b in batches:
        xb = b[0] if isinstance(b, (tuple, list)) else b
        values.append(slope(model, xb, n_iter=n_iter, center=center, method=method))
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
    A use that arXiv:2107.01473 discusses, not an experiment it ran.
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
