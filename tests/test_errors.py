"""Bad input raises early, as a ValueError/TypeError subclass, with a message that names the fix."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv import errors  # noqa: E402


def net(d_in=2, d_out=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out))


def raises(exc_types, fn, *args, **kwargs):
    """Run fn, expect one of exc_types, check the error family and the fix; return the message."""
    with pytest.raises(exc_types) as info:
        fn(*args, **kwargs)
    err = info.value
    assert isinstance(err, (ValueError, TypeError)), type(err)
    assert isinstance(err, errors.NbderivError), f"{type(err).__name__} is outside the family"
    msg = str(err)
    assert "fix" in msg.lower(), f"no fix named in: {msg}"
    return msg


def test_error_family():
    for cls in (errors.ModelTypeError, errors.InputTypeError):
        assert issubclass(cls, TypeError) and issubclass(cls, errors.NbderivError)
    for cls in (errors.InputShapeError, errors.OutputError, errors.OptionError,
                errors.MemoryBudgetError, errors.BackendError):
        assert issubclass(cls, ValueError) and issubclass(cls, errors.NbderivError)


# -- model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["net", 42, None, [1, 2]], ids=["str", "int", "None", "list"])
def test_unknown_model_type(model):
    msg = raises(errors.ModelTypeError, nbderiv.derivatives, model, torch.rand(3, 2))
    assert type(model).__name__ in msg


def test_unknown_framework_name():
    msg = raises(errors.OptionError, nbderiv.derivatives, torch.sin, np.zeros(3),
                 framework="jax")
    assert "jax" in msg and "torch" in msg


# -- x -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [
    ["a", "b", "c"],
    np.array(["1.0", "2.0"]),
    np.array([object(), object()], dtype=object),
    [[1.0, 2.0], [3.0]],
], ids=["str-list", "str-array", "object-array", "ragged"])
def test_x_not_numeric(x):
    msg = raises((errors.InputTypeError, errors.InputShapeError), nbderiv.derivatives,
                 net(1), x)
    assert "x" in msg


def test_x_with_too_many_dimensions():
    msg = raises(errors.InputShapeError, nbderiv.derivatives, net(4), torch.rand(3, 2, 2))
    assert "(3, 2, 2)" in msg


def test_x_with_no_points():
    raises(errors.InputShapeError, nbderiv.derivatives, net(2), torch.zeros(0, 2))


def test_tuple_arguments_with_different_point_counts():
    msg = raises(errors.InputShapeError, nbderiv.derivatives, lambda x, t: x * t,
                 (torch.rand(5), torch.rand(4)))
    assert "5" in msg and "4" in msg


def test_trailing_size_not_accepted_by_the_model_names_both_shapes():
    msg = raises(errors.InputShapeError, nbderiv.derivatives, net(3), torch.rand(7, 5))
    assert "(7, 5)" in msg
    rest = msg.replace("(7, 5)", "")
    assert re.search(r"\b3\b|3x|x3", rest), f"the model's expected size 3 is not named: {msg}"


def test_vector_input_rejected_by_the_model_suggests_one_point():
    msg = raises(errors.InputShapeError, nbderiv.derivatives, net(4), torch.rand(4))
    assert "(4,)" in msg
    assert "x.reshape(1, -1)" in msg


def test_trailing_size_error_from_a_plain_function():
    W = torch.rand(3, 1)
    msg = raises(errors.InputShapeError, nbderiv.derivatives, lambda x: x @ W, torch.rand(6, 2))
    assert "(6, 2)" in msg


# -- output ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda x: (x * 10).round().to(torch.int64),
    lambda x: x > 0.5,
    lambda x: (x * 3).int(),
], ids=["int64", "bool", "int32"])
def test_output_not_floating_point(fn):
    msg = raises(errors.OutputError, nbderiv.derivatives, fn, torch.rand(5, 2))
    assert re.search(r"int|bool", msg) and "float" in msg


@pytest.mark.parametrize("order", [1, 2])
def test_an_output_of_no_values_per_point_says_so(order):
    """x[:, 1:] on points of one feature: (N, 0); it was torch's 'stack expects a non-empty
    TensorList' from deep inside the backward passes."""
    msg = raises(errors.OutputError, nbderiv.derivatives, lambda x: torch.sin(x[:, 1:]),
                 torch.rand(5, 1), order=order)
    assert "shape (5, 0)" in msg and "no output values per point" in msg and "Fix:" in msg


def test_output_reduced_over_the_batch():
    msg = raises(errors.OutputError, nbderiv.derivatives, lambda x: x.sum(dim=0, keepdim=True),
                 torch.rand(6, 2))
    assert "6" in msg and "(1, 2)" in msg


def test_output_scalar_from_sum():
    msg = raises(errors.OutputError, nbderiv.derivatives, lambda x: (x**2).sum(),
                 torch.rand(6, 2))
    assert "6" in msg


