"""``SpectralNormRegularizer``: the nn.Module users hold.

    reg = SpectralNormRegularizer(model, lam=0.01)
    loss.backward(); reg.step(); optimizer.step()     # fused: adds lam*sigma*u v^T to each .grad
    # or, differentiable:  loss = loss + reg.penalty(); loss.backward()

Which weights (``collect_weights``): by default the weight matrices of every module of
``DEFAULT_MODULE_TYPES``: ``weight`` of Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d, every
``weight_*`` matrix of RNN/LSTM/GRU (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...), and
MultiheadAttention's ``in_proj_weight`` (or ``q/k/v_proj_weight``; its ``out_proj`` is a
Linear).  Biases, norms and embeddings are not collected unless asked for (``include_types``
with nn.Embedding; ``include_params`` for any parameter by name).  Tied weights (one Parameter in
several modules) are collected once, under the first name.  Parametrized weights
(``torch.nn.utils.parametrize``: weight_norm, orthogonal, ...) are regularized through their
parametrization: the gradient reaches the underlying parameters.

Matricization: every weight is matricized along dim 0 as stored, ``W.reshape(W.shape[0], -1)``.
For Conv that is out x in*kh*kw, as in the paper.  For ConvTranspose the stored weight is
in x out/groups x kh x kw, so the matrix is in x out*kh*kw: ConvTranspose(in -> out) is the
adjoint of the Conv(out -> in) whose weight it stores, and an operator and its adjoint have the
same norm, so this is the paper's matricization of that Conv; it also needs no copy.  (PyTorch's
``spectral_norm`` uses dim=1 for ConvTranspose, i.e. out x in*kh*kw: a different matrix.)

The regularizer follows the model.  It keeps the parameter *names* and a reference to the
model (not registered as a submodule: the model's weights are not in the regularizer's
state_dict), and before each ``step()`` / ``penalty()`` checks (one identity test per weight) that each
name still holds the Parameter it saw.  When one was replaced (``fully_shard``, ``to_empty``,
``load_state_dict(assign=True)``, a parametrization registered later, a submodule swapped) it
binds the new one and keeps its vector if the full matrix shape is unchanged; a name that no
longer resolves, or a shape that changed, raises an error saying so.  Vectors follow the weights'
device (a vector left on the meta device is drawn again from the seed).  Weights with
``requires_grad=False`` are skipped (no ``.grad`` is created): ``covered_names()`` lists what a
step covers.  ``copy.deepcopy(reg)`` follows the same model; ``reg.attach(other_model)`` binds
another model with the same weights (a deep copy of the model, say).

State: one persistent vector per weight, kept as buffers under ``vectors.<name with / for .>``,
plus the last sigmas (``last_sigma``), so ``state_dict()`` / ``load_state_dict()`` resume
bit-identically.  The vectors stay float32 (or float64) whatever dtype the module is cast to,
since a bfloat16 vector would lose the power iteration's precision.
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _checks, _ops, conv as _conv
from . import distributed as _distributed
from .distributed import is_dtensor
from .functional import fused_step, make_step_plan, resolve_backend, spectral_norms
from .reference import init_vectors

__all__ = ["SpectralNormRegularizer", "DEFAULT_MODULE_TYPES", "collect_weights"]

DEFAULT_MODULE_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.RNNBase, nn.MultiheadAttention,
)

Patterns = Union[str, Iterable[str], None]


def _patterns(name: str, patterns: Patterns) -> List[str]:
    """A bare string is one pattern (not a sequence of one-character patterns)."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a regular expression or a list of them, "
                            f"got an element {p!r}")
    return out


