"""Errors that fit (issue 17): a model that rejects an input is told what the layer receiving
it expects, as a shape when it needs one (never "flatten"), with a concrete reshape or
transpose when x holds the right values in another layout."""

from __future__ import annotations

import numpy as np
import pytest

import nbderiv
from nbderiv.errors import InputShapeError, ModelCallError
from nbderiv.inputs import prepare_inputs
from nbderiv.model_errors import expected_input, fits_expected, model_rejected_input


def _rejected(x, expected, message="size mismatch"):
    prepared = prepare_inputs(np.asarray(x, dtype=np.float32), to_numpy=np.asarray)
    return model_rejected_input(RuntimeError(message), prepared, expected)


@pytest.mark.parametrize("expected, text", [
    (16, "16 input feature(s) per point, shape (N, 16)"),
    ((16,), "16 input feature(s) per point, shape (N, 16)"),
    ((3, None, None), "C=3 channels (shape (N, 3, H, W))"),
    ((None, None, 3), "C=3 channels (shape (N, H, W, 3))"),
    ((4, None), "C=4 channels (shape (N, 4, L))"),
    ((None, 8), "F=8 features per time step (shape (N, T, 8))"),
    ((32, 32, 3), "points of shape (32, 32, 3) (shape (N, 32, 32, 3))"),
    (None, None), ((None, None), None),
])
def test_expected_input_reads_the_receiving_layer(expected, text):
    assert expected_input(expected) == text


def test_fits_expected():
    assert fits_expected((3, None, None), (3, 32, 32))
    assert not fits_expected((3, None, None), (32, 32, 3))
    assert not fits_expected((3, None, None), (3072,))
    assert fits_expected(8, (20, 8)) and not fits_expected(8, (20, 4))
    assert fits_expected(None, (5,))


def test_flattened_images_are_told_the_shape_and_the_reshape_never_to_flatten():
    err = _rejected(np.zeros((4, 192)), (3, None, None),
                    "Expected 3D (unbatched) or 4D (batched) input to conv2d")
    assert isinstance(err, InputShapeError)
    text = str(err)
    assert "C=3 channels (shape (N, 3, H, W))" in text
    assert "x.reshape(-1, 3, 8, 8)" in text
    assert "flatten" not in text.replace("flattened", "")
    assert "192 feature(s) per point" in text


def test_channels_last_images_for_a_channels_first_model_get_the_permute():
    err = _rejected(np.zeros((4, 8, 8, 3)), (3, None, None), "expected input to have 3 channels")
    text = str(err)
    assert "passed as (4, 8, 8, 3) (N points of shape S, as it is)" in text
    assert "x.permute(0, 3, 1, 2)" in text
    err = _rejected(np.zeros((4, 3, 8, 8)), (None, None, 3), "incompatible shape")
    assert "np.transpose(x, (0, 2, 3, 1))" in str(err)


def test_sequences_and_unknown_expectations_never_say_flatten():
    err = _rejected(np.zeros((4, 7, 4)), (None, 3), "input.size(-1) must be equal to input_size")
    assert "F=3 features per time step (shape (N, T, 3))" in str(err)
    assert "points of shape (7, 4)" in str(err)
    err = _rejected(np.zeros((4, 7, 4)), None, "shape mismatch")
    assert "per-point shape S" in str(err) and "flatten" not in str(err)


def test_vectors_keep_the_trailing_size_message_and_other_causes_their_fix():
    err = _rejected(np.zeros((4, 5)), 3, "mat1 and mat2 shapes cannot be multiplied")
    assert "The model expects 3 input feature(s) per point, shape (N, 3); x has 5" in str(err)
    assert "trailing size" in str(err)
    assert isinstance(_rejected(np.zeros((4, 3)), 3, "boom"), ModelCallError)
    assert isinstance(_rejected(np.zeros((4, 3, 8, 8)), (3, None, None), "boom"), ModelCallError)


