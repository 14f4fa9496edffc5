"""nbderiv.confirm: findings are confirmed at the points they name, and nothing else is claimed.

Cases a tester brought: a float32 positional encoding whose high frequencies float32's
difference steps cannot follow (read as a cut graph), a model that divides by the batch's
largest |x| through ``.item()`` (a cut missed in float32), two ReLU kinks that cancel (autodiff
0 where the slope is 1), and a net whose outputs carry a large constant offset (read as
saturated). Truths: float64 ``vmap(jacrev)``, float64 central differences, closed forms.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from checks import per_point_differences
from torch import nn
from torch.func import jacrev, vmap

import nbderiv


class PositionalEncoding(nn.Module):
    """NeRF's encoding: sin and cos of 2^k pi x, k < L, then a small MLP."""

    def __init__(self, L):
        super().__init__()
        self.L = L
        self.mlp = nn.Sequential(nn.Linear(3 * 2 * L, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        a = x[..., None] * (2.0 ** torch.arange(self.L, dtype=x.dtype) * torch.pi)
        return self.mlp(torch.cat([torch.sin(a), torch.cos(a)], -1).flatten(1))


@pytest.mark.parametrize("seed", range(4))
def test_high_frequencies_in_float32_are_no_cut_graph(seed):
    torch.manual_seed(seed)
    model = PositionalEncoding(10).eval()
    x = torch.rand(16, 3) * 2 - 1
    twin = copy.deepcopy(model).double()
    truth = vmap(jacrev(lambda p: twin(p[None])[0]))(x.double()).detach().numpy()
    for m in (model, lambda z: model(z)):  # the module (a float64 copy exists) and a wrapper
        d = nbderiv.derivatives(m, x)
        assert "graph-broken" not in d.codes, [str(f) for f in d.findings]
        assert np.abs(d[1] - truth).max() <= 1e-3 * np.abs(truth).max()


def test_a_frequency_float32_steps_cannot_follow_is_no_cut_graph():
    x = torch.linspace(-1, 1, 16).reshape(-1, 1)
    d = nbderiv.derivatives(lambda z: torch.sin(5000 * z), x)
    assert "graph-broken" not in d.codes, [str(f) for f in d.findings]
    truth = 5000 * np.cos(5000 * x.double().numpy())
    assert np.abs(d[1][:, 0, 0] - truth[:, 0]).max() <= 2e-3 * 5000


class ByTheLargest(nn.Module):
    """Divides by the batch's largest |x| through .item(): the forward pass couples points,
    autodiff sees none of it (the point holding the largest |x| gets a wrong derivative)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x / x.abs().max().item())


def _central_differences(model, x, h=1e-6):
    """d y[n] / d x[n] of the forward pass on the whole batch, float64, other points fixed."""
    def f(a):
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()
    return per_point_differences(f, x.double().numpy(), h)


@pytest.mark.parametrize("d_in,d_out,n", [(2, 1, 6), (2, 2, 8), (3, 1, 6), (3, 2, 8)])
@pytest.mark.parametrize("seed", range(3))
def test_a_cut_through_item_is_found_in_float32(d_in, d_out, n, seed):
    torch.manual_seed(seed)
    model = ByTheLargest(nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, d_out)))
    x = torch.randn(n, d_in)
    truth = _central_differences(copy.deepcopy(model).double(), x)
    d = nbderiv.derivatives(model, x)
    wrong = np.abs(d[1] - truth).max(axis=(1, 2)) > 1e-3 * np.abs(truth).max()
    assert wrong.any()  # the point holding the largest |x|: autodiff is wrong there
    assert "graph-broken" in d.codes, [str(f) for f in d.findings]


def test_kinks_that_cancel_are_named_where_autodiff_is_wrong():
    f = lambda z: torch.relu(z) - torch.relu(-z)  # noqa: E731 - == z, smooth, f'(0) = 1
    x = torch.tensor([[-1.0], [0.0], [0.5]], dtype=torch.float64)
    assert torch.equal(f(x), x)
    d = nbderiv.derivatives(f, x)
    assert d[1].ravel().tolist() == [1.0, 0.0, 1.0]  # autodiff's convention at 0: relu'(0) = 0
    found = d.finding("at-kink")
    assert found is not None and found.points == (1,), [str(g) for g in d.findings]
    assert "cancel" in found.message and "relu(z) - relu(-z)" in found.fix
    check = nbderiv.derivatives(f, x, check=True).check
    assert "convention at a kink" in check.note
    # a true kink (|z| at 0) keeps the plain wording; smooth points are not named
    d = nbderiv.derivatives(lambda z: torch.relu(z) + torch.relu(-z), x)
    assert d.finding("at-kink").points == (1,) and "cancel" not in d.finding("at-kink").message
    assert nbderiv.derivatives(f, x[[0, 2]]).codes == []


def test_an_output_offset_is_no_saturation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.linspace(-1, 1, 20).reshape(-1, 1).double()
    with torch.no_grad():
        pre = net[0](x)
        net[2].bias.fill_(1e6)
    assert pre.abs().max() < 2  # tanh units far from their flat tails
    d = nbderiv.derivatives(net, x)
    assert "saturated" not in d.codes, [str(f) for f in d.findings]
    assert np.abs(d[1]).min() > 0.1


def test_saturated_units_are_still_found_and_wake_up_farther_out():
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].bias.fill_(3.0)
    d = nbderiv.derivatives(net, torch.linspace(8, 9, 10).reshape(-1, 1))
    assert "saturated" in d.codes
    assert "Farther out y does change" in d.finding("saturated").message


def _raw_coordinates_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def test_slopes_that_round_to_zero_in_float32_are_saturation_not_missing_dependence():
    """Raw coordinates in the hundreds drive every first-layer tanh to exactly +-1 in float32:
    autodiff gives exactly 0, though the output depends on x (float64's slopes are tiny, not
    0). That is saturation, never 'the output does not depend on the input'."""
    net = _raw_coordinates_net(0)
    x = torch.rand(20, 2) * 1000 + 500  # (the global generator, right after the weights)
    d = nbderiv.derivatives(net, x)
    assert np.all(d[1] == 0)  # float32 rounds every slope away
    truth = vmap(jacrev(copy.deepcopy(net).double()))(x.double()).detach().numpy()
    assert np.any(truth != 0) and np.abs(truth).max() < 1e-6
    assert "no-input-dependence" not in d.codes, [str(f) for f in d.findings]
    assert d.codes == ["saturated"], [str(f) for f in d.findings]
    assert "round to exactly 0" in d.finding("saturated").message
    # the output does change with x, far enough away: y(x0) and y(-x0) differ
    with torch.no_grad():
        assert abs(float(net(x[:1]) - net(-x[:1]))) > 0.01


def test_slopes_zero_in_float64_too_are_saturation_where_the_output_wakes_farther_out():
    net = _raw_coordinates_net(0)
    x = torch.rand(20, 2, generator=torch.Generator().manual_seed(0)) * 1000 + 2000
    d = nbderiv.derivatives(net, x)
    truth = vmap(jacrev(copy.deepcopy(net).double()))(x.double()).detach().numpy()
    assert np.all(truth == 0) and np.all(d[1] == 0)
    assert d.codes == ["saturated"], [str(f) for f in d.findings]
    assert "exactly 0 (in float64 too)" in d.finding("saturated").message
    # the independent evidence: far along x the output changes
    with torch.no_grad():
        assert abs(float(net(x[:1]) - net(-x[:1]))) > 0.01


def test_an_input_the_model_ignores_is_still_no_dependence_in_float32():
    net = _raw_coordinates_net(0)
    with torch.no_grad():
        net[0].weight[:, 1] = 0.0  # input 1 is never used
    x = torch.rand(20, 2, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(net, x)
    assert d.codes == ["no-input-dependence"], [str(f) for f in d.findings]
    assert np.all(d[1][:, 0, 1] == 0) and np.all(d[1][:, 0, 0] != 0)


def test_a_lookup_failing_farther_out_is_piecewise_constant():
    """The sweep for jumps moves x far enough to index beyond the table: it looks nearer."""
    table = torch.tensor([[0.1], [0.7], [0.3], [0.9], [0.2]])
    x = torch.tensor([[0.3], [1.6], [2.2], [3.5]])
    lookup = lambda z: table[z[:, 0].long()]  # noqa: E731
    assert lookup(torch.tensor([[0.3], [1.3]])).ravel().tolist() == pytest.approx([0.1, 0.7])
    d = nbderiv.derivatives(lookup, x)
    assert d.codes == ["piecewise-constant"], [str(f) for f in d.findings]


def test_keras_lookups_are_piecewise_constant_not_independent_of_the_input():
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    L = keras.layers
    emb = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(10, 3),
                            L.GlobalAveragePooling1D(), L.Dense(1)])
    tokens = np.random.default_rng(0).integers(0, 10, (4, 5))
    other = tokens.copy()
    other[0, 0] = (other[0, 0] + 1) % 10
    assert float(emb(tokens)[0, 0]) != float(emb(other)[0, 0])  # the output depends on them
    d = nbderiv.derivatives(emb, tokens)
    assert "no-input-dependence" not in d.codes and "piecewise-constant" in d.codes, d.codes
    table = tf.constant([[0.1], [0.7], [0.3], [0.9], [0.2]])
    gather = lambda z: tf.gather(table, tf.cast(z[:, 0], tf.int32))  # noqa: E731
    d = nbderiv.derivatives(gather, tf.constant([[0.3], [1.6], [2.2], [3.5]]))
    assert d.codes == ["piecewise-constant"], d.codes


class Autocast(nn.Module):
    """A forward pass in bfloat16 autocast, returned as float32 (the usual way to write it):
    its outputs are rounded to bfloat16's 8 bits, nothing is cut from the graph."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.net(x)
        return y.float()


def test_bfloat16_rounding_under_autocast_is_no_cut_graph():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(),
                        nn.Conv2d(16, 16, 3, stride=2), nn.SiLU(), nn.Flatten(),
                        nn.Linear(16 * 7 * 7, 4)).eval()
    x = torch.randn(4, 3, 16, 16)
    d = nbderiv.derivatives(Autocast(cnn), x)
    assert "graph-broken" not in d.codes, [str(f) for f in d.findings]
    # autodiff through the casts is the float64 network's derivative, to bfloat16's accuracy
    twin = copy.deepcopy(cnn).double()
    truth = vmap(jacrev(lambda p: twin(p[None])[0]))(x.double()).detach().numpy()
    assert np.abs(d[1] - truth).max() <= 0.05 * np.abs(truth).max()


def test_a_model_returning_bfloat16_is_differentiated():
    """Autocast without .float(): NumPy has no bfloat16; the results come back as float32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x)

    x = torch.randn(5, 3)
    d = nbderiv.derivatives(Bare(), x, order=2)
    assert d[1].dtype == np.float32 and "graph-broken" not in d.codes
    twin = copy.deepcopy(net).double()
    truth = vmap(jacrev(lambda p: twin(p[None])[0]))(x.double()).detach().numpy()
    assert np.abs(d[1] - truth).max() <= 0.03 * np.abs(truth).max()


@pytest.mark.parametrize("kink", [torch.abs, torch.relu, lambda z: z.clamp(min=0),
                                  lambda z: torch.maximum(z, 0.3 * z)])
def test_points_a_step_away_from_a_kink_are_no_cut_graph(kink):
    # float32's difference steps (about 0.02) cross the kink at 0 from x = +-1e-8 .. +-1e-3:
    # the central differences average the two slopes there, autodiff's d1 is exactly right
    p = torch.logspace(-8, 0, 9)
    X = torch.cat([-p, p]).reshape(-1, 1)
    d = nbderiv.derivatives(kink, X)
    assert "graph-broken" not in d.codes, d.summary()
    truth = vmap(jacrev(kink))(X.double()).reshape(-1)  # the slope of the side each x is on
    np.testing.assert_allclose(d[1].reshape(-1), truth.numpy(), rtol=1e-6)
    # a grid that holds 1e-8 where 0 was meant, through a ReLU net whose kinks all sit at 0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].bias.zero_()
    grid = torch.arange(-1, 1, 0.1).reshape(-1, 1)
    assert "graph-broken" not in nbderiv.derivatives(net, grid, order=2).codes


def test_a_cut_beside_a_curved_function_is_still_found():
    # the kink test above must not hide a real cut: the one-sided slopes of a smooth curve
    # come together as the step shrinks, those across a kink do not
    def cut(z):
        return torch.sin(3 * z) + 2 * z.detach() * z.detach()

    X = torch.linspace(-1, 1, 20).reshape(-1, 1)
    d = nbderiv.derivatives(cut, X)
    assert "graph-broken" in d.codes
    ok = torch.linspace(0.1, 1, 9).reshape(-1, 1)
    assert "graph-broken" not in nbderiv.derivatives(lambda z: torch.sin(3 * z) + z * z,
                                                     ok).codes


def test_second_derivative_of_abs_is_zeros_not_an_error():
    # autodiff keeps sign's derivative as a symbolic ZeroTensor, which NumPy cannot read
    X = torch.tensor([[-1.0], [0.5], [2.0]])
    for f in (torch.abs, lambda z: z.abs() + 0, lambda z: torch.sign(z) * z):
        d = nbderiv.derivatives(f, X, order=3)
        assert np.array_equal(d[1].ravel(), np.sign(X.numpy().ravel()))
        assert not d[2].any() and not d[3].any()


@pytest.mark.parametrize("k", [4, 10, 20, 100, 1000])
def test_fine_rounding_is_piecewise_constant(k):
    # stairs of width 1/k: the sweep over +-0.5 (1 + |x|) sees a jump at almost every
    # evaluation once k >= 10, and a jump can pass for a stationary point at the difference
    # steps; nearer sweeps resolve them. Truth: the output changes, in jumps of 1/k only.
    X = torch.linspace(-1, 1, 7).reshape(-1, 1)

    def rounded(z):
        return torch.round(k * z) / k

    d = nbderiv.derivatives(rounded, X)
    assert not d[1].any()
    assert d.codes == ["piecewise-constant"], d.summary()
    x = torch.tensor([[0.3]])
    assert float(rounded(x + 1.0 / k) - rounded(x)) == pytest.approx(1.0 / k, rel=1e-4)
    if k > 100:  # stairs finer than the difference steps' finest (1e-3 here) read as a cut
        return
    # a net behind a fine integer cast too
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    assert nbderiv.derivatives(lambda z: net((z * k).long().float() / k), X).codes == [
        "piecewise-constant"]


@pytest.mark.parametrize("f, x", [
    (lambda z: 1 + z ** 4, torch.linspace(-0.01, 0.01, 5).reshape(-1, 1)),
    (lambda z: 5 + z ** 3, torch.tensor([[1e-3], [-2e-3], [0.0]])),
])
def test_a_flat_polynomial_minimum_is_no_saturation(f, x):
    # tiny gradients (4e-6, 1.2e-5) at points where no unit saturates: farther out the
    # output keeps growing like a polynomial, where saturated units level off
    d = nbderiv.derivatives(f, x, order=2)
    assert "saturated" not in d.codes, d.summary()
    truth = vmap(jacrev(f))(x.double()).reshape(-1).numpy()
    np.testing.assert_allclose(d[1].reshape(-1), truth, rtol=1e-5, atol=1e-12)
    # the saturated tanh beside it keeps its finding
    assert "saturated" in nbderiv.derivatives(torch.tanh, torch.tensor([[8.0], [9.0]])).codes


def test_graph_broken_names_the_slope_in_x_units():
    # x**2 with its graph cut, at x in [0.5, 2]: the largest slope there is 4 (it said 12,
    # the slope per unit of a step scaled by 1 + |x|)
    x = torch.linspace(0.5, 2, 4).reshape(-1, 1)
    d = nbderiv.derivatives(lambda z: z.detach() ** 2 + 0 * z, x)
    message = d.finding("graph-broken").message
    assert "give slopes up to 4)" in message, message


def test_one_point_through_batch_statistics_is_no_cut_graph():
    # with one point the probe cannot see a coupling, and the difference queries ran in one
    # batch, whose statistics mixed them: graph-broken for a correct d1
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                       nn.Linear(18, 1))  # training mode
    x = torch.randn(1, 1, 5, 5)
    d = nbderiv.derivatives(bn, x)
    assert d.codes == ["train-mode"], d.summary()
    truth = torch.autograd.functional.jacobian(lambda z: bn.double()(z), x.double())
    bn.float()
    np.testing.assert_allclose(d[1].reshape(-1), truth.reshape(-1).numpy(), rtol=1e-4,
                               atol=1e-6)

    def centred(z):
        return torch.sin(z - z.mean(0)).sum(1, keepdim=True) + z.sum(1, keepdim=True)

    d = nbderiv.derivatives(centred, torch.randn(1, 3))
    assert d.codes == [] and np.array_equal(d[1].reshape(-1), [1.0, 1.0, 1.0])
    # a real cut at one point is still found
    assert "graph-broken" in nbderiv.derivatives(lambda z: z.detach() * z, torch.randn(1, 3)).codes


def test_padded_time_steps_of_a_masked_gru_are_no_saturation():
    """A Keras GRU behind Masking, with padded (all-zero) last steps: the output's derivative
    along those steps is 0, the other steps' are not; moving a padded step off 0 unmasks it
    (a jump, not a flat tail): no 'saturated' (the tanh/sigmoid units are not saturated)."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(16)
    i = keras.Input((4, 2), dtype="float64")
    h = keras.layers.GRU(5, dtype="float64")(keras.layers.Masking(0.0, dtype="float64")(i))
    m = keras.Model(i, keras.layers.Dense(1, dtype="float64")(h))
    x = np.random.default_rng(0).random((5, 4, 2))
    x[:, 3] = 0.0
    d = nbderiv.derivatives(m, x)
    assert np.all(d[1][:, 0, 3] == 0) and np.abs(d[1][:, 0, :3]).max() > 1e-3
    assert "saturated" not in d.codes, [str(f) for f in d.findings]


class _FunctionalTanh(nn.Module):
    """tanh called as a function in forward: no Tanh module to tell."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(2, 16), nn.Linear(16, 1)

    def forward(self, z):
        return self.b(z.new_tensor(1.0) * torch.tanh(self.a(z)))


def test_saturation_is_seen_through_a_tanh_called_as_a_function():
    m = _FunctionalTanh()
    x = torch.rand(20, 2, generator=torch.Generator().manual_seed(0)) * 1000 + 2000
    truth = vmap(jacrev(copy.deepcopy(m).double()))(x.double()).detach().numpy()
    assert np.all(truth == 0)  # float64 rounds the slopes away too
    with torch.no_grad():
        assert abs(float(m(x[:1]) - m(-x[:1]))) > 0.01  # yet y depends on x
    assert nbderiv.derivatives(m, x).codes == ["saturated"]


def test_a_cut_graph_gives_no_piecewise_linear_from_autodiffs_own_zeros():
    """z * z.detach() is z**2 in the forward pass (second derivative 2, by hand): autodiff's
    d2 = 0 is the cut, not piecewise linearity. graph-broken, and no piecewise-linear."""
    x = torch.linspace(-1, 1, 7).reshape(-1, 1)
    d = nbderiv.derivatives(lambda z: z * z.detach(), x, order=2)
    assert np.all(d[2] == 0)  # autodiff's number, against the true 2
    assert d.codes == ["graph-broken"], d.summary()


def _moves_along(model, x, i, reach, n=401):
    """The points whose output changes when input i moves by at most ``reach`` (a sweep)."""
    out = []
    with torch.no_grad():
        for p in range(len(x)):
            xs = x[p].repeat(n, 1)
            xs[:, i] += torch.linspace(-reach, reach, n)
            if len(torch.unique(model(xs))) > 1:
                out.append(p)
    return out


def test_an_argmax_model_is_piecewise_constant_along_every_input_it_uses():
    """y = the winning class of three scores; class 1 wins where x0 + 8 x1 > 4. The output
    changes with x0 too (at points 5 and 7 within 0.5): piecewise-constant for both inputs,
    never no-input-dependence."""
    def model(x):
        s = torch.stack([4 - x[:, 0] - 8 * x[:, 1], x[:, 0] + 8 * x[:, 1] - 4,
                         -10 + 0 * x[:, 0]], 1)
        return s.argmax(1, keepdim=True).float()

    torch.manual_seed(0)
    x = torch.rand(16, 2)
    assert _moves_along(model, x, 0, 0.5)  # the output uses x0
    d = nbderiv.derivatives(model, x)
    assert d.codes == ["piecewise-constant"], d.summary()
    assert "dy/dx[0]" in d.finding("piecewise-constant").message


def test_argmax_over_a_tanh_net_is_piecewise_constant_not_saturated():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))

    def model(x):
        return net(x).argmax(-1, keepdim=True).float()

    x = torch.rand(16, 2)
    with torch.no_grad():
        assert float(net[0](x).abs().max()) < 2  # no unit anywhere near saturation
    assert _moves_along(model, x, 0, 10.0)
    d = nbderiv.derivatives(model, x)
    assert "saturated" not in d.codes and "piecewise-constant" in d.codes, d.summary()


def test_points_where_a_clamp_flattens_the_input_are_no_saturation():
    """net(clamp(x, 0, 1)) at points all left of 0: dy/dx = 0 exactly there (the clamp), the
    tanh units are nowhere near saturation, and the output changes farther out."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def model(x):
        return net(torch.clamp(x, 0, 1))

    x = torch.linspace(-3, -1, 8).reshape(-1, 1)
    assert not _moves_along(model, x, 0, 0.5) and _moves_along(model, x, 0, 4.0)
    for found in (nbderiv.diagnose(model, x, order=2), nbderiv.derivatives(model, x).findings):
        codes = [f.code for f in found]
        assert "saturated" not in codes, codes
        assert codes == ["no-input-dependence"] and "flat region" in found[0].message


def test_inputs_in_a_narrow_range_get_no_false_graph_broken():
    """A float32 function reading x / 1e-4 at x in [-1e-4, 1e-4]: the forward pass's steps of
    (1 + |x|) spanned hundreds of its periods, and their noise passed for a disagreement with
    autodiff (graph-broken). Steps follow the narrow spread now; autodiff is right (float64
    closed form of the sin part, vmap(jacrev) of the float64 net)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = (torch.linspace(-1, 1, 21) * 1e-4)[:, None]
    d = nbderiv.derivatives(lambda z: net(z / 1e-4) + torch.sin(3 * z / 1e-4), x)
    assert d.codes == [], d.findings
    net64 = copy.deepcopy(net).double()
    J = vmap(jacrev(lambda z: net64(z[None] / 1e-4)[0, 0]))(x.double()).detach().numpy()[:, 0]
    truth = J + 3e4 * np.cos(3 * x.double().numpy()[:, 0] / 1e-4)
    assert np.abs(d[1][:, 0, 0] - truth).max() < 1e-5 * np.abs(truth).max()


def test_one_float64_copy_serves_every_check_of_a_call(monkeypatch):
    """A sequence model's zeros (no-input-dependence: its third feature is never read) are
    confirmed on a float64 copy by two checks; each made its own copy (TensorFlow traces
    each anew: 10 s for a GRU). The finding is true: no output depends on that feature at
    any step (torch.autograd.functional.jacobian)."""
    from nbderiv.backends.torch import TorchBackend

    made = []
    original = TorchBackend.float64_copy
    monkeypatch.setattr(TorchBackend, "float64_copy",
                        lambda self, m: made.append(m) or original(self, m))
    torch.manual_seed(0)

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.o = torch.nn.GRU(2, 6, batch_first=True), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.o(self.g(x[..., :2])[0])

    model = Seq()
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))
    d = nbderiv.derivatives(model, x, progress=False)
    assert d.codes == ["no-input-dependence"] and len(made) == 1
    J = torch.stack([torch.autograd.functional.jacobian(lambda z: model(z[None])[0], p)
                     for p in x])  # (N, 7, 2, 7, 3); a GRU cannot be vmapped
    assert J[..., 2].abs().max() == 0 and J[:, 6, :, :, :2].abs().max() > 0
    np.testing.assert_allclose(d[1], J.detach().numpy(), atol=1e-6)
