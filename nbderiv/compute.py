"""The one computation path: open a call, probe the model, cut the points into blocks, run
the backend on each block, assemble. The public functions in :mod:`nbderiv.api` are thin
layers over these; nothing here knows about Jupyter.

A call flows as: :func:`open_call` (backend, inputs, dtype) → :func:`probe` (outputs per
point, randomness, coupling) → :func:`block_rows` (memory budget and the backend's preferred
block size) → :func:`run_blocks` (or, for models that couple points, the backend's
per-point blocks).

>>> import numpy as np, torch
>>> from nbderiv.compute import open_call, probe, run_blocks
>>> call = open_call(torch.sin, torch.zeros(3, 1), None)
>>> probe(call).d_out, run_blocks(call, 1, (0,), rows=2).orders[0][:, 0, 0].tolist()
(1, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from contextlib import contextmanager

import numpy as np

from . import findings as dg
from . import memo
from .backends import select_backend
from .backends.base import Block, block_starts, equal_block_size
from .call import Call, Extra, Verdict
from .errors import (
    InputTypeError,
    MemoryBudgetError,
    ModelCallError,
    NbderivError,
    OptionError,
    OutputError,
)
from .inputs import Shared, input_findings, input_names, prepare_inputs
from .model_errors import model_error_cause, model_error_fix, model_rejected_input
from .model_errors_points import (
    first_line,
    moved_points_error,
    per_point_data_failed,
    read_as_points,
    sliced_kwargs,
    sliced_with_the_points,
)
from .result_memory import result_array


def open_call(model, x, framework, *, target=None, kwargs=None) -> Call:
    """The backend for ``model``, ``x`` read and cast, the input findings. ``target`` (one
    int, or one int per point) and the per-point arrays of ``kwargs`` (first axis N) travel
    as extra columns (see :class:`~nbderiv.call.Extra`); other kwargs are passed as they are."""
    backend = select_backend(model, x, framework)
    backend.begin(model)
    x = _by_name(backend, model, x)
    inputs = prepare_inputs(x, to_numpy=backend.to_numpy,
                            argument_names=lambda n: backend.argument_names(model, n))
    dtype = np.dtype(backend.compute_dtype(model, inputs.arrays[0].dtype))
    arg_names = backend.argument_names(model, len(inputs.arrays)) if inputs.several else None
    extras, extra_arrays, constants = _extras(backend, inputs.n_points, target, kwargs, dtype)
    call = Call(model=model, backend=backend, inputs=inputs, dtype=dtype,
                args=inputs.cast(dtype) + extra_arrays, names=input_names(inputs, arg_names),
                device=backend.device(model, x), extras=extras, constants=constants,
                shared_names=tuple(k for k, v in (kwargs or {}).items()
                                   if isinstance(v, Shared)))
    call.findings += input_findings(inputs, dtype, call.names)
    bad = call.non_finite_x = dg.non_finite_points(*call.args[:call.n_inputs])
    if bad:
        call.findings.append(dg.non_finite_finding("x", bad))
    return call


def _by_name(backend, model, x):
    """For a model built on a dict of inputs: a dict ``x`` with its keys, as the tuple of
    its arrays in the model's order; a tuple is refused (it cannot say which array is which:
    Keras would take them in the order of the sorted names, silently swapping x and t)."""
    keys = backend.named_inputs(model)
    if not keys:
        return x
    shown = "{" + ", ".join(f"{k!r}: ..." for k in keys) + "}"
    if isinstance(x, dict):
        if sorted(map(str, x)) != sorted(map(str, keys)):
            raise InputTypeError(
                f"x has the keys {', '.join(map(repr, x))}; the model's inputs are named "
                f"{', '.join(map(repr, keys))}. Fix: pass x={shown} with exactly those keys.")
        by_str = {str(k): v for k, v in x.items()}
        return tuple(by_str[str(k)] for k in keys)
    if isinstance(x, (tuple, list)) and len(x) == len(keys):
        raise InputTypeError(
            f"the model takes named inputs ({', '.join(map(repr, keys))}: a Keras model built "
            f"on a dict of Inputs), and a tuple does not say which array is which (Keras would "
            f"take them in the order of the sorted names, {', '.join(map(repr, keys))}). Fix: "
            f"pass x as a dict, x={shown}.")
    return x


def _extras(backend, n, target, kwargs, dtype) -> tuple:
    """(Extra specs, their (n, width) arrays in ``dtype``, constant kwargs). A value wrapped
    in :func:`nbderiv.shared` is a constant whatever its shape."""
    specs, arrays, constants = [], [], {}
    if kwargs is not None and not isinstance(kwargs, dict):
        raise OptionError(f"kwargs must be a dict of keyword arguments for the model, got "
                          f"{type(kwargs).__name__}. Fix: kwargs={{'attention_mask': mask}}.")
    for name, value in (kwargs or {}).items():
        if isinstance(value, Shared):  # the same for every point: passed as it is
            constants[name] = value.value
            continue
        try:
            a = np.asarray(backend.to_numpy(value))
        except Exception:
            a = None
        if a is None or a.ndim == 0 or a.shape[0] != n or a.dtype.kind not in "biuf":
            constants[name] = value  # not per point: passed as it is
            continue
        specs.append(Extra(str(name), tuple(a.shape[1:]), a.dtype.name))
        arrays.append(_as_columns(a, dtype, f"kwargs[{name!r}]"))
    if target is not None:
        from .inputs import target_values

        t = target_values(target, n, backend.to_numpy)
        specs.append(Extra("", (), "int64"))
        arrays.append(_as_columns(t, dtype, "target"))
    return tuple(specs), arrays, constants


def _as_columns(a, dtype, what) -> np.ndarray:
    """Per-point data as (n, width) columns in the compute dtype, checked to survive the trip."""
    cols = np.ascontiguousarray(a.reshape(a.shape[0], -1), dtype=dtype)
    if a.dtype.kind in "biu" and not np.array_equal(cols.astype(a.dtype), a.reshape(cols.shape)):
        raise OptionError(f"{what} holds integers too large to pass exactly in {dtype}. "
                          "Fix: pass smaller indices.")
    return cols


_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


@contextmanager
def one_at_a_time(call: Call):
    """Calls through the same backend run one after the other, the model's state kept as it
    was around each (``backend.preserved``). Neither framework's autodiff is safe when two
    threads differentiate one model at once (forward-mode dual tensors, BatchNorm running
    statistics put back by one call while another runs), so nbderiv serialises them; a
    call made from inside another (e.g. a check) re-enters freely."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(call.backend.name, threading.RLock())
    with lock:
        with call.backend.preserved(call.model):
            yield
        memo.remember(call)  # only after a call that succeeded