def test_an_embedding_given_token_ids_points_to_the_embeddings():
    torch = pytest.importorskip("torch")
    from nbderiv.errors import NbderivError

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(20, 6), torch.nn.Flatten(),
                              torch.nn.Linear(30, 1))
    tokens = torch.randint(0, 20, (10, 5))
    with pytest.raises(NbderivError, match=r"token id has no derivative.*embeddings"):
        nbderiv.derivatives(net, tokens)
    e = net[0](tokens).detach()  # what the message suggests works
    d = nbderiv.derivatives(lambda z: net[2](net[1](z)), e)
    assert d[1].shape == (10, 1, 5, 6)


# -- a model of several inputs given one array ------------------------------------------------
def _two_inputs_said(text):
    assert "takes 2 inputs and got 1: x is one array" in text
    assert "Fix: pass one array per input as a tuple, x=(x1, x2) (one input per column of " \
           "this x: x=(x[:, 0:1], x[:, 1:2]))" in text
    assert "torch.as_tensor" not in text and "Pass inputs as a dict" not in text


def test_a_keras_model_of_two_inputs_given_one_array_is_told_to_pass_a_tuple():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    a, b = keras.Input((1,)), keras.Input((1,))
    two = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    x = np.random.default_rng(0).random((5, 2)).astype("float32")
    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(two, x)
    _two_inputs_said(str(info.value))
    d = nbderiv.derivatives(two, (x[:, 0:1], x[:, 1:2]))  # what it says works
    assert d[1].shape == (5, 1, 2)


def test_a_torch_module_of_two_arguments_given_one_array_is_told_to_pass_a_tuple():
    torch = pytest.importorskip("torch")

    class TwoArguments(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x, t):
            return self.lin(torch.cat([x, t], dim=1))

    net, x = TwoArguments(), torch.rand(5, 2)
    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(net, x)
    _two_inputs_said(str(info.value))
    assert nbderiv.derivatives(net, (x[:, 0:1], x[:, 1:2])).inputs == ("x", "t")
    with pytest.raises(InputShapeError, match=r"takes 2 inputs and got 3: x is a tuple of 3"):
        nbderiv.derivatives(net, (x[:, :1], x[:, :1], x[:, 1:]))


def test_a_wrong_call_inside_the_model_is_not_taken_for_its_inputs():
    torch = pytest.importorskip("torch")

    def helper(a, b):
        return a * b

    def model(x):
        return helper(x)

    with pytest.raises(ModelCallError) as info:
        nbderiv.derivatives(model, torch.rand(5, 2))
    assert "takes 2 inputs" not in str(info.value)


