"""The fix code ``%%nnderiv explain`` gives for a classic autograd error runs in the student's
notebook, on the student's own names, and gives the right numbers. Truths: float64
``torch.func`` of a float64 copy of the model, a float64 Keras twin's nested tapes."""

from __future__ import annotations

import copy
import os
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("IPython")

from checks import nbderiv_shell  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SETUP = """
import torch, numpy as np, nbderiv
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
net1 = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
pts = torch.rand(6, 2)
xs = torch.linspace(-1, 1, 8).reshape(-1, 1)
"""


@pytest.fixture(scope="module")
def shell():
    return nbderiv_shell(SETUP)


def explain(shell, line, body):
    from IPython.utils.capture import capture_output

    with capture_output():
        result = shell.run_cell(f"%%nnderiv explain {line}\n" + textwrap.dedent(body),
                                store_history=False)
    assert result.success, result.error_in_exec
    return result.result


def run_fix(shell, fix):
    from IPython.utils.capture import capture_output

    with capture_output():
        result = shell.run_cell(fix, store_history=False)
    assert result.success, (fix, result.error_in_exec)
    return shell.user_ns


def _values(t):
    return np.asarray(t.detach() if hasattr(t, "detach") else t, dtype=np.float64)


def pinn_truth(shell, name, X, k):
    m = copy.deepcopy(shell.user_ns[name]).double()
    f = lambda p: m(p[None])[0, 0]  # noqa: E731
    fn = torch.func.jacrev(f) if k == 1 else torch.func.hessian(f)
    return torch.func.vmap(fn)(X.double()).detach().numpy()


