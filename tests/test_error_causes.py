"""Model failures whose cause the message named wrongly (found by an exploratory tester): a
model that changes its input in place (was told its graph leaves the framework), an activation
the framework cannot differentiate to the order asked (was told to fix a forward pass that
works), a model that reduces over the points (was told the probe's batch size as if it were
the N of x). Each is reproduced for real; the message must name the real cause and its fix."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.errors import ModelCallError, NbderivError, OutputError  # noqa: E402
from nbderiv.inputs import check_output  # noqa: E402
from nbderiv.model_errors import model_error_cause, model_error_fix  # noqa: E402

# the words of the wrong causes the messages used to give
GRAPH = "leaves the framework"
GENERIC = "fix the error it raises there"


def failure(model, x, order, kind=ModelCallError) -> str:
    """The message of the nbderiv error that ``derivatives(model, x, order)`` raises, checked
    to be one of nbderiv's ValueError / TypeError family."""
    with pytest.raises(kind) as info:
        nbderiv.derivatives(model, x, order=order)
    err = info.value
    assert isinstance(err, NbderivError) and isinstance(err, (ValueError, TypeError))
    text = str(err)
    assert "Fix:" in text
    return text


# -- 1. a model that changes its input in place -------------------------------------------------
class ScalesItsInput(nn.Module):
    """The tester's model: ``x[:, 0] = x[:, 0] / 10`` inside forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 1).double()

    def forward(self, x):
        x[:, 0] = x[:, 0] / 10
        return self.lin(x)


@pytest.mark.parametrize("order", [1, 2])
def test_a_model_changing_its_input_in_place_is_told_to_work_on_a_copy(order):
    x = np.random.default_rng(0).random((100, 2))
    text = failure(ScalesItsInput(), x, order)
    assert "a view of a leaf Variable that requires grad" in text  # torch's own words
    assert "The model changes its input in place" in text
    assert "x = x.clone() at the start of forward" in text
    assert "out-of-place operations" in text
    assert GRAPH not in text and "np.sin" not in text and GENERIC not in text


def test_an_input_changed_in_place_with_an_in_place_method_gets_the_same_cause():
    x = torch.rand(30, 2, dtype=torch.float64)
    text = failure(lambda z: (z.mul_(2) ** 2).sum(1), x, 2)
    assert "a leaf Variable that requires grad" in text
    assert "The model changes its input in place" in text and GRAPH not in text


def test_a_value_saved_for_backward_and_changed_in_place_is_named_too():
    x = torch.rand(30, 2, dtype=torch.float64)

    def model(z):
        y = torch.sigmoid(z)
        y.mul_(2)  # sigmoid's backward needs its output as it was
        return y.sum(1)

    text = failure(model, x, 1)
    assert "modified by an inplace operation" in text
    assert "changes a tensor in place that autodiff still needs" in text
    assert "nn.ReLU() rather than nn.ReLU(inplace=True)" in text
    assert GENERIC not in text


def test_one_of_several_inputs_changed_in_place_is_named_too():
    x, t = torch.rand(20, 2, dtype=torch.float64), torch.rand(20, 1, dtype=torch.float64)

    def model(a, b):
        a[:, 0] = a[:, 0] / 10  # a is a view of the points nbderiv splits into (x, t)
        return (a * b).sum(1)

    text = failure(model, (x, t), 1)
    assert "is being modified inplace" in text
    assert "changes a tensor in place" in text and GENERIC not in text


@pytest.mark.parametrize("message", [
    "Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.",
    "Cannot convert a symbolic tf.Tensor (dense/BiasAdd:0) to a numpy array.",
    "numpy() is only available when eager execution is enabled.",
    "You are passing KerasTensor(...) to a function that calls __array__",
])
def test_the_graph_cause_still_catches_a_forward_pass_that_leaves_the_framework(message):
    exc = RuntimeError(message)
    assert model_error_cause(exc) == "graph"
    assert GRAPH in model_error_fix(exc, 10)


def test_a_real_numpy_round_trip_is_still_told_it_leaves_the_framework():
    x = torch.rand(20, 2, dtype=torch.float64)
    text = failure(lambda z: torch.as_tensor(np.sin(z.numpy())).sum(1), x, 2)
    assert "Can't call numpy() on Tensor that requires grad" in text
    assert GRAPH in text and "changes its input in place" not in text


# -- 2. an operation without a derivative of the order asked -------------------------------------
def test_hardsigmoid_at_order_two_is_told_to_ask_for_order_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Hardsigmoid(), nn.Linear(3, 1)).double()
    x = torch.rand(50, 2, dtype=torch.float64)
    assert nbderiv.derivatives(net, x, order=1)[1].shape == (50, 1, 2)  # order 1 works
    text = failure(net, x, 2)
    assert "derivative for aten::hardsigmoid_backward is not implemented" in text  # torch's
    assert "PyTorch can differentiate hardsigmoid only once" in text
    assert "the forward pass and order 1 work" in text
    assert "Fix: ask for order=1" in text
    assert ("hardsigmoid is piecewise linear: its derivatives of order 2 and higher are zero "
            "wherever they exist") in text
    assert "a higher order would tell you nothing new" in text
    assert GENERIC not in text and "d.code" not in text


def test_softsign_in_keras_at_order_two_is_told_how_to_write_it_out():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="softsign"),
                              keras.layers.Dense(1)])
    x = np.random.default_rng(0).random((30, 2))
    first = nbderiv.derivatives(model, x, order=1)  # the forward pass and order 1 work
    text = failure(model, x, 2)
    assert "LookupError" in text and "gradient registry has no entry for: SoftsignGrad" in text
    assert "TensorFlow can differentiate Softsign only once" in text
    assert "Fix: ask for order=1" in text
    assert "x / (1 + |x|)" in text and "keras.ops.abs" in text
    assert GENERIC not in text and "d.code" not in text
    # the written-out form the message gives is the same function, and goes to order 2
    written = keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(4, activation=lambda t: t / (1 + keras.ops.abs(t))),
        keras.layers.Dense(1)])
    written.set_weights(model.get_weights())
    d = nbderiv.derivatives(written, x, order=2)
    np.testing.assert_allclose(d[1], first[1], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(d[2]))


def test_an_operation_with_no_derivative_at_all_is_named_without_a_lower_order():
    x = torch.rand(20, 1, dtype=torch.float64) + 2
    text = failure(lambda z: torch.special.zeta(z, torch.tensor(2.0, dtype=z.dtype)), x, 1)
    assert "the derivative for 'zeta' is not implemented" in text
    assert "PyTorch has no derivative for zeta" in text
    assert "order=" not in text and GENERIC not in text


@pytest.mark.parametrize("message, named", [
    ("derivative for aten::hardsigmoid_backward is not implemented", "hardsigmoid only once"),
    ("the derivative for '_pdist_backward' is not implemented.", "pdist only once"),
    ("the derivative for 'igamma: input' is not implemented.", "no derivative for igamma"),
    ("Trying to use forward AD with grid_sampler_2d that does not support it because it has "
     "not been implemented yet.", "no derivative for grid_sampler_2d"),
    ("gradient registry has no entry for: SoftsignGrad", "Softsign only once"),
    ("No gradient defined for operation 'model/foo' (op type: FooGradGrad)", "Foo only twice"),
    # a name holding a shape word is still this cause, not a shape mismatch
    ("derivative for aten::split_with_sizes_backward is not implemented",
     "split_with_sizes only once"),
])
def test_the_missing_derivative_is_named_from_the_frameworks_message(message, named):
    exc = (LookupError if "registry" in message else RuntimeError)(message)
    assert model_error_cause(exc) == "no-derivative"
    assert named in model_error_fix(exc, 10)


def test_a_piecewise_quadratic_activation_is_not_said_to_have_a_zero_second_derivative():
    fix = model_error_fix(RuntimeError("derivative for aten::hardswish_backward is not "
                                       "implemented"), 10)
    assert "hardswish is piecewise quadratic: its derivatives of order 3 and higher" in fix
    assert "nothing new" not in fix  # its second derivative is 1/3 on (-3, 3)
    fix = model_error_fix(RuntimeError("derivative for aten::hardswish_backward_backward is "
                                       "not implemented"), 10)
    assert "only twice" in fix and "nothing new" in fix


def test_the_generic_fix_refers_to_no_result_the_user_does_not_have():
    fix = model_error_fix(RuntimeError("something the model did"), 10)
    assert "d.code" not in fix
    assert "model(torch.as_tensor(x)) in PyTorch or model(tf.constant(x)) in Keras" in fix
    assert fix.endswith(GENERIC + ".")


# -- 3. a model that reduces over the points ------------------------------------------------------
@pytest.mark.parametrize("model", [lambda z: (z ** 2).sum(1).mean(),
                                   lambda z: (z ** 2).mean(0, keepdim=True)],
                         ids=["scalar", "mean-keepdim"])
def test_a_reduction_over_the_points_names_the_batch_nbderiv_passed_not_n(model):
    x = torch.rand(100, 2, dtype=torch.float64)
    text = failure(model, x, 2, OutputError)
    assert "input point(s)" not in text
    assert "when nbderiv called it on a batch of " in text
    assert "it calls the model on batches of points (some or all of the points of x)" in text
    batch = int(text.split("on a batch of ")[1].split()[0])
    assert batch < 100  # the probe's few points: the message says so, not "for N points"
    assert f"here shape ({batch}, d_out) or ({batch},)" in text
    assert "do not reduce over the points inside the model" in text


def test_check_output_words_the_count_as_the_batch_it_was_given():
    with pytest.raises(OutputError) as info:
        check_output((), True, "float32", 12)
    text = str(info.value)
    assert text.startswith("the model returned shape () when nbderiv called it on a batch of "
                           "12 points; nbderiv needs one output row per point of the batch")
    with pytest.raises(OutputError, match="a batch of 1 point;"):
        check_output((3,), True, "float32", 1)
    assert check_output((4, 2, 3), True, "float64", 4) == (4, 6)
