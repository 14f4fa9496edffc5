"""The Keras / TensorFlow backend, checked against independent references.

References: closed forms (polynomials, sin, a one-hidden-layer tanh net written out in
numpy), float64 central finite differences of the model's own forward pass, and plain
nested ``tf.GradientTape`` / ``batch_jacobian`` code written here. The models cover every
kind (Sequential, functional, subclassed, ``tf.Module``, plain callable) and every internal
strategy (Taylor mode, nested tapes, nested forward accumulators). Then: nothing the user
owns changes, traces are reused, and the laziness / quietness promises hold in fresh
interpreters.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import textwrap
import warnings
import weakref

import numpy as np
import pytest
from checks import assert_close

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

import nbderiv  # noqa: E402
from nbderiv import compute  # noqa: E402
from nbderiv.backends import tensorflow as tfb  # noqa: E402
from nbderiv.backends import tensorflow_graphs as graphs  # noqa: E402
from nbderiv.backends import tensorflow_math as tfmath  # noqa: E402
from nbderiv.call import Verdict  # noqa: E402
from nbderiv.errors import InputShapeError, OutputError  # noqa: E402

SUBPROCESS_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")


def dense(units, act=None, seed=0, dtype=None):
    return keras.layers.Dense(
        units, activation=act, dtype=dtype,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed + 100))


def mlp(sizes, act="tanh", dtype=None, seed=0):
    layers = [keras.Input((sizes[0],), dtype=dtype)]
    for i, units in enumerate(sizes[1:]):
        last = i == len(sizes) - 2
        layers.append(dense(units, None if last else act, seed + i, dtype))
    return keras.Sequential(layers)


def keras_fn(model):
    """numpy (N, D) float64 -> numpy (N, d_out) float64 through the model itself."""
    return lambda X: np.asarray(model(X, training=False), dtype=np.float64).reshape(len(X), -1)


# -- a one-hidden-layer tanh net: orders 1..4 against its closed form ---------------------
def tanh_derivative_polys(order):
    """P_k with tanh^(k)(z) = P_k(tanh z), from P_{k+1} = P_k' (1 - s^2)."""
    polys = [np.polynomial.Polynomial([0, 1])]
    for _ in range(order):
        polys.append(polys[-1].deriv() * np.polynomial.Polynomial([1, 0, -1]))
    return polys


def one_hidden_closed_form(model, x, order):
    W1, b1, W2, b2 = [w.astype(np.float64) for w in model.get_weights()]
    z = x[:, None] * W1[0] + b1  # (N, h)
    s = np.tanh(z)
    polys = tanh_derivative_polys(order)
    return [(polys[k](s) * W1[0] ** k) @ W2 for k in range(1, order + 1)]


@pytest.fixture(scope="module")
def one_hidden64():
    return mlp([1, 12, 2], dtype="float64", seed=3)


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_one_hidden_layer_orders_1_to_4_match_closed_form(one_hidden64, kind):
    seq = one_hidden64
    if kind == "functional":
        inp = keras.Input((1,), dtype="float64")
        model = keras.Model(inp, seq.layers[1](seq.layers[0](inp)))
    elif kind == "subclassed":
        class Net(keras.Model):
            def __init__(self, first, second):
                super().__init__(dtype="float64")
                self.first, self.second = first, second

            def call(self, x):
                return self.second(self.first(x))
        model = Net(seq.layers[0], seq.layers[1])
    else:
        model = seq
    x = np.linspace(-1.5, 1.5, 9)
    d = nbderiv.derivatives(model, x, order=4)
    assert d.framework == "tensorflow" and d[4].shape == (9, 2, 1, 1, 1, 1)
    assert d[1].dtype == np.float64
    refs = one_hidden_closed_form(seq, x, 4)
    for k in range(1, 5):
        assert_close(d[k].reshape(9, 2), refs[k - 1], 1e-10, f"{kind} d[{k}]")
    assert d.method == ("taylor" if kind == "sequential" else "reverse-ones")


# -- closed forms through callables and Lambda layers --------------------------------------
def test_cubic_closed_form_through_callable_and_lambda():
    f = lambda x: x**3 + 2 * x**2 + 1  # noqa: E731
    d = nbderiv.derivatives(f, np.array([2.0]), order=2, framework="tensorflow")
    assert d.framework == "tensorflow"
    assert (d[1].item(), d[2].item()) == (20.0, 16.0)
    d = nbderiv.derivatives(f, tf.constant([2.0]), order=4)  # framework from the tensor
    assert [d[k].item() for k in range(1, 5)] == [20.0, 16.0, 6.0, 0.0]
    lam = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(f)])
    d = nbderiv.derivatives(lam, [2.0], order=2)
    assert (d[1].item(), d[2].item()) == (20.0, 16.0)


def test_sin_orders_3_and_4_and_gradient_hessian_of_x1sq_sin_x2():
    x = np.linspace(0, 3, 11)
    d = nbderiv.derivatives(tf.sin, x, order=4, framework="tensorflow")
    assert_close(d[3][:, 0, 0, 0, 0], -np.cos(x), 1e-12, "sin'''")
    assert_close(d[4][:, 0, 0, 0, 0, 0], np.sin(x), 1e-12, "sin''''")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 2))
    d = nbderiv.derivatives(lambda z: z[:, :1] ** 2 * tf.sin(z[:, 1:]), X, order=2,
                            framework="tensorflow")
    x1, x2 = X[:, 0], X[:, 1]
    assert_close(d[1][:, 0], np.stack([2 * x1 * np.sin(x2), x1**2 * np.cos(x2)], 1), 1e-12)
    hess = np.stack([np.stack([2 * np.sin(x2), 2 * x1 * np.cos(x2)], 1),
                     np.stack([2 * x1 * np.cos(x2), -x1**2 * np.sin(x2)], 1)], 1)
    assert_close(d[2][:, 0], hess, 1e-12, "Hessian")


def test_tf_module_wrt_and_order_3():
    class Poly(tf.Module):
        def __init__(self):
            self.w = tf.Variable([[1.0], [2.0], [3.0]], dtype=tf.float64)

        def __call__(self, x):
            return tf.sin(x @ self.w)  # sin(a.x), a = (1, 2, 3)

    X = np.random.default_rng(1).normal(size=(7, 3))
    d = nbderiv.derivatives(Poly(), X, order=3, wrt=[2, 0])
    a = np.array([3.0, 1.0])  # the coefficients of the inputs asked for, in wrt's order
    u = X @ np.array([1.0, 2.0, 3.0])
    assert d.inputs == ("x[2]", "x[0]") and d[3].shape == (7, 1, 2, 2, 2)
    assert_close(d[1][:, 0], np.cos(u)[:, None] * a, 1e-12, "d1")
    assert_close(d[3][:, 0], -np.cos(u)[:, None, None, None] * np.einsum("i,j,k->ijk", a, a, a),
                 1e-12, "d3")


# -- MLPs against float64 central differences, every strategy -----------------------------
@pytest.mark.parametrize("sizes,kind,wrt,method", [
    ([3, 16, 16, 2], "sequential", None, "reverse-ones"),    # 3 inputs: nested tapes
    ([1, 8, 40], "functional", None, "forward-jvp"),         # many outputs: accumulators
    ([3, 8, 5], "functional", [2, 0], "forward-jvp"),        # ... along two of three inputs
    ([1, 8, 40], "sequential", None, "taylor"),              # Taylor, one direction
])
def test_mlps_match_central_differences(central_fd, sizes, kind, wrt, method):
    seq = mlp(sizes, dtype="float64", seed=5)
    model = seq if kind == "sequential" else keras.Model(seq.inputs[0], seq.outputs[0])
    X = np.random.default_rng(2).uniform(-1, 1, size=(25, sizes[0]))
    d = nbderiv.derivatives(model, X, order=2, wrt=wrt)
    assert d.method == method
    fn = keras_fn(model)
    w = wrt or list(range(sizes[0]))
    ref1, ref2 = central_fd(fn, X, 1)[:, :, w], central_fd(fn, X, 2)[:, :, w][:, :, :, w]
    assert_close(d[1], ref1, 1e-7, "d1 vs FD")
    assert_close(d[2], ref2, 1e-5, "d2 vs FD")


def plain_tapes(model, x, order):
    """[d1, ..., d_order], each (N, d_out), for one input feature: nested GradientTapes,
    one gradient per output column, written out independently of nbderiv."""
    X = tf.constant(np.asarray(x, dtype=np.float64)[:, None])
    tapes = [tf.GradientTape(persistent=True) for _ in range(order)]
    for tape in tapes:
        tape.__enter__()
        tape.watch(X)
    cols = tf.unstack(tf.reshape(model(X), (len(x), -1)), axis=1)
    out = []
    for tape in reversed(tapes):
        tape.__exit__(None, None, None)
        cols = [tape.gradient(c, X)[:, 0] for c in cols]
        out.append(np.stack([c.numpy() for c in cols], 1))
    return out


@pytest.mark.parametrize("layers", [
    ["sigmoid", "softplus"], ["silu", "gelu"], ["elu", "selu"],
    ["Activation:tanh", "LeakyReLU"], ["Rescaling", "mish"]])
