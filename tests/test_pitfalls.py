"""Pitfall suite (issue 18): adversarial models, each with the answer a student must get.

Every case is (builder, x, expected): ``builder()`` returns the model (and is where the
framework is imported), ``x`` the input, ``expected`` one of
``Present(code)`` / ``Absent(code)`` / ``Codes([...])`` (exactly these findings) /
``Raises(ErrorClass, text)`` / ``Value(fn)`` (fn(d, x) checks a number against an
independent truth). A false or missing diagnosis fails its case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import nbderiv
from nbderiv.errors import InputShapeError, ModelCallError, OutputError

torch = pytest.importorskip("torch")
nn = torch.nn


@dataclass
class Present:
    code: str


@dataclass
class Absent:
    code: str


@dataclass
class Codes:
    codes: list


@dataclass
class Raises:
    error: type
    text: str = ""
    not_text: str = "\0"


@dataclass
class Value:
    check: object


# -- torch models ---------------------------------------------------------------------------
def mlp(act=nn.Tanh, d_in=1, d_out=1, seed=0, width=16, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, d_out)).to(dtype)


class Forward(nn.Module):
    """A custom forward around a tanh MLP (so the probe always runs)."""

    def __init__(self, fn, d_in=1):
        super().__init__()
        self.net = mlp(d_in=d_in)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.net, x)


def no_grad_forward(net, x):
    with torch.no_grad():
        return net(x)


class TwoInputs(nn.Module):
    def __init__(self, t_path):
        super().__init__()
        self.net = mlp(d_in=2)
        self.t_path = t_path

    def forward(self, x, t):
        return self.net(torch.cat([x, self.t_path(t)], dim=1))


def zero_bias_relu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias.zero_()
    return net


def dead_region_relu():
    """All first-layer units off for x < 10; second-layer inputs then exactly 0 (bias 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(-10.0)
        net[2].bias.zero_()
    return net


def saturated_tanh(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    return net


class RaisesInFindings(nn.Module):
    """Fine on the probe's calls (at most 11 of the 20 points) and on autodiff's (all 20,
    x recorded; the kinks are looked for in that pass), raises on the finite-difference
    look at the graph (4 points, themselves and at 2 steps x 2 signs = 20 rows, x not
    recorded: also when nbderiv retries forward-only passes with gradients on)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 4)

    def forward(self, x):
        if not x.requires_grad and x.shape[0] == 20:
            raise ValueError("boom in the findings")
        return torch.relu(self.lin(x)).sum(dim=1, keepdim=True)


def bn_one_point():
    return nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))


X1 = torch.linspace(-1, 1, 10).reshape(-1, 1)
X2 = torch.rand(30, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
XMAX = torch.tensor([[0.1], [0.5], [2.0], [-0.3]])          # max |x| at point 2, not 0
XFAR = torch.linspace(-1, 1, 20).reshape(-1, 1)
XFAR[15] = 5.0                                              # the extreme beyond the first 8


def per_point_over_max(d, x):
    """x / max|x| with max at point 2: d y_n / d x_n = 1 / max for n != 2, 0 at n = 2."""
    x = np.asarray(x, dtype=np.float64).ravel()
    m = np.abs(x).max()
    truth = np.where(np.abs(x) == m, 0.0, 1 / m)
    np.testing.assert_allclose(d[1][:, 0, 0], truth, rtol=1e-5, atol=1e-6)
    assert "coupled-samples" in d.codes


def kink_points_are(points):
    def check(d, x):
        f = d.finding("at-kink")
        assert f is not None and f.points == points
    return check


def torch_cases():
    T = torch
    return {
        # broken graphs: graph-broken, never no-input-dependence
        "detach": (lambda: Forward(lambda n, x: n(x).detach()), X1, Present("graph-broken")),
        "detach-not-nodep": (lambda: Forward(lambda n, x: n(x).detach()), X1,
                             Absent("no-input-dependence")),
        "numpy-roundtrip": (lambda: Forward(lambda n, x: T.from_numpy(
            np.sin(n(x).detach().numpy()))), X1, Present("graph-broken")),
        "numpy-no-detach": (lambda: Forward(lambda n, x: T.from_numpy(np.sin(x.numpy()))), X1,
                            Raises(ModelCallError, ".numpy()", "trailing size")),
        "no-grad": (lambda: Forward(no_grad_forward), X1, Present("graph-broken")),
        "no-grad-not-nodep": (lambda: Forward(no_grad_forward), X1,
                              Absent("no-input-dependence")),
        "dot-data": (lambda: Forward(lambda n, x: n(x).data * 2), X1, Present("graph-broken")),
        "half-detached": (lambda: Forward(lambda n, x: n(x) + n(x).detach() ** 2), X1,
                          Present("graph-broken")),
        "half-detached-2d": (lambda: Forward(lambda n, x: n(x) + 3 * n(x).detach(), d_in=2), X2,
                             Present("graph-broken")),
        "t-detached": (lambda: TwoInputs(lambda t: t.detach()), (X1, X1),
                       Present("graph-broken")),
        "t-ignored": (lambda: TwoInputs(lambda t: t * 0), (X1, X1),
                      Codes(["no-input-dependence"])),
        # coupling through the batch, wherever the extreme point is
        "over-abs-max": (lambda: (lambda x: x / x.abs().max()), XMAX, Present("coupled-samples")),
        "over-abs-max-value": (lambda: (lambda x: x / x.abs().max()), XMAX,
                               Value(per_point_over_max)),
        "over-max-beyond-8": (lambda: (lambda x: x / x.abs().max()), XFAR,
                              Present("coupled-samples")),
        "minus-mean": (lambda: (lambda x: T.tanh(x - x.mean(dim=0))), X1,
                       Present("coupled-samples")),
        "over-norm": (lambda: (lambda x: x / x.norm()), X2, Present("coupled-samples")),
        "softmax-batch": (lambda: (lambda x: T.softmax(x, dim=0)), X2,
                          Present("coupled-samples")),
        "over-min": (lambda: (lambda x: x - x.min(dim=0).values), XFAR,
                     Present("coupled-samples")),
        "softmax-features": (lambda: (lambda x: T.softmax(x, dim=1)), X2,
                             Absent("coupled-samples")),
        "tanh-mlp-independent": (lambda: Forward(lambda n, x: n(x)), X1,
                                 Absent("coupled-samples")),
        # kinks only when one-sided slopes differ
        "kink-zero-bias": (zero_bias_relu, T.tensor([[-1.0], [0.0], [0.5]]),
                           Value(kink_points_are((1,)))),
        "kink-dead-region": (dead_region_relu, T.tensor([[1.0], [2.0], [3.0]]),
                             Absent("at-kink")),
        "kink-dead-region-nodep": (dead_region_relu, T.tensor([[1.0], [2.0], [3.0]]),
                                   Present("no-input-dependence")),
        "kink-zero-input-unit": (lambda: (lambda x: T.relu(0 * x) + x), X1, Absent("at-kink")),
        "kink-abs-at-0": (lambda: (lambda x: T.relu(x) + T.relu(-x)), T.tensor([[0.0], [1.0]]),
                          Value(kink_points_are((0,)))),
        "kink-moved-off": (zero_bias_relu, T.tensor([[-1.0], [1e-3], [0.5]]), Absent("at-kink")),
        # saturation
        "saturated-tanh": (saturated_tanh, T.linspace(8, 9, 10).reshape(-1, 1),
                           Present("saturated")),
        "saturated-tanh-64": (lambda: saturated_tanh(T.float64),
                              T.linspace(8, 9, 10, dtype=T.float64).reshape(-1, 1),
                              Present("saturated")),
        "unsaturated-same-net": (saturated_tanh, X1, Codes([])),
        "relu-not-saturated": (lambda: mlp(nn.ReLU), X1, Absent("saturated")),
        # ordinary smooth nets: no finding at all
        "tanh-mlp": (lambda: mlp(nn.Tanh, d_in=2), X2, Codes([])),
        "softplus-mlp": (lambda: mlp(nn.Softplus, d_in=2), X2, Codes([])),
        "silu-mlp": (lambda: mlp(nn.SiLU, d_in=2, d_out=3), X2, Codes([])),
        "gelu-mlp-64": (lambda: mlp(nn.GELU, d_in=2, dtype=T.float64), X2.double(), Codes([])),
        "tanh-mlp-wide-x": (lambda: mlp(nn.Tanh), T.linspace(-3, 3, 40).reshape(-1, 1),
                            Codes([])),
        # outputs that cannot be read per point
        "complex-output": (lambda: (lambda x: x.to(T.complex64) * (1 + 2j)), X1,
                           Raises(OutputError, "complex")),
        "no-batch-axis": (lambda: (lambda x: 2 * x[-1]), T.rand(3, 3),
                          Raises(OutputError, "first axis")),
        "batch-reduced": (lambda: (lambda x: x.sum(dim=0)), T.rand(5, 2),
                          Raises(OutputError, "one output row per point")),
        # errors: one class, a fix that fits
        "model-raises": (lambda: (lambda x: (_ for _ in ()).throw(RuntimeError("boom"))), X1,
                         Raises(ModelCallError, "boom", "trailing size")),
        "bn-train-one-point": (bn_one_point, T.rand(1, 1),
                               Raises(ModelCallError, "model.eval()", "trailing size")),
        "wrong-width": (lambda: mlp(d_in=3), X2, Raises(InputShapeError, "trailing size")),
        "raises-in-findings": (RaisesInFindings, XFAR,
                               Raises(ModelCallError, "finite differences", "trailing size")),
    }


CASES = torch_cases()


def check(builder, x, expected, framework=None):
    kw = {"framework": framework} if framework else {}
    if isinstance(expected, Raises):
        with pytest.raises(expected.error) as info:
            nbderiv.derivatives(builder(), x, order=2, **kw)
        msg = str(info.value)
        assert expected.text in msg, msg
        assert expected.not_text not in msg, msg
        return
    d = nbderiv.derivatives(builder(), x, order=2, **kw)
    if isinstance(expected, Present):
        assert expected.code in d.codes, (d.codes, [str(f) for f in d.findings])
    elif isinstance(expected, Absent):
        assert expected.code not in d.codes, [str(f) for f in d.findings]
    elif isinstance(expected, Codes):
        codes = [c for c in d.codes if c not in ("input-reshaped",)]
        assert sorted(codes) == sorted(expected.codes), [str(f) for f in d.findings]
    else:
        expected.check(d, x)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_pitfall(name):
    builder, x, expected = CASES[name]
    check(builder, x, expected)


def test_diagnose_agrees_on_broken_graphs_and_coupling():
    for name in ("detach", "no-grad", "over-abs-max", "over-max-beyond-8", "kink-dead-region"):
        builder, x, expected = CASES[name]
        probed = {f.code for f in nbderiv.diagnose(builder(), x)}
        if isinstance(expected, Present):
            assert expected.code in probed, (name, probed)
        elif isinstance(expected, Absent):
            assert expected.code not in probed, (name, probed)


def test_graph_broken_names_the_causes_and_the_points():
    d = nbderiv.derivatives(Forward(lambda n, x: n(x).detach()), X1)
    f = d.finding("graph-broken")
    assert all(w in f.fix for w in (".detach()", ".numpy()", "no_grad", ".item()", "integer",
                                    "tf.stop_gradient"))
    assert f.points and "dy/dx" in f.message


def test_saturated_finding_fix_says_scale_the_inputs():
    d = nbderiv.derivatives(saturated_tanh(), torch.linspace(8, 9, 10).reshape(-1, 1))
    assert "scale the inputs" in d.finding("saturated").fix


# -- TensorFlow / Keras -------------------------------------------------------------------------
def _tf():
    return pytest.importorskip("tensorflow")


def keras_mlp(act="tanh", d_in=1, seed=0):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(16, activation=act),
                             keras.layers.Dense(16, activation=act), keras.layers.Dense(1)])


def keras_zero_bias_relu():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="relu",
                                                                   bias_initializer="zeros"),
                             keras.layers.Dense(1)])


def keras_dead_relu():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(3, activation="relu"), keras.layers.Dense(1)])
    w0, b0, w1, b1, w2, b2 = model.get_weights()
    model.set_weights([np.ones_like(w0), np.full_like(b0, -10.0), w1, np.zeros_like(b1),
                       w2, b2])
    return model


def keras_saturated():
    keras = pytest.importorskip("keras")
    # float64: in float32 TensorFlow's tanh may round to exactly 1 this far out (with
    # TF_ENABLE_ONEDNN_OPTS=0, as make test sets), and then the output truly does not move
    model = keras.Sequential([keras.Input((1,), dtype="float64"),
                              keras.layers.Dense(16, activation="tanh", dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    w0, b0, w1, b1 = model.get_weights()
    model.set_weights([np.ones_like(w0), np.zeros_like(b0), w1, b1])
    return model


XT = np.linspace(-1, 1, 10, dtype=np.float32).reshape(-1, 1)
XT_MAX = np.array([[0.1], [0.5], [2.0], [-0.3]], dtype=np.float32)


def tf_cases():
    def tfn(f):  # a plain function of TensorFlow tensors
        return lambda: f
    tf = _tf()
    net = keras_mlp()
    return {
        "tf-np-sin": (tfn(lambda z: tf.convert_to_tensor(np.sin(net(z)))), XT,
                      Present("graph-broken")),
        "tf-np-sin-not-nodep": (tfn(lambda z: tf.convert_to_tensor(np.sin(net(z)))), XT,
                                Absent("no-input-dependence")),
        "tf-stop-gradient": (tfn(lambda z: tf.stop_gradient(net(z))), XT,
                             Present("graph-broken")),
        "tf-half-stopped": (tfn(lambda z: net(z) + tf.stop_gradient(net(z)) ** 2), XT,
                            Present("graph-broken")),
        "tf-over-abs-max": (tfn(lambda z: z / tf.reduce_max(tf.abs(z))), XT_MAX,
                            Present("coupled-samples")),
        "tf-over-abs-max-value": (tfn(lambda z: z / tf.reduce_max(tf.abs(z))), XT_MAX,
                                  Value(per_point_over_max)),
        "tf-softmax-batch": (tfn(lambda z: tf.nn.softmax(z, axis=0)), XT,
                             Present("coupled-samples")),
        "tf-complex": (tfn(lambda z: tf.complex(z, z)), XT, Raises(OutputError, "complex")),
        "tf-no-batch-axis": (tfn(lambda z: 2 * z[-1]), np.random.rand(3, 3).astype("float32"),
                             Raises(OutputError, "")),
        "tf-model-raises": (tfn(lambda z: (_ for _ in ()).throw(RuntimeError("boom"))), XT,
                            Raises(ModelCallError, "boom", "trailing size")),
        "keras-kink": (keras_zero_bias_relu, np.array([[-1.0], [0.0], [0.4]], "float32"),
                       Value(kink_points_are((1,)))),
        "keras-dead-region": (keras_dead_relu, np.array([[1.0], [2.0], [3.0]], "float32"),
                              Absent("at-kink")),
        "keras-saturated": (keras_saturated, np.linspace(8, 9, 10, dtype="float32"),
                            Present("saturated")),
        "keras-tanh-clean": (lambda: keras_mlp(d_in=2), np.random.default_rng(0).uniform(
            -1, 1, (30, 2)).astype("float32"), Codes([])),
        "keras-softplus-clean": (lambda: keras_mlp("softplus"), XT, Codes([])),
    }


TF_NAMES = ["tf-np-sin", "tf-np-sin-not-nodep", "tf-stop-gradient", "tf-half-stopped",
            "tf-over-abs-max", "tf-over-abs-max-value", "tf-softmax-batch", "tf-complex",
            "tf-no-batch-axis", "tf-model-raises", "keras-kink", "keras-dead-region",
            "keras-saturated", "keras-tanh-clean", "keras-softplus-clean"]


@pytest.fixture(scope="module")
def tf_table():
    return tf_cases()


@pytest.mark.parametrize("name", TF_NAMES)
def test_tensorflow_pitfall(name, tf_table):
    builder, x, expected = tf_table[name]
    framework = None if name.startswith("keras") else "tensorflow"
    check(builder, x, expected, framework)


# -- the layer a finding blames, and a fix that works for it -----------------------------------
class StackedRNN(nn.Module):
    """An LSTM / GRU / RNN of ``layers`` layers with ``dropout`` between them, then a head."""

    def __init__(self, cell, layers=2, dropout=0.3):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, cell)(3, 6, num_layers=layers, dropout=dropout, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _central_d1(model, x, h=1e-5):
    """float64 central differences of each point's output along each of its inputs."""
    cols = []
    with torch.no_grad():
        for i in range(x[0].numel()):
            step = torch.zeros(x[0].numel(), dtype=x.dtype)
            step[i] = h
            step = step.reshape(x.shape[1:])
            cols.append((model(x + step) - model(x - step)) / (2 * h))
    return torch.stack(cols, -1).numpy()  # (N, d_out, inputs)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_rnn_dropout_in_training_mode_is_the_layer_named(cell):
    """The dropout between stacked recurrent layers is what makes the outputs random: the
    finding names that layer (not "no layer in training mode explains it") and gives
    model.eval(), which makes the derivatives right again."""
    model = StackedRNN(cell).double()  # training mode, the default
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    found = [nbderiv.derivatives(model, x).finding("train-mode"),
             next(f for f in nbderiv.diagnose(model, x, order=1) if f.code == "train-mode")]
    for f in found:
        assert f"rnn ({cell}, dropout=0.3 between its 2 layers)" in f.message, f.message
        assert "no layer in training mode" not in f.message
        assert "model.eval()" in f.fix
    model.eval()
    d = nbderiv.derivatives(model, x)
    assert "train-mode" not in d.codes
    truth = _central_d1(model, x).reshape(d[1].shape)
    np.testing.assert_allclose(d[1], truth, rtol=1e-6, atol=1e-6 * np.abs(truth).max())


@pytest.mark.parametrize("layers, dropout", [(1, 0.3), (2, 0.0)])
def test_rnn_without_dropout_between_layers_is_not_train_mode(layers, dropout):
    """One layer (PyTorch then never drops out: it warns) or no dropout: nothing random."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dropout option adds dropout after all but last ..."
        model = StackedRNN("LSTM", layers, dropout).double()
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = nbderiv.derivatives(model, x)
    assert "train-mode" not in d.codes
    truth = _central_d1(model, x).reshape(d[1].shape)
    np.testing.assert_allclose(d[1], truth, rtol=1e-6, atol=1e-6 * np.abs(truth).max())


def _diagonal_blocks(model, x):
    """dy_n/dx_n from the full cross-point Jacobian (N, d_out, N, d_in)."""
    J = torch.autograd.functional.jacobian(model, x)
    return np.stack([J[n, :, n].numpy() for n in range(len(x))])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batch_norm_without_running_stats_fix_is_not_model_eval(mode):
    """BatchNorm1d(track_running_stats=False) normalizes with the batch's statistics in
    either mode: the coupled-samples finding says so and names the layer, and its fix is
    not model.eval() (which the model may already be in, and which changes nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.Tanh(), nn.Linear(4, 1)).double().train(mode == "train")
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = nbderiv.derivatives(model, x)
    assert d.codes == ["coupled-samples"]  # not train-mode: the layer is the same in eval
    found = [d.finding("coupled-samples"),
             next(f for f in nbderiv.diagnose(model, x, order=1) if f.code == "coupled-samples")]
    for f in found:
        assert "1 (BatchNorm1d) has no running statistics (track_running_stats=False)" \
            in f.message, f.message
        assert "model.eval() does not help" in f.message
        assert "model.eval()" not in f.fix, f.fix
        assert "build 1 (BatchNorm1d) with track_running_stats=True" in f.fix
        assert "LayerNorm" in f.fix and "GroupNorm" in f.fix
    np.testing.assert_allclose(d[1][:, 0], _diagonal_blocks(model, x)[:, 0], rtol=1e-9,
                               atol=1e-12)


def test_batch_norm_with_running_stats_in_training_keeps_the_eval_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(),
                          nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = nbderiv.derivatives(model, x)
    assert set(d.codes) == {"train-mode", "coupled-samples"}
    assert "call model.eval()" in d.finding("coupled-samples").fix
    assert "running statistics (track" not in d.finding("coupled-samples").message
    assert "1 (BatchNorm1d)" in d.finding("train-mode").message
    np.testing.assert_allclose(d[1][:, 0], _diagonal_blocks(model, x)[:, 0], rtol=1e-9,
                               atol=1e-12)


def test_a_where_whose_branch_not_taken_is_nan_is_named():
    """sqrt in the branch torch.where does not take at z < 0: y is finite, d1 is NaN there
    (0 x NaN); the finding says so and its fix, run, gives the one-sided truth."""
    import torch

    x = torch.tensor([[1.0], [-1.0], [4.0]])
    d = nbderiv.derivatives(lambda z: torch.where(z > 0, torch.sqrt(z), 0.0), x)
    f = d.finding("non-finite")
    assert f.points == (1,) and np.isfinite(d.y).all()
    assert "branch" in f.message and "torch.sqrt(torch.where(z > 0, z, 1.0))" in f.fix
    fixed = nbderiv.derivatives(
        lambda z: torch.where(z > 0, torch.sqrt(torch.where(z > 0, z, 1.0)), 0.0), x)
    assert fixed.codes == []
    np.testing.assert_allclose(fixed[1].ravel(), [0.5, 0.0, 0.25])  # 1 / (2 sqrt(x)), 0
    # a NaN output keeps the plain wording
    assert "branch" not in nbderiv.derivatives(torch.log, x).finding("non-finite").message


def test_train_mode_is_read_from_torch_classes_not_from_a_class_name():
    """A class of your own named BatchNormed that standardises with the batch's statistics
    behaves the same in train and eval mode: coupled-samples only, no train-mode (whose fix,
    model.eval(), would change nothing). A subclass of nn.Dropout is a Dropout."""
    torch.manual_seed(0)

    class BatchNormed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                                         torch.nn.Linear(8, 1))

        def forward(self, x):
            return self.n((x - x.mean(0)) / x.std(0))

    m, X = BatchNormed(), torch.rand(12, 2)
    with torch.no_grad():
        assert torch.equal(m.train()(X), m.eval()(X))
    m.train()
    assert nbderiv.derivatives(m, X).codes == ["coupled-samples"]

    class MyDropout(torch.nn.Dropout):
        pass

    net = torch.nn.Sequential(torch.nn.Linear(2, 8), MyDropout(0.5), torch.nn.Linear(8, 1))
    assert "train-mode" in nbderiv.derivatives(net.train(), X).codes


def test_a_custom_backward_that_returns_the_wrong_slope_is_named_among_the_causes():
    """backward returns g * sin(x) for sin: autodiff's slopes are wrong, not 0; the finding
    named only detach / NumPy / no_grad, none of which the model uses. Truth: cos(x)."""
    torch = pytest.importorskip("torch")

    class WrongSin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.sin(x)  # should be cos

    x = torch.linspace(0.3, 2.5, 12, dtype=torch.float64).reshape(-1, 2)
    d = nbderiv.derivatives(lambda z: WrongSin.apply(z).sum(1, keepdim=True), x,
                            progress=False)
    f = d.finding("graph-broken")
    assert f is not None and "custom torch.autograd.Function's backward" in f.message
    assert "gradcheck" in f.fix
    assert np.abs(d[1][:, 0] - np.cos(x.numpy())).max() > 0.1  # autodiff is really off
