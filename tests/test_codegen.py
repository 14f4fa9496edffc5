"""``d.code``: plain framework code that computes the same derivatives.

Each test executes the code in a namespace holding only ``model`` and ``x`` and checks that
the variables ``d1 .. dK`` it leaves, reshaped to ``d[k].shape``, reproduce ``d[k]`` to 1e-6
relative (to the largest value of that order). The code computes with plain nested
autodiff, a different route from most of nbderiv's strategies (Taylor mode, forward jvp).
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402

REL = 1e-6


def run_code(d, model, x):
    namespace = {"model": model, "x": x}
    exec(compile(d.code, "<nbderiv equivalent code>", "exec"), namespace)  # noqa: S102
    return namespace


def assert_reproduces(d, model, x):
    ns = run_code(d, model, x)
    for k in range(1, d.order + 1):
        got = np.asarray(ns[f"d{k}"])
        assert isinstance(ns[f"d{k}"], np.ndarray), type(ns[f"d{k}"])
        assert got.size == d[k].size, (k, got.shape, d[k].shape)
        got = got.reshape(d[k].shape)
        scale = max(float(np.abs(d[k]).max()), 1e-30)
        err = float(np.abs(got.astype(np.float64) - d[k]).max())
        assert err <= REL * scale, f"order {k}: max abs diff {err:.3g} vs scale {scale:.3g}"
    assert f"d{d.order + 1}" not in ns
    return ns


def tanh_net(d_in=2, d_out=1, dtype=torch.float32, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), act(), nn.Linear(16, 16), act(),
                         nn.Linear(16, d_out)).to(dtype)


def points(n, d_in, dtype=torch.float32, seed=0):
    return (torch.rand(n, d_in, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_sequential_orders_1_to_3(order, dtype):
    model, x = tanh_net(dtype=dtype), points(12, 2, dtype)
    assert_reproduces(nbderiv.derivatives(model, x, order=order), model, x)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_torch_one_input_taylor_path_and_many_outputs(order):
    model, x = tanh_net(d_in=1, d_out=4, act=nn.Softplus), points(10, 1)
    d = nbderiv.derivatives(model, x, order=order)
    assert_reproduces(d, model, x)


@pytest.mark.parametrize("wrt", [[1], [2, 0]])
def test_torch_wrt(wrt):
    model, x = tanh_net(d_in=3, d_out=2), points(9, 3)
    d = nbderiv.derivatives(model, x, order=3, wrt=wrt)
    assert_reproduces(d, model, x)
    assert f"wrt = {wrt}" in d.code


class XT(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tanh_net(d_in=3, d_out=2)

    def forward(self, x, t):
        return self.net(torch.cat([x, torch.sin(t)], dim=1))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_torch_tuple_inputs(order):
    model = XT()
    x = (points(8, 2), points(8, 1, seed=1))
    assert_reproduces(nbderiv.derivatives(model, x, order=order), model, x)
    d = nbderiv.derivatives(model, x, order=order, wrt=[2])
    assert_reproduces(d, model, x)


def test_torch_1d_numpy_and_integer_inputs():
    model = tanh_net(d_in=1)
    x = np.linspace(-1, 1, 7)
    assert_reproduces(nbderiv.derivatives(model, x, order=3), model, x)
    xi = np.arange(-3, 4)
    assert_reproduces(nbderiv.derivatives(model, xi, order=2), model, xi)


def test_torch_plain_function_and_unused_input():
    x = torch.linspace(0, 2, 6, dtype=torch.float64)
    d = nbderiv.derivatives(lambda z: z ** 3 + 2 * z ** 2 + 1, x, order=3)
    ns = assert_reproduces(d, lambda z: z ** 3 + 2 * z ** 2 + 1, x)
    np.testing.assert_allclose(ns["d2"].reshape(-1), 6 * x.numpy() + 4)  # closed form

    class IgnoresT(nn.Module):
        def forward(self, x, t):
            return torch.tanh(x)

    xt = (points(5, 1), points(5, 1, seed=2))
    d = nbderiv.derivatives(IgnoresT(), xt, order=2)
    assert_reproduces(d, IgnoresT(), xt)


def test_torch_code_is_plain_short_commented_and_leaves_the_model_alone():
    model, x = tanh_net(), points(5, 2)
    d = nbderiv.derivatives(model, x, order=2)
    code = d.code
    assert "nbderiv" not in code
    assert "torch.autograd.grad" in code and "torch.ones_like" in code
    assert "create_graph=True" in code
    assert code.count("#") >= 4 and len(code.splitlines()) < 60
    before = [p.detach().clone() for p in model.parameters()]
    run_code(d, model, x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad


# -- Keras --------------------------------------------------------------------------------------
needs_keras = pytest.mark.skipif(importlib.util.find_spec("nbderiv.backends.tensorflow") is None,
                                 reason="Keras backend not available")


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


def keras_mlp(keras, d_in=2, d_out=1, act="tanh", dtype="float32", seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d_in,), dtype=dtype),
                             keras.layers.Dense(16, activation=act, dtype=dtype),
                             keras.layers.Dense(16, activation=act, dtype=dtype),
                             keras.layers.Dense(d_out, dtype=dtype)])


def kpoints(n, d_in, dtype="float32", seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, d_in)).astype(dtype)


@needs_keras
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_sequential_orders_1_to_3(keras, order, dtype):
    model, x = keras_mlp(keras, d_out=2, dtype=dtype), kpoints(10, 2, dtype)
    d = nbderiv.derivatives(model, x, order=order)
    assert d.framework == "tensorflow"
    assert_reproduces(d, model, x)


@needs_keras
def test_keras_wrt_1d_integer_and_tensor_inputs(keras):
    import tensorflow as tf

    model = keras_mlp(keras, d_in=3, d_out=2, act="softplus")
    x = kpoints(7, 3)
    d = nbderiv.derivatives(model, x, order=3, wrt=[2, 0])
    assert_reproduces(d, model, x)
    one = keras_mlp(keras, d_in=1)
    for xin in (np.linspace(-1, 1, 6), np.arange(1, 7), tf.constant(kpoints(5, 1))):
        assert_reproduces(nbderiv.derivatives(one, xin, order=2), one, xin)


@needs_keras
def test_keras_two_inputs_and_plain_tf_function(keras):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    xi, ti = keras.Input((2,), name="x"), keras.Input((1,), name="t")
    h = keras.layers.Dense(16, activation="tanh")(keras.layers.Concatenate()([xi, ti]))
    model = keras.Model([xi, ti], keras.layers.Dense(2)(h))
    x = (kpoints(6, 2), kpoints(6, 1, seed=1))
    for order in (1, 2, 3):
        assert_reproduces(nbderiv.derivatives(model, x, order=order), model, x)
    f = lambda z: z ** 3 + 2 * z ** 2 + 1  # noqa: E731
    xs = tf.constant(np.linspace(0, 2, 5))
    d = nbderiv.derivatives(f, xs, order=2)
    ns = assert_reproduces(d, f, xs)
    np.testing.assert_allclose(ns["d2"].reshape(-1), 6 * xs.numpy() + 4, rtol=1e-6)


@needs_keras
def test_keras_code_is_plain_gradient_tape(keras):
    model, x = keras_mlp(keras), kpoints(5, 2)
    code = nbderiv.derivatives(model, x, order=2).code
    assert "nbderiv" not in code and "GradientTape" in code and "import torch" not in code
    assert code.count("#") >= 4 and len(code.splitlines()) < 70


@pytest.mark.parametrize("order", [1, 2])
def test_torch_code_for_models_whose_derivatives_stop_depending_on_x(order):
    """A linear function (its first derivative is constant) and a frozen linear layer: the
    plain code must give zeros where the graph ends, as nbderiv does, not crash."""
    frozen = torch.nn.Linear(2, 1).double().requires_grad_(False)
    for model in (lambda z: 3 * z, frozen):
        x = torch.randn(5, 2, dtype=torch.float64)
        d = nbderiv.derivatives(model, x, order=order)
        namespace = {"model": model, "x": x}
        exec(d.code, namespace)  # noqa: S102
        for k in range(1, order + 1):
            np.testing.assert_allclose(np.asarray(namespace[f"d{k}"]).reshape(d[k].shape), d[k],
                                       rtol=1e-6, atol=1e-12)


# -- points of any shape, outputs of any shape, kernels nested autograd needs (issue 17) ----
def _image_cnn(d_out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, d_out)).eval()


@pytest.mark.parametrize("order, wrt", [(1, None), (2, [0, 5, 191]), (1, [7, 64])])
def test_torch_code_for_images_has_the_layout_of_d(order, wrt):
    """(N, C, H, W) images: the code keeps X's shape, so d1 is (N, d_out, C, H, W) as d[1]
    (it used to reshape to (N, d_out, C) and fail); wrt indexes the flattened image."""
    model, x = _image_cnn(), torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(model, x, order=order, wrt=wrt)
    ns = assert_reproduces(d, model, x)
    assert ns[f"d{order}"].shape == d[order].shape


def test_torch_code_for_sequence_maps_and_attention_at_order_2():
    """A TransformerEncoder returning (N, T, F): each point's output axes O = (T, F) are kept,
    and the code runs under the math attention kernel (the fused one has no second
    derivative: the code used to fail there)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                           batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    d = nbderiv.derivatives(enc, x, order=2, wrt=[0, 9])
    assert "sdpa_kernel([SDPBackend.MATH])" in d.code
    ns = assert_reproduces(d, enc, x)
    assert ns["d2"].shape == d[2].shape == (4, 3, 8, 2, 2)
    assert "sdpa_kernel" not in nbderiv.derivatives(enc, x, order=1).code


