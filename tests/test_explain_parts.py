"""What PINN students compute: one input's column (u_t), u_xx, a row of the Hessian, the
Laplacian, the rows of the Hessian summed (grad(u_x, x, ones_like(u_x))), columns swapped.
The truth is float64 ``torch.func.hessian`` / ``jacrev`` of a float64 copy of the model."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402


@pytest.fixture(scope="module")
def pinn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    X = torch.rand(8, 2)
    n64 = copy.deepcopy(net).double()
    f = lambda p: n64(p[None])[0, 0]  # noqa: E731
    X64 = X.double()
    G = torch.func.vmap(torch.func.jacrev(f))(X64).detach().numpy()      # (8, 2)
    H = torch.func.vmap(torch.func.hessian(f))(X64).detach().numpy()     # (8, 2, 2)
    x = X.clone().requires_grad_(True)
    u = net(x)
    ux = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)[0]
    return dict(net=net, X=X, G=G, H=H, x=x, ux=ux)


def _grad(out, x):
    return torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True,
                               create_graph=True)[0]


def _run(fix, net, X, name):
    ns = {"torch": torch, "np": np, "model": net, "x": X}
    exec(fix, ns)  # noqa: S102
    return ns[name].detach().numpy()


def test_one_column_is_a_correct_part(pinn):
    net, X, G = pinn["net"], pinn["X"], pinn["G"]
    for mine in (pinn["ux"][:, 1], pinn["ux"][:, 1:2]):
        e = nbderiv.explain(mine, net, X)
        assert e.code == "correct-part", e
        assert "with respect to input 1 (x[1]) alone" in e.message
        np.testing.assert_allclose(e.truth.ravel(), G[:, 1], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(_run(e.fix, net, X, "d1").ravel(), G[:, 1], rtol=1e-4,
                                   atol=1e-7)


def test_u_xx_and_the_laplacian_are_correct_parts(pinn):
    net, X, H, x, ux = pinn["net"], pinn["X"], pinn["H"], pinn["x"], pinn["ux"]
    uxx = _grad(ux[:, 0], x)[:, 0]
    e = nbderiv.explain(uxx, net, X)
    assert e.code == "correct-part" and "input 0 (x[0]) twice" in e.message and e.order == 2
    np.testing.assert_allclose(e.truth.ravel(), H[:, 0, 0], rtol=1e-4, atol=1e-7)
    lap = uxx + _grad(ux[:, 1], x)[:, 1]
    e = nbderiv.explain(lap, net, X)
    assert e.code == "correct-part" and "Laplacian" in e.message
    truth = np.trace(H, axis1=1, axis2=2)
    np.testing.assert_allclose(e.truth.ravel(), truth, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_run(e.fix, net, X, "lap").ravel(), truth, rtol=1e-4, atol=1e-7)


def test_a_hessian_row_is_recognised_at_order_two(pinn):
    net, X, H, x, ux = pinn["net"], pinn["X"], pinn["H"], pinn["x"], pinn["ux"]
    row = _grad(ux[:, 0], x)                    # [u_xx, u_xy]
    e = nbderiv.explain(row, net, X)
    assert e.code == "correct-part" and e.order == 2 and "row 0" in e.message, e
    assert "% of the largest" not in e.message
    np.testing.assert_allclose(e.truth.reshape(8, 2), H[:, 0, :], rtol=1e-4, atol=1e-7)


def test_grad_of_all_columns_with_ones_is_the_rows_summed(pinn):
    net, X, H, x, ux = pinn["net"], pinn["X"], pinn["H"], pinn["x"], pinn["ux"]
    bad = _grad(ux, x)
    np.testing.assert_allclose(bad.detach().numpy(), H.sum(axis=1), rtol=1e-4, atol=1e-6)
    for order in (None, 2):
        e = nbderiv.explain(bad, net, X, order=order)
        assert e.code == "summed-inputs", e
        assert "grad_outputs=torch.ones_like(u_x)" in e.message
        np.testing.assert_allclose(e.truth.reshape(8, 2), H.sum(axis=1), rtol=1e-4, atol=1e-7)


def test_swapped_columns_and_the_other_inputs_column(pinn):
    net, X, G, ux = pinn["net"], pinn["X"], pinn["G"], pinn["ux"]
    assert np.abs(G[:, 0] - G[:, 1]).max() > 1e-2  # the columns differ
    e = nbderiv.explain(ux[:, [1, 0]], net, X)
    assert e.code == "wrong" and "other input's column" in e.message
    assert "your column 0 holds the derivative with respect to input 1" in e.message
    e = nbderiv.explain(ux[:, 0:1], net, X, wrt=[1])  # u_x handed in as u_t
    assert e.code == "wrong" and "other input's column" in e.message
    assert "holds the first derivative with respect to input 0 (x[0]) alone" in e.message
    assert "wrt=[1]" in e.message
    np.testing.assert_allclose(e.truth.ravel(), G[:, 1], rtol=1e-4, atol=1e-7)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                                     torch.nn.Linear(16, 1))

    def forward(self, x, t):
        return self.n(torch.cat([x, t], 1))


def test_u_t_of_a_model_of_x_and_t_names_t():
    torch.manual_seed(0)
    p = TwoInputs()
    x0, t0 = torch.rand(6, 1), torch.rand(6, 1)
    x, t = x0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    u = p(x, t)
    u_t = torch.autograd.grad(u, t, torch.ones_like(u), create_graph=True)[0]
    u_x = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)[0]
    p64 = copy.deepcopy(p).double()
    truth_t = torch.autograd.functional.jacobian(lambda b: p64(x0.double(), b).sum(),
                                                 t0.double()).detach().numpy()
    e = nbderiv.explain(u_t, p, (x0, t0))
    assert e.code == "correct-part" and "input 1 (t)" in e.message
    np.testing.assert_allclose(e.truth.ravel(), truth_t.ravel(), rtol=1e-4, atol=1e-7)
    e = nbderiv.explain(u_x, p, (x0, t0), wrt=[1])
    assert e.code == "wrong" and "input 0 (x)" in e.message and "other input's column" in e.message
    e = nbderiv.explain(torch.cat([u_t, u_x], 1), p, (x0, t0))
    assert e.code == "wrong" and "your column 0 holds the derivative with respect to input 1 (t)" \
        in e.message


def test_numbers_that_are_no_part_stay_wrong(pinn):
    torch.manual_seed(1)
    for mine in (torch.rand(8), torch.rand(8, 2)):
        e = nbderiv.explain(mine, pinn["net"], pinn["X"])
        assert e.code == "wrong", e


@pytest.fixture(scope="module")
def two_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    X = torch.rand(8, 2)
    n64 = copy.deepcopy(net).double()
    f = lambda p: n64(p[None])[0]  # noqa: E731
    J = torch.func.vmap(torch.func.jacrev(f))(X.double()).detach().numpy()      # (8, 2, 2)
    H = torch.func.vmap(torch.func.hessian(f))(X.double()).detach().numpy()     # (8, 2, 2, 2)
    return dict(net=net, X=X, J=J, H=H)


def test_a_column_of_the_ones_trick_on_two_outputs_is_their_sum(two_outputs):
    # grads, = grad(uv, p, ones_like(uv)); u_x, u_t = grads[:, 0], grads[:, 1] (gallery 11)
    net, X, J = two_outputs["net"], two_outputs["X"], two_outputs["J"]
    p = X.clone().requires_grad_(True)
    uv = net(p)
    grads, = torch.autograd.grad(uv, p, grad_outputs=torch.ones_like(uv))
    for i, name in ((0, "u_x"), (1, "u_t")):
        e = nbderiv.explain(grads[:, i], net, X, names=(name, "model", "x"))
        assert e.code == "summed-outputs", e
        assert f"SUM over the 2 outputs of the first derivative with respect to input {i}" \
            in e.message
        np.testing.assert_allclose(grads[:, i].numpy(), J[:, :, i].sum(axis=1), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(e.truth, J[:, :, i], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(_run(e.fix, net, X, "d1"), J[:, :, i], rtol=1e-4,
                                   atol=1e-6)


def test_one_outputs_column_and_u_xx_of_two_outputs_are_correct_parts(two_outputs):
    net, X, J, H = (two_outputs[k] for k in ("net", "X", "J", "H"))
    p = X.clone().requires_grad_(True)
    uv = net(p)
    v_x = _grad(uv[:, 1], p)[:, 0]
    e = nbderiv.explain(v_x, net, X)
    assert e.code == "correct-part" and "of output 1 with respect to input 0" in e.message, e
    np.testing.assert_allclose(e.truth, J[:, 1, 0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_run(e.fix, net, X, "d1"), J[:, 1, 0], rtol=1e-4, atol=1e-6)
    u_tt = _grad(_grad(uv[:, 0], p)[:, 1], p)[:, 1]
    e = nbderiv.explain(u_tt, net, X)
    assert e.code == "correct-part" and "of output 0 with respect to input 1 (x[1]) twice" \
        in e.message, e
    np.testing.assert_allclose(e.truth, H[:, 0, 1, 1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_run(e.fix, net, X, "d2"), H[:, 0, 1, 1], rtol=1e-4, atol=1e-6)


def test_one_column_of_the_summed_hessian_rows_is_summed_inputs(pinn):
    """grad(u_x_all, x, ones)[0][:, 0] is u_xx + u_tx (it said the array fits no derivative)."""
    H = pinn["H"]
    bad = _grad(pinn["ux"], pinn["x"])[:, 0]
    np.testing.assert_allclose(bad.detach().numpy(), H[:, 0, 0] + H[:, 1, 0], rtol=1e-4,
                               atol=1e-6)
    e = nbderiv.explain(bad, pinn["net"], pinn["X"], order=2)
    assert e.code == "summed-inputs", e.message
    assert "column 0" in e.message
    np.testing.assert_allclose(e.truth[:, 0], H[:, 0, 0], rtol=1e-4, atol=1e-6)


def test_a_part_times_a_constant_is_named_with_its_factor(pinn):
    u_xx = _grad(pinn["ux"][:, 0], pinn["x"])[:, 0]
    e = nbderiv.explain(4 * u_xx, pinn["net"], pinn["X"], order=2)
    assert e.code == "wrong" and "4 times the second derivative" in e.message, e.message
    np.testing.assert_allclose(np.ravel(e.truth), pinn["H"][:, 0, 0], rtol=1e-4, atol=1e-6)
