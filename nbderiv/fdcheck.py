"""Finite-difference check of every order, in float64, on a copy of the model.

Order 1 is checked against central differences of y; order k against central
differences of the float64 derivatives of order k-1, one input direction at a time.
Float64 autodiff at the points themselves tells the two kinds of mismatch apart: where it
agrees with the differences but the (float32) result does not, digits were lost to
rounding (``low-precision``); where even float64 autodiff disagrees, either a kink lies
between x - h and x + h (confirmed when one one-sided difference agrees with autodiff and
the other does not) or the function curves too sharply for the step / autodiff is wrong.

The copy is checked before it is used: it must really compute in float64 (an input moved by
less than float32 can resolve must move the output) and reproduce the model's outputs.
Where no such copy can be made the check says so in ``note`` and runs on the model in its
own dtype, with a step suited to that dtype (``STEP``).

It checks autodiff against this model, not against the function the model was trained to
approximate: for that, pass ``reference=`` to :func:`nbderiv.derivatives`.

>>> import torch, nbderiv
>>> d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=2, check=True)
>>> d.check.passed, d.check.errors[2][0] < 1e-6
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .findings import structurally_piecewise
from .reference import step_scales

# relative tolerance (of the largest value of that order) per dtype of the checked result; it
# must also cover the truncation error
# of central differences (about h**2 times the next derivative), which dominates in float64
TOLERANCE = {"float16": 5e-2, "bfloat16": 5e-2, "float32": 2e-3, "float64": 1e-4}
RELATIVE_STEP = 1e-4     # h = RELATIVE_STEP * max(1, max |x|) in float64 (see reference.step_scales)
# the step in the model's own dtype when no float64 copy can be made: about eps ** (1/3),
# which balances rounding (eps / h) against truncation (h**2)
STEP = {"float64": RELATIVE_STEP, "float32": 5e-3, "float16": 1e-1, "bfloat16": 2e-1}
# how far the float64 copy may be from the model's own outputs (relative to max |y|): a wrong
# copy (other weights, other structure) differs by O(1); rounding in float32 by far less
COPY_AGREEMENT = 5e-2
# d[k] counts as 0 up to the result's rounding where float64 autodiff and the differences both
# stay below this many times the rounding of y (float32 y against its float64 copy's), carried
# to d[k] by the inputs' size (the sum of softmax probabilities: y = 1 +- 6e-8, d = 0)
ROUNDING_MARGIN = 4.0
INNER_MARGIN = 30.0  # the differences' rounding, over eps * (the size of what y is computed from)
COUPLED_POINTS = 4       # points checked one by one when the model couples points
COUPLED_MAX_N = 256      # above this the per-point differences of a coupled model cost too much
_EPS64 = float(np.finfo(np.float64).eps)


@dataclass
class FiniteDifferenceCheck:
    """``errors[k] = (max_abs, max_rel)`` of ``d[k]`` against the float64 central-difference
    reference ``reference[k]`` (same shape as ``d[k]``; NaN rows were not checked), step
    ``step``. ``passed`` is False on any mismatch beyond ``tolerance`` (relative to the
    largest value of that order, each entry in units of its inputs' sizes: with x in [0, 1]
    and t in [0, 1e4], u_t times 1e4 beside u_x; ``max_rel`` so too);
    ``nonsmooth_points`` are the points where even float64
    autodiff disagrees with the differences, ``kink_points`` those of them where a kink
    was confirmed (one one-sided difference agrees with autodiff, the other does not);
    ``dtype`` is the dtype the differences were computed in ("float64" unless no float64
    copy could be made, which ``note`` then says), ``result_dtype`` the precision the checked
    results were computed in (the result's dtype, or float32 for a model that takes float64
    input but rounds to float32 inside, which ``note`` then says); ``note`` explains."""

    step: float
    errors: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict, repr=False)
    tolerance: float = 0.0
    passed: bool = True
    low_precision: bool = False
    low_precision_orders: tuple = ()
    nonsmooth_points: tuple = ()
    kink_points: tuple = ()
    dtype: str = "float64"
    result_dtype: str = ""
    note: str = ""
    per_input: bool = False  # steps of their own per input (sized by each): ``step`` the largest
    # (step, {k: (max_abs, max_rel)}) of each step tried, the first one first (smaller ones
    # are tried in float64 where the first disagreed)
    tried: list = field(default_factory=list, repr=False)
    # whether the differences' rounding allowance exceeds the tolerance at some order (at
    # that step they cannot confirm anything finer)
    rounding_bound: bool = field(default=False, repr=False)

    def summary(self) -> str:
        """One line that says what was compared with what, e.g. "autodiff agrees with float64
        central differences of this model (h=1e-04) ...", never a bare verdict."""
        if not self.errors:
            return f"not run ({self.note})" if self.note else "not run"
        parts = [f"order {k}: max abs err {a:.2g}, rel {r:.2g}" for k, (a, r) in
                 sorted(self.errors.items())]
        h = f"h up to {self.step:.1g}, sized by each input" if self.per_input else \
            f"h={self.step:.1g}"
        what = f"{self.dtype} central differences of this model ({h}"
        if self.passed:
            text = (f"autodiff agrees with {what}, rel. tol. {self.tolerance:.0e}; the "
                    "differentiation is checked, not the model: reference= compares with a "
                    "known truth)")
        else:
            text = f"MISMATCH: autodiff disagrees with {what})"
        text += "; " + "; ".join(parts)
        return text + (f" ({self.note})" if self.note else "")

    def __str__(self) -> str:  # print(d.check): the sentence, not the fields
        return self.summary()


