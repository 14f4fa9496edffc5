"""Turning what the user passed as ``x`` into (N, d_i) float arrays, and checking outputs.

Everything here works on numpy arrays and shapes only; the framework backends turn
framework tensors into numpy first (``Backend.to_numpy``) and call
:func:`check_output` on what the model returns.

>>> import numpy as np
>>> from nbderiv.inputs import prepare_inputs
>>> p = prepare_inputs(np.arange(3), to_numpy=np.asarray)
>>> p.arrays[0].shape, p.reshaped, p.was_integer
((3, 1), True, True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import (
    InputShapeError,
    InputTypeError,
    NbderivError,
    OptionError,
    OutputError,
)
from .result import Finding
from .wrapped import is_framework_object


@dataclass
class PreparedInput:
    """The model's arguments as numpy arrays of shape (N, d_i) (each point's values, flattened:
    d_i = prod(S_i) for an argument of shape (N, *S_i)), plus what was done to them."""

    arrays: list
    several: bool          # True when x was a tuple of separate arguments
    reshaped: bool         # some argument had shape (N,) (or was a scalar)
    was_integer: bool      # some argument was integer/bool and will be cast
    original_shapes: list
    point_shapes: list = None  # S_i, each point's shape per argument ((1,) for (N,) inputs)
    list_items: tuple = ()     # x was a list of arrays / tensors: their shapes (read as points)

    def __post_init__(self):
        if self.point_shapes is None:
            self.point_shapes = [tuple(a.shape[1:]) for a in self.arrays]

    @property
    def n_points(self) -> int:
        return self.arrays[0].shape[0]

    @property
    def widths(self) -> list:
        return [a.shape[1] for a in self.arrays]

    @property
    def width(self) -> int:
        return sum(self.widths)

    def cast(self, dtype) -> list:
        """The arrays as C-contiguous copies in ``dtype`` (never views of the user's data)."""
        return [np.array(a, dtype=dtype, order="C", copy=True) for a in self.arrays]


def _as_array(x, to_numpy, what: str) -> np.ndarray:
    try:
        a = to_numpy(x)
    except NbderivError:  # the backend's own clear message (e.g. another framework's tensor)
        raise
    except Exception as exc:  # e.g. ragged nested lists, strings
        items = _array_items(x) if what == "x" else []
        fix = ("Fix: pass a numpy array, a nested list of numbers, or a framework tensor."
               if not items else
               f"{what} is a list of {len(items)} arrays / tensors, which nbderiv reads as "
               "points, like np.array(x). Fix: if they are separate arguments of the model, "
               "pass them as a tuple, x=tuple(x) (e.g. (x, t) rather than [x, t]); if they are "
               "points, pass one array of shape (N, *S), e.g. torch.stack(x) or np.stack(x).")
        raise InputTypeError(
            f"{what} could not be read as a numeric array ({type(x).__name__}: "
            f"{str(exc).strip().rstrip('.')}). {fix}"
        ) from None
    if a.dtype.kind not in "biuf":
        raise InputTypeError(
            f"{what} must be numeric, got dtype {a.dtype}. "
            "Fix: pass real numbers, e.g. np.asarray(x, dtype=np.float32)."
        )
    return a


def shape_of(obj) -> tuple | None:
    """The shape of a numpy array or framework tensor (read, nothing converted); None for
    anything else, a model's weights and a shape that is not known yet."""
    if not is_framework_object(obj) or {c.__name__ for c in type(obj).__mro__} & _WEIGHTS:
        return None
    try:
        return tuple(int(s) for s in obj.shape)
    except Exception:  # no shape, or a symbolic one
        return None


_MAX_ARGUMENTS = 8  # a longer list of arrays is taken for points only, never for arguments
_WEIGHTS = {"Parameter", "UninitializedParameter", "Variable", "ResourceVariable",
            "KerasVariable"}


def _array_items(x) -> list:
    """The shapes of a list's items when every item is an array or tensor, else [] (and for
    a list too long to be a model's separate arguments)."""
    if not isinstance(x, list) or len(x) > _MAX_ARGUMENTS:
        return []
    shapes = [shape_of(item) for item in x]
    return shapes if shapes and all(s is not None for s in shapes) else []


class Shared:
    """A keyword argument passed to the model as it is, the same for every point (see
    :func:`shared`)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        shape = shape_of(self.value)
        return f"nbderiv.shared({type(self.value).__name__}" + \
            (f" of shape {shape})" if shape is not None else ")")


def shared(value) -> Shared:
    """Marks a value in ``kwargs=`` as the same for every point: it is passed to the model as
    it is, never sliced with the points (nbderiv otherwise slices every array whose first
    axis has length N). For an attention mask of shape (T, T) when there are N == T points:
    ``kwargs={"mask": nbderiv.shared(mask)}``.

    >>> import torch, nbderiv
    >>> w = torch.tensor([1.0, 2.0, 3.0])  # three weights, and three points
    >>> d = nbderiv.derivatives(lambda x, w: x ** 2 @ w[:, None], torch.ones(3, 3), order=1,
    ...                         kwargs={"w": nbderiv.shared(w)})
    >>> d[1][0, 0].tolist()
    [2.0, 4.0, 6.0]
    """
    return value if isinstance(value, Shared) else Shared(value)


def prepare_inputs(x, *, to_numpy, argument_names=None) -> PreparedInput:
    """Validate ``x`` (array-like, or a tuple of array-likes = several arguments).
    ``argument_names(n)``: the model's names of its first n arguments (or None), asked only
    to say in which order a dict's values go."""
    several = isinstance(x, tuple)
    if any(isinstance(p, Shared) for p in (x if several else (x,))):
        raise InputTypeError("nbderiv.shared(...) marks a keyword argument in kwargs= that is "
                             "the same for every point; x is what nbderiv differentiates. "
                             "Fix: pass x itself, and shared values as kwargs={'name': "
                             "nbderiv.shared(value)}.")
    parts = list(x) if several else [x]
    if several and not parts:
        raise InputShapeError("x is an empty tuple. Fix: pass (x, t, ...) with one array per argument.")
    if isinstance(x, dict):
        names = None
        if argument_names is not None:
            try:
                names = argument_names(len(x))
            except Exception:  # e.g. another number of Inputs: the message stays general
                names = None
        raise InputTypeError(_dict_message(x, names))
    arrays, shapes, reshaped, integer, point_shapes = [], [], False, False, []
    for i, part in enumerate(parts):
        what = f"x[{i}] (argument {i + 1} of the tuple)" if several else "x"
        a = _as_array(part, to_numpy, what)
        shapes.append(tuple(a.shape))
        if a.dtype.kind in "biu":
            integer = True
        if a.ndim == 0:
            a, reshaped = a.reshape(1, 1), True
        elif a.ndim == 1:
            a, reshaped = a.reshape(-1, 1), True
        if a.shape[0] == 0:
            raise InputShapeError(f"{what} has shape {a.shape}: no points. Fix: pass at least one point.")
        if 0 in a.shape[1:]:
            raise InputShapeError(f"{what} has shape {a.shape}: no features. Fix: pass (N, d_in) "
                                  "with d_in >= 1 (or (N, C, H, W), ... with no empty axis).")
        point_shapes.append(tuple(a.shape[1:]))
        arrays.append(a.reshape(a.shape[0], -1))
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) > 1:
        raise InputShapeError(
            f"the arguments in the tuple have different numbers of points {[a.shape[0] for a in arrays]}. "
            "Fix: give every argument the same first dimension N."
        )
    return PreparedInput(arrays, several, reshaped, integer, shapes, point_shapes,
                         () if several else tuple(_array_items(x)))


