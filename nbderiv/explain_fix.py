"""The code :func:`nbderiv.explain` suggests: short, runnable code in the student's framework.

:func:`fix_code` computes the per-point derivative of an order in nbderiv's layout
``(N, d_out) + (n_inputs,) * order``; :func:`_reshape_code` turns the student's own array
(or list of arrays) into that layout.

>>> print(fix_code("numpy", 2))
d = nbderiv.derivatives(model, x, order=2)
d2 = d[2]
"""

from __future__ import annotations

import re

import numpy as np

from .explain_match import _squeezed_shape


def _framework_of(obj) -> str | None:
    mod = type(obj).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith(("tensorflow", "keras", "tf_keras")):
        return "tensorflow"
    return None


def _shape(s) -> str:
    s = tuple(int(v) for v in s)
    return f"({s[0]},)" if len(s) == 1 else str(s)


def _many(pshape=None, oshape=None) -> bool:
    """Whether points (shape S) or outputs (shape O) have several axes: nbderiv's layout is
    then (N,) + O + S * k, each point's own shape kept."""
    return len(tuple(pshape or ())) > 1 or len(tuple(oshape or ())) > 1


def _layout(k, pshape=None, oshape=None, wrt=None) -> str:
    """nbderiv's layout of the order-k derivative, in words: (N, d_out, n_inputs, ...) for
    points of one axis, (N, d_out, *S, ...) with S named for points of several axes.

    >>> _layout(2), _layout(1, pshape=(2, 4, 5), oshape=(2,))
    ('(N, d_out, n_inputs, n_inputs)', '(N, d_out, *S) with S = (2, 4, 5) the shape of one point')
    """
    if not _many(pshape, oshape):
        return "(N, d_out" + ", n_inputs" * k + ")"
    out = "d_out" if len(tuple(oshape or ())) <= 1 else "*O"
    ins = ", len(wrt)" if wrt is not None else ", *S"
    names = [] if wrt is not None else [f"S = {_shape(pshape)} the shape of one point"]
    if out == "*O":
        names.append(f"O = {_shape(oshape)} the shape of one point's output")
    return f"(N, {out}{ins * k})" + (" with " + " and ".join(names) if names else "")


# how a list of each framework's arrays is stacked: (function, keyword of the new axis)
_STACK = {"torch": ("torch.stack", "dim"), "tensorflow": ("tf.stack", "axis"),
          None: ("np.stack", "axis")}


def _reshape_code(name, how, perm, src_shape, dst_shape, framework, mine=None) -> str:
    """Code that turns ``name`` (shape src_shape) into nbderiv's layout dst_shape. When the
    student's object ``mine`` is a list or tuple (read as its elements stacked on a new first
    axis), the code stacks it first, in the elements' framework, and a permutation that only
    moves the list's axis becomes a stack on that axis.

    >>> _reshape_code("cols", "permute", (1, 0, 2), (3, 10, 2), (10, 3, 2), "torch")
    'cols.permute(1, 0, 2)'
    >>> import torch
    >>> cols = [torch.zeros(10, 2) for _ in range(3)]
    >>> _reshape_code("cols", "permute", (1, 0, 2), (3, 10, 2), (10, 3, 2), "torch", cols)
    'torch.stack(cols, dim=1)'
    """
    dst = _shape(dst_shape)
    if how in ("same", None):
        return name
    if isinstance(mine, (list, tuple)) and len(mine) > 0:
        framework = _framework_of(mine[0])
        if len(mine) == 1 and framework is not None:
            name = f"{name}[0]"  # a one-tensor list (autograd.grad's tuple) is read as it
        else:
            fn, kw = _STACK[framework]
            p = tuple(int(v) for v in perm) if how == "permute" else ()
            plain = (tuple(src_shape) == _squeezed_shape(src_shape)
                     and tuple(dst_shape) == _squeezed_shape(dst_shape))
            if p and plain and [a for a in p if a != 0] == list(range(1, len(p))):
                return f"{fn}({name}, {kw}={p.index(0)})"
            name = f"{fn}({name})"
    if how == "reshape":
        return f"{name}.reshape{dst}" if framework != "tensorflow" else \
            f"tf.reshape({name}, {dst})"
    sq = _shape(_squeezed_shape(src_shape))
    expr = name
    if tuple(src_shape) != _squeezed_shape(src_shape):
        expr = f"{expr}.reshape{sq}" if framework != "tensorflow" else f"tf.reshape({expr}, {sq})"
    p = tuple(int(v) for v in perm)
    if framework == "torch":
        expr = f"{expr}.permute{p}"
    elif framework == "tensorflow":
        expr = f"tf.transpose({expr}, {list(p)})"
    else:
        expr = f"np.transpose({expr}, {p})"
    if _squeezed_shape(dst_shape) != tuple(dst_shape):
        expr = f"{expr}.reshape{dst}" if framework != "tensorflow" else f"tf.reshape({expr}, {dst})"
    return expr


