"""Wrapped models keep their protection (issue 17) and state changed inside forward is put
back (issue 18): a lambda, ``functools.partial``, bound method, closure, callable object or
plain ``def`` naming a global model gets the findings, state restoration and framework
detection of the model itself; ``nbderiv.wrapped.objects_inside`` on its own (no framework);
lazy torch modules refused before they are initialised."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nbderiv.wrapped import is_framework_object, objects_inside, with_replaced


# -- objects_inside, no framework needed ------------------------------------------------------
class Box:
    """Stands for a model: callable, holding things."""

    def __init__(self, *items):
        self.items = list(items)

    def __call__(self, x):
        return x


class FrameworkThing:
    """Looks like a framework object (its class comes from 'torch.*'); never looked into."""

    __module__ = "torch.nn.fake"

    def __init__(self):
        self.secret = Box()


MODEL = Box()
UNUSED = Box()


def uses_model(x):
    return MODEL(x)


def test_closure_cells_partial_and_defaults():
    a, b, c = Box(), Box(), Box()
    assert objects_inside(lambda x: a(x)) == [a]
    found = objects_inside(functools.partial(lambda m, x, k=None: m(x), b, k=c))
    assert found == [b, c]
    assert objects_inside(lambda x, m=a: m(x)) == [a]


def test_attributes_of_plain_objects_a_closure_or_global_holds():
    model = Box()

    class Config:  # neither callable nor a bound method's __self__
        pass

    trainer = Config()
    trainer.model = model
    assert model in objects_inside(lambda x: trainer.model(x))
    settings = Config()
    settings.inner = Config()
    settings.inner.net = model
    assert model in objects_inside(lambda x: settings.inner.net(x))


def test_bound_method_self_and_its_attributes():
    model = Box()

    class Trainer:  # not callable: reached as a bound method's __self__
        def __init__(self):
            self.net = model

        def predict(self, x):
            return self.net(x)

    trainer = Trainer()
    found = objects_inside(trainer.predict)
    assert found[0] is trainer and model in found


def test_globals_only_those_the_code_names_nested_code_included():
    found = objects_inside(uses_model)
    assert MODEL in found and UNUSED not in found

    def outer(x):
        return [MODEL(v) for v in x]  # the comprehension / nested code names MODEL

    assert MODEL in objects_inside(outer)


def test_wrapped_callable_objects_and_depth():
    inner = Box()

    @functools.wraps(uses_model)
    def decorated(x):
        return x

    assert MODEL in objects_inside(decorated)  # through __wrapped__
    holder = Box(inner)
    assert inner in objects_inside(holder)  # a callable object's attributes (a list of them)
    deep = lambda x: (lambda y: (lambda z: inner(z))(y))(x)  # noqa: E731
    assert inner not in objects_inside(lambda x: deep(x), depth=1)
    assert inner in objects_inside(lambda x: deep(x), depth=5)


def test_cycles_duplicates_and_what_is_left_out():
    a = Box()
    a.items.append(a)  # a cycle
    found = objects_inside(lambda x: a(x) + a(x) + len(sys.argv) + 1.5)
    assert found.count(a) == 1 and sys not in found
    assert objects_inside(abs) == [] and objects_inside(len) == []
    assert objects_inside(42) == []


def test_framework_objects_are_returned_never_looked_into():
    thing = FrameworkThing()
    assert is_framework_object(thing) and not is_framework_object(Box())
    found = objects_inside(lambda x: thing(x))
    assert found == [thing] and thing.secret not in found
    assert objects_inside(thing) == []


GLOBAL_BOX = Box()


def test_with_replaced_swaps_what_a_wrapper_holds_and_leaves_it_as_it_was():
    a, b = Box(), Box()
    swapped = {id(a): Box(), id(b): Box(), id(GLOBAL_BOX): Box()}
    replace = lambda obj: swapped.get(id(obj))  # noqa: E731
    closure = lambda z: (a, b, a, z)  # noqa: E731
    new = with_replaced(closure, replace)
    assert new(1) == (swapped[id(a)], swapped[id(b)], swapped[id(a)], 1)
    assert closure(1) == (a, b, a, 1)  # the user's wrapper is unchanged
    new = with_replaced(lambda z: GLOBAL_BOX(z) and GLOBAL_BOX, replace)
    assert new(1) is swapped[id(GLOBAL_BOX)] and GLOBAL_BOX is not swapped[id(GLOBAL_BOX)]
    part = functools.partial(lambda m, z, k=None: (m, k), a, k=b)
    assert with_replaced(part, replace)(0) == (swapped[id(a)], swapped[id(b)])
    assert with_replaced(a.__call__, replace).__self__ is swapped[id(a)]
    assert with_replaced(lambda z: z, replace) is None  # nothing to swap
    assert with_replaced(Box(), replace) is None  # a callable object: not rebuilt


def test_objects_inside_imports_no_framework():
    code = """