def test_taylor_mode_activations_match_plain_nested_tapes(layers):
    stack = [keras.Input((1,), dtype="float64")]
    for i, name in enumerate(layers):
        if name == "Rescaling":
            stack.append(keras.layers.Rescaling(0.5, offset=0.25, dtype="float64"))
        elif name == "LeakyReLU":
            stack += [dense(6, None, i, "float64"), keras.layers.LeakyReLU(dtype="float64")]
        elif name.startswith("Activation:"):
            stack += [dense(6, None, i, "float64"),
                      keras.layers.Activation(name.split(":")[1], dtype="float64")]
        else:
            stack.append(dense(6, name, i, "float64"))
    seq = keras.Sequential(stack + [dense(2, None, 9, "float64")])
    x = np.linspace(-1.3, 1.7, 11)
    d = nbderiv.derivatives(seq, x, order=3)
    assert d.method == "taylor"
    refs = plain_tapes(seq, x, 3)
    for k in range(1, 4):
        assert_close(d[k].reshape(11, 2), refs[k - 1], 1e-10, f"{layers} d[{k}]")


def test_wrt_one_of_three_inputs_in_taylor_mode(central_fd):
    seq = mlp([3, 12, 2], dtype="float64", seed=8)
    X = np.random.default_rng(9).normal(size=(10, 3))
    d = nbderiv.derivatives(seq, X, order=2, wrt=[1])
    assert d.method == "taylor" and d.inputs == ("x[1]",) and d[2].shape == (10, 2, 1, 1)
    fn = keras_fn(seq)
    assert_close(d[1], central_fd(fn, X, 1)[:, :, 1:2], 1e-7, "d1 wrt x[1]")
    assert_close(d[2], central_fd(fn, X, 2)[:, :, 1:2, 1:2], 1e-5, "d2 wrt x[1]")


def test_higher_orders_of_a_deep_mlp_match_plain_nested_tapes():
    seq = mlp([1, 16, 16, 2], dtype="float64", seed=7)
    X = tf.constant(np.linspace(-1, 1, 13)[:, None])
    r3 = plain_tapes(seq, X.numpy()[:, 0], 3)[2]
    d = nbderiv.derivatives(seq, X, order=3)
    func = keras.Model(seq.inputs, seq.outputs)  # inputs as a list of one: called as built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d_rev = nbderiv.derivatives(func, X, order=3)
    assert (d.method, d_rev.method) == ("taylor", "reverse-ones")
    assert_close(d[3].reshape(13, 2), r3, 1e-10, "taylor d3")
    assert_close(d_rev[3].reshape(13, 2), r3, 1e-10, "reverse d3")


def test_forward_mode_failure_falls_back_to_reverse(monkeypatch):
    f = lambda x: tf.concat([x**3 * (j + 1) for j in range(4)], axis=1)  # noqa: E731
    x = np.array([2.0, -1.0])
    assert nbderiv.derivatives(f, x, order=2, framework="tensorflow").method == "forward-jvp"

    def missing_rule(*args):
        raise NotImplementedError("no forward-mode rule for some op")

    monkeypatch.setattr(tfmath, "forward_values", missing_rule)
    g = lambda x: tf.concat([x**3 * (j + 1) for j in range(4)], axis=1)  # noqa: E731
    d = nbderiv.derivatives(g, x, order=2, framework="tensorflow")
    assert d.method == "reverse-ones"
    scale = np.arange(1, 5)
    assert_close(d[1][:, :, 0], 3 * x[:, None] ** 2 * scale, 1e-12)
    assert_close(d[2][:, :, 0, 0], 6 * x[:, None] * scale, 1e-12)


def test_untraceable_callable_runs_eagerly():
    def f(x):
        if float(tf.reduce_max(x).numpy()) > -1e9:  # Python on values: cannot be traced
            return tf.exp(2 * x)
        return x

    x = np.array([0.0, 0.5])
    d = nbderiv.derivatives(f, x, order=2, framework="tensorflow")
    assert_close(d[2][:, 0, 0, 0], 4 * np.exp(2 * x), 1e-12)


# -- several inputs, names, multi-output --------------------------------------------------
def test_functional_model_with_named_inputs_x_and_t(central_fd):
    xi, ti = keras.Input((1,), name="x", dtype="float64"), keras.Input((1,), name="t",
                                                                       dtype="float64")
    h = keras.layers.Concatenate(dtype="float64")([xi, ti])
    h = dense(16, "tanh", 1, "float64")(h)
    model = keras.Model([xi, ti], dense(1, None, 2, "float64")(h))
    x, t = np.linspace(0, 1, 6), np.linspace(1, 2, 6)
    d = nbderiv.derivatives(model, (x, t), order=2)
    assert d.inputs == ("x", "t") and d[2].shape == (6, 1, 2, 2)
    fn = lambda X: np.asarray(model([X[:, :1], X[:, 1:]]), dtype=np.float64)  # noqa: E731
    X = np.stack([x, t], 1)
    assert_close(d[2], central_fd(fn, X, 2), 1e-5, "u_xt etc.")
    d_t = nbderiv.derivatives(model, (x, t), order=1, wrt=[1])
    assert d_t.inputs == ("t",)
    assert_close(d_t[1][:, 0, 0], d[1][:, 0, 1], 1e-12)


def test_subclassed_call_x_t_and_callable_names():
    class PINN(keras.Model):
        def __init__(self):
            super().__init__(dtype="float64")
            self.hidden = dense(8, "tanh", 4, "float64")
            self.out = dense(2, None, 5, "float64")

        def call(self, x, t):
            return self.out(self.hidden(tf.concat([x, t], axis=1)))

    net = PINN()
    x, t = np.linspace(0, 1, 5), np.linspace(-1, 0, 5)
    d = nbderiv.derivatives(net, (x, t[:, None]), order=1)
    assert d.inputs == ("x", "t") and d[1].shape == (5, 2, 2)
    X = np.stack([x, t], 1)
    eps = 1e-6
    for i in range(2):
        e = np.zeros(2)
        e[i] = eps
        fd = (net(X[:, :1] + e[0], X[:, 1:] + e[1]).numpy()
              - net(X[:, :1] - e[0], X[:, 1:] - e[1]).numpy()) / (2 * eps)
        assert_close(d[1][:, :, i], fd, 1e-8)
    d = nbderiv.derivatives(lambda u, v: u * tf.sin(v), (x, t), order=1, framework="tf")
    assert d.inputs == ("u", "v")
    assert_close(d[1][:, 0], np.stack([np.sin(t), x * np.cos(t)], 1), 1e-12)


# -- inputs: lists, tensors, (N,), ints (Q&A case A) ---------------------------------------
@pytest.mark.parametrize("kind", ["functional", "sequential", "sequential-unbuilt"])
def test_case_a_int_vector_into_input_1(kind):
    layers = [dense(16, "relu", 1), dense(8, "relu", 2), dense(1, None, 3)]
    if kind == "functional":
        inp = keras.Input((1,))
        h = inp
        for layer in layers:
            h = layer(h)
        model = keras.Model(inp, h)
    elif kind == "sequential":
        model = keras.Sequential([keras.Input((1,))] + layers)
    else:
        model = keras.Sequential(layers)  # no Input: built by nbderiv's first call
    x = np.arange(1, 7)  # int64, shape (6,), as in the Q&A post
    x_before = x.copy()
    d = nbderiv.derivatives(model, x, order=2)
    assert {"input-reshaped", "integer-input", "piecewise-linear"} <= set(d.codes)
    assert d[1].dtype == np.float32 and d[2].shape == (6, 1, 1, 1)
    assert np.all(d[2] == 0)  # ReLU: piecewise linear
    fd = (keras_fn(model)(x[:, None] + 1e-2) - keras_fn(model)(x[:, None] - 1e-2)) / 2e-2
    assert_close(d[1][:, :, 0], fd, 1e-3, "d1 of a ReLU net vs FD (smooth away from kinks)")
    np.testing.assert_array_equal(x, x_before)
    assert model(np.zeros((3, 1), "float32")).shape == (3, 1)  # still usable with (M, 1)


def test_inputs_as_list_tensor_and_numpy_agree():
    model = mlp([2, 8, 1], seed=9)
    X = np.random.default_rng(3).normal(size=(5, 2)).astype("float32")
    a = nbderiv.derivatives(model, X, order=1)[1]
    b = nbderiv.derivatives(model, X.tolist(), order=1)[1]
    c = nbderiv.derivatives(model, tf.constant(X), order=1)[1]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_dtypes_follow_the_model():
    x64 = np.linspace(0, 1, 4)
    assert nbderiv.derivatives(mlp([1, 4, 1]), x64)[1].dtype == np.float32
    assert nbderiv.derivatives(mlp([1, 4, 1], dtype="float64"), x64)[1].dtype == np.float64
    # keras.config.set_floatx("float64") at the start of a session (Keras fixes its default
    # dtype policy on first use, so the test first puts the session back to that state)
    from keras.src.backend.common import global_state

    old_floatx, old_policy = keras.config.floatx(), global_state.get_global_attribute(
        "dtype_policy", None)
    global_state.set_global_attribute("dtype_policy", None)
    keras.config.set_floatx("float64")
    try:
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, "tanh"),
                                  keras.layers.Dense(1)])
    finally:
        keras.config.set_floatx(old_floatx)
        global_state.set_global_attribute("dtype_policy", old_policy)
    assert model.weights[0].dtype == "float64"
    d = nbderiv.derivatives(model, x64.astype("float32"), order=2)
    assert d[1].dtype == np.float64 and d[2].dtype == np.float64
    # a plain callable runs in x's float dtype
    assert nbderiv.derivatives(tf.sin, x64, framework="tensorflow")[1].dtype == np.float64
    assert nbderiv.derivatives(tf.sin, tf.constant(x64, tf.float32))[1].dtype == np.float32


