"""The plain PyTorch code a student would write for the same per-point derivatives.

Executed in a namespace holding ``model`` and ``x`` (and ``target``, for a call with
``target=``), it leaves numpy arrays ``d1`` ...
``d<order>`` equal to nbderiv's ``d[1]`` ... ``d[order]`` (same shape, same layout).

>>> print(torch_code(order=1, wrt=None, widths=[1]).splitlines()[0])
import torch
"""

from __future__ import annotations

import math

from .base import code_in_layout

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


{differentiate}
'''
_DIFFERENTIATE = '''def differentiate(t):
    """(N, ...) -> (N, ..., {point_axes}): one more derivative, {more}."""
    flat = t.reshape(len(t), -1)
    cols = [per_point_grad(flat[:, c]) for c in range(flat.shape[1])]
    return torch.stack(cols, dim=1).reshape(*t.shape, *X.shape[1:])
'''
_DIFFERENTIATE_WRT = '''# Keep only the inputs asked for (wrt, indices into each point's flattened features) on
# every input axis, level by level: each level then differentiates len(wrt) ** k columns.
wrt = {wrt}


def differentiate(t):
    """(N, ...) -> (N, ..., len(wrt)): one more derivative, along the wrt inputs."""
    flat = t.reshape(len(t), -1)
    cols = [per_point_grad(flat[:, c]).reshape(len(t), -1)[:, wrt] for c in range(flat.shape[1])]
    return torch.stack(cols, dim=1).reshape(*t.shape, len(wrt))
'''

# torch.nn.functional's layer norm and instance norm run fused kernels whose derivatives are
# right up to order 2 and WRONG from order 3 on. The code runs the plain formula in their place
# while it differentiates, for every call however it is spelled (a module, F.layer_norm,
# torch.layer_norm, an imported name): a TorchFunctionMode sees them all. Batch norm needs
# nothing: with running statistics it is a fixed affine map, and with batch statistics it
# couples the points.
_NORM_FORMULA = '''\
# PyTorch computes {names} with fused kernels: their derivatives are
# wrong from order 3 on (d1 and d2 are right). While differentiating, every call of them
# (the nn modules, F.*, torch.*) runs the plain formula below instead (PlainNorms).
import torch.nn.functional as F


def plain_norm(z, dims, eps):  # (z - mean) / sqrt(variance + eps) over dims, in plain operations
    mean = z.mean(dims, keepdim=True)
    variance = ((z - mean) ** 2).mean(dims, keepdim=True)
    return (z - mean) / torch.sqrt(variance + eps)

'''
_LAYER_NORM = '''
def plain_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    out = plain_norm(input, tuple(range(-len(normalized_shape), 0)), eps)  # the last axes
    out = out if weight is None else out * weight
    return out if bias is None else out + bias

'''
_INSTANCE_NORM = '''
def plain_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                        use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:  # running statistics: a fixed affine map, PyTorch's own is right
        return F.instance_norm(input, running_mean, running_var, weight, bias,
                               use_input_stats, momentum, eps)
    out = plain_norm(input, tuple(range(2, input.ndim)), eps)  # each point, each channel
    channel = (1, -1) + (1,) * (input.ndim - 2)                # weight and bias per channel
    out = out if weight is None else out * weight.reshape(channel)
    return out if bias is None else out + bias.reshape(channel)

