"""PyTorch autodiff helpers of the torch backend: nested reverse mode (the ones trick),
nested forward mode (``torch.func.jvp``), exact norm layers for higher orders (the kink
watcher is :mod:`~nbderiv.backends.torch_kinks`).

>>> import torch
>>> from nbderiv.backends.torch_autodiff import nested_reverse
>>> y, values = nested_reverse(torch.sin, torch.zeros(2, 1, dtype=torch.float64), 1, (0,))
>>> values[("level", 1)][:, 0, 0].tolist()  # (n, partials, outputs)
[1.0, 1.0]
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch

from .base import sorted_multi_indices


@contextmanager
def grad_enabled(flag: bool):
    """Gradients recorded or not (also inside the user's ``inference_mode``); without them,
    through the kernels the derivative pass uses (:func:`no_fast_path`)."""
    with torch.inference_mode(False), torch.set_grad_enabled(flag):
        if flag:
            yield
        else:
            with no_fast_path():
                yield


@contextmanager
def no_fast_path():
    """PyTorch's ``TransformerEncoder`` / ``MultiheadAttention`` take a fused "fast path" when
    no gradient is recorded: other kernels than the derivative pass runs (a probe or a finite
    difference would look at another computation, rounded otherwise) and a one-time set-up of
    ~10 ms on first use. Switched off meanwhile; the user's setting
    (``torch.backends.mha.set_fastpath_enabled``) is put back."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


class _PlainNorms(torch.overrides.TorchFunctionMode):
    """Layer norm, instance norm and batch-statistics batch norm written as plain tensor
    operations.

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
        if func is torch.native_layer_norm:  # (out, mean, 1 / std): all three by the formula
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            bound = dict(zip(names, args, strict=False), **kwargs)
            h, shape = bound["input"], tuple(bound["normalized_shape"])
            dims = tuple(range(-len(shape), 0))
            mean = h.mean(dim=dims, keepdim=True)
            rstd = 1 / torch.sqrt(((h - mean) ** 2).mean(dim=dims, keepdim=True) + bound["eps"])
            return (_layer_norm(h, shape, bound.get("weight"), bound.get("bias"), bound["eps"]),
                    mean, rstd)
        if func in (F.instance_norm, torch.instance_norm):
            names = ("input", "running_mean", "running_var", "weight", "bias",
                     "use_input_stats", "momentum", "eps")
            bound = dict(zip(names, args, strict=False), **kwargs)
            if bound.get("use_input_stats", True):  # each sample's own statistics
                return _instance_norm_own_stats(bound["input"], bound.get("weight"),
                                                bound.get("bias"), bound.get("eps", 1e-5))
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


def _instance_norm_own_stats(input, weight, bias, eps):
    """Instance norm with each sample's own statistics, per channel over the other axes."""
    return _per_channel(input, tuple(range(2, input.ndim)), weight, bias, eps)


def _batch_norm_batch_stats(input, weight, bias, eps):
    return _per_channel(input, (0,) + tuple(range(2, input.ndim)), weight, bias, eps)


def _per_channel(input, dims, weight, bias, eps):
    """``input`` normalized over ``dims`` (the plain formula), then scaled and shifted per
    channel (axis 1)."""
    shape = (1, -1) + (1,) * (input.ndim - 2)
    mean = input.mean(dim=dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (input - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out + bias.reshape(shape) if bias is not None else out


@contextmanager
def exact_norms(order, forward=False):
    """Kernels that differentiate exactly to ``order``: plain norm layers and the math kernel
    of scaled-dot-product attention (:func:`math_attention`) from order 2 on, and the math
    attention kernel at any order in forward mode (``forward=True``)."""
    if order < 2:
        with math_attention(forward):
            yield
        return
    with _PlainNorms(), math_attention(True):
        yield


@contextmanager
def math_attention(on=True):
    """PyTorch's math kernel for ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
    ``nn.TransformerEncoder``) while nbderiv differentiates: the fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has neither a double backward nor a
    forward-mode rule. ``sdpa_kernel`` puts the user's own choice of kernels back after."""
    attention = getattr(torch.nn, "attention", None)
    select = getattr(attention, "sdpa_kernel", None)
    if not on or select is None:
        yield
        return
    with select([attention.SDPBackend.MATH]):
        yield


def to_numpy(t) -> np.ndarray:
    """A tensor's values as a NumPy array; bfloat16 (which NumPy lacks: a model run in
    autocast) as float32, which holds every bfloat16 value exactly."""
    t = t.detach()
    if t._is_zerotensor():  # the gradient of sign / abs' derivative: zeros kept symbolic
        t = torch.zeros(t.shape, dtype=t.dtype)
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def nested_reverse(fn, X, order, wrt, batch=False):
    """Nested reverse mode with the ones trick: grad(sum_n T[n]) = per-point gradients,
    valid because point n's output depends only on point n's input.

    Each partial is differentiated through the graph of the one backward pass that made it
    (never through a stack of several: a backward pass through a stack walks every stacked
    graph, with zero gradients, which made 12 outputs x 12 inputs at order 2 70x slower than
    the hand-written loop). ``batch=True``: the backward passes of the last level that share
    one graph run as one vmapped backward pass over one-hot cotangents
    (``is_grads_batched``) where there are at least :data:`BATCH_MIN` of them; only the last
    level, whose graph is not differentiated again (a graph made under vmap is slow to
    differentiate once more). A model without batching rules for its backward falls back to
    one pass per cotangent. Measured on 2 CPU cores (``benchmarks/real_models.py``): 3-4x
    faster for an LSTM's Hessian (160 inputs) and 2x for a TransformerEncoder's, 2.5x for
    an LSTM's 20 outputs at order 1; convolutions run slower batched on the CPU (the caller
    decides)."""
    X = X.detach().requires_grad_(True)
    Y = fn(X)
    n, d_out = Y.shape
    m = len(wrt)
    every = list(wrt) == list(range(X.shape[1]))  # every input, in order: slices, no gather
    index = None if every else torch.tensor(list(wrt), device=X.device)
    # the frontier: groups of partials that are columns of one tensor made by one pass,
    # each (tensor (n, C), [(multi-index, output j, column c)])
    groups = [(Y, [((), j, j) for j in range(d_out)])]
    values = {}
    for k in range(1, order + 1):
        create = k < order
        blocks, next_groups = {}, []  # blocks: multi-index of order k-1 -> {j: (n, L) partials}
        for G, entries in groups:
            grads = None
            if batch and not create and len(entries) >= BATCH_MIN:
                try:
                    grads = _batched_grads(G, X, [c for _, _, c in entries])
                except (RuntimeError, NotImplementedError):
                    batch = False  # no batching rule somewhere in the backward pass
            if grads is None:
                grads = [_grad(G[:, c], X, create) for _, _, c in entries]
            for (idx, j, _), g in zip(entries, grads):
                start = idx[-1] if idx else 0  # the distinct partials: p >= the last index
                blocks.setdefault(idx, {})[j] = g[:, start:] if every else g[:, index[start:]]
                if create:
                    next_groups.append((g, [(idx + (p,), j, wrt[p]) for p in range(start, m)]))
        # level k as one (n, L_k, d_out) array, its partials in sorted_multi_indices order
        parts = [blocks[idx][0].unsqueeze(2) if d_out == 1 else  # one output: a view
                 torch.stack([blocks[idx][j] for j in range(d_out)], 2)
                 for idx in sorted_multi_indices(m, k - 1)]
        values[("level", k)] = to_numpy(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
        groups = next_groups
    return to_numpy(Y), values


BATCH_MIN = 8          # fewer cotangents on one graph: one backward pass each is as fast
BATCH_ROWS = 1 << 15   # cotangents x points per vmapped backward pass (bounds its memory)


def _grad(T, X, create):
    """d T / d X (n, *X's axes) for a column T (n,) of per-point values, one backward pass
    (zeros where T does not depend on X)."""
    if not T.requires_grad:
        return torch.zeros_like(X)
    # the sum's gradient is the ones cotangent; passing it as grad_outputs instead makes
    # torch import sympy on its first use (0.4 s of a first call)
    g = torch.autograd.grad(T.sum(), X, create_graph=create, retain_graph=True,
                            allow_unused=True)[0]
    return torch.zeros_like(X) if g is None else g


def _batched_grads(G, X, columns):
    """[d G[:, c] / d X for c in columns]: vmapped backward passes over one-hot cotangents
    (groups of at most ``BATCH_ROWS // n``), without a graph."""
    n = G.shape[0]
    if not G.requires_grad:
        return [torch.zeros_like(X) for _ in columns]
    step = max(1, min(len(columns), BATCH_ROWS // max(n, 1)))
    out = []
    for start in range(0, len(columns), step):
        part = columns[start:start + step]
        E = torch.zeros((len(part),) + tuple(G.shape), dtype=G.dtype, device=G.device)
        E[torch.arange(len(part)), :, torch.tensor(part)] = 1
        with warnings.catch_warnings():  # vmap's "performance drop" notes on unbatched ops
            warnings.filterwarnings("ignore", message=".*[Pp]erformance drop")
            g = torch.autograd.grad(G, X, grad_outputs=E, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)[0]
        out += [torch.zeros_like(X)] * len(part) if g is None else list(g.unbind(0))
    return out


def forward_agrees(fn, X, order, wrt, values, rows=2, outputs=8) -> bool:
    """Whether nested forward mode's ``values`` ({multi-index: (n, d_out)}) agree with nested
    reverse mode at the first ``rows`` points and ``outputs`` outputs, every order: a few
    operations have wrong forward-over-forward rules (``torch.linalg.det`` gave a second
    derivative 3x the true one in torch 2.13), which reverse mode does not share. The
    tolerance is far above rounding (100 sqrt(eps) of each order's largest value)."""
    Z = X[:rows]
    cut = lambda T: fn(T)[:, :outputs]  # noqa: E731
    _, reverse = nested_reverse(cut, Z, order, wrt)
    eps = float(torch.finfo(X.dtype).eps)
    for k in range(1, order + 1):
        rev = reverse[("level", k)]  # (rows, L_k, outputs)
        fwd = np.stack([values[idx][:rows, :outputs] for idx in sorted_multi_indices(len(wrt), k)],
                       axis=1)
        scale = max(float(np.nanmax(np.abs(rev), initial=0.0)), 1e-30)
        with np.errstate(invalid="ignore"):
            if np.nanmax(np.abs(fwd - rev), initial=0.0) > 100 * eps ** 0.5 * scale:
                return False
    return True


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
    with grad_enabled(False):
        y = to_numpy(fn(X))
    return y, values
