"""The fix code ``nbderiv.explain`` offers for models whose points have several axes (an image
(C, H, W), a sequence (T, F)) calls the model on each point in its own shape, and its array has
nbderiv's layout (N,) + O + S * k. The code is run; its numbers are compared with
``nbderiv.derivatives`` and with a float64 truth computed here (``vmap(jacrev)`` /
``vmap(hessian)`` of a float64 copy, a float64 Keras twin's ``batch_jacobian``)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.explain_fix import diagonal_blocks_code, fix_code  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _run(code, **names):
    ns = {"torch": torch, "np": np, "nbderiv": nbderiv, **names}
    exec(code, ns)  # noqa: S102
    out = {k: v for k, v in ns.items() if k[:1] == "d" and k[1:].isdigit()}
    d = out[max(out)]
    return np.asarray(d.detach() if hasattr(d, "detach") else d)


def _jacobian64(model, x, order=1):
    """vmap(jacrev^order) of a float64 copy of ``model``, one point at a time in its shape."""
    m = copy.deepcopy(model).double().eval()
    X = torch.as_tensor(np.asarray(x), dtype=torch.float64)

    def f(p):
        return m(p.unsqueeze(0))[0]

    for _ in range(order):
        f = torch.func.jacrev(f)
    return torch.func.vmap(f)(X).detach().numpy()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


class _GRURegressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, z):
        return self.head(self.gru(z)[0][:, -1])


def test_torch_cnn_summed_outputs_fix_keeps_each_image_whole():
    cnn = _cnn()
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    y = cnn(xr)
    g, = torch.autograd.grad(y, xr, torch.ones_like(y))
    e = nbderiv.explain(g, cnn, x)
    assert e.code == "summed-outputs"
    assert "S = (2, 5, 5)" in e.message and "reshape(len(x), -1)" not in e.fix
    truth = _jacobian64(cnn, x)
    assert truth.shape == (4, 3, 2, 5, 5)
    got = _run(e.fix, model=cnn, x=x)
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, nbderiv.derivatives(cnn, x)[1], rtol=1e-5, atol=1e-7)


def test_torch_gru_fix_runs_one_sequence_at_a_time():
    """torch.func.vmap cannot batch nn.GRU: the fix loops over the points instead."""
    r = _GRURegressor()
    xs = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(3))
    xr = xs.clone().requires_grad_(True)
    g, = torch.autograd.grad(r(xr)[:, 0].sum(), xr)
    e = nbderiv.explain(g, r, xs)
    assert e.code == "selected-outputs"
    every = e.fix.split("# every output:")[1]
    assert "torch.stack" in every and "vmap(" not in every
    truth = np.stack([_jacobian64_loop(r, p) for p in xs.numpy()])
    assert truth.shape == (4, 2, 6, 3)
    np.testing.assert_allclose(_run(every, model=r, x=xs), truth, rtol=1e-4, atol=1e-6)
    # the first line of the fix: nbderiv with a target, the output the student took
    d = _run(e.fix.split("# every output:")[0] + "\nd1 = d[1]", model=r, x=xs)
    np.testing.assert_allclose(d, truth[:, :1], rtol=1e-4, atol=1e-6)


def _jacobian64_loop(model, p):
    m = copy.deepcopy(model).double()
    return torch.autograd.functional.jacobian(
        lambda q: m(q.unsqueeze(0))[0], torch.as_tensor(p, dtype=torch.float64)).detach().numpy()


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_second_order_fix_of_an_image_model_matches_vmap_hessian(framework):
    cnn = _cnn()
    x = np.random.default_rng(4).normal(size=(3, 2, 5, 5)).astype(np.float32)
    truth = _jacobian64(cnn, x, order=2)
    assert truth.shape == (3, 3, 2, 5, 5, 2, 5, 5)
    if framework == "torch":
        code = fix_code("torch", 2, pshape=(2, 5, 5), oshape=(3,))
        got = _run(code, model=cnn, x=torch.tensor(x))
        np.testing.assert_allclose(got, truth, rtol=1e-3, atol=1e-5)
    else:  # the same code for a Keras twin of the same weights
        tf = pytest.importorskip("tensorflow")
        keras = pytest.importorskip("keras")
        twin = _keras_twin(keras, cnn)
        code = fix_code("tensorflow", 2, pshape=(5, 5, 2), oshape=(3,))
        got = _run(code, model=twin, x=x.transpose(0, 2, 3, 1), tf=tf)
        # NHWC inputs: the truth's input axes move from (C, H, W) to (H, W, C)
        want = truth.transpose(0, 1, 3, 4, 2, 6, 7, 5)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def _keras_twin(keras, cnn):
    """The torch CNN in Keras (channels last), same weights, float32."""
    conv, lin = cnn[0], cnn[3]
    m = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(4, 3, padding="same",
                                                                      activation="tanh"),
                          keras.layers.Permute((3, 1, 2)),  # torch flattens (C, H, W)
                          keras.layers.Flatten(), keras.layers.Dense(3)])
    m.layers[0].set_weights([conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                             conv.bias.detach().numpy()])
    m.layers[3].set_weights([lin.weight.detach().numpy().T, lin.bias.detach().numpy()])
    return m


def test_wrt_fix_of_an_image_model_counts_features_in_c_order():
    cnn = _cnn()
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(5))
    wrt = [0, 7, 49]
    code = fix_code("torch", 1, wrt=wrt, pshape=(2, 5, 5), oshape=(3,))
    got = _run(code, model=cnn, x=x)
    truth = _jacobian64(cnn, x).reshape(3, 3, 50)[:, :, wrt]
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, nbderiv.derivatives(cnn, x, wrt=wrt)[1], rtol=1e-5,
                               atol=1e-7)


class _Grid(nn.Module):
    """A point (3, 4) to an output (2, 3): outputs of several axes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.lin = nn.Linear(4, 3)
        self.mix = nn.Linear(3, 2)

    def forward(self, z):
        h = torch.tanh(self.lin(z))  # (N, 3, 3)
        return self.mix(h.transpose(1, 2)).transpose(1, 2)  # (N, 2, 3)


