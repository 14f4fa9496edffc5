"""The backend contract: every backend in the registry passes these tests.

The interface is written down in ``nbderiv/backends/base.py``; these tests are what it means.
Each test runs once per framework in :func:`nbderiv.backends.known_frameworks` (a framework
that is not installed is skipped). A new backend needs its module, its registry line, and an
entry in :data:`KITS` below: a small class that builds the same few models with that
framework (plain functions of its tensors, an MLP from given numpy weights, a ReLU net with
known kinks, a model that changes its own state).

Every derivative is compared with something independent of nbderiv and of the framework:
closed forms written in numpy, and float64 central differences of a numpy forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import numpy as np
import pytest
from checks import assert_close

import nbderiv  # noqa: F401  (the package under test)
from nbderiv import compute
from nbderiv.backends import get_backend, known_frameworks
from nbderiv.backends.base import OPTIONAL, Backend, Block
from nbderiv.call import Verdict
from nbderiv.errors import OutputError

REQUIRED = ("to_numpy", "compute_dtype", "forwards", "derivatives", "per_point_derivatives",
            "full_jacobian", "preserved", "layer_summary", "equivalent_code", "float64_copy")
METHOD_TAGS = ("taylor", "reverse-ones", "forward-jvp", "per-point-blocks")


# -- the kits: the same small models in every framework ---------------------------------------
class TorchKit:
    name = "torch"

    def __init__(self):
        self.torch = pytest.importorskip("torch")

    def tensor(self, a, dtype="float64"):
        return self.torch.as_tensor(np.asarray(a, dtype=dtype))

    def sin_poly(self):
        """X (n, 2) -> [sin(x0) * x1, x0**2 * x1**3]."""
        torch = self.torch
        return lambda X: torch.stack([torch.sin(X[:, 0]) * X[:, 1],
                                      X[:, 0] ** 2 * X[:, 1] ** 3], dim=1)

    def centred(self):
        """X - mean over the points: couples every point with every other."""
        return lambda X: X - X.mean(dim=0, keepdim=True)

    def coupled(self):
        """sin(X) - (mean over the points)**2."""
        torch = self.torch
        return lambda X: torch.sin(X) - X.mean(dim=0, keepdim=True) ** 2

    def two_arguments(self):
        torch = self.torch

        def f(u, v):
            return u * torch.sin(v)
        return f

    def too_few_rows(self):
        return lambda X: X.sum(dim=0, keepdim=True)

    def integer_output(self):
        return lambda X: (X > 0.5).to(self.torch.int32)

    def mlp(self, weights, dtype="float64"):
        """x @ W1 + b1 -> tanh -> @ W2 + b2, with the given numpy weights."""
        nn = self.torch.nn
        (W1, b1), (W2, b2) = weights
        dtype = getattr(self.torch, dtype)
        net = nn.Sequential(nn.Linear(*W1.shape, dtype=dtype), nn.Tanh(),
                            nn.Linear(*W2.shape, dtype=dtype))
        with self.torch.no_grad():  # float64 weights, rounded once to the model's dtype
            for layer, (W, b) in zip((net[0], net[2]), weights, strict=True):
                layer.weight.copy_(self.tensor(W.T))
                layer.bias.copy_(self.tensor(b))
        return net

    def relu_net(self):
        """1 -> 3 -> 1, ReLU on x - 0.5, x, x + 0.5: kinks at x = 0.5, 0, -0.5."""
        nn = self.torch.nn
        net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)).double()
        with self.torch.no_grad():
            net[0].weight.fill_(1.0)
            net[0].bias.copy_(self.tensor([-0.5, 0.0, 0.5]))
            net[2].weight.copy_(self.tensor([[1.0, 2.0, -1.0]]))
            net[2].bias.zero_()
        return net

    def stateful(self):
        """(model, state()): a train-mode BatchNorm (running statistics) and a buffer that
        counts the forward passes; state() copies every piece of it."""
        torch, nn = self.torch, self.torch.nn

        class Counter(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

            def forward(self, x):
                self.calls += 1
                return x

        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), Counter(), nn.Tanh(),
                            nn.Linear(3, 1)).double().train()
        return net, lambda: [b.detach().clone().numpy() for b in net.buffers()]


class KerasKit:
    name = "tensorflow"

    def __init__(self):
        self.tf = pytest.importorskip("tensorflow")
        self.keras = pytest.importorskip("keras")
        if self.keras.backend.backend() != "tensorflow":  # pragma: no cover
            pytest.skip("Keras is not on its TensorFlow backend")

    def tensor(self, a, dtype="float64"):
        return self.tf.constant(np.asarray(a, dtype=dtype))

    def sin_poly(self):
        tf = self.tf
        return lambda X: tf.stack([tf.sin(X[:, 0]) * X[:, 1], X[:, 0] ** 2 * X[:, 1] ** 3],
                                  axis=1)

    def centred(self):
        return lambda X: X - self.tf.reduce_mean(X, axis=0, keepdims=True)

    def coupled(self):
        tf = self.tf
        return lambda X: tf.sin(X) - tf.reduce_mean(X, axis=0, keepdims=True) ** 2

    def two_arguments(self):
        tf = self.tf

        def f(u, v):
            return u * tf.sin(v)
        return f

    def too_few_rows(self):
        return lambda X: self.tf.reduce_sum(X, axis=0, keepdims=True)

    def integer_output(self):
        return lambda X: self.tf.cast(X > 0.5, self.tf.int32)

    def mlp(self, weights, dtype="float64"):
        keras = self.keras
        (W1, b1), (W2, b2) = weights
        net = keras.Sequential([keras.Input((W1.shape[0],), dtype=dtype),
                                keras.layers.Dense(W1.shape[1], "tanh", dtype=dtype),
                                keras.layers.Dense(W2.shape[1], dtype=dtype)])
        net.set_weights([W1, b1, W2, b2])
        return net

    def relu_net(self):
        keras = self.keras
        net = keras.Sequential([keras.Input((1,), dtype="float64"),
                                keras.layers.Dense(3, "relu", dtype="float64"),
                                keras.layers.Dense(1, dtype="float64")])
        net.set_weights([np.ones((1, 3)), np.array([-0.5, 0.0, 0.5]),
                         np.array([[1.0], [2.0], [-1.0]]), np.zeros(1)])
        return net

    def stateful(self):
        """(model, state()): a layer that assigns one of its variables inside call."""
        keras = self.keras

        class Counting(keras.layers.Layer):
            def __init__(self):
                super().__init__(dtype="float64")
                self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

            def call(self, x):
                self.calls.assign_add(1.0)
                return x

        net = keras.Sequential([keras.Input((2,), dtype="float64"),
                                keras.layers.Dense(3, "tanh", dtype="float64"), Counting(),
                                keras.layers.Dense(1, dtype="float64")])
        return net, lambda: [np.array(v.numpy(), copy=True) for v in net.variables]


KITS = {"torch": TorchKit, "tensorflow": KerasKit}


@pytest.fixture(params=known_frameworks())
def kit(request):
    if request.param not in KITS:
        pytest.fail(f"backend {request.param!r} has no kit in tests/test_backends.py: add one "
                    "to KITS so that it runs the contract")
    return KITS[request.param]()


@pytest.fixture
def backend(kit):
    return get_backend(kit.name)


def probed_verdict(call):
    """What the core's probe measures with its forward passes (no structural shortcut)."""
    with mock.patch.object(call.backend, "known_verdict", return_value=None):
        return compute.probe(dataclasses.replace(call))


