"""The torch kink watcher: which points sit exactly where a piecewise function of the model
(ReLU, clamp, max / min, abs, hardtanh, ...) has a kink, seen in the very forward pass the
derivatives use (a ``TorchFunctionMode``).

>>> import torch
>>> with KinkWatcher(3) as watcher:
...     _ = torch.relu(torch.tensor([[1.0], [0.0], [-2.0]]))
>>> watcher.hits.tolist(), watcher.calls
([False, True, False], 1)
"""

from __future__ import annotations

import numpy as np
import torch


# -- kinks --------------------------------------------------------------------------------
# Where a function's first derivative jumps (or its value: Threshold, Hardshrink), read from
# the arguments of one call: each function maps (args, kwargs) to its kink locations (numbers,
# or tensors that broadcast against the input), or None where this call has no kink (ELU
# with alpha = 1, torch.max as a reduction). Inputs exactly at a location sit on the kink.
def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _at(*locations):
    return lambda args, kwargs: locations


def _bounds(low, high, low_default=None, high_default=None):
    """clamp(input, min, max) and hardtanh(input, min_val, max_val): either bound may be
    absent (None), a number or a tensor."""
    def where(args, kwargs):
        found = (_arg(args, kwargs, 1, low, low_default),
                 _arg(args, kwargs, 2, high, high_default))
        return tuple(v for v in found if v is not None) or None
    return where


def _one(name):
    """clamp_min(input, min), clamp_max(input, max), threshold(input, threshold, value): a
    jump where value != threshold, which autodiff meets as it meets a kink."""
    def where(args, kwargs):
        v = _arg(args, kwargs, 1, name)
        return None if v is None else (v,)
    return where


def _other(args, kwargs):
    """maximum / minimum / fmax / fmin (input, other), and max / min with a tensor as second
    argument (with a dim, or none, they are reductions: not looked at)."""
    other = _arg(args, kwargs, 1, "other")
    return (other,) if isinstance(other, torch.Tensor) else None


def _compared(args, kwargs):
    """gt / ge / lt / le (input, other), the comparisons a hand-written piecewise function is
    made of (``h * (h > 0)``, ``torch.where(h > 0, h, 0.1 * h)``): a point where the two
    sides are equal sits where the function switches pieces. Only a candidate: at-kink is
    raised where the one-sided slopes really differ (:func:`nbderiv.confirm.kinks_confirmed`)."""
    other = _arg(args, kwargs, 1, "other")
    return None if other is None else (other,)


def _shrink(args, kwargs):
    lambd = _arg(args, kwargs, 1, "lambd", 0.5)
    return (lambd, -lambd)


def _elu(args, kwargs):
    """elu(input, alpha, scale, input_scale): slopes scale * alpha * input_scale left of 0
    and scale right of it; alpha = 1 (the default) joins them smoothly: no first-order kink
    (CELU never has one)."""
    alpha, input_scale = _arg(args, kwargs, 1, "alpha", 1.0), _arg(args, kwargs, 3,
                                                                   "input_scale", 1.0)
    return None if float(alpha) * float(input_scale) == 1.0 else (0.0,)


_COMPARISONS = ["gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal"]