# -- no mutation, no retracing -------------------------------------------------------------
def test_nothing_the_user_owns_changes():
    class Sneaky(keras.Model):
        """Runs BatchNormalization in training mode inside call: moving stats would move."""

        def __init__(self):
            super().__init__()
            self.d = dense(4, "tanh", 1)
            self.bn = keras.layers.BatchNormalization()
            self.o = dense(1, None, 2)

        def call(self, x):
            return self.o(self.bn(self.d(x), training=True))

    for model in (mlp([1, 8, 1]), Sneaky()):
        model(np.zeros((2, 1), "float32"))
        model.trainable = True
        before = [v.numpy().copy() for v in model.variables]
        n_vars = len(model.variables)
        x = np.linspace(-1, 1, 20).astype("float32")
        x_copy = x.copy()
        xt = tf.constant(x)
        nbderiv.derivatives(model, x, order=2, check=True)
        nbderiv.derivatives(model, xt, order=1)
        nbderiv.full_jacobian(model, x[:4])
        assert model.trainable is True and len(model.variables) == n_vars
        for v, b in zip(model.variables, before):
            np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
        np.testing.assert_array_equal(x, x_copy)
        np.testing.assert_array_equal(xt.numpy(), x_copy)


class Counting(keras.layers.Layer):
    """Counts its calls in a variable, and adds training-mode noise (a seed generator)."""

    def __init__(self):
        super().__init__()
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)
        self.noise = keras.layers.GaussianNoise(1e-3, seed=1)

    def call(self, x):
        self.calls.assign_add(1.0)
        return self.noise(tf.tanh(x), training=True)


def test_models_that_write_variables_are_put_back_on_every_call():
    class Jittery(tf.Module):
        def __init__(self):
            super().__init__()
            self.generator = tf.random.Generator.from_seed(3)
            self.generator_state = self.generator.state  # listed in .variables

        def __call__(self, x):
            return tf.sin(x) + 1e-3 * self.generator.normal(tf.shape(x))

    models = {
        "counting layer": keras.Sequential([keras.Input((1,)), dense(4, None, 1), Counting(),
                                            dense(1, None, 2)]),
        "tf.random.Generator": Jittery(),
    }
    x = np.linspace(-1, 1, 30).astype("float32")
    for name, model in models.items():
        owned = list(model.variables)
        assert owned, name
        before = [v.numpy().copy() for v in owned]
        for _ in range(3):  # the later calls run warm traces
            d = nbderiv.derivatives(model, x, order=2, framework="tensorflow")
            nbderiv.diagnose(model, x, framework="tensorflow")
            for v, b in zip(owned, before, strict=True):
                np.testing.assert_array_equal(v.numpy(), b, err_msg=name)
        assert {"stochastic", "train-mode"} & set(d.codes), name  # the noise is seen


def test_only_traces_that_may_write_variables_pay_for_a_snapshot():
    quiet = mlp([1, 8, 1], seed=5)
    writing = keras.Sequential([keras.Input((1,)), Counting(), dense(1, None, 2)])
    for model in (quiet, writing):
        nbderiv.derivatives(model, np.linspace(0, 1, 5), order=1)
    writes = {name: {e.writes for e in graphs.cache_for(model).values()
                     if isinstance(e, graphs.Traced) and e.concrete is not None}
              for name, model in (("quiet", quiet), ("writing", writing))}
    assert writes == {"quiet": {False}, "writing": {True}}


def test_traces_are_cached_and_reused_across_sizes_and_chunks():
    model = mlp([2, 8, 1], seed=11)
    X = np.random.default_rng(4).normal(size=(50, 2)).astype("float32")
    for n, chunk in ((50, None), (37, 10), (50, 7)):
        d = nbderiv.derivatives(model, X[:n], order=2, chunk_size=chunk)
        assert d.method.startswith("reverse-ones")
    traced = {key[1]: e for key, e in graphs.cache_for(model).items()
              if isinstance(e, graphs.Traced)}
    assert ("reverse-ones", 2, (0, 1)) in traced
    counts = {key: e.traced.experimental_get_tracing_count() for key, e in traced.items()}
    assert set(counts.values()) == {1}, counts  # one trace, whatever N or the chunk size
    assert_close(nbderiv.derivatives(model, X, order=2, chunk_size=7)[2],
                 nbderiv.derivatives(model, X, order=2)[2], 1e-6)


def test_a_model_edited_in_place_is_traced_again():
    """Cached traces bake in the layers: pop/add or a swapped activation must not reuse them."""
    model = mlp([1, 8, 1], seed=21)
    x = np.linspace(-1, 1, 7).astype("float32")

    def tape_truth():
        X = tf.constant(x[:, None])
        with tf.GradientTape() as tape:
            tape.watch(X)
            y = model(X, training=False)
        return tape.gradient(y, X).numpy()

    for order in (1, 2):
        nbderiv.derivatives(model, x, order=order)  # warm traces (reverse and Taylor)
    model.pop()
    model.add(dense(1, None, seed=22))
    assert_close(nbderiv.derivatives(model, x)[1][:, 0], tape_truth(), 1e-5, "after pop/add")
    model.layers[0].activation = keras.activations.sigmoid
    assert_close(nbderiv.derivatives(model, x)[1][:, 0], tape_truth(), 1e-5, "after swap")


def test_a_hot_shape_is_compiled_with_xla_and_still_matches_the_closed_form(
        one_hidden64, monkeypatch):
    """The second run of a shape of at least XlaTier.MIN_ROWS rows is compiled; one-off shapes,
    small batches and NBDERIV_XLA=0 stay on the plain graph. All agree with the closed form."""
    monkeypatch.delenv("NBDERIV_XLA", raising=False)
    x = np.linspace(-2, 2, graphs.XlaTier.MIN_ROWS + 76)
    ref = one_hidden_closed_form(one_hidden64, x, 4)
    runs = [nbderiv.derivatives(one_hidden64, x, order=4) for _ in range(3)]
    assert [d.method for d in runs] == ["taylor", "taylor (XLA)", "taylor (XLA)"]
    for d in runs:
        for k in range(1, 5):
            assert_close(d[k].reshape(len(x), -1), ref[k - 1], 1e-10, f"{d.method} d{k}")
    np.testing.assert_array_equal(runs[1][4], runs[2][4])  # the compiled program is reused
    assert nbderiv.derivatives(one_hidden64, x[:-1], order=4).method == "taylor"  # new shape
    small = x[:graphs.XlaTier.MIN_ROWS - 1]
    assert {nbderiv.derivatives(one_hidden64, small, order=4).method for _ in range(3)} == {
        "taylor"}
    monkeypatch.setenv("NBDERIV_XLA", "0")  # also for shapes compiled before
    assert nbderiv.derivatives(one_hidden64, x, order=4).method == "taylor"


def test_xla_in_reverse_and_forward_mode_matches_central_differences(central_fd):
    X = np.random.default_rng(8).uniform(-1, 1, size=(graphs.XlaTier.MIN_ROWS, 2))
    for sizes, method in (([2, 16, 1], "reverse-ones"), ([2, 16, 5], "forward-jvp")):
        model = mlp(sizes, dtype="float64", seed=9)
        fn = keras_fn(model)
        ref1, ref2 = central_fd(fn, X, 1), central_fd(fn, X, 2)
        for expected in (method, method + " (XLA)"):
            d = nbderiv.derivatives(model, X, order=2)
            assert d.method == expected
            assert_close(d[1], ref1, 1e-7, f"{expected} d1 vs FD")
            assert_close(d[2], ref2, 1e-5, f"{expected} d2 vs FD")


def test_traces_that_write_or_draw_random_numbers_are_never_compiled():
    x = np.linspace(0, 1, graphs.XlaTier.MIN_ROWS).astype("float32")
    writing = keras.Sequential([keras.Input((1,)), Counting(), dense(1, None, 2)])
    noisy = lambda z: tf.nn.dropout(tf.sin(z), 0.5, seed=3)  # noqa: E731
    for model in (writing, noisy):
        methods = {nbderiv.derivatives(model, x, framework="tensorflow").method
                   for _ in range(3)}
        assert not any("XLA" in m for m in methods), methods


def test_an_op_xla_cannot_compile_falls_back_to_the_plain_graph():
    """String operations have no XLA kernels: compiling is tried once, then the plain graph
    runs on."""
    def f(z):
        digits = tf.strings.length(tf.strings.as_string(z[:, 0]))
        return tf.sin(z) * (1 + 0 * tf.cast(tf.reduce_sum(digits), z.dtype))
    x = np.linspace(-1, 1, graphs.XlaTier.MIN_ROWS)
    for _ in range(3):
        d = nbderiv.derivatives(f, x, order=2, framework="tensorflow")
        assert d.method == "reverse-ones"
        assert_close(d[2][:, 0, 0, 0], -np.sin(x), 1e-12, d.method)
    assert False in [e.xla.program for e in graphs.cache_for(f).values()
                     if isinstance(e, graphs.Traced)]