import json, sys, functools
import nbderiv.wrapped as w
from nbderiv.backends import framework_of_model
class M:
    def __call__(self, x):
        return x
m = M()
found = w.objects_inside(functools.partial(lambda a, x: a(x), m))
kind = framework_of_model(lambda x: m(x))
print(json.dumps({"found": len(found), "kind": kind,
                  "modules": sorted({k.split('.')[0] for k in sys.modules})}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["found"] == 1 and out["kind"] is None
    assert not {"torch", "tensorflow", "keras"} & set(out["modules"])


# -- torch --------------------------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch")


def bn_cnn(train=True):
    torch = _torch()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(256, 2)).double()
    return net.train(train)


def _reshaped(net, z):
    return net(z.reshape(-1, 3, 8, 8))


class Holder:
    def __init__(self, net):
        self.net = net

    def predict(self, z):
        return _reshaped(self.net, z)


class CallableModel:
    def __init__(self, net):
        self.net = net

    def __call__(self, z):
        return _reshaped(self.net, z)


GLOBAL_NET = None


def global_user(z):
    return GLOBAL_NET(z.reshape(-1, 3, 8, 8))


def _closure(net):
    def fn(z):
        return net(z.reshape(-1, 3, 8, 8))
    return fn


class Trainer:  # a plain object of the user's, holding the model as an attribute
    def __init__(self, net):
        self.model = net

    def wrapped(self):  # the usual form inside a method: a lambda over self
        return lambda z: self.model(z.reshape(-1, 3, 8, 8))


def _through_an_attribute(net):
    trainer = Trainer(net)
    return lambda z: trainer.model(z.reshape(-1, 3, 8, 8))


WRAPPERS = {
    "lambda": lambda net: (lambda z: net(z.reshape(-1, 3, 8, 8))),
    "attribute of an object": _through_an_attribute,
    "lambda over self": lambda net: Trainer(net).wrapped(),
    "partial": lambda net: functools.partial(_reshaped, net),
    "bound method": lambda net: Holder(net).predict,
    "closure": _closure,
    "callable object": CallableModel,
    "global": None,
}


def wrap(kind, net):
    global GLOBAL_NET
    if kind == "global":
        GLOBAL_NET = net
        return global_user
    return WRAPPERS[kind](net)


def _state(net):
    return {name: t.detach().clone() for name, t in
            list(net.state_dict(keep_vars=True).items())}


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_torch_wrapper_keeps_findings_and_state(kind):
    torch = _torch()
    import nbderiv
    from nbderiv.backends import framework_of_model

    net = bn_cnn(train=True)
    net[0].weight.requires_grad_(False)                 # a frozen parameter
    net[4].weight.grad = torch.full_like(net[4].weight, 0.25)  # an existing .grad
    grad = net[4].weight.grad
    before = _state(net)
    flags = [(m, m.training) for m in net.modules()]
    requires = [p.requires_grad for p in net.parameters()]
    fn = wrap(kind, net)
    assert framework_of_model(fn) == "torch"

    x = np.random.default_rng(0).normal(size=(4, 192))  # numpy: no framework= needed
    d = nbderiv.derivatives(fn, x)
    assert d.framework == "torch" and d[1].shape == (4, 2, 192)
    assert d.finding("train-mode") is not None

    after = _state(net)
    assert int(after["1.num_batches_tracked"]) == 0
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert all(m.training == mode for m, mode in flags)
    assert [p.requires_grad for p in net.parameters()] == requires
    assert net[0].weight.grad is None and net[0].bias.grad is None
    assert net[4].weight.grad is grad and bool((grad == 0.25).all())


def test_train_mode_wrapper_values_are_the_per_point_blocks():
    torch = _torch()
    import nbderiv

    net = bn_cnn(train=True)
    fn = wrap("lambda", net)
    X = torch.as_tensor(np.random.default_rng(1).normal(size=(3, 192)))
    d = nbderiv.derivatives(fn, X)
    ref = copy.deepcopy(net)  # the reference changes its statistics: on a copy
    J = torch.autograd.functional.jacobian(lambda z: ref(z.reshape(-1, 3, 8, 8)), X)
    blocks = np.stack([J[n, :, n, :].numpy() for n in range(3)])
    np.testing.assert_allclose(d[1], blocks, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_torch_wrapper_values_against_vmap_jacrev(kind):
    torch = _torch()
    from torch.func import jacrev, vmap

    import nbderiv

    net = bn_cnn(train=False)
    fn = wrap(kind, net)
    X = torch.as_tensor(np.random.default_rng(2).normal(size=(5, 192)))
    d = nbderiv.derivatives(fn, X, order=2)
    one = lambda x: fn(x.unsqueeze(0)).reshape(-1)  # noqa: E731
    np.testing.assert_allclose(d[1], vmap(jacrev(one))(X).detach().numpy(), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(d[2], vmap(jacrev(jacrev(one)))(X).detach().numpy(),
                               rtol=1e-8, atol=1e-11)
    assert d.finding("train-mode") is None


def test_torch_layer_summary_and_input_width_through_a_wrapper():
    torch = _torch()
    from nbderiv.backends import get_backend

    backend = get_backend("torch")
    net = bn_cnn(train=True)
    s = backend.layer_summary(lambda z: net(z))
    assert s["train_mode"] == ["1 (BatchNorm2d)"] and s["activations"] == ["Tanh"]
    assert s["opaque"] is True
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    assert backend.input_width(lambda x: mlp(x)) == 3
    assert backend.input_width(functools.partial(lambda m, x: m(x), mlp)) == 3
    assert backend.input_width(lambda x: x) is None


class WritesFrozen:
    """A module whose forward writes its frozen parameter and replaces another one."""

    @staticmethod
    def build():
        torch = _torch()

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(2, 1).double()
                self.frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64),
                                                 requires_grad=False)
                self.other = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64),
                                                requires_grad=False)

            def forward(self, x):
                self.frozen.mul_(0.5)  # in place on a frozen parameter
                self.other = torch.nn.Parameter(self.other + 1, requires_grad=False)
                return torch.tanh(self.lin(x))

        return Net()