def _dict_message(x: dict, names=None) -> str:
    """What to pass instead of a dict: its one value, or its values as a tuple, in the order
    of ``names`` (the model's argument or Input names, when they are the dict's keys).

    >>> print(_dict_message({"t": 1, "x": 2}, names=["x", "t"]).split("Fix: ")[1])
    pass x=(x['x'], x['t']): the model's inputs in the order it takes them (x, t).
    """
    keys = list(x)
    if len(keys) == 1:
        return (f"x is a dict (key {keys[0]!r}); nbderiv passes the model positional arguments. "
                f"Fix: pass the array itself, x=x[{keys[0]!r}] (a Keras model built on a dict "
                "of one input takes it that way too).")
    start = (f"x is a dict (keys {', '.join(map(repr, keys[:6]))}"
             f"{', ...' if len(keys) > 6 else ''}); nbderiv passes the model positional "
             "arguments, a tuple of arrays. ")
    names = [str(n) for n in names] if names else None
    if names and sorted(names) == sorted(map(str, keys)):
        by_name = {str(k): k for k in keys}
        shown = ", ".join(f"x[{by_name[n]!r}]" for n in names)
        return (start + f"Fix: pass x=({shown}): the model's inputs in the order it takes "
                f"them ({', '.join(names)}).")
    takes = f" (this model takes {', '.join(names)})" if names else ""
    args = ", ".join(str(k) if str(k).isidentifier() else f"a{i}" for i, k in enumerate(keys))
    as_dict = ", ".join(f"{k!r}: {a}" for k, a in zip(keys, args.split(", ")))
    given = ", ".join(f"x[{k!r}]" for k in keys)
    one = (f" A model that takes the one dict itself (forward(self, batch) reading "
           f"batch['x']) gets it from a function of separate arguments: "
           f"nbderiv.derivatives(lambda {args}: model({{{as_dict}}}), ({given})).")
    return (start + "Fix: pass a tuple of the arrays in the order the model takes them"
            f"{takes}, e.g. x=(x['x'], x['t']) for a model called as model(x, t) or built "
            "on keras.Input(name='x') and keras.Input(name='t') in that order." + one)


