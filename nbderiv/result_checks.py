"""The findings that need the computed derivatives: ``piecewise-linear`` (numerically),
``at-kink``, ``graph-broken``, ``no-input-dependence``, ``saturated``, ``flat-region`` and
``non-finite`` (outputs). Each is confirmed at the points it names before it is raised
(:mod:`nbderiv.confirm`); :mod:`nbderiv.findings` words them.

>>> import numpy as np
>>> _scaled_max(np.array([[[1.0, -3.0]], [[2.0, 0.5]]]), np.array([1.0, 2.0])).tolist()
[6.0]
"""

from __future__ import annotations

import numpy as np

from . import confirm
from .findings import (
    SATURATED_BELOW,
    coupling_finding,
    flat_region_finding,
    graph_broken_finding,
    kink_finding,
    no_dependence_finding,
    non_finite_finding,
    non_finite_points,
    partial_second_order_cut_finding,
    piecewise_constant_finding,
    piecewise_finding,
    saturated_finding,
    structurally_piecewise,
    wide_probe_points,
)
from .result import Finding


def result_findings(call, layers, y, ders, order, wrt, earlier) -> list:
    """The findings that need the results: ``piecewise-linear``, ``at-kink``,
    ``graph-broken``, ``no-input-dependence``, ``saturated`` and ``non-finite`` (outputs).
    ``call`` is the :class:`~nbderiv.call.Call`; ``ders`` belong to its first rows."""
    backend, args = call.backend, call.args
    out = []
    codes = {f.code for f in earlier}
    if "piecewise-linear" not in codes:
        subset = len(set(wrt)) < sum(a.shape[1] for a in args)

        def wider():
            wide = wide_probe_points(args)
            if subset:  # moved along wrt alone: x1 changes x0 * x1's slope in x0, no kink
                wide = _others_held(wide, args, wrt)
            orders = backend.derivatives(call.with_args(wide), wide, 2, wrt).orders
            return orders[0], orders[1]
        def curved():
            if _FLAT_TAILED & set(layers.get("activations", [])) or any(
                    n.startswith("act:") for n in backend.activations_called(call)):
                # smooth activations (GELU, tanh) far out: flat in float32 (and in float64),
                # not piecewise linear; no claim
                return None
            return confirm.curvature_seen(call, confirm.graph_points(call, ders[0]), wrt)
        f = piecewise_finding(layers, ders, order, wider, curved, wider_only=subset)
        if f is not None:
            out.append(f)
    if call.kink_rows is not None:  # looked for in the derivative pass, or known (memo)
        candidates = call.kink_rows
    elif call.known is not None and call.known.kink_free:
        # an earlier call saw this model state call no piecewise function (ReLU, clamp, abs, ...)
        candidates = []
    else:
        candidates = call.kink_rows = backend.kink_points(call, args)
    confirmed, conventions = confirm.kinks_confirmed(call, candidates, wrt, d1=ders[0]) \
        if candidates else ([], [])
    f = kink_finding(confirmed, conventions)
    if f is not None:
        out.append(f)
    confirmed = confirmed + conventions
    out_shape = tuple(getattr(call.verdict, "out_shape", None) or (y.shape[1],))
    out_names = ["y"] if y.shape[1] == 1 else [f"y[{j}]" for j in range(y.shape[1])] \
        if len(out_shape) < 2 else \
        [f"y[{','.join(map(str, np.unravel_index(j, out_shape)))}]" for j in range(y.shape[1])]
    in_names = call.names if tuple(wrt) == tuple(range(len(call.names))) \
        else [call.names[i] for i in wrt]
    bad_first = set(non_finite_points(y, ders[0]))  # rows of y or d1 with a NaN or inf
    out += _dependence_findings(call, layers, y, ders[0], wrt, out_names, in_names,
                                skip=confirmed + list(candidates[confirm.KINK_CHECKS:]),
                                bad_rows=bad_first, d2=ders[1] if len(ders) > 1 else None)
    if not {f.code for f in out} & _ZERO_EXPLAINED:
        f = _flat_region(call, layers, ders[0], wrt, out_names,
                         skip=confirmed + list(candidates[confirm.KINK_CHECKS:]),
                         bad_rows=bad_first)
        if f is not None:
            out.append(f)
    f = _second_order_cut(call, layers, y, ders, wrt, confirmed + list(candidates),
                          list(earlier) + out)
    if f is not None:
        out.append(f)
    if sum(f.code == "graph-broken" for f in out) > 1:  # the first-order cut explains it all
        out = [f for f in out if not (f.code == "graph-broken" and f.message.startswith(
            "autodiff's second derivative"))]
    if any(f.code == "graph-broken" for f in out) and not structurally_piecewise(layers):
        # autodiff's own zero second derivatives were the only evidence of piecewise
        # linearity, and the forward pass says autodiff is wrong here (z * z.detach())
        out = [f for f in out if f.code != "piecewise-linear"]
    bad_x = set(non_finite_points(*args) if call.non_finite_x is None else call.non_finite_x)
    bad_all = bad_first.union(non_finite_points(*ders[1:])) if len(ders) > 1 else bad_first
    bad = [n for n in sorted(bad_all) if n not in bad_x]
    finite_y = bool(bad) and not set(bad) & set(non_finite_points(y))
    f = non_finite_finding("the model's output or its derivatives (where x is finite)", bad,
                           derivatives_only=finite_y)
    if f is not None:
        out.append(f)
    return out


