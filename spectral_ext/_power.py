"""The power-iteration core shared by hessian.py, jacobian.py and slope.py.

A "vector" is a list of tensors (the Hessian's vectors are shaped like the parameters).  With
``batched=True`` every tensor has a leading batch dimension and each sample is its own vector
(per-sample norms, per-sample eigenvalues): that is how the Jacobian estimators run one power
iteration per input of a batch at once.

No host synchronisation unless a tolerance is given: then the relative change of the estimate is
read back every ``check_every`` iterations, the only sync.
"""

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

Vec = List[torch.Tensor]


def twice_differentiable():
    """Context for a forward pass whose graph will be differentiated twice (Hessian-vector and
    Jacobian-vector products): the fused attention kernels (flash, memory-efficient, cuDNN) have
    no double backward on CUDA, so scaled_dot_product_attention runs its math kernel inside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


class PowerResult(NamedTuple):
    value: torch.Tensor      # the dominant |eigenvalue| estimate: 0-d, or [B] when batched
    vector: Vec              # the unit eigenvector estimate (per sample when batched)
    iterations: int          # operator applications made


def sq_norm(v: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    if batched:
        return sum(t.reshape(t.shape[0], -1).pow(2).sum(1) for t in v)
    return sum(t.pow(2).sum() for t in v)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    if batched:
        return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(a, b))
    return sum((x * y).sum() for x, y in zip(a, b))


def scale(v: Sequence[torch.Tensor], s: torch.Tensor, batched: bool = False) -> Vec:
    """v * s, with s 0-d, or [B] applied per sample."""
    if batched:
        return [t * s.reshape((-1,) + (1,) * (t.dim() - 1)).to(t.dtype) for t in v]
    return [t * s.to(t.dtype) for t in v]


def normalize(v: Sequence[torch.Tensor], batched: bool = False):
    """(v / ||v||, ||v||); a zero vector stays zero."""
    n = sq_norm(v, batched).sqrt()
    inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
    return scale(v, inv, batched), n


def random_like(v: Sequence[torch.Tensor], batched: bool = False,
                generator: Optional[torch.Generator] = None) -> Vec:
    """A random unit vector shaped like v (drawn on the CPU if a generator is given, so a seed
    gives the same vector on every device)."""
    if generator is None:
        r = [torch.randn_like(t) for t in v]
    else:
        r = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in v]
    return normalize(r, batched)[0]


def _converged(value, prev, tol) -> bool:
    change = ((value - prev).abs() / value.abs().clamp_min(torch.finfo(value.dtype).tiny)).max()
    return bool(change <= tol)   # the one host sync of a check


CRITERIA = ("change", "residual")


def residual(v: Sequence[torch.Tensor], w: Sequence[torch.Tensor], batched: bool = False):
    """(q, r) for a unit vector v and w = A v: the Rayleigh quotient q = v^T A v (signed) and
    the relative residual r = ||A v - q v|| / |q| (inf where q = 0).  r <= tol is the
    convergence test of Sandler et al.'s eigenvalue estimate (r = 0 exactly at an eigenvector)."""
    q = dot(v, w, batched)
    res = sq_norm([a - b * (q.reshape((-1,) + (1,) * (b.dim() - 1)) if batched else q).to(b.dtype)
                   for a, b in zip(w, v)], batched).sqrt()
    r = torch.where(q != 0, res / q.abs().clamp_min(torch.finfo(q.dtype).tiny),
                    torch.full_like(res, float("inf")))
    return q, r


