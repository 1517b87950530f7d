"""``SpectralNormRegularizer``: the nn.Module users hold.

    reg = SpectralNormRegularizer(model, lam=0.01)
    loss.backward(); reg.step(); optimizer.step()     # fused: adds lam*sigma*u v^T to each .grad
    # or, differentiable:  loss = loss + reg.penalty(); loss.backward()

Which weights: the ``weight`` of every module of ``include_types`` (default: Linear, Conv1d/2d/3d
and ConvTranspose1d/2d/3d) that requires grad; biases, norms and embeddings are not collected
unless asked for.  Tied weights (one Parameter in several modules) are collected once, under the
first name.

Matricization: every weight is matricized along dim 0 as stored, ``W.reshape(W.shape[0], -1)``.
For Conv that is out x in*kh*kw, as in the paper.  For ConvTranspose the stored weight is
in x out/groups x kh x kw, so the matrix is in x out*kh*kw: ConvTranspose(in -> out) is the
adjoint of the Conv(out -> in) whose weight it stores, and an operator and its adjoint have the
same norm, so this is the paper's matricization of that Conv; it also needs no copy.  (PyTorch's
``spectral_norm`` uses dim=1 for ConvTranspose, i.e. out x in*kh*kw: a different matrix.)

State: one persistent vector per weight, kept as buffers under ``vectors.<name with / for .>``,
plus the last sigmas (``last_sigma``), so ``state_dict()`` / ``load_state_dict()`` resume
bit-identically.  The vectors follow ``.to(device)``; they stay float32 (or float64) whatever dtype
the module is cast to, since a bfloat16 vector would lose the power iteration's precision.
The regularizer does not own the model: move it with ``reg.to(device)`` when you move the model.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from . import _checks
from .functional import fused_step, resolve_backend, spectral_norms
from .reference import init_vectors

__all__ = ["SpectralNormRegularizer", "DEFAULT_MODULE_TYPES"]

DEFAULT_MODULE_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def collect_weights(model: nn.Module, include_types: Sequence[type] = DEFAULT_MODULE_TYPES,
                    exclude_types: Sequence[type] = (),
                    include_names: Optional[Sequence[str]] = None,
                    exclude_names: Optional[Sequence[str]] = None
                    ) -> List[Tuple[str, nn.Parameter]]:
    """(name, weight) pairs the regularizer would hold; see the module docstring for the rules.

    ``include_names`` / ``exclude_names`` are regular expressions searched in the parameter's
    qualified name (e.g. ``"features.0.weight"``): with include_names, only matching weights are
    collected; exclude_names drops matching ones.
    """
    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, tuple(include_types)) or isinstance(mod, tuple(exclude_types)):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad or id(w) in seen:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if include_names is not None and not _matches(name, include_names):
            continue
        if _matches(name, exclude_names):
            continue
        if w.dim() < 2:
            raise ValueError(f"{name} ({type(mod).__name__}) has shape {tuple(w.shape)}: a spectral "
                             "norm needs a weight with at least 2 dimensions; exclude this module")
        seen.add(id(w))
        out.append((name, w))
    return out


class SpectralNormRegularizer(nn.Module):
    """Spectral norm regularization of every collected weight of ``model``.

    Args:
        model: the network whose weights are regularized (not registered as a submodule).
        lam: the coefficient of lam/2 * sum sigma^2.
        n_iter: power iterations per step (1 reuses last step's vector, as in the paper).
        include_types / exclude_types: module types whose ``weight`` is (not) collected.
        include_names / exclude_names: regular expressions on parameter names.
        seed: seed of the generator the initial vectors are drawn from.
        backend: "auto", "reference", "cpu", "cuda" or "triton" (see
            ``spectral_ext.available_backends()``).
    """

    def __init__(self, model: nn.Module, lam: float = 0.01, n_iter: int = 1, *,
                 include_types: Sequence[type] = DEFAULT_MODULE_TYPES,
                 exclude_types: Sequence[type] = (),
                 include_names: Optional[Sequence[str]] = None,
                 exclude_names: Optional[Sequence[str]] = None,
                 seed: int = 0, backend: str = "auto"):
        super().__init__()
        self.lam = _checks.check_lam(lam)
        self.n_iter = _checks.check_n_iter(n_iter)
        resolve_backend([], backend)  # rejects an unknown name now rather than at the first step
        self.backend = backend
        pairs = collect_weights(model, include_types, exclude_types, include_names, exclude_names)
        if not pairs:
            raise ValueError("SpectralNormRegularizer found no weight to regularize in the model "
                             "(check include_types / include_names / requires_grad)")
        self.names: List[str] = [n for n, _ in pairs]
        # plain list: the model's Parameters are referenced, not registered (no double state_dict)
        self._weights: List[nn.Parameter] = [w for _, w in pairs]
        self._keys = [n.replace(".", "/") for n in self.names]
        self.vectors = nn.Module()
        for key, v in zip(self._keys, init_vectors(self._weights, seed=seed)):
            self.vectors.register_buffer(key, v)
        self.register_buffer("last_sigma", torch.zeros(
            len(pairs), dtype=_checks.sigma_dtype(self._weights), device=self._weights[0].device))

    # ---- state ----------------------------------------------------------------------------------

    @property
    def weights(self) -> List[nn.Parameter]:
        return list(self._weights)

    def vs(self) -> List[torch.Tensor]:
        """The persistent vectors, in the order of ``names``."""
        bufs = self.vectors._buffers
        return [bufs[k] for k in self._keys]

    def _apply(self, fn, recurse=True):
        # Follow device moves, but never let a cast (.half(), .to(bfloat16)) degrade the vectors.
        def keep_precision(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype not in _checks.VECTOR_DTYPES:
                out = t.to(device=out.device)
            return out
        return super()._apply(keep_precision, recurse)

    def _check_device(self):
        wdev = self._weights[0].device
        if self.last_sigma.device != wdev:
            raise RuntimeError(f"the regularizer's vectors are on {self.last_sigma.device} but the "
                               f"model's weights are on {wdev}: call reg.to({str(wdev)!r})")

    @property
    def active_backend(self) -> str:
        """The backend ``step()`` runs with for the weights as they are now."""
        return resolve_backend(self._weights, self.backend)

    # ---- the two ways to use it ---------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """After ``loss.backward()``: one fused step; adds lam*sigma*u v^T to each weight's
        ``.grad`` (created if None) and returns sigma per weight.  No host synchronisation.
        With AMP's GradScaler, call it after ``scaler.unscale_(optimizer)``."""
        self._check_device()
        sig = fused_step(self._weights, self.vs(), lam=self.lam, n_iter=self.n_iter,
                         backend=self.backend)
        self.last_sigma.copy_(sig)
        return sig

    def penalty(self) -> torch.Tensor:
        """The differentiable penalty lam/2 * sum sigma^2 (one power iteration per call, vectors
        updated); add it to the loss instead of calling ``step()``."""
        self._check_device()
        sig = spectral_norms(self._weights, self.vs(), self.n_iter, backend=self.backend)
        with torch.no_grad():
            self.last_sigma.copy_(sig)
        return self.lam / 2 * (sig * sig).sum()

    # ---- monitoring ---------------------------------------------------------------------------

    def sigmas(self) -> torch.Tensor:
        """The estimates of the last step (a copy)."""
        return self.last_sigma.clone()

    @torch.no_grad()
    def exact_sigmas(self) -> torch.Tensor:
        """The exact largest singular value of each matricized weight, by SVD (for monitoring;
        costly on large layers)."""
        return torch.stack([
            torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).to(_checks.acc_dtype(w.dtype)), ord=2)
            .to(self.last_sigma.dtype) for w in self._weights])

    def extra_repr(self) -> str:
        return (f"{len(self._weights)} weights, lam={self.lam}, n_iter={self.n_iter}, "
                f"backend={self.backend!r}")
