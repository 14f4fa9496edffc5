"""piecewise-linear read from the numbers (no ReLU-type layer to see) is claimed only where
it is true: second derivatives 0 at a wider spread of points too, the forward pass not
curving at the points, and no smooth activation known. Truths: closed forms, float64 central
second differences, the same weights written with torch.sin."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import nbderiv

torch = pytest.importorskip("torch")
nn = torch.nn


class NumpySin(torch.autograd.Function):
    """sin with a right first derivative computed in NumPy: its backward cannot be
    differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.from_numpy(np.cos(x.detach().numpy()))


class Siren(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.l2(NumpySin.apply(3 * self.l1(x)))


def test_a_backward_that_cannot_be_differentiated_again_is_graph_broken_not_piecewise():
    """d2 = 0 everywhere from autodiff, yet the model (sin units) curves: the float64 second
    differences of its forward pass are far from 0. It used to be called piecewise linear
    ('a second derivative of 0 here is not a bug')."""
    torch.manual_seed(0)
    m = Siren()
    x = torch.linspace(-1, 1, 15).reshape(-1, 1)
    d = nbderiv.derivatives(m, x, order=2)
    assert np.all(d[2] == 0)
    m64, x64, h = copy.deepcopy(m).double(), x.double(), 1e-4
    with torch.no_grad():
        fd2 = ((m64(x64 + h) - 2 * m64(x64) + m64(x64 - h)) / h ** 2).numpy().ravel()
    assert np.abs(fd2).max() > 0.5
    assert "piecewise-linear" not in d.codes
    f = d.finding("graph-broken")
    assert f is not None and "cannot be differentiated again" in f.message
    assert all(abs(fd2[p]) > 1e-3 for p in f.points)
    # the first derivative is right: the same weights with torch.sin
    ref = nbderiv.derivatives(lambda z: m.l2(torch.sin(3 * m.l1(z))), x, order=2)
    np.testing.assert_allclose(d[1], ref[1], atol=1e-5)


@pytest.mark.parametrize("case", ["gelu-far-out", "quartic-inflections", "hardswish-outside"])
def test_no_piecewise_linear_for_smooth_or_curved_models_flat_at_the_points(case):
    """GELU units driven far out (d2 1e-136 in float64), a quartic at its two inflection
    points (d2 = x**2 - x), Hardswish beyond +-3 (piecewise quadratic): d2 is 0 at these
    points, the models are not piecewise linear."""
    torch.manual_seed(0)
    if case == "gelu-far-out":
        model = nn.Sequential(nn.Linear(1, 8), nn.GELU(), nn.Linear(8, 1))
        with torch.no_grad():
            model[0].weight.copy_(torch.sign(model[0].weight) * (1 + model[0].weight.abs()))
        x = torch.linspace(-475.0, 475.0, 20).reshape(-1, 1)
    elif case == "quartic-inflections":
        model = lambda z: z ** 4 / 12 - z ** 3 / 6 + z  # noqa: E731
        x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(1, 1), nn.Hardswish())
        with torch.no_grad():
            model[0].weight.fill_(1.0)
            model[0].bias.zero_()
        x = torch.cat([torch.linspace(-9, -4, 5), torch.linspace(4, 9, 5)]).reshape(-1, 1)
    d = nbderiv.derivatives(model, x, order=2)
    assert np.all(d[2] == 0)
    assert "piecewise-linear" not in d.codes, d.findings


