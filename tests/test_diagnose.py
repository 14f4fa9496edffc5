"""Findings, one code at a time: a model that triggers it, and the healthy tanh MLP that
must not (no false alarms), in PyTorch and in Keras.

Where a finding makes a claim about numbers (per-point blocks of a coupled model, the size
of the cross-terms, zeros for an unused input), the numbers are checked against an
independent computation (``torch.autograd.functional.jacobian``/``hessian``, closed forms).
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from nets import cancelling_net, kinky_relu  # noqa: E402
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv import findings as dg  # noqa: E402

CODES = ("piecewise-linear", "at-kink", "coupled-samples", "train-mode", "no-input-dependence",
         "flat-region", "input-reshaped", "integer-input", "input-rounded", "low-precision", "non-finite", "graph-broken",
         "saturated", "piecewise-constant")


def tanh_net(d_in=2, d_out=1, width=16, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out)).to(dtype)


def relu_net(d_in=1, act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 1))


class CustomReLU(nn.Module):
    """Nothing in the module tree says ReLU: torch.relu is called inside forward."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(1, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


X2 = torch.rand(30, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
X1 = torch.linspace(-2, 2, 41).reshape(-1, 1)


# -- nbderiv.diagnose is the function --------------------------------------------------------
def test_diagnose_is_the_function_even_after_the_findings_module_is_imported():
    import nbderiv.api  # noqa: F401  (imports nbderiv.findings)

    assert callable(nbderiv.diagnose)
    assert nbderiv.diagnose(tanh_net(), X2) == []


# -- no false alarms --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_healthy_tanh_mlp_raises_no_finding_even_with_the_check(dtype):
    net = tanh_net(d_in=2, d_out=2, dtype=dtype)
    d = nbderiv.derivatives(net, X2.to(dtype), order=3, check=True)
    assert d.findings == [], d.findings
    assert d.check.passed, d.check.summary()
    assert nbderiv.diagnose(net, X2.to(dtype), order=3) == []


def test_healthy_tanh_mlp_with_tuple_input_and_wrt_raises_no_finding():
    class XT(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tanh_net(d_in=3)

        def forward(self, x, t):
            return self.net(torch.cat([x, t], dim=1))

    x, t = X2, X2[:, :1] * 0.5
    d = nbderiv.derivatives(XT(), (x, t), order=2, wrt=[0, 2], check=True)
    assert d.findings == [] and d.check.passed


# -- piecewise-linear -------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU])
def test_piecewise_linear_from_structure(act):
    d = nbderiv.derivatives(relu_net(act=act), X1, order=2)
    f = d.finding("piecewise-linear")
    assert f is not None and f.severity == "warning"
    assert act.__name__ in f.message
    assert "tanh" in f.fix and "softplus" in f.fix
    assert np.all(d[2] == 0)  # the symptom the finding explains


def test_piecewise_linear_only_from_order_2():
    assert "piecewise-linear" not in nbderiv.derivatives(relu_net(), X1, order=1).codes
    assert "piecewise-linear" not in [f.code for f in nbderiv.diagnose(relu_net(), X1, order=1)]


def test_piecewise_linear_from_the_numbers_for_torch_relu_inside_forward():
    model = CustomReLU()
    assert model.forward is not None and not any(isinstance(m, nn.ReLU) for m in model.modules())
    d = nbderiv.derivatives(model, X1, order=2)
    f = d.finding("piecewise-linear")
    assert f is not None and "torch.relu" in f.message
    assert "piecewise-linear" in [g.code for g in nbderiv.diagnose(model, X1)]


def test_piecewise_linear_from_a_wider_probe_when_one_point_cannot_show_a_changing_slope(
        monkeypatch):
    model, x = CustomReLU(), torch.tensor([[0.3]])  # one point: d1 cannot vary across points
    assert "piecewise-linear" in nbderiv.derivatives(model, x, order=2).codes

    def no_probe(*args, **kwargs):
        raise RuntimeError("probe disabled")

    from nbderiv import result_checks

    monkeypatch.setattr(result_checks, "wide_probe_points", no_probe)  # what found it
    assert "piecewise-linear" not in nbderiv.derivatives(model, x, order=2).codes


def test_piecewise_linear_not_raised_for_a_saturated_tanh():
    # in float32 tanh(10) == 1 exactly: d1 == d2 == 0 at the point; the wider probe reaches
    # x = 7 where the slope changes, but it sees curvature there too, so no false alarm; the
    # slope float32 rounds away is 1 - tanh(10)**2 = 8.2e-9 (float64): saturated, the output
    # does depend on x (it said no-input-dependence)
    x = torch.tensor([[10.0]])
    d = nbderiv.derivatives(lambda z: torch.tanh(z), x, order=2)
    assert np.all(d[1] == 0) and np.all(d[2] == 0)
    assert 1 - np.tanh(10.0) ** 2 > 8e-9
    assert d.codes == ["saturated"], [str(f) for f in d.findings]


def test_piecewise_linear_not_raised_for_an_affine_map_or_when_curvature_is_seen():
    affine = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    assert nbderiv.derivatives(affine, X2, order=2).codes == []

    class ReluPlusSquare(nn.Module):  # ReLU modules only, but forward adds a smooth term
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x[:, :1]) + x[:, 1:] ** 2

    d = nbderiv.derivatives(ReluPlusSquare(), X2, order=2)
    assert "piecewise-linear" not in d.codes
    np.testing.assert_allclose(d[2][:, 0, 1, 1], 2.0)


def test_piecewise_linear_numeric_rule_needs_exact_zeros_and_a_changing_slope():
    layers = {"activations": [], "train_mode": [], "opaque": True}
    d1_varies = np.array([[[1.0]], [[2.0]]])
    d1_const = np.array([[[1.0]], [[1.0]]])
    zeros, tiny = np.zeros((2, 1, 1, 1)), np.full((2, 1, 1, 1), 1e-30)

    def wider():  # the wider spread of points: second derivatives 0 there too
        return d1_varies, zeros
    assert dg.piecewise_finding(layers, [d1_varies, zeros], 2, wider) is not None
    # from the points alone (no wider spread to look at): an inflection point may be all it is
    assert dg.piecewise_finding(layers, [d1_varies, zeros], 2) is None
    # curvature at a wider spread: not piecewise linear
    assert dg.piecewise_finding(layers, [d1_varies, zeros], 2,
                                lambda: (d1_varies, np.ones((2, 1, 1, 1)))) is None
    # the forward pass curves at point 1: autodiff's zeros are a cut graph
    assert dg.piecewise_finding(layers, [d1_varies, zeros], 2, wider,
                                lambda: [1]).code == "graph-broken"
    # a model known to be smooth (GELU far out): no claim
    assert dg.piecewise_finding(layers, [d1_varies, zeros], 2, wider, lambda: None) is None
    assert dg.piecewise_finding(layers, [d1_varies, tiny], 2, wider) is None
    assert dg.piecewise_finding(layers, [d1_const, zeros], 2) is None
    assert dg.piecewise_finding(layers, [d1_varies, zeros], 1, wider) is None
    relu_layers = {"activations": ["ReLU"], "train_mode": [], "opaque": False}
    assert dg.piecewise_finding(relu_layers, [d1_const, zeros], 2) is not None
    assert dg.piecewise_finding(relu_layers, [d1_varies, tiny], 2) is None


def test_finding_helpers_on_nan_negative_zero_and_overflowing_rows():
    layers = {"activations": [], "train_mode": [], "opaque": True}
    d1_varies = np.array([[[1.0]], [[2.0]]])
    assert dg.piecewise_finding(layers, [d1_varies, np.full((2, 1, 1, 1), -0.0)], 2,
                                lambda: (d1_varies, np.zeros((2, 1, 1, 1)))) is not None
    assert dg.piecewise_finding(layers, [d1_varies, np.array([0.0, np.nan]).reshape(2, 1, 1, 1)],
                                2) is None  # NaN is not an exact zero
    big = np.finfo(np.float32).max
    rows = np.array([[big, big], [1.0, np.nan], [np.inf, -np.inf], [0.0, 1.0], [-np.inf, 2.0]],
                    dtype=np.float32)
    assert dg.non_finite_points(rows) == [1, 2, 4]  # row 0 sums to inf but every entry is finite
    assert dg.non_finite_points(np.ones((3, 2)), rows[[3, 1, 0]]) == [1]
    d1 = np.array([[[0.0, 1.0]], [[-0.0, np.nan]]])  # (n, d_out, m)
    f = dg.no_dependence_finding(d1, ["y"], ["x", "t"])
    assert f is not None and "y/x" in f.message and "y/t" not in f.message


# -- at-kink ----------------------------------------------------------------------------------
def test_at_kink_for_a_point_exactly_on_a_relu_kink():
    net = relu_net()
    with torch.no_grad():
        net[0].bias.zero_()  # x = 0 gives pre-activations exactly 0
    x = torch.tensor([[-1.0], [0.0], [0.3], [0.0]])
    d = nbderiv.derivatives(net, x, order=1)
    f = d.finding("at-kink")
    assert f is not None and f.points == (1, 3)
    assert "1, 3" in f.message and "convention" in f.message
    assert [g.points for g in nbderiv.diagnose(net, x) if g.code == "at-kink"] == [(1, 3)]
    assert "at-kink" not in nbderiv.derivatives(net, x + 1e-3, order=1).codes


def test_at_kink_seen_through_torch_relu_inside_forward_and_hardtanh_bounds():
    model = CustomReLU()
    with torch.no_grad():
        model.a.bias.zero_()
    assert nbderiv.derivatives(model, torch.tensor([[0.0], [0.5]])).finding("at-kink").points == (0,)
    ht = nn.Sequential(nn.Linear(1, 1), nn.Hardtanh())
    with torch.no_grad():
        ht[0].weight.fill_(1.0)
        ht[0].bias.zero_()
    assert nbderiv.derivatives(ht, torch.tensor([[0.2], [1.0], [-1.0]])).finding(
        "at-kink").points == (1, 2)


# -- coupled-samples --------------------------------------------------------------------------
def bn_train_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()


def test_coupled_samples_results_are_the_true_diagonal_blocks():
    net = bn_train_net()
    X = torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(net, X, order=2)
    assert "coupled-samples" in d.codes and "train-mode" in d.codes

    J = torch.autograd.functional.jacobian(net, X).numpy()  # (N, d_out, N, d_in)
    np.testing.assert_allclose(d[1], np.stack([J[n, :, n, :] for n in range(6)]), atol=1e-12)

    def row(n):
        def f(z):
            return net(torch.cat([X[:n], z.unsqueeze(0), X[n + 1:]]))[n]
        return f
    H = np.stack([torch.autograd.functional.jacobian(
        lambda z, n=n: torch.autograd.functional.jacobian(row(n), z, create_graph=True),
        X[n]).numpy() for n in range(6)])
    np.testing.assert_allclose(d[2], H, atol=1e-10)

    # the message gives the size of the cross-terms that the ones trick would add
    ones_trick = np.einsum("njmi->mji", J)
    expected = np.abs(ones_trick - d[1]).max()
    message = d.finding("coupled-samples").message
    stated = float(re.search(r"add up to as much as ([0-9.e+-]+)", message).group(1))
    assert stated == pytest.approx(expected, rel=1e-2) and expected > 0.1
    assert "6 points" in message


def test_coupled_samples_puts_running_statistics_and_mode_back():
    net = bn_train_net()
    bn = net[1]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    nbderiv.derivatives(net, torch.rand(10, 2, dtype=torch.float64), order=2, check=True)
    nbderiv.diagnose(net, torch.rand(10, 2, dtype=torch.float64))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(bn.num_batches_tracked) == 0 and net.training and bn.training


def test_coupled_samples_not_raised_in_eval_mode():
    net = bn_train_net().eval()
    d = nbderiv.derivatives(net, torch.rand(10, 2, dtype=torch.float64), order=2)
    assert d.codes == [] and d.method != "per-point-blocks"


# -- train-mode -------------------------------------------------------------------------------
def test_train_mode_for_dropout_and_the_mode_is_left_alone():
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1))
    d = nbderiv.derivatives(net, X2, order=1)
    f = d.finding("train-mode")
    assert f is not None and "Dropout" in f.message and "model.eval()" in f.fix
    assert net.training and net[2].training  # nbderiv did not switch to eval
    assert "train-mode" not in nbderiv.derivatives(net.eval(), X2, order=1).codes