def opened(kit, model, x, probe=True):
    call = compute.open_call(model, x, kit.name)
    if probe:
        compute.probe(call)
    return call


# -- independent references ------------------------------------------------------------------
def sin_poly_values(X):
    return np.stack([np.sin(X[:, 0]) * X[:, 1], X[:, 0] ** 2 * X[:, 1] ** 3], axis=1)


def sin_poly_closed_form(X, order):
    """d^k of [sin(x0) * x1, x0**2 * x1**3], (n, 2) + (2,) * k, from the formulas."""
    x0, x1 = X[:, 0], X[:, 1]
    sin_derivs = [np.sin(x0), np.cos(x0), -np.sin(x0), -np.cos(x0)]
    out = np.zeros((len(X), 2) + (2,) * order)
    for idx in np.ndindex(*(2,) * order):
        i, j = idx.count(0), idx.count(1)  # derivatives along x0 and along x1
        first = sin_derivs[i % 4] * (x1 if j == 0 else np.ones_like(x1) if j == 1 else 0)
        second = (math.perm(2, i) * x0 ** max(2 - i, 0) if i <= 2 else 0 * x0) * (
            math.perm(3, j) * x1 ** max(3 - j, 0) if j <= 3 else 0 * x1)
        out[(slice(None), 0) + idx] = first
        out[(slice(None), 1) + idx] = second
    return out


