"""The finite-difference check: ``derivatives(..., check=True)`` -> ``d.check``.

Its reference is checked against closed forms, its verdict against results known to be
right (smooth float64 models), genuinely imprecise (float32 cancellation) and genuinely
not differentiable (points whose +-h interval straddles a ReLU kink).
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from nets import cancelling_net, kinky_relu  # noqa: E402
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.fdcheck import TOLERANCE, FiniteDifferenceCheck  # noqa: E402


def tanh_net(d_in=2, d_out=1, width=16, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out)).to(dtype)


def bn_train_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()


def test_reference_matches_closed_form_derivatives_of_sin():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    d = nbderiv.derivatives(torch.sin, x, order=3, check=True)
    c = d.check
    assert isinstance(c, FiniteDifferenceCheck) and c.passed and c.note == ""
    xs = x.numpy()
    closed = {1: np.cos(xs), 2: -np.sin(xs), 3: -np.cos(xs)}
    for k in (1, 2, 3):
        assert c.reference[k].shape == d[k].shape
        np.testing.assert_allclose(c.reference[k].reshape(-1), closed[k], atol=1e-7)
        assert c.errors[k][0] < 1e-7 and c.errors[k][1] < 1e-7
    assert c.step == pytest.approx(2e-4)  # 1e-4 * max(1, max |x|)
    text = c.summary()
    assert "OK" not in text and "order 3" in text
    assert text.startswith("autodiff agrees with float64 central differences of this model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_mlp_passes_within_the_dtype_tolerance(dtype, func_reference):
    net = tanh_net(d_in=2, d_out=3, dtype=dtype)
    X = (torch.rand(25, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(dtype)
    d = nbderiv.derivatives(net, X, order=2, wrt=[1], check=True)
    c = d.check
    assert c.passed and not c.low_precision and c.nonsmooth_points == ()
    assert c.tolerance == TOLERANCE[str(dtype).replace("torch.", "")]
    assert c.reference[2].shape == d[2].shape == (25, 3, 1, 1)
    ref = func_reference(net.double(), X.double(), 2)[..., 1:, 1:]  # independent of the check
    np.testing.assert_allclose(c.reference[2], ref, atol=1e-6)


def test_check_runs_on_a_copy_and_leaves_the_model_alone():
    net = tanh_net()
    before = [p.detach().clone() for p in net.parameters()]
    d = nbderiv.derivatives(net, torch.rand(10, 2), order=2, check=True)
    assert d.check.passed
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(p.grad is None for p in net.parameters())


def test_relu_story_autodiff_says_zero_differences_across_a_kink_do_not():
    # points 1 and 3 lie within 1e-4 of the kinks at 0.5 and -0.5; points 0, 2, 4 do not
    x = torch.tensor([[-0.9], [0.5 + 3e-5], [0.2], [-0.5 - 2e-5], [0.8]])
    d = nbderiv.derivatives(kinky_relu(), x, order=2, check=True)
    c = d.check
    assert "piecewise-linear" in d.codes and "low-precision" not in d.codes
    assert not c.passed and not c.low_precision
    assert c.nonsmooth_points == (1, 3)
    assert "kink" in c.note and "1, 3" in c.note and "kink" in c.summary()
    assert np.all(d[2] == 0)                                # autodiff: exactly 0
    assert np.abs(c.reference[2][[1, 3]]).min() > 1e3       # differences: ~ slope jump / 2h
    np.testing.assert_allclose(c.reference[2][[0, 2, 4]], 0, atol=1e-6)
    np.testing.assert_allclose(c.reference[1][[0, 2, 4]], d[1][[0, 2, 4]], atol=1e-6)


def test_relu_away_from_kinks_passes_with_zero_second_derivative():
    x = torch.tensor([[-0.9], [0.2], [0.8]])
    d = nbderiv.derivatives(kinky_relu(), x, order=2, check=True)
    assert d.check.passed and d.check.errors[2][0] < 1e-6 and d.check.nonsmooth_points == ()


def test_order_1_kink_straddle_is_explained_without_the_piecewise_finding():
    x = torch.tensor([[0.5 + 3e-5], [0.2]])
    d = nbderiv.derivatives(kinky_relu(), x, order=1, check=True)
    assert d.codes == [] and d.check.nonsmooth_points == (0,)
    assert "curves too sharply" not in d.check.note  # the structure says ReLU: a kink


def test_low_precision_flagged_only_where_float64_autodiff_agrees():
    x = torch.linspace(-1, 1, 11).reshape(-1, 1)
    c = nbderiv.derivatives(cancelling_net(), x, order=2, check=True).check
    assert not c.passed and c.low_precision and c.nonsmooth_points == ()
    assert c.errors[1][1] > TOLERANCE["float32"] and 1 in c.low_precision_orders
    assert "use float64" in c.note


def test_coupled_model_checked_one_point_at_a_time():
    X = torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d = nbderiv.derivatives(bn_train_net(), X, order=2, check=True)
    c = d.check
    assert c.passed and c.errors[2][1] < 1e-6, c.summary()
    assert np.isfinite(c.reference[2][:4]).all() and np.isnan(c.reference[2][4:]).all()
    assert "first 4 point(s)" in c.note


def test_random_model_is_not_checked():
    net = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    c = nbderiv.derivatives(net, torch.rand(10, 2), check=True).check
    assert not c.passed and c.errors == {} and "random" in c.note
    assert c.summary().startswith("not run")


def test_a_function_that_cannot_run_in_float64_is_checked_in_its_own_dtype_and_says_so():
    W = torch.randn(2, 1, generator=torch.Generator().manual_seed(0))  # captured float32 tensor
    X = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(lambda x: torch.tanh(x @ W), X, order=2, check=True)
    c = d.check
    assert c.passed and c.dtype == "float32", c.summary()
    assert "no float64 copy" in c.note and "float32" in c.note
    assert c.step == pytest.approx(5e-3)  # a float32 step, not the float64 one
    assert "float32 central differences" in c.summary()
    # the float32 reference against the closed form: d/dx tanh(xW) = (1 - tanh^2) W
    x64, w64 = X.double().numpy(), W.double().numpy()
    t = np.tanh(x64 @ w64)
    closed1 = (1 - t**2)[:, :, None] * w64.T[None]
    closed2 = (-2 * t * (1 - t**2))[:, :, None, None] * (w64 @ w64.T)[None, None]
    np.testing.assert_allclose(c.reference[1], closed1, atol=5e-4)
    np.testing.assert_allclose(c.reference[2], closed2, atol=5e-3)


def test_a_float64_function_that_rounds_to_float32_inside_is_checked_in_float32():
    """float64 in and out, float32 in between: the check ran float64 steps (h=1e-4) through
    it and failed, blaming a cut graph or kinks; it now finds the float32 inside (an input
    change below float32's resolution leaves the output unchanged) and, with no float64
    copy of a function to make, checks with float32's step and tolerance, and says so."""
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    d = nbderiv.derivatives(lambda z: torch.sin(3 * z.float()).double(), x, order=2,
                            check=True)
    c = d.check
    assert d[1].dtype == np.float64
    assert c.passed and c.dtype == "float32" and c.result_dtype == "float32", c.summary()
    assert c.step == pytest.approx(5e-3) and c.nonsmooth_points == ()
    assert "computes in float32 inside" in c.note and "no float64 copy" in c.note
    assert "cuts the graph" not in c.note and "kink" not in c.note
    x64 = x.numpy()  # closed forms: 3 cos(3x), -9 sin(3x)
    np.testing.assert_allclose(c.reference[1][:, 0, 0], 3 * np.cos(3 * x64), atol=2e-3 * 3)
    np.testing.assert_allclose(c.reference[2][:, 0, 0, 0], -9 * np.sin(3 * x64), atol=2e-3 * 9)
    np.testing.assert_allclose(d[1][:, 0, 0], 3 * np.cos(3 * x64), atol=1e-5)


def test_a_float64_model_is_still_checked_in_float64():
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    c = nbderiv.derivatives(lambda z: torch.sin(3 * z), x, order=2, check=True).check
    assert c.passed and c.dtype == "float64" and c.result_dtype == "float64" and not c.note
    np.testing.assert_allclose(c.reference[1][:, 0, 0], 3 * np.cos(3 * x.numpy()), atol=1e-6)


def test_a_half_detached_function_fails_without_blaming_kinks():
    W = torch.randn(2, 1, generator=torch.Generator().manual_seed(0))

    def half_detached(x):  # the first feature's path is cut from the graph
        return torch.tanh(x[:, :1].detach() * W[0] + x[:, 1:] * W[1])

    X = torch.rand(6, 2, generator=torch.Generator().manual_seed(1))
    c = nbderiv.derivatives(half_detached, X, check=True).check
    assert not c.passed and c.kink_points == () and c.nonsmooth_points
    assert "autodiff is wrong here" in c.note and "kink lies" not in c.note


def test_non_finite_points_are_left_out_of_the_comparison():
    x = torch.tensor([[0.1], [float("nan")], [0.5]], dtype=torch.float64)
    d = nbderiv.derivatives(tanh_net(d_in=1, dtype=torch.float64), x, order=2, check=True)
    c = d.check
    assert c.passed and np.isnan(c.reference[1][1]).all() and "1 point(s)" in c.note


def test_differences_are_evaluated_in_chunks():
    sizes = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tanh_net()

        def forward(self, x):
            if x.requires_grad:  # derivative evaluations (not the cheap forward probes)
                sizes.append(len(x))
            return self.net(x)

    X = torch.rand(20, 2)
    d = nbderiv.derivatives(Recorder(), X, order=2, check=True, chunk_size=4)
    assert d.check.passed and sizes and max(sizes) <= 4
    d_whole = nbderiv.derivatives(Recorder(), X, order=2, check=True)
    for k in (1, 2):
        np.testing.assert_allclose(d.check.reference[k], d_whole.check.reference[k], atol=1e-12)


# -- Keras ------------------------------------------------------------------------------------------
needs_keras = pytest.mark.skipif(importlib.util.find_spec("nbderiv.backends.tensorflow") is None,
                                 reason="Keras backend not available")


@needs_keras
def test_keras_check_passes_for_tanh_and_explains_relu_kinks():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    tanh = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(1)])
    x = np.random.default_rng(0).uniform(-1, 1, (12, 2)).astype(np.float32)
    c = nbderiv.derivatives(tanh, x, order=2, check=True).check
    assert c.passed and c.reference[2].shape == (12, 1, 2, 2), c.summary()

    relu = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, activation="relu"),
                             keras.layers.Dense(1)])
    relu.layers[0].set_weights([np.ones((1, 3), np.float32),
                                np.array([-0.5, 0.0, 0.5], np.float32)])
    relu.layers[1].set_weights([np.array([[1.0], [2.0], [-1.0]], np.float32),
                                np.zeros(1, np.float32)])
    xs = np.array([[-0.9], [0.5 + 3e-5], [0.2]], np.float32)
    d = nbderiv.derivatives(relu, xs, order=2, check=True)
    assert d.check.nonsmooth_points == (1,) and "low-precision" not in d.codes
    assert "kink" in d.check.note and np.all(d[2] == 0)