def input_names(prepared: PreparedInput, argument_names=None) -> tuple:
    """Flat names of the input features: ``x`` / ``x[0], x[1]`` / ``x, t`` / ``x[0], x[1], t``."""
    if not prepared.several:
        arg_names = ["x"]
    else:
        arg_names = list(argument_names or [])
        if len(arg_names) != len(prepared.arrays) or len(set(arg_names)) != len(arg_names):
            arg_names = [f"arg{i}" for i in range(len(prepared.arrays))]
    shapes = prepared.point_shapes or [(w,) for w in prepared.widths]
    return _feature_names(tuple(arg_names), tuple(prepared.widths),
                          tuple(tuple(s) for s in shapes))


@functools.lru_cache(maxsize=64)
def _feature_names(arg_names, widths, shapes) -> tuple:
    """The names for these arguments and shapes (remembered: an image has thousands)."""
    names = []
    for name, width, shape in zip(arg_names, widths, shapes):
        if width == 1:
            names.append(name)
        elif len(shape) == 1:
            names += [f"{name}[{i}]" for i in range(width)]
        else:  # x[c,h,w] for a point of shape (C, H, W): flat index i is np.unravel_index(i)
            names += [f"{name}[{','.join(map(str, ix))}]" for ix in np.ndindex(*shape)]
    return tuple(names)


ROUNDED_SHARE = 1e-4  # input-rounded: the cast moves a point by this share of the spread


def input_findings(prepared: PreparedInput, dtype, names=None) -> list:
    """The ``input-reshaped``, ``integer-input`` and ``input-rounded`` findings (``names``:
    one per input feature, for the last)."""
    findings = []
    if prepared.reshaped:
        shapes = ", ".join(str(s) for s in prepared.original_shapes)
        n = prepared.n_points
        findings.append(Finding(
            "input-reshaped", "info",
            f"x had shape {shapes}; it was read as {n} point(s) of one feature each "
            f"(shape ({n}, 1)).",
            "If you meant a single point with several features, pass x.reshape(1, -1).",
        ))
    if prepared.was_integer:
        findings.append(Finding(
            "integer-input", "info",
            f"x was an integer array; it was cast to {np.dtype(dtype).name} before differentiation "
            "(autodiff needs floating-point inputs; TensorFlow silently returns None for int tensors).",
            f"Pass floats yourself, e.g. x.astype('{np.dtype(dtype).name}'). If x holds token "
            "ids or indices (an embedding's input), they have no derivative: differentiate "
            "with respect to the embeddings instead (e = embedding(tokens), then "
            "nbderiv.derivatives(lambda e: rest_of_model(e), e)).",
        ))
    rounded = _rounded_by_cast(prepared, np.dtype(dtype), names)
    if rounded:
        findings.append(rounded)
    return findings


