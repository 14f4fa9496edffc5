"""The torch model state nbderiv keeps as it was, the dtype it computes in, and the modules a
model is made of: the root modules of a model or of a wrapper around modules (lambda,
partial, closure), every module once, lazy layers refused before their first call, and what
the layer that receives the input expects.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
>>> [type(m).__name__ for m in modules_of(lambda z: net(z) * 2)], expected_by(net[0])
(['Sequential'], 3)
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import torch

from ..errors import ModelTypeError, OptionError
from ..wrapped import objects_inside
from .torch_taylor import _GLOBAL_HOOKS, global_hooks, runs_class_forward


def modules_of(model) -> list:
    """The root torch modules of ``model``: ``[model]`` for an ``nn.Module``, else the modules
    a wrapper holds (:func:`nbderiv.wrapped.objects_inside`) that are no submodule of another."""
    if isinstance(model, torch.nn.Module):
        return [model]
    if not callable(model):
        return []
    roots = [o for o in objects_inside(model) if isinstance(o, torch.nn.Module)]
    inner = {id(m) for r in roots for m in itertools.islice(r.modules(), 1, None)}
    return [r for r in roots if id(r) not in inner]


def np_dtype(torch_dtype) -> np.dtype:
    """The NumPy dtype of a torch float dtype; bfloat16 (which NumPy lacks) as float32, for
    inputs only: a bfloat16 *model* is refused by :func:`model_dtype`."""
    return np.dtype(str(torch_dtype).replace("torch.", "")) if torch_dtype != torch.bfloat16 \
        else np.dtype(np.float32)


def model_dtype(t) -> np.dtype:
    """The dtype to differentiate a model whose first float tensor is ``t`` in: its own,
    float16 included; bfloat16 is refused clearly (NumPy has no bfloat16, and feeding the
    model float32 would fail inside it and be blamed on the input)."""
    if t.dtype == torch.bfloat16:
        raise ModelTypeError(
            "the model's parameters are bfloat16, which nbderiv cannot compute in (its arrays "
            "are NumPy's, which has no bfloat16); bfloat16 keeps about 3 significant digits, "
            "too few for derivatives in any case. Fix: differentiate a float32 copy, "
            "nbderiv.derivatives(copy.deepcopy(model).float(), x), or float64 for higher orders.")
    return np_dtype(t.dtype)


def first_float_tensor(model):
    """The first floating-point parameter or buffer of the model, or of the modules a wrapper
    (lambda, partial, closure) holds: its dtype and device are the model's."""
    for module in modules_of(model):
        for t in itertools.chain(module.parameters(), module.buffers()):  # stops at the first
            if t.is_floating_point():
                return t
    return None


def named_modules(roots):
    """(name, module) over every module of the roots, each once; names prefixed with the
    root's class when there are several roots."""
    seen = set()
    for root in roots:
        prefix = type(root).__name__ if len(roots) > 1 else ""
        for name, module in root.named_modules():
            if id(module) not in seen:
                seen.add(id(module))
                yield (".".join(p for p in (prefix, name) if p), module)


def _uninitialised(name, module) -> ModelTypeError:
    return ModelTypeError(
        f"the model holds a lazy layer that is not initialised yet: {name or 'model'} "
        f"({type(module).__name__}). Its first call would create its weights for "
        "whatever input it sees, changing your model for good, and its derivatives "
        "would be those of random new weights. Fix: run one forward pass on a real "
        "batch first (model(x_batch)), or give the layer its input size "
        "(torch.nn.Linear(in_features, out_features)).")


class TorchState:
    """Training flags, parameters and buffers (values and the objects registered), ``.grad``
    and ``requires_grad`` of every module of the roots, saved to be put back. Tensors are
    written back only where they changed (no needless version-counter bumps). A lazy module
    not yet initialised is refused (its first call would initialise it for good)."""

    def __init__(self, roots):
        self.modes, self.tensors, self.params, copies = [], [], [], {}
        lazy = torch.nn.modules.lazy.LazyModuleMixin
        for name, m in named_modules(roots):
            if isinstance(m, lazy) and m.has_uninitialized_params():
                raise _uninitialised(name, m)
            self.modes.append((m, m.training))
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is None or isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
                        continue
                    if id(t) not in copies:  # shared (tied) tensors are copied once
                        copies[id(t)] = t.detach().clone()
                        if isinstance(t, torch.nn.Parameter):
                            grad = t.grad
                            self.params.append((t, t.requires_grad, grad, None if grad is None
                                                else grad.detach().clone()))
                    self.tensors.append((store, name, t, copies[id(t)]))

    def restore(self):
        with torch.no_grad():
            for store, name, t, value in self.tensors:
                if store.get(name) is not t:  # replaced (or deleted) inside forward
                    store[name] = t
                _put_back(t, value)
            for p, requires_grad, grad, value in self.params:
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad
                if grad is not None:
                    _put_back(grad, value)
        for m, mode in self.modes:
            m.training = mode


