"""The public functions: :func:`derivatives`, :func:`diagnose`, :func:`full_jacobian`.

Each is a thin layer over the one computation path in :mod:`nbderiv.compute`.

>>> import torch, nbderiv
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
>>> d = nbderiv.derivatives(net, torch.rand(100, 2), order=2)
>>> d[1].shape, d[2].shape
((100, 1, 2), (100, 1, 2, 2))
"""

from __future__ import annotations

import functools

import numpy as np

from . import findings as dg
from .compute import (
    block_rows,
    model_errors,
    one_at_a_time,
    open_call,
    per_point,
    probe,
    probe_points,
    run_blocks,
)
from .errors import MemoryBudgetError, OptionError
from .inputs import check_order, check_wrt
from .memo import kept
from .options import byte_count, flag, positive_int
from .result import Derivatives
from .result_checks import result_findings

DEFAULT_ORDER = 1
DEFAULT_MEMORY_BUDGET = 1 << 30          # working memory for derivatives, bytes
DEFAULT_JACOBIAN_BUDGET = 256 * 2 ** 20  # full cross-sample Jacobian, bytes


def _findings_before(call, order) -> dict:
    """The layer summary and the findings that need no derivatives (structure, randomness)."""
    layers = kept(call, "layers", lambda: call.backend.layer_summary(call.model))
    verdict = call.verdict
    inert = call.n >= 2 and not (verdict.stochastic or verdict.coupled or verdict.self_updating
                                 or call.hidden_coupling is not None)
    call.findings += dg.structural_findings(layers, order, inert=inert)
    if call.verdict.stochastic and not any(f.code == "train-mode" for f in call.findings):
        call.findings.append(dg.stochastic_finding(keras=call.backend.name == "tensorflow"))
    elif call.verdict.self_updating and not any(f.code == "train-mode" for f in call.findings):
        call.findings.append(dg.self_updating_finding())
    return layers


def _coupling_causes(call, layers) -> dict:
    """What the layer summary says of why points are coupled: a layer in training mode (a
    torch model with none mixes the points in its forward pass itself), attention layers
    that read axis 0 as the sequence."""
    torch_model = call.backend.name == "torch"
    return {"train_mode": bool(layers.get("train_mode")) or not torch_model,
            "seq_first": tuple(layers.get("seq_first", ())), "keras": not torch_model}


def _differentiate(call, order, wrt, *, chunk_size=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                   progress=False):
    """(Block of every point, layers): the probe, the findings, then the per-point blocks
    (coupled models) or the blocks of points. Inside the backend's ``preserved``."""
    verdict = probe(call)
    layers = _findings_before(call, order)
    if verdict.self_updating:  # the probe's passes moved the state: from the user's again
        call.backend.state_back(call)
    if verdict.coupled:
        block, ones_error = per_point(call, order, wrt)
        diag = float(abs(block.orders[0]).max())
        if ones_error <= 64 * float(np.finfo(call.dtype).eps) * diag and verdict.size_only:
            # the outputs follow the number of points, not the other points' values (moving
            # them changed nothing, and autodiff sees no cross-terms): x.shape[0] in forward
            call.findings.append(dg.batch_size_finding(call.n))
        elif ones_error <= 64 * float(np.finfo(call.dtype).eps) * diag:
            # the forward pass couples points, autodiff sees none of it (.item(), .detach(),
            # or a coupling the probe's moves set off that is not active at these points):
            # the result checks compare with the forward pass where it may act
            call.hidden_coupling = (probe_points(call), ones_error, diag)
        else:
            call.findings.append(dg.coupling_finding(ones_error, diag, call.n,
                                                     outside=layers.get("outside_tree", ()),
                                                     batch_stats=layers.get("batch_stats", ()),
                                                     **_coupling_causes(call, layers)))
        return block, layers
    rows, chunked = block_rows(call, order, len(wrt), chunk_size, memory_budget)
    call.block_rows = rows
    block = run_blocks(call, order, wrt, rows, progress)
    if chunked:
        block = block._replace(method=block.method + " (chunked)")
    return block, layers