def test_tuple_arguments_of_shape_n_are_passed_as_given_when_the_model_needs_it():
    """forward(x, t) doing t[:, None] refuses t as (N, 1): nbderiv then passes t as it was
    given, (N,). Values against float64 vmap(jacrev) / vmap(hessian); d.code runs."""
    import copy

    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, t = torch.randn(6, 2), torch.rand(6)

    def pinn(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    d = nbderiv.derivatives(pinn, (x, t), order=2)
    assert d[2].shape == (6, 1, 3, 3) and d.inputs == ("x[0]", "x[1]", "t")
    n64 = copy.deepcopy(net).double()
    g = lambda p: n64(p[None])[0, 0]  # noqa: E731
    X = torch.cat([x, t[:, None]], 1).double()
    np.testing.assert_allclose(d[1][:, 0], torch.func.vmap(torch.func.jacrev(g))(X).detach(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d[2][:, 0], torch.func.vmap(torch.func.hessian(g))(X).detach(),
                               rtol=1e-4, atol=1e-6)
    ns = {"torch": torch, "np": np, "model": pinn, "x": (x, t)}
    exec(d.code, ns)  # noqa: S102
    np.testing.assert_allclose(np.asarray(ns["d2"]), d[2], rtol=1e-5, atol=1e-6)


def test_a_kwargs_array_with_another_number_of_rows_is_named():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with pytest.raises(nbderiv.errors.OptionError) as info:
        nbderiv.derivatives(lambda z, m: net(z) * m, torch.randn(6, 2),
                            kwargs={"m": torch.ones(5, 1)})
    text = str(info.value)
    assert "kwargs['m'] has shape (5, 1)" in text and "6 points" in text
    assert "expects" not in text


@pytest.mark.parametrize("kernel", ["matmul", "cdist"])
def test_an_output_that_grows_with_the_batch_is_an_output_error(kernel):
    """tanh(z @ z.T) and cdist(z, z): each point's output has N values. It used to end in
    NumPy's own 'all the input array dimensions ... must match exactly'."""
    import torch

    from nbderiv.errors import OutputError

    f = (lambda z: torch.tanh(z @ z.T)) if kernel == "matmul" else (lambda z: torch.cdist(z, z))
    with pytest.raises(OutputError, match="changes with the number of points.*Fix:"):
        nbderiv.derivatives(f, torch.randn(5, 2))


def test_a_tuple_argument_broadcast_against_its_own_column_is_passed_as_given():
    """forward(x, t) doing x * t[:, None] with t of shape (N,): passed as (N, 1) it does not
    fail but broadcasts to (N, N, 2); passed as given it is each point's own. Truth:
    float64 vmap(jacrev) over both arguments."""
    import torch

    class Scaled(torch.nn.Module):
        def forward(self, x, t):
            return torch.tanh(x * t[:, None])

    torch.manual_seed(0)
    x, t = torch.randn(5, 2), torch.randn(5)
    d = nbderiv.derivatives(Scaled(), (x, t), order=1)
    jx, jt = torch.func.vmap(torch.func.jacrev(lambda a, b: torch.tanh(a * b), argnums=(0, 1)))(
        x.double(), t.double())
    np.testing.assert_allclose(d[1][:, :, :2], jx.numpy(), atol=1e-6)
    np.testing.assert_allclose(d[1][:, :, 2], jt.numpy(), atol=1e-6)


def test_squeeze_at_one_point_is_named():
    """net(x).squeeze() gives (N,) for N > 1 but () for one point: the error used to talk
    only about reducing over the points."""
    import torch

    from nbderiv.errors import OutputError

    net = torch.nn.Linear(2, 1)
    with pytest.raises(OutputError, match=r"\.squeeze\(-1\)"):
        nbderiv.derivatives(lambda z: net(z).squeeze(), torch.randn(1, 2))


def test_a_dict_for_a_model_that_takes_one_dict_points_to_a_wrapper_that_works():
    """forward(self, batch) reading batch['x'], batch['t']: the dict error's only fix was a
    tuple, which such a model refuses. The wrapper it names runs; truth: float64 vmap(jacrev)."""
    import torch

    from nbderiv.errors import InputTypeError

    torch.manual_seed(0)

    class OnDict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, batch):
            return torch.tanh(self.lin(torch.cat([batch["x"], batch["t"]], 1)))

    model, x = OnDict(), {"x": torch.randn(4, 2), "t": torch.randn(4, 1)}
    with pytest.raises(InputTypeError) as info:
        nbderiv.derivatives(model, x)
    call = "nbderiv.derivatives(lambda x, t: model({'x': x, 't': t}), (x['x'], x['t']))"
    assert call in str(info.value)
    d = eval(call, {"nbderiv": nbderiv, "model": model, "x": x})
    m64 = __import__("copy").deepcopy(model).double()
    truth = torch.func.vmap(torch.func.jacrev(
        lambda p: m64({"x": p[None, :2], "t": p[None, 2:]})[0]))(
        torch.cat([x["x"], x["t"]], 1).double())
    np.testing.assert_allclose(d[1], truth.detach().numpy(), atol=1e-6)


def test_a_keras_models_own_error_keeps_its_cause():
    """Keras wraps an error inside call as 'Exception encountered when calling Net.call().'
    with the cause on the next lines; the message kept only that first line."""
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)

        def call(self, z):
            return tf.concat([self.dense(z), z[:, :1]], axis=0)  # axis 0: a bug

    from nbderiv.errors import NbderivError

    with pytest.raises(NbderivError, match="ConcatOp"):
        nbderiv.derivatives(Net(), np.random.default_rng(0).normal(size=(6, 3)).astype("f4"))


def test_a_framework_that_is_not_the_models_is_named():
    """framework='torch' on a Keras model used to end in 'the model returned EagerTensor,
    not a tensor'."""
    keras = pytest.importorskip("keras")
    from nbderiv.errors import OptionError

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    with pytest.raises(OptionError, match="framework='torch', but the model is a tensorflow"):
        nbderiv.derivatives(model, np.zeros((3, 1), "float32"), framework="torch")


