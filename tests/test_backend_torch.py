"""The PyTorch backend, checked against independent references.

Every derivative is compared with nested ``torch.func`` (vmap of jacrev / jacfwd /
hessian) and, for orders 1 and 2, with float64 central finite differences computed here.
The cases are chosen so that each internal strategy runs: forward Taylor mode
(``nn.Sequential`` of Linear + elementwise activations, one input direction, order >= 2),
nested reverse mode (several inputs, custom modules) and nested forward mode (more outputs
than differentiated inputs). Then: nothing the user owns is changed by a call.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from checks import assert_close

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import hessian, jacfwd, jacrev, vmap  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.call import Verdict  # noqa: E402


def one_point(model):
    return lambda x: model(x.unsqueeze(0)).reshape(-1)


# -- a float64 tanh MLP: orders 1..4 against torch.func and finite differences ----------------
@pytest.fixture(scope="module")
def tanh_mlp():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                        nn.Linear(24, 3)).double()
    X = torch.rand(40, 2, dtype=torch.float64) * 2 - 1
    return net, X


def test_mlp_orders_1_and_2_match_torch_func_to_1e10(tanh_mlp):
    net, X = tanh_mlp
    d = nbderiv.derivatives(net, X, order=2)
    assert d[1].dtype == np.float64 and d[2].dtype == np.float64
    ref1 = vmap(jacrev(one_point(net)))(X).detach().numpy()
    ref2 = vmap(hessian(one_point(net)))(X).detach().numpy()
    assert_close(d[1], ref1, 1e-10, "d[1] vs vmap(jacrev)")
    assert_close(d[2], ref2, 1e-10, "d[2] vs vmap(hessian)")
    with torch.no_grad():
        assert_close(d.y, net(X).numpy(), 1e-12, "y")


def test_mlp_orders_1_and_2_match_central_differences(tanh_mlp, central_fd, as_numpy_fn):
    net, X = tanh_mlp
    d = nbderiv.derivatives(net, X, order=2)
    f = as_numpy_fn(net)
    assert_close(d[1], central_fd(f, X.numpy(), 1), 1e-6, "d[1] vs central differences")
    assert_close(d[2], central_fd(f, X.numpy(), 2), 1e-6, "d[2] vs central differences")


def test_mlp_orders_3_and_4_match_nested_forward_over_reverse(tanh_mlp):
    net, X = tanh_mlp
    X = X[:12]
    d = nbderiv.derivatives(net, X, order=4)
    f = one_point(net)
    ref3 = vmap(jacfwd(jacfwd(jacrev(f))))(X).detach().numpy()
    ref4 = vmap(jacfwd(jacfwd(jacfwd(jacrev(f)))))(X).detach().numpy()
    assert d[3].shape == (12, 3, 2, 2, 2) and d[4].shape == (12, 3, 2, 2, 2, 2)
    assert_close(d[3], ref3, 1e-10, "d[3]")
    assert_close(d[4], ref4, 1e-9, "d[4]")


# -- Taylor path: nn.Sequential, d_in = 1, order >= 2, every supported activation -------------
ACTIVATIONS = {
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "Softplus": nn.Softplus,
    "Softplus-beta2-threshold1": lambda: nn.Softplus(beta=2.0, threshold=1.0),
    "SiLU": nn.SiLU,
    "GELU": nn.GELU,
    "GELU-tanh": lambda: nn.GELU(approximate="tanh"),
    "ELU": nn.ELU,
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
}


@pytest.mark.parametrize("act", list(ACTIVATIONS), ids=list(ACTIVATIONS))
def test_sequential_one_input_orders_1_to_4_per_activation(act, torch_mlp, func_reference):
    net = torch_mlp([1, 12, 12, 2], ACTIVATIONS[act], seed=3)
    # points away from 0 so that ELU / ReLU / LeakyReLU kinks are not hit exactly
    X = torch.linspace(-1.5, 1.5, 17, dtype=torch.float64).reshape(-1, 1) + 0.0123
    d = nbderiv.derivatives(net, X, order=4)
    for k in range(1, 5):
        ref = func_reference(net, X, k)
        assert_close(d[k], ref, 1e-10, f"{act} d[{k}]")


def test_sequential_one_input_nested_sequential_and_identity(func_reference):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Sequential(nn.Linear(1, 10), nn.Tanh()), nn.Identity(),
                        nn.Sequential(nn.Linear(10, 10), nn.Sigmoid(), nn.Linear(10, 1))).double()
    X = torch.linspace(-1, 1, 9, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(net, X, order=3)
    for k in range(1, 4):
        assert_close(d[k], func_reference(net, X, k), 1e-10, f"d[{k}]")


def test_sequential_with_eval_dropout_matches_reference(func_reference):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Dropout(0.5), nn.Linear(10, 1)).double()
    net.eval()
    X = torch.linspace(-1, 1, 9, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(net, X, order=3)
    for k in range(1, 4):
        assert_close(d[k], func_reference(net, X, k), 1e-10, f"d[{k}]")


BLOCK_CASES = {  # wide last layers make small cache blocks: several per call
    "linear-last": lambda: nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 600)),
    "linear-no-bias-last": lambda: nn.Sequential(nn.Linear(1, 16), nn.Sigmoid(),
                                                 nn.Linear(16, 600, bias=False)),
    "activation-last": lambda: nn.Sequential(nn.Linear(1, 600), nn.Tanh()),
    "affine-only": lambda: nn.Sequential(nn.Linear(1, 600), nn.Identity()),
}


@pytest.mark.parametrize("build", list(BLOCK_CASES), ids=list(BLOCK_CASES))
def test_many_points_in_cache_blocks_match_reference(build, func_reference):
    """Thousands of points through a wide model run in several blocks, the later ones written
    straight into the result arrays: every row must match, including the last, shorter
    block."""
    torch.manual_seed(8)
    net = BLOCK_CASES[build]().double()
    X = torch.linspace(-2, 2, 2500, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(net, X, order=3)
    assert d.method == "taylor"
    with torch.no_grad():
        assert_close(d.y, net(X).numpy(), 1e-12, f"{build} y")
    g = one_point(net)
    for k in range(1, 4):  # forward mode all the way: one tangent per level for d_in = 1
        g = jacfwd(g)
        assert d[k].shape == (2500, 600) + (1,) * k
        assert_close(d[k], vmap(g)(X).detach().numpy(), 1e-10, f"{build} d[{k}]")


def test_one_direction_of_several_inputs_matches_reference_slice(torch_mlp, func_reference):
    net = torch_mlp([3, 16, 16, 2], seed=6)
    X = torch.rand(10, 3, dtype=torch.float64)
    d = nbderiv.derivatives(net, X, order=3, wrt=[1])
    assert d[3].shape == (10, 2, 1, 1, 1)
    for k in range(1, 4):
        ref = func_reference(net, X, k)[(slice(None), slice(None)) + (slice(1, 2),) * k]
        assert_close(d[k], ref, 1e-10, f"d[{k}] wrt=[1]")


# -- nested reverse path: several inputs, custom modules ---------------------------------------
def test_several_inputs_orders_1_to_3(torch_mlp, func_reference, central_fd, as_numpy_fn):
    net = torch_mlp([3, 16, 16, 1], nn.SiLU, seed=7)
    X = torch.rand(15, 3, dtype=torch.float64) - 0.5
    d = nbderiv.derivatives(net, X, order=3)
    for k in range(1, 4):
        assert_close(d[k], func_reference(net, X, k), 1e-10, f"d[{k}]")
    f = as_numpy_fn(net)
    assert_close(d[2], central_fd(f, X.numpy(), 2), 1e-6, "d[2] vs central differences")


class Residual(nn.Module):
    """A custom module (not a plain Sequential): y = W2 tanh(W1 x) + sin(x) * x."""

    def __init__(self, d_in, width, d_out):
        super().__init__()
        self.inner = nn.Linear(d_in, width)
        self.outer = nn.Linear(width, d_out)
        self.skip = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.outer(torch.tanh(self.inner(x))) + self.skip(torch.sin(x) * x)


@pytest.mark.parametrize("d_in", [1, 2])
def test_custom_module_orders_1_to_4(d_in, func_reference):
    torch.manual_seed(8)
    net = Residual(d_in, 12, 2).double()
    X = torch.rand(8, d_in, dtype=torch.float64) * 2 - 1
    d = nbderiv.derivatives(net, X, order=4)
    for k in range(1, 5):
        assert_close(d[k], func_reference(net, X, k, forward=True), 1e-10, f"d[{k}]")


def test_plain_function_closed_form_matches_reference(func_reference):
    def fn(x):
        return torch.exp(x[:, :1]) * torch.cos(x[:, 1:]) + x[:, :1] ** 3 * x[:, 1:]

    X = torch.rand(11, 2, dtype=torch.float64)
    d = nbderiv.derivatives(fn, X, order=3)
    for k in range(1, 4):
        assert_close(d[k], func_reference(fn, X, k), 1e-12, f"d[{k}]")


# -- normalisation layers: torch's fused kernels are wrong from order 3 on --------------------
# pytorch/pytorch#175754 (layer_norm) and #186256 (batch_norm in training mode): the fused
# double backward treats the saved mean / invstd as constants, so a third derivative taken
# through it is silently wrong. The references below are written with primitive ops only.
def layer_norm_by_hand(h, ln):
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_layer_norm_mlp_orders_1_to_4_match_a_primitive_reference(central_fd, as_numpy_fn):
    torch.manual_seed(18)
    net = nn.Sequential(nn.Linear(2, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1)).double()
    net.eval()
    X = torch.rand(6, 2, dtype=torch.float64)

    def by_hand(x):
        return net[3](torch.tanh(layer_norm_by_hand(net[0](x), net[1])))

    with torch.no_grad():
        assert torch.allclose(by_hand(X), net(X), rtol=0, atol=1e-14)
    d = nbderiv.derivatives(net, X, order=4)
    assert_close(d[2], central_fd(as_numpy_fn(net), X.numpy(), 2), 1e-6, "d[2] vs FD")
    f = lambda x: by_hand(x[None])[0]  # noqa: E731
    g = f
    for k in range(1, 5):
        g = jacrev(g)
        assert_close(d[k], vmap(g)(X).detach().numpy(), 1e-9, f"LayerNorm d[{k}]")


def test_train_mode_batch_norm_per_point_blocks_match_a_primitive_reference():
    """A train-mode BatchNorm couples the points; each per-point block d^k y_n / dx_n^k (the
    other points held fixed) must still be the true derivative."""
    torch.manual_seed(19)
    net = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    net.train()
    X = torch.rand(5, 2, dtype=torch.float64)

    def by_hand(full):
        h = net[0](full)
        mu = h.mean(0, keepdim=True)
        var = ((h - mu) ** 2).mean(0, keepdim=True)
        h = (h - mu) / torch.sqrt(var + net[1].eps) * net[1].weight + net[1].bias
        return net[3](torch.tanh(h))

    d = nbderiv.derivatives(net, X, order=3)
    for k in range(1, 4):
        ref = []
        for n in range(5):
            def f(z, n=n):
                return by_hand(torch.cat([X[:n], z[None], X[n + 1:]]))[n]
            g = f
            for _ in range(k):
                g = jacrev(g)
            ref.append(g(X[n]).detach().numpy())
        assert_close(d[k], np.stack(ref), 1e-9, f"train-mode BatchNorm block d[{k}]")


# -- forward-jvp path: many outputs, few inputs -------------------------------------------------
def test_many_outputs_one_input_order_1(torch_mlp, func_reference, central_fd, as_numpy_fn):
    net = torch_mlp([1, 50, 50, 50, 501], seed=9)
    X = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(net, X, order=1)
    assert d.y.shape == (12, 501) and d[1].shape == (12, 501, 1)
    assert_close(d[1], func_reference(net, X, 1), 1e-10, "d[1]")
    assert_close(d[1], central_fd(as_numpy_fn(net), X.numpy(), 1), 1e-6, "d[1] vs FD")


def test_many_outputs_two_inputs_order_2(torch_mlp, func_reference):
    net = torch_mlp([2, 12, 501], seed=10)
    X = torch.rand(4, 2, dtype=torch.float64)
    d = nbderiv.derivatives(net, X, order=2)
    assert d[2].shape == (4, 501, 2, 2)
    assert_close(d[1], func_reference(net, X, 1), 1e-10, "d[1]")
    assert_close(d[2], func_reference(net, X, 2, forward=True), 1e-10, "d[2]")


def test_many_outputs_custom_module_order_3(func_reference):
    torch.manual_seed(11)
    net = Residual(1, 10, 12).double()
    X = torch.rand(5, 1, dtype=torch.float64)
    d = nbderiv.derivatives(net, X, order=3)
    for k in range(1, 4):
        assert_close(d[k], func_reference(net, X, k, forward=True), 1e-10, f"d[{k}]")


def test_the_cases_above_exercise_three_different_strategies(torch_mlp):
    """Guards that the representative cases keep covering different code paths."""
    taylor_like = nbderiv.derivatives(torch_mlp([1, 8, 1]), torch.rand(4, 1).double(), order=2)
    reverse_like = nbderiv.derivatives(Residual(2, 8, 1).double(), torch.rand(4, 2).double(),
                                       order=2)
    forward_like = nbderiv.derivatives(Residual(1, 8, 501).double(), torch.rand(4, 1).double(),
                                       order=1)
    methods = {taylor_like.method, reverse_like.method, forward_like.method}
    assert all(isinstance(m, str) and m for m in methods)
    assert len(methods) == 3, methods


# -- mixed partials with wrt ---------------------------------------------------------------------
@pytest.mark.parametrize("wrt", [[2, 0], [1, 2], [0, 2, 1]])
def test_wrt_mixed_partials_follow_the_given_order(wrt, torch_mlp, func_reference):
    net = torch_mlp([3, 16, 2], nn.Softplus, seed=12)
    X = torch.rand(9, 3, dtype=torch.float64)
    d = nbderiv.derivatives(net, X, order=3, wrt=wrt)
    idx = np.array(wrt)
    for k in range(1, 4):
        full = func_reference(net, X, k)
        ref = full[np.ix_(*([np.arange(9), np.arange(2)] + [idx] * k))]
        assert_close(d[k], ref, 1e-10, f"d[{k}] wrt={wrt}")
    assert d.wrt == tuple(wrt)
    assert d.inputs == tuple(f"x[{i}]" for i in wrt)


# -- dtype and device ------------------------------------------------------------------------------
def test_float32_model_float32_results_close_to_float64_reference(torch_mlp, func_reference):
    net32 = torch_mlp([2, 16, 1], dtype="float32", seed=13)
    net64 = torch_mlp([2, 16, 1], dtype="float64", seed=13)
    X = np.random.default_rng(0).random((10, 2))
    d = nbderiv.derivatives(net32, X, order=2)
    assert d.y.dtype == np.float32 and d[1].dtype == np.float32 and d[2].dtype == np.float32
    X64 = torch.as_tensor(X.astype(np.float32).astype(np.float64))
    assert_close(d[1], func_reference(net64, X64, 1), 1e-5, "float32 d[1]")
    assert_close(d[2], func_reference(net64, X64, 2), 1e-4, "float32 d[2]")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_and_input_work_unchanged(torch_mlp, func_reference):
    net = torch_mlp([2, 16, 1], seed=14).cuda()
    X = torch.rand(20, 2, dtype=torch.float64, device="cuda")
    d = nbderiv.derivatives(net, X, order=2)
    assert isinstance(d[2], np.ndarray)
    assert_close(d[2], func_reference(net, X, 2), 1e-10, "cuda d[2]")
    assert next(net.parameters()).device.type == "cuda"


# -- non-mutation ------------------------------------------------------------------------------------
def make_stateful_net(train: bool):
    torch.manual_seed(15)
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(p=0.0),
                        nn.Linear(8, 1))
    with torch.no_grad():  # non-trivial running statistics and a non-zero counter
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].num_batches_tracked.fill_(7)
    net[0].bias.requires_grad_(False)
    net[4].weight.grad = torch.full_like(net[4].weight, 0.25)
    net.train(train)
    if train:
        net[3].eval()  # mixed modes must come back exactly as they were
    return net


def snapshot(model):
    return {
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "params": [(name, p, p.detach().clone(), p.requires_grad,
                    None if p.grad is None else p.grad.detach().clone(), p.dtype, p.device)
                   for name, p in model.named_parameters()],
        "buffers": [(name, b, b.detach().clone(), b.dtype) for name, b in model.named_buffers()],
    }


def assert_same_state(model, before):
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert len(after["params"]) == len(before["params"])
    for (n1, p1, v1, rg1, g1, dt1, dev1), (n0, p0, v0, rg0, g0, dt0, dev0) in zip(
            after["params"], before["params"], strict=True):
        assert n1 == n0 and p1 is p0, f"parameter {n0} was replaced"
        assert torch.equal(v1, v0), f"parameter {n0} changed value"
        assert rg1 == rg0, f"parameter {n0} requires_grad changed"
        assert dt1 == dt0 and dev1 == dev0
        if g0 is None:
            assert g1 is None, f"parameter {n0} got a .grad"
        else:
            assert g1 is not None and torch.equal(g1, g0), f"parameter {n0} .grad changed"
    for (n1, b1, v1, dt1), (n0, b0, v0, dt0) in zip(after["buffers"], before["buffers"],
                                                    strict=True):
        assert n1 == n0 and b1 is b0 and dt1 == dt0
        assert torch.equal(v1, v0), f"buffer {n0} changed"


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
@pytest.mark.parametrize("order,check", [(1, False), (2, True), (3, True), (4, False)])
def test_derivatives_leave_model_and_tensor_input_untouched(train, order, check):
    net = make_stateful_net(train)
    before = snapshot(net)
    x = torch.rand(5, 2, requires_grad=True)
    x.grad = torch.full_like(x, 3.0)
    x_value, x_grad = x.detach().clone(), x.grad.clone()
    grad_mode = torch.is_grad_enabled()
    d = nbderiv.derivatives(net, x, order=order, check=check)
    assert d[order].shape == (5, 1) + (2,) * order
    assert_same_state(net, before)
    assert torch.equal(x.detach(), x_value) and x.requires_grad and x.is_leaf
    assert x.grad is not None and torch.equal(x.grad, x_grad)
    assert torch.is_grad_enabled() == grad_mode


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_derivatives_leave_numpy_input_and_plain_tensor_untouched(train):
    net = make_stateful_net(train)
    before = snapshot(net)
    xn = np.random.default_rng(1).random((5, 2)).astype(np.float32)
    xn_copy = xn.copy()
    nbderiv.derivatives(net, xn, order=2, check=True)
    assert np.array_equal(xn, xn_copy) and xn.dtype == np.float32 and xn.flags.writeable
    xt = torch.rand(5, 2)
    xt_copy = xt.clone()
    nbderiv.derivatives(net, xt, order=2)
    assert torch.equal(xt, xt_copy) and not xt.requires_grad and xt.grad is None
    assert_same_state(net, before)


def test_integer_and_reshaped_inputs_are_not_modified_in_place():
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    xi = np.arange(6)
    xi_copy = xi.copy()
    nbderiv.derivatives(net, xi, order=2)
    assert np.array_equal(xi, xi_copy) and xi.dtype == xi_copy.dtype and xi.shape == (6,)
    xt = torch.linspace(0, 1, 6)
    nbderiv.derivatives(net, xt, order=2)
    assert xt.shape == (6,)


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_full_jacobian_leaves_model_untouched(train):
    net = make_stateful_net(train)
    before = snapshot(net)
    nbderiv.full_jacobian(net, torch.rand(4, 2))
    assert_same_state(net, before)


# -- grad-mode contexts ----------------------------------------------------------------------------
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(context, torch_mlp, func_reference):
    net = torch_mlp([2, 12, 1], seed=16)
    X = torch.rand(7, 2, dtype=torch.float64)
    ref1, ref2 = func_reference(net, X, 1), func_reference(net, X, 2)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        Xc = X.clone()  # an inference tensor under inference_mode
        d = nbderiv.derivatives(net, Xc, order=2)
        d_one = nbderiv.derivatives(torch_mlp([1, 8, 1], seed=17), Xc[:, :1], order=3)
        assert not torch.is_grad_enabled()
        if context == "inference_mode":
            assert torch.is_inference_mode_enabled()
    assert_close(d[1], ref1, 1e-10, "d[1]")
    assert_close(d[2], ref2, 1e-10, "d[2]")
    assert_close(d_one[3], func_reference(torch_mlp([1, 8, 1], seed=17), X[:, :1], 3), 1e-10,
                 "taylor d[3]")


def test_layer_norm_second_derivative_on_the_forward_mode_path():
    """Forward-over-forward through PyTorch's fused layer norm is wrong at order 2 already;
    nbderiv must match a hand-written layer norm differentiated by torch.func."""
    from torch.func import hessian, vmap

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 2, dtype=torch.float64) * 2

    def plain(z):
        h = net[0](z)
        m = h.mean(-1, keepdim=True)
        v = ((h - m) ** 2).mean(-1, keepdim=True)
        h = (h - m) / torch.sqrt(v + net[1].eps) * net[1].weight + net[1].bias
        return net[3](torch.tanh(h))

    d = nbderiv.derivatives(net, x, 2, wrt=[1])  # two outputs, one input: forward mode
    H = vmap(hessian(plain))(x).detach().numpy()
    np.testing.assert_allclose(d[2][:, :, 0, 0], H[:, :, 1, 1], rtol=0, atol=1e-10)


def _probed_and_known(model, x):
    """The verdict of the probe's forward passes and the one read off the structure."""
    from unittest import mock

    from nbderiv import compute

    call = compute.open_call(model, x, None)
    with call.backend.preserved(model):
        with mock.patch.object(call.backend, "known_verdict", return_value=None):
            probed = compute.probe(dataclasses.replace(call))  # forward passes only
        known = call.backend.known_verdict(call)
    return probed, known


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)),
    lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.PReLU(4),
                          nn.Sequential(nn.Linear(4, 6), nn.SiLU()), nn.Flatten(), nn.Linear(6, 1)),
    lambda: nn.Linear(3, 7),
    lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).eval(),
    lambda: nn.Sequential(nn.Tanh(), nn.Identity()),
])
def test_the_structural_verdict_agrees_with_the_probe(build):
    torch.manual_seed(0)
    probed, known = _probed_and_known(build(), torch.rand(12, 3))
    assert known == probed


