"""nbderiv.plot_maps: saliency maps of image and sequence results. The image panel shows the
input, the saliency panel is max over channels of |d[1]| for that point and output, the
sequence heat map is |d[1]| transposed (feature x time), and no error lists input names."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import nbderiv  # noqa: E402
from nbderiv.errors import OptionError  # noqa: E402
from nbderiv.plot_figure import NbderivFigure  # noqa: E402
from nbderiv.plot_maps import channel_axis_of, plot_saliency, saliency_map  # noqa: E402
from nbderiv.result import Derivatives  # noqa: E402


def _cnn(channels=3, side=6, outputs=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(4 * side * side, outputs)).double()


def _gru():
    torch.manual_seed(0)

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(3, 6, batch_first=True)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    return Regressor().double()


def _array(axis):
    return np.asarray(axis.images[0].get_array())


def _fake(in_shape, framework, n=2, outputs=1, seed=0):
    """A Derivatives of order 1 with random values, built without any framework."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(in_shape))
    d = Derivatives(x=rng.uniform(size=(n, size)), y=rng.normal(size=(n, outputs)),
                    orders=[rng.normal(size=(n, outputs, size))], framework=framework,
                    method="reverse-ones")
    d._present((outputs,), in_shape)
    return d


def test_image_panels_show_the_input_and_the_channel_max_of_abs_gradient():
    x = torch.rand(8, 3, 6, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    d = nbderiv.derivatives(_cnn(), x, target=labels)
    fig = d.plot()
    assert isinstance(fig, NbderivFigure)
    assert sorted(fig.panels, key=str) == sorted(
        [("input", n) for n in range(6)] + [(1, n) for n in range(6)], key=str)  # 6 by default
    for n in range(6):
        image = _array(fig.panels["input", n])
        np.testing.assert_allclose(image, np.moveaxis(x[n].numpy(), 0, -1))  # RGB in [0, 1]
        saliency = _array(fig.panels[1, n])
        np.testing.assert_allclose(saliency, np.abs(d[1][n, 0]).max(axis=0), rtol=0, atol=0)
        assert saliency.shape == (6, 6)
        assert f"y[{int(labels[n])}] = {d.y[n, 0]:.3g}" in fig.panels["input", n].get_title()
    # the target's gradient: the same as the full Jacobian's row of that label
    full = nbderiv.derivatives(_cnn(), x)
    np.testing.assert_allclose(d[1][:, 0], full[1][np.arange(8), labels.numpy()], atol=1e-12)


def test_a_zero_saliency_map_is_captioned_as_zero():
    """A score that does not depend on the image: the caption says so (it said 'max 1', the
    colour scale's stand-in limit); a map that is not zero gives its own maximum."""
    net = _cnn()
    with torch.no_grad():
        net[3].weight[1] = 0.0  # output 1 ignores the image
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    d = nbderiv.derivatives(net, x, target=1)
    assert not np.any(d[1])
    fig = d.plot()
    assert "all 0" in fig.panels[1, 0].get_title() and "max 1" not in fig.panels[1, 0].get_title()
    d = nbderiv.derivatives(net, x, target=0)
    top = np.abs(d[1][0, 0]).max()
    assert f"max {top:.2g}" in d.plot().panels[1, 0].get_title()
    g = nbderiv.derivatives(lambda z: 0 * _gru()(z)[:, :1] + 1, torch.rand(2, 4, 3).double())
    assert "(all 0)" in g.plot().panels[1, 0].get_title()


def test_points_output_and_order_two_on_request():
    x = torch.rand(4, 1, 5, 5, dtype=torch.float64)
    d = nbderiv.derivatives(_cnn(channels=1, side=5), x, order=2)
    fig = d.plot(points=[3, 1], output=2)
    assert set(fig.panels) == {("input", 3), ("input", 1), (1, 3), (1, 1)}  # order 1 only
    np.testing.assert_allclose(_array(fig.panels["input", 1]), x[1, 0].numpy())  # one channel
    np.testing.assert_allclose(_array(fig.panels[1, 3]), np.abs(d[1][3, 2, 0]))
    fig = plot_saliency(d, points=2, orders=[1, 2])
    diagonal = np.abs(np.diagonal(d[2][1, 0].reshape(25, 25))).reshape(1, 5, 5).max(axis=0)
    np.testing.assert_allclose(_array(fig.panels[2, 1]), diagonal)
    assert set(fig.panels) == {("input", 0), ("input", 1), (1, 0), (1, 1), (2, 0), (2, 1)}


def test_images_outside_unit_range_are_rescaled_per_point():
    x = 10 * torch.rand(2, 3, 6, 6, dtype=torch.float64) - 5
    d = nbderiv.derivatives(_cnn(), x, target=1)
    shown = _array(d.plot().panels["input", 1])
    hwc = np.moveaxis(x[1].numpy(), 0, -1)
    np.testing.assert_allclose(shown, (hwc - hwc.min()) / (hwc.max() - hwc.min()))


def test_channel_axis_torch_first_keras_last_and_override():
    assert channel_axis_of((3, 32, 32), "torch") == 0
    assert channel_axis_of((32, 32, 3), "tensorflow") == 2
    assert channel_axis_of((32, 32, 1), "torch") == 2     # the size-1 axis at one end
    assert channel_axis_of((3, 8, 3), "torch") == 0       # ambiguous: the framework decides
    assert channel_axis_of((3, 8, 3), "tensorflow") == 2
    assert channel_axis_of((8, 16, 16), "torch", channel_axis=-1) == 2
    with pytest.raises(OptionError, match="channel_axis"):
        channel_axis_of((3, 8, 8), "torch", channel_axis=3)
    d = _fake((5, 5, 3), "tensorflow")  # Keras layout (H, W, C)
    fig = plot_saliency(d)
    np.testing.assert_allclose(_array(fig.panels[1, 0]), np.abs(d[1][0, 0]).max(axis=-1))
    np.testing.assert_allclose(_array(fig.panels["input", 1]), d.x[1])
    np.testing.assert_allclose(saliency_map(d, 1), np.abs(d[1][1, 0]).max(axis=-1))


def test_keras_conv_model_images_channel_last():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(2, 3, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    x = np.random.default_rng(0).uniform(size=(3, 6, 6, 3)).astype(np.float32)
    d = nbderiv.derivatives(model, x, target=[1, 0, 1])
    assert d[1].shape == (3, 1, 6, 6, 3)
    fig = d.plot()
    np.testing.assert_allclose(_array(fig.panels["input", 2]), x[2], rtol=1e-6)
    np.testing.assert_allclose(_array(fig.panels[1, 2]), np.abs(d[1][2, 0]).max(axis=-1))


def test_sequence_heat_map_is_abs_gradient_transposed():
    x = torch.rand(3, 7, 3, dtype=torch.float64)
    d = nbderiv.derivatives(_gru(), x)
    fig = d.plot(output=1)
    assert set(fig.panels) == {(c, n) for c in ("input", 1) for n in range(3)}
    for n in range(3):
        np.testing.assert_allclose(_array(fig.panels["input", n]), x[n].numpy().T)
        heat = _array(fig.panels[1, n])
        assert heat.shape == (3, 7)   # feature x time
        np.testing.assert_allclose(heat, np.abs(d[1][n, 1]).T)
        assert fig.panels[1, n].get_xlabel() == "time step"
        assert fig.panels[1, n].get_ylabel() == "feature"
    # against torch's own per-point Jacobian
    jac = torch.autograd.functional.jacobian(lambda s: _gru()(s[None])[0], x[2])
    np.testing.assert_allclose(heat, np.abs(jac[1].numpy()).T, atol=1e-12)


def test_no_wall_of_input_names_and_clear_option_errors():
    d = nbderiv.derivatives(_cnn(), torch.rand(2, 3, 6, 6, dtype=torch.float64))
    for kwargs, word in [({"wrt": 0}, "wrt="), ({"output": 5}, "output"),
                         ({"points": 0}, "points"), ({"points": [7]}, "points"),
                         ({"orders": [2]}, "orders")]:
        with pytest.raises(OptionError, match=word) as info:
            d.plot(**kwargs)
        assert "x[0,0,1]" not in str(info.value)
    vector = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5))
    with pytest.raises(OptionError, match="images") as info:
        plot_saliency(vector)
    with pytest.raises(OptionError, match="points="):
        vector.plot(points=2)
    assert nbderiv.plot_saliency is plot_saliency


