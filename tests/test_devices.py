"""PyTorch models on every device this machine has: the CPU always, CUDA when there is one.

The same checks run on each device, so a CUDA run (see ``benchmarks/gpu_check.sh``) is the
CPU run with tensors on the GPU: every strategy against nested ``torch.func`` computed on
that device, per-point blocks of a coupled model against the full Jacobian, the float64
finite-difference check, ``d.code``, chunking, a million points in bounded device memory,
and nothing the user owns changed (parameters, ``.grad``, ``requires_grad``, buffers,
modes, the input tensor and the device it lives on).
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import jacfwd, jacrev, vmap  # noqa: E402

import nbderiv  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def reference(fn, X, order):
    """d[order] from nested torch.func on X's device: (N, d_out) + (d_in,) * order."""
    g = lambda x: fn(x.unsqueeze(0)).reshape(-1)  # noqa: E731
    for k in range(order):
        g = (jacfwd if k else jacrev)(g)
    return vmap(g)(X).detach().cpu().numpy()


def mlp(sizes, act=nn.Tanh, seed=0, dtype=torch.float64, device="cpu"):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


class Wave(nn.Module):
    """Not a plain stack (nested reverse / forward mode): u(x, t) = net(x, t) * sin(x)."""

    def __init__(self, device, d_out=1):
        super().__init__()
        self.net = mlp([2, 16, 16, d_out], seed=3, device=device)

    def forward(self, x, t):
        return self.net(torch.cat([x, t], dim=1)) * torch.sin(x)


