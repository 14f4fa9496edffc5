"""What a torch model is made of, and the dtype nbderiv computes in: the root modules of a
model or of a wrapper around modules (lambda, partial, closure), every module once, lazy
layers refused before their first call, what the layer that receives the input expects, and
which layers it is built from (kink-free, per-point stacks). The state nbderiv saves and
puts back is :mod:`~nbderiv.backends.torch_snapshot`'s.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
>>> [type(m).__name__ for m in modules_of(lambda z: net(z) * 2)], expected_by(net[0])
(['Sequential'], 3)
"""

from __future__ import annotations

import itertools
import re
import sys
import types

import numpy as np
import torch

from ..errors import ModelTypeError, OptionError
from ..wrapped import (
    FUNCTIONS,
    framework_function,
    is_framework_object,
    objects_inside,
    own_attributes,
    uncompiled,
)
from .torch_taylor import global_hooks, runs_class_forward


def modules_of(model) -> list:
    """The root torch modules of ``model``: ``[model]`` for an ``nn.Module``, else the modules
    a wrapper holds (:func:`nbderiv.wrapped.objects_inside`) that are no submodule of another;
    a ``torch.compile``'d module or function counts as the one it was given
    (:func:`~nbderiv.wrapped.uncompiled`)."""
    model = uncompiled(model)
    if isinstance(model, torch.nn.Module):
        return [model]
    if not callable(model):
        return []
    roots = [uncompiled(o) for o in objects_inside(model) if isinstance(o, torch.nn.Module)]
    inner = {id(m) for r in roots for m in itertools.islice(r.modules(), 1, None)}
    return [r for r in roots if id(r) not in inner]


def compiled_inside(model) -> bool:
    """Whether calling the model runs code that ``torch.compile`` compiled beneath the model
    itself (which :func:`~nbderiv.wrapped.uncompiled` unwraps): a compiled module or function
    a wrapper holds, a compiled submodule (an ``OptimizedModule`` in the tree, or one compiled
    in place with ``module.compile()``). Without ``torch._dynamo`` loaded, nothing was
    compiled (and it is not imported here).

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> compiled_inside(lambda z: net(z))
    False
    """
    if "torch._dynamo" not in sys.modules:
        return False
    model = uncompiled(model)
    if isinstance(model, torch.nn.Module):
        roots = [model]
    elif callable(model):
        inside = objects_inside(model)
        if any((type(o).__module__ or "").startswith("torch._dynamo") for o in inside):
            return True
        roots = [o for o in inside if isinstance(o, torch.nn.Module)]
    else:
        return False
    todo, seen = list(roots), set()
    while todo:  # (faster than module.modules())
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        own = m.__dict__
        if type(m).__name__ == "OptimizedModule" or (
                m is not model and own.get("_compiled_call_impl") is not None):
            return True
        todo.extend(sub for sub in own.get("_modules", {}).values() if sub is not None)
    return False


def script_ops(model) -> frozenset:
    """The operations (``layer_norm``, ``relu``, ...) of the TorchScript code the model runs:
    a scripted or traced module (the model, a module inside it, or one a wrapper holds) or a
    scripted function (the model, or one a wrapper holds); empty without TorchScript. What
    nbderiv does around single operations in Python (plain norm formulas for higher orders,
    the kink watcher) does not reach inside TorchScript, which runs its operations in C++.

    >>> sorted(script_ops(torch.jit.script(torch.nn.Sequential(torch.nn.Tanh()))))
    ['tanh']
    """
    model = uncompiled(model)
    script, function = torch.jit.ScriptModule, torch.jit.ScriptFunction
    found = [model] if isinstance(model, (script, function)) else []
    if not isinstance(model, torch.nn.Module) and callable(model) and not found:
        found += [o for o in objects_inside(model) if isinstance(o, function)]
    roots = modules_of(model)
    inside = set()  # a scripted module's own submodules: its inlined graph holds their code
    for _, m in itertools.chain(named_modules(roots), held_outside(roots)):
        if id(m) not in inside and isinstance(m, script):
            found.append(m)
            inside.update(id(sub) for sub in m.modules())
    ops = set()
    for code in found:
        try:
            graph = code.inlined_graph
        except Exception:  # a scripted container without a forward of its own
            continue
        ops.update(re.findall(r"aten::(\w+)", str(graph)))
    return frozenset(ops)


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
    (lambda, partial, closure) holds, or else of the layers it keeps in plain lists or dicts
    (:func:`held_outside`): its dtype and device are the model's."""
    roots = modules_of(model)
    for root in roots:
        for store in ("_parameters", "_buffers"):  # the order of parameters(), then buffers()
            todo = [root]  # depth first, children in order, without torch's generators
            while todo:
                m = todo.pop()
                for t in getattr(m, store).values():
                    if t is not None and t.is_floating_point():
                        return t
                todo.extend(c for c in reversed(m._modules.values()) if c is not None)
    for _, held in held_outside(roots):
        for t in itertools.chain(held._parameters.values(), held._buffers.values()):
            if t is not None and t.is_floating_point():
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


