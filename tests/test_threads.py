"""Concurrent calls on one model (issue 18): the sequential answers, no state changed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbderiv  # noqa: E402
from nbderiv.errors import OptionError  # noqa: E402


def _run_in_threads(fn, count=4, rounds=3):
    results, errors = [None] * (count * rounds), []

    def work(i):
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count * rounds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_threads_get_the_sequential_answers_in_forward_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 6)).double()  # 6 outputs > 2 inputs: jvp
    xs = [torch.rand(30, 2, dtype=torch.float64) for _ in range(12)]
    truth = [nbderiv.derivatives(net, x, order=2) for x in xs]
    got = _run_in_threads(lambda i: nbderiv.derivatives(net, xs[i], order=2))
    for d, ref in zip(got, truth):
        assert d.method == ref.method == "forward-jvp"
        for k in range(3):
            np.testing.assert_array_equal(d[k], ref[k])


def test_threads_on_a_train_mode_batchnorm_model_leave_its_statistics():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8),
                              torch.nn.Tanh(), torch.nn.Linear(8, 1)).double().train()
    bn = net[1]
    before = [b.clone() for b in bn.buffers()]
    xs = [torch.rand(10, 2, dtype=torch.float64) for _ in range(8)]
    truth = [nbderiv.derivatives(net, x) for x in xs]
    got = _run_in_threads(lambda i: nbderiv.derivatives(net, xs[i]), count=4, rounds=2)
    for d, ref in zip(got, truth):
        np.testing.assert_array_equal(d[1], ref[1])
        assert "coupled-samples" in d.codes
    for b, a in zip(before, bn.buffers()):
        assert torch.equal(a, b)
    assert net.training and bn.training


@pytest.mark.parametrize("name, value", [("check", "yes"), ("check", 1), ("progress", "auto"),
                                         ("memory_budget", "lots"), ("memory_budget", -1),
                                         ("memory_budget", None), ("chunk_size", 0)])
def test_every_option_is_validated(name, value):
    with pytest.raises(OptionError, match=name):
        nbderiv.derivatives(torch.sin, torch.rand(4, 1), **{name: value})
