"""What nbderiv says when the model fails on the input it was given: the cause its error
message points to (shapes, a graph that leaves the framework, a tensor changed in place, an
operation the framework cannot differentiate to the order asked, a BatchNorm training on one
point, token ids, another number of inputs than the model takes, a keyword argument it does not
take), the fix that fits it, what the layer that receives the input expects, and
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

import re

import numpy as np

from .errors import InputShapeError, ModelCallError, NbderivError, OptionError
from .explain_errors import LEAF_INPLACE
from .inputs import PreparedInput
from .model_errors_points import first_line, held_data_note, with_context
from .wrapped import user_frames

# What a model's error message says about its cause (lower case).
_SHAPE_WORDS = ("shape", "size mismatch", "sizes", "dimension", "incompatible", "mat1 and mat2",
                "cannot be multiplied", "must match", "expected input", "in_features",
                "expected axis", "rank", "broadcast")
_GRAPH_WORDS = ("numpy()", "requires grad", "symbolic", "is only available when eager",
                "cannot convert a symbolic", "non-eager", "__array__")


# torch refusing a tensor changed in place: the input (a leaf that requires grad, or a view
# of it such as x[:, 0] or one part of a split), or a value its backward pass saved
_INPLACE = (LEAF_INPLACE, r"modified by an inplace operation",
            r"(is being|has been) modified inplace")
# an operation the framework has no derivative for: (pattern whose group 1 names it, framework)
_NO_DERIVATIVE = (
    (r"derivative for '([^']+)' is not implemented", "PyTorch"),
    (r"derivative for (\S+) is not implemented", "PyTorch"),
    (r"forward AD with (\S+) that does not support it", "PyTorch"),
    (r"gradient registry has no entry for: ?(\w+)", "TensorFlow"),
    (r"no gradient defined for operation\s*'[^']*'\s*\(op type: (\w+)\)", "TensorFlow"),
)
# the model's own signature refusing the arguments nbderiv passed (Python's words, Keras')
_TOO_FEW = (r"missing (\d+) required positional arguments?", r"missing a (required) argument")
_TOO_MANY = r"(\S+)\(\) takes (\d+) positional arguments? but (\d+) (?:was|were) given"
_KERAS_INPUTS = r"expects (\d+) (?:named )?input\(s\).*?received (\d+) input tensors?"
_KEYWORD = (r"got an unexpected keyword argument '([^']+)'",
            r"unrecognized keyword arguments?[^:]*: \W*'([^']+)'")
# activations whose higher derivatives are zero wherever they exist (names lower case, no _)
_PIECEWISE = {"hardsigmoid": "linear", "hardtanh": "linear", "relu6": "linear",
              "relu": "linear", "leakyrelu": "linear", "rrelu": "linear", "prelu": "linear",
              "hardshrink": "linear", "softshrink": "linear", "threshold": "linear",
              "hardswish": "quadratic", "hardsilu": "quadratic"}


def model_error_cause(exc: Exception) -> str:
    """'inplace' (a tensor autodiff needs was changed in place: the input, or a value saved for
    the backward pass), 'no-derivative' (the framework has no derivative, or none of the order
    asked, for one of the model's operations), 'graph' (the forward leaves the framework),
    'batchnorm-one' (BatchNorm training on one point), 'tokens' (an embedding given floats),
    'channels-first-cpu' (a channels_first layer on TensorFlow's CPU kernels),
    'arguments' (the model takes another number of inputs than x gives it), 'keyword' (the
    model takes no keyword argument of that name), 'shape' (about shapes or sizes) or
    'other', from the exception's message ('arguments' and 'keyword' only where its traceback
    holds none of the user's code: the model's own signature refused the call).

    >>> model_error_cause(RuntimeError("a view of a leaf Variable that requires grad is being "
    ...                                "used in an in-place operation."))
    'inplace'
    >>> model_error_cause(RuntimeError("Can't call numpy() on Tensor that requires grad."))
    'graph'
    >>> model_error_cause(LookupError("gradient registry has no entry for: SoftsignGrad"))
    'no-derivative'
    >>> model_error_cause(TypeError("forward() missing 1 required positional argument: 't'"))
    'arguments'
    """
    message = f"{type(exc).__name__}: {exc}"
    text = message.lower()
    # before 'graph' (torch's words for a leaf say "requires grad") and 'shape' (an
    # operation's name may hold "sizes", e.g. split_with_sizes_backward)
    if any(re.search(p, message, re.IGNORECASE) for p in _INPLACE):
        return "inplace"
    if _no_derivative(exc) is not None:
        return "no-derivative"
    if any(w in text for w in _GRAPH_WORDS):
        return "graph"
    if "more than 1 value per channel" in text:
        return "batchnorm-one"
    if "'indices'" in text and "embedding" in text:
        return "tokens"
    if "nhwc" in text and "cpu" in text:  # TensorFlow's CPU kernels: channels_last only
        return "channels-first-cpu"
    if _keyword(exc) is not None:
        return "keyword"
    if _inputs_taken(exc, 1) is not None:
        return "arguments"
    if any(w in text for w in _SHAPE_WORDS):
        return "shape"
    return "other"


def _at_the_call(exc: Exception) -> bool:
    """Whether the exception came from the model's own signature, before any code of the
    user's ran (a call inside the user's code that failed the same way is theirs to fix)."""
    try:
        return not user_frames(exc.__traceback__)
    except Exception:  # only for the message: never let it hide the real error
        return False


def _keyword(exc: Exception):
    """The keyword argument the model refused to take, else None."""
    for pattern in _KEYWORD:
        m = re.search(pattern, str(exc), re.IGNORECASE)
        if m and _at_the_call(exc):
            return m.group(1)
    return None


def _inputs_taken(exc: Exception, given: int | None):
    """(inputs the model takes, inputs it got) when its signature refused the ``given``
    positional arguments nbderiv passed, else None; a count is None where the message does not
    tell it and ``given`` is None (not known).

    >>> _inputs_taken(ValueError('Layer "functional" expects 2 input(s), but it received 1 '
    ...                          'input tensors.'), 1)
    (2, 1)
    """
    text = str(exc)
    if not _at_the_call(exc):
        return None
    m = re.search(_KERAS_INPUTS, text, re.IGNORECASE | re.DOTALL)
    if m:
        return int(m.group(1)), int(m.group(2))
    if not isinstance(exc, TypeError):
        return None
    for pattern in _TOO_FEW:
        m = re.search(pattern, text)
        if m:
            missing = 1 if m.group(1) == "required" else int(m.group(1))
            return (None if given is None else given + missing), given
    m = re.search(_TOO_MANY, text)
    if m:  # a method counts self among its positional arguments
        name, takes, got = m.group(1), int(m.group(2)), int(m.group(3))
        method = "." in name and not name.rsplit(".", 1)[0].endswith(">")
        return takes - method, got - method
    return None


def _arguments_error(exc: Exception, prepared: PreparedInput | None, given: int | None) -> str:
    """Why the model refused x's arguments, and the tuple that fits (cause 'arguments')."""
    takes, got = _inputs_taken(exc, given)
    text = first_line(exc)
    text = text.split(" Pass inputs as a dict")[0][:300].rstrip(".")  # nbderiv takes no dict
    if takes is None:
        return (f"The model takes more inputs than x gives it ({text}). Fix: pass one array "
                "per input as a tuple, x=(x1, x2, ...); nbderiv passes a tuple's arrays as the "
                "model's separate arguments (and reads a list as points).")
    names = ", ".join(f"x{i + 1}" for i in range(takes))
    several = prepared is not None and prepared.several
    if takes > got:
        had = (f"x is a tuple of {got} arrays, one per argument" if several else
               "x is one array, which nbderiv passes as the model's only argument")
        split = ""
        if not several and prepared is not None and prepared.point_shapes[0] == (takes,):
            columns = ", ".join(f"x[:, {i}:{i + 1}]" for i in range(takes))
            split = f" (one input per column of this x: x=({columns}))"
        fix = (f"Fix: pass one array per input as a tuple, x=({names}){split}; nbderiv "
               "passes a tuple's arrays as the model's separate arguments (and reads a list as "
               "points).")
        if prepared is not None:  # x given as a list of arrays: said first
            fix = with_context(fix, prepared.n_points, prepared)
        return f"The model takes {takes} inputs and got {got}: {had} ({text}). {fix}"
    one = "one array" if takes == 1 else f"a tuple of {takes} arrays, x=({names})"
    return (f"The model takes {takes} input{'s' if takes != 1 else ''} and got {got}: x is a "
            f"tuple of {got} arrays, which nbderiv passes as separate arguments ({text}). Fix: "
            f"pass {one}, one array per input (arrays that together make one input go side by "
            "side in one array, e.g. np.concatenate((a, b), axis=1)).")


