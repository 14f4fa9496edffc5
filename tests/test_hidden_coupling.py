"""A forward pass that makes points depend on each other through a step autodiff cannot follow
(``.item()``, ``float(...)``, ``.detach()``): the per-point derivatives miss that part where it
acts, which the findings say (``graph-broken``, at the points where the forward pass
disagrees), never "the true per-point blocks". Found by an exploratory tester."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import checks  # noqa: E402

import nbderiv  # noqa: E402

nn = torch.nn


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def per_point_differences(model, x, h=1e-6):
    """dy_n/dx_n by float64 central differences, every other point held fixed."""
    def f(a):
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()
    return checks.per_point_differences(f, x.numpy(), h)


class ByTheLargest(nn.Module):
    """Inputs scaled by the batch's largest |x|, taken out of the graph with .item()."""

    def __init__(self):
        super().__init__()
        self.net = _base()

    def forward(self, x):
        return self.net(x / x.abs().max().item())


class ByTheFirstValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _base()

    def forward(self, x):
        return self.net(x) * float(x[0, 0])


X = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("model, wrong", [(ByTheLargest(), int(X.abs().argmax()) // 2),
                                          (ByTheFirstValue(), 0)])
def test_a_coupling_through_item_is_a_broken_graph_at_the_point_it_acts(model, wrong):
    d = nbderiv.derivatives(model, X)
    truth = per_point_differences(model, X)
    off = np.flatnonzero(np.abs(d[1] - truth).max(axis=(1, 2)) > 1e-6)
    assert off.tolist() == [wrong]  # the one point whose value drives the coupling
    f = d.finding("graph-broken")
    assert f is not None and wrong in f.points
    assert "autodiff sees no such dependence" in f.message
    assert d.finding("coupled-samples") is None  # it never claims the blocks are all true
    keep = [i for i in range(len(X)) if i != wrong]
    np.testing.assert_allclose(d[1][keep], truth[keep], rtol=1e-6, atol=1e-8)


def test_centring_with_a_detached_mean_is_a_broken_graph():
    net = _base()
    d = nbderiv.derivatives(lambda x: net(x - x.mean(0).detach()), X)
    assert "graph-broken" in d.codes and "coupled-samples" not in d.codes


def test_a_coupling_that_is_not_active_at_these_points_is_no_broken_graph():
    """The probe's moves set off a term that is 0 at the given points (a ReLU of the batch's
    largest value above a threshold): autodiff is right here, so no graph-broken."""
    net = _base()
    x = X.clone()
    x[0, 0] = x.max() + 0.01  # point 0 holds the largest value; the probe moves it up
    threshold = float(x.max()) + 0.05

    def model(z):
        return net(z) + torch.relu(z.max() - threshold)

    d = nbderiv.derivatives(model, x)
    np.testing.assert_allclose(d[1], per_point_differences(model, x), rtol=1e-6, atol=1e-8)
    assert "graph-broken" not in d.codes
    assert "coupled-samples" in d.codes


def test_too_many_points_to_compare_says_what_the_blocks_may_miss():
    """At 600 points the comparison with the forward pass (every query a whole batch) is not
    run: the coupling finding then says that autodiff sees none of the coupling."""
    model = ByTheLargest()
    x = torch.randn(600, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = nbderiv.derivatives(model, x)
    f = d.finding("coupled-samples")
    assert f is not None and "Autodiff sees none of that coupling" in f.message
    assert "graph-broken" not in d.codes
