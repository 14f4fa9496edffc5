"""Precision: the finite-difference check in float64 on copies of subclassed Keras models
(constructor arguments included), its plain fallback, and the summary's wording.

Every reference here is independent of nbderiv: a NumPy float64 re-implementation of the
network from its weights, differentiated by float64 central differences.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

needs_keras = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None
                                 or importlib.util.find_spec("keras") is None,
                                 reason="TensorFlow / Keras not installed")


def _numpy_fd(f, X, order):
    """d[order] of f: (N, 1) -> (N, 1) at X (N, 1) by float64 central differences."""
    h = 1e-4 if order == 2 else 1e-5
    if order == 1:
        return ((f(X + h) - f(X - h)) / (2 * h))[:, :, None]
    return ((f(X + h) - 2 * f(X) + f(X - h)) / h**2)[:, :, None, None]


def _dense_stack(weights, act):
    """A NumPy float64 forward pass of Dense layers (kernel, bias pairs), act between."""
    Ws = [np.asarray(w, np.float64) for w in weights]

    def f(X):
        for i in range(0, len(Ws), 2):
            X = X @ Ws[i] + Ws[i + 1]
            if i + 2 < len(Ws):
                X = act(X)
        return X
    return f


# -- subclassed Keras models with constructor arguments ------------------------------------
def _keras_models():
    import keras
    import tensorflow as tf

    class FNN(keras.Model):  # DeepXDE-style: layer sizes, activation and initializer by name
        def __init__(self, layer_sizes, activation, kernel_initializer):
            super().__init__()
            self.denses = [keras.layers.Dense(n, activation=activation,
                                              kernel_initializer=kernel_initializer)
                           for n in layer_sizes[1:-1]]
            self.denses.append(keras.layers.Dense(layer_sizes[-1],
                                                  kernel_initializer=kernel_initializer))

        def call(self, x):
            for layer in self.denses:
                x = layer(x)
            return x

    class SinNet(keras.Model):  # a function as argument, a float32 constant attribute
        def __init__(self, width, depth, act=tf.sin, scale=2.0):
            super().__init__()
            self.scale = tf.constant(scale)
            self.hidden = [keras.layers.Dense(width, activation=act) for _ in range(depth)]
            self.out = keras.layers.Dense(1)

        def call(self, x):
            x = x * self.scale
            for layer in self.hidden:
                x = layer(x)
            return self.out(x)

    class Affine(keras.layers.Layer):  # weights made in build()
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")
            self.b = self.add_weight(shape=(self.units,), initializer="random_normal")

        def call(self, x):
            return x @ self.w + self.b

    class Custom(keras.Model):
        def __init__(self, width):
            super().__init__()
            self.a, self.b = Affine(width), Affine(1)

        def call(self, x):
            return self.b(keras.ops.tanh(self.a(x)))

    keras.utils.set_random_seed(0)
    fnn = FNN([1, 32, 32, 1], "tanh", "glorot_normal")
    sin = SinNet(24, 2)
    custom = Custom(16)
    for m in (fnn, sin, custom):
        m(np.zeros((1, 1), np.float32))
    return {
        "fnn": (fnn, _dense_stack(fnn.get_weights(), np.tanh)),
        "sin": (sin, lambda X: _dense_stack(sin.get_weights(), np.sin)(2.0 * X)),
        "custom": (custom, _dense_stack(custom.get_weights(), np.tanh)),
    }


@needs_keras
@pytest.mark.parametrize("name", ["fnn", "sin", "custom"])
def test_subclassed_keras_model_with_arguments_is_checked_in_float64(name):
    import nbderiv

    model, truth = _keras_models()[name]
    x = np.linspace(-1, 1, 21).astype(np.float32).reshape(-1, 1)
    d = nbderiv.derivatives(model, x, order=2, check=True)
    c = d.check
    assert c.passed and c.dtype == "float64" and c.nonsmooth_points == (), c.summary()
    assert "no float64 copy" not in c.note
    X = x.astype(np.float64)
    for k in (1, 2):
        ref = _numpy_fd(truth, X, k)
        scale = np.abs(ref).max()
        # the check's reference is float64 (a float32 one would be off by ~1e-3 here)
        np.testing.assert_allclose(c.reference[k], ref, atol=1e-6 * scale + 1e-7)
        assert c.errors[k][1] < 1e-4  # float32 autodiff vs float64 differences
    assert all(str(w.dtype) == "float32" for w in model.weights)  # the model is untouched


@needs_keras
def test_a_model_that_casts_to_float32_inside_is_checked_in_float32_and_says_so():
    import keras

    import nbderiv

    class Cast32(keras.Model):
        def __init__(self, width):
            super().__init__()
            self.h, self.o = keras.layers.Dense(width, activation="tanh"), keras.layers.Dense(1)

        def call(self, x):
            return self.o(self.h(keras.ops.cast(x, "float32")))

    keras.utils.set_random_seed(1)
    model = Cast32(16)
    model(np.zeros((1, 1), np.float32))
    x = np.linspace(-1, 1, 15).astype(np.float32)
    c = nbderiv.derivatives(model, x, order=2, check=True).check
    assert c.passed and c.dtype == "float32", c.summary()  # no false MISMATCH
    assert "no float64 copy" in c.note and "lower precision" in c.note
    truth = _dense_stack(model.get_weights(), np.tanh)
    ref = _numpy_fd(truth, x.reshape(-1, 1).astype(np.float64), 1)
    np.testing.assert_allclose(c.reference[1], ref, atol=2e-3 * np.abs(ref).max())


def test_torch_model_checked_in_float64_against_numpy_truth():
    torch = pytest.importorskip("torch")
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
    x = torch.linspace(-1, 1, 17).reshape(-1, 1)
    c = nbderiv.derivatives(net, x, order=2, check=True).check
    assert c.passed and c.dtype == "float64" and "agrees with float64" in c.summary()
    weights = [net[0].weight.detach().numpy().T, net[0].bias.detach().numpy(),
               net[2].weight.detach().numpy().T, net[2].bias.detach().numpy()]
    truth = _dense_stack(weights, np.tanh)
    for k in (1, 2):
        ref = _numpy_fd(truth, x.double().numpy(), k)
        np.testing.assert_allclose(c.reference[k], ref, atol=1e-6 * np.abs(ref).max())


def test_smooth_but_sharp_model_is_checked_at_a_step_that_resolves_it():
    torch = pytest.importorskip("torch")
    import nbderiv

    # tanh(3000 x): no kink anywhere, but it bends within a 1e-4 step near 0. The first
    # step's differences disagree (it used to end there, a MISMATCH on right derivatives);
    # at smaller steps they converge to autodiff, which is right (closed form)
    x = np.array([[1e-5], [0.5]])
    d = nbderiv.derivatives(lambda x: torch.tanh(3000 * x), torch.tensor(x), order=2,
                            check=True)
    c = d.check
    assert c.passed and c.kink_points == () and c.step < 1e-5, c.summary()
    assert "times smaller they agree" in c.note and "kink lies" not in c.summary()
    t = np.tanh(3000 * x[:, 0])
    d1, d2 = 3000 * (1 - t**2), -2 * 3000**2 * t * (1 - t**2)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], d2, rtol=1e-10, atol=1e-6)
    np.testing.assert_allclose(c.reference[1][:, 0, 0], d1, rtol=1e-4)


def test_inputs_standardised_from_a_narrow_range_lose_float32_digits_told_as_such():
    """x in [1, 1 + 1e-4], standardised inside forward: float32 rounds x - 1.00005 to a few
    digits. The first step (1e-4) spans the whole range; smaller steps agree with float64
    autodiff, and what stays off is float32's (the check blamed kinks or a cut graph).
    Truth: float64 vmap(hessian) of a float64 copy."""
    torch = pytest.importorskip("torch")
    import copy

    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = lambda x: net((x - 1.00005) / 2.9e-5)  # noqa: E731
    x = 1 + 1e-4 * torch.rand(40, 1, generator=torch.Generator().manual_seed(0))
    d = nbderiv.derivatives(model, x, order=2, check=True, progress=False)
    c = d.check
    assert not c.passed and c.kink_points == () and c.nonsmooth_points == (), c.summary()
    assert "kink" not in c.summary() and "cuts the graph" not in c.summary()
    assert "low-precision" in d.codes, d.findings
    net64 = copy.deepcopy(net).double()
    H = torch.func.vmap(torch.func.hessian(
        lambda z: net64((z - 1.00005) / 2.9e-5)[0]))(x.double()).detach().numpy().ravel()
    real = np.abs(d[2].ravel() - H).max() / np.abs(H).max()
    assert 2e-3 < real < 2e-2  # float32's own loss, as the check reports it
    assert c.errors[2][1] == pytest.approx(real, rel=0.2)


def test_a_cut_graph_fails_the_check_at_every_step():
    torch = pytest.importorskip("torch")
    import nbderiv

    # the slope cut out by .detach(): smaller steps converge to the true slope, never to
    # autodiff's
    d = nbderiv.derivatives(lambda x: torch.sin(x) + x.detach() ** 2,
                            torch.linspace(0.5, 1.5, 6, dtype=torch.float64)[:, None],
                            check=True)
    assert not d.check.passed and "times smaller they agree" not in d.check.note


# -- reference= : the error against a known truth -------------------------------------------
def test_reference_function_errors_per_order_against_closed_form():
    torch = pytest.importorskip("torch")
    import nbderiv

    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    d = nbderiv.derivatives(torch.sin, x, order=3, reference=np.sin)
    errs = d.reference_errors
    assert sorted(errs) == [0, 1, 2, 3]
    # autodiff of sin is exact; the float64 differences of the reference are good to ~1e-6
    assert errs[0][0] == 0.0 and all(errs[k][1] < 1e-5 for k in (1, 2, 3)), errs


def test_reference_shows_a_net_that_passes_the_check_but_misses_the_truth():
    torch = pytest.importorskip("torch")
    import nbderiv

    # a tanh net that is NOT sin: the check (autodiff vs this model) passes, the reference
    # (sin) reports the distance to the truth, order by order
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1)).double()
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    d = nbderiv.derivatives(net, x, order=2, check=True, reference=lambda x: np.sin(x))
    assert d.check.passed
    xs = x.numpy()
    with torch.no_grad():
        y = net(x.reshape(-1, 1)).numpy().ravel()
    assert d.reference_errors[0][0] == pytest.approx(np.abs(y - np.sin(xs)).max(), rel=1e-9)
    assert d.reference_errors[1][0] == pytest.approx(
        np.abs(d[1].ravel() - np.cos(xs)).max(), rel=1e-5)
    assert d.reference_errors[1][0] > 1e-2


def test_reference_dict_of_closed_forms_with_two_inputs_and_wrt():
    torch = pytest.importorskip("torch")
    import nbderiv

    def f(x):
        return x[:, :1] ** 2 * x[:, 1:] ** 3

    X = torch.rand(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    closed = {1: lambda x: 3 * x[:, 0] ** 2 * x[:, 1] ** 2,          # d/dx1
              2: lambda x: 6 * x[:, 0] ** 2 * x[:, 1]}               # d2/dx1^2
    d = nbderiv.derivatives(f, X, order=2, wrt=[1], reference=closed)
    assert sorted(d.reference_errors) == [1, 2]
    assert all(e[1] < 1e-12 for e in d.reference_errors.values())
    wrong = {2: lambda x: 6 * x[:, 0] ** 2 * x[:, 1] + 1.0}
    d = nbderiv.derivatives(f, X, order=2, wrt=[1], reference=wrong)
    assert d.reference_errors[2][0] == pytest.approx(1.0)
    # a reference function (no closed forms): mixed partials by central differences
    d = nbderiv.derivatives(f, X, order=2, reference=lambda x: x[:, :1] ** 2 * x[:, 1:] ** 3)
    assert all(d.reference_errors[k][1] < 1e-5 for k in (1, 2)), d.reference_errors


def test_reference_for_a_tuple_input_is_called_with_separate_arguments():
    torch = pytest.importorskip("torch")
    import nbderiv

    x = torch.linspace(0, 1, 5, dtype=torch.float64).reshape(-1, 1)
    t = torch.linspace(1, 2, 5, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(lambda x, t: torch.sin(x) * t, (x, t), order=2,
                            reference=lambda x, t: np.sin(x) * t)
    assert all(e[1] < 1e-5 for e in d.reference_errors.values()), d.reference_errors


def test_bad_reference_is_a_clear_error():
    torch = pytest.importorskip("torch")
    import nbderiv
    from nbderiv.errors import OptionError

    x = torch.linspace(0, 1, 5)
    with pytest.raises(OptionError, match="Fix:"):
        nbderiv.derivatives(torch.sin, x, reference=3.0)
    with pytest.raises(OptionError, match="orders 0..1"):
        nbderiv.derivatives(torch.sin, x, reference={5: np.cos})
    with pytest.raises(OptionError, match="does not fit"):
        nbderiv.derivatives(torch.sin, x, reference=lambda x: np.zeros((5, 3)))


# -- compute dtypes --------------------------------------------------------------------------
@needs_keras
def test_keras_float64_inputs_are_differentiated_in_float64():
    import keras

    import nbderiv

    inp = keras.Input((1,), dtype="float64")
    model = keras.Model(inp, keras.ops.exp(keras.ops.sin(3.0 * inp)))  # no variables
    x = np.linspace(-1, 1, 13)
    d = nbderiv.derivatives(model, x, order=2)
    closed1 = 3 * np.cos(3 * x) * np.exp(np.sin(3 * x))
    closed2 = (9 * np.cos(3 * x) ** 2 - 9 * np.sin(3 * x)) * np.exp(np.sin(3 * x))
    assert d[1].dtype == np.float64
    np.testing.assert_allclose(d[1].ravel(), closed1, rtol=1e-12, atol=1e-12)  # float32: ~1e-7
    np.testing.assert_allclose(d[2].ravel(), closed2, rtol=1e-11, atol=1e-11)


@needs_keras
def test_keras_float32_inputs_stay_float32():
    import keras

    import nbderiv

    inp = keras.Input((1,))
    model = keras.Model(inp, keras.ops.sin(inp))
    d = nbderiv.derivatives(model, np.linspace(-1, 1, 5))
    assert d[1].dtype == np.float32
    np.testing.assert_allclose(d[1].ravel(), np.cos(np.linspace(-1, 1, 5)), rtol=1e-6)


def test_torch_float16_model_is_computed_in_float16_against_float64_truth():
    torch = pytest.importorskip("torch")
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.linspace(-1, 1, 9).reshape(-1, 1)
    d = nbderiv.derivatives(net.half(), x.half())
    assert d[1].dtype == np.float16
    weights = [net[0].weight.detach().double().numpy().T, net[0].bias.detach().double().numpy(),
               net[2].weight.detach().double().numpy().T, net[2].bias.detach().double().numpy()]
    ref = _numpy_fd(_dense_stack(weights, np.tanh), x.double().numpy(), 1)
    np.testing.assert_allclose(d[1].astype(np.float64), ref, atol=2e-2 * np.abs(ref).max())


def test_torch_bfloat16_model_is_a_clear_error():
    torch = pytest.importorskip("torch")
    import nbderiv
    from nbderiv.errors import ModelTypeError

    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh()).to(torch.bfloat16)
    with pytest.raises(ModelTypeError, match=r"bfloat16.*Fix: .*\.float\(\)"):
        nbderiv.derivatives(net, torch.rand(5, 1))


@needs_keras
def test_keras_bfloat16_model_is_a_clear_error():
    import keras

    import nbderiv
    from nbderiv.errors import ModelTypeError

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, dtype="bfloat16")])
    with pytest.raises(ModelTypeError, match=r"bfloat16.*Fix:"):
        nbderiv.derivatives(model, np.zeros((3, 1), np.float32))


@needs_keras
def test_keras_model_given_a_torch_tensor_that_requires_grad_says_what_to_pass():
    torch = pytest.importorskip("torch")
    import keras

    import nbderiv
    from nbderiv.errors import InputTypeError

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    x = torch.rand(4, 1, requires_grad=True)
    with pytest.raises(InputTypeError, match=r"torch tensor.*NumPy array or a tf\.Tensor") as err:
        nbderiv.derivatives(model, x)
    assert "framework tensor" not in str(err.value)  # one fix, the one that fits


# -- a model that takes float64 input but computes in float32 inside -------------------------
def _float32_layers_float64_input(keras, weights, act="tanh"):
    """What keras.config.set_floatx('float64') gives once Keras was in use: float64 Inputs,
    layers still float32 (their dtype policy is the one Keras started with)."""
    model = keras.Sequential([keras.Input((1,), dtype="float64"),
                              keras.layers.Dense(weights[1].size, activation=act,
                                                 dtype="float32"),
                              keras.layers.Dense(1, dtype="float32",
                                                 use_bias=len(weights) == 4)])
    model.set_weights([np.asarray(w, np.float32) for w in weights])
    return model


@needs_keras
def test_float64_input_into_float32_layers_is_checked_with_float32_precision():
    """The check ran float64 differences (h=1e-4) through float32 layers, failed, and blamed
    a cut graph; the results have float32 precision, and the check now says so and compares
    them with a real float64 copy, with float32's tolerance."""
    import keras

    import nbderiv

    rng = np.random.default_rng(3)
    weights = [rng.normal(size=(1, 16)), rng.normal(size=16), rng.normal(size=(16, 1)),
               rng.normal(size=1)]
    model = _float32_layers_float64_input(keras, weights)
    x = np.linspace(-1, 1, 7)
    d = nbderiv.derivatives(model, x, order=2, check=True)
    c = d.check
    assert d[1].dtype == np.float64  # fed in float64, as its Input says
    assert c.passed and c.dtype == "float64" and c.result_dtype == "float32", c.summary()
    assert "computes in float32 inside" in c.note and "set_dtype_policy" in c.note
    assert "cuts the graph" not in c.note and c.nonsmooth_points == ()
    truth = _dense_stack([np.asarray(w, np.float32) for w in weights], np.tanh)
    X = x.reshape(-1, 1)
    for k in (1, 2):
        ref = _numpy_fd(truth, X, k)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(c.reference[k], ref, atol=1e-6 * scale)  # float64 copy
        np.testing.assert_allclose(d[k], ref, atol=1e-4 * scale)  # float32 precision
    assert all(str(w.dtype) == "float32" for w in model.weights)  # the model is untouched


