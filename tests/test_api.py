"""``nbderiv.derivatives`` and ``nbderiv.full_jacobian`` against closed forms.

Closed forms are written out by hand here; nothing is compared with nbderiv itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.errors import MemoryBudgetError  # noqa: E402


# -- closed forms ---------------------------------------------------------------------------------
def test_cubic_at_two_gives_20_and_16():
    # y = x^3 + 2x^2 + 1: y' = 3x^2 + 4x = 20 at x = 2, y'' = 6x + 4 = 16 (not 12)
    d = nbderiv.derivatives(lambda x: x**3 + 2 * x**2 + 1, torch.tensor([2.0]), order=2)
    assert d.y.shape == (1, 1) and d[1].shape == (1, 1, 1) and d[2].shape == (1, 1, 1, 1)
    assert d.y[0, 0] == pytest.approx(17.0)
    assert d[1][0, 0, 0] == pytest.approx(20.0)
    assert d[2][0, 0, 0, 0] == pytest.approx(16.0)


def test_cubic_orders_3_and_4_on_many_points():
    x = torch.linspace(-3, 3, 25, dtype=torch.float64)
    d = nbderiv.derivatives(lambda x: x**3 + 2 * x**2 + 1, x, order=4)
    xs = x.numpy()
    np.testing.assert_allclose(d[1][:, 0, 0], 3 * xs**2 + 4 * xs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], 6 * xs + 4, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d[3][:, 0, 0, 0, 0], np.full(25, 6.0), rtol=1e-12)
    np.testing.assert_allclose(d[4][:, 0, 0, 0, 0, 0], np.zeros(25), atol=1e-12)


def test_x1_squared_sin_x2_gradient_and_hessian_on_100_points():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(100, 2))

    def y(X):
        return X[:, 0:1] ** 2 * torch.sin(X[:, 1:2])

    d = nbderiv.derivatives(y, torch.as_tensor(X), order=2)
    x1, x2 = X[:, 0], X[:, 1]
    grad = np.stack([2 * x1 * np.sin(x2), x1**2 * np.cos(x2)], axis=-1)
    hess = np.empty((100, 2, 2))
    hess[:, 0, 0] = 2 * np.sin(x2)
    hess[:, 0, 1] = hess[:, 1, 0] = 2 * x1 * np.cos(x2)
    hess[:, 1, 1] = -(x1**2) * np.sin(x2)
    assert d[1].shape == (100, 1, 2) and d[2].shape == (100, 1, 2, 2)
    np.testing.assert_allclose(d.y[:, 0], x1**2 * np.sin(x2), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d[1][:, 0], grad, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(d[2][:, 0], hess, rtol=1e-12, atol=1e-13)


def test_sin_orders_3_and_4_are_minus_cos_and_sin():
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    d = nbderiv.derivatives(torch.sin, x, order=4)
    xs = x.numpy()
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(xs), atol=1e-13)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], -np.sin(xs), atol=1e-13)
    np.testing.assert_allclose(d[3][:, 0, 0, 0, 0], -np.cos(xs), atol=1e-13)
    np.testing.assert_allclose(d[4][:, 0, 0, 0, 0, 0], np.sin(xs), atol=1e-13)


def test_vector_output_closed_form_jacobian():
    # y = (x0 * x1, exp(x0), x1^3): a (N, 2) -> (N, 3) map
    X = np.random.default_rng(1).uniform(-1, 1, (20, 2))

    def f(x):
        return torch.stack([x[:, 0] * x[:, 1], torch.exp(x[:, 0]), x[:, 1] ** 3], dim=1)

    d = nbderiv.derivatives(f, torch.as_tensor(X), order=2)
    x0, x1 = X[:, 0], X[:, 1]
    J = np.zeros((20, 3, 2))
    J[:, 0, 0], J[:, 0, 1] = x1, x0
    J[:, 1, 0] = np.exp(x0)
    J[:, 2, 1] = 3 * x1**2
    H = np.zeros((20, 3, 2, 2))
    H[:, 0, 0, 1] = H[:, 0, 1, 0] = 1.0
    H[:, 1, 0, 0] = np.exp(x0)
    H[:, 2, 1, 1] = 6 * x1
    np.testing.assert_allclose(d[1], J, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d[2], H, rtol=1e-12, atol=1e-14)


def test_output_of_shape_n_is_one_output():
    X = np.random.default_rng(2).uniform(-1, 1, (15, 2))
    d = nbderiv.derivatives(lambda x: x[:, 0] * torch.cos(x[:, 1]), torch.as_tensor(X), order=1)
    assert d.y.shape == (15, 1) and d[1].shape == (15, 1, 2)
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(X[:, 1]), rtol=1e-12)
    np.testing.assert_allclose(d[1][:, 0, 1], -X[:, 0] * np.sin(X[:, 1]), rtol=1e-12, atol=1e-15)


def test_wrt_closed_form_respects_index_order():
    # y = x0 * x1^2 * x2^3
    X = np.random.default_rng(3).uniform(0.5, 1.5, (30, 3))
    x0, x1, x2 = X.T
    d = nbderiv.derivatives(lambda x: x[:, :1] * x[:, 1:2] ** 2 * x[:, 2:] ** 3,
                            torch.as_tensor(X), order=2, wrt=[2, 0])
    assert d[1].shape == (30, 1, 2) and d[2].shape == (30, 1, 2, 2)
    assert d.wrt == (2, 0) and d.inputs == ("x[2]", "x[0]")
    np.testing.assert_allclose(d[1][:, 0, 0], 3 * x0 * x1**2 * x2**2, rtol=1e-12)  # d/dx2
    np.testing.assert_allclose(d[1][:, 0, 1], x1**2 * x2**3, rtol=1e-12)           # d/dx0
    np.testing.assert_allclose(d[2][:, 0, 0, 0], 6 * x0 * x1**2 * x2, rtol=1e-12)  # d2/dx2^2
    np.testing.assert_allclose(d[2][:, 0, 0, 1], 3 * x1**2 * x2**2, rtol=1e-12)    # d2/dx2dx0
    np.testing.assert_allclose(d[2][:, 0, 1, 0], 3 * x1**2 * x2**2, rtol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 1, 1], 0 * x0, atol=1e-14)               # d2/dx0^2
    # d.x still holds every input feature
    assert d.x.shape == (30, 3)
    np.testing.assert_array_equal(d.x, X)


# -- several inputs: forward(x, t) -------------------------------------------------------------------
class SinExp(nn.Module):
    """u(x, t) = sin(x) exp(-t)."""

    def forward(self, x, t):
        return torch.sin(x) * torch.exp(-t)


def test_tuple_input_pinn_closed_form_and_names():
    rng = np.random.default_rng(4)
    x = torch.as_tensor(rng.uniform(-2, 2, 50))
    t = torch.as_tensor(rng.uniform(0, 1, 50))
    d = nbderiv.derivatives(SinExp(), (x, t), order=2)
    assert d.inputs == ("x", "t")
    assert d.x.shape == (50, 2) and d[1].shape == (50, 1, 2) and d[2].shape == (50, 1, 2, 2)
    xs, ts = x.numpy(), t.numpy()
    np.testing.assert_array_equal(d.x, np.stack([xs, ts], axis=1))
    u = np.sin(xs) * np.exp(-ts)
    np.testing.assert_allclose(d.y[:, 0], u, rtol=1e-12)
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(xs) * np.exp(-ts), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d[1][:, 0, 1], -u, rtol=1e-12, atol=1e-15)
    u_xt = d[2][:, 0, 0, 1]
    np.testing.assert_allclose(u_xt, -np.cos(xs) * np.exp(-ts), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d[2][:, 0, 1, 0], u_xt, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], -u, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d[2][:, 0, 1, 1], u, rtol=1e-12, atol=1e-15)


def test_tuple_input_with_plain_function_and_column_arguments():
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.uniform(-1, 1, (20, 1)))
    t = torch.as_tensor(rng.uniform(0, 1, (20, 1)))
    d = nbderiv.derivatives(lambda x, t: torch.sin(x) * torch.exp(-t), (x, t), order=3)
    assert d.inputs == ("x", "t")
    xs, ts = x.numpy()[:, 0], t.numpy()[:, 0]
    # u_xxt = -(-sin x) e^-t = sin x e^-t ; u_xtt = cos x e^-t
    np.testing.assert_allclose(d[3][:, 0, 0, 0, 1], np.sin(xs) * np.exp(-ts), atol=1e-13)
    np.testing.assert_allclose(d[3][:, 0, 0, 1, 1], np.cos(xs) * np.exp(-ts), atol=1e-13)
    np.testing.assert_allclose(d[3][:, 0, 1, 0, 1], np.cos(xs) * np.exp(-ts), atol=1e-13)


def test_tuple_input_wider_argument_names_and_values():
    # u(x, t) = x0^2 * x1 * exp(t) with x of shape (N, 2)
    class Wide(nn.Module):
        def forward(self, x, t):
            return x[:, :1] ** 2 * x[:, 1:] * torch.exp(t)

    rng = np.random.default_rng(6)
    x = torch.as_tensor(rng.uniform(-1, 1, (25, 2)))
    t = torch.as_tensor(rng.uniform(0, 1, 25))
    d = nbderiv.derivatives(Wide(), (x, t), order=2)
    assert d.inputs == ("x[0]", "x[1]", "t")
    assert d.x.shape == (25, 3) and d[2].shape == (25, 1, 3, 3)
    x0, x1, ts = x.numpy()[:, 0], x.numpy()[:, 1], t.numpy()
    e = np.exp(ts)
    np.testing.assert_allclose(d[1][:, 0], np.stack([2 * x0 * x1 * e, x0**2 * e,
                                                     x0**2 * x1 * e], axis=-1),
                               rtol=1e-12, atol=1e-14)
    H = np.array([[2 * x1 * e, 2 * x0 * e, 2 * x0 * x1 * e],
                  [2 * x0 * e, 0 * e, x0**2 * e],
                  [2 * x0 * x1 * e, x0**2 * e, x0**2 * x1 * e]]).transpose(2, 0, 1)
    np.testing.assert_allclose(d[2][:, 0], H, rtol=1e-12, atol=1e-14)
    # wrt picks features across the arguments, in the given order
    dw = nbderiv.derivatives(Wide(), (x, t), order=2, wrt=[2, 0])
    assert dw.inputs == ("t", "x[0]")
    np.testing.assert_allclose(dw[2][:, 0, 0, 1], 2 * x0 * x1 * e, rtol=1e-12, atol=1e-14)


def test_list_is_one_array_not_several_arguments():
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    d = nbderiv.derivatives(net, [[0.1, 0.2], [0.3, 0.4]], order=1)
    assert d.x.shape == (2, 2) and d[1].shape == (2, 1, 2)
    assert d.inputs == ("x[0]", "x[1]")


# -- full_jacobian ----------------------------------------------------------------------------------
def test_full_jacobian_block_diagonal_and_equal_to_torch_jacobian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    X = torch.rand(6, 2, dtype=torch.float64)
    J = nbderiv.full_jacobian(net, X)
    assert isinstance(J, np.ndarray) and J.shape == (6, 3, 6, 2)
    ref = torch.autograd.functional.jacobian(net, X).numpy()
    np.testing.assert_allclose(J, ref, rtol=1e-12, atol=1e-14)
    for n in range(6):
        for m in range(6):
            if m != n:
                assert np.all(J[n, :, m, :] == 0), f"block ({n}, {m}) is not zero"
    # each diagonal block is the per-point Jacobian, here from torch.func
    from torch.func import jacrev, vmap

    per_point = vmap(jacrev(lambda x: net(x[None])[0]))(X).detach().numpy()
    np.testing.assert_allclose(np.stack([J[n, :, n, :] for n in range(6)]), per_point,
                               rtol=1e-12, atol=1e-14)


def test_full_jacobian_closed_form_scalar_function():
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    J = nbderiv.full_jacobian(torch.sin, x)
    assert J.shape == (5, 1, 5, 1)
    np.testing.assert_allclose(J[:, 0, :, 0], np.diag(np.cos(x.numpy())), atol=1e-15)


def test_full_jacobian_memory_guard_names_the_size_and_suggests_derivatives():
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.rand(6000, 1, dtype=torch.float64)  # 6000^2 * 8 bytes = 288 MB > 256 MB default
    with pytest.raises(MemoryBudgetError) as info:
        nbderiv.full_jacobian(net, x)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "6000" in msg
    assert "MB" in msg or "GB" in msg or "bytes" in msg
    assert "derivatives" in msg
    # a settable budget: tiny budget refuses small inputs, a large one lets them through
    with pytest.raises(MemoryBudgetError):
        nbderiv.full_jacobian(net, torch.rand(10, 1, dtype=torch.float64), memory_budget=100)
    J = nbderiv.full_jacobian(net, torch.rand(10, 1, dtype=torch.float64), memory_budget=10_000)
    assert J.shape == (10, 1, 10, 1)


# -- chunking ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunk_case():
    torch.manual_seed(1)
    net1 = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    net2 = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    return net1, torch.rand(50, 1).double(), net2, torch.rand(50, 2).double()


@pytest.mark.parametrize("which", ["one-input", "two-inputs"])
def test_chunk_size_7_equals_unchunked(chunk_case, which):
    net1, x1, net2, x2 = chunk_case
    net, x = (net1, x1) if which == "one-input" else (net2, x2)
    whole = nbderiv.derivatives(net, x, order=3)
    parts = nbderiv.derivatives(net, x, order=3, chunk_size=7, progress=False)
    for k in range(4):
        assert parts[k].shape == whole[k].shape
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-12, atol=1e-14)


def test_every_chunk_has_the_same_number_of_points(chunk_case, monkeypatch):
    """Backends that trace or compile per shape see one shape: chunks are balanced, and the
    last one overlaps the one before instead of being shorter."""
    from nbderiv.backends.torch import TorchBackend

    _, _, net, x = chunk_case
    whole = nbderiv.derivatives(net, x, order=2)
    sizes = []
    original = TorchBackend.derivatives
    monkeypatch.setattr(TorchBackend, "derivatives", lambda self, call, args, *a, **kw: (
        sizes.append(args[0].shape[0]) or original(self, call, args, *a, **kw)))
    given = nbderiv.derivatives(net, x, order=2, chunk_size=7, progress=False)
    assert set(sizes) == {7} and len(sizes) == 8  # 50 points: 0-6, ..., 42-48, 43-49
    sizes.clear()
    budget = nbderiv.derivatives(net, x, order=2, memory_budget=20_000, progress=False)
    assert len(set(sizes)) == 1 and sizes[0] * len(sizes) - 50 < len(sizes), sizes
    for d in (given, budget):
        for k in range(3):
            np.testing.assert_allclose(d[k], whole[k], rtol=1e-12, atol=1e-14)


def test_small_memory_budget_forces_many_chunks_with_equal_results(chunk_case):
    _, _, net, x = chunk_case
    whole = nbderiv.derivatives(net, x, order=2)
    tight = nbderiv.derivatives(net, x, order=2, memory_budget=20_000, progress=False)
    for k in range(3):
        np.testing.assert_allclose(tight[k], whole[k], rtol=1e-12, atol=1e-14)
    # and against the closed-form-free independent reference
    from torch.func import hessian, vmap

    ref = vmap(hessian(lambda z: net(z[None])[0]))(x).detach().numpy()
    np.testing.assert_allclose(tight[2], ref, rtol=1e-10, atol=1e-12)


# -- one million points --------------------------------------------------------------------------------
MILLION = textwrap.dedent("""
    import json, resource, time
    import torch, numpy as np, nbderiv
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                              torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 1))
    x = torch.linspace(-2, 2, 1_000_000).reshape(-1, 1)
    t = time.perf_counter()
    d = nbderiv.derivatives(net, x, order=2, progress=False)
    wall = time.perf_counter() - t
    from torch.func import hessian, jacrev, vmap
    idx = torch.tensor([0, 123_457, 500_000, 999_999])
    f = lambda z: net(z[None])[0]
    r1 = vmap(jacrev(f))(x[idx]).detach().numpy()
    r2 = vmap(hessian(f))(x[idx]).detach().numpy()
    err1 = float(np.abs(d[1][idx.numpy()] - r1).max())
    err2 = float(np.abs(d[2][idx.numpy()] - r2).max())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"shape2": list(d[2].shape), "wall": wall, "rss_kb": usage.ru_maxrss,
                      "cpu": usage.ru_utime + usage.ru_stime, "err1": err1, "err2": err2,
                      "finite": bool(np.isfinite(d[2]).all())}))
