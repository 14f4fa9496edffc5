"""Findings: the classic derivative pitfalls, recognised and explained.

The codes are a stable contract (see the README): ``piecewise-linear``, ``at-kink``,
``coupled-samples``, ``train-mode``, ``graph-broken``, ``no-input-dependence``,
``piecewise-constant``, ``saturated``, ``input-reshaped``, ``integer-input``, ``input-rounded``, ``low-precision``,
``non-finite``. Findings that can be
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

import re

import numpy as np

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
def structural_findings(layers: dict, order: int, inert: bool = False) -> list:
    """``train-mode`` and ``low-precision`` (layers computing in float16 / bfloat16) from the
    layer summary (``piecewise-linear`` waits for the numbers, see
    :func:`piecewise_finding`). ``inert``: the probe saw neither randomness nor coupled
    points, so training-mode layers whose only effects are those (dropout, noise, RReLU,
    BatchNorm) did nothing here (defined but not called in forward): not listed."""
    half = layers.get("half_compute") or []
    out = [] if not half else [half_compute_finding(half)]
    if not layers.get("train_mode"):
        return out
    if inert:
        active = [name for name in layers["train_mode"] if not _RANDOM_OR_BATCH.search(name)]
        if not active:
            return out
        if len(active) < len(layers["train_mode"]):
            layers = {**layers, "train_mode": active}
    return out + _train_mode_findings(layers)


# training-mode layers whose only effects are randomness or batch statistics
_RANDOM_OR_BATCH = re.compile(r"ropout|Noise|RReLU|BatchNorm")


def half_compute_finding(layers) -> Finding:
    """``low-precision``: layers whose dtype policy computes in float16 or bfloat16."""
    return Finding(
        "low-precision", "warning",
        f"layers compute in half precision: {', '.join(layers[:6])}"
        f"{' ...' if len(layers) > 6 else ''} (a Keras mixed-precision dtype policy: float32 "
        "variables, float16 / bfloat16 arithmetic). The derivatives carry that rounding, about "
        "1e-2 relative for bfloat16 and 1e-3 for float16, though nbderiv returns them as "
        "float32 arrays; second derivatives are worse.",
        "differentiate a copy built with the float32 policy (keras.config.set_dtype_policy("
        "'float32') before building it, then copy the weights: copy.set_weights("
        "model.get_weights())), or build the model with dtype='float32'.",
    )


def _train_effects(layers) -> str:
    """What training mode does, for the kinds of layer listed (names like 'drop (Dropout)')."""
    text = " ".join(layers)
    effects = []
    if "ropout" in text or "RReLU" in text or "Noise" in text:
        effects.append("Dropout (and random noise) makes derivatives random")
    if "BatchNorm" in text:
        effects.append("batch statistics couple the points to each other")
    if "InstanceNorm" in text:
        effects.append("an InstanceNorm with running statistics normalizes each point with its "
                       "own statistics in training and with the running ones in eval (another "
                       "function, no coupling)")
    if not effects:
        effects = ["Dropout makes derivatives random", "batch statistics couple the points to "
                   "each other"]
    return "; ".join(effects) + "."


def _train_mode_findings(layers: dict) -> list:
    names = ", ".join(layers["train_mode"][:6])
    effects = _train_effects(layers["train_mode"])
    effects = effects[0].upper() + effects[1:]
    outside = layers.get("outside_tree")
    if outside:  # kept in a plain list or dict: model.eval() never reaches them
        kept_in = ", ".join(outside[:6])
        return [Finding(
            "train-mode", "warning",
            f"layers that behave differently in training are in training mode: {names}. "
            f"{kept_in} {'is' if len(outside) == 1 else 'are'} kept in a plain Python list, "
            "dict, object or function, outside the model's module tree, so model.eval(), "
            f"model.parameters() and model.to() do not reach {'it' if len(outside) == 1 else 'them'}. "
            f"{effects}",
            "keep the layers in torch.nn.ModuleList / torch.nn.ModuleDict (or set each as an "
            "attribute of the model), then call model.eval(); or call .eval() on each of them.",
        )]
    return [Finding(
        "train-mode", "warning",
        f"layers that behave differently in training are in training mode: {names}. "
        f"{effects} nbderiv does not change the mode for you.",
        "call model.eval() (torch) or the model with training=False (Keras) before "
        "differentiating.",
    )]


def structurally_piecewise(layers: dict) -> list:
    """The model's activation names if it has some and all are piecewise linear, else []."""
    acts = [a for a in layers.get("activations", []) if a != "linear"]
    return sorted(set(acts)) if acts and all(a in PIECEWISE_LINEAR for a in acts) else []


