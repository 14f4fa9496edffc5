"""``nbderiv.explain`` on students' own derivative code (torch and TensorFlow/Keras), and the
``%%nnderiv explain`` cell magic through a real IPython shell.

Every snippet is student code run as written; its expected code is fixed, and the truth
nbderiv reports is checked against something independent: closed forms, float64 central
differences, or ``torch.func`` (vmap of nested jacrev)."""

from __future__ import annotations

import copy
import os
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402
from nbderiv.explain_fix import fix_code  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# -- independent truths -------------------------------------------------------------------------
def pair(X):  # y = x1**2 sin(x2), one output (case B)
    return (X[:, 0] ** 2 * torch.sin(X[:, 1])).unsqueeze(1)


def pair_d(X, k):
    a, b = X[:, 0], X[:, 1]
    if k == 1:
        return np.stack([2 * a * np.sin(b), a ** 2 * np.cos(b)], 1)[:, None, :]
    h = np.empty((len(X), 1, 2, 2))
    h[:, 0, 0, 0] = 2 * np.sin(b)
    h[:, 0, 0, 1] = h[:, 0, 1, 0] = 2 * a * np.cos(b)
    h[:, 0, 1, 1] = -(a ** 2) * np.sin(b)
    return h


def two(X):  # two outputs of one input: (sin x, x**3)
    return torch.cat([torch.sin(X), X ** 3], dim=1)


def two_d(X, k):
    x = X[:, 0]
    d = {1: (np.cos(x), 3 * x ** 2), 2: (-np.sin(x), 6 * x), 3: (-np.cos(x), 6 + 0 * x)}[k]
    return np.stack(d, 1).reshape((len(x), 2) + (1,) * k)


def func_truth(model, x, k):
    """torch.func: vmap of k nested jacrev, in float64 on a copy."""
    import copy

    m = copy.deepcopy(model).double() if isinstance(model, torch.nn.Module) else model
    X = torch.as_tensor(np.asarray(x.detach() if hasattr(x, "detach") else x),
                        dtype=torch.float64).reshape(len(x), -1)
    f = lambda p: m(p.unsqueeze(0)).reshape(-1)  # noqa: E731
    for _ in range(k):
        f = torch.func.jacrev(f)
    return torch.func.vmap(f)(X).detach().numpy()


def central(model, x, h=1e-5):
    """float64 central differences of the forward pass (order 1), (N, d_out, d_in), moving
    one point at a time (the others fixed: right for models that couple points too)."""
    X = np.asarray(x.detach() if hasattr(x, "detach") else x, dtype=np.float64).reshape(len(x), -1)
    out = np.zeros((len(X), 1, X.shape[1]))
    with torch.no_grad():
        for n in range(len(X)):
            for i in range(X.shape[1]):
                e = np.zeros_like(X)
                e[n, i] = h
                up = model(torch.tensor(X + e)).numpy().reshape(len(X), -1)
                dn = model(torch.tensor(X - e)).numpy().reshape(len(X), -1)
                out[n, :, i] = (up[n] - dn[n]) / (2 * h)
    return out


SETUP = """
import numpy as np, torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
net1 = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
relu = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
bn = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                         torch.nn.Linear(8, 1))
X2 = torch.rand(12, 2, dtype=torch.float64) * 2 - 1
x2 = torch.rand(12, 2) * 2 - 1
x1 = torch.linspace(-1.5, 1.5, 15).reshape(-1, 1)
x1d = torch.linspace(-1.5, 1.5, 15, dtype=torch.float64).reshape(-1, 1)

class Cut(torch.nn.Module):          # a forward pass through NumPy: the graph is cut
    def forward(self, x):
        return torch.as_tensor(np.tanh(x.detach().numpy())) + 0 * x
cut = Cut()
"""