def test_fix_for_outputs_of_several_axes_keeps_them():
    g = _Grid()
    x = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(7))
    assert g(x).shape == (4, 2, 3)
    truth = _jacobian64(g, x)
    assert truth.shape == (4, 2, 3, 3, 4)
    got = _run(fix_code("torch", 1, pshape=(3, 4), oshape=(2, 3)), model=g, x=x)
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, nbderiv.derivatives(g, x)[1], rtol=1e-5, atol=1e-7)


def test_keras_conv2d_summed_outputs_fix_matches_a_float64_twin():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    layers = keras.layers

    def build(dtype):
        return keras.Sequential([keras.Input((5, 5, 2), dtype=dtype),
                                 layers.Conv2D(3, 3, activation="tanh", dtype=dtype),
                                 layers.Flatten(dtype=dtype), layers.Dense(2, dtype=dtype)])

    m = build("float32")
    x = np.random.default_rng(8).normal(size=(4, 5, 5, 2)).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = m(xt)
    e = nbderiv.explain(tape.gradient(y, xt), m, x)
    assert e.code == "summed-outputs" and "S = (5, 5, 2)" in e.message
    twin = build("float64")
    twin.set_weights([w.astype(np.float64) for w in m.get_weights()])
    x64 = tf.constant(x.astype(np.float64))
    with tf.GradientTape() as t64:
        t64.watch(x64)
        y64 = twin(x64)
    truth = t64.batch_jacobian(y64, x64).numpy()
    assert truth.shape == (4, 2, 5, 5, 2)
    got = _run(e.fix, model=m, x=x, tf=tf)
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, nbderiv.derivatives(m, x)[1], rtol=1e-5, atol=1e-7)