@pytest.mark.parametrize("wrapped", [False, True])
def test_frozen_parameter_written_in_forward_is_restored(wrapped):
    torch = _torch()
    import nbderiv

    net = WritesFrozen.build()
    frozen, other = net.frozen, net.other
    model = (lambda x: net(x)) if wrapped else net
    x = torch.rand(6, 2, dtype=torch.float64)
    d = nbderiv.derivatives(model, x, order=2)
    assert d[2].shape == (6, 1, 2, 2)
    assert net.frozen is frozen and torch.equal(frozen, torch.ones(3, dtype=torch.float64))
    assert net.other is other and float(other) == 0.0
    assert not frozen.requires_grad and frozen.grad is None


def test_requires_grad_and_grad_changed_in_forward_are_restored():
    torch = _torch()
    import nbderiv

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1).double()

        def forward(self, x):
            self.lin.weight.requires_grad_(False)
            self.lin.bias.grad = torch.ones_like(self.lin.bias)
            return torch.tanh(self.lin(x))

    net = Net()
    nbderiv.derivatives(lambda x: net(x), torch.rand(4, 2, dtype=torch.float64))
    assert net.lin.weight.requires_grad and net.lin.bias.grad is None


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("function", ["derivatives", "diagnose", "full_jacobian"])
def test_lazy_module_refused_before_it_is_initialised(wrapped, function):
    torch = _torch()
    import nbderiv
    from nbderiv.errors import ModelTypeError

    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Tanh())
    model = (lambda x: lazy(x)) if wrapped else lazy
    with pytest.raises(ModelTypeError, match=r"lazy layer .*LazyLinear.*Fix: run one forward"):
        getattr(nbderiv, function)(model, torch.rand(4, 2))
    assert isinstance(lazy[0], torch.nn.LazyLinear) and lazy[0].has_uninitialized_params()
    lazy(torch.rand(4, 2))  # once initialised by the user, it is an ordinary model
    assert nbderiv.derivatives(model, torch.rand(4, 2))[1].shape == (4, 3, 2)


# -- Keras ------------------------------------------------------------------------------------
def _keras():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":  # pragma: no cover
        pytest.skip("Keras is not on its TensorFlow backend")
    return keras


def keras_bn_model():
    keras = _keras()
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=0)),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=1))])