def test_train_mode_from_randomness_when_no_layer_says_so():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 8)

        def forward(self, x):
            return torch.nn.functional.dropout(torch.tanh(self.lin(x)), 0.5, training=True)

    f = nbderiv.derivatives(FunctionalDropout(), X2).finding("train-mode")
    assert f is not None and "stochastic" in f.message


def test_train_mode_for_batchnorm_in_training():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    assert "BatchNorm1d" in nbderiv.derivatives(net, X2).finding("train-mode").message


# -- no-input-dependence ------------------------------------------------------------------------
class IgnoresT(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tanh_net(d_in=1)

    def forward(self, x, t):
        return self.net(x)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_no_input_dependence_for_an_unused_argument_gives_zeros(order):
    x, t = X1[:10], X1[10:20]
    d = nbderiv.derivatives(IgnoresT(), (x, t), order=order)
    f = d.finding("no-input-dependence")
    assert f is not None and "y/t" in f.message and f.severity == "info"
    assert d.inputs == ("x", "t")
    assert d[order].dtype == np.float32 and np.isfinite(d[order]).all()
    t_axes = [np.take(d[order], [1], axis=a) for a in range(2, 2 + order)]
    assert all(np.all(a == 0) for a in t_axes)
    assert np.abs(d[1][:, 0, 0]).max() > 0  # x is used


@pytest.mark.parametrize("d_out", [1, 3])
def test_no_input_dependence_for_a_constant_output_gives_zeros_not_none(d_out):
    d = nbderiv.derivatives(lambda x: torch.ones(len(x), d_out), X1[:5], order=3)
    assert "no-input-dependence" in d.codes
    assert "does not depend on the input" in d.finding("no-input-dependence").message
    for k in (1, 2, 3):
        assert d[k].shape == (5, d_out) + (1,) * k and np.all(d[k] == 0)


def test_no_input_dependence_for_dead_relu_points():
    net = relu_net()
    with torch.no_grad():
        net[4].weight.zero_()  # the output ignores the hidden units
    d = nbderiv.derivatives(net, X1, order=1)
    assert "dead ReLU" in d.finding("no-input-dependence").fix


# -- input-reshaped and integer-input -------------------------------------------------------------
def test_input_reshaped_for_a_1d_input():
    d = nbderiv.derivatives(tanh_net(d_in=1), torch.linspace(0, 1, 7), order=1)
    f = d.finding("input-reshaped")
    assert f is not None and "(7,)" in f.message and "(7, 1)" in f.message
    assert "reshape(1, -1)" in f.fix and d[1].shape == (7, 1, 1)


def test_integer_input_is_cast_to_the_model_dtype():
    x = np.arange(1, 7).reshape(-1, 1)
    d = nbderiv.derivatives(tanh_net(d_in=1, dtype=torch.float64), x, order=1)
    f = d.finding("integer-input")
    assert f is not None and "float64" in f.message
    assert d.x.dtype == np.float64 and x.dtype.kind == "i"
    d32 = nbderiv.derivatives(tanh_net(d_in=1), x, order=1)
    assert "float32" in d32.finding("integer-input").message


# -- low-precision ------------------------------------------------------------------------------
def test_low_precision_when_float32_loses_digits():
    x = torch.linspace(-1, 1, 11).reshape(-1, 1)
    d = nbderiv.derivatives(cancelling_net(), x, order=2, check=True)
    f = d.finding("low-precision")
    assert f is not None and "float32" in f.message
    assert "float64" in f.fix and ".double()" in f.fix and "set_floatx('float64')" in f.fix
    assert not d.check.passed and d.check.low_precision
    # the float32 result is genuinely off against the closed form tanh''(x)
    true_d1 = (-2 * np.tanh(x.numpy()) * (1 - np.tanh(x.numpy()) ** 2))[:, :, None]
    assert np.abs(d[1] - true_d1).max() > 1e-3
    # in float64 all is well, and no check means no low-precision finding
    d64 = nbderiv.derivatives(cancelling_net(torch.float64), x.double(), order=2, check=True)
    assert "low-precision" not in d64.codes and d64.check.passed
    assert np.abs(d64[1] - true_d1).max() < 1e-4
    assert "low-precision" not in nbderiv.derivatives(cancelling_net(), x, order=2).codes


def test_low_precision_not_raised_for_kinks_straddled_by_the_differences():
    x = torch.tensor([[-0.9], [0.5 + 3e-5], [0.2], [-0.5 - 2e-5]])
    d = nbderiv.derivatives(kinky_relu(), x, order=2, check=True)
    assert "low-precision" not in d.codes and not d.check.passed


# -- non-finite ---------------------------------------------------------------------------------
def test_non_finite_in_x_pointed_out_by_index():
    x = X2.clone()
    x[3, 1] = float("nan")
    x[7, 0] = float("inf")
    d = nbderiv.derivatives(tanh_net(), x, order=1)
    f = d.finding("non-finite")
    assert f is not None and f.points == (3, 7) and f.severity == "error"
    assert "3, 7" in f.message and "in x" in f.message
    assert d.codes.count("non-finite") == 1  # NaN results at those points are not repeated


def test_non_finite_in_the_results_pointed_out_by_index():
    d = nbderiv.derivatives(torch.log, torch.tensor([1.0, 0.0, 2.0, -1.0]), order=2)
    f = d.finding("non-finite")
    assert f is not None and f.points == (1, 3) and "output or its derivatives" in f.message
    assert "non-finite" not in nbderiv.derivatives(torch.log, torch.tensor([1.0, 2.0])).codes


# -- diagnose() agrees with derivatives() on the tutorial models --------------------------------
def _tutorial_models():
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
    bn = nn.Sequential(nn.Linear(1, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.linspace(-1, 1, 20).reshape(-1, 1)
    return {
        "relu": (relu_net(), x, {"piecewise-linear"}),
        "tanh": (tanh_net(d_in=1), x, set()),
        "bn-train": (bn, x, {"train-mode", "coupled-samples"}),
        "dropout": (dropout, x, {"train-mode"}),
        "int-input": (tanh_net(d_in=1), np.arange(1, 7).reshape(-1, 1), {"integer-input"}),
        "1d-input": (tanh_net(d_in=1), np.linspace(-1, 1, 9), {"input-reshaped"}),
        "case-A": (relu_net(), np.arange(1, 7), {"integer-input", "input-reshaped",
                                                  "piecewise-linear"}),
        "custom-relu": (CustomReLU(), x, {"piecewise-linear"}),
        "ignores-t": (IgnoresT(), (x, x), {"no-input-dependence"}),
    }


@pytest.mark.parametrize("name", list(_tutorial_models()))
def test_diagnose_agrees_with_derivatives(name):
    model, x, expected = _tutorial_models()[name]
    computed = nbderiv.derivatives(model, x, order=2).codes
    probed = [f.code for f in nbderiv.diagnose(model, x, order=2)]
    assert set(computed) == expected
    assert sorted(probed) == sorted(computed)


# ================================ Keras / TensorFlow ==========================================
HAVE_TF_BACKEND = importlib.util.find_spec("nbderiv.backends.tensorflow") is not None
needs_keras = pytest.mark.skipif(not HAVE_TF_BACKEND, reason="Keras backend not available")


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


def keras_mlp(keras, act="tanh", d_in=1, d_out=1, width=16, seed=0, dtype="float32", extra=()):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((d_in,), dtype=dtype),
              keras.layers.Dense(width, activation=act, dtype=dtype), *extra,
              keras.layers.Dense(width, activation=act, dtype=dtype),
              keras.layers.Dense(d_out, dtype=dtype)]
    return keras.Sequential(layers)


KX1 = np.linspace(-2, 2, 21).reshape(-1, 1).astype(np.float32)
KX2 = np.random.default_rng(0).uniform(-1, 1, (20, 2)).astype(np.float32)


@needs_keras
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_healthy_tanh_mlp_raises_no_finding(keras, dtype):
    model = keras_mlp(keras, d_in=2, d_out=2, dtype=dtype)
    d = nbderiv.derivatives(model, KX2.astype(dtype), order=3, check=True)
    assert d.framework == "tensorflow"
    assert d.findings == [], d.findings
    assert d.check.passed, d.check.summary()
    assert nbderiv.diagnose(model, KX2.astype(dtype), order=3) == []


@needs_keras
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "relu6"])
def test_keras_dense_relu_net_is_piecewise_linear(keras, act):
    model = keras_mlp(keras, act=act)
    d = nbderiv.derivatives(model, KX1, order=2)
    f = d.finding("piecewise-linear")
    assert f is not None and act in f.message and np.all(d[2] == 0)
    assert "piecewise-linear" in [g.code for g in nbderiv.diagnose(model, KX1)]
    assert "piecewise-linear" not in nbderiv.derivatives(model, KX1, order=1).codes


