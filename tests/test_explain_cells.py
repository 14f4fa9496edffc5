"""``%%nnderiv explain`` explains only what the cell computed as derivatives (and the parts a
PINN cell computes), and ``.grad`` of a leaf copy of X. Truths: float64 ``torch.func``."""

from __future__ import annotations

import copy
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("IPython")

from checks import nbderiv_shell  # noqa: E402

SETUP = """
import torch, nbderiv
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
X = torch.rand(8, 2)
"""


@pytest.fixture(scope="module")
def shell():
    return nbderiv_shell(SETUP)


def run(shell, body, line="net X"):
    from IPython.utils.capture import capture_output

    with capture_output():
        result = shell.run_cell(f"%%nnderiv explain {line}\n" + textwrap.dedent(body),
                                store_history=False)
    assert result.success, result.error_in_exec
    return result.result


def truths(shell):
    n64 = copy.deepcopy(shell.user_ns["net"]).double()
    f = lambda p: n64(p[None])[0, 0]  # noqa: E731
    X = shell.user_ns["X"].double()
    return (torch.func.vmap(torch.func.jacrev(f))(X).detach().numpy(),
            torch.func.vmap(torch.func.hessian(f))(X).detach().numpy())


def test_arrays_that_are_not_derivatives_are_not_explained(shell):
    assert run(shell, """\
        a = [1, 2, 3]
        M = torch.zeros(8, 2)
        X_test = torch.rand(8, 2)
        noise = 0.01 * torch.randn_like(X)
        X_shift = X + 1.0
        """) == []


def test_a_correct_pinn_cell_explains_every_derivative_it_computed(shell):
    value = run(shell, """\
        x = X.clone().requires_grad_(True)
        u = net(x)
        du = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)[0]
        u_x, u_t = du[:, 0:1], du[:, 1:2]
        u_xx = torch.autograd.grad(u_x, x, torch.ones_like(u_x), create_graph=True)[0][:, 0:1]
        res = u_t - 0.1 * u_xx
        """)
    got = {e.name: e for e in value}
    assert {k: e.code for k, e in got.items()} == {
        "du": "correct-reshaped", "u_x": "correct-part", "u_t": "correct-part",
        "u_xx": "correct-part"}  # res (a residual, no derivative) is not called wrong
    G, H = truths(shell)
    np.testing.assert_allclose(got["u_t"].truth.ravel(), G[:, 1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["u_xx"].truth.ravel(), H[:, 0, 0], rtol=1e-4, atol=1e-7)


def test_grad_of_a_leaf_copy_of_x_made_by_the_cell_is_explained(shell):
    value = run(shell, """\
        x = X.clone().requires_grad_(True)
        net(x).sum().backward()
        """)
    assert [(e.name, e.code) for e in value] == [("x.grad", "correct-reshaped")]
    G, _ = truths(shell)
    np.testing.assert_allclose(value[0].truth.reshape(8, 2), G, rtol=1e-4, atol=1e-7)


def _printed(shell, body, line):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        result = shell.run_cell(f"%%nnderiv explain {line}\n" + textwrap.dedent(body),
                                store_history=False)
    assert result.success, result.error_in_exec
    return result.result, cap.stdout


def test_a_grad_of_x_held_by_a_name_is_explained_once_under_that_name(shell):
    # gallery 09: dydx = x.grad is the same tensor as x.grad: one explanation, named dydx
    for line, body in (("net x", "x = X.clone().requires_grad_(True)\n"
                                 "net(x).sum().backward()\ndydx = x.grad\n"),
                       ("net X", "x = X.clone().requires_grad_(True)\n"
                                 "net(x).sum().backward()\ndydx = x.grad\n")):
        value, _ = _printed(shell, body, line)
        assert [(e.name, e.code) for e in value] == [("dydx", "correct-reshaped")], line


def test_a_cell_with_nothing_to_explain_says_so_in_one_line(shell):
    value, out = _printed(shell, """\
        x = X.clone().requires_grad_(True)
        y = net(x)
        g, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))
        """, "")
    assert value == [] and out.count("\n") == 1, out
    assert "(g)" in out and "%%nnderiv explain MODEL X" in out
    value, out = _printed(shell, "y = net(X)\nz = y * 2\n", "net X")
    assert value == [] and out.count("\n") == 1, out
    assert "computed no derivative" in out and "net at X" in out


def test_batch_hessians_are_explained_not_skipped_for_their_size(shell):
    """torch.func.hessian of the model over the whole batch (N, 1, N, 2, N, 2), and of the
    summed output (N, 2, N, 2): cross-sample-jacobian, whose diagonal is the per-point
    Hessian (checked against float64 vmap(hessian))."""
    [e] = run(shell, "H = torch.func.hessian(net)(X)\n")
    assert e.code == "cross-sample-jacobian" and "(8, 1, 8, 2, 8, 2)" in e.message
    [e] = run(shell, "H = torch.func.hessian(lambda z: net(z).sum())(X)\n")
    assert e.code == "cross-sample-jacobian"
    H = shell.user_ns["H"].detach().numpy()
    i = np.arange(8)
    np.testing.assert_allclose(H[i, :, i, :], truths(shell)[1], rtol=1e-4, atol=1e-6)


def test_a_grad_of_a_grad_is_read_as_the_second_derivative_even_when_it_is_all_zeros(shell):
    # Case A written right: the second derivative of a ReLU net is exactly 0, and the cell's
    # code shows a grad of a grad. It was read at order 1 as a cut graph (zeros-graph-broken)
    shell.run_cell("torch.manual_seed(0)\n"
                   "relu = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ReLU(), "
                   "torch.nn.Linear(32, 1))\nT = torch.linspace(-1.3, 1.7, 9).reshape(-1, 1)")
    body = """\
        t_ = T.clone().requires_grad_(True)
        u = relu(t_)
        u_t = torch.autograd.grad(u, t_, torch.ones_like(u), create_graph=True)[0]
        u_tt = torch.autograd.grad(u_t, t_, torch.ones_like(u_t))[0]
        """
    relu64 = copy.deepcopy(shell.user_ns["relu"]).double()
    f = lambda p: relu64(p[None])[0, 0]  # noqa: E731
    T = shell.user_ns["T"].double()
    d1 = torch.func.vmap(torch.func.jacrev(f))(T).detach().numpy()
    d2 = torch.func.vmap(torch.func.hessian(f))(T).detach().numpy()
    assert np.abs(d2).max() == 0 and np.abs(d1).max() > 0.1  # the truth: zeros, at order 2
    for line in ("relu T", "relu T --order 2"):  # --order 2: u_t is the step on the way
        got = {e.name: e for e in run(shell, body, line)}
        assert got["u_t"].code.startswith("correct") and got["u_tt"].code.startswith("correct")
        np.testing.assert_allclose(shell.user_ns["u_t"].detach().numpy().ravel(), d1.ravel(),
                                   atol=1e-6)
        assert "piecewise-linear" in [f.code for f in got["u_tt"].findings]