def _matches(name: str, patterns: List[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _matrix_keys(mod: nn.Module) -> List[str]:
    """The names of the weight matrices a module type holds (parametrized ones included)."""
    if isinstance(mod, nn.RNNBase):
        return [k for k in mod._flat_weights_names if k.startswith("weight_")]
    if isinstance(mod, nn.MultiheadAttention):
        return [k for k in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if _has_tensor(mod, k)]
    return ["weight"] if _has_tensor(mod, "weight") else []


def _has_tensor(mod: nn.Module, key: str) -> bool:
    return parametrize.is_parametrized(mod, key) or isinstance(mod._parameters.get(key), nn.Parameter)


class _Site(NamedTuple):
    """Where a weight lives: module path and attribute (``name = path + "." + key``)."""
    name: str
    path: str
    key: str


def _split(name: str) -> Tuple[str, str]:
    path, _, key = name.rpartition(".")
    return path, key


def _lookup(mod: nn.Module, key: str) -> Tuple[Optional[torch.Tensor], bool]:
    """(the Parameter registered under key or None, whether key is parametrized)."""
    if parametrize.is_parametrized(mod, key):
        return None, True
    return mod._parameters.get(key), False


def _site_of(name: str) -> _Site:
    path, key = _split(name)
    return _Site(name, path, key)


def collect_weights(model: nn.Module, include_types: Sequence[type] = DEFAULT_MODULE_TYPES,
                    exclude_types: Sequence[type] = (),
                    include_names: Patterns = None, exclude_names: Patterns = None,
                    include_params: Patterns = None) -> List[Tuple[str, torch.Tensor]]:
    """(name, weight) pairs the regularizer would hold; see the module docstring for the rules.

    ``include_names`` / ``exclude_names`` are regular expressions (a bare string is one) searched
    in the qualified name (e.g. ``"features.0.weight"``): with include_names only matching
    weights are collected; exclude_names drops matching ones.  ``include_params`` adds any
    parameter whose name matches, whatever its module (it must have at least 2 dimensions).
    A parametrized weight is returned as its current value (``module.weight``, computed).
    """
    include_names = _patterns("include_names", include_names)
    exclude_names = _patterns("exclude_names", exclude_names)
    include_params = _patterns("include_params", include_params)
    out, seen = [], set()

    def add(name, mod, key, asked):
        p, parametrized = _lookup(mod, key)
        w = getattr(mod, key) if parametrized else p
        ident = id(mod.parametrizations[key]) if parametrized else id(p)
        if ident in seen or _matches(name, exclude_names):
            return
        if include_names and not asked and not _matches(name, include_names):
            return
        if w.dim() < 2:
            raise ValueError(f"{name} ({type(mod).__name__}) has shape {tuple(w.shape)}: a "
                             "spectral norm needs a weight with at least 2 dimensions; exclude "
                             "this module")
        seen.add(ident)
        out.append((name, w))

    for mod_name, mod in model.named_modules():
        if not isinstance(mod, tuple(include_types)) or isinstance(mod, tuple(exclude_types)):
            continue
        keys = _matrix_keys(mod)
        if not keys and isinstance(getattr(mod, "weight", None), torch.Tensor):
            # a weight that is not a Parameter: never skipped without a word
            name = f"{mod_name}.weight" if mod_name else "weight"
            if not _matches(name, exclude_names) and (not include_names
                                                      or _matches(name, include_names)):
                raise ValueError(f"{name} ({type(mod).__name__}) is not a Parameter: "
                                 f"{_not_a_parameter(mod, 'weight')}")
        for key in keys:
            add(f"{mod_name}.{key}" if mod_name else key, mod, key, False)
    if include_params:
        for mod_name, mod in model.named_modules():
            keys = [k for k, p in mod._parameters.items() if p is not None]
            if parametrize.is_parametrized(mod):
                keys += list(mod.parametrizations.keys())
            for key in keys:
                name = f"{mod_name}.{key}" if mod_name else key
                if _matches(name, include_params):
                    add(name, mod, key, True)
    return out


# Any Parameter or submodule registered through setattr/register_* anywhere bumps this counter,
# so a step notices a swapped submodule with one integer comparison; a Parameter replaced by
# writing module._parameters directly (fully_shard, to_empty) is caught by the identity test.
_GENERATION = [0]
_HOOKS: List = []


def _bump(*_args):
    _GENERATION[0] += 1


def _install_hooks():
    if not _HOOKS:
        from torch.nn.modules import module as _module
        _HOOKS.append(_module.register_module_parameter_registration_hook(_bump))
        _HOOKS.append(_module.register_module_module_registration_hook(_bump))


_requires_grad = operator.attrgetter("requires_grad")


def _all_require_grad(params) -> bool:
    if torch.compiler.is_compiling():     # Dynamo traces plain Python, not attrgetter
        return all(p.requires_grad for p in params)
    return all(map(_requires_grad, params))


def _dict_is(d, keys, values, in_c: bool = True) -> bool:
    """Whether d's items are, in order, keys (equal; None: not compared) -> values (the same
    objects).  In C (csrc/module.cpp, 1-2 ns per item; the Python form costs 5 us for 512
    items) where the extension is there, d is a plain dict and in_c (False while Dynamo
    traces: it cannot trace the C function)."""
    if in_c and _ops.dict_is is not None:
        same = _ops.dict_is(d, keys, values)
        if same is not None:
            return same
    return (len(d) == len(values) and (keys is None or list(d) == keys)
            and all(a is b for a, b in zip(d.values(), values)))


class _Binding:
    """The tensors the names resolve to now, and what a step needs of them.

    current() is the per-step test, in three parts, all metadata: no module was registered
    anywhere since (the hooks' generation counter); every module on the way from the model to
    a weight's module still has the same children under the same names (what ``del seq[0]`` or
    a direct ``parent._modules[name] = new`` change without any hook: compared as two lists of
    references per such module, a few microseconds); and each name still holds the same
    Parameter (what fully_shard and to_empty change).  A device move that keeps the Parameters
    (``model.to("cuda")`` sets ``param.data``) is caught by the device of the first and last
    weights."""

    def __init__(self, generation, params, mods, keys, parametrized, sharded, edges, probes):
        self.generation = generation
        self.params = params                # Parameter per weight; None where parametrized
        self.mods = mods                    # the owning modules
        self.dicts = [m._parameters for m in mods]
        self.keys = list(keys)
        self.parametrized = parametrized    # {index: module} of parametrized weights
        self.sharded = sharded              # indices of the weights that are DTensors now
        self.tree = edges                   # [(module, its child names, its children)]
        self.probes = probes                # [(Parameter, its device)] of the first and last
        # one fused_step call covers every weight (the common case: a fast path)
        self.uniform = not parametrized and len(sharded) in (0, len(params))

    def modules_current(self) -> bool:
        """No module registered since, and every module still where it was."""
        if self.generation != _GENERATION[0]:
            return False
        in_c = not torch.compiler.is_compiling()
        return all(_dict_is(mod._modules, names, children, in_c)
                   for mod, names, children in self.tree)

    def current(self) -> bool:
        if not self.modules_current():
            return False
        if any(p.device != d for p, d in self.probes):
            return False
        if torch.compiler.is_compiling():
            return all(d.get(k) is p for d, k, p in zip(self.dicts, self.keys, self.params))
        if _ops.lookups_are is not None:   # the same test in C (20 us for 512 in Python)
            return _ops.lookups_are(self.dicts, self.keys, self.params)
        return all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.params))