# (id, model, x, student code defining `mine`, order, expected code, truth: "closed"/"func"/"fd")
TORCH = [
    ("ones-trick-one-output", "net1", "x1",
     "x = x1.clone().requires_grad_(True); y = net1(x)\n"
     "mine, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))", None,
     "correct-reshaped", "func"),
    ("vmap-jacrev", "net", "x2", "mine = torch.func.vmap(torch.func.jacrev(net))(x2)", None,
     "correct", "func"),
    ("closed-form-grad-float64", "pair", "X2",
     "x = X2.clone().requires_grad_(True); y = pair(x)\n"
     "mine, = torch.autograd.grad(y, x, torch.ones_like(y))", 1, "correct-reshaped", "closed"),
    ("closed-form-hessian", "pair", "X2",
     "mine = torch.func.vmap(torch.func.hessian(lambda p: pair(p[None])[0, 0]))(X2)", 2,
     "correct-reshaped", "closed"),
    ("hessian-in-layout", "pair", "X2",
     "mine = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(lambda p: pair(p[None])[0])))"
     "(X2)", None, "correct", "closed"),
    ("ones-trick-3-outputs", "net", "x2",
     "x = x2.clone().requires_grad_(True); y = net(x)\n"
     "mine, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))", None,
     "summed-outputs", "func"),
    ("backward-3-outputs", "net", "x2",
     "x = x2.clone().requires_grad_(True); net(x).sum().backward(); mine = x.grad", 1,
     "summed-outputs", "func"),
    ("second-order-summed", "two", "x1d",
     "x = x1d.clone().requires_grad_(True); y = two(x)\n"
     "g, = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)\n"
     "mine, = torch.autograd.grad(g, x, torch.ones_like(g))", 2, "summed-outputs", "closed"),
    ("functional-jacobian", "net", "x2[:5]",
     "mine = torch.autograd.functional.jacobian(net, x2[:5])", None,
     "cross-sample-jacobian", "func"),
    ("functional-jacobian-1d", "net1", "x1",
     "mine = torch.autograd.functional.jacobian(lambda t: net1(t).squeeze(1), x1)"
     ".squeeze(-1)", None, "cross-sample-jacobian", "func"),
    ("inputs-first", "net", "x2",
     "mine = torch.func.vmap(torch.func.jacrev(net))(x2).permute(0, 2, 1)", 1,
     "axes-permuted", "func"),
    ("stacked-per-output", "net", "x2",
     "x = x2.clone().requires_grad_(True); y = net(x)\n"
     "mine = torch.stack([torch.autograd.grad(y[:, j].sum(), x, retain_graph=True)[0]\n"
     "                    for j in range(3)])", None, "axes-permuted", "func"),
    ("first-called-second", "two", "x1d",
     "x = x1d.clone().requires_grad_(True); y = two(x)\n"
     "mine = torch.stack([torch.autograd.grad(y[:, j].sum(), x, retain_graph=True)[0]\n"
     "                    for j in range(2)], 1)", 2, "wrong-order", "closed"),
    ("second-called-first", "two", "x1d",
     "f = lambda p: two(p[None])[0]\n"
     "mine = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(f)))(x1d).reshape(15, 2, 1, 1)",
     1, "wrong-order", "closed"),
    ("third-order-inferred", "two", "x1d",
     "f = lambda p: two(p[None])[0]\n"
     "mine = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(f))))(x1d)",
     None, "correct", "closed"),
    ("batchnorm-ones-trick", "bn", "x1",
     "x = x1.clone().requires_grad_(True); y = bn(x)\n"
     "mine, = torch.autograd.grad(y, x, torch.ones_like(y))", None, "coupled-samples", "fd"),
    ("grad-of-detached-copy", "net1", "x1",
     "x = x1.clone().requires_grad_(True); y = net1(x.detach())\n"
     "mine = x.grad", None, "none", "func"),
    ("not-requires-grad", "net1", "x1", "y = net1(x1); y.sum().backward(); mine = x1.grad", None,
     "none", "func"),
    ("allow-unused-materialized", "net1", "x1",
     "x = x1.clone().requires_grad_(True); y = net1(x.detach() * 1.0)\n"
     "mine = torch.zeros_like(x)  # what materialize_grads=True gives", None,
     "zeros-graph-broken", "func"),
    ("numpy-in-forward", "cut", "x1d",
     "x = x1d.clone().requires_grad_(True)\n"
     "mine, = torch.autograd.grad(cut(x).sum(), x)", None, "zeros-graph-broken", "fd"),
    ("one-input-detached", "pair", "X2",
     "x = X2.clone().requires_grad_(True)\n"
     "y = pair(torch.stack([x[:, 0], x[:, 1].detach()], 1))\n"
     "mine, = torch.autograd.grad(y.sum(), x)", 1, "zeros-graph-broken", "closed"),
    ("chain-rule-factor", "net1", "x1",
     "scale = 2.0   # the net was fed x / 2, the student forgot the factor 1/2\n"
     "mine = 2.0 * torch.func.vmap(torch.func.jacrev(net1))(x1)", 1, "wrong", "func"),
    ("relu-second-zero", "relu", "x1",
     "mine = torch.zeros(15, 1, 1, 1)", 2, "correct", "func"),
    ("float64-close-but-float32-off", "pair", "X2",
     "mine = torch.tensor(pair_d(X2.numpy(), 1)) * (1 + 1e-5)", 1, "wrong", "closed"),
    ("numpy-list", "pair", "X2", "mine = pair_d(X2.numpy(), 1).tolist()", 1, "correct",
     "closed"),
    ("outputs-not-derivative", "net1", "x1", "mine = net1(x1)", None, "wrong-order", "func"),
]

TF_SETUP = """
import numpy as np, tensorflow as tf, keras
keras.utils.set_random_seed(0)
kmodel = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="tanh"),
                           keras.layers.Dense(3)])
kone = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16, activation="tanh"),
                         keras.layers.Dense(1)])
kx = tf.random.uniform((10, 2), -1, 1)
kx1 = tf.reshape(tf.linspace(-1.0, 1.0, 10), (-1, 1))
"""

