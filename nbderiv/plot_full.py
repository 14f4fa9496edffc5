"""The cross-sample Jacobian as an image: :func:`draw_jacobian` and :func:`plot_jacobian`.

:func:`draw_jacobian` draws an array it is given; :func:`plot_jacobian` is the thin
compute-then-draw function (:func:`nbderiv.full_jacobian`, then :func:`draw_jacobian`).
Both are importable from :mod:`nbderiv.plot` too.

>>> import numpy as np
>>> J = np.eye(3).reshape(3, 1, 3, 1)          # (N, d_out, N, d_in): independent points
>>> fig = draw_jacobian(J)
>>> fig.coupled, fig.panels["jacobian"].images[0].get_array().shape
(False, (3, 3))
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize

from .errors import OptionError
from .plot_figure import panels_for, remember

_GRID_MAX_POINTS = 30   # draw_jacobian draws every block boundary up to this many points


def count_points(x) -> int | None:
    """The number of points N in ``x`` (its first axis; a tuple's first member), or None
    when it has no length. Reads shapes only: computes nothing."""
    first = x[0] if isinstance(x, tuple) and x else x
    shape = getattr(first, "shape", None)
    if shape is not None:
        return 1 if len(shape) == 0 else int(shape[0])
    try:
        return len(first)
    except TypeError:
        return None


def plot_jacobian(model, x, *, framework=None, max_points=100, fig=None, ax=None, figsize=None):
    """Image of the cross-sample Jacobian ``J[n, j, m, i] = d y[n, j] / d x[m, i]``
    (from :func:`nbderiv.full_jacobian`) as an (N*d_out) x (N*d_in) matrix, point blocks
    marked. Independent points give a block-diagonal picture; models that couple points
    (e.g. BatchNorm in training mode) show off-diagonal blocks. Refuses N > ``max_points``.
    To draw a Jacobian you already have, use :func:`draw_jacobian`.

    >>> import torch, nbderiv
    >>> fig = nbderiv.plot_jacobian(torch.sin, torch.linspace(0, 1, 6))
    >>> fig.panels["jacobian"].images[0].get_array().shape
    (6, 6)
    """
    n = count_points(x)
    if n is not None and n > max_points:
        raise OptionError(
            f"plot_jacobian draws an (N*d_out) x (N*d_in) image and N={n} points is too many to "
            f"see (max_points={max_points}). Fix: pass a few points, e.g. x[:20], or raise "
            "max_points=.")
    from .api import full_jacobian

    J = full_jacobian(model, x, framework=framework)
    return draw_jacobian(J, fig=fig, ax=ax, figsize=figsize)


def draw_jacobian(J, *, fig=None, ax=None, figsize=None):
    """Draw a cross-sample Jacobian ``J`` of shape (N, d_out, N, d_in) as an
    (N*d_out) x (N*d_in) image with the point blocks marked; returns the Figure.

    ``fig.coupled`` is True when an off-diagonal block (n != m) holds a value above 1e-6 of
    the largest diagonal one, and the title says which case it is.
    """
    J = np.asarray(J, dtype=np.float64)
    if J.ndim != 4 or J.shape[0] != J.shape[2]:
        raise OptionError(f"draw_jacobian needs a cross-sample Jacobian of shape (N, d_out, N, "
                          f"d_in), got shape {J.shape}. Fix: pass nbderiv.full_jacobian(model, x).")
    N, d_out, _, d_in = J.shape
    M = J.reshape(N * d_out, N * d_in)
    on = np.zeros(M.shape, dtype=bool)
    for p in range(N):
        on[p * d_out:(p + 1) * d_out, p * d_in:(p + 1) * d_in] = True
    m_on = float(np.nanmax(np.abs(M[on]), initial=0.0))
    m_off = float(np.nanmax(np.abs(M[~on]), initial=0.0))
    height = min(max(1.8 + 4.0 * M.shape[0] / M.shape[1], 2.6), 6.5)
    fig, ((_, axis),) = panels_for(fig, ax, ["jacobian"], figsize or (5.6, height), 1, 1)
    scale = max(m_on, m_off) or 1.0
    image = axis.imshow(M, cmap="RdBu_r", norm=Normalize(-scale, scale), interpolation="nearest",
                        aspect="auto")
    fig.colorbar(image, ax=axis, label=r"$\partial y_{n,j} / \partial x_{m,i}$")
    _mark_blocks(axis, N, d_out, d_in)
    coupled = m_off > 1e-6 * max(m_on, 1e-30)
    if coupled:
        verdict = (f"off-diagonal blocks: points are coupled\n(max |J| {m_off:.2g} off the "
                   f"point blocks, {m_on:.2g} on them)")
    else:
        verdict = "block diagonal: points are independent"
    axis.set_title(f"cross-sample Jacobian, N={N}\n{verdict}", fontsize=10)
    axis.set_xlabel("input: point m" + (f" x {d_in} features" if d_in > 1 else ""))
    axis.set_ylabel("output: point n" + (f" x {d_out} outputs" if d_out > 1 else ""))
    remember(fig, "jacobian", axis)
    fig.coupled = coupled
    return fig


def _mark_blocks(axis, N, d_out, d_in):
    """Outline the diagonal (n == m) blocks; draw every block boundary for small N."""
    from matplotlib.patches import Rectangle

    if N <= _GRID_MAX_POINTS and N > 1:
        for p in range(1, N):
            axis.axhline(p * d_out - 0.5, color="0.8", lw=0.5)
            axis.axvline(p * d_in - 0.5, color="0.8", lw=0.5)
    for p in range(N):
        axis.add_patch(Rectangle((p * d_in - 0.5, p * d_out - 0.5), d_in, d_out, fill=False,
                                 edgecolor="0.2", lw=0.8 if N <= _GRID_MAX_POINTS else 0.4))
    if N <= 20:
        axis.set_xticks([p * d_in + (d_in - 1) / 2 for p in range(N)], [str(p) for p in range(N)])
        axis.set_yticks([p * d_out + (d_out - 1) / 2 for p in range(N)],
                        [str(p) for p in range(N)])