def _edges(model: nn.Module, sites: List[_Site]):
    """[(module, the names of its children, its children)] for every module on the way from the
    model down to a site's module, each once (what _Binding.modules_current compares)."""
    out, seen = [], set()
    for site in sites:
        mod = model
        for part in site.path.split(".") if site.path else ():
            if id(mod) not in seen:
                seen.add(id(mod))
                out.append((mod, list(mod._modules), list(mod._modules.values())))
            mod = mod._modules[part]
    return out


def _not_a_parameter(mod: nn.Module, key: str) -> str:
    """Why mod.key is not a Parameter, and what to do (an error message's second half)."""
    t = getattr(mod, key, None)
    if isinstance(t, torch.Tensor):
        if key + "_orig" in mod._parameters or key + "_v" in mod._parameters:
            return (f"it is a plain tensor computed by a forward pre-hook (the old "
                    f"torch.nn.utils.weight_norm / spectral_norm API, which leaves no Parameter "
                    f"named {key!r}): use torch.nn.utils.parametrizations.weight_norm / "
                    f"spectral_norm, whose weights are regularized through the parametrization, "
                    "or exclude this module")
        return (f"it is a {type(t).__name__} that is not a Parameter (a buffer or plain "
                "attribute): make it a Parameter, or exclude it")
    return "it is gone; build a new regularizer (and load its state if the weights are the same)"


class _ModelRef:
    """Holds the model outside nn.Module's registration (not a submodule, not in state_dict).

    After a deepcopy the model to follow is decided at the first use, not during the copy: a
    container that holds the regularizer before the model (``self.reg`` assigned before
    ``self.net``) copies the regularizer first, when the model's copy does not exist yet.  The
    deepcopy's memo is kept until then (it maps the originals to their copies): the model's copy
    if the same deepcopy made one, else the original model."""
    __slots__ = ("_model", "_memo")

    def __init__(self, model, memo=None):
        self._model = model
        self._memo = memo

    @property
    def model(self):
        if self._memo is not None:
            self._model = self._memo.get(id(self._model), self._model)
            self._memo = None
        return self._model

    def __deepcopy__(self, memo):
        return self


