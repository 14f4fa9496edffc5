"""``nbderiv.explain`` names the student's mistake, checked against float64 ``torch.func`` of
a float64 copy of the model: a mean over the batch instead of a sum (1/N), ``.grad`` built up
over several backward calls."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402


def _net(d_in, d_out):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, d_out))


def _jac64(net, X):
    m = copy.deepcopy(net).double()
    return torch.func.vmap(torch.func.jacrev(lambda p: m(p[None])[0]))(X.double()).detach().numpy()


def test_gradient_of_the_mean_is_named_with_its_one_over_n():
    net, xs = _net(1, 1), torch.linspace(-1, 1, 8).reshape(-1, 1)
    x = xs.clone().requires_grad_(True)
    net(x).mean().backward()
    J = _jac64(net, xs)
    np.testing.assert_allclose(x.grad.numpy() * 8, J[:, 0], rtol=1e-5, atol=1e-6)  # 1/N
    e = nbderiv.explain(x.grad, net, xs)
    assert e.code == "wrong" and "1/8" in e.message and "mean" in e.message


def test_gradient_of_the_mean_of_several_outputs_is_summed_outputs_over_n_d_out():
    net, pts = _net(2, 2), torch.rand(8, 2)
    p = pts.clone().requires_grad_(True)
    net(p).mean().backward()
    J = _jac64(net, pts)
    np.testing.assert_allclose(p.grad.numpy() * 16, J.sum(axis=1), rtol=1e-5, atol=1e-6)
    e = nbderiv.explain(p.grad, net, pts)
    assert e.code == "summed-outputs" and "MEAN" in e.message and "= 16" in e.message


def test_a_constant_factor_that_is_not_one_over_n_is_not_called_a_mean():
    net, xs = _net(1, 1), torch.linspace(-1, 1, 8).reshape(-1, 1)
    x = xs.clone().requires_grad_(True)
    g, = torch.autograd.grad(net(x).sum(), x)
    e = nbderiv.explain(0.5 * g, net, xs)
    assert e.code == "wrong" and "0.5 times" in e.message and "mean" not in e.message


def test_grad_added_up_over_two_backward_calls_is_named():
    net, xs = _net(1, 1), torch.linspace(-1, 1, 6).reshape(-1, 1)
    x = xs.clone().requires_grad_(True)
    for _ in range(2):
        net(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * _jac64(net, xs)[:, 0], rtol=1e-5, atol=1e-6)
    e = nbderiv.explain(x.grad, net, xs)
    assert e.code == "wrong" and "exactly 2 times" in e.message and "x.grad = None" in e.message


def test_second_derivative_through_grad_is_first_plus_second():
    """u.backward(create_graph=True), then x.grad.backward(): x.grad holds d1 + d2 (one
    input) and u_x is that very tensor."""
    import warnings

    net, xs = _net(1, 1), torch.linspace(-1, 1, 6).reshape(-1, 1)
    x = xs.clone().requires_grad_(True)
    u = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on create_graph=True with backward()
        u.backward(torch.ones_like(u), create_graph=True)
        u_x = x.grad
        u_x.backward(torch.ones_like(u_x))
    m = copy.deepcopy(net).double()
    f = lambda p: m(p[None])[0, 0]  # noqa: E731
    d1 = torch.func.vmap(torch.func.grad(f))(xs.double()).detach().numpy()
    d2 = torch.func.vmap(torch.func.hessian(f))(xs.double()).detach().numpy()[:, 0]
    np.testing.assert_allclose(x.grad.detach().numpy(), d1 + d2, rtol=1e-5, atol=1e-6)
    for k in (1, 2):
        e = nbderiv.explain(x.grad.detach(), net, xs, order=k)
        assert e.code == "wrong" and "PLUS the second" in e.message, e.message
    ns = {"torch": torch, "model": net, "x": xs}
    exec(e.fix, ns)  # noqa: S102 - the fix gives d2
    np.testing.assert_allclose(ns["d2"].detach().numpy().reshape(6), d2.reshape(6), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("off, code", [(0.0019, "wrong"), (0.0009, "correct")])
def test_correct_only_within_1e_3_of_the_largest_true_value(off, code):
    """docs/explain.md: float32 values within 1e-3 of the largest true value; np.isclose's
    own rtol on top allowed nearly 2e-3 at the largest entry."""
    net, xs = _net(1, 1), torch.linspace(-1, 1, 8).reshape(-1, 1)
    truth = _jac64(net, xs)                                           # (8, 1, 1)
    mine = truth.copy()
    i = np.unravel_index(np.abs(truth).argmax(), truth.shape)
    mine[i] *= 1 + off
    assert nbderiv.explain(mine.astype(np.float32), net, xs).code == code


def _hessians64(net, X):
    m = copy.deepcopy(net).double()
    return torch.func.vmap(torch.func.hessian(lambda p: m(p[None])[0]))(
        X.double()).detach().numpy()                                   # (N, d_out, n, n)


def test_a_row_of_one_outputs_hessian_in_a_two_output_model_is_a_correct_part():
    net, X = _net(2, 2), torch.rand(8, 2)
    x = X.clone().requires_grad_(True)
    du = torch.autograd.grad(net(x)[:, 0:1], x, torch.ones(8, 1), create_graph=True)[0]
    row = torch.autograd.grad(du[:, 0:1], x, torch.ones(8, 1))[0]      # [u_xx, u_xt]
    H = _hessians64(net, X)
    np.testing.assert_allclose(row.numpy(), H[:, 0, 0, :], rtol=1e-4, atol=1e-6)
    e = nbderiv.explain(row, net, X)
    assert e.code == "correct-part" and "row 0 of the Hessian of output 0" in e.message


def test_the_sum_of_every_hessian_entry_is_named_not_called_impossible():
    net, X = _net(2, 1), torch.rand(5, 2)
    H = _hessians64(net, X)
    e = nbderiv.explain(H.sum(axis=(-2, -1)).astype(np.float32), net, X)   # u_xx + 2u_xt + u_tt
    assert e.code == "summed-inputs" and "every entry" in e.message


def test_two_of_three_outputs_summed_is_summed_outputs():
    net, X = _net(2, 3), torch.rand(5, 2)
    J = _jac64(net, X)
    e = nbderiv.explain((J[:, 1] + J[:, 2]).astype(np.float32), net, X)
    assert e.code == "summed-outputs" and "output 1 + output 2" in e.message


def test_an_array_of_a_parts_size_that_fits_nothing_is_not_called_impossible():
    net, X = _net(2, 1), torch.rand(5, 2)
    e = nbderiv.explain(np.linspace(1, 2, 5).astype(np.float32), net, X)
    assert e.code == "wrong" and "fits no derivative" not in e.message
    assert "size of a part" in e.message


def test_summed_inputs_advice_in_a_tensorflow_cell_is_tensorflow():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    km = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh"),
                           keras.layers.Dense(1)])
    X = tf.random.uniform((6, 2), seed=1)
    with tf.GradientTape() as t2:
        t2.watch(X)
        with tf.GradientTape() as t1:
            t1.watch(X)
            u = km(X)
        u_x = t1.gradient(u, X)
    u_xx = t2.gradient(u_x, X)                  # the rows of each Hessian summed
    e = nbderiv.explain(u_xx, km, X)
    assert e.code == "summed-inputs"
    assert "torch." not in e.message and "outer.gradient(u_x, x)[:, 0]" in e.message


def test_a_factor_per_input_column_names_the_per_column_chain_rule():
    """du/dz of inputs normalised per column (sigma = (2, 0.5)) is the truth times sigma_i in
    column i: the chain-rule factors are named, column by column."""
    torch.manual_seed(0)
    core = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    mu, sigma = torch.tensor([5.0, 1.0]), torch.tensor([2.0, 0.5])

    def model(x):
        return core((x - mu) / sigma)

    x = mu + sigma * torch.randn(6, 2)
    z = ((x - mu) / sigma).requires_grad_(True)
    g, = torch.autograd.grad(core(z).sum(), z)                         # du/dz
    c64 = copy.deepcopy(core).double()
    truth = torch.func.vmap(torch.func.jacrev(
        lambda p: c64((p - mu.double()) / sigma.double())[0]))(x.double()).detach().numpy()
    np.testing.assert_allclose(g.numpy(), truth.reshape(6, 2) * sigma.numpy(), rtol=1e-4, atol=1e-6)
    e = nbderiv.explain(g, model, x)
    assert e.code == "wrong" and "2 for input 0" in e.message and "0.5 for input 1" in e.message


def test_gradients_with_respect_to_the_weights_are_refused_with_their_meaning():
    net, xs = _net(2, 1), torch.rand(16, 2)
    x = xs.clone().requires_grad_(True)
    grads = torch.autograd.grad(net(x).sum(), list(net.parameters()))
    assert len({tuple(g.shape) for g in grads}) > 1
    with pytest.raises(TypeError) as info:
        nbderiv.explain(grads, net, xs)
    assert "model's weights" in str(info.value) and "(16, 2), (16,)" in str(info.value)


def test_outputs_around_a_large_offset_raise_no_numpy_warning():
    import warnings

    net = _net(1, 1)

    def offset(z):
        return net(z) + 1e6

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        d = nbderiv.derivatives(offset, torch.linspace(-1, 1, 8).reshape(-1, 1))
    np.testing.assert_allclose(d[1], _jac64(net, torch.linspace(-1, 1, 8).reshape(-1, 1)),
                               rtol=1e-4, atol=1e-6)
