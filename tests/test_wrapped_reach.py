"""Models reached in the ways notebooks reach them: a settings class or an imported config
module read in ``forward`` (the memo must notice a flag that changes), a network held by a
module namespace, a class attribute, a ``__slots__`` holder, a chain of objects, a lambda kept
as a module attribute; state created inside ``forward`` (a buffer registered as None, a layer
built on the first call). Truths: per-point blocks of the float64 full Jacobian, the state
read before the call."""

from __future__ import annotations

import copy
import os
import types

import numpy as np
import pytest

import nbderiv

torch = pytest.importorskip("torch")
nn = torch.nn


def _blocks(model, x):
    """dy_n / dx_n from the full float64 Jacobian of the batch (a coupled model's truth)."""
    J = torch.autograd.functional.jacobian(copy.deepcopy(model).double(), x.double())
    return torch.stack([J[n, :, n] for n in range(len(x))]).numpy()


class CFG:  # a settings holder, as many notebooks have
    CENTER = False


config = types.ModuleType("config")  # stands for `import config`
config.CENTER = False


class Centred(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.lin, self.how = nn.Linear(3, 2), how
        self.opt = CFG  # a class kept on the instance

    def forward(self, z):
        h = torch.tanh(self.lin(z))
        on = {"class": lambda: CFG.CENTER, "module": lambda: config.CENTER,
              "attribute": lambda: self.opt.CENTER,
              "environ": lambda: os.environ.get("NBDERIV_TEST_CENTER") == "1"}[self.how]()
        return h - h.mean(0, keepdim=True) if on else h


@pytest.mark.parametrize("how", ["class", "module", "attribute", "environ"])
def test_a_flag_read_through_a_class_a_module_or_the_environment_is_no_stale_memo(how,
                                                                                  monkeypatch):
    """The first call (flag off) is remembered; the flag turns a batch-mean centring on. The
    second call used to reuse 'not coupled' and return the ones trick's column sums (wrong
    by 0.4) with a false graph-broken."""
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    net = Centred(how)
    monkeypatch.setattr(CFG, "CENTER", False)
    monkeypatch.setattr(config, "CENTER", False)
    monkeypatch.setenv("NBDERIV_TEST_CENTER", "0")
    nbderiv.derivatives(net, x)
    monkeypatch.setattr(CFG, "CENTER", True)
    monkeypatch.setattr(config, "CENTER", True)
    monkeypatch.setenv("NBDERIV_TEST_CENTER", "1")
    d = nbderiv.derivatives(net, x)
    np.testing.assert_allclose(d[1], _blocks(net, x), atol=1e-6)
    assert "coupled-samples" in d.codes and "graph-broken" not in d.codes


def _bn_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).train()


class Holder:
    __slots__ = ("net",)


def _wrappers():
    """(label, model function, the BatchNorm net inside)."""
    out = []
    net = _bn_net()
    mymodels = types.ModuleType("mymodels")
    mymodels.net = net
    out.append(("module namespace", lambda z: mymodels.net(z), net))
    net = _bn_net()
    Cfg = type("Cfg", (), {"net": net})
    out.append(("class attribute", lambda z: Cfg.net(z), net))
    net = _bn_net()
    holder = Holder()
    holder.net = net
    out.append(("slots holder", lambda z: holder.net(z), net))
    net = _bn_net()
    a = types.SimpleNamespace(b=types.SimpleNamespace(c=types.SimpleNamespace(
        d=types.SimpleNamespace(net=net))))
    out.append(("a chain of objects", lambda z: a.b.c.d.net(z), net))

    class ViaLambda(nn.Module):  # a function kept as an attribute, around the network
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, z):
            return self.f(z)
    net = _bn_net()
    out.append(("lambda kept on a module", ViaLambda(lambda z: net(z)), net))

    class ViaHelper(nn.Module):  # a plain object of your own holding the network
        def __init__(self):
            super().__init__()
            self.helper = types.SimpleNamespace(m=_bn_net())

        def forward(self, z):
            return self.helper.m(z)
    model = ViaHelper()
    out.append(("helper object on a module", model, model.helper.m))
    return out