@contextmanager
def model_errors(call: Call, doing: str):
    """Turn an exception raised inside the model (past the probe) into one readable error."""
    try:
        yield
    except (NbderivError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = first_line(exc)[:300].rstrip(".")
        shapes = ", ".join(str(tuple(a.shape)) for a in call.args)
        raise ModelCallError(
            f"the model raised {type(exc).__name__} while nbderiv was {doing} on input of shape "
            f"{shapes}: {text}. {model_error_fix(exc, call.n, sliced=sliced_kwargs(call))}"
        ) from None


# -- the probe ------------------------------------------------------------------------------
def probe_points(call: Call) -> list:
    """The probe's points: the first few, then the points holding each feature's largest and
    smallest value and largest |value| (over all N), at most ``2 * PROBE_POINTS`` in all."""
    k = min(call.n, dg.PROBE_POINTS)
    chosen = list(range(k))
    X = call.input_features()
    if call.n > k:
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isfinite(X), X, 0)
            for i in range(min(X.shape[1], dg.PROBE_POINTS)):
                for n in (finite[:, i].argmax(), finite[:, i].argmin(),
                          np.abs(finite[:, i]).argmax()):
                    if int(n) not in chosen and len(chosen) < 2 * dg.PROBE_POINTS:
                        chosen.append(int(n))
    return chosen