def _local(call) -> bool:
    """Whether each point, or each point's output, has several axes (an image, a sequence, a
    map of outputs), where outputs depending on only some inputs is the rule (receptive
    fields, causality)."""
    shapes = call.point_shapes[:call.n_inputs]
    out_shape = getattr(call.verdict, "out_shape", None) or ()
    return any(len(s) >= 2 for s in shapes) or len(out_shape) >= 2


def _zero_pairs(d1: np.ndarray) -> np.ndarray:
    """(d_out, m): True where the derivative is exactly 0 at every point (NaN is not 0)."""
    if d1.shape[0] == 0 or d1.all():
        return np.zeros(d1.shape[1:], dtype=bool)
    return ~np.any(d1, axis=0)


def _others_held(wide, args, wrt) -> list:
    """``wide``'s points with every feature outside ``wrt`` held at the first point's value
    (features numbered across the arguments, as ``wrt`` numbers them)."""
    out, start = [], 0
    for spread, a in zip(wide, args):
        held = ~np.isin(np.arange(start, start + a.shape[1]), wrt)
        spread = spread.copy()
        spread[:, held] = a[0, held]
        out.append(spread)
        start += a.shape[1]
    return out


def _dependence_findings(call, layers, y, d1, wrt, out_names, in_names, skip,
                         bad_rows=None, d2=None) -> list:
    """``graph-broken`` (confirmed with central differences of the forward pass), then
    ``no-input-dependence`` for the zero pairs the forward pass confirms, then
    ``saturated``. A zero pair needs a point off the kinks (those in ``skip``, confirmed or
    unchecked): autodiff's convention at a kink (relu'(0) = 0) is no slope of the output."""
    off_kinks = np.ones(d1.shape[0], dtype=bool)
    off_kinks[[p for p in skip if p < d1.shape[0]]] = False
    zero = _zero_pairs(d1) if off_kinks.any() else np.zeros(d1.shape[1:], bool)
    verdict = call.verdict
    if verdict is not None and verdict.stochastic:  # random outputs: no differences to trust
        out = [coupling_finding(*call.hidden_coupling[1:], call.n, unseen=True)] \
            if call.hidden_coupling else []
        f = no_dependence_finding(d1, out_names, in_names)
        return out + ([f] if f is not None else [])
    zero_inputs = [int(i) for i in np.flatnonzero(zero.any(axis=0))]
    if verdict is not None and verdict.structural:
        # a plain stack of the framework's own layers: its graph cannot be cut, and autodiff
        # needs no confirmation by finite differences
        check = {"moves": {}, "disagree": [], "checked": [], "fd_max": TRUSTED, "noise": 0.0}
    else:
        # an earlier call on this very model state, at these very points, confirmed
        # autodiff (its differences' slopes stand for saturation): no need to look again
        extremes = call.hidden_coupling[0] if call.hidden_coupling else ()
        pts = confirm.graph_points(call, d1, skip, extra=extremes)
        seen = (tuple(wrt), tuple(pts), call.features()[pts].tobytes())
        if not zero_inputs and seen in call.facts.graph_agrees:
            fd_max, noise = call.facts.graph_agrees[seen]
            check = {"moves": {}, "disagree": [], "checked": [], "fd_max": fd_max,
                     "noise": noise}
        else:
            check = confirm.graph_consistency(call, d1, wrt, zero_inputs, skip=set(skip),
                                              extra=extremes)
            check = _in_float64(call, check, wrt, zero_inputs, n_rows=d1.shape[0])
            if check["checked"] and check["fd_max"] is not None and not check["moves"] \
                    and not check["disagree"]:
                agrees = call.facts.graph_agrees
                agrees[seen] = (check["fd_max"], check["noise"])
                while len(agrees) > 16:  # a loop over many batches: keep the latest
                    del agrees[next(iter(agrees))]
    broken, varies = np.zeros_like(zero), np.zeros_like(zero)
    moved, slope = [], 0.0
    for i, (points, outputs, top) in check["moves"].items():
        broken[:, i] = zero[:, i] & outputs
        moved += points
        slope = max(slope, float(top))
    for i, outputs in check.get("varies", {}).items():  # stationary points: d1 = 0 is right
        varies[:, i] = zero[:, i] & outputs & ~broken[:, i]
    disagree = check["disagree"]
    # one point alone may sit within a step of a kink, unless the forward pass couples points
    # where autodiff sees no coupling: then one disagreeing point confirms the cut
    hidden = call.hidden_coupling is not None and bool(disagree)
    if len(disagree) < min(2, len(check["checked"])) and not hidden:
        disagree = []
    out = []
    if call.hidden_coupling is not None and not hidden:  # autodiff is right where it looked
        out.append(coupling_finding(*call.hidden_coupling[1:], call.n,
                                    unseen=check["fd_max"] is None))
    if broken.any() or disagree:
        pairs = [f"d{out_names[j]}/d{in_names[i]}" for j, i in zip(*np.nonzero(broken),
                                                                     strict=True)]
        out.append(graph_broken_finding(pairs, moved, disagree, slope, hidden_coupling=hidden))
    unmoved = zero & ~broken & ~varies  # the zero pairs nothing contradicts
    if d2 is not None and unmoved.any():
        # a zero slope whose own derivative is not 0 (u = x * net(x, t) on x = 0: u_t = 0
        # there, u_xt is not): the output depends on that input next to these points
        n2 = d2.shape[0]
        d2 = d2.reshape(n2, d2.shape[1], d2.shape[2], -1)[off_kinks[:n2]]   # (n, d_out, m, m)
        with np.errstate(invalid="ignore"):
            bends = np.nan_to_num(np.abs(d2), nan=0.0).max(axis=(0, 3)) > 0    # (d_out, m)
        unmoved &= ~bends
    if check["fd_max"] is not TRUSTED and not check["checked"]:
        unmoved[:] = False  # no point the forward pass could be compared at: unconfirmed
    if unmoved.any() and _local(call):
        # images, sequences, maps: an output pixel outside an input pixel's receptive field, a
        # time step before it (causality), is no input the model ignores; only an input no
        # output depends on, or an output that depends on no input, is
        unmoved &= unmoved.all(axis=0, keepdims=True) | unmoved.all(axis=1, keepdims=True)
    stairs = np.zeros_like(zero)
    # the points to sweep: those compared (a structural model's autodiff is trusted, none
    # were: its exact zeros may still be the flat stretches of a lookup or a rounding)
    swept = check["checked"] or (confirm.graph_points(call, d1, skip)
                                 if check["fd_max"] is TRUSTED else [])
    # stairs may also pass for a stationary point (a jump seen at the larger step only)
    sweep = unmoved | varies
    if sweep.any() and swept:  # changes in jumps only: piecewise constant
        inputs = [int(i) for i in np.flatnonzero(sweep.any(axis=0))][:SWEPT_INPUTS]
        for i, outputs in confirm.jumps_only(call, swept, inputs, wrt).items():
            stairs[:, i] = sweep[:, i] & outputs
        unmoved &= ~stairs
    farther = np.zeros_like(zero)
    if unmoved.any():  # exact zeros in float32 may be tiny slopes rounded away (saturation)
        unmoved, found, farther, wide_stairs = _underflowed(
            call, layers, y, wrt, unmoved, swept or confirm.graph_points(call, d1, skip),
            out_names, in_names)
        stairs |= wide_stairs
        out += found
    if stairs.any():
        out.append(piecewise_constant_finding(
            [f"d{out_names[j]}/d{in_names[i]}" for j, i in zip(*np.nonzero(stairs),
                                                                 strict=True)]))
    remaining = np.where(unmoved, 0.0, 1.0)[None]
    aside = sorted(int(p) for p in np.flatnonzero(~off_kinks))
    farther_pairs = [f"{out_names[j]}/{in_names[i]}"
                     for j, i in zip(*np.nonzero(unmoved & farther), strict=True)]
    f = no_dependence_finding(remaining, out_names, in_names, aside=aside,
                              farther=farther_pairs) if unmoved.any() else None
    if f is not None:
        out.append(f)
    if not out:
        f = _saturation(call, layers, y, d1, wrt, out_names, check, bad_rows)
        if f is not None:
            out.append(f)
    return out


