"""The TensorFlow computations behind the backend, each a plain function of the feature
matrix X (n, D) that runs eagerly or inside ``tf.function``: nested tapes (reverse mode, the
ones trick), nested forward accumulators, Taylor mode (``tensorflow_taylor``), the kink
search; and how one is chosen (:func:`choose_methods`).

>>> import tensorflow as tf
>>> values = reverse_values(tf.sin, tf.zeros((2, 1), tf.float64), 1, (0,), 1)
>>> values[(0,)].numpy().ravel().tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
import tensorflow as tf

from ..inputs import check_output, check_target
from .base import sorted_multi_indices
from .tensorflow_graphs import cache_for, cache_key, model_ref
from .tensorflow_keras import invoke
from .tensorflow_taylor import taylor_values

ZERO = tf.UnconnectedGradients.ZERO
# operations whose first derivative jumps, and where (values of the first input; Maximum /
# Minimum: where the inputs tie; ClipByValue: at its bounds; the comparisons that pick the
# pieces of a hand-written piecewise function, tf.where(h > 0, h, 0.1 * h): where the two
# sides are equal, a candidate that the one-sided slopes confirm or not)
TIES = ("Maximum", "Minimum", "Greater", "GreaterEqual", "Less", "LessEqual")
# a max / min over each point's axes (reduce_max, max pooling): a kink where the largest
# values tie
REDUCTIONS = ("Max", "Min", "MaxPool")
KINKS = {"Relu": (0.0,), "LeakyRelu": (0.0,), "Relu6": (0.0, 6.0), "Abs": (0.0,),
         "Selu": (0.0,), "Sign": (0.0,), "ClipByValue": (), **{t: () for t in TIES},
         **{t: () for t in REDUCTIONS}}
FORWARD = "forward-jvp"
REVERSE = "reverse-ones"
BATCHED = "reverse-batched"  # nested reverse mode, a level's cotangents at once (tag: REVERSE)
TAYLOR = "taylor"
BATCH_MIN = 8  # fewer cotangents in every level: one tape.gradient each is as fast


@contextlib.contextmanager
def exact_moments():
    """Keras' normalization layers get their mean and variance from ``tf.nn.moments``, which
    stops the gradient through the mean inside the variance: exact for first derivatives
    (d var / d mean = 0), wrong for second and higher ones. While nbderiv traces and runs its
    computations, Keras and ``tf.nn.moments`` called in a model's own code use the plain
    formula instead; the originals are put back after."""
    module = sys.modules.get("keras.src.backend.tensorflow.nn")
    original = getattr(module, "_compute_moments", None)
    public = tf.nn.moments  # and tf.nn.moments called in the model's own code
    if original is not None:
        module._compute_moments = _plain_moments
    tf.nn.moments = _plain_public_moments
    try:
        yield
    finally:
        tf.nn.moments = public
        if original is not None:
            module._compute_moments = original


def _plain_public_moments(x, axes, shift=None, keepdims=False, name=None):
    """``tf.nn.moments`` by the plain formula (its own stops the gradient through the mean
    inside the variance: second derivatives wrong)."""
    return _plain_moments(x, axes, keepdims)


def _plain_moments(x, axes, keepdims):
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


# -- the computations (run eagerly or inside tf.function) ------------------------------
def _split(X, shapes):
    """The (n, D) features as the model's arguments, each (n, *S_i)."""
    widths = [math.prod(s) for s in shapes]
    parts = tf.split(X, widths, axis=1) if len(widths) > 1 else [X]
    return [p if len(s) == 1 else tf.reshape(p, (-1,) + tuple(s))
            for p, s in zip(parts, shapes)]


def reverse_values(fn, X, order, wrt, d_out):
    """Nested tapes, per-point by the ones trick: the gradient of sum_n T[n, j] with respect to
    X is every point's own gradient, because point n's output depends only on X[n]."""
    m = len(wrt)
    n = tf.shape(X)[0]
    seeds = [None] if d_out == 1 else [
        tf.one_hot(tf.fill([n], j), d_out, dtype=X.dtype) for j in range(d_out)]

    def level(k):
        if k == 0:
            return {(): fn(X)}
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(X)
            lower = level(k - 1)
        out = dict(lower)
        for idx, T in lower.items():
            if len(idx) != k - 1:
                continue
            cols = [tape.gradient(T, X, output_gradients=s, unconnected_gradients=ZERO)
                    for s in seeds]
            G = tf.stack(cols, axis=1)  # (n, d_out, D)
            for p in range(idx[-1] if idx else 0, m):
                out[idx + (p,)] = G[:, :, wrt[p]]
        return out

    return level(order)