@pytest.mark.parametrize("sizes, order", [([2, 8, 3], 2), ([1, 8, 1], 3)])
def test_row_blocks_give_the_same_results_as_one_call(monkeypatch, sizes, order):
    """The backend runs large inputs in cache-sized row blocks of one shape (the last one
    overlapping; the probe on its own few points): forced to 7-row blocks, every order and
    the findings match one call."""
    model = mlp(sizes, seed=13)
    X = np.random.default_rng(5).normal(size=(50, sizes[0])).astype("float32")
    whole = nbderiv.derivatives(model, X, order=order)
    monkeypatch.setattr(tfb.TensorFlowBackend, "block_rows", lambda self, *a: 7)
    runs, inside = [], ["derivatives"]  # (what ran it, rows) of every traced run
    batch_rows = []  # rows of each batch given to forwards
    original = graphs.Traced.__call__
    monkeypatch.setattr(graphs.Traced, "__call__", lambda self, Z: (
        runs.append((inside[-1], Z.shape[0])) or original(self, Z)))
    forwards = tfb.TensorFlowBackend.forwards

    def marked_forwards(self, call, batches):
        inside.append("forwards")
        batch_rows.extend(b[0].shape[0] for b in batches)
        try:
            return forwards(self, call, batches)
        finally:
            inside.pop()

    monkeypatch.setattr(tfb.TensorFlowBackend, "forwards", marked_forwards)

    def blocks_and_probe():
        """The derivative runs' rows, and the forward runs' rows before the first of them."""
        first = next(i for i, (what, _) in enumerate(runs) if what == "derivatives")
        return [n for what, n in runs if what == "derivatives"], [n for _, n in runs[:first]]

    fresh = mlp(sizes, seed=13)  # the same weights, never called: its first call probes
    blocked = nbderiv.derivatives(fresh, X, order=order)
    blocks, probe = blocks_and_probe()
    # the probe first, on its own few points; then 8 blocks of 7 rows (the last: rows 43-49)
    assert blocks == [7] * 8, runs
    assert probe and max(batch_rows) < len(X), (runs, batch_rows)
    assert blocked.method == whole.method and blocked.codes == whole.codes
    runs.clear()  # a plain Dense stack seen before: its structure answers what the probe asks
    again = nbderiv.derivatives(fresh, X, order=order)
    assert blocks_and_probe() == ([7] * 8, []) and again.codes == whole.codes, runs
    for d in (whole, blocked):  # the user's own arrays, whichever way they were filled
        assert all(d[k].flags.writeable for k in range(order + 1))
        assert not any(np.shares_memory(d[j], d[k]) for j in range(order + 1)
                       for k in range(j))
    for k in range(order + 1):
        np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-6, atol=1e-6)

    class BatchCentred(keras.Model):  # couples points: must still be seen with blocks
        def __init__(self):
            super().__init__()
            self.d = dense(1, "tanh", 1)

        def call(self, x):
            return self.d(x - tf.reduce_mean(x, axis=0, keepdims=True))

    d = nbderiv.derivatives(BatchCentred(), X[:, :1], order=1)
    assert "coupled-samples" in d.codes


def test_edits_of_layer_settings_and_reused_addresses_are_seen():
    x = np.linspace(-1, 1, 4).astype("float32")  # no point on the kink at 0
    model = keras.Sequential([keras.Input((1,)), keras.layers.Rescaling(2.0),
                              keras.layers.LeakyReLU(negative_slope=0.1), dense(1, None, 3)])
    w = float(model.layers[-1].get_weights()[0][0, 0])
    d = nbderiv.derivatives(model, x)
    model.layers[0].scale = 7.0
    model.layers[1].negative_slope = 0.5
    d = nbderiv.derivatives(model, x)  # x < 0: slope 0.5 * 7 * w; x > 0: 7 * w
    np.testing.assert_allclose(d[1][:, 0, 0], np.where(x < 0, 3.5, 7.0) * w, rtol=1e-5)

    model = mlp([1, 4, 1], seed=23)
    for factor in (2.0, 3.0, 5.0):  # new lambdas may reuse a freed one's address
        model.layers[0].activation = lambda z, f=factor: f * z
        got = nbderiv.derivatives(model, x)[1][:, 0, 0]
        W1, _, W2, _ = model.get_weights()
        np.testing.assert_allclose(got, factor * float((W1 @ W2).item()), rtol=1e-5)


def test_a_bound_method_does_not_borrow_the_models_cached_facts():
    class Halving(keras.Sequential):
        def half(self, x):
            return self(x) * 0.5

    model = Halving([keras.Input((1,)), dense(8, "tanh", 24), dense(1, None, 25)])
    x = np.linspace(-1, 1, 6).astype("float32")
    whole = nbderiv.derivatives(model, x, order=2)
    half = nbderiv.derivatives(model.half, x, order=2, framework="tensorflow")
    for k in range(3):
        np.testing.assert_allclose(half[k], 0.5 * whole[k], rtol=1e-5, atol=1e-7)


def test_coupling_is_seen_when_memory_allows_only_tiny_chunks():
    def centred(x):  # couples points through the batch mean
        return tf.sin(x) - tf.reduce_mean(x, axis=0, keepdims=True)

    x = np.linspace(-1, 1, 20)
    d = nbderiv.derivatives(centred, x, framework="tensorflow", memory_budget=4000)
    assert "coupled-samples" in d.codes
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(x) - 1 / 20, atol=1e-6)


def test_randomness_from_seeded_ops_and_writes_from_python_functions_are_seen():
    noisy = lambda x: tf.nn.dropout(tf.sin(x), 0.5, seed=3)  # noqa: E731
    x = np.linspace(-1, 1, 12).astype("float32")
    assert {"stochastic", "train-mode"} & set(
        nbderiv.derivatives(noisy, x, framework="tensorflow").codes)
    assert {f.code for f in nbderiv.diagnose(noisy, x, framework="tensorflow")} & {
        "stochastic", "train-mode"}

    class Bumping(keras.Model):
        """Writes a variable from inside tf.numpy_function: no Assign op in the graph."""

        def __init__(self):
            super().__init__()
            self.d = dense(1, "tanh", 26)
            self.count = self.add_weight(shape=(), initializer="zeros", trainable=False)

        def call(self, x):
            def bump(v):
                self.count.assign_add(1.0)
                return v
            return self.d(tf.numpy_function(bump, [x], x.dtype, stateful=True))

    model = Bumping()
    model(x[:2, None])  # builds it (and counts once)
    for _ in range(3):  # later calls run warm traces
        nbderiv.derivatives(model, x, framework="tensorflow")
        assert float(model.count.numpy()) == 1.0


@pytest.mark.parametrize("order", [1, 2])
def test_a_warm_call_is_one_traced_run(monkeypatch, order):
    """A warm call on a plain Sequential is one traced run: no probe (its structure settles
    the verdict), no finite-difference confirmation of its graph (its layers cannot cut it),
    no second pass over the points (a never-tried fallback strategy must not count as
    holding seeded random ops)."""
    model = mlp([1, 8, 1], seed=27)
    x = np.linspace(0, 1, 50).astype("float32")
    nbderiv.derivatives(model, x, order=order)
    runs = []
    original = graphs.Traced.__call__
    monkeypatch.setattr(graphs.Traced, "__call__",
                        lambda self, X: runs.append(X.shape[0]) or original(self, X))
    nbderiv.derivatives(model, x, order=order)
    assert runs == [50]


MODEL_LIFETIME = textwrap.dedent("""
    import gc, weakref
    import numpy as np, keras, nbderiv
    from nbderiv.backends.tensorflow_graphs import cache_for

    class Halving(keras.Sequential):
        def half(self, x):
            return self(x) * 0.5

    layers = [keras.Input((1,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    model = Halving(layers)
    del layers
    nbderiv.derivatives(model, np.linspace(0, 1, 5), order=2)
    nbderiv.derivatives(model.half, np.linspace(0, 1, 5), order=2, framework="tf")
    def doubled(net):
        return lambda z: net(z) * 2
    nbderiv.derivatives(doubled(model), np.linspace(0, 1, 5), framework="tf")
    assert cache_for(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    print("freed" if alive() is None else "alive")
""")


def test_cached_traces_do_not_keep_models_alive():
    """In a fresh interpreter: in the long test session TensorFlow's own state has, now and
    then, held a model a while longer, which says nothing about nbderiv's caches."""
    out = subprocess.run([sys.executable, "-c", MODEL_LIFETIME], capture_output=True, text=True,
                         env=SUBPROCESS_ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "freed"
    assert "Exception ignored" not in out.stderr, out.stderr[-3000:]


# -- structure: kinks, summaries, float64 copies, full Jacobian, code ----------------------
def test_kink_points_dense_activation_layers_and_conv():
    zero_bias = keras.initializers.Zeros()
    seq = keras.Sequential([keras.Input((1,)),
                            keras.layers.Dense(4, "relu", bias_initializer=zero_bias),
                            keras.layers.Dense(1)])
    d = nbderiv.derivatives(seq, np.array([-1.0, 0.0, 1.0]), order=1)
    assert d.finding("at-kink").points == (1,)
    leaky = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, bias_initializer=zero_bias),
                              keras.layers.LeakyReLU(), keras.layers.Dense(1)])
    d = nbderiv.derivatives(leaky, np.array([[1.0, 2.0], [0.0, 0.0]]), order=1)
    assert d.finding("at-kink").points == (1,)
    inp = keras.Input((4,))
    h = keras.layers.Reshape((4, 1))(inp)
    h = keras.layers.Conv1D(2, 2, activation="relu", bias_initializer=zero_bias)(h)
    conv = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(h)))
    X = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 6.0], [1.0, -1.0, 2.0, 3.0]])
    call = compute.open_call(conv, X.astype("float32"), None)
    assert tfb.BACKEND.kink_points(call, call.args) == [1]
    smooth = mlp([1, 4, 1])
    assert nbderiv.derivatives(smooth, np.array([0.0, 1.0])).finding("at-kink") is None


