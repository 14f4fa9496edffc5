"""Findings: the classic derivative pitfalls, recognised and explained.

The codes are a stable contract (see the README): ``piecewise-linear``, ``at-kink``,
``coupled-samples``, ``train-mode``, ``graph-broken``, ``no-input-dependence``, ``saturated``,
``input-reshaped``, ``integer-input``, ``low-precision``, ``non-finite``. Findings that can be
checked numerically are confirmed at the points they name first (:mod:`nbderiv.confirm`). This module builds them; the
public entry points are :func:`nbderiv.derivatives` (``d.findings``) and
:func:`nbderiv.diagnose`. (It is not called ``diagnose`` so that the submodule never
shadows the function ``nbderiv.diagnose``.)

>>> import torch, nbderiv
>>> relu_net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> [f.code for f in nbderiv.diagnose(relu_net, torch.linspace(-1, 1, 5))]
['input-reshaped', 'piecewise-linear']
"""

from __future__ import annotations

import numpy as np

from . import confirm
from .result import Finding

# Activation names (torch module classes, Keras activation and layer names) whose
# function is piecewise linear: every derivative of order >= 2 is 0 wherever it exists.
PIECEWISE_LINEAR = frozenset({
    # torch.nn modules
    "ReLU", "LeakyReLU", "ReLU6", "PReLU", "RReLU", "Hardtanh", "Threshold", "Hardsigmoid",
    "Hardshrink", "Softshrink",
    # keras activation names (Dense(..., activation="relu")) and layers
    "relu", "leaky_relu", "relu6", "hard_tanh", "hard_sigmoid", "hard_shrink", "soft_shrink",
    "threshold", "sparse_sigmoid", "linear",
})
SMOOTH_SUGGESTION = "use a smooth activation such as tanh, softplus, SiLU or GELU"
SATURATED_BELOW = 1e-5  # max |dy/dx| * (size of x) / (size of y) under this: vanishing gradients
PROBE_POINTS = 8        # points that diagnose() and the coupling probe look at
WIDE_PROBE_POINTS = 16  # extra points for the numeric piecewise-linear test
_MAX_LISTED = 10


def _listed(points) -> str:
    points = list(points)
    return ", ".join(map(str, points[:_MAX_LISTED])) + (" ..." if len(points) > _MAX_LISTED else "")


# -- structure ------------------------------------------------------------------------------
def structural_findings(layers: dict, order: int) -> list:
    """``train-mode`` from the layer summary (``piecewise-linear`` waits for the numbers,
    see :func:`piecewise_finding`)."""
    if not layers.get("train_mode"):
        return []
    names = ", ".join(layers["train_mode"][:6])
    return [Finding(
        "train-mode", "warning",
        f"layers that behave differently in training are in training mode: {names}. Dropout "
        "makes derivatives random; batch statistics couple the points to each other. "
        "nbderiv does not change the mode for you.",
        "call model.eval() (torch) or the model with training=False (Keras) before "
        "differentiating.",
    )]


def structurally_piecewise(layers: dict) -> list:
    """The model's activation names if it has some and all are piecewise linear, else []."""
    acts = [a for a in layers.get("activations", []) if a != "linear"]
    return sorted(set(acts)) if acts and all(a in PIECEWISE_LINEAR for a in acts) else []


def stochastic_finding() -> Finding:
    return Finding(
        "train-mode", "warning",
        "two forward passes on the same input gave different outputs: the model is stochastic "
        "(dropout or similar in training mode), so its derivatives are random too.",
        "call model.eval() (torch) or pass training=False (Keras) before differentiating.",
    )


# -- piecewise linear -------------------------------------------------------------------------
def _piecewise(acts) -> Finding:
    source = (f"its nonlinearities ({', '.join(acts)}) are all piecewise linear"
              if acts else
              "every second derivative came out exactly 0 while the first derivative changes "
              "from point to point (e.g. torch.relu called inside forward)")
    return Finding(
        "piecewise-linear", "warning",
        f"the model is piecewise linear in its input: {source}. Its derivatives of order >= 2 are "
        "exactly zero almost everywhere; all the curvature sits in the kinks, where autodiff "
        "does not see it. A second derivative of 0 here is not a bug in autodiff.",
        f"{SMOOTH_SUGGESTION} (e.g. torch.nn.Tanh() / activation='tanh'), then retrain.",
    )


