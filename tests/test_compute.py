"""The one computation path (nbderiv/compute.py): block sizing, the block loop, progress."""

from __future__ import annotations

import copy
import io
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402
from nbderiv import compute  # noqa: E402


def _call(n=50, d_in=2, d_out=3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, d_out)).double()
    call = compute.open_call(net, torch.rand(n, d_in, dtype=torch.float64), None)
    compute.probe(call)
    return call


def test_block_rows_follow_the_memory_budget_and_say_when_they_chunk():
    call = _call()
    assert compute.block_rows(call, 2, 2) == (50, False)
    rows, chunked = compute.block_rows(call, 2, 2, chunk_size=7)
    assert (rows, chunked) == (7, True)
    rows, chunked = compute.block_rows(call, 2, 2, memory_budget=2_000)
    assert chunked and 1 <= rows < 50


@pytest.mark.parametrize("rows", [1, 7, 16, 49, 50])
def test_blocks_of_any_size_give_the_one_block_answer(rows):
    call = _call()
    whole = call.backend.derivatives(call, call.args, 2, (0, 1))
    blocked = compute.run_blocks(call, 2, (0, 1), rows)
    np.testing.assert_allclose(blocked.y, whole.y, rtol=0, atol=1e-14)
    for got, ref in zip(blocked.orders, whole.orders, strict=True):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)


def test_every_block_gets_the_same_number_of_points(monkeypatch):
    call = _call()
    sizes = []
    original = type(call.backend).derivatives

    def spy(self, c, args, *a, **kw):
        sizes.append(args[0].shape[0])
        return original(self, c, args, *a, **kw)

    monkeypatch.setattr(type(call.backend), "derivatives", spy)
    compute.run_blocks(call, 1, (0, 1), 7)
    assert sizes == [7] * 8  # 50 points: 0-6, ..., 42-48, 43-49


def test_the_verdict_sees_randomness_and_coupling():
    call = _call()
    (first, *_), moved = compute.probe_batches(call)
    y = call.backend.forwards(call, [first])[0]
    assert compute.verdict_of(call, [y, y, y]) == compute.Verdict(3, False, False)
    other = y.copy()
    other[0] += 1
    assert compute.verdict_of(call, [y, other, y]).stochastic
    shifted = y.copy()
    shifted[3] += 1  # a point that was not moved changed: coupled
    assert compute.verdict_of(call, [y, y, shifted]).coupled


def test_the_probe_stays_within_the_points_range():
    """Moved probe points stay inside the range of the given points (a model defined on a
    domain must not be called beyond it), except point 0's small step."""
    call = _call(n=40)
    batches, moved = compute.probe_batches(call)
    X = call.args[0]
    lo, hi = X.min(axis=0), X.max(axis=0)
    for batch, rows in zip(batches, moved):
        inside = np.setdiff1d(np.arange(batch[0].shape[0]), [0] if 0 in rows else [])
        assert (batch[0][inside] >= lo).all() and (batch[0][inside] <= hi).all()


def _bar_output(items, enabled, monkeypatch, after=2.0, clock=None):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    if clock is not None:
        monkeypatch.setattr(compute.time, "perf_counter", clock)
    assert list(compute._progress(items, enabled, after=after)) == list(items)
    return err.getvalue()


def test_progress_is_silent_for_quick_work_and_shown_when_asked_or_slow(monkeypatch):
    pytest.importorskip("tqdm")
    assert _bar_output(range(5), None, monkeypatch) == ""
    assert _bar_output(range(5), False, monkeypatch) == ""
    assert "nbderiv" in _bar_output(range(5), True, monkeypatch)
    ticks = iter(range(0, 1000, 3))  # every look at the clock: 3 s later
    assert "nbderiv" in _bar_output(range(5), None, monkeypatch, clock=lambda: next(ticks))


class _TinyNoise(torch.nn.Module):  # randomness too small to move the numbers
    def forward(self, x):
        return x + 1e-9 * torch.randn_like(x) if self.training else x