TF = [
    ("tf-not-watched", "kmodel", "kx",
     "with tf.GradientTape() as tape:\n    y = kmodel(kx)\nmine = tape.gradient(y, kx)", None,
     "none"),
    ("tf-gradient-multi-output", "kmodel", "kx",
     "with tf.GradientTape() as tape:\n    tape.watch(kx)\n    y = kmodel(kx)\n"
     "mine = tape.gradient(y, kx)", None, "summed-outputs"),
    ("tf-batch-jacobian", "kmodel", "kx",
     "with tf.GradientTape() as tape:\n    tape.watch(kx)\n    y = kmodel(kx)\n"
     "mine = tape.batch_jacobian(y, kx)", None, "correct"),
    ("tf-jacobian", "kone", "kx1",
     "with tf.GradientTape() as tape:\n    tape.watch(kx1)\n    y = kone(kx1)\n"
     "mine = tape.jacobian(y, kx1)", None, "cross-sample-jacobian"),
    ("tf-one-output-gradient", "kone", "kx1",
     "with tf.GradientTape() as tape:\n    tape.watch(kx1)\n    y = kone(kx1)\n"
     "mine = tape.gradient(y, kx1)", 1, "correct-reshaped"),
    ("tf-numpy-inside-tape", "kone", "kx1",
     "with tf.GradientTape() as tape:\n    tape.watch(kx1)\n"
     "    y = tf.constant(kone(kx1).numpy())\nmine = tape.gradient(y, kx1)", None, "none"),
    ("tf-second-derivative", "kone", "kx1",
     "with tf.GradientTape() as t2:\n    t2.watch(kx1)\n    with tf.GradientTape() as t1:\n"
     "        t1.watch(kx1)\n        y = kone(kx1)\n    g = t1.gradient(y, kx1)\n"
     "mine = t2.gradient(g, kx1)", 2, "correct-reshaped"),
    ("tf-second-is-first", "kone", "kx1",
     "with tf.GradientTape() as t1:\n    t1.watch(kx1)\n    y = kone(kx1)\n"
     "mine = t1.gradient(y, kx1)", 2, "wrong-order"),
    ("tf-integer-input", "kone", "tf.constant([[1], [2], [3]])",
     "xi = tf.constant([[1], [2], [3]])\nwith tf.GradientTape() as tape:\n    tape.watch(xi)\n"
     "    y = kone(xi)\nmine = tape.gradient(y, xi)", None, "none"),
    ("tf-transposed", "kmodel", "kx",
     "with tf.GradientTape() as tape:\n    tape.watch(kx)\n    y = kmodel(kx)\n"
     "mine = tf.transpose(tape.batch_jacobian(y, kx), [0, 2, 1])", None, "axes-permuted"),
    ("tf-stop-gradient", "kone", "kx1",
     "with tf.GradientTape() as tape:\n    tape.watch(kx1)\n"
     "    y = kone(tf.stop_gradient(kx1))\n"
     "mine = tape.gradient(y, kx1, unconnected_gradients='zero')", None, "zeros-graph-broken"),
]


@pytest.fixture(scope="module")
def tns():
    ns = {"pair": pair, "two": two, "pair_d": pair_d}
    exec(SETUP, ns)  # noqa: S102
    return ns


def _expected_first_line(e):
    assert repr(e).startswith(f"[{e.code}] ") and f"[{e.code}]" in e._repr_html_()


@pytest.mark.parametrize("case", TORCH, ids=[c[0] for c in TORCH])
def test_torch_snippets(tns, case):
    _, model_name, x_expr, code, order, expected, truth_kind = case
    ns = dict(tns)
    exec(code, ns)  # noqa: S102 - the student's code, as written
    model, x = ns[model_name], eval(x_expr, ns)  # noqa: S307
    e = nbderiv.explain(ns["mine"], model, x, order)
    assert e.code == expected, repr(e)
    _expected_first_line(e)
    assert e.message and (e.fix or e.code == "correct")
    k = e.order
    X = np.asarray(x.detach(), dtype=np.float64).reshape(len(x), -1)
    if truth_kind == "closed":
        want = {"pair": pair_d, "two": two_d}[model_name](X, k)
    elif truth_kind == "func":
        want = func_truth(model, x, k)
    else:  # fd: float64 central differences of the forward pass (order 1)
        want = central(model.double() if hasattr(model, "double") else model, x)
        if hasattr(model, "float"):
            model.float()
    tol = 1e-3 if e.truth.dtype == np.float32 else 1e-7
    np.testing.assert_allclose(e.truth, want, rtol=tol, atol=tol * np.abs(want).max() + 1e-9)


def test_torch_messages_name_shapes_and_numbers(tns):
    ns = dict(tns)
    exec(TORCH[5][3], ns)  # noqa: S102 - ones trick, 3 outputs
    e = nbderiv.explain(ns["mine"], ns["net"], ns["x2"])
    assert "(12, 2)" in e.message and "3 outputs" in e.message and "(12, 3, 2)" in e.message
    # the numbers it quotes are the sum and the per-output values at that point
    T = func_truth(ns["net"], ns["x2"], 1)
    n = int(e.message.split("at point ")[1].split(":")[0])
    quoted = float(e.message.split("yours ")[1].split(",")[0])
    assert abs(quoted - T[n].sum(0)[np.abs(T - T[:, :1]).reshape(len(T), -1).argmax() % 2]) \
        < 1e-3 or abs(quoted - T[n].sum(0)).min() < 1e-3

    e = nbderiv.explain(2.0 * func_truth(ns["net1"], ns["x1"], 1), ns["net1"], ns["x1"], 1)
    assert e.code == "wrong" and "2 times the truth" in e.message and "point" in e.message

    e = nbderiv.explain(func_truth(ns["net1"], ns["x1"], 1).reshape(-1), ns["net1"], ns["x1"])
    assert e.code == "correct-reshaped" and "reshape(15, 1, 1)" in e.message

    e = nbderiv.explain(np.ones((7, 3)), ns["net1"], ns["x1"])
    assert e.code == "wrong" and "(7, 3)" in e.message and "fits no derivative" in e.message


def test_wrong_says_where_and_by_how_much(tns):
    T = pair_d(tns["X2"].numpy(), 1)
    mine = T.copy()
    mine[4, 0, 1] += 0.5
    e = nbderiv.explain(mine, pair, tns["X2"], 1)
    assert e.code == "wrong"
    assert "1 of 24 entries" in e.message and "point 4, output 0, input 1" in e.message
    assert "0.5" in e.message