def derivatives(model, x, order=DEFAULT_ORDER, *, wrt=None, framework=None, check=False,
                chunk_size=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                progress=None, reference=None, target=None, kwargs=None) -> Derivatives:
    """Per-point derivatives of ``model`` with respect to its input, orders 1..``order``.

    ``x`` is (N, *S): N points, each of shape S — (N, d_in) vectors, (N, C, H, W) images,
    (N, T, F) sequences — or (N,) (N points of one feature), a nested list, or a tuple
    ``(x, t, ...)`` of separate arguments. Returns :class:`~nbderiv.result.Derivatives`
    with ``d[k]`` of shape (N,) + O + S * k, O each point's output shape (``(d_out,)`` for
    vector outputs), the layout ``vmap(jacrev)`` gives; with ``wrt`` (indices into each
    point's flattened input, C order: ``np.ravel_multi_index((c, h, w), S)``) or a tuple x,
    (N,) + O + (len(wrt),) * k.

    ``target``: one int, or one int per point, selects one output per point before
    differentiating (saliency: d score[label] / d image); the output axis then has length 1.
    For outputs of several axes per point (segmentation logits (C, H, W)) it indexes the
    flattened output, C order: ``np.ravel_multi_index((c, h, w), O)``.
    ``kwargs``: extra keyword arguments for the model, never differentiated; arrays whose
    first axis has length N (e.g. a padding mask) are sliced with the points, and a value
    wrapped in :func:`nbderiv.shared` is passed as it is (a causal (T, T) mask when N == T).

    ``reference``, a known truth: a function of NumPy float64 arrays giving y
    (``f(x)``, x of shape (N, d_in), or (N, *S) for images and sequences; ``f(x, t)`` for a
    tuple input), differentiated by
    float64 central differences, or a dict ``{k: f_k}`` of closed-form d[k] (0: y). Then
    ``d.reference_errors = {k: (max_abs, max_rel)}`` (see :mod:`nbderiv.reference`).

    >>> import torch, nbderiv
    >>> d = nbderiv.derivatives(lambda x: x**3 + 2*x**2 + 1, torch.tensor([2.0]), order=2)
    >>> float(d[1][0, 0, 0]), float(d[2][0, 0, 0, 0])
    (20.0, 16.0)
    """
    return derivatives_and_jacobian(model, x, order, wrt=wrt, framework=framework, check=check,
                                    chunk_size=chunk_size, memory_budget=memory_budget,
                                    progress=progress, reference=reference, target=target,
                                    kwargs=kwargs)[0]