def _kink_table() -> dict:
    F, T, nn = torch.nn.functional, torch.Tensor, torch._C._nn
    zero, bounds = _at(0.0), _bounds("min", "max")
    spelled = [
        # ReLU and its relatives, functions, in-place versions and methods
        (zero, ["relu", "relu_", "prelu", "rrelu", "rrelu_", "selu", "selu_"],
         [F.relu, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.rrelu_, F.selu],
         ["relu", "relu_", "prelu"], ["leaky_relu", "leaky_relu_"]),
        (_at(0.0, 6.0), [], [F.relu6], [], ["relu6"]),
        (_bounds("min_val", "max_val", -1.0, 1.0), [], [F.hardtanh, F.hardtanh_], [],
         ["hardtanh", "hardtanh_"]),
        (_at(-3.0, 3.0), [], [F.hardsigmoid, F.hardswish], [],
         ["hardsigmoid", "hardsigmoid_", "hardswish", "hardswish_"]),
        (_elu, [], [F.elu, F.elu_], [], ["elu", "elu_"]),
        # the same kinks spelled otherwise: clamp, max / min of two tensors, abs
        (bounds, ["clamp", "clamp_", "clip", "clip_"], [], ["clamp", "clamp_", "clip", "clip_"],
         []),
        (_one("min"), ["clamp_min", "clamp_min_"], [], ["clamp_min", "clamp_min_"], []),
        (_one("max"), ["clamp_max", "clamp_max_"], [], ["clamp_max", "clamp_max_"], []),
        (_other, ["maximum", "minimum", "fmax", "fmin", "max", "min"], [],
         ["maximum", "minimum", "fmax", "fmin", "max", "min"], []),
        (zero, ["abs", "abs_", "absolute"], [], ["abs", "abs_", "absolute", "absolute_"], []),
        (_one("threshold"), ["threshold", "threshold_"], [F.threshold, F.threshold_], [], []),
        (_shrink, ["hardshrink"], [F.hardshrink, F.softshrink], ["hardshrink"],
         ["softshrink"]),
        # a piecewise function written by hand: the comparisons that pick its pieces, and the
        # step functions
        (_compared, _COMPARISONS, [], _COMPARISONS, []),
        (zero, ["sign", "sgn", "heaviside"], [], ["sign", "sign_", "sgn", "sgn_", "heaviside"],
         []),
    ]
    table = {}
    for where, in_torch, functions, methods, in_nn in spelled:
        found = [getattr(torch, n, None) for n in in_torch] + functions \
            + [getattr(T, n, None) for n in methods] + [getattr(nn, n, None) for n in in_nn]
        table.update((f, where) for f in found if f is not None)
    return table


_KINKS = _kink_table()


# -- ties -----------------------------------------------------------------------------------
# A max / min over some axes of each point (amax, max(dim=...), max pooling) has a kink where
# two of the values it picks from are equal: autodiff then picks one (max) or splits the
# gradient between them (amax), the one-sided slopes differ. Each function maps the call to a
# bool tensor, True where the picked value is tied (first axis: the call's), or None.
def _reduction_ties(args, kwargs):
    """amax / amin (input, dim, keepdim) and max / min (input, dim, keepdim) over axes of
    each point (not over the points: a reduction over axis 0, or over every axis, couples
    them and is not looked at)."""
    inp, dim = args[0], _arg(args, kwargs, 1, "dim")
    if isinstance(dim, torch.Tensor) or dim is None or dim == () or dim == []:
        return None  # max(input, other): elementwise (see _other); max(input): over all
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if inp.ndim < 2 or any(d % inp.ndim == 0 for d in dims):
        return None
    inp = inp.detach()
    top = inp.amax(dims, keepdim=True)
    return ((inp == top).sum(dims, keepdim=True) >= 2), top


def _min_ties(args, kwargs):
    return _reduction_ties((-args[0].detach(),) + tuple(args[1:]), kwargs)


def _pool_ties(with_indices, spatial, n_args):
    """max_pool1d/2d/3d and adaptive_max_pool1d/2d/3d: the windows whose largest value is held
    twice. The largest of each window is set aside (-inf) and the pooling run again: a window
    whose largest value stays the same holds it twice."""
    def ties(args, kwargs):
        inp = args[0].detach()
        rest = {k: v for k, v in kwargs.items() if k != "return_indices"}
        top, index = with_indices(inp, *args[1:n_args], **rest, return_indices=True)
        flat = inp.clone().flatten(inp.ndim - spatial)  # the indices count within a channel
        flat.scatter_(-1, index.flatten(index.ndim - spatial), float("-inf"))
        again = with_indices(flat.view_as(inp), *args[1:n_args], **rest,
                             return_indices=True)[0]
        return again == top, top
    return ties


def _norm_at_zero(args, kwargs):
    """norm / linalg.vector_norm / linalg.norm over axes of each point: the cone's tip, where
    the whole vector is 0 (the slope is +1 one way and -1 the other; autodiff gives 0)."""
    inp, dim = args[0], _arg(args, kwargs, 2, "dim")  # (input, p / ord, dim, keepdim)
    if isinstance(dim, torch.Tensor) or dim is None:
        return None  # over every axis: the points too
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if inp.ndim < 2 or not dims or any(d % inp.ndim == 0 for d in dims):
        return None
    return (inp.detach() == 0).all(dim=dims), None