@needs_keras
def test_keras_relu_layer_and_tf_nn_relu_in_a_subclassed_model(keras):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    layered = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16), keras.layers.ReLU(),
                                keras.layers.Dense(1)])
    assert "piecewise-linear" in nbderiv.derivatives(layered, KX1, order=2).codes

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(16), keras.layers.Dense(1)

        def call(self, x):
            return self.b(tf.nn.relu(self.a(x)))

    assert "piecewise-linear" in nbderiv.derivatives(Sub(), KX1, order=2).codes


@needs_keras
def test_keras_case_a_int_array_of_shape_n(keras):
    model = keras_mlp(keras, act="relu")
    x = np.arange(1, 7)
    d = nbderiv.derivatives(model, x, order=2)
    assert {"integer-input", "input-reshaped", "piecewise-linear"} <= set(d.codes)
    assert "float32" in d.finding("integer-input").message
    assert sorted(f.code for f in nbderiv.diagnose(model, x)) == sorted(d.codes)


@needs_keras
def test_keras_at_kink(keras):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="relu",
                                                                     bias_initializer="zeros"),
                              keras.layers.Dense(1)])
    x = np.array([[-1.0], [0.0], [0.4]], dtype=np.float32)
    d = nbderiv.derivatives(model, x)
    assert d.finding("at-kink") is not None and d.finding("at-kink").points == (1,)
    assert "at-kink" not in nbderiv.derivatives(model, x + 1e-3).codes