def test_a_random_model_with_train_mode_batchnorm_is_still_found_coupled():
    """Randomness (two identical calls differ) used to skip the coupling test, and a train-mode
    BatchNorm next to Dropout or noise got the grad_outputs=ones column sums: the probe now
    repeats the randomness (seeded, the user's generator state put back) to test coupling."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                              _TinyNoise(), torch.nn.Linear(8, 2)).double()  # train mode
    x = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = nbderiv.derivatives(net, x)
    assert "coupled-samples" in d.codes and d.method.startswith("per-point"), d.codes
    assert net.training and net[1].num_batches_tracked.item() == 0  # put back by nbderiv
    quiet = torch.nn.Sequential(*[m for m in net if not isinstance(m, _TinyNoise)])
    J = torch.autograd.functional.jacobian(quiet, x)  # (N, 2, N, 3): the blocks on the diagonal
    blocks = np.stack([J[n, :, n].numpy() for n in range(10)])
    np.testing.assert_allclose(d[1], blocks, atol=1e-6)


def test_random_draws_that_follow_the_data_are_no_coupling():
    """RReLU in training mode draws a slope for each negative input only: moving some points
    shifts the other points' draws in a seeded pass, which read as coupled-samples (and the
    slow per-point blocks). In one pass, autograd's cross-terms are exactly 0: no coupling.
    With a train-mode BatchNorm beside it, the coupling is real and still found. Truth: the
    batch Jacobian of one forward pass."""
    torch.manual_seed(0)
    rrelu = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.RReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(30, 2)  # (after the weights, from the same seed)
    J = torch.autograd.functional.jacobian(rrelu, x).reshape(30, 30, 2)
    J[range(30), range(30)] = 0
    assert J.abs().max() == 0  # no cross-terms
    d = nbderiv.derivatives(rrelu, x, progress=False)
    assert "coupled-samples" not in d.codes and d.method == "reverse-ones", d.codes
    assert "train-mode" in d.codes
    bn = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16), torch.nn.RReLU(),
                             torch.nn.Linear(16, 1))
    assert "coupled-samples" in nbderiv.derivatives(bn, x, progress=False).codes


def test_float64_points_before_float32_layers_are_not_taken_for_coupled():
    """A Keras model with a float64 Input and float32 layers: its outputs are float32 values,
    whose last bit may move with the number of points; the coupling tolerance follows them."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 3), dtype="float64"), keras.layers.GRU(5),
                              keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(4, 6, 3))
    d = nbderiv.derivatives(model, x)
    assert "coupled-samples" not in d.codes and not d.method.startswith("per-point"), d.codes


def test_outputs_one_rounding_step_apart_are_not_random():
    """The probe's two identical batches may come back one last bit apart (a copy at another
    memory alignment takes another vectorised path: tf.sin did): that is no randomness, so
    no stochastic verdict (which would raise a false train-mode and switch off the coupling
    and result checks); outputs that differ by more than rounding, or in where they are NaN,
    are random."""
    verdict_of = compute.verdict_of
    call = compute.open_call(torch.sin, np.linspace(0, 1, 5)[:, None].astype("float32"), "torch")
    y = np.sin(np.linspace(0, 1, 5)).astype("float32")[:, None]
    bumped = np.nextafter(y, np.float32(2))  # one float32 step up, every row
    assert not verdict_of(call, [y, bumped, y]).stochastic
    assert verdict_of(call, [y, y * 1.01, y]).stochastic  # dropout-sized changes
    with_nan = y.copy()
    with_nan[2] = np.nan
    assert verdict_of(call, [y, with_nan, y]).stochastic
    assert not verdict_of(call, [with_nan, with_nan.copy(), with_nan]).stochastic


def test_a_deterministic_tensorflow_function_is_not_called_random():
    tf = pytest.importorskip("tensorflow")
    x = tf.constant(np.linspace(0, 1, 5).reshape(-1, 1).astype("float32"))
    d = nbderiv.derivatives(lambda z: tf.sin(z), x)
    assert d.codes == [], [str(f) for f in d.findings]
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(x.numpy()[:, 0]), rtol=1e-6)


def test_randomness_in_a_small_output_beside_a_large_one_is_seen():
    """Each output on its own scale: dropout in a head of size 0.01 beside a head of size
    2e4 is random (one tolerance for every output, scaled by the largest, hid it), and so is
    noise of a few dozen rounding steps."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    a, price, risk = torch.nn.Linear(2, 16), torch.nn.Linear(16, 1), torch.nn.Linear(16, 1)

    def two_heads(x):
        h = torch.tanh(a(x))
        return torch.cat([2e4 + 1e3 * price(h), 0.01 * risk(F.dropout(h, 0.5, training=True))],
                         1)

    assert "train-mode" in nbderiv.derivatives(two_heads, torch.randn(5, 2)).codes
    lin = torch.nn.Linear(3, 1)
    noisy = lambda x: torch.tanh(lin(x)) + 1e-6 * torch.randn(len(x), 1)  # noqa: E731
    assert "train-mode" in nbderiv.derivatives(noisy, torch.randn(6, 3)).codes


def test_an_order_whose_one_point_result_exceeds_the_budget_is_refused_up_front():
    # order 3 of a 3 x 16 x 16 image: 768**3 numbers (1.8 GB) for its one point; it ran until
    # the system killed it (24 GB), whatever memory_budget said
    import time

    from nbderiv.errors import MemoryBudgetError

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(2 * 16 * 16, 1)).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"768\*\*3 numbers") as info:
        nbderiv.derivatives(cnn, x, order=3)
    assert time.perf_counter() - start < 30 and "wrt=" in str(info.value)
    # the fix it names: a few pixels, against torch.func's third derivative of those
    d = nbderiv.derivatives(cnn, x, order=3, wrt=[0, 17])
    net64 = copy.deepcopy(cnn).double()
    flat = x.double().reshape(-1)

    def f(z):
        return net64(torch.cat([z[:1], flat[1:17], z[1:], flat[18:]]).reshape(1, 3, 16, 16))[0, 0]
    third = torch.func.jacfwd(torch.func.jacfwd(torch.func.jacrev(f)))(flat[[0, 17]])
    np.testing.assert_allclose(d[3][0, 0], third.detach().numpy(), atol=1e-6)