SECOND_CHECK_INPUTS = 8  # order >= 2 results are compared with differences of d1 up to this
SECOND_CHECK_POINTS = 3  # many inputs, at this many points


class _Rows:
    """The part of a Derivatives that :func:`~nbderiv.fdcheck.finite_difference_check`
    reads, for a few of its rows."""

    def __init__(self, y, ders, wrt, codes):
        self.y, self._ders, self.wrt, self.order = y, ders, list(wrt), len(ders)
        self.codes, self.findings = codes, []

    def __getitem__(self, k):
        return self._ders[k - 1]


def _second_order_cut(call, layers, y, ders, wrt, skip, found) -> Finding | None:
    """``graph-broken`` for a second derivative that is only partly cut: at the first few
    points (off kinks), autodiff's d2 disagrees with float64 central differences of its own
    d1 at every step tried (the check of ``check=True``, there), while its d1 agrees with the
    forward pass's differences. A custom ``autograd.Function`` whose backward detaches one
    factor (``g * torch.cos(x).detach()``) beside smooth layers does this: d2 was silently
    55% off. Only for models of up to :data:`SECOND_CHECK_INPUTS` inputs in float32 or
    float64 that are not a plain stack of the framework's layers, random, coupled or
    piecewise (their d2 has its own findings); an agreement is remembered for the same points
    on the same model state."""
    verdict = call.verdict
    if len(ders) < 2 or len(wrt) > SECOND_CHECK_INPUTS or verdict is None \
            or verdict.structural or verdict.stochastic or verdict.coupled \
            or call.hidden_coupling is not None or call.dtype.itemsize < 4 \
            or structurally_piecewise(layers) or not layers.get("opaque", True) \
            or (call.backend.name == "torch"
                and type(call.model).__module__.split(".")[0] == "keras"):
        # (a plain stack of the framework's own layers cannot be cut; a Keras model on the
        # torch backend: copying it in float64 would import TensorFlow)
        return None
    codes = {f.code for f in found}
    if codes & {"graph-broken", "piecewise-linear", "at-kink", "non-finite", "low-precision"}:
        return None
    from .fdcheck import TOLERANCE, finite_difference_check  # (only now: a first call's cost)

    pts = confirm.graph_points(call, ders[0], skip)[:SECOND_CHECK_POINTS]
    if len(pts) < 2:
        return None
    top = min(len(ders), 3)  # orders compared (the third with differences of the second)
    seen = ("orders", top, tuple(wrt), tuple(pts), call.features()[pts].tobytes())
    if seen in call.facts.graph_agrees:
        return None
    few = call.with_args([a[pts] for a in call.args])
    rows = _Rows(y[pts], [d[pts] for d in ders[:top]], wrt, sorted(codes))
    limit = call.block_rows or len(pts) * 2 * len(wrt)

    def compute(c, k):  # in blocks of at most the call's own (chunk_size=)
        from .compute import run_blocks
        return run_blocks(c, k, wrt, min(limit, c.n))

    try:
        check = finite_difference_check(few, rows, compute=compute)
    except Exception:  # a confirmation must never break the computation
        return None
    if check.passed:
        call.facts.graph_agrees[seen] = (None, 0.0)
        return None
    if check.dtype != "float64" or check.kink_points or 2 not in check.errors:
        return None  # no float64 copy to tell a cut from rounding, or a kink: no claim
    tol = TOLERANCE["float64"]
    off = [pts[i] for i in check.nonsmooth_points if i < len(pts)]
    for k in range(2, top + 1):  # the lowest order that is off, every lower one right
        lower_right = all(check.errors.get(j, (0.0, 0.0))[1] <= tol for j in range(1, k))
        error = check.errors.get(k, (0.0, 0.0))[1]
        if not lower_right or len(off) < 2:
            return None
        if not error > 100 * tol:
            continue
        errors = [tried.get(k, (np.nan, np.nan))[0] for _, tried in check.tried]
        if len(errors) < 2 or not abs(errors[-1] - errors[-2]) <= 0.02 * max(errors[-2:]):
            # the error still moves with the step: a variation too fast for the steps
            # tried, or the differences' own truncation error where d2 is 0 (x**4 at 0:
            # 4 h**2, 100% of differences that small at every step), not a cut (whose
            # differences settle on the true derivative, away from autodiff's: the same
            # error, in the derivative's own units, at every small step)
            return None
        return partial_second_order_cut_finding(off, error, order=k)
    return None


