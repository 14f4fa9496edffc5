"""The parts of a torch model's state key that are not its module tree
(:mod:`~nbderiv.backends.torch_snapshot` walks that): one attribute taken by value (numbers,
lists, dicts, objects of your own a few levels down; tensors by identity, version and storage;
modules queued to be walked), the code of a model class of your own (its methods, the
module-level variables they read) and a fingerprint of the tensors' values.

>>> _setting("p", [0.5, {"scale": 2}], [], {}, [])
('p', 'list', (('', 0.5), ('', (('scale', ('', 2)),))))
"""

from __future__ import annotations

import functools
import os
import types

import torch

from ..wrapped import (
    FRAMEWORK_PACKAGES,
    FUNCTIONS,
    attribute_names,
    code_names,
    framework_function,
    is_framework_object,
    objects_inside,
    own_attributes,
    read_through,
    user_class,
    weakly_held,
)

_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)
_OWN = ("_parameters", "_buffers", "_modules")
_CONTAINER_MAX = 64  # lists and dicts of settings compared by value up to this size
_SIDE_BY_SIDE = 1 << 18  # float values fingerprinted side by side (2 MB in float64, ~4 ms at most)


def _setting(name, value, objects, tensors, todo, depth=4):
    """One attribute of a module as part of the key (tensors also gathered for their values,
    modules found in containers queued to be walked too). Lists, dicts and objects of your
    own (a config, an ``argparse.Namespace``) are taken by value, ``depth`` levels down."""
    if isinstance(value, _PLAIN):
        return name, value
    kind = type(value)
    if (kind is tuple or kind is list) and len(value) <= _CONTAINER_MAX and all(
            type(v) in _PLAIN_TYPES for v in value):  # kernel sizes, strides: in one step
        return name, kind.__name__ + " of plain values", tuple(value)
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
        attributes = _class_attributes(value) if isinstance(value, type) \
            else _own_attributes(value)
        if attributes is not None:
            if weakly_held(value):
                objects.append(value)
            return name, type(value).__name__, id(value), tuple(
                (k, _setting("", v, objects, tensors, todo, inner)) for k, v in attributes)
    # a function, a framework object, a large container: by identity; the modules a function
    # holds (a lambda kept as an attribute, around a model) are walked too
    if weakly_held(value):
        objects.append(value)
    if isinstance(value, FUNCTIONS) and not is_framework_object(value) \
            and not framework_function(value):
        inside = [m for m in objects_inside(value) if isinstance(m, torch.nn.Module)]
        todo.extend(inside)
        return name, type(value).__name__, id(value), tuple(id(m) for m in inside)
    return name, type(value).__name__, id(value)


_NOT_BY_VALUE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                 types.ModuleType, type, functools.partial)


def _own_attributes(value):
    """The attributes (``__dict__`` items, or ``__slots__`` values) of an object of your own
    with at most :data:`_CONTAINER_MAX` of them, else None (functions, classes, modules,
    framework objects: taken by identity)."""
    if isinstance(value, _NOT_BY_VALUE) or is_framework_object(value):
        return None
    attributes = own_attributes(value, most=None)
    return attributes if len(attributes) <= _CONTAINER_MAX else None


def _class_attributes(cls):
    """A class of the user's own held as a setting (``self.opt = Opt``): its own and its
    own bases' attributes that are not dunders, up to :data:`_CONTAINER_MAX` (functions by
    identity, as :func:`_setting` takes them), or None for a framework's or the standard
    library's class."""
    if not user_class(cls):
        return None
    out = {}
    for c in reversed(_own_classes(cls)):
        for name, member in vars(c).items():
            if not (name.startswith("__") and name.endswith("__")):
                out[name] = member
    return list(out.items()) if len(out) <= _CONTAINER_MAX else None


def _code_state(cls, objects, tensors, todo) -> tuple:
    """A model class of your own as part of the key: its functions (and those of its base
    classes of your own; static and class methods, properties) by identity, so that a method
    patched on the class counts; its other class attributes by value (``Net.center = True``);
    and the module-level variables their code reads by value (a flag ``CENTER = True`` read in
    ``forward``), also those read by a function of yours that it calls (one level);
    framework classes (``nn.Linear``, ...) add nothing."""
    parts, seen = [], set()
    for c in _own_classes(cls):
        for name, member in list(vars(c).items()):
            functions = _functions_of(member)
            if functions:
                for fn in functions:
                    objects.append(fn)
                    parts.append((name, id(fn)))
                    parts += _globals_read(fn, objects, tensors, todo, seen, helpers=1)
            elif not (name.startswith("__") and name.endswith("__")):
                parts.append(_setting(name, member, objects, tensors, todo, depth=2))
    return tuple(parts)


def _functions_of(member) -> list:
    """The plain functions behind a class member: a function, a static or class method, a
    property's getter and setter; [] for anything else."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        return [f for f in (member.fget, member.fset) if isinstance(f, types.FunctionType)]
    return [member] if isinstance(member, types.FunctionType) else []


def _globals_read(fn, objects, tensors, todo, seen, helpers) -> list:
    """The module-level variables ``fn``'s code reads, by value, and the attributes it reads
    of the modules and classes of the user's own among them (``CFG.CENTER``,
    ``config.scale``, ``mymodels.net``); the functions among them (``helpers`` levels down)
    by identity and their own globals too."""
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    parts = []
    g = fn.__globals__
    for global_name in _global_names(fn.__code__):
        value = g.get(global_name, _MISSING)
        if value is _MISSING:
            continue
        if isinstance(value, (types.ModuleType, type)):
            if value is os and {"environ", "getenv"} & attribute_names(fn.__code__):
                parts.append(("os.environ", tuple(sorted(os.environ.items()))))
            for name, held in read_through(value, attribute_names(fn.__code__)):
                if isinstance(held, types.FunctionType):
                    objects.append(held)
                    parts.append((f"{global_name}.{name}", id(held)))
                else:
                    parts.append(_setting(f"{global_name}.{name}", held, objects, tensors,
                                          todo, depth=2))
            continue
        if isinstance(value, types.FunctionType):
            objects.append(value)
            parts.append((global_name, id(value)))
            if helpers > 0:
                parts += _globals_read(value, objects, tensors, todo, seen, helpers - 1)
            continue
        parts.append(_setting(global_name, value, objects, tensors, todo, depth=2))
    return parts


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


def _values(tensors, saved=None) -> tuple:
    """A fingerprint of the tensors' values. Up to :data:`_SIDE_BY_SIDE` floating-point values
    (most models taught in a notebook): all of them side by side in float64 (the copy
    ``saved`` holds, when it holds exactly these), their sum weighted by fixed pseudo-random
    weights in [0, 1) (seed 0: a sign flipped or values swapped or permuted through ``.data``
    change it, as any edit does; regular weights such as i or frac(i * golden ratio) miss
    swaps that keep the sum of positions) and the sum of their squares; beyond that, no copy:
    three fused reductions per tensor (1-norm, 2-norm, max), which a permutation inside one
    tensor leaves as they were. Other tensors by their sums."""
    floats, others = [], []
    for t in tensors:
        if t.numel():
            (floats if t.is_floating_point() else others).append(t)
    out = ()
    with torch.no_grad():  # (no graph: the tensors need no detaching)
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
    others = [t for t in others if not t.is_complex()]
    try:  # one read back for all (integer buffers: BatchNorm's num_batches_tracked)
        sums = tuple(torch.stack([t.sum() for t in others]).tolist()) if others else ()
    except RuntimeError:  # several dtypes or devices
        sums = tuple(t.sum().item() for t in others)
    return out + sums


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
