"""The plain PyTorch code a student would write for the same per-point derivatives.

Executed in a namespace holding ``model`` and ``x``, it leaves numpy arrays ``d1`` ...
``d<order>`` equal to nbderiv's ``d[1]`` ... ``d[order]`` (same shape, same layout).

>>> print(torch_code(order=1, wrt=None, widths=[1]).splitlines()[0])
import torch
"""

from __future__ import annotations

import math

from .base import code_in_layout, code_keeping_wrt

_CODE_HEAD = '''\
import torch

{make_x}
# Differentiate in the model's own dtype, on its device.
p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
X = X.to(dtype=p.dtype if p is not None else torch.get_default_dtype(),
         device=p.device if p is not None else X.device).detach().requires_grad_(True)


def per_point_grad(t):
    """d t[n] / d X[n] for every point n at once, shaped like X.

    grad_outputs=ones sums over points, and because point n's output depends only on
    X[n], that sum is exactly each point's own derivative. create_graph=True keeps the
    graph so the result can be differentiated again (needed for order >= 2).
    """
    if not t.requires_grad:                           # t does not depend on X at all
        return torch.zeros_like(X)
    g, = torch.autograd.grad(t, X, grad_outputs=torch.ones_like(t),
                             create_graph=True, allow_unused=True)
    return torch.zeros_like(X) if g is None else g   # None: t does not depend on X


def differentiate(t):
    """(N, ...) -> (N, ..., {point_axes}): one more derivative, {more}."""
    flat = t.reshape(len(t), -1)
    cols = [per_point_grad(flat[:, c]) for c in range(flat.shape[1])]
    return torch.stack(cols, dim=1).reshape(*t.shape, *X.shape[1:])

'''

_NORMS = '''\
# CAUTION: PyTorch's fused layer / batch / instance norm kernels give wrong derivatives from order 3
# on; nbderiv computes them with the plain formula, so this code's d3 (and higher) may differ.
'''

_ATTENTION = '''\
# The fused attention kernel has no second derivative: run under the math kernel.
from torch.nn.attention import SDPBackend, sdpa_kernel

with sdpa_kernel([SDPBackend.MATH]):'''


def torch_code(*, order, wrt, widths, shapes=None, out_shape=None, notes=()):
    """The code for ``order`` derivatives; ``shapes``: each argument's per-point shape
    (default ``(width,)``), ``out_shape``: each point's output shape O (default (d_out,)):
    the code's ``d<k>`` then has nbderiv's layout (N,) + O + S * k. ``notes`` (see
    ``TorchBackend.code_notes``): "attention" runs the model under the math attention
    kernel, "norms" adds a caution."""
    shapes = [tuple(s) for s in shapes] if shapes else [(w,) for w in widths]
    many = len(shapes) == 1 and len(shapes[0]) > 1  # one argument, points of several axes
    if len(shapes) == 1:
        make_x = ("# One row per point: X has shape (N, *S), S each point's own shape.\n"
                  if many else "# One row per point: X has shape (N, d_in).\n") + \
            ("X = torch.as_tensor(x)\n"
             "if X.ndim < 2:\n"
             "    X = X.reshape(-1, 1)                     # (N,) = N points of one feature")
        call = "model(X)"
    else:
        make_x = ("# One row per point: X has shape (N, d_in).\n"
                  "# x is a tuple of separate arguments; put their features side by side.\n"
                  "parts = [torch.as_tensor(a) for a in x]\n"
                  "X = torch.cat([a.reshape(len(a), -1) for a in parts], dim=1)\n"
                  f"widths = {[math.prod(s) for s in shapes]}")
        call = "model(*torch.split(X, widths, dim=1))"
        if any(len(s) > 1 for s in shapes):
            make_x += f"\nshapes = {shapes}   # each argument's own per-point shape"
            call = "model(*[p.reshape(len(p), *s) for p, s in zip(torch.split(X, widths, dim=1), shapes)])"
    head = _CODE_HEAD.format(make_x=make_x, point_axes="*S" if many else "d_in",
                             more="the point's own axes once more" if many
                             else "one more input axis")
    lines = [(_NORMS if "norms" in notes else "") + head]
    pad = ""
    if "attention" in notes:
        lines.append(_ATTENTION)
        pad = "    "
    lines.append(f"{pad}y = {call}.reshape(len(X), -1)   # (N, d_out)")
    axes = "N, d_out"
    for k in range(1, order + 1):
        axes += ", *S" if many else ", d_in"
        src = "y" if k == 1 else f"d{k - 1}_all"
        lines.append(f"{pad}d{k}_all = differentiate({src})    # ({axes}): order {k}")
    if wrt is not None:
        lines.append("")
    lines += code_keeping_wrt(wrt)
    if wrt is not None and many:
        lines.append("# (wrt counts each point's features in C order: S flattened first)")
    lines.append("\n# Plain numpy arrays, detached from the graph.")
    for k in range(1, order + 1):
        flat = f".reshape(len(X), y.shape[1]{', X[0].numel()' * k})" if many else None
        value = code_in_layout(f"d{k}_all", k, wrt, out_shape, flat)
        lines.append(f"d{k} = {value}.detach().cpu().numpy()")
    return "\n".join(lines) + "\n"