def test_torch_code_for_two_arguments_of_several_axes():
    torch.manual_seed(0)
    lin = nn.Linear(6 + 2, 2)
    model = lambda img, t: torch.tanh(lin(torch.cat([img.flatten(1), t], 1)))  # noqa: E731
    x = (torch.randn(5, 2, 3), torch.randn(5, 2))
    d = nbderiv.derivatives(model, x, order=2)
    assert_reproduces(d, model, x)


@needs_keras
@pytest.mark.parametrize("order, wrt", [(1, None), (2, [0, 5, 191])])
def test_keras_code_for_channels_last_images(keras, order, wrt):
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="tanh"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    x = np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")
    d = nbderiv.derivatives(cnn, x, order=order, wrt=wrt)
    ns = assert_reproduces(d, cnn, x)
    assert ns[f"d{order}"].shape == d[order].shape


@needs_keras
def test_keras_code_with_layer_normalization_at_order_2(keras):
    """LayerNormalization's variance comes from tf.nn.moments, which stops the gradient through
    the mean: plain nested tapes give a wrong d2 (off by half its size here). The code replaces
    Keras' helper by the plain formula while it differentiates, and puts it back; d[2] itself
    agrees with float64 central differences of the model."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.LayerNormalization(),
                              keras.layers.Dense(1)])
    x = np.random.default_rng(0).random((4, 3)).astype("float32")
    d = nbderiv.derivatives(model, x, order=2)
    assert "plain_moments" in d.code
    import keras.src.backend.tensorflow.nn as keras_tf_nn

    before = keras_tf_nn._compute_moments
    assert_reproduces(d, model, x)
    assert keras_tf_nn._compute_moments is before
    h = 1e-3  # float64 differences of the float32 model: second differences along axis 0
    x64 = x.astype(np.float64)
    e = np.zeros(3)
    e[0] = h
    f = lambda z: np.asarray(model(z.astype("float32")), dtype=np.float64)[:, 0]  # noqa: E731
    fd = (f(x64 + e) - 2 * f(x64) + f(x64 - e)) / h ** 2
    np.testing.assert_allclose(d[2][:, 0, 0, 0], fd, rtol=0.05, atol=0.05 * np.abs(fd).max())
    assert "plain_moments" not in nbderiv.derivatives(model, x, order=1).code


# -- norm layers at order >= 3 --------------------------------------------------------------------
# PyTorch's fused layer norm and instance norm kernels give wrong third derivatives (torch 2.13);
# group norm and batch norm with running statistics do not. The code swaps the first two for the
# plain formula; the truth is float64 vmap(jacrev) of the same network with its norm written out.
def _normalized(h, dims, eps=1e-5):
    mean = h.mean(dims, keepdim=True)
    return (h - mean) / torch.sqrt(((h - mean) ** 2).mean(dims, keepdim=True) + eps)


def _jacrev_truth(f, x, order):
    from torch.func import jacrev, vmap

    g = f
    for _ in range(order):
        g = jacrev(g)
    return vmap(g)(x).detach().numpy()


def _assert_code_matches_truth(d, model, x, truth_of_order):
    F = torch.nn.functional
    fused = F.layer_norm, F.instance_norm
    ns = run_code(d, model, x)
    assert (F.layer_norm, F.instance_norm) == fused  # PyTorch's own put back
    for k in range(1, d.order + 1):
        truth = truth_of_order(k)
        scale = float(np.abs(truth).max())
        assert scale > 0
        for name, got in (("d.code", ns[f"d{k}"]), ("d", d[k])):
            err = float(np.abs(got.reshape(truth.shape) - truth).max())
            assert err <= 1e-9 * scale, f"{name} order {k}: {err:.3g} off, scale {scale:.3g}"


@pytest.mark.parametrize("order", [3, 4])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_torch_code_with_layer_norm_at_orders_3_and_4(act, order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), act(), nn.LayerNorm(8), nn.Linear(8, 1)).double().eval()
    with torch.no_grad():  # a weight and bias of the norm's own, not the defaults 1 and 0
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lin1, norm, lin2 = model[0], model[2], model[3]

    def written_out(p):
        h = _normalized(act()(lin1(p)), -1) * norm.weight + norm.bias
        return lin2(h)

    d = nbderiv.derivatives(model, x, order=order)
    assert "plain_layer_norm" in d.code and "instance_norm" not in d.code
    _assert_code_matches_truth(d, model, x, lambda k: _jacrev_truth(written_out, x, k))


class _NormedChannels(nn.Module):
    """Linear -> tanh -> (2 channels x 3 steps) -> norm -> Linear, for per-point norms."""

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm, self.b = nn.Linear(2, 6), norm, nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x)).reshape(-1, 2, 3)
        return self.b(self.norm(h).flatten(1))


def _instance_norm():
    norm = nn.InstanceNorm1d(2, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.7, 1.3]))
        norm.bias.copy_(torch.tensor([0.2, -0.4]))
    return norm


def _with_running_stats(norm):
    norm.running_mean.copy_(torch.tensor([0.1, -0.2]))
    norm.running_var.copy_(torch.tensor([0.5, 2.0]))
    return norm


NORMS = {  # name: (norm layer, the code swaps it?, the norm written out on (N, 2, 3))
    "instance": (_instance_norm, True,
                 lambda n, h: _normalized(h, -1) * n.weight[:, None] + n.bias[:, None]),
    "instance-no-affine": (lambda: nn.InstanceNorm1d(2), True, lambda n, h: _normalized(h, -1)),
    "instance-running-stats": (  # eval with running statistics: an affine map, nothing swapped
        lambda: _with_running_stats(nn.InstanceNorm1d(2, track_running_stats=True)), True,
        lambda n, h: (h - n.running_mean[:, None]) / torch.sqrt(n.running_var[:, None] + 1e-5)),
    "group": (lambda: nn.GroupNorm(1, 2), False, lambda n, h: _normalized(h, (-2, -1))),
    "batch-eval": (lambda: _with_running_stats(nn.BatchNorm1d(2)), False,
                   lambda n, h: (h - n.running_mean[:, None])
                   / torch.sqrt(n.running_var[:, None] + 1e-5)),
}


@pytest.mark.parametrize("order", [3, 4])
@pytest.mark.parametrize("kind", list(NORMS))
def test_torch_code_with_instance_group_and_batch_norm_at_orders_3_and_4(kind, order):
    make, swapped, written = NORMS[kind]
    model = _NormedChannels(make()).double().eval()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def written_out(p):
        h = torch.tanh(model.a(p)).reshape(2, 3)
        return model.b(written(model.norm, h).flatten())

    d = nbderiv.derivatives(model, x, order=order)
    assert ("plain_instance_norm" in d.code) == swapped
    assert "plain_layer_norm" not in d.code
    _assert_code_matches_truth(d, model, x, lambda k: _jacrev_truth(written_out, x, k))


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(3), _instance_norm])
def test_torch_code_with_norms_at_orders_1_and_2_is_the_plain_code(norm, order):
    """Up to d2 the fused kernels are right: the code is the one of a model without norms."""
    model = _NormedChannels(norm()).double().eval()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = nbderiv.derivatives(model, x, order=order)
    assert d.code == nbderiv.derivatives(tanh_net(dtype=torch.float64), x, order=order).code
    n = model.norm

    def written_out(p):
        h = _normalized(torch.tanh(model.a(p)).reshape(2, 3), -1)
        if n.weight is not None:
            h = h * (n.weight if isinstance(n, nn.LayerNorm) else n.weight[:, None]) + (
                n.bias if isinstance(n, nn.LayerNorm) else n.bias[:, None])
        return model.b(h.flatten())

    _assert_code_matches_truth(d, model, x, lambda k: _jacrev_truth(written_out, x, k))


def test_torch_code_for_a_transformer_at_order_3_swaps_layer_norm_under_the_math_kernel():
    """Both needs at once: the math attention kernel and the plain layer norm. The truth:
    float64 central differences of d2 (which the fused kernels give right) along each input."""
    from torch.func import jacrev, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0,
                                                           batch_first=True), 1,
                                enable_nested_tensor=False)
    # two inputs made into a sequence of 2 steps of 4 features, one output: few partials
    model = nn.Sequential(nn.Linear(2, 8), nn.Unflatten(1, (2, 4)), enc, nn.Flatten(),
                          nn.Linear(8, 1)).double().eval()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = nbderiv.derivatives(model, x, order=3)
    assert "sdpa_kernel([SDPBackend.MATH])" in d.code and "plain_layer_norm" in d.code
    ns = run_code(d, model, x)
    hessian = vmap(jacrev(jacrev(lambda p: model(p[None])[0])))
    h = 1e-4
    with sdpa_kernel([SDPBackend.MATH]):
        for i in range(2):
            step = torch.zeros(2, dtype=torch.float64)
            step[i] = h
            truth = ((hessian(x + step) - hessian(x - step)) / (2 * h)).detach().numpy()
            scale = float(np.abs(truth).max())
            assert scale > 0.1
            for name, got in (("d.code", ns["d3"]), ("d", d[3])):
                err = float(np.abs(got[..., i] - truth).max())
                assert err <= 1e-6 * scale, f"{name}: {err:.3g} off, scale {scale:.3g}"


@needs_keras
def test_the_caution_for_a_coupled_model_gives_its_frameworks_remedy(keras):
    """Keras models have no .eval(): their caution says training=False instead."""
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).train()
    code = nbderiv.derivatives(net, torch.rand(6, 2)).code
    assert "CAUTION" in code and "model.eval()" in code
    import tensorflow as tf

    class Forced(keras.Model):  # batch statistics always: points coupled
        def __init__(self):
            super().__init__()
            self.d1, self.bn, self.d2 = (keras.layers.Dense(4), keras.layers.BatchNormalization(),
                                         keras.layers.Dense(1))

        def call(self, x):
            return self.d2(tf.tanh(self.bn(self.d1(x), training=True)))

    model = Forced()
    x = np.random.default_rng(0).random((6, 2)).astype("float32")
    model(x)
    d = nbderiv.derivatives(model, x)
    assert "coupled-samples" in d.codes
    assert "training=False" in d.code and ".eval()" not in d.code


@pytest.mark.parametrize("target", [np.array([1, 3, 0, 9]), 7])
def test_code_of_a_call_with_a_target_selects_it(target):
    # the README's saliency case: d.code's d1 was (N, 10, C, H, W), all outputs, not d[1]'s
    # (N, 1, C, H, W); with target defined too, the code picks each point's output first
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(144, 10)).eval()
    images = torch.rand(4, 3, 8, 8)
    d = nbderiv.derivatives(cnn, images, order=2, target=target)
    assert d[1].shape == (4, 1, 3, 8, 8)
    assert "NOTE" not in d.code
    ns = {"model": cnn, "x": images, "target": target}
    exec(compile(d.code, "<nbderiv equivalent code>", "exec"), ns)  # noqa: S102
    np.testing.assert_allclose(ns["d1"], d[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ns["d2"], d[2], rtol=1e-5, atol=1e-6)
    labels = np.broadcast_to(target, (4,))
    cnn64 = copy.deepcopy(cnn).double()
    every = torch.func.vmap(torch.func.jacrev(lambda p: cnn64(p[None])[0]))(images.double())
    truth = every[torch.arange(4), torch.as_tensor(labels)]
    np.testing.assert_allclose(d[1][:, 0], truth.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_tensorflow_code_of_a_call_with_a_target_selects_it():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(5)])
    x = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    for target in (np.array([0, 1, 2, 3, 4, 0]), 2):
        d = nbderiv.derivatives(model, x, order=2, target=target)
        ns = {"model": model, "x": x, "target": target}
        exec(compile(d.code, "<nbderiv equivalent code>", "exec"), ns)  # noqa: S102
        assert ns["d1"].shape == d[1].shape == (6, 1, 4)
        np.testing.assert_allclose(ns["d1"], d[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ns["d2"], d[2], rtol=1e-5, atol=1e-6)
        X = tf.constant(x, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(X)
            h = tf.tanh(X @ tf.cast(model.layers[0].kernel, tf.float64)
                        + tf.cast(model.layers[0].bias, tf.float64))
            y = h @ tf.cast(model.layers[1].kernel, tf.float64)
            picked = tf.gather(y, np.broadcast_to(target, (6,)), batch_dims=1)
        np.testing.assert_allclose(d[1][:, 0], tape.gradient(picked, X).numpy(), rtol=1e-4,
                                   atol=1e-6)


def test_code_with_wrt_differentiates_only_those_inputs():
    # the code took every partial over all 192 features and sliced at the end: order 3 of a
    # small CNN with wrt=[0, 1] did not finish in a minute; now len(wrt) ** k columns per level
    import time

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.randn(8, 3, 8, 8)
    d = nbderiv.derivatives(cnn, x, order=3, wrt=[0, 1, 70])
    start = time.perf_counter()
    assert_reproduces(d, cnn, x)
    assert time.perf_counter() - start < 30
    assert d[3].shape == (8, 3, 3, 3, 3)


def test_tensorflow_code_with_wrt_on_sequences():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.GRU(5),
                              keras.layers.Dense(2)])
    x = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
    d = nbderiv.derivatives(model, x, order=2, wrt=[11, 0])
    ns = run_code(d, model, x)
    for k in (1, 2):
        np.testing.assert_allclose(ns[f"d{k}"], d[k], rtol=1e-4, atol=1e-6)


# -- norms and attention called as functions (no module to tell) --------------------------------
_LN_BOUND = torch.nn.functional.layer_norm  # `from torch.nn.functional import layer_norm`


class _FunctionalNorm(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.spelling = nn.Linear(2, 8), nn.Linear(8, 1), spelling

    def forward(self, x):
        h = self.a(x)
        if self.spelling == "F.layer_norm":
            h = torch.nn.functional.layer_norm(h, (8,))
        elif self.spelling == "torch.layer_norm":
            h = torch.layer_norm(h, (8,))
        elif self.spelling == "imported":
            h = _LN_BOUND(h, (8,))
        else:
            h = torch.native_layer_norm(h, (8,), None, None, 1e-5)[0]
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("spelling", ["F.layer_norm", "torch.layer_norm", "imported",
                                      "native_layer_norm"])
def test_torch_code_with_a_functional_layer_norm_at_order_3(spelling):
    """The fused kernel's third derivative is wrong however it is called: d.code runs the plain
    formula for every spelling (it swapped only for an nn.LayerNorm module, and then only
    F.layer_norm: a torch.layer_norm call kept the fused kernel)."""
    model = _FunctionalNorm(spelling).double()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = nbderiv.derivatives(model, x, order=3)
    assert "PlainNorms" in d.code

    def written_out(p):
        return model.b(torch.tanh(_normalized(model.a(p), -1)))

    _assert_code_matches_truth(d, model, x, lambda k: _jacrev_truth(written_out, x, k))


def test_torch_code_with_functional_attention_at_order_2_runs_the_math_kernel():
    from torch.func import hessian, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 1)

        def forward(self, x):
            q, k, v = self.qkv(x).split(4, -1)
            h = torch.nn.functional.scaled_dot_product_attention(
                q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
            return self.out(h.mean(1))

    model = Attn().eval()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4))
    d = nbderiv.derivatives(model, x, order=2)
    assert "sdpa_kernel([SDPBackend.MATH])" in d.code
    ns = run_code(d, model, x)  # raised: no double backward for the fused CPU kernel
    m64 = copy.deepcopy(model).double()
    with sdpa_kernel([SDPBackend.MATH]):
        truth = vmap(hessian(lambda p: m64(p[None])[0]))(x.double()).detach().numpy()
    np.testing.assert_allclose(ns["d2"], truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d[2], truth, rtol=1e-4, atol=1e-6)
