"""nbderiv.widgets: every control, changed programmatically, recomputes and redraws what it
should; the drawn arrays are checked against closed forms (a tanh unit) and against an
independent torch.func reference (an MLP)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from checks import keras_or_skip  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.backends import framework_name  # noqa: E402
from nbderiv.errors import OptionError  # noqa: E402
from nbderiv.widgets import (  # noqa: E402
    domain_pair,
    input_dim,
    resolve_framework,
    slider_grid,
    snap,
)

W, B = 1.5, -0.3


def tanh_unit():
    """y = tanh(W x + B) as a torch module (float64)."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Tanh()).double()
    with torch.no_grad():
        net[0].weight.fill_(W)
        net[0].bias.fill_(B)
    return net


def tanh_truth(x, k):
    """k-th derivative of tanh(W x + B): W**k P_k(t), P_0 = t, P_{k+1} = P_k'(t) (1 - t**2)."""
    P = np.polynomial.Polynomial([0, 1])
    for _ in range(k):
        P = P.deriv() * np.polynomial.Polynomial([1, 0, -1])
    return W ** k * P(np.tanh(W * x + B))


def _on_grid(slider):
    steps = (np.asarray(slider.value, dtype=float) - slider.min) / slider.step
    return np.allclose(steps, np.round(steps), atol=1e-9) and \
        np.all(np.asarray(slider.value) >= slider.min) and np.all(np.asarray(slider.value) <= slider.max)