@needs_keras
def test_after_set_floatx_once_keras_was_used_the_check_names_float32_precision():
    import keras

    import nbderiv

    keras.config.dtype_policy()  # Keras in use: its dtype policy is fixed from here on
    keras.config.set_floatx("float64")
    try:
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
    finally:
        keras.config.set_floatx("float32")
    if model.inputs[0].dtype != "float64" or model.compute_dtype != "float32":
        pytest.skip("this Keras version applies set_floatx to the layers too")
    x = np.linspace(-1, 1, 9)
    d = nbderiv.derivatives(model, x, order=2, check=True)
    c = d.check
    assert c.passed and c.result_dtype == "float32" and "float32 inside" in c.note, c.summary()
    truth = _dense_stack(model.get_weights(), np.tanh)
    ref = _numpy_fd(truth, x.reshape(-1, 1), 1)
    np.testing.assert_allclose(c.reference[1], ref, atol=1e-6 * np.abs(ref).max())


@needs_keras
def test_float32_digits_lost_behind_a_float64_input_are_low_precision():
    """(tanh(x + 1e-5) - tanh(x)) / 1e-5 in float32 layers behind a float64 Input: five
    digits are lost, float64 autodiff agrees with the differences: low-precision."""
    import keras

    import nbderiv

    delta = 1e-5
    weights = [np.ones((1, 2)), np.array([0.0, delta]), np.array([[-1 / delta], [1 / delta]])]
    model = _float32_layers_float64_input(keras, weights)
    x = np.linspace(-1, 1, 9)
    d = nbderiv.derivatives(model, x, check=True)
    c = d.check
    assert not c.passed and c.low_precision and c.low_precision_orders == (1,), c.summary()
    assert "low-precision" in d.codes and c.nonsmooth_points == ()
    assert "float32 results lose digits" in c.note
    closed = (np.tanh(x) ** 2 - np.tanh(x + delta) ** 2) / delta  # d/dx, exact in float64
    np.testing.assert_allclose(c.reference[1][:, 0, 0], closed, atol=1e-6)
    assert np.abs(d[1][:, 0, 0] - closed).max() > 1e-3  # what float32 makes of it