def derivatives_and_jacobian(model, x, order=DEFAULT_ORDER, *, wrt=None, framework=None,
                             check=False, chunk_size=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                             progress=None, reference=None, target=None, kwargs=None,
                             jacobian_budget=None) -> tuple:
    """(:func:`derivatives` of ``model`` at ``x``, the :func:`full_jacobian` or None) from one
    call: one probe, one set of findings (what ``%nnderiv --full`` shows). The Jacobian is
    computed when ``jacobian_budget`` (bytes) is given.

    >>> import torch
    >>> d, J = derivatives_and_jacobian(torch.sin, torch.zeros(3, 1), jacobian_budget=2**20)
    >>> d[1].shape, J.shape
    ((3, 1, 1), (3, 1, 3, 1))
    """
    order = check_order(order)
    check = flag(check, "check")
    progress = None if progress is None else flag(progress, "progress")
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size", example=4096)
    memory_budget = byte_count(memory_budget, "memory_budget")
    call = open_call(model, x, framework, target=target, kwargs=kwargs)
    wrt = check_wrt(wrt, call.input_width, call.names)
    with one_at_a_time(call):
        block, layers = _differentiate(call, order, wrt, chunk_size=chunk_size,
                                       memory_budget=memory_budget, progress=progress)
        y, ders = block.y, block.orders
        with model_errors(call, "checking its findings (kinks, finite differences)"):
            call.findings += result_findings(call, layers, y, ders, order, wrt,
                                                call.findings)
        result = Derivatives(x=call.input_features(), y=y, orders=ders,
                             framework=call.backend.name,
                             method=block.method, inputs=call.names, wrt=wrt,
                             findings=call.findings)
        if check:  # inside preserved(): a check that has to use the model itself restores it too
            from .fdcheck import finite_difference_check

            if call.verdict.self_updating:  # copied from the state the result was taken in
                call.backend.state_back(call)

            rows = block_rows(call, order, len(wrt), chunk_size, memory_budget)[0]
            result.check = finite_difference_check(
                call, result, coupled=call.verdict.coupled,
                compute=lambda c, k: run_blocks(c, k, wrt, min(rows, c.n)))
            if result.check.low_precision:
                result.findings.append(dg.low_precision_finding(  # the precision it ran in
                    result.check.errors, result.check.result_dtype or call.dtype,
                    result.check.low_precision_orders))
        J = None if jacobian_budget is None else _full_of(call, byte_count(
            jacobian_budget, "jacobian_budget"))
        # what plain nested autodiff needs besides for this model (a kernel, a formula); it may
        # run the model: inside preserved()
        result._code_notes = call.backend.code_notes(call, order)
        result._stochastic = bool(call.verdict.stochastic)
    if reference is not None:  # the error against a known truth, per order
        from .backends import model_framework
        from .reference import reference_errors

        if not isinstance(reference, dict) and model_framework(reference) is not None:
            raise OptionError(
                f"reference= is a {type(reference).__name__} model; reference= takes a NumPy "
                "function of x (its derivatives are taken by float64 central differences, "
                "which a float32 model would fill with rounding). Fix: compare with the other "
                "model's own derivatives, d_ref = nbderiv.derivatives(reference_model, x, "
                "order=K), then np.abs(d[k] - d_ref[k]).max().")

        result.reference_errors = reference_errors(reference, call, result)
    has_target = any(not extra.name for extra in call.extras)
    result._code = functools.partial(_code_for, call.backend, call.widths[:call.n_inputs],
                                     order, wrt, call.verdict.coupled,
                                     bool(call.constants or len(call.extras) > has_target),
                                     shapes=call.point_shapes[:call.n_inputs],
                                     out_shape=call.verdict.out_shape,
                                     notes=result._code_notes + ("target",) * has_target)
    result._time_axis = kept(call, "time axis", lambda: _time_axis(call))
    if has_target:  # (the target travels as the last extra column, as ints)
        result._targets = call.args[-1][:, 0].astype(np.int64)
    result._present(call.verdict.out_shape,
                    call.point_shapes[0] if call.n_inputs == 1 else None)
    return result, J


def _time_axis(call) -> int:
    """1 where each point of one input is (channels, length), as a Conv1d that receives it
    expects (its input width reads (C, None)); else 0, (time, features)."""
    shapes = call.point_shapes
    if call.n_inputs != 1 or len(shapes[0]) != 2:
        return 0
    try:
        expected = call.backend.input_width(call.model)
    except Exception:  # only for the pictures: never let it fail the call
        return 0
    channels_first = isinstance(expected, tuple) and len(expected) == 2 \
        and expected[0] is not None and expected[1] is None
    return 1 if channels_first else 0


def _code_for(backend, widths, order, wrt, coupled=False, extras=False, shapes=None,
              out_shape=None, notes=()):
    wrt = None if wrt == tuple(range(sum(widths))) else wrt
    code = backend.equivalent_code(order=order, wrt=wrt, widths=widths, shapes=shapes,
                                   out_shape=out_shape, notes=notes)
    if extras:
        code = ("# NOTE: this call used kwargs=; the code below calls the model without them:\n"
                "# pass the same keyword arguments in its call (as tensors).\n") + code
    if coupled:
        remedy = ("The finding names the cause and its fix (model.eval() where a layer\n"
                  "# runs in training mode; a mean over axis 0 or attention without\n"
                  "# batch_first=True couples points in eval mode too).\n"
                  if backend.name == "torch" else
                  "Call the model with training=False, and do not force a layer into\n"
                  "# training mode inside call() (e.g. BatchNormalization()(h, training=True)).\n")
        code = ("# CAUTION: this model couples points (finding coupled-samples). The code below\n"
                "# uses the grad_outputs=ones trick, which then returns column sums of the N x N\n"
                "# Jacobian, NOT the per-point blocks in d[k]. " + remedy) + code
    return code