def _tie_table() -> dict:
    F, T = torch.nn.functional, torch.Tensor
    table = {}
    for f in (torch.amax, T.amax, torch.max, T.max):
        table[f] = _reduction_ties
    for f in (torch.amin, T.amin, torch.min, T.min):
        table[f] = _min_ties
    for f in (torch.norm, T.norm, torch.linalg.vector_norm, torch.linalg.norm):
        table[f] = _norm_at_zero
    for d in (1, 2, 3):
        pool = getattr(F, f"max_pool{d}d_with_indices")
        adaptive = getattr(F, f"adaptive_max_pool{d}d_with_indices")
        for f in (getattr(F, f"max_pool{d}d"), pool):
            table[f] = _pool_ties(pool, d, 6)
        for f in (getattr(F, f"adaptive_max_pool{d}d"), adaptive):
            table[f] = _pool_ties(adaptive, d, 2)
    return table


_TIES = _tie_table()


def _dead_zero_table() -> frozenset:
    """The functions whose output is exactly 0 with no slope on either side over a whole
    range of inputs (ReLU's dead units): a tie at 0 among their outputs is no kink."""
    F, T = torch.nn.functional, torch.Tensor
    found = [torch.relu, getattr(torch, "relu_", None), F.relu, getattr(F, "relu_", None),
             T.relu, T.relu_, F.relu6, F.hardswish, F.hardsigmoid, F.threshold,
             getattr(F, "threshold_", None), getattr(torch._C._nn, "relu6", None),
             getattr(torch._C._nn, "hardswish", None), getattr(torch._C._nn, "hardsigmoid", None)]
    return frozenset(f for f in found if f is not None)


_DEAD_ZERO = _dead_zero_table()
_CLAMPS = frozenset(f for f in (torch.clamp, torch.clip, torch.clamp_min, torch.Tensor.clamp,
                                torch.Tensor.clip, torch.Tensor.clamp_min, torch.Tensor.clamp_,
                                torch.Tensor.clamp_min_) if f is not None)


def _dead_zeros(func, args, kwargs) -> bool:
    """Whether ``func(*args, **kwargs)`` gives dead zeros: a ReLU-type function, or a clamp
    from below at 0."""
    try:
        if func in _DEAD_ZERO:
            return True
        if func in _CLAMPS:
            low = _arg(args, kwargs, 1, "min")
            return isinstance(low, (int, float)) and low == 0
    except TypeError:  # not hashable
        return False
    return False


def _kink_values(func, args, kwargs):
    """The kink locations of a call of a piecewise torch function (numbers, or tensors that
    broadcast against its input), or None: no such function, or no kink in this call.

    >>> import torch
    >>> h = torch.zeros(2, 3)
    >>> _kink_values(torch.Tensor.clamp, (h,), {"min": 0}), _kink_values(torch.sin, (h,), {})
    ((0,), None)
    """
    try:
        where = _KINKS.get(func)
    except TypeError:  # not hashable: none of ours
        return None
    return None if where is None else where(args, kwargs)


_functorch = getattr(torch._C, "_functorch", None)


def _unwrapped(t):
    """The tensor inside torch.func's wrappers (``torch.func.grad`` / ``jacrev`` inside the
    model); None inside ``vmap`` (its batch axis is hidden: the first axis seen there is not
    the points')."""
    if _functorch is None or not isinstance(t, torch.Tensor):
        return t
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return None
        t = _functorch.get_unwrapped(t)
    return t


def _storage(t) -> int:
    """Where a tensor's values live (shared by its views), 0 where that cannot be read."""
    try:
        inner = _unwrapped(t)
        return 0 if inner is None else inner.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - a tensor without storage (a meta or fake tensor)
        return 0