def _not_run(note: str) -> FiniteDifferenceCheck:
    return FiniteDifferenceCheck(step=float("nan"), passed=False, note=note)


def finite_difference_check(call, result, *, coupled=False, compute=None) -> FiniteDifferenceCheck:
    """Compare ``result`` (a Derivatives) with finite differences, in float64 on a copy of
    the model where one can be made, else in the model's own dtype (``note`` says so).

    ``call`` is the :class:`~nbderiv.call.Call` (model, backend, args, dtype, device);
    ``compute(call, k) -> (y, [d1..dk], method)`` evaluates derivatives for a modified
    copy of it (the api passes its chunked loop); by default one backend call.
    """
    backend = call.backend
    wrt, order = result.wrt, result.order
    if compute is None:
        def compute(c, k):
            return c.backend.derivatives(c, c.args, k, wrt)
    X = np.concatenate([a.astype(np.float64) for a in call.args], axis=1)
    model64, why, precision, rounding = _float64_model(call, result, X)
    # dtype: what the points are fed in; precision: what the model computes in (float32 for
    # a model that takes float64 input but rounds to float32 inside), which sets the step
    # and the tolerance of a check that has no float64 copy
    model, dtype = (model64, np.dtype(np.float64)) if model64 is not None else \
        (call.model, call.dtype)
    ref_precision = np.dtype(np.float64) if model64 is not None else precision
    widths = call.widths

    def at(Xs):
        args = np.split(Xs, np.cumsum(widths)[:-1], axis=1)
        return call.with_args([np.ascontiguousarray(a, dtype=dtype) for a in args],
                              model=model, dtype=dtype)

    try:
        probe = at(X[:8])
        first, again = backend.forwards(probe, [probe.args, probe.args])
        if not np.array_equal(first, again, equal_nan=True):
            # a forward that updates the model's own state (spectral_norm's power iteration
            # in training mode) is no random one: each evaluation from the same state
            restored = backend.restored_forwards(probe, [probe.args, probe.args])
            if restored is None or not np.array_equal(*restored, equal_nan=True):
                return _not_run("the model is random (dropout or similar in training "
                                "mode): finite differences of a random function mean "
                                "nothing")
            compute = _from_the_same_state(backend, compute)
        # a step per input, scaled by that input's own size (x in [3, 7] beside t in
        # [50, 150]: one step for both would be far too coarse for x)
        # (in float64, far from 0 compared with its spread, an input's step is scaled by that
        # spread: sin at x = 1e4 varies on a scale of 1, not 1e4; see reference.step_scales)
        sizes = np.nanmax(np.where(np.isfinite(X), np.abs(X), np.nan), axis=0, initial=0.0)
        scales = step_scales(X) if ref_precision == np.float64 else np.maximum(
            1.0, np.nan_to_num(sizes, nan=1.0))
        steps = STEP.get(ref_precision.name, RELATIVE_STEP) * scales
        step = float(steps[list(wrt)].max())
        if coupled:
            if X.shape[0] > COUPLED_MAX_N:
                return _not_run(f"the model couples points and N = {X.shape[0]} > "
                                f"{COUPLED_MAX_N}: checking points one by one would cost N**2")
            diffs = _coupled_differences(backend, at, X, order, wrt, steps, dtype)
        else:
            diffs = _differences(compute, at, X, order, wrt, steps, dtype)
    except Exception as exc:  # the check must never break the computation it checks
        return _not_run(f"the model could not be evaluated on a copy in {dtype.name} "
                        f"({_first_line(exc)}); pass the nn.Module / keras.Model "
                        "itself rather than a function holding its tensors")
    try:
        layers = backend.layer_summary(call.model)
    except Exception:  # structure is only used for wording
        layers = {}
    size = float(np.nan_to_num(np.nanmax(np.maximum(1.0, sizes[list(wrt)]), initial=1.0),
                               nan=1.0))
    spread = np.nan_to_num(scales[list(wrt)], nan=1.0)
    weights = spread / spread.max() if spread.size and spread.max() > 0 else None
    piecewise = bool({"piecewise-linear", "at-kink"} & set(result.codes)
                     or structurally_piecewise(layers))

    def compared(diffs, shrink=1):  # the differences at steps / shrink against the result
        return _compare(result, diffs, step / shrink, piecewise, ref_precision,
                        precision if precision != call.dtype else None,
                        noise_step=float(steps[list(wrt)].min()) / shrink,
                        rounding=rounding, size=size, weights=weights)

    check = compared(diffs)
    tried = [(step, dict(check.errors))]
    if not check.passed and ref_precision == np.float64 and not coupled and not piecewise:
        # a smooth function that varies on a smaller scale than x (sin(1e4 x) at x ~ 1e-4,
        # Fourier features): its differences converge to autodiff at smaller steps; a cut
        # graph's never do. (A piecewise model's disagreement is told as a kink within the
        # step, as it was.) Only in float64: a lower precision's rounding allowance grows
        # past the derivatives themselves at small steps, and anything would pass
        for shrink in (16, 256, 4096):
            try:
                smaller = compared(_differences(compute, at, X, order, wrt, steps / shrink,
                                                dtype), shrink)
            except Exception:  # the check must never break the computation it checks
                break
            tried.append((step / shrink, dict(smaller.errors)))
            if smaller.passed and not smaller.rounding_bound:
                smaller.note = _join(
                    f"at the first step (h={step:.1g}) the differences disagreed (the "
                    f"function varies on a smaller scale than x, or bends sharply within "
                    f"that step of a point); at steps {shrink} times smaller they agree",
                    smaller.note)
                check, steps, step = smaller, steps / shrink, step / shrink
                break
            if check.nonsmooth_points and smaller.low_precision \
                    and not smaller.nonsmooth_points:
                # the first step's differences were off float64 autodiff, these agree with
                # it at every point: the truth is settled here, and the result's own
                # precision is what stays off
                smaller.note = _join(
                    f"at the first step (h={step:.1g}) the differences disagreed (the "
                    f"function varies on a smaller scale than x); at steps {shrink} times "
                    f"smaller they agree with {np.dtype(ref_precision).name} autodiff", smaller.note)
                check, steps, step = smaller, steps / shrink, step / shrink
                break
    check.per_input = bool(steps[list(wrt)].min() < step)
    check.tried = tried
    if why:
        check.note = _join(f"no float64 copy of this model could be made ({why}): checked "
                           f"in its own precision {ref_precision.name}, with a step "
                           f"{'up to ' if check.per_input else ''}h={step:.1g} suited to "
                           f"{ref_precision.name}, so only errors above "
                           f"rel. {check.tolerance:.0e} show", check.note)
    if precision != call.dtype:
        check.note = _join(_rounds_inside(call.dtype, precision, check.tolerance), check.note)
    if coupled and diffs.rows.sum() < X.shape[0]:
        check.note = _join(check.note, f"the model couples points: checked at the first "
                                       f"{int(diffs.rows.sum())} point(s), one at a time")
    return check