def fix_code(framework, order, *, model="model", x="x", wrt=None, eval_first=False,
             dtype="float32", pshape=None, oshape=None, loop=False, keep=()) -> str:
    """Short, runnable code computing the per-point derivative of ``order`` in nbderiv's
    layout (N, d_out) + (n_inputs,) * order, in the student's framework.

    ``pshape`` (S, the shape of one point) and ``oshape`` (O, of one point's output): where
    either has several axes (an image (C, H, W), a sequence (T, F)), each point keeps its own
    shape when the model is called, and the code's array has nbderiv's layout
    (N,) + O + S * order, the layout of ``nbderiv.derivatives(model, x)[order]`` (with ``wrt``:
    (N,) + O + (len(wrt),) * order, wrt counting each point's features in C order). ``loop``
    (torch): one point at a time instead of ``torch.func.vmap``, which cannot batch every
    layer (nn.GRU). ``keep``: names the code's own (``f``, ``x_``, ``y``) must not take (the
    notebook's).

    >>> print(fix_code("torch", 1, pshape=(2, 4, 5), oshape=(2,)))
    x_ = torch.as_tensor(x).detach().to(torch.float32)      # (N, *S): each point keeps its shape
    f = lambda p: model(p.unsqueeze(0)).reshape(-1)      # one point S -> (d_out,)
    d1 = torch.func.vmap(torch.func.jacrev(f))(x_)      # (N, d_out, *S) with S = (2, 4, 5) the shape of one point
    """
    order = max(int(order or 1), 1)
    name = f"d{order}"
    # the code's own names, kept apart from the model's and x's (a model named f)
    taken = set(re.findall(r"[A-Za-z_]\w*", f"{model} {x}")) | set(keep)
    fn, xv, yv = fresh_name("f", taken), fresh_name("x_", taken), fresh_name("y", taken)
    many = _many(pshape, oshape)
    oshape = tuple(int(v) for v in (oshape or ()))
    nO = max(len(oshape), 1)  # output axes of the derivative (d_out when O has one axis or none)
    layout = _layout(order, pshape, oshape, wrt)
    keep = ""
    if wrt is not None:
        cols = [int(c) for c in wrt]
        if many:  # the point's axes flattened first: wrt counts features in C order
            n_feat = int(np.prod(pshape)) if pshape else 1
            dims = (-1,) + (oshape if oshape else (1,)) + (n_feat,) * order
            flat = ", ".join(map(str, dims))
            keep = (f"{name} = tf.reshape({name}, ({flat}))\n" if framework == "tensorflow"
                    else f"{name} = {name}.reshape({flat})\n")
        if framework == "tensorflow":
            keep += "".join(f"\n{name} = tf.gather({name}, {cols}, axis={1 + nO + i})"
                            for i in range(order)).lstrip("\n")
        else:
            keep += f"{name} = {name}" + "".join(f"[{':, ' * (1 + nO + i)}{cols}]"
                                                 for i in range(order))
        keep += "      # only the inputs in wrt"
    if framework == "tensorflow":
        tfdtype = "tf.float64" if dtype == "float64" else "tf.float32"
        if many:
            lines = [f"{xv} = tf.cast({x}, {tfdtype})      # (N, *S) floats: each point keeps "
                     "its shape"]
        else:
            lines = [f"{xv} = tf.reshape(tf.cast({x}, {tfdtype}), ({_len(x, 'tensorflow')}, -1))"
                     "      # (N, d_in) floats"]
        if eval_first:
            lines.append(f"# {model}({xv}, training=False): batch statistics off")
        call = f"{model}({xv}, training=False)" if eval_first else f"{model}({xv})"
        indent = ""
        for k in range(order, 0, -1):
            lines.append(f"{indent}with tf.GradientTape() as tape{k}:")
            indent += "    "
            lines.append(f"{indent}tape{k}.watch({xv})")
        if len(oshape) > 1:
            lines.append(f"{indent}{yv} = {call}      # (N, *O)")
        else:
            lines.append(f"{indent}{yv} = tf.reshape({call}, ({_len(x, 'tensorflow')}, -1))"
                         "      # (N, d_out)")
        prev = yv
        for k in range(1, order + 1):
            indent = indent[:-4]
            lines.append(f"{indent}d{k} = tape{k}.batch_jacobian({prev}, {xv})"
                         f"      # {_layout(k, pshape, oshape) if many else _layout(k)}")
            prev = f"d{k}"
        if keep:
            lines.append(keep)
        return "\n".join(lines)
    if framework == "torch":
        tdtype = "torch.float64" if dtype == "float64" else "torch.float32"
        lines = []
        if eval_first:
            lines.append(f"{model}.eval()                      # inference mode: dropout off, "
                         "BatchNorm on its running statistics")
        if many:
            lines.append(f"{xv} = torch.as_tensor({x}).detach().to({tdtype})"
                         "      # (N, *S): each point keeps its shape")
            if len(oshape) > 1:
                lines.append(f"{fn} = lambda p: {model}(p.unsqueeze(0))[0]"
                             "      # one point S -> its output O")
            else:
                lines.append(f"{fn} = lambda p: {model}(p.unsqueeze(0)).reshape(-1)"
                             "      # one point S -> (d_out,)")
        else:
            lines.append(f"{xv} = torch.as_tensor({x}).detach().to({tdtype}).reshape(len({x}), -1)"
                         "  # (N, d_in)")
            lines.append(f"{fn} = lambda p: {model}(p.unsqueeze(0)).reshape(-1)"
                         "      # one point (d_in,) -> (d_out,)")
        inner = fn
        for _ in range(order):
            inner = f"torch.func.jacrev({inner})"
        full = _layout(order, pshape, oshape) if wrt is not None and many else layout
        if loop:
            lines.append(f"{name} = torch.stack([{inner}(p) for p in {xv}])      # {full}: one "
                         "point at a time (torch.func.vmap cannot batch this model's recurrent "
                         "layers)")
        else:
            lines.append(f"{name} = torch.func.vmap({inner})({xv})      # {full}")
        if keep:
            lines.append(keep)
        return "\n".join(lines)
    return f"d = nbderiv.derivatives({model}, {x}, order={order})\n{name} = d[{order}]"