def test_none_causes_fit_the_code(tns):
    x = tns["x1"].clone()
    e = nbderiv.explain(None, tns["net1"], x)
    assert e.code == "none" and "requires_grad is False" in e.message
    leaf = tns["x1"].clone().requires_grad_(True)
    e = nbderiv.explain(None, tns["net1"], leaf * 2)
    assert "not a leaf" in e.message and "retain_grad" in e.fix
    e = nbderiv.explain(None, tns["net1"], np.linspace(0, 1, 5))
    assert "not a torch tensor" in e.message
    e = nbderiv.explain(None, lambda t: torch.ones(len(t), 1), torch.rand(4, 1), 1)
    assert "does not depend" in e.message


def test_none_of_a_model_that_cuts_its_graph_states_the_true_size(tns):
    """The truth quoted for None is the central-difference one (autodiff says 0 there)."""
    x = tns["x1"].clone().requires_grad_(True)
    e = nbderiv.explain(None, tns["cut"], x)
    assert e.code == "none" and "cuts the graph" in e.message
    np.testing.assert_allclose(e.truth, central(tns["cut"], x), rtol=1e-4, atol=1e-6)
    assert f"largest value {float(np.abs(e.truth).max()):.4g})" in e.message


def test_reshape_fix_of_x_grad_assigns_a_new_name(tns):
    """x.grad = x.grad.reshape(N, 1, 1) would raise: a .grad keeps its tensor's shape."""
    x = tns["x1"].clone().requires_grad_(True)
    tns["net1"](x).sum().backward()
    e = nbderiv.explain(x.grad, tns["net1"], x, names=("x.grad", "net1", "x"))
    assert e.code == "correct-reshaped" and e.fix.startswith("d1 = x.grad.reshape(15, 1, 1)")
    tns["net1"].zero_grad(set_to_none=True)


def test_axes_permuted_fix_of_a_list_stacks_it(tns):
    """A Python list of per-output gradients has no .permute: the fix stacks it, in the
    framework of its elements, on the axis where the outputs belong."""
    net, x2 = tns["net"], tns["x2"]
    x = x2.clone().requires_grad_(True)
    y = net(x)
    columns = [torch.autograd.grad(y[:, j].sum(), x, retain_graph=True)[0] for j in range(3)]
    e = nbderiv.explain(columns, net, x2, names=("columns", "net", "x2"))
    assert e.code == "axes-permuted", repr(e)
    assert e.fix.startswith("columns = torch.stack(columns, dim=1)"), e.fix
    assert "torch.stack(columns, dim=1)" in e.message and ".permute" not in e.message
    ns = {"torch": torch, "np": np, "columns": columns}
    exec(e.fix.splitlines()[0], ns)  # noqa: S102 - the suggested fix runs on the list
    np.testing.assert_allclose(ns["columns"].numpy(), func_truth(net, x2, 1), rtol=1e-4,
                               atol=1e-6)
    cols = [c.numpy() for c in columns]  # a list of NumPy arrays: np.stack
    e = nbderiv.explain(cols, net, x2, names=("cols", "net", "x2"))
    assert e.code == "axes-permuted" and e.fix.startswith("cols = np.stack(cols, axis=1)")
    ns = {"np": np, "cols": cols}
    exec(e.fix.splitlines()[0], ns)  # noqa: S102
    np.testing.assert_allclose(ns["cols"], e.truth, rtol=1e-4, atol=1e-6)


def test_order_and_mine_are_checked(tns):
    with pytest.raises(ValueError, match="order"):
        nbderiv.explain(np.zeros(3), tns["net1"], tns["x1"], 0)
    with pytest.raises(TypeError, match="numbers"):
        nbderiv.explain("abc", tns["net1"], tns["x1"])


@pytest.mark.parametrize("k", [1, 2])
def test_the_torch_fix_runs_and_gives_the_truth(tns, k):
    ns = {"torch": torch, "model": tns["net"], "x": tns["x2"]}
    exec(fix_code("torch", k), ns)  # noqa: S102
    np.testing.assert_allclose(ns[f"d{k}"].detach().numpy(), func_truth(tns["net"], tns["x2"], k),
                               rtol=1e-4, atol=1e-5)
    ns = {"torch": torch, "model": tns["net"], "x": tns["x2"]}
    exec(fix_code("torch", k, wrt=[1]), ns)  # noqa: S102
    assert ns[f"d{k}"].shape == (12, 3) + (1,) * k


def test_coupled_fix_switches_batch_statistics_off(tns):
    ns = dict(tns)
    exec(TORCH[15][3], ns)  # noqa: S102
    e = nbderiv.explain(ns["mine"], ns["bn"], ns["x1"])
    assert e.code == "coupled-samples" and ".eval()" in e.fix
    # the numbers quoted: the ones trick vs the true per-point values
    J = nbderiv.full_jacobian(ns["bn"], ns["x1"])
    off = np.abs(J.sum(0).transpose(1, 0, 2) - e.truth).max()
    assert f"{off:.4g}" in e.message
    assert ns["bn"].training  # nbderiv changed nothing


# -- TensorFlow / Keras ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfns():
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    ns = {}
    exec(TF_SETUP, ns)  # noqa: S102
    return ns


