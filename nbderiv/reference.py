"""The error of a result against a known truth: ``derivatives(..., reference=...)``.

``reference`` is either

* a function of NumPy float64 arrays giving the true y: called as ``f(x)`` with x of shape
  (N, d_in) (as ``f(x, t)`` for a tuple input), returning (N, d_out) or (N,); its
  derivatives are taken by float64 central differences of ``f`` itself (never by
  autodiff, never through nbderiv), with a step per order that balances rounding against
  truncation (relative accuracy about 1e-7 at order 1, 1e-6 up to order 3), or
* a dict ``{k: f_k}`` of known closed forms, ``f_k(x)`` giving d[k] (shape
  (N, d_out) + (len(wrt),) * k, or anything of that size, e.g. (N,)); k = 0 is y. Orders
  left out are not compared.

The result is ``{k: (max_abs, max_rel)}`` for k = 0..order (0: y), ``max_rel`` relative to
the largest |truth| of that order; points where the result or the truth is NaN/inf are
left out.

The plots and the explorer (``plot_derivatives(d, reference=f)``, ``explore(model,
reference=f)``) take the reference's derivatives with
:func:`nbderiv.reference_views.reference_derivatives`: by the model framework's autodiff
when ``f`` works there (``torch.sin``), else, for a NumPy function, by the same central
differences as here.

>>> import numpy as np, torch, nbderiv
>>> d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5, dtype=torch.float64),
...                         order=2, reference=np.sin)
>>> all(rel < 1e-6 for _, rel in d.reference_errors.values())
True
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np

from .errors import NbderivError, OptionError

_EPS64 = float(np.finfo(np.float64).eps)


def reference_errors(reference, call, result) -> dict:
    """{k: (max_abs, max_rel)} of ``result`` (a Derivatives) against ``reference``."""
    try:
        return _reference_errors(reference, call, result)
    except NbderivError:
        raise
    except Exception as exc:  # the user's function failed on NumPy arrays
        text = (str(exc).strip().splitlines() or [""])[0][:200].rstrip(".")
        n_args = len(call.widths)
        if n_args > 1:  # x is a tuple: the reference gets one array per argument
            names = ", ".join(result.inputs[:n_args]) if len(result.inputs) == n_args else \
                ", ".join(f"x{i}" for i in range(n_args))
            fix = (f"x is a tuple of {n_args} arguments, and the reference is called as "
                   f"the model is, with {n_args} NumPy arrays. Fix: e.g. reference=lambda "
                   f"{names}: np.sin({names.split(', ')[0]}) (a dict's functions take them "
                   "too).")
        else:
            fix = ("reference= takes functions of NumPy arrays (a framework function such as "
                   "torch.sin or tf.sin fails on them). Fix: e.g. reference=np.sin or "
                   "reference=lambda x: np.sin(x).")
        raise OptionError(
            f"the reference raised {type(exc).__name__} on NumPy float64 arrays of x: {text}. "
            + fix) from None


def _with_point_shapes(f, shapes):
    """``f`` called with each argument of points of several axes (images, sequences) in
    its own shape (N, *S), as the model gets it; vectors as they are."""
    if not callable(f) or all(len(s) <= 1 for s in shapes):
        return f

    def shaped(*args):
        return f(*[a.reshape((a.shape[0],) + tuple(s)) if i < len(shapes) and len(s) > 1
                   else a for i, (a, s) in enumerate(zip(args, list(shapes) + [()] * len(args)))])
    return shaped


def _reference_errors(reference, call, result) -> dict:
    X = np.concatenate([a.astype(np.float64) for a in call.args], axis=1)
    widths = call.widths
    shapes = [tuple(s) for s in call.point_shapes[:call.n_inputs]]
    if isinstance(reference, dict):
        reference = {k: _with_point_shapes(fk, shapes) for k, fk in reference.items()}
    else:
        reference = _with_point_shapes(reference, shapes)
    if isinstance(reference, dict):
        truths = {}
        for k, fk in reference.items():
            if not (isinstance(k, int) and 0 <= k <= result.order and callable(fk)):
                raise OptionError(
                    f"reference={{...}} has the entry {k!r}: {type(fk).__name__}; its keys must "
                    f"be orders 0..{result.order} and its values functions of x. Fix: e.g. "
                    "reference={1: np.cos, 2: lambda x: -np.sin(x)}.")
            truths[k] = _shaped(_evaluate(fk, X, widths), result[k].shape, f"reference[{k}]")
    elif callable(reference):
        truths = {k: _shaped(v, result[k].shape, "the reference function") for k, v in
                  central_differences(reference, X, widths, result.order, result.wrt).items()}
    else:
        raise OptionError(
            f"reference must be a function of x or a dict {{order: function}}, got "
            f"{type(reference).__name__}. Fix: e.g. reference=np.sin or "
            "reference={1: np.cos}.")
    return {k: _error(result[k], truth) for k, truth in sorted(truths.items())}


def _evaluate(f, X, widths) -> np.ndarray:
    args = np.split(X, np.cumsum(widths)[:-1], axis=1)
    out = f(*args)
    return np.asarray(out, dtype=np.float64)


def _shaped(value, shape, what) -> np.ndarray:
    if value.size != int(np.prod(shape)):
        raise OptionError(
            f"{what} returned shape {value.shape}, which does not fit the result's shape "
            f"{shape}. Fix: return one row per point with the model's outputs, e.g. (N, d_out).")
    return value.reshape(shape)


def step_scales(X: np.ndarray) -> np.ndarray:
    """Per input (column of ``X``, (N, m)): what a central-difference step is a share of,
    ``max(1, |x|)``, except for inputs far from 0 compared with their spread over the points
    (x in [1e4, 1e4 + 3]: a step of 1e-4 |x| = 1 would span a sixth of sin's period), scaled
    down to that spread, but never below 1 nor below 1e-3 |x| (far above float64's rounding of
    x itself). One point, or an input constant over the points, has no spread: max(1, |x|).

    >>> step_scales(np.array([[0.5, 1e4, 50.0], [0.9, 1e4 + 3, 150.0]])).tolist()
    [1.0, 10.003, 100.0]
    """
    X = np.where(np.isfinite(X), X, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no finite value
        top = np.nan_to_num(np.nanmax(np.abs(X), axis=0), nan=1.0)
        spread = np.nan_to_num(np.nanmax(X, axis=0) - np.nanmin(X, axis=0), nan=0.0)
    spread = np.where(spread > 0, spread, top)  # one point, or a constant input: no spread
    return np.maximum(1.0, np.minimum(top, np.maximum(spread, 1e-3 * top)))


def step_for(order: int) -> float:
    """The relative step of order-k central differences in float64: eps ** (1 / (k + 2))."""
    return _EPS64 ** (1.0 / (order + 2))


SHRINKS = (1, 16, 256)  # the steps tried, as divisors of the first


def central_differences(f, X, widths, order, wrt) -> dict:
    """{k: truth of d[k]} for k = 0..order (:func:`_central_differences`), each order at the
    step that suits the function, chosen from the differences alone (never by agreement with
    the model): the first step where it and the next smaller one agree at least as well as
    the two smaller ones (a function varying on the scale of x: the first step, whose
    differences the smaller steps' rounding only blurs); else, for a function that varies
    on a smaller scale than x (sin(1e4 x) at x ~ 1e-4, Fourier features), the smaller
    steps, the smallest one where its rounding (eps max |f| / h**k) stays below how far
    the two smaller steps differ."""
    runs = [_central_differences(f, X, widths, order, wrt, shrink) for shrink in SHRINKS]
    truths = {0: runs[0][0]}
    size = float(np.nanmax(np.abs(runs[0][0]), initial=0.0)) if runs[0][0].size else 0.0
    finite = np.isfinite(X)
    h0 = float((step_scales(X)[list(wrt)] if len(wrt) else np.ones(1)).min()) \
        if finite.any() else 1.0
    for k in range(1, order + 1):
        t0, t1, t2 = (r[k] for r in runs)
        with np.errstate(invalid="ignore"):
            d01 = float(np.nanmax(np.abs(t0 - t1), initial=0.0))
            d12 = float(np.nanmax(np.abs(t1 - t2), initial=0.0))
        if d01 <= d12:
            truths[k] = t0
            continue
        h2 = step_for(k) * h0 / SHRINKS[2]
        rounding = _EPS64 * size / h2 ** k
        truths[k] = t2 if rounding < d12 else t1
    return truths


def _central_differences(f, X, widths, order, wrt, shrink=1) -> dict:
    """{k: truth of d[k]} for k = 0..order: nested central differences of f, 2**k
    evaluations per distinct mixed partial, step eps ** (1/(k+2)) times each input's
    :func:`step_scales`, divided by ``shrink``."""
    y = _evaluate(f, X, widths).reshape(X.shape[0], -1)
    n, d_out = y.shape
    truths = {0: y}
    scales = step_scales(X) / shrink
    m = len(wrt)
    for k in range(1, order + 1):
        h = step_for(k) * scales
        out = np.empty((n, d_out) + (m,) * k)
        for idx in itertools.combinations_with_replacement(range(m), k):
            total = np.zeros((n, d_out))
            for signs in itertools.product((1.0, -1.0), repeat=k):
                Xs = X.copy()
                for s, p in zip(signs, idx, strict=True):
                    Xs[:, wrt[p]] += s * h[wrt[p]]
                total += np.prod(signs) * _evaluate(f, Xs, widths).reshape(n, d_out)
            value = total / np.prod([2 * h[wrt[p]] for p in idx])
            for perm in set(itertools.permutations(idx)):
                out[(slice(None), slice(None)) + perm] = value
        truths[k] = out
    return truths


def _error(got, truth) -> tuple:
    got = np.asarray(got, dtype=np.float64)
    ok = (np.isfinite(got) & np.isfinite(truth)).reshape(got.shape[0], -1).all(axis=1)
    if not ok.any():
        return (float("nan"), float("nan"))
    err = float(np.abs(got[ok] - truth[ok]).max())
    scale = float(np.abs(truth[ok]).max())
    return (err, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
