"""PyTorch autodiff helpers of the torch backend: nested reverse mode (the ones trick),
nested forward mode (``torch.func.jvp``), exact norm layers for higher orders, and the
kink watcher (which points sit exactly on a ReLU-type kink).

>>> import torch
>>> from nbderiv.backends.torch_autodiff import nested_reverse
>>> y, values = nested_reverse(torch.sin, torch.zeros(2, 1, dtype=torch.float64), 1, (0,))
>>> values[(0,)][:, 0].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .base import sorted_multi_indices


@contextmanager
def grad_enabled(flag: bool):
    with torch.inference_mode(False), torch.set_grad_enabled(flag):
        yield


class _PlainNorms(torch.overrides.TorchFunctionMode):
    """Layer norm and batch-statistics batch norm written as plain tensor operations.

    PyTorch's fused kernels for these give wrong higher derivatives (order >= 3 in reverse
    mode, already order 2 in forward-over-forward mode); the plain
    operations differentiate correctly to any order. Running statistics are not updated
    here (nbderiv restores them anyway).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        F = torch.nn.functional
        if func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                     "momentum", "eps")
            bound = dict(zip(names, args, strict=False), **kwargs)
            uses_batch = bound.get("training", False) or bound.get("running_mean") is None
            if uses_batch:
                return _batch_norm_batch_stats(bound["input"], bound.get("weight"),
                                               bound.get("bias"), bound.get("eps", 1e-5))
        return func(*args, **kwargs)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dim=dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (input - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


def _batch_norm_batch_stats(input, weight, bias, eps):
    dims = (0,) + tuple(range(2, input.ndim))
    shape = (1, -1) + (1,) * (input.ndim - 2)
    mean = input.mean(dim=dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (input - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out + bias.reshape(shape) if bias is not None else out


@contextmanager
def exact_norms(order):
    if order < 2:
        yield
        return
    with _PlainNorms():
        yield


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def nested_reverse(fn, X, order, wrt):
    """Nested reverse mode with the ones trick: grad(sum_n T[n]) = per-point gradients,
    valid because point n's output depends only on point n's input."""
    X = X.detach().requires_grad_(True)
    Y = fn(X)
    n, d_out = Y.shape
    frontier = {(): Y}
    values = {}
    for k in range(1, order + 1):
        create = k < order
        new = {}
        for idx, T in frontier.items():
            cols = []
            for j in range(d_out):
                Tj = T[:, j]
                g = None
                if Tj.requires_grad:
                    g = torch.autograd.grad(Tj, X, grad_outputs=torch.ones_like(Tj),
                                            create_graph=create, retain_graph=True,
                                            allow_unused=True)[0]
                cols.append(torch.zeros_like(X) if g is None else g)
            G = torch.stack(cols, dim=1)  # (n, d_out, D)
            for p in range(idx[-1] if idx else 0, len(wrt)):
                new[idx + (p,)] = G[:, :, wrt[p]]
        values.update({idx: to_numpy(t) for idx, t in new.items()})
        frontier = new
    return to_numpy(Y), values


def nested_forward(fn, X, order, wrt):
    """Nested forward mode: each distinct partial is a chain of directional derivatives."""
    from torch.func import jvp

    X = X.detach()
    basis = []
    for i in wrt:
        e = torch.zeros_like(X)
        e[:, i] = 1
        basis.append(e)

    def along(f, v):
        return lambda z: jvp(f, (z,), (v,))[1]

    values = {}
    for k in range(1, order + 1):
        for idx in sorted_multi_indices(len(wrt), k):
            g = fn
            for p in idx:
                g = along(g, basis[p])
            values[idx] = to_numpy(g(X))
    with torch.no_grad():
        y = to_numpy(fn(X))
    return y, values


# -- kinks --------------------------------------------------------------------------------
def _kink_values(func, args, kwargs):
    """The kink locations of a piecewise-linear torch function call, or None."""
    F = torch.nn.functional
    if func in (torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, F.leaky_relu,
                F.leaky_relu_, F.prelu, F.rrelu):
        return (0.0,)
    if func in (F.relu6,):
        return (0.0, 6.0)
    if func in (F.hardtanh, F.hardtanh_):
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return (float(lo), float(hi))
    return None


class KinkWatcher(torch.overrides.TorchFunctionMode):
    def __init__(self, n):
        super().__init__()
        self.hits = np.zeros(n, dtype=bool)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinks = _kink_values(func, args, kwargs)
        inp = args[0] if args else kwargs.get("input")
        if kinks is not None and isinstance(inp, torch.Tensor) and inp.ndim >= 1 \
                and inp.shape[0] == len(self.hits):
            flat = inp.detach().reshape(inp.shape[0], -1)
            for k in kinks:
                self.hits |= (flat == k).any(dim=1).cpu().numpy()
        return func(*args, **kwargs)