def _keyword_fix(exc: Exception) -> str:
    """The fix for a keyword argument the model does not take (cause 'keyword')."""
    name = _keyword(exc)
    return (f"The model takes no keyword argument {name!r}: nbderiv passes every entry of "
            "kwargs= to the model under its name. Fix: use the names of the model's own "
            f"keyword arguments (those of forward in PyTorch, of call in Keras), or leave "
            f"{name!r} out of kwargs=.")


def _no_derivative(exc: Exception):
    """(framework, operation, base, orders) when the error says the framework cannot
    differentiate an operation, else None: ``operation`` as the message names it
    (aten::hardsigmoid_backward, SoftsignGrad), ``base`` the function it is the derivative of
    (hardsigmoid, Softsign) and ``orders`` how many derivatives of ``base`` the framework does
    have (0 when the operation is not itself a derivative).

    >>> _no_derivative(RuntimeError("derivative for aten::hardsigmoid_backward is not "
    ...                             "implemented"))
    ('PyTorch', 'aten::hardsigmoid_backward', 'hardsigmoid', 1)
    >>> _no_derivative(NotImplementedError("the derivative for 'igamma: input' is not "
    ...                                    "implemented."))
    ('PyTorch', 'igamma', 'igamma', 0)
    >>> _no_derivative(LookupError("gradient registry has no entry for: SoftsignGrad"))
    ('TensorFlow', 'SoftsignGrad', 'Softsign', 1)
    """
    text = str(exc)
    for pattern, framework in _NO_DERIVATIVE:
        m = re.search(pattern, text, re.IGNORECASE)
        if m is None:
            continue
        operation = m.group(1).split(": ")[0].rstrip(".,;")
        base, orders = operation.split("::")[-1], 0
        while True:  # a backward op is the derivative of the op it is named after
            for suffix in ("_backward", "Grad"):
                if base.endswith(suffix) and len(base) > len(suffix):
                    base, orders = base[:-len(suffix)], orders + 1
                    break
            else:
                break
        return framework, operation, base, orders
    return None