def test_explore_draws_the_closed_form_and_follows_each_control():
    w = nbderiv.explore(tanh_unit(), domain=(-3, 3), n=200, reference=torch.tanh)
    c = w.controls
    assert set(c) == {"order", "domain", "finite differences"}  # one input, one output
    assert c["order"].description == "order" and c["order"].value == 2
    data = w.last_data
    np.testing.assert_allclose(data["x"], np.linspace(-3, 3, 200))
    for k in range(3):
        np.testing.assert_allclose(data["y"][k], tanh_truth(data["x"], k), atol=1e-12)
        np.testing.assert_allclose(data["reference"][k],
                                   tanh_truth((data["x"] - B) / W, k) / W ** k, atol=1e-12)
    assert data["fd"] is None
    assert bytes(w.image.value).startswith(b"\x89PNG")
    assert "order 2" in w.readout.value

    # order
    image, readout = bytes(w.image.value), w.readout.value
    c["order"].value = 4
    data = w.last_data
    assert sorted(data["y"]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(data["y"][4], tanh_truth(data["x"], 4), atol=1e-10)
    assert bytes(w.image.value) != image and w.readout.value != readout
    assert "order 4" in w.readout.value

    # domain
    image = bytes(w.image.value)
    c["domain"].value = (-1.0, 2.0)
    data = w.last_data
    np.testing.assert_allclose(data["x"], np.linspace(-1, 2, 200))
    np.testing.assert_allclose(data["y"][1], tanh_truth(data["x"], 1), atol=1e-12)
    assert bytes(w.image.value) != image and "[-1, 2]" in w.readout.value

    # finite differences overlay
    image = bytes(w.image.value)
    c["finite differences"].value = True
    data = w.last_data
    assert sorted(data["fd"]) == [1, 2, 3, 4]
    for k in (1, 2):
        np.testing.assert_allclose(data["fd"][k], tanh_truth(data["x"], k), atol=1e-5)
    assert bytes(w.image.value) != image and "finite differences" in w.readout.value
    assert all(_on_grid(s) for s in c.values() if hasattr(s, "step"))


def test_explore_inputs_outputs_and_fixed_sliders(torch_mlp, func_reference):
    net = torch_mlp([3, 16, 2], seed=1)
    w = nbderiv.explore(net, domain=(-2, 2), n=40, point=(0.33, -0.7, 0.5))
    c = w.controls
    assert set(c) == {"order", "output", "input", "x[0]", "x[1]", "x[2]", "domain",
                      "finite differences"}
    # every slider starts on its grid, the requested point snapped to it
    assert [c[f"x[{i}]"].value for i in range(3)] == [0.3, -0.7, 0.5]
    assert all(_on_grid(c[k]) for k in ("x[0]", "x[1]", "x[2]", "domain"))
    assert c["x[0]"].layout.display == "none" and c["x[1]"].layout.display is None

    def check(i, j, k):
        data = w.last_data
        X = data["X"]
        np.testing.assert_allclose(X[:, i], np.linspace(-2, 2, 40))
        for other in set(range(3)) - {i}:
            np.testing.assert_allclose(X[:, other], c[f"x[{other}]"].value)
        same = nbderiv.derivatives(net, X, order=k, wrt=[i])
        np.testing.assert_allclose(data["y"][k], same[k][:, j].reshape(-1))
        ref = func_reference(net, X, 2)  # (N, d_out, 3, 3), torch.func
        np.testing.assert_allclose(data["y"][2], ref[:, j, i, i], atol=1e-10)

    def changes(control, value):
        image, readout = bytes(w.image.value), w.readout.value
        c[control].value = value
        assert bytes(w.image.value) != image and w.readout.value != readout, control

    check(0, 0, 2)
    changes("input", 1)
    assert c["x[1]"].layout.display == "none" and c["x[0]"].layout.display is None
    check(1, 0, 2)
    changes("x[0]", 1.2)
    assert w.last_data["X"][0, 0] == 1.2
    check(1, 0, 2)
    changes("output", 1)
    check(1, 1, 2)
    assert "y[1]" in w.readout.value
    changes("x[2]", -1.5)
    check(1, 1, 2)
    assert "x[2] = -1.5" in w.readout.value
    changes("order", 3)
    check(1, 1, 3)


def test_an_empty_domain_is_reported_not_raised():
    w = nbderiv.explore(tanh_unit(), n=20)
    before = w.last_data
    w.controls["domain"].value = (1.0, 1.0)
    assert "domain is empty" in w.readout.value
    assert w.last_data is before


class Picky(torch.nn.Module):
    """tanh(x), refusing inputs above 5 (as a model trained on a range might assert)."""

    def forward(self, x):
        if float(x.detach().max()) > 5:
            raise ValueError("inputs above 5 are out of range")
        return torch.tanh(x)


def test_a_failing_recompute_is_shown_in_the_readout():
    w = nbderiv.explore(Picky(), domain=(-2, 4), n=20, d_in=1)  # the slider reaches 7
    before, image = w.last_data, bytes(w.image.value)
    w.controls["domain"].value = (-2.0, 6.0)
    assert "cannot compute" in w.readout.value and "out of range" in w.readout.value
    assert w.last_data is before and bytes(w.image.value) == image
    w.controls["domain"].value = (-2.0, 3.0)  # back in range: recovers
    np.testing.assert_allclose(w.last_data["y"][1], tanh_truth((w.last_data["x"] - B) / W, 1)
                               / W, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):  # at construction: raised
        nbderiv.explore(Picky(), domain=(0, 10), d_in=1)


def test_slider_grid_keeps_values_on_the_grid():
    for lo, hi in [(-3, 3), (-0.37, 1.91), (0, 1e-3), (10, 2000)]:
        grid = slider_grid(lo, hi)
        mn, mx, step, _ = grid
        for v in (mn, mx, snap(lo, grid), snap(hi, grid), snap((lo + hi) / 3, grid)):
            k = (v - mn) / step
            assert abs(k - round(k)) < 1e-9 and mn <= v <= mx
        assert mn <= lo and mx >= hi
    with pytest.raises(OptionError):
        slider_grid(1, 1)


def test_input_dim_without_changing_the_model():
    assert input_dim(torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.Tanh())) == 5
    assert input_dim(torch.sin, framework="torch") == 1
    assert input_dim(object(), d_in=3) == 3
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh())
    with pytest.raises(OptionError, match="d_in="):
        input_dim(lazy)
    assert lazy[0].in_features == 0  # still uninitialised: never called
    with pytest.raises(OptionError, match="d_in="):
        input_dim(lambda x: x[:, 3], framework="torch")


def test_explore_recomputes_interactively(torch_mlp):
    """A sanity bound only (CI machines are shared and noisy): the < 200 ms target for 200
    points is measured by ``benchmarks/run.py`` (the ``explore`` rows), not asserted here.
    This catches a recompute that became pathologically slow (e.g. retracing every time)."""
    net = torch_mlp([1, 32, 32, 1], dtype="float32")
    threads = torch.get_num_threads()
    w = nbderiv.explore(net, n=200)
    times = {}
    for _ in range(3):
        for order in (1, 2, 4):
            w.controls["order"].value = order
            times.setdefault(order, []).append((w.last_data["compute_ms"],
                                                w.last_data["elapsed_ms"]))
    assert torch.get_num_threads() == threads  # put back
    best = {k: (min(c for c, _ in v), min(e for _, e in v)) for k, v in times.items()}
    print("explore recompute, best ms (derivatives, with drawing):",
          {k: (round(c), round(e)) for k, (c, e) in best.items()})
    assert best[2][1] < 2000
    assert all(c < 1000 for c, _ in best.values())