def keras_truth(model, x, k):
    """Nested tapes in float64 on the same weights (an independent route: tape.jacobian of
    one point at a time), k = 1 or 2."""
    import tensorflow as tf

    W = [w.numpy().astype(np.float64) for w in model.weights]
    X = np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    def f(p):  # one point (d_in,) -> (d_out,), same weights, float64
        h = tf.tanh(tf.linalg.matvec(tf.constant(W[0]), p, transpose_a=True) + W[1])
        return tf.linalg.matvec(tf.constant(W[2]), h, transpose_a=True) + W[3]

    out = []
    for p in X:
        p = tf.constant(p)
        with tf.GradientTape() as t2:
            t2.watch(p)
            with tf.GradientTape() as t1:
                t1.watch(p)
                y = f(p)
            j = t1.jacobian(y, p)
        out.append(j.numpy() if k == 1 else t2.jacobian(j, p).numpy())
    return np.stack(out)


@pytest.mark.parametrize("case", TF, ids=[c[0] for c in TF])
def test_tensorflow_snippets(tfns, case):
    _, model_name, x_expr, code, order, expected = case
    ns = dict(tfns)
    exec(code, ns)  # noqa: S102
    model, x = ns[model_name], eval(x_expr, ns)  # noqa: S307
    e = nbderiv.explain(ns["mine"], model, x, order)
    assert e.code == expected, repr(e)
    _expected_first_line(e)
    want = keras_truth(model, np.asarray(x), e.order)
    np.testing.assert_allclose(e.truth, want, rtol=1e-3, atol=1e-4 * np.abs(want).max() + 1e-7)


def test_tensorflow_none_causes(tfns):
    import tensorflow as tf

    e = nbderiv.explain(None, tfns["kmodel"], tfns["kx"])
    assert "tape.watch(x)" in e.fix and "constant tf.Tensor" in e.message
    e = nbderiv.explain(None, tfns["kone"], tf.constant([[1], [2]]))
    assert "integer dtype" in e.message and "tf.cast" in e.fix
    e = nbderiv.explain(None, tfns["kone"], tf.Variable(tfns["kx1"]))
    assert "outside" in e.message


@pytest.mark.parametrize("k", [1, 2])
def test_the_tensorflow_fix_runs_and_gives_the_truth(tfns, k):
    import tensorflow as tf

    ns = {"tf": tf, "model": tfns["kmodel"], "x": tfns["kx"]}
    exec(fix_code("tensorflow", k), ns)  # noqa: S102
    want = keras_truth(tfns["kmodel"], np.asarray(tfns["kx"]), k)
    np.testing.assert_allclose(ns[f"d{k}"].numpy(), want, rtol=1e-3, atol=1e-5)


def test_wrong_second_derivative_through_keras_layer_normalization(tfns):
    """Nested tapes through LayerNormalization give a wrong d2 (tf.nn.moments stops the
    gradient through the mean): explain names that cause, and its fix, run as given, gives
    the truth, which float64 central differences of the model confirm; Keras' helper is put
    back afterwards."""
    import keras
    import keras.src.backend.tensorflow.nn as keras_tf_nn
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.LayerNormalization(),
                              keras.layers.Dense(1)])
    x = np.random.default_rng(0).random((4, 3)).astype("float32")
    X = tf.constant(x)
    with tf.GradientTape() as t2:
        t2.watch(X)
        with tf.GradientTape() as t1:
            t1.watch(X)
            y = model(X)
        g = t1.gradient(y, X)
    mine = t2.batch_jacobian(g, X)
    e = nbderiv.explain(mine, model, x)
    assert e.code == "wrong" and "tf.nn.moments" in e.message
    before = keras_tf_nn._compute_moments
    ns = {"tf": tf, "model": model, "x": x}
    exec(e.fix, ns)  # noqa: S102
    assert keras_tf_nn._compute_moments is before
    np.testing.assert_allclose(np.asarray(ns["d2"]), e.truth, rtol=1e-3,
                               atol=1e-4 * np.abs(e.truth).max())
    h, i = 1e-3, 1  # float64 second differences along input 1
    f = lambda z: np.asarray(model(z.astype("float32")), dtype=np.float64)[:, 0]  # noqa: E731
    step = np.zeros(3)
    step[i] = h
    x64 = x.astype(np.float64)
    fd = (f(x64 + step) - 2 * f(x64) + f(x64 - step)) / h ** 2
    np.testing.assert_allclose(e.truth[:, 0, i, i], fd, atol=0.05 * np.abs(fd).max())


# -- the cell magic ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shell():
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    if "nbderiv" not in ip.extension_manager.loaded:
        with capture_output():
            ip.run_line_magic("load_ext", "nbderiv")
    ip.run_cell(SETUP, store_history=False)
    ip.user_ns.update(pair=pair, two=two, pair_d=pair_d)
    return ip


def cell(shell, source):
    from IPython.utils.capture import capture_output

    with capture_output() as out:
        result = shell.run_cell(textwrap.dedent(source), store_history=False)
    return result, out


def explained(shell, source):
    result, out = cell(shell, source)
    assert result.success, (result.error_in_exec, out.stderr)
    return result.result, out


