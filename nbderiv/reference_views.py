"""The truth a plot or the explorer draws beside a result: a reference function's derivatives
at the result's points (:func:`reference_derivatives`), by the model framework's autodiff where
the function is written in it, else by float64 central differences
(:func:`nbderiv.reference`'s, the way ``derivatives(..., reference=...)`` takes them).
"""

from __future__ import annotations

import numpy as np

from .errors import NbderivError, OptionError
from .reference import central_differences

AUTODIFF, CENTRAL = "autodiff", "central differences"


def reference_derivatives(reference, X, order, wrt, framework=None, how=None) -> tuple:
    """``(truths, how)`` for a reference given as a function of x, as the plots and the
    explorer draw it: ``truths[k]`` (k = 0..order) the truth of d[k] at the points ``X``
    (N, d_in), float64 of shape (N, d_out) + (len(wrt),) * k; ``how`` the way it was taken.

    A function that works in the model's ``framework`` (``torch.sin``, a lambda of torch or
    TensorFlow ops, or ``lambda x: x**2``, which works on anything) is differentiated by
    that framework's autodiff through :func:`nbderiv.derivatives`, exactly (``"autodiff"``). A
    NumPy function (``np.sin``: the framework cannot see inside it; autodiff raises, or
    says the graph is broken and gives zeros) is differentiated the way
    ``derivatives(..., reference=...)`` does it, by float64 central differences of the
    function itself (``"central differences"``). Pass ``how`` from an earlier call to take the
    same way again without trying the other. A reference that fails both ways raises an
    OptionError saying the reference failed, with both reasons.

    >>> import numpy as np
    >>> X = np.linspace(0, 1, 5).reshape(-1, 1)
    >>> truths, how = reference_derivatives(np.sin, X, 2, [0])
    >>> how, float(np.abs(truths[1][:, 0, 0] - np.cos(X[:, 0])).max()) < 1e-7
    ('central differences', True)
    """
    X = np.asarray(X, dtype=np.float64)
    failures = []
    from .backends import model_framework

    own = model_framework(reference)
    if own is not None:  # a model of either framework: its own autodiff (a float32 model's
        framework, how = own, AUTODIFF  # central differences would be mostly rounding)
    if framework is not None and how != CENTRAL:
        from .api import derivatives  # (the layer above the core: plots and the explorer)

        try:
            r = derivatives(reference, X, order=max(order, 1), wrt=list(wrt),
                            framework=framework)
        except Exception as exc:  # noqa: BLE001 - the reference's own errors too: reported below
            failures.append(f"differentiated by {framework} autodiff, {_reason(exc)}")
        else:
            if "graph-broken" not in r.codes:
                n = X.shape[0]
                return ({k: np.asarray(r[k], dtype=np.float64).reshape(
                    (n, -1) + (len(wrt),) * k) for k in range(order + 1)}, AUTODIFF)
            failures.append(f"differentiated by {framework} autodiff, its derivatives are cut "
                            "off (it leaves the framework's graph, e.g. through NumPy)")
        if how == AUTODIFF:
            raise _reference_failed(failures, X)
    try:
        return central_differences(reference, X, [X.shape[1]], order, list(wrt)), CENTRAL
    except Exception as exc:  # noqa: BLE001 - the reference's own errors too
        failures.append(f"called on NumPy float64 x of shape {X.shape}, {_reason(exc)}")
    raise _reference_failed(failures, X)


def _reason(exc) -> str:
    """What went wrong, in the words of the reference (nbderiv's errors speak of the model:
    here the reference is the one nbderiv called)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, NbderivError):
        text = text.split(" Fix:")[0].replace("the model", "the reference")
        return text[:400].rstrip(". ")
    return f"it raised {type(exc).__name__}: {text[:300].rstrip('. ')}"


def _reference_failed(failures, X) -> OptionError:
    return OptionError(
        "the reference failed (the function given as reference=, not the model): "
        + "; ".join(failures) + ". Fix: give the true function of x, taking x of shape "
        f"(N, {X.shape[1]}) and returning y of shape (N,) or (N, d_out): a NumPy function "
        "(reference=np.sin, differentiated by float64 central differences) or one in the "
        "model's framework (reference=torch.sin, differentiated by autodiff).")
