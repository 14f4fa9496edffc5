"""Why a gradient came back ``None``: the causes that fit the model and ``x``, best first.

:func:`none_causes` reads ``x`` (its framework, dtype, ``requires_grad``, leaf or not) and the
findings of nbderiv's own derivatives (``graph-broken``, ``no-input-dependence``), and gives
each cause a sentence and a fix line, for torch and TensorFlow.
"""

from __future__ import annotations

import numpy as np

from .explain_fix import _framework_of


def none_causes(model, x, truth, framework, xname="x", mname="model") -> list:
    """[(cause, sentence, fix line)] for a gradient that came back None, the one that fits
    this model and x first."""
    causes = []
    codes = truth.codes
    xf = _framework_of(x)
    dtype = getattr(x, "dtype", None)
    if dtype is None and not isinstance(x, tuple):
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError):
            dtype = ""
    dtype = str(dtype)
    integer = any(s in dtype for s in ("int", "bool")) and "float" not in dtype
    if integer:
        if framework == "tensorflow":
            causes.append(("integer-dtype",
                           f"{xname} has an integer dtype ({dtype}): a GradientTape does not "
                           "watch integer tensors (it only logs a warning), so tape.gradient "
                           "returns None.",
                           f"{xname} = tf.cast({xname}, tf.float32)      # then tape.watch("
                           f"{xname})"))
        else:
            causes.append(("integer-dtype",
                           f"{xname} has an integer dtype ({dtype}): only floating point "
                           "tensors can require gradients.",
                           f"{xname} = {xname}.float().requires_grad_(True)"))
    if "graph-broken" in codes:
        causes.append(("graph-cut-in-model",
                       f"{mname} cuts the graph inside its forward pass (finding graph-broken): "
                       "the output changes with the input, but autodiff sees no path.",
                       "# use framework operations throughout forward/call: no .detach(), "
                       ".numpy(), .item(), tf.stop_gradient"))
    if "no-input-dependence" in codes:
        d1 = truth.get(1)
        zero = [i for i in range(d1.shape[-1]) if not np.any(d1[..., i])]
        names = list(getattr(truth.d, "inputs", ()) or ())
        if zero and len(names) == d1.shape[-1]:
            on = " nor ".join(names[i] for i in zero)
            on += f" (input{'s' if len(zero) > 1 else ''} "
            on += f"{', '.join(str(int(truth.d.wrt[i])) for i in zero)} of {xname})"
        else:
            on = xname
        causes.append(("output-not-connected",
                       f"the output of {mname} does not depend on {on} at all (finding "
                       "no-input-dependence): the true derivative is 0, and autodiff reports "
                       "an unused input as None.",
                       "# torch: torch.autograd.grad(..., allow_unused=True, materialize_grads="
                       "True); TF: tape.gradient(y, x, unconnected_gradients='zero')"))
    if framework == "tensorflow":
        if xf is None:
            causes.append(("not-a-tensor",
                           f"{xname} is a {type(x).__name__}, not a tf.Tensor: a tape watches "
                           "tensors only (and model.predict / .numpy() inside the tape leave it "
                           "as well).",
                           f"{xname} = tf.convert_to_tensor({xname}, tf.float32)\n"
                           f"with tf.GradientTape() as tape:\n    tape.watch({xname})\n"
                           f"    y = {mname}({xname})"))
        elif "Variable" not in type(x).__name__ and not integer:
            causes.append(("not-watched",
                           f"{xname} is a constant tf.Tensor, which a GradientTape does not "
                           f"record unless told to: without tape.watch({xname}) the tape sees "
                           f"no path from {xname} to y (model.predict or .numpy() inside the "
                           "tape cut it the same way).",
                           f"with tf.GradientTape() as tape:\n    tape.watch({xname})      # "
                           f"before using {xname}\n    y = {mname}({xname})\n"
                           f"g = tape.gradient(y, {xname})"))
        elif not integer:
            causes.append(("computed-outside-tape",
                           f"{xname} is a tf.Variable, so the tape watches it: y was computed "
                           "outside the `with tf.GradientTape()` block, or through "
                           "model.predict / .numpy() / NumPy functions, which the tape does not "
                           "record.",
                           f"with tf.GradientTape() as tape:\n    y = {mname}({xname})      # "
                           "the model call inside the tape, no .numpy()/predict"))
    else:
        several = isinstance(x, (tuple, list)) and len(x) > 0 and all(
            _framework_of(v) == "torch" for v in x)  # a model of several inputs
        if xf is None and not integer and not several:
            causes.append(("not-a-tensor",
                           f"{xname} is a {type(x).__name__}, not a torch tensor: torch tracks "
                           "gradients only for tensors with requires_grad=True.",
                           f"{xname} = torch.tensor({xname}, dtype=torch.float32, "
                           "requires_grad=True)"))
        elif xf == "torch" and not integer:
            if not getattr(x, "requires_grad", False):
                causes.append(("no-requires-grad",
                               f"{xname}.requires_grad is False, so autograd never tracks "
                               f"{xname} and {xname}.grad stays None (backward() works when "
                               "the model's parameters require grad, but fills only theirs).",
                               f"{xname} = {xname}.detach().requires_grad_(True)      # before "
                               f"y = {mname}({xname})"))
            elif not getattr(x, "is_leaf", True):
                causes.append(("non-leaf",
                               f"{xname} is not a leaf tensor (it was made from another tensor "
                               "that requires grad, by arithmetic or .to(device)/.float()), and "
                               f"torch fills .grad only for leaves: {xname}.grad is None.",
                               f"{xname} = {xname}.detach().requires_grad_(True)      # a "
                               f"leaf; or {xname}.retain_grad() before backward()"))
            else:
                causes.append(("not-run",
                               f"{xname} requires grad and is a leaf, so {xname}.grad is None "
                               "only before backward() has run on an output of it (or after "
                               "zero_grad(set_to_none=True)), or for an output that does not "
                               f"use this very {xname} (a copy made with .detach() or "
                               "torch.tensor(...) was used instead).",
                               f"y = {mname}({xname}); y.sum().backward()      # then "
                               f"{xname}.grad"))
    if not causes:
        causes.append(("unknown", "no cause could be pinned down from the model and x alone.",
                       "# compute the gradient with the code below"))
    return causes