ERRORS = [
    ("no-grad-required", "x = x1.clone()\ny = net1(x)\nwith torch.no_grad():\n    z = net1(x)\n"
     "torch.autograd.grad(z.sum(), x)\n", "torch.no_grad()"),
    ("no-grad-required", "x = x1.clone()\ny = net1(x).detach()\ny.sum().backward()\n",
     ".detach()"),
    # the derivative of a grad result made without create_graph (retain_graph is not enough):
    # that line is the cause, not an input created without requires_grad
    ("no-grad-required", "x = x1.clone().requires_grad_(True)\ny = net1(x)\n"
     "u_x, = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)\n"
     "u_xx, = torch.autograd.grad(u_x, x, torch.ones_like(u_x))\n",
     "retain_graph=True keeps the graph of the output"),
    # autograd.grad with respect to an input without requires_grad (the weights have a graph)
    ("no-grad-required", "x = x1.clone()\ng, = torch.autograd.grad(net1(x).sum(), x)\n",
     "x.requires_grad is False"),
    ("non-scalar-backward", "x = x1.clone().requires_grad_(True)\ny = net1(x)\ny.backward()\n",
     "ones_like(y)"),
    ("unused-input", "x = x1.clone().requires_grad_(True)\nt = x1.clone().requires_grad_(True)\n"
     "y = net1(x)\ntorch.autograd.grad(y.sum(), [x, t])\n", "[x, t]"),
    ("graph-freed", "x = x1.clone().requires_grad_(True)\ny = net1(x)\n"
     "g, = torch.autograd.grad(y.sum(), x)\ng2, = torch.autograd.grad(y.sum(), x)\n",
     "create_graph=True"),
    ("inplace-modified", "x = x1.clone().requires_grad_(True)\nh = torch.sigmoid(x)\n"
     "h += 1\nh.sum().backward()\n", "h += 1"),
    # a leaf that requires grad changed in place (here: normalised after requires_grad_)
    ("inplace-modified", "x = x1.clone().requires_grad_(True)\nx -= x.mean()\n",
     "x is a leaf tensor that requires grad"),
    ("numpy-requires-grad", "x = x1.clone().requires_grad_(True)\ny = net1(x)\n"
     "arr = y.numpy()\n", "y.detach()"),
    ("integer-dtype", "x = torch.arange(5).reshape(-1, 1)\nx.requires_grad_(True)\n",
     "float32"),
]


@pytest.mark.parametrize("code, body, words", ERRORS, ids=[f"{e[0]}-{i}" for i, e in
                                                         enumerate(ERRORS)])
def test_cell_magic_explains_classic_errors(shell, code, body, words):
    value, out = explained(shell, "%%nnderiv explain\n" + body)
    assert [e.code for e in value] == [code], value
    e = value[0]
    assert words in e.message + e.fix, repr(e)
    assert "line " in e.message and e.error and repr(e).startswith(f"[{code}]")
    assert "Traceback" not in out.stdout + out.stderr  # explained instead
    assert sum(f"[{code}]" in o.data.get("text/plain", "") for o in out.outputs) == 1


@pytest.mark.parametrize("body, key, order", [
    ("g = torch.func.vmap(torch.func.grad(net1))(x1)\n", "J", 1),
    ("from torch.func import vmap, grad\nh = vmap(grad(grad(net1)))(x1)\n", "H", 2)])
def test_func_grad_of_a_vector_output_is_explained_and_the_fix_runs(shell, body, key, order):
    """vmap(grad(net)) where net returns shape (1,) per point: torch's own error used to be
    all the student saw. The fix's per-point derivatives match float64 vmap(jacrev/hessian)."""
    value, out = explained(shell, "%%nnderiv explain\n" + body)
    assert [e.code for e in value] == ["func-grad-non-scalar"], value
    assert "under vmap, net1 is called on one point" in value[0].message
    assert "Traceback" not in out.stdout + out.stderr
    result, _ = cell(shell, value[0].fix)
    assert result.success, result.error_in_exec
    m64 = copy.deepcopy(shell.user_ns["net1"]).double()
    fn = torch.func.jacrev(m64) if order == 1 else torch.func.hessian(m64)
    truth = torch.func.vmap(fn)(shell.user_ns["x1"].double())
    np.testing.assert_allclose(shell.user_ns[key].detach().numpy(), truth.detach().numpy(), rtol=1e-4,
                               atol=1e-6)


def test_input_without_requires_grad_fix_reruns_the_cells_own_model_call(shell):
    """The fix runs the cell's own line computing the output (a PINN called on (x, t)); it
    called model(t), which a two-argument model refuses. Truth: float64 du/dt."""
    cell(shell, "class XT(torch.nn.Module):\n"
                "    def __init__(self):\n"
                "        super().__init__()\n"
                "        self.net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),\n"
                "                                       torch.nn.Linear(8, 1))\n"
                "    def forward(self, x, t):\n"
                "        return self.net(torch.cat([x, t], 1))\n"
                "torch.manual_seed(0)\n"
                "xt = XT()\n"
                "xs, ts = torch.rand(6, 1), torch.rand(6, 1)\n")
    value, _ = explained(shell, "%%nnderiv explain xt (xs, ts)\n"
                                "x = xs.clone().requires_grad_(True); tt = ts.clone()\n"
                                "u = xt(x, tt)\n"
                                "u_t, = torch.autograd.grad(u, tt, torch.ones_like(u))\n")
    assert [e.code for e in value] == ["no-grad-required"]
    fix = value[0].fix
    assert "u = xt(x, tt)" in fix and "model(" not in fix
    result, _ = cell(shell, fix)
    assert result.success, result.error_in_exec
    ns = shell.user_ns
    m64 = copy.deepcopy(ns["xt"]).double()
    truth = torch.func.vmap(torch.func.jacrev(lambda a, b: m64(a[None], b[None])[0, 0], 1))(
        ns["xs"].double(), ns["ts"].double())
    np.testing.assert_allclose(ns["g"].detach().numpy(), truth.detach().numpy(), rtol=1e-4,
                               atol=1e-6)


