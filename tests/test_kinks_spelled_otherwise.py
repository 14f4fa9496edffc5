"""``at-kink`` for a kink however it is spelled: ``clamp`` / ``clip``, ``maximum`` / ``minimum``
/ ``max`` / ``min`` of two tensors, ``abs``, ``threshold``, ``hardshrink`` / ``softshrink``,
``hardsigmoid`` / ``hardswish``, in-place ReLU methods, SELU and ELU with alpha != 1, as
functions, in-place versions and Tensor methods (torch's KinkWatcher), the same way as for
``nn.ReLU``. Only where the first derivative really jumps (ELU with alpha = 1 and CELU join
smoothly); values away from the kink against nested ``torch.func``; layers that
:data:`~nbderiv.backends.torch_state.KINK_FREE` lists really call none of these.
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import jacrev, vmap  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv import memo  # noqa: E402
from nbderiv.backends.torch_kinks import KinkWatcher  # noqa: E402
from nbderiv.backends.torch_state import KINK_FREE  # noqa: E402


class Shifted(nn.Module):
    """x -> b(act(a(x) + at)): ``a`` has no bias, so at x = 0 every unit's input is exactly
    ``at`` (the kink's location), and nowhere else for these weights."""

    def __init__(self, act, at=0.0, width=8, d_in=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(d_in, width, bias=False), nn.Linear(width, 1)
        self.act, self.at = act, at

    def forward(self, x):
        return self.b(self.act(self.a(x) + self.at))


def zeros(h):
    return torch.zeros_like(h)


# (name, function of the pre-activation h, kink location): every one is new to the watcher
SPELLED = [
    ("Tensor.clamp(min=0)", lambda h: h.clamp(min=0), 0.0),
    ("torch.clamp(h, min=0)", lambda h: torch.clamp(h, min=0), 0.0),
    ("torch.clamp_min", lambda h: torch.clamp_min(h, 0), 0.0),
    ("Tensor.clamp_min", lambda h: h.clamp_min(0), 0.0),
    ("Tensor.clamp(max=0)", lambda h: h.clamp(max=0), 0.0),
    ("torch.clamp_max", lambda h: torch.clamp_max(h, 0.25), 0.25),
    ("Tensor.clamp(lo, hi) at hi", lambda h: h.clamp(-2.0, 0.5), 0.5),
    ("torch.clip", lambda h: torch.clip(h, -0.5), -0.5),
    ("Tensor.clamp_ (in place)", lambda h: h.clone().clamp_(min=0), 0.0),
    ("clamp with a tensor bound", lambda h: torch.clamp(h, min=torch.zeros(h.shape[1:],
                                                                         dtype=h.dtype)), 0.0),
    ("torch.maximum", lambda h: torch.maximum(h, zeros(h)), 0.0),
    ("torch.max(h, other)", lambda h: torch.max(h, zeros(h)), 0.0),
    ("Tensor.max(other)", lambda h: h.max(zeros(h)), 0.0),
    ("Tensor.maximum", lambda h: h.maximum(zeros(h)), 0.0),
    ("torch.minimum", lambda h: torch.minimum(h, zeros(h)), 0.0),
    ("torch.min(h, other)", lambda h: torch.min(h, zeros(h)), 0.0),
    ("torch.fmax", lambda h: torch.fmax(h, zeros(h)), 0.0),
    ("maximum of two tensors that require grad", lambda h: torch.maximum(h, -0.5 * h), 0.0),
    ("Tensor.abs", lambda h: h.abs(), 0.0),
    ("torch.abs", lambda h: torch.abs(h), 0.0),
    ("abs(h)", lambda h: abs(h), 0.0),
    ("torch.absolute", lambda h: torch.absolute(h), 0.0),
    ("Tensor.relu_ (in place)", lambda h: h.clone().relu_(), 0.0),
    ("F.threshold, continuous", lambda h: F.threshold(h, 0.5, 0.5), 0.5),
    ("F.threshold, a jump", lambda h: F.threshold(h, 0.5, 0.0), 0.5),
    ("torch.threshold", lambda h: torch.threshold(h, -0.5, -0.5), -0.5),
    ("F.hardshrink at +lambda", lambda h: F.hardshrink(h, 0.5), 0.5),
    ("Tensor.hardshrink at -lambda", lambda h: h.hardshrink(), -0.5),
    ("F.softshrink at +lambda", lambda h: F.softshrink(h, 0.25), 0.25),
    ("F.softshrink at -lambda", lambda h: F.softshrink(h), -0.5),
    ("F.hardsigmoid at -3", lambda h: F.hardsigmoid(h), -3.0),
    ("F.hardswish at 3", lambda h: F.hardswish(h), 3.0),
    ("F.elu, alpha 0.5", lambda h: F.elu(h, alpha=0.5), 0.0),
    ("F.selu", lambda h: F.selu(h), 0.0),
    ("torch.selu", lambda h: torch.selu(h), 0.0),
    # written by hand: the comparisons that pick the pieces, and step functions
    ("h * (h > 0)", lambda h: h * (h > 0), 0.0),
    ("torch.where(h > 0, h, 0.1 h)", lambda h: torch.where(h > 0, h, 0.1 * h), 0.0),
    ("torch.where(h.ge(0.5), h, 0.5)", lambda h: torch.where(h.ge(0.5), h, 0.5), 0.5),
    ("h * (tensor(0) < h)", lambda h: h * (torch.tensor(0.0, dtype=h.dtype) < h), 0.0),
    ("torch.where(torch.le(h, -0.25), ...)",
     lambda h: torch.where(torch.le(h, -0.25), -0.25 + 0.0 * h, h), -0.25),
    ("h * torch.sign(h)", lambda h: h * torch.sign(h), 0.0),
    ("h * torch.heaviside(h.detach(), 1/2)", lambda h: h * torch.heaviside(
        h.detach(), torch.tensor(0.5, dtype=h.dtype)), 0.0),
]
X = torch.tensor([[-1.0], [0.0], [0.3], [0.0], [0.7]], dtype=torch.float64)  # kinks: 1, 3
OFF = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)


def reference_d1(model, x):
    return vmap(jacrev(lambda p: model(p[None])[0]))(x).detach().numpy()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of clamp_
@pytest.mark.parametrize("name, act, at", SPELLED, ids=[s[0] for s in SPELLED])
def test_at_kink_names_exactly_the_points_on_the_kink(name, act, at):
    model = Shifted(act, at).double()
    d = nbderiv.derivatives(model, X, order=1)
    f = d.finding("at-kink")
    assert f is not None and f.points == (1, 3), [str(g) for g in d.findings]
    # the one-sided value at the kink is not blamed on a broken graph
    assert "graph-broken" not in d.codes, [str(g) for g in d.findings]
    assert_close(d[1][OFF.numpy()], reference_d1(model, X[OFF]), 1e-12, f"{name} d1")
    off = nbderiv.derivatives(model, X + 1e-3, order=1)
    assert off.finding("at-kink") is None, [str(g) for g in off.findings]


def test_the_kink_is_found_after_a_call_that_saw_none():
    """A call with no point on the kink saw clamp called, so the model is not taken for
    kink-free: the next call, with a point on the kink, looks again."""
    model = Shifted(lambda h: h.clamp(min=0), d_in=2).double()
    x = torch.tensor([[0.5, -1.0], [1.0, 2.0], [-0.3, 0.2]], dtype=torch.float64)
    assert nbderiv.derivatives(model, x).finding("at-kink") is None
    assert not any(f.kink_free for f in memo._REMEMBERED[model][1].values())
    x[1] = 0.0
    assert nbderiv.derivatives(model, x).finding("at-kink").points == (1,)


def test_abs_inside_a_smooth_function():
    """|h| inside sin and a square: curvature everywhere (no piecewise-linear finding), a kink
    where h = 0; first and second derivatives elsewhere as nested torch.func has them."""
    model = Shifted(lambda h: torch.sin(h.abs()) + h ** 2, d_in=2).double()
    x = torch.tensor([[0.4, -0.2], [0.0, 0.0], [1.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    d = nbderiv.derivatives(model, x, order=2)
    assert d.finding("at-kink").points == (1,), [str(g) for g in d.findings]
    assert "piecewise-linear" not in d.codes
    keep = [0, 2, 3]
    one = lambda p: model(p[None])[0]  # noqa: E731
    assert_close(d[1][keep], vmap(jacrev(one))(x[keep]).detach().numpy(), 1e-12, "d1")
    assert_close(d[2][keep], vmap(jacrev(jacrev(one)))(x[keep]).detach().numpy(), 1e-10, "d2")
    assert nbderiv.derivatives(model, x[keep], order=2).finding("at-kink") is None


def test_diagnose_and_the_piecewise_linear_finding_agree():
    """diagnose names the same points; a clamp model is found piecewise linear from its
    numbers (its modules say nothing), a Hardshrink stack from its structure, at order 2
    alongside at-kink."""
    clamped = Shifted(lambda h: torch.clamp(h, min=0)).double()
    found = {f.code: f for f in nbderiv.diagnose(clamped, X)}
    assert found["at-kink"].points == (1, 3) and "piecewise-linear" in found
    d = nbderiv.derivatives(clamped, X, order=2)
    assert {"at-kink", "piecewise-linear"} <= set(d.codes)
    assert np.all(d[2] == 0)
    torch.manual_seed(0)
    shrink = nn.Sequential(nn.Linear(1, 8), nn.Hardshrink(0.5), nn.Linear(8, 1)).double()
    with torch.no_grad():
        shrink[0].bias.fill_(0.5)  # at x = 0 every input is lambda: a jump (hardshrink(0.5) = 0)
    d = nbderiv.derivatives(shrink, X, order=2)
    assert {"at-kink", "piecewise-linear"} <= set(d.codes)
    assert d.finding("at-kink").points == (1, 3)


@pytest.mark.parametrize("layer", [nn.SELU, lambda: nn.ELU(alpha=0.5),
                                   lambda: nn.Threshold(0.0, 0.0), nn.Softshrink, nn.Hardswish],
                         ids=["SELU", "ELU(alpha=0.5)", "Threshold", "Softshrink(0.5)",
                              "Hardswish"])
def test_layers_with_a_kink_in_a_plain_stack(layer):
    """Plain stacks of torch's own layers (SELU and ELU are no longer taken as kink-free)."""
    module = layer()
    at = {"Softshrink": 0.5, "Hardswish": -3.0}.get(type(module).__name__, 0.0)
    torch.manual_seed(0)
    first = nn.Linear(1, 8)
    with torch.no_grad():
        first.bias.fill_(at)
    net = nn.Sequential(first, module, nn.Linear(8, 1)).double()
    d = nbderiv.derivatives(net, X, order=1)
    assert d.finding("at-kink") is not None and d.finding("at-kink").points == (1, 3)
    assert nbderiv.derivatives(net, X + 1e-3, order=1).finding("at-kink") is None


def test_pieces_that_join_smoothly_are_no_kink():
    """A hand-written piecewise function whose first derivative is continuous where the
    pieces meet (h**2 and -h**2 at 0: both slopes 0) is only a candidate there: the one-sided
    slopes agree, so nothing is claimed; its first derivative elsewhere as torch.func has it."""
    model = Shifted(lambda h: torch.where(h > 0, h ** 2, -h ** 2)).double()
    d = nbderiv.derivatives(model, X, order=1)
    assert "at-kink" not in d.codes, [str(g) for g in d.findings]
    assert_close(d[1], reference_d1(model, X), 1e-12, "d1")


@pytest.mark.parametrize("act", [nn.ELU, nn.CELU, nn.GELU, nn.Softplus])
def test_no_kink_where_the_first_derivative_is_continuous(act):
    """ELU with alpha = 1 (slope 1 on both sides of 0), CELU: no first-order kink, so nothing
    is claimed and the watcher counts no call (the model stays kink-free)."""
    net = Shifted(act(), d_in=2).double()
    x = torch.tensor([[0.0, 0.0], [0.5, -1.0]], dtype=torch.float64)
    assert "at-kink" not in nbderiv.derivatives(net, x, order=2).codes
    with KinkWatcher(2) as w:
        net(x)
    assert w.calls == 0 and not w.hits.any()


@pytest.mark.parametrize("layer", KINK_FREE, ids=[c.__name__ for c in KINK_FREE])
def test_kink_free_layers_call_no_piecewise_function(layer):
    """Every layer KINK_FREE lists, in training and in eval mode, on points with exact zeros:
    no call the watcher counts (else a model of them would skip a search it needs)."""
    sizes = {nn.Linear: (4, 4), nn.Bilinear: (4, 4, 4), nn.Conv1d: (4, 4, 1),
             nn.Conv2d: (4, 4, 1), nn.Conv3d: (4, 4, 1), nn.BatchNorm1d: (4,),
             nn.BatchNorm2d: (4,), nn.BatchNorm3d: (4,), nn.LayerNorm: (4,),
             nn.GroupNorm: (2, 4), nn.Unflatten: (1, (2, 2)), nn.Softmax: (1,),
             nn.LogSoftmax: (1,)}
    shapes = {nn.Conv1d: (6, 4, 3), nn.Conv2d: (6, 4, 3, 3), nn.Conv3d: (6, 4, 3, 3, 3),
              nn.BatchNorm2d: (6, 4, 3, 3), nn.BatchNorm3d: (6, 4, 3, 3, 3)}
    module = layer(*sizes.get(layer, ())).double()
    torch.manual_seed(0)
    x = torch.randn(shapes.get(layer, (6, 4)), dtype=torch.float64)
    x[0] = 0.0
    for training in (True, False):
        module.train(training)
        with KinkWatcher(6) as w:
            module(x, x) if layer is nn.Bilinear else module(x)
        assert w.calls == 0, (layer.__name__, training)


def test_what_the_watcher_counts_and_which_rows_it_marks():
    """Only floating-point inputs count; a reduction over every axis (torch.max(h)) is none
    of a point's kinks, one over each point's axes (h.max(dim=1), amax) counts and marks the
    rows whose largest values tie (tests/test_kinks_at_ties.py);
    a call's rows are its first axis only where that axis has the points' length (a (4, 3)
    weight seen by a watcher of 3 points marks nothing); a bound tensor broadcasts."""
    h = torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]])
    with KinkWatcher(3) as w:
        torch.max(h), h.max(dim=1), torch.max(h, 1), torch.amax(h, 1)
        torch.tensor([[0, 1], [2, 3], [4, 5]]).abs()  # integers: no derivative to kink
    assert w.calls == 3 and not w.hits.any()  # no row of h holds its largest value twice
    with KinkWatcher(3) as w:
        torch.max(h)
        torch.tensor([[1.0, 3.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, -1.0]]).amax(1)
    # a tie at 0 of the values themselves (a black background) moves on one side: a kink
    assert w.calls == 1 and w.hits.tolist() == [True, False, True]
    with KinkWatcher(3) as w:  # a tie at 0 of a ReLU's output (dead units): no kink
        torch.relu(torch.tensor([[1.0, 3.0, 3.0], [1.0, 2.0, 3.0], [-0.5, -2.0, -1.0]])).amax(1)
        torch.nn.functional.relu(torch.tensor([[-1.0, -2.0], [1.0, 2.0], [-3.0, -1.0]])).view(
            3, 2).amax(1)  # (a view of it too)
    assert w.hits.tolist() == [True, False, False]
    with KinkWatcher(3) as w:
        torch.zeros(4, 3).clamp(min=0)  # first axis 4: not the points'
    assert w.calls == 1 and not w.hits.any()
    with KinkWatcher(3) as w:
        torch.clamp(h, min=torch.tensor([9.0, 9.0, 1.0]))  # h[:, 2] == 1 in row 2 only
        h.clone().relu_()  # marks rows 0 and 2, looked at before the call changes h
    assert w.calls == 2 and w.hits.tolist() == [True, False, True]
    with KinkWatcher(3) as w:  # max(h, other) where a (3,) other broadcasts over the rows
        torch.maximum(torch.tensor([2.0, 3.0, 4.0]), torch.full((3, 1), 3.0))
    assert w.hits.tolist() == [True, True, True]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func.grad's
def test_torch_func_inside_the_model():
    """A model that takes a gradient inside (torch.func.grad) is watched through its
    wrappers: the kink of relu' at 0 is named. One that maps over the points with vmap hides
    the points' axis: not looked at, and no failure (both failed in the kink search)."""
    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=torch.float64)

    def grad_inside(x):  # the gradient of sum relu(x W^T), per point: relu'(x W^T) W
        return torch.func.grad(lambda z: torch.relu(z @ W.T).sum())(x)

    def vmap_inside(x):
        return torch.func.vmap(lambda r: torch.tanh(W @ r).clamp(min=0))(x)

    x = torch.randn(4, 3, dtype=torch.float64)  # 4 points: as many as W has rows
    d = nbderiv.derivatives(vmap_inside, x, order=1)
    ref = vmap(jacrev(lambda p: vmap_inside(p[None])[0]))(x).detach().numpy()
    assert_close(d[1], ref, 1e-12, "vmap inside d1")
    x[2] = 0.0
    assert nbderiv.derivatives(grad_inside, x, order=1).finding("at-kink").points == (2,)
