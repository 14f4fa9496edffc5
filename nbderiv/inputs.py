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

import contextvars
import functools
from dataclasses import dataclass

import numpy as np

from .errors import (
    InputShapeError,
    InputTypeError,
    ModelCallError,
    NbderivError,
    OptionError,
    OutputError,
)
from .result import Finding
from .wrapped import is_framework_object, user_frames


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


def _shape_of(obj) -> tuple | None:
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
    shapes = [_shape_of(item) for item in x]
    return shapes if shapes and all(s is not None for s in shapes) else []


class Shared:
    """A keyword argument passed to the model as it is, the same for every point (see
    :func:`shared`)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        shape = _shape_of(self.value)
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


def prepare_inputs(x, *, to_numpy) -> PreparedInput:
    """Validate ``x`` (array-like, or a tuple of array-likes = several arguments)."""
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
        raise InputTypeError(
            f"x is a dict (keys {', '.join(map(repr, list(x)[:6]))}); nbderiv passes the model "
            "positional arguments. Fix: pass a tuple in the order the model takes them, e.g. "
            "x=(x_values, t_values) for a model called as model(x, t); for a Keras model whose "
            f"inputs are a dict, the values in the sorted order of its keys: x=tuple(x[k] for k "
            f"in sorted(x)) = ({', '.join(f'x[{k!r}]' for k in sorted(map(str, x))[:6])}).")
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


def input_findings(prepared: PreparedInput, dtype) -> list:
    """The ``input-reshaped`` and ``integer-input`` findings."""
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
            f"Pass floats yourself, e.g. x.astype('{np.dtype(dtype).name}').",
        ))
    return findings


def check_order(order) -> int:
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or order < 1:
        raise _option_error(f"order must be a positive int (1, 2, 3, ...), got {order!r}. Fix: e.g. order=2.")
    return int(order)


def check_wrt(wrt, width: int, names) -> tuple:
    if wrt is None:
        return tuple(range(width))
    if isinstance(wrt, (int, np.integer)) and not isinstance(wrt, bool):
        wrt = [wrt]
    try:
        items = list(wrt)
    except TypeError:
        raise _option_error(f"wrt must be a list of input indices, got {wrt!r}. Fix: e.g. wrt=[0].") from None
    if not items:
        raise _option_error("wrt is empty. Fix: list at least one input index, or leave wrt=None for all.")
    out = []
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise _option_error(f"wrt entries must be ints, got {i!r}. Fix: e.g. wrt=[0, 1].")
        if not -width <= i < width:
            raise _option_error(
                f"wrt index {i} is out of range: the input has {width} feature(s) "
                f"({', '.join(names)}). Fix: use indices 0..{width - 1}."
            )
        out.append(int(i) % width)
    if len(set(out)) != len(out):
        raise _option_error(f"wrt has repeated indices {items}. Fix: list each input once.")
    return tuple(out)


def _option_error(message):
    from .errors import OptionError

    return OptionError(message)


def check_output(shape, is_floating: bool, dtype_name: str, n_points: int, type_name: str = "") -> tuple:
    """Validate a model output's shape/dtype; return the (N, d_out) shape it is read as."""
    if shape is None:
        raise OutputError(
            f"the model returned {type_name or 'a non-tensor'}, not a tensor. "
            "Fix: make the model (or a wrapper lambda) return one tensor of shape (N, d_out)."
        )
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
        raise OutputError(
            f"the model returned shape {tuple(shape)} for {n_points} input point(s); nbderiv needs one "
            f"output row per point, shape ({n_points}, d_out) or ({n_points},). "
            "Fix: do not reduce over the batch inside the model (no sum/mean over points)."
        )
    d_out = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (n_points, d_out)


# What a model's error message says about its cause (lower case).
_SHAPE_WORDS = ("shape", "size mismatch", "sizes", "dimension", "incompatible", "mat1 and mat2",
                "cannot be multiplied", "must match", "expected input", "in_features",
                "expected axis", "rank", "broadcast")
_GRAPH_WORDS = ("numpy()", "requires grad", "symbolic", "is only available when eager",
                "cannot convert a symbolic", "non-eager", "__array__")


def check_target(largest: int, d_out: int) -> None:
    """A target must name one of the model's outputs."""
    if largest >= d_out:
        raise OptionError(
            f"target {largest} is out of range: the model has {d_out} output(s) per point. "
            f"Fix: use targets 0..{d_out - 1}.")


