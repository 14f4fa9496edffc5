"""The hand-written PyTorch competitors of the benchmark, plus nbderiv itself.

Each competitor is a zero-argument callable over a prepared batch ``X`` (N, d_in) that
computes the per-point derivatives of order ``K`` the way a user would write it by hand,
and a (untimed) conversion of its result to the common layout (N, d_out) + (d_in,) * K.

Run as ``python -m doctest benchmarks/idioms_torch.py``:

>>> net = build_model([(np.ones((1, 4), np.float32), np.zeros(4, np.float32)),
...                    (np.ones((4, 1), np.float32), np.zeros(1, np.float32))])
>>> X = torch.zeros(3, 1)
>>> [c.name for c in competitors(net, X, 2)][:3]
['forward', 'autograd.grad nested', 'func.vmap(hessian)']
>>> nested_autograd(net, X, 1)[:, 0, 0].tolist()  # 4 units of tanh'(0) = 1
[4.0, 4.0, 4.0]
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
from competitor import Competitor, from_multi
from torch import func

FRAMEWORK = "torch"


# -- models -------------------------------------------------------------------------------
def build_model(weights, device="cpu", dtype=torch.float32):
    """An nn.Sequential tanh MLP from [(kernel (in, out), bias (out,)), ...] numpy weights."""
    layers = []
    for i, (kernel, bias) in enumerate(weights):
        lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(kernel.T.copy()))
            lin.bias.copy_(torch.as_tensor(bias))
        layers.append(lin)
        if i + 1 < len(weights):
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype).eval()


def set_threads(n: int):
    """``n`` intra-op threads (0: PyTorch's default)."""
    if n:
        torch.set_num_threads(n)


def check_device(device):
    """Refuse a CUDA device that this torch build or machine does not have."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device here.")


def as_tensor(x: np.ndarray, device="cpu"):
    return torch.as_tensor(x).to(device)


def synchronizer(device):
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


# -- the idioms ---------------------------------------------------------------------------
def forward(model, X):
    with torch.no_grad():
        return model(X)


def nested_autograd(model, X, K):
    """The Q&A idiom: torch.autograd.grad with grad_outputs=ones and create_graph=True,
    nested K times; one backward pass per output column and per input column below."""
    X = X.detach().requires_grad_(True)
    Y = model(X)
    d_out, d_in = Y.shape[1], X.shape[1]
    level = [Y] if d_out == 1 else list(Y.unbind(1))
    for k in range(K):
        create = k + 1 < K
        nxt = []
        for T in level:
            g = torch.autograd.grad(T, X, grad_outputs=torch.ones_like(T),
                                    create_graph=create, retain_graph=True)[0]
            nxt.extend([g] if d_in == 1 else g.unbind(1))
        level = nxt
    out = torch.cat(level, 1) if d_in == 1 and d_out == 1 else torch.stack(
        [t.reshape(-1) for t in level], 1)
    return out.reshape((X.shape[0], d_out) + (d_in,) * K)


def _single(model):
    return lambda x: model(x.unsqueeze(0)).squeeze(0)


def vmap_nested(model, X, transforms):
    """vmap(t1(t2(...(f)))) for per-point f: R^d_in -> R^d_out; transforms innermost last."""
    g = _single(model)
    for t in reversed(transforms):
        g = t(g)
    return func.vmap(g)(X)


def nested_jvp(model, X, K):
    """Batched nested torch.func.jvp along one-hot input directions (forward mode with the
    per-point trick): one chain per distinct multi-index of the order-K partials."""
    X = X.detach()
    d_in = X.shape[1]
    basis = []
    for i in range(d_in):
        e = torch.zeros_like(X)
        e[:, i] = 1
        basis.append(e)
    out = {}
    for idx in itertools.combinations_with_replacement(range(d_in), K):
        g = model
        for i in idx:
            g = (lambda f, v: (lambda z: func.jvp(f, (z,), (v,))[1]))(g, basis[i])
        out[idx] = g(X)
    return out


def naive_full(model, X, K):
    """The naive full Jacobian of the whole batch, (N, d_out, N, d_in) (and its Jacobian
    again for K = 2), of which only the diagonal blocks are wanted; cost grows like N**(K+1)."""
    jac = torch.autograd.functional.jacobian
    idx = torch.arange(X.shape[0], device=X.device)
    if K == 1:
        J = jac(model, X)
        return J[idx, :, idx, :]

    def diag_jacobian(Z):
        J = jac(model, Z, create_graph=True)
        return J[idx, :, idx, :]

    H = jac(diag_jacobian, X)                    # (N, d_out, d_in, N, d_in)
    return H[idx, :, :, idx, :]


def nested_vectors(d_out, d_in, K):
    """Copies of the activations that nested reverse mode keeps alive: the forward graph,
    and every graph built with create_graph=True (one per output and partial below K)."""
    return 2 + sum(3 * d_out * d_in ** k for k in range(K - 1))


def naive_units(n, d_out, d_in, K):
    """Rough cost of :func:`naive_full` in forward passes over the batch: one backward pass
    (about 2 forward passes) per output entry, and for K = 2 one per entry again through a
    graph that holds N * d_out backward passes."""
    inner = 2.0 * n * d_out
    return inner if K == 1 else 3 * inner + 2.0 * inner * n * d_out * d_in


# -- layouts ------------------------------------------------------------------------------
def _numpy(t):
    return t.detach().cpu().numpy()


def _from_multi(values, n, d_out, d_in, K):
    return from_multi(values, n, d_out, d_in, K, to_numpy=_numpy)


# -- the list -----------------------------------------------------------------------------
def competitors(model, X, K, device="cpu", nbderiv_module=None):
    """The competitors for order K on batch X (a tensor on ``device``)."""
    n, d_in = X.shape
    with torch.no_grad():
        d_out = model(X[:2]).shape[1]
    hidden = sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    # bytes per point and per propagated vector: hidden activations, saved values, (co)tangents
    act = 4 * 4 * (hidden - d_out + d_in)

    def per_vectors(vectors):
        return lambda m: m * vectors * act

    sync = synchronizer(device)
    std = _numpy
    c = [Competitor("forward", "forward", lambda: forward(model, X), None, sync=sync),
         Competitor("autograd.grad nested", "idiom", lambda: nested_autograd(model, X, K), std,
                    sync=sync, bytes_at=per_vectors(nested_vectors(d_out, d_in, K)))]
    if K == 1:
        c += [Competitor("func.vmap(jacrev)", "idiom",
                         lambda: vmap_nested(model, X, [func.jacrev]), std, sync=sync,
                         bytes_at=per_vectors(d_out)),
              Competitor("func.vmap(jacfwd)", "idiom",
                         lambda: vmap_nested(model, X, [func.jacfwd]), std, sync=sync,
                         bytes_at=per_vectors(d_in))]
    else:
        fwd_rev = [func.jacfwd] * (K - 1) + [func.jacrev]
        name = "func.vmap(hessian)" if K == 2 else \
            "func.vmap(" + "jacfwd(" * (K - 1) + "jacrev" + ")" * K
        c += [Competitor(name, "idiom", lambda: vmap_nested(model, X, fwd_rev), std, sync=sync,
                         bytes_at=per_vectors(d_out * (2 * d_in) ** (K - 1)))]
        if K == 2:
            c += [Competitor("func.vmap(jacrev(jacrev))", "idiom",
                             lambda: vmap_nested(model, X, [func.jacrev, func.jacrev]), std,
                             sync=sync, bytes_at=per_vectors(d_out * d_out * d_in * 2))]
    c += [Competitor("func.jvp nested", "idiom", lambda: nested_jvp(model, X, K),
                     lambda v: _from_multi(v, n, d_out, d_in, K), sync=sync,
                     bytes_at=per_vectors(2 ** K))]
    if K <= 2:
        c += [Competitor("autograd.functional.jacobian (full)", "naive",
                         lambda: naive_full(model, X, K), std, scaling=K + 1, mem_scaling=2, sync=sync,
                         bytes_at=lambda m: 4.0 * m * m * d_out * d_in ** K * 3,
                         units_at=lambda m: naive_units(m, d_out, d_in, K))]
    if nbderiv_module is not None:
        c += [Competitor("nbderiv", "nbderiv",
                         lambda: nbderiv_module.derivatives(model, X, order=K, progress=False),
                         lambda d: d[K], sync=sync)]
    return c


# -- float64 truth ------------------------------------------------------------------------
def truth(model, X, K):
    """Order-K derivatives in float64 on a float64 copy of the model, by nested forward-mode
    torch.func.jacfwd per point: independent of nbderiv's algorithms. (N, d_out) + (d_in,)*K."""
    m64 = copy.deepcopy(model).to(torch.float64)
    g = _single(m64)
    for _ in range(K):
        g = func.jacfwd(g)
    return _numpy(func.vmap(g)(X.detach().to(torch.float64)))


def device_peak_reset(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def device_peak_mb(device):
    """Peak memory allocated on the accelerator (MB), or None on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def versions() -> dict:
    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
    return out