def test_output_with_more_rows_than_points():
    raises(errors.OutputError, nbderiv.derivatives, lambda x: torch.cat([x, x]), torch.rand(5, 1))


class SumsOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return torch.tanh(self.lin(x)).mean(dim=0)


def test_module_output_batch_mismatch():
    raises(errors.OutputError, nbderiv.derivatives, SumsOverBatch(), torch.rand(8, 2), order=2)


@pytest.mark.parametrize("fn", [lambda x: (x, x), lambda x: [x], lambda x: {"y": x}],
                         ids=["tuple", "list", "dict"])
def test_model_returning_a_container(fn):
    msg = raises(errors.OutputError, nbderiv.derivatives, fn, torch.rand(3, 2))
    assert "tensor" in msg.lower()


def test_model_returning_numpy():
    raises(errors.OutputError, nbderiv.derivatives, lambda x: x.detach().numpy(),
           torch.rand(3, 2))


# -- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, -1, 1.5, True, "2", None, 2.0],
                         ids=["0", "-1", "1.5", "True", "str", "None", "2.0"])
def test_order_not_a_positive_int(order):
    msg = raises((errors.OptionError, TypeError), nbderiv.derivatives, net(2),
                 torch.rand(3, 2), order=order)
    assert "order" in msg


@pytest.mark.parametrize("wrt", [[2], [5], [-3], [0, 0], [1, -1], [0.5], ["0"], [True], []],
                         ids=["2", "5", "-3", "repeat", "repeat-neg", "float", "str", "bool",
                              "empty"])
def test_wrt_bad(wrt):
    msg = raises(errors.OptionError, nbderiv.derivatives, net(2), torch.rand(3, 2), order=1,
                 wrt=wrt)
    assert "wrt" in msg


def test_wrt_out_of_range_names_the_valid_range():
    msg = raises(errors.OptionError, nbderiv.derivatives, net(2), torch.rand(3, 2), wrt=[0, 2])
    assert "2" in msg and re.search(r"0\s*\.\.\s*1|0 to 1|0, 1|range", msg)


def test_wrt_out_of_range_on_images_names_the_range_and_a_few_features_only():
    images = torch.rand(2, 3, 224, 224)
    msg = raises(errors.OptionError, nbderiv.derivatives, nn.Conv2d(3, 1, 3), images,
                 wrt=[150528])
    assert len(msg) < 500
    assert "the input has 150528 feature(s) (x[0,0,0], x[0,0,1], x[0,0,2], ..., x[2,223,222], " \
           "x[2,223,223]). Fix: use indices 0..150527" in msg
    assert "np.ravel_multi_index" in msg


def test_wrt_takes_integer_tensors_like_integer_arrays():
    d = nbderiv.derivatives(net(3), torch.rand(4, 3), wrt=torch.tensor([2, 0]))
    assert d.inputs == ("x[2]", "x[0]")
    assert nbderiv.derivatives(net(3), torch.rand(4, 3), wrt=torch.tensor(1)).inputs == ("x[1]",)
    mask = torch.tensor([True, False, True])
    msg = raises(errors.OptionError, nbderiv.derivatives, net(3), torch.rand(4, 3), wrt=mask)
    assert "wrt=np.flatnonzero(mask)" in msg
    msg = raises(errors.OptionError, nbderiv.derivatives, net(3), torch.rand(4, 3),
                 wrt=torch.tensor([0.0]))
    assert "wrt entries must be ints" in msg


def test_wrt_takes_tensorflow_integer_tensors_too():
    tf = pytest.importorskip("tensorflow")
    d = nbderiv.derivatives(net(3), torch.rand(4, 3), wrt=tf.constant([1, 2]))
    assert d.inputs == ("x[1]", "x[2]")


@pytest.mark.parametrize("chunk", [0, -5, 2.5, True])
def test_chunk_size_bad(chunk):
    raises(errors.OptionError, nbderiv.derivatives, net(2), torch.rand(3, 2), chunk_size=chunk)


def test_errors_are_raised_before_any_model_call():
    calls = []

    def model(x):
        calls.append(1)
        return x

    with pytest.raises(errors.OptionError):
        nbderiv.derivatives(model, torch.rand(3, 1), order=0)
    with pytest.raises(errors.OptionError):
        nbderiv.derivatives(model, torch.rand(3, 1), wrt=[3])
    assert calls == []


def test_a_function_returning_numpy_is_refused_in_both_frameworks():
    # TensorFlow took the NumPy array and returned zeros with a graph-broken warning
    tf = pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    for f, x in ((lambda z: np.asarray(z) ** 2, tf.constant([[0.5], [1.0], [2.0]])),
                 (lambda z: z.detach().numpy() ** 2, torch.tensor([[0.5], [1.0], [2.0]]))):
        with pytest.raises(errors.OutputError, match="returned a NumPy array"):
            nbderiv.derivatives(f, x, order=2)