def _put_back(t, value):
    """``t`` holds ``value`` again (in place; its data replaced if its shape or dtype changed)."""
    if t.shape != value.shape or t.dtype != value.dtype or t.device != value.device:
        t.data = value
    elif not torch.equal(t.detach(), value):
        t.detach().copy_(value)


def refuse_lazy(roots) -> None:
    for root in roots:
        for module in root.modules():
            if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
                raise OptionError("the model has a lazy layer, which its first call would "
                                  "initialise for whatever width it sees. Fix: pass d_in= "
                                  "(the number of input features).")


def expected_by(first):
    """What one layer expects of each point: an int, a shape with None for free sizes, or
    None."""
    if isinstance(first, torch.nn.Linear):
        return first.in_features
    if isinstance(first, torch.nn.modules.conv._ConvNd):
        return (first.in_channels,) + (None,) * len(first.kernel_size)
    if isinstance(first, torch.nn.RNNBase) and first.batch_first:
        return (None, first.input_size)
    return None


# Layers whose forward never calls a piecewise-linear function (exact classes: a subclass
# may override forward). A model built only from these needs no kink search.
KINK_FREE = (
    torch.nn.Linear, torch.nn.Bilinear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.LayerNorm,
    torch.nn.GroupNorm, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.SiLU,
    torch.nn.GELU, torch.nn.ELU, torch.nn.CELU, torch.nn.SELU, torch.nn.Mish, torch.nn.Softsign,
    torch.nn.Tanhshrink, torch.nn.LogSigmoid, torch.nn.Softmax, torch.nn.LogSoftmax,
)
# Layers that act on each point's feature vector alone (no batch statistics), with sizes
# that the Linear layers tell: their work can be split into blocks of rows.
DENSE = (
    torch.nn.Linear, torch.nn.Identity, torch.nn.Flatten, torch.nn.Dropout, torch.nn.LayerNorm,
    torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.SiLU, torch.nn.GELU,
    torch.nn.ELU, torch.nn.CELU, torch.nn.SELU, torch.nn.Mish, torch.nn.Softsign,
    torch.nn.Tanhshrink, torch.nn.LogSigmoid, torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ReLU6,
    torch.nn.Hardtanh, torch.nn.PReLU,
)


def plain_modules(model, allowed) -> bool:
    """Every module is an exact instance of ``allowed`` or a plain nn.Sequential, no hooks."""
    if not isinstance(model, torch.nn.Module):
        return False
    if global_hooks():
        return False
    for m in model.modules():
        if not runs_class_forward(m):  # hooked, or its forward replaced on the instance
            return False
        if type(m) in allowed:
            continue
        if isinstance(m, torch.nn.Sequential) and type(m).forward is torch.nn.Sequential.forward:
            continue
        return False
    return True


def batched_backward_pays(call) -> bool:
    """Whether the backward passes of a level should run batched over their cotangents
    (:func:`~nbderiv.backends.torch_autodiff.nested_reverse`): yes, except for models with
    convolutions on the CPU, whose vmapped backward measured 1.3-2x slower than one pass per
    cotangent (a residual CNN at 3x32x32 with 10 and 100 outputs, benchmarks/real_models.py)."""
    if getattr(call.device, "type", "cpu") != "cpu":
        return True
    conv = torch.nn.modules.conv._ConvNd
    return not any(isinstance(m, conv) for root in modules_of(call.model)
                   for m in root.modules())


def kink_free(model) -> bool:
    return plain_modules(model, KINK_FREE)


def dense_widths(model):
    """The Linear layers' widths if the model is a plain stack of per-point layers, else []."""
    if not plain_modules(model, DENSE):
        return []
    return [max(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, torch.nn.Linear)]


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_OWN = ("_parameters", "_buffers", "_modules")
# what every nn.Module holds that cannot change its forward pass or its autodiff (state-dict
# hooks, bookkeeping); forward and backward hooks are kept
_IGNORED = frozenset(vars(torch.nn.Module())) - {
    "training", "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
    "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook"}