def _from_the_same_state(backend, compute):
    """``compute`` with the model's state put back after each evaluation, so that every one
    starts from the state the first began with."""
    def computed(c, k):
        with backend.preserved(c.model):
            return compute(c, k)
    return computed


def _first_line(exc) -> str:
    text = str(exc).strip()
    return type(exc).__name__ + (": " + text.splitlines()[0][:200] if text else "")


def _rounds_inside(dtype, precision, tolerance) -> str:
    return (f"the model takes {dtype.name} input but computes in {precision.name} inside (an "
            f"input change below {precision.name}'s resolution leaves its output unchanged), "
            f"so its results have {precision.name} precision and are checked with "
            f"{precision.name}'s tolerance, rel. {tolerance:.0e}: a cast inside the model does "
            "this, and so do Keras layers made after keras.config.set_floatx('float64') once "
            "Keras was in use, which changes the Inputs but leaves the layers' dtype policy "
            "float32 (keras.config.set_dtype_policy('float64') changes the layers, not the "
            "Inputs: set both, or give the Input dtype='float64')")


def _float64_model(call, result, X):
    """(model, None, precision, rounding): a model that computes in float64 (the model itself
    when it already does, else a float64 copy of it), or (None, why not, precision, 0).
    ``precision`` is the dtype the model computes its results in: ``call.dtype``, or float32
    for a model that takes float64 input but rounds to float32 inside. A copy must compute
    in float64 and reproduce the model's outputs at the first points; ``rounding`` is then
    how far the result's y is from the copy's (its rounding; 0 for the model itself)."""
    precision = call.dtype
    if call.dtype == np.float64:
        try:
            _, resolves = _sensitivity(call, call.model, X)
        except Exception:  # the check itself will say what fails
            resolves = True
        if resolves is not False:
            return call.model, None, precision, 0.0
        precision = np.dtype(np.float32)
    try:
        model64 = call.backend.float64_copy(call.model)
    except Exception as exc:
        return None, f"copying failed: {_first_line(exc)}", precision, 0.0
    try:
        y, resolves = _sensitivity(call, model64, X)
    except Exception as exc:
        return None, f"it fails in float64: {_first_line(exc)}", precision, 0.0
    if resolves is False:
        return None, ("its float64 version still computes in lower precision somewhere (an "
                      "input change below float32's resolution leaves the output unchanged)"), \
            precision, 0.0
    if call.verdict is not None and call.verdict.coupled and len(y) < X.shape[0]:
        # a model that couples points gives the first points other outputs on their own
        # (batch statistics): the copy is compared on the whole batch
        try:
            whole = call.with_args(np.split(X, np.cumsum(call.widths)[:-1], axis=1),
                                   model=model64, dtype=np.dtype(np.float64))
            (y,) = call.backend.forwards(whole, [whole.args])
            y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        except Exception as exc:
            return None, f"it fails in float64: {_first_line(exc)}", precision, 0.0
    own = np.asarray(result.y[:len(y)], dtype=np.float64)
    differs, rounding = own.shape != y.shape, 0.0
    if not differs:
        ok = np.isfinite(own) & np.isfinite(y)
        scale = float(np.abs(own[ok]).max(initial=0.0))
        rounding = float(np.abs(y[ok] - own[ok]).max(initial=0.0))
        differs = ok.any() and rounding > COPY_AGREEMENT * scale + 1e-30
    if differs:
        return None, "its float64 copy does not reproduce the model's outputs", precision, 0.0
    return model64, None, precision, rounding