def test_printing_the_check_gives_its_sentence():
    import torch

    d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 4).reshape(-1, 1), check=True)
    assert str(d.check) == d.check.summary()
    assert str(d.check).startswith("autodiff agrees with float64 central differences")


def test_inputs_of_different_sizes_get_steps_of_their_own():
    """A tanh PINN normalising x in [3, 7] and t in [50, 150] inside a function (no float64
    copy: a float32 check). One step for both, sized by t, made x's differences wrong and
    claimed a kink; autodiff is right (float64 vmap(jacrev) of a float64 copy)."""
    import copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    mu, sd = torch.tensor([5.0, 100.0]), torch.tensor([1.2, 30.0])

    def f(x):
        return net((x - mu) / sd)

    X = torch.stack([torch.rand(16) * 4 + 3, torch.rand(16) * 100 + 50], 1)
    d = nbderiv.derivatives(f, X, order=2, check=True)
    n64 = copy.deepcopy(net).double()
    g = lambda p: n64((p[None] - mu.double()) / sd.double())[0, 0]  # noqa: E731
    truth = torch.func.vmap(torch.func.jacrev(g))(X.double()).detach().numpy()
    np.testing.assert_allclose(d[1][:, 0], truth, rtol=1e-4, atol=1e-7)
    assert d.check.passed and not d.check.kink_points, d.check
    assert d.check.per_input and "h up to" in str(d.check)


