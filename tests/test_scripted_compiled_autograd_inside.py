"""Models that are not plain Python modules, and models that take derivatives themselves:
TorchScript modules and functions (torch.jit.script / trace), torch.compile'd modules and
functions, and a PINN residual that calls torch.autograd.grad in its forward pass. Every
derivative is compared with an independent truth (float64 torch.func on the plain Python
module or function, central differences, a closed form)."""

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402
from nbderiv.backends.torch import BACKEND  # noqa: E402
from nbderiv.errors import ModelTypeError  # noqa: E402

nn = torch.nn
vmap, jacrev, hessian = torch.func.vmap, torch.func.jacrev, torch.func.hessian


def _net(seed=0, d_in=3, d_out=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, d_out)).double().eval()


def _orders_1_and_2_like(model, x, d1, d2):
    """nbderiv's d[1] (order 1) and d[1], d[2] (order 2) of ``model`` equal the truths."""
    for order in (1, 2):
        d = nbderiv.derivatives(model, x, order=order)
        np.testing.assert_allclose(d[1], d1, atol=1e-12)
        if order == 2:
            np.testing.assert_allclose(d[2], d2, atol=1e-12)


def _truth(f, x):
    """(d1, d2) of a function of a batch of points, by float64 torch.func."""
    return (vmap(jacrev(f))(x).detach().numpy(), vmap(hessian(f))(x).detach().numpy())


def _state(net):
    """What nbderiv must leave as it was: values, .grad, requires_grad, training flags."""
    return ([(p.detach().clone(), p.requires_grad,
              None if p.grad is None else p.grad.clone()) for p in net.parameters()],
            [b.detach().clone() for b in net.buffers()],
            [m.training for m in net.modules()])


def _same_state(a, b):
    (pa, ba, ta), (pb, bb, tb) = a, b
    return ta == tb and len(pa) == len(pb) and len(ba) == len(bb) and all(
        torch.equal(v1, v2) and r1 == r2 and ((g1 is None and g2 is None) or (
            g1 is not None and g2 is not None and torch.equal(g1, g2)))
        for (v1, r1, g1), (v2, r2, g2) in zip(pa, pb)) and all(
        torch.equal(u, v) for u, v in zip(ba, bb))


def _touch_state(net):
    """A .grad on the first parameter and requires_grad off on the last, as a user may have."""
    params = list(net.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)
    params[-1].requires_grad_(False)


# -- TorchScript -------------------------------------------------------------------------
def _scripted(kind, net, x):
    if kind == "script":
        return torch.jit.script(net)
    if kind == "trace":
        return torch.jit.trace(net, x)
    scripted = torch.jit.script(net)
    return lambda z: scripted(z)


@pytest.mark.parametrize("kind", ["script", "trace", "lambda around script"])
def test_scripted_and_traced_modules_give_the_python_modules_derivatives(kind):
    net = _net()
    x = torch.randn(6, 3, dtype=torch.float64)
    d1, d2 = _truth(net, x)
    _touch_state(net)
    model = _scripted(kind, net, x)  # shares net's parameters
    before = _state(net)
    _orders_1_and_2_like(model, x, d1, d2)
    assert _same_state(before, _state(net))
    assert not x.requires_grad


def test_a_scripted_module_in_training_mode_is_put_back_and_differentiated_point_by_point():
    """BatchNorm in training mode inside TorchScript: its statistics, updated by every forward
    pass, are put back; the points are coupled, so each point's block is its own (the truth:
    central differences of the Python module, moving one point at a time)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    net = net.double().train()
    x = torch.randn(5, 2, dtype=torch.float64)
    _touch_state(net)
    scripted = torch.jit.script(net)
    before = _state(net)
    d = nbderiv.derivatives(scripted, x, order=1)
    assert _same_state(before, _state(net)) and scripted.training
    assert d.method == "per-point-blocks"
    twin, h = copy.deepcopy(net), 1e-6
    fd = np.zeros((5, 1, 2))
    with torch.no_grad():
        for n in range(5):
            for i in range(2):
                up, down = x.clone(), x.clone()
                up[n, i] += h
                down[n, i] -= h
                fd[n, :, i] = ((twin(up) - twin(down))[n] / (2 * h)).numpy()
    np.testing.assert_allclose(d[1], fd, atol=1e-7)


def test_switching_a_scripted_module_to_training_mode_is_a_new_model_state():
    """A TorchScript module keeps its training flag (and its other attributes) in its C++
    object, not in its __dict__: the remembered facts (here: points not coupled) must not
    outlive the switch to training mode (BatchNorm then couples the points)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    scripted = torch.jit.script(net.double().eval())
    x = torch.randn(5, 2, dtype=torch.float64)
    assert nbderiv.derivatives(scripted, x).method == "reverse-ones"
    scripted.train()
    assert nbderiv.derivatives(scripted, x).method == "per-point-blocks"
    assert BACKEND.state_key(scripted)[0] is not None