def test_one_rule_picks_the_framework():
    """``resolve_framework`` (kept for the magics) is ``backends.framework_name``."""
    net = torch.nn.Linear(1, 1)
    for model, framework in [(net, None), (torch.sin, "torch"), (torch.sin, "PyTorch"),
                             (lambda x: x, None)]:
        assert resolve_framework(model, framework) == framework_name(model, framework=framework)
    assert resolve_framework(net) == "torch"
    with pytest.raises(OptionError, match="unknown framework"):
        nbderiv.explore(net, framework="jax")


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 1}, "n must be an int >= 2, got 1"),
    ({"n": True}, "n must be an int >= 2, got True"),
    ({"order": 0}, "order must be a positive int, got 0"),
    ({"max_order": 2.0}, "max_order must be a positive int"),
    ({"order": 3, "max_order": 2}, "order=3 is above max_order=2"),
    ({"d_in": 0}, "d_in must be a positive int"),
    ({"domain": (2, 1)}, "low < high"),
    ({"domain": 3}, "a pair"),
    ({"point": (0.0, 1.0)}, "point must hold 1 value"),
])
def test_explore_option_errors_say_how_to_fix(kwargs, match):
    with pytest.raises(OptionError, match=match) as info:
        nbderiv.explore(tanh_unit(), **kwargs)
    assert "Fix:" in str(info.value)


def test_domain_pair():
    assert domain_pair((-2, 2)) == (-2.0, 2.0)
    assert domain_pair(np.array([0, 1])) == (0.0, 1.0)
    with pytest.raises(OptionError, match="Fix: e.g. domain="):
        domain_pair((0, float("nan")))


def test_the_readout_shows_the_error_against_the_reference_per_order():
    w = nbderiv.explore(tanh_unit(), domain=(-3, 3), n=50, reference=torch.tanh)
    data = w.last_data
    line = w.readout.value.split("max error vs reference: ")[1].split("<br>")[0]
    for k in (1, 2):
        err = float(np.max(np.abs(data["y"][k] - data["reference"][k])))
        assert err > 1e-3 and f"{err:.2g}" in line  # the unit is not tanh itself
    plain = nbderiv.explore(tanh_unit(), domain=(-3, 3), n=50)
    assert "vs reference" not in plain.readout.value


# -- reference=: a NumPy function by central differences, a framework one by autodiff -----------
def _keras_tanh_net(keras, d_in=1):
    keras.utils.set_random_seed(0)
    L = keras.layers
    return keras.Sequential([keras.Input((d_in,)), L.Dense(16, activation="tanh"), L.Dense(1)])


SIN_K = {0: np.sin, 1: np.cos, 2: lambda x: -np.sin(x), 3: lambda x: -np.cos(x)}


def _check_numpy_sin_reference(w):
    """The explorer's reference is sin and its derivatives (they were zeros: the model's
    autodiff cannot see into np.sin), and the readout's errors are against them."""
    data = w.last_data
    assert data["reference_method"] == "central differences"
    for k in range(data["order"] + 1):  # float64 central differences: about 1e-7 at order 3
        np.testing.assert_allclose(data["reference"][k], SIN_K[k](data["x"]), atol=1e-6)
    line = w.readout.value.split("max error vs reference: ")[1].split("<br>")[0]
    for k in range(1, data["order"] + 1):
        err = float(np.max(np.abs(data["y"][k] - SIN_K[k](data["x"]))))
        assert f": {err:.2g}" in line, (k, err, line)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_explore_with_a_numpy_reference_draws_its_true_derivatives(framework, torch_mlp):
    if framework == "torch":
        net = torch_mlp([1, 16, 1], seed=3)
    else:
        net = _keras_tanh_net(keras_or_skip())
    w = nbderiv.explore(net, domain=(-2, 2), n=25, reference=np.sin)
    _check_numpy_sin_reference(w)
    w.controls["order"].value = 3  # recomputed the same way
    _check_numpy_sin_reference(w)
    # the same numbers as derivatives(..., reference=np.sin) reports
    data = w.last_data
    d = nbderiv.derivatives(net, data["X"], order=3, reference=np.sin)
    for k in (1, 2, 3):
        err = float(np.max(np.abs(data["y"][k] - data["reference"][k])))
        np.testing.assert_allclose(err, d.reference_errors[k][0], rtol=1e-4)


