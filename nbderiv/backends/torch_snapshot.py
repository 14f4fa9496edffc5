"""The state of a torch model, read in one walk: saved to be put back after a call
(:class:`TorchState`) and, from the same walk and the same copy of the values, the key that
tells :mod:`nbderiv.memo` whether the model is still exactly as it was (:func:`state_key`).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).train()
>>> saved = TorchState([net])
>>> _ = net(torch.randn(4, 2))  # a training-mode forward pass updates the statistics
>>> saved.restore()
>>> net[1].running_mean.tolist(), int(net[1].num_batches_tracked)
([0.0, 0.0], 0)
"""

from __future__ import annotations

import collections
import functools
import types

import torch

from ..errors import ModelTypeError
from ..wrapped import FRAMEWORK_PACKAGES, code_names, is_framework_object
from .torch_taylor import _GLOBAL_HOOKS

_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)
_OWN = ("_parameters", "_buffers", "_modules")
_STORES = frozenset({"_parameters", "_buffers"})
# what every nn.Module holds that cannot change its forward pass or its autodiff (state-dict
# hooks, bookkeeping); forward and backward hooks are kept
_IGNORED = frozenset(vars(torch.nn.Module())) - {
    "training", "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
    "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook"}
# hooks registered for every module: forward ones change outputs, backward ones gradients
_GLOBAL = _GLOBAL_HOOKS + ("_global_backward_hooks", "_global_backward_pre_hooks",
                           "_global_forward_hooks_with_kwargs")
_CONTAINERS = frozenset({dict, list, tuple, collections.OrderedDict})
_CONTAINER_MAX = 64  # lists and dicts of settings compared by value up to this size
_SIDE_BY_SIDE = 1 << 18  # float values fingerprinted side by side (2 MB in float64, ~4 ms at most)


class TorchState:
    """Every module of the roots (also those kept in plain lists, dicts or attributes), read
    in one walk: training flags, parameters and buffers (their values, in one copy per dtype
    and device, and the objects registered), ``.grad`` and ``requires_grad``, saved to be put
    back by :meth:`restore` (tensors written back only where they changed: no needless
    version-counter bumps). :meth:`key` is the state key of the same walk. A lazy module not
    yet initialised is refused (its first call would initialise it for good)."""

    def __init__(self, roots, copy=True):
        self.roots = list(roots)
        self.modes, self.registered, self.params = [], [], []
        self._key, self.objects = None, []
        found = {}  # id -> tensor: registered ones and tensors held in attributes
        try:
            self.parts = _walk(self, found)
        except ModelTypeError:
            raise
        except Exception:  # e.g. inference tensors keep no version counter: no key
            self.modes, self.registered, self.params, found = [], [], [], {}
            self.parts, self.objects = None, []
            _plain_walk(self, found)
        self.found = list(found.values())
        unique = {id(t): t for _, _, t in self.registered}  # tied tensors once
        self.saved = _Saved(list(unique.values())) if copy else None

    def key(self) -> tuple:
        """(key, objects) for :mod:`nbderiv.memo` (see :func:`state_key`), or (None, ())."""
        if self._key is None:
            if self.parts is None:
                self._key = (None, ())
            else:
                try:
                    values = _values(self.found, self.saved)
                except Exception:
                    self._key = (None, ())
                else:
                    self._key = (tuple(self.parts) + (values,), self.objects)
        return self._key

    def restore(self):
        with torch.no_grad():
            for store, name, t in self.registered:
                if store.get(name) is not t:  # replaced (or deleted) inside forward
                    store[name] = t
            self.saved.put_back()
            for p, requires_grad, grad, value in self.params:
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad
                if grad is not None:
                    _put_back(grad, value)
        for m, mode in self.modes:
            if m.training is not mode:  # (nn.Module's __setattr__ is slow)
                m.training = mode