def stochastic_finding(keras: bool = False) -> Finding:
    """Two forward passes differed and no layer in training mode explains it (``keras``: the
    words of a Keras model, whose layers run in training mode only when called so)."""
    if keras:
        return Finding(
            "train-mode", "warning",
            "two forward passes on the same input gave different outputs: the model is "
            "stochastic, it draws random numbers in its call (a Dropout or noise layer called with training=True, "
            "Monte Carlo dropout, keras.random or tf.random without a seed). Where the noise "
            "is only added to the output, the derivatives are not affected; where it "
            "multiplies or feeds later layers, they are random too. nbderiv's checks that "
            "compare outputs are off for this model.",
            "call those layers without training=True while you differentiate (a flag of your "
            "own in call), or seed them (keras.utils.set_random_seed) before each call.",
        )
    return Finding(
        "train-mode", "warning",
        "two forward passes on the same input gave different outputs, and no layer in training "
        "mode explains it: the model is stochastic, it draws random numbers itself "
        "(torch.randn or F.dropout(x, training=True) in forward, a noise layer). Where the "
        "noise is only added to the output, the derivatives are not affected; where it "
        "multiplies or feeds later layers, they are random too. nbderiv's checks that compare "
        "outputs are off for this model.",
        "make forward deterministic while you differentiate: switch the noise off (a flag, or "
        "self.training checks with model.eval()), or seed it (torch.manual_seed) before each "
        "call.",
    )