def test_graph_freed_names_the_call_that_freed_it(shell):
    """A PINN Laplacian: u_xx's grad call (no retain_graph) frees the graph u_yy needs; the
    message named the create_graph=True call, and its fix had y and x."""
    [e] = explain(shell, "net pts", """\
        x = pts.clone().requires_grad_(True)
        u = net(x)
        u_x, = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)
        u_xx = torch.autograd.grad(u_x[:, 0], x, torch.ones_like(u_x[:, 0]))[0]
        u_yy = torch.autograd.grad(u_x[:, 1], x, torch.ones_like(u_x[:, 1]))[0]
        """)
    assert e.code == "graph-freed"
    assert "by the call before it" in e.message and "`u_xx = torch.autograd.grad(" in e.message
    # the cell's lines again from u = net(x) (the graph is gone), retain_graph on u_xx's
    assert e.fix.startswith("u = net(x)\n") and "[:, 0]), retain_graph=True)[0]" in e.fix
    ns = run_fix(shell, e.fix)
    H = pinn_truth(shell, "net", shell.user_ns["pts"], 2)
    np.testing.assert_allclose(_values(ns["u_xx"]), H[:, :, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_values(ns["u_yy"]), H[:, :, 1], rtol=1e-4, atol=1e-6)


def test_graph_freed_blames_the_call_on_the_same_output(shell):
    [e] = explain(shell, "net pts", """\
        x = pts.clone().requires_grad_(True)
        y = net(x)
        g = torch.autograd.grad(y.sum(), x)
        z = net(2 * x)
        h = torch.autograd.grad(z.sum(), x)
        g2 = torch.autograd.grad(y.sum(), x)
        """)
    assert e.code == "graph-freed" and "`g = torch.autograd.grad(y.sum(), x)`" in e.message


def test_backward_twice_on_the_same_line_names_the_first_call(shell):
    """loss.backward() written twice: the first is the call that freed the graph (it was not
    found: the failing line was read as the first one), and its fix runs; the gradient it
    leaves in x.grad is the sum over the points, twice. Truth: float64 vmap(jacrev)."""
    [e] = explain(shell, "net pts", """\
        x = pts.clone().requires_grad_(True)
        loss = net(x).sum()
        loss.backward()
        loss.backward()
        """)
    assert e.code == "graph-freed" and "`loss.backward()`" in e.message
    assert "retain_graph=True" in e.fix and "holds that gradient twice" in e.fix
    ns = run_fix(shell, "x = pts.clone().requires_grad_(True)\n" + e.fix)
    truth = pinn_truth(shell, "net", shell.user_ns["pts"], 1)  # (N, 2)
    np.testing.assert_allclose(_values(ns["x"].grad), 2 * truth, rtol=1e-4, atol=1e-6)


def test_create_graph_forgotten_fix_gives_the_second_derivative(shell):
    [e] = explain(shell, "net1 xs", """\
        x = xs.clone().requires_grad_(True)
        u = net1(x)
        u_x, = torch.autograd.grad(u, x, torch.ones_like(u))
        u_xx, = torch.autograd.grad(u_x, x, torch.ones_like(u_x))
        """)
    assert e.code == "no-grad-required"
    assert "create_graph=True" in e.fix and "u = net1(x)" in e.fix
    ns = run_fix(shell, e.fix)
    truth = pinn_truth(shell, "net1", shell.user_ns["xs"], 2)
    np.testing.assert_allclose(_values(ns["u_xx"]), truth.reshape(8, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("body", [
    "x = xs.clone().requires_grad_(True)\nwith torch.no_grad():\n    u = net1(x)\n"
    "g, = torch.autograd.grad(u, x, torch.ones_like(u))\n",
    "x = xs.clone().requires_grad_(True)\nu = net1(x.detach())\n"
    "g, = torch.autograd.grad(u, x, torch.ones_like(u))\n",
], ids=["no_grad", "detached-copy"])
def test_cut_graph_fixes_run_on_the_cells_names(shell, body):
    [e] = explain(shell, "net1 xs", body)
    assert e.code in ("no-grad-required", "unused-input")
    assert "model(" not in e.fix and "u = net1(x)" in e.fix
    ns = run_fix(shell, e.fix)
    truth = pinn_truth(shell, "net1", shell.user_ns["xs"], 1)
    np.testing.assert_allclose(_values(ns["g"]), truth.reshape(8, 1), rtol=1e-4, atol=1e-6)


def test_integer_input_fix_is_torch_code_that_runs(shell):
    [e] = explain(shell, "net1 xs", "x = torch.arange(8.).reshape(-1, 1).long()"
                                     ".requires_grad_(True)\n")
    assert e.code == "integer-dtype" and "tf." not in e.fix
    ns = run_fix(shell, e.fix)
    assert ns["x"].dtype == torch.float32 and ns["x"].requires_grad
    np.testing.assert_array_equal(ns["x"].detach().numpy().ravel(), np.arange(8.0))


def test_fix_code_of_a_model_named_f_does_not_rebind_it(shell):
    shell.run_cell("f = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), "
                   "torch.nn.Linear(8, 3))", store_history=False)
    model = shell.user_ns["f"]
    shell.user_ns["x_"] = sentinel = object()  # a name of the notebook's that fixes also use
    [e] = explain(shell, "f pts", """\
        x = pts.clone().requires_grad_(True)
        y = f(x)
        g, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))
        """)
    assert e.code == "summed-outputs"
    ns = run_fix(shell, e.fix)
    assert ns["f"] is model and ns["x_"] is sentinel
    m64 = copy.deepcopy(model).double()
    truth = torch.func.vmap(torch.func.jacrev(lambda p: m64(p[None])[0]))(
        shell.user_ns["pts"].double()).detach().numpy()
    np.testing.assert_allclose(_values(ns["d1"]), truth, rtol=1e-4, atol=1e-6)


def _keras_model(shell):
    """A Keras net km at kx in the notebook, and its float64 twin (the truth's model)."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    km = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16, activation="tanh"),
                           keras.layers.Dense(1)])
    shell.user_ns.update(km=km, kx=tf.reshape(tf.linspace(-1.0, 1.0, 8), (-1, 1)), tf=tf)
    twin = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16, activation="tanh",
                                                                   dtype="float64"),
                             keras.layers.Dense(1, dtype="float64")])
    twin.set_weights([w.astype(np.float64) for w in km.get_weights()])
    return tf, twin, tf.cast(shell.user_ns["kx"], tf.float64)


def test_gradient_of_predict_inside_a_tape_is_explained(shell):
    """model.predict inside the tape: TensorFlow's AttributeError ('_id') gets its meaning,
    and the fix (the tape block with the model called) gives the float64 twin's gradient."""
    tf, twin, x64 = _keras_model(shell)
    [e] = explain(shell, "km kx", """\
        with tf.GradientTape() as tape:
            tape.watch(kx)
            y = km.predict(kx, verbose=0)
        g = tape.gradient(y, kx)
        """)
    assert e.code == "numpy-in-tape" and "model.predict" in e.message
    assert "y = km(kx)" in e.fix
    ns = run_fix(shell, e.fix)
    with tf.GradientTape() as tape:
        tape.watch(x64)
        y = twin(x64)
    np.testing.assert_allclose(_values(ns["g"]), tape.gradient(y, x64).numpy(), rtol=1e-4,
                               atol=1e-6)


def _nested_tapes_d2(tf, twin, x64, column=None):
    """The truth of a second derivative: a float64 twin's nested tapes; ``column``: of one
    input column, d2y/dx_c^2, (N, 1)."""
    with tf.GradientTape() as outer:
        outer.watch(x64)
        with tf.GradientTape() as inner:
            inner.watch(x64)
            y = twin(x64)
        g = inner.gradient(y, x64)
        if column is not None:
            g = g[:, column:column + 1]
    d2 = outer.gradient(g, x64).numpy()
    return d2 if column is None else d2[:, column:column + 1]


def test_second_derivative_with_one_tape_gets_nested_tapes(shell):
    tf, twin, x64 = _keras_model(shell)
    [e] = explain(shell, "km kx", """\
        with tf.GradientTape() as tape:
            tape.watch(kx)
            y = km(kx)
        dy = tape.gradient(y, kx)
        d2 = tape.gradient(dy, kx)
        """)
    assert e.code == "tape-used-twice" and "second derivative" in e.message
    ns = run_fix(shell, e.fix)
    truth = _nested_tapes_d2(tf, twin, x64)  # (N, 1): one input
    np.testing.assert_allclose(_values(ns["d2"]).reshape(truth.shape), truth, rtol=1e-4,
                               atol=1e-6)


def test_the_nested_tapes_fix_for_a_third_derivative_nests_three_tapes(shell):
    """u_xxx from the tape that gave u_xx: the fix reused t1 (already used) and u (computed
    outside the new tapes), and failed the same way. Truth: a float64 twin's three nested
    tapes."""
    tf, twin, x64 = _keras_model(shell)
    [e] = explain(shell, "km kx", """\
        x = tf.identity(kx)
        with tf.GradientTape() as t2:
            with tf.GradientTape() as t1:
                t1.watch(x)
                u = km(x)
            u_x = t1.gradient(u, x)
        u_xx = t2.gradient(u_x, x)
        u_xxx = t2.gradient(u_xx, x)
        """)
    assert e.code == "tape-used-twice" and "a third derivative" in e.message
    with tf.GradientTape() as a:
        a.watch(x64)
        with tf.GradientTape() as b:
            b.watch(x64)
            with tf.GradientTape() as c:
                c.watch(x64)
                y = twin(x64)
            g = c.gradient(y, x64)
        g2 = b.gradient(g, x64)
    truth = a.gradient(g2, x64).numpy()
    ns = run_fix(shell, "x = tf.identity(kx)\n" + e.fix)
    np.testing.assert_allclose(_values(ns["u_xxx"]), truth, rtol=1e-4, atol=1e-5)


def test_the_nested_tapes_fix_says_how_to_take_one_column_of_several(shell):
    """A PINN of (x, t): outer.gradient(u_x, x) adds the Hessian's columns up (what explain
    itself calls summed-inputs); the fix says so, and its one-column form gives d2u/dx0^2.
    Truth: a float64 twin's nested tapes on column 0."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    pinn = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(1)])
    X = tf.random.stateless_uniform((8, 2), seed=(1, 2))
    shell.user_ns.update(pinn=pinn, X=X, tf=tf)
    [e] = explain(shell, "pinn X", """\
        x = tf.identity(X)
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = pinn(x)
            u_x = tape.gradient(u, x)
        u_xx = tape.gradient(u_x, x)
        """)
    assert e.code == "tape-used-twice"
    assert "take column 0 where u_x is made" in e.fix and "keep [:, 0:1] of u_xx" in e.fix
    twin = keras.Sequential([keras.Input((2,)),
                             keras.layers.Dense(16, activation="tanh", dtype="float64"),
                             keras.layers.Dense(1, dtype="float64")])
    twin.set_weights([w.astype(np.float64) for w in pinn.get_weights()])
    truth = _nested_tapes_d2(tf, twin, tf.cast(X, tf.float64), column=0)  # d2u/dx0^2
    one_column = e.fix.replace("tape.gradient(u, x)", "tape.gradient(u, x)[:, 0:1]").replace(
        "outer.gradient(u_x, x)", "outer.gradient(u_x, x)[:, 0:1]")
    ns = run_fix(shell, "x = tf.identity(X)\n" + one_column)
    np.testing.assert_allclose(_values(ns["u_xx"]), truth, rtol=1e-4, atol=1e-6)


def test_second_derivative_taken_inside_the_tapes_block_says_persistent_would_do(shell):
    """dy = tape.gradient(y, kx) inside the block, then tape.gradient(dy, kx): the tape did
    record dy, so persistent=True gives the second derivative; the message used to claim it
    would give None ('dy was computed after the with-block'). Both claims are run: the cell
    with persistent=True, and the fix, against a float64 twin's nested tapes."""
    tf, twin, x64 = _keras_model(shell)
    body = """\
        with tf.GradientTape({arg}) as tape:
            tape.watch(kx)
            y = km(kx)
            dy = tape.gradient(y, kx)
        d2 = tape.gradient(dy, kx)
        """
    [e] = explain(shell, "km kx", body.format(arg=""))
    assert e.code == "tape-used-twice"
    assert "did record it" in e.message and "would be None" not in e.message
    truth = _nested_tapes_d2(tf, twin, x64)
    shell.run_cell(textwrap.dedent(body.format(arg="persistent=True")), store_history=False)
    np.testing.assert_allclose(_values(shell.user_ns["d2"]), truth, rtol=1e-4, atol=1e-6)
    ns = run_fix(shell, e.fix)
    np.testing.assert_allclose(_values(ns["d2"]).reshape(truth.shape), truth, rtol=1e-4,
                               atol=1e-6)


def test_a_tf_function_computing_derivatives_is_explained(shell):
    """A @tf.function from an earlier cell (and tf.function(g)(x) in the cell) computing 2x
    the gradient: explained like the plain function ('2 times'), not 'computed no
    derivative'."""
    tf, twin, x64 = _keras_model(shell)
    shell.run_cell("@tf.function\n"
                   "def twice_grad(x):\n"
                   "    with tf.GradientTape() as t:\n"
                   "        t.watch(x)\n"
                   "        y = km(x)\n"
                   "    return 2 * t.gradient(y, x)\n"
                   "def twice_plain(x):\n"
                   "    with tf.GradientTape() as t:\n"
                   "        t.watch(x)\n"
                   "        y = km(x)\n"
                   "    return 2 * t.gradient(y, x)\n", store_history=False)
    with tf.GradientTape() as tape:
        tape.watch(x64)
        y = twin(x64)
    truth = tape.gradient(y, x64).numpy()
    for body in ("gx = twice_grad(kx)\n", "gx = tf.function(twice_plain)(kx)\n"):
        [e] = explain(shell, "km kx", body)
        assert e.code == "wrong" and "2 times" in e.message, (body, e)
        np.testing.assert_allclose(_values(shell.user_ns["gx"]), 2 * truth, rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("body, name, words", [
    ("with tf.GradientTape(persistent=True) as tape:\n    tape.watch(kx3)\n    ky = k3(kx3)\n"
     "g0 = tape.gradient(ky[:, 0], kx3)\n", "g0", "computed in the gradient call itself"),
    ("xs = kx3 * 1.0\nwith tf.GradientTape() as tape:\n    tape.watch(kx3)\n    y = k3(xs)\n"
     "g = tape.gradient(y, kx3)\n", "g", "xs was made from kx3 on line 1"),
])
def test_a_none_from_work_outside_the_tape_names_it_and_the_fix_runs(shell, body, name, words):
    """tape.gradient(ky[:, 0], x) after the block, and the model called on a copy made before
    the block: the None's cause is read from the cell (it said the code does not show it),
    and the fix, the cell's tape block again with that step inside, gives the float64
    twin's gradient."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    k3 = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh"),
                           keras.layers.Dense(3)])
    shell.user_ns.update(k3=k3, kx3=tf.random.uniform((6, 2), seed=2), tf=tf)
    [e] = explain(shell, "k3 kx3", body)
    assert e.code == "none" and words in e.message, e.message
    ns = run_fix(shell, e.fix)
    twin = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh",
                                                                   dtype="float64"),
                             keras.layers.Dense(3, dtype="float64")])
    twin.set_weights([w.astype(np.float64) for w in k3.get_weights()])
    x64 = tf.cast(shell.user_ns["kx3"], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x64)
        y = twin(x64)
        target = y[:, 0] if name == "g0" else y
    truth = tape.gradient(target, x64).numpy()
    np.testing.assert_allclose(_values(ns[name]), truth, rtol=1e-4, atol=1e-6)


def test_the_freed_graph_fix_without_a_culprit_gives_the_second_derivatives():
    """No earlier call in the cell (it ran in another cell): the generic fix. For one input
    its g2 is the second derivative; for several, g2 adds the Hessian's columns up, and its
    commented one-column line gives d2y/dx0^2. Truth: float64 vmap(hessian)."""
    from nbderiv.explain_errors import _freed

    _, fix = _freed("line 1", "g2 = torch.autograd.grad(y.sum(), x)", "")
    torch.manual_seed(0)
    for d_in in (1, 2):
        net = torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(),
                                  torch.nn.Linear(8, 1)).double()
        x = torch.rand(5, d_in, dtype=torch.float64, requires_grad=True)
        ns = {"torch": torch, "x": x, "y": net(x)}
        exec(fix.replace("# g2_00 =", "g2_00 ="), ns)  # noqa: S102
        H = _values(torch.func.vmap(torch.func.hessian(lambda p, net=net: net(p[None])[0, 0]))(
            x.detach()))
        np.testing.assert_allclose(_values(ns["g2_00"])[:, 0], H[:, 0, 0], atol=1e-12)
        if d_in == 1:
            np.testing.assert_allclose(_values(ns["g2"])[:, 0], H[:, 0, 0], atol=1e-12)


def test_a_none_from_allow_unused_names_the_first_grad_without_create_graph(shell):
    """u_x from a grad call without create_graph=True, then requires_grad_(True) on it and
    allow_unused=True on the second call: None. It was blamed on x.requires_grad (x does
    require grad) and read as a first derivative. Truth: float64 vmap(hessian)."""
    [e] = [r for r in explain(shell, "net pts", """\
        x = pts.clone().requires_grad_(True)
        u = net(x)
        u_x = torch.autograd.grad(u, x, torch.ones_like(u))[0]
        u_x.requires_grad_(True)
        u_xx = torch.autograd.grad(u_x[:, 0].sum(), x, allow_unused=True)[0]
        """) if r.code == "none"]
    assert e.code == "none" and "second derivative" in e.message
    assert "no create_graph=True" in e.message and "requires_grad is False" not in e.message
    ns = run_fix(shell, "x = pts.clone().requires_grad_(True)\nu = net(x)\n"
                 + e.fix.split("\n# the per-point")[0])
    H = pinn_truth(shell, "net", shell.user_ns["pts"], 2)  # (N, 2, 2)
    np.testing.assert_allclose(_values(ns["u_xx"]), H[:, 0, :], rtol=1e-4, atol=1e-6)


def test_a_detach_on_the_way_to_a_loss_is_removed_where_it_is(shell):
    """``yd = net(xd).detach()`` then ``loss = (yd ** 2).sum()``: the fix recomputed only the
    loss line (its .detach() left in yd's) and named an ``x`` the cell does not have."""
    body = """\
        xd = pts.clone().requires_grad_(True)
        yd = net(xd).detach()
        loss = (yd ** 2).sum()
        loss.backward()
        """
    [e] = explain(shell, "net pts", body)
    code = [line.split("#")[0] for line in e.fix.splitlines()]
    assert e.code == "no-grad-required" and not any(".detach()" in c for c in code)
    assert code[0].strip() == "xd = pts.clone().requires_grad_(True)"
    ns = run_fix(shell, e.fix)
    # the truth: d/dx sum(net(x)^2) = 2 net(x) dnet/dx, per point, in float64
    d1 = pinn_truth(shell, "net", shell.user_ns["pts"], 1)
    y = copy.deepcopy(shell.user_ns["net"]).double()(shell.user_ns["pts"].double())
    truth = 2 * y.detach().numpy() * d1
    np.testing.assert_allclose(_values(ns["xd"].grad), truth, rtol=1e-4, atol=1e-6)


def test_a_numpy_array_differentiated_by_is_told_from_a_numpy_target():
    """``tape.gradient(pred, xn)`` with ``xn`` a NumPy array: the message blamed ``pred`` (a
    tensor) and its fix's ``tape.watch(x)`` fails on an array."""
    pytest.importorskip("tensorflow")
    shell = nbderiv_shell(
        "import numpy as np, tensorflow as tf, keras, nbderiv\n"
        "keras.utils.set_random_seed(0)\n"
        "km = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation='tanh'),"
        " keras.layers.Dense(1)])\n"
        "xn = np.random.RandomState(0).rand(6, 2).astype('float32')\n")
    [e] = explain(shell, "km xn", """\
        with tf.GradientTape() as tape:
            pred = km(xn)
        dy = tape.gradient(pred, xn)
        """)
    assert e.code == "numpy-in-tape" and "with respect to xn" in e.message
    assert "pred itself is fine" in e.message
    ns = run_fix(shell, e.fix)
    # the truth: the network by hand in float64 NumPy, (1 - h^2) W1 W2 per point
    W1, b1, W2, _ = (np.asarray(w, np.float64) for w in ns["km"].get_weights())
    h = np.tanh(ns["xn"].astype(np.float64) @ W1 + b1)
    truth = ((1 - h ** 2) * W2[:, 0]) @ W1.T
    np.testing.assert_allclose(_values(ns["dy"]), truth, rtol=1e-5, atol=1e-6)


def test_a_keras_gradient_taken_with_training_true_through_dropout_is_named():
    """``drop(xx, training=True)`` in the tape: a random draw of the network, judged as a bare
    [wrong]; without a random layer, training=True changes nothing and stays correct."""
    pytest.importorskip("tensorflow")
    shell = nbderiv_shell(
        "import numpy as np, tensorflow as tf, keras, nbderiv\n"
        "keras.utils.set_random_seed(0)\n"
        "drop = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation='tanh'),"
        " keras.layers.Dropout(0.3), keras.layers.Dense(1)])\n"
        "plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation='tanh'),"
        " keras.layers.Dense(1)])\n"
        "xn = np.random.RandomState(0).rand(6, 2).astype('float32')\n")
    body = """\
        xw = tf.convert_to_tensor(xn)
        with tf.GradientTape() as tape:
            tape.watch(xw)
            yy = MODEL(xw, training=True)
        gd = tape.gradient(yy, xw)
        """
    [e] = explain(shell, "drop xn", body.replace("MODEL", "drop"))
    assert e.code == "random-model" and "training=True" in e.message
    ns = run_fix(shell, e.fix)
    W1, b1, W2, _ = (np.asarray(w, np.float64) for w in ns["drop"].get_weights())
    h = np.tanh(ns["xn"].astype(np.float64) @ W1 + b1)
    truth = ((1 - h ** 2) * W2[:, 0]) @ W1.T   # the model itself: no unit dropped
    np.testing.assert_allclose(_values(ns["d1"])[:, 0], truth, rtol=1e-5, atol=1e-6)
    [e] = explain(shell, "plain xn", body.replace("MODEL", "plain"))
    assert e.code.startswith("correct")