def probe_batches(call: Call, points=None) -> tuple:
    """(batches, moved): the probe's batches on ``points`` (default :func:`probe_points`): the
    points twice (randomness), then once with point 0 moved a little and the points holding
    each feature's extremes in the batch moved halfway to the middle (does any other point's
    output change?). ``moved[b]`` lists the rows moved in batch b (for the coupling test)."""
    points = probe_points(call) if points is None else points
    first = [a[points].copy() for a in call.args]
    k = len(points)
    inputs = first[:call.n_inputs]
    X = np.concatenate(inputs, axis=1) if len(inputs) > 1 else inputs[0]
    with np.errstate(invalid="ignore"):
        finite = np.where(np.isfinite(X), X, 0)
    # the points holding the largest |value| first (a model that divides by the batch's
    # largest |x| couples points through that one point alone), then each feature's largest
    # and smallest value; at most k - 2 of them, to keep a point still to watch
    features = range(min(X.shape[1], dg.PROBE_POINTS))
    largest = sorted(features, key=lambda i: -float(np.abs(finite[:, i]).max(initial=0)))
    ranked = [int(np.abs(finite[:, i]).argmax()) for i in largest] + \
        [int(f(finite[:, i])) for i in features for f in (np.argmax, np.argmin)]
    extremes = list(dict.fromkeys(n for n in ranked if n != 0))[:max(k - 2, 0)]
    out = [a.copy() for a in first]
    for a in out[:call.n_inputs]:  # extras (labels, masks) stay as they are
        kept = np.isfinite(a)  # the middle of the finite values (an inf pixel has none)
        centre = np.where(kept, a, 0).sum(axis=0) / np.maximum(kept.sum(axis=0), 1)
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite value stays so
            for n in extremes:  # halfway to the middle: inside the data's range, not beyond
                a[n] = (a[n] + (centre - a[n]) / 2).astype(a.dtype)
            a[0] += (0.1 * (1 + np.abs(a[0]))).astype(a.dtype)
    return [first, first, out], [[], [], [0] + extremes]


def verdict_of(call: Call, outputs, moved=None, fewer=None) -> Verdict:
    """The :class:`Verdict` from the outputs of the probe batches (``moved[b]``: the rows
    moved in batch b, default [0] in the third). ``fewer``: the outputs on the first k-1
    points alone, if the probe ran them (a model whose outputs change when a point is left
    out couples points too)."""
    ys = [np.ascontiguousarray(y) for y in outputs]
    out_shape = tuple(ys[0].shape[1:]) or (1,)  # each point's output shape; (n,) is one output
    ys = [y.reshape(y.shape[0], -1) for y in ys]
    if fewer is not None:
        fewer = np.asarray(fewer).reshape(np.shape(fewer)[0], -1)
        if fewer.shape[1] != ys[0].shape[1]:
            raise OutputError(
                f"the model's output per point changes with the number of points: "
                f"{ys[0].shape[1]} value(s) per point for {ys[0].shape[0]} points, "
                f"{fewer.shape[1]} for {fewer.shape[0]}. An output that grows with the batch "
                "(z @ z.T, torch.cdist(z, z), a pairwise kernel, or an argument of shape (N,) "
                "broadcast against (N, 1)) is not a function of each point on its own, so it "
                "has no per-point derivatives. Fix: compute each point's output from its own "
                "input (for a tuple argument t of shape (N,), use t[:, None] or t.reshape(-1, "
                "1) inside forward); for a kernel between the points, differentiate it with "
                "torch.func.jacrev / tf.GradientTape.jacobian on the whole batch.")
    moved = [[], [], [0]] if moved is None else moved
    y1, y2 = ys[0], ys[1]
    scale = 1 + np.fmax.reduce(np.abs(y1), axis=None, initial=0)
    eps = _output_eps(y1, call.dtype)
    tol = 100 * eps * scale
    # the same model call twice: the same numbers? (not the same bits: a copy of the points
    # at another memory alignment may take another vectorised path and round the last bit
    # differently, tf.sin included)
    stochastic = y1.tobytes() != y2.tobytes() and _differ(y1, y2, eps)
    by_moves = by_size = False  # other points moved / one point left out changed outputs
    if not stochastic and y1.shape[0] >= 2:
        compare = []  # (outputs, the rows to compare, their tolerance, a change of size?)
        for y, rows in zip(ys[2:], moved[2:]):
            keep = np.ones(y1.shape[0], dtype=bool)  # (np.setdiff1d would load numpy.ma)
            keep[list(rows)] = False
            compare.append((y, np.flatnonzero(keep), tol, False))
        if fewer is not None:  # fewer points: other summation orders may change the last
            # bits (another BLAS path for another batch size); allow more
            compare.append((np.concatenate([fewer, y1[-1:]]), np.arange(y1.shape[0] - 1),
                            1e3 * tol, True))
        for y, keep, allowed, size in compare:
            if keep.size == 0:
                continue
            with np.errstate(invalid="ignore"):  # inf - inf at points where y is infinite
                change = np.fmax.reduce(np.abs(y[keep] - y1[keep]), axis=None, initial=0)
            if change > allowed or (size and _every_point_moved(y[keep], y1[keep], eps)):
                by_size, by_moves = by_size or size, by_moves or not size
    coupled = by_moves or by_size
    return Verdict(int(y1.shape[1]), stochastic, coupled, out_shape,
                   size_only=coupled and not by_moves)