# findings that already account for exact zeros of the gradient
_ZERO_EXPLAINED = frozenset({"graph-broken", "no-input-dependence", "piecewise-constant",
                             "saturated"})
FLAT_SHARE = 0.05  # flat-region: at least this share of the points (and 2) have zero gradients
FLAT_CHECKS = 4    # flat points confirmed with the forward pass


def _flat_region(call, layers, d1, wrt, out_names, skip, bad_rows) -> Finding | None:
    """``flat-region`` for the outputs whose gradient is exactly 0 in every input at some of
    the points (at least :data:`FLAT_SHARE` of them and 2, not all: that is
    ``no-input-dependence``), off kinks and finite, where at least half of
    :data:`FLAT_CHECKS` of those points, spread over them, show no change of the forward pass
    when x moves along each input (or random directions over many inputs) and none shows a
    slope (:func:`~nbderiv.confirm.unchanged_nearby`). The cause named: a flat piece where a float64
    copy's gradient is exactly 0 too (saturated units in a model with tanh-like activations
    and no flat pieces), slopes float32 rounds to 0 where it is not (saturated units); both
    where the evidence cannot tell them apart. Not for random or coupled models."""
    n = d1.shape[0]
    verdict = call.verdict
    if n < 2 or (verdict is not None and (verdict.stochastic or verdict.coupled)) \
            or call.hidden_coupling is not None:
        return None
    flat = ~d1.reshape(n, d1.shape[1], -1).any(axis=2)                      # (n, d_out)
    if not flat.any():  # the usual case: one pass over d1
        return None
    valid = np.ones(n, dtype=bool)
    valid[[p for p in skip if p < n]] = False
    valid[[p for p in (bad_rows or ()) if p < n]] = False
    if call.non_finite_x:
        valid[[p for p in call.non_finite_x if p < n]] = False
    flat &= valid[:, None]
    counts, total = flat.sum(axis=0), int(valid.sum())
    partial = (counts >= max(2, int(np.ceil(FLAT_SHARE * total)))) & (counts < total)
    outputs = [int(j) for j in np.flatnonzero(partial)]
    if not outputs:
        return None
    rows = np.flatnonzero(flat[:, outputs].all(axis=1))  # flat for every such output
    if rows.size == 0:
        return None
    # spread over the flat points, away from the first and last (often a piece's edges)
    k = min(FLAT_CHECKS, rows.size)
    looked = sorted({int(rows[int((i + 0.5) * rows.size / k)]) for i in range(k)})
    checked = confirm.unchanged_nearby(call, looked, wrt, outputs)
    if checked:  # a smooth stationary point (cos at 0, an even net at the origin) changes
        # like h**2, below the small steps' reach: the forward pass curving says so
        curved = set(confirm.curvature_seen(call, checked, wrt))
        checked = [p for p in checked if p not in curved]
    if not checked or 2 * len(checked) < len(looked):  # a slope, or too few points confirmed
        return None
    called = call.backend.activations_called(call)
    names = set(layers.get("activations", []))
    pieces = {name for name in names if name in _FLAT_PIECES}
    pieces |= {name[5:] for name in called if name.startswith("flat:")}
    tails = bool(_FLAT_TAILED & names) or any(name.startswith("act:") for name in called)
    d64 = confirm.float64_first_derivative(call, wrt, checked)
    if d64 is None and call.dtype != np.float64:
        cause = "either"     # no float64 copy to tell a flat piece from rounded slopes
    elif call.dtype == np.float64 or not np.any(d64[:, outputs]):
        # exactly 0 in float64 too: a flat piece, or tanh / sigmoid saturated beyond float64
        cause = "either" if tails and pieces else "saturated-float64" if tails else "flat"
    elif tails:
        cause = "saturated"  # float64 sees (tiny) slopes, at least at some of the points
    else:
        return None          # float64 sees slopes where no known function saturates
    return flat_region_finding([out_names[j] for j in outputs],
                               [int(counts[j]) for j in outputs], total, checked, pieces,
                               cause)


