"""Findings: the classic derivative pitfalls, recognised and explained.

The codes are a stable contract (see the README): ``piecewise-linear``, ``at-kink``,
``coupled-samples``, ``train-mode``, ``no-input-dependence``, ``input-reshaped``,
``integer-input``, ``low-precision``, ``non-finite``.

>>> import torch, nbderiv
>>> relu_net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> [f.code for f in nbderiv.diagnose(relu_net, torch.linspace(-1, 1, 5))]
['input-reshaped', 'piecewise-linear']
"""

from __future__ import annotations

import numpy as np

from .result import Finding

PIECEWISE_LINEAR = {
    # torch modules
    "ReLU", "LeakyReLU", "ReLU6", "PReLU", "RReLU", "Hardtanh", "Threshold",
    # keras activation names
    "relu", "leaky_relu", "relu6", "hard_tanh", "LeakyReLU", "PReLU", "linear",
}
SMOOTH_SUGGESTION = "use a smooth activation such as tanh, softplus, SiLU or GELU"
PROBE_POINTS = 8


def structural_findings(layers: dict, order: int) -> list:
    """``train-mode`` and the structural half of ``piecewise-linear``."""
    findings = []
    if layers["train_mode"]:
        names = ", ".join(layers["train_mode"][:6])
        findings.append(Finding(
            "train-mode", "warning",
            f"layers that behave differently in training are in training mode: {names}. Dropout "
            "makes derivatives random; batch statistics couple the points to each other. "
            "nbderiv does not change the mode for you.",
            "call model.eval() (torch) or the model with training=False (Keras) before "
            "differentiating.",
        ))
    acts = [a for a in layers["activations"] if a != "linear"]
    if order >= 2 and acts and all(a in PIECEWISE_LINEAR for a in acts):
        findings.append(_piecewise_finding(sorted(set(acts)), from_structure=True))
    return findings


def _piecewise_finding(acts, from_structure: bool) -> Finding:
    source = (f"its nonlinearities ({', '.join(acts)}) are all piecewise linear"
              if from_structure else
              "every second derivative came out exactly 0 while the first derivative varies "
              "from point to point (a piecewise-linear function, e.g. torch.relu in forward)")
    return Finding(
        "piecewise-linear", "warning",
        f"the model is piecewise linear in its input: {source}. Its derivatives of order >= 2 are "
        "exactly zero almost everywhere; all the curvature sits in the kinks, where autodiff "
        "does not see it. A second derivative of 0 here is not a bug in autodiff.",
        f"{SMOOTH_SUGGESTION} (e.g. torch.nn.Tanh() / activation='tanh'), then retrain.",
    )


def numeric_piecewise(orders: list, layers: dict, order: int) -> Finding | None:
    """Confirm piecewise linearity from the numbers, for models whose structure is opaque."""
    if order < 2 or len(orders) < 2:
        return None
    d1, d2 = orders[0], orders[1]
    if not np.all(d2 == 0) or d1.shape[0] < 2:
        return None
    varies = np.ptp(d1.reshape(d1.shape[0], -1), axis=0).max() > 0
    if not varies:
        return None
    return _piecewise_finding([], from_structure=False)


def kink_finding(points) -> Finding | None:
    points = list(points)
    if not points:
        return None
    shown = ", ".join(map(str, points[:10])) + (" ..." if len(points) > 10 else "")
    return Finding(
        "at-kink", "warning",
        f"{len(points)} point(s) sit exactly on a kink (a ReLU-type pre-activation is exactly 0) "
        f"at index {shown}. The derivative there is the framework's convention for the kink "
        "(e.g. relu'(0) = 0), not a true derivative: it does not exist.",
        "move the points slightly off the kink, or use a smooth activation.",
        points=tuple(points),
    )


def coupling_finding(cross: float, diag: float) -> Finding:
    return Finding(
        "coupled-samples", "warning",
        "one point's output depends on other points' inputs (batch statistics, BatchNorm in "
        "training mode, attention across the batch). The grad_outputs=ones trick would return "
        f"column sums of the N x N Jacobian, off by up to {cross:.3g} on values of magnitude up to "
        f"{diag:.3g}. nbderiv returned the true per-point blocks dy_n/dx_n with the other points "
        "held fixed (cost grows like N**2).",
        "call model.eval() so each point is processed on its own, or remove batch-coupling layers.",
    )


def non_finite_finding(where: str, points) -> Finding | None:
    points = list(points)
    if not points:
        return None
    shown = ", ".join(map(str, points[:10])) + (" ..." if len(points) > 10 else "")
    return Finding(
        "non-finite", "error",
        f"NaN or inf in {where} at point index {shown} ({len(points)} point(s)).",
        "check those inputs (and the model's numerical range there), e.g. with "
        "np.isfinite(x).all(axis=1).",
        points=tuple(points),
    )


def non_finite_points(*arrays) -> list:
    bad = np.zeros(arrays[0].shape[0], dtype=bool)
    for a in arrays:
        bad |= ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    return np.flatnonzero(bad).tolist()


def no_dependence_finding(d1: np.ndarray, output_names, input_names) -> Finding | None:
    zero = np.all(d1 == 0, axis=0)  # (d_out, m)
    if not zero.any():
        return None
    if zero.all():
        what = "the output does not depend on the input at any of these points"
    else:
        pairs = [f"{output_names[j]}/{input_names[i]}" for j, i in zip(*np.nonzero(zero))]
        what = ("these output/input pairs have zero derivative at every point: "
                + ", ".join(pairs[:10]) + (" ..." if len(pairs) > 10 else ""))
    return Finding(
        "no-input-dependence", "info",
        f"{what}. nbderiv reports zeros (autodiff frameworks may give None there).",
        "if a dependence is expected, check that forward really uses that input (and that the "
        "points are not all in a dead ReLU region).",
    )


def low_precision_finding(errors: dict, dtype) -> Finding:
    worst = max(errors, key=lambda k: errors[k][1])
    return Finding(
        "low-precision", "warning",
        f"in {np.dtype(dtype).name} the order-{worst} derivatives differ from float64 finite "
        f"differences by up to {errors[worst][0]:.3g} (relative {errors[worst][1]:.3g}).",
        "compute in float64: model.double() and x.double() (torch), or "
        "keras.config.set_floatx('float64') before building the model (Keras).",
    )


def stochastic_finding() -> Finding:
    return Finding(
        "train-mode", "warning",
        "two forward passes on the same input gave different outputs: the model is stochastic "
        "(dropout or similar in training mode), so its derivatives are random too.",
        "call model.eval() (torch) or pass training=False (Keras) before differentiating.",
    )
