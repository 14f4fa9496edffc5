"""Finite-difference check of every order, in float64, on a copy of the model.

Order 1 is checked against central differences of y; order k against central
differences of the float64 derivatives of order k-1, one input direction at a time.

>>> import torch, nbderiv
>>> d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=2, check=True)
>>> d.check.errors[2][0] < 1e-6
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# relative tolerance per dtype of the checked result
TOLERANCE = {"float16": 5e-2, "bfloat16": 5e-2, "float32": 2e-3, "float64": 1e-6}


@dataclass
class FiniteDifferenceCheck:
    """``errors[k] = (max_abs, max_rel)`` against the finite-difference reference
    ``reference[k]`` (same shape as ``d[k]``), computed with step ``step``."""

    step: float
    errors: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict, repr=False)
    tolerance: float = 0.0
    passed: bool = True
    low_precision: bool = False
    note: str = ""

    def summary(self) -> str:
        if not self.errors:
            return f"not run ({self.note})" if self.note else "not run"
        parts = [f"order {k}: max abs err {a:.2g}, rel {r:.2g}" for k, (a, r) in
                 sorted(self.errors.items())]
        verdict = "OK" if self.passed else "MISMATCH"
        text = f"{verdict} vs float64 central differences (h={self.step:.1g}); " + "; ".join(parts)
        return text + (f" ({self.note})" if self.note else "")


def finite_difference_check(call, result, *, coupled=False) -> FiniteDifferenceCheck:
    """Compare ``result`` (a Derivatives) with float64 finite differences."""
    if coupled:
        return FiniteDifferenceCheck(step=float("nan"), note="not available for models that "
                                     "couple points (shifting every point at once is not a "
                                     "per-point difference)", passed=False)
    backend = call.backend
    model64 = backend.float64_copy(call.model)
    ctx64 = backend.context(model64, None, np.float64)
    widths = call.prepared.widths
    X = np.concatenate([a.astype(np.float64) for a in call.args], axis=1)
    order, wrt = result.order, result.wrt
    step = 1e-4 * max(1.0, float(np.nanmax(np.abs(X))) if X.size else 1.0)

    def evaluate(Xs):
        args = np.split(Xs, np.cumsum(widths)[:-1], axis=1)
        if order == 1:
            return [backend.forward(model64, args, ctx64)]
        y, ders, _ = backend.derivatives(model64, args, order - 1, wrt, ctx64)
        return [y] + list(ders)

    plus, minus = [], []
    for i in wrt:
        e = np.zeros_like(X)
        e[:, i] = step
        plus.append(evaluate(X + e))
        minus.append(evaluate(X - e))
    check = FiniteDifferenceCheck(step=step, tolerance=TOLERANCE.get(result.y.dtype.name, 1e-6))
    for k in range(1, order + 1):
        ref = np.stack([(p[k - 1] - q[k - 1]) / (2 * step) for p, q in zip(plus, minus)], axis=-1)
        got = result[k].astype(np.float64)
        err = np.abs(ref - got)
        max_abs = float(np.nanmax(err)) if err.size else 0.0
        scale = float(np.nanmax(np.abs(ref))) if ref.size else 0.0
        max_rel = max_abs / max(scale, 1e-12)
        check.errors[k] = (max_abs, max_rel)
        check.reference[k] = ref
        if max_rel > check.tolerance and max_abs > check.tolerance:
            check.passed = False
    kinks = {"piecewise-linear", "at-kink"} & set(result.codes)
    if kinks and not check.passed:
        check.note = ("finite differences straddle the kinks of a piecewise-linear model: "
                      "autodiff reports the derivative inside one linear piece")
    check.low_precision = (not check.passed and not kinks
                           and result.y.dtype.itemsize < 8)
    return check