def _with_sequence_first_hint(call: Call, exc: OutputError) -> OutputError:
    """``exc``, or for a model with sequence-first layers the same facts with the fix that
    fits (:func:`_sequence_first_hint`) in place of the general one."""
    hint = _sequence_first_hint(call) or _list_hint(call)
    if not hint:
        return exc
    facts = re.split(r"; nbderiv needs|: its first axis| Fix:", str(exc))[0]
    return OutputError(f"{facts}: the model's output does not follow the points. {hint}")


def _list_hint(call: Call) -> str:
    """For x given as a list of arrays (read as points, like np.array(x)): they may be the
    separate inputs of a model (``model([a, b])``, a subclassed Keras call unpacking
    ``a, b = inputs``), which a tuple passes; else ''."""
    inputs = call.inputs
    if getattr(inputs, "several", False) or not getattr(inputs, "list_items", ()):
        return ""
    return (f"{read_as_points(inputs)}. Fix: if they are separate inputs of the model "
            "(model([a, b]), a Keras model with several inputs, a call that unpacks a, b = "
            "inputs), pass them as a tuple, x=tuple(x): each one is then differentiated as its "
            "own argument.")


def _sequence_first_hint(call: Call) -> str:
    """For an output that does not follow the points, from a model with sequence-first
    layers (an RNN or attention built without ``batch_first=True``): what nbderiv takes as
    the points and the wrapper that fits, else ''."""
    try:
        seq_first = call.backend.layer_summary(call.model).get("seq_first", ())
    except Exception:  # only for the message
        return ""
    if not seq_first or len(call.point_shapes[0]) < 2:
        return ""
    names = ", ".join(seq_first[:4])
    return (f"The model holds {names}, built without batch_first=True: it reads axis 0 of its "
            "input as the time steps, while nbderiv takes axis 0 of x as the points. Fix: "
            "give nbderiv the points first, x of shape (N, T, F), and build the layer with "
            "batch_first=True; or keep the model and pass a wrapper that turns the points "
            "back to time-major: nbderiv.derivatives(lambda z: model(z.transpose(0, 1)), "
            "x.transpose(0, 1)) for x of shape (T, N, F).")


def _every_point_moved(y: np.ndarray, y1: np.ndarray, eps: float) -> bool:
    """Whether the outputs of every one of at least 3 points (rows) changed by more than
    sqrt(eps) of their size (``eps``: the outputs' rounding step) when one point was left out
    of the batch: far beyond another summation order's rounding, and what a model that scales
    by the batch size does (``net(x) / x.shape[0]``: outputs of any size move by the same
    share, which the absolute tolerance misses for small outputs)."""
    if y.shape[0] < 3:
        return False
    with np.errstate(invalid="ignore"):
        size = np.maximum(np.abs(y), np.abs(y1))
        moved = np.abs(y - y1) > np.sqrt(eps) * size + 1e-30
    return bool(np.all(moved.any(axis=1)))