def tanh_derivative(k, z):
    """tanh^(k)(z), from P_0 = s, P_{k+1} = P_k'(s) (1 - s**2)."""
    p = np.polynomial.Polynomial([0, 1])
    for _ in range(k):
        p = p.deriv() * np.polynomial.Polynomial([1, 0, -1])
    return p(np.tanh(z))


def mlp_forward(weights, X):
    (W1, b1), (W2, b2) = weights
    return np.tanh(X @ W1 + b1) @ W2 + b2


def mlp_closed_form(weights, X, order):
    """d^k y_o / dx_i1 ... dx_ik = sum_h W2[h, o] tanh^(k)(z_h) W1[i1, h] ... W1[ik, h]."""
    (W1, b1), (W2, _) = weights
    t = tanh_derivative(order, X @ W1 + b1)  # (n, h)
    letters = "ijklm"[:order]
    factors = ",".join(f"{c}h" for c in letters)
    return np.einsum(f"nh,ho,{factors}->no{letters}", t, W2, *([W1] * order))


def keep(d, wrt):
    """The wrt slice of a full derivative array, on every input axis."""
    k = d.ndim - 2
    return d[np.ix_(*([np.arange(d.shape[0]), np.arange(d.shape[1])] + [np.array(wrt)] * k))]


WEIGHTS = [(np.array([[0.7, -1.1, 0.4, 0.9, -0.3], [0.5, 0.8, -1.2, 0.2, 1.0]]),
            np.array([0.1, -0.2, 0.3, 0.0, -0.4])),
           (np.array([[1.0, -0.5], [0.6, 0.9], [-0.8, 0.3], [0.4, -1.3], [1.1, 0.7]]),
            np.array([0.05, -0.15]))]
X2 = np.array([[0.3, -0.7], [1.1, 0.4], [-0.9, 1.3], [0.05, 0.6], [-1.4, -0.2]])