def test_pieces_that_join_smoothly_are_no_kink_in_tensorflow():
    """tf.where(h > 0, h**2, -h**2): the comparison makes x = 0 a candidate, but the one-sided
    slopes agree there (both 0), so no at-kink is claimed; d1 = 2|h| * w as GradientTape has
    it."""
    f = lambda x: tf.where(x > 0, x ** 2, -x ** 2)  # noqa: E731
    x = np.array([[-1.0], [0.0], [0.5]])
    d = nbderiv.derivatives(f, x, framework="tensorflow")
    assert "at-kink" not in d.codes, [str(g) for g in d.findings]
    np.testing.assert_allclose(d[1][:, 0, 0], 2 * np.abs(x[:, 0]), rtol=1e-12)


@pytest.mark.parametrize("name", ["abs", "maximum", "minimum", "clip", "relu-max-value", "selu",
                                  "h * (h > 0)", "where(h >= 0)", "where(0 < h)", "h * sign(h)"])
def test_at_kink_for_other_spellings_of_a_kink(name):
    """A kink written as abs, maximum / minimum, clip, relu with max_value or selu, or by hand
    (the comparison that picks the pieces, sign): found like Relu's, at exactly the points on
    it (x = 0; x = 1 also reaches clip's upper bound)."""
    from keras import ops

    act = {"abs": ops.abs, "maximum": lambda h: ops.maximum(h, 0.0),
           "minimum": lambda h: ops.minimum(h, 0.0), "clip": lambda h: ops.clip(h, 0.0, 1.0),
           "relu-max-value": lambda h: keras.activations.relu(h, max_value=1.0),
           "selu": keras.activations.selu,
           "h * (h > 0)": lambda h: h * tf.cast(h > 0, h.dtype),
           "where(h >= 0)": lambda h: tf.where(h >= 0, h, 0.1 * h),
           "where(0 < h)": lambda h: tf.where(tf.math.less(0.0, h), h, -0.5 * h),
           "h * sign(h)": lambda h: h * tf.sign(h)}[name]
    inp = keras.Input((1,))
    h = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(
        [[1.0, -2.0, 0.5, 3.0]]), bias_initializer="zeros")(inp)
    out = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(
        [[1.0], [2.0], [-1.0], [0.5]]))(keras.layers.Lambda(act)(h))
    d = nbderiv.derivatives(keras.Model(inp, out), np.array([-1.0, 0.0, 1.0, 0.0, 0.3]))
    upper = name in ("clip", "relu-max-value")  # h = 1.0 at x = 1: the upper bound
    assert d.finding("at-kink").points == ((1, 2, 3) if upper else (1, 3))
    off = nbderiv.derivatives(keras.Model(inp, out), np.array([-1.0, 0.01, 1.01, 0.3]))
    assert off.finding("at-kink") is None


def test_layer_summary_names_activations_and_opacity():
    seq = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, "relu"),
                            keras.layers.Activation("tanh"), keras.layers.LeakyReLU(),
                            keras.layers.Dense(1)])
    s = tfb.BACKEND.layer_summary(seq)
    assert s == {"activations": ["relu", "tanh", "leaky_relu", "linear"], "train_mode": [],
                 "opaque": False, "half_compute": []}
    lam = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(tf.sin)])
    assert tfb.BACKEND.layer_summary(lam)["opaque"] is True
    assert tfb.BACKEND.layer_summary(tf.sin)["opaque"] is True
    relu_net = mlp([1, 8, 1], act="relu")
    codes = [f.code for f in nbderiv.diagnose(relu_net, np.linspace(-1, 1, 5))]
    assert "piecewise-linear" in codes


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_float64_copy_has_same_weights_and_float64_check_passes(kind):
    seq = mlp([1, 8, 8, 1], seed=13)
    if kind == "functional":
        h = keras.layers.Lambda(lambda z: z * 1.0)(seq.inputs[0])
        model = keras.Model(seq.inputs[0], seq.layers[2](seq.layers[1](seq.layers[0](h))))
    elif kind == "subclassed":
        class Net(keras.Model):
            def __init__(self, width=8):
                super().__init__()
                self.a = dense(width, "tanh", 1)
                self.b = dense(1, None, 2)

            def call(self, x):
                return self.b(self.a(x))
        model = Net()
        model(np.zeros((1, 1), "float32"))
    else:
        model = seq
    copy = tfb.BACKEND.float64_copy(model)
    x = np.linspace(-1, 1, 5)[:, None]
    call = compute.open_call(copy, x, "tensorflow")
    (y64,) = tfb.BACKEND.forwards(call, [call.args])
    assert y64.dtype == np.float64
    assert_close(y64, keras_fn(model)(x.astype("float32")), 1e-5, "copy vs model")
    if kind != "subclassed":
        assert all(str(w.dtype) == "float64" for w in copy.weights)
    d = nbderiv.derivatives(model, x, order=2, check=True)
    assert d.check.passed and d.check.errors[2][1] < 1e-4, d.check.summary()


def test_full_jacobian_is_block_diagonal_with_the_per_point_blocks():
    model = mlp([2, 8, 3], seed=17)
    X = np.random.default_rng(5).normal(size=(6, 2)).astype("float32")
    J = nbderiv.full_jacobian(model, X)
    assert J.shape == (6, 3, 6, 2)
    d1 = nbderiv.derivatives(model, X)[1]
    for n in range(6):
        assert_close(J[n, :, n], d1[n], 1e-6)
        J[n, :, n] = 0
    assert np.all(J == 0)
    with pytest.raises(ValueError, match="N\\*\\*2|budget"):
        nbderiv.full_jacobian(model, X, memory_budget=100)


@pytest.mark.parametrize("case", ["one-input", "tuple", "wrt"])
def test_equivalent_code_reproduces_the_result(case):
    if case == "tuple":
        xi, ti = keras.Input((1,), name="x"), keras.Input((2,), name="t")
        h = dense(8, "tanh", 1)(keras.layers.Concatenate()([xi, ti]))
        model = keras.Model([xi, ti], dense(2, None, 2)(h))
        x = (np.linspace(0, 1, 5), np.random.default_rng(6).normal(size=(5, 2)))
        kwargs = {"order": 2}
    else:
        model = mlp([3, 8, 2], seed=19)
        x = np.random.default_rng(7).normal(size=(5, 3))
        kwargs = {"order": 3, "wrt": [2, 0]} if case == "wrt" else {"order": 2}
    d = nbderiv.derivatives(model, x, **kwargs)
    assert "tf.GradientTape" in d.code
    namespace = {"model": model, "x": x}
    exec(d.code, namespace)
    for k in range(1, d.order + 1):
        assert_close(namespace[f"d{k}"].reshape(d[k].shape), d[k], 1e-5, f"code d{k}")


# -- errors mirror the torch backend ------------------------------------------------------
def test_errors_are_clear():
    x = np.linspace(0, 1, 4)
    with pytest.raises(OutputError, match="floating-point"):
        nbderiv.derivatives(lambda z: tf.cast(z > 0.5, tf.int32), x, framework="tensorflow")
    with pytest.raises(OutputError, match="one output row per point"):
        nbderiv.derivatives(lambda z: tf.reduce_sum(z, axis=0), x, framework="tensorflow")
    with pytest.raises(OutputError, match="a list of 2 values, not one tensor"):
        nbderiv.derivatives(lambda z: [z, z], x, framework="tensorflow")
    with pytest.raises(InputShapeError, match=r"reshape\(1, -1\)"):
        nbderiv.derivatives(mlp([3, 4, 1]), x)


def test_coupled_callable_gets_true_per_point_blocks():
    f = lambda z: z - tf.reduce_mean(z, axis=0)  # noqa: E731  (couples the points)
    x = np.linspace(0, 1, 5)
    d = nbderiv.derivatives(f, x, order=1, framework="tensorflow")
    assert "coupled-samples" in d.codes
    assert_close(d[1][:, 0, 0], np.full(5, 1 - 1 / 5), 1e-12)


