"""Forward Taylor mode for Keras ``Sequential`` stacks of ``Dense`` layers and elementwise
activations: propagates truncated Taylor coefficients along one input direction, so order
K costs about K**2 elementwise passes instead of the 3**K of nested tapes.

A coefficient list ``c = [c0, c1, ..., cK]`` stands for x(t) = sum_k c_k t**k; the k-th
derivative along the direction is k! * c_k. ``None`` stands for an exact zero.

>>> import keras
>>> net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, activation="tanh"),
...                         keras.layers.Dense(1)])
>>> taylor_plan(net, [1], "float32") is not None
True
"""

from __future__ import annotations

import math
import sys

import tensorflow as tf

from .taylor_series import compose, poly_derivatives

# Keras activations that act elementwise (output i depends on input i only).
_ELEMENTWISE = (
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "log_sigmoid", "mish", "relu", "relu6", "selu",
    "sigmoid", "silu", "soft_shrink", "softplus", "softsign", "sparse_plus", "sparse_sigmoid",
    "squareplus", "swish", "tanh", "tanh_shrink", "threshold",
)
_ELEMENTWISE_LAYERS = ("ReLU", "LeakyReLU", "ELU", "PReLU")
_IDENTITY_LAYERS = ("InputLayer", "Dropout", "GaussianDropout", "GaussianNoise", "AlphaDropout",
                    "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "ActivityRegularization")


def _horner(coeffs, s):
    """sum_i coeffs[i] * s**i (Horner), with no work for zero coefficients."""
    while len(coeffs) > 1 and coeffs[-1] == 0:
        coeffs = coeffs[:-1]
    if len(coeffs) == 1:
        return tf.fill(tf.shape(s), tf.constant(coeffs[0], s.dtype))
    result = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        result = s if isinstance(result, float) and result == 1 else result * s
        if c:
            result = result + c
    return result


def _scaled(polys, first_m=1):
    """The polynomials divided by m! (m = first_m, first_m + 1, ...)."""
    return [[c / math.factorial(m) for c in p] for m, p in enumerate(polys, start=first_m)]


def _from_poly(fn, base_poly):
    def value_and_derivs(x, order):
        s = fn(x)
        return s, [_horner(p, s) for p in _scaled(poly_derivatives(base_poly, order))]
    return value_and_derivs


def _softplus(x, order):
    s = tf.sigmoid(x)  # softplus' = sigmoid, softplus^(m) = sigmoid^(m-1)
    higher = _scaled(poly_derivatives([0.0, 1.0, -1.0], order - 1), first_m=2)
    return tf.math.softplus(x), [s] + [_horner(p, s) for p in higher]


def _by_autograd(fn):
    """Taylor coefficients of an elementwise function by nested tapes on the function
    alone (gradient of the sum = the elementwise derivative)."""
    def value_and_derivs(x, order):
        tapes = [tf.GradientTape(persistent=True) for _ in range(order)]
        for t in tapes:
            t.__enter__()
            t.watch(x)
        y = fn(x)
        cur, ders = y, []
        for k in range(order):
            tape = tapes[order - 1 - k]
            tape.__exit__(None, None, None)
            cur = tape.gradient(cur, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            ders.append(cur if k == 0 else cur / math.factorial(k + 1))
        return y, ders
    return value_and_derivs


def _activation(fn):
    """value_and_derivs for a Keras activation function, or None if not elementwise."""
    keras = sys.modules["keras"]
    acts = keras.activations
    if fn is None or fn is acts.linear:
        return "identity"
    if fn is acts.tanh:
        return _from_poly(tf.tanh, [1.0, 0.0, -1.0])
    if fn is acts.sigmoid:
        return _from_poly(tf.sigmoid, [0.0, 1.0, -1.0])
    if fn is acts.softplus:
        return _softplus
    if any(fn is getattr(acts, name, None) for name in _ELEMENTWISE):
        return _by_autograd(fn)
    return None


def _flatten(model) -> list | None:
    from keras.src.models.sequential import Sequential

    if "call" in vars(model):  # replaced on the instance: that is what runs, not the class's
        return None
    if isinstance(model, Sequential):
        if type(model).call is not Sequential.call:
            return None
        out = []
        for layer in model.layers:
            sub = _flatten(layer)
            if sub is None:
                return None
            out += sub
        return out
    return [model]


def taylor_plan(model, widths, dtype):
    """A list of steps ('dense', layer, act) / ('act', fn) / ('scale', s, o) if ``model``
    qualifies (a one-input Sequential of Dense/elementwise layers computing in ``dtype``),
    else None."""
    keras = sys.modules.get("keras")
    if keras is None or len(widths) != 1 or not isinstance(model, keras.Sequential):
        return None
    layers = _flatten(model)
    if not layers:
        return None
    plan = []
    for layer in layers:
        kind = type(layer).__name__
        if str(getattr(layer, "compute_dtype", dtype)) != dtype:
            return None
        if kind in _IDENTITY_LAYERS and type(layer).__module__.startswith("keras."):
            continue
        if type(layer) is keras.layers.Dense:
            if layer.lora_enabled or layer.quantization_mode is not None:
                return None
            act = _activation(layer.activation)
            if act is None:
                return None
            plan.append(("dense", layer, act))
        elif type(layer) is keras.layers.Activation:
            act = _activation(layer.activation)
            if act is None:
                return None
            plan.append(("act", act))
        elif type(layer) is keras.layers.Rescaling:
            plan.append(("scale", layer))
        elif kind in _ELEMENTWISE_LAYERS and type(layer).__module__.startswith("keras."):
            plan.append(("act", _by_autograd(lambda z, layer=layer: layer(z, training=False))))
        else:
            return None
    return plan


def _apply_act(act, c, order):
    """Compose the series c with an activation whose value_and_derivs gives sigma(c0) and
    the Taylor coefficients sigma^(m)(c0) / m!, m = 1..order."""
    if act == "identity":
        return c
    y0, ders = act(c[0], order)
    return compose(y0, ders, c, order, scaled=True)

def _matmul(a, kernel):
    return tf.matmul(a, tf.cast(kernel, a.dtype))


def taylor_values(plan, X, order, direction):
    """{(): y, (0,)*k: d_k} along input ``direction``, each (n, d_out)."""
    width = X.shape[1]
    e = tf.one_hot([direction], width, dtype=X.dtype)  # (1, D), broadcast over points
    c = [X, e] + [None] * (order - 1)
    for step in plan:
        if step[0] == "dense":
            layer, act = step[1], step[2]
            z0 = _matmul(c[0], layer.kernel)
            if layer.bias is not None:
                z0 = z0 + tf.cast(layer.bias, X.dtype)
            c = _apply_act(act, [z0] + [None if ck is None else _matmul(ck, layer.kernel)
                                        for ck in c[1:]], order)
        elif step[0] == "scale":
            layer = step[1]
            scale, offset = (tf.cast(v, X.dtype) for v in (layer.scale, layer.offset))
            c = [c[0] * scale + offset] + [None if ck is None else ck * scale for ck in c[1:]]
        else:
            c = _apply_act(step[1], c, order)
    y = c[0]
    values = {(): y}
    for k in range(1, order + 1):
        ck = c[k]
        v = tf.zeros_like(y) if ck is None else ck * math.factorial(k) + tf.zeros_like(y)
        values[(0,) * k] = v
    return values