def _differ(a: np.ndarray, b: np.ndarray, eps: float) -> bool:
    """Whether two outputs of the same call differ somewhere by more than two rounding
    steps of that value (each entry on its own scale: a large output never hides a small
    random one), or in where they are NaN or infinite."""
    if a.shape != b.shape:
        return True
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(finite_a, finite_b) or \
            not np.array_equal(a[~finite_a], b[~finite_b], equal_nan=True):
        return True
    a, b = a[finite_a], b[finite_a]
    return bool(np.any(np.abs(a - b) > 2 * eps * np.maximum(np.abs(a), np.abs(b)) + 1e-30))


def _output_eps(y: np.ndarray, dtype) -> float:
    """The rounding step of the model's outputs: the compute dtype's, or a coarser one when
    every output is a value of it (float64 points fed to float32 layers come back rounded to
    float32, and summing in another order moves their last float32 bit)."""
    eps = np.finfo(dtype).eps if np.dtype(dtype).kind == "f" else np.finfo(np.float64).eps
    if y.dtype == np.float64 and eps < np.finfo(np.float32).eps:
        finite = y[np.isfinite(y)]
        if finite.size and np.array_equal(finite.astype(np.float32).astype(np.float64), finite):
            eps = np.finfo(np.float32).eps
    return float(eps)


def probe(call: Call) -> Verdict:
    """Outputs per point, randomness, coupling: the backend's verdict where the model's
    structure settles it, else from a few cheap forward-only model calls (the probe batches,
    then the first k-1 probe points alone: the output's first axis must follow the number of
    points). Sets ``call.verdict``. The probe is the model's first call, so a failure here
    means that the model rejects this input: it is reported as such."""
    verdict = call.backend.known_verdict(call)
    if verdict is not None:
        verdict.structural = True
    elif call.facts.verdict is not None:  # probed before, on this very model state
        verdict = dataclasses.replace(call.facts.verdict)
    else:
        batches, moved = probe_batches(call)
        try:
            outputs = call.backend.forwards(call, batches)
        except OutputError as exc:
            raise _with_sequence_first_hint(call, exc) from None
        except NbderivError:
            raise
        except Exception as exc:
            if _as_given(call, batches[0]):  # tuple arguments of shape (N,), kept so: again
                return probe(call)
            if _takes_unmoved(call, batches[0]):  # only the moved points fail: not continuous
                raise moved_points_error(exc, call.inputs) from None
            odd = _odd_rows(call, str(exc))
            if odd:  # a kwargs= array with another number of rows than x has points
                raise OptionError(
                    f"the model raised {type(exc).__name__} when nbderiv first called it: "
                    f"{first_line(exc)[:200].rstrip('.')}. "
                    + "; ".join(f"kwargs[{name!r}] has shape {shape}, whose first axis is not "
                                f"the {call.n} points of x" for name, shape in odd)
                    + ": nbderiv passed it as it is, the same for every point. Fix: give "
                    f"per-point data one row per point (first axis {call.n}), as x has.") \
                    from None
            raise model_rejected_input(exc, call.inputs, _expected_width(call),
                                       sliced_kwargs(call)) from None
        try:
            fewer = _fewer_points(call, batches[0], outputs[0])
        except OutputError as exc:
            raise _with_sequence_first_hint(call, exc) from None
        try:
            verdict = verdict_of(call, outputs, moved, fewer)
        except OutputError:
            # an argument of shape (N,) passed as (N, 1) that the model broadcasts against its
            # own (N, 1) (t[:, None]): the outputs grow with N. As given, (N,), it fits
            if _as_given(call, batches[0]):
                return probe(call)
            raise
        if verdict.stochastic:  # random: does it still couple points, with its randomness repeated?
            seeded = call.backend.seeded_forwards(call, batches)
            again = None if seeded is None else verdict_of(call, seeded, moved)
            if again is not None and not again.stochastic:
                verdict.coupled, verdict.size_only = again.coupled, again.size_only
                if again.coupled and not again.size_only and call.backend.seeded_cross_terms(
                        call, batches[0], moved[2]) is False:
                    # moved points changed the others' random draws (RReLU draws one per
                    # negative input), not their outputs' dependence: autodiff sees none
                    verdict.coupled = False
            # or not random at all: forward updates the model's own state (a buffer)
            restored = call.backend.restored_forwards(call, batches)
            same = None if restored is None else verdict_of(call, restored, moved)
            if same is not None and not same.stochastic:
                verdict.stochastic, verdict.coupled = False, same.coupled
                verdict.size_only = same.size_only
                verdict.self_updating = True
        if verdict.coupled and sliced_kwargs(call):
            _refuse_if_slicing_couples(call)
        call.facts.verdict = dataclasses.replace(verdict)
    call.verdict = verdict
    return verdict