def test_conv1d_points_are_drawn_channel_by_position():
    # a Conv1d receives (C, L) points: channel on the vertical axis, position on the
    # horizontal (they were drawn as if (T, F): C read as time steps)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 7, 1)).double()
    x = torch.rand(2, 2, 9, dtype=torch.float64)
    d = nbderiv.derivatives(net, x)
    fig = d.plot()
    for n in range(2):
        np.testing.assert_allclose(_array(fig.panels["input", n]), x[n].numpy())
        heat = _array(fig.panels[1, n])
        assert heat.shape == (2, 9)
        jac = torch.autograd.functional.jacobian(lambda s: net(s[None])[0, 0], x[n])
        np.testing.assert_allclose(heat, np.abs(jac.numpy()), atol=1e-12)
        assert fig.panels[1, n].get_ylabel() == "channel"
        assert fig.panels[1, n].get_xlabel() == "position"


def test_saliency_titles_name_each_points_target():
    """target=labels: each point's title names its chosen output, y[label] = its score (the
    titles read 'y = ...' without saying which output was differentiated)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = [4, 1, 2]
    d = nbderiv.derivatives(cnn, x, target=labels)
    titles = [a.get_title() for a in d.plot().axes]
    with torch.no_grad():
        scores = cnn(x).numpy()
    for n, label in enumerate(labels):
        assert f"point {n}\ny[{label}] = {scores[n, label]:.3g}" in titles
    assert any("target" in t for t in titles)


def _mnist_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def test_square_points_of_two_axes_are_drawn_as_one_channel_images():
    # MNIST without a channel axis, (N, 28, 28): drawn as time x feature heat maps it came out
    # transposed (an 'L' read as a '7'); now as images, the way plt.imshow(x[0]) shows them
    x = torch.zeros(2, 28, 28, dtype=torch.float64)
    x[:, 2:20, 6:9] = 1.0
    x[:, 17:20, 6:22] = 1.0
    d = nbderiv.derivatives(_mnist_mlp(), x, target=2)
    fig = d.plot()
    np.testing.assert_array_equal(_array(fig.panels["input", 0]), x[0].numpy())
    net = _mnist_mlp()
    truth = torch.func.vmap(torch.func.jacrev(lambda p: net(p[None])[0, 2]))(x).detach()
    np.testing.assert_allclose(_array(fig.panels[1, 1]), np.abs(truth[1].numpy()), atol=1e-12)
    assert fig.panels[1, 0].get_xlabel() == ""
    seq = d.plot(kind="sequence")  # asked for: the heat map, transposed, with its axes named
    np.testing.assert_allclose(_array(seq.panels[1, 0]), np.abs(truth[0].numpy()).T,
                               atol=1e-12)
    assert seq.panels[1, 0].get_xlabel() == "time step"
    with pytest.raises(OptionError, match="kind must be 'image' or 'sequence'"):
        d.plot(kind="video")


def test_non_finite_saliency_is_said_and_drawn_apart_from_zero():
    # a NaN map was drawn white and captioned "(all 0)"
    x = torch.rand(3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 2, 2] = float("nan")  # through a dense layer: every derivative of point 1 is NaN
    d = nbderiv.derivatives(_mnist_mlp(), x, target=0)
    assert np.isnan(d[1][1]).all() and np.isfinite(d[1][0]).all()
    fig = d.plot()
    assert "all NaN" in fig.panels[1, 1].get_title()
    assert "max" in fig.panels[1, 0].get_title() and "NaN" not in fig.panels[1, 0].get_title()
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 0, 2, 2] = float("nan")  # through a convolution: the pixels around it only
    d = nbderiv.derivatives(_cnn(), x, target=0)
    bad = np.isnan(d[1][1, 0]).any(axis=0)
    assert 0 < bad.sum() < bad.size
    panel = d.plot().panels[1, 1]
    assert f"{bad.sum()} NaN/inf in red" in panel.get_title()
    np.testing.assert_array_equal(np.ma.getmaskarray(panel.images[0].get_array()), bad)
    fake = _fake((4, 5), "torch")
    fake[1][0, 0, 0, 3] = np.inf  # one value of point 0 (d[1] is (N, 1, 4, 5))
    seq = plot_saliency(fake, kind="sequence")
    assert "1 NaN/inf in red" in seq.panels[1, 0].get_title()
    assert np.ma.getmaskarray(seq.panels[1, 0].images[0].get_array()).sum() == 1


def test_an_infinite_pixel_leaks_no_warnings_and_leaves_the_image_visible():
    import warnings

    x = torch.rand(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[2, 1, 4, 4] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's invalid-value warnings
        d = nbderiv.derivatives(_cnn(), x, target=0)
        fig = d.plot()
    shown = _array(fig.panels["input", 2])
    finite = x[2].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(shown[0, 0], finite[0, 0])  # values in [0, 1]: drawn as they are
    assert shown.std() > 0.1


def test_sequence_heat_maps_tick_whole_steps_and_features():
    fig = plot_saliency(_fake((10, 20), "torch"), kind="sequence")
    axis = fig.panels[1, 0]
    fig.canvas.draw()
    for ticks in (axis.get_xticks(), axis.get_yticks()):
        assert np.array_equal(ticks, np.round(ticks))