def _no_derivative_fix(exc: Exception) -> str:
    """What the framework lacks and the fix: a lower order where the missing derivative is
    that of a derivative, or operations it does differentiate (written out for softsign; for
    a piecewise activation, what its higher derivatives are anyway)."""
    framework, operation, base, orders = _no_derivative(exc)
    if orders == 0:
        return (f"{framework} has no derivative for {operation}, an operation the model "
                f"uses, so autodiff cannot go through it. Fix: replace it with operations "
                f"{framework} can differentiate, or move it out of the part of the model you "
                "differentiate.")
    name = base.strip("_")
    times = "once" if orders == 1 else "twice" if orders == 2 else f"{orders} times"
    said = (f"{framework} can differentiate {name} only {times}: it has no derivative for "
            f"{operation}, the derivative of order {orders} it computes for {name}, so it "
            f"gives this model's derivatives up to order {orders} only (the forward pass and "
            f"order{'s 1 to ' if orders > 1 else ' '}{orders} work).")
    fix = (f"Fix: ask for order={orders}, or replace {name} with operations that "
           f"{framework} differentiates to any order (for an activation, another one).")
    key = name.lower().replace("_", "")
    if key in _PIECEWISE:
        degree = _PIECEWISE[key]
        zero = 2 if degree == "linear" else 3  # the first order that is zero on every piece
        fix += (f" {name} is piecewise {degree}: its derivatives of order {zero} and higher "
                "are zero wherever they exist (everywhere but where its pieces meet)"
                + (", so a higher order would tell you nothing new" if orders + 1 >= zero
                   else "") + "; a smooth activation (e.g. SiLU, sigmoid, tanh) has nonzero "
                "higher derivatives, but is another model.")
    elif key == "softsign":
        fix += (" softsign(x) is x / (1 + |x|): written out that way (Keras: "
                "activation=lambda t: t / (1 + keras.ops.abs(t)); PyTorch: x / (1 + x.abs())) "
                "it is the same function, which the framework differentiates to any order.")
    return f"{said} {fix}"