def state_of(model):
    """Everything a call must leave alone, as comparable copies."""
    return ([(n, p.detach().clone(), p.requires_grad,
              None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
            [(n, b.clone()) for n, b in model.named_buffers()],
            [m.training for m in model.modules()])


def assert_same_state(before, after):
    for (n, p, rg, g), (_, p2, rg2, g2) in zip(before[0], after[0], strict=True):
        assert torch.equal(p, p2) and rg == rg2, n
        assert (g is None and g2 is None) or torch.equal(g, g2), n
    for (n, b), (_, b2) in zip(before[1], after[1], strict=True):
        assert torch.equal(b, b2), n
    assert before[2] == after[2]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_plain_stack_every_order_matches_torch_func(device, order):
    net = mlp([1, 32, 32, 1], device=device)
    X = torch.linspace(-2, 2, 64, dtype=torch.float64, device=device)[:, None]
    d = nbderiv.derivatives(net, X, order=order)
    for k in range(1, order + 1):
        assert_close(d[k], reference(net, X, k), 1e-10, f"{device} d[{k}]")
    assert X.device.type == device.type  # the user's tensor stays where it was


@pytest.mark.parametrize("d_out", [1, 5])
def test_custom_module_two_arguments_orders_1_to_3(device, d_out):
    model = Wave(device, d_out)
    X = torch.rand(30, 2, dtype=torch.float64, device=device) * 2 - 1
    d = nbderiv.derivatives(model, (X[:, :1], X[:, 1:]), order=3)
    fn = lambda Z: model(Z[:, :1], Z[:, 1:])  # noqa: E731
    for k in (1, 2, 3):
        assert_close(d[k], reference(fn, X, k), 1e-10, f"{device} d_out={d_out} d[{k}]")
    assert d.inputs == ("x", "t")


def test_float32_model_from_a_numpy_input_and_wrt(device):
    net = mlp([3, 24, 2], seed=5, dtype=torch.float32, device=device)
    x = np.random.default_rng(0).uniform(-1, 1, (50, 3))
    d = nbderiv.derivatives(net, x, order=2, wrt=[2, 0])
    assert d[2].dtype == np.float32 and d[2].shape == (50, 2, 2, 2)
    X = torch.as_tensor(x, dtype=torch.float32, device=device)
    full = reference(net, X, 2)
    assert_close(d[2], full[:, :, [2, 0]][:, :, :, [2, 0]], 1e-4, f"{device} wrt")


def test_chunks_agree_with_one_pass(device):
    net = mlp([2, 16, 1], seed=6, device=device)
    X = torch.rand(103, 2, dtype=torch.float64, device=device)
    one = nbderiv.derivatives(net, X, order=2)
    chunked = nbderiv.derivatives(net, X, order=2, chunk_size=10)
    assert chunked.method.endswith("(chunked)")
    for k in (1, 2):
        np.testing.assert_allclose(chunked[k], one[k], rtol=0, atol=1e-12)


def test_coupled_model_gets_per_point_blocks_and_keeps_its_statistics(device):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    net = net.to(device=device, dtype=torch.float64).train()
    X = torch.rand(6, 2, dtype=torch.float64, device=device)
    before = state_of(net)
    d = nbderiv.derivatives(net, X, order=1)
    assert_same_state(before, state_of(net))
    assert "coupled-samples" in d.codes and d.method == "per-point-blocks"
    J = torch.autograd.functional.jacobian(net, X).cpu().numpy()  # (N, 1, N, 2)
    np.testing.assert_allclose(d[1], np.stack([J[n, :, n, :] for n in range(6)]), atol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_nothing_the_user_owns_changes(device, train):
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.0),
                        nn.Linear(8, 1)).to(device=device, dtype=torch.float64)
    net[0].bias.requires_grad_(False)
    net[4].weight.grad = torch.full_like(net[4].weight, 0.25)
    net.train(train)
    X = torch.rand(12, 2, dtype=torch.float64, device=device)
    X_copy = X.clone()
    before = state_of(net)
    nbderiv.derivatives(net, X, order=2, check=True)
    nbderiv.diagnose(net, X)
    nbderiv.full_jacobian(net, X[:4])
    assert_same_state(before, state_of(net))
    assert torch.equal(X, X_copy) and not X.requires_grad and X.device.type == device.type


def test_finite_difference_check_and_code_on_the_device(device):
    net = mlp([2, 16, 16, 1], seed=9, dtype=torch.float32, device=device)
    X = torch.rand(40, 2, device=device) * 2 - 1
    d = nbderiv.derivatives(net, X, order=2, check=True)
    assert d.check.passed, d.check
    namespace = {"model": net, "x": X}
    exec(compile(d.code, "<d.code>", "exec"), namespace)  # noqa: S102
    for k in (1, 2):
        np.testing.assert_allclose(np.asarray(namespace[f"d{k}"]).reshape(d[k].shape), d[k],
                                   rtol=1e-5, atol=1e-6)


def test_relu_kinks_are_found_on_the_device(device):
    net = mlp([1, 8, 1], act=nn.ReLU, seed=10, device=device)
    d = nbderiv.derivatives(net, torch.linspace(-1, 1, 21, dtype=torch.float64, device=device),
                            order=2)
    assert "piecewise-linear" in d.codes
    assert np.all(d[2] == 0)


def test_full_jacobian_is_block_diagonal(device):
    net = mlp([2, 8, 3], seed=11, device=device)
    X = torch.rand(5, 2, dtype=torch.float64, device=device)
    J = nbderiv.full_jacobian(net, X)
    blocks = nbderiv.derivatives(net, X)[1]
    for n in range(5):
        for m in range(5):
            np.testing.assert_allclose(J[n, :, m, :], blocks[n] if n == m else 0, atol=1e-12)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")
def test_a_million_points_order_2_in_bounded_gpu_memory():
    net = mlp([1, 64, 64, 64, 1], seed=12, dtype=torch.float32, device="cuda")
    X = torch.linspace(-3, 3, 1_000_000, device="cuda")[:, None]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    d = nbderiv.derivatives(net, X, order=2)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 2 * 2**30, f"peak GPU memory {peak / 2**20:.0f} MB"
    sel = torch.arange(0, 1_000_000, 9973, device="cuda")
    net64 = mlp([1, 64, 64, 64, 1], seed=12, device="cuda")
    assert_close(d[2][sel.cpu().numpy()], reference(net64, X[sel].double(), 2), 1e-3, "d[2]")
