"""nbderiv.plot: the plotted data are the derivatives (checked against closed forms), the
heatmaps hold the partials on the grid or at the scattered points, and the Jacobian image
shows the block structure of the cross-sample Jacobian."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from checks import keras_or_skip  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.errors import OptionError  # noqa: E402
from nbderiv.plot import (  # noqa: E402
    NbderivFigure,
    derivative_label,
    draw_jacobian,
    plot_comparison,
    tex_name,
)

SIN = {0: np.sin, 1: np.cos, 2: lambda x: -np.sin(x), 3: lambda x: -np.cos(x)}


def _lines(ax):
    return {line.get_label(): line.get_xydata() for line in ax.lines}


def test_curves_are_the_derivatives_sorted_by_x_with_math_labels():
    x = torch.tensor(np.random.default_rng(0).uniform(-3, 3, 60), dtype=torch.float64)  # unsorted
    d = nbderiv.derivatives(torch.sin, x, order=3)
    fig = d.plot()
    assert isinstance(fig, NbderivFigure)
    assert list(fig.panels) == [0, 1, 2, 3]
    xs = np.sort(x.numpy())
    for k, ax in fig.panels.items():
        (line,) = ax.lines
        data = line.get_xydata()
        np.testing.assert_array_equal(data[:, 0], xs)
        np.testing.assert_allclose(data[:, 1], SIN[k](xs), atol=1e-12)
    assert fig.panels[0].get_ylabel() == "$y$"
    assert fig.panels[1].get_ylabel() == r"$\partial y/\partial x$"
    assert fig.panels[2].get_ylabel() == r"$\partial^2 y/\partial x^2$"
    assert fig.panels[3].get_xlabel() == "$x$"


def test_reference_callable_and_finite_difference_overlays():
    x = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64)
    d = nbderiv.derivatives(torch.sin, x, order=2, check=True)
    fig = d.plot(reference=lambda t: t ** 3, fd=True)
    xs = x.numpy()
    cube = {0: xs ** 3, 1: 3 * xs ** 2, 2: 6 * xs}
    for k in (0, 1, 2):
        lines = _lines(fig.panels[k])
        np.testing.assert_allclose(lines["reference"][:, 1], cube[k], atol=1e-12)
        np.testing.assert_allclose(lines["network"][:, 1], SIN[k](xs), atol=1e-12)
        if k:
            np.testing.assert_allclose(lines["finite differences"][:, 1], SIN[k](xs), atol=1e-6)
    assert "finite differences" not in _lines(fig.panels[0])  # no finite differences of y
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["network", "reference", "finite differences"]


def test_reference_as_dict_of_closed_forms():
    x = torch.linspace(0, 2, 21, dtype=torch.float64)
    d = nbderiv.derivatives(lambda t: torch.exp(2 * t), x, order=2)
    xs = x.numpy()
    fig = d.plot(reference={1: 2 * np.exp(2 * xs), 2: 4 * np.exp(2 * xs)})
    for k in (1, 2):
        lines = _lines(fig.panels[k])
        np.testing.assert_allclose(lines["network"][:, 1], lines["reference"][:, 1], rtol=1e-12)
    with pytest.raises(OptionError, match="reference\\[1\\] has shape"):
        d.plot(reference={1: np.ones(5)})


def test_multi_output_legend_and_output_choice():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    model = lambda t: torch.cat([torch.sin(t), t ** 2], dim=1)  # noqa: E731
    d = nbderiv.derivatives(model, x, order=2)
    fig = d.plot()
    xs = x.numpy()
    lines = _lines(fig.panels[1])
    np.testing.assert_allclose(lines["y[0]"][:, 1], np.cos(xs), atol=1e-12)
    np.testing.assert_allclose(lines["y[1]"][:, 1], 2 * xs, atol=1e-12)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["y[0]", "y[1]"]
    only = d.plot(output=1, orders=[2])
    assert list(only.panels) == [2]
    np.testing.assert_allclose(_lines(only.panels[2])["y[1]"][:, 1], 2.0)
    # the one output drawn names its axis (it read plain y, as if the model had one output)
    assert "y_{1}" in only.panels[2].get_ylabel()
    assert "y_" not in fig.panels[1].get_ylabel()  # both outputs: the legend names them


def test_one_output_reference_is_drawn_beside_each_output():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    d = nbderiv.derivatives(lambda t: torch.cat([t ** 2, t ** 3], dim=1), x, order=1)
    fig = d.plot(reference=lambda t: 2 * t)
    lines = _lines(fig.panels[1])
    np.testing.assert_allclose(lines["y[0] reference"][:, 1], 2.0)
    np.testing.assert_allclose(lines["y[1] reference"][:, 1], 2.0)
    np.testing.assert_allclose(lines["y[1]"][:, 1], 3 * x.numpy() ** 2, atol=1e-12)
    three = lambda t: torch.cat([t, t, t], dim=1)  # noqa: E731
    with pytest.raises(OptionError, match="3 outputs"):
        d.plot(reference=three)


def test_fd_without_check_is_a_clear_error():
    d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=1)
    with pytest.raises(OptionError, match="check=True"):
        d.plot(fd=True)
    with pytest.raises(OptionError, match="orders"):
        d.plot(orders=[3])


def _case_b(X):  # y = x0**2 * sin(x1)
    return (X[:, 0] ** 2 * torch.sin(X[:, 1])).unsqueeze(1)


def test_heatmaps_on_a_grid_hold_each_partial():
    g0 = np.linspace(-1, 1, 7)
    g1 = np.linspace(0, 3, 5)
    A, B = np.meshgrid(g0, g1)  # A[i1, i0] = g0[i0]
    X = np.stack([A.ravel(), B.ravel()], axis=1)[::-1].copy()  # any order of points
    d = nbderiv.derivatives(_case_b, torch.tensor(X), order=2)
    fig = d.plot()
    truth = {
        (0, ()): A ** 2 * np.sin(B),
        (1, (0,)): 2 * A * np.sin(B),
        (1, (1,)): A ** 2 * np.cos(B),
        (2, (0, 0)): 2 * np.sin(B),
        (2, (0, 1)): 2 * A * np.cos(B),
        (2, (1, 1)): -A ** 2 * np.sin(B),
    }
    assert set(fig.panels) == set(truth)
    for key, want in truth.items():
        ax = fig.panels[key]
        (mesh,) = ax.collections
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(want.shape), want,
                                   atol=1e-12)
    assert fig.panels[(2, (0, 1))].get_title() == r"$\partial^2 y/\partial x_{0}\,\partial x_{1}$"
    assert fig.panels[(2, (0, 0))].get_title() == r"$\partial^2 y/\partial x_{0}^2$"
    assert fig.panels[(0, ())].get_xlabel() == "$x_{0}$"


def test_heatmaps_of_scattered_points():
    X = np.random.default_rng(1).uniform(-1, 1, (40, 2))
    d = nbderiv.derivatives(_case_b, torch.tensor(X), order=1)
    fig = d.plot(orders=[1])
    for i, want in ((0, 2 * X[:, 0] * np.sin(X[:, 1])), (1, X[:, 0] ** 2 * np.cos(X[:, 1]))):
        (points,) = fig.panels[(1, (i,))].collections
        np.testing.assert_allclose(points.get_offsets(), X)
        np.testing.assert_allclose(points.get_array(), want, atol=1e-12)


def test_more_than_two_inputs_needs_wrt():
    X = np.random.default_rng(2).uniform(-1, 1, (30, 3))
    model = lambda t: (t[:, 0] * t[:, 1] + torch.sin(t[:, 2])).unsqueeze(1)  # noqa: E731
    d = nbderiv.derivatives(model, torch.tensor(X), order=2)
    with pytest.raises(OptionError, match="wrt=i"):
        d.plot()
    fig = d.plot(wrt=2)  # along x[2]; the other inputs vary, so points not lines
    line = fig.panels[1].lines[0]
    order = np.argsort(X[:, 2], kind="stable")
    np.testing.assert_allclose(line.get_xydata()[:, 1], np.cos(X[order, 2]), atol=1e-12)
    assert line.get_linestyle() == "None"
    pair = d.plot(wrt=(0, 1), orders=[2])
    (points,) = pair.panels[(2, (0, 1))].collections
    np.testing.assert_allclose(points.get_array(), 1.0)
    part = nbderiv.derivatives(model, torch.tensor(X), order=1, wrt=[2])
    with pytest.raises(OptionError, match="not differentiated"):
        part.plot(wrt=0)


def test_drawing_into_given_axes_and_png_is_deterministic():
    from matplotlib.figure import Figure

    d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 9), order=1)
    host = Figure()
    axes = host.subplots(1, 2)
    assert d.plot(ax=axes) is host
    np.testing.assert_allclose(axes[1].lines[0].get_ydata(), np.cos(np.linspace(0, 1, 9)),
                               atol=1e-6)
    with pytest.raises(OptionError, match="2 panel"):
        d.plot(ax=axes[0])
    fig = d.plot()
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG") and png == d.plot()._repr_png_()


def test_labels():
    assert tex_name("x") == "x"
    assert tex_name("x[3]") == "x_{3}"
    assert tex_name("arg0") == r"\mathrm{arg0}"
    assert derivative_label(3, ["x[0]", "x[0]", "t"]) == r"$\partial^3 y/\partial x_{0}^2\,\partial t$"


def test_plot_comparison_overlays_models_and_truth():
    x = np.linspace(0, 1, 6).reshape(-1, 1)
    d_sin = nbderiv.derivatives(torch.sin, x, order=2, framework="torch")
    d_sq = nbderiv.derivatives(lambda t: t ** 2, x, order=2, framework="torch")
    fig = plot_comparison(x[:, 0], {"sin": d_sin, "square": d_sq}, {2: np.full(6, 2.0)})
    lines = _lines(fig.panels[2])
    np.testing.assert_allclose(lines["sin"][:, 1], -np.sin(x[:, 0]), atol=1e-12)
    np.testing.assert_allclose(lines["square"][:, 1], 2.0)
    np.testing.assert_allclose(lines["truth"][:, 1], 2.0)


# -- the cross-sample Jacobian --------------------------------------------------------------
def _image(fig):
    return np.asarray(fig.panels["jacobian"].images[0].get_array())


def test_jacobian_of_independent_points_is_block_diagonal():
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)
    fig = nbderiv.plot_jacobian(torch.sin, x)
    np.testing.assert_allclose(_image(fig), np.diag(np.cos(x.numpy())), atol=1e-12)
    assert fig.coupled is False
    assert "block diagonal" in fig.panels["jacobian"].get_title()

    X = torch.tensor(np.random.default_rng(3).uniform(-1, 1, (4, 2)))
    fig2 = nbderiv.plot_jacobian(lambda t: (t[:, 0] * t[:, 1]).unsqueeze(1), X)
    M = _image(fig2)
    assert M.shape == (4, 8)
    want = np.zeros((4, 8))
    for n in range(4):
        want[n, 2 * n:2 * n + 2] = [X[n, 1], X[n, 0]]
    np.testing.assert_allclose(M, want, atol=1e-12)
    blocks = [p for p in fig2.panels["jacobian"].patches]
    assert len(blocks) == 4 and blocks[1].get_xy() == (1.5, 0.5)  # point 1's block outlined


def test_jacobian_of_coupled_points_shows_off_diagonal_blocks(torch_mlp):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 1)).double().train()
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(-1, 1)
    buffers = [b.clone() for b in net.buffers()]
    fig = nbderiv.plot_jacobian(net, x)
    import copy

    twin = copy.deepcopy(net)
    want = torch.autograd.functional.jacobian(lambda t: twin(t), x).reshape(8, 8).numpy()
    np.testing.assert_allclose(_image(fig), want, atol=1e-10)
    assert fig.coupled is True
    assert np.abs(want - np.diag(np.diag(want))).max() > 1e-3
    assert "coupled" in fig.panels["jacobian"].get_title()
    for before, after in zip(buffers, net.buffers(), strict=True):  # statistics put back
        assert torch.equal(before, after)
    assert net.training


def test_jacobian_refuses_many_points():
    with pytest.raises(OptionError, match="max_points"):
        nbderiv.plot_jacobian(torch.sin, torch.zeros(500))


def test_draw_jacobian_draws_the_array_it_is_given():
    J = np.zeros((3, 2, 3, 1))
    for n in range(3):
        J[n, :, n, 0] = [n + 1.0, -(n + 1.0)]
    fig = draw_jacobian(J)
    M = _image(fig)
    assert M.shape == (6, 3) and fig.coupled is False
    np.testing.assert_allclose(M, J.reshape(6, 3))
    assert "2 outputs" in fig.panels["jacobian"].get_ylabel()
    J[0, 0, 2, 0] = 0.5  # point 2's input moves point 0's output
    assert draw_jacobian(J).coupled is True
    with pytest.raises(OptionError, match="shape \\(N, d_out, N, d_in\\)"):
        draw_jacobian(np.zeros((3, 1, 4, 1)))


def test_plot_jacobian_is_full_jacobian_then_draw_jacobian():
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).reshape(-1, 1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    net = net.double()
    drawn = draw_jacobian(nbderiv.full_jacobian(net, x))
    np.testing.assert_allclose(_image(nbderiv.plot_jacobian(net, x)), _image(drawn))


# -- reference=: a NumPy function by central differences, a framework one by autodiff -----------
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_numpy_reference_is_drawn_with_its_true_derivatives(framework, torch_mlp):
    """np.sin's lines were flat at 0 (Keras: the model's autodiff cannot see into NumPy) or
    an error blaming the model (torch); they are sin, cos, -sin, -cos up to the accuracy of
    float64 central differences."""
    xs = np.linspace(-2, 2, 9)
    if framework == "torch":
        net = torch_mlp([1, 16, 1], seed=2)
    else:
        keras = keras_or_skip()
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16, activation="tanh"),
                                keras.layers.Dense(1)])
    d = nbderiv.derivatives(net, xs, order=3)
    for fig in (nbderiv.plot_derivatives(d, reference=np.sin), d.plot(reference=np.sin)):
        for k in range(4):
            lines = _lines(fig.panels[k])
            np.testing.assert_allclose(lines["reference"][:, 0], xs)
            np.testing.assert_allclose(lines["reference"][:, 1], SIN[k](xs), atol=1e-6)
            np.testing.assert_allclose(lines["network"][:, 1],
                                       np.asarray(d[k]).reshape(-1), rtol=1e-6)


def test_a_numpy_reference_is_differentiated_along_the_plotted_input():
    X = np.stack([np.linspace(-1, 1, 7), np.full(7, 0.7)], axis=1)
    d = nbderiv.derivatives(lambda z: torch.sin(z[:, :1]) * z[:, 1:], X, order=2,
                            framework="torch")
    fig = d.plot(wrt=0, reference=lambda z: np.sin(z[:, :1]) * z[:, 1:])
    x0 = X[:, 0]
    truth = {0: 0.7 * np.sin(x0), 1: 0.7 * np.cos(x0), 2: -0.7 * np.sin(x0)}
    for k in range(3):
        np.testing.assert_allclose(_lines(fig.panels[k])["reference"][:, 1], truth[k], atol=1e-6)
    fig = d.plot(wrt=1, reference=lambda z: np.sin(z[:, :1]) * z[:, 1:])  # linear in x[1]
    np.testing.assert_allclose(_lines(fig.panels[1])["reference"][:, 1], np.sin(x0), atol=1e-6)
    np.testing.assert_allclose(_lines(fig.panels[2])["reference"][:, 1], 0.0, atol=1e-6)


def test_a_framework_reference_stays_exact_and_a_failing_one_is_named():
    keras = keras_or_skip()
    xs = np.linspace(-2, 2, 9)
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh")])
    d = nbderiv.derivatives(net, xs, order=3)
    fig = d.plot(output=0, reference=keras.ops.sin)
    for k in range(4):  # autodiff in float64: exact, where central differences are not
        np.testing.assert_allclose(_lines(fig.panels[k])["y[0] reference"][:, 1], SIN[k](xs),
                                   atol=1e-12)

    def broken(x):
        raise ZeroDivisionError("the truth is undefined here")

    for result in (d, nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=1)):
        with pytest.raises(OptionError, match="the reference failed") as info:
            result.plot(reference=broken)
        text = str(info.value)
        assert "the truth is undefined here" in text and "the model raised" not in text
        assert "reference=np.sin" in text


def test_nan_values_are_noted_on_the_panels_that_leave_them_out():
    """sqrt of x at negative x: NaN for 3 of 8 points (numpy's own sqrt says so); each panel
    that drops them says how many, and a heat map's colours stay finite."""
    import matplotlib.pyplot as plt

    x = torch.linspace(-1.5, 2.0, 8).reshape(-1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        bad = int(np.isnan(np.sqrt(x.numpy().ravel())).sum())                 # y: 3
        bad1 = int((~np.isfinite(0.5 / np.sqrt(x.numpy().ravel()))).sum())     # +inf at 0
    assert (bad, bad1) == (3, 4)
    d = nbderiv.derivatives(torch.sqrt, x, order=1)
    fig = d.plot()
    notes = [t.get_text() for a in fig.axes for t in a.texts]
    assert notes == [f"NaN/inf at {bad} points: not drawn",
                     f"NaN/inf at {bad1} points: not drawn"]
    plt.close(fig)
    g = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 4),
                                   indexing="ij"), -1).reshape(-1, 2)
    d = nbderiv.derivatives(lambda z: torch.sqrt(z[:, :1] + z[:, 1:]), g, order=1)
    fig = d.plot()
    notes = [t.get_text() for a in fig.axes for t in a.texts]
    with np.errstate(invalid="ignore"):
        n_bad = int(np.isnan(np.sqrt(g[:, 0].numpy() + g[:, 1].numpy())).sum())
    assert n_bad and f"NaN/inf at {n_bad} points: not drawn" in notes
    plt.close(fig)