def level_keys(keys, m):
    """The pairs (f, p) that extend the multi-indices ``keys`` of one level by p >= their
    last index (the distinct partials of the next level), in the order of the next level."""
    return [(f, p) for f, idx in enumerate(keys) for p in range(idx[-1] if idx else 0, m)]


def batched_keys(order, m) -> list:
    """The multi-indices of each level 1..order of :func:`batched_values`, in its order."""
    keys, out = [()], []
    for _ in range(order):
        keys = [keys[f] + (p,) for f, p in level_keys(keys, m)]
        out.append(keys)
    return out


def batched_values(fn, X, order, wrt, d_out):
    """Nested reverse mode like :func:`reverse_values`, each level one
    ``tape.batch_jacobian`` (vectorised over its cotangents by ``pfor``) instead of one
    ``tape.gradient`` per cotangent: {(): y, ("level", k): (n, L_k, d_out)}, the level-k
    partials in the order of :func:`batched_keys` (tuple keys: ``tf.function`` sorts them). Traces in a fraction of the time for recurrent and
    convolutional models (one gradient graph instead of one per cotangent)."""
    m, width = len(wrt), X.shape[1]

    def level(k):
        if k == 0:
            y = fn(X)
            return {(): y}, [()], y[:, None, :]
        with tf.GradientTape() as tape:
            tape.watch(X)
            out, keys, S = level(k - 1)
            flat = tf.reshape(S, (-1, len(keys) * d_out))
        J = tape.batch_jacobian(flat, X, unconnected_gradients=ZERO)  # (n, F * d_out, D)
        J = tf.transpose(tf.reshape(J, (-1, len(keys), d_out, width)), (1, 3, 0, 2))
        pairs = level_keys(keys, m)
        picked = tf.gather_nd(J, [[f, wrt[p]] for f, p in pairs])  # (L, n, d_out)
        out[("level", k)] = S = tf.transpose(picked, (1, 0, 2))
        return out, [keys[f] + (p,) for f, p in pairs], S

    return level(order)[0]


def forward_values(fn, X, order, wrt):
    """Nested forward accumulators: a chain of ``order`` directional derivatives along
    inputs i1 <= ... <= iK also yields every lower-order partial of its suffixes."""
    n, width = tf.shape(X)[0], X.shape[1]
    basis = [tf.one_hot(tf.fill([n], i), width, dtype=X.dtype) for i in wrt]

    def nest(chain):
        if not chain:
            return [fn(X)]
        with tf.autodiff.ForwardAccumulator(X, basis[chain[0]]) as acc:
            inner = nest(chain[1:])
        return inner + [acc.jvp(inner[-1], unconnected_gradients=ZERO)]

    values = {}
    for chain in sorted_multi_indices(len(wrt), order):
        suffixes = [chain[order - j:] for j in range(order + 1)]
        if all(s in values for s in suffixes):
            continue
        for s, v in zip(suffixes, nest(chain)):
            values.setdefault(s, v)
    return values


def kink_hits(fn, X):
    """Inside a trace: (True for points where an input of a piecewise operation is at its
    kink (:data:`KINKS`: Relu, Abs, Maximum / Minimum ties, clip bounds, comparisons, ...),
    the number of such operations applied to floating-point values of the points)."""
    graph = tf.compat.v1.get_default_graph()
    seen = {id(op) for op in graph.get_operations()}
    fn(X)
    hits, count = tf.zeros(tf.shape(X)[:1], dtype=tf.bool), 0
    for op in graph.get_operations():
        if id(op) in seen or op.type not in KINKS or not op.inputs[0].dtype.is_floating:
            continue
        at = _at_kink(op)
        if at is None:
            continue
        if at.shape.rank is None or at.shape.rank < 1 or at.shape[0] is not None:
            continue  # not batch-major (e.g. a constraint on weights)
        count += 1
        hits = tf.logical_or(hits, tf.reduce_any(tf.reshape(at, (tf.shape(at)[0], -1)), axis=1))
    return hits, count


