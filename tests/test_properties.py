"""Property-based tests: random small MLPs in both frameworks.

- smooth (tanh / softplus) MLPs of random widths, depths, d_in, d_out, N and dtype:
  orders 1-3 agree with nested ``torch.func`` on a float64 copy of the same weights, the
  finite-difference check passes, and no finding fires;
- ReLU-family MLPs always raise ``piecewise-linear`` at order >= 2 (and never at order 1).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from checks import assert_close

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import jacfwd, jacrev, vmap  # noqa: E402

import nbderiv  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

shapes = st.fixed_dictionaries({
    "widths": st.lists(st.integers(1, 10), min_size=1, max_size=3),
    "d_in": st.integers(1, 3),
    "d_out": st.integers(1, 3),
    "n": st.integers(1, 6),
    "seed": st.integers(0, 2 ** 16),
})


def torch_mlp(widths, d_in, d_out, act, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    sizes = [d_in, *widths, d_out]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def reference(model64, X64, order):
    """d[order] from nested torch.func (jacrev, then jacfwd) on a float64 model."""
    def one(z):
        return model64(z.unsqueeze(0)).reshape(-1)

    g = jacrev(one)
    for _ in range(order - 1):
        g = jacfwd(g)
    with torch.no_grad():
        return vmap(g)(X64).numpy()


def inputs(n, d_in, seed):
    return np.random.default_rng(seed).uniform(-2, 2, (n, d_in))


# -- torch ------------------------------------------------------------------------------------
@settings(max_examples=25, **SETTINGS)
@given(shape=shapes, act=st.sampled_from([nn.Tanh, nn.Softplus]),
       dtype=st.sampled_from([torch.float32, torch.float64]), order=st.integers(1, 3))
def test_torch_smooth_mlps_match_torch_func_and_raise_nothing(shape, act, dtype, order):
    model = torch_mlp(shape["widths"], shape["d_in"], shape["d_out"], act, shape["seed"], dtype)
    X = inputs(shape["n"], shape["d_in"], shape["seed"]).astype(str(dtype)[6:])
    d = nbderiv.derivatives(model, torch.as_tensor(X), order=order, check=True)
    assert d.findings == [], [str(f) for f in d.findings]
    assert d.check.passed, d.check.summary()
    model64 = torch_mlp(shape["widths"], shape["d_in"], shape["d_out"], act, shape["seed"])
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    rel = 1e-9 if dtype == torch.float64 else 3e-4
    for k in range(1, order + 1):
        assert_close(d[k], reference(model64, torch.as_tensor(X, dtype=torch.float64), k), rel,
                     f"order {k}")


relu_family = st.sampled_from([nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU])


@settings(max_examples=20, **SETTINGS)
@given(shape=shapes, act=relu_family, order=st.integers(2, 3))
def test_torch_relu_mlps_always_raise_piecewise_linear(shape, act, order):
    model = torch_mlp(shape["widths"], shape["d_in"], shape["d_out"], act, shape["seed"],
                      torch.float32)
    X = inputs(shape["n"], shape["d_in"], shape["seed"]).astype(np.float32)
    d = nbderiv.derivatives(model, X, order=order)
    assert "piecewise-linear" in d.codes
    assert np.all(d[2] == 0)
    assert "piecewise-linear" in [f.code for f in nbderiv.diagnose(model, X, order=order)]
    assert "piecewise-linear" not in nbderiv.derivatives(model, X, order=1).codes


# -- Keras ------------------------------------------------------------------------------------
needs_keras = pytest.mark.skipif(importlib.util.find_spec("nbderiv.backends.tensorflow") is None,
                                 reason="Keras backend not available")


def keras_mlp(keras, widths, d_in, d_out, act, seed, dtype):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((d_in,), dtype=dtype)]
    layers += [keras.layers.Dense(w, activation=act, dtype=dtype) for w in widths]
    layers.append(keras.layers.Dense(d_out, dtype=dtype))
    return keras.Sequential(layers)


def torch_copy(kmodel, act):
    """The same network in torch, float64, with the Keras weights copied in."""
    layers = []
    dense = [layer for layer in kmodel.layers if layer.get_weights()]
    for i, layer in enumerate(dense):
        kernel, bias = layer.get_weights()
        lin = nn.Linear(*kernel.shape).double()
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(kernel.T.astype(np.float64)))
            lin.bias.copy_(torch.as_tensor(bias.astype(np.float64)))
        layers.append(lin)
        if i < len(dense) - 1:
            layers.append({"tanh": nn.Tanh, "softplus": nn.Softplus}[act]())
    return nn.Sequential(*layers)


@needs_keras
@settings(max_examples=6, **SETTINGS)
@given(shape=shapes, act=st.sampled_from(["tanh", "softplus"]),
       dtype=st.sampled_from(["float32", "float64"]), order=st.integers(1, 3))
def test_keras_smooth_mlps_match_torch_func_and_raise_nothing(shape, act, dtype, order):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    model = keras_mlp(keras, shape["widths"], shape["d_in"], shape["d_out"], act, shape["seed"],
                      dtype)
    X = inputs(shape["n"], shape["d_in"], shape["seed"]).astype(dtype)
    d = nbderiv.derivatives(model, X, order=order, check=True)
    assert d.framework == "tensorflow"
    assert d.findings == [], [str(f) for f in d.findings]
    assert d.check.passed, d.check.summary()
    ref_model = torch_copy(model, act)
    rel = 1e-9 if dtype == "float64" else 3e-4
    for k in range(1, order + 1):
        assert_close(d[k], reference(ref_model, torch.as_tensor(X, dtype=torch.float64), k),
                     rel, f"order {k}")


@needs_keras
@settings(max_examples=6, **SETTINGS)
@given(shape=shapes, act=st.sampled_from(["relu", "leaky_relu", "relu6"]))
def test_keras_relu_mlps_always_raise_piecewise_linear(shape, act):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    model = keras_mlp(keras, shape["widths"], shape["d_in"], shape["d_out"], act, shape["seed"],
                      "float32")
    X = inputs(shape["n"], shape["d_in"], shape["seed"]).astype(np.float32)
    assert "piecewise-linear" in nbderiv.derivatives(model, X, order=2).codes