def test_a_model_returning_a_dict_or_a_tuple_is_told_how_to_pick_one_output():
    """A model returning {'mean': ..., 'logvar': ...} or an RNN's (output, state) was told
    only 'returned dict, not a tensor'; now the keys (or the length) and the wrapper."""
    torch = pytest.importorskip("torch")
    from nbderiv.errors import OutputError

    net = torch.nn.Linear(2, 2)
    with pytest.raises(OutputError, match=r"keys 'mean', 'logvar'.*lambda z: model\(z\)\['mean'\]"):
        nbderiv.derivatives(lambda z: {"mean": net(z), "logvar": net(z)}, torch.rand(4, 2))
    rnn = torch.nn.GRU(2, 3, batch_first=True)
    with pytest.raises(OutputError, match=r"tuple of 2 values.*lambda z: model\(z\)\[0\]"):
        nbderiv.derivatives(rnn, torch.rand(4, 5, 2))


class _TimeMajor:
    """A GRU regressor built without batch_first=True (time-major, (T, N, F) input)."""

    @staticmethod
    def build():
        torch = pytest.importorskip("torch")

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.rnn, self.fc = torch.nn.GRU(3, 8), torch.nn.Linear(8, 2)

            def forward(self, x):
                return self.fc(self.rnn(x)[0][-1])

        return Net().eval()


@pytest.mark.parametrize("T, N", [(5, 6), (6, 6)])
def test_a_time_major_rnn_given_time_major_x_is_told_batch_first_and_the_wrapper(T, N):
    """x of shape (T, N, F) for a time-major GRU: the output has N rows for T 'points'. The
    error used to say 'do not reduce over the points' (or, for T == N, 'an output indexed like
    x[-1]'); it names the layer, batch_first and a wrapper, and the wrapper runs (its values
    match float64 vmap(jacrev) of the model on each point alone)."""
    torch = pytest.importorskip("torch")
    from nbderiv.errors import OutputError
    net = _TimeMajor.build()
    x = torch.randn(T, N, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(OutputError, match=r"rnn \(GRU\), built without batch_first=True") as info:
        nbderiv.derivatives(net, x)
    assert "do not reduce" not in str(info.value) and "x[-1]" not in str(info.value)
    d = nbderiv.derivatives(lambda z: net(z.transpose(0, 1)), x.transpose(0, 1))
    import copy
    net64 = copy.deepcopy(net).double()
    J = np.stack([torch.autograd.functional.jacobian(lambda p: net64(p[:, None])[0],
                                                     x[:, n].double()).numpy()
                  for n in range(N)])
    np.testing.assert_allclose(d[1], J, atol=1e-5)


def test_a_gru_that_forgot_batch_first_couples_the_points_and_the_fix_names_it():
    """forward written for (N, T, F) (h[:, -1]) around a GRU built without batch_first=True:
    it runs across the points; coupled-samples' fix names batch_first (it named model.eval())."""
    torch = pytest.importorskip("torch")

    class Forgot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.rnn, self.fc = torch.nn.GRU(3, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    d = nbderiv.derivatives(Forgot().eval(),
                            torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(1)))
    f = d.finding("coupled-samples")
    assert "batch_first=True" in f.fix and "rnn (GRU)" in f.message


def test_a_channels_first_keras_conv_on_the_cpu_is_not_blamed_on_x():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU runs channels_first convolutions")
    model = keras.Sequential([keras.Input((2, 6, 6)),
                              keras.layers.Conv2D(3, 3, data_format="channels_first"),
                              keras.layers.Flatten(), keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(5, 2, 6, 6)).astype("float32")
    with pytest.raises(Exception, match="NHWC"):  # TensorFlow itself refuses, x fits
        model(x)
    with pytest.raises(nbderiv.errors.ModelCallError) as info:
        nbderiv.derivatives(model, x)
    text = str(info.value)
    assert "data_format='channels_first'" in text and "np.moveaxis(x, 1, -1)" in text
    assert "pass x of shape (N, *S)" not in text
