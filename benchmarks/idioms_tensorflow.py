"""The hand-written TensorFlow / Keras 3 competitors of the benchmark, plus nbderiv itself.

Same interface as ``idioms_torch``: ``build_model``, ``as_tensor``, ``competitors``,
``truth``, ``versions``, ``set_threads``. Each competitor computes the per-point
derivatives of order K of a batch X (N, d_in) the way a user would write it by hand; an
untimed conversion brings its result to the layout (N, d_out) + (d_in,) * K.
Run as ``cd benchmarks && python -m doctest idioms_tensorflow.py``:

>>> net = build_model([(np.ones((1, 4), np.float32), np.zeros(4, np.float32)),
...                    (np.ones((4, 1), np.float32), np.zeros(1, np.float32))])
>>> np.asarray(nested_tape(net, tf.zeros((3, 1)), 1))[:, 0, 0].tolist()  # 4 * tanh'(0)
[4.0, 4.0, 4.0]
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from competitor import Competitor, from_multi  # noqa: E402

FRAMEWORK = "tensorflow"
tf.get_logger().setLevel("CRITICAL")  # pfor's retracing notices and failed-vectorising dumps


def set_threads(n: int):
    """``n`` threads for TensorFlow's op pools (0: TensorFlow's default). Call first."""
    if n:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)


# -- models -------------------------------------------------------------------------------
def build_model(weights, device="cpu", dtype="float32"):
    """A keras.Sequential tanh MLP from [(kernel (in, out), bias (out,)), ...] numpy weights."""
    layers = [keras.Input((weights[0][0].shape[0],), dtype=dtype)]
    for i, (kernel, _) in enumerate(weights):
        act = "tanh" if i + 1 < len(weights) else None
        layers.append(keras.layers.Dense(kernel.shape[1], activation=act, dtype=dtype))
    model = keras.Sequential(layers)
    model.set_weights([np.asarray(a, dtype=dtype) for pair in weights for a in pair])
    model._bench_weights = weights
    return model


def as_tensor(x: np.ndarray, device="cpu"):
    return tf.constant(x)


def synchronizer(device):
    return lambda: None


# -- the idioms ---------------------------------------------------------------------------
def forward(model, X):
    return model(X, training=False)


def nested_tape(model, X, K):
    """K nested GradientTapes, innermost first; tape.gradient of a (N,) column sums over the
    batch, which is the per-point derivative because points are independent."""
    d_in = X.shape[1]
    tapes = [tf.GradientTape(persistent=True) for _ in range(K)]
    for t in tapes:
        t.__enter__()
        t.watch(X)
    Y = model(X, training=False)
    d_out = Y.shape[1]
    level = [Y] if d_out == 1 else tf.unstack(Y, axis=1)
    for k in range(K):
        tape = tapes[K - 1 - k]
        tape.__exit__(None, None, None)
        nxt = []
        for T in level:
            g = tape.gradient(T, X)
            nxt.extend([g] if d_in == 1 else tf.unstack(g, axis=1))
        level = nxt
    out = tf.stack([tf.reshape(t, [-1]) for t in level], axis=1)
    return tf.reshape(out, [-1, d_out] + [d_in] * K)


def nested_batch_jacobian(model, X, K):
    """tape.batch_jacobian nested K times: (N, d_out, d_in, ..., d_in)."""
    tapes = [tf.GradientTape(persistent=False) for _ in range(K)]
    for t in tapes:
        t.__enter__()
        t.watch(X)
    out = model(X, training=False)
    for k in range(K):
        tape = tapes[K - 1 - k]
        tape.__exit__(None, None, None)
        out = tape.batch_jacobian(out, X)
    return out


def forward_accumulators(model, X, K):
    """Nested tf.autodiff.ForwardAccumulator along one-hot directions (forward mode with the
    per-point trick): one chain per distinct multi-index of the order-K partials."""
    d_in = X.shape[1]
    out = {}
    for idx in itertools.combinations_with_replacement(range(d_in), K):
        accs = []
        for i in idx:
            tangent = tf.one_hot(tf.fill([tf.shape(X)[0]], i), d_in, dtype=X.dtype)
            acc = tf.autodiff.ForwardAccumulator(X, tangent)
            acc.__enter__()
            accs.append(acc)
        value = model(X, training=False)
        for acc in reversed(accs):
            acc.__exit__(None, None, None)
        for acc in reversed(accs):
            value = acc.jvp(value)
        out[idx] = value
    return out


def naive_full(model, X, K):
    """The full Jacobian of the batch with tape.jacobian, (N, d_out, N, d_in) (and its Jacobian
    again for K = 2), of which only the diagonal blocks are wanted."""
    n = X.shape[0]
    idx = tf.stack([tf.range(n), tf.range(n)], axis=1)

    def diag(J):  # (N, a, N, b) -> (N, a, b)
        perm = [0, 2] + [i for i in range(J.shape.rank) if i not in (0, 2)]
        return tf.gather_nd(tf.transpose(J, perm), idx)

    with tf.GradientTape() as outer:
        outer.watch(X)
        with tf.GradientTape() as inner:
            inner.watch(X)
            Y = model(X, training=False)
        J1 = diag(inner.jacobian(Y, X))                              # (N, d_out, d_in)
    if K == 1:
        return J1
    J2 = outer.jacobian(J1, X)                                       # (N, d_out, d_in, N, d_in)
    perm = [0, 3, 1, 2, 4]
    return tf.gather_nd(tf.transpose(J2, perm), idx)


def naive_units(n, d_out, d_in, K):
    inner = 2.0 * n * d_out
    return inner if K == 1 else 3 * inner + 2.0 * inner * n * d_out * d_in


# -- layouts ------------------------------------------------------------------------------
def _numpy(t):
    return np.asarray(t)


def _from_multi(values, n, d_out, d_in, K):
    return from_multi(values, n, d_out, d_in, K, to_numpy=_numpy)


_TRACED: dict = {}


def _traced(model, K, what, fn, X):
    """One tf.function per model, order and idiom, any N (as a user would define it once)."""
    key = (id(model), K, what)
    if key not in _TRACED:
        _TRACED[key] = tf.function(fn, input_signature=[tf.TensorSpec([None, X.shape[1]],
                                                                      X.dtype)])
    return _TRACED[key]


# -- the list -----------------------------------------------------------------------------
def competitors(model, X, K, device="cpu", nbderiv_module=None):
    """The competitors for order K on batch X (a tf.Tensor)."""
    n, d_in = X.shape
    d_out = model(X[:2], training=False).shape[1]
    hidden = sum(layer.units for layer in model.layers) - d_out
    act = 4 * 4 * (hidden + d_in)  # bytes per point and propagated vector
    nested = 2 + sum(3 * d_out * d_in ** k for k in range(K - 1))  # graphs nested tapes keep

    def per_vectors(vectors):
        return lambda m: m * vectors * act

    traced_tape = _traced(model, K, "tape", lambda Z: nested_tape(model, Z, K), X)
    traced_fwd = _traced(model, K, "fwd", lambda Z: forward_accumulators(model, Z, K), X)
    traced_forward = _traced(model, 0, "forward", lambda Z: model(Z, training=False), X)
    std = _numpy
    def multi(v):
        return (_from_multi(v, n, d_out, d_in, K))
    c = [Competitor("forward", "forward", lambda: forward(model, X)),
         Competitor("forward (tf.function)", "forward-info", lambda: traced_forward(X)),
         Competitor("GradientTape nested (eager)", "idiom", lambda: nested_tape(model, X, K), std,
                    bytes_at=per_vectors(nested)),
         ]
    if K <= 3 and (K == 1 or d_out * d_in ** (K - 1) <= 16):
        # order 4: vectorising a four-fold nested batch_jacobian takes ~10 s per call even for
        # 50 points (pfor re-traces every call); for 501 outputs at order 2 it runs past 20 s
        # at 100 points: left out there
        c += [Competitor("batch_jacobian nested (eager)", "idiom",
                         lambda: nested_batch_jacobian(model, X, K), std,
                         bytes_at=per_vectors(d_out * (2 * d_in) ** K))]
    if d_out * d_in ** (K - 1) <= 16:
        # one traced gradient call per output and partial: tracing 501 of them (model C)
        # takes over a minute, so that case is left out
        c.insert(3, Competitor("GradientTape nested (tf.function)", "idiom", lambda: traced_tape(X),
                               std, bytes_at=per_vectors(nested)))
    if K <= 2:
        # Order >= 3: nested accumulators raise IndexError inside tf.function (TF 2.21) and
        # take seconds per call eagerly even for 50 points, so they are left out there.
        c += [Competitor("ForwardAccumulator nested (eager)", "idiom",
                         lambda: forward_accumulators(model, X, K), multi,
                         bytes_at=per_vectors(2 ** K)),
              Competitor("ForwardAccumulator nested (tf.function)", "idiom",
                         lambda: traced_fwd(X), multi, bytes_at=per_vectors(2 ** K))]
    if K <= 2:
        c += [Competitor("tape.jacobian (full)", "naive", lambda: naive_full(model, X, K), std,
                         scaling=K + 1, mem_scaling=2,
                         bytes_at=lambda m: 4.0 * m * m * d_out * d_in ** K * 4,
                         units_at=lambda m: naive_units(m, d_out, d_in, K))]
    if nbderiv_module is not None:
        c += [Competitor("nbderiv", "nbderiv",
                         lambda: nbderiv_module.derivatives(model, X, order=K, progress=False),
                         lambda d: d[K])]
    return c


# -- float64 truth ------------------------------------------------------------------------
def truth(model, X, K):
    """Order-K derivatives in float64 on a float64 copy of the weights, by eager nested
    GradientTapes (nested ForwardAccumulators for many outputs): independent of nbderiv.
    (N, d_out) + (d_in,) * K."""
    m64 = build_model(model._bench_weights, dtype="float64")
    X64 = tf.cast(X, tf.float64)
    n, d_in = X.shape
    d_out = m64(X64[:1], training=False).shape[1]
    if d_out * d_in ** (K - 1) <= 16:
        return np.asarray(nested_tape(m64, X64, K))
    return _from_multi(forward_accumulators(m64, X64, K), n, d_out, d_in, K)


def tensor_memory_reset():
    """Start a new peak of TensorFlow's CPU allocator statistics."""
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except Exception:  # the default allocator keeps no statistics
        pass


def tensor_memory_mb():
    """(current, peak) MB of TensorFlow tensors on the CPU, or None where the allocator keeps
    no statistics (only TensorFlow's BFC allocator does). NumPy arrays are not counted."""
    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except Exception:
        return None
    if not info.get("peak"):
        return None
    return info["current"] / 2**20, info["peak"] / 2**20


def versions() -> dict:
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}
