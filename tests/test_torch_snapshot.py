"""The torch model state read in one walk (nbderiv.backends.torch_snapshot): saved values put
back whatever a forward pass did to them, and the state key of the same walk."""

import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402
from nbderiv.backends.torch import BACKEND  # noqa: E402
from nbderiv.backends.torch_snapshot import TorchState, state_key  # noqa: E402

nn = torch.nn


class KeepsALayerInAList(nn.Module):
    """A BatchNorm kept in a plain list (no submodule: module.modules() does not see it),
    in training mode, and a weight scaled through .data (no version bump) in every forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        self.side = [nn.BatchNorm1d(2).double().train()]

    def forward(self, x):
        self.lin.weight.data.mul_(1.5)
        return torch.tanh(self.side[0](self.lin(x)) * 0 + self.lin(x))


def test_a_layer_in_a_plain_list_and_an_edit_through_data_are_put_back():
    net = KeepsALayerInAList()
    bn = net.side[0]
    weight = net.lin.weight.detach().clone()
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    x = torch.rand(6, 2, dtype=torch.float64)
    net(x)  # (what one forward pass changes; put it back by hand for the test)
    assert not torch.equal(net.lin.weight, weight) and int(bn.num_batches_tracked) == 1
    with torch.no_grad():
        net.lin.weight.copy_(weight)
        for t, s in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), stats):
            t.copy_(s)
    nbderiv.derivatives(net, x, order=2)
    assert torch.equal(net.lin.weight, weight)
    for t, s in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), stats):
        assert torch.equal(t, s)
    assert bn.training


def test_tensors_replaced_with_other_shapes_or_dtypes_are_put_back():
    class Reshapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).double()
            self.register_buffer("table", torch.arange(4.0, dtype=torch.float32))
            self.register_buffer("steps", torch.tensor(3))

        def forward(self, x):
            self.table.data = torch.zeros(7, dtype=torch.float64)  # another shape and dtype
            self.steps += 1
            return torch.tanh(self.lin(x))

    net = Reshapes()
    table, lin_weight = net.table, net.lin.weight.detach().clone()
    saved = TorchState([net])
    net(torch.rand(3, 2, dtype=torch.float64))
    saved.restore()
    assert net.table is table and table.dtype == torch.float32
    assert torch.equal(table, torch.arange(4.0)) and int(net.steps) == 3
    assert torch.equal(net.lin.weight, lin_weight)


def test_the_key_read_during_a_call_is_the_key_of_the_state_it_began_with():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    weight = net[0].weight.detach().clone()
    before = state_key(net)[0]
    with BACKEND.preserved(net):
        assert BACKEND.state_key(net)[0] == before
        with torch.no_grad():
            net[0].weight.data.neg_()
        # the state saved when the call began, not the edited one
        assert BACKEND.state_key(net)[0] == before
        assert state_key(net)[0] != before
    assert torch.equal(net[0].weight, weight)  # put back (a new version: another key)


def test_the_saved_copy_is_one_flat_copy_per_dtype_and_restores_tied_weights():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    net = nn.ModuleDict({"emb": emb, "head": head, "norm": nn.LayerNorm(3).double()})
    original = emb.weight.detach().clone()
    saved = TorchState([net])
    floats = {flat.dtype: flat.numel() for _, _, flat in saved.saved.groups}
    assert floats == {torch.float32: 15, torch.float64: 6}  # the tied weight once
    with torch.no_grad():
        emb.weight.mul_(2)
        net["norm"].bias.add_(1)
    saved.restore()
    assert head.weight is emb.weight and torch.equal(emb.weight, original)
    assert torch.equal(net["norm"].bias, torch.zeros(3, dtype=torch.float64))


class HoldsItsWeightInAList(nn.Module):
    """A parameter also held in a plain list of the parent, met there before the layer that
    registers it is walked; forward freezes it and gives it a gradient."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1).double()
        self.held = [self.lin.weight]

    def forward(self, x):
        self.lin.weight.requires_grad_(False)
        self.lin.weight.grad = torch.ones_like(self.lin.weight)
        return torch.tanh(self.lin(x))


def test_a_parameter_met_first_in_a_plain_attribute_gets_its_flags_and_grad_back():
    net = HoldsItsWeightInAList()
    w = net.lin.weight
    x = torch.rand(5, 2, dtype=torch.float64)
    d = nbderiv.derivatives(net, x)
    assert w.requires_grad and w.grad is None
    # the derivative itself: tanh'(x @ w.T + b) w
    z = x @ w.detach().T + net.lin.bias.detach()
    truth = (1 - torch.tanh(z) ** 2)[:, :, None] * w.detach()[None]
    assert abs(d[1] - truth.numpy()).max() < 1e-12


class _NoisyInput(torch.nn.Module):
    """Input noise drawn from a generator of the model's own (a seeded augmentation)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.noise = torch.Generator().manual_seed(3)

    def forward(self, x):
        return torch.tanh(self.lin(x + 1e-3 * torch.randn(x.shape, generator=self.noise)))


def test_a_generator_held_by_the_model_is_put_back_where_it_was():
    torch.manual_seed(0)
    net = _NoisyInput()
    before = net.noise.get_state().clone()
    expected_next = torch.randn(4, generator=torch.Generator().set_state(before))
    nbderiv.derivatives(net, torch.randn(6, 2), order=2, progress=False)
    assert torch.equal(net.noise.get_state(), before)
    # the user's next draw is the one they would have had without the call
    assert torch.equal(torch.randn(4, generator=net.noise), expected_next)