def _walk(state, found) -> list:
    """The key's parts, one per module in the order walked (breadth first from the roots,
    modules found in containers and attributes queued too); fills ``state``'s training flags,
    registered tensors and parameters, and ``found`` with every tensor met."""
    module = torch.nn.modules.module
    parts = [tuple(tuple(getattr(module, name, None) or ()) for name in _GLOBAL)]
    objects = state.objects
    lazy = torch.nn.modules.lazy.LazyModuleMixin
    todo, seen, i = list(state.roots), set(), 0
    while i < len(todo):
        m = todo[i]
        i += 1
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, lazy) and m.has_uninitialized_params():
            raise _uninitialised(state.roots, m)
        state.modes.append((m, m.training))
        settings = []
        for name, value in vars(m).items():
            kind = type(value)
            if kind in _PLAIN_TYPES:  # the common cases first: a number, a flag
                settings.append((name, value))
            elif name in _IGNORED:
                continue
            elif name in _STORES:
                settings.append((name, _store(state, value, objects, found)))
            elif name == "_modules":
                todo.extend(sub for sub in value.values() if sub is not None)
                objects.extend(sub for sub in value.values() if sub is not None)
                settings.append((name, tuple((k, id(sub)) for k, sub in value.items())))
            elif kind in _CONTAINERS and not value:  # an empty dict of hooks
                settings.append((name, kind.__name__))
            else:
                settings.append(_setting(name, value, objects, found, todo))
        if _own_classes(type(m)):
            settings.append(("class code", _code_state(type(m), objects, found, todo)))
        parts.append((id(m), type(m), tuple(settings)))
        objects.append(m)
    return parts


def _store(state, store, objects, found) -> tuple:
    """A module's ``_parameters`` or ``_buffers`` as part of the key; its tensors saved."""
    out = []
    for name, t in store.items():
        if t is None or isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
            out.append((name, None))
            continue
        out.append((name, id(t), t._version, t.data_ptr(), t.shape))
        objects.append(t)
        if id(t) not in found:  # shared (tied) tensors are saved once
            found[id(t)] = t
            if isinstance(t, torch.nn.Parameter):
                grad = t.grad
                state.params.append((t, t.requires_grad, grad,
                                     None if grad is None else grad.detach().clone()))
        state.registered.append((store, name, t))
    return tuple(out)


def _plain_walk(state, found) -> None:
    """The registered modules' state without a key (for models whose tensors cannot be
    named in one, e.g. inference tensors)."""
    seen = set()
    for root in state.roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                state.modes.append((m, m.training))
                for store in (m._parameters, m._buffers):
                    for name, t in store.items():
                        if t is None or isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
                            continue
                        if id(t) not in found:
                            found[id(t)] = t
                            if isinstance(t, torch.nn.Parameter):
                                grad = t.grad
                                state.params.append((t, t.requires_grad, grad, None if grad is None
                                                     else grad.detach().clone()))
                        state.registered.append((store, name, t))


def _uninitialised(roots, module) -> ModelTypeError:
    name = next((n for root in roots for n, m in root.named_modules() if m is module), "")
    return ModelTypeError(
        f"the model holds a lazy layer that is not initialised yet: {name or 'model'} "
        f"({type(module).__name__}). Its first call would create its weights for "
        "whatever input it sees, changing your model for good, and its derivatives "
        "would be those of random new weights. Fix: run one forward pass on a real "
        "batch first (model(x_batch)), or give the layer its input size "
        "(torch.nn.Linear(in_features, out_features)).")


def _setting(name, value, objects, tensors, todo, depth=3):
    """One attribute of a module as part of the key (tensors also gathered for their values,
    modules found in containers queued to be walked too). Lists, dicts and objects of your
    own (a config, an ``argparse.Namespace``) are taken by value, ``depth`` levels down."""
    if isinstance(value, _PLAIN):
        return name, value
    if isinstance(value, torch.Tensor):
        tensors[id(value)] = value
        objects.append(value)
        return name, id(value), value._version, value.data_ptr(), tuple(value.shape)
    if isinstance(value, torch.nn.Module):
        todo.append(value)
        objects.append(value)
        return name, id(value)
    if depth > 0:
        inner = depth - 1
        if isinstance(value, dict) and (name in _OWN or "hooks" in name
                                        or len(value) <= _CONTAINER_MAX):
            return name, tuple((k if isinstance(k, _PLAIN) else id(k),
                                _setting("", v, objects, tensors, todo, inner))
                               for k, v in value.items())
        if isinstance(value, (list, tuple)) and len(value) <= _CONTAINER_MAX:
            return name, type(value).__name__, tuple(_setting("", v, objects, tensors, todo,
                                                              inner) for v in value)
        attributes = _own_attributes(value)
        if attributes is not None:
            if _weak(value):
                objects.append(value)
            return name, type(value).__name__, id(value), tuple(
                (k, _setting("", v, objects, tensors, todo, inner)) for k, v in attributes)
    # a function, a framework object, a large container: by identity
    if _weak(value):
        objects.append(value)
    return name, type(value).__name__, id(value)