@needs_keras
def test_a_model_that_casts_sequences_to_float32_inside_is_checked_in_float32():
    """Sequences (6 x 3 values a point): a nudge of 2e-8 x crossed float32's rounding
    boundaries somewhere, so a copy that casts to float32 inside passed for float64 and the
    check compared float32 outputs with float64 steps. Truth: a NumPy forward pass."""
    import keras

    import nbderiv

    class CastSeq(keras.Model):
        def __init__(self):
            super().__init__()
            self.flat, self.h = keras.layers.Flatten(), keras.layers.Dense(8, activation="tanh")
            self.o = keras.layers.Dense(1)

        def call(self, x):
            return self.o(self.h(self.flat(keras.ops.cast(x, "float32"))))

    keras.utils.set_random_seed(5)
    model = CastSeq()
    model(np.zeros((1, 6, 3), np.float32))
    x = np.random.default_rng(5).random((8, 6, 3)).astype(np.float32)
    c = nbderiv.derivatives(model, x, check=True).check
    assert c.passed and c.dtype == "float32" and "lower precision" in c.note, c.summary()
    W1, b1, W2, _ = (np.asarray(w, np.float64) for w in model.get_weights())
    h = np.tanh(x.reshape(8, -1).astype(np.float64) @ W1 + b1)
    closed = ((1 - h ** 2) * W2[:, 0]) @ W1.T  # (N, 18)
    np.testing.assert_allclose(c.reference[1][:, 0], closed, atol=2e-3 * np.abs(closed).max())