def _sensitivity(call, model, X):
    """(y, resolves): ``model``'s float64 outputs at the first points, and whether it
    computes in float64: an input change below float32's resolution (an eighth of a float32
    spacing, at points float32 represents exactly, so that float32 sees no change at all)
    moves its output, where a change of 1e-3 does (None when neither moves it: nothing to
    tell). Only the differentiated inputs are moved, not the extras (targets, keyword
    arguments)."""
    n, D = min(8, X.shape[0]), call.input_width
    P = X[:n]
    # at (or next to) 0 a float32 spacing is too fine to move the output: 1e-3 away instead
    cols = P[:, :D]
    cols = np.where(np.abs(cols) < 1e-3, np.where(cols < 0, -1e-3, 1e-3), cols)
    cols = cols.astype(np.float32).astype(np.float64)
    spacing = np.spacing(np.abs(cols).astype(np.float32)).astype(np.float64)
    sign = np.where(np.arange(D) % 2, -1.0, 1.0)
    batches = [P]
    for moved in (cols, cols + sign * spacing / 8, cols + 1e-3 * (1 + np.abs(cols))):
        B = P.copy()
        B[:, :D] = moved
        batches.append(B)
    split = np.cumsum(call.widths)[:-1]
    parts = [[np.ascontiguousarray(a) for a in np.split(B, split, axis=1)] for B in batches]
    c = call.with_args(parts[0], model=model, dtype=np.dtype(np.float64))
    y, y_base, y_nudged, y_moved = (np.asarray(v, dtype=np.float64).reshape(len(v), -1)
                                    for v in call.backend.forwards(c, parts))
    if np.array_equal(y_base, y_moved, equal_nan=True):
        return y, None
    return y, not np.array_equal(y_base, y_nudged, equal_nan=True)