@needs_keras
def test_keras_train_mode_dropout_and_batchnorm_not_raised_in_inference(keras):
    drop = keras_mlp(keras, extra=(keras.layers.Dropout(0.5),))
    bn = keras_mlp(keras, extra=(keras.layers.BatchNormalization(),))
    # a Keras model called plainly runs in inference mode: no train-mode, no coupling
    assert nbderiv.derivatives(drop, KX1, order=2).codes == []
    assert nbderiv.derivatives(bn, KX1, order=2).codes == []


@needs_keras
def test_keras_coupled_samples_and_train_mode_when_a_layer_runs_in_training(keras):
    import tensorflow as tf

    class TrainingBN(keras.Model):
        """BatchNormalization forced into training mode inside call."""

        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(8, dtype="float64")
            self.bn = keras.layers.BatchNormalization(dtype="float64")
            self.b = keras.layers.Dense(2, dtype="float64")

        def call(self, x):
            return self.b(tf.tanh(self.bn(self.a(x), training=True)))

    keras.utils.set_random_seed(0)
    model = TrainingBN()
    x = KX2[:6].astype(np.float64)
    model(x)  # build
    before = [v.numpy().copy() for v in model.variables]
    d = nbderiv.derivatives(model, x, order=1)
    assert "coupled-samples" in d.codes
    # the true per-point blocks: the diagonal of the full batch Jacobian
    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = model(X)
    J = tape.jacobian(y, X).numpy()
    for v, b in zip(model.variables, before, strict=True):  # put the moving statistics back
        v.assign(b)
    np.testing.assert_allclose(d[1], np.stack([J[n, :, n, :] for n in range(len(x))]),
                               atol=1e-10)
    nbderiv.diagnose(model, x)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables,
                                                            strict=True))

    class TrainingDropout(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)
            self.drop = keras.layers.Dropout(0.5)

        def call(self, x):
            return self.b(self.drop(self.a(x), training=True))

    f = nbderiv.derivatives(TrainingDropout(), KX2).finding("train-mode")
    assert f is not None and "stochastic" in f.message