def fresh_name(name, taken) -> str:
    """``name``, or ``name`` with underscores added until it is none of ``taken`` (code
    written for a notebook keeps its own names off the notebook's).

    >>> fresh_name("f", {"f", "f_"})
    'f__'
    """
    while name in taken:
        name += "_"
    return name


def _len(x, framework):
    return f"len({x})" if framework != "tensorflow" else f"tf.shape({x})[0]"


def diagonal_blocks_code(framework, *, model="model", x="x", wrt=None, dtype="float32",
                         mine=None, jshape=None, pshape=None, oshape=None) -> str:
    """Code giving nbderiv's per-point derivative of a model that couples its points: the
    diagonal blocks J[n, :, n, :] of the full batch Jacobian (each point's derivative with the
    rest of the batch held fixed). With ``mine`` (the student's full Jacobian, shape
    ``jshape``), the blocks are taken from it; otherwise the Jacobian is computed. ``pshape``
    and ``oshape`` as in :func:`fix_code`: for points or outputs of several axes each point keeps its
    shape, and the blocks have nbderiv's layout (N,) + O + S.

    >>> print(diagonal_blocks_code("numpy", mine="J0", jshape=(3, 1, 3, 2)))
    J = np.reshape(np.asarray(J0), (3, 1, 3, 2))      # (N, d_out, N, n_inputs)
    i = np.arange(3)
    d1 = J[i, :, i, :]      # (N, d_out, n_inputs): the diagonal blocks
    """
    many = _many(pshape, oshape)
    oshape = tuple(int(v) for v in (oshape or ()))
    lines = []
    taken = set(re.findall(r"[A-Za-z_]\w*", f"{model} {x}"))
    xv, yv = fresh_name("x_", taken), fresh_name("y", taken)
    if mine is not None:
        n = int(jshape[0])
        if framework == "torch":
            lines.append(f"J = {mine}.reshape{_shape(jshape)}      # (N, d_out, N, n_inputs)")
            lines.append(f"i = torch.arange({n})")
        else:  # a tf.Tensor has no .reshape and no fancy indexing: NumPy does both
            lines.append(f"J = np.reshape(np.asarray({mine}), {_shape(jshape)})      "
                         "# (N, d_out, N, n_inputs)")
            lines.append(f"i = np.arange({n})")
        if many:
            dshape = (n,) + (oshape or (int(jshape[1]),)) + tuple(int(v) for v in pshape)
            lines.append(f"d1 = J[i, :, i, :].reshape{_shape(dshape)}      # "
                         f"{_layout(1, pshape, oshape)}: the diagonal blocks, each point's own shape")
            return "\n".join(lines)
    elif framework == "tensorflow":
        tfdtype = "tf.float64" if dtype == "float64" else "tf.float32"
        if many:
            lines.append(f"{xv} = tf.cast({x}, {tfdtype})      # (N, *S) floats: each point "
                         "keeps its shape")
        else:
            lines.append(f"{xv} = tf.reshape(tf.cast({x}, {tfdtype}), ({_len(x, framework)}, -1))"
                         "      # (N, d_in) floats")
        y = (f"{model}({xv})      # (N, *O)" if len(oshape) > 1 else
             f"tf.reshape({model}({xv}), (tf.shape({xv})[0], -1))      # (N, d_out)")
        lines += ["with tf.GradientTape() as tape:",
                  f"    tape.watch({xv})",
                  f"    {yv} = {y}",
                  f"J = tape.jacobian({yv}, {xv}).numpy()      # {_whole(many, oshape)}: the whole batch",
                  "i = np.arange(J.shape[0])"]
    else:
        tdtype = "torch.float64" if dtype == "float64" else "torch.float32"
        if many:
            lines.append(f"{xv} = torch.as_tensor({x}).detach().to({tdtype})"
                         "      # (N, *S): each point keeps its shape")
        else:
            lines.append(f"{xv} = torch.as_tensor({x}).detach().to({tdtype}).reshape(len({x}), -1)"
                         "  # (N, d_in)")
        f = f"{model}(p)" if len(oshape) > 1 else f"{model}(p).reshape(len(p), -1)"
        lines += [f"J = torch.autograd.functional.jacobian(lambda p: {f}, {xv})      # "
                  f"{_whole(many, oshape)}: the whole batch",
                  f"i = torch.arange(len({xv}))"]
    if many:
        lines.append(f"d1 = J[i, {':, ' * max(len(oshape), 1)}i]      # {_layout(1, pshape, oshape)}: the "
                     "diagonal blocks")
        if wrt is not None and mine is None:
            n_feat = int(np.prod(pshape)) if pshape else 1
            dims = ", ".join(map(str, (-1,) + (oshape or (1,)) + (n_feat,)))
            lines.append(f"d1 = d1.reshape({dims})[{':, ' * (1 + max(len(oshape), 1))}"
                         f"{[int(c) for c in wrt]}]      # only the inputs in wrt")
        return "\n".join(lines)
    lines.append("d1 = J[i, :, i, :]      # (N, d_out, n_inputs): the diagonal blocks")
    if wrt is not None and mine is None:
        lines.append(f"d1 = d1[:, :, {[int(c) for c in wrt]}]      # only the inputs in wrt")
    return "\n".join(lines)


def _whole(many, oshape):
    """The layout of the whole batch's Jacobian, in words."""
    if not many:
        return "(N, d_out, N, d_in)"
    return "(N, *O, N, *S)" if len(oshape) > 1 else "(N, d_out, N, *S)"