def test_inputs_far_from_zero_get_steps_sized_by_their_spread():
    """sin at x in [1e4, 1e4 + 3]: a step of 1e-4 |x| = 1 spans a sixth of its period, so the
    check failed (blaming a kink or a cut graph) and reference= reported 70% errors; steps
    sized by the points' spread agree with autodiff and with cos / -sin."""
    x = torch.linspace(1e4, 1e4 + 3, 20, dtype=torch.float64)[:, None]
    d = nbderiv.derivatives(torch.sin, x, order=2, check=True, reference=np.sin)
    assert d.check.passed, d.check.summary()
    assert d.check.step < 1e-2
    assert all(rel < 1e-5 for _, rel in d.reference_errors.values()), d.reference_errors
    xs = x.numpy()[:, 0]
    assert np.abs(d[1][:, 0, 0] - np.cos(xs)).max() < 1e-9
    assert np.abs(d[2][:, 0, 0, 0] + np.sin(xs)).max() < 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_on_a_small_scale_are_checked_at_a_step_that_resolves_them(dtype):
    """A smooth net reading x / 1e-4, at x in [1e-4, 3e-4]: a step of 1e-4 spans its whole
    range (the check failed, blaming a cut graph); smaller steps agree with autodiff, which
    matches float64 vmap(jacrev) of the same weights. (Smaller steps are tried in float64
    only: a float32 check's rounding allowance would let anything pass there.)"""
    from torch.func import jacrev, vmap
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)

    class Scaled(nn.Module):  # (a module: its float64 copy is what the check runs)
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(z / 1e-4)

    x = torch.linspace(1e-4, 3e-4, 10, dtype=dtype)[:, None]
    d = nbderiv.derivatives(Scaled(), x, order=2, check=True)
    assert d.check.passed and d.codes == [], d.check.summary()
    inner64 = inner.double()
    truth = vmap(jacrev(lambda z: inner64(z[None] / 1e-4)[0]))(x.double()).detach().numpy()
    assert np.abs(d[1] - truth).max() <= (1e-10 if dtype == torch.float64 else 1e-5) * \
        np.abs(truth).max()