def test_an_active_dropout_is_known_to_be_random():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Linear(16, 1)).train()
    probed, known = _probed_and_known(model, torch.rand(12, 2))
    assert known == probed == Verdict(1, True, False)


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),  # couples
    lambda: nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1)),   # input width 3 does not fit
    lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(5)),   # nor does this LayerNorm
    lambda: nn.Sequential(nn.Flatten(0), nn.Linear(3, 1)),     # flattens the batch too
    lambda: nn.Sequential(nn.Linear(3, 4), nn.RReLU()),        # random in training
])
def test_no_structural_verdict_where_the_structure_cannot_tell(build):
    from nbderiv import compute

    model = build()
    call = compute.open_call(model, np.random.rand(4, 3).astype("float32"), "torch")
    assert call.backend.known_verdict(call) is None


def test_a_hooked_plain_stack_is_probed():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    from nbderiv import compute

    call = compute.open_call(model, np.zeros((4, 2), "float32"), "torch")
    assert call.backend.known_verdict(call) is None
    x = torch.linspace(-1, 1, 5).reshape(-1, 1).repeat(1, 2)
    d = nbderiv.derivatives(model, x)
    assert_close(d.y, model(x).detach().numpy(), 1e-6)


def test_a_forward_replaced_on_the_instance_is_what_gets_differentiated():
    """A wrapped forward (as some libraries install on the instance) runs instead of the
    class's: here it couples the points, which must be seen, not read off the layer types."""
    torch.manual_seed(1)
    lin = nn.Linear(2, 1)
    original = lin.forward
    lin.forward = lambda x: original(x) - original(x).mean(0)
    net = nn.Sequential(lin, nn.Tanh())
    x = torch.randn(5, 2)
    d = nbderiv.derivatives(net, x)
    assert "coupled-samples" in d.codes
    blocks = torch.autograd.functional.jacobian(net, x)  # (5, 1, 5, 2): per-point diagonal
    truth = torch.stack([blocks[n, :, n, :] for n in range(5)]).numpy()
    assert_close(d[1], truth, 1e-5)


