"""The figure every nbderiv plot draws on, its panels, legends and mathtext labels.

Shared by :mod:`nbderiv.plot` (curves and heatmaps) and :mod:`nbderiv.plot_full` (the
cross-sample Jacobian). Figures are built on ``matplotlib.figure.Figure`` directly (never
pyplot), so nothing is registered globally, nothing is shown behind your back, and nothing
leaks; a figure displays itself as PNG in a notebook (``_repr_png_``).

>>> fig, [(key, axis)] = panels_for(None, None, ["jacobian"], (3, 2), 1, 1)
>>> remember(fig, key, axis)
>>> list(fig.panels), fig.to_png()[:4]
(['jacobian'], b'\\x89PNG')
"""

from __future__ import annotations

import io
import re

import numpy as np
from matplotlib.figure import Figure

from .errors import OptionError


class NbderivFigure(Figure):
    """A ``Figure`` that renders itself as PNG in IPython and remembers its panels.

    ``fig.panels`` maps what a panel shows to its Axes: the order ``k`` for curves,
    ``(k, (p, ...))`` (order, wrt positions) for heatmaps, ``"jacobian"`` for the Jacobian.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.panels = {}

    def to_png(self, dpi=None) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=dpi or self.dpi, metadata={"Software": None})
        return buf.getvalue()

    def _repr_png_(self):
        return self.to_png()


# -- labels ------------------------------------------------------------------------------
def tex_name(name: str) -> str:
    """An input's name as mathtext: ``x`` -> ``x``, ``x[1]`` -> ``x_{1}``, ``arg0`` -> roman."""
    m = re.fullmatch(r"(\w+)\[(\d+)\]", name)
    base, sub = (m.group(1), m.group(2)) if m else (name, None)
    if not re.fullmatch(r"[A-Za-z]", base):
        base = r"\mathrm{" + base.replace("_", r"\_") + "}"
    return base + (f"_{{{sub}}}" if sub is not None else "")


def _power(k: int) -> str:
    return "" if k == 1 else (f"^{k}" if k < 10 else f"^{{{k}}}")


def derivative_label(k: int, names, y: str = "y") -> str:
    """``$\\partial^2 y/\\partial x^2$`` for the k-th partial w.r.t. ``names`` (one per
    differentiation, repeats allowed); ``$y$`` for k = 0."""
    if k == 0:
        return f"${y}$"
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    below = r"\,".join(r"\partial " + tex_name(n) + _power(c) for n, c in counts.items())
    return rf"$\partial{_power(k)} {y}/{below}$"


# -- panels --------------------------------------------------------------------------------
def panels_for(fig, ax, cells, figsize, nrows, ncols, sharex=False):
    """(figure, [(cell, Axes)]) for the non-None ``cells`` laid out nrows x ncols (None: an
    empty slot), on a new :class:`NbderivFigure` unless ``fig`` is given.

    With ``ax`` (one Axes or a sequence) the panels go there instead, one per cell."""
    used = [c for c in cells if c is not None]
    if ax is not None:
        axes = [ax] if not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
        if len(axes) != len(used):
            raise OptionError(f"ax holds {len(axes)} Axes but this plot has {len(used)} "
                              "panel(s). Fix: pass that many Axes, or leave ax=None.")
        return axes[0].figure, list(zip(used, axes, strict=True))
    if fig is None:
        fig = NbderivFigure(figsize=figsize, layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex)
    pairs = []
    for cell, axis in zip(cells, grid.ravel(), strict=True):
        if cell is None:
            axis.set_visible(False)
        else:
            pairs.append((cell, axis))
    return fig, pairs


def remember(fig, key, axis):
    """Record ``axis`` as ``fig.panels[key]`` (any Figure: one given by the caller too)."""
    if not hasattr(fig, "panels"):
        fig.panels = {}
    fig.panels[key] = axis


def legend_above(fig, top, handles, labels, ncols):
    """A legend above the top panel: outside the axes with constrained layout, else just
    above ``top`` (the caller leaves room for it)."""
    ncols = min(len(labels), ncols)
    engine = type(fig.get_layout_engine()).__name__
    if engine == "ConstrainedLayoutEngine":
        fig.legend(handles, labels, fontsize="small", ncols=ncols, loc="outside upper center")
    else:
        top.legend(handles, labels, fontsize="small", ncols=ncols, loc="lower center",
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