def power_iteration(matvec: Callable[[Vec], Vec], v0: Sequence[torch.Tensor], n_iter: int,
                    tol: Optional[float] = None, check_every: int = 5,
                    batched: bool = False, criterion: str = "change") -> PowerResult:
    """Power iteration for the eigenvalue of largest magnitude of a symmetric operator.

    Each step: w = A v, value = ||w|| (v is a unit vector, so ||A v|| -> |lambda|max), v = w /
    ||w||.  Stops after n_iter steps, or earlier when a tolerance is given and the test passes
    (checked every check_every steps; when batched, the worst sample decides):
    ``criterion="change"``: the relative change of the value between two consecutive steps is
    <= tol; ``"residual"``: ||A v - (v^T A v) v|| <= tol * |v^T A v| for the v just multiplied
    (see :func:`residual`).  A sample whose A v is zero keeps its v.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    v = normalize(v0, batched)[0]
    value = prev = None
    it = 0
    for it in range(1, n_iter + 1):
        w = matvec(v)
        check = tol is not None and it % check_every == 0
        if check and criterion == "residual":
            converged = bool((residual(v, w, batched)[1] <= tol).all())   # the check's sync
        w_unit, value = normalize(w, batched)
        keep = value > 0
        v = [torch.where(keep.reshape((-1,) + (1,) * (a.dim() - 1)) if batched else keep, a, b)
             for a, b in zip(w_unit, v)]
        if check and criterion == "residual":
            if converged:
                break
        elif check and prev is not None and _converged(value, prev, tol):
            break
        prev = value
    return PowerResult(value.detach(), [t.detach() for t in v], it)


def lanczos(matvec: Callable[[Vec], Vec], v0: Sequence[torch.Tensor], n_iter: int,
            tol: Optional[float] = None, check_every: int = 5) -> PowerResult:
    """Lanczos with full reorthogonalization for the eigenvalue of largest magnitude of a
    symmetric operator (not batched).  n_iter operator applications build an n_iter x n_iter
    tridiagonal T whose extreme Ritz values converge much faster than power iteration; the
    value is max |theta| and the vector its Ritz vector.  Keeps n_iter vectors in memory.  With a
    tolerance, the Ritz value is compared every check_every steps (an eigvalsh of T, a sync)."""
    q = normalize(v0)[0]
    Q, alphas, betas = [q], [], []
    q_prev, beta = None, None
    prev = None
    for j in range(n_iter):
        w = matvec(q)
        alpha = dot(w, q)
        w = [a - alpha.to(a.dtype) * b for a, b in zip(w, q)]
        if q_prev is not None:
            w = [a - beta.to(a.dtype) * b for a, b in zip(w, q_prev)]
        for qi in Q:   # full reorthogonalization (keeps the Ritz values free of ghosts)
            c = dot(w, qi)
            w = [a - c.to(a.dtype) * b for a, b in zip(w, qi)]
        alphas.append(alpha)
        if tol is not None and (j + 1) % check_every == 0:
            value = _ritz(alphas, betas)[0]
            if prev is not None and _converged(value, prev, tol):
                break
            prev = value
        if j + 1 < n_iter:
            q_prev = q
            q, beta = normalize(w)    # a breakdown (beta = 0) gives q = 0: T gains zero rows
            betas.append(beta)
            Q.append(q)
    value, y = _ritz(alphas, betas)
    vec = [sum(y[i].to(Q[i][k].dtype) * Q[i][k] for i in range(len(alphas)))
           for k in range(len(q))]
    return PowerResult(value.detach(), normalize([t.detach() for t in vec])[0], len(alphas))


def tridiagonal_eigh(alphas, betas):
    """(eigenvalues ascending, eigenvectors) of the Lanczos tridiagonal T (alphas on the
    diagonal, betas beside it), in float64."""
    k = len(alphas)
    T = torch.diag(torch.stack(alphas).double())
    if k > 1:
        off = torch.stack(betas[:k - 1]).double()
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(T)


def _ritz(alphas, betas):
    """max |theta| of the tridiagonal T (alphas on the diagonal, betas beside it) and its
    eigenvector, in float64."""
    theta, Y = tridiagonal_eigh(alphas, betas)
    i = theta.abs().argmax()
    return theta[i].abs(), Y[:, i]