def _refuse_if_slicing_couples(call: Call) -> None:
    """A coupled verdict where kwargs= arrays are sliced with the points: passed whole
    instead, are the points independent? Then the model uses them as one value for every
    point (position ids or a (T, T) mask with T == N, which a probe of one point gets one row
    of, and broadcasts), and the call is refused with the fix, :func:`nbderiv.shared`."""
    sliced = sliced_kwargs(call)
    whole = _with_kwargs_whole(call)
    try:
        batches, moved = probe_batches(whole)
        outputs = call.backend.forwards(whole, batches)
        fewer = _fewer_points(whole, batches[0], outputs[0])
        independent = not verdict_of(whole, outputs, moved, fewer).coupled
    except Exception:  # the model does not take them whole: they are per point
        return
    if independent:
        name = sliced[0][0]
        value = name if name.isidentifier() else "value"
        raise OptionError(
            f"{sliced_with_the_points(sliced, call.n)} So sliced, the model's output for a "
            "point changes with the other points in the batch; passed whole it does not: the "
            "model uses it as one value for every point (position ids of length T, a (T, T) "
            f"mask, with T == N). Fix: pass it as it is, kwargs={{{name!r}: "
            f"nbderiv.shared({value})}}.")


def _with_kwargs_whole(call: Call) -> Call:
    """``call`` with its sliced kwargs= arrays passed whole, as constants (the target stays
    sliced)."""
    keep = [i for i, e in enumerate(call.extras) if not e.name]
    constants = dict(call.constants)
    n_in = call.n_inputs
    for e, a in zip(call.extras, call.args[n_in:]):
        if e.name:
            value = a.reshape((a.shape[0],) + tuple(e.shape))
            constants[e.name] = value != 0 if e.dtype == "bool" else value.astype(e.dtype)
    whole = dataclasses.replace(
        call, extras=tuple(call.extras[i] for i in keep),
        args=list(call.args[:n_in]) + [call.args[n_in + i] for i in keep],
        constants=constants, verdict=None, findings=[], known=None)
    whole.__dict__.pop("_memo_key", None)
    return whole


def _odd_rows(call: Call, text: str) -> list:
    """(name, shape) of the kwargs= arrays passed as they are (not marked shared) whose first
    axis has another length than the points (more than 1: a (1, T) mask broadcasts), where
    the model's error ``text`` names that length (a size mismatch with the points, or with
    the probe's few of them: "Incompatible shapes: [2,8] vs. [4,1]")."""
    out = []
    sizes = set(re.findall(r"\d+", text))
    for name, value in call.constants.items():
        shape = tuple(getattr(value, "shape", ()) or ())
        if len(shape) >= 1 and shape[0] not in (1, call.n) and name not in call.shared_names \
                and str(shape[0]) in sizes:
            out.append((name, tuple(int(v) for v in shape)))
    return out