def test_reference_on_a_small_scale_keeps_the_step_that_converges():
    x = torch.linspace(1e-4, 5e-4, 10, dtype=torch.float64)[:, None]
    d = nbderiv.derivatives(lambda z: torch.sin(1e4 * z), x, order=2,
                            reference=lambda z: np.sin(1e4 * z))
    assert all(rel < 1e-4 for _, rel in d.reference_errors.values()), d.reference_errors
    xs = x.numpy()[:, 0]
    assert np.abs(d[1][:, 0, 0] - 1e4 * np.cos(1e4 * xs)).max() < 1e-7


def test_a_cut_graph_in_a_model_with_no_float64_copy_still_fails_the_check():
    """NumPy inside forward, float32 results: no float64 copy, so no smaller steps (whose
    float32 rounding allowance would exceed the derivative and pass autodiff's zeros)."""
    class NumpyInside(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            z = np.pi * x.detach().numpy()
            return self.lin(torch.from_numpy(np.concatenate([np.sin(z), np.cos(z)], 1)).float())

    d = nbderiv.derivatives(NumpyInside(), torch.linspace(-1, 1, 5)[:, None], check=True)
    assert not d.check.passed and np.all(d[1] == 0)
    assert np.abs(d.check.reference[1]).max() > 0.5  # the differences see the slope


def _softmax_sum_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5), nn.Softmax(1))


def test_an_output_constant_up_to_rounding_checks_as_zero_derivatives_not_kinks():
    # the sum of softmax probabilities is exactly 1, so every derivative is exactly 0; float32
    # autodiff gives ~1e-9 and the float64 differences ~1e-13 of rounding noise. The check
    # told of kinks and a cut graph at order 2 (and passed order 1 by "a smaller scale")
    net = _softmax_sum_net()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(lambda z: net(z).sum(1, keepdim=True), x, order=2, check=True)
    c = d.check
    assert c.passed and c.kink_points == () and c.nonsmooth_points == (), c.summary()
    assert "0 up to rounding" in c.note and "kink" not in c.note and "smaller" not in c.note
    for k in (1, 2):  # the closed form: 0, and the result is float32 rounding of it
        assert np.abs(d[k]).max() < 1e-6