@needs_keras
def test_the_keras_float64_advice_gives_a_float64_model():
    """low-precision's fix for Keras: set_dtype_policy alone leaves the Inputs float32 (the
    model then rounds x to float32: a change of 1e-12 is lost), an Input of dtype float64 with
    the float64 policy computes in float64."""
    import keras

    before = keras.config.dtype_policy()
    x = np.random.default_rng(0).normal(size=(4, 3))
    try:
        keras.config.set_dtype_policy("float64")
        alone = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh")])
        advised = keras.Sequential([keras.Input((3,), dtype="float64"),
                                    keras.layers.Dense(4, activation="tanh")])
    finally:
        keras.config.set_dtype_policy(before)
    assert np.all(np.asarray(alone(x + 1e-12) - alone(x)) == 0)
    assert np.any(np.asarray(advised(x + 1e-12) - advised(x)) != 0)
    from nbderiv.findings import low_precision_finding

    fix = low_precision_finding({1: (1e-3, 1e-3)}, np.float32).fix
    assert "keras.Input(shape, dtype='float64') with set_dtype_policy('float64')" in fix


def test_keras_mixed_bfloat16_layers_are_low_precision():
    """float32 variables, bfloat16 arithmetic: the derivatives are ~1e-2 off the float64
    truth (the same variables in float64, by hand) with no finding before."""
    import nbderiv

    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).randn(6, 3).astype("float32")
    m = keras.Sequential([keras.Input((3,)),
                          keras.layers.Dense(16, activation="tanh", dtype="mixed_bfloat16"),
                          keras.layers.Dense(2, dtype="mixed_bfloat16")])
    W = [v.numpy().astype("float64") for v in m.weights]
    xt = tf.constant(x.astype("float64"))
    with tf.GradientTape() as t:
        t.watch(xt)
        y = tf.tanh(xt @ W[0] + W[1]) @ W[2] + W[3]
    J = t.batch_jacobian(y, xt).numpy()
    d = nbderiv.derivatives(m, x, order=1)
    assert np.abs(d[1] - J).max() / np.abs(J).max() > 1e-3  # the rounding is real
    f = d.finding("low-precision")
    assert f is not None and "bfloat16" in f.message