def _at_kink(op):
    """Where the operation's input sits at its kink (a bool tensor shaped like its output)."""
    z = op.inputs[0]
    if op.type in REDUCTIONS:
        return _tied(op)
    if op.type in TIES:  # a tie between the two inputs
        return tf.equal(z, op.inputs[1])
    if op.type == "ClipByValue":  # at either bound
        return tf.logical_or(tf.equal(z, op.inputs[1]), tf.equal(z, op.inputs[2]))
    at = tf.zeros_like(z, dtype=tf.bool)
    for k in KINKS[op.type]:
        at = tf.logical_or(at, tf.equal(z, tf.cast(k, z.dtype)))
    return at


def _tied(op):
    """Where the largest value a max / min over each point's axes (Max, Min) or a max-pooling
    window (MaxPool, NHWC) picks is held twice, not at an exact 0 of a ReLU's output (a
    window of dead ReLU units ties there with no slope on either side; zeros of the input
    itself, a black background, do move); None for a reduction over the points or a form
    not read here."""
    z = op.inputs[0]
    dead = _relu_output(z)
    if op.type == "Min":
        z = -z
    if op.type in ("Max", "Min"):
        axes = tf.get_static_value(op.inputs[1])
        rank = z.shape.rank
        if axes is None or rank is None or rank < 2:
            return None
        axes = [int(a) % rank for a in np.atleast_1d(axes)]
        if not axes or 0 in axes:
            return None
        top = tf.reduce_max(z, axis=axes, keepdims=True)
        count = tf.reduce_sum(tf.cast(tf.equal(z, top), tf.int32), axis=axes, keepdims=True)
        return tf.logical_and(count >= 2, tf.not_equal(top, 0)) if dead else count >= 2
    if op.get_attr("data_format") != b"NHWC" or z.shape.rank != 4:
        return None
    ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
    if ksize[0] != 1 or ksize[3] != 1 or strides[0] != 1 or strides[3] != 1:
        return None
    channels = z.shape[3]
    patches = tf.image.extract_patches(z, [1, ksize[1], ksize[2], 1], strides, [1, 1, 1, 1],
                                       op.get_attr("padding").decode())
    shape = tf.shape(patches)
    windows = tf.reshape(patches, tf.concat([shape[:3], [ksize[1] * ksize[2], channels]], 0))
    top = tf.reduce_max(windows, axis=3, keepdims=True)
    count = tf.reduce_sum(tf.cast(tf.equal(windows, top), tf.int32), axis=3)
    return tf.logical_and(count >= 2, tf.not_equal(top[:, :, :, 0], 0)) if dead else count >= 2


def _relu_output(t) -> bool:
    """Whether the tensor is a ReLU's output (through reshapes and identities), whose zeros
    are dead units: no slope on either side."""
    for _ in range(6):
        kind = t.op.type
        if kind in ("Relu", "Relu6"):
            return True
        if kind not in ("Identity", "Reshape", "ExpandDims", "Squeeze", "Transpose") \
                or not t.op.inputs:
            return False
        t = t.op.inputs[0]
    return False


def caller(call, d_out=None, raw=False):
    """fn(X (n, D)) -> (n, d_out) in X's dtype: splits the features into the model's
    arguments, each (n, *S_i), and the call's extras (keyword arguments, the target). Without
    ``d_out`` the output is validated (eager calls; ``raw=True`` keeps its own shape (n, *O));
    with it, it is only reshaped (inside traces)."""
    ref = model_ref(call.model)
    shapes = [tuple(s) for s in call.point_shapes]
    n_in, extras, constants = call.n_inputs, call.extras, dict(call.constants)
    check_targets(call)  # a trace is built once: its own runs check nothing
    largest, width_key = _largest_target(call), _outputs_key(call)  # (fn holds no call)

    def fn(X):
        parts = _split(X, shapes)
        kwargs, target = dict(constants), None
        for extra, p in zip(extras, parts[n_in:]):
            value = tf.reshape(tf.stop_gradient(p), (-1,) + tuple(extra.shape))
            value = tf.not_equal(value, 0) if extra.dtype == "bool" else \
                tf.cast(value, extra.dtype)
            if extra.name:
                kwargs[extra.name] = value
            else:
                target = value
        out = invoke(ref(), parts[:n_in], kwargs)
        if d_out is None:
            out = _as_output(out, X.shape[0], raw and target is None)
            if target is not None:  # every target of the call, not only this batch's
                cache_for(ref())[width_key] = int(out.shape[1])
                check_target(max(int(tf.reduce_max(target)), largest), int(out.shape[1]))
        elif target is None:
            out = tf.reshape(tf.convert_to_tensor(out), (-1, d_out))
        else:  # the model's own outputs, one row per point, before the target picks one
            out = tf.reshape(tf.convert_to_tensor(out), (tf.shape(X)[0], -1))
        if target is not None:
            out = tf.gather(tf.reshape(out, (tf.shape(out)[0], -1)), target, batch_dims=1)[:, None]
        return tf.cast(out, X.dtype) if out.dtype.is_floating and out.dtype != X.dtype else out
    return fn