def model_error_cause(exc: Exception) -> str:
    """'graph' (the forward leaves the framework), 'batchnorm-one' (BatchNorm training on one
    point), 'tokens' (an embedding given floats), 'shape' (about shapes or sizes) or 'other',
    from the exception's message."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if any(w in text for w in _GRAPH_WORDS):
        return "graph"
    if "more than 1 value per channel" in text:
        return "batchnorm-one"
    if "'indices'" in text and "embedding" in text:
        return "tokens"
    if any(w in text for w in _SHAPE_WORDS):
        return "shape"
    return "other"


# What the call opened last in this context slices with its points: (N, ((name, shape), ...))
# for each array of kwargs= whose first axis has length N (set by compute._extras for every
# call it opens), so that a model failure can name them.
_SLICED = contextvars.ContextVar("nbderiv_sliced_kwargs", default=(0, ()))


def note_sliced_kwargs(n_points: int, sliced) -> None:
    """Record the kwargs= arrays, ``(name, shape)``, that the call being opened slices with
    its ``n_points`` points (none: ``()``), for the messages of model failures."""
    _SLICED.set((int(n_points), tuple(sliced)))


def _with_context(fix: str, n_points: int, prepared: PreparedInput | None = None) -> str:
    """``fix``, preceded by how nbderiv read what it was given, where that may be the cause:
    x given as a list of arrays / tensors (read as points; the tuple form is separate
    arguments), and the arrays of kwargs= that the call being run slices with its
    ``n_points`` points (:func:`shared` passes one as it is)."""
    said, options = [], []
    items = () if prepared is None or prepared.several else prepared.list_items
    if items:
        shapes = f"shape {items[0]}" if len(set(items)) == 1 else \
            f"shapes {', '.join(map(str, items))}"
        count = prepared.n_points
        said.append(f"x was a list of {len(items)} arrays / tensors of {shapes}, which nbderiv "
                    f"reads as {count} point{'s' if count != 1 else ''} of shape "
                    f"{prepared.point_shapes[0]}, like np.array(x); a tuple is read as "
                    "separate arguments.")
        options.append(("they are separate arguments of the model (a Keras model with several "
                        "inputs too)", "pass them as a tuple, x=tuple(x) (e.g. (x, t) rather "
                        "than [x, t])"))
    n, sliced = _SLICED.get()
    if sliced and n == n_points:
        one = len(sliced) == 1
        named = " and ".join(f"kwargs[{name!r}] (shape {tuple(shape)})" for name, shape in sliced)
        name = sliced[0][0]
        value = name if name.isidentifier() else "value"
        said.append(f"{named} {'has' if one else 'have'} a first axis of length {n}, the number "
                    f"of points, so nbderiv slices {'it' if one else 'them'} with the points: "
                    "each model call gets only the rows of its own points.")
        options.append((f"{'it is' if one else 'one of them is'} the same for every point (e.g. "
                        "an attention mask of shape (T, T) with T == N)",
                        f"pass it as it is: kwargs={{{name!r}: nbderiv.shared({value})}}"))
    if not options:
        return fix
    rest = fix[len("Fix: "):] if fix.startswith("Fix: ") else fix
    return (" ".join(said) + " Fix: " + "; ".join(f"if {c}, {a}" for c, a in options)
            + f". Otherwise: {rest}")


def _held_note(exc: Exception, n_points: int) -> str:
    """The fix for a model that holds per-point data itself: a function of the user's, called
    on a subset of the points, whose closure or globals hold an array with one row per point
    (``lambda z: net(z, mask)``, ``lambda z: net(z)[torch.arange(N), labels]``). "" when
    none does, or when the function got all N points."""
    try:
        running = user_frames(exc.__traceback__)
    except Exception:  # only for the message: never let it hide the real error
        return ""
    # the points it was called on: the first array among the arguments of the outermost
    # function that got one (the model nbderiv called, or a forward it runs)
    batch = next((s[0] for r in running for s in (_shape_of(v) for _, v in r.arguments) if s),
                 None)
    if batch is None or batch == n_points:
        return ""
    for r in running:
        for name, obj in r.held:
            shape = _shape_of(obj)
            if not shape or shape[0] != n_points:
                continue
            params = ", ".join([n for n, _ in r.arguments] + [name])
            example = f"lambda {params}: ..." if r.function == "the lambda" else \
                f"{r.function[:-2].split('.')[-1]}({params})"
            fix = (f"Fix: take {name} as a keyword argument ({example}) and pass "
                   f"kwargs={{{name!r}: {name}}}: nbderiv slices it with the points.")
            if len(shape) == 1 and "int" in str(getattr(obj, "dtype", "")):
                fix += (f" If {name} picks one output per point (y[arange(N), {name}]), "
                        f"return the whole output y and pass target={name} instead.")
            return (f"{r.function[0].upper()}{r.function[1:]} uses {name} "
                    f"({type(obj).__name__} of shape {shape}), whose "
                    f"first axis has the length of x ({n_points} points), but nbderiv calls the "
                    f"model on subsets of the points (here {batch} of them), so its rows no "
                    f"longer line up with the points. {fix}")
    return ""


def per_point_data_failed(exc: Exception, n_points: int) -> bool:
    """Whether a failure of the model on some of the ``n_points`` points may come from
    per-point data that does not follow the points: an array with one row per point held by
    the failing function itself, or arrays of kwargs= that the call slices (then
    :func:`model_rejected_input` says which, and how to pass them)."""
    n, sliced = _SLICED.get()
    return bool(sliced and n == n_points) or bool(_held_note(exc, n_points))


def model_error_fix(exc: Exception, n_points: int, prepared: PreparedInput | None = None) -> str:
    """The ``Fix: ...`` line that fits what the model's error says; when the model holds
    per-point data of its own, or got arrays of kwargs= sliced with the points, or x was a
    list of arrays (``prepared``), it says so first."""
    held = _held_note(exc, n_points)
    if held:
        return held
    cause = model_error_cause(exc)
    if cause == "graph":
        return ("The forward pass leaves the framework (.numpy() or a NumPy function on a "
                "tensor), which autodiff cannot follow (the graph is broken). Fix: use "
                "framework operations throughout forward (torch.sin / tf.sin instead of "
                "np.sin, no .numpy() round trip).")
    if cause == "batchnorm-one":
        return (f"BatchNorm in training mode cannot normalise {n_points} point(s) on their "
                "own. Fix: pass more points, or call model.eval() (training=False in Keras).")
    if cause == "tokens":
        return ("An embedding layer takes integer token ids, and nbderiv differentiates with "
                "respect to floating-point inputs (a token id has no derivative). Fix: "
                "differentiate with respect to the embeddings, e.g. e = model.embedding(tokens) "
                "and nbderiv.derivatives(lambda e: rest_of_model(e), e).")
    return _with_context(
        "Fix: run the model on that input with plain framework code (d.code shows the "
        "equivalent: model(torch.as_tensor(x)) in PyTorch, model(tf.constant(x)) in Keras) "
        "and fix the error it raises there.", n_points, prepared)


_FREE_AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}  # by the number of free axes


def expected_input(expected) -> str | None:
    """How the input a model expects per point reads in a message, from what the layer that
    receives it says: an int (a vector of that many features) or a per-point shape with None
    for free sizes. None when nothing is known.

    >>> expected_input(16)
    '16 input feature(s) per point, shape (N, 16)'
    >>> expected_input((3, None, None))
    'C=3 channels (shape (N, 3, H, W))'
    >>> expected_input((None, None, 3))
    'C=3 channels (shape (N, H, W, 3))'
    >>> expected_input((None, 8))
    'F=8 features per time step (shape (N, T, 8))'
    >>> expected_input((20, 8))
    'points of shape (20, 8) (shape (N, 20, 8))'
    """
    if expected is None:
        return None
    if isinstance(expected, (int, np.integer)) and not isinstance(expected, bool):
        return f"{int(expected)} input feature(s) per point, shape (N, {int(expected)})"
    shape = tuple(expected)
    if not shape or all(s is None for s in shape):
        return None
    if len(shape) == 1:
        return expected_input(shape[0])
    known = [i for i, s in enumerate(shape) if s is not None]
    if len(known) == len(shape):
        return f"points of shape {shape} (shape (N, {', '.join(map(str, shape))}))"
    if len(known) == 1 and known[0] in (0, len(shape) - 1):
        at = known[0]
        if len(shape) == 2 and at == 1:  # (T, F): a sequence of F features per step
            return f"F={shape[1]} features per time step (shape (N, T, {shape[1]}))"
        free = list(_FREE_AXES.get(len(shape) - 1, ("?",) * (len(shape) - 1)))
        names = [str(shape[at])] + free if at == 0 else free + [str(shape[at])]
        return f"C={shape[at]} channels (shape (N, {', '.join(names)}))"
    names = [str(s) if s is not None else "?" for s in shape]
    return f"points of shape ({', '.join(names)})"


def fits_expected(expected, point_shape) -> bool:
    """Whether a per-point shape agrees with what the model expects (see
    :func:`expected_input`); True when nothing is known."""
    if expected is None:
        return True
    point_shape = tuple(point_shape)
    if isinstance(expected, (int, np.integer)) and not isinstance(expected, bool):
        return point_shape[-1] == expected  # a Linear acts on the last axis
    shape = tuple(expected)
    if len(shape) != len(point_shape):
        return False
    return all(e is None or e == s for e, s in zip(shape, point_shape))


def _reshape_hint(expected, point_shape) -> str:
    """A concrete reshape or transpose when the given point shape holds the expected one's
    values in another layout: flattened images, channels at the other end."""
    if expected is None or isinstance(expected, (int, np.integer)):
        return ""
    shape, given = tuple(expected), tuple(point_shape)
    if len(shape) != 3 or not (shape[0] is None) != (shape[2] is None):
        return ""
    first = shape[0] is not None
    c = shape[0] if first else shape[2]
    if len(given) == 1 and given[0] % c == 0:
        side = int(round((given[0] // c) ** 0.5))
        if side * side * c == given[0]:
            target = (c, side, side) if first else (side, side, c)
            return (f" x looks like flattened images: x.reshape(-1, {', '.join(map(str, target))})"
                    " gives each point its shape back.")
    if len(given) == 3 and given != shape:
        if first and given[2] == c:
            return " x has its channels last: x.permute(0, 3, 1, 2) puts them first."
        if not first and given[0] == c:
            return " x has its channels first: np.transpose(x, (0, 2, 3, 1)) puts them last."
    return ""


def model_rejected_input(exc: Exception, prepared: PreparedInput,
                         expected_width=None) -> InputShapeError | ModelCallError:
    """A readable error for a model that raised when first called on the prepared input:
    :class:`InputShapeError` when the failure is about shapes or the input differs from what
    the model expects, else :class:`ModelCallError` with a fix that fits the cause.

    ``expected_width`` is what the layer that receives the input expects per point: an int
    (features of a vector), a per-point shape with None for free sizes (e.g. (3, None, None)
    for a Conv2d), or None (unknown). The fix never says to flatten an input that has a
    shape: nbderiv passes x of shape (N, *S) to the model as it is."""
    given = prepared.original_shapes[0] if len(prepared.arrays) == 1 \
        else tuple(prepared.original_shapes)
    point_shape = prepared.point_shapes[0]
    multi = len(prepared.arrays) == 1 and len(point_shape) > 1
    shapes = [(prepared.n_points,) + tuple(s) for s in prepared.point_shapes]
    shown = shapes[0] if len(shapes) == 1 else tuple(shapes)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    expected = expected_width if not prepared.several else None
    differs = expected is not None and not fits_expected(expected, point_shape)
    if not differs and model_error_cause(exc) != "shape":
        return ModelCallError(
            f"the model raised {type(exc).__name__} when nbderiv first called it on x of shape "
            f"{given} (passed as {shown}): {text[:300].rstrip('.')}. "
            f"{model_error_fix(exc, prepared.n_points, prepared)}"
        )
    hint = ""
    if prepared.reshaped and not prepared.several:
        hint = " If x was meant as ONE point with several features, pass x.reshape(1, -1)."
    described = expected_input(expected) if differs else None
    expects = ""
    if described:
        each = (f"points of shape {point_shape}" if multi
                else f"{prepared.width} feature(s) per point")
        expects = f" The model expects {described}; x has {each}."
    layout = "N points of shape S, as it is" if multi else "N points x d_in features"
    if described and not isinstance(expected, (int, np.integer)):
        fix = (f"Fix: pass each point with the shape the model takes, {described}."
               f"{_reshape_hint(expected, point_shape)}")
    elif multi or not described:
        fix = ("Fix: pass x of shape (N, *S) with the per-point shape S the model takes for "
               "one sample (e.g. (N, C, H, W) images, (N, T, F) sequences); nbderiv passes it "
               "to the model as it is.")
    else:
        fix = "Fix: pass x with the trailing size the model expects."
    held = _held_note(exc, prepared.n_points)
    if held:
        fix, hint = held, ""
    else:
        fix = _with_context(fix, prepared.n_points, prepared)
    return InputShapeError(
        f"the model rejected the input: x of shape {given} was passed as {shown} "
        f"({layout}) and the model raised {type(exc).__name__}: "
        f"{text[:300].rstrip('.')}.{expects} {fix}{hint}"
    )