@needs_keras
def test_keras_no_input_dependence_for_an_unused_input(keras):
    keras.utils.set_random_seed(0)
    xi, ti = keras.Input((1,), name="x"), keras.Input((1,), name="t")
    out = keras.layers.Dense(1)(keras.layers.Dense(8, activation="tanh")(xi))
    model = keras.Model([xi, ti], out)
    d = nbderiv.derivatives(model, (KX1, KX1), order=2)
    f = d.finding("no-input-dependence")
    assert f is not None and "/t" in f.message
    assert np.all(d[2][..., 1] == 0) and np.all(d[2][:, :, 1, :] == 0)
    assert np.isfinite(d[2]).all()


@needs_keras
def test_keras_low_precision(keras):
    delta = 1e-5
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, activation="tanh"),
                              keras.layers.Dense(1, use_bias=False)])
    model.layers[0].set_weights([np.ones((1, 2), np.float32),
                                 np.array([0.0, delta], np.float32)])
    model.layers[1].set_weights([np.array([[-1 / delta], [1 / delta]], np.float32)])
    d = nbderiv.derivatives(model, np.linspace(-1, 1, 11).reshape(-1, 1), order=2, check=True)
    f = d.finding("low-precision")
    assert f is not None and "set_floatx('float64')" in f.fix