# activations with flat pieces (module class names and Keras activation names)
_FLAT_PIECES = frozenset({"ReLU", "ReLU6", "Hardtanh", "Hardsigmoid", "Hardswish", "relu",
                          "relu6", "hard_sigmoid", "hard_silu", "hard_swish"})
# smooth activations with flat tails (module class names and Keras activation names)
_FLAT_TAILED = frozenset({
    "Tanh", "Sigmoid", "Softsign", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Softplus",
    "LogSigmoid", "tanh", "sigmoid", "softsign", "elu", "selu", "gelu", "silu", "swish",
    "mish", "softplus", "log_sigmoid"})


def _underflowed(call, layers, y, wrt, unmoved, points, out_names, in_names) -> tuple:
    """For the zero pairs nothing has explained yet: where a float64 copy
    finds tiny slopes that float32 rounds to exactly 0 (tanh units driven by raw inputs in
    the hundreds to exactly +-1), the output depends on x, and the pairs leave ``unmoved``.
    ``saturated`` for an output flat along every input, where those slopes (or, in a model
    with flat-tailed activations such as tanh and sigmoid, slopes 0 even in float64) are
    below its threshold and the output changes farther out along each input
    (:func:`~nbderiv.confirm.output_reach`); those pairs leave ``unmoved`` too.

    Returns (unmoved, findings, farther, stairs): where the output changes farther out in
    jumps only (a sweep over the distance where it wakes), the pairs are ``stairs``
    (piecewise constant: argmax, rounding), not saturated; ``farther`` marks the pairs of
    ``unmoved`` whose output changes farther out (a flat region here: a clamp, dead ReLUs),
    for the words of ``no-input-dependence``."""
    d64 = confirm.float64_first_derivative(call, wrt, points)
    if d64 is not None:
        tiny = unmoved & np.any(d64 != 0, axis=0) & np.all(np.isfinite(d64), axis=0)
    else:
        tiny = np.zeros_like(unmoved)
    called = call.backend.activations_called(call) if not tiny.any() else frozenset()
    flat_tailed = bool(_FLAT_TAILED & set(layers.get("activations", []))) or any(
        n.startswith("act:") for n in called)
    # functions with flat pieces (a clamp, ReLUs): where even float64 says exactly 0, the
    # points sit on such a piece, not in the tails of saturated units
    flat_pieces = bool(_FLAT_PIECES & set(layers.get("activations", []))) or any(
        n.startswith("flat:") for n in called)
    y_size = _size(y)                                                         # (d_out,)
    inputs = [int(i) for i in np.flatnonzero(unmoved.any(axis=0))][:SWEPT_INPUTS]
    reach = np.full(unmoved.shape, np.nan)                                    # (d_out, m)
    for i in inputs:
        reached = confirm.output_reach(call, list(points), [wrt[i]])
        if reached is not None:
            reach[:, i] = np.where(reached[1], np.nan, reached[0])  # still growing: no tail
    with np.errstate(invalid="ignore"):
        # the output changes farther out along the input, by more than rounding
        wakes = unmoved & (reach > 1e-3 * y_size[:, None])
    # exactly 0 even in float64, and the output moves farther out: in jumps only (argmax,
    # rounding: piecewise constant), over the distance where it wakes
    stairs = np.zeros_like(unmoved)
    jumpy = [i for i in inputs if (wakes[:, i] & ~tiny[:, i]).any()]
    if jumpy:
        for i, outputs in confirm.jumps_only(call, list(points), jumpy, wrt,
                                             reach=WIDE_SWEEP).items():
            stairs[:, i] = wakes[:, i] & ~tiny[:, i] & outputs
    # tiny slopes, or flat-tailed units asleep here; saturation flattens an output along
    # every input (one flat input beside others that move is a masked or unused feature)
    flat = wakes & ~stairs & (tiny | (flat_tailed and not flat_pieces)) \
        & unmoved.all(axis=1)[:, None] & ~stairs.any(axis=1)[:, None]
    farther = wakes & ~tiny & ~flat & ~stairs
    unmoved = unmoved & ~(tiny | flat | stairs)
    if not flat.any():
        return unmoved, [], farther, stairs
    x_size = _x_size(call.features()[:y.shape[0]][:, list(wrt)])
    slopes = np.zeros(unmoved.shape) if d64 is None else np.abs(d64).max(axis=0)
    change = np.where(flat, slopes * x_size, 0.0).max(axis=1)                 # (d_out,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(y_size > 0, change / y_size, 0.0)
    low = flat.any(axis=1) & (ratio < SATURATED_BELOW)
    if not low.any():
        return unmoved, [], farther, stairs
    exact = d64 is None or not np.any(np.where(flat[None], d64, 0.0))
    return unmoved, [saturated_finding(
        [out_names[j] for j in np.flatnonzero(low)], float(ratio[low].max()),
        float(np.nanmin(np.where(flat, reach, np.nan)[low])),
        rounded="float64" if exact and d64 is not None else str(call.dtype) if not exact
        else None, exact=exact)], farther, stairs