def test_coupled_cnn_fix_takes_the_diagonal_blocks_in_each_images_shape():
    """BatchNorm2d in training mode mixes the images: the per-point derivative is the diagonal
    block of the batch Jacobian, each block in the image's own shape."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                        nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(10))
    code = diagonal_blocks_code("torch", pshape=(1, 4, 4), oshape=(2,))
    got = _run(code, model=net, x=x)
    m = copy.deepcopy(net).double()
    J = torch.autograd.functional.jacobian(lambda p: m(p), x.double()).numpy()
    i = np.arange(5)
    truth = J[i, :, i]
    assert truth.shape == (5, 2, 1, 4, 4)
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-6)
    assert net.training


class _PINN(nn.Module):
    """u(x, t), v(x, t): two arguments, two outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t], dim=1))


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_tuple_of_arguments_gets_a_fix_that_calls_the_model_with_them(framework):
    """x = (xs, ts): the message names no point shape S (a tuple is features side by side) and
    the fix code runs, with the model called on its two arguments (it cast the tuple to one
    tensor and called model(x_), which raised)."""
    xs = np.random.default_rng(12).random((6, 1)).astype(np.float32)
    ts = np.random.default_rng(13).random((6, 1)).astype(np.float32)
    if framework == "torch":
        model = _PINN()
        X, T = torch.tensor(xs, requires_grad=True), torch.tensor(ts)
        u = model(X, T)[:, :1]
        u_x, = torch.autograd.grad(u, X, torch.ones_like(u))
        m64 = copy.deepcopy(model).double()
        truth = torch.func.vmap(torch.func.jacrev(
            lambda p: m64(p[:1][None], p[1:][None])[0]))(
            torch.tensor(np.concatenate([xs, ts], 1), dtype=torch.float64)).detach().numpy()
        names = {"model": model}
    else:
        tf = pytest.importorskip("tensorflow")
        keras = pytest.importorskip("keras")
        keras.utils.set_random_seed(11)
        a, b = keras.Input((1,), name="x"), keras.Input((1,), name="t")
        h = keras.layers.Dense(16, activation="tanh")(keras.layers.Concatenate()([a, b]))
        model = keras.Model([a, b], keras.layers.Dense(2)(h))
        X, T = tf.constant(xs), tf.constant(ts)
        with tf.GradientTape() as tape:
            tape.watch(X)
            u = model([X, T])[:, :1]
        u_x = tape.gradient(u, X)
        W = [w.astype(np.float64) for w in model.get_weights()]
        x64 = tf.constant(np.concatenate([xs, ts], 1).astype(np.float64))
        with tf.GradientTape() as t64:
            t64.watch(x64)
            y64 = tf.matmul(tf.tanh(tf.matmul(x64, W[0]) + W[1]), W[2]) + W[3]
        truth = t64.batch_jacobian(y64, x64).numpy()
        names = {"model": model, "tf": tf}
    e = nbderiv.explain(u_x, model, (xs, ts))
    assert e.code == "correct-part"
    assert "S =" not in e.message
    np.testing.assert_allclose(np.asarray(u_x).ravel(), truth[:, 0, 0], rtol=1e-4, atol=1e-6)
    ns = {"np": np, "torch": torch, "nbderiv": nbderiv, "x": (xs, ts), **names}
    exec(e.fix, ns)  # noqa: S102
    d1 = ns["d1"]
    np.testing.assert_allclose(np.asarray(d1.detach() if hasattr(d1, "detach") else d1),
                               truth[:, 0, 0], rtol=1e-4, atol=1e-6)


def test_a_first_derivative_of_one_output_explained_as_order_2_is_wrong_order():
    """explain(order=2) of d y[:, 0] / dx: the first derivative of output 0, which the
    message says (it said the array fits no derivative); the fix computes order 2."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.rand(5, 2, generator=torch.Generator().manual_seed(7))
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(model(xr)[:, 0].sum(), xr)
    np.testing.assert_allclose(g.numpy(), _jacobian64(model, x)[:, 0], rtol=1e-4, atol=1e-6)
    e = nbderiv.explain(g, model, x, order=2)
    assert e.code == "wrong-order", e.message
    assert "first derivative of output 0" in e.message and e.order == 2
    np.testing.assert_allclose(_run(e.fix, model=model, x=x), _jacobian64(model, x, order=2),
                               rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("how", ["hessian of the sum", "jacobian of jacobian"])
def test_second_derivatives_over_the_whole_batch_are_cross_sample(how):
    """hessian(lambda z: model(z).sum(), x) is (N, D, N, D) and a Jacobian of a Jacobian is
    (N, 1, N, 1, N, 1): their diagonals are the per-point second derivatives (it said they fit
    no derivative); the fix takes the diagonal, and it equals float64 vmap(hessian)."""
    torch.manual_seed(0)
    D = 2 if how == "hessian of the sum" else 1
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.rand(6, D, generator=torch.Generator().manual_seed(1)) * 2 - 1
    F = torch.autograd.functional
    if how == "hessian of the sum":
        mine = F.hessian(lambda z: model(z).sum(), x)
    else:
        mine = F.jacobian(lambda z: F.jacobian(model, z, create_graph=True), x)
    e = nbderiv.explain(mine, model, x, order=2)
    assert e.code == "cross-sample-jacobian", e.message
    truth = _jacobian64(model, x, order=2)
    got = _run(e.fix.split("# cheaper")[0], model=model, x=x, mine=mine)
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_run(e.fix, model=model, x=x, mine=mine), truth, rtol=1e-4,
                               atol=1e-6)
