"""The fix code ``nbderiv.explain`` offers is run, and its numbers are compared with an
independent truth: float64 ``torch.autograd.functional.jacobian`` (its diagonal blocks) or a
float64 ``tf.GradientTape``."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def diagonal_blocks64(model, x):
    """Each point's derivative with the rest of the batch fixed: J[n, :, n, :] of the float64
    batch Jacobian of a float64 copy of ``model``."""
    m = copy.deepcopy(model).double()
    X = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda p: m(p).reshape(len(p), -1), X).numpy()
    i = np.arange(len(X))
    return J[i, :, i, :]


class Centred(torch.nn.Module):
    """Couples the points through x.mean(0) in forward: no layer in training mode."""

    def __init__(self):
        super().__init__()
        self.n = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(),
                                     torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.n(x - x.mean(0, keepdim=True))


def _run_fix(fix, model, x, mine=None):
    ns = {"torch": torch, "np": np, "nbderiv": nbderiv, "model": model, "x": x, "mine": mine}
    exec(fix, ns)  # noqa: S102
    d1 = ns["d1"]
    return np.asarray(d1.detach() if hasattr(d1, "detach") else d1)


def _batchnorm_in_training():
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                             torch.nn.Linear(8, 1))
    return bn, torch.linspace(-1, 1, 10).reshape(-1, 1)


def _ones_trick(model, t):
    """The student's grad_outputs=ones derivative of model at t."""
    x = t.clone().requires_grad_(True)
    y = model(x)
    g, = torch.autograd.grad(y, x, torch.ones_like(y))
    return g


def test_coupled_by_a_mean_in_forward_fix_gives_the_diagonal_blocks():
    torch.manual_seed(0)
    c = Centred()
    t = torch.linspace(-1, 1, 9).reshape(-1, 1)
    e = nbderiv.explain(_ones_trick(c, t), c, t)
    assert e.code == "coupled-samples"
    truth = diagonal_blocks64(c, t)
    assert np.abs(truth).min() > 0.1  # far from the 0 a batch of one gives
    np.testing.assert_allclose(e.truth, truth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_run_fix(e.fix, c, t), truth, rtol=1e-4, atol=1e-6)
    # no layer in training mode: no batch statistics blamed, no eval() offered
    assert "eval()" not in e.fix and "BatchNorm" not in e.message
    assert "x.mean(0)" in e.message


def test_coupled_by_batchnorm_in_training_fix_gives_the_diagonal_blocks_then_eval():
    bn, t = _batchnorm_in_training()
    e = nbderiv.explain(_ones_trick(bn, t), bn, t)
    assert e.code == "coupled-samples" and "train-mode" in e.message
    truth = diagonal_blocks64(bn, t)
    np.testing.assert_allclose(e.truth, truth, rtol=1e-4, atol=1e-6)
    first, _, rest = e.fix.partition("# or the model in inference mode")
    assert ".eval()" in rest  # offered second, as what it is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(_run_fix(first, bn, t), truth, rtol=1e-4, atol=1e-6)
    assert bn.training


def test_tensorflow_cross_sample_jacobian_fix_runs():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh"),
                          keras.layers.Dense(1)])
    X = tf.random.uniform((6, 2))
    with tf.GradientTape() as tape:
        tape.watch(X)
        u = m(X)
    J = tape.jacobian(u, X)
    e = nbderiv.explain(J, m, X)
    assert e.code == "cross-sample-jacobian" and "mine.reshape" not in e.fix
    first = e.fix.split("# cheaper")[0]
    ns = {"tf": tf, "np": np, "mine": J, "model": m, "x": X}
    exec(first, ns)  # noqa: S102
    # independent: float64 tapes, one point at a time, on the same weights
    W = [w.numpy().astype(np.float64) for w in m.weights]
    X64 = tf.constant(np.asarray(X, dtype=np.float64))
    with tf.GradientTape() as t64:
        t64.watch(X64)
        y64 = tf.matmul(tf.tanh(tf.matmul(X64, W[0]) + W[1]), W[2]) + W[3]
    truth = t64.batch_jacobian(y64, X64).numpy()
    np.testing.assert_allclose(np.asarray(ns["d1"]), truth, rtol=1e-4, atol=1e-6)
    assert "np.reshape" in e.message  # the message's code works on a tf.Tensor too