MILLION = textwrap.dedent("""
    import json, resource, time
    import numpy as np, tensorflow as tf, keras, nbderiv
    model = keras.Sequential([keras.Input((1,))] + [keras.layers.Dense(64, activation="tanh")
                              for _ in range(3)] + [keras.layers.Dense(1)])
    x = np.linspace(-3, 3, 1_000_000, dtype="float32")
    start = time.perf_counter()
    d = nbderiv.derivatives(model, x, order=2, progress=False)
    wall = time.perf_counter() - start
    idx = np.array([0, 123_457, 500_000, 999_999])
    X = tf.constant(x[idx][:, None])
    with tf.GradientTape() as t2:
        t2.watch(X)
        with tf.GradientTape() as t1:
            t1.watch(X)
            y = model(X)
        g = t1.gradient(y, X)
    h = t2.gradient(g, X)
    print(json.dumps({"shape": list(d[2].shape), "wall": wall, "method": d.method,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "err1": float(np.abs(d[1][idx, 0, 0] - g.numpy()[:, 0]).max()),
                      "err2": float(np.abs(d[2][idx, 0, 0, 0] - h.numpy()[:, 0]).max())}))
""")


@pytest.mark.slow
def test_one_million_points_order_2_in_bounded_memory():
    out = subprocess.run([sys.executable, "-c", MILLION], capture_output=True, text=True,
                         env=SUBPROCESS_ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    # bounded by chunks of points or, on the CPU, by the backend's row blocks
    assert info["shape"] == [1_000_000, 1, 1, 1]
    assert info["rss_mb"] < 2048, info
    assert info["err1"] < 1e-5 and info["err2"] < 1e-5, info


# -- fresh interpreters: laziness, quietness, Keras on torch ------------------------------
KERAS_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys
    import numpy as np
    import nbderiv
    env_before = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    def f(x):
        import tensorflow as tf  # already imported by nbderiv at this point
        return tf.sin(x)
    d = nbderiv.derivatives(f, np.linspace(0, 1, 5), order=2, framework="tensorflow")
    err = float(np.abs(d[2][:, 0, 0, 0] + np.sin(np.linspace(0, 1, 5))).max())
    import keras
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    d2 = nbderiv.derivatives(model, np.linspace(0, 1, 5), order=2, check=True)
    print(json.dumps({"torch": "torch" in sys.modules, "err": err, "ok": d2.check.passed,
                      "env": [env_before, os.environ.get("TF_CPP_MIN_LOG_LEVEL")],
                      "tf_logger": logging.getLogger("tensorflow").level,
                      "root": logging.getLogger().level}))
""")

TORCH_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, nbderiv
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    nbderiv.derivatives(net, torch.linspace(0, 1, 5), order=2, check=True)
    nbderiv.diagnose(net, torch.linspace(0, 1, 5))
    print(json.dumps({"loaded": sorted({"tensorflow", "keras"} & set(sys.modules))}))
""")

KERAS_ON_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras, torch, nbderiv
    assert keras.backend.backend() == "torch"
    model = keras.Sequential([keras.Input((1,)),
        keras.layers.Dense(6, activation="tanh",
                           bias_initializer=keras.initializers.RandomNormal(seed=1)),
        keras.layers.Dense(1)])
    W1, b1, W2, b2 = [w.astype(np.float64) for w in model.get_weights()]
    x = np.linspace(-1, 1, 7)
    s = np.tanh(x[:, None] * W1[0] + b1)
    ref1 = ((1 - s**2) * W1[0]) @ W2
    ref2 = ((-2 * s * (1 - s**2)) * W1[0] ** 2) @ W2
    out = {}
    for name, xin in (("numpy", x), ("torch", torch.tensor(x, dtype=torch.float32))):
        d = nbderiv.derivatives(model, xin, order=2)
        out[name] = [d.framework, float(np.abs(d[1][:, :, 0] - ref1).max()),
                     float(np.abs(d[2][:, :, 0, 0] - ref2).max())]
    out["tensorflow"] = "tensorflow" in sys.modules
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def fresh_runs():
    """Start the three fresh interpreters at once (they mostly wait on imports)."""
    runs = {
        "keras": (KERAS_SCRIPT, {"TF_CPP_MIN_LOG_LEVEL": None, "TF_ENABLE_ONEDNN_OPTS": None}),
        "torch": (TORCH_SCRIPT, {}),
        "keras-on-torch": (KERAS_ON_TORCH_SCRIPT, {"KERAS_BACKEND": "torch"}),
    }
    procs = {}
    for name, (code, extra) in runs.items():
        env = dict(SUBPROCESS_ENV)
        for key, value in extra.items():
            env.pop(key, None) if value is None else env.__setitem__(key, value)
        procs[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


def _result(fresh_runs, name):
    code, out, err = fresh_runs[name]
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def test_keras_use_never_imports_torch_and_tf_startup_noise_stays_silent(fresh_runs):
    pytest.importorskip("torch")
    r, err = _result(fresh_runs, "keras")
    assert r["torch"] is False
    assert r["err"] < 1e-12 and r["ok"]
    assert err == "", err  # no C++ start-up lines, no Python warnings
    assert r["env"] == [None, None]  # the user's settings are left alone
    assert r["tf_logger"] == 0 and r["root"] == 30


def test_torch_use_never_imports_tensorflow_or_keras(fresh_runs):
    pytest.importorskip("torch")
    r, _ = _result(fresh_runs, "torch")
    assert r["loaded"] == []


def test_keras_on_torch_runs_through_the_torch_backend(fresh_runs):
    pytest.importorskip("torch")
    r, _ = _result(fresh_runs, "keras-on-torch")
    for name in ("numpy", "torch"):
        framework, err1, err2 = r[name]
        assert framework == "torch"
        assert err1 < 1e-5 and err2 < 1e-5, r
    assert r["tensorflow"] is False


def test_keras_layer_normalization_second_derivative_matches_finite_differences():
    """tf.nn.moments stops the gradient through the mean inside the variance, which makes
    second derivatives through Keras' LayerNormalization wrong unless nbderiv avoids it."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((2,), dtype="float64")
    h = keras.layers.Dense(6, dtype="float64")(inp)
    h = keras.layers.LayerNormalization(dtype="float64")(h)
    h = keras.layers.Activation("tanh", dtype="float64")(h)
    model = keras.Model(inp, keras.layers.Dense(1, dtype="float64")(h))
    x = np.random.default_rng(0).random((4, 2)) * 2
    d = nbderiv.derivatives(model, x, 2)
    f = lambda z: np.asarray(model(z, training=False))[:, 0]  # noqa: E731

    def fd(i, j, eps):
        ei, ej = np.eye(2)[i] * eps, np.eye(2)[j] * eps
        return (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)) / (4 * eps**2)

    for i in range(2):
        for j in range(2):
            # Richardson extrapolation: O(eps**4) truncation error (this net curves sharply)
            ref = (4 * fd(i, j, 5e-4) - fd(i, j, 1e-3)) / 3
            np.testing.assert_allclose(d[2][:, 0, i, j], ref, atol=1e-6)


def test_a_sequential_subclass_whose_call_is_replaced_is_no_longer_taken_for_a_plain_stack():
    from nbderiv.backends.tensorflow_keras import graph_kind

    class Stack(keras.Sequential):
        pass

    model = Stack([keras.Input((1,)), dense(4, "tanh", 31), dense(1, None, 32)])
    x = np.linspace(-1, 1, 5).astype("float32")
    assert graph_kind(model) == "sequential"
    plain = nbderiv.derivatives(model, x, order=2)
    try:
        Stack.call = lambda self, inputs, training=None, mask=None: 3.0 * \
            keras.Sequential.call(self, inputs, training=training, mask=mask)
        assert graph_kind(model) is None  # remembered per class, but not past a new call
        tripled = nbderiv.derivatives(model, x, order=2)
    finally:
        del Stack.call
    for k in range(3):
        np.testing.assert_allclose(tripled[k], 3.0 * plain[k], rtol=1e-5, atol=1e-7)


def _verdicts(model, x):
    """(probed, known): the probe's verdict from forward passes, and the structural one."""
    from unittest import mock

    call = compute.open_call(model, x, None)
    with call.backend.preserved(model):
        known = call.backend.known_verdict(call)
        with mock.patch.object(call.backend, "known_verdict", return_value=None):
            probed = compute.probe(dataclasses.replace(call))  # forward passes only
    return probed, known


def test_a_plain_dense_stack_seen_before_needs_no_probe():
    model = keras.Sequential([keras.Input((3,)), dense(6, "tanh", 41), keras.layers.Dropout(0.5),
                              keras.layers.Activation("softplus"), dense(2, None, 42)])
    x = np.random.default_rng(3).normal(size=(12, 3)).astype("float32")
    assert _verdicts(model, x)[1] is None  # never called: the first call probes
    first = nbderiv.derivatives(model, x, order=2)
    probed, known = _verdicts(model, x)
    assert known == probed == Verdict(2, False, False)
    again = nbderiv.derivatives(model, x, order=2)
    for k in range(3):
        np.testing.assert_array_equal(again[k], first[k])
    call = compute.open_call(model, x[:, :2], None)  # another input width: probed, rejected
    assert call.backend.known_verdict(call) is None
    with pytest.raises(InputShapeError, match="expects 3 input"):
        nbderiv.derivatives(model, x[:, :2])


def test_models_that_are_not_plain_stacks_are_always_probed():
    inputs = keras.Input((2,))
    functional = keras.Model(inputs, dense(1, None, 43)(dense(4, "tanh", 44)(inputs)))

    class Noisy(keras.Sequential):  # its own call: the structure does not say what it does
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=training, mask=mask) + \
                keras.random.normal((1, 1), seed=self.seed)

    noisy = Noisy([keras.Input((2,)), dense(4, "tanh", 45), dense(1, None, 46)])
    noisy.seed = keras.random.SeedGenerator(0)
    x = np.random.default_rng(4).normal(size=(10, 2)).astype("float32")
    for model in (functional, noisy):
        nbderiv.derivatives(model, x)
        assert _verdicts(model, x)[1] is None
    assert {"stochastic", "train-mode"} & set(nbderiv.derivatives(noisy, x).codes)


