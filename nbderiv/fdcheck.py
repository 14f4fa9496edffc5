"""Finite-difference check of every order, in float64, on a copy of the model.

Order 1 is checked against central differences of y; order k against central
differences of the float64 derivatives of order k-1, one input direction at a time.
Float64 autodiff at the points themselves tells the two kinds of mismatch apart: where it
agrees with the differences but the (float32) result does not, digits were lost to
rounding (``low-precision``); where even float64 autodiff disagrees, the function is not
smooth within a step of the point (a ReLU kink between x - h and x + h).

>>> import torch, nbderiv
>>> d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=2, check=True)
>>> d.check.passed, d.check.errors[2][0] < 1e-6
(True, True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .findings import structurally_piecewise

# relative tolerance (of the largest value of that order) per dtype of the checked result; it
# must also cover the truncation error
# of central differences (about h**2 times the next derivative), which dominates in float64
TOLERANCE = {"float16": 5e-2, "bfloat16": 5e-2, "float32": 2e-3, "float64": 1e-4}
RELATIVE_STEP = 1e-4     # h = RELATIVE_STEP * max(1, max |x|)
COUPLED_POINTS = 4       # points checked one by one when the model couples points
COUPLED_MAX_N = 256      # above this the per-point differences of a coupled model cost too much
_EPS64 = float(np.finfo(np.float64).eps)


@dataclass
class FiniteDifferenceCheck:
    """``errors[k] = (max_abs, max_rel)`` of ``d[k]`` against the float64 central-difference
    reference ``reference[k]`` (same shape as ``d[k]``; NaN rows were not checked), step
    ``step``. ``passed`` is False on any mismatch beyond ``tolerance`` (relative to the
    largest value of that order); ``nonsmooth_points`` are the points where even float64
    autodiff disagrees with the differences (kinks); ``note`` explains."""

    step: float
    errors: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict, repr=False)
    tolerance: float = 0.0
    passed: bool = True
    low_precision: bool = False
    low_precision_orders: tuple = ()
    nonsmooth_points: tuple = ()
    note: str = ""

    def summary(self) -> str:
        if not self.errors:
            return f"not run ({self.note})" if self.note else "not run"
        parts = [f"order {k}: max abs err {a:.2g}, rel {r:.2g}" for k, (a, r) in
                 sorted(self.errors.items())]
        verdict = "OK" if self.passed else "MISMATCH"
        text = f"{verdict} vs float64 central differences (h={self.step:.1g}); " + "; ".join(parts)
        return text + (f" ({self.note})" if self.note else "")


def _not_run(note: str) -> FiniteDifferenceCheck:
    return FiniteDifferenceCheck(step=float("nan"), passed=False, note=note)


def finite_difference_check(call, result, *, coupled=False, compute=None) -> FiniteDifferenceCheck:
    """Compare ``result`` (a Derivatives) with float64 finite differences.

    ``call`` is the :class:`~nbderiv.call.Call` (model, backend, args, dtype, device);
    ``compute(call, k) -> (y, [d1..dk], method)`` evaluates derivatives for a modified
    copy of it (the api passes its chunked loop); by default one backend call.
    """
    backend = call.backend
    wrt, order = result.wrt, result.order
    if compute is None:
        def compute(c, k):
            return c.backend.derivatives(c, c.args, k, wrt)
    try:
        model64 = backend.float64_copy(call.model)
        widths = call.widths
        X = np.concatenate([a.astype(np.float64) for a in call.args], axis=1)

        def at(Xs):
            args = np.split(Xs, np.cumsum(widths)[:-1], axis=1)
            return call.with_args([np.ascontiguousarray(a) for a in args], model=model64,
                                  dtype=np.dtype(np.float64))

        probe = at(X[:8])
        first, again = backend.forwards(probe, [probe.args, probe.args])
        if not np.array_equal(first, again, equal_nan=True):
            return _not_run("the model is random (dropout or similar in training mode): "
                            "finite differences of a random function mean nothing")
        finite = X[np.isfinite(X)]
        step = RELATIVE_STEP * max(1.0, float(np.abs(finite).max()) if finite.size else 1.0)
        if coupled:
            if X.shape[0] > COUPLED_MAX_N:
                return _not_run(f"the model couples points and N = {X.shape[0]} > "
                                f"{COUPLED_MAX_N}: checking points one by one would cost N**2")
            refs, autos, lowers, rows = _coupled_differences(backend, at, X, order, wrt, step)
        else:
            refs, autos, lowers, rows = _differences(compute, at, X, order, wrt, step)
    except Exception as exc:  # the check must never break the computation it checks
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return _not_run(f"the model could not be evaluated in float64 on a copy "
                        f"({type(exc).__name__}: {text}); pass the nn.Module / keras.Model "
                        "itself rather than a function holding its tensors")
    try:
        layers = backend.layer_summary(call.model)
    except Exception:  # structure is only used for wording
        layers = {}
    piecewise = bool({"piecewise-linear", "at-kink"} & set(result.codes)
                     or structurally_piecewise(layers))
    check = _compare(result, refs, autos, lowers, rows, step, piecewise)
    if coupled and rows.sum() < X.shape[0]:
        check.note = _join(check.note, f"the model couples points: checked at the first "
                                       f"{int(rows.sum())} point(s), one at a time")
    return check


def _differences(compute, at, X, order, wrt, step):
    """Shift every point at once along each wrt direction (points are independent)."""
    y, autos, _ = compute(at(X), order)
    lower_order = max(order - 1, 1)
    plus, minus = [], []
    for i in wrt:
        e = np.zeros_like(X)
        e[:, i] = step
        yp, dp, _ = compute(at(X + e), lower_order)
        ym, dm, _ = compute(at(X - e), lower_order)
        plus.append([yp] + list(dp))
        minus.append([ym] + list(dm))
    refs = {k: np.stack([(p[k - 1] - q[k - 1]) / (2 * step) for p, q in zip(plus, minus, strict=True)],
                        axis=-1) for k in range(1, order + 1)}
    lowers = [y] + list(autos)
    return refs, dict(enumerate(autos, 1)), lowers, np.ones(X.shape[0], dtype=bool)


def _coupled_differences(backend, at, X, order, wrt, step):
    """Shift one point at a time, the others held fixed, for the first few points."""
    base = at(X)
    y, ders, _ = backend.per_point_derivatives(base, base.args, order, wrt)
    n_check = min(X.shape[0], COUPLED_POINTS)
    lower_order = max(order - 1, 1)
    refs = {k: np.full(ders[k - 1].shape, np.nan) for k in range(1, order + 1)}
    for n in range(n_check):
        for p, i in enumerate(wrt):
            vals = []
            for sign in (1, -1):
                Xs = X.copy()
                Xs[n, i] += sign * step
                c = at(Xs)
                ys, ds, _ = backend.per_point_derivatives(c, c.args, lower_order, wrt)
                vals.append([ys[n]] + [d[n] for d in ds])
            for k in range(1, order + 1):
                refs[k][n, ..., p] = (vals[0][k - 1] - vals[1][k - 1]) / (2 * step)
    rows = np.zeros(X.shape[0], dtype=bool)
    rows[:n_check] = True
    return refs, dict(enumerate(ders, 1)), [y] + list(ders), rows


def _per_point_max(a: np.ndarray) -> np.ndarray:
    return np.abs(a).reshape(a.shape[0], -1).max(axis=1, initial=0.0)


def _compare(result, refs, autos, lowers, rows, step, piecewise) -> FiniteDifferenceCheck:
    dtype = result.y.dtype
    tol = TOLERANCE.get(dtype.name, 1e-6)
    check = FiniteDifferenceCheck(step=step, tolerance=tol)
    nonsmooth = np.zeros(len(rows), dtype=bool)
    precision_orders, skipped = [], 0
    for k in range(1, result.order + 1):
        ref, auto, got = refs[k], autos[k], result[k].astype(np.float64)
        ok = rows.copy()
        for a in (ref, auto, got, lowers[k - 1]):
            ok &= np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
        skipped = max(skipped, int(rows.sum() - ok.sum()))
        check.reference[k] = np.where(ok.reshape((-1,) + (1,) * (ref.ndim - 1)), ref, np.nan)
        if not ok.any():
            check.errors[k] = (float("nan"), float("nan"))
            continue
        scale = max(_per_point_max(ref[ok]).max(), _per_point_max(auto[ok]).max(), 1e-300)
        # float64 rounding of the difference quotient, with a wide margin
        noise = 1e3 * _EPS64 * _per_point_max(lowers[k - 1][ok]).max() / step
        allow = tol * scale + noise
        err = _per_point_max(got[ok] - ref[ok])
        fd_off = _per_point_max(auto[ok] - ref[ok]) > allow   # not smooth within +-h
        precision = _per_point_max(got[ok] - auto[ok]) > allow
        bad = err > allow
        check.errors[k] = (float(err.max()), float(err.max() / scale))
        if bad.any():
            check.passed = False
        nonsmooth[np.flatnonzero(ok)[fd_off]] = True
        if (bad & precision & ~fd_off).any():
            precision_orders.append(k)
    check.nonsmooth_points = tuple(np.flatnonzero(nonsmooth).tolist())
    check.low_precision = bool(precision_orders) and dtype.itemsize < 8
    check.low_precision_orders = tuple(precision_orders)
    if check.nonsmooth_points:
        shown = ", ".join(map(str, check.nonsmooth_points[:10]))
        more = " ..." if len(check.nonsmooth_points) > 10 else ""
        check.note = _join(check.note, (
            f"at point(s) {shown}{more} even float64 autodiff disagrees with the differences: "
            "a kink lies between x - h and x + h, where autodiff gives the derivative of the "
            "linear piece the point sits in (e.g. a second derivative of 0) and the "
            "difference quotient averages across the kink"
            + ("" if piecewise else " (or the function curves too sharply for this step)")))
    if check.low_precision:
        check.note = _join(check.note, f"{dtype.name} results lose digits at order(s) "
                                       f"{', '.join(map(str, precision_orders))}; use float64")
    if skipped:
        check.note = _join(check.note, f"{skipped} point(s) with NaN/inf left out")
    return check


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b
