"""The public functions: :func:`derivatives`, :func:`diagnose`, :func:`full_jacobian`.

>>> import torch, nbderiv
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
>>> d = nbderiv.derivatives(net, torch.rand(100, 2), order=2)
>>> d[1].shape, d[2].shape
((100, 1, 2), (100, 1, 2, 2))
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import findings as dg
from .backends import select_backend
from .backends.base import block_starts, equal_block_size
from .errors import MemoryBudgetError, ModelCallError, NbderivError, OptionError
from .inputs import (
    check_order,
    check_wrt,
    input_findings,
    input_names,
    model_rejected_input,
    prepare_inputs,
)
from .result import Derivatives
from .result_memory import result_array

DEFAULT_MEMORY_BUDGET = 1 << 30          # working memory for derivatives, bytes
DEFAULT_JACOBIAN_BUDGET = 256 * 2 ** 20  # full cross-sample Jacobian, bytes


@dataclass
class _Call:
    """Everything known about one (model, x) pair before differentiating."""

    model: object
    backend: object
    prepared: object
    dtype: np.dtype
    args: list
    names: tuple
    context: dict
    findings: list = field(default_factory=list)
    non_finite_x: list | None = None  # rows of x with a NaN or inf, once looked for

    @property
    def n(self) -> int:
        return self.prepared.n_points

    def forwards(self, batches):
        return self._first_contact(self.backend.forwards, batches)

    def output_width(self):
        return self._first_contact(self.backend.output_width, self.args)

    def _first_contact(self, method, *args):
        """A backend call that may be the model's first: a failure means the model rejects
        this input (shape, dtype), reported with the width the model expects."""
        try:
            return method(self.model, *args, self.context)
        except NbderivError:
            raise
        except Exception as exc:
            raise model_rejected_input(exc, self.prepared, self.expected_width()) from None

    def expected_width(self):
        """The input width the model declares (e.g. its first layer), or None."""
        try:
            return self.backend.input_width(self.model)
        except Exception:  # only for the message: never let it hide the real error
            return None


@contextmanager
def _model_errors(call, doing: str):
    """Turn an exception raised inside the model (past the first probe) into one readable error."""
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


def _open(model, x, framework) -> _Call:
    backend = select_backend(model, x, framework)
    backend.begin(model)
    prepared = prepare_inputs(x, to_numpy=backend.to_numpy)
    dtype = backend.compute_dtype(model, prepared.arrays[0].dtype)
    arg_names = backend.argument_names(model, len(prepared.arrays)) if prepared.several else None
    call = _Call(model, backend, prepared, np.dtype(dtype), prepared.cast(dtype),
                 input_names(prepared, arg_names), backend.context(model, x, dtype))
    call.findings += input_findings(prepared, dtype)
    bad = call.non_finite_x = dg.non_finite_points(*call.args)
    if bad:
        call.findings.append(dg.non_finite_finding("x", bad))
    return call


def _probe_batches(call: _Call) -> list:
    """The probe: the first few points twice (randomness), then with point 0 moved (does any
    other point's output change?). Backends that fuse the probe compute the same in-graph."""
    k = min(call.n, dg.PROBE_POINTS)
    probe = [a[:k].copy() for a in call.args]
    shifted = [a.copy() for a in probe]
    for a in shifted:
        a[0] += (0.1 * (1 + np.abs(a[0]))).astype(a.dtype)
    return [probe, probe, shifted]


def _verdict(call: _Call, outputs):
    """(d_out, stochastic, coupled) from the outputs of the three probe batches."""
    y1, y2, y3 = (np.ascontiguousarray(y) for y in outputs)
    stochastic = y1.tobytes() != y2.tobytes()  # the same model call twice: identical bits?
    coupled = False
    if not stochastic and y1.shape[0] >= 2:
        with np.errstate(invalid="ignore"):  # inf - inf at points where y is infinite
            change = np.fmax.reduce(np.abs(y3[1:] - y1[1:]), axis=None, initial=0)  # NaN skipped
        scale = 1 + np.fmax.reduce(np.abs(y1), axis=None, initial=0)
        coupled = bool(change > 100 * np.finfo(call.dtype).eps * scale)
    return y1.shape[1], stochastic, coupled


def _probe(call: _Call):
    """Output width, randomness, coupling: the backend's verdict from the structure where
    that is certain, else from cheap forward-only probes on a few points."""
    known = call.backend.known_verdict(call.model, call.args, call.context)
    return known if known is not None else _probed(call)


def _probed(call: _Call):
    return _verdict(call, call.forwards(_probe_batches(call)))


def _chunk_size(call, d_out, order, m, chunk_size, memory_budget):
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
                or chunk_size < 1:
            raise OptionError(f"chunk_size must be a positive int, got {chunk_size!r}. "
                              "Fix: e.g. chunk_size=4096, or leave it None to chunk by "
                              "memory_budget.")
        return int(chunk_size)
    work = call.backend.bytes_per_point(call.model, call.prepared.width, d_out, order, m)
    # each chunk's results exist twice for a moment (the backend's arrays, then their place in
    # the full result, which is allocated once and does not depend on the chunk size)
    results = call.dtype.itemsize * d_out * sum(m ** k for k in range(order + 1))
    chunk = int(memory_budget // max(work + results, 1))
    in_flight = call.backend.rows_in_flight(call.model, call.prepared.widths)
    if in_flight is not None and chunk > in_flight:
        # the backend works on at most in_flight rows at a time: past that, a larger chunk
        # only adds results
        chunk = int((memory_budget - in_flight * work) // max(results, 1))
    return equal_block_size(call.n, chunk)


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a requirement
        return iterable
    return tqdm(iterable, total=total, desc="nbderiv", unit="chunk", leave=False)


def _compute(call, order, wrt, chunk, progress, first=None):
    """Derivatives of every point, ``chunk`` points per backend call (``first``: the result
    for the first chunk, when it is already known). Every call gets exactly ``chunk`` points
    (the last one overlaps the one before), so that backends that trace or compile per shape
    see one shape."""
    starts = block_starts(call.n, chunk)
    show = progress if progress is not None else len(starts) >= 8
    y = ders = method = None
    for s in _progress(starts, len(starts), show):
        if s == 0 and first is not None:
            part = first
        else:
            with _model_errors(call, f"differentiating it (order {order})"):
                part = call.backend.derivatives(
                    call.model, [a[s:s + chunk] for a in call.args], order, wrt, call.context)
        if len(starts) == 1:
            return part
        y_part, ders_part, method = part
        if y is None:  # the full result, allocated once and filled chunk by chunk
            y = result_array((call.n,) + y_part.shape[1:], y_part.dtype)
            ders = [result_array((call.n,) + d.shape[1:], d.dtype) for d in ders_part]
        y[s:s + chunk] = y_part
        for full, d in zip(ders, ders_part):
            full[s:s + chunk] = d
    return y, ders, method + " (chunked)"


def derivatives(model, x, order=1, *, wrt=None, framework=None, check=False, chunk_size=None,
                memory_budget=DEFAULT_MEMORY_BUDGET, progress=None) -> Derivatives:
    """Per-point derivatives of ``model`` with respect to its input, orders 1..``order``.

    ``x`` is (N, d_in), (N,) (N points of one feature), a nested list, or a tuple
    ``(x, t, ...)`` of separate arguments. Returns :class:`~nbderiv.result.Derivatives`
    with ``d[k]`` of shape (N, d_out) + (len(wrt),) * k.

    >>> import torch, nbderiv
    >>> d = nbderiv.derivatives(lambda x: x**3 + 2*x**2 + 1, torch.tensor([2.0]), order=2)
    >>> float(d[1][0, 0, 0]), float(d[2][0, 0, 0, 0])
    (20.0, 16.0)
    """
    order = check_order(order)
    call = _open(model, x, framework)
    wrt = check_wrt(wrt, call.prepared.width, call.names)
    backend = call.backend
    findings = call.findings
    with backend.preserved(model):
        first = None
        chunk = None
        known = backend.known_verdict(model, call.args, call.context)
        if known is None and backend.fused_probe:
            chunk = _chunk_size(call, call.output_width(), order, len(wrt), chunk_size,
                                memory_budget)
        if chunk is not None and chunk >= min(call.n, dg.PROBE_POINTS):
            # one dispatch computes the first chunk and the probe (see Backend.fused_probe)
            with _model_errors(call, f"differentiating it (order {order})"):
                first, probe_outputs = backend.derivatives_and_probe(
                    model, [a[:chunk] for a in call.args], order, wrt, call.context)
            d_out, stochastic, coupled = _verdict(call, probe_outputs)
        else:
            d_out, stochastic, coupled = known if known is not None else _probed(call)
            if chunk is None:
                chunk = _chunk_size(call, d_out, order, len(wrt), chunk_size, memory_budget)
        call.context["d_out"] = d_out
        layers = backend.layer_summary(model)
        findings += dg.structural_findings(layers, order)
        if stochastic and not any(f.code == "train-mode" for f in findings):
            findings.append(dg.stochastic_finding())
        if coupled:
            with _model_errors(call, "differentiating it point by point"):
                y, ders, method = backend.per_point_derivatives(model, call.args, order, wrt,
                                                                call.context)
                _, ones, _ = backend.derivatives(model, call.args, 1, wrt, call.context)
            findings.append(dg.coupling_finding(float(np.abs(ones[0] - ders[0]).max()),
                                                float(np.abs(ders[0]).max()), call.n))
        else:
            y, ders, method = _compute(call, order, wrt, chunk, progress, first)
        findings += _result_findings(call, layers, y, ders, order, wrt, findings)
        x_all = call.args[0] if len(call.args) == 1 else np.concatenate(call.args, axis=1)
        result = Derivatives(x=x_all, y=y, orders=ders,
                             framework=backend.name, method=method, inputs=call.names, wrt=wrt,
                             findings=findings)
        if check:  # inside preserved(): a check that has to use the model itself restores it too
            from .fdcheck import finite_difference_check

            compute = None if coupled else (lambda c, k: _compute(c, k, wrt, chunk, False))
            result.check = finite_difference_check(call, result, coupled=coupled,
                                                   compute=compute)
            if result.check.low_precision:
                result.findings.append(dg.low_precision_finding(
                    result.check.errors, call.dtype, result.check.low_precision_orders))
    result._code = functools.partial(_code_for, call.backend, call.prepared.widths, order, wrt,
                                     coupled)  # written on first use of d.code
    return result


def _code_for(backend, widths, order, wrt, coupled=False):
    wrt = None if wrt == tuple(range(sum(widths))) else wrt
    code = backend.equivalent_code(order=order, wrt=wrt, widths=widths)
    if coupled:
        code = ("# CAUTION: this model couples points (finding coupled-samples). The code below\n"
                "# uses the grad_outputs=ones trick, which then returns column sums of the N x N\n"
                "# Jacobian, NOT the per-point blocks in d[k]. Call model.eval() first.\n") + code
    return code


def _result_findings(call, layers, y, ders, order, wrt, earlier):
    return dg.result_findings(call, layers, y, ders, order, wrt, earlier)


def diagnose(model, x, order=2, *, wrt=None, framework=None) -> list:
    """The findings a computation of this order would raise, from cheap probes only
    (structure, a few forward passes, derivatives at up to 8 points).

    >>> import torch, nbderiv
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> nbderiv.diagnose(net, torch.rand(50, 1))
    []
    """
    order = check_order(order)
    call = _open(model, x, framework)
    wrt = check_wrt(wrt, call.prepared.width, call.names)
    findings = call.findings
    k = min(call.n, dg.PROBE_POINTS)
    with call.backend.preserved(model):
        _, stochastic, coupled = _probe(call)
        layers = call.backend.layer_summary(model)
        findings += dg.structural_findings(layers, order)
        if stochastic and not any(f.code == "train-mode" for f in findings):
            findings.append(dg.stochastic_finding())
        probe = [a[:k] for a in call.args]
        if coupled:
            y, ders, _ = call.backend.per_point_derivatives(model, probe, min(order, 2), wrt,
                                                            call.context)
            _, ones, _ = call.backend.derivatives(model, probe, 1, wrt, call.context)
            findings.append(dg.coupling_finding(float(np.abs(ones[0] - ders[0]).max()),
                                                float(np.abs(ders[0]).max()), k))
        else:
            y, ders, _ = call.backend.derivatives(model, probe, min(order, 2), wrt, call.context)
        probe_call = _Call(model, call.backend, call.prepared, call.dtype, call.args, call.names,
                           call.context)
        findings += _result_findings(probe_call, layers, y, ders, order, wrt, findings)
    return findings


def full_jacobian(model, x, *, framework=None, memory_budget=DEFAULT_JACOBIAN_BUDGET):
    """The cross-sample Jacobian J[n, j, m, i] = d y[n, j] / d x[m, i], shape (N, d_out, N, d_in).

    For independent points it is block diagonal: only m == n blocks are non-zero. Its size
    grows like N**2, so it is refused past ``memory_budget`` bytes (default 256 MB).

    >>> import torch, nbderiv
    >>> J = nbderiv.full_jacobian(torch.sin, torch.zeros(3, 1))
    >>> J.shape
    (3, 1, 3, 1)
    """
    call = _open(model, x, framework)
    with call.backend.preserved(model):
        d_out = _probe(call)[0]
        size = call.n * d_out * call.n * call.prepared.width * call.dtype.itemsize
        if size > memory_budget:
            raise MemoryBudgetError(
                f"the full Jacobian for N={call.n} points would be shape "
                f"({call.n}, {d_out}, {call.n}, {call.prepared.width}) = {size / 2**20:.1f} MB, "
                f"over the budget of {memory_budget / 2**20:.1f} MB; it grows like N**2. "
                "Fix: use nbderiv.derivatives(model, x) for the per-point blocks, pass fewer points, "
                "or raise memory_budget=."
            )
        with _model_errors(call, "building the full Jacobian"):
            J = call.backend.full_jacobian(model, call.args, call.context)
    return J.reshape(call.n, d_out, call.n, call.prepared.width)