def _rounded_by_cast(prepared, dtype, names):
    """``input-rounded`` where casting x to the model's ``dtype`` moves points by more than
    :data:`ROUNDED_SHARE` of an input's spread (t = 1e4 + [0, 0.01] in float32: by 2% of
    it): the derivatives are those at the rounded points, which ``d.x`` holds. None
    otherwise."""
    worst, offset = None, 0
    for a in prepared.arrays:
        cols = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        if a.dtype.kind == "f" and a.dtype.itemsize > dtype.itemsize and cols.size:
            with np.errstate(invalid="ignore", over="ignore"):
                moved = np.abs(cols.astype(dtype).astype(a.dtype) - cols)
                kept = np.isfinite(cols)
                low = np.where(kept, cols, np.inf).min(axis=0)
                high = np.where(kept, cols, -np.inf).max(axis=0)
                spread = high - low
                share = np.where(spread > 0, np.nanmax(np.where(kept, moved, 0), axis=0)
                                 / np.where(spread > 0, spread, 1), 0)
            i = int(np.argmax(share))
            if share[i] > ROUNDED_SHARE and (worst is None or share[i] > worst[0]):
                worst = (float(share[i]), offset + i, float(moved[:, i].max()),
                         float(spread[i]), float(low[i]), float(high[i]))
        offset += cols.shape[1]
    if worst is None:
        return None
    share, i, moved, spread, low, high = worst
    name = names[i] if names is not None and i < len(names) else f"input {i}"
    return Finding(
        "input-rounded", "warning",
        f"x was cast to {dtype.name}, the model's dtype, and that moved the points by up to "
        f"{moved:.2g} in {name}, {100 * share:.2g}% of its spread ({low:.10g} to {high:.10g}): "
        f"{dtype.name} cannot tell values that close apart at that size. The derivatives are "
        "those at the rounded points (d.x holds them), not at the ones you passed.",
        f"shift or scale that input outside the model so that {dtype.name} resolves it (e.g. "
        f"x - {low:.6g}, folding the shift into the model), or compute in float64 (a float64 "
        "copy of the model, e.g. model.double() in torch).")


def check_order(order) -> int:
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or order < 1:
        raise _option_error(f"order must be a positive int (1, 2, 3, ...), got {order!r}. Fix: e.g. order=2.")
    return int(order)


def check_wrt(wrt, width: int, names) -> tuple:
    """``wrt=`` as indices 0..width-1 of the input features: one index, or a list, array or
    integer tensor of them (``names``: one name per feature, a few of them shown in errors).

    >>> check_wrt(np.array([2, -1]), 4, ("x[0]", "x[1]", "x[2]", "x[3]"))
    (2, 3)
    """
    if wrt is None:
        return tuple(range(width))
    if isinstance(wrt, str) or (isinstance(wrt, (list, tuple)) and wrt
                                and all(isinstance(i, str) for i in wrt)):
        wanted = [wrt] if isinstance(wrt, str) else list(wrt)
        found = [k for w in wanted for k, n in enumerate(names or ())
                 if str(n) == w or str(n).startswith(w + "[")]
        fix = (f"wrt={found} (the feature(s) named {', '.join(map(repr, wanted))})"
               if found else "e.g. wrt=[0]")
        raise _option_error(f"wrt takes input indices, got {_short(wrt)}; the inputs are "
                            f"{_some(names or ())}. Fix: {fix}.")
    wrt = _plain(wrt)
    if isinstance(wrt, np.ndarray):
        if wrt.dtype.kind == "b":
            raise _option_error(f"wrt is an array of bools (shape {wrt.shape}); wrt lists the "
                                "indices of inputs. Fix: for a mask, wrt=np.flatnonzero(mask).")
        if wrt.ndim > 1:
            raise _option_error(f"wrt must be a flat list of input indices, got an array of shape "
                                f"{wrt.shape}. Fix: for points of several axes, flat indices "
                                "in C order, e.g. np.ravel_multi_index((c, h, w), S).")
        wrt = wrt[()] if wrt.ndim == 0 else wrt
    if isinstance(wrt, (int, np.integer)) and not isinstance(wrt, (bool, np.bool_)):
        wrt = [wrt]
    try:
        items = [_plain(i) for i in wrt]
    except TypeError:
        raise _option_error(f"wrt must be a list of input indices, got {_short(wrt)}. "
                            "Fix: e.g. wrt=[0].") from None
    if not items:
        raise _option_error("wrt is empty. Fix: list at least one input index, or leave wrt=None for all.")
    out = []
    for i in items:
        if isinstance(i, np.ndarray) and i.ndim == 0:
            i = i[()]
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise _option_error(f"wrt entries must be ints, got {_short(i)}. Fix: e.g. wrt=[0, 1].")
        if not -width <= i < width:
            several = width > 1 and "," in str(names[0])
            raise _option_error(
                f"wrt index {int(i)} is out of range: the input has {width} feature(s) "
                f"({_some(names)}). Fix: use indices 0..{width - 1}"
                + (" (for points of several axes, the flat index in C order, "
                   "np.ravel_multi_index((c, h, w), S))." if several else "."))
        out.append(int(i) % width)
    if len(set(out)) != len(out):
        again = next(items[k] for k, i in enumerate(out) if i in out[:k])
        raise _option_error(f"wrt has input {int(again) % width} more than once. "
                            "Fix: list each input once.")
    return tuple(out)