def test_a_call_replaced_on_the_instance_is_what_gets_differentiated():
    """A layer's call replaced on the instance runs instead of the class's: here it couples
    the points. Seen on every call, and a replacement after a first call is traced anew."""
    layer = dense(1, "tanh", 47)
    model = keras.Sequential([keras.Input((2,)), layer])
    x = np.random.default_rng(6).normal(size=(5, 2)).astype("float32")
    plain = nbderiv.derivatives(model, x)  # traced with the class's call
    original = layer.call
    layer.call = lambda inputs, **kw: original(inputs - tf.reduce_mean(inputs, 0, keepdims=True))

    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = model(X, training=False)
    blocks = tape.jacobian(y, X).numpy()  # (5, 1, 5, 2)
    truth = np.stack([blocks[n, :, n, :] for n in range(5)])
    for _ in range(2):
        d = nbderiv.derivatives(model, x)
        assert "coupled-samples" in d.codes
        np.testing.assert_allclose(d[1], truth, rtol=1e-5, atol=1e-6)
    assert not np.allclose(d[1], plain[1])


def test_remembering_graph_kinds_keeps_no_class_alive():
    from nbderiv.backends.tensorflow_keras import graph_kind

    def make():
        class Local(keras.Sequential):
            def call(self, inputs, training=None, mask=None):
                return super().call(inputs, training=training, mask=mask)
        model = Local([keras.Input((1,)), dense(1, None, 48)])
        assert graph_kind(model) is None  # its own call
        return weakref.ref(Local)

    ref = make()
    gc.collect()
    assert ref() is None


def test_an_activation_method_does_not_drop_the_cached_traces():
    class Scaled(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 1), initializer="ones")

        def activation(self, z):
            return tf.tanh(z)

        def call(self, x):
            return self.activation(x @ self.w)

    model = keras.Sequential([keras.Input((1,)), Scaled()])
    x = np.linspace(-1, 1, 6).astype("float32")
    first = nbderiv.derivatives(model, x, order=2)
    traces = {k: v for k, v in graphs.cache_for(model).items() if isinstance(v, graphs.Traced)}
    again = nbderiv.derivatives(model, x, order=2)
    assert traces and all(graphs.cache_for(model).get(k) is v for k, v in traces.items())
    t = np.tanh(x)
    np.testing.assert_allclose(again[1][:, 0, 0], 1 - t**2, rtol=1e-5)
    np.testing.assert_allclose(again[2][:, 0, 0, 0], -2 * t * (1 - t**2), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(again[1], first[1])


# -- target= out of range, whatever is cached ----------------------------------------------
def _classifier():
    return keras.Sequential([keras.Input((8, 8, 3)),
                             keras.layers.Conv2D(4, 3, activation="tanh"),
                             keras.layers.Flatten(), dense(10)])


def test_a_target_out_of_range_is_refused_for_every_point_not_only_the_first_ones():
    from nbderiv.errors import OptionError

    images = np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")
    with pytest.raises(OptionError, match=r"target 10 is out of range: the model has 10 "
                                          r"output\(s\) per point. Fix: use targets 0\.\.9"):
        nbderiv.derivatives(_classifier(), images, target=np.array([3, 3, 3, 3, 10]))


def test_check_targets_refuses_a_target_out_of_range_once_the_outputs_are_counted():
    """What a traced computation, built once, cannot check on its own later runs."""
    from nbderiv.errors import OptionError

    cnn, images = _classifier(), np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")
    unknown = compute.open_call(cnn, images, None, target=10)
    tfmath.check_targets(unknown)  # the outputs are not counted yet: the eager call checks
    nbderiv.derivatives(cnn, images, target=3)
    tfmath.check_targets(compute.open_call(cnn, images, None, target=9))
    with pytest.raises(OptionError, match="target 10 is out of range"):
        tfmath.check_targets(compute.open_call(cnn, images, None, target=10))
    with pytest.raises(OptionError, match="target 10 is out of range"):
        tfmath.caller(compute.open_call(cnn, images, None, target=[0, 0, 0, 0, 10]), 1)


def test_a_target_out_of_range_after_a_valid_call_is_refused_as_on_a_fresh_model():
    from nbderiv.errors import OptionError

    cnn, images = _classifier(), np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")
    nbderiv.derivatives(cnn, images, target=3)
    with pytest.raises(OptionError, match="target 10 is out of range"):
        nbderiv.derivatives(cnn, images, target=10)


# -- the float64 copy of models with wrapper layers ------------------------------------------
def _fd_float64(f, X, h=1e-6):
    """d[1] of f (float64 numpy, (N, *S) -> (N, d_out)) at X by float64 central differences,
    shape (N, d_out) + S."""
    X = np.asarray(X, np.float64)
    cols = []
    for idx in np.ndindex(*X.shape[1:]):
        e = np.zeros_like(X)
        e[(slice(None),) + idx] = h
        cols.append((f(X + e) - f(X - e)) / (2 * h))
    return np.stack(cols, axis=-1).reshape((X.shape[0], -1) + X.shape[1:])


def _bidirectional(dtype=None):
    return keras.Sequential([
        keras.Input((6, 3), dtype=dtype),
        keras.layers.Bidirectional(keras.layers.LSTM(4, dtype=dtype), dtype=dtype),
        keras.layers.Dense(2, dtype=dtype)])


def test_float64_copy_makes_the_layers_inside_bidirectional_float64():
    """The copy left Bidirectional's LSTMs in float32: the "float64" reference was off by 4e-4,
    the check failed and blamed kinks at points 0 and 2. Truth: the same network built here
    in float64 layer by layer, differentiated by float64 central differences."""
    keras.utils.set_random_seed(0)
    model = _bidirectional()
    x = np.random.default_rng(0).random((4, 6, 3)).astype("float32")
    copy = tfb.BACKEND.float64_copy(model)
    for layer in copy._flatten_layers(include_self=False, recursive=True):
        if layer.weights:
            assert layer.compute_dtype == "float64", layer.name
            assert all(str(w.dtype) == "float64" for w in layer.weights), layer.name
    twin = _bidirectional("float64")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    assert all(str(w.dtype) == "float64" for w in twin.weights)
    truth = _fd_float64(keras_fn(twin), x)
    d = nbderiv.derivatives(model, x, check=True)
    c = d.check
    assert c.passed and c.dtype == "float64" and c.kink_points == () and not c.note, \
        c.summary()
    assert_close(c.reference[1].reshape(truth.shape), truth, 1e-7, "the check's float64 reference")
    assert_close(d[1], truth, 1e-5, "float32 autodiff")
    assert all(str(w.dtype) == "float32" for w in model.weights)  # the model is untouched


def test_float64_copy_makes_the_layer_inside_timedistributed_float64():
    """TimeDistributed(Dense(3, tanh)), Flatten, Dense(1): d[1] against its closed form
    dy/dx[t, i] = sum_j v[3t + j] (1 - h[t, j]**2) W[i, j]."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5, 2)),
                              keras.layers.TimeDistributed(keras.layers.Dense(3, "tanh")),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    W, b, v, _ = (w.astype(np.float64) for w in model.get_weights())
    x = np.random.default_rng(1).normal(size=(6, 5, 2)).astype("float32")
    h = np.tanh(x.astype(np.float64) @ W + b)                       # (N, T, 3)
    closed = np.einsum("ntj,ij->nti", (1 - h ** 2) * v[:, 0].reshape(5, 3), W)[:, None]
    copy = tfb.BACKEND.float64_copy(model)
    assert all(str(w.dtype) == "float64" for w in copy.weights)
    assert copy.layers[0].layer.compute_dtype == "float64"
    d = nbderiv.derivatives(model, x, check=True)
    c = d.check
    assert c.passed and c.dtype == "float64" and c.kink_points == (), c.summary()
    assert_close(c.reference[1].reshape(closed.shape), closed, 1e-7, "the check's float64 reference")
    assert_close(d[1], closed, 1e-5, "float32 autodiff")


def test_a_copy_that_keeps_a_layer_below_float64_is_refused_and_the_check_says_so(monkeypatch):
    """Where no copy is float64 all through, the check runs in the model's own dtype (with a
    step for it) and says why, instead of comparing with a float32-ish "float64" reference."""
    from nbderiv.backends import tensorflow_keras as tk

    keras.utils.set_random_seed(0)
    model = _bidirectional()
    x = np.random.default_rng(0).random((4, 6, 3)).astype("float32")
    # a clone whose inner layers keep their float32 config, as before, and no deep copy
    monkeypatch.setattr(tk, "_float64_config", lambda config: config)
    monkeypatch.setattr(tk, "_deepcopy_float64", lambda m: m)
    with pytest.raises(ValueError, match="forward_lstm.*stay below float64"):
        tk.float64_copy(model)
    c = nbderiv.derivatives(model, x, check=True).check
    assert c.passed and c.dtype == "float32" and c.step == pytest.approx(5e-3), c.summary()
    assert "no float64 copy" in c.note and "stay below float64" in c.note
    assert c.kink_points == () and "kink" not in c.note
    twin = _bidirectional("float64")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    truth = _fd_float64(keras_fn(twin), x)
    assert_close(c.reference[1].reshape(truth.shape), truth, 2e-3, "float32 reference")


def test_lower_precision_layers_names_the_layers_nested_in_wrappers():
    from nbderiv.backends.tensorflow_keras import lower_precision_layers

    mixed = keras.Sequential([
        keras.Input((4, 2), dtype="float64"),
        keras.layers.TimeDistributed(keras.layers.Dense(3, dtype="float32", name="inner"),
                                     dtype="float64"),
        keras.layers.Flatten(dtype="float64"), keras.layers.Dense(1, dtype="float64")])
    assert lower_precision_layers(mixed) == ["inner (Dense)"]
    assert lower_precision_layers(mlp([1, 4, 1], dtype="float64")) == []
    lower = lower_precision_layers(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    assert len(lower) == 2 and lower[0].startswith("the Input of")


def test_a_tuple_for_a_keras_model_of_another_number_of_inputs_is_refused():
    """A Sequential of one Input given a tuple of two arrays: Keras warns and uses the first
    only, so the second input's derivatives read 0 (no-input-dependence). Refused, with the
    fix; a functional model of two Inputs given one tuple of two works."""
    from nbderiv.errors import InputShapeError

    keras.utils.set_random_seed(0)
    one = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh"),
                            keras.layers.Dense(1)])
    a, b = np.random.rand(5, 1).astype("float32"), np.random.rand(5, 1).astype("float32")
    with pytest.raises(InputShapeError, match="takes 1 input"):
        nbderiv.derivatives(one, (a, b))
    xi, ti = keras.Input((1,)), keras.Input((1,))
    two = keras.Model([xi, ti], keras.layers.Dense(1)(keras.layers.Concatenate()([xi, ti])))
    with pytest.raises(InputShapeError, match="takes 2 inputs"):
        nbderiv.derivatives(two, (a, b, a))
    d = nbderiv.derivatives(two, (a, b))
    w = two.layers[-1].kernel.numpy()[:, 0]
    np.testing.assert_allclose(d[1][:, 0], np.broadcast_to(w, (5, 2)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["operators", "ops.sin", "dropout", "noise"])
def test_float64_copy_of_operations_on_keras_tensors_and_of_seeded_layers(kind):
    # a functional model applying operators or keras.ops to KerasTensors (the clone refused
    # their dtype), a subclassed model holding a Dropout / GaussianNoise (its seed generator
    # holds a module: the deep copy could not pickle it): check=True fell back to float32,
    # whose step and tolerance failed correct results of an attention + LayerNorm model
    L = keras.layers
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    if kind in ("operators", "ops.sin"):
        i = keras.Input((3,))
        h = L.Dense(3, activation="tanh")(i)
        h = i + h * h if kind == "operators" else keras.ops.sin(h) + i
        model = keras.Model(i, L.Dense(1)(h))
    else:
        class Sub(keras.Model):
            def __init__(self):
                super().__init__()
                self.a = L.Dense(8, activation="tanh")
                self.r = L.Dropout(0.3) if kind == "dropout" else L.GaussianNoise(0.1)
                self.b = L.Dense(1)

            def call(self, z, training=None):
                return self.b(self.r(self.a(z), training=training))
        model = Sub()
        model(x)
    copy = tfb.BACKEND.float64_copy(model)
    assert copy is not model and all(str(w.dtype) == "float64" for w in copy.weights)
    assert_close(keras_fn(copy)(x.astype(np.float64)), keras_fn(model)(x), 1e-5)
    d = nbderiv.derivatives(model, x, order=2, check=True)
    assert d.check.passed and d.check.dtype == "float64", d.check.summary()
    weights = [w.numpy() for w in model.weights]
    X = tf.constant(x.astype(np.float64))
    with tf.GradientTape() as tape:  # truth: the float64 copy's own autodiff
        tape.watch(X)
        y = copy(X)
    assert_close(d[1][:, 0], tape.gradient(y, X).numpy(), 1e-5)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(weights, model.weights))


def test_a_tf_function_is_tensorflow_and_its_signature_dtype_is_used():
    # a tf.function was not recognised ("cannot tell which framework runs Function") and its
    # float32 input_signature refused float64 points with advice about shapes
    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def f(z):
        return tf.reduce_sum(tf.sin(z), 1, keepdims=True)

    x = np.random.default_rng(0).random((4, 2))
    d = nbderiv.derivatives(f, x, order=2)
    assert d.framework == "tensorflow" and d[1].dtype == np.float32
    assert_close(d[1][:, 0], np.cos(x), 1e-6)
    assert_close(d[2][:, 0], np.stack([np.diag(-np.sin(p)) for p in x]), 1e-6)


def test_a_tf_function_whose_signature_fixes_the_number_of_points_is_told_so():
    """input_signature=[TensorSpec((6, 2))]: TensorFlow's error named two TensorSpecs and the
    fix said to reshape x, which already fits; the first axis must be free."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(7)
    base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])
    x = np.random.default_rng(7).normal(size=(6, 2)).astype("float32")
    fixed = tf.function(lambda z: base(z), input_signature=[tf.TensorSpec((6, 2), tf.float32)])
    assert fixed(x).shape == (6, 1)  # x itself fits
    with pytest.raises(InputShapeError, match=r"fixes the number of points.*shape=\(None, 2\)"):
        nbderiv.derivatives(fixed, x, progress=False)
    free = tf.function(lambda z: base(z), input_signature=[tf.TensorSpec((None, 2), tf.float32)])
    d = nbderiv.derivatives(free, x, progress=False)
    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = base(X)
    np.testing.assert_allclose(d[1][:, 0], tape.batch_jacobian(y, X).numpy()[:, 0], atol=1e-6)


