"""Shared fixtures for the unit tests.

Independent references for derivative tests (never nbderiv itself):
    torch_mlp      factory: a seeded ``nn.Sequential`` MLP, float64 by default
    func_reference reference d[k] from nested ``torch.func`` (vmap of jacrev/jacfwd)
    central_fd     reference d[1] / d[2] from float64 central finite differences
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# Plots in tests render off-screen (nbderiv itself never uses pyplot's global state).
os.environ.setdefault("MPLBACKEND", "Agg")
# The test models are tiny: one BLAS thread is fastest, and on a busy 2-core machine two
# threads waiting on each other make them tens of times slower. (Read when torch loads.)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _torch():
    return pytest.importorskip("torch")


def _make_mlp(sizes, act=None, *, dtype="float64", seed=0):
    torch = _torch()
    act = act or torch.nn.Tanh
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return torch.nn.Sequential(*layers).to(getattr(torch, dtype))


def _func_reference(fn, X, order, *, forward=False):
    """d[order] (N, d_out) + (d_in,)*order from nested torch.func, fn: (N, d_in) -> (N, d_out)."""
    torch = _torch()
    from torch.func import jacfwd, jacrev, vmap

    def one(x):  # (d_in,) -> (d_out,)
        return fn(x.unsqueeze(0)).reshape(-1)

    g = one
    for k in range(order):
        g = (jacfwd if (forward and k > 0) else jacrev)(g)
    X = torch.as_tensor(X)
    return vmap(g)(X).detach().cpu().numpy()


def _central_fd(fn, X, order, h=None):
    """Central differences in float64 of fn (numpy (N, D) -> numpy (N, d_out)) at every point.

    order 1: (f(x + h e_i) - f(x - h e_i)) / 2h               -> (N, d_out, D)
    order 2: four-point mixed difference with step h per axis  -> (N, d_out, D, D)
    Points are shifted together, valid because the models tested treat points independently.
    """
    X = np.asarray(X, dtype=np.float64)
    n, D = X.shape
    E = np.eye(D)
    if order == 1:
        h = h or 1e-5
        cols = [(fn(X + h * E[i]) - fn(X - h * E[i])) / (2 * h) for i in range(D)]
        return np.stack(cols, axis=-1)
    if order == 2:
        h = h or 1e-4
        out = None
        for i in range(D):
            for j in range(D):
                v = (fn(X + h * E[i] + h * E[j]) - fn(X + h * E[i] - h * E[j])
                     - fn(X - h * E[i] + h * E[j]) + fn(X - h * E[i] - h * E[j])) / (4 * h * h)
                if out is None:
                    out = np.empty(v.shape + (D, D))
                out[..., i, j] = v
        return out
    raise ValueError("central_fd supports orders 1 and 2")


@pytest.fixture
def torch_mlp():
    return _make_mlp


@pytest.fixture
def func_reference():
    return _func_reference


@pytest.fixture
def central_fd():
    return _central_fd


def numpy_fn(model):
    """A numpy (N, D) -> numpy (N, d_out) float64 wrapper of a torch model, for central_fd."""
    torch = _torch()

    def f(X):
        with torch.no_grad():
            y = model(torch.as_tensor(X, dtype=torch.float64))
        return y.reshape(len(X), -1).numpy()
    return f


@pytest.fixture
def as_numpy_fn():
    return numpy_fn