'''
_SWAPPED = {"layer_norm": _LAYER_NORM, "instance_norm": _INSTANCE_NORM}


_SPELLINGS = {"layer_norm": "(F.layer_norm, torch.layer_norm)",
              "instance_norm": "(F.instance_norm,)"}


def _norm_swap(notes):
    """The definitions that put the plain formula in place of the fused norms named in
    ``notes`` (a ``PlainNorms`` mode, entered with ``with PlainNorms():``), or None when no
    norm needs it."""
    names = [n for n in _SWAPPED if n in notes]
    if not names:
        return None
    text = _NORM_FORMULA.format(names=" and ".join(f"F.{n}" for n in names))
    text += "".join(_SWAPPED[n] for n in names)
    text += ("\nclass PlainNorms(torch.overrides.TorchFunctionMode):\n"
             "    \"\"\"Every call of the fused norms below, however it is spelled, runs the "
             "plain formula.\"\"\"\n\n"
             "    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
             "        kwargs = kwargs or {}\n")
    for n in names:
        text += (f"        if func in {_SPELLINGS[n]}:\n"
                 f"            return plain_{n}(*args, **kwargs)\n")
    if "layer_norm" in names:
        text += ("        if func is torch.native_layer_norm:  # (out, mean, 1 / std)\n"
                 "            h, shape, weight, bias, eps = args\n"
                 "            dims = tuple(range(-len(shape), 0))\n"
                 "            mean = h.mean(dims, keepdim=True)\n"
                 "            rstd = 1 / torch.sqrt(((h - mean) ** 2).mean(dims, keepdim=True) "
                 "+ eps)\n"
                 "            return plain_layer_norm(h, shape, weight, bias, eps), mean, rstd\n")
    text += "        return func(*args, **kwargs)\n"
    return text


_ATTENTION = '''\
# The fused attention kernel has no second derivative: run under the math kernel.
from torch.nn.attention import SDPBackend, sdpa_kernel
'''


def torch_code(*, order, wrt, widths, shapes=None, out_shape=None, notes=()):
    """The code for ``order`` derivatives; ``shapes``: each argument's per-point shape
    (default ``(width,)``), ``out_shape``: each point's output shape O (default (d_out,)):
    the code's ``d<k>`` then has nbderiv's layout (N,) + O + S * k. ``notes`` (see
    ``TorchBackend.code_notes``): "attention" runs the model under the math attention
    kernel, "layer_norm" / "instance_norm" replace those fused kernels by the plain formula,
    "target" picks each point's ``target`` output (one int, or one per point) before
    differentiating, "dtype:float64" casts X to that dtype where the model is a function
    (whose parameters the code cannot ask for)."""
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
        if any(len(s) != 1 for s in shapes):  # images, sequences; () for (N,) arguments
            make_x += f"\nshapes = {shapes}   # each argument's own per-point shape"
            call = "model(*[p.reshape(len(p), *s) for p, s in zip(torch.split(X, widths, dim=1), shapes)])"
    if wrt is None:
        differentiate = _DIFFERENTIATE.format(
            point_axes="*S" if many else "d_in",
            more="the point's own axes once more" if many else "one more input axis")
    else:
        differentiate = _DIFFERENTIATE_WRT.format(wrt=list(wrt))
    head = _CODE_HEAD.format(make_x=make_x, differentiate=differentiate)
    dtype = next((n[len("dtype:"):] for n in notes if n.startswith("dtype:")), None)
    if dtype:  # a function around a model in another dtype than torch's default
        head = head.replace("else torch.get_default_dtype()", f"else torch.{dtype}")
    lines = [head]
    pad = ""
    if "attention" in notes:
        lines.append(_ATTENTION)
    swap = _norm_swap(notes)
    if swap:
        lines.append(swap)
        lines.append("with PlainNorms():")
        pad = "    "
    if "attention" in notes:
        lines.append(f"{pad}with sdpa_kernel([SDPBackend.MATH]):")
        pad += "    "
    lines.append(f"{pad}y = {call}.reshape(len(X), -1)   # (N, d_out)")
    if "target" in notes:  # Captum's convention: each point's own output, before differentiating
        lines += [f"{pad}t = torch.as_tensor(target, device=X.device).reshape(-1).long()"
                  "   # target=: one int, or one per point",
                  f"{pad}y = y.gather(1, t.expand(len(X)).reshape(-1, 1) if t.numel() == 1 "
                  "else t.reshape(-1, 1))   # (N, 1)"]
    axes = "N, d_out"
    for k in range(1, order + 1):
        axes += ", len(wrt)" if wrt is not None else ", *S" if many else ", d_in"
        src = "y" if k == 1 else f"d{k - 1}_all"
        lines.append(f"{pad}d{k}_all = differentiate({src})    # ({axes}): order {k}")
    if wrt is not None and many:
        lines.append("# (wrt counts each point's features in C order: S flattened first)")
    lines.append("\n# Plain numpy arrays, detached from the graph.")
    for k in range(1, order + 1):
        if wrt is None:
            value = code_in_layout(f"d{k}_all", k, None, out_shape)
        else:  # already (N, d_out) + (len(wrt),) * k
            value = f"d{k}_all"
            if out_shape is not None and len(out_shape) > 1:
                value += (f".reshape(len(X), {', '.join(map(str, out_shape))}, "
                          + ", ".join(["len(wrt)"] * k) + ")")
        lines.append(f"d{k} = {value}.detach().cpu().numpy()")
    return "\n".join(lines) + "\n"