# hooks registered for every module: forward ones change outputs, backward ones gradients
_GLOBAL = _GLOBAL_HOOKS + ("_global_backward_hooks", "_global_backward_pre_hooks",
                           "_global_forward_hooks_with_kwargs")
_PLAIN_TYPES = frozenset(_PLAIN)
_CONTAINERS = frozenset({dict, list, tuple, collections.OrderedDict})
_CONTAINER_MAX = 64  # lists and dicts of settings compared by value up to this size


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
        return _module_state(model)
    except Exception:  # e.g. inference tensors keep no version counter: nothing remembered
        return None, ()


def _module_state(model) -> tuple:
    module = torch.nn.modules.module
    parts = [tuple(tuple(getattr(module, name, None) or ()) for name in _GLOBAL)]
    objects, tensors = [], {}
    todo, seen = list(model.modules()), set()
    while todo:
        m = todo.pop(0)
        if id(m) in seen:
            continue
        seen.add(id(m))
        settings = []
        for name, value in vars(m).items():
            kind = type(value)
            if kind in _PLAIN_TYPES:  # the common cases first: a number, a flag, an empty dict
                settings.append((name, value))
            elif name not in _IGNORED:
                settings.append((name, kind.__name__) if kind in _CONTAINERS and not value
                                else _setting(name, value, objects, tensors, todo))
        parts.append((id(m), type(m), tuple(settings)))
        objects.append(m)
    parts.append(_values(list(tensors.values())))
    return tuple(parts), objects


def _setting(name, value, objects, tensors, todo):
    """One attribute of a module as part of the key (tensors also gathered for their values,
    modules found in containers queued to be walked too)."""
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
    if isinstance(value, dict) and (name in _OWN or "hooks" in name
                                    or len(value) <= _CONTAINER_MAX):
        return name, tuple((k if isinstance(k, _PLAIN) else id(k),
                            _setting("", v, objects, tensors, todo)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and len(value) <= _CONTAINER_MAX:
        return name, type(value).__name__, tuple(_setting("", v, objects, tensors, todo)
                                                 for v in value)
    # a function, an object of your own, a large container: by identity (an object edited
    # in place keeps its identity: see nbderiv.memo)
    if _weak(value):
        objects.append(value)
    return name, type(value).__name__, id(value)


def _values(tensors) -> tuple:
    """A fingerprint of the tensors' values. Up to :data:`_SIDE_BY_SIDE` floating-point values
    (most models taught in a notebook): all of them side by side in float64 (one copy per dtype
    and device), their sum weighted by fixed pseudo-random weights in [0, 1) (seed 0: a sign
    flipped or values swapped or permuted through ``.data`` change it, as any edit does;
    regular weights such as i or frac(i * golden ratio) miss swaps that keep the sum of
    positions) and the sum of their squares; beyond that, no copy: three
    fused reductions per tensor (1-norm, 2-norm, max), which a permutation inside one tensor
    leaves as they were. Other tensors by their sums."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    others = [t.detach() for t in tensors if not t.is_floating_point() and t.numel()]
    out = ()
    with torch.no_grad():
        if floats and sum(t.numel() for t in floats) <= _SIDE_BY_SIDE:
            groups = {}
            for t in floats:
                groups.setdefault((t.dtype, t.device), []).append(t.reshape(-1))
            sums = []
            for flat in (torch.cat(group).to(torch.float64) for group in groups.values()):
                weights = torch.rand(flat.numel(), dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(0))
                sums += [flat.dot(weights.to(flat.device)), flat.dot(flat)]
            out = tuple(float(v) for v in sums)
        elif floats:
            sums = [n for p in (1, 2) for n in torch._foreach_norm(floats, p)]
            sums += list(torch._foreach_max(floats)) if hasattr(torch, "_foreach_max") else []
            try:
                out = tuple(torch.stack(sums).tolist())
            except RuntimeError:  # several dtypes
                out = tuple(n.item() for n in sums)
    return out + tuple(t.sum().item() for t in others if not t.is_complex())


_SIDE_BY_SIDE = 1 << 18  # float values fingerprinted side by side (2 MB in float64, ~4 ms at most)


def _weak(value) -> bool:
    """Whether ``value`` can be held weakly: the others (lists, dicts, numbers) are named in
    the key by identity and never held, so that nothing in the memo keeps a model alive."""
    return type(value).__weakrefoffset__ != 0