def _in_float64(call, check, wrt, zero_inputs, n_rows) -> dict:
    """``check`` (a float32 :func:`~nbderiv.confirm.graph_consistency`) looked at again in
    float64 where it claims a cut (a disagreement, or a move where autodiff says 0), and
    always for a forward pass that couples points unseen by autodiff (its small
    disagreements can hide in float32's rounding): float32's differences cannot tell a cut
    from a frequency its steps do not resolve. Kept as it is where there is no float64 copy,
    and for models whose coupling autodiff sees (their d1 are per-point blocks)."""
    if call.verdict is not None and call.verdict.coupled and call.hidden_coupling is None:
        return check
    if call.hidden_coupling is None and not (check["disagree"] or check["moves"]):
        return check
    rows = n_rows if call.hidden_coupling is not None else None
    again = confirm.graph_consistency_float64(call, wrt, zero_inputs, check["checked"], rows)
    return check if again is None else again


SWEPT_INPUTS = 8  # inputs swept for piecewise-constant outputs (49 model rows per point each)
WIDE_SWEEP = 3.0  # the reach of the second sweep, where autodiff's 0 holds even in float64
TRUSTED = "trusted"  # check["fd_max"] of a model whose autodiff needs no confirmation


def _size(y: np.ndarray) -> np.ndarray:
    """max |y| + the range of y, per output (column), without a temporary as large as y."""
    y = y.reshape(y.shape[0], -1)
    top, low = y.max(axis=0).astype(np.float64), y.min(axis=0).astype(np.float64)
    return np.maximum(top, -low) + (top - low)


