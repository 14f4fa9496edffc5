"""Same weights, two frameworks: nbderiv's derivatives of a Keras model and of the torch
model holding the same weights agree (1e-5 in float32, 1e-10 in float64).

The weights go both ways (Keras -> torch and torch -> Keras), and the models are chosen so
that each framework runs each of its strategies (Taylor mode for one input direction,
nested reverse mode for several inputs, forward mode for many outputs).
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

import nbderiv  # noqa: E402

TOL = {"float32": 1e-5, "float64": 1e-10}


def keras_mlp(sizes, dtype, seed=0):
    layers = [keras.Input((sizes[0],), dtype=dtype)]
    for i, units in enumerate(sizes[1:]):
        layers.append(keras.layers.Dense(
            units, activation=None if i == len(sizes) - 2 else "tanh", dtype=dtype,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
            bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed + 50 + i)))
    return keras.Sequential(layers)


def torch_mlp(sizes, dtype, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.Tanh())
    return torch.nn.Sequential(*mods).to(getattr(torch, dtype))


def linears(net):
    return [m for m in net if isinstance(m, torch.nn.Linear)]


def keras_to_torch(kmodel, tnet):
    weights = kmodel.get_weights()
    with torch.no_grad():
        for lin, (kernel, bias) in zip(linears(tnet), zip(weights[::2], weights[1::2])):
            lin.weight.copy_(torch.as_tensor(kernel.T))
            lin.bias.copy_(torch.as_tensor(bias))


def torch_to_keras(tnet, kmodel):
    weights = []
    for lin in linears(tnet):
        weights += [lin.weight.detach().numpy().T, lin.bias.detach().numpy()]
    kmodel.set_weights(weights)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("direction", ["keras->torch", "torch->keras"])
@pytest.mark.parametrize("sizes", [[1, 16, 16, 1], [3, 16, 16, 2], [1, 12, 30]])
def test_same_weights_same_derivatives(dtype, direction, sizes):
    kmodel, tnet = keras_mlp(sizes, dtype, seed=1), torch_mlp(sizes, dtype, seed=2)
    if direction == "keras->torch":
        keras_to_torch(kmodel, tnet)
    else:
        torch_to_keras(tnet, kmodel)
    X = np.random.default_rng(3).uniform(-1.5, 1.5, size=(40, sizes[0])).astype(dtype)
    dk = nbderiv.derivatives(kmodel, X, order=2)
    dt = nbderiv.derivatives(tnet, torch.as_tensor(X), order=2)
    assert (dk.framework, dt.framework) == ("tensorflow", "torch")
    assert dk[2].dtype == dt[2].dtype == np.dtype(dtype)
    assert_close(dk.y, dt.y, TOL[dtype], "y")
    for k in (1, 2):
        assert_close(dk[k], dt[k], TOL[dtype], f"d[{k}] ({dk.method} vs {dt.method})")


def test_orders_3_and_4_agree_in_float64():
    kmodel, tnet = keras_mlp([1, 16, 16, 2], "float64", seed=4), torch_mlp([1, 16, 16, 2],
                                                                           "float64")
    keras_to_torch(kmodel, tnet)
    x = np.linspace(-2, 2, 25)
    dk = nbderiv.derivatives(kmodel, x, order=4)
    dt = nbderiv.derivatives(tnet, torch.as_tensor(x), order=4)
    func = keras.Model(kmodel.inputs[0], kmodel.outputs[0])  # nested tapes instead of Taylor
    df = nbderiv.derivatives(func, x, order=4)
    assert dk.method != df.method
    for k in (3, 4):
        assert_close(dk[k], dt[k], 1e-10, f"Keras Sequential d[{k}]")
        assert_close(df[k], dt[k], 1e-10, f"Keras functional d[{k}]")


def test_two_inputs_x_t_same_names_and_values():
    xi = keras.Input((1,), name="x", dtype="float64")
    ti = keras.Input((1,), name="t", dtype="float64")
    h = keras.layers.Concatenate(dtype="float64")([xi, ti])
    hidden = keras.layers.Dense(12, activation="tanh", dtype="float64",
                                bias_initializer=keras.initializers.RandomNormal(seed=5))
    out = keras.layers.Dense(1, dtype="float64")
    kmodel = keras.Model([xi, ti], out(hidden(h)))

    class PINN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = torch.nn.Linear(2, 12).double()
            self.out = torch.nn.Linear(12, 1).double()

        def forward(self, x, t):
            return self.out(torch.tanh(self.hidden(torch.cat([x, t], dim=1))))

    tnet = PINN()
    kernel, bias, k2, b2 = kmodel.get_weights()
    with torch.no_grad():
        tnet.hidden.weight.copy_(torch.as_tensor(kernel.T))
        tnet.hidden.bias.copy_(torch.as_tensor(bias))
        tnet.out.weight.copy_(torch.as_tensor(k2.T))
        tnet.out.bias.copy_(torch.as_tensor(b2))
    x, t = np.linspace(0, 1, 9), np.linspace(-1, 1, 9)
    dk = nbderiv.derivatives(kmodel, (x, t), order=2)
    dt = nbderiv.derivatives(tnet, (torch.as_tensor(x), torch.as_tensor(t)), order=2)
    assert dk.inputs == dt.inputs == ("x", "t")
    for k in (1, 2):
        assert_close(dk[k], dt[k], 1e-10, f"d[{k}]")
