"""The cost of one iteration of the related estimators (spectral_ext.hessian / jacobian) relative
to one forward+backward pass of the model they measure.

- 'fwd+bwd': the loss and its gradient with respect to the parameters (a training step's work);
- 'hvp': one Hessian-vector product (one power/Lanczos iteration of hessian.spectral_radius)
  through the gradient graph built once with create_graph=True;
- 'jvp+vjp': one J^T J v product (one iteration of jacobian.spectral_norm: a JVP as the
  derivative of a VJP, then a VJP) through the graph of one forward pass.
The graphs are built once outside the timed calls, as the estimators do across iterations."""

from typing import Callable, Dict

import torch
from torch import nn

from spectral_ext import _power, hessian, jacobian

from . import step


def estimator_impls(model_name: str, device) -> Dict[str, Callable[[], object]]:
    model, x, y = step.build(model_name, device)
    params = list(model.parameters())
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
    with _power.twice_differentiable():   # the HVP differentiates this graph again
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    hvp = hessian.hvp_operator(grads, params)
    v = _power.random_like(params)
    ops = jacobian.JacobianOperators(model, x)
    vx = _power.random_like([x], batched=True)
    return {
        "fwd+bwd": lambda: torch.autograd.grad(loss_fn(), params),
        "hvp": lambda: hvp(v),
        "jvp+vjp": lambda: ops.jtj(vx),
    }
