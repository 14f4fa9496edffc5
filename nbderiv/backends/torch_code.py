"""The plain PyTorch code a student would write for the same per-point derivatives.

Executed in a namespace holding ``model`` and ``x``, it leaves numpy arrays ``d1`` ...
``d<order>`` equal to nbderiv's ``d[1]`` ... ``d[order]``.

>>> print(torch_code(order=1, wrt=None, widths=[1]).splitlines()[0])
import torch
"""

from __future__ import annotations

from .base import code_index_wrt, code_keeping_wrt

_CODE_HEAD = '''\
import torch

# One row per point: X has shape (N, d_in).
{make_x}
# Differentiate in the model's own dtype, on its device.
p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
X = X.to(dtype=p.dtype if p is not None else torch.get_default_dtype(),
         device=p.device if p is not None else X.device).detach().requires_grad_(True)
y = {call}.reshape(len(X), -1)                # (N, d_out)


def per_point_grad(t):
    """d t[n] / d X[n] for every point n at once, shape (N, d_in).

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
    """(N, ...) -> (N, ..., d_in): one more derivative, one more input axis."""
    flat = t.reshape(len(t), -1)
    cols = [per_point_grad(flat[:, c]) for c in range(flat.shape[1])]
    return torch.stack(cols, dim=1).reshape(*t.shape, X.shape[1])

'''


def torch_code(*, order, wrt, widths):
    if len(widths) == 1:
        make_x = ("X = torch.as_tensor(x)\n"
                  "if X.ndim < 2:\n"
                  "    X = X.reshape(-1, 1)                     # (N,) = N points of one feature")
        call = "model(X)"
    else:
        make_x = ("# x is a tuple of separate arguments; put their features side by side.\n"
                  "parts = [torch.as_tensor(a) for a in x]\n"
                  "X = torch.cat([a.reshape(len(a), -1) for a in parts], dim=1)\n"
                  f"widths = {list(widths)}")
        call = "model(*torch.split(X, widths, dim=1))"
    lines = [_CODE_HEAD.format(make_x=make_x, call=call)]
    axes = "N, d_out"
    for k in range(1, order + 1):
        axes += ", d_in"
        src = "y" if k == 1 else f"d{k - 1}_all"
        lines.append(f"d{k}_all = differentiate({src})    # ({axes}): order {k}")
    if wrt is not None:
        lines.append("")
    lines += code_keeping_wrt(wrt)
    lines.append("\n# Plain numpy arrays, detached from the graph.")
    for k in range(1, order + 1):
        lines.append(f"d{k} = d{k}_all{code_index_wrt(k, wrt)}.detach().cpu().numpy()")
    return "\n".join(lines) + "\n"