class SpectralNormRegularizer(nn.Module):
    """Spectral norm regularization of every collected weight of ``model``.

    Args:
        model: the network whose weights are regularized (referenced, not registered as a
            submodule).
        lam: the coefficient of lam/2 * sum sigma^2 (>= 0).
        n_iter: power iterations per step (1 reuses last step's vector, as in the paper).
        include_types / exclude_types: module types whose weight matrices are (not) collected.
        include_names / exclude_names: regular expressions on parameter names (a string is one).
        include_params: regular expressions; any parameter whose name matches is also collected.
        seed: seed of the generator the initial vectors are drawn from.
        backend: "auto", "reference", "cpu", "cuda" or "triton" (see
            ``spectral_ext.available_backends()``).
        conv_norm: "matricized" (the paper's: a conv weight as the out x in*kh*kw matrix) or
            "operator" (the norm of each conv as a linear map on its input; spectral_ext/conv.py).
        input_sizes: with conv_norm="operator", {conv module name or weight name:
            (channels, *spatial)}; convs not named get their size from the model's first forward
            (a hook records it and removes itself).
    """

    def __init__(self, model: nn.Module, lam: float = 0.01, n_iter: int = 1, *,
                 include_types: Sequence[type] = DEFAULT_MODULE_TYPES,
                 exclude_types: Sequence[type] = (),
                 include_names: Patterns = None, exclude_names: Patterns = None,
                 include_params: Patterns = None,
                 seed: int = 0, backend: str = "auto", conv_norm: str = "matricized",
                 input_sizes: Optional[Dict[str, Sequence[int]]] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.lam = _checks.check_lam(lam)
        self.n_iter = _checks.check_n_iter(n_iter)
        resolve_backend([], backend)  # rejects an unknown or unbuilt backend now
        self.backend = backend
        self.seed = seed
        if conv_norm not in ("matricized", "operator"):
            raise ValueError(f"conv_norm must be 'matricized' or 'operator', got {conv_norm!r}")
        if input_sizes is not None and conv_norm != "operator":
            raise ValueError("input_sizes is used only with conv_norm='operator'")
        self.conv_norm = conv_norm
        pairs = collect_weights(model, include_types, exclude_types, include_names, exclude_names,
                                include_params)
        if not pairs:
            raise ValueError("SpectralNormRegularizer found no weight to regularize in the model "
                             "(check include_types / include_names / include_params)")
        self.names: List[str] = [n for n, _ in pairs]
        self._sites = [_site_of(n) for n in self.names]
        self._keys = [n.replace(".", "/") for n in self.names]
        self._shapes = [_checks.matrix_shape(w) for _, w in pairs]
        self.vectors = nn.Module()
        for key, v in zip(self._keys, init_vectors([w for _, w in pairs], seed=seed)):
            self.vectors.register_buffer(key, v)
        weights = [w for _, w in pairs]
        self.register_buffer("last_sigma", torch.zeros(
            len(pairs), dtype=_checks.sigma_dtype(weights), device=weights[0].device))
        _install_hooks()
        self._model = _ModelRef(model)
        self._binding: Optional[_Binding] = None
        # (binding, backend, the vector buffers, plan, indices of its weights or None: all) of the
        # eager fast path (see _step_plan)
        self._plan_state: Optional[Tuple] = None
        self._index_cache: Dict[Tuple, torch.Tensor] = {}
        self._conv: Optional[_conv.OperatorMode] = None
        if conv_norm == "operator":      # input-shaped vectors, created once sizes are known
            self.operator_vectors = nn.Module()
            self._conv = _conv.OperatorMode(self, model, input_sizes)

    # ---- binding to the model ---------------------------------------------------------------

    def attach(self, model: nn.Module) -> "SpectralNormRegularizer":
        """Follow ``model`` from now on (e.g. a deep copy of the model this regularizer was built
        for); its weights must have the same names and matrix shapes."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        old_model, old_binding = self._model, self._binding
        self._model = _ModelRef(model)
        self._binding = None
        self._plan_state = None
        try:
            self._bind()
        except RuntimeError as exc:     # keep following the model it followed
            self._model, self._binding = old_model, old_binding
            raise RuntimeError(f"cannot attach this model: {exc}") from None
        if self._conv is not None:
            self._conv.watch(self, model)
        return self

    def _bind(self) -> _Binding:
        """The current binding, rebuilt (and the vectors moved) if anything changed."""
        b = self._binding
        if b is not None and b.current():
            return b
        model = self._model.model if self._model is not None else None
        if model is None:
            raise RuntimeError(
                "this SpectralNormRegularizer follows no model (it was unpickled, and a pickle "
                "keeps no model): call reg.attach(model) with the model to follow")
        generation = _GENERATION[0]
        # No module was registered or moved since the last binding: the module of every site is
        # the same object, so only its Parameter is read again (cheap: FSDP2 swaps sharded and
        # unsharded Parameters this way around each forward).  Otherwise resolve every name.
        same_modules = b is not None and b.modules_current()
        found = []
        for i, site in enumerate(self._sites):
            if same_modules:
                mod = b.mods[i]
            else:
                try:
                    mod = model.get_submodule(site.path) if site.path else model
                except AttributeError as exc:
                    raise RuntimeError(
                        f"{site.name} no longer resolves in the model ({exc}); the model's "
                        "structure changed after the regularizer was built: build a new "
                        "regularizer (and load its state if the weights are the same)") from None
            p, is_param = _lookup(mod, site.key)
            if is_param:
                w = getattr(mod, site.key)
            elif isinstance(p, nn.Parameter):
                w = p
            else:
                raise RuntimeError(f"{site.name} is no longer a parameter of the model: "
                                   f"{_not_a_parameter(mod, site.key)}")
            shape = _checks.matrix_shape(w)
            if shape != self._shapes[i]:
                raise RuntimeError(
                    f"{site.name} changed from a {self._shapes[i][0]} x {self._shapes[i][1]} to a "
                    f"{shape[0]} x {shape[1]} matrix after the regularizer was built, so its "
                    "vector no longer fits: build a new regularizer")
            found.append((mod, None if is_param else p, is_param, w))
        # tied after the regularizer was built (one Parameter under two names)
        seen = {}
        for i, (_, p, _, _) in enumerate(found):
            if p is not None and id(p) in seen:
                raise RuntimeError(
                    f"{self.names[seen[id(p)]]} and {self.names[i]} are now the same Parameter "
                    "(tied after the regularizer was built): build a new regularizer, which "
                    "collects a tied weight once")
            if p is not None:
                seen[id(p)] = i
        # every name resolved and fits: only now change anything
        params, mods, parametrized, sharded = [], [], {}, set()
        for i, (mod, p, is_param, w) in enumerate(found):
            self._follow_device(i, w)
            if is_param:
                parametrized[i] = mod
            if is_dtensor(w):
                sharded.add(i)
            params.append(p)
            mods.append(mod)
        device = found[0][3].device
        probes = [(p, p.device) for p in (params[0], params[-1]) if p is not None]
        self._binding = _Binding(generation, params, mods, [s.key for s in self._sites],
                                 parametrized, sharded, _edges(model, self._sites), probes)
        self._plan_state = None     # the plan holds the old tensors: drop it now
        if self.last_sigma.device != device:
            self.last_sigma = (torch.zeros_like(self.last_sigma, device=device)
                               if self.last_sigma.device.type == "meta"
                               else self.last_sigma.to(device))
        self._index_cache.clear()
        return self._binding

    def _follow_device(self, i: int, w: torch.Tensor) -> None:
        bufs = self.vectors._buffers
        v = bufs[self._keys[i]]
        if v.device == w.device:
            return
        if v.device.type == "meta":     # built on a meta model: no values to move, draw again
            shapes = [torch.zeros(()).expand(s) for s in self._shapes]   # no storage
            fresh = init_vectors(shapes, seed=self.seed)[i]
            bufs[self._keys[i]] = fresh.to(device=w.device, dtype=v.dtype)
        else:
            bufs[self._keys[i]] = v.to(w.device)

    def _weights_now(self, b: _Binding) -> List[torch.Tensor]:
        return [p if p is not None else getattr(b.parametrized[i], self._sites[i].key)
                for i, p in enumerate(b.params)]

    # ---- state ----------------------------------------------------------------------------------

    @property
    def weights(self) -> List[torch.Tensor]:
        """The weights the names resolve to now (a parametrized weight's current value)."""
        return self._weights_now(self._bind())

    def vs(self) -> List[torch.Tensor]:
        """The persistent vectors, in the order of ``names``."""
        bufs = self.vectors._buffers
        return [bufs[k] for k in self._keys]

    def covered_names(self) -> List[str]:
        """The names of the weights a step covers now: those that require grad."""
        return [self.names[i] for i in self._active(self._bind())]

    def _active(self, b: _Binding) -> List[int]:
        out = []
        for i, p in enumerate(b.params):
            if p is not None:
                if p.requires_grad:
                    out.append(i)
            elif any(t.requires_grad for t in
                     b.parametrized[i].parametrizations[self._sites[i].key].parameters()):
                out.append(i)
        return out

    def _apply(self, fn, recurse=True):
        # Follow device moves, but never let a cast (.half(), .to(bfloat16)) degrade the vectors.
        def keep_precision(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype not in _checks.VECTOR_DTYPES:
                out = t.to(device=out.device)
            return out
        self._plan_state = None     # the vectors are replaced
        return super()._apply(keep_precision, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Before anything is copied (the vectors load after this, in the child module): each
        # loaded vector must be finite and nonzero, or a power iteration from it never recovers
        # (a zero v would leave its layer unregularized for good).  Reads the values: a
        # synchronisation at load time, never in a step.
        for name, key in zip(self.names, self._keys):
            v = state_dict.get(f"{prefix}vectors.{key}")
            if v is None or v.device.type == "meta":
                continue
            n = float(torch.linalg.vector_norm(v.double()))
            if not 0 < n < float("inf"):
                raise ValueError(f"the loaded vector of {name} is {'zero' if n == 0 else 'not finite'}"
                                 ": a power iteration from it never recovers; load a valid state "
                                 "or build a new regularizer")
        if self._conv is not None:
            self._conv.before_load(self, state_dict, prefix)
        # A regularizer built on a meta-device model (then to_empty) still holds meta vectors:
        # copying into those is a no-op (torch only warns), and the first step would draw them
        # again from the seed, losing the checkpoint.  Give each one real storage first, on the
        # loaded tensor's device (the next step moves it to its weight's device).
        bufs = self.vectors._buffers
        for key in self._keys:
            v, new = bufs[key], state_dict.get(f"{prefix}vectors.{key}")
            if v.device.type == "meta" and isinstance(new, torch.Tensor) \
                    and new.device.type != "meta":
                bufs[key] = torch.empty(v.shape, dtype=v.dtype, device=new.device)
        new = state_dict.get(f"{prefix}last_sigma")
        if self.last_sigma.device.type == "meta" and isinstance(new, torch.Tensor) \
                and new.device.type != "meta":
            self.last_sigma = torch.empty_like(self.last_sigma, device=new.device)
        # the vectors may now be on another device than their weights: bind again at the next
        # step (which moves them)
        self._binding = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __deepcopy__(self, memo):
        # A copy follows the same model (the model is not copied with it), unless the same
        # deepcopy copies the model too, before or after the regularizer: then it follows the
        # model's copy (decided at its first use, _ModelRef).
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        model = self._model.model if self._model is not None else None
        for k, v in self.__dict__.items():
            if k == "_model":
                new.__dict__[k] = _ModelRef(model, memo) if model is not None else v
            elif k in ("_binding", "_plan_state"):
                new.__dict__[k] = None
            elif k == "_index_cache":
                new.__dict__[k] = {}
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def __getstate__(self):
        # pickling (torch.save(reg)) keeps no model: call attach(model) after loading
        state = self.__dict__.copy()
        state["_model"] = None
        state["_binding"] = None
        state["_plan_state"] = None
        state["_index_cache"] = {}
        return state

    @property
    def active_backend(self) -> str:
        """The backend ``step()`` runs with for the weights as they are now ("distributed" for
        DTensor weights: spectral_ext/distributed.py, whatever ``backend`` says)."""
        b = self._bind()
        if b.sharded:
            return "distributed"
        return resolve_backend(self.weights, self.backend)

    # ---- the two ways to use it ---------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """After ``loss.backward()``: one fused step; adds lam*sigma*u v^T to the gradient of
        each covered weight (``.grad``, created if None; through the parametrization for a
        parametrized weight) and returns sigma per covered weight, in the order of
        ``covered_names()`` (all names when every weight requires grad).  No host
        synchronisation.  With AMP's GradScaler, call it after ``scaler.unscale_(optimizer)``.
        Eager calls on the "cpu" and "cuda" backends run through a cached step plan
        (``functional.make_step_plan``; with frozen weights, a plan of the active ones): the
        same results, bit for bit, with the input checks repeated only when a tensor changed.  The plan references the weights, which makes
        ``torch.utils.swap_tensors`` refuse them: no plan is used while
        ``torch.__future__.set_swap_module_params_on_conversion(True)`` is set; set it before
        the first step (a plan made before is dropped by the next step)."""
        b = self._bind()
        if torch.__future__.get_swap_module_params_on_conversion():
            # Module._apply then swaps the Parameters (torch.utils.swap_tensors), which refuses
            # a weight that a plan references (csrc/step_plan.h): model.to() would fail
            self._plan_state = None
        elif self._conv is None and b.uniform and not torch.compiler.is_compiling():
            # Eager: the persistent plan where the backend has one (no tensor lists passed, no
            # checks repeated while nothing changed; bitwise the op's results); None where no
            # plan stepped (nothing done): then as below.
            sig = self._plan_step(b)
            if sig is not None:
                return sig
        vs = self.vs()
        if self._conv is not None:
            return self._operator_step(b, vs)
        if b.uniform and _all_require_grad(b.params):   # the common case: one call
            sig = fused_step(b.params, vs, lam=self.lam, n_iter=self.n_iter, backend=self.backend)
            self.last_sigma.copy_(sig)
            return sig
        active = self._active(b)
        order, parts = self._matricized_step(b, vs, active)
        return self._record(active, order, parts)

    def _check_sharded(self, groups, weights, vs, step: bool) -> None:
        """The DTensor groups' checks, before any group runs (a later group's error must not
        come after an earlier group changed gradients and vectors), with the weights' names in
        the message instead of their position in the group."""
        for (_, sharded), idx in groups:
            if not sharded:
                continue
            try:
                _distributed.check([weights[i] for i in idx], [vs[i] for i in idx], step=step)
            except (TypeError, ValueError) as exc:
                msg = re.sub(r"\b(weights|vs|grads)\[(\d+)\]",
                             lambda m: f"{m.group(1)}[{self.names[idx[int(m.group(2))]]!r}]",
                             str(exc))
                raise type(exc)(f"the sharded (DTensor) weights: {msg}") from None

    def _plan_step(self, b: _Binding) -> Optional[torch.Tensor]:
        """step() through a persistent plan (binding ``b``: uniform, eager): sigma per covered
        weight, last_sigma updated; None where no plan stepped, having done nothing.  Every
        weight requires grad (the common case): the plan of all weights.  Some are frozen: a
        plan of the active ones (the op path's results for them, bit for bit), kept while the
        same ones are active; the plan of all weights declines, having done nothing, as soon as
        it meets a frozen weight, and while a plan of the active ones is kept the active set is
        read anew every step (a weight unfrozen comes back)."""
        st = self._plan_state
        declined = False
        if st is None or st[4] is None:
            plan = self._step_plan(b)
            # (_ops.plan_step: plan.step without the custom-class method's overhead)
            sig = _ops.plan_step(plan, self.lam, self.n_iter) if plan is not None else None
            if sig is not None:
                self.last_sigma.copy_(sig)
                return sig
            if plan is None:
                return None
            declined = True     # a frozen weight, or another reason (the op path knows it)
        # the indices of the active weights (b is uniform: every site a Parameter); the cached
        # tuple itself while they are the same
        # (a plan exists, so the extension is there)
        active = _ops.requires_grad_indices(b.params, st[4] if st is not None else None)
        if not active or (declined and len(active) == len(b.params)):
            return None
        key = None if len(active) == len(b.params) else active
        plan = self._step_plan(b, key)
        sig = _ops.plan_step(plan, self.lam, self.n_iter) if plan is not None else None
        if sig is None or key is None:
            if sig is not None:
                self.last_sigma.copy_(sig)
            return sig
        return self._record(key, key, [sig])

    def _step_plan(self, b: _Binding, active: Optional[Tuple[int, ...]] = None):
        """The step plan (functional.make_step_plan) of the weights of binding ``b`` (those at
        the indices ``active``; None: all) and their vectors, built on first use and kept while
        all are the same objects: a rebinding (a Parameter replaced, attach,
        load_state_dict(assign=True), a submodule swapped) makes a new binding, and a vector
        replaced (reg.to(), load_state_dict(assign=True) on the regularizer, a device move, a
        write into ``vectors._buffers``) fails the identity test, made on the buffer dict's
        values in their order (no list of vectors built per step).  One plan is kept: asking for
        another set of weights replaces it.  None where there is no plan (another backend,
        DTensor weights)."""
        st = self._plan_state
        bufs = self.vectors._buffers
        if st is not None and st[0] is b and st[1] == self.backend and \
                st[4] == active and _dict_is(bufs, None, st[2]):
            return st[3]
        self._plan_state = None
        if b.sharded:
            return None
        weights, vs = b.params, self.vs()
        if active is not None:
            weights, vs = [weights[i] for i in active], [vs[i] for i in active]
        plan = make_step_plan(weights, vs, backend=self.backend)
        self._plan_state = (b, self.backend, list(bufs.values()), plan, active)
        return plan

    def _matricized_step(self, b: _Binding, vs, active: List[int]):
        order, parts = [], []
        groups = self._groups(b, active)
        if b.sharded:
            self._check_sharded(groups, self._weights_now(b), vs, step=True)
        for (para, _), idx in groups:
            if para:     # through the parametrization: autograd carries the gradient back
                with torch.enable_grad():
                    ws = [getattr(b.parametrized[i], self._sites[i].key) for i in idx]
                    sig = spectral_norms(ws, [vs[i] for i in idx], self.n_iter,
                                         backend=self.backend)
                    (self.lam / 2 * (sig * sig).sum()).backward(inputs=self._originals(b, idx))
                sig = sig.detach()
            else:
                sig = fused_step([b.params[i] for i in idx], [vs[i] for i in idx], lam=self.lam,
                                 n_iter=self.n_iter, backend=self.backend)
            order += idx
            parts.append(sig)
        return order, parts

    def _operator_step(self, b: _Binding, vs):
        """conv_norm="operator": convs by their operator norm (spectral_ext/conv.py), the other
        weights as in the matricized step.  The convs' plan is checked first, so an unknown
        input size raises before anything changes."""
        active = self._active(b)
        convs = [i for i in active if i in self._conv.set]
        groups = self._conv.plan(self, b, convs)
        order, parts = self._matricized_step(b, vs, [i for i in active if i not in self._conv.set])
        o, p = self._conv.step(self, b, groups)
        return self._record(active, order + o, parts + p)

    def penalty(self) -> torch.Tensor:
        """The differentiable penalty lam/2 * sum sigma^2 over the covered weights (one power
        iteration per call, vectors updated); add it to the loss instead of calling ``step()``.
        Under FSDP2 it may run while some weights are unsharded (plain tensors) and others
        sharded: each kind is computed on its own, both give the full matrices' norms."""
        b = self._bind()
        vs = self.vs()
        active = self._active(b)
        weights = self._weights_now(b)
        order, parts = [], []
        if self._conv is not None:     # conv_norm="operator": the convs by spectral_ext/conv.py
            convs = [i for i in active if i in self._conv.set]
            order, parts = self._conv.penalty_sigmas(self, b, self._conv.plan(self, b, convs),
                                                     weights)
            active_mat = [i for i in active if i not in self._conv.set]
        else:
            active_mat = active
        groups = self._groups(b, active_mat, by_parametrization=False)
        self._check_sharded(groups, weights, vs, step=False)
        for (_, sharded), idx in groups:
            parts.append(spectral_norms([weights[i] for i in idx], [vs[i] for i in idx],
                                        self.n_iter, backend=self.backend))
            order += idx
        sig = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else
                                                        self.last_sigma.new_zeros(0))
        with torch.no_grad():
            self._record(active, order, [sig.detach()])
        return self.lam / 2 * (sig * sig).sum()

    def _groups(self, b: _Binding, active: List[int], by_parametrization: bool = True):
        """The active weights grouped by how one call computes them: (parametrized, DTensor)."""
        groups: Dict[Tuple[bool, bool], List[int]] = {}
        for i in active:
            key = (by_parametrization and i in b.parametrized,
                   i in b.sharded if i not in b.parametrized
                   else is_dtensor(getattr(b.parametrized[i], self._sites[i].key)))
            groups.setdefault(key, []).append(i)
        return sorted(groups.items())

    def _originals(self, b: _Binding, idx: List[int]) -> List[torch.Tensor]:
        out = []
        for i in idx:
            plist = b.parametrized[i].parametrizations[self._sites[i].key]
            out += [t for t in plist.parameters() if t.requires_grad]
        return out

    def _record(self, active: List[int], order: List[int], parts: List[torch.Tensor]):
        """Store the sigmas computed for ``order`` (concatenated ``parts``) into last_sigma and
        return them in the order of ``active``."""
        if not parts:
            return self.last_sigma.new_empty((0,))
        sig = torch.cat([p.to(self.last_sigma.dtype) for p in parts]) if len(parts) > 1 \
            else parts[0].to(self.last_sigma.dtype)
        if order != active:
            pos = {i: k for k, i in enumerate(order)}
            sig = sig[self._index([pos[i] for i in active])]
        if len(active) == len(self.names):
            self.last_sigma.copy_(sig)
        else:
            self.last_sigma.index_copy_(0, self._index(active), sig)
        return sig

    def _index(self, idx: List[int]) -> torch.Tensor:
        key = tuple(idx)
        t = self._index_cache.get(key)
        if t is None or t.device != self.last_sigma.device:
            t = torch.tensor(idx, dtype=torch.long).to(self.last_sigma.device)
            self._index_cache[key] = t
        return t

    # ---- monitoring ---------------------------------------------------------------------------

    def sigmas(self) -> torch.Tensor:
        """The estimates of the last step (a copy; a weight not yet covered by a step is 0)."""
        return self.last_sigma.clone()

    @torch.no_grad()
    def exact_sigmas(self) -> torch.Tensor:
        """The exact largest singular value of each matricized weight, by SVD (for monitoring;
        costly on large layers).  With conv_norm="operator", a conv's entry is its converged
        operator norm instead (spectral_ext/conv.py, converged_norm: FFT where exact, else
        restarted Lanczos from its vector, in the weight's accumulation dtype)."""
        out = []
        b = self._bind()
        for i, w in enumerate(self._weights_now(b)):
            if self._conv is not None and i in self._conv.set:
                out.append(self._conv.exact_sigma(self, b, i, w).to(self.last_sigma.dtype))
                continue
            full = w.full_tensor() if hasattr(w, "full_tensor") else w
            m = full.reshape(full.shape[0], -1).to(_checks.acc_dtype(full.dtype))
            out.append(torch.linalg.matrix_norm(m, ord=2).to(self.last_sigma.dtype))
        return torch.stack(out)

    def extra_repr(self) -> str:
        return (f"{len(self.names)} weights, lam={self.lam}, n_iter={self.n_iter}, "
                f"backend={self.backend!r}" +
                (f", conv_norm='operator' ({len(self._conv.idx)} convs)" if self._conv else ""))