def held_outside(roots, functions=True) -> list:
    """(name, module) for the modules a model keeps outside its module tree: in plain Python
    lists, tuples or dicts (instead of ``nn.ModuleList`` / ``nn.ModuleDict``), in objects of
    your own (a helper or config object), and with ``functions`` in functions kept as
    attributes (a lambda's closure), with their own submodules; each once.
    ``model.eval()``, ``.parameters()`` and ``.to()`` do not reach them (nbderiv still saves
    and puts back their state). ``functions=False`` for a copy of the model: ``deepcopy``
    copies the containers and objects but not the functions, whose modules stay the
    original's.

    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = [torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)]
    >>> [name for name, _ in held_outside([Net()])]
    ['layers[0]', 'layers[1]']
    """
    tree = {id(m) for root in roots for m in root.modules()}
    seen, out = set(tree), []
    todo = list(named_modules(roots))
    while todo:
        owner, module = todo.pop(0)
        if isinstance(module, torch.jit.ScriptModule):  # a traced module's own script twin
            continue
        for attribute, value in vars(module).items():
            if attribute in ("_parameters", "_buffers", "_modules") or "hooks" in attribute:
                continue
            for name, held in _modules_in(value, attribute, functions=functions):
                if id(held) in seen:
                    continue
                for inner, sub in held.named_modules():
                    if id(sub) not in seen:
                        seen.add(id(sub))
                        full = ".".join(p for p in (owner, name, inner) if p)
                        out.append((full, sub))
                        todo.append((full, sub))
    return out


def _modules_in(value, name, depth=4, functions=True, seen=None):
    """(name, module) for the modules in a plain list, tuple or dict, an object of your own
    (its ``__dict__`` or slots) or, with ``functions``, a function (its closure, defaults,
    globals: :func:`~nbderiv.wrapped.objects_inside`), ``depth`` levels down."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.nn.Module):
        yield name, value
    elif depth <= 0 or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return
    elif type(value) in (list, tuple):
        for i, v in enumerate(value[:64]):
            yield from _modules_in(v, f"{name}[{i}]", depth - 1, functions, seen)
    elif isinstance(value, dict):
        for k, v in list(value.items())[:64]:
            yield from _modules_in(v, f"{name}[{k!r}]", depth - 1, functions, seen)
    elif callable(value) and isinstance(value, FUNCTIONS):
        if functions and not framework_function(value):  # (F.relu: the framework's code)
            for held in objects_inside(value):
                if isinstance(held, torch.nn.Module):
                    yield f"{name}()", held
    elif not is_framework_object(value) and not isinstance(value, (type, types.ModuleType)):
        for attribute, v in own_attributes(value):
            yield from _modules_in(v, f"{name}.{attribute}", depth - 1, functions, seen)


def refuse_lazy(roots) -> None:
    for root in roots:
        for module in root.modules():
            if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
                raise OptionError("the model has a lazy layer, which its first call would "
                                  "initialise for whatever width it sees. Fix: initialise it "
                                  "with one call on data of the right width (model(x)), or "
                                  "give the points yourself, an array of shape (N, d_in) (in "
                                  "%nnderiv instead of a range; nbderiv.explore takes d_in=).")


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
# may override forward). A model built only from these needs no kink search. Not SELU (slopes
# 1.76 and 1.05 meet at 0) nor ELU (a kink at 0 unless alpha = 1): the watcher looks at those.
KINK_FREE = (
    torch.nn.Linear, torch.nn.Bilinear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.LayerNorm,
    torch.nn.GroupNorm, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.SiLU,
    torch.nn.GELU, torch.nn.CELU, torch.nn.Mish, torch.nn.Softsign,
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
