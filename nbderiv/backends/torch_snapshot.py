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

import torch

from ..errors import ModelTypeError
from .torch_state_key import _PLAIN_TYPES, _code_state, _own_classes, _setting, _values
from .torch_taylor import _GLOBAL_HOOKS

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
        self.keys = []  # (a _parameters / _buffers / _modules dict, its names before the call)
        self.attributes = []  # (module, name, tensor) of the plain tensor attributes
        self.generators = []  # (torch.Generator held by a module, its state before the call)
        self._key, self.objects = None, []
        self.unique = {}  # id -> registered tensor (tied tensors once)
        found = {}  # id -> tensor: registered ones and tensors held in attributes
        try:
            self.parts = _walk(self, found)
        except ModelTypeError:
            raise
        except Exception:  # e.g. inference tensors keep no version counter: no key
            self.modes, self.registered, self.params, found = [], [], [], {}
            self.keys, self.attributes, self.unique, self.generators = [], [], {}, []
            self.parts, self.objects = None, []
            _plain_walk(self, found)
        self.found = list(found.values())
        saved = _Saved(list(self.unique.values()), copy)
        if saved.on_meta:
            raise ModelTypeError(
                "the model's weights are on the 'meta' device: they have shapes but no values "
                "(a model built under torch.device('meta') or an empty-weights context), so "
                "it has no outputs to differentiate. Fix: give it real weights first, e.g. "
                "model = model.to_empty(device='cpu') then model.load_state_dict(state), or "
                "build it without the meta device.")
        self.saved = saved if copy else None

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
        for m, name, t in self.attributes:  # the same tensor object again (not its values)
            own = vars(m)
            if own.get(name) is not t:
                own[name] = t
        for store, names in self.keys:  # a parameter, buffer or layer created in forward
            if len(store) != len(names):
                for name in [k for k in store if k not in names]:
                    del store[name]
        with torch.no_grad():
            for store, name, t in self.registered:
                try:
                    now = store.get(name)
                except AttributeError:  # a TorchScript module's store (no .get)
                    now = _registered(store, name)
                if now is not t:  # replaced (or deleted) in forward
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
        for generator, before in self.generators:
            if not torch.equal(generator.get_state(), before):
                generator.set_state(before)


def _registered(store, name):
    """The tensor registered under ``name`` in a ``_parameters`` / ``_buffers`` store, or
    None: a dict, or a TorchScript module's ``OrderedDictWrapper`` (no ``.get``)."""
    try:
        return store.get(name)
    except AttributeError:
        return store[name] if name in store else None


def _walk(state, found) -> list:
    """The key's parts, one per module in the order walked (breadth first from the roots,
    modules found in containers and attributes queued too); fills ``state``'s training flags,
    registered tensors and parameters, and ``found`` with every tensor met."""
    module = torch.nn.modules.module
    parts = [tuple(tuple(getattr(module, name, None) or ()) for name in _GLOBAL)]
    objects = state.objects
    lazy, script = torch.nn.modules.lazy.LazyModuleMixin, torch.jit.ScriptModule
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
        own = vars(m)
        # most of what nn.Module holds is bookkeeping: left out in one pass
        for name, value in [item for item in own.items() if item[0] not in _IGNORED]:
            kind = type(value)
            if kind in _PLAIN_TYPES:  # a number, a flag
                settings.append((name, value))
            elif name in _STORES:
                if kind is dict:  # (a TorchScript module's stores are not)
                    state.keys.append((value, tuple(value)))
                settings.append((name, _store(state, value, objects, found)))
            elif name == "_modules":
                if kind is dict:
                    state.keys.append((value, tuple(value)))
                subs = [sub for sub in value.values() if sub is not None]
                todo += subs
                objects += subs
                settings.append((name, tuple((k, id(sub)) for k, sub in value.items())))
            elif kind in _CONTAINERS and not value:  # an empty dict of hooks: as if absent
                continue
            else:
                if isinstance(value, torch.Tensor):  # a plain tensor attribute (a cache, the
                    state.attributes.append((m, name, value))  # weight spectral_norm sets)
                elif kind is torch.Generator:  # a model's own random stream (noise layers)
                    state.generators.append((value, value.get_state()))
                settings.append(_setting(name, value, objects, found, todo))
        if _own_classes(type(m)):
            settings.append(("class code", _code_state(type(m), objects, found, todo)))
        if isinstance(m, script) and "_c" in own:
            settings.append(("script attributes", _script_attributes(m, objects, found, todo)))
        parts.append((id(m), type(m), tuple(settings)))
        objects.append(m)
    return parts


