"""A model that uses the number of points (``x.shape[0]``, ``len(x)``) in its forward pass: each
point's output follows the batch size, not the other points' values. nbderiv says so
(``coupled-samples``, worded for the batch size, no cross-terms claimed) and returns the
derivatives of the batch as given; never a false ``graph-broken`` (its finite differences ran
on batches of other sizes). Found by an exploratory tester."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402

nn = torch.nn


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def _truth(net, x, scale):
    """float64 vmap(jacrev) / vmap(hessian) of each point alone, times the batch's scale."""
    from torch.func import hessian, jacrev, vmap
    net64 = _net(torch.float64)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    x64 = torch.as_tensor(x, dtype=torch.float64)
    one = lambda z: net64(z[None])[0]  # noqa: E731
    return (vmap(jacrev(one))(x64) * scale).detach().numpy(), \
        (vmap(hessian(one))(x64) * scale).detach().numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spelling", ["shape0", "len", "sqrt"])
def test_a_model_scaled_by_the_batch_size_is_said_to_follow_the_batch_size(dtype, spelling):
    net = _net(dtype)
    scale_of = {"shape0": lambda n: 10 / n, "len": lambda n: 10 / n,
                "sqrt": lambda n: n ** -0.5}[spelling]
    model = {"shape0": lambda z: net(z) * 10 / z.shape[0],
             "len": lambda z: net(z) * 10 / len(z),
             "sqrt": lambda z: net(z) / z.shape[0] ** 0.5}[spelling]
    x = torch.randn(24, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
    d = nbderiv.derivatives(model, x, order=2)
    assert d.codes == ["coupled-samples"], [f.message for f in d.findings]
    message = d.finding("coupled-samples").message
    assert "how many points" in message and "24 points" in message
    assert "add up to as much as" not in message  # no cross-terms claimed
    d1, d2 = _truth(net, x, scale_of(24))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert np.abs(d[1] - d1).max() <= tol * max(1.0, np.abs(d1).max())
    assert np.abs(d[2] - d2).max() <= 1e3 * tol * max(1.0, np.abs(d2).max())
    assert [f.code for f in nbderiv.diagnose(model, x)] == ["coupled-samples"]


def test_a_model_mixing_the_points_values_keeps_the_cross_terms_wording():
    net = _net(torch.float64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = nbderiv.derivatives(lambda z: net(z - z.mean(0)), x)
    message = d.finding("coupled-samples").message
    assert "other points' inputs" in message and "how many points" not in message