def test_order_3_of_scripted_norm_layers_is_refused_with_a_fix_and_allowed_without_them():
    """PyTorch's fused layer-norm kernel gives wrong third derivatives; nbderiv swaps in the
    plain formula for Python modules but cannot inside TorchScript."""
    torch.manual_seed(3)
    with_norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for model in (torch.jit.script(with_norm), torch.jit.trace(with_norm, x)):
        np.testing.assert_allclose(nbderiv.derivatives(model, x, order=2)[2],
                                   _truth(with_norm, x)[1], atol=1e-12)
        with pytest.raises(ModelTypeError, match="layer_norm.*Fix: differentiate the Python"):
            nbderiv.derivatives(model, x, order=3)
    net = _net(d_out=1)
    d = nbderiv.derivatives(torch.jit.script(net), x, order=3)
    np.testing.assert_allclose(d[3], vmap(jacrev(jacrev(jacrev(net))))(x).detach().numpy(),
                               atol=1e-12)


def test_order_3_of_scripted_batch_norm_is_refused_with_batch_statistics_only():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    net = net.double().train()
    x = torch.randn(5, 3, dtype=torch.float64)
    scripted = torch.jit.script(net)
    with pytest.raises(ModelTypeError, match="batch_norm .with the batch's statistics"):
        nbderiv.derivatives(scripted, x, order=3)
    net.eval()
    scripted.eval()  # running statistics: an affine map, right at any order
    d = nbderiv.derivatives(scripted, x, order=3)
    third = vmap(jacrev(jacrev(jacrev(lambda z: net(z[None])[0]))))(x)
    np.testing.assert_allclose(d[3], third.detach().numpy(), atol=1e-12)