def _as_given(call: Call, points) -> bool:
    """For a tuple x whose arguments of shape (N,) were passed as (N, 1) and refused: whether
    the model takes them as they were given, (N,) (a PINN's forward(x, t) doing t[:, None]).
    If so, the call passes them so from now on."""
    inputs = call.inputs
    if not getattr(inputs, "several", False) or not getattr(inputs, "reshaped", False):
        return False
    before = list(inputs.point_shapes)
    given = [() if len(shape) == 1 else s for shape, s in zip(inputs.original_shapes, before)]
    if given == before:
        return False
    inputs.point_shapes = given
    try:
        call.backend.forwards(call, [points])
    except Exception:
        inputs.point_shapes = before
        return False
    call.__dict__.pop("_memo_key", None)  # another call shape: other facts
    call.known = None
    return True


def _takes_unmoved(call: Call, points) -> bool:
    """Whether the model takes the probe's points as they are (when the probe batches,
    moved points among them, failed)."""
    try:
        call.backend.forwards(call, [points])
    except Exception:
        return False
    return True


def _fewer_points(call: Call, first, y_first):
    """The outputs on the first k-1 probe points alone; refuses an output whose first axis
    only happens to have the length of the batch (e.g. ``2 * x[-1]`` on a 3 x 3 input)."""
    k = first[0].shape[0]
    if k < 2:
        return None
    fewer = [a[:k - 1] for a in first]
    try:
        (y,) = call.backend.forwards(call, [fewer])
    except Exception as exc:
        if per_point_data_failed(exc, call.n, sliced_kwargs(call)):
            # a mask or labels that do not follow the points, not an output's first axis
            raise model_rejected_input(exc, call.inputs, _expected_width(call),
                                       sliced_kwargs(call)) from None
        text = first_line(exc)
        text = text.split(" Fix:")[0].split("; nbderiv needs")[0][:200]
        if model_error_cause(exc) == "batchnorm-one":  # a train-mode BatchNorm, not the output
            raise ModelCallError(
                f"the model raised {type(exc).__name__} ({text.rstrip('.')}) on {k - 1} "
                f"point(s): nbderiv also runs it on fewer points than the {k} given (to see "
                "that each output row belongs to its point). "
                + model_error_fix(exc, k - 1)) from None
        raise OutputError(
            f"the model's output has {k} rows for {k} points, but with {k - 1} points it "
            f"failed ({type(exc).__name__}: {text.rstrip('.')}): its first axis only happens "
            "to have the length of the batch, it is not one row per point (e.g. an output "
            "indexed like x[-1], or a reduction over the points followed by a reshape). "
            f"Fix: return one row per point, shape (N, d_out), computed from each point's "
            "own input."
        ) from None
    return np.asarray(y)


def _expected_width(call: Call):
    try:  # only for the message: never let it hide the real error
        return call.backend.input_width(call.model)
    except Exception:
        return None


