"""What ``x`` may be: (N,), 0-d, integer, float32/float64, list, numpy, torch; checked
against closed forms, and the findings the spec names (``input-reshaped``, ``integer-input``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.errors import ModelTypeError  # noqa: E402


def linear_net(w: float, b: float, dtype=torch.float32):
    """y = tanh(w x + b) as an nn.Sequential (closed form: y' = w (1 - y^2))."""
    net = nn.Sequential(nn.Linear(1, 1), nn.Tanh()).to(dtype)
    with torch.no_grad():
        net[0].weight.fill_(w)
        net[0].bias.fill_(b)
    return net


def tanh_closed_form(x, w, b):
    y = np.tanh(w * x + b)
    return y, w * (1 - y**2), -2 * w**2 * y * (1 - y**2)


# -- (N,) and 0-d inputs ------------------------------------------------------------------------
def test_vector_input_is_n_points_of_one_feature():
    net = linear_net(1.5, -0.2, torch.float64)
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    d = nbderiv.derivatives(net, x, order=2)
    assert d.x.shape == (11, 1) and d.y.shape == (11, 1)
    assert d[1].shape == (11, 1, 1) and d[2].shape == (11, 1, 1, 1)
    assert "input-reshaped" in d.codes
    f = d.finding("input-reshaped")
    assert f.severity in ("info", "warning") and "reshape(1, -1)" in (f.fix + f.message)
    y, d1, d2 = tanh_closed_form(x.numpy(), 1.5, -0.2)
    np.testing.assert_allclose(d.y[:, 0], y, rtol=1e-12)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], d2, rtol=1e-10, atol=1e-14)


def test_two_dimensional_input_has_no_reshape_finding():
    net = linear_net(1.0, 0.0, torch.float64)
    d = nbderiv.derivatives(net, torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None], order=1)
    assert "input-reshaped" not in d.codes


def test_zero_dimensional_input_is_one_point():
    d = nbderiv.derivatives(lambda x: x**3, torch.tensor(2.0, dtype=torch.float64), order=3)
    assert d.x.shape == (1, 1) and d.y.shape == (1, 1)
    assert d[1].shape == (1, 1, 1) and d[3].shape == (1, 1, 1, 1, 1)
    assert d[1][0, 0, 0] == pytest.approx(12.0)
    assert d[2][0, 0, 0, 0] == pytest.approx(12.0)
    assert d[3][0, 0, 0, 0, 0] == pytest.approx(6.0)


def test_numpy_scalar_and_python_float_with_framework():
    d = nbderiv.derivatives(torch.sin, np.float64(0.5), order=1, framework="torch")
    assert d[1].shape == (1, 1, 1)
    assert d[1][0, 0, 0] == pytest.approx(np.cos(0.5), rel=1e-6)


# -- integer input ------------------------------------------------------------------------------
def test_integer_tensor_cast_to_float32_model_dtype():
    net = linear_net(0.5, 0.1, torch.float32)
    x = torch.arange(-3, 4)  # int64
    d = nbderiv.derivatives(net, x, order=2)
    assert "integer-input" in d.codes
    assert d.x.dtype == np.float32 and d.y.dtype == np.float32
    assert d[1].dtype == np.float32 and d[2].dtype == np.float32
    y, d1, d2 = tanh_closed_form(np.arange(-3, 4, dtype=np.float64), 0.5, 0.1)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], d2, rtol=1e-4, atol=1e-6)
    assert x.dtype == torch.int64  # the user's tensor is untouched


def test_integer_numpy_cast_to_float64_model_dtype():
    net = linear_net(0.5, 0.1, torch.float64)
    x = np.array([[0], [1], [2], [3]], dtype=np.int32)
    d = nbderiv.derivatives(net, x, order=2)
    assert "integer-input" in d.codes
    assert d[1].dtype == np.float64 and d[2].dtype == np.float64
    _, d1, d2 = tanh_closed_form(np.arange(4.0), 0.5, 0.1)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], d2, rtol=1e-12, atol=1e-15)
    f = d.finding("integer-input")
    assert "float64" in f.message + f.fix