def _script_attributes(m, objects, found, todo) -> tuple:
    """A TorchScript module's attributes as part of the key: they live in its C++ object, not
    in ``vars(m)`` (``training``, numbers, flags and tensors of its own, settable from Python:
    ``scripted.scale = 2.0``). A module whose attributes cannot be listed raises, and gets no
    key (see :class:`TorchState`)."""
    c, concrete = vars(m)["_c"], vars(m).get("_concrete_type")
    if concrete is None:  # a traced module's top level: only its training flag of its own
        return (("training", m.training),)
    return tuple(_setting(name, c.getattr(name), objects, found, todo)
                 for name in sorted(concrete.get_attributes()))


def _store(state, store, objects, found) -> tuple:
    """A module's ``_parameters`` or ``_buffers`` as part of the key; its tensors saved."""
    out = []
    registered = state.registered
    for name, t in store.items():
        registered.append((store, name, t))
        if t is None or isinstance(t, _UNINITIALISED):
            out.append((name, None))  # a buffer filled in forward: None again
            continue
        out.append((name, id(t), t._version, t.data_ptr(), t.shape))
        objects.append(t)
        if id(t) not in state.unique:  # (tied tensors once)
            _found(state, t, found)
    return tuple(out)


def _register(state, store, name, t, found) -> None:
    """One registered tensor to put back: where it is registered, and for a parameter its
    ``requires_grad`` and ``.grad`` (shared, tied tensors are saved once)."""
    if id(t) not in state.unique:
        _found(state, t, found)
    state.registered.append((store, name, t))


def _found(state, t, found) -> None:
    """A registered tensor met for the first time (perhaps held in an attribute too): kept to
    be saved, and for a parameter its ``requires_grad`` and ``.grad``."""
    found[id(t)] = state.unique[id(t)] = t
    if isinstance(t, torch.nn.Parameter):
        grad = t.grad
        state.params.append((t, t.requires_grad, grad,
                             None if grad is None else grad.detach().clone()))


_UNINITIALISED = torch.nn.parameter.UninitializedTensorMixin


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
                        if t is not None and not isinstance(
                                t, torch.nn.parameter.UninitializedTensorMixin):
                            _register(state, store, name, t, found)


def _uninitialised(roots, module) -> ModelTypeError:
    name = next((n for root in roots for n, m in root.named_modules() if m is module), "")
    return ModelTypeError(
        f"the model holds a lazy layer that is not initialised yet: {name or 'model'} "
        f"({type(module).__name__}). Its first call would create its weights for "
        "whatever input it sees, changing your model for good, and its derivatives "
        "would be those of random new weights. Fix: run one forward pass on a real "
        "batch first (model(x_batch)), or give the layer its input size "
        "(torch.nn.Linear(in_features, out_features)).")


class _Saved:
    """Copies of tensors' values: the floating-point ones side by side, one flat copy per
    dtype and device (one ``torch.cat``: cheaper than a clone per tensor, and compared back
    in one ``torch.equal``), the others one by one."""

    def __init__(self, tensors, copy=True):
        groups, self.others = {}, []
        for t in tensors:
            if t.is_floating_point():
                groups.setdefault((t.dtype, t.device), []).append(t)
            else:
                self.others.append((t, t.detach().clone() if copy else None))
        self.on_meta = any(device.type == "meta" for _, device in groups) or any(
            t.is_meta for t, _ in self.others)
        self.groups = []
        if self.on_meta or not copy:  # no values to copy
            return
        for ts in groups.values():
            flat = _flat(ts)
            self.groups.append((ts, [t.shape for t in ts], flat.clone() if len(ts) == 1 else flat))

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
            if same_layout and torch.equal(_flat(ts), flat):
                continue
            for t, shape, value in zip(ts, shapes, flat.split([s.numel() for s in shapes])):
                _put_back(t, value.view(shape))
        for t, value in self.others:
            _put_back(t, value)


def _flat(ts):
    """The tensors' values side by side, flat: one concatenation (a view of one tensor), by
    the C++ helper DistributedDataParallel flattens its buckets with where torch has it
    (one call instead of a Python-level view per tensor: ~3x faster for a few dozen)."""
    if len(ts) == 1:
        return ts[0].detach().reshape(-1)
    with torch.no_grad():
        if _FLATTEN is not None:
            return _FLATTEN(ts)
        return torch.cat([t.reshape(-1) for t in ts])


_FLATTEN = getattr(getattr(torch._C, "_nn", None), "flatten_dense_tensors", None)


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