def _plain(obj):
    """A framework tensor as a numpy array, anything else as it is (no framework imported)."""
    if isinstance(obj, np.ndarray) or shape_of(obj) is None:
        return obj
    try:
        if callable(getattr(obj, "detach", None)):  # torch: off the graph and the device
            obj = obj.detach().cpu()
        return np.asarray(obj)
    except Exception:
        return obj


def _some(names, most: int = 6) -> str:
    """The names, or the first and last few of a long list."""
    names = [str(n) for n in names]
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"


def _short(value, most: int = 80) -> str:
    """``repr(value)``, cut short."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 5] + " ...)"


def _option_error(message):
    from .errors import OptionError

    return OptionError(message)


def check_output(shape, is_floating: bool, dtype_name: str, n_points: int, type_name: str = "",
                 returned=None) -> tuple:
    """Validate a model output's shape/dtype; return the (N, d_out) shape it is read as.
    ``n_points`` is the number of points in the batch the model was called on; ``returned``,
    what a model returned that is no tensor (for a fix that names its keys or length).

    >>> check_output((5, 2, 3), True, "float32", 5)
    (5, 6)
    """
    if shape is None:
        if type_name == "ndarray":  # computed outside the framework: no derivatives
            raise OutputError(
                "the model returned a NumPy array, not a tensor: the framework's autodiff "
                "cannot follow NumPy (its derivatives would all read 0). Fix: compute with the "
                "framework's operations (torch.sin / tf.sin instead of np.sin, no .numpy()) "
                "and return one tensor of shape (N, d_out).")
        raise OutputError(_not_a_tensor(type_name, returned))
    if "complex" in dtype_name:
        raise OutputError(
            f"the model's output has dtype {dtype_name}; nbderiv differentiates real outputs "
            "only (a complex output would silently lose its imaginary part). "
            "Fix: return the real and imaginary parts as separate real outputs, e.g. "
            "torch.cat([y.real, y.imag], dim=1) or tf.concat([tf.math.real(y), "
            "tf.math.imag(y)], axis=1)."
        )
    if not is_floating:
        raise OutputError(
            f"the model's output has dtype {dtype_name}; derivatives need a floating-point output. "
            "Fix: do not round or cast the output to an integer/bool type inside the model."
        )
    if len(shape) == 0 or shape[0] != n_points:
        # n_points is the size of the batch this call got (the probe's few points, a block of
        # points, or all of x), not necessarily the N of x
        raise OutputError(
            f"the model returned shape {tuple(shape)} when nbderiv called it on a batch of "
            f"{n_points} point{'s' if n_points != 1 else ''}; nbderiv needs one output row per "
            f"point of the batch, here shape ({n_points}, d_out) or ({n_points},), and it calls "
            "the model on batches of points (some or all of the points of x). Fix: do not reduce "
            "over the points inside the model (no sum or mean over the first axis, such as "
            "y.sum() or y.mean(0)); return one row per point and reduce outside the model."
            + (" A batch of one point that comes back without its axis is .squeeze() at "
               "work: it drops every axis of size 1, the points' too when there is one. Use "
               ".squeeze(-1) (or .reshape(len(x), -1)) instead." if n_points == 1 and
               len(shape) < 2 else "")
        )
    d_out = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if d_out == 0:
        raise OutputError(
            f"the model returned shape {tuple(shape)}: no output values per point, so there is "
            "nothing to differentiate. A slice past the end of the features (x[:, 1:] on "
            "points of one feature) or of an output of the wrong width does this. Fix: check "
            "the width of each input the model slices, and that it returns at least one value "
            "per point.")
    return (n_points, d_out)


def target_values(target, n: int, to_numpy) -> np.ndarray:
    """``target=`` read as the output index of each of the ``n`` points (shape (n,)): one
    int for every point, or one int per point.

    >>> target_values(3, 2, np.asarray).tolist()
    [3, 3]
    """
    fix = (f"Fix: e.g. target=3 (the same output for every point) or target=labels (one int "
           f"per point, shape ({n},)).")
    if isinstance(target, (bool, np.bool_)):
        raise OptionError(f"target={target!r} is a bool, not the index of an output. {fix}")
    try:
        t = np.asarray(to_numpy(target))
    except NbderivError:  # the backend's own clear message (e.g. another framework's tensor)
        raise
    except Exception:
        raise OptionError(f"target could not be read as ints ({type(target).__name__}). "
                          f"{fix}") from None
    if t.ndim == 2 and t.shape[0] == n and t.shape[1] > 1 and t.size \
            and np.isin(t, (0, 1)).all() and (t.sum(axis=1) == 1).all():
        raise OptionError(f"target looks one-hot encoded (shape {t.shape}, one 1 per row); "
                          "target= takes each point's label, the index of its output. Fix: "
                          "target=labels.argmax(1) (numpy / torch) or tf.argmax(labels, 1).")
    if t.dtype.kind == "b":
        raise OptionError(f"target holds bools (dtype {t.dtype}), not the indices of outputs. "
                          f"{fix}")
    if t.dtype.kind not in "iu":
        got = f"{target!r}" if t.ndim == 0 else f"dtype {t.dtype}"
        raise OptionError(f"target must hold ints, the indices of outputs, got {got}. Fix: "
                          "pass integer labels, e.g. target=labels.astype(int) (numpy) or "
                          "target=labels.long() (torch).")
    if t.ndim == 0:
        t = np.full(n, t)
    if t.shape != (n,):
        raise OptionError(f"target must be one int, or one int per point (shape ({n},)), got "
                          f"shape {t.shape}. {fix}")
    if t.size and t.min() < 0:
        at = int(np.argmax(t < 0))
        where = "" if np.ndim(target) == 0 else f" (at point {at})"
        raise OptionError(f"target {int(t[at])}{where} is negative: targets are the indices of "
                          "the model's outputs, 0..d_out-1, and a negative one does not count "
                          f"from the end here. {fix}")
    return t


def _not_a_tensor(type_name, returned) -> str:
    """The message for a model output that is no tensor: a dict's keys or a tuple's length
    named, with the wrapper that picks one."""
    if hasattr(returned, "keys") and callable(returned.keys):
        try:
            keys = [k for k in returned.keys()]
        except Exception:
            keys = []
        if keys:
            shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
            return (f"the model returned a {type_name} with the keys {shown}, not one tensor: "
                    "nbderiv differentiates one output tensor. Fix: pass a wrapper that picks "
                    f"it, e.g. lambda z: model(z)[{keys[0]!r}] (several: torch.cat / tf.concat "
                    "of them along axis 1).")
    if isinstance(returned, (tuple, list)) and returned:
        return (f"the model returned a {type_name} of {len(returned)} values, not one tensor "
                "(an RNN returns (output, state), some models (y, extras)): nbderiv "
                "differentiates one output tensor. Fix: pass a wrapper that picks it, e.g. "
                "lambda z: model(z)[0].")
    return (f"the model returned {type_name or 'a non-tensor'}, not a tensor. "
            "Fix: make the model (or a wrapper lambda) return one tensor of shape (N, d_out).")


def check_target(largest: int, d_out: int) -> None:
    """A target must name one of the model's outputs."""
    if largest >= d_out:
        raise OptionError(
            f"target {largest} is out of range: the model has {d_out} output(s) per point. "
            f"Fix: use targets 0..{d_out - 1}.")
