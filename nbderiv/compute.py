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

import time
from contextlib import contextmanager

import numpy as np

from . import findings as dg
from .backends import select_backend
from .backends.base import Block, block_starts, equal_block_size
from .call import Call, Verdict
from .errors import ModelCallError, NbderivError
from .inputs import input_findings, input_names, model_rejected_input, prepare_inputs
from .result_memory import result_array


def open_call(model, x, framework) -> Call:
    """The backend for ``model``, ``x`` read and cast, the input findings."""
    backend = select_backend(model, x, framework)
    backend.begin(model)
    inputs = prepare_inputs(x, to_numpy=backend.to_numpy)
    dtype = np.dtype(backend.compute_dtype(model, inputs.arrays[0].dtype))
    arg_names = backend.argument_names(model, len(inputs.arrays)) if inputs.several else None
    call = Call(model=model, backend=backend, inputs=inputs, dtype=dtype,
                args=inputs.cast(dtype), names=input_names(inputs, arg_names),
                device=backend.device(model, x))
    call.findings += input_findings(inputs, dtype)
    bad = call.non_finite_x = dg.non_finite_points(*call.args)
    if bad:
        call.findings.append(dg.non_finite_finding("x", bad))
    return call


@contextmanager
def model_errors(call: Call, doing: str):
    """Turn an exception raised inside the model (past the probe) into one readable error."""
    try:
        yield
    except (NbderivError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        shapes = ", ".join(str(tuple(a.shape)) for a in call.args)
        raise ModelCallError(
            f"the model raised {type(exc).__name__} while nbderiv was {doing} on input of shape "
            f"{shapes}: {text}. Fix: check that the model runs on that input with plain "
            "framework code (d.code shows the equivalent), e.g. on a smaller batch."
        ) from None


# -- the probe ------------------------------------------------------------------------------
def probe_batches(call: Call) -> list:
    """The probe's three batches: the first few points twice (randomness), then with point 0
    moved (does any other point's output change?)."""
    k = min(call.n, dg.PROBE_POINTS)
    first = [a[:k].copy() for a in call.args]
    moved = [a.copy() for a in first]
    for a in moved:
        a[0] += (0.1 * (1 + np.abs(a[0]))).astype(a.dtype)
    return [first, first, moved]


def verdict_of(call: Call, outputs) -> Verdict:
    """The :class:`Verdict` from the outputs of the three probe batches."""
    y1, y2, y3 = (np.ascontiguousarray(y) for y in outputs)
    stochastic = y1.tobytes() != y2.tobytes()  # the same model call twice: identical bits?
    coupled = False
    if not stochastic and y1.shape[0] >= 2:
        with np.errstate(invalid="ignore"):  # inf - inf at points where y is infinite
            change = np.fmax.reduce(np.abs(y3[1:] - y1[1:]), axis=None, initial=0)  # NaN skipped
        scale = 1 + np.fmax.reduce(np.abs(y1), axis=None, initial=0)
        coupled = bool(change > 100 * np.finfo(call.dtype).eps * scale)
    return Verdict(int(y1.shape[1]), stochastic, coupled)


def probe(call: Call) -> Verdict:
    """Outputs per point, randomness, coupling: the backend's verdict where the model's
    structure settles it, else from three cheap forward-only model calls. Sets
    ``call.verdict``. The probe is the model's first call, so a failure here means that the
    model rejects this input: it is reported as such."""
    verdict = call.backend.known_verdict(call)
    if verdict is None:
        try:
            outputs = call.backend.forwards(call, probe_batches(call))
        except NbderivError:
            raise
        except Exception as exc:
            raise model_rejected_input(exc, call.inputs, _expected_width(call)) from None
        verdict = verdict_of(call, outputs)
    call.verdict = verdict
    return verdict


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
    if chunk_size is not None:
        limit = chunk_size
    else:
        work = call.backend.bytes_per_point(call, order, m)
        # each block's results exist twice for a moment (the backend's arrays, then their
        # place in the full result, which is allocated once whatever the block size)
        results = call.dtype.itemsize * call.d_out * sum(m ** k for k in range(order + 1))
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
    with model_errors(call, f"differentiating it (order {order})"):
        for s in _progress(starts, progress):
            args = call.rows(s, s + rows)
            if full is None:  # the first block tells the shapes of the full result
                part = call.backend.derivatives(call, args, order, wrt)
                if len(starts) == 1:
                    return part
                full = Block(result_array((call.n,) + part.y.shape[1:], part.y.dtype),
                             [result_array((call.n,) + d.shape[1:], d.dtype)
                              for d in part.orders], part.method)
                view = None
            else:
                view = Block(full.y[s:s + rows], [d[s:s + rows] for d in full.orders], "")
                part = call.backend.derivatives(call, args, order, wrt, out=view)
            methods.append(part.method)
            if view is None or part.y is not view.y:  # else written in place by the backend
                full.y[s:s + rows] = part.y
                for dst, d in zip(full.orders, part.orders):
                    dst[s:s + rows] = d
    return Block(full.y, full.orders, _one_method(methods))


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