def test_the_layers_inside_a_scripted_or_traced_module_are_named_by_their_own_classes():
    """Findings about layers (training mode, activations) see through TorchScript, and a
    traced module's script twin is not counted twice."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 1))
    summary = BACKEND.layer_summary(torch.jit.script(net.train()))
    assert summary["train_mode"] == ["1 (Dropout)"] and summary["activations"] == ["Tanh"]
    x = torch.randn(5, 3)
    assert "train-mode" in [f.code for f in nbderiv.diagnose(torch.jit.script(net), x)]
    traced = torch.jit.trace(net.eval(), x)
    summary = BACKEND.layer_summary(traced)
    assert summary["activations"] == ["Tanh"] and summary["train_mode"] == []


@torch.jit.script
def _scripted_product(x):
    return torch.sin(x[:, :1]) * x[:, 1:]


@torch.jit.script
def _scripted_norm(x):
    return torch.layer_norm(x, [2]).sum(1, keepdim=True) + x[:, :1] ** 3


def test_a_scripted_function_against_its_closed_form_and_its_norms_refused_from_order_3():
    x = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ModelTypeError, match="layer_norm"):
        nbderiv.derivatives(_scripted_norm, x, order=3)
    with pytest.raises(ModelTypeError, match="layer_norm"):
        nbderiv.derivatives(lambda z: _scripted_norm(z), x, order=3)
    d = nbderiv.derivatives(_scripted_product, x, order=2)
    a, b = x[:, 0].numpy(), x[:, 1].numpy()
    np.testing.assert_allclose(d[1][:, 0], np.stack([np.cos(a) * b, np.sin(a)], 1), atol=1e-12)
    hess = np.stack([np.stack([-np.sin(a) * b, np.cos(a)], 1),
                     np.stack([np.cos(a), np.zeros_like(a)], 1)], 1)
    np.testing.assert_allclose(d[2][:, 0], hess, atol=1e-12)


# -- torch.compile -------------------------------------------------------------------------
def _compiled(kind, net):
    if kind == "module":
        return torch.compile(net)
    if kind == "function":
        def f(z):
            return net(z)
        return torch.compile(f)
    if kind == "bound forward":
        return torch.compile(net.forward)
    if kind == "lambda around module":
        compiled = torch.compile(net)
        return lambda z: compiled(z)
    if kind == "compiled submodule":
        class Outer(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.compile(net)

            def forward(self, z):
                return self.body(z)
        return Outer()
    net.compile()  # in place: net itself now runs compiled
    return net


@pytest.mark.parametrize("kind", ["module", "function", "bound forward", "lambda around module",
                                  "compiled submodule", "module.compile()"])
def test_compiled_models_give_the_originals_derivatives(kind):
    net = _net(4)
    x = torch.randn(6, 3, dtype=torch.float64)
    d1, d2 = _truth(copy.deepcopy(net), x)
    _touch_state(net)
    model = _compiled(kind, net)
    before = _state(net)
    _orders_1_and_2_like(model, x, d1, d2)
    assert _same_state(before, _state(net))
    d = nbderiv.derivatives(model, x.numpy(), order=2, check=True)  # framework from the model
    assert d.framework == "torch" and d.check.passed


def test_a_compiled_module_is_its_original_for_the_memo_and_the_structure():
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    compiled = torch.compile(net)
    key = BACKEND.state_key(compiled)[0]
    assert key is not None and key == BACKEND.state_key(net)[0]
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).reshape(-1, 1)
    d = nbderiv.derivatives(compiled, x, order=3)
    assert d.method == "taylor"  # a plain stack, seen through the compiled wrapper
    np.testing.assert_allclose(d[3][:, 0, 0, 0, 0], vmap(jacrev(jacrev(jacrev(
        lambda z: net(z[None])[0, 0]))))(x).detach().numpy()[:, 0, 0, 0], atol=1e-12)


def test_looking_for_compiled_code_imports_no_dynamo():
    """nbderiv tells compiled models by their classes' names and attributes; it never imports
    torch._dynamo for that (torch itself may, e.g. in forward mode)."""
    code = ("import sys, torch, nbderiv\n"
            "from nbderiv.backends.torch_state import compiled_inside\n"
            "from nbderiv.wrapped import uncompiled\n"
            "net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(),\n"
            "                          torch.nn.Linear(4, 1))\n"
            "f = lambda z: net(z)\n"
            "assert nbderiv.derivatives(f, torch.rand(5, 2)).method == 'reverse-ones'\n"
            "assert uncompiled(net) is net and uncompiled(f) is f\n"
            "assert not compiled_inside(f) and not compiled_inside(net)\n"
            "assert 'torch._dynamo' not in sys.modules, 'dynamo imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- a forward pass that takes derivatives itself (PINN residuals) ------------------------------
torch.manual_seed(5)
_U = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def _residual(xt):
    """r = u_t + u * u_x (Burgers without viscosity), the usual way: autograd inside."""
    xt = xt.requires_grad_(True) if not xt.requires_grad else xt
    y = _U(xt)
    g = torch.autograd.grad(y.sum(), xt, create_graph=True)[0]
    return g[:, 1:2] + y * g[:, 0:1]


def _residual_of_point(z):
    """The same residual of one point, written with torch.func (the truth)."""
    def u(w):
        return _U(w[None])[0, 0]
    g = jacrev(u)(z)
    return (g[1] + u(z) * g[0])[None]


def test_a_pinn_residual_with_autograd_inside_against_torch_func():
    x = torch.randn(7, 2, dtype=torch.float64)
    kept_x = x.clone()
    d1, d2 = _truth(_residual_of_point, x)
    before = _state(_U)
    for order in (1, 2):
        d = nbderiv.derivatives(_residual, x, order=order, check=True)
        np.testing.assert_allclose(d.y, vmap(_residual_of_point)(x).detach().numpy(),
                                   atol=1e-12)
        np.testing.assert_allclose(d[1], d1, atol=1e-12)
        if order == 2:
            np.testing.assert_allclose(d[2], d2, atol=1e-12)
        assert d.check.passed
    assert nbderiv.diagnose(_residual, x) == []
    assert not x.requires_grad and torch.equal(x, kept_x)
    assert _same_state(before, _state(_U)) and all(p.grad is None for p in _U.parameters())


def test_a_pinn_residual_of_two_arguments_as_a_module():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = _U

        def forward(self, x, t):
            x.requires_grad_(True)
            t.requires_grad_(True)
            y = self.u(torch.cat([x, t], 1))
            u_x, u_t = torch.autograd.grad(y.sum(), (x, t), create_graph=True)
            return u_t + y * u_x

    xt = torch.randn(6, 2, dtype=torch.float64)
    x, t = xt[:, :1].clone(), xt[:, 1:].clone()
    d1, d2 = _truth(_residual_of_point, xt)
    model = Residual()
    for _ in range(2):  # the second time with what the first call found
        d = nbderiv.derivatives(model, (x, t), order=2)
        np.testing.assert_allclose(d[1], d1, atol=1e-12)
        np.testing.assert_allclose(d[2], d2, atol=1e-12)
    assert d.inputs == ("x", "t")
    assert not x.requires_grad and not t.requires_grad


def test_forward_only_passes_of_ordinary_models_still_run_without_gradients():
    seen = []
    net = _net(6)

    def model(z):
        seen.append(torch.is_grad_enabled())
        return net(z)

    nbderiv.derivatives(model, torch.randn(5, 3, dtype=torch.float64), order=1)
    assert False in seen and True in seen  # the probe without, the derivatives with


def test_a_scripted_cnn_gives_no_warning_from_its_float64_copy():
    # the float64 copy the findings' checks make of a TorchScript module warned "The .grad
    # attribute of a Tensor that is not a leaf Tensor is being accessed" (torch's .to() on
    # the copy), nothing the user did
    import warnings

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 5)).eval()
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = nbderiv.derivatives(torch.jit.script(cnn), x, order=2, wrt=[1, 2])
    assert not [w for w in caught if ".grad attribute" in str(w.message)]
    cnn64 = copy.deepcopy(cnn).double()

    full = x.double().reshape(4, -1)

    def one(p, z):  # a point's output as a function of its two differentiated pixels
        return cnn64(torch.cat([p[:1], z, p[3:]]).reshape(1, 3, 6, 6))[0]
    d2 = vmap(lambda p: hessian(lambda z: one(p, z))(p[1:3]))(full).detach().numpy()
    np.testing.assert_allclose(d[2], d2, atol=1e-5)
