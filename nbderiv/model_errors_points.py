"""What may not line up with the points when a model fails on some of them: arrays of
``kwargs=`` that nbderiv slices with the points (:func:`sliced_kwargs`; ``nbderiv.shared``
passes one as it is), per-point data a function of yours holds itself (read from the
traceback, :func:`nbderiv.wrapped.user_frames`), and x given as a list of arrays (read as
points; a tuple is separate arguments). :mod:`nbderiv.model_errors` puts these in front of
its fix.

>>> print(with_context("Fix: check the model.", 20, sliced=(("mask", (20, 20)),))[:73])
kwargs['mask'] (shape (20, 20)) has a first axis of length 20, the number
"""

from __future__ import annotations

import re

from .errors import ModelCallError
from .inputs import PreparedInput, shape_of
from .wrapped import user_frames

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc) -> str:
    """The line of an exception's text that says what went wrong: its first, or, for Keras'
    wrapper ('Exception encountered when calling Net.call().'), that and the cause after it
    (terminal colours and TensorFlow's function-node prefix taken out).

    >>> first_line(ValueError("Exception encountered when calling Net.call().\\n\\n"
    ...                       "{{function_node f}} ConcatOp : shapes differ [Op:ConcatV2]"))
    'Exception encountered when calling Net.call(): ConcatOp : shapes differ [Op:ConcatV2]'
    """
    lines = [_ANSI.sub("", line).strip() for line in str(exc).strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Exception encountered when calling") and len(lines) > 1:
        cause = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", lines[1])
        return f"{lines[0].rstrip('.')}: {cause}"
    return lines[0]


def sliced_kwargs(call) -> tuple:
    """((name, shape), ...) of the arrays of ``kwargs=`` that ``call`` slices with its points
    (first axis N), for the messages of model failures."""
    return tuple((e.name, (call.n,) + tuple(e.shape)) for e in call.extras if e.name)


def read_as_points(prepared: PreparedInput) -> str:
    """How nbderiv read x given as a list of arrays / tensors: as points, like np.array(x)."""
    items = prepared.list_items
    shapes = f"shape {items[0]}" if len(set(items)) == 1 else \
        f"shapes {', '.join(map(str, items))}"
    count = prepared.n_points
    return (f"x was a list of {len(items)} arrays / tensors of {shapes}, which nbderiv reads "
            f"as {count} point{'s' if count != 1 else ''} of shape {prepared.point_shapes[0]}, "
            "like np.array(x)")


def sliced_with_the_points(sliced, n_points: int) -> str:
    """That the kwargs= arrays ``sliced`` ((name, shape) pairs) are sliced with the points."""
    one = len(sliced) == 1
    named = " and ".join(f"kwargs[{name!r}] (shape {tuple(shape)})" for name, shape in sliced)
    return (f"{named} {'has' if one else 'have'} a first axis of length {n_points}, the number "
            f"of points, so nbderiv slices {'it' if one else 'them'} with the points: each "
            "model call gets only the rows of its own points.")


def with_context(fix: str, n_points: int, prepared: PreparedInput | None = None,
                  sliced=()) -> str:
    """``fix``, preceded by how nbderiv read what it was given, where that may be the cause:
    x given as a list of arrays / tensors (read as points; the tuple form is separate
    arguments), and the arrays of kwargs= that the call being run slices with its
    ``n_points`` points (:func:`shared` passes one as it is)."""
    said, options = [], []
    items = () if prepared is None or prepared.several else prepared.list_items
    if items:
        said.append(f"{read_as_points(prepared)}; a tuple is read as separate arguments.")
        options.append(("they are separate arguments of the model (a Keras model with several "
                        "inputs too)", "pass them as a tuple, x=tuple(x) (e.g. (x, t) rather "
                        "than [x, t])"))
    if sliced:
        one = len(sliced) == 1
        name = sliced[0][0]
        value = name if name.isidentifier() else "value"
        said.append(sliced_with_the_points(sliced, n_points))
        options.append((f"{'it is' if one else 'one of them is'} the same for every point (e.g. "
                        "an attention mask of shape (T, T) with T == N)",
                        f"pass it as it is: kwargs={{{name!r}: nbderiv.shared({value})}}"))
    if not options:
        return fix
    rest = fix[len("Fix: "):] if fix.startswith("Fix: ") else fix
    return (" ".join(said) + " Fix: " + "; ".join(f"if {c}, {a}" for c, a in options)
            + f". Otherwise: {rest}")


def held_data_note(exc: Exception, n_points: int) -> str:
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
    return bool(sliced) or bool(held_data_note(exc, n_points))


def moved_points_error(exc: Exception, prepared: PreparedInput) -> ModelCallError:
    """The model takes x, but fails once a point moves a little (the probe moves points by
    0.1 (1 + |x|) to see whether points depend on each other; differentiating needs the same
    of any step): x is not a continuous quantity, e.g. token ids or indices."""
    text = first_line(exc)[:200].rstrip(".")
    return ModelCallError(
        f"the model takes x of shape {prepared.original_shapes[0]}, but raised "
        f"{type(exc).__name__} ({text}) once nbderiv moved a point a little (by "
        "0.1 * (1 + |x|), to see whether points depend on each other). A derivative needs "
        "the model defined near x: x looks like indices or token ids (an embedding's "
        "vocabulary, a table lookup), which have no derivative. Fix: differentiate with "
        "respect to a continuous input, e.g. the embeddings: e = embedding(tokens), then "
        "nbderiv.derivatives(lambda e: rest_of_model(e), e).")