def test_a_small_cut_derivative_beside_a_constant_output_is_still_a_mismatch():
    # y = sum(softmax) + 1e-3 * x0 with x0 detached: the true d/dx0 is 1e-3, autodiff says 0;
    # small, but far above the rounding of y: the rounding allowance must not hide it
    net = _softmax_sum_net()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(lambda z: net(z).sum(1, keepdim=True) + 1e-3 * z[:, :1].detach(),
                            x, order=1, check=True)
    assert not d.check.passed
    np.testing.assert_allclose(d.check.reference[1][:, 0, 0], 1e-3, rtol=1e-3)
    assert "0 up to rounding" not in d.check.note


def test_a_model_that_updates_its_own_state_is_checked_not_called_random():
    # spectral_norm in training mode runs one power iteration per forward pass (u, v
    # updated): two passes differ, but not by random numbers. The check said "random"
    # and did not run
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    spectral_norm(net[0])
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(net, x, order=2, check=True)
    assert d.check.passed and d.check.errors, d.check.summary()
    assert "random" not in d.check.note
    # the truth: one training-mode pass of a float64 copy from the user's state, its
    # cross-point Jacobian's diagonal blocks (torch.autograd.functional: one forward pass)
    net64 = copy.deepcopy(net).double()
    J = torch.autograd.functional.jacobian(lambda z: copy.deepcopy(net64)(z), x.double())
    np.testing.assert_allclose(d[1], J.diagonal(dim1=0, dim2=2).permute(2, 0, 1).numpy(),
                               atol=1e-6)


def test_a_float32_model_that_couples_points_is_checked_on_its_float64_copy():
    # the copy was compared with the model on the first 8 points alone, where batch
    # statistics differ from the whole batch's: "no float64 copy could be made"
    net = bn_train_net().float()
    X = torch.rand(20, 2, generator=torch.Generator().manual_seed(2))
    c = nbderiv.derivatives(net, X, check=True).check
    assert c.dtype == "float64" and "no float64 copy" not in c.note, c.summary()
    assert c.passed
    # its differences against the float64 copy's cross-point Jacobian, diagonal blocks
    net64 = copy.deepcopy(net).double()
    J = torch.autograd.functional.jacobian(lambda z: copy.deepcopy(net64)(z), X.double())
    blocks = J.diagonal(dim1=0, dim2=2).permute(2, 0, 1).numpy()
    np.testing.assert_allclose(c.reference[1][:4], blocks[:4], atol=1e-6)


class _WrongTimeScale(torch.autograd.Function):
    """t / 1e4 with a backward 10% off (a hand-written gradient's bug)."""

    @staticmethod
    def forward(ctx, t):
        return t / 1e4

    @staticmethod
    def backward(ctx, g):
        return g * 1.1e-4


def test_a_wrong_derivative_along_an_input_of_a_large_scale_is_a_mismatch():
    # x in [0, 1], t in [0, 1e4]: u_t is ~1e-4 of u_x, and an error of 10% in it was ~1e-5
    # of the largest entry, far inside a tolerance relative to it: the check passed
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, dtype=torch.float64, generator=gen)
    t = 1e4 * torch.rand(20, 1, dtype=torch.float64, generator=gen)
    d = nbderiv.derivatives(lambda x, t: net(torch.cat([x, _WrongTimeScale.apply(t)], 1)),
                            (x, t), check=True)
    assert not d.check.passed, d.check.summary()
    assert d.check.errors[1][1] > 0.05  # relative to u_t's own size, in units of t
    # the truth: the same network on t / 1e4, differentiated by torch.func
    truth = torch.func.vmap(torch.func.jacrev(lambda p: net(torch.stack(
        [p[0], p[1] / 1e4])[None])[0]))(torch.cat([x, t], 1)).detach().numpy()
    np.testing.assert_allclose(d.check.reference[1], truth, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(d[1][:, 0, 1], 1.1 * truth[:, 0, 1], rtol=1e-9)
    # the right gradient passes, whatever the scales
    good = nbderiv.derivatives(lambda x, t: net(torch.cat([x, t / 1e4], 1)), (x, t),
                               check=True)
    assert good.check.passed, good.check.summary()