def test_integer_nested_list_is_cast():
    net = linear_net(1.0, 0.0, torch.float64)
    d = nbderiv.derivatives(net, [[0], [1], [2]], order=1)
    assert "integer-input" in d.codes and d[1].dtype == np.float64
    np.testing.assert_allclose(d[1][:, 0, 0], 1 - np.tanh(np.arange(3.0)) ** 2, rtol=1e-12)


def test_float_input_has_no_integer_finding():
    net = linear_net(1.0, 0.0, torch.float64)
    d = nbderiv.derivatives(net, np.zeros((3, 1)), order=1)
    assert "integer-input" not in d.codes


# -- float32 vs float64 -------------------------------------------------------------------------
def test_float64_model_and_float64_input_stay_float64():
    net = linear_net(2.0, 0.3, torch.float64)
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)[:, None]
    d = nbderiv.derivatives(net, x, order=2)
    for k in range(3):
        assert d[k].dtype == np.float64
    assert d.x.dtype == np.float64
    _, d1, d2 = tanh_closed_form(x.numpy()[:, 0], 2.0, 0.3)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-13)  # float32 would miss this
    np.testing.assert_allclose(d[2][:, 0, 0, 0], d2, rtol=1e-12, atol=1e-15)


def test_float32_model_with_float64_numpy_input_computes_in_float32():
    net = linear_net(2.0, 0.3, torch.float32)
    x = np.linspace(-1, 1, 9)[:, None]  # float64
    d = nbderiv.derivatives(net, x, order=2)
    for k in range(3):
        assert d[k].dtype == np.float32
    assert x.dtype == np.float64  # the user's array is not converted in place
    _, d1, _ = tanh_closed_form(x[:, 0].astype(np.float32).astype(np.float64), 2.0, 0.3)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-5, atol=1e-6)


def test_parameterless_callable_follows_the_input_dtype():
    x64 = torch.linspace(0, 1, 5, dtype=torch.float64)
    d64 = nbderiv.derivatives(torch.sin, x64, order=1)
    assert d64[1].dtype == np.float64
    np.testing.assert_allclose(d64[1][:, 0, 0], np.cos(x64.numpy()), rtol=1e-15)
    d32 = nbderiv.derivatives(torch.sin, x64.float(), order=1)
    assert d32[1].dtype == np.float32


# -- list, numpy, framework= --------------------------------------------------------------------
def test_nested_list_input_with_module():
    net = linear_net(1.0, 0.5, torch.float64)
    d = nbderiv.derivatives(net, [[0.0], [0.5], [1.0]], order=1)
    assert d.x.shape == (3, 1)
    np.testing.assert_array_equal(d.x[:, 0], [0.0, 0.5, 1.0])
    _, d1, _ = tanh_closed_form(np.array([0.0, 0.5, 1.0]), 1.0, 0.5)
    np.testing.assert_allclose(d[1][:, 0, 0], d1, rtol=1e-12)


def test_flat_list_is_n_points():
    net = linear_net(1.0, 0.0, torch.float64)
    d = nbderiv.derivatives(net, [0.0, 0.5, 1.0, 1.5], order=1)
    assert d.x.shape == (4, 1) and "input-reshaped" in d.codes


def test_numpy_input_with_plain_callable_and_framework_torch():
    x = np.linspace(-2, 2, 13)
    d = nbderiv.derivatives(lambda z: torch.exp(z) * z, x, order=2, framework="torch")
    assert d.framework == "torch"
    np.testing.assert_allclose(d[1][:, 0, 0], np.exp(x) * (1 + x), rtol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], np.exp(x) * (2 + x), rtol=1e-12)


def test_numpy_input_with_plain_callable_without_framework_is_an_error():
    with pytest.raises(ModelTypeError) as info:
        nbderiv.derivatives(lambda z: torch.exp(z), np.linspace(0, 1, 5), order=1)
    assert isinstance(info.value, (TypeError, ValueError))
    assert "framework=" in str(info.value) and "torch" in str(info.value)


def test_list_input_with_plain_callable_without_framework_is_an_error():
    with pytest.raises((ModelTypeError, TypeError, ValueError)) as info:
        nbderiv.derivatives(torch.sin, [0.0, 1.0], order=1)
    assert "framework" in str(info.value)