def model_error_fix(exc: Exception, n_points: int, prepared: PreparedInput | None = None,
                    sliced=()) -> str:
    """The ``Fix: ...`` line that fits what the model's error says; when the model holds
    per-point data of its own, or got arrays of kwargs= sliced with the points, or x was a
    list of arrays (``prepared``), it says so first."""
    held = held_data_note(exc, n_points)
    if held:
        return held
    cause = model_error_cause(exc)
    if cause == "inplace":
        out_of_place = ("use out-of-place operations: x = x * 2 rather than x *= 2 or "
                        "x.mul_(2), nn.ReLU() rather than nn.ReLU(inplace=True), and torch.cat "
                        "or torch.where to change some columns, e.g. x = torch.cat([x[:, :1] / "
                        "10, x[:, 1:]], dim=1) rather than x[:, 0] = x[:, 0] / 10")
        if re.search(LEAF_INPLACE, str(exc), re.IGNORECASE):
            return ("The model changes its input in place (or a slice of it): that input is "
                    "the tensor nbderiv differentiates with respect to, whose values autodiff "
                    "needs as they were, so it refuses. Fix: work on a copy, x = x.clone() at "
                    f"the start of forward, or {out_of_place}.")
        return ("The model changes a tensor in place that autodiff still needs as it was (its "
                "input, a part of it, or a value saved for the backward pass), so it refuses. "
                f"Fix: {out_of_place}; or change a copy (x = x.clone() first).")
    if cause == "no-derivative":
        return _no_derivative_fix(exc)
    if cause == "graph":
        return ("The forward pass leaves the framework (.numpy() or a NumPy function on a "
                "tensor), which autodiff cannot follow (the graph is broken). Fix: use "
                "framework operations throughout forward (torch.sin / tf.sin instead of "
                "np.sin, no .numpy() round trip).")
    if cause == "batchnorm-one":
        return (f"BatchNorm in training mode cannot normalise {n_points} point(s) on their "
                "own. Fix: pass more points, or call model.eval() (training=False in Keras).")
    if cause == "channels-first-cpu":
        return ("A layer of the model was built with data_format='channels_first', which "
                "TensorFlow's CPU kernels do not run (only a GPU does): x itself fits the model. "
                "Fix: build the layers channels_last (the default) and pass x as (N, H, W, C), "
                "np.moveaxis(x, 1, -1); or run on a GPU.")
    if cause == "tokens":
        return ("An embedding layer takes integer token ids, and nbderiv differentiates with "
                "respect to floating-point inputs (a token id has no derivative). Fix: "
                "differentiate with respect to the embeddings, e.g. e = model.embedding(tokens) "
                "and nbderiv.derivatives(lambda e: rest_of_model(e), e).")
    if cause == "keyword":
        return _keyword_fix(exc)
    if cause == "arguments":
        return _arguments_error(exc, prepared, len(prepared.arrays) if prepared else None)
    return with_context(
        "Fix: call the model yourself on that input the plain way, model(torch.as_tensor(x)) "
        "in PyTorch or model(tf.constant(x)) in Keras (with torch.autograd.grad or "
        "tf.GradientTape around it when the error came while differentiating), and fix the "
        "error it raises there.", n_points, prepared, _may_be_sliced(exc, cause, sliced))


def _may_be_sliced(exc: Exception, cause: str, sliced) -> tuple:
    """``sliced`` (the kwargs= arrays cut with the points) where the failure may come from
    them: an error about shapes or sizes, or one of no known cause; () for errors about names,
    attributes or types, which rows cut from an array do not cause."""
    if cause == "shape" or not isinstance(exc, (NameError, AttributeError, ImportError,
                                                TypeError)):
        return tuple(sliced)
    return ()


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
                         sliced=()) -> NbderivError:
    """A readable error for a model that raised when first called on the prepared input:
    :class:`InputShapeError` when the failure is about shapes, the input differs from what
    the model expects or x gives it another number of inputs than it takes,
    :class:`OptionError` for a keyword argument it does not take, else
    :class:`ModelCallError` with a fix that fits the cause.

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
    text = first_line(exc)
    cause = model_error_cause(exc)
    if cause == "arguments":  # x's arguments, not their shapes
        message = _arguments_error(exc, prepared, len(prepared.arrays))
        return InputShapeError(message[0].lower() + message[1:])
    if cause == "keyword":
        return OptionError(f"the model refused kwargs= ({text[:300].rstrip('.')}). "
                           f"{_keyword_fix(exc)}")
    expected = expected_width if not prepared.several else None
    differs = expected is not None and not fits_expected(expected, point_shape)
    if not differs and cause != "shape":
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
    held = held_data_note(exc, prepared.n_points)
    if held:
        fix, hint = held, ""
    else:
        fix = with_context(fix, prepared.n_points, prepared, _may_be_sliced(exc, cause, sliced))
    return InputShapeError(
        f"the model rejected the input: x of shape {given} was passed as {shown} "
        f"({layout}) and the model raised {type(exc).__name__}: "
        f"{text[:300].rstrip('.')}.{expects} {fix}{hint}"
    )
