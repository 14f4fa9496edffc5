"""The plain TensorFlow code a student would write for the same per-point derivatives:
nested ``tf.GradientTape``, one tape per order.

Executed in a namespace holding ``model`` and ``x`` (and ``target``, for a call with
``target=``), it leaves numpy arrays ``d1`` ...
``d<order>`` equal to nbderiv's ``d[1]`` ... ``d[order]``.

>>> print(tensorflow_code(order=1, wrt=None, widths=[1]).splitlines()[0])
import numpy as np
"""

from __future__ import annotations

import math

from .base import code_in_layout

_CODE_HEAD = '''\
import numpy as np
import tensorflow as tf

{make_x}
# Differentiate in the model's own float dtype: a tape gives None for an int tensor.
weights = getattr(model, "weights", None) or getattr(model, "variables", None)
dtype = tf.as_dtype(weights[0].dtype) if weights else (
    tf.as_dtype(X.dtype) if X.dtype.kind == "f" else tf.float32)
X = tf.constant(X, dtype=dtype)


def call_model(X):
    """y of shape (N, d_out)."""
    y = {call}
{select}    return tf.reshape(y, (X.shape[0], -1))


{wrt_line}def up_to(order):
    """[y, d1, ..., d_order]; d_k has shape (N, d_out) + {axis} * k.

    The tape of order k records everything below it, so the gradients taken at
    order k - 1 can be differentiated again.
    """
    if order == 0:
        return [call_model(X)]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(X)
        lower = up_to(order - 1)
        top = lower[-1]
        flat = tf.reshape(top, (X.shape[0], -1))       # (N, c): one column per entry
        columns = [flat[:, c] for c in range(flat.shape[1])]
    # The gradient of a column (summed over points) is each point's own gradient,
    # because point n's output depends only on X[n]. "zero": no dependence gives 0.
    grads = [tape.gradient(col, X, unconnected_gradients="zero") for col in columns]
{take}    return lower + [new]


'''

# Keras' helper replaced by the plain variance formula while a student's code differentiates
# (see tensorflow_math.exact_moments); MOMENTS_RESTORE puts Keras' own back. Also the head and
# tail of explain's fix (nbderiv.explain_codes).
MOMENTS_SWAP = '''\
import keras.src.backend.tensorflow.nn as keras_tf_nn


def plain_moments(x, axes, keepdims):  # the variance with its gradient through the mean
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


original_moments = keras_tf_nn._compute_moments, tf.nn.moments
keras_tf_nn._compute_moments = plain_moments
tf.nn.moments = lambda x, axes, shift=None, keepdims=False, name=None: \\
    plain_moments(x, axes, keepdims)
'''
MOMENTS_RESTORE = ("keras_tf_nn._compute_moments, tf.nn.moments = original_moments"
                   "      # put the originals back\n")

_MOMENTS = ("# Keras' normalization layers (LayerNormalization, GroupNormalization) take the variance"
            " from\n# tf.nn.moments, which stops the gradient through the mean inside it: right "
            "for d1, WRONG from\n# d2 on. While differentiating, Keras' helper is replaced by the "
            "plain formula (and put back).\n" + MOMENTS_SWAP
            + "try:\n    results = up_to({order})\nfinally:\n    " + MOMENTS_RESTORE)


def tensorflow_code(*, order, wrt, widths, shapes=None, out_shape=None, notes=()):
    """The code for ``order`` derivatives; ``shapes``: each argument's per-point shape
    (default ``(width,)``), ``out_shape``: each point's output shape O (default (d_out,)):
    the code's ``d<k>`` then has nbderiv's layout (N,) + O + S * k. ``notes``: "moments" for
    a model whose normalization layers need the plain variance formula (order >= 2), "target"
    to pick each point's ``target`` output (one int, or one per point) before differentiating."""
    shapes = [tuple(s) for s in shapes] if shapes else [(w,) for w in widths]
    many = len(shapes) == 1 and len(shapes[0]) > 1
    if len(shapes) == 1:
        make_x = ("# One row per point: X has shape (N, *S), S each point's own shape.\n"
                  if many else "# One row per point: X has shape (N, d_in).\n") + \
            ("X = np.asarray(x)\n"
             "if X.ndim < 2:\n"
             "    X = X.reshape(-1, 1)                     # (N,) = N points of one feature")
        call = "model(X)"
    else:
        make_x = ("# One row per point: X has shape (N, d_in).\n"
                  "# x is a tuple of separate arguments; put their features side by side.\n"
                  "X = np.concatenate([np.reshape(a, (len(a), -1)) for a in x], axis=1)\n"
                  f"widths = {[math.prod(s) for s in shapes]}")
        parts = "tf.split(X, widths, axis=1)"
        if any(len(s) != 1 for s in shapes):  # images, sequences; () for (N,) arguments
            make_x += f"\nshapes = {shapes}   # each argument's own per-point shape"
            parts = ("[tf.reshape(p, (-1,) + s) for p, s in zip(tf.split(X, widths, axis=1), "
                     "shapes)]")
        call = (f"model({parts}) if hasattr(model, \"inputs\") \\\n"
                f"        else model(*{parts})"
                "   # a functional Keras model takes a list")
        if "named" in notes:  # a Keras model built on a dict of Inputs takes a dict
            make_x = ("# x is a dict of the model's named inputs: its arrays in the order of "
                      "the sorted names.\nnames = sorted(x)\nx = tuple(x[k] for k in names)\n"
                      + make_x)
            call = f"model(dict(zip(names, {parts})))"
    select = ""
    if "target" in notes:  # Captum's convention: each point's own output, before differentiating
        make_x += ("\nT = np.broadcast_to(np.reshape(target, -1), (len(X),)).astype(np.int64)"
                   "   # target=: one int, or one per point")
        select = ("    y = tf.gather(tf.reshape(y, (X.shape[0], -1)), T, batch_dims=1)[:, None]"
                  "   # (N, 1)\n")
    if wrt is None:
        take = ("    new = tf.reshape(tf.stack(grads, axis=1), top.shape + X.shape[1:])"
                "   # + the point's axes\n")
        wrt_line, axis = "", "(d_in,)"
    else:  # only the wrt columns, level by level: len(wrt) ** k columns at level k
        take = ("    grads = [tf.gather(tf.reshape(g, (X.shape[0], -1)), wrt, axis=1) "
                "for g in grads]\n"
                "    new = tf.reshape(tf.stack(grads, axis=1), top.shape + [len(wrt)])"
                "   # + one wrt axis\n")
        wrt_line = ("# Keep only the inputs asked for (wrt, indices into each point's flattened "
                    f"features) on\n# every input axis, level by level.\nwrt = {list(wrt)}\n\n\n")
        axis = "(len(wrt),)"
    lines = [_CODE_HEAD.format(make_x=make_x, call=call, select=select, take=take,
                               wrt_line=wrt_line, axis=axis)]
    lines.append(_MOMENTS.format(order=order) if "moments" in notes and order >= 2
                 else f"results = up_to({order})\n")
    if wrt is not None and many:
        lines.append("# (wrt counts each point's features in C order: flatten S first)")
    lines.append("# Plain numpy arrays.")
    for k in range(1, order + 1):
        value = f"results[{k}].numpy()"
        if wrt is None:
            value = code_in_layout(value, k, None, out_shape)
        elif out_shape is not None and len(out_shape) > 1:  # already (N, d_out) + (m,) * k
            value += (f".reshape(len(X), {', '.join(map(str, out_shape))}, "
                      + ", ".join(["len(wrt)"] * k) + ")")
        lines.append(f"d{k} = {value}")
    return "\n".join(lines) + "\n"
