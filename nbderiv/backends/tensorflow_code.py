"""The plain TensorFlow code a student would write for the same per-point derivatives:
nested ``tf.GradientTape``, one tape per order.

Executed in a namespace holding ``model`` and ``x``, it leaves numpy arrays ``d1`` ...
``d<order>`` equal to nbderiv's ``d[1]`` ... ``d[order]``.

>>> print(tensorflow_code(order=1, wrt=None, widths=[1]).splitlines()[0])
import numpy as np
"""

from __future__ import annotations

from .base import code_index_wrt, code_keeping_wrt

_CODE_HEAD = '''\
import numpy as np
import tensorflow as tf

# One row per point: X has shape (N, d_in).
{make_x}
# Differentiate in the model's own float dtype: a tape gives None for an int tensor.
weights = getattr(model, "weights", None) or getattr(model, "variables", None)
dtype = tf.as_dtype(weights[0].dtype) if weights else (
    tf.as_dtype(X.dtype) if X.dtype.kind == "f" else tf.float32)
X = tf.constant(X, dtype=dtype)


def call_model(X):
    """y of shape (N, d_out)."""
    y = {call}
    return tf.reshape(y, (X.shape[0], -1))


def up_to(order):
    """[y, d1, ..., d_order]; d_k has shape (N, d_out) + (d_in,) * k.

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
    new = tf.reshape(tf.stack(grads, axis=1), top.shape + (X.shape[1],))
    return lower + [new]


results = up_to({order})
'''


def tensorflow_code(*, order, wrt, widths):
    if len(widths) == 1:
        make_x = ("X = np.asarray(x)\n"
                  "if X.ndim < 2:\n"
                  "    X = X.reshape(-1, 1)                     # (N,) = N points of one feature")
        call = "model(X)"
    else:
        make_x = ("# x is a tuple of separate arguments; put their features side by side.\n"
                  "X = np.concatenate([np.reshape(a, (len(a), -1)) for a in x], axis=1)\n"
                  f"widths = {list(widths)}")
        call = ("model(tf.split(X, widths, axis=1)) if hasattr(model, \"inputs\") \\\n"
                "        else model(*tf.split(X, widths, axis=1))"
                "   # a functional Keras model takes a list")
    lines = [_CODE_HEAD.format(make_x=make_x, call=call, order=order)]
    lines += code_keeping_wrt(wrt)
    lines.append("# Plain numpy arrays.")
    for k in range(1, order + 1):
        lines.append(f"d{k} = results[{k}].numpy(){code_index_wrt(k, wrt)}")
    return "\n".join(lines) + "\n"
