"""TensorFlow traces bake Python values in: a function, a tf.Module or a Keras Lambda traced
with k = 1.0 keeps computing with 1.0 after k = 3.0. nbderiv traces again when what the code
reads has changed (it used to return the old function's derivatives, and an old d.y).
Truths: closed forms k cos(k x), and the eager call of the changed function."""

from __future__ import annotations

import numpy as np
import pytest

import nbderiv

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

X = np.linspace(0.0, 1.0, 5)[:, None]
K = 1.0


def sine(z):
    return tf.sin(K * z)


def test_a_global_read_by_a_function_changes(monkeypatch):
    x = tf.constant(X)
    d = nbderiv.derivatives(sine, x, order=2)
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(X[:, 0]), atol=1e-12)
    monkeypatch.setattr(__import__(__name__), "K", 3.0)
    d = nbderiv.derivatives(sine, x, order=2)
    np.testing.assert_allclose(d[1][:, 0, 0], 3 * np.cos(3 * X[:, 0]), atol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], -9 * np.sin(3 * X[:, 0]), atol=1e-12)
    np.testing.assert_allclose(d.y[:, 0], np.sin(3 * X[:, 0]), atol=1e-12)


def test_a_closure_a_module_setting_and_a_rebound_model():
    x = tf.constant(X)
    scale = [1.0]

    def make(k):
        return lambda z: tf.sin(k * z)

    f = make(1.0)
    nbderiv.derivatives(f, x)
    f = make(2.0)  # a new function: traced anew anyway; the same one with a new setting:

    class Scaled(tf.Module):
        def __init__(self):
            super().__init__()
            self.k = 1.0

        def __call__(self, z):
            return tf.sin(self.k * z)

    m = Scaled()
    nbderiv.derivatives(m, x)
    m.k = 3.0
    np.testing.assert_allclose(nbderiv.derivatives(m, x)[1][:, 0, 0], 3 * np.cos(3 * X[:, 0]),
                               atol=1e-12)
    keras.utils.set_random_seed(0)
    nets = {"u": keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh"),
                                   keras.layers.Dense(2)])}

    def u(z):
        return nets["u"](z)[:, :1]

    xf = tf.constant(X.astype("float32"))
    nbderiv.derivatives(u, xf)
    keras.utils.set_random_seed(1)
    nets["u"] = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(2)])
    d = nbderiv.derivatives(u, xf)
    np.testing.assert_allclose(d.y, u(xf).numpy(), atol=1e-6)
    assert scale == [1.0]


def test_a_keras_lambda_reading_a_global(monkeypatch):
    monkeypatch.setattr(__import__(__name__), "K", 1.0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(lambda z: tf.sin(K * z))])
    x = X.astype("float32")
    nbderiv.derivatives(model, x)
    monkeypatch.setattr(__import__(__name__), "K", 3.0)
    d = nbderiv.derivatives(model, x)
    np.testing.assert_allclose(d[1][:, 0, 0], 3 * np.cos(3 * X[:, 0]), atol=1e-5)
    np.testing.assert_allclose(d.y, model(x).numpy(), atol=1e-6)


def _dict_model():
    keras.utils.set_random_seed(0)
    xi, ti = keras.Input((2,), name="x"), keras.Input((1,), name="t")
    h = keras.layers.Dense(8, activation="tanh")(keras.layers.Concatenate()([xi, ti]))
    return keras.Model({"x": xi, "t": ti}, keras.layers.Dense(1)(h))


def test_a_model_built_on_a_dict_of_inputs_takes_a_dict_and_refuses_a_tuple():
    """keras.Model({'x': xi, 't': ti}, ...): Keras sorts the names, so a tuple (x, t) used to
    reach the Input named 't' with x, silently (another function's derivatives). A dict says
    which is which; d.code runs on it. Truth: batch_jacobian of model({'x': x, 't': t})."""
    from nbderiv.errors import InputTypeError

    model = _dict_model()
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(6, 2)).astype("float32"), rng.normal(size=(6, 1)).astype("float32")
    with pytest.raises(InputTypeError, match=r"named inputs.*x=\{'t': \.\.\., 'x': \.\.\.\}"):
        nbderiv.derivatives(model, (x, t))
    d = nbderiv.derivatives(model, {"x": x, "t": t}, order=1)
    X, T = tf.constant(x), tf.constant(t)
    with tf.GradientTape(persistent=True) as g:
        g.watch([X, T])
        y = model({"x": X, "t": T})
    jt, jx = g.batch_jacobian(y, T).numpy(), g.batch_jacobian(y, X).numpy()
    assert d.inputs == ("t", "x[0]", "x[1]")
    np.testing.assert_allclose(d.y, y.numpy(), atol=1e-6)
    np.testing.assert_allclose(d[1], np.concatenate([jt, jx], axis=-1), atol=1e-6)
    ns = {"model": model, "x": {"x": x, "t": t}}
    exec(d.code, ns)
    np.testing.assert_allclose(np.asarray(ns["d1"]), d[1], atol=1e-6)


def test_tf_nn_moments_in_the_models_own_code_has_right_second_derivatives():
    """A layer norm written with tf.nn.moments: TensorFlow stops the gradient through the
    mean inside the variance, so nested tapes give d2 off by up to 3.8 (of 6.9). Truth:
    float64 central second differences of the same function in NumPy; d.code agrees, and
    tf.nn.moments is TensorFlow's own again afterwards."""
    w = np.array([0.5, -1.0, 2.0])
    original = tf.nn.moments

    def f(z):
        m, v = tf.nn.moments(z, axes=[1], keepdims=True)
        return tf.reduce_sum(w * (z - m) * tf.math.rsqrt(v + 1e-3), axis=1, keepdims=True)

    def f_np(z):
        m = z.mean(1, keepdims=True)
        v = ((z - m) ** 2).mean(1, keepdims=True)
        return (w * (z - m) / np.sqrt(v + 1e-3)).sum(1)

    x = np.random.default_rng(0).normal(size=(4, 3))
    d = nbderiv.derivatives(f, tf.constant(x), order=2)
    h, eye = 1e-4, np.eye(3)
    fd2 = np.array([[[(f_np(x[n:n + 1] + h * eye[i] + h * eye[j])
                       - f_np(x[n:n + 1] + h * eye[i] - h * eye[j])
                       - f_np(x[n:n + 1] - h * eye[i] + h * eye[j])
                       + f_np(x[n:n + 1] - h * eye[i] - h * eye[j]))[0] / (4 * h * h)
                      for j in range(3)] for i in range(3)] for n in range(4)])
    np.testing.assert_allclose(d[2][:, 0], fd2, atol=1e-5)
    ns = {"model": f, "x": x}
    exec(d.code, ns)
    np.testing.assert_allclose(np.asarray(ns["d2"]), d[2], atol=1e-10)
    assert tf.nn.moments is original