def test_a_linear_whose_weight_was_replaced_by_another_shape():
    lin = nn.Linear(2, 1)
    lin.weight = nn.Parameter(torch.randn(3, 2))
    lin.bias = nn.Parameter(torch.randn(3))
    x = torch.randn(4, 2)
    d = nbderiv.derivatives(nn.Sequential(lin, nn.Tanh()), x)
    assert d.y.shape == (4, 3)
    J = nbderiv.full_jacobian(nn.Sequential(lin, nn.Tanh()), x)
    assert J.shape == (4, 3, 4, 2)
    assert_close(np.stack([J[n, :, n, :] for n in range(4)]), d[1], 1e-5)


def test_a_dropout_that_drops_everything_is_not_random():
    model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(1.0), nn.Linear(4, 1)).train()
    probed, known = _probed_and_known(model, torch.rand(6, 2))
    assert known == probed == Verdict(1, False, False)


def test_kinks_are_found_beyond_the_first_points_and_skipped_without_relu():
    """The kink search looks at 8 points first: it goes on over all points when the model
    calls a ReLU-type function, and stops at once when it calls none."""
    import nbderiv
    from nbderiv.compute import open_call, probe

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU()).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(-0.5)  # kink at x = 0.5
    x = torch.linspace(-1, 0.4, 30, dtype=torch.float64).reshape(-1, 1)
    x[25] = 0.5
    call = open_call(net, x, None)
    probe(call)
    assert call.backend.kink_points(call, call.args) == [25]
    calls = []
    smooth = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh()).double()
    smooth.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    call = open_call(smooth, x, None)
    probe(call)
    calls.clear()
    assert call.backend.kink_points(call, call.args) == []
    assert calls == [8]  # one look at 8 points, no pass over all 30
    assert "at-kink" in nbderiv.derivatives(net, x, order=1).codes


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("fast_path", [True, False])
def test_forward_passes_without_gradients_take_the_derivative_passes_kernels(monkeypatch,
                                                                             fast_path):
    """The probe, the differences and the kink search run the encoder's plain layers, as the
    derivative pass does, not PyTorch's fused encoder kernel (taken when no gradient is
    recorded: other rounding, and ~10 ms of set-up in a first call). The user's fast-path
    setting is put back."""
    from nbderiv import memo

    fused = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a, **k: fused.append(1) or real(*a, **k))
    net = _Encoder().eval()
    x = torch.randn(20, 5, 8, generator=torch.Generator().manual_seed(1))
    assert net(x).shape == (20, 1)
    with torch.no_grad():
        net(x)
    assert fused  # the fused kernel is there to be taken, without gradients
    fused.clear()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        nbderiv.diagnose(net, x, order=1)
        assert not any(f.kink_free for f in memo._REMEMBERED[net][1].values())
        d = nbderiv.derivatives(net, x, order=1)
        assert torch.backends.mha.get_fastpath_enabled() is fast_path
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert not fused
    ref = vmap(jacrev(lambda p: net(p[None])[0]))(x).detach().numpy()
    assert_close(d[1], ref, 1e-5, "encoder d1")


