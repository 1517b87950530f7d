"""spectral_ext: fused spectral norm regularization for PyTorch.

Spectral norm regularization (Yoshida & Miyato 2017, arXiv:1705.10941) penalizes
lam/2 * sum_l sigma(W_l)^2; each step runs one power iteration per layer, reusing the previous
vector, and adds lam * sigma * u v^T to each weight's gradient.  ``fused_step`` does this for all
layers in one call.

The related methods, each an estimator and a regularizer on one power-iteration core:
``hessian`` (spectral radius of the loss Hessian), ``jacobian`` (exact spectral norm of the
input-output Jacobian) and ``slope`` (the slope of a network).  ``conv`` computes the norm of a
convolution as a linear map on its input (``conv_operator_norm``; the regularizer's
``conv_norm="operator"``).
"""

from . import _ops  # noqa: F401  (defines the torch.library ops and loads the kernels)
from . import conv, hessian, jacobian, reference, slope
from .conv import conv_norm_report, conv_operator_norm
from .functional import (BACKENDS, Backend, available_backends, cuda_launch_mode, fused_step,
                         resolve_backend, set_cuda_launch_mode, spectral_norms,
                         spectral_norms_with_vectors)
from .reference import init_vectors
from .regularizer import DEFAULT_MODULE_TYPES, SpectralNormRegularizer, collect_weights

__version__ = "0.1.0"

__all__ = [
    "fused_step", "spectral_norms", "spectral_norms_with_vectors", "available_backends",
    "resolve_backend", "Backend", "BACKENDS", "init_vectors", "reference",
    "set_cuda_launch_mode", "cuda_launch_mode",
    "SpectralNormRegularizer", "DEFAULT_MODULE_TYPES", "collect_weights",
    "hessian", "jacobian", "slope", "conv", "conv_operator_norm", "conv_norm_report",
]
