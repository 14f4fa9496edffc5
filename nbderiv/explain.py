"""``nbderiv.explain``: what a student's own derivative array is, in plain words.

A student computed ``mine`` (a NumPy array, a torch tensor, a ``tf.Tensor``, a list, or
``None``) and believes it holds derivatives of ``model`` at ``x``. nbderiv computes the truth
itself with :func:`nbderiv.derivatives` (and, where needed, :func:`nbderiv.full_jacobian`) and
says which of these ``mine`` is (the codes are a contract, documented in ``docs/explain.md``):

``correct``, ``correct-reshaped``, ``axes-permuted``, ``summed-outputs``,
``cross-sample-jacobian``, ``coupled-samples``, ``wrong-order``, ``none``,
``zeros-graph-broken``, ``selected-outputs``, ``correct-part``, ``summed-inputs``, ``wrong``.

A code is raised only where the numbers support it: values are compared entry by entry with a
tolerance suited to the dtype (the looser of ``mine``'s and the truth's: float16, float32 or
float64), relative to the largest value of the array compared with, and ``correct`` is never
said of anything outside that tolerance.

This module knows nothing of Jupyter; the ``%%nnderiv explain`` cell magic
(:mod:`nbderiv.magic_explain`) calls it for every derivative-like variable a cell creates.

The work is split by job: :mod:`nbderiv.explain_match` (the truth and the comparison),
:mod:`nbderiv.explain_codes` (which code, with its words), :mod:`nbderiv.explain_fix` (the
suggested code) and :mod:`nbderiv.explain_causes` (why a gradient is ``None``).

>>> import torch, nbderiv
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
>>> x = torch.linspace(-1, 1, 20).reshape(-1, 1).requires_grad_(True)
>>> y = net(x)
>>> g, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))
>>> nbderiv.explain(g, net, x).code
'summed-outputs'
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .explain_codes import _Context
from .explain_fix import _framework_of
from .explain_match import _Truth

CODES = ("correct", "correct-reshaped", "summed-outputs", "cross-sample-jacobian",
         "axes-permuted", "wrong-order", "coupled-samples", "none", "zeros-graph-broken",
         "selected-outputs", "correct-part", "summed-inputs", "random-model", "wrong")


# -- the result -----------------------------------------------------------------------------------
@dataclass
class Explanation:
    """What ``mine`` is (``code``), in plain words (``message``), the corrected code in the
    student's framework (``fix``), the correct array in nbderiv's layout ``(N, d_out) +
    (n_inputs,) * order`` (``truth``) and the findings of the derivatives computed for it."""

    code: str
    message: str
    fix: str
    truth: np.ndarray | None = field(default=None, repr=False)
    findings: list = field(default_factory=list, repr=False)
    order: int | None = None
    name: str = "mine"
    framework: str | None = None

    def __repr__(self) -> str:
        lines = [f"[{self.code}] {self.message}"]
        if self.fix:
            lines.append("Fix:")
            lines += ["    " + line for line in self.fix.splitlines()]
        for f in self.findings:
            lines.append(f"finding [{f.code}] {f.message}")
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        from html import escape

        colour = {"correct": "#1a7f37", "correct-reshaped": "#1a7f37",
                  "correct-part": "#1a7f37"}.get(self.code, "#b35900")
        parts = [f'<div class="nbderiv-explain"><p><b style="color:{colour}">[{escape(self.code)}]'
                 f"</b> {escape(self.message)}</p>"]
        if self.fix:
            parts.append(f"<p><b>Fix:</b></p><pre>{escape(self.fix)}</pre>")
        if self.findings:
            parts.append("<ul>" + "".join(f"<li><code>{escape(f.code)}</code>: "
                                          f"{escape(f.message)}</li>" for f in self.findings)
                         + "</ul>")
        return "".join(parts) + "</div>"


# -- reading mine -------------------------------------------------------------------------------
def _is_tensor(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith(("torch", "tensorflow", "keras", "jax"))


def to_array(mine):
    """``mine`` as a NumPy array (``None`` stays ``None``): torch tensors are detached, a
    1-tuple such as ``torch.autograd.grad``'s result is unwrapped. Raises TypeError for
    anything that is not numbers."""
    if mine is None:
        return None
    if isinstance(mine, (tuple, list)) and len(mine) == 1 and (mine[0] is None
                                                              or _is_tensor(mine[0])):
        return to_array(mine[0])
    if hasattr(mine, "detach") and callable(mine.detach):
        mine = mine.detach()
        if hasattr(mine, "cpu"):
            mine = mine.cpu()
        if str(getattr(mine, "dtype", "")) == "torch.bfloat16":
            mine = mine.float()
        return np.asarray(mine.numpy())
    if hasattr(mine, "numpy") and _is_tensor(mine):
        return np.asarray(mine.numpy())
    if isinstance(mine, (list, tuple)):
        mine = [to_array(m) if _is_tensor(m) else m for m in mine]
        shapes = [np.shape(m) for m in mine]
        if len(set(shapes)) > 1:  # arrays of several shapes: not one derivative
            raise TypeError(
                f"mine is a {type(mine).__name__} of {len(shapes)} arrays of different shapes "
                f"({', '.join(str(tuple(s)) for s in shapes[:4])}{', ...' if len(shapes) > 4 else ''}), "
                "not one array. torch.autograd.grad(u.sum(), model.parameters()) gives such "
                "a list: the gradients with respect to the model's weights (one per weight "
                "tensor), not with respect to its input x. For the derivative with respect to x: "
                "x.requires_grad_(True), then torch.autograd.grad(u, x, "
                "grad_outputs=torch.ones_like(u)).")
    arr = np.asarray(mine)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == bool):
        raise TypeError(f"mine must be numbers (an array or tensor) or None, got "
                        f"{type(mine).__name__}")
    return arr


# -- the diagnosis ------------------------------------------------------------------------------------
def explain(mine, model, x, order=None, *, wrt=None, names=None, _cell=None) -> Explanation:
    """Say what ``mine`` (the student's derivative of ``model`` at ``x``) is.

    ``order`` is the order ``mine`` is meant to be (inferred from its shape and values when
    not given: orders 1..3 are tried, the one its shape points to first). ``wrt`` as in
    :func:`nbderiv.derivatives`. ``names`` = (mine, model, x): the names used in the
    message and the fix (default ``("mine", "model", "x")``).

    Returns an :class:`Explanation` (``.code``, ``.message``, ``.fix``, ``.truth``,
    ``.findings``).

    ``_cell`` (internal, given by ``%%nnderiv explain``): (the cell's code, its namespace), from
    which a ``None`` is traced to the call that made it (:mod:`nbderiv.explain_tape`).
    """
    if order is not None:
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be a positive int (1, 2, 3, ...) or None (inferred), "
                             f"got {order!r}. Fix: e.g. order=2.")
        order = int(order)
    name, mname, xname = tuple(names) if names is not None else ("mine", "model", "x")
    M = to_array(mine)
    truth = _Truth(model, x, wrt)
    truth.get(order or 1)
    if wrt is not None:  # one index, negative ones, a tensor: as derivatives read them
        wrt = truth.wrt = list(truth.d.wrt)
    framework = truth.d.framework
    orig_framework = _framework_of(mine) or framework
    ctx = _Context(name, mname, xname, framework, truth, wrt, mine, x, model,
                   make=Explanation)
    ctx.cell = _cell
    if M is None:
        return ctx.none(order)
    if M.dtype == bool:
        M = M.astype(np.float64)
    ctx.orig_framework = orig_framework
    return ctx.classify(M, order)


class _CallableModule(type(sys.modules[__name__])):
    """Importing ``nbderiv.explain`` (the module) makes Python set the package attribute
    ``nbderiv.explain`` to the module, hiding the function of the same name: the module is
    therefore callable and calls :func:`explain`, so ``nbderiv.explain(mine, model, x)`` works
    whichever of the two the attribute holds."""

    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
