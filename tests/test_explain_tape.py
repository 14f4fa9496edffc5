"""A gradient that came back None, traced through the cell's own code by ``%%nnderiv
explain``: the tape.gradient call that made it, whether its source was watched, a target made
outside the tape's block, an operation without a gradient (checked in TensorFlow: each gives
None), and in torch the tensor whose .grad it is. A false cause is worse than none."""

from __future__ import annotations

import os
import textwrap

import pytest

pytest.importorskip("IPython")


@pytest.fixture(scope="module")
def tf_shell():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    with capture_output():
        if "nbderiv" not in ip.extension_manager.loaded:
            ip.run_line_magic("load_ext", "nbderiv")
        ip.run_cell("import numpy as np, tensorflow as tf, keras\n"
                    "keras.utils.set_random_seed(0)\n"
                    "m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, "
                    "activation='tanh'), keras.layers.Dense(1)])\n"
                    "X = tf.random.uniform((6, 2))\n", store_history=False)
    yield ip
    _forget(ip)


def _forget(ip):
    """The shell is shared with the other test files: leave none of these names behind."""
    for name in ("m", "X", "V", "u", "g", "h", "t1", "t2", "tape", "Y", "net1", "t", "xc"):
        ip.user_ns.pop(name, None)


def run(shell, body, line):
    from IPython.utils.capture import capture_output

    with capture_output():
        result = shell.run_cell(f"%%nnderiv explain {line}\n" + textwrap.dedent(body),
                                store_history=False)
    assert result.success, result.error_in_exec
    return {getattr(e, "name", e.code): e for e in result.result}


def test_a_second_gradient_taken_outside_the_outer_tape_is_named_not_a_missing_watch(tf_shell):
    got = run(tf_shell, """\
        with tf.GradientTape() as t2:
            t2.watch(X)
            with tf.GradientTape() as t1:
                t1.watch(X)
                u = m(X)
        g = t1.gradient(u, X)
        h = t2.gradient(g, X)
        """, "m X")
    assert tf_shell.user_ns["h"] is None
    e = got["h"]
    assert e.code == "none"
    assert "without tape.watch" not in e.message and "constant tf.Tensor" not in e.message
    assert "outside the `with` block of t2" in e.message and "g = t1.gradient(u, X)" in e.message
    assert "X is watched" in e.message
    # the fix the message gives: the inner gradient inside the outer block gives a gradient
    tf = pytest.importorskip("tensorflow")
    ns = tf_shell.user_ns
    with tf.GradientTape() as t2:
        t2.watch(ns["X"])
        with tf.GradientTape() as t1:
            t1.watch(ns["X"])
            u = ns["m"](ns["X"])
        g = t1.gradient(u, ns["X"])
    assert t2.gradient(g, ns["X"]) is not None


@pytest.mark.parametrize("expr, op", [
    ("tf.round(V * 10) / 10", "tf.round"), ("tf.floor(V)", "tf.floor"),
    ("tf.math.ceil(V)", "tf.math.ceil"),
    ("tf.cast(tf.cast(V, tf.int32), tf.float32)", "tf.cast(..., tf.int32)"),
    ("tf.constant(V.numpy())", ".numpy()"), ("tf.constant(np.sin(V))", "np.sin")])
def test_an_operation_without_a_gradient_on_a_variable_is_named(tf_shell, expr, op):
    got = run(tf_shell, f"""\
        V = tf.Variable(X)
        with tf.GradientTape() as tape:
            u = m({expr})
        g = tape.gradient(u, V)
        """, "m X")
    assert tf_shell.user_ns["g"] is None  # TensorFlow itself gives None through it
    e = got["g"]
    assert e.code == "none" and f"through {op} " in e.message, e.message
    assert "without tape.watch" not in e.message and "constant tf.Tensor" not in e.message
    assert "tf.Variable, which a tape watches" in e.message


def test_a_missing_watch_is_still_named_and_an_unexplained_none_is_not_guessed(tf_shell):
    got = run(tf_shell, """\
        with tf.GradientTape() as tape:
            u = m(X)
        g = tape.gradient(u, X)
        """, "m X")
    assert "without tape.watch(X)" in got["g"].message
    # watched, and the model called on a copy made before the block: that copy is named
    got = run(tf_shell, """\
        Y = X * 1.0
        with tf.GradientTape() as tape:
            tape.watch(X)
            u = m(Y)
        g = tape.gradient(u, X)
        """, "m X")
    e = got["g"]
    assert tf_shell.user_ns["g"] is None and e.code == "none"
    assert "u is computed from Y (line 4: `u = m(Y)`), not from X: Y was made from X on " \
        "line 1" in e.message
    assert "without tape.watch" not in e.message and "tf.round" not in e.message
    # watched, and no step the code shows (the model itself cuts the path): what is known
    tf_shell.run_cell("cut = lambda z: m(tf.stop_gradient(z))", store_history=False)
    got = run(tf_shell, """\
        with tf.GradientTape() as tape:
            tape.watch(X)
            u = cut(X)
        g = tape.gradient(u, X)
        """, "m X")
    e = got["g"]
    assert tf_shell.user_ns["g"] is None and e.code == "none"
    assert "What is known: tape.gradient(u, X) returned None: tape did not record u as " \
        "depending on X" in e.message


def test_grad_of_a_non_leaf_copy_names_that_copy_not_x_requires_grad():
    torch = pytest.importorskip("torch")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    with capture_output():
        if "nbderiv" not in ip.extension_manager.loaded:
            ip.run_line_magic("load_ext", "nbderiv")
        ip.run_cell("import torch\ntorch.manual_seed(0)\nnet1 = torch.nn.Sequential("
                    "torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))\n"
                    "t = torch.linspace(-1, 1, 6).reshape(-1, 1)\n", store_history=False)
    got = run(ip, """\
        xc = t.clone().requires_grad_(True) * 1.0
        net1(xc).sum().backward()
        g = xc.grad
        """, "net1 t")
    assert isinstance(ip.user_ns["xc"], torch.Tensor) and not ip.user_ns["xc"].is_leaf
    e = got["g"]
    _forget(ip)
    assert e.code == "none" and "requires_grad is False" not in e.message
    assert "xc is not a leaf tensor" in e.message