def _varies(d1: np.ndarray) -> bool:
    flat = d1.reshape(d1.shape[0], -1)
    flat = flat[np.isfinite(flat).all(axis=1)]
    return flat.shape[0] >= 2 and bool(np.ptp(flat, axis=0).max() > 0)


def piecewise_finding(layers: dict, orders: list, order: int, wider=None) -> Finding | None:
    """``piecewise-linear`` when order >= 2 and every second derivative is exactly 0, and
    either the structure says so (all activations piecewise linear) or the numbers do (the
    first derivative changes between points: not simply an affine map).

    ``wider()``, if given, returns (d1, d2) at a wider spread of points; it is asked only
    when the points themselves cannot tell (d1 constant on them, opaque model), and counts
    only if d2 is exactly 0 there too (a saturated tanh also has d2 == 0 at far-out points).
    """
    if order < 2 or len(orders) < 2:
        return None
    d1, d2 = orders[0], orders[1]
    if d2.size == 0 or d2.reshape(-1)[:4096].any() or d2.any():  # (NaN counts as non-zero)
        return None  # some curvature is seen: whatever the layers are called, not piecewise
    acts = structurally_piecewise(layers)
    if acts:
        return _piecewise(acts)
    if _varies(d1):
        return _piecewise([])
    if wider is not None and layers.get("opaque", True):
        try:
            wide_d1, wide_d2 = wider()
        except Exception:  # a probe is a nicety: a model that rejects it is not an error
            return None
        if np.all(wide_d2 == 0) and _varies(np.concatenate([d1, wide_d1])):
            return _piecewise([])
    return None


def wide_probe_points(args, n_points: int = WIDE_PROBE_POINTS, seed: int = 0) -> list:
    """Points spread over three times the range of ``args`` (deterministic), same dtypes."""
    rng = np.random.default_rng(seed)
    out = []
    for a in args:
        finite = np.where(np.isfinite(a), a, 0).astype(np.float64)
        centre = (finite.max(axis=0) + finite.min(axis=0)) / 2
        half = np.maximum(np.ptp(finite, axis=0) / 2, 1.0)
        u = rng.uniform(-3, 3, size=(n_points, a.shape[1]))
        out.append((centre + half * u).astype(a.dtype))
    return out


# -- kinks, coupling, dependence, non-finite values ---------------------------------------------
def kink_finding(points) -> Finding | None:
    """``at-kink`` at ``points``: candidates (a ReLU-type input exactly 0) where the output's
    one-sided slopes were found to differ (:func:`nbderiv.confirm.kinks_confirmed`)."""
    points = list(points)
    if not points:
        return None
    return Finding(
        "at-kink", "warning",
        f"{len(points)} point(s) sit exactly on a kink at index {_listed(points)}: a ReLU-type "
        "pre-activation is exactly 0 there, and the output's slopes just left and just right of "
        "the point differ (checked with one-sided finite differences). The derivative there is "
        "the framework's convention for the kink (e.g. relu'(0) = 0), not a true derivative: "
        "it does not exist there.",
        "move the points slightly off the kink (e.g. x + 1e-6), or use a smooth activation.",
        points=tuple(points),
    )


def coupling_finding(ones_error: float, diag: float, n_points: int | None = None) -> Finding:
    """``ones_error``: largest |sum of the cross-terms dy_n/dx_m, m != n| over the points
    (what the ones trick adds); ``diag``: largest |dy_n/dx_n|."""
    return Finding(
        "coupled-samples", "warning",
        "one point's output depends on other points' inputs (batch statistics, BatchNorm in "
        "training mode, attention across the batch). "
        f"{f'For this batch of {n_points} points the' if n_points else 'The'} cross-terms "
        f"dy_n/dx_m (m != n) add up to as much as "
        f"{ones_error:.3g} per point, next to per-point values up to {diag:.3g}: that is how "
        "far the grad_outputs=ones trick (column sums of the N x N Jacobian) would be off. "
        "nbderiv returned the true per-point blocks dy_n/dx_n with the other points held fixed "
        "(cost grows like N**2); the model's running statistics were put back.",
        "call model.eval() (or training=False) so each point is processed on its own, or "
        "remove the batch-coupling layers; nbderiv.full_jacobian(model, x) shows the cross-terms.",
    )