def test_relu_called_inside_forward_is_still_piecewise_linear():
    """torch.relu in a function (no layer to see): the numbers still say it, and the forward
    pass confirms (no curvature at the points)."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(1, 16), nn.Linear(16, 1)
    d = nbderiv.derivatives(lambda z: lin2(torch.relu(lin1(z))),
                            torch.linspace(-2, 2, 30).reshape(-1, 1), order=2)
    assert "piecewise-linear" in d.codes and "graph-broken" not in d.codes


@pytest.mark.parametrize("case", ["x + t**2 at t = 0", "cos at 0", "even PINN on its axis"])
def test_stationary_points_are_no_input_dependence(case):
    """d1 = 0 along an input at every point because each point is a stationary point (the
    output changes like h**2: nbderiv's own d2 is not 0 there). In float32 the change at the
    smaller step sank below rounding, and no-input-dependence was claimed."""
    torch.manual_seed(0)
    if case == "x + t**2 at t = 0":
        model = lambda z: z[:, :1] + z[:, 1:] ** 2  # noqa: E731
        x, curved = torch.stack([torch.linspace(-1, 1, 10), torch.zeros(10)], 1), (1, 1)
    elif case == "cos at 0":
        model, x, curved = torch.cos, torch.zeros(5, 1), (0, 0)
    else:
        net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
        model = lambda x, t: net(torch.cat([x ** 2, t], 1))  # noqa: E731
        x = (torch.zeros(10, 1), torch.linspace(0, 1, 10).reshape(-1, 1))
        curved = (0, 0)
    d = nbderiv.derivatives(model, x, order=2)
    assert np.all(np.abs(d[2][:, 0, curved[0], curved[1]]) > 1e-3)  # it does curve
    assert "no-input-dependence" not in d.codes, d.findings


class DetachedCosSin(torch.autograd.Function):
    """sin whose backward detaches its cos factor: first derivative right, second derivative
    missing the part through this function."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x).detach()


class HalfCut(nn.Module):
    """A smooth model whose second derivative is partly cut: sin through DetachedCosSin beside
    tanh (the user's code, not a plain stack)."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.act, self.a, self.b = act, nn.Linear(2, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.act(h) + torch.tanh(h))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_partly_cut_second_derivative_is_graph_broken(dtype):
    """d2 was silently 55% off with no finding; now graph-broken, confirmed by float64
    differences of d1 at the points it names. Truth: the same weights with torch.sin
    (float64 vmap(hessian)); d1 is right, d2 is not."""
    from torch.func import hessian, jacrev, vmap
    cut, ok = HalfCut(DetachedCosSin.apply).to(dtype), HalfCut(torch.sin).double()
    ok.load_state_dict({k: v.double() for k, v in cut.state_dict().items()})
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    d = nbderiv.derivatives(cut, x, order=2)
    one = lambda z: ok(z[None])[0]  # noqa: E731
    J = vmap(jacrev(one))(x.double()).detach().numpy()
    H = vmap(hessian(one))(x.double()).detach().numpy()
    assert np.abs(d[1] - J).max() <= 1e-5 * np.abs(J).max()
    assert np.abs(d[2] - H).max() > 0.1 * np.abs(H).max()  # really wrong
    assert d.codes == ["graph-broken"], d.findings
    f = d.finding("graph-broken")
    assert "second derivative" in f.message and "detach" in f.message and len(f.points) >= 2
    # the same model with torch.sin: no finding, the right numbers
    d_ok = nbderiv.derivatives(HalfCut(torch.sin).to(dtype), x, order=2)
    assert d_ok.codes == []


def test_a_smooth_custom_function_with_a_differentiable_backward_is_no_cut():
    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.cos(x)

    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert nbderiv.derivatives(HalfCut(Sin.apply).double(), x, order=2).codes == []


def test_a_fully_cut_second_derivative_beside_an_unused_smooth_layer_is_graph_broken():
    """d2 == 0 everywhere from a custom Function that detaches its derivative, in a module
    that also holds an unused tanh network: the smooth activation made the curvature check
    step back (no claim), and d2 was silently 0 where the truth is -4 sin(2x)."""
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.unused = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return DetachedCosSin.apply(2 * x)

    x = torch.linspace(-1, 1, 11, dtype=torch.float64)[:, None]
    d = nbderiv.derivatives(Holder().double(), x, order=2)
    assert np.all(d[2] == 0) and np.abs(d[1][:, 0, 0] - 2 * np.cos(2 * x.numpy()[:, 0])).max() < 1e-12
    assert d.codes == ["graph-broken"], d.findings


class CosDetached(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.cos(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g * torch.sin(x).detach()


class SinRightTwice(torch.autograd.Function):
    """sin whose first and second derivatives are right, its third cut (its backward uses
    CosDetached, whose own backward detaches)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * CosDetached.apply(x)


def test_a_cut_third_derivative_is_graph_broken_at_order_3_only():
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = HalfCut(SinRightTwice.apply).double()
    ok = HalfCut(torch.sin).double()
    ok.load_state_dict(model.state_dict())
    assert nbderiv.derivatives(model, x, order=2).codes == []
    d = nbderiv.derivatives(model, x, order=3)
    assert d.codes == ["graph-broken"] and "third derivative" in d.findings[0].message
    from torch.func import jacfwd, jacrev, vmap
    one = lambda z: ok(z[None])[0]  # noqa: E731
    T = vmap(jacfwd(jacrev(jacrev(one))))(x).detach().numpy()
    assert np.abs(d[2] - vmap(jacrev(jacrev(one)))(x).detach().numpy()).max() < 1e-10
    assert np.abs(d[3] - T).max() > 0.1 * np.abs(T).max()  # really cut


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_linear_in_the_differentiated_input_with_a_slope_set_by_another_is_not_piecewise(
        framework):
    """y = x0 exp(x1), wrt=[0]: d2y/dx0^2 is exactly 0 and dy/dx0 = exp(x1) changes from point
    to point, through x1 alone: no kink anywhere (the finding said piecewise linear). A kink
    in x0 with x1 as its slope still is one."""
    x = np.random.default_rng(0).normal(size=(40, 2))
    if framework == "torch":
        smooth = lambda z: z[:, :1] * torch.exp(z[:, 1:])  # noqa: E731
        kinked = lambda z: torch.where(z[:, :1] > 0, z[:, :1], 0.1 * z[:, :1]) * z[:, 1:]  # noqa: E731,E501
    else:
        tf = pytest.importorskip("tensorflow")
        smooth = lambda z: z[:, :1] * tf.exp(z[:, 1:])  # noqa: E731
        kinked = lambda z: tf.where(z[:, :1] > 0, z[:, :1], 0.1 * z[:, :1]) * z[:, 1:]  # noqa: E731,E501
    d = nbderiv.derivatives(smooth, x, order=2, wrt=[0], framework=framework, progress=False)
    assert not d.findings
    np.testing.assert_allclose(d[1][:, 0, 0], np.exp(x[:, 1]), rtol=1e-6)
    assert np.all(d[2] == 0)
    d = nbderiv.derivatives(kinked, x, order=2, wrt=[0], framework=framework, progress=False)
    assert "piecewise-linear" in [f.code for f in d.findings]


class _Quartic(nn.Module):
    """V(x) = |x|^4 (a potential): its Hessian 4|x|^2 I + 8 x x^T is exactly 0 at 0."""

    def forward(self, x):
        return (x ** 2).sum(dim=1, keepdim=True) ** 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_where_the_second_derivative_is_zero_are_no_cut(dtype):
    """The first points at 0: the differences of d1 give 4 h^2 there, 100% of themselves at
    every step (the finding said part of the second derivative was cut). Truth: float64
    vmap(hessian)."""
    from torch.func import hessian, vmap
    rest = torch.randn(12, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x = torch.cat([torch.zeros(3, 2, dtype=dtype), rest])
    model = _Quartic()
    d = nbderiv.derivatives(model, x, order=2, progress=False)
    assert d.codes == [], d.findings
    H = vmap(hessian(lambda z: model(z[None])[0, 0]))(x.double()).numpy()
    np.testing.assert_allclose(d[2][:, 0], H, atol=1e-5 * np.abs(H).max())
    assert np.all(d[2][:3] == 0)