def test_cell_magic_graph_cut_inside_a_model_defined_elsewhere(shell):
    """.numpy() inside a forward defined in another cell: the cell's line calls the model;
    no 'input created without requires_grad' when the cell asked for it."""
    cell(shell, "class ViaNumpy(torch.nn.Module):\n"
                "    def forward(self, x):\n"
                "        return torch.from_numpy(np.tanh(x.numpy()))\n"
                "class ViaNumpyDetached(torch.nn.Module):\n"
                "    def forward(self, x):\n"
                "        return torch.from_numpy(np.tanh(x.detach().numpy()))\n"
                "via_numpy, via_detached = ViaNumpy(), ViaNumpyDetached()\n")
    value, _ = explained(shell, "%%nnderiv explain\nx = x1.clone().requires_grad_(True)\n"
                                "y = via_numpy(x)\n")
    assert [e.code for e in value] == ["numpy-requires-grad"]
    assert "function or model" in value[0].message and "the tensor.detach" not in value[0].fix
    value, _ = explained(shell, "%%nnderiv explain\nx = x1.clone().requires_grad_(True)\n"
                                "y = via_detached(x)\ny.sum().backward()\n")
    assert [e.code for e in value] == ["no-grad-required"]
    assert "cut on the way" in value[0].message
    assert "created without requires_grad" not in value[0].message


def test_cell_magic_non_leaf_grad_warning(shell):
    value, out = explained(shell, """\
        %%nnderiv explain net1 x
        x = x1.clone().requires_grad_(True) * 2
        y = net1(x)
        y.sum().backward()
        g = x.grad
        """)
    codes = [e.code for e in value]
    assert codes[0] == "non-leaf-grad" and "none" in codes
    assert "line 4" in value[0].message
    none = value[codes.index("none")]
    assert "not a leaf" in none.message


def test_cell_magic_explained_warning_is_not_printed_too(shell):
    """torch's non-leaf .grad warning is explained, not also printed (as for tracebacks);
    any other warning is shown as usual."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, out = explained(shell, """\
            %%nnderiv explain
            import warnings
            x = x1.clone().requires_grad_(True) * 2
            x.sum().backward()
            g = x.grad
            warnings.warn("an unrelated warning")
            """)
    assert [e.code for e in value] == ["non-leaf-grad"]
    texts = [str(w.message) for w in caught]
    assert not any("not a leaf Tensor" in t for t in texts), texts
    assert "an unrelated warning" in texts
    assert "not a leaf Tensor" not in out.stdout + out.stderr
    assert sum("[non-leaf-grad]" in o.data.get("text/plain", "") for o in out.outputs) == 1


def test_cell_magic_other_errors_unchanged_and_state_kept(shell):
    value, out = explained(shell, "%%nnderiv explain\nbefore_error = 41 + 1\n1 / 0\n")
    assert value == [] and "ZeroDivisionError" in out.stdout + out.stderr
    assert shell.user_ns["before_error"] == 42  # the cell's effects stay


def test_cell_magic_explains_what_the_cell_computed(shell):
    value, out = explained(shell, """\
        %%nnderiv explain net x --order 1
        x = x2.clone().requires_grad_(True)
        y = net(x)
        g, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))
        J = torch.func.vmap(torch.func.jacrev(net))(x2)
        unrelated = torch.zeros(5)
        label = "not an array"
        """)
    assert [(e.name, e.code) for e in value] == [("g", "summed-outputs"), ("J", "correct")]
    ns = shell.user_ns  # the cell ran in the user's namespace
    assert ns["g"].shape == (12, 2) and ns["label"] == "not an array"
    assert ns["y"].shape == (12, 3)  # y itself is not explained (it is the output)
    np.testing.assert_allclose(value[1].truth, func_truth(ns["net"], ns["x2"], 1), rtol=1e-4,
                               atol=1e-6)
    texts = [o.data.get("text/plain", "") for o in out.outputs]
    assert sum(t.startswith("[summed-outputs]") for t in texts) == 1  # displayed once
    assert not any(t.startswith("[") and t.count("[summed-outputs]") > 1 for t in texts)


def test_cell_magic_order_inferred_and_rerun_cells(shell):
    src = """\
        %%nbderiv explain two x
        x = x1d.clone().requires_grad_(True)
        g = x.grad
        """
    value, _ = explained(shell, src)
    assert [(e.name, e.code) for e in value] == [("g", "none")]
    value, _ = explained(shell, src)  # run again: g is None again, still explained
    assert [(e.name, e.code) for e in value] == [("g", "none")]
    value, out = explained(shell, """\
        %%nnderiv explain two x1d
        f = lambda p: two(p[None])[0]
        torch.func.vmap(torch.func.jacrev(torch.func.jacrev(f)))(x1d)
        """)
    assert [(e.name, e.code, e.order) for e in value] == [("the cell's value", "correct", 2)]
    assert any("tensor(" in o.data.get("text/plain", "") for o in out.outputs) or \
        "tensor(" in out.stdout  # IPython still shows the cell's last value


def test_cell_magic_value_is_the_cells_last_result(shell):
    result, out = cell(shell, "%%nnderiv explain net1 x1\nmine = torch.func.vmap("
                              "torch.func.jacrev(net1))(x1)\n")
    assert result.success and [e.code for e in result.result] == ["correct"]
    texts = [o.data.get("text/plain", "") for o in out.outputs]
    assert sum("[correct]" in t for t in texts) == 1


def test_cell_magic_x_grad_is_explained(shell):
    value, _ = explained(shell, """\
        %%nnderiv explain net x
        x = x2.clone().requires_grad_(True)
        net(x).sum().backward()
        """)
    assert [(e.name, e.code) for e in value] == [("x.grad", "summed-outputs")]


def test_cell_magic_tensorflow_none(shell, tfns):
    for name, value in tfns.items():
        if not name.startswith("__"):
            shell.user_ns[name] = value
    value, _ = explained(shell, """\
        %%nnderiv explain kmodel kx
        with tf.GradientTape() as tape:
            y = kmodel(kx)
        grad = tape.gradient(y, kx)
        """)
    assert [(e.name, e.code) for e in value] == [("grad", "none")]
    assert "tape.watch(kx)" in value[0].fix


def test_cell_magic_usage_errors(shell):
    from IPython.core.error import UsageError

    for line, words in [("%%nnderiv\n", "explain"), ("%%nnderiv bogus\n", "explain"),
                        ("%%nnderiv explain net\n", "without X"),
                        ("%%nnderiv explain net x1 --order 0\n", "1 or more"),
                        ("%%nnderiv explain net x1 --order two\n", "positive integer"),
                        ("%%nnderiv explain nope x1\n", "nope"),
                        ("%%nnderiv explain net x1 --bogus\n", "unknown option")]:
        result, out = cell(shell, line + "a = 1\n")
        assert type(result.error_in_exec) is UsageError, (line, result.error_in_exec)
        assert words in str(result.error_in_exec), (line, str(result.error_in_exec))


def test_the_line_magic_still_works(shell):
    d = shell.run_line_magic("nnderiv", "net1 x1 -q -o 1")
    np.testing.assert_allclose(d[1], func_truth(shell.user_ns["net1"], shell.user_ns["x1"], 1),
                               rtol=1e-4, atol=1e-6)


def test_selected_outputs_saliency_for_each_points_label_and_one_output():
    """x.grad after scores.gather(1, labels).sum().backward() is a saliency map per point:
    right for each point's own output (checked against vmap(jacrev) picked by label)."""
    import torch
    from torch.func import jacrev, vmap

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3)).double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    net(x).gather(1, labels[:, None]).sum().backward()
    e = nbderiv.explain(x.grad, net, x.detach())
    assert e.code == "selected-outputs" and "outputs [0, 2, 1, 2, 0, 1]" in e.message
    full = vmap(jacrev(lambda z: net(z[None])[0]))(x.detach()).detach().numpy()
    np.testing.assert_allclose(e.truth[:, 0], full[np.arange(6), labels.numpy()], atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), e.truth[:, 0], atol=1e-12)
    x.grad = None
    net(x)[:, 2].sum().backward()
    one = nbderiv.explain(x.grad, net, x.detach())
    assert one.code == "selected-outputs" and "output 2 alone" in one.message
    wrong = nbderiv.explain(x.grad * 1.5, net, x.detach())
    assert wrong.code == "wrong"