def non_finite_points(*arrays) -> list:
    """Indices n where any array has a NaN or inf in row n.

    Row sums find the suspects without a temporary as large as the arrays (a NaN or inf
    makes its row's sum non-finite); only suspect rows are looked at element by element
    (a sum can also overflow to inf from finite values)."""
    with np.errstate(over="ignore", invalid="ignore"):
        # the usual case: every sum finite, one pass over each array and nothing allocated
        doubtful = [a for a in arrays if a.size and not np.isfinite(a.sum())]
        if not doubtful:
            return []
        bad = np.zeros(arrays[0].shape[0], dtype=bool)
        for a in doubtful:
            rows = a.reshape(a.shape[0], -1)
            suspect = np.flatnonzero(~np.isfinite(rows.sum(axis=1)))
            if suspect.size:
                bad[suspect] |= ~np.isfinite(rows[suspect]).all(axis=1)
    return np.flatnonzero(bad).tolist()


def non_finite_finding(where: str, points) -> Finding | None:
    points = list(points)
    if not points:
        return None
    return Finding(
        "non-finite", "error",
        f"NaN or inf in {where} at point index {_listed(points)} ({len(points)} point(s)).",
        "check those inputs and the model's numerical range there, e.g. "
        "np.flatnonzero(~np.isfinite(x).all(axis=1)) lists the bad rows of x.",
        points=tuple(points),
    )


def no_dependence_finding(d1: np.ndarray, output_names, input_names) -> Finding | None:
    """``no-input-dependence`` when some output/input pair has zero derivative everywhere."""
    if d1.shape[0] == 0:
        return None
    if d1.all():  # no zero anywhere (the usual case, in one pass); NaN counts as non-zero
        return None
    zero = ~np.any(d1, axis=0)  # (d_out, m)
    if not zero.any():
        return None
    if zero.all():
        what = "the output does not depend on the input at any of these points"
    else:
        pairs = [f"{output_names[j]}/{input_names[i]}" for j, i in zip(*np.nonzero(zero), strict=True)]
        what = ("these output/input pairs have zero derivative at every point: "
                + ", ".join(pairs[:_MAX_LISTED]) + (" ..." if len(pairs) > _MAX_LISTED else ""))
    return Finding(
        "no-input-dependence", "info",
        f"{what}. nbderiv reports zeros there (plain autodiff may give None or raise).",
        "if a dependence is expected, check that forward really uses that input (and that the "
        "points are not all in a dead ReLU region or where tanh/sigmoid units saturate).",
    )


GRAPH_CAUSES = ("a tensor taken out of the graph: .detach(), .data, .numpy() or a NumPy "
                "function (np.sin, np.exp) applied to a tensor, .item(), a cast to an integer "
                "type, code under torch.no_grad(), or tf.stop_gradient")


def graph_broken_finding(pairs, moved_points, disagree_points, slope) -> Finding:
    """``graph-broken``: autodiff says 0 for ``pairs`` ("y/x" names) while the forward pass
    changes with that input at ``moved_points``, and/or autodiff disagrees with central
    differences of the forward pass at ``disagree_points``."""
    parts = []
    if pairs:
        parts.append(
            f"autodiff says {', '.join(pairs[:_MAX_LISTED])} {'is' if len(pairs) == 1 else 'are'} "
            f"0 at every point, yet the forward pass itself changes with that input (central "
            f"differences of the model's output give slopes up to {slope:.3g})")
    if disagree_points:
        parts.append(
            "autodiff disagrees with central differences of the model's own output at point(s) "
            f"{_listed(disagree_points)} (the differences agree at two step sizes, so no kink "
            "explains it)")
    points = sorted(set(moved_points) | set(disagree_points))
    return Finding(
        "graph-broken", "warning",
        "; ".join(parts) + ". Part of the computation is cut out of the autodiff graph, so the "
        "derivatives nbderiv (and plain autodiff) returns are wrong: the output does depend on x.",
        f"look in forward for {GRAPH_CAUSES}; compute everything with framework operations "
        "(torch.sin / tf.sin, no NumPy round trip) and keep gradients enabled.",
        points=tuple(points),
    )


