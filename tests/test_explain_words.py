"""The words of ``nbderiv.explain`` and of the error explanations: names read from the code
with ``ast`` (not cut at a comma), NaN said as NaN, the input that is ignored named as it is.
Each number quoted is checked against float64 ``torch.func``."""

from __future__ import annotations

import ast
import copy
import warnings

import numpy as np
import pytest

from nbderiv.explain_errors import explain_error

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402


def test_names_with_a_comma_inside_are_read_whole():
    src = ("x = X.clone().requires_grad_(True)\nu = net(x)\n"
           "ux = torch.autograd.grad(u, x, torch.ones_like(u))[0]\n"
           "uxx = torch.autograd.grad(ux[:,0], x, torch.ones_like(ux[:,0]))[0]\n")
    e = explain_error(RuntimeError("element 0 of tensors does not require grad and does not "
                                   "have a grad_fn"), source=src, line=src.splitlines()[3],
                      lineno=4)
    assert "differentiates ux[:, 0], but ux[:, 0] has no grad_fn" in e.message, e.message
    assert "create_graph=True" in e.message
    line = "g = torch.autograd.grad(y.sum(), [x, t])"
    e = explain_error(RuntimeError("The differentiated Tensor at index 1 appears to not have "
                                   "been used in the graph."), source=line, line=line, lineno=1)
    assert "with respect to [x, t], but" in e.message and "y.sum()" in e.message
    ast.parse(e.fix)  # the fix is code that parses
    e = explain_error(RuntimeError("grad can be implicitly created only for scalar outputs"),
                      line="net(x)[:, 0].backward()", lineno=1)
    assert "gradient of net(x)[:, 0]," in e.message
    ast.parse(e.fix)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_a_nan_array_is_said_to_hold_nan():
    net, t = _net(), torch.linspace(-1, 1, 6).reshape(-1, 1)
    e = nbderiv.explain(torch.full((6, 1), float("nan")), net, t)
    assert e.code == "wrong"
    assert "holds NaN in 6 of its 6 entries" in e.message and "inf" not in e.message
    n64 = copy.deepcopy(net).double()
    truth = torch.func.vmap(torch.func.jacrev(lambda p: n64(p[None])[0]))(
        t.double()).detach().numpy()
    assert f"truth {float(truth[0, 0, 0]):.4g} there" in e.message
    half = torch.func.vmap(torch.func.jacrev(lambda p: net(p[None])[0]))(t).detach().clone()
    half[3] = float("inf")
    e = nbderiv.explain(half, net, t)
    assert "holds inf in 1 of its 6 entries (the first at point 3" in e.message


class IgnoresT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x, tt):
        return self.n(x)


def test_none_for_an_ignored_second_input_names_that_input():
    torch.manual_seed(0)
    m, t = IgnoresT(), torch.linspace(-1, 1, 6).reshape(-1, 1)
    # independent: the derivative with respect to tt is 0 at every point
    jt = torch.autograd.functional.jacobian(lambda b: m(t, b), t.clone())
    assert not jt.any()
    e = nbderiv.explain(None, m, (t, t), wrt=[1])
    assert e.code == "none"
    assert "does not depend on tt (input 1 of x)" in e.message, e.message
    assert "not a torch tensor" not in e.message  # a tuple of tensors is fine


def test_wrong_names_the_model_input_not_the_position_in_wrt():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    X = torch.rand(8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = nbderiv.explain(3 * torch.ones(8, 1), net, X, wrt=[1])
    assert e.code == "wrong" and "input 1:" in e.message and "input 0" not in e.message


def test_tensorflow_tape_errors_are_explained():
    src = ("with tf.GradientTape() as tape:\n    tape.watch(X)\n    u = m(X)\n    v = 2*u\n"
           "gu = tape.gradient(u, X)\ngv = tape.gradient(v, X)\n")
    e = explain_error(RuntimeError("A non-persistent GradientTape can only be used to compute "
                                   "one set of gradients (or jacobians)"), source=src,
                      line="gv = tape.gradient(v, X)", lineno=6)
    assert e.code == "tape-used-twice" and "persistent=True" in e.fix
    assert "`gu = tape.gradient(u, X)`" in e.message
    # a list of targets is no way around it: it sums them (it was offered as "one call for
    # both"); the fix says what it gives, checked here on TensorFlow itself
    assert "would give the gradient of u + v, not each" in e.fix
    src = ("with tf.GradientTape() as t2:\n    t2.watch(X)\n    with tf.GradientTape() as t1:\n"
           "        u = m(X)\n    g = t1.gradient(u, X)\nh = t2.gradient(g, X)\n")
    e = explain_error(TypeError("Argument `target` should be a list or nested structure of "
                                "Tensors, Variables or CompositeTensors to be differentiated, "
                                "but received None."), source=src,
                      line="h = t2.gradient(g, X)", lineno=6)
    assert e.code == "gradient-of-none"
    assert "g is None: it comes from `g = t1.gradient(u, X)`" in e.message
    assert "no t1.watch(X) in this cell" in e.message
    ast.parse(e.fix)


def test_a_list_of_targets_gives_the_gradient_of_their_sum():
    tf = pytest.importorskip("tensorflow")
    x = tf.constant([[0.5], [1.5]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        u, v = x ** 2, tf.sin(x)
    both = tape.gradient([u, v], x).numpy()
    np.testing.assert_allclose(both, (2 * x + tf.cos(x)).numpy(), rtol=1e-6)