def check_targets(call) -> None:
    """Every target of ``call`` names one of the model's own outputs, as far as an eager call
    on these input shapes has counted them (a traced computation cannot check: it is built
    once and reused with other targets, and ``tf.gather`` fails deep inside the graph on the
    CPU, or gives zeros on a GPU)."""
    largest = _largest_target(call)
    width = cache_for(call.model).get(_outputs_key(call)) if largest >= 0 else None
    if width is not None:
        check_target(largest, width)


def _largest_target(call) -> int:
    """The largest target of the call's points, -1 without ``target=``."""
    for extra, column in zip(call.extras, call.args[call.n_inputs:]):
        if not extra.name and column.size:
            return int(column.max())
    return -1


def _outputs_key(call):
    """Where the number of the model's own outputs (before the target picks one) is kept:
    it follows the inputs' shapes and the keyword arguments."""
    shapes = tuple(tuple(s) for s in call.point_shapes[:call.n_inputs])
    named = tuple(e for e in call.extras if e.name)
    constants = tuple((k, id(v)) for k, v in sorted(call.constants.items()))
    return cache_key(call.model, "own outputs", shapes, named, constants, call.dtype.name)


def _as_output(out, n, raw=False):
    """Validate what the model returned and reshape it to (n, d_out) (``raw``: keep it)."""
    if not (isinstance(out, (tf.Tensor, tf.Variable)) or tf.is_tensor(out)):
        check_output(None, False, "", n, type(out).__name__, out)
    out = tf.convert_to_tensor(out)
    shape = check_output(tuple(out.shape), out.dtype.is_floating or out.dtype.is_complex,
                         out.dtype.name, n)
    return out if raw else tf.reshape(out, shape)


def builder(method, fn, plan, order, wrt, d_out):
    """The Python function of one strategy: X -> {multi-index: values}, () for y."""
    if method == TAYLOR:
        return lambda X: taylor_values(plan, X, order, wrt[0])
    if method == FORWARD:
        return lambda X: forward_values(fn, X, order, wrt)
    if method == BATCHED:
        return lambda X: batched_values(fn, X, order, wrt, d_out)
    return lambda X: reverse_values(fn, X, order, wrt, d_out)


def choose_methods(d_out: int, m: int, order: int, taylor: bool) -> list:
    """Strategies to try, best first. Measured (2 shared CPU cores, float32, N = 10 000,
    model 1-64-64-64-1 tanh, traced, cost in forward passes at orders 1..4): nested tapes
    1.3 / 2.7 / 6.4 / 27, Taylor mode 1.5 / 2.1 / 3.5 / 5.9, nested forward accumulators
    1.8 / 4.0 / 27 / 215; for 501 outputs (1-50-50-50-501) Taylor 1.3 / 1.5 / 4.5 / 7,
    accumulators 1.9 / 3.7, tapes over 200 at order 1. Accumulators nested three deep or
    more are slow and fragile in TensorFlow: forward mode is used at orders 1 and 2 only.
    Where a level has at least :data:`BATCH_MIN` cotangents (many outputs at order 1, many
    inputs above), each level is one ``batch_jacobian`` (:func:`batched_values`): measured
    for a Keras CNN at 3x32x32 with 10 outputs and an LSTM on (20, 8) at order 2
    (``benchmarks/real_models.py``), it traces and runs several times faster than one
    ``tape.gradient`` per cotangent."""
    if taylor and (order >= 2 or d_out > 1):
        return [TAYLOR, REVERSE]
    if d_out > m and order <= 2:
        return [FORWARD, REVERSE]
    if (d_out if order == 1 else d_out * m) >= BATCH_MIN:
        return [BATCHED, REVERSE]
    return [REVERSE]
