"""What nbderiv says when the model fails on the input it was given: the cause its error
message points to (shapes, a graph that leaves the framework, a BatchNorm training on one
point, token ids), the fix that fits it, what the layer that receives the input expects, and
what may not line up with the points (arrays of ``kwargs=`` sliced with them, per-point data a
function of yours holds itself, a list of arrays read as points).

>>> import numpy as np
>>> from nbderiv.inputs import prepare_inputs
>>> e = model_rejected_input(RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
...                          prepare_inputs(np.zeros((4, 3)), to_numpy=np.asarray), 2)
>>> "expects 2 input feature(s) per point" in str(e)
True
"""

from __future__ import annotations

import numpy as np

from .errors import InputShapeError, ModelCallError
from .inputs import PreparedInput, shape_of
from .wrapped import user_frames

# What a model's error message says about its cause (lower case).
_SHAPE_WORDS = ("shape", "size mismatch", "sizes", "dimension", "incompatible", "mat1 and mat2",
                "cannot be multiplied", "must match", "expected input", "in_features",
                "expected axis", "rank", "broadcast")
_GRAPH_WORDS = ("numpy()", "requires grad", "symbolic", "is only available when eager",
                "cannot convert a symbolic", "non-eager", "__array__")


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


def sliced_kwargs(call) -> tuple:
    """((name, shape), ...) of the arrays of ``kwargs=`` that ``call`` slices with its points
    (first axis N), for the messages of model failures."""
    return tuple((e.name, (call.n,) + tuple(e.shape)) for e in call.extras if e.name)


def _with_context(fix: str, n_points: int, prepared: PreparedInput | None = None,
                  sliced=()) -> str:
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
    if sliced:
        n = n_points
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
    batch = next((s[0] for r in running for s in (shape_of(v) for _, v in r.arguments) if s),
                 None)
    if batch is None or batch == n_points:
        return ""
    for r in running:
        for name, obj in r.held:
            shape = shape_of(obj)
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


def per_point_data_failed(exc: Exception, n_points: int, sliced=()) -> bool:
    """Whether a failure of the model on some of the ``n_points`` points may come from
    per-point data that does not follow the points: an array with one row per point held by
    the failing function itself, or arrays of kwargs= that the call slices (then
    :func:`model_rejected_input` says which, and how to pass them)."""
    return bool(sliced) or bool(_held_note(exc, n_points))


def model_error_fix(exc: Exception, n_points: int, prepared: PreparedInput | None = None,
                    sliced=()) -> str:
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
        "and fix the error it raises there.", n_points, prepared, sliced)


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


def model_rejected_input(exc: Exception, prepared: PreparedInput, expected_width=None,
                         sliced=()) -> InputShapeError | ModelCallError:
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
            f"{model_error_fix(exc, prepared.n_points, prepared, sliced)}"
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
        fix = _with_context(fix, prepared.n_points, prepared, sliced)
    return InputShapeError(
        f"the model rejected the input: x of shape {given} was passed as {shown} "
        f"({layout}) and the model raised {type(exc).__name__}: "
        f"{text[:300].rstrip('.')}.{expects} {fix}{hint}"
    )