def test_a_checks_float64_copy_runs_eagerly_with_the_same_numbers():
    """A float64 copy made for a check runs a few times on a few points: tracing its
    derivatives cost seconds per copy for a GRU (a Keras GRU's call took 22 s). It runs
    eagerly; the model itself is still traced. Truth: a float64 twin's nested tapes."""
    keras = pytest.importorskip("keras")
    from nbderiv.backends.tensorflow import BACKEND, _one_off

    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((7, 3)), keras.layers.GRU(6, return_sequences=True),
                              keras.layers.Dense(2)])
    twin = BACKEND.float64_copy(model)
    assert _one_off(twin) and not _one_off(model)
    x = np.random.default_rng(2).normal(size=(4, 7, 3))
    d = nbderiv.derivatives(twin, x, progress=False)
    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = twin(X)
    J = tape.batch_jacobian(y, X).numpy()  # (N, 7, 2, 7, 3)
    np.testing.assert_allclose(d[1], J, atol=1e-10)


def _adapted_normalization_parts():
    rs = np.random.RandomState(0)
    norm = keras.layers.Normalization()
    norm.adapt(rs.randn(100, 3).astype("float32") * 2 + 1)
    keras.utils.set_random_seed(0)
    return norm, keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1), \
        (rs.randn(5, 3) * 5).astype("float32")


def _normalized_truth(norm, first, last, x):
    """d y / d x of last(tanh(first((x - mean) / sqrt(var)))), in float64 NumPy."""
    mean = np.asarray(norm.mean, np.float64).reshape(-1)
    sd = np.sqrt(np.maximum(np.asarray(norm.variance, np.float64).reshape(-1), 1e-7))
    W1, b1 = (np.asarray(w, np.float64) for w in first.get_weights())
    W2, _ = (np.asarray(w, np.float64) for w in last.get_weights())
    h = np.tanh(((x.astype(np.float64) - mean) / sd) @ W1 + b1)
    return np.einsum("nk,jk,ik->nji", 1 - h ** 2, W2.T, W1 / sd[:, None])


def test_an_adapted_normalization_gets_a_float64_copy_for_the_check():
    # the clone rebuilt the layer from its config without its adapted statistics (they are
    # computed from its weights when adapt() ends), so it disagreed and the deep copy that
    # followed recursed: the check fell back to float32
    norm, first, last, x = _adapted_normalization_parts()
    model = keras.Sequential([keras.Input((3,)), norm, first, last])
    d = nbderiv.derivatives(model, x, check=True)
    assert d.check.dtype == "float64" and "no float64 copy" not in d.check.note, d.check.note
    assert d.check.passed
    np.testing.assert_allclose(d.check.reference[1], _normalized_truth(norm, first, last, x),
                               rtol=1e-6, atol=1e-9)


def test_a_subclassed_model_holding_an_adapted_normalization_is_deep_copied():
    norm, first, last, x = _adapted_normalization_parts()

    class Scaled(keras.Model):
        def __init__(self):
            super().__init__()
            self.norm, self.first, self.last = norm, first, last

        def call(self, z):
            return self.last(self.first(self.norm(z)))
    model = Scaled()
    model(x)
    d = nbderiv.derivatives(model, x, check=True)
    assert d.check.dtype == "float64" and "no float64 copy" not in d.check.note, d.check.note
    np.testing.assert_allclose(d.check.reference[1], _normalized_truth(norm, first, last, x),
                               rtol=1e-6, atol=1e-9)