def _x_size(x: np.ndarray) -> np.ndarray:
    """The size of each input over the points: its range or its largest |x|, whichever is
    larger (1 where x is constant 0)."""
    x_top, x_low = x.max(axis=0).astype(np.float64), x.min(axis=0).astype(np.float64)
    size = np.maximum(x_top - x_low, np.maximum(x_top, -x_low))
    return np.where(size > 0, size, 1.0)


def _scaled_max(d1: np.ndarray, x_size: np.ndarray) -> np.ndarray:
    """max over points and inputs of |d1[n, j, i]| * x_size[i], per output j: the largest
    |d1| of each (output, input) pair first (two passes, no temporary as large as d1), then
    scaled (x_size >= 0, so the order of the two maxima does not matter)."""
    n, d_out = d1.shape[:2]
    d1 = d1.reshape(n, d_out, -1)
    if n == 0:
        return np.zeros(d_out)
    top = np.maximum(d1.max(axis=0), -d1.min(axis=0)).astype(np.float64)  # (d_out, m)
    return (top * x_size).max(axis=1)


def _saturation(call, layers, y, d1, wrt, out_names, check, bad_rows=None) -> Finding | None:
    """``saturated`` where max |dy/dx| * (size of x) / (size of y) < SATURATED_BELOW for an
    output whose derivative is not exactly 0 (a dead ReLU region is no saturation), in a model
    that is not piecewise linear, with the finite differences confirming the small slopes."""
    if structurally_piecewise(layers) or check["fd_max"] is None:
        return None
    n = d1.shape[0]
    x = call.features()[:n]
    x = x if len(wrt) == x.shape[1] and tuple(wrt) == tuple(range(len(wrt))) \
        else x[:, list(wrt)]
    # rows of y and d1 with a NaN or inf are known to the caller; x's are looked for here
    # (unless x is known to be finite everywhere)
    bad_x = [] if call.non_finite_x == [] else non_finite_points(x)
    bad = set(bad_x) | (set(non_finite_points(d1, y)) if bad_rows is None else set(bad_rows))
    finite = np.array([i not in bad for i in range(n)]) if bad else slice(None)
    if bad and len(bad) == n:
        return None
    x_size = _x_size(x[finite])                                         # (m,)
    y_size = _size(y[finite] if bad else y)                            # (d_out,)
    change = _scaled_max(d1[finite] if bad else d1, x_size)            # (d_out,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = change / y_size
    # the differences' slopes are per unit of a step scaled by 1 + |x|
    fd_ok = True if check["fd_max"] is TRUSTED else \
        check["fd_max"] <= 10 * SATURATED_BELOW * y_size * (1 + x_size.max()) + 8 * check["noise"]
    curved = check.get("curved")  # a stationary point: the small gradient is no saturation
    low = (change > 0) & (y_size > 0) & (ratio < SATURATED_BELOW) & fd_ok
    if curved is not None:
        low &= ~curved
    if not low.any():
        return None
    # the units wake up farther out: the output can change by about its size (an output that
    # is large only by a constant offset, 1e6 + a small net, stays within that small net's
    # range wherever x goes: its gradients are not small for it)
    # and level off there (saturated units do; z**4 near its flat minimum keeps growing)
    reached = confirm.output_reach(call, check["checked"] or confirm.graph_points(call, d1), wrt)
    if reached is None:
        return None
    reach, growing = reached
    with np.errstate(divide="ignore", invalid="ignore"):
        low &= (change / reach < SATURATED_BELOW) & ~growing
    if not low.any():
        return None
    return saturated_finding([out_names[j] for j in np.flatnonzero(low)],
                             float(ratio[low].max()), float(reach[low].min()))