""")


@pytest.mark.slow
def test_one_million_points_order_2_bounded_memory():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    out = subprocess.run([sys.executable, "-c", MILLION], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    print(info)
    assert info["shape2"] == [1_000_000, 1, 1, 1]
    assert info["finite"]
    assert info["rss_kb"] < 2 * 1024 * 1024, f"peak RSS {info['rss_kb'] / 1024:.0f} MB >= 2 GB"
    assert info["err1"] < 1e-4 and info["err2"] < 1e-3  # float32 model


def test_derivatives_and_jacobian_agree_with_the_two_separate_calls():
    from nbderiv.api import derivatives_and_jacobian
    from nbderiv.errors import OptionError

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    net = net.double()
    X = torch.rand(6, 2, dtype=torch.float64)
    d, J = derivatives_and_jacobian(net, X, 2, jacobian_budget=1 << 20)
    ref = torch.autograd.functional.jacobian(net, X).numpy()  # (6, 3, 6, 2)
    np.testing.assert_allclose(J, ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d[1], nbderiv.derivatives(net, X)[1], rtol=1e-12)
    d, J = derivatives_and_jacobian(net, X, 1)
    assert J is None
    with pytest.raises(OptionError, match="target"):
        derivatives_and_jacobian(net, X, 1, target=0, jacobian_budget=1 << 20)
