"""A Keras model is differentiated as ``model(x)`` runs it: a layer the model forces into
training mode (``BatchNormalization()(h, training=True)``, MC dropout, ``call(self, x,
training=True)``) runs in training mode, as it does for its user, and the probe finds what
that does (coupled points, randomness). nbderiv used to pass ``training=False``, which
overrides those flags: the derivatives were those of another model, with no finding. Truth:
the diagonal blocks of ``tape.jacobian`` of ``model(x)`` over the whole batch, in float64 on a
twin with the same weights."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import nbderiv  # noqa: E402


def _forced_bn(dtype):
    i = keras.Input((3,), dtype=dtype)
    h = keras.layers.Dense(8, dtype=dtype)(i)
    h = keras.layers.BatchNormalization(dtype=dtype)(h, training=True)
    h = keras.layers.Activation("tanh", dtype=dtype)(h)
    return keras.Model(i, keras.layers.Dense(2, dtype=dtype)(h))


def _blocks(model, x):
    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = model(X)
    J = tape.jacobian(y, X).numpy()
    return np.stack([J[n, :, n] for n in range(len(x))]), y.numpy()


def test_a_batchnorm_forced_into_training_mode_is_differentiated_as_model_x_runs_it():
    keras.utils.set_random_seed(2)
    m = _forced_bn("float32")
    twin = _forced_bn("float64")
    twin.set_weights([w.astype(np.float64) for w in m.get_weights()])
    x = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    before = [v.numpy().copy() for v in m.variables]
    d = nbderiv.derivatives(m, x)
    after = [v.numpy() for v in m.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # moving stats put back
    truth, y64 = _blocks(twin, x.astype(np.float64))
    inference = m(x, training=False).numpy()
    assert np.abs(y64 - inference).max() > 0.1  # training=False is another model here
    np.testing.assert_allclose(d.y, y64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d[1], truth, rtol=1e-4, atol=1e-5)
    assert "coupled-samples" in d.codes
    assert "training=True" in d.finding("coupled-samples").fix


def test_mc_dropout_forced_on_is_random():
    keras.utils.set_random_seed(0)
    i = keras.Input((3,))
    h = keras.layers.Dense(32, activation="tanh")(i)
    mc = keras.Model(i, keras.layers.Dense(1)(keras.layers.Dropout(0.5)(h, training=True)))
    x = np.random.default_rng(1).random((6, 3)).astype(np.float32)
    assert np.abs(mc(x).numpy() - mc(x).numpy()).max() > 1e-3  # the user's model(x): random
    assert "train-mode" in nbderiv.derivatives(mc, x).codes


class _TrainingByDefault(keras.Model):
    def __init__(self):
        super().__init__()
        self.a = keras.layers.Dense(8, dtype="float64")
        self.bn = keras.layers.BatchNormalization(dtype="float64")
        self.b = keras.layers.Dense(1, dtype="float64")

    def call(self, x, training=True):
        return self.b(tf.tanh(self.bn(self.a(x), training=training)))


def test_a_subclassed_call_whose_training_defaults_to_true():
    keras.utils.set_random_seed(3)
    m = _TrainingByDefault()
    x = np.random.default_rng(2).random((5, 3))
    truth, y = _blocks(m, x)  # model(x): batch statistics
    d = nbderiv.derivatives(m, x)
    np.testing.assert_allclose(d.y, y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d[1], truth, rtol=1e-8, atol=1e-10)
    assert "coupled-samples" in d.codes


def test_mc_dropout_is_told_in_keras_words():
    """Dropout called with training=True: the finding used torch's words (forward,
    torch.randn, model.eval()) and said no layer in training mode explains it."""
    import nbderiv

    inp = keras.Input((2,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    h = keras.layers.Dropout(0.3)(h, training=True)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    d = nbderiv.derivatives(model, np.random.default_rng(0).normal(size=(6, 2)).astype("f4"))
    f = d.finding("train-mode")
    assert f is not None and "training=True" in f.message
    assert "torch" not in f.message + f.fix and "in forward" not in f.message


class _UnseededNoise(keras.layers.Layer):
    """Noise from the global streams: keras.random without seed=, tf.random's Generator."""

    def call(self, x):
        g = tf.random.get_global_generator()
        return x + 1e-2 * keras.random.normal(tf.shape(x)) + 1e-2 * g.normal(tf.shape(x))


def test_unseeded_draws_leave_the_global_random_streams_where_they_were():
    from keras.src.random.seed_generator import global_seed_generator
    i = keras.Input((2,))
    model = keras.Model(i, keras.layers.Dense(1)(_UnseededNoise()(i)))
    model(np.zeros((1, 2), "float32"))  # both global generators exist now
    keras_before = global_seed_generator().state.numpy().copy()
    tf_before = tf.random.get_global_generator().state.numpy().copy()
    d = nbderiv.derivatives(model, np.random.default_rng(0).random((5, 2), "float32"),
                            progress=False)
    assert any("stochastic" in f.message for f in d.findings)
    np.testing.assert_array_equal(global_seed_generator().state.numpy(), keras_before)
    np.testing.assert_array_equal(tf.random.get_global_generator().state.numpy(), tf_before)


def test_a_tf_function_around_the_model_keeps_its_statistics_and_seeds():
    """tf.function(lambda z: m(z, training=True)): its BatchNorm moving statistics moved and
    its Dropout's seed generator advanced (a plain lambda was put back); the variables a
    tf.function's Python function holds are saved now. Values: the diagonal blocks of the
    batch Jacobian of one call, on a float64 twin."""
    keras.utils.set_random_seed(3)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                          keras.layers.BatchNormalization(), keras.layers.Activation("tanh"),
                          keras.layers.Dense(1)])
    bn = m.layers[1]
    before = [v.numpy().copy() for v in m.variables]
    x = np.random.default_rng(3).normal(size=(6, 3))
    d = nbderiv.derivatives(tf.function(lambda z: m(z, training=True)), x, progress=False)
    assert "coupled-samples" in d.codes
    for v, value in zip(m.variables, before):
        np.testing.assert_array_equal(v.numpy(), value)
    twin = keras.Sequential([keras.Input((3,), dtype="float64"),
                             keras.layers.Dense(4, dtype="float64"),
                             keras.layers.BatchNormalization(dtype="float64"),
                             keras.layers.Activation("tanh", dtype="float64"),
                             keras.layers.Dense(1, dtype="float64")])
    twin.set_weights(m.get_weights())
    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = twin(X, training=True)
    J = tape.jacobian(y, X).numpy()
    np.testing.assert_allclose(d[1][:, 0], np.stack([J[n, 0, n] for n in range(6)]),
                               atol=1e-5)
    assert any(v is bn.moving_mean for v in m.variables)  # (among those compared above)
    drop = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    seed = drop.layers[1].seed_generator.state.numpy().copy()
    nbderiv.derivatives(tf.function(lambda z: drop(z, training=True)), x, progress=False)
    np.testing.assert_array_equal(drop.layers[1].seed_generator.state.numpy(), seed)