def saturated_finding(outputs, ratio: float) -> Finding:
    """``saturated``: max |dy/dx| * (size of x) / (size of y) is below SATURATED_BELOW."""
    return Finding(
        "saturated", "warning",
        f"the input gradients vanish: over these points, |dy/dx| times the size of x is at most "
        f"{ratio:.2g} of the size of y ({', '.join(outputs[:_MAX_LISTED])}), and finite "
        "differences of the output agree. Typically tanh/sigmoid units are saturated (their "
        "inputs far beyond about +-5, e.g. raw inputs in the hundreds), so every derivative is "
        "almost 0 and training barely moves the model.",
        "scale the inputs (standardise x to mean 0 and std 1, or a Rescaling/normalisation "
        "layer), and check the activations and the weight initialisation.",
    )


def low_precision_finding(errors: dict, dtype, orders=None) -> Finding:
    """``errors[k] = (max_abs, max_rel)`` of the ``dtype`` results against float64."""
    orders = sorted(errors) if orders is None else sorted(orders)
    worst = max(orders, key=lambda k: errors[k][1])
    name = np.dtype(dtype).name
    return Finding(
        "low-precision", "warning",
        f"in {name} the order-{worst} derivatives differ from float64 central differences by "
        f"up to {errors[worst][0]:.3g} (relative {errors[worst][1]:.3g}), beyond what {name} "
        "rounding should allow, while float64 autodiff agrees with them: digits are lost to "
        f"cancellation in {name}.",
        "compute in float64: nbderiv.derivatives(model.double(), x.double(), ...) on a copy "
        "(copy.deepcopy(model).double()) in torch, or keras.config.set_floatx('float64') "
        "before building the Keras model.",
    )


# -- everything that needs the computed derivatives ---------------------------------------------
def result_findings(call, layers, y, ders, order, wrt, earlier) -> list:
    """The findings that need the results: ``piecewise-linear``, ``at-kink``,
    ``graph-broken``, ``no-input-dependence``, ``saturated`` and ``non-finite`` (outputs).
    ``call`` is the :class:`~nbderiv.call.Call`; ``ders`` belong to its first rows."""
    backend, args = call.backend, call.args
    out = []
    codes = {f.code for f in earlier}
    if "piecewise-linear" not in codes:
        def wider():
            wide = wide_probe_points(args)
            orders = backend.derivatives(call.with_args(wide), wide, 2, wrt).orders
            return orders[0], orders[1]
        f = piecewise_finding(layers, ders, order, wider)
        if f is not None:
            out.append(f)
    if call.kink_rows is not None:  # looked for during the derivative pass
        candidates = call.kink_rows
    elif call.known is not None and call.known.kink_free:
        # an earlier call saw this model state call no ReLU-type function
        candidates = []
    else:
        candidates = call.kink_rows = backend.kink_points(call, args)
    f = kink_finding(confirm.kinks_confirmed(call, candidates, wrt) if candidates else [])
    if f is not None:
        out.append(f)
    out_names = ["y"] if y.shape[1] == 1 else [f"y[{j}]" for j in range(y.shape[1])]
    in_names = [call.names[i] for i in wrt]
    bad_first = set(non_finite_points(y, ders[0]))  # rows of y or d1 with a NaN or inf
    out += _dependence_findings(call, layers, y, ders[0], wrt, out_names, in_names,
                                skip=candidates, bad_rows=bad_first)
    bad_x = set(non_finite_points(*args) if call.non_finite_x is None else call.non_finite_x)
    bad_all = bad_first.union(non_finite_points(*ders[1:])) if len(ders) > 1 else bad_first
    bad = [n for n in sorted(bad_all) if n not in bad_x]
    f = non_finite_finding("the model's output or its derivatives (where x is finite)", bad)
    if f is not None:
        out.append(f)
    return out


def _zero_pairs(d1: np.ndarray) -> np.ndarray:
    """(d_out, m): True where the derivative is exactly 0 at every point (NaN is not 0)."""
    if d1.shape[0] == 0 or d1.all():
        return np.zeros(d1.shape[1:], dtype=bool)
    return ~np.any(d1, axis=0)


