"""``nbderiv.explain`` of one row or column of the cross-sample Jacobian (``J[:, 0, 0, :]``
instead of its diagonal): ``cross-sample-jacobian``, never a cut graph. The truth: float64
``torch.autograd.functional.jacobian`` of a float64 copy of the model."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402


def _net(d_in=1, d_out=1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, d_out))


def _jacobian64(model, x):
    m = copy.deepcopy(model).double()
    return torch.autograd.functional.jacobian(m, x.double()).numpy()


def test_a_column_of_the_jacobian_is_no_broken_graph():
    net, xs = _net(), torch.linspace(-1, 1, 6).reshape(-1, 1)
    J = torch.autograd.functional.jacobian(net, xs)                      # (6, 1, 6, 1)
    J64 = _jacobian64(net, xs)
    i = np.arange(6)
    assert np.count_nonzero(J64[:, 0, :, 0] - np.diag(J64[i, 0, i, 0])) == 0  # independent
    e = nbderiv.explain(J[:, 0, 0, :], net, xs)
    assert e.code == "cross-sample-jacobian", e.message
    assert "no graph is cut" in e.message and "J[:, :, 0, :]" in e.message
    ns = {"torch": torch, "np": np, "nbderiv": nbderiv, "model": net, "x": xs}
    exec(e.fix, ns)  # noqa: S102 - the fix gives the diagonal blocks
    d1 = ns["d1"]
    d1 = np.asarray(d1.detach() if hasattr(d1, "detach") else d1)
    np.testing.assert_allclose(d1.reshape(6, 1, 1), J64[i, :, i, :], rtol=1e-5, atol=1e-6)


def test_one_output_of_a_row_of_the_jacobian():
    net, xs = _net(2, 3), torch.rand(5, 2)
    J = torch.autograd.functional.jacobian(net, xs)                      # (5, 3, 5, 2)
    e = nbderiv.explain(J[2, 1], net, xs)                                # row 2, output 1: (5, 2)
    assert e.code == "cross-sample-jacobian", e.message
    assert "output 1" in e.message and "point 2" in e.message


def test_a_row_of_a_coupled_models_jacobian_says_the_entries_are_not_zero():
    class Centred(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = _net()

        def forward(self, x):
            return self.n(x - x.mean(0, keepdim=True))

    net, xs = Centred(), torch.linspace(-1, 1, 6).reshape(-1, 1)
    J = torch.autograd.functional.jacobian(net, xs)
    row = J[3, :, :, :].reshape(6, 1)                                    # dy[3]/dx[m]
    assert np.count_nonzero(np.delete(row.numpy(), 3, axis=0)) > 0
    e = nbderiv.explain(row, net, xs)
    assert e.code == "cross-sample-jacobian", e.message
    assert "couples points" in e.message and "J[3, :, :, :]" in e.message


def test_the_right_derivative_at_one_point_is_not_called_a_slice():
    net, xs = _net(), torch.tensor([[0.3]])
    x = xs.clone().requires_grad_(True)
    g, = torch.autograd.grad(net(x).sum(), x)
    assert nbderiv.explain(g, net, xs).code in ("correct", "correct-reshaped")


def test_a_really_cut_graph_is_still_zeros_graph_broken():
    class Cut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = _net()

        def forward(self, x):
            return self.n(torch.as_tensor(x.detach().numpy()))

    net, xs = Cut(), torch.linspace(-1, 1, 6).reshape(-1, 1)
    assert nbderiv.explain(torch.zeros(6, 1), net, xs).code == "zeros-graph-broken"