class _Diffs(NamedTuple):
    refs: dict       # k -> central differences of order k-1, shaped like d[k]
    autos: dict      # k -> autodiff d[k] in the difference's dtype
    lowers: list     # autodiff orders 0..order-1 at the points
    rows: np.ndarray  # points checked
    sides: dict      # k -> (forward, backward) one-sided differences, or None


def _differences(compute, at, X, order, wrt, steps, dtype):
    """Shift every point at once along each wrt direction (points are independent), input i
    by ``steps[i]``."""
    y, autos = compute(at(X), order)[:2]
    lower_order = max(order - 1, 1)
    shifted, halves = [], []
    for i in wrt:
        e = np.zeros_like(X)
        e[:, i] = steps[i]
        Xp, Xm = (X + e).astype(dtype), (X - e).astype(dtype)  # the points really used
        halves.append((Xp[:, i].astype(np.float64) - Xm[:, i]) / 2)
        shifted += [Xp, Xm]
    # every shifted copy of the points in one call (points are independent): one backend
    # call instead of 2 per input, most of the cost for a few points
    n = X.shape[0]
    ys, ds = compute(at(np.concatenate(shifted)), lower_order)[:2]
    parts = [[a[j * n:(j + 1) * n] for a in [ys] + list(ds)] for j in range(len(shifted))]
    plus, minus = parts[0::2], parts[1::2]
    lowers = [np.asarray(y, dtype=np.float64)] + [np.asarray(a, dtype=np.float64) for a in autos]
    refs, sides = {}, {}
    for k in range(1, order + 1):
        fwd, bwd, ctr = [], [], []
        for p, q, h in zip(plus, minus, halves, strict=True):
            h = h.reshape((-1,) + (1,) * (lowers[k - 1].ndim - 1))
            up, down = p[k - 1].astype(np.float64), q[k - 1].astype(np.float64)
            ctr.append((up - down) / (2 * h))
            fwd.append((up - lowers[k - 1]) / h)
            bwd.append((lowers[k - 1] - down) / h)
        refs[k] = np.stack(ctr, axis=-1)
        sides[k] = (np.stack(fwd, axis=-1), np.stack(bwd, axis=-1))
    return _Diffs(refs, dict(enumerate(lowers[1:], 1)), lowers, np.ones(X.shape[0], dtype=bool),
                  sides)


def _coupled_differences(backend, at, X, order, wrt, steps, dtype):
    """Shift one point at a time, the others held fixed, for the first few points."""
    base = at(X)
    y, ders = backend.per_point_derivatives(base, base.args, order, wrt)[:2]
    n_check = min(X.shape[0], COUPLED_POINTS)
    lower_order = max(order - 1, 1)
    refs = {k: np.full(ders[k - 1].shape, np.nan) for k in range(1, order + 1)}
    for n in range(n_check):
        for p, i in enumerate(wrt):
            vals = []
            for sign in (1, -1):
                Xs = X.copy()
                Xs[n, i] += sign * steps[i]
                c = at(Xs)
                ys, ds = backend.per_point_derivatives(c, c.args, lower_order, wrt)[:2]
                vals.append([ys[n]] + [d[n] for d in ds])
            for k in range(1, order + 1):
                refs[k][n, ..., p] = (vals[0][k - 1] - vals[1][k - 1]) / (2 * steps[i])
    rows = np.zeros(X.shape[0], dtype=bool)
    rows[:n_check] = True
    lowers = [np.asarray(a, dtype=np.float64) for a in [y] + list(ders)]
    return _Diffs(refs, dict(enumerate(lowers[1:], 1)), lowers, rows,
                  {k: None for k in range(1, order + 1)})


def _per_point_max(a: np.ndarray) -> np.ndarray:
    return np.abs(a).reshape(a.shape[0], -1).max(axis=1, initial=0.0)