@pytest.mark.parametrize("training", [None, True])
def test_keras_wrapper_keeps_variables_and_framework(training):
    _keras()
    import nbderiv
    from nbderiv.backends import framework_of_model, get_backend

    model = keras_bn_model()
    fn = (lambda z: model(z)) if training is None else (lambda z: model(z, training=True))
    before = [np.array(v.numpy(), copy=True) for v in model.variables]
    assert framework_of_model(fn) == "tensorflow"
    x = np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32)
    # numpy x, torch imported too: detected from the model (training=True: the snapshot's
    # part alone, the framework named)
    d = nbderiv.derivatives(fn, x, framework=None if training is None else "tensorflow")
    assert d.framework == "tensorflow" and d[1].shape == (6, 1, 3)
    for v, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)
    summary = get_backend("tensorflow").layer_summary(fn)
    assert summary["opaque"] is True and "tanh" in summary["activations"]
    if training is None:  # inference: against TensorFlow's own batch_jacobian
        import tensorflow as tf

        X = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(X)
            y = model(X)
        np.testing.assert_allclose(d[1], tape.batch_jacobian(y, X).numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_keras_wrapper_variables_for_snapshots():
    keras = _keras()
    from nbderiv.backends.tensorflow_keras import model_variables

    model = keras_bn_model()
    extra = keras.Variable(np.zeros(2, np.float32))
    fn = functools.partial(lambda m, v, z: m(z) + v[0], model, extra)
    held = model_variables(fn)
    assert len(held) == len(model.variables) + 1
    assert {id(v) for v in model.variables} | {id(extra)} == {id(v) for v in held}
    assert model_variables(lambda z: z) == []


def test_a_wrapped_model_is_computed_in_its_own_dtype():
    torch = pytest.importorskip("torch")
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net = net.double()
    x = np.linspace(0, 1, 5).astype("float32")  # float32 data, float64 model
    d = nbderiv.derivatives(lambda z: net(z) * 2, x, order=2)
    assert d[1].dtype == np.float64
    ref = nbderiv.derivatives(net, x.astype("float64"), order=2)
    np.testing.assert_allclose(d[2], 2 * ref[2], rtol=0, atol=1e-14)


def test_keras_model_held_by_a_plain_object_keeps_its_variables():
    _keras()
    import nbderiv

    model = keras_bn_model()
    trainer = Trainer(model)
    before = [np.array(v.numpy(), copy=True) for v in model.variables]
    x = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    d = nbderiv.derivatives(lambda z: trainer.model(z, training=True), x)
    assert d.framework == "tensorflow" and d.finding("coupled-samples") is not None
    for v, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)


def test_a_wrapper_holding_models_of_both_frameworks_runs_on_the_one_x_belongs_to():
    torch = _torch()
    keras = _keras()
    import nbderiv

    class Both:  # a notebook comparing the same network in the two frameworks
        def __init__(self):
            self.torch_net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(),
                                                 torch.nn.Linear(4, 1)).double()
            self.keras_net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    both = Both()
    x = torch.rand(5, 2, dtype=torch.float64)
    d = nbderiv.derivatives(lambda z: both.torch_net(z), x)
    assert d.framework == "torch"
    truth = torch.func.vmap(torch.func.jacrev(both.torch_net))(x).detach().numpy()
    np.testing.assert_allclose(d[1], truth, rtol=1e-12)


def test_an_attribute_read_is_no_global_of_that_name():
    """`s.net` in a function loads the global `s`, not a global `net` (an unrelated model in
    the notebook would be saved and put back on every call, and name the framework)."""
    class Holder:
        pass

    holder = Holder()
    holder.net = Box()
    global net
    net = Box()
    try:
        found = objects_inside(lambda z: holder.net(z))
        assert holder.net in found and net not in found
    finally:
        del net


@pytest.mark.parametrize("kind", ["lambda", "partial", "closure", "global"])
def test_a_torch_wrapper_is_checked_on_a_float64_copy_of_its_modules(kind):
    """check=True on a float32 net inside a wrapper: the wrapper is rebuilt around float64
    copies of its modules (it was checked in float32, with float32's wide allowance); the
    user's net and wrapper stay float32. Truth: float64 vmap(jacrev) of a copy."""
    torch = _torch()
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 2))
    before = _state(net)
    model = wrap(kind, net)
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(model, x, check=True, progress=False)
    assert d.check.passed and d.check.dtype == "float64", d.check.summary()
    assert "float64 central differences" in d.check.summary()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(t, before[name]) for name, t in _state(net).items())
    net64 = copy.deepcopy(net).double()
    J = torch.func.vmap(torch.func.jacrev(lambda z: net64(z[None])[0]))(x.double())
    np.testing.assert_allclose(d[1], J.detach().numpy(), atol=1e-5)