_NOT_BY_VALUE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                 types.ModuleType, type, functools.partial)


def _own_attributes(value):
    """The attributes (``__dict__`` items) of an object of your own with at most
    :data:`_CONTAINER_MAX` of them, else None (functions, classes, modules, framework
    objects: taken by identity)."""
    if isinstance(value, _NOT_BY_VALUE) or is_framework_object(value):
        return None
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except (AttributeError, TypeError):
        return None
    if not isinstance(attributes, dict) or len(attributes) > _CONTAINER_MAX:
        return None
    return list(attributes.items())


def _code_state(cls, objects, tensors, todo) -> tuple:
    """A model class of your own as part of the key: its functions (and those of its base
    classes of your own) by identity, so that a method patched on the class counts, and the
    module-level variables their code reads by value (a flag ``CENTER = True`` read in
    ``forward``); framework classes (``nn.Linear``, ...) add nothing."""
    parts = []
    for c in _own_classes(cls):
        for name, fn in list(vars(c).items()):
            if not isinstance(fn, types.FunctionType):
                continue
            objects.append(fn)
            parts.append((name, id(fn)))
            g = fn.__globals__
            for global_name in _global_names(fn.__code__):
                value = g.get(global_name, _MISSING)
                if value is _MISSING or isinstance(value, (types.ModuleType, type)):
                    continue
                parts.append(_setting(global_name, value, objects, tensors, todo, depth=2))
    return tuple(parts)


_MISSING = object()


@functools.lru_cache(maxsize=512)
def _own_classes(cls) -> tuple:
    """The classes of ``cls``'s MRO that are not a framework's (nor ``object``)."""
    return tuple(c for c in cls.__mro__ if c is not object and
                 (getattr(c, "__module__", "") or "").split(".")[0] not in FRAMEWORK_PACKAGES)


@functools.lru_cache(maxsize=2048)
def _global_names(code) -> tuple:
    """The names a function's code (and the code nested in it) looks up, sorted."""
    return tuple(sorted(code_names(code)))


def _weak(value) -> bool:
    """Whether ``value`` can be held weakly: the others (lists, dicts, numbers) are named in
    the key by identity and never held, so that nothing in the memo keeps a model alive."""
    return type(value).__weakrefoffset__ != 0


class _Saved:
    """Copies of tensors' values: the floating-point ones side by side, one flat copy per
    dtype and device (one ``torch.cat``: cheaper than a clone per tensor, and compared back
    in one ``torch.equal``), the others one by one."""

    def __init__(self, tensors):
        groups, self.others = {}, []
        for t in tensors:
            if t.is_floating_point():
                groups.setdefault((t.dtype, t.device), []).append(t)
            else:
                self.others.append((t, t.detach().clone()))
        self.groups = []
        for ts in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts]) if len(ts) > 1 \
                else ts[0].detach().reshape(-1).clone()
            self.groups.append((ts, [t.shape for t in ts], flat))

    def covers(self, tensors) -> bool:
        """Whether the float copies hold exactly ``tensors``' float values, in that order."""
        floats = [t for t in tensors if t.is_floating_point()]
        ours = [t for ts, _, _ in self.groups for t in ts]
        return len(floats) == len(ours) and all(a is b for a, b in zip(floats, ours))

    def put_back(self):
        """Every tensor holds its saved value again (in place; its data replaced where its
        shape, dtype or device changed)."""
        for ts, shapes, flat in self.groups:
            same_layout = [t.shape for t in ts] == shapes and all(
                t.dtype == flat.dtype and t.device == flat.device for t in ts)
            if same_layout and torch.equal(
                    torch.cat([t.detach().reshape(-1) for t in ts]) if len(ts) > 1
                    else ts[0].detach().reshape(-1), flat):
                continue
            for t, shape, value in zip(ts, shapes, flat.split([s.numel() for s in shapes])):
                _put_back(t, value.view(shape))
        for t, value in self.others:
            _put_back(t, value)