def diagnose(model, x, order=2, *, wrt=None, framework=None) -> list:
    """The findings a computation of this order would raise, from cheap probes only
    (structure, a few forward passes, derivatives at up to 8 points).

    >>> import torch, nbderiv
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> nbderiv.diagnose(net, torch.rand(50, 1))
    []
    """
    order = check_order(order)
    call = open_call(model, x, framework)
    wrt = check_wrt(wrt, call.width, call.names)
    with one_at_a_time(call):
        verdict = probe(call)
        layers = _findings_before(call, order)
        few = call.with_args(call.rows(0, dg.PROBE_POINTS), verdict=verdict)
        if verdict.coupled:
            block, ones_error = per_point(few, min(order, 2), wrt)
            diag = float(abs(block.orders[0]).max())
            if verdict.size_only and ones_error <= 64 * float(np.finfo(call.dtype).eps) * diag:
                call.findings.append(dg.batch_size_finding(call.n))
            else:
                call.findings.append(dg.coupling_finding(
                    ones_error, diag, few.n, outside=layers.get("outside_tree", ()),
                    batch_stats=layers.get("batch_stats", ()), **_coupling_causes(call, layers)))
        else:
            with model_errors(few, f"differentiating it (order {min(order, 2)})"):
                block = call.backend.derivatives(few, few.args, min(order, 2), wrt)
        with model_errors(call, "checking its findings (kinks, finite differences)"):
            call.findings += result_findings(call, layers, block.y, block.orders, order,
                                                wrt, call.findings)
    return call.findings


def full_jacobian(model, x, *, framework=None, memory_budget=DEFAULT_JACOBIAN_BUDGET):
    """The cross-sample Jacobian J[n, j, m, i] = d y[n, j] / d x[m, i], shape (N, d_out, N, d_in).

    For independent points it is block diagonal: only m == n blocks are non-zero. Its size
    grows like N**2, so it is refused past ``memory_budget`` bytes (default 256 MB).

    >>> import torch, nbderiv
    >>> J = nbderiv.full_jacobian(torch.sin, torch.zeros(3, 1))
    >>> J.shape
    (3, 1, 3, 1)
    """
    memory_budget = byte_count(memory_budget, "memory_budget")
    call = open_call(model, x, framework)
    with one_at_a_time(call):
        probe(call)
        return _full_of(call, memory_budget)


def _full_of(call, memory_budget):
    """The cross-sample Jacobian of a probed call, refused past ``memory_budget`` bytes."""
    if call.extras:
        raise OptionError("the full Jacobian is taken of the model's own outputs, without "
                          "target= or kwargs=. Fix: call nbderiv.full_jacobian(model, x).")
    d_out = call.d_out
    size = call.n * d_out * call.n * call.width * call.dtype.itemsize
    if size > memory_budget:
        raise MemoryBudgetError(
            f"the full Jacobian for N={call.n} points would be shape "
            f"({call.n}, {d_out}, {call.n}, {call.width}) = {size / 2**20:.1f} MB, "
            f"over the budget of {memory_budget / 2**20:.1f} MB; it grows like N**2. "
            "Fix: use nbderiv.derivatives(model, x) for the per-point blocks, pass fewer points, "
            "or raise memory_budget=."
        )
    with model_errors(call, "building the full Jacobian"):
        J = call.backend.full_jacobian(call, call.args)
    return J.reshape(call.n, d_out, call.n, call.width)