@needs_keras
def test_keras_non_finite_in_x(keras):
    x = KX2.copy()
    x[4, 0] = np.nan
    d = nbderiv.derivatives(keras_mlp(keras, d_in=2), x)
    assert d.finding("non-finite").points == (4,)


@needs_keras
def test_keras_diagnose_agrees_with_derivatives_on_tutorial_models(keras):
    models = {
        "relu": (keras_mlp(keras, act="relu"), KX1),
        "tanh": (keras_mlp(keras), KX1),
        "int": (keras_mlp(keras), np.arange(1, 7).reshape(-1, 1)),
        "1d": (keras_mlp(keras), np.linspace(-1, 1, 9)),
    }
    for name, (model, x) in models.items():
        computed = nbderiv.derivatives(model, x, order=2).codes
        probed = [f.code for f in nbderiv.diagnose(model, x, order=2)]
        assert sorted(probed) == sorted(computed), name


# ================================ the documentation ===========================================
DOC = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "findings.md"


def _run_doc_examples(text, name):
    import doctest

    text = "\n".join("" if line.startswith("```") else line for line in text.splitlines())
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, name, str(DOC), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = []
    runner.run(test, out=out.append)
    assert runner.failures == 0 and runner.tries > 0, "".join(out)
    return test


def test_documented_examples_run_and_show_every_code():
    text = DOC.read_text()
    torch_part, _, _ = text.partition("### Keras")
    _run_doc_examples(torch_part, "findings.md (torch)")
    for code in CODES:
        assert f"### `{code}`" in text or f"`{code}`" in text.split("All examples below")[1], code


