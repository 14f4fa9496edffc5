"""``at-kink`` where a max / min over each point's axes picks among equal values: ``amax`` /
``amin``, ``max`` / ``min`` with a ``dim``, max pooling (1d, 2d, adaptive) in torch;
``reduce_max`` / ``reduce_min`` and ``MaxPooling`` in TensorFlow. There the one-sided slopes
differ (one direction raises one of the tied values, the other leaves the maximum where it
was), and autodiff returns a convention: ``amax`` splits the gradient, ``max`` and pooling pick
one. The truth here is one-sided differences in float64, computed by the test itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402

X = [[1.0, 1.0], [1.0, 2.0], [3.0, 0.5], [-2.0, -2.0]]  # ties at points 0 and 3
POOL1 = nn.MaxPool1d(2)
APOOL1 = nn.AdaptiveMaxPool1d(1)
TORCH_MAXIMA = {
    "amax": lambda z: z.amax(1, keepdim=True),
    "max dim": lambda z: z.max(1, keepdim=True).values,
    "torch.max dim": lambda z: torch.max(z, dim=1).values[:, None],
    "amin (of -z)": lambda z: -(-z).amin(1, keepdim=True),
    "max_pool1d": lambda z: POOL1(z[:, None, :])[:, 0, :],
    "adaptive max pool": lambda z: APOOL1(z[:, None, :])[:, 0, :],
}


def one_sided_slopes_differ(f, x, h=1e-6) -> list:
    """The points where, along some input, the slope just right differs from just left."""
    x = np.asarray(x, dtype=np.float64)
    out = []
    for n in range(x.shape[0]):
        for i in range(x.shape[1]):
            e = np.zeros_like(x[n])
            e[i] = h
            y0, yp, ym = (float(np.asarray(f(x[n][None] + s * e[None])).ravel()[0])
                          for s in (0, 1, -1))
            if abs((yp - y0) / h - (y0 - ym) / h) > 1e-3:
                out.append(n)
                break
    return out


@pytest.mark.parametrize("name", sorted(TORCH_MAXIMA))
def test_torch_ties_are_at_kink_exactly_where_the_slopes_jump(name):
    f = TORCH_MAXIMA[name]
    truth = one_sided_slopes_differ(lambda a: f(torch.tensor(a)), X)
    assert truth == [0, 3]
    d = nbderiv.derivatives(f, torch.tensor(X))
    assert d.codes == ["at-kink"], repr(d)
    assert d.finding("at-kink").points == tuple(truth)
    assert "max-pooling window" in d.finding("at-kink").message
    # away from the ties autodiff is the one slope there is: the larger input's
    np.testing.assert_array_equal(d[1][[1, 2], 0], [[0.0, 1.0], [1.0, 0.0]])


def test_a_cnn_with_max_pooling_over_constant_patches():
    # a blank patch of the image makes every window over it hold one value several times
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(36, 2)).eval()
    x = torch.rand(6, 1, 8, 8)
    assert nbderiv.derivatives(net, x).codes == []  # no exact ties in random images
    x[:3, :, :5, :5] = 0.0
    d = nbderiv.derivatives(net, x)
    assert d.codes == ["at-kink"], repr(d)
    flagged = d.finding("at-kink").points
    assert set(flagged) <= {0, 1, 2} and flagged

    def one(a):
        with torch.no_grad():
            return net(torch.tensor(a, dtype=torch.float32).reshape(1, 1, 8, 8))[:, 0].double()
    # one-sided slopes along the pixel of a blank window that the gradient skipped
    n = flagged[0]
    g = d[1][n, 0].reshape(-1)
    blank = [p for p in range(64) if p // 8 < 5 and p % 8 < 5 and p // 8 >= 1 and p % 8 >= 1]
    base = x[n].reshape(-1).double().numpy()
    jumps = []
    for p in blank:
        e = np.zeros(64)
        e[p] = 1e-3
        right = float(one(base + e) - one(base)) / 1e-3
        left = float(one(base) - one(base - e)) / 1e-3
        jumps.append(abs(right - left) > 1e-2 * (1 + abs(g[p])))
    assert any(jumps)


def test_dead_relu_windows_tie_at_zero_and_are_no_kink():
    # max pooling over units that are all 0 (dead ReLUs): no slope on either side
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(-10.0)
    d = nbderiv.derivatives(lambda z: net(z).amax(1, keepdim=True) + z.sum(1, keepdim=True), torch.tensor(X))
    assert d.codes == [], d.summary()


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("tensorflow")
    return tf


def test_tensorflow_ties_are_at_kink(tf):
    keras = pytest.importorskip("keras")
    x = np.array(X, dtype=np.float32)
    pool = keras.layers.MaxPooling1D(2)
    maxima = {"reduce_max": lambda z: tf.reduce_max(z, axis=1, keepdims=True),
              "reduce_min of -z": lambda z: -tf.reduce_min(-z, axis=1, keepdims=True),
              "MaxPooling1D": lambda z: tf.reshape(pool(z[:, :, None]), (-1, 1))}
    for name, f in maxima.items():
        truth = one_sided_slopes_differ(lambda a, f=f: f(tf.constant(a)).numpy(), X)
        assert truth == [0, 3], name
        d = nbderiv.derivatives(f, x, framework="tensorflow")
        assert d.codes == ["at-kink"], (name, d.summary())
        assert d.finding("at-kink").points == (0, 3), name


def test_keras_max_pooling_2d_tie(tf):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.MaxPooling2D(2),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    x = np.random.default_rng(1).random((3, 4, 4, 1)).astype(np.float32)
    # (pixels that are no window's largest do not move the output: no-input-dependence)
    assert "at-kink" not in nbderiv.derivatives(model, x).codes
    x[1, 0, 0, 0] = x[1, 0, 1, 0] = 2.0  # two equal largest values in one window of point 1
    d = nbderiv.derivatives(model, x)
    assert "at-kink" in d.codes and d.finding("at-kink").points == (1,), d.summary()
    flat = x.reshape(3, -1).astype(np.float64)
    truth = one_sided_slopes_differ(
        lambda a: model(a.reshape(-1, 4, 4, 1).astype(np.float32)).numpy().astype(np.float64),
        flat, h=1e-3)  # a float32 model: steps well above its rounding
    assert truth == [1]


NORMS = {
    "Tensor.norm": lambda z: z.norm(dim=1, keepdim=True),
    "torch.linalg.vector_norm": lambda z: torch.linalg.vector_norm(z, dim=1)[:, None],
    "torch.linalg.norm": lambda z: torch.linalg.norm(z, dim=-1, keepdim=True),
    "torch.norm p=1": lambda z: torch.norm(z, p=1, dim=1, keepdim=True),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_a_norm_of_an_all_zero_point_is_at_kink(name):
    """The cone |z| has its tip at z = 0: slope +1 one way and -1 the other, while autodiff
    returns 0 (or NaN for the 2-norm's 0/0 guard)."""
    f = NORMS[name]
    x = [[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]]
    truth = one_sided_slopes_differ(lambda a: f(torch.tensor(a)), x)
    assert truth == [0]
    d = nbderiv.derivatives(f, torch.tensor(x))
    assert "at-kink" in d.codes, d.summary()
    assert d.finding("at-kink").points == tuple(truth)
    assert "norm" in d.finding("at-kink").message
    # away from 0 the 2-norm's slope is z / |z| (the 1-norm's sign(z))
    z = np.array(x[1:])
    want = np.sign(z) if "p=1" in name else z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(d[1][1:, 0], want, rtol=1e-6)


def test_points_on_a_kink_are_no_evidence_of_missing_dependence():
    """Softshrink(0.5) at +-0.5: autodiff's convention gives 0 at both kinks, but the output's
    one-sided slopes are 0 and 1 there: at-kink alone (it also said 'the output does not
    depend on the input'); a third point inside the dead zone, where the slope is truly 0,
    keeps no-input-dependence, the kink points named as such."""
    net = nn.Sequential(nn.Linear(1, 1), nn.Softshrink(0.5), nn.Linear(1, 1))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.fill_(1.0)
            lin.bias.fill_(0.0)
    on = [[0.5], [-0.5]]
    net64 = copy.deepcopy(net).double()
    assert one_sided_slopes_differ(lambda a: net64(torch.tensor(a)).detach(), on) == [0, 1]
    d = nbderiv.derivatives(net, torch.tensor(on))
    assert d.codes == ["at-kink"], d.codes
    d = nbderiv.derivatives(net, torch.tensor(on + [[0.0]]))
    assert sorted(d.codes) == ["at-kink", "no-input-dependence"]
    assert "at index 0, 1, on a kink" in d.finding("no-input-dependence").message


def _raw_zero_background():
    """Images with one bright pixel each: the other pooling windows hold only 0s, ties of the
    input itself (a black background), not of dead ReLUs."""
    x = np.zeros((3, 1, 4, 4), dtype=np.float32)
    x[:, 0, 0, 0] = 1.0
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_max_pooling_over_a_zero_background_is_at_kink(seed):
    """The tied zeros move: raising a background pixel raises its window's maximum (slope the
    Linear weight one way, 0 the other). at-kink; never graph-broken (nothing is cut) nor
    no-input-dependence (the output does depend on those pixels, from one side)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 1)).eval()
    x = _raw_zero_background()
    n64 = copy.deepcopy(net).double()
    truth = one_sided_slopes_differ(
        lambda a: n64(torch.tensor(a).reshape(-1, 1, 4, 4)).detach(), x.reshape(3, -1))
    assert truth == [0, 1, 2]
    d = nbderiv.derivatives(net, torch.tensor(x))
    assert d.codes == ["at-kink"], d.summary()
    assert d.finding("at-kink").points == (0, 1, 2)


def test_a_max_over_zero_padded_steps_is_at_kink():
    torch.manual_seed(1)
    lin = nn.Linear(3, 1)
    x = torch.zeros(3, 6, 3)
    x[:, :2] = -torch.rand(3, 2, 3)          # 2 real (negative) steps, 4 zero-padded ones

    def f(z):
        return lin(z.max(1).values)

    l64 = copy.deepcopy(lin).double()
    truth = one_sided_slopes_differ(
        lambda a: l64(torch.tensor(a).reshape(-1, 6, 3).max(1).values).detach(),
        x.reshape(3, -1))
    assert truth == [0, 1, 2]
    d = nbderiv.derivatives(f, x)             # (a lambda around a float32 Linear: no crash)
    assert d.codes == ["at-kink"], d.summary()


def test_a_kink_inside_a_function_holding_a_float32_model_is_confirmed_in_float32():
    """kinks are confirmed on a float64 copy where there is one; a function around a float32
    Linear has none (float64 points would reach a float32 layer): its own dtype, no crash."""
    torch.manual_seed(0)
    lin = nn.Linear(2, 1)
    x = torch.zeros(4, 2)
    truth = one_sided_slopes_differ(
        lambda a: copy.deepcopy(lin).double()(torch.relu(torch.tensor(a))).detach(),
        x.numpy())
    assert truth == [0, 1, 2, 3]
    d = nbderiv.derivatives(lambda z: lin(torch.relu(z)), x)
    assert d.codes == ["at-kink"], d.summary()


def test_keras_max_pooling_over_a_zero_background_is_at_kink(tf):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.MaxPooling2D(2),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    x = _raw_zero_background().transpose(0, 2, 3, 1)              # channels last
    truth = one_sided_slopes_differ(
        lambda a: model(a.reshape(-1, 4, 4, 1).astype(np.float32)).numpy().astype(np.float64),
        x.reshape(3, -1), h=1e-3)
    assert truth == [0, 1, 2]
    d = nbderiv.derivatives(model, x)
    assert d.codes == ["at-kink"], d.summary()
