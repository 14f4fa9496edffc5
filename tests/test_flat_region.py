"""flat-region: the gradient is exactly 0 at some of the points (not all), confirmed by the
forward pass there, with its cause told by a float64 copy. The counts are checked against
float64 truths computed here (which points a clamp or a final ReLU flattens), the causes
against the float64 gradient."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import nbderiv

torch = pytest.importorskip("torch")
nn = torch.nn


def _codes(d):
    return [f.code for f in d.findings]


def _flat(d):
    found = [f for f in d.findings if f.code == "flat-region"]
    assert len(found) == 1, d.findings
    return found[0]


def _tanh_net(seed=0, scale=1.0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        net[2].weight *= scale
    return net.eval()


def test_relu_at_the_end_flattens_the_points_where_its_input_is_negative():
    """A positive output forced by a final ReLU: no gradient wherever the pre-activation is
    negative. The count is the float64 truth's; every point named is one of them."""
    torch.manual_seed(0)  # (weights whose pre-activation has both signs on x: 43 of 120 < 0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1), nn.ReLU()).eval()
    x = torch.linspace(-3, 3, 120).reshape(-1, 1)
    d = nbderiv.derivatives(net, x, order=1)
    pre = copy.deepcopy(net).double()[:3](x.double()).detach().numpy()[:, 0]
    truth = pre < 0
    assert 0 < truth.sum() < len(truth) and np.abs(pre).min() > 1e-6
    f = _flat(d)
    assert f"y at {int(truth.sum())} of 120 points" in f.message
    assert "flat piece" in f.message and "ReLU" in f.message and "softplus" in f.fix
    assert f.points and all(truth[p] for p in f.points)
    np.testing.assert_array_equal(d[1][:, 0, 0] == 0, truth)


def test_a_clamp_in_a_wrapper_flattening_most_points():
    """clamp(net(x), -0.2, 0.2) with the net reaching beyond at 80-100% of the points: the
    derivatives used to carry no finding. A lambda has no float64 copy: the cause names both
    possibilities (this tanh net is far from saturating, which the message does not claim)."""
    net = _tanh_net(scale=5.0)
    x = torch.linspace(-3, 3, 200).reshape(-1, 1)
    d = nbderiv.derivatives(lambda z: torch.clamp(net(z), -0.2, 0.2), x, order=2)
    y64 = copy.deepcopy(net).double()(x.double()).detach().numpy()[:, 0]
    truth = np.abs(y64) > 0.2
    assert 0 < truth.sum() < len(truth)
    f = _flat(d)
    assert f"y at {int(truth.sum())} of 200 points" in f.message
    assert "clamp" in f.message and "or in units saturated" in f.message
    assert all(truth[p] for p in f.points)


def test_tanh_units_saturated_in_float32_only_are_named_as_such():
    """Inputs far out (x up to 15 with weights 1, no bias): float32 rounds tanh to 1, the
    gradient to exactly 0, while float64's is tiny but not 0. The cause is saturation, not
    a flat piece; the fix scales the inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    x = torch.linspace(-1, 15, 80).reshape(-1, 1)
    d = nbderiv.derivatives(net, x, order=1)
    x64 = x.double().requires_grad_(True)
    g64, = torch.autograd.grad(copy.deepcopy(net).double()(x64).sum(), x64)
    zero32 = d[1][:, 0, 0] == 0
    assert zero32.any() and not zero32.all() and np.all(g64.numpy()[zero32] != 0)
    f = _flat(d)
    assert "too small for float32" in f.message and "flat piece" not in f.message
    assert f"y at {int(zero32.sum())} of 80 points" in f.message
    assert "scale the inputs" in f.fix


def test_float64_model_saturated_beyond_float64_is_not_called_a_flat_piece():
    """A float64 tanh net driven far out (|z| > 20): float64's tanh is exactly 1 there, so
    the gradient is exactly 0; the model has no flat pieces, so the cause is saturation."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    x = torch.linspace(-1, 40, 60, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(net, x, order=1)
    assert (d[1] == 0).any() and not (d[1] == 0).all()
    f = _flat(d)
    assert "even in float64" in f.message and "flat piece" not in f.message


@pytest.mark.parametrize("model, x", [
    (lambda: _tanh_net(), torch.linspace(-3, 3, 50).reshape(-1, 1)),           # smooth
    # one flat point of 100 (below 5%): not worth a warning
    (lambda: nn.Sequential(nn.Linear(1, 1), nn.ReLU()).eval(), None),
])
def test_no_flat_region_where_the_gradient_is_not_zero_at_enough_points(model, x):
    m = model()
    if x is None:  # the ReLU's input 2x - 1.9 is negative at the first point only
        with torch.no_grad():
            m[0].weight.fill_(2.0)
            m[0].bias.fill_(-1.9)
        x = torch.linspace(0.94, 3, 100).reshape(-1, 1)
        assert (m[0](x) < 0).sum() == 1
    d = nbderiv.derivatives(m, x, order=1)
    assert "flat-region" not in _codes(d), d.findings


def test_zero_gradients_that_the_forward_pass_contradicts_are_no_flat_region():
    """where(x > 0, net(x), net(x).detach()): autodiff's 0 for x < 0 is a cut graph, not a
    flat piece (the output moves there). No flat-region claim."""
    net = _tanh_net()
    x = torch.linspace(-2, 2, 40).reshape(-1, 1)
    d = nbderiv.derivatives(lambda z: torch.where(z > 0, net(z), net(z).detach()), x, order=1)
    assert (d[1][:20] == 0).all()
    assert "flat-region" not in _codes(d), d.findings