@pytest.mark.parametrize("label", [w[0] for w in _wrappers()])
def test_networks_reached_through_modules_classes_and_objects_keep_their_state(label):
    """Their BatchNorm statistics used to take every probe's batch (num_batches_tracked
    0 -> 47), with no train-mode finding, and a coupled-samples fix saying that no layer
    runs in training mode."""
    _, model, net = next(w for w in _wrappers() if w[0] == label)
    bn = net[1]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    d = nbderiv.derivatives(model, x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(bn.num_batches_tracked) == 0 and net.training
    assert "train-mode" in d.codes, d.findings
    coupled = d.finding("coupled-samples")
    assert coupled is None or "no layer runs in training mode" not in coupled.fix
    np.testing.assert_allclose(d[1], _blocks(net, x), atol=1e-6)


def test_state_created_in_forward_is_taken_away_again():
    """A buffer registered as None that forward fills, and a layer built on the first call:
    after nbderiv's call the model is as it was (no cache of an internal batch in its
    state_dict, no new parameters)."""
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("cache", None)

        def forward(self, z):
            y = torch.tanh(self.lin(z))
            self.cache = y.detach()
            return y

    class BuildsHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 3)

        def forward(self, z):
            if not hasattr(self, "head"):
                self.head = nn.Linear(3, 1)
            return self.head(torch.tanh(self.body(z)))

    x = torch.randn(5, 2)
    caching = Caching()
    d = nbderiv.derivatives(caching, x)
    assert caching.cache is None and "cache" not in caching.state_dict()
    truth = torch.func.vmap(torch.func.jacrev(copy.deepcopy(caching).double()))(x.double())
    np.testing.assert_allclose(d[1], truth.detach().numpy(), atol=1e-6)
    builds = BuildsHead()
    nbderiv.derivatives(builds, x)
    assert [n for n, _ in builds.named_parameters()] == ["body.weight", "body.bias"]
    assert not hasattr(builds, "head")


def test_code_for_a_function_around_a_float64_model_runs_in_float64():
    """d.code cast X to torch's default float32 for a lambda (it cannot ask a function for
    its parameters): running it failed with a dtype mismatch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model = lambda z: torch.sin(net(z))  # noqa: E731
    x = torch.randn(5, 3)
    d = nbderiv.derivatives(model, x, order=2)
    ns = {"model": model, "x": x}
    exec(d.code, ns)
    truth = torch.func.vmap(torch.func.hessian(model))(x.double())
    np.testing.assert_allclose(ns["d2"], truth.detach().numpy(), atol=1e-12)


def test_a_forward_that_updates_its_own_buffers_is_not_called_random():
    """Hook-based spectral_norm in training mode does one power iteration per call: two
    passes differ, though no random numbers are drawn. It used to be 'stochastic, draws
    random numbers itself' with a fix (seeding) that cannot help. The derivatives are those
    of one pass from the user's state (truth: a float64 copy of that state, one pass), and
    the state is left as it was: weight_u, and the plain attribute weight the hook sets."""
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    nn.utils.spectral_norm(net[0])
    with torch.no_grad():
        net(x)
    twin = copy.deepcopy(net).double()
    u0, w0 = net[0].weight_u.clone(), net[0].weight
    d = nbderiv.derivatives(net, x)
    f = d.finding("train-mode")
    assert f is not None and "no random numbers" in f.message and "seed" not in f.fix
    J = torch.autograd.functional.jacobian(twin, x.double())
    np.testing.assert_allclose(d[1], torch.stack([J[n, :, n] for n in range(6)]).numpy(),
                               atol=1e-6)
    assert torch.equal(net[0].weight_u, u0) and net[0].weight is w0


def test_dropout_is_still_random():
    """The other side: a model that draws random numbers keeps its finding (dropout called
    as a function, which no layer shows)."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    d = nbderiv.derivatives(lambda z: torch.nn.functional.dropout(lin(z), 0.3, training=True),
                            torch.randn(6, 3))
    f = d.finding("train-mode")
    assert f is not None and "draws random numbers" in f.message