def test_curves_of_an_output_with_several_axes_are_the_right_slices():
    """A decoder-like output of shape (2, 2) per point: every line is one output's own
    derivative (named y[a,b]); the plot used to draw dy[0,0]/dx1 under the label dy0/dx0, or
    fail with a raw IndexError."""
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 4)
    x = torch.linspace(-1, 1, 9).reshape(-1, 1).repeat(1, 2) * torch.tensor([1.0, 0.0])
    d = nbderiv.derivatives(lambda z: torch.tanh(lin(z)).reshape(-1, 2, 2), x, order=2)
    fig = d.plot(wrt=0)
    order = np.argsort(d.features[:, 0], kind="stable")
    for k, panel in fig.panels.items():
        names = [line.get_label() for line in panel.lines]
        assert names == ["y[0,0]", "y[0,1]", "y[1,0]", "y[1,1]"], names
        for line, (a, b) in zip(panel.lines, [(0, 0), (0, 1), (1, 0), (1, 1)], strict=True):
            truth = d[k][:, a, b] if k == 0 else d[k][(slice(None), a, b) + (0,) * k]
            np.testing.assert_array_equal(line.get_ydata(), truth[order])
    lin1 = torch.nn.Linear(1, 6)
    d1 = nbderiv.derivatives(lambda z: torch.tanh(lin1(z)).reshape(-1, 2, 3),
                             torch.linspace(-1, 1, 7).reshape(-1, 1))
    assert len(d1.plot().panels[1].lines) == 6
    d.plot()  # two inputs: heat maps of output 0 (y[0,0])