# -- blocks -----------------------------------------------------------------------------------
def block_rows(call: Call, order: int, m: int, chunk_size=None, memory_budget=1 << 30):
    """(rows per block, chunked): at most ``chunk_size`` (or what ``memory_budget`` allows)
    and at most the backend's preferred block; ``chunked`` says the memory limit cut the
    points into blocks."""
    # each block's results exist twice for a moment (the backend's arrays, then their place
    # in the full result, which is allocated once whatever the block size)
    results = call.dtype.itemsize * call.d_out * sum(m ** k for k in range(order + 1))
    if results > memory_budget:  # not even one point fits: no block size helps
        raise MemoryBudgetError(
            f"one point's derivatives up to order {order} over its {m} differentiated input "
            f"value(s) hold {call.d_out} x {m}**{order} numbers at the top order alone, "
            f"{results / 2**20:.1f} MB per point, over the memory budget of "
            f"{memory_budget / 2**20:.1f} MB (and working memory comes on top): order k grows "
            f"like {m}**k. Fix: pass wrt= the inputs you need (wrt=[i] for one pixel or "
            "feature), a lower order, or raise memory_budget= if the machine has the memory.")
    if chunk_size is not None:
        limit = chunk_size
    else:
        work = call.backend.bytes_per_point(call, order, m)
        limit = max(1, int(memory_budget // max(work + results, 1)))
    chunked = limit < call.n
    preferred = call.backend.block_rows(call)
    if preferred is not None and call.n > 2 * preferred:  # up to two blocks: one call is cheaper
        limit = min(limit, preferred)
    return equal_block_size(call.n, limit), chunked


def _progress(items, enabled, after=2.0):
    """``items``, with a progress bar: from the start when ``enabled`` is True, never when
    False, and by default (None) only once the work has taken ``after`` seconds and more
    than one item is left (a quick call shows nothing, in a terminal or a notebook)."""
    items = list(items)
    if enabled is False or len(items) < 2:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a requirement
        yield from items
        return
    start, bar = time.perf_counter(), None
    try:
        for i, item in enumerate(items):
            if bar is None and (enabled or (time.perf_counter() - start > after
                                            and len(items) - i > 1)):
                bar = tqdm(total=len(items), initial=i, desc="nbderiv", unit="block",
                           leave=False)
            yield item
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def run_blocks(call: Call, order: int, wrt, rows: int, progress=False) -> Block:
    """Derivatives of every point, ``rows`` points per backend call. Every call gets exactly
    ``rows`` points (the last block overlaps the one before), so that backends that trace or
    compile per shape see one shape. The full result is allocated once, after the first
    block, and later blocks are written into it."""
    starts = block_starts(call.n, rows)
    full, methods = None, []
    # points seen before on this model state: their kinks are known (the backend need not look)
    known = memo.recalled_kinks(call)
    call.kink_rows = known
    kinks = np.zeros(call.n, dtype=bool)
    with model_errors(call, f"differentiating it (order {order})"):
        for s in _progress(starts, progress):
            args = call.rows(s, s + rows)
            if full is None:  # the first block tells the shapes of the full result
                part = call.backend.derivatives(call, args, order, wrt)
                kinks = _kinks_of(part, kinks, s)
                if len(starts) == 1:
                    _set_kink_rows(call, known, kinks)
                    return part
                full = Block(result_array((call.n,) + part.y.shape[1:], part.y.dtype),
                             [result_array((call.n,) + d.shape[1:], d.dtype)
                              for d in part.orders], part.method)
                view = None
            else:
                view = Block(full.y[s:s + rows], [d[s:s + rows] for d in full.orders], "")
                part = call.backend.derivatives(call, args, order, wrt, out=view)
                kinks = _kinks_of(part, kinks, s)
            methods.append(part.method)
            if view is None or part.y is not view.y:  # else written in place by the backend
                full.y[s:s + rows] = part.y
                for dst, d in zip(full.orders, part.orders):
                    dst[s:s + rows] = d
    _set_kink_rows(call, known, kinks)
    return Block(full.y, full.orders, _one_method(methods))


def _set_kink_rows(call: Call, known, kinks) -> None:
    if known is None:  # else kept: the backend did not look
        call.kink_rows = None if kinks is None else np.flatnonzero(kinks).tolist()


def _kinks_of(part: Block, kinks, start):
    """``kinks`` (n,) with the block's points at a kink marked; None once a block did not
    look (then the findings look themselves)."""
    if kinks is None or part.kinks is None:
        return None
    kinks[start:start + len(part.kinks)] |= part.kinks
    return kinks


def _one_method(methods) -> str:
    """The method of a blocked call: the first block's, with (XLA) if any block ran it."""
    base = methods[0].replace(" (XLA)", "")
    return base + (" (XLA)" if any(m.endswith("(XLA)") for m in methods) else "")


def per_point(call: Call, order: int, wrt) -> tuple:
    """(Block of true per-point derivatives, the ones trick's error) for a model that couples
    points; the error is the largest |ones-trick d1 - true d1|, for the coupled-samples
    finding."""
    with model_errors(call, "differentiating it point by point"):
        block = call.backend.per_point_derivatives(call, call.args, order, wrt)
        ones = call.backend.derivatives(call, call.args, 1, wrt).orders[0]
    return block, float(np.abs(ones - block.orders[0]).max())