class KinkWatcher(torch.overrides.TorchFunctionMode):
    """Which of ``n`` points sit exactly on a kink of a piecewise function while the model
    runs under it: a ReLU-type input (relu, leaky_relu, prelu, rrelu, relu6, hardtanh,
    hardsigmoid, hardswish, selu, elu with alpha != 1), or the same kink spelled otherwise
    (clamp / clip, maximum / minimum / max / min of two tensors, abs, threshold, hardshrink /
    softshrink), or written by hand (the comparisons gt / ge / lt / le that pick the pieces of
    ``h * (h > 0)`` or ``torch.where(h > 0, h, 0.1 * h)``, sign, heaviside), as functions,
    in-place versions or Tensor methods; or a max / min over each point's axes (amax / amin,
    max / min with a dim, max pooling) whose largest values tie (not at the dead zeros of a
    ReLU-type layer's output), or a vector
    norm over each point's axes (norm, linalg.vector_norm) of an all-zero vector. A call's rows are the
    points where the first axis of its input (broadcast against tensor locations) has the
    points' length ``n``; ``calls`` counts the calls of such functions on floating-point
    inputs (none: the model is kink-free). The caught function is looked up in a dict first.

    >>> import torch
    >>> h = torch.tensor([[0.0, 1.0], [2.0, 3.0], [-1.0, 0.0]])
    >>> with KinkWatcher(3) as w:
    ...     _ = h.clamp(min=0), torch.maximum(h, torch.full_like(h, 3.0)), torch.sin(h)
    >>> w.hits.tolist(), w.calls
    ([True, True, True], 2)
    """

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.calls = 0  # calls of piecewise functions seen
        self._rows = None  # (n,) bool, on the device of the first call seen
        self._dead = set()  # the storages of ReLU-type outputs: their zeros have no slope

    @property
    def hits(self) -> np.ndarray:
        """(n,) bool: the points with an input exactly at a kink."""
        if self._rows is None:
            return np.zeros(self.n, dtype=bool)
        return self._rows.cpu().numpy()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            where = _KINKS.get(func)
        except TypeError:  # not hashable: none of ours
            where = None
        if where is not None:  # before the call: an in-place one changes its input
            self._look(where, args, kwargs)
        try:
            ties = _TIES.get(func)
        except TypeError:
            ties = None
        if ties is not None:
            self._look_for_ties(ties, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and _dead_zeros(func, args, kwargs):
            self._dead.add(_storage(out))
        return out

    def _look_for_ties(self, ties, args, kwargs):
        inp = args[0] if args else kwargs.get("input")
        if not isinstance(inp, torch.Tensor) or not inp.is_floating_point():
            return
        inp = _unwrapped(inp)
        if inp is None or inp.ndim == 0 or inp.shape[0] != self.n:
            return
        try:
            found = ties((inp,) + tuple(args[1:]), kwargs)
        except Exception:  # an argument form not read here: the call itself will tell
            return
        if found is None:
            return
        tied, top = found
        if top is not None and _storage(inp) in self._dead:
            # a window of dead ReLU units ties at an exact 0, with no slope on either side;
            # zeros of the input itself (a black background) or of a linear layer move
            tied = tied & (top != 0)
        self.calls += 1
        rows = tied.reshape(self.n, -1).any(dim=1)
        self._rows = rows if self._rows is None else \
            torch.logical_or(self._rows, rows.to(self._rows.device))

    def _look(self, where, args, kwargs):
        inp = args[0] if args else kwargs.get("input")
        if not isinstance(inp, torch.Tensor):
            return
        locations = where(args, kwargs)
        if locations is None:
            return
        if inp.ndim == 0 and len(locations) == 1 and isinstance(locations[0], torch.Tensor) \
                and locations[0].ndim > 0:  # torch.tensor(0.0) < h: the points are on the right
            inp, locations = locations[0], (inp,)
        if not inp.is_floating_point():
            return
        self.calls += 1
        inp = _unwrapped(inp)
        if inp is None or inp.ndim == 0:
            return
        shape = inp.shape
        if any(isinstance(k, torch.Tensor) for k in locations):
            locations = [_unwrapped(k) for k in locations]
            if any(k is None for k in locations):
                return
            shape = torch.broadcast_shapes(shape, *(k.shape for k in locations
                                                    if isinstance(k, torch.Tensor)))
        if len(shape) == 0 or shape[0] != self.n:
            return
        mask = None
        for k in locations:
            at = inp.detach() == (k.detach() if isinstance(k, torch.Tensor) else k)
            mask = at if mask is None else mask | at
        rows = mask.reshape(shape[0], -1).any(dim=1)
        self._rows = rows if self._rows is None else \
            torch.logical_or(self._rows, rows.to(self._rows.device))