def test_per_point_vmap_of_a_model_that_centres_the_batch_is_coupling_not_a_cut_graph():
    """vmap(jacrev) runs each point alone: x - x.mean(0) is then 0 and so is the derivative.
    That is the coupling (it said zeros-graph-broken, blaming .detach() and the like), and the
    fix gives the diagonal blocks."""
    torch.manual_seed(0)
    c = Centred()
    t = torch.linspace(-1, 1, 9).reshape(-1, 1)
    mine = torch.func.vmap(torch.func.jacrev(lambda p: c(p[None])[0]))(t)
    assert not mine.any()
    e = nbderiv.explain(mine, c, t)
    assert e.code == "coupled-samples", e.message
    assert "alone" in e.message and ".detach()" not in e.message
    truth = diagonal_blocks64(c, t)
    np.testing.assert_allclose(_run_fix(e.fix, c, t), truth, rtol=1e-4, atol=1e-6)


def test_the_whole_batchnorm_fix_runs_to_the_diagonal_blocks():
    """The inference-mode alternative is commented out: running the whole fix leaves d1 the
    diagonal blocks and the model in training mode."""
    bn, t = _batchnorm_in_training()
    e = nbderiv.explain(_ones_trick(bn, t), bn, t)
    truth = diagonal_blocks64(bn, t)
    np.testing.assert_allclose(_run_fix(e.fix, bn, t), truth, rtol=1e-4, atol=1e-6)
    assert bn.training


def test_a_random_model_is_not_judged_against_one_draw_and_the_random_state_is_kept():
    torch.manual_seed(0)
    drop = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(32, 1)).train()
    t = torch.rand(20, 2, generator=torch.Generator().manual_seed(1))
    g = _ones_trick(drop, t)
    state = torch.random.get_rng_state()
    e = nbderiv.explain(g, drop, t)
    assert torch.equal(torch.random.get_rng_state(), state)  # nbderiv drew none of yours
    nbderiv.derivatives(drop, t)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert e.code == "random-model", e.message
    assert "model.eval()" in e.fix and drop.training
    d1 = _run_fix(e.fix, drop, t)  # the deterministic (inference-mode) model's derivative
    assert not drop.training
    np.testing.assert_allclose(d1, diagonal_blocks64(drop.eval(), t), rtol=1e-4, atol=1e-6)


class _CutInside(torch.nn.Module):
    """tanh(l1(x)).detach() in forward: autodiff sees no path from x (cut=False: the same
    function without the cut, for the truth)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.cut = torch.nn.Linear(2, 16), torch.nn.Linear(16, 1), True

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h.detach() if self.cut else h)


def test_a_graph_cut_inside_the_model_gets_a_fix_that_gives_its_true_derivative():
    """The runnable part of the fix gives the model's derivative as it is (central
    differences); the autodiff code, which gives 0 until forward is fixed, is commented out
    (it ran and gave 0)."""
    m = _CutInside()
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    e = nbderiv.explain(torch.zeros(8, 2), m, x)
    assert e.code == "zeros-graph-broken"
    whole = copy.deepcopy(m).double()
    whole.cut = False
    truth = torch.func.vmap(torch.func.jacrev(lambda p: whole(p[None])[0]))(
        x.double()).detach().numpy()
    assert np.abs(truth).max() > 0.05
    np.testing.assert_allclose(_run_fix(e.fix, m, x), truth, rtol=1e-3, atol=1e-5)


class _HalfDetached(torch.nn.Module):
    """a(z) + b(z.detach()): the model cuts part of its own graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Linear(2, 1).double()
        self.b = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                                     torch.nn.Linear(8, 1)).double()

    def forward(self, z):
        return self.a(z) + self.b(z.detach())


def test_the_fix_for_a_model_that_cuts_its_own_graph_gives_the_true_slopes():
    """The student's autograd.grad sees the a-part only: wrong. The fix was vmap(jacrev),
    which sees the same a-part (the student's numbers again); now central differences of the
    forward pass. Truth: float64 central differences written here."""
    model = _HalfDetached()
    X = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = X.clone().requires_grad_(True)
    (mine,) = torch.autograd.grad(model(x).sum(), x)
    e = nbderiv.explain(mine, model, X)
    assert e.code == "wrong"
    h, eye = 1e-6, torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        fd = torch.stack([(model(X + h * eye[j]) - model(X - h * eye[j]))[:, 0] / (2 * h)
                          for j in range(2)], 1).numpy()
    np.testing.assert_allclose(_run_fix(e.fix, model, X).reshape(8, 2), fd, atol=1e-6)
    assert np.abs(fd - mine.numpy()).max() > 1e-2  # the student's numbers are off