def test_keras_relu_output_flat_region():
    """The same in Keras: a Dense head with a relu activation. The count is the float64
    truth's (the pre-activation's sign, computed from the weights in NumPy)."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1, activation="relu")])
    x = np.linspace(-3, 3, 90, dtype=np.float32).reshape(-1, 1)
    (W1, b1), (W2, b2) = (layer.get_weights() for layer in model.layers)
    pre = np.tanh(x.astype(np.float64) @ W1 + b1) @ W2 + b2
    truth = pre[:, 0] < 0
    if not 0.05 * 90 <= truth.sum() < 90:
        pytest.skip("this seed's head is not negative at enough points")
    d = nbderiv.derivatives(model, x, order=1)
    f = _flat(d)
    assert f"y at {int(truth.sum())} of 90 points" in f.message and "relu" in f.message
    assert all(truth[p] for p in f.points)


def test_steep_tanh_units_saturated_partly_beyond_float64_are_saturation():
    """Units with weights 40-80: at most points float32's tanh is exactly +-1, float64's at
    some of them too (tanh(45)), not at others (tanh(12)). The module itself (with a float64
    copy) used to get no finding; the message must not claim that a loss on y gets no
    gradient (the last layer's weights do get one there)."""
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[50.0], [-60.0], [80.0], [40.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[0.3, -0.2, 0.5, 0.1]]))
        net[2].bias.fill_(0.1)
    x = torch.linspace(-1, 1, 21).reshape(-1, 1)
    d = nbderiv.derivatives(net, x, order=1)
    zero = d[1][:, 0, 0] == 0
    f = _flat(d)
    assert f"y at {int(zero.sum())} of 21 points" in f.message
    assert "saturated" in f.message and "flat piece" not in f.message
    assert "a loss on y itself" not in f.message
    # the claim at the points named: a data loss there still trains the last layer
    loss = ((net(x[list(f.points)]) - 1.0) ** 2).mean()
    (g,) = torch.autograd.grad(loss, net[2].weight)
    assert float(g.abs().max()) > 0.1


@pytest.mark.parametrize("name", ["cos", "even-net", "even-net-1d"])
@pytest.mark.parametrize("order", [1, 2])
def test_smooth_stationary_points_are_no_flat_region(name, order):
    """Points at a smooth minimum or maximum (cos at 0, a net of x**2 at the origin) have a
    gradient of exactly 0 and change only like h**2 nearby: the forward pass curves there, so
    no flat piece is claimed (it was, with a fix to replace a clamp the model does not
    have). The second derivative there is not 0 (closed form / float64 Hessian)."""
    torch.manual_seed(1)
    width = 1 if name == "even-net-1d" else 2
    net = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 1))
    model = (lambda z: torch.cos(z).sum(1, keepdim=True)) if name == "cos" else \
        (lambda z: net(z ** 2))
    x = torch.randn(20, width, generator=torch.Generator().manual_seed(0))
    x[:4] = 0.0
    d = nbderiv.derivatives(model, x, order=order)
    assert "flat-region" not in _codes(d), d.findings
    assert np.all(d[1][:4] == 0)
    if order == 2 and name == "cos":
        np.testing.assert_allclose(d[2][:4, 0], np.broadcast_to(-np.eye(2), (4, 2, 2)),
                                   atol=1e-6)
    if order == 2 and name != "cos":
        from torch.func import hessian
        net64 = copy.deepcopy(net).double()
        H = hessian(lambda z: net64(z[None] ** 2)[0, 0])(torch.zeros(width, dtype=torch.float64))
        assert np.abs(H.detach().numpy()).max() > 1e-3
        np.testing.assert_allclose(d[2][0, 0], H.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_a_hard_boundary_ansatz_on_its_boundary_is_no_input_independence():
    """u = x * net(x, t) at points on x = 0 (a PINN's hard Dirichlet condition): u_t is 0
    there, but u_xt is not (closed form: net(0, t)'s t-derivative), so u depends on t next to
    these points; no no-input-dependence."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    xt = torch.stack([torch.zeros(10), torch.linspace(0, 1, 10)], 1).double()
    d = nbderiv.derivatives(lambda z: z[:, :1] * net(z), xt, order=2)
    assert "no-input-dependence" not in _codes(d), d.findings
    assert np.all(d[1][:, 0, 1] == 0)
    from torch.func import jacrev, vmap
    net_t = vmap(jacrev(lambda z: net(z[None])[0, 0]))(xt)[:, 1].detach().numpy()
    np.testing.assert_allclose(d[2][:, 0, 0, 1], net_t, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_saddle_corners_of_a_hard_boundary_ansatz_are_no_flat_region(dtype):
    """u = x(1-x) y(1-y) net(x, y) on a grid of [0, 1]^2: at the four corners the gradient
    is exactly 0 and u does not change along either axis, but it does along the diagonals
    (u_xy = net(0, 0) there, a saddle): no flat-region (it was claimed, with saturated
    units as the cause)."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)

    def ansatz(z):
        x, y = z[:, :1], z[:, 1:]
        return x * (1 - x) * y * (1 - y) * net(z)
    g = torch.linspace(0, 1, 5, dtype=dtype)
    X = torch.cartesian_prod(g, g)
    d = nbderiv.derivatives(ansatz, X, order=2)
    assert "flat-region" not in _codes(d), d.findings
    corners = [0, 4, 20, 24]
    assert np.all(d[1][corners] == 0)
    # the closed form at a corner (x0, y0): u_xy = (1 - 2 x0)(1 - 2 y0) net(x0, y0)
    n64 = copy.deepcopy(net).double()
    c = X[corners].double()
    closed = ((1 - 2 * c[:, 0]) * (1 - 2 * c[:, 1]) * n64(c)[:, 0]).detach().numpy()
    np.testing.assert_allclose(d[2][corners, 0, 0, 1], closed,
                               rtol=1e-4 if dtype == torch.float32 else 1e-10)