@needs_keras
def test_documented_keras_example_runs(keras):
    text = DOC.read_text()
    setup = text.split("```python", 2)[1].split("```")[0]  # the imports block
    _run_doc_examples(setup + text.partition("### Keras")[2], "findings.md (Keras)")


@pytest.mark.parametrize("m", [1, 3, 40])
def test_saturation_sizes_equal_the_plain_formulas(m):
    """The reductions behind `saturated` against the plain numpy formulas."""
    from nbderiv.result_checks import _scaled_max, _size

    rng = np.random.default_rng(m)
    d1 = rng.normal(size=(70, 5, m)).astype(np.float32)
    x_size = rng.uniform(0.5, 2.0, size=m)
    np.testing.assert_allclose(_scaled_max(d1, x_size),
                               (np.abs(d1.astype(np.float64)) * x_size).max(axis=(0, 2)))
    y = rng.normal(size=(70, 5))
    np.testing.assert_allclose(_size(y), np.abs(y).max(axis=0) + np.ptp(y, axis=0))


def test_a_stationary_point_is_no_lack_of_dependence():
    """At a stationary point the first derivative is 0 and right, and the output still
    changes with the input (like h**2 or h**3): no no-input-dependence (it said the output
    did not depend on the input), the derivatives as the closed form has them; an input the
    model ignores, and a constant output, still get the finding."""
    d = nbderiv.derivatives(lambda z: (z ** 2).sum(1, keepdim=True), torch.zeros(4, 2), order=2)
    assert "no-input-dependence" not in d.codes, [str(f) for f in d.findings]
    np.testing.assert_array_equal(d[1], 0.0)
    np.testing.assert_array_equal(d[2][:, 0], np.broadcast_to(2 * np.eye(2), (4, 2, 2)))
    d = nbderiv.derivatives(lambda z: z ** 3, torch.zeros(3, 1), order=3)
    assert "no-input-dependence" not in d.codes and np.all(d[3] == 6.0)
    ignored = nbderiv.derivatives(lambda z: torch.sin(z[:, :1]), torch.rand(5, 2))
    assert ignored.finding("no-input-dependence") is not None
    assert "y/x[1]" in ignored.finding("no-input-dependence").message
    constant = nbderiv.derivatives(lambda z: z[:, :1] * 0 + 1.0, torch.rand(5, 2))
    assert constant.codes == ["no-input-dependence"]


def test_random_numbers_drawn_in_forward_of_an_eval_model():
    """Noise added in forward (the model in eval mode): train-mode says that no layer in
    training mode explains the randomness, does not tell to call model.eval() alone, and the
    derivatives are those of the deterministic part (jacrev)."""
    torch.manual_seed(0)
    lin, out = nn.Linear(4, 8), nn.Linear(8, 1)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.o = lin, out

        def forward(self, x):
            return self.o(torch.tanh(self.l(x))) + 0.01 * torch.randn(len(x), 1)

    m = Noisy().eval()
    x = torch.rand(6, 4)
    d = nbderiv.derivatives(m, x)
    f = d.finding("train-mode")
    assert f is not None and "no layer in training mode" in f.message
    assert "manual_seed" in f.fix
    from torch.func import jacrev, vmap

    ref = vmap(jacrev(lambda p: out(torch.tanh(lin(p)))))(x).detach().numpy()
    np.testing.assert_allclose(d[1], ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, model, zero_pairs", [
    ("round", lambda z: torch.round(3 * z), None),
    ("integer cast", lambda z: (3 * z).long().float(), None),
    ("argmax", lambda z: torch.stack([z[:, 0], 1 - z[:, 0]], 1).argmax(1, keepdim=True).float()
     + 0 * z[:, 1:], "y/x[1]"),
], ids=["round", "integer cast", "argmax"])
def test_piecewise_constant_models(name, model, zero_pairs):
    """Rounding inside the model: every derivative 0, the output changing in jumps only. It
    is piecewise-constant (it was no-input-dependence, "does not depend on the input"); an
    input the model really ignores keeps no-input-dependence; a dead ReLU region (the output
    starts to change at every step once a unit wakes up) is no piecewise-constant."""
    x = torch.rand(7, 2, generator=torch.Generator().manual_seed(3))
    d = nbderiv.derivatives(model, x)
    np.testing.assert_array_equal(d[1], 0.0)
    assert "piecewise-constant" in d.codes, [str(f) for f in d.findings]
    if zero_pairs:
        assert zero_pairs in d.finding("no-input-dependence").message
    torch.manual_seed(0)
    dead = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        dead[0].weight.fill_(1.0)
        dead[0].bias.fill_(-2.5)  # off for x in [0, 1]^2, on a little further out
    assert nbderiv.derivatives(dead, x).codes == ["no-input-dependence"]