def test_module_with_numpy_input_needs_no_framework():
    net = linear_net(1.0, 0.0, torch.float64)
    d = nbderiv.derivatives(net, np.zeros((2, 1)), order=1)
    assert d.framework == "torch"
    np.testing.assert_allclose(d[1][:, 0, 0], [1.0, 1.0])


def test_tuple_of_numpy_arrays_with_framework():
    x, t = np.linspace(0, 1, 6), np.linspace(1, 2, 6)
    d = nbderiv.derivatives(lambda x, t: x * t**2, (x, t), order=2, framework="torch")
    assert d.inputs == ("x", "t") and d.x.shape == (6, 2)
    np.testing.assert_allclose(d[1][:, 0, 0], t**2, rtol=1e-12)
    np.testing.assert_allclose(d[1][:, 0, 1], 2 * x * t, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d[2][:, 0, 0, 1], 2 * t, rtol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 1, 1], 2 * x, rtol=1e-12, atol=1e-15)


def test_requires_grad_input_is_accepted():
    x = torch.linspace(0, 1, 4, dtype=torch.float64, requires_grad=True)
    d = nbderiv.derivatives(lambda z: z**2, x, order=1)
    np.testing.assert_allclose(d[1][:, 0, 0], 2 * x.detach().numpy(), rtol=1e-15)


# -- target= and a dict x -----------------------------------------------------------------------
@pytest.mark.parametrize("target, said", [
    (-1, "target -1 is negative"),
    (np.array([1, -2, 0, 0, 1]), "target -2 (at point 1) is negative"),
    (True, "target=True is a bool, not the index of an output"),
    (np.ones(5, dtype=bool), "target holds bools (dtype bool)"),
    (torch.tensor(False), "target holds bools"),
    (np.zeros(5, dtype=np.float32), "target must hold ints, the indices of outputs, got dtype "
                                    "float32"),
    ([1, 2], "got shape (2,)"),
    (np.eye(2, dtype=np.float32)[[0, 1, 1, 0, 1]], "looks one-hot encoded (shape (5, 2)"),
    (np.eye(2, dtype=np.int64)[[0, 1, 1, 0, 1]], "target=labels.argmax(1)"),
])
def test_a_bad_target_is_refused_for_what_is_wrong_with_it(target, said):
    from nbderiv.errors import OptionError

    net = nn.Linear(3, 2)
    with pytest.raises(OptionError) as info:
        nbderiv.derivatives(net, torch.rand(5, 3), target=target)
    assert said in str(info.value) and "Fix:" in str(info.value)


def test_a_dict_of_one_array_is_told_to_pass_the_array_and_of_several_a_tuple():
    from nbderiv.errors import InputTypeError

    x = torch.rand(4, 1)
    with pytest.raises(InputTypeError) as info:
        nbderiv.derivatives(nn.Linear(1, 1), {"a": x})
    assert "Fix: pass the array itself, x=x['a']" in str(info.value)
    assert "(x['a'])" not in str(info.value)
    with pytest.raises(InputTypeError) as info:
        nbderiv.derivatives(nn.Linear(1, 1), {"t": x, "s": x})
    assert "pass a tuple of the arrays in the order the model takes them" in str(info.value)
    assert nbderiv.derivatives(nn.Linear(1, 1), x)[1].shape == (4, 1, 1)  # what it says works


class _XT(nn.Module):
    def forward(self, x, t):
        return torch.sin(x) * t ** 2


def test_a_dict_is_told_the_tuple_in_the_order_the_model_names_its_arguments():
    """The keys are the names of forward's arguments: the fix gives them in forward's order
    (not sorted), and the tuple it names gives d/dx = cos(x) t**2, d/dt = 2 sin(x) t."""
    from nbderiv.errors import InputTypeError

    x, t = torch.rand(4, 1, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)
    batch = {"t": t, "x": x}
    with pytest.raises(InputTypeError) as info:
        nbderiv.derivatives(_XT(), batch)
    said = str(info.value)
    assert "Fix: pass x=(x['x'], x['t'])" in said and "(x, t)" in said
    fixed = eval(said.split("Fix: pass x=")[1].split(":")[0], {"x": batch})  # noqa: S307
    d = nbderiv.derivatives(_XT(), fixed)
    want = np.concatenate([np.cos(x) * t ** 2, 2 * np.sin(x) * t], axis=1)
    np.testing.assert_allclose(d[1][:, 0], want, rtol=1e-12)
    with pytest.raises(InputTypeError) as info:  # keys that are not its arguments' names
        nbderiv.derivatives(_XT(), {"a": x, "b": t})
    assert "this model takes x, t" in str(info.value)


