"""Matplotlib pictures of per-point derivatives: :func:`plot_derivatives` (curves along one
input, heatmaps over two) and :func:`plot_comparison` (several results on shared panels).

Only the plotting modules import matplotlib: this one, :mod:`nbderiv.plot_figure` (the
figure, its panels and labels) and :mod:`nbderiv.plot_full` (the cross-sample Jacobian;
its :func:`plot_jacobian` and :func:`draw_jacobian` are importable from here too). Figures
are built on ``matplotlib.figure.Figure`` directly (never pyplot), so nothing is registered
globally, nothing is shown behind your back, and nothing leaks; a figure displays itself as
PNG in a notebook (``_repr_png_``) even when pyplot was never imported. Plots draw the
results they are given; the one exception is a ``reference`` given as a callable, which is
differentiated at the result's points (:func:`nbderiv.reference_views.reference_derivatives`).

>>> import torch, nbderiv
>>> d = nbderiv.derivatives(torch.sin, torch.linspace(-3, 3, 50), order=2)
>>> fig = nbderiv.plot_derivatives(d)
>>> [ax.get_ylabel() for ax in fig.panels.values()]
['$y$', '$\\\\partial y/\\\\partial x$', '$\\\\partial^2 y/\\\\partial x^2$']
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.colors import Normalize

from .errors import OptionError
from .options import is_int
from .plot_figure import (
    NbderivFigure,
    derivative_label,
    legend_above,
    panels_for,
    remember,
    tex_name,
)
from .plot_full import count_points, draw_jacobian, plot_jacobian
from .reference_views import reference_derivatives
from .result import Derivatives

__all__ = ["NbderivFigure", "count_points", "derivative_label", "draw_jacobian", "grid_of",
           "plot_comparison", "plot_derivatives", "plot_jacobian", "tex_name"]


# -- labels --------------------------------------------------------------------------------
def _output_symbol(d: Derivatives, j: int) -> str:
    return "y" if d.n_outputs == 1 else f"y_{{{j}}}"


# -- argument handling ----------------------------------------------------------------------
def _feature_position(d: Derivatives, i) -> int:
    """Position in ``d.wrt`` of input feature ``i`` (an index into ``d.x``'s columns)."""
    if not is_int(i):
        raise OptionError(f"wrt entries must be input indices (ints), got {i!r}. Fix: e.g. wrt=0.")
    width = d.features.shape[1]
    if not -width <= i < width:
        raise OptionError(f"wrt={i} is out of range: x has {width} input(s). "
                          f"Fix: use 0..{width - 1}.")
    i = int(i) % width
    if i not in d.wrt:
        raise OptionError(
            f"input {d.all_inputs[i]} (index {i}) was not differentiated: this result holds "
            f"wrt={list(d.wrt)}. Fix: plot one of those, or recompute with wrt=[{i}].")
    return d.wrt.index(i)


def _plotted_positions(d: Derivatives, wrt) -> tuple:
    if wrt is None:
        if len(d.wrt) > 2:
            raise OptionError(
                f"this result has {len(d.wrt)} differentiated inputs ({', '.join(d.inputs)}); a "
                "plot shows one (curves) or two (heatmaps). Fix: pass wrt=i for curves along "
                "input i, or wrt=(i, j) for heatmaps over inputs i and j.")
        return tuple(range(len(d.wrt)))
    items = [wrt] if isinstance(wrt, (int, np.integer)) else list(wrt)
    if not 1 <= len(items) <= 2:
        raise OptionError(f"wrt must name one or two inputs, got {wrt!r}. Fix: wrt=0 or wrt=(0, 1).")
    pos = tuple(_feature_position(d, i) for i in items)
    if len(set(pos)) != len(pos):
        raise OptionError(f"wrt names the same input twice ({wrt!r}). Fix: wrt=(0, 1).")
    return pos


def _orders(d: Derivatives, orders) -> list:
    if orders is None:
        return list(range(d.order + 1))
    items = [orders] if isinstance(orders, (int, np.integer)) else list(orders)
    for k in items:
        if not is_int(k) or not 0 <= k <= d.order:
            raise OptionError(f"orders must be ints in 0..{d.order} (computed orders), got {k!r}. "
                              f"Fix: e.g. orders=[0, 1, 2], or recompute with a higher order.")
    if not items:
        raise OptionError("orders is empty. Fix: e.g. orders=[0, 1].")
    return sorted(set(int(k) for k in items))


def _outputs(d: Derivatives, output) -> list:
    if output is None:
        return list(range(d.n_outputs))
    items = [output] if isinstance(output, (int, np.integer)) else list(output)
    for j in items:
        if not is_int(j) or not 0 <= j < d.n_outputs:
            raise OptionError(f"output must be in 0..{d.n_outputs - 1}, got {j!r}. "
                              "Fix: pick one of the model's outputs.")
    return [int(j) for j in items]


def _by_output(a, k: int, n_outputs: int) -> np.ndarray:
    """``a`` ((N,) + O + (m,) * k, O each point's output shape) as (N, d_out) + (m,) * k:
    an output of several axes (a decoder's (2, 2)) counted flat, in C order."""
    a = np.asarray(a)
    return a.reshape((a.shape[0], n_outputs) + a.shape[a.ndim - k:])


def _pure(a: np.ndarray, k: int, p: int, n_outputs: int | None = None) -> np.ndarray:
    """The pure k-th partial along wrt position p: (N, d_out)."""
    if n_outputs is not None:
        a = _by_output(a, k, n_outputs)
    return a if k == 0 else a[(slice(None), slice(None)) + (p,) * k]


def _output_name(d: Derivatives, j: int) -> str:
    """``y[j]``, or ``y[0,1]`` for an output of several axes."""
    if len(d.out_shape) > 1:
        return "y[" + ",".join(str(int(i)) for i in np.unravel_index(j, d.out_shape)) + "]"
    return f"y[{j}]"


def _reference_values(d: Derivatives, reference, orders, p) -> dict:
    """{k: (N, d_out) array} of the reference's pure partials along wrt position p."""
    if reference is None:
        return {}
    if callable(reference) and not isinstance(reference, Derivatives):
        # the true function: differentiated along the plotted input only, by the framework's
        # autodiff where it works there, else (a NumPy function) by float64 central differences
        truths, _ = reference_derivatives(reference, d.features, max(orders), [d.wrt[p]],
                                          d.framework)
        columns = {k: truths[k].reshape(d.n_points, -1) for k in orders}
        _same_outputs(d, next(iter(columns.values())).shape[1])
        return {k: np.broadcast_to(a, (d.n_points, d.n_outputs)) for k, a in columns.items()}
    if isinstance(reference, Derivatives):
        if reference.n_points != d.n_points:
            raise OptionError(f"the reference has {reference.n_points} points, the result "
                              f"{d.n_points}. Fix: compute both at the same x.")
        _same_outputs(d, reference.n_outputs)
        return {k: np.broadcast_to(_pure(np.asarray(reference[k]), k, p, reference.n_outputs),
                                   (d.n_points, d.n_outputs))
                for k in orders if k <= reference.order}
    if not isinstance(reference, Mapping):
        raise OptionError(
            f"reference must be a callable (the true function), a Derivatives, or a dict "
            f"{{k: values}}, got {type(reference).__name__}. Fix: e.g. reference=torch.sin.")
    out = {}
    for k, values in reference.items():
        if k not in orders:
            continue
        a = np.asarray(values, dtype=np.float64)
        if a.shape == d[k].shape:
            a = _pure(a, k, p, d.n_outputs)
        elif a.shape == (d.n_points,):
            a = a.reshape(-1, 1)
        if a.ndim != 2 or a.shape[0] != d.n_points or a.shape[1] not in (1, d.n_outputs):
            raise OptionError(
                f"reference[{k}] has shape {np.shape(values)}; expected ({d.n_points},), "
                f"({d.n_points}, {d.n_outputs}) or {d[k].shape}. Fix: give one value per point.")
        out[k] = np.broadcast_to(a, (d.n_points, d.n_outputs))
    return out


def _same_outputs(d: Derivatives, n_outputs: int) -> None:
    if n_outputs not in (1, d.n_outputs):
        raise OptionError(f"the reference has {n_outputs} outputs, the model {d.n_outputs}. "
                          f"Fix: give one output (compared with each) or {d.n_outputs}.")


def _fd_values(d: Derivatives, orders, p) -> dict:
    ref = getattr(d.check, "reference", None) or {}
    if not ref:
        raise OptionError("fd=True draws the finite-difference check, but this result has none. "
                          "Fix: compute it with nbderiv.derivatives(..., check=True).")
    return {k: _pure(np.asarray(ref[k]), k, p, d.n_outputs) for k in orders if k in ref}


# -- curves (one input) ---------------------------------------------------------------------
def plot_derivatives(d: Derivatives, *, output=None, orders=None, wrt=None, reference=None,
                     fd=False, fig=None, ax=None, figsize=None, points=None, channel_axis=None,
                     kind=None):
    """Plot y and its derivatives; returns the Figure (never shows it).

    One differentiated input (or ``wrt=i``): one panel per order against x (points sorted,
    one line per output, legend ``y[j]``), with optional overlays: ``reference`` (a callable
    for the true function of x, differentiated at the same points: by the framework's
    autodiff when it works there, e.g. ``torch.sin``, else, a NumPy function such as
    ``np.sin``, by float64 central differences; see
    :func:`nbderiv.reference_views.reference_derivatives`; a ``Derivatives``; or a dict
    ``{k: values (N,) or (N, d_out)}``) and ``fd=True`` (``d.check.reference``).
    Two inputs (or ``wrt=(i, j)``): heatmaps of y and each partial of the given ``orders``
    for one ``output`` (default 0), on the grid when the points form one, else scattered.
    Images and sequences (``len(d.in_shape)`` 3 or 2): saliency maps of the first ``points``
    points, see :func:`nbderiv.plot_maps.plot_saliency` (``channel_axis`` and ``kind`` too:
    ``kind="image"`` draws (H, W) points, MNIST without a channel axis, as images).

    >>> import torch, nbderiv
    >>> d = nbderiv.derivatives(torch.tanh, torch.linspace(-2, 2, 41), order=2, check=True)
    >>> fig = d.plot(reference=torch.tanh, fd=True)
    >>> [line.get_label() for line in fig.panels[2].lines]
    ['network', 'reference', 'finite differences']
    """
    if not isinstance(d, Derivatives):
        raise OptionError(f"plot_derivatives needs a Derivatives (from nbderiv.derivatives), got "
                          f"{type(d).__name__}.")
    if len(d.in_shape) > 1:  # each point an image or a sequence: saliency maps
        if wrt is not None or reference is not None or fd:
            raise OptionError("wrt=, reference= and fd= belong to curves and heat maps of vector "
                              f"inputs; this result's points have shape {d.in_shape} (saliency "
                              "maps). Fix: leave them out, or index d[1] yourself.")
        from .plot_maps import plot_saliency

        return plot_saliency(d, points=points, output=output, orders=orders,
                             channel_axis=channel_axis, fig=fig, ax=ax, figsize=figsize,
                             kind=kind)
    if points is not None or channel_axis is not None or kind is not None:
        raise OptionError("points=, channel_axis= and kind= belong to saliency maps (a result "
                          "whose points are images or sequences). Fix: leave them out.")
    positions = _plotted_positions(d, wrt)
    ks = _orders(d, orders)
    if len(positions) == 2:
        if reference is not None or fd:
            raise OptionError("reference= and fd= overlays are drawn on curves (one input). "
                              "Fix: pass wrt=i to plot along one input, or compare the arrays.")
        j = _outputs(d, 0 if output is None else output)
        if len(j) != 1:
            raise OptionError("heatmaps show one output at a time. Fix: pass output=j.")
        return _heatmaps(d, positions, ks, j[0], fig, ax, figsize)
    return _curves(d, positions[0], ks, _outputs(d, output), reference, fd, fig, ax, figsize)


def _curves(d, p, ks, outputs, reference, fd, fig, ax, figsize):
    feature = d.wrt[p]
    name = d.inputs[p]
    xs = d.features[:, feature].astype(np.float64)
    idx = np.argsort(xs, kind="stable")
    xs = xs[idx]
    others = [i for i in range(d.features.shape[1]) if i != feature]
    on_a_line = all(np.ptp(d.features[:, i]) == 0 for i in others)
    refs = _reference_values(d, reference, ks, p)
    fds = _fd_values(d, ks, p) if fd else {}
    fig, pairs = panels_for(fig, ax, ks, figsize or (6.4, 1.2 + 1.7 * len(ks)), len(ks), 1,
                         sharex=True)
    axes = [axis for _, axis in pairs]
    multi = d.n_outputs > 1
    for k, axis in pairs:
        values = _pure(d[k], k, p, d.n_outputs)
        for j in outputs:
            color = f"C{j % 10}"
            tag = f"{_output_name(d, j)} " if multi else ""
            style = dict(color=color, lw=1.8) if on_a_line else dict(color=color, ls="", marker=".")
            axis.plot(xs, values[idx, j], label=(_output_name(d, j) if multi else "network"),
                      **style)
            if k in refs:
                axis.plot(xs, refs[k][idx, j], ls="--", lw=1.4, color="black" if not multi
                          else color, alpha=0.8, label=tag + "reference")
            if k in fds:
                axis.plot(xs, fds[k][idx, j], ls="", marker="o", ms=3.5, mfc="none",
                          color="0.35" if not multi else color,
                          markevery=max(1, len(xs) // 40), label=tag + "finite differences")
        _note_non_finite(axis, values[:, list(outputs)])
        # one output of several drawn: its own name (y_1), not plain y
        ysym = f"y_{{{outputs[0]}}}" if multi and len(outputs) == 1 else "y"
        axis.set_ylabel(derivative_label(k, [name] * k, y=ysym))
        axis.grid(alpha=0.3)
        remember(fig, k, axis)
    axes[-1].set_xlabel(f"${tex_name(name)}$")
    handles, labels = {}, []
    for axis in axes:
        for h, lab in zip(*axis.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if len(labels) > 1:
        legend_above(fig, axes[0], [handles[lab] for lab in labels], labels, 3)
    return fig


# -- heatmaps (two inputs) -----------------------------------------------------------------------
def grid_of(a: np.ndarray, b: np.ndarray):
    """(ua, ub, ia, ib) when the points (a, b) are a full grid (each pair once), else None."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    if len(ua) < 2 or len(ub) < 2 or len(ua) * len(ub) != len(a):
        return None
    seen = np.zeros((len(ub), len(ua)), dtype=bool)
    seen[ib, ia] = True
    return (ua, ub, ia, ib) if seen.all() else None


def _heatmaps(d, positions, ks, j, fig, ax, figsize):
    pa, pb = positions
    fa, fb = d.wrt[pa], d.wrt[pb]
    a, b = d.features[:, fa].astype(np.float64), d.features[:, fb].astype(np.float64)
    others = [i for i in range(d.features.shape[1]) if i not in (fa, fb)]
    grid = grid_of(a, b) if all(np.ptp(d.features[:, i]) == 0 for i in others) else None
    rows = []
    for k in ks:
        if k == 0:
            rows.append([(0, ())])
        else:
            rows.append([(k, tuple([pa] * (k - c) + [pb] * c)) for c in range(k + 1)])
    ncols = max(len(r) for r in rows)
    cells = [cell for r in rows for cell in r + [None] * (ncols - len(r))]
    fig, pairs = panels_for(fig, ax, cells, figsize or (3.3 * ncols, 2.8 * len(rows)),
                         len(rows), ncols)
    symbol = _output_symbol(d, j)
    for (k, multi), axis in pairs:
        values = np.asarray(_by_output(d[k], k, d.n_outputs)[(slice(None), j) + multi],
                            dtype=np.float64)
        if k == 0:
            norm, cmap = Normalize(*_finite_range(values)), "viridis"
        else:
            finite = np.abs(values[np.isfinite(values)])
            m = float(finite.max(initial=0.0)) or 1.0
            norm, cmap = Normalize(-m, m), "RdBu_r"
        if grid is not None:
            ua, ub, ia, ib = grid
            Z = np.full((len(ub), len(ua)), np.nan)
            Z[ib, ia] = values
            art = axis.pcolormesh(ua, ub, Z, shading="nearest", cmap=cmap, norm=norm)
        else:
            art = axis.scatter(a, b, c=values, s=12, cmap=cmap, norm=norm, edgecolors="none")
        fig.colorbar(art, ax=axis, shrink=0.9)
        _note_non_finite(axis, values)
        axis.set_title(derivative_label(k, [d.inputs[q] for q in multi], symbol), fontsize=10)
        axis.set_xlabel(f"${tex_name(d.inputs[pa])}$")
        axis.set_ylabel(f"${tex_name(d.inputs[pb])}$")
        remember(fig, (k, multi), axis)
    return fig


def _note_non_finite(axis, values) -> None:
    """A red note in the panel's corner where some points' values are NaN or inf: a plot
    leaves them out (a gap in a curve, a blank cell), which would otherwise pass unseen."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    bad = int((~np.isfinite(values)).any(axis=1).sum())
    if bad:
        axis.text(0.01, 0.98, f"NaN/inf at {bad} point{'s' if bad > 1 else ''}: not drawn",
                  transform=axis.transAxes, ha="left", va="top", fontsize=8, color="C3")


def _finite_range(values):
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


# -- several models on shared panels --------------------------------------------------------------
def plot_comparison(x, curves: dict, truth=None, *, orders=(0, 1, 2), fig=None, ax=None,
                    figsize=None):
    """Overlay several one-input results on shared panels (one per order), truth dashed.

    ``curves`` maps a label to a :class:`Derivatives` computed at the points ``x`` (N,);
    ``truth`` maps an order to its true values (N,). Used by
    :func:`nbderiv.compare_activations`; ``fig.panels[k]`` is the panel of order k.

    >>> import numpy as np, torch, nbderiv
    >>> x = np.linspace(0, 1, 5).reshape(-1, 1)
    >>> d = nbderiv.derivatives(torch.sin, x, order=1, framework="torch")
    >>> fig = plot_comparison(x[:, 0], {"sin": d}, {1: np.cos(x[:, 0])}, orders=(1,))
    >>> [line.get_label() for line in fig.panels[1].lines]
    ['sin', 'truth']
    """
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    idx = np.argsort(xs, kind="stable")
    ks = list(orders)
    fig, pairs = panels_for(fig, ax, ks, figsize or (6.4, 1.2 + 1.9 * len(ks)), len(ks), 1,
                         sharex=True)
    truth = truth or {}
    for k, axis in pairs:
        for c, (label, d) in enumerate(curves.items()):
            if k > d.order:
                raise OptionError(f"{label!r} holds orders up to {d.order}, not {k}.")
            values = np.asarray(d[k])[(slice(None), 0) + (0,) * k]
            axis.plot(xs[idx], values[idx], color=f"C{c % 10}", lw=1.8, label=label)
        if k in truth:
            axis.plot(xs[idx], np.asarray(truth[k], dtype=np.float64).reshape(-1)[idx], ls="--",
                      color="black", lw=1.4, label="truth")
        axis.set_ylabel(derivative_label(k, ["x"] * k))
        axis.grid(alpha=0.3)
        remember(fig, k, axis)
    pairs[-1][1].set_xlabel("$x$")
    handles, labels = pairs[0][1].get_legend_handles_labels()
    if labels:
        legend_above(fig, pairs[0][1], handles, labels, 4)
    return fig