def _put_back(t, value):
    """``t`` holds ``value`` again (in place; its data replaced if its shape or dtype changed)."""
    if t.shape != value.shape or t.dtype != value.dtype or t.device != value.device:
        t.data = value.clone()
    elif not torch.equal(t.detach(), value):
        t.detach().copy_(value)


def state_key(model) -> tuple:
    """(key, objects) for :mod:`nbderiv.memo`: for an ``nn.Module``, every submodule (also
    those kept in plain lists or dicts) with its class, training flag and settings (``p`` of
    a Dropout, ``eps``, numbers, lists and dicts of your own), its forward and backward hooks
    and anything set on the instance (a replaced ``forward``, a function), every parameter
    and buffer by identity, version, storage and a fingerprint of its values (:func:`_values`:
    fused optimizers and edits through ``.data`` leave the version as it was), and the
    global module hooks. (None, ()) for anything else (a wrapper may read state nbderiv
    cannot see).

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> key = state_key(net)[0]
    >>> net.weight.data[0, 0] += 1  # no version bump, but another value
    >>> state_key(net)[0] == key
    False
    >>> key = state_key(net)[0]
    >>> _ = net.weight.data.neg_()  # the same norms, another sign
    >>> state_key(net)[0] == key
    False
    """
    if not isinstance(model, torch.nn.Module):
        return None, ()
    try:
        return TorchState([model], copy=False).key()
    except Exception:  # e.g. an uninitialised lazy layer: nothing remembered
        return None, ()


def _values(tensors, saved=None) -> tuple:
    """A fingerprint of the tensors' values. Up to :data:`_SIDE_BY_SIDE` floating-point values
    (most models taught in a notebook): all of them side by side in float64 (the copy
    ``saved`` holds, when it holds exactly these), their sum weighted by fixed pseudo-random
    weights in [0, 1) (seed 0: a sign flipped or values swapped or permuted through ``.data``
    change it, as any edit does; regular weights such as i or frac(i * golden ratio) miss
    swaps that keep the sum of positions) and the sum of their squares; beyond that, no copy:
    three fused reductions per tensor (1-norm, 2-norm, max), which a permutation inside one
    tensor leaves as they were. Other tensors by their sums."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    others = [t.detach() for t in tensors if not t.is_floating_point() and t.numel()]
    out = ()
    with torch.no_grad():
        if floats and sum(t.numel() for t in floats) <= _SIDE_BY_SIDE:
            if saved is not None and saved.covers(tensors):
                flats = [flat for _, _, flat in saved.groups if flat.numel()]
            else:
                groups = {}
                for t in floats:
                    groups.setdefault((t.dtype, t.device), []).append(t.reshape(-1))
                flats = [torch.cat(group) for group in groups.values()]
            sums = []
            for flat in flats:
                flat = flat.to(torch.float64)
                sums += [flat.dot(_weights(flat.numel(), flat.device)), flat.dot(flat)]
            try:
                out = tuple(torch.stack(sums).tolist())
            except RuntimeError:  # several devices
                out = tuple(float(v) for v in sums)
        elif floats:
            sums = [n for p in (1, 2) for n in torch._foreach_norm(floats, p)]
            sums += list(torch._foreach_max(floats)) if hasattr(torch, "_foreach_max") else []
            try:
                out = tuple(torch.stack(sums).tolist())
            except RuntimeError:  # several dtypes
                out = tuple(n.item() for n in sums)
    return out + tuple(t.sum().item() for t in others if not t.is_complex())


_WEIGHTS: dict = {}


def _weights(n: int, device) -> torch.Tensor:
    """``n`` fixed pseudo-random float64 weights in [0, 1) (seed 0) on ``device``; the last
    few sizes kept."""
    key = (n, str(device))
    w = _WEIGHTS.get(key)
    if w is None:
        w = torch.rand(n, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0)).to(device)
        while len(_WEIGHTS) >= 8:
            del _WEIGHTS[next(iter(_WEIGHTS))]
        _WEIGHTS[key] = w
    return w