def test_explore_keeps_a_framework_reference_exact():
    """A reference in the model's framework is still differentiated by its autodiff (exact:
    central differences would be off by about 1e-9 here)."""
    keras = keras_or_skip()
    w = nbderiv.explore(_keras_tanh_net(keras), domain=(-2, 2), n=25, order=3,
                        reference=lambda x: keras.ops.sin(x))
    data = w.last_data
    assert data["reference_method"] == "autodiff"
    for k in range(4):
        np.testing.assert_allclose(data["reference"][k], SIN_K[k](data["x"]), atol=1e-12)
    w = nbderiv.explore(tanh_unit(), domain=(-2, 2), n=25, order=3, reference=torch.sin)
    assert w.last_data["reference_method"] == "autodiff"
    for k in range(4):
        np.testing.assert_allclose(w.last_data["reference"][k], SIN_K[k](w.last_data["x"]),
                                   atol=1e-12)


def test_a_failing_reference_is_named_not_the_model(torch_mlp):
    def broken(x):
        raise ZeroDivisionError("the truth is undefined here")

    for net in (torch_mlp([1, 8, 1]), _keras_tanh_net(keras_or_skip())):
        with pytest.raises(OptionError, match="the reference failed") as info:
            nbderiv.explore(net, domain=(-1, 1), n=10, reference=broken)
        text = str(info.value)
        assert "the truth is undefined here" in text and "the model raised" not in text
        assert "Fix: " in text and "reference=np.sin" in text
    with pytest.raises(OptionError, match="reference must be the true function"):
        nbderiv.explore(tanh_unit(), reference=np.cos(1.0))
    two = lambda x: np.concatenate([np.sin(x), np.cos(x)], axis=1)  # noqa: E731
    with pytest.raises(OptionError, match="the reference gives 2 outputs per point, the model 1"):
        nbderiv.explore(tanh_unit(), n=10, reference=two)


# -- models whose points are images or sequences: refused with what works instead -----------------
def _refused_for_shape(model, **kwargs) -> str:
    with pytest.raises(OptionError) as info:
        nbderiv.explore(model, **kwargs)
    text = str(info.value)
    assert "flat feature inputs, x of shape (N, d_in), with one slider per input feature" in text
    assert "(2, 1)" not in text  # nbderiv's own probe is no shape of the user's
    assert "%nnderiv model" in text and "--plot" in text
    assert "Fix: pass d_in=" not in text
    return text


def test_explore_refuses_images_and_sequences_and_names_what_works():
    keras = keras_or_skip()
    L = keras.layers
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, activation="tanh"),
                            L.Flatten(), L.Dense(5)])
    for kwargs in ({}, {"d_in": 72}):  # d_in= gives the explorer vectors: no way around it
        text = _refused_for_shape(cnn, **kwargs)
        assert "points of shape (6, 6, 2)" in text and "each point is an image" in text
        assert "nbderiv.derivatives(model, images).plot()" in text
    lstm = keras.Sequential([keras.Input((5, 3)), L.LSTM(4), L.Dense(1)])
    text = _refused_for_shape(lstm)
    assert "points of shape (5, 3)" in text and "each point is a sequence" in text
    torch.manual_seed(0)
    tcnn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(48, 5))
    text = _refused_for_shape(tcnn, d_in=72)
    assert "C=2 channels (shape (N, 2, H, W))" in text
    # and what it points to works: saliency maps of the images
    images = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    fig = nbderiv.derivatives(cnn, images).plot()
    assert bytes(fig.to_png()).startswith(b"\x89PNG")