def test_a_steep_smooth_step_is_not_piecewise_constant():
    """tanh(1000 (x - 0.3)): saturated (d1 exactly 0 in float32) at these points, and the
    sweep crosses its transition within one step, like a jump; halving that interval down to
    a few rounding steps of x shows a smooth change, so no piecewise-constant claim (it said
    the model rounds on the way)."""
    x = torch.tensor([[0.5], [0.6], [0.05], [0.8]])
    d = nbderiv.derivatives(lambda z: torch.tanh(1000 * (z - 0.3)), x)
    assert "piecewise-constant" not in d.codes, [str(f) for f in d.findings]
    assert "piecewise-constant" in nbderiv.derivatives(lambda z: torch.floor(4 * z), x).codes


@pytest.mark.parametrize("f, order", [
    (lambda x: torch.sign(x) * x ** 2, 1),
    (lambda x: x.abs() ** 3, 2),
    (lambda x: torch.where(x.abs() < 1, 0.5 * x ** 2, x.abs() - 0.5), 1),  # Huber
], ids=["sign(x) x^2", "|x|^3", "huber"])
def test_a_stationary_point_on_a_kink_candidate_is_no_lack_of_dependence(f, order):
    """At 0 these call sign / abs / a comparison, so 0 is a kink candidate, but their one-sided
    slopes agree there (no kink): the forward pass is compared there too and sees the output
    change, so no no-input-dependence (points that are candidates only were left out of that
    comparison, and with none left the finding went out unconfirmed); |x| at 0 is a confirmed
    kink and gets at-kink alone."""
    d = nbderiv.derivatives(f, torch.zeros(2, 1), order=order)
    assert d.codes == [], [str(g) for g in d.findings]
    np.testing.assert_array_equal(d[1], 0.0)
    assert nbderiv.derivatives(lambda x: x.abs(), torch.zeros(3, 1)).codes == ["at-kink"]


def test_a_stationary_point_is_no_saturation():
    """cos at 0 and pi: the gradient vanishes there, but the output changes evenly on both
    sides (d2 = -1, 1): no saturated finding (it blamed saturating units); a saturated tanh
    keeps it."""
    d = nbderiv.derivatives(torch.cos, torch.tensor([[0.0], [np.pi]]), order=2)
    assert "saturated" not in d.codes, [str(f) for f in d.findings]
    np.testing.assert_allclose(d[2][:, 0, 0, 0], [-1.0, 1.0], atol=1e-6)
    flat = nbderiv.derivatives(torch.tanh, torch.tensor([[8.0], [9.0], [-8.5]]))
    assert "saturated" in flat.codes


def test_receptive_fields_and_causality_are_no_input_independence():
    # a segmentation map's pixel does not depend on far input pixels, a causal GRU's early
    # step not on later inputs: zero pairs by structure, not inputs the model ignores
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1)).double()
    x = torch.rand(5, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(seg, x)
    assert "no-input-dependence" not in d.codes, d.findings
    truth = torch.func.vmap(torch.func.jacrev(lambda p: seg(p[None])[0]))(x).detach().numpy()
    np.testing.assert_allclose(d[1], truth, atol=1e-12)
    assert (truth.reshape(5, 32, 32) == 0).all(axis=0).any()  # the zero pairs are there

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.l = nn.GRU(2, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, z):
            return self.l(self.g(z)[0])
    gru = Causal().double().eval()
    xs = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert "no-input-dependence" not in nbderiv.derivatives(gru, xs).codes


def test_an_image_channel_no_output_uses_is_still_no_input_dependence():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    seg = lambda z: conv(z[:, :1])  # noqa: E731 - channel 1 of the input is never read
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(seg, x)
    f = d.finding("no-input-dependence")
    assert f is not None and "x[1,0,0]" in f.message, d.findings
    assert not np.any(d[1].reshape(3, 32, 2, 16)[..., 1, :])  # the truth: channel 1 unused
