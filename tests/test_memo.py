"""nbderiv.memo: what a call established about a model is reused while the model stays as it
was, and dropped the moment anything that may change its behaviour changes."""

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import nbderiv
from nbderiv import memo


class Counting(nn.Module):
    """A custom module (so no structural verdict): tanh MLP that counts its forward calls in
    a forward pre-hook (a function: in the state key by identity, so counting changes no
    part of the key; an attribute or a global the forward reads would)."""

    def __init__(self, act=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)
        self.act = act or nn.Tanh()
        self.drop = nn.Dropout(0.0)
        count = [0]

        def counter(module, args):
            count[0] += 1
        counter.count = count
        self._counter = counter
        self.register_forward_pre_hook(counter)

    @property
    def calls(self):
        return self._counter.count[0]

    def forward(self, x):
        return self.b(self.drop(self.act(self.a(x))))


class WritesASetting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.seen = 0

    def forward(self, x):
        self.seen += 1  # a plain setting the forward changes: another state each call
        return torch.tanh(self.lin(x))


X = torch.rand(40, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1


def calls_of(net, **kw):
    before = net.calls
    d = nbderiv.derivatives(net, X, order=2, **kw)
    return d, net.calls - before


def test_a_repeated_call_skips_the_probe_and_gives_the_same_result():
    net = Counting().double()
    d1, first = calls_of(net)
    d2, second = calls_of(net)
    assert second < first, (first, second)
    assert second == 1  # only the derivative pass itself
    np.testing.assert_array_equal(d1[1], d2[1])
    np.testing.assert_array_equal(d1[2], d2[2])
    assert d1.codes == d2.codes


def test_a_model_that_changes_its_own_settings_is_probed_every_time():
    net = WritesASetting().double()
    nbderiv.derivatives(net, X, order=1)
    before = net.seen
    nbderiv.derivatives(net, X, order=1)
    assert net.seen - before > 1


@pytest.mark.parametrize("change", ["train-dropout", "step", "load_state_dict", "setting",
                                    "new-layer", "hook", "sign-through-data",
                                    "swap-through-data", "mirrored-swap-through-data"])
def test_any_change_to_the_model_makes_the_next_call_probe_again(change):
    net = Counting().double()
    calls_of(net)
    _, warm = calls_of(net)
    assert warm == 1
    if change == "train-dropout":
        net.drop.p = 0.5
    elif change == "step":
        with torch.no_grad():
            net.a.weight.add_(0.01)
    elif change == "load_state_dict":
        net.load_state_dict(Counting(seed=1).double().state_dict())
    elif change == "setting":
        net.drop.inplace = True
    elif change == "new-layer":
        net.act = nn.Sigmoid()
    elif change == "hook":
        net.b.register_forward_hook(lambda m, i, o: o * 2)
    elif change == "sign-through-data":  # no version bump, the same norms
        net.a.weight.data.neg_()
    elif change == "swap-through-data":  # no version bump, the same norms and sum
        net.a.weight.data[[0, 1]] = net.a.weight.data[[1, 0]].clone()
    elif change == "mirrored-swap-through-data":  # also the same sum of positions per value
        w = net.a.weight.data  # (8, 2): rows 0 and 1 of the identity pattern, swapped
        w[:2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=w.dtype)
        calls_of(net)  # (remembered in this state first)
        w[:2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=w.dtype)
    _, after = calls_of(net)
    assert after > 1, change


def test_dropout_switched_on_after_a_warm_call_is_reported_as_random():
    net = Counting().double().train()
    d, _ = calls_of(net)
    assert "stochastic" not in d.codes and "train-mode" not in d.codes
    net.drop.p = 0.3  # same training flag, only a setting changes
    d, _ = calls_of(net)
    assert "train-mode" in d.codes or "stochastic" in d.codes, d.codes


def test_batchnorm_put_in_training_mode_after_a_warm_call_is_found_coupled():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    custom = nn.ModuleDict({"net": net})

    class Wrap(nn.Module):  # custom forward: no structural verdict
        def __init__(self):
            super().__init__()
            self.inner = custom

        def forward(self, x):
            return self.inner["net"](x)

    model = Wrap().eval()
    d = nbderiv.derivatives(model, X, order=1)
    d = nbderiv.derivatives(model, X, order=1)
    assert "coupled-samples" not in d.codes
    model.train()
    d = nbderiv.derivatives(model, X, order=1)
    assert "coupled-samples" in d.codes, d.codes
    # and the true per-point derivative, not the ones trick's column sums
    J = torch.autograd.functional.jacobian(model, X)  # (N, 1, N, 2)
    diag = J[torch.arange(len(X)), :, torch.arange(len(X))]  # (N, 1, 2)
    np.testing.assert_allclose(d[1], diag.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_other_point_shapes_and_dtypes_are_probed_on_their_own():
    net = Counting().double()
    calls_of(net)
    before = net.calls
    nbderiv.derivatives(net, X[:1], order=1)  # one point: the probe cannot see coupling
    assert net.calls - before > 1
    before = net.calls
    nbderiv.derivatives(net, X[:1], order=1)
    assert net.calls - before == 1


def test_the_facts_go_with_the_model():
    net = Counting().double()
    calls_of(net)
    ref = weakref.ref(net)
    assert len(memo._REMEMBERED) >= 1
    del net
    gc.collect()
    assert ref() is None
    assert all(m is not None for m in memo._REMEMBERED.keys())


def test_forget_makes_the_next_call_probe_again():
    net = Counting().double()
    calls_of(net)
    memo.forget(net)
    _, again = calls_of(net)
    assert again > 1


def test_wrappers_are_probed_every_time():
    net = Counting().double()
    f = lambda z: net(z)  # noqa: E731 - a lambda may read state nbderiv cannot see
    nbderiv.derivatives(f, X, order=1)
    before = net.calls
    nbderiv.derivatives(f, X, order=1)
    assert net.calls - before > 1


def test_a_remembered_graph_check_keeps_the_findings_the_same_on_a_broken_graph():
    class HalfDetached(nn.Module):
        def forward(self, x):
            return torch.sin(x[:, :1]) + torch.sin(x[:, 1:]).detach()

    model = HalfDetached()
    first = nbderiv.derivatives(model, X, order=1)
    second = nbderiv.derivatives(model, X, order=1)
    assert "graph-broken" in first.codes
    assert first.codes == second.codes


# -- kinks found during the derivative pass --------------------------------------------------
class CustomRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)
            self.lin.bias.fill_(0.0)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 3 + x


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_points_at_a_kink_are_found_in_the_derivative_pass_in_every_block(chunk_size):
    x = (torch.arange(21, dtype=torch.float64).reshape(-1, 1) - 10) / 10  # x[10] == 0
    x = torch.roll(x, 5, dims=0)  # the kink at point 15 of 21, in the third block of 7
    assert float(x[15]) == 0.0
    d = nbderiv.derivatives(CustomRelu().double(), x, order=1, chunk_size=chunk_size)
    kinks = [f for f in d.findings if f.code == "at-kink"]
    assert kinks and "15" in kinks[0].message, [str(f) for f in d.findings]
    # and again, from a warm model
    d = nbderiv.derivatives(CustomRelu().double(), x, order=1, chunk_size=chunk_size)
    assert "at-kink" in d.codes


def test_kinks_of_the_very_same_points_are_recalled_and_other_points_looked_at(monkeypatch):
    from nbderiv.backends import torch as torch_backend

    made = []

    class CountingWatcher(torch_backend.KinkWatcher):
        def __init__(self, n):
            super().__init__(n)
            made.append(n)

    monkeypatch.setattr(torch_backend, "KinkWatcher", CountingWatcher)
    net = CustomRelu().double()
    x = (torch.arange(21, dtype=torch.float64).reshape(-1, 1) - 10) / 10  # x[10] == 0
    first = nbderiv.derivatives(net, x, order=1)
    assert made and "at index 10:" in first.findings[0].message, [str(f) for f in first.findings]
    made.clear()
    again = nbderiv.derivatives(net, x, order=1)  # the same points: recalled, not looked for
    assert not made and [str(f) for f in again.findings] == [str(f) for f in first.findings]
    x[10], x[4] = 0.05, 0.0  # the same tensor edited in place: other points, a new look
    moved = nbderiv.derivatives(net, x, order=1)
    kink = [f for f in moved.findings if f.code == "at-kink"]
    assert made and kink and "at index 4:" in kink[0].message
    made.clear()
    with torch.no_grad():
        net.lin.bias.fill_(-0.4)  # another model state: x[4] is off the kink now, x[14] on it
    d = nbderiv.derivatives(net, x, order=1)
    kink = [f for f in d.findings if f.code == "at-kink"]
    assert made and kink and "at index 14:" in kink[0].message


def test_one_copy_of_points_per_model_and_none_for_a_model_without_relu():
    net = CustomRelu().double()
    x = (torch.arange(21, dtype=torch.float64).reshape(-1, 1) - 10) / 10
    nbderiv.derivatives(net, x)
    nbderiv.derivatives(net, x, target=0)  # another call shape (a target column): its own facts
    facts = list(memo._REMEMBERED[net][1].values())
    assert len(facts) == 2 and sum(f.kinks is not None for f in facts) == 1
    smooth = Counting().double()
    nbderiv.derivatives(smooth, X)
    assert all(f.kinks is None for f in memo._REMEMBERED[smooth][1].values())


def test_a_model_without_relu_is_remembered_as_kink_free():
    net = Counting().double()
    calls_of(net)
    call_facts = list(memo._REMEMBERED[net][1].values())
    assert any(f.kink_free for f in call_facts)


# -- Keras: no version counters, so the values are the fingerprint ----------------------------
def test_keras_weights_assigned_after_a_warm_call_make_it_probe_again():
    keras = pytest.importorskip("keras")
    from nbderiv.backends.tensorflow import BACKEND

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    key1, _ = BACKEND.state_key(model)
    assert key1 == BACKEND.state_key(model)[0]
    w = model.layers[0].kernel
    w.assign(w.numpy() + 0.5)
    assert BACKEND.state_key(model)[0] != key1
    model.layers[0].activation = keras.activations.sigmoid
    assert BACKEND.state_key(model)[0] != key1


def test_a_plain_stack_settled_by_its_structure_never_reads_a_state_key():
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    d = nbderiv.derivatives(net, X[:, :1], order=2)
    assert d.method == "taylor"
    assert net not in memo._REMEMBERED


def test_a_model_holding_containers_that_name_it_is_still_freed():
    net = Counting().double()
    net.registry = {"me": net, "parts": [net.a, net.b]}  # a dict and a list: not weakly held
    net.many = list(range(100))
    calls_of(net)
    calls_of(net)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("side_by_side", [True, False])
def test_the_value_fingerprint_sees_a_sign_flipped_through_data(monkeypatch, side_by_side):
    from nbderiv.backends import torch_snapshot as torch_state
    from nbderiv.backends import torch_state_key as fingerprint

    if not side_by_side:  # a model too large to copy side by side: per-tensor reductions
        monkeypatch.setattr(fingerprint, "_SIDE_BY_SIDE", 0)
    net = nn.Linear(3, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]]))
    key = torch_state.state_key(net)[0]
    assert torch_state.state_key(net)[0] == key
    net.weight.data.neg_()
    assert torch_state.state_key(net)[0] != key