def self_updating_finding() -> Finding:
    """Two forward passes differed only because forward updates the model's own state."""
    return Finding(
        "train-mode", "warning",
        "two forward passes on the same input gave different outputs, yet no random numbers "
        "are involved: with the model's state put back before each pass they agree. Its "
        "forward pass updates the model's own state each time it runs (a buffer written in "
        "forward: a running statistic, the power iteration of spectral_norm in training "
        "mode, a counter), usually only in training mode. nbderiv ran its passes from the "
        "state before the call and put it back afterwards; the derivatives are those of one "
        "pass from that state, and the next training step sees another function.",
        "if the updates happen in training mode only (self.training), differentiate in eval "
        "mode: model.eval() (model.train() afterwards to keep training).",
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


def piecewise_finding(layers: dict, orders: list, order: int, wider=None,
                      curved=None, wider_only=False) -> Finding | None:
    """``piecewise-linear`` when order >= 2 and every second derivative is exactly 0, and
    either the structure says so (all activations piecewise linear) or the numbers do: the
    first derivative changes between points (not simply an affine map), the second is
    exactly 0 at a wider spread of points too (``wider()`` returns their (d1, d2): an
    inflection point, a polynomial piece or saturated units are flat at the points given
    only), and the forward pass does not curve at the points (``curved()`` returns the
    points where its second differences are not 0: then autodiff's 0 is wrong, a backward
    pass that cannot be differentiated again, and the finding is ``graph-broken``; None for a
    model known to be smooth, GELU or tanh units flat far out: no finding). ``wider_only``:
    only the wider points' d1 counts (they move along the differentiated inputs alone; the
    given points' d1 may change with the others: x0 * x1 in x0).
    """
    if order < 2 or len(orders) < 2:
        return None
    d1, d2 = orders[0], orders[1]
    if d2.size == 0 or d2.reshape(-1)[:4096].any() or d2.any():  # (NaN counts as non-zero)
        return None  # some curvature is seen: whatever the layers are called, not piecewise
    acts = structurally_piecewise(layers)
    if acts:
        return _piecewise(acts)
    if wider is None:
        return None
    try:
        wide_d1, wide_d2 = wider()
    except Exception:  # a probe is a nicety: a model that rejects it is not an error
        return None
    seen = wide_d1 if wider_only else np.concatenate([d1, wide_d1])
    if not (np.all(wide_d2 == 0) and _varies(seen)):
        return None
    bent = curved() if curved is not None else []
    if bent is None:  # the model is known to be smooth: flat here, not piecewise linear
        return None
    if bent:
        return second_order_cut_finding(bent)
    return _piecewise([])


def second_order_cut_finding(points) -> Finding:
    """``graph-broken`` for derivatives of order >= 2: autodiff's second derivative is exactly
    0 at every point while the forward pass curves at ``points``."""
    return Finding(
        "graph-broken", "warning",
        "autodiff's second derivative is exactly 0 at every point, yet the forward pass curves: "
        f"its central second differences are not 0 at index {_listed(points)} (the same at two "
        "steps, well above rounding). The first derivative is fine, but the backward pass of "
        "some operation cannot be differentiated again: a custom torch.autograd.Function whose "
        "backward uses NumPy, .detach() or @once_differentiable, or a tf.custom_gradient whose "
        "gradient function stops the gradient. The derivatives of order >= 2 are wrong.",
        "write that backward with differentiable framework operations (torch / tf functions of "
        "the saved inputs, no NumPy, no detach), or use the built-in function (torch.sin, "
        "tf.sin) instead of the custom one.",
        points=tuple(points),
    )


_ORDINALS = {1: "first", 2: "second", 3: "third"}


def partial_second_order_cut_finding(points, rel_error: float, order: int = 2) -> Finding:
    """``graph-broken`` for a derivative of ``order`` >= 2 that is partly cut: autodiff's
    d[order] disagrees with central differences of its own d[order - 1] at ``points`` (by up
    to ``rel_error`` of its largest value) at every small step tried, while the lower orders
    agree."""
    name, lower = _ORDINALS.get(order, f"order-{order}"), _ORDINALS.get(order - 1, "lower")
    return Finding(
        "graph-broken", "warning",
        f"autodiff's {name} derivative disagrees with central differences of its own {lower} "
        f"derivative at index {_listed(points)}: off by up to {rel_error:.0%} of its largest "
        f"value, at every small step tried (float64), while the {lower} derivative "
        f"{'agrees with the forward pass' if order == 2 else 'and those below it agree'}. "
        f"Part of the backward pass cannot be differentiated again, so part of the {name} "
        "derivative is missing: a custom torch.autograd.Function whose backward uses "
        ".detach(), NumPy or @once_differentiable on one branch of the model (or inside the "
        "backward of another custom Function), or a tf.custom_gradient whose gradient function "
        f"stops the gradient. The derivatives of order >= {order} are wrong.",
        "write that backward with differentiable framework operations (torch / tf functions of "
        "the saved inputs, no NumPy, no detach), or use the built-in function (torch.sin, "
        "tf.sin) instead of the custom one; check=True shows the differences.",
        points=tuple(points),
    )


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
def kink_finding(points, conventions=()) -> Finding | None:
    """``at-kink`` at ``points``: candidates (an input of a piecewise function exactly at its
    kink) where the output's one-sided slopes were found to differ
    (:func:`nbderiv.confirm.kinks_confirmed`); and at ``conventions``: candidates where the
    output is smooth (kinks that cancel) but autodiff's convention at the kinks gives another
    slope than the output's."""
    points, conventions = list(points), list(conventions)
    if not points and not conventions:
        return None
    parts = []
    if points:
        parts.append(
            f"{len(points)} point(s) sit exactly on a kink at index {_listed(points)}: an input "
            "of a piecewise function (ReLU, clamp, max / min, abs, hardtanh, ...) is exactly at "
            "its kink there (a ReLU's pre-activation exactly 0, or two equal largest values of a "
            "max over axes or a max-pooling window, or a vector norm's input all 0), and the "
            "output's slopes just "
            "left and just right of the point differ (checked with one-sided finite "
            "differences). The derivative there is the framework's convention for the kink "
            "(e.g. relu'(0) = 0), not a true derivative: it does not exist there.")
    if conventions:
        parts.append(
            f"{'At' if not points else 'And at'} {len(conventions)} point(s), index "
            f"{_listed(conventions)}, inputs of piecewise functions are exactly at their kinks "
            "while the output is smooth there (the kinks cancel, as in relu(z) - relu(-z) = z): "
            "the output's slope is the same on both sides, but autodiff applies its convention "
            "at each kink (relu'(0) = 0) and returns another value (checked with central "
            "differences). The derivative reported there is wrong.")
    return Finding(
        "at-kink", "warning", " ".join(parts),
        "move the points slightly off the kink (e.g. x + 1e-6), or use a smooth activation"
        + ("; where the kinks cancel, write the function without them (relu(z) - relu(-z) "
           "is z)." if conventions else "."),
        points=tuple(sorted(points + conventions)),
    )


def coupling_finding(ones_error: float, diag: float, n_points: int | None = None,
                     unseen: bool = False, outside: tuple = (), batch_stats: tuple = (),
                     train_mode: bool = True, seq_first: tuple = (),
                     keras: bool = False) -> Finding:
    """``ones_error``: largest |sum of the cross-terms dy_n/dx_m, m != n| over the points
    (what the ones trick adds); ``diag``: largest |dy_n/dx_n|. ``unseen``: autodiff sees none
    of the coupling and the forward pass could not be compared with it here. ``outside``: the
    layers in training mode that ``model.eval()`` does not reach (kept in a plain list).
    ``batch_stats``: batch norm layers without running statistics, which use the batch's
    statistics in eval mode too (``model.eval()`` cannot help there). ``train_mode``: some
    layer runs in training mode (else ``model.eval()`` is no fix: the forward pass mixes the
    points itself). ``seq_first``: attention layers built without ``batch_first=True``.
    ``keras``: a Keras model (called as ``model(x)``: a layer it forces into training mode
    runs so)."""
    unseen_note = (
        " Autodiff sees none of that coupling (its cross-terms add up to 0): either it is not "
        "active at these points, or it runs through a step autodiff cannot follow (.item(), "
        ".detach(), a NumPy round trip), and then the blocks miss it. nbderiv could not compare "
        "them with the model's own outputs here (too many points for that, or random outputs); "
        "a call on a few dozen points, without randomness, would.") if unseen else ""
    stats_note, stats_fix = _no_running_stats(batch_stats) if batch_stats else ("", None)
    seq_note, seq_fix = "", None
    if seq_first:
        names = ", ".join(seq_first[:6])
        seq_note = (f" {names} was built without batch_first=True: it reads axis 0 of its input "
                    "as the sequence, so given (N, T, D) points it runs (or attends) across the "
                    "points.")
        seq_fix = (f"build {names} with batch_first=True for (N, T, D) input (or pass it "
                   "(T, N, D), x.transpose(0, 1)); ")
    if seq_fix:
        remedy = seq_fix
    elif not train_mode:
        remedy = ("no layer runs in training mode: the forward pass mixes the points itself (a "
                  "reduction or softmax over axis 0, x.mean(0), attention across the batch); "
                  "compute each point from its own input (reduce over the point's own axes, "
                  "dim=1 and up); ")
    elif outside:
        remedy = ("call .eval() on " + ", ".join(outside[:6]) + ", kept in a plain list, "
                  "dict, object or function where model.eval() does not reach (better: keep them in "
                  "torch.nn.ModuleList), so each point is processed on its own, or remove the "
                  "batch-coupling layers; ")
    elif keras:
        remedy = ("call the model with training=False, model(x, training=False), so each "
                  "point is processed on its own; a layer forced into training mode inside the "
                  "model (BatchNormalization()(h, training=True), or call(self, x, "
                  "training=True)) uses the batch's statistics whenever it is called as "
                  "model(x): drop that training=True, or remove the batch-coupling layers; ")
    else:
        remedy = ("call model.eval() (or training=False) so each point is processed on its "
                  "own, or remove the batch-coupling layers; ")
    return Finding(
        "coupled-samples", "warning",
        "one point's output depends on other points' inputs (batch statistics, BatchNorm in "
        "training mode, attention across the batch). "
        f"{f'For this batch of {n_points} points the' if n_points else 'The'} cross-terms "
        f"dy_n/dx_m (m != n) add up to as much as "
        f"{ones_error:.3g} per point, next to per-point values up to {diag:.3g}: that is how "
        "far the grad_outputs=ones trick (column sums of the N x N Jacobian) would be off. "
        "nbderiv returned the true per-point blocks dy_n/dx_n with the other points held fixed "
        "(cost grows like N**2)"
        + ("; the model's running statistics were put back." if train_mode else ".")
        + stats_note + seq_note + unseen_note,
        stats_fix or (remedy + "nbderiv.full_jacobian(model, x) shows the cross-terms."),
    )


def batch_size_finding(n_points: int) -> Finding:
    """``coupled-samples`` for a model whose outputs follow the number of points in the batch
    (``x.shape[0]`` or ``len(x)`` in forward), not the other points' values: the probe saw
    the outputs change when one point was left out and not when others moved, and autodiff
    sees no cross-terms."""
    return Finding(
        "coupled-samples", "warning",
        "each point's output depends on how many points the batch holds, not on the other "
        "points' values: leaving one point out changed the others' outputs, moving points "
        "changed nothing, and autodiff sees no cross-terms dy_n/dx_m (m != n). The model uses "
        "the batch size (x.shape[0], len(x), a mean over the batch of something the same for "
        f"every point). These derivatives belong to this batch of {n_points} points: the same "
        "point in a batch of another size has other outputs and other derivatives (the "
        "grad_outputs=ones trick gives these same values, for this batch).",
        "compute each point's output without the batch size (divide by a constant; leave the "
        "average over the batch to the loss), or differentiate with the batch size the model "
        "is used with.")


def _no_running_stats(layers) -> tuple:
    """(note, fix) for batch norm layers built with ``track_running_stats=False``: they have
    no running statistics to switch to, so in eval mode too they use the batch's."""
    names, one = ", ".join(layers[:6]), len(layers) == 1
    return (f" {names} {'has' if one else 'have'} no running statistics "
            "(track_running_stats=False): in eval mode too "
            f"{'it normalizes' if one else 'they normalize'} with the statistics of the whole "
            "batch, so model.eval() does not help.",
            f"build {names} with track_running_stats=True and train the model (its running "
            "statistics are then used in eval mode), or use a norm of each point on its own "
            "(torch.nn.LayerNorm, torch.nn.GroupNorm); nbderiv.full_jacobian(model, x) shows "
            "the cross-terms.")


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


def non_finite_finding(where: str, points, derivatives_only: bool = False) -> Finding | None:
    """``non-finite`` at ``points``; ``derivatives_only``: the output is finite there, only its
    derivatives are not (an operation without a derivative at those points, or the branch a
    ``where`` did not take)."""
    points = list(points)
    if not points:
        return None
    if derivatives_only:
        return Finding(
            "non-finite", "error",
            f"NaN or inf in {where} at point index {_listed(points)} ({len(points)} "
            "point(s)). The output itself is finite there, only its derivatives are not: an "
            "operation has no finite derivative at those points (sqrt, log or a fractional "
            "power at 0), or a torch.where / tf.where picks a safe branch while the other one "
            "is NaN or inf there: autodiff differentiates both branches, and 0 x NaN is NaN; "
            "or an activation's own derivative formula overflows in float32 at large inputs "
            "(Mish or tanh-approximated GELU with inputs beyond about 20-90, at orders 2 and "
            "up), where the true values are about 0.",
            "find that operation; inside a where, make the branch not taken safe too, e.g. "
            "torch.where(z > 0, torch.sqrt(torch.where(z > 0, z, 1.0)), 0.0) instead of "
            "torch.where(z > 0, torch.sqrt(z), 0.0); for an overflowing activation, scale the "
            "inputs or compute in float64.",
            points=tuple(points),
        )
    return Finding(
        "non-finite", "error",
        f"NaN or inf in {where} at point index {_listed(points)} ({len(points)} point(s)).",
        "check those inputs and the model's numerical range there, e.g. "
        "np.flatnonzero(~np.isfinite(x).all(axis=1)) lists the bad rows of x.",
        points=tuple(points),
    )


def no_dependence_finding(d1: np.ndarray, output_names, input_names,
                          aside=(), farther=()) -> Finding | None:
    """``no-input-dependence`` when some output/input pair has zero derivative everywhere
    (``aside``: points on a kink, where autodiff's 0 is a convention, not a slope;
    ``farther``: the pairs, "y/x", whose output does change farther out from the points)."""
    if d1.shape[0] == 0:
        return None
    if d1.all():  # no zero anywhere (the usual case, in one pass); NaN counts as non-zero
        return None
    zero = ~np.any(d1, axis=0)  # (d_out, m)
    if not zero.any():
        return None
    if zero.all() and farther:
        what = "the derivative is exactly 0 at every one of these points: the output does not change near them"
    elif zero.all():
        what = "the output does not depend on the input at any of these points"
    else:
        pairs = [f"{output_names[j]}/{input_names[i]}" for j, i in zip(*np.nonzero(zero), strict=True)]
        what = ("these output/input pairs have zero derivative at every point: "
                + ", ".join(pairs[:_MAX_LISTED]) + (" ..." if len(pairs) > _MAX_LISTED else ""))
    if aside:
        what += (f" (at index {_listed(list(aside))}, on a kink, there is no derivative at "
                 "all: the 0 there is autodiff's convention)")
    if farther:
        what += (f". It does change farther out ({', '.join(farther[:_MAX_LISTED])}"
                 f"{' ...' if len(farther) > _MAX_LISTED else ''}): these points sit in a flat "
                 "region (an input clamped, ReLUs dead at all of them), the input is not unused")
    return Finding(
        "no-input-dependence", "info",
        f"{what}. nbderiv reports zeros there (plain autodiff may give None or raise).",
        "if a dependence is expected, check that forward really uses that input and does not "
        "round it or cast it to an integer on the way (a piecewise-constant function: its "
        "derivative is 0 wherever it exists), and that the points are not all in a dead ReLU "
        "region, where tanh/sigmoid units saturate, or where that input wins no max / max "
        "pooling (a max passes on only its largest input: one that wins at none of these "
        "points has slope 0 at all of them).",
    )


def flat_region_finding(outputs, counts, total, checked, pieces=(), cause="flat") -> Finding:
    """``flat-region``: the gradient of each of ``outputs`` is exactly 0 in every input at
    ``counts`` of ``total`` points (not all), and at the ``checked`` points the forward pass
    confirmed the output does not change when x moves a little. ``cause``: ``"flat"`` (a
    flat piece: a float64 copy's gradient is 0 too), ``"saturated"`` (slopes float32 rounds
    to 0: a float64 copy's are tiny), ``"saturated-float64"`` (tanh-like units saturated
    beyond float64 too), ``"either"`` (the evidence cannot tell). ``pieces``: the functions
    with flat pieces the model is known to use (``"clamp"``, ``"ReLU"``)."""
    said = ", ".join(f"{o} at {c} of {total} points" for o, c in zip(outputs, counts))
    known = f" (this model uses {', '.join(sorted(pieces))})" if pieces else ""
    deep = ("units saturated so deeply (tanh or sigmoid inputs far from 0) that their slopes "
            "round to exactly 0")
    why = {
        "flat": f"there the output sits on a flat piece of a function such as clamp, ReLU or "
                f"hardtanh{known}: a float64 copy's gradient is exactly 0 there too",
        "saturated": f"there the slopes are too small for float32: {deep} in float32 (a "
                     "float64 copy's gradient is tiny there, not 0, at least at some of them)",
        "saturated-float64": f"there {deep}, even in float64",
        "either": f"there the output sits on a flat piece of a function such as clamp, ReLU "
                  f"or hardtanh{known}, or in {deep}",
    }[cause]
    scale = "scale the inputs (and check the weights) so that the activations' inputs stay near 0"
    fix = (scale + "." if cause.startswith("saturated") else
           "if the flat piece bounds the output (a clamp, a ReLU at the end for a positive "
           "output), use a smooth bound instead: softplus(z) for a positive output, lo + "
           "(hi - lo) * sigmoid(z) for an interval; if hidden ReLUs are dead at these points, "
           "a smooth activation (tanh, SiLU, GELU) or a leaky one keeps a gradient"
           + (f"; if units saturate, {scale}." if cause == "either" else "."))
    return Finding(
        "flat-region", "warning",
        f"the gradient of {said} is exactly 0 in every input: {why}. At index "
        f"{_listed(checked)} the forward pass confirms that the output does not change when x "
        "moves a little along each input. Terms built from derivatives with respect to x (a "
        "PDE residual's u_x and u_xx, a gradient penalty) are exactly 0 at these points"
        + (", and where the flat piece is at the output (a clamp, a ReLU at the end) a loss on "
           "y itself gets no gradient from them either." if cause in ("flat", "either")
           else "."),
        fix, points=tuple(checked),
    )


GRAPH_CAUSES = ("a tensor taken out of the graph: .detach(), .data, .numpy() or a NumPy "
                "function (np.sin, np.exp) applied to a tensor, .item(), a cast to an integer "
                "type, code under torch.no_grad(), or tf.stop_gradient")


def piecewise_constant_finding(pairs) -> Finding:
    """``piecewise-constant``: autodiff says 0 for ``pairs`` ("dy/dx" names), small steps
    change nothing, and a wider sweep finds the output changing in isolated jumps only."""
    return Finding(
        "piecewise-constant", "warning",
        f"{', '.join(pairs[:_MAX_LISTED])} {'is' if len(pairs) == 1 else 'are'} 0 at every "
        "point, yet the output does change with that input, in jumps only (a sweep of the "
        "input finds it flat between jumps): the model rounds on the way (round, floor, a "
        "cast to an integer type, argmax, a comparison). Its derivative is 0 wherever it "
        "exists, so autodiff's zeros are right, and they say nothing about how the output "
        "responds to the input.",
        "differentiate before the rounding, or replace it with a smooth stand-in while you "
        "differentiate (x itself instead of round(x), softmax instead of argmax, a sigmoid "
        "instead of a step).",
    )


def graph_broken_finding(pairs, moved_points, disagree_points, slope,
                         hidden_coupling=False) -> Finding:
    """``graph-broken``: autodiff says 0 for ``pairs`` ("y/x" names) while the forward pass
    changes with that input at ``moved_points``, and/or autodiff disagrees with central
    differences of the forward pass at ``disagree_points``, and/or (``hidden_coupling``) the
    forward pass makes points depend on each other where autodiff sees no such dependence."""
    parts = []
    if hidden_coupling:
        parts.append(
            "the forward pass makes points depend on each other (moving one point changed "
            "other points' outputs), yet autodiff sees no such dependence (its cross-terms "
            "dy_n/dx_m add up to 0): the coupling goes through a step autodiff cannot follow, as "
            ".item(), float(...), .detach() or a NumPy round trip (e.g. x / x.abs().max()"
            ".item()), so each point's derivative misses the part that runs through the "
            "other points' values, wherever that part is not 0")
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
    if disagree_points and not pairs and not hidden_coupling:
        # autodiff gives slopes, the wrong ones: a cut, or a gradient written by hand
        cause = ("Part of the computation is cut out of the autodiff graph, or a gradient "
                 "written by hand (a custom torch.autograd.Function's backward, a "
                 "tf.custom_gradient) returns the wrong derivative, so the derivatives nbderiv "
                 "(and plain autodiff) returns are wrong.")
        fix = (f"look in forward for {GRAPH_CAUSES}; check any custom backward against "
               "finite differences (torch.autograd.gradcheck on float64 inputs, or "
               "nbderiv.derivatives(f, x, check=True)); compute everything with framework "
               "operations and keep gradients enabled.")
    else:
        cause = ("Part of the computation is cut out of the autodiff graph, so the derivatives "
                 "nbderiv (and plain autodiff) returns are wrong: the output does depend on x.")
        fix = (f"look in forward for {GRAPH_CAUSES}; compute everything with framework "
               "operations (torch.sin / tf.sin, no NumPy round trip) and keep gradients "
               "enabled.")
    return Finding("graph-broken", "warning", "; ".join(parts) + ". " + cause, fix,
                   points=tuple(points))


def saturated_finding(outputs, ratio: float, reach: float | None = None,
                      rounded: str | None = None, exact: bool = False) -> Finding:
    """``saturated``: max |dy/dx| * (size of x) is below SATURATED_BELOW of the size of y and of
    how much y changes when x moves far away (``reach``, the smallest over the outputs).
    ``rounded``: the dtype in which the derivatives round to exactly 0 (``exact``: in float64
    too, or no float64 copy to ask)."""
    farther = "" if reach is None else (
        f" Farther out y does change (by {reach:.3g} or more when x moves about 10-100 times "
        "its size): the model is flat here, not everywhere.")
    names = ", ".join(outputs[:_MAX_LISTED])
    if exact:
        where = f" (in {rounded} too)" if rounded else ""
        start = (f"the input gradients vanish: over these points dy/dx is exactly 0{where} for "
                 f"{names}, yet the output depends on x.")
    else:
        start = (f"the input gradients vanish: over these points, |dy/dx| times the size of x is "
                 f"at most {ratio:.2g} of the size of y ({names}), and finite differences of the "
                 "output agree.")
        if rounded:
            start += (f" In {rounded} these derivatives round to exactly 0 (a float64 copy of "
                      "the model gives the tiny slopes): the output does depend on x, too "
                      f"weakly for {rounded}.")
    return Finding(
        "saturated", "warning",
        f"{start}{farther} Typically tanh/sigmoid units are saturated "
        "(their inputs far beyond about +-5, e.g. raw inputs in the hundreds), so every "
        "derivative is almost 0 and training barely moves the model.",
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
        "(copy.deepcopy(model).double()) in torch; in Keras, keras.config.set_floatx('float64') "
        "and keras.config.set_dtype_policy('float64') both, before building the model (once "
        "Keras has been used, set_floatx alone leaves the layers in float32 and "
        "set_dtype_policy alone the Inputs), or keras.Input(shape, dtype='float64') with "
        "set_dtype_policy('float64').",
    )