def _dependence_findings(call, layers, y, d1, wrt, out_names, in_names, skip,
                         bad_rows=None) -> list:
    """``graph-broken`` (confirmed with central differences of the forward pass), then
    ``no-input-dependence`` for the zero pairs the forward pass confirms, then
    ``saturated``."""
    zero = _zero_pairs(d1)
    verdict = call.verdict
    if verdict is not None and verdict.stochastic:  # random outputs: no differences to trust
        f = no_dependence_finding(d1, out_names, in_names)
        return [f] if f is not None else []
    zero_inputs = [int(i) for i in np.flatnonzero(zero.any(axis=0))]
    if verdict is not None and verdict.structural:
        # a plain stack of the framework's own layers: its graph cannot be cut, and autodiff
        # needs no confirmation by finite differences
        check = {"moves": {}, "disagree": [], "checked": [], "fd_max": TRUSTED, "noise": 0.0}
    else:
        # an earlier call on this very model state, at these very points, confirmed
        # autodiff (its differences' slopes stand for saturation): no need to look again
        pts = confirm.graph_points(call, d1, skip)
        seen = (tuple(wrt), tuple(pts), call.features()[pts].tobytes())
        if not zero_inputs and seen in call.facts.graph_agrees:
            fd_max, noise = call.facts.graph_agrees[seen]
            check = {"moves": {}, "disagree": [], "checked": [], "fd_max": fd_max,
                     "noise": noise}
        else:
            check = confirm.graph_consistency(call, d1, wrt, zero_inputs, skip=set(skip))
            if check["checked"] and check["fd_max"] is not None and not check["moves"] \
                    and not check["disagree"]:
                agrees = call.facts.graph_agrees
                agrees[seen] = (check["fd_max"], check["noise"])
                while len(agrees) > 16:  # a loop over many batches: keep the latest
                    del agrees[next(iter(agrees))]
    broken = np.zeros_like(zero)
    moved, slope = [], 0.0
    for i, (points, outputs, top) in check["moves"].items():
        broken[:, i] = zero[:, i] & outputs
        moved += points
        slope = max(slope, float(top))
    disagree = check["disagree"]
    if len(disagree) < min(2, len(check["checked"])):
        disagree = []
    out = []
    if broken.any() or disagree:
        pairs = [f"d{out_names[j]}/d{in_names[i]}" for j, i in zip(*np.nonzero(broken),
                                                                     strict=True)]
        out.append(graph_broken_finding(pairs, moved, disagree, slope))
    remaining = np.where(zero & ~broken, 0.0, 1.0)[None]  # the zero pairs nothing contradicts
    f = no_dependence_finding(remaining, out_names, in_names) if (zero & ~broken).any() else None
    if f is not None:
        out.append(f)
    if not out:
        f = _saturation(call, layers, y, d1, wrt, out_names, check, bad_rows)
        if f is not None:
            out.append(f)
    return out


TRUSTED = "trusted"  # check["fd_max"] of a model whose autodiff needs no confirmation


def _size(y: np.ndarray) -> np.ndarray:
    """max |y| + the range of y, per output (column), without a temporary as large as y."""
    y = y.reshape(y.shape[0], -1)
    top, low = y.max(axis=0).astype(np.float64), y.min(axis=0).astype(np.float64)
    return np.maximum(top, -low) + (top - low)


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
    x = x[finite]
    x_top, x_low = x.max(axis=0).astype(np.float64), x.min(axis=0).astype(np.float64)
    x_size = np.maximum(x_top - x_low, np.maximum(x_top, -x_low))     # range or max |x|
    x_size = np.where(x_size > 0, x_size, 1.0)                         # (m,)
    y_size = _size(y[finite] if bad else y)                            # (d_out,)
    change = _scaled_max(d1[finite] if bad else d1, x_size)            # (d_out,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = change / y_size
    # the differences' slopes are per unit of a step scaled by 1 + |x|
    fd_ok = True if check["fd_max"] is TRUSTED else \
        check["fd_max"] <= 10 * SATURATED_BELOW * y_size * (1 + x_size.max()) + 8 * check["noise"]
    low = (change > 0) & (y_size > 0) & (ratio < SATURATED_BELOW) & fd_ok
    if not low.any():
        return None
    return saturated_finding([out_names[j] for j in np.flatnonzero(low)],
                             float(ratio[low].max()))