# -- the interface itself ---------------------------------------------------------------------
def test_the_interface_lists_ten_required_members_and_the_optional_group():
    public = {n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")}
    assert public - OPTIONAL == set(REQUIRED)
    assert OPTIONAL <= public
    base = Backend()
    with pytest.raises(NotImplementedError):
        base.to_numpy([1.0])
    with pytest.raises(TypeError, match="optional"):  # an override it did not declare
        type("Undeclared", (Backend,), {"kink_points": lambda self, call, args: [0]})
    with pytest.raises(TypeError, match="optional"):  # a declaration it does not implement
        type("Overdeclared", (Backend,), {"optional": frozenset({"block_rows"})})


def test_required_members_implemented_and_optional_declared(backend, kit):
    assert backend.name == kit.name and get_backend(kit.name) is backend
    cls = type(backend)
    missing = [m for m in REQUIRED if getattr(cls, m) is getattr(Backend, m)]
    assert not missing, f"{cls.__name__} does not implement {missing}"
    overridden = {m for m in OPTIONAL if getattr(cls, m) is not getattr(Backend, m)}
    assert set(cls.optional) == overridden


# -- conversion and dtype ----------------------------------------------------------------------
def test_to_numpy_of_tensors_and_lists(backend, kit):
    a = np.array([[1.5, -2.0], [0.25, 3.0]])
    for dtype in ("float64", "float32"):
        t = kit.tensor(a, dtype)
        got = backend.to_numpy(t)
        assert isinstance(got, np.ndarray) and got.dtype == dtype
        np.testing.assert_array_equal(got, a.astype(dtype))
        got[0, 0] = 99.0  # a copy: the tensor keeps its value
        np.testing.assert_array_equal(backend.to_numpy(t), a.astype(dtype))
    listed = backend.to_numpy([[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(listed, np.ndarray) and listed.shape == (2, 2)
    np.testing.assert_array_equal(listed, [[1.0, 2.0], [3.0, 4.0]])


def test_compute_dtype_follows_the_models_float_dtype(backend, kit):
    for dtype in ("float32", "float64"):
        model = kit.mlp(WEIGHTS, dtype)
        for x_dtype in ("float32", "float64", "int64"):
            assert backend.compute_dtype(model, np.dtype(x_dtype)) == np.dtype(dtype)
    fn = kit.sin_poly()  # no parameters: x's float dtype, else a float default
    assert backend.compute_dtype(fn, np.dtype("float64")) == np.float64
    assert backend.compute_dtype(fn, np.dtype("float32")) == np.float32
    assert np.dtype(backend.compute_dtype(fn, np.dtype("int64"))).kind == "f"


# -- forward passes --------------------------------------------------------------------------
def test_forwards_returns_one_output_array_per_batch(backend, kit):
    call = opened(kit, kit.sin_poly(), X2, probe=False)
    assert call.dtype == np.float64
    batches = [call.rows(0, 2), call.rows(2, 4), call.rows(3, 5)]
    ys = backend.forwards(call, batches)
    assert len(ys) == 3
    for y, rows in zip(ys, (slice(0, 2), slice(2, 4), slice(3, 5)), strict=True):
        assert isinstance(y, np.ndarray) and y.shape == (2, 2) and y.dtype == np.float64
        assert_close(y, sin_poly_values(X2[rows]), 1e-14, "forwards")
    assert compute.probe(call) == Verdict(2, False, False)
    coupled = opened(kit, kit.centred(), X2)
    assert coupled.verdict == Verdict(2, False, True)


@pytest.mark.parametrize("bad", ["too_few_rows", "integer_output"])
def test_forwards_rejects_bad_outputs(backend, kit, bad):
    call = opened(kit, getattr(kit, bad)(), X2, probe=False)
    with pytest.raises(OutputError):
        backend.forwards(call, [call.args])


# -- derivatives of one block ------------------------------------------------------------------
def check_block(block, X, reference, order, wrt, tol, what):
    """block.orders against reference(X, k) restricted to wrt, for k = 1..order."""
    assert isinstance(block, Block) and len(block.orders) == order
    assert isinstance(block.method, str) and block.method.startswith(METHOD_TAGS), block.method
    for k, d in enumerate(block.orders, start=1):
        assert d.shape == (len(X), block.y.shape[1]) + (len(wrt),) * k, (what, k)
        assert_close(d, keep(reference(X, k), wrt), tol, f"{what} d{k} wrt={wrt}")


@pytest.mark.parametrize("order,wrt", [(1, (0, 1)), (2, (0, 1)), (3, (0, 1)), (2, (1,)),
                                       (2, (1, 0))])
def test_derivatives_of_a_function_match_the_closed_form(backend, kit, order, wrt):
    call = opened(kit, kit.sin_poly(), X2)
    block = backend.derivatives(call, call.args, order, wrt)
    assert block.y.dtype == np.float64 and block.orders[-1].dtype == np.float64
    assert_close(block.y, sin_poly_values(X2), 1e-14, "y")
    check_block(block, X2, sin_poly_closed_form, order, wrt, 1e-12, "sin-poly")


@pytest.mark.parametrize("order,wrt", [(1, (0, 1)), (2, (0, 1)), (3, (0, 1)), (3, (0,)),
                                       (2, (1, 0))])
def test_derivatives_of_an_mlp_match_closed_form_and_central_differences(
        backend, kit, central_fd, order, wrt):
    call = opened(kit, kit.mlp(WEIGHTS), X2)
    block = backend.derivatives(call, call.args, order, wrt)
    assert_close(block.y, mlp_forward(WEIGHTS, X2), 1e-13, "y")
    check_block(block, X2, lambda X, k: mlp_closed_form(WEIGHTS, X, k), order, wrt, 1e-11,
                "mlp")

    def forward(X):
        return mlp_forward(WEIGHTS, X)
    for k in range(1, min(order, 2) + 1):
        assert_close(block.orders[k - 1], keep(central_fd(forward, X2, k), wrt), 1e-6,
                     f"mlp d{k} vs central differences")


def test_an_mlp_with_the_same_weights_gives_the_same_derivatives_in_every_framework():
    blocks = {}
    for name in known_frameworks():
        kit = KITS[name]() if name in KITS else pytest.fail(f"no kit for {name!r}")
        call = opened(kit, kit.mlp(WEIGHTS), X2)
        blocks[name] = call.backend.derivatives(call, call.args, 2, (0, 1))
    if len(blocks) < 2:  # pragma: no cover
        pytest.skip("one framework installed")
    first, *others = blocks.values()
    for other in others:
        for a, b in zip([first.y] + first.orders, [other.y] + other.orders, strict=True):
            assert_close(a, b, 1e-12, "framework against framework")


@pytest.mark.parametrize("model,order,wrt", [("sin_poly", 2, (0, 1)), ("mlp", 3, (0,)),
                                             ("mlp", 2, (1, 0))])
def test_derivatives_into_given_arrays(backend, kit, model, order, wrt):
    """``out=``: the values end up in the given arrays (views of a larger result), whether
    the backend writes there itself or returns arrays of its own, and nothing outside the
    views is touched."""
    if model == "mlp":
        fn, reference = kit.mlp(WEIGHTS), (lambda X, k: mlp_closed_form(WEIGHTS, X, k))
        y_ref = mlp_forward(WEIGHTS, X2)
    else:
        fn, reference, y_ref = kit.sin_poly(), sin_poly_closed_form, sin_poly_values(X2)
    call = opened(kit, fn, X2)
    n, m = len(X2), len(wrt)
    full = [np.full((n + 3, 2) + (m,) * k, np.nan) for k in range(order + 1)]
    out = Block(full[0][1:n + 1], [f[1:n + 1] for f in full[1:]], "")
    got = backend.derivatives(call, call.args, order, wrt, out=out)
    if got.y is out.y:  # written in place: then every order was
        assert all(g is o for g, o in zip(got.orders, out.orders, strict=True))
    else:  # arrays of its own: the core copies them (compute.run_blocks)
        out.y[...] = got.y
        for dst, d in zip(out.orders, got.orders, strict=True):
            dst[...] = d
    assert_close(out.y, y_ref, 1e-13, "y in out")
    for k in range(1, order + 1):
        assert_close(out.orders[k - 1], keep(reference(X2, k), wrt), 1e-11, f"d{k} in out")
    for f in full:
        assert np.isnan(f[0]).all() and np.isnan(f[n + 1:]).all(), "written outside the view"


# -- models that couple the points --------------------------------------------------------------
def test_per_point_derivatives_of_a_coupling_model(backend, kit):
    """f(X) = sin(X) - mean(X)**2 (mean over the points): with the other points held fixed,
    d f_ni / d x_nj = delta_ij (cos x_ni - 2 m_i / N), d2 = delta_ijk (-sin x_ni - 2 / N**2)."""
    call = opened(kit, kit.coupled(), X2)
    assert call.verdict.coupled
    N, mean = len(X2), X2.mean(axis=0)
    eye = np.eye(2)
    d1 = np.einsum("ni,ij->nij", np.cos(X2) - 2 * mean / N, eye)
    d2 = np.einsum("ni,ij,ik->nijk", -np.sin(X2) - 2 / N ** 2, eye, eye)
    for wrt in ((0, 1), (1,)):
        block = backend.per_point_derivatives(call, call.args, 2, wrt)
        assert_close(block.y, np.sin(X2) - mean ** 2, 1e-14, "y")
        assert_close(block.orders[0], keep(d1, wrt), 1e-12, f"per-point d1 wrt={wrt}")
        assert_close(block.orders[1], keep(d2, wrt), 1e-12, f"per-point d2 wrt={wrt}")
    # X - mean(X): each point's own block is (1 - 1/N) I; the ones trick would give 0
    call = opened(kit, kit.centred(), X2)
    block, ones_error = compute.per_point(call, 1, (0, 1))
    assert_close(block.orders[0], np.broadcast_to((1 - 1 / N) * eye, (N, 2, 2)), 1e-14, "d1")
    assert ones_error == pytest.approx(1 - 1 / N, rel=1e-12)


def test_full_jacobian_shape_and_values(backend, kit):
    N = len(X2)
    call = opened(kit, kit.centred(), X2)
    J = backend.full_jacobian(call, call.args)
    assert J.shape == (N, 2, N, 2)
    truth = np.einsum("nm,ij->nimj", np.eye(N) - 1 / N, np.eye(2))  # delta_ij (delta_nm - 1/N)
    assert_close(J, truth, 1e-14, "centred Jacobian")
    call = opened(kit, kit.sin_poly(), X2[:3])
    J = backend.full_jacobian(call, call.args)
    assert J.shape == (3, 2, 3, 2)
    truth = np.einsum("noi,nm->nomi", sin_poly_closed_form(X2[:3], 1), np.eye(3))
    assert_close(J, truth, 1e-12, "independent points: block diagonal")


# -- state, structure, code --------------------------------------------------------------------
def test_preserved_restores_state_changed_during_the_block(backend, kit):
    model, state = kit.stateful()
    before = state()
    call = opened(kit, model, X2, probe=False)

    def changed():
        return any(not np.array_equal(a, b) for a, b in zip(state(), before, strict=True))

    with backend.preserved(model):
        compute.probe(call)
        backend.derivatives(call, call.args, 1, (0, 1))
        assert changed(), "the model's forward pass changes its state (else this tests nothing)"
    assert not changed(), "state not restored"
    with pytest.raises(RuntimeError, match="inside the block"):
        with backend.preserved(model):
            backend.forwards(call, [call.args])
            assert changed()
            raise RuntimeError("inside the block")
    assert not changed(), "state not restored after an exception"


def test_layer_summary_keys(backend, kit):
    mlp = backend.layer_summary(kit.mlp(WEIGHTS))
    fn = backend.layer_summary(kit.sin_poly())
    for s in (mlp, fn):
        # (and what a backend adds: half_compute, layers computing in float16 / bfloat16)
        assert {"activations", "train_mode", "opaque"} <= set(s) <= {
            "activations", "train_mode", "opaque", "half_compute", "outside_tree",
            "batch_stats", "seq_first"}
        assert isinstance(s["activations"], list) and isinstance(s["train_mode"], list)
        assert isinstance(s["opaque"], bool)
    assert "tanh" in [a.lower() for a in mlp["activations"]]
    assert mlp["train_mode"] == [] and mlp["opaque"] is False
    assert fn["opaque"] is True
    relu = backend.layer_summary(kit.relu_net())
    assert "relu" in [a.lower() for a in relu["activations"]]


@pytest.mark.parametrize("case", ["mlp", "two-arguments"])
def test_equivalent_code_computes_the_same_derivatives(backend, kit, case):
    if case == "mlp":
        model, x, order, wrt, tol = kit.mlp(WEIGHTS), X2, 3, (1, 0), 1e-10
    else:  # plain code may differentiate a parameter-free function in the default dtype
        model, x, order, wrt, tol = kit.two_arguments(), (X2[:, 0], X2[:, 1]), 2, (1,), 1e-5
    call = opened(kit, model, x)
    block = backend.derivatives(call, call.args, order, wrt)
    code = backend.equivalent_code(order=order, wrt=wrt, widths=call.widths)
    assert isinstance(code, str)
    namespace = {"model": model, "x": x}
    exec(code, namespace)  # noqa: S102  (nbderiv's own generated code)
    for k in range(1, order + 1):
        got = np.asarray(namespace[f"d{k}"])
        assert_close(got.reshape(block.orders[k - 1].shape), block.orders[k - 1], tol,
                     f"code d{k}")


def test_float64_copy(backend, kit):
    model = kit.mlp(WEIGHTS, "float32")
    X = X2.astype(np.float32)
    copy = backend.float64_copy(model)
    call64 = opened(kit, copy, X2, probe=False)
    assert call64.dtype == np.float64
    (y64,) = backend.forwards(call64, [call64.args])
    assert y64.dtype == np.float64
    call32 = opened(kit, model, X, probe=False)
    (y32,) = backend.forwards(call32, [call32.args])
    assert y32.dtype == np.float32  # the model itself is left as it was
    assert_close(y64, y32, 1e-5, "copy against the model")
    assert_close(y64, mlp_forward(WEIGHTS, X2), 1e-5, "copy against numpy")
    fn = kit.sin_poly()
    assert backend.float64_copy(fn) is fn


def test_kink_points_finds_a_point_exactly_on_a_relu_kink(backend, kit):
    model = kit.relu_net()
    on = opened(kit, model, np.array([-1.0, 0.5, 0.3, 0.0, 2.0]))  # kinks: 0.5 and 0.0
    off = opened(kit, model, np.array([-1.0, 0.3, 2.0, 0.25, -0.4]))
    if "kink_points" not in backend.optional:  # the default finds nothing
        assert backend.kink_points(on, on.args) == []
        pytest.skip(f"{kit.name} does not offer kink_points")
    assert list(backend.kink_points(on, on.args)) == [1, 3]
    assert list(backend.kink_points(off, off.args)) == []
    smooth = opened(kit, kit.mlp(WEIGHTS), np.zeros((3, 2)))
    assert list(backend.kink_points(smooth, smooth.args)) == []


def test_block_rows_and_bytes_per_point(backend, kit):
    for model in (kit.mlp(WEIGHTS), kit.sin_poly()):
        call = opened(kit, model, X2)
        rows = backend.block_rows(call)
        assert rows is None or (isinstance(rows, int) and rows > 0), rows
        per_point = backend.bytes_per_point(call, 2, 2)
        assert isinstance(per_point, int) and per_point > 0


def test_known_verdict_agrees_with_the_probe(backend, kit):
    known = []
    for model in (kit.mlp(WEIGHTS), kit.sin_poly(), kit.centred(), kit.stateful()[0]):
        with backend.preserved(model):
            opened(kit, model, X2)  # a first call, which a backend may learn from
            call = opened(kit, model, X2, probe=False)
            verdict = backend.known_verdict(call)
            if verdict is not None:
                known.append(model)
                assert isinstance(verdict, Verdict)
                assert verdict == probed_verdict(call)
    if "known_verdict" in backend.optional:
        assert known, "declares known_verdict but knows no verdict, not even for a plain MLP"


def test_argument_names_and_input_width(backend, kit):
    names = backend.argument_names(kit.two_arguments(), 2)
    assert names is None or list(names) == ["u", "v"]
    if "argument_names" in backend.optional:
        assert list(names) == ["u", "v"]
    width = backend.input_width(kit.mlp(WEIGHTS))
    assert width is None or width == 2


# -- the core over a backend ---------------------------------------------------------------------
@pytest.mark.parametrize("order,wrt", [(3, (0,)), (2, (0, 1))])
def test_run_blocks_in_several_overlapping_blocks_equals_one_block(backend, kit, monkeypatch,
                                                                   order, wrt):
    X = np.concatenate([X2, X2[::-1] * 0.5 + 0.1, X2[:1] - 0.3])  # 11 points
    call = opened(kit, kit.mlp(WEIGHTS), X)
    whole = compute.run_blocks(call, order, wrt, rows=len(X))
    seen = []
    original = type(backend).derivatives

    def counting(self, call, args, order, wrt, out=None):
        seen.append((args[0].shape[0], out is not None))
        return original(self, call, args, order, wrt, out=out)

    monkeypatch.setattr(type(backend), "derivatives", counting)
    blocked = compute.run_blocks(call, order, wrt, rows=4)  # rows 0-3, 4-7, 7-10
    assert seen == [(4, False), (4, True), (4, True)]
    assert blocked.method.startswith(METHOD_TAGS)
    assert_close(blocked.y, whole.y, 1e-14, "y")
    for k in range(1, order + 1):
        assert_close(blocked.orders[k - 1], whole.orders[k - 1], 1e-13, f"d{k} blocked")
        assert_close(blocked.orders[k - 1], keep(mlp_closed_form(WEIGHTS, X, k), wrt), 1e-11,
                     f"d{k} closed form")