def test_a_dict_for_a_keras_model_follows_its_inputs_order():
    keras = pytest.importorskip("keras")
    from nbderiv.errors import InputTypeError

    a, b = keras.Input((1,), name="x"), keras.Input((1,), name="t")
    listed = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    v = np.ones((3, 1), dtype="float32")
    with pytest.raises(InputTypeError, match=r"x=\(x\['x'\], x\['t'\]\)"):
        nbderiv.derivatives(listed, {"t": v, "x": v})
    a, b = keras.Input((1,), name="x"), keras.Input((1,), name="t")
    keyed = keras.Model({"x": a, "t": b},
                        keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    # a model built on a dict takes the dict itself (each array to its own Input), and refuses
    # a tuple, which cannot say which is which
    d = nbderiv.derivatives(keyed, {"x": v, "t": 2 * v})
    np.testing.assert_allclose(d.y, keyed({"x": v, "t": 2 * v}).numpy(), atol=1e-6)
    with pytest.raises(InputTypeError, match="named inputs"):
        nbderiv.derivatives(keyed, (v, 2 * v))


def test_wrt_given_a_name_points_to_that_inputs_indices():
    """wrt='t' for inputs ('x[0]', 'x[1]', 't') used to suggest wrt=[0, 1] (which is x)."""
    from nbderiv.errors import OptionError
    from nbderiv.inputs import check_wrt

    names = ("x[0]", "x[1]", "t")
    with pytest.raises(OptionError, match=r"Fix: wrt=\[2\]"):
        check_wrt("t", 3, names)
    with pytest.raises(OptionError, match=r"Fix: wrt=\[0, 1\]"):
        check_wrt(["x"], 3, names)


def test_points_the_cast_to_float32_moves_get_input_rounded():
    # t = 1e4 + [0, 0.01] given in float64 to a float32 model that standardises it: float32
    # keeps t to 0.001, so the points move by up to 2% of their spread
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    t = 1e4 + np.linspace(0, 0.01, 11)
    d = nbderiv.derivatives(lambda z: net((z - 1e4) * 100), t)
    f = d.finding("input-rounded")
    assert f is not None and f.severity == "warning"
    moved = np.abs(t.astype(np.float32).astype(np.float64) - t).max()
    assert f"{moved:.2g}" in f.message and "float32" in f.message
    np.testing.assert_array_equal(d.x[:, 0], t.astype(np.float32))  # where it differentiated
    # ordinary float64 points (linspace in [-1, 1]) lose nothing that matters: no finding
    plain = nbderiv.derivatives(net, np.linspace(-1, 1, 11))
    assert "input-rounded" not in plain.codes
    # nor does a float64 model, which takes them as they are
    net64 = copy.deepcopy(net).double()
    exact = nbderiv.derivatives(lambda z: net64((z - 1e4) * 100), t)
    assert "input-rounded" not in exact.codes and exact.x.dtype == np.float64


def test_x_on_the_meta_device_is_named_as_such():
    # it said "x could not be read as a numeric array ... pass a numpy array"
    from nbderiv.errors import InputTypeError

    net = nn.Linear(3, 1)
    with pytest.raises(InputTypeError, match="'meta' device, shape \\(4, 3\\)"):
        nbderiv.derivatives(net, torch.empty(4, 3, device="meta"))
    with pytest.raises(InputTypeError, match="'meta' device"):
        nbderiv.derivatives(net.to("meta"), torch.empty(4, 3, device="meta"))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))  # real values: fine
    w = nn.Linear(3, 1)
    np.testing.assert_allclose(nbderiv.derivatives(w, x)[1][:, 0],
                               np.broadcast_to(w.weight.detach().numpy(), (4, 3)), atol=1e-7)