class _TorchCNN(torch.nn.Module):
    """A CNN whose input shape cannot be read without calling it (not an nn.Sequential)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_explore_of_a_model_of_unknown_shape_says_what_the_explorer_takes():
    torch.manual_seed(0)
    cnn = _TorchCNN()
    with pytest.raises(OptionError) as info:
        nbderiv.explore(cnn)
    text = str(info.value)
    assert "flat feature inputs, x of shape (N, d_in)" in text
    assert "nbderiv's probe, x of shape (2, 1)" in text  # the shape said to be nbderiv's
    assert "Fix: pass d_in= (the number of input features), if the model takes vectors" in text
    assert "%nnderiv model images --plot" in text
    with pytest.raises(ValueError) as info:  # d_in=72: the model fails on 72 features
        nbderiv.explore(cnn, d_in=72)
    text = str(info.value)
    assert "the explorer's points, 200 points of 72 feature(s)" in text
    assert "flat feature inputs" in text and "%nnderiv model images --plot" in text
    assert "Fix: call the model yourself on that input the plain way" not in text


def test_a_keras_model_as_the_reference_of_a_torch_model_is_differentiated_bykeras_or_skip():
    """Its own autodiff: float64 central differences of a float32 model are mostly rounding
    at order 2 (a tester saw -sin off by 0.5)."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    inp = keras.Input((1,))
    ref = keras.Model(inp, keras.ops.sin(inp))
    w = nbderiv.explore(net, domain=(-2, 2), reference=ref)
    x = np.asarray(w.last_data["x"]).ravel()
    assert w.last_data["reference_method"] == "autodiff"
    assert np.abs(np.asarray(w.last_data["reference"][1]).ravel() - np.cos(x)).max() < 1e-6
    assert np.abs(np.asarray(w.last_data["reference"][2]).ravel() + np.sin(x)).max() < 1e-6
    with pytest.raises(OptionError, match="d_ref = nbderiv.derivatives"):
        nbderiv.derivatives(net, np.linspace(-2, 2, 9).reshape(-1, 1).astype(np.float32),
                            order=2, reference=ref)


class _HeatOnAPlane(torch.nn.Module):
    """u(xy, t) = exp(-t) sin(x) cos(y): a PINN's forward of two separate inputs."""

    def forward(self, xy, t):
        return torch.exp(-t) * torch.sin(xy[:, :1]) * torch.cos(xy[:, 1:])


def test_explore_gives_each_feature_of_separate_inputs_a_slider():
    net = _HeatOnAPlane()
    refused = r"xy of shape \(11, 1\), t of shape \(11, 1\).*no output values.*d_in=\(1, 1\)"
    with pytest.raises(ValueError, match=refused):
        nbderiv.explore(net, n=11, framework="torch")  # xy's width cannot be read: 1 each
    w = nbderiv.explore(net, domain=(-1, 1), n=11, d_in=(2, 1), framework="torch")
    names = [label for label, _ in w.controls["input"].options]
    assert names == ["xy[0]", "xy[1]", "t"]
    w.controls["xy[0]"].value, w.controls["xy[1]"].value = 0.5, 0.25
    w.controls["input"].value = 2  # along t
    t = np.linspace(-1, 1, 11)
    u = np.exp(-t) * np.sin(0.5) * np.cos(0.25)
    for k in range(3):  # d^k u / dt^k = (-1)^k u
        np.testing.assert_allclose(w.last_data["y"][k], (-1) ** k * u, rtol=1e-5)
    w.controls["input"].value = 1  # along y, x = 0.5 and t = 0 held
    y = np.linspace(-1, 1, 11)
    np.testing.assert_allclose(w.last_data["y"][2], -np.sin(0.5) * np.cos(y), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(OptionError, match="gives 3 width"):
        nbderiv.explore(net, d_in=(1, 1, 1), framework="torch")
    with pytest.raises(OptionError, match="one input array"):
        nbderiv.explore(tanh_unit(), d_in=(1, 1))


def test_explore_reads_the_widths_of_a_keras_model_of_several_inputs():
    keras = keras_or_skip()
    x, t = keras.Input((1,), name="x"), keras.Input((1,), name="t")
    model = keras.Model([x, t], keras.layers.Multiply()([x, t]))  # y = x t
    w = nbderiv.explore(model, domain=(-1, 1), n=5, order=2)
    assert [label for label, _ in w.controls["input"].options] == ["x", "t"]
    w.controls["t"].value = 0.5
    np.testing.assert_allclose(w.last_data["y"][1], np.full(5, 0.5), atol=1e-6)  # dy/dx = t
    np.testing.assert_allclose(w.last_data["y"][2], np.zeros(5), atol=1e-6)
    with pytest.raises(OptionError, match="the model declares 1"):
        nbderiv.explore(model, d_in=(2, 1))