def test_wrt_as_one_index_or_a_negative_one_reads_as_derivatives_reads_it():
    """wrt=0 crashed inside the fix ('int' object is not iterable); wrt=-1 is the last input.
    Truth: the closed form of pair, y = x1**2 sin(x2)."""
    X = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x1, x2 = X[:, 0].numpy(), X[:, 1].numpy()
    dy_dx1, dy_dx2 = 2 * x1 * np.sin(x2), x1 ** 2 * np.cos(x2)
    swapped = dy_dx2[:, None]  # the other input's column
    for wrt, other in [(0, [0]), (-1, [1]), (torch.tensor(1), [1])]:
        e = nbderiv.explain(swapped, pair, X, wrt=wrt)
        assert e.code == nbderiv.explain(swapped, pair, X, wrt=other).code
    assert nbderiv.explain(swapped, pair, X, wrt=0).code != "correct"
    assert nbderiv.explain(swapped, pair, X, wrt=-1).code.startswith("correct")
    assert nbderiv.explain(dy_dx1[:, None], pair, X, wrt=0).code.startswith("correct")


def test_all_zeros_are_read_at_the_lowest_order_and_say_which_order_they_would_fit():
    """A cut graph's zeros on a ReLU net (whose second derivative is 0): read as 'the right
    second derivatives' without order=, and as 'one differentiation too far' with order=1.
    Truth: vmap(jacrev) (d1 is not 0) and vmap(hessian) (d2 is 0)."""
    torch.manual_seed(0)
    relu = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    X = torch.rand(50, 1, generator=torch.Generator().manual_seed(0))
    J = torch.func.vmap(torch.func.jacrev(lambda p: relu(p[None])[0]))(X)
    H = torch.func.vmap(torch.func.hessian(lambda p: relu(p[None])[0]))(X)
    assert J.abs().max() > 0.05 and H.abs().max() == 0
    zeros = np.zeros((50, 1), dtype=np.float32)
    e = nbderiv.explain(zeros, relu, X)
    assert e.code == "zeros-graph-broken" and e.order == 1
    assert "meant as the second derivative instead, all zeros is right" in e.message
    e = nbderiv.explain(zeros, relu, X, order=1)
    assert e.code == "zeros-graph-broken"
    e = nbderiv.explain(zeros, relu, X, order=2)
    assert e.code.startswith("correct")