class _ScaledTanh(nn.Tanh):  # LeCun's 1.7159 tanh(2x/3): a Tanh with a forward of its own
    def forward(self, x):
        return 1.7159 * torch.tanh(2.0 / 3.0 * x)


class _Squared(nn.Identity):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("layer", [_ScaledTanh, _Squared])
def test_a_subclassed_layer_with_its_own_forward_is_not_taken_for_its_parent(layer):
    """Taylor mode knows torch's own layers; a subclass that overrides forward computes
    something else (it was differentiated as plain tanh / identity, and the finite-difference
    check then blamed the user's graph)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), layer(), nn.Linear(8, 1)).double()
    x = torch.linspace(-1, 1, 7, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(net, x, order=2)
    one = lambda p: net(p[None])[0]  # noqa: E731
    assert_close(d[1], vmap(jacrev(one))(x).detach().numpy(), 1e-10, "d1")
    assert_close(d[2], vmap(hessian(one))(x).detach().numpy(), 1e-10, "d2")
    assert "graph-broken" not in d.codes


class _InAList(torch.nn.Module):
    """The classic slip: layers kept in a plain list (not nn.ModuleList), so model.eval()
    never reaches them; a Dropout kept in a dict and a Sequential in a tuple too."""

    def __init__(self, where="list"):
        super().__init__()
        torch.manual_seed(0)
        layers = [torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                  torch.nn.Linear(8, 1)]
        self.where = where
        if where == "list":
            self.layers = layers
        elif where == "dict":
            self.layers = dict(enumerate(layers))
        else:  # a Sequential in a tuple: the BatchNorm one level further down
            self.layers = (torch.nn.Sequential(*layers),)

    def forward(self, x):
        layers = self.layers.values() if isinstance(self.layers, dict) else \
            self.layers if self.where == "list" else self.layers[0]
        for layer in layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("where", ["list", "dict", "tuple"])
def test_train_mode_of_a_layer_kept_outside_the_module_tree(where):
    """model.eval() does not reach a BatchNorm kept in a plain list, dict or tuple: train-mode
    names it, says why eval() did not help and gives the ModuleList fix; the statistics are
    put back, and each point's block is the Jacobian of its output with the other points held
    fixed (torch.autograd.functional.jacobian, point by point)."""
    net = _InAList(where).eval()
    bn = next(m for m in (net.layers.values() if where == "dict" else
                          net.layers if where == "list" else net.layers[0])
              if isinstance(m, torch.nn.BatchNorm1d))
    assert bn.training  # eval() did not reach it
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(net, x)
    f = d.finding("train-mode")
    assert f is not None and "BatchNorm1d" in f.message and "plain Python list" in f.message
    assert "ModuleList" in f.fix
    coupled = d.finding("coupled-samples")
    assert coupled is not None and "plain list" in coupled.fix and "BatchNorm" not in coupled.fix
    assert "layers[1]" in coupled.fix or "layers[0].1" in coupled.fix, coupled.fix
    assert [f.code for f in nbderiv.diagnose(net, x)] == ["train-mode", "coupled-samples"]
    assert "plain list" in nbderiv.diagnose(net, x)[1].fix
    assert int(bn.num_batches_tracked) == 0 and bn.running_mean.abs().max() == 0
    for n in range(5):  # the block of point n, the other points held fixed
        def one(z, n=n):
            return net(torch.cat([x[:n], z[None], x[n + 1:]]))[n]
        ref = torch.autograd.functional.jacobian(one, x[n]).numpy()
        np.testing.assert_allclose(d[1][n], ref, rtol=1e-5, atol=1e-6)


def test_layers_in_a_list_in_eval_mode_raise_no_train_mode():
    net = _InAList("list")
    for layer in net.layers:
        layer.eval()
    d = nbderiv.derivatives(net, torch.randn(4, 2))
    assert "train-mode" not in d.codes and "coupled-samples" not in d.codes
    assert [n for n, _ in nbderiv.backends.torch_state.held_outside([net])] == \
        ["layers[0]", "layers[1]", "layers[2]", "layers[3]"]


def test_a_model_whose_layers_are_all_in_a_list_computes_in_their_dtype():
    """No registered parameter: the dtype and device come from the layers in the list (not
    from x, which would feed float64 into float32 weights and blame the input's shape), and
    check=True's float64 copy converts them too."""
    net = _InAList("list")
    for layer in net.layers:
        layer.eval()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d = nbderiv.derivatives(net, x, order=2, check=True)
    assert d[1].dtype == np.float32 and d.check.dtype == "float64" and d.check.passed
    ref = vmap(jacrev(lambda p: net(p[None])[0]))(x.float()).detach().numpy()
    assert_close(d[1], ref, 1e-5, "d1")


class _InstanceNormed(nn.Module):
    def __init__(self, d_out, track=False):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.o = nn.Linear(1, 12), nn.Linear(12, d_out)
        self.n = nn.InstanceNorm1d(4, affine=True, track_running_stats=track)

    def forward(self, x):
        return self.o(torch.tanh(self.n(self.l(x).reshape(-1, 4, 3))).flatten(1))


@pytest.mark.parametrize("d_out, order", [(1, 3), (5, 2)], ids=["reverse order 3",
                                                             "forward-jvp order 2"])
def test_instance_norm_higher_derivatives_are_exact(d_out, order):
    """PyTorch's fused instance_norm has wrong higher derivatives (order 3 reverse, order 2
    forward-over-forward: 12-80% off): nbderiv runs the plain formula, so d[order] matches
    float64 central differences; in training mode without running statistics it behaves as
    in eval mode, so no train-mode finding."""
    m = _InstanceNormed(d_out).double()
    with torch.no_grad():
        m.n.weight.uniform_(0.5, 1.5)
        m.n.bias.uniform_(-0.5, 0.5)
    X = torch.linspace(-2, 2, 7, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(m, X, order=order)
    f = lambda z: m(z).detach().numpy()  # noqa: E731
    h = 1e-3
    fd = {2: (f(X + h) - 2 * f(X) + f(X - h)) / h ** 2,
          3: (f(X + 2 * h) - 2 * f(X + h) + 2 * f(X - h) - f(X - 2 * h)) / (2 * h ** 3)}[order]
    got = d[order].reshape(7, d_out)
    np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-4 * np.abs(fd).max())
    assert "train-mode" not in d.codes, [str(f) for f in d.findings]
    tracked = _InstanceNormed(d_out, track=True).double()  # train mode: running stats move
    assert "train-mode" in nbderiv.derivatives(tracked, X).codes


@pytest.mark.parametrize("batch", [False, True], ids=["looped", "batched last level"])
@pytest.mark.parametrize("wrt", [None, (3, 0, 2)], ids=["every input", "wrt"])
def test_nested_reverse_many_inputs_and_outputs_orders_1_to_3(batch, wrt):
    """nested_reverse with several inputs and outputs (each partial differentiated through
    the graph of the pass that made it, the last level's passes batched or not) against
    nested torch.func in float64, every order up to 3, every distinct partial in place."""
    from nbderiv.backends.base import assemble
    from nbderiv.backends.torch_autodiff import nested_reverse

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(),
                        nn.Linear(16, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    keep = list(range(4)) if wrt is None else list(wrt)
    y, values = nested_reverse(net, x, 3, tuple(keep), batch)
    ders = assemble(values, y, 3, len(keep))
    one = lambda p: net(p[None])[0]  # noqa: E731
    refs = [vmap(jacrev(one))(x), vmap(jacfwd(jacrev(one)))(x),
            vmap(jacfwd(jacfwd(jacrev(one))))(x)]
    for k, (got, ref) in enumerate(zip(ders, refs), start=1):
        ref = ref.detach().numpy()
        for axis in range(2, 2 + k):
            ref = np.take(ref, keep, axis=axis)
        assert_close(got, ref, 1e-10, f"order {k}")


@pytest.mark.parametrize("bad", [10, np.array([3, 3, 3, 3, 10])], ids=["one", "last point"])
def test_a_target_out_of_range_after_a_valid_call_is_refused_as_on_a_fresh_model(bad):
    from nbderiv.errors import OptionError

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    images = torch.rand(5, 3, 8, 8)
    for order in (1, 2):
        nbderiv.derivatives(cnn, images, order=order, target=3)
        with pytest.raises(OptionError, match=r"target 10 is out of range: .* 0\.\.9"):
            nbderiv.derivatives(cnn, images, order=order, target=bad)


def test_forward_mode_is_checked_against_reverse_mode():
    """torch.linalg.det has a wrong forward-over-forward rule (torch 2.13): with more outputs
    than inputs nbderiv would pick forward mode and return a second derivative 3x off. Forward
    mode is compared with reverse mode at a few points first (once per model state): here it
    disagrees, so reverse mode gives d2 = 2 det(B), the closed form, at every point; a model
    whose forward mode is right keeps it."""
    torch.manual_seed(0)
    A, B = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    weights = torch.arange(1, 6, dtype=torch.float64)

    class Det(nn.Module):
        def forward(self, x):
            return torch.linalg.det(A + x[:, :, None] * B)[:, None] * weights

    x = torch.linspace(-1, 1, 4, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(Det(), x, order=2)
    assert d.method == "reverse-ones"
    want = 2 * torch.linalg.det(B).item() * weights.numpy()
    np.testing.assert_allclose(d[2][:, :, 0, 0], np.broadcast_to(want, (4, 5)), rtol=1e-10)
    smooth = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    assert nbderiv.derivatives(lambda z: smooth(z) * 1.0, x, order=2).method == "forward-jvp"


def test_taylor_mode_past_order_20():
    """21! does not fit in int64: the Taylor coefficients are scaled in floating point.
    Truth: the derivatives of each tanh unit by mpmath at 50 digits."""
    mp = pytest.importorskip("mpmath")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 1)).double()
    x = torch.linspace(-1, 1, 3).reshape(-1, 1).double()
    d = nbderiv.derivatives(net, x, order=22)
    assert d.method == "taylor"
    W, b = net[0].weight.detach().numpy().ravel(), net[0].bias.detach().numpy()
    V = net[2].weight.detach().numpy().ravel()
    mp.mp.dps = 50
    for k in (21, 22):
        truth = [float(sum(V[u] * W[u] ** k * mp.diff(mp.tanh, W[u] * float(xi) + b[u], k)
                           for u in range(4))) for xi in x.ravel()]
        np.testing.assert_allclose(d[k].ravel(), truth, rtol=1e-9)


def test_a_training_mode_rrelu_is_named_among_the_train_mode_layers():
    """RReLU draws its negative slopes at random in training mode: named as such (it was
    'no layer in training mode explains it'), and model.eval() is the fix that works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.RReLU(), nn.Linear(16, 1))
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    f = nbderiv.derivatives(model, x, progress=False).finding("train-mode")
    assert "RReLU" in f.message and "no layer in training mode explains" not in f.message
    assert model.training
    d = nbderiv.derivatives(model.eval(), x, progress=False)
    assert d.codes == []
    leaky = nn.Sequential(model[0], model[1], nn.LeakyReLU((1 / 8 + 1 / 3) / 2), model[3])
    J = torch.func.vmap(torch.func.jacrev(lambda z: leaky(z[None])[0]))(x)  # eval: the mean
    np.testing.assert_allclose(d[1], J.detach().numpy(), rtol=1e-5, atol=1e-7)


class _OptionalNorm(nn.Module):
    """BatchNorm and Dropout built, called only when ``use_norm`` (a config switch)."""

    def __init__(self, use_norm):
        super().__init__()
        self.use_norm = use_norm
        self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)
        self.bn, self.drop = nn.BatchNorm1d(8), nn.Dropout(0.5)

    def forward(self, x):
        h = self.a(x)
        if self.use_norm:
            h = self.drop(self.bn(h))
        return self.b(torch.tanh(h))


def test_training_mode_layers_that_forward_never_calls_make_no_train_mode_finding():
    """The finding said dropout makes the derivatives random and batch statistics couple the
    points; the probe saw neither (the layers are not called). Called, they are named."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    unused = _OptionalNorm(use_norm=False)
    d = nbderiv.derivatives(unused, x, progress=False)
    assert d.codes == [] and d.method == "reverse-ones"
    J = torch.func.vmap(torch.func.jacrev(lambda z: unused(z[None])[0]))(x)
    np.testing.assert_allclose(d[1], J.detach().numpy(), rtol=1e-5, atol=1e-7)
    d = nbderiv.derivatives(_OptionalNorm(use_norm=True), x, progress=False)
    f = d.finding("train-mode")
    assert f is not None and "bn (BatchNorm1d)" in f.message and "drop (Dropout)" in f.message
