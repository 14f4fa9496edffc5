"""Per-point inputs of any shape, targets and extra model arguments (issue 17), against
independent references (torch.func, a TensorFlow tape, closed forms)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.func import hessian, jacrev, vmap  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.errors import InputTypeError, OptionError  # noqa: E402


def _conv(d_out=5, seed=0):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, d_out)).double().eval()


def _per_point(fn, x, transform=jacrev):
    return vmap(transform(lambda z: fn(z[None])[0]))(x).detach().numpy()


def test_images_give_the_vmap_jacrev_layout_and_values():
    net = _conv()
    x = torch.rand(7, 3, 6, 6, dtype=torch.float64)
    d = nbderiv.derivatives(net, x)
    assert d[1].shape == (7, 5, 3, 6, 6) and d.y.shape == (7, 5) and d.x.shape == (7, 3, 6, 6)
    np.testing.assert_allclose(d[1], _per_point(net, x), rtol=0, atol=1e-12)
    assert d.axes(1) == ("point", "output", "input axis 1", "input axis 2", "input axis 3")
    assert all(len(d.axes(k)) == d[k].ndim for k in range(2))
    assert d.features.shape == (7, 108) and d.n_outputs == 5


def test_sequences_at_order_two_and_outputs_with_several_axes():
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 2).double()
    f = lambda z: torch.tanh(lin(z)).sum(dim=1)  # noqa: E731 - (N, T, F) -> (N, 2)
    x = torch.rand(4, 5, 3, dtype=torch.float64)
    d = nbderiv.derivatives(f, x, order=2)
    assert d[2].shape == (4, 2, 5, 3, 5, 3)
    np.testing.assert_allclose(d[2], _per_point(f, x, hessian_rows), rtol=0, atol=1e-12)
    g = nbderiv.derivatives(lin, x)  # a sequence in, a sequence out: O = (5, 2)
    assert g[1].shape == (4, 5, 2, 5, 3) and g.y.shape == (4, 5, 2)
    np.testing.assert_allclose(g[1], _per_point(lin, x), rtol=0, atol=1e-12)
    assert len(g.axes(1)) == 5 and g.axes(0) == ("point", "output axis 1", "output axis 2")


def hessian_rows(fn):
    return jacrev(jacrev(fn))


def test_wrt_indexes_the_flattened_point_in_c_order():
    net = _conv(d_out=2)
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    flat = [int(np.ravel_multi_index((c, h, w), (3, 6, 6))) for c, h, w in [(0, 1, 2), (2, 5, 5)]]
    d = nbderiv.derivatives(net, x, wrt=flat)
    ref = _per_point(net, x)
    assert d[1].shape == (3, 2, 2)
    np.testing.assert_allclose(d[1][:, :, 0], ref[:, :, 0, 1, 2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(d[1][:, :, 1], ref[:, :, 2, 5, 5], rtol=0, atol=1e-12)
    assert d.inputs == ("x[0,1,2]", "x[2,5,5]")


def test_target_selects_one_output_per_point():
    net = _conv(d_out=10)
    x = torch.rand(12, 3, 6, 6, dtype=torch.float64)
    labels = torch.tensor([i % 10 for i in range(12)])
    full = _per_point(net, x)
    d = nbderiv.derivatives(net, x, target=labels)  # more points than the probe looks at
    assert d[1].shape == (12, 1, 3, 6, 6)
    np.testing.assert_allclose(d[1][:, 0], full[np.arange(12), labels.numpy()], atol=1e-12)
    np.testing.assert_allclose(d.y[:, 0], net(x).detach().numpy()[np.arange(12), labels])
    same = nbderiv.derivatives(net, x, target=7)
    np.testing.assert_allclose(same[1][:, 0], full[:, 7], atol=1e-12)


@pytest.mark.parametrize("target", [10, -1, [1, 2], 1.5, np.zeros(12, dtype=np.float32)])
def test_bad_targets_are_refused_clearly(target):
    x = torch.rand(12, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(OptionError, match="target"):
        nbderiv.derivatives(_conv(d_out=10), x, target=target)


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.lin = torch.nn.Linear(4, 2).double()

    def forward(self, x, mask=None, scale=1.0):
        return self.lin(torch.tanh(x) * mask) * scale


def test_kwargs_per_point_arrays_are_sliced_with_the_points_and_constants_passed():
    m = _Masked()
    x = torch.rand(40, 4, dtype=torch.float64)
    mask = torch.rand(40, 4) > 0.3
    before = mask.clone()
    d = nbderiv.derivatives(m, x, order=2, kwargs={"mask": mask, "scale": 2.0}, chunk_size=7)
    ref = vmap(jacrev(lambda z, k: m(z[None], mask=k[None], scale=2.0)[0]))(x, mask)
    np.testing.assert_allclose(d[1], ref.detach().numpy(), rtol=0, atol=1e-12)
    ref2 = vmap(hessian(lambda z, k: m(z[None], mask=k[None], scale=2.0)[0]))(x, mask)
    np.testing.assert_allclose(d[2], ref2.detach().numpy(), rtol=0, atol=1e-12)
    assert d[1].shape == (40, 2, 4) and d.inputs == tuple(f"x[{i}]" for i in range(4))
    assert torch.equal(mask, before) and d.codes == []  # no coupling claimed: masks stay put


def test_a_dict_input_points_to_the_tuple_form():
    with pytest.raises(InputTypeError, match="tuple"):
        nbderiv.derivatives(torch.sin, {"x": np.zeros(3), "t": np.zeros(3)}, framework="torch")


def test_keras_images_sequences_and_targets():
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([keras.Input((6, 6, 3), dtype="float64"),
                            keras.layers.Conv2D(4, 3, activation="tanh", dtype="float64"),
                            keras.layers.Flatten(dtype="float64"),
                            keras.layers.Dense(10, dtype="float64")])
    x = np.random.default_rng(0).random((12, 6, 6, 3))
    labels = np.arange(12) % 10
    d = nbderiv.derivatives(cnn, x, target=labels)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = tf.gather(cnn(xt), labels, batch_dims=1)
    assert d[1].shape == (12, 1, 6, 6, 3)
    np.testing.assert_allclose(d[1][:, 0], tape.gradient(y, xt).numpy(), rtol=0, atol=1e-12)
    lstm = keras.Sequential([keras.Input((5, 3), dtype="float64"),
                             keras.layers.LSTM(4, dtype="float64"),
                             keras.layers.Dense(1, dtype="float64")])
    s = np.random.default_rng(1).random((3, 5, 3))
    d = nbderiv.derivatives(lstm, s, order=2)
    st = tf.constant(s)
    with tf.GradientTape() as outer:
        outer.watch(st)
        with tf.GradientTape() as inner:
            inner.watch(st)
            y = lstm(st)
        g = tf.reshape(inner.gradient(y, st), (3, -1))
    H = outer.batch_jacobian(g, st).numpy().reshape(3, 15, 15)
    assert d[2].shape == (3, 1, 5, 3, 5, 3)
    np.testing.assert_allclose(d[2].reshape(3, 15, 15), H, rtol=0, atol=1e-10)


def test_a_keras_dict_input_is_pointed_to_the_tuple_form_that_works():
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    xi, ti = keras.Input((1,), name="x", dtype="float64"), keras.Input((1,), name="t",
                                                                      dtype="float64")
    h = keras.layers.Concatenate(dtype="float64")([xi, ti])
    out = keras.layers.Dense(1, activation="tanh", dtype="float64")(h)
    model = keras.Model({"x": xi, "t": ti}, out)
    rng = np.random.default_rng(0)
    given = {"x": rng.random((5, 1)), "t": rng.random((5, 1))}
    # a model built on a dict takes the dict; a tuple cannot say which array is which
    with pytest.raises(InputTypeError, match=r"x=\{'t': \.\.\., 'x': \.\.\.\}") as err:
        nbderiv.derivatives(model, tuple(given.values()))
    assert "numeric" not in str(err.value)
    d = nbderiv.derivatives(model, given)
    xt, tt = tf.constant(given["x"]), tf.constant(given["t"])
    with tf.GradientTape() as tape:
        tape.watch([xt, tt])
        y = model({"x": xt, "t": tt})
    gt, gx = tape.gradient(y, [tt, xt])
    assert d.inputs == ("t", "x")
    np.testing.assert_allclose(d[1][:, 0], np.concatenate([gt, gx], axis=1), atol=1e-12)


def test_the_summary_of_an_image_result_names_a_few_inputs_not_all():
    d = nbderiv.derivatives(_conv(), torch.rand(2, 3, 6, 6, dtype=torch.float64))
    text = repr(d)
    assert "x[0,0,0], x[0,0,1], x[0,0,2], ..., x[2,5,4], x[2,5,5] (108 features; each point " \
           "of shape (3, 6, 6))" in text
    assert "x[1,2,3]" not in text and "x[1,2,3]" not in d._repr_html_()


def test_a_deterministic_float32_model_is_not_called_random_with_a_target():
    """The probe's two looks at the same points must run on identically placed memory: a
    view at another offset of the stacked batches rounded differently in BLAS and read as
    randomness (a false train-mode finding)."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Sigmoid(), nn.Linear(4, 2))
    images = torch.rand(6, 1, 8, 8) * 255
    d = nbderiv.derivatives(net, images, target=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert "train-mode" not in d.codes


def test_x_keeps_each_points_shape_when_wrt_picks_some_pixels():
    """d.x is (N, *S) as the README says, also with wrt= (it came back (N, D)); wrt indexes
    the flattened features, and d[1]'s columns are those features' derivatives (truth:
    float64 vmap(jacrev) of the image model)."""
    import torch

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 2), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(12, 2))
    x = torch.randn(3, 2, 3, 3)
    c64 = __import__("copy").deepcopy(cnn).double()
    J = torch.func.vmap(torch.func.jacrev(lambda p: c64(p[None])[0]))(x.double())
    for wrt in ([4, 7], list(range(17, -1, -1))):
        d = nbderiv.derivatives(cnn, x, wrt=wrt)
        assert d.x.shape == (3, 2, 3, 3) and d.features.shape == (3, 18)
        np.testing.assert_array_equal(d.x, x.numpy())
        np.testing.assert_allclose(d[1], J.reshape(3, 2, 18)[:, :, wrt].detach().numpy(),
                                   atol=1e-6)


def test_reference_gets_image_points_in_their_own_shape():
    """reference= used to get (N, C*H*W) rows while the model and d.x have (N, C, H, W): a
    NumPy twin summing over axes (1, 2, 3) failed. The errors against it are float64's."""
    import torch

    x = torch.rand(4, 2, 3, 3, dtype=torch.float64)
    d = nbderiv.derivatives(lambda z: torch.sin(z).sum(dim=(1, 2, 3)), x, order=1,
                            reference=lambda z: np.sin(z).sum(axis=(1, 2, 3)))
    assert d.reference_errors[0][0] < 1e-12 and d.reference_errors[1][0] < 1e-8
    np.testing.assert_allclose(d[1].reshape(4, 2, 3, 3), np.cos(x.numpy()), atol=1e-12)