def _compare(result, diffs, step, piecewise, ref_dtype, dtype=None,
             noise_step=None, rounding=0.0, size=1.0, weights=None) -> FiniteDifferenceCheck:
    """``dtype``: the precision ``result`` was computed in (its arrays' dtype unless the model
    rounds to a lower one inside); ``step``: the largest step (reported), ``noise_step`` the
    smallest (the rounding of its quotients is the largest); ``rounding``: how far the
    result's y is from the float64 copy's (0 without one), ``size`` the inputs' (>= 1);
    ``weights``: each differentiated input's size relative to the largest (None: all 1), by
    which each entry is compared in units of its inputs (``max_rel`` of ``errors`` too).

    The rounding tells the size of the numbers y is computed from, ``rounding / eps``: of
    order 1 for a sum of softmax probabilities, where |y| shows it, but also where they
    cancel to a y near 0. The differences' own rounding is sized by it too."""
    noise_step = step if noise_step is None else noise_step
    dtype = np.dtype(result.y.dtype if dtype is None else dtype)
    tol = max(TOLERANCE.get(dtype.name, 1e-6), TOLERANCE.get(ref_dtype.name, 1e-6))
    check = FiniteDifferenceCheck(step=step, tolerance=tol, dtype=ref_dtype.name,
                                  result_dtype=dtype.name)
    # rounding of the difference quotient: a wide margin in float64, a narrower one for a
    # lower-precision reference (whose step is chosen for it)
    eps = float(np.finfo(ref_dtype).eps)
    margin = 1e3 if ref_dtype.itemsize >= 8 else 30.0
    rows = diffs.rows
    nonsmooth = np.zeros(len(rows), dtype=bool)
    kinks = np.zeros(len(rows), dtype=bool)
    precision_orders, skipped, zeros = [], 0, {}
    inner = rounding / float(np.finfo(dtype).eps)  # the size of what y is computed from
    for k in range(1, result.order + 1):
        ref, auto, got = diffs.refs[k], diffs.autos[k], result[k].astype(np.float64)
        ok = rows.copy()
        for a in (ref, auto, got, diffs.lowers[k - 1]):
            ok &= np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
        skipped = max(skipped, int(rows.sum() - ok.sum()))
        check.reference[k] = np.where(ok.reshape((-1,) + (1,) * (ref.ndim - 1)), ref, np.nan)
        if not ok.any():
            check.errors[k] = (float("nan"), float("nan"))
            continue
        plain = max(_per_point_max(ref[ok]).max(), _per_point_max(auto[ok]).max(), 1e-300)
        # each entry in units of its inputs' sizes (u_t times t's spread): an input of a
        # small scale has large derivatives, one of a large scale (t in [0, 1e4]) small ones,
        # which a tolerance relative to the largest entry would not check at all
        W = _direction_weights(weights, k, ref.ndim)
        ref, auto, got = ref * W, auto * W, got * W
        scale = max(_per_point_max(ref[ok]).max(), _per_point_max(auto[ok]).max(), 1e-300)
        # the differences' own rounding: of the lower order's values (|y| misses what
        # cancels, the wide margin covers it) or of what y is computed from (measured)
        noise = eps * max(margin * _per_point_max(diffs.lowers[k - 1][ok]).max(),
                          INNER_MARGIN * inner / size ** (k - 1)) / noise_step
        check.rounding_bound |= bool(noise > tol * scale)
        allow = tol * scale + noise
        fd_off = _per_point_max(auto[ok] - ref[ok]) > allow   # not smooth within +-h
        floor = ROUNDING_MARGIN * rounding / size ** k
        if 0 < plain <= floor:  # d[k] is 0 up to the result's rounding: it may be off by that
            allow = max(allow, floor)
            zeros[k] = (plain, floor)
        err = _per_point_max(got[ok] - ref[ok])
        precision = _per_point_max(got[ok] - auto[ok]) > allow
        bad = err > allow
        check.errors[k] = (float(_per_point_max((got[ok] - ref[ok]) / W).max()),
                           float(err.max() / scale))
        if bad.any():
            check.passed = False
        where = np.flatnonzero(ok)
        nonsmooth[where[fd_off]] = True
        if diffs.sides[k] is not None and fd_off.any():
            sides = tuple(side * W for side in diffs.sides[k])
            kinks[where[fd_off]] |= _one_sided_agrees(sides, ref, auto, where[fd_off], allow)
        if (bad & precision & ~fd_off).any():
            precision_orders.append(k)
    check.nonsmooth_points = tuple(np.flatnonzero(nonsmooth).tolist())
    if all(s is None for s in diffs.sides.values()):  # no one-sided differences: structure
        kinks = nonsmooth if piecewise else kinks
    check.kink_points = tuple(np.flatnonzero(kinks & nonsmooth).tolist())
    check.low_precision = bool(precision_orders) and dtype.itemsize < 8 and \
        ref_dtype.itemsize >= 8
    check.low_precision_orders = tuple(precision_orders)
    if check.kink_points:
        check.note = _join(check.note, (
            f"at point(s) {_shown(check.kink_points)} a kink lies between x - h and x + h "
            "(one one-sided difference agrees with autodiff, the other does not): autodiff "
            "gives the derivative of the piece the point sits in (e.g. a second derivative "
            "of 0 for ReLU) and the difference quotient averages across the kink"))
    other = tuple(sorted(set(check.nonsmooth_points) - set(check.kink_points)))
    at_kink = set(next((f.points for f in result.findings if f.code == "at-kink"), ()))
    convention = tuple(n for n in other if n in at_kink)
    other = tuple(n for n in other if n not in at_kink)
    if convention:
        check.note = _join(check.note, (
            f"at point(s) {_shown(convention)} autodiff returns its convention at a kink "
            "(finding at-kink), not the slope the differences see"))
    if other:
        check.note = _join(check.note, (
            f"at point(s) {_shown(other)} even {ref_dtype.name} autodiff disagrees with the "
            "differences: the function curves too sharply for this step, or autodiff is "
            "wrong here (a .detach(), .numpy()/NumPy call, no_grad or integer cast inside "
            "the model cuts the graph)"))
    zeros = {k: v for k, v in zeros.items() if check.errors[k][0] > tol * v[0]}
    if zeros:
        check.note = _join(check.note, (
            f"{' and '.join(f'd[{k}]' for k in zeros)} {'are' if len(zeros) > 1 else 'is'} 0 "
            "up to rounding: float64 autodiff and the "
            f"differences stay below {max(s for s, _ in zeros.values()):.1g}, and the "
            f"{dtype.name} result's values are within {dtype.name}'s rounding of y "
            f"(+-{rounding:.1g}) carried to the derivative; the output is constant along the "
            "inputs up to rounding (the sum of softmax probabilities, a normalisation's "
            "mean)"))
    if check.low_precision:
        check.note = _join(check.note, f"{dtype.name} results lose digits at order(s) "
                                       f"{', '.join(map(str, precision_orders))}; use float64")
    if skipped:
        check.note = _join(check.note, f"{skipped} point(s) with NaN/inf left out")
    return check


