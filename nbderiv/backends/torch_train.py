"""Small seeded PyTorch training for the teaching widgets (``compare_activations``).

>>> net, loss = fit_1d(lambda x: x**2, "tanh", hidden=(8,), steps=5, lr=1e-2, n_train=16,
...                    domain=(-1, 1), seed=0)
>>> type(net).__name__
'Sequential'
"""

from __future__ import annotations

import torch

from ..errors import OptionError

ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "softplus": "Softplus", "sigmoid": "Sigmoid",
               "silu": "SiLU", "gelu": "GELU", "elu": "ELU", "leaky_relu": "LeakyReLU"}


def activation_class(activation):
    """(name, torch.nn.Module class) for a name like ``"tanh"`` or a Module class."""
    if isinstance(activation, str):
        cls = ACTIVATIONS.get(activation.lower())
        if cls is None:
            raise OptionError(f"unknown activation {activation!r}. Fix: one of "
                              f"{', '.join(ACTIVATIONS)}, or a torch.nn.Module class.")
        return activation.lower(), getattr(torch.nn, cls)
    if isinstance(activation, type) and issubclass(activation, torch.nn.Module):
        return activation.__name__, activation
    raise OptionError(f"activations must be names or torch.nn.Module classes, got {activation!r}.")


def fit_1d(target, activation, *, hidden, steps, lr, n_train, domain, seed, on_step=None):
    """Train ``Linear(1, h) -> act -> ... -> Linear(h, 1)`` on ``target`` by full-batch Adam.

    Deterministic for a given ``seed``; torch's global random state and thread count are
    put back afterwards. Returns (model in eval mode, final training MSE).
    """
    _, act = activation_class(activation)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest and deterministic
        try:
            return _fit(target, act, hidden, steps, lr, n_train, domain, on_step)
        finally:
            torch.set_num_threads(threads)


def _fit(target, act, hidden, steps, lr, n_train, domain, on_step):
    sizes = [1, *hidden, 1]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    net = torch.nn.Sequential(*layers)
    xt = torch.linspace(domain[0], domain[1], n_train, dtype=torch.float64).reshape(-1, 1)
    with torch.no_grad():
        yt = torch.as_tensor(target(xt)).reshape(-1, 1).to(torch.float32)
    xt = xt.to(torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(xt), yt)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    net.eval()
    return net, float(loss.detach())