def _direction_weights(weights, k, ndim):
    """The weight of every entry of an order-k array of ``ndim`` axes: the product of its k
    inputs' ``weights``, shaped to broadcast over its last k axes (1.0 for None)."""
    if weights is None:
        return 1.0
    W = np.ones(())
    for _ in range(k):
        W = np.multiply.outer(W, np.asarray(weights, dtype=np.float64))
    return W.reshape((1,) * (ndim - k) + W.shape)


def _one_sided_agrees(sides, ref, auto, points, allow) -> np.ndarray:
    """At each of ``points``: in every input direction where the central difference
    disagrees with autodiff, one one-sided difference agrees with it (within ``allow``, or
    ten times better than the other side): the function is smooth on one side of the point
    and not across it, a kink."""
    a = auto[points]

    def off(d):  # (points, directions): largest disagreement over outputs and lower axes
        return np.abs(d[points] - a).reshape(len(points), -1, a.shape[-1]).max(axis=1)

    e_f, e_b, e_c = off(sides[0]), off(sides[1]), off(ref)
    low, high = np.minimum(e_f, e_b), np.maximum(e_f, e_b)
    one_side = (low <= allow) | (low <= 0.1 * high)
    return (one_side | (e_c <= allow)).all(axis=1)


def _shown(points) -> str:
    return ", ".join(map(str, points[:10])) + (" ..." if len(points) > 10 else "")


def _join(a: str, b: str) -> str:
    return "; ".join(part for part in (a, b) if part)
