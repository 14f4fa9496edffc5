"""Saliency maps: input gradients of images and sequences drawn as pictures.

:func:`plot_saliency` (also what ``d.plot()`` draws when each point is an image or a
sequence, and what ``%nnderiv model images --plot`` shows) puts each point's input beside
``|∂y/∂x|``, the size of the derivative of one output with respect to every input value:

- **images** (3 axes per point: torch ``(C, H, W)``, Keras ``(H, W, C)``): the image, and
  ``|∂y/∂x|`` per pixel with the channels reduced by their maximum (as Captum's
  ``visualize_image_attr`` does), one column per point;
- **images of one channel** (2 axes per point, ``(H, W)``, square, 8 x 8 or more: MNIST's
  ``(28, 28)``; ``kind="image"`` for others): drawn as gray images;
- **sequences** (2 axes per point, ``(T, F)``): time x feature heat maps of the input and of
  ``|∂y/∂x|``, drawn transposed (feature on the vertical axis, time step on the
  horizontal: the array shown is ``|d[1][n, j]|.T``, shape (F, T)), one row per point; points
  a Conv1d receives, ``(C, L)``, are drawn as they are (channel vertical, position horizontal).

Order 1 is drawn unless ``orders=`` asks for more; order k >= 2 draws the size of the pure
partials ``|∂^k y/∂x_i^k|`` per input value (the diagonal of d[k]). ``fig.panels`` maps
``("input", n)`` and ``(k, n)`` (order k at point n) to their Axes; each saliency panel
shows the reduced array itself (``panel.images[0].get_array()``).

>>> import numpy as np
>>> from nbderiv.result import Derivatives
>>> g = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 1, 3, 4, 5)  # (N, d_out, C, H, W)
>>> d = Derivatives(x=np.zeros((2, 60)), y=np.zeros((2, 1)), orders=[g.reshape(2, 1, 60)],
...                 framework="torch", method="reverse-ones")
>>> d._present((1,), (3, 4, 5))
>>> fig = plot_saliency(d)
>>> sorted(fig.panels, key=str)
[('input', 0), ('input', 1), (1, 0), (1, 1)]
>>> np.array_equal(fig.panels[1, 0].images[0].get_array(), np.abs(g[0, 0]).max(axis=0))
True
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator

from .errors import OptionError
from .options import is_int
from .plot_figure import panels_for, remember
from .result import Derivatives

__all__ = ["channel_axis_of", "plot_saliency", "saliency_map"]

DEFAULT_POINTS = 6
_CHANNEL_SIZES = (1, 3, 4)


def channel_axis_of(shape, framework=None, channel_axis=None) -> int:
    """The channel axis (0..2) of an image's per-point shape: the axis of size 1, 3 or 4 at
    either end; when both ends (or neither) are, the framework's convention decides (torch
    ``(C, H, W)``: 0, Keras/TensorFlow ``(H, W, C)``: 2). ``channel_axis`` overrides.

    >>> channel_axis_of((3, 32, 32)), channel_axis_of((32, 32, 3)), channel_axis_of((3, 3, 3), "tensorflow")
    (0, 2, 2)
    """
    if channel_axis is not None:
        if not is_int(channel_axis) or not -3 <= channel_axis < 3:
            raise OptionError(f"channel_axis must be 0, 1, 2 or -1 (an axis of the image's "
                              f"shape {tuple(shape)}), got {channel_axis!r}. Fix: e.g. "
                              "channel_axis=0 for (C, H, W), -1 for (H, W, C).")
        return int(channel_axis) % 3
    first, last = shape[0] in _CHANNEL_SIZES, shape[-1] in _CHANNEL_SIZES
    if first != last:
        return 0 if first else 2
    return 2 if framework == "tensorflow" else 0


def saliency_map(d: Derivatives, n: int, *, output=0, order=1, channel_axis=None) -> np.ndarray:
    """``|∂^k y_j/∂x^k|`` of point ``n`` as an array of the input's per-point shape, channels
    reduced by their maximum for images: (H, W) for an image, (T, F) for a sequence.

    Order 1 is ``|d[1][n, j]|``; order k >= 2 the pure partials (the diagonal of d[k])."""
    g = _per_value(d, n, output, order)
    if len(d.in_shape) == 3:
        return np.abs(g).max(axis=channel_axis_of(d.in_shape, d.framework, channel_axis))
    return np.abs(g)


def plot_saliency(d: Derivatives, *, points=None, output=None, orders=None, channel_axis=None,
                  fig=None, ax=None, figsize=None, cmap="Blues", kind=None):
    """Saliency maps of an image or sequence result (see the module docstring); returns the
    Figure (never shows it).

    ``points``: how many of the first points (an int, default up to 6) or which (a list of
    indices). ``output``: the output drawn (a flat index into each point's outputs; default
    0, the target's output with ``target=``). ``orders``: the orders drawn (default 1).
    ``channel_axis``: the image's channel axis when the guess (size 1, 3 or 4 at one end,
    else the framework's convention) is wrong. ``kind``: how points of 2 axes are drawn,
    "sequence" (time x feature) or "image" (one channel, (H, W)); by default square ones of
    8 x 8 or more (MNIST's (28, 28)) are images, other ones sequences, and a Conv1d's
    (C, L) points sequences.

    >>> import torch, nbderiv
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 6 * 6, 2))
    >>> d = nbderiv.derivatives(cnn, torch.rand(4, 3, 8, 8), target=[0, 1, 0, 1])
    >>> fig = nbderiv.plot_saliency(d, points=2)
    >>> fig.panels[1, 1].images[0].get_array().shape
    (8, 8)
    """
    if not isinstance(d, Derivatives):
        raise OptionError(f"plot_saliency needs a Derivatives (from nbderiv.derivatives), got "
                          f"{type(d).__name__}.")
    rank = len(d.in_shape)
    if rank not in (2, 3):
        raise OptionError(
            f"saliency maps are drawn for images (3 axes per point) and sequences (2 axes per "
            f"point); this result's points have shape {d.in_shape}. Fix: "
            + ("index d[1] yourself, e.g. one frame t of a video (T, C, H, W): "
               "plt.imshow(np.abs(d[1][p, j, t]).max(axis=0)) is that frame's saliency for "
               "point p and output j; or compute with wrt= a few features to plot them as "
               "curves." if rank > 3 else
               "for vector inputs use d.plot(wrt=i) (curves) or d.plot(wrt=(i, j)) (heat "
               "maps), or index d[1] yourself."))
    chosen = _points(d, points)
    ks = _orders(d, orders)
    j = _output(d, output)
    if rank == 3:
        if kind not in (None, "image"):
            raise OptionError(f"kind={kind!r}: points of 3 axes {d.in_shape} are drawn as "
                              "images. Fix: leave kind out.")
        c = channel_axis_of(d.in_shape, d.framework, channel_axis)
        return _images(d, chosen, ks, j, c, cmap, fig, ax, figsize)
    if _drawn_as(d, kind) == "image":
        return _images(d, chosen, ks, j, None, cmap, fig, ax, figsize)
    return _sequences(d, chosen, ks, j, cmap, fig, ax, figsize)


def _drawn_as(d, kind) -> str:
    """How points of 2 axes are drawn: ``kind``, else "image" for square ones of 8 x 8 or
    more not fed to a Conv1d, else "sequence"."""
    if kind is None:
        h, w = d.in_shape
        square = h == w and h >= 8 and getattr(d, "_time_axis", 0) == 0
        return "image" if square else "sequence"
    if kind not in ("image", "sequence"):
        raise OptionError(f"kind must be 'image' or 'sequence', got {kind!r}. Fix: "
                          "kind='image' for (H, W) points, 'sequence' for (T, F).")
    return kind


# -- options ------------------------------------------------------------------------------
def _points(d, points) -> list:
    n = d.n_points
    if points is None:
        return list(range(min(DEFAULT_POINTS, n)))
    if is_int(points):
        if points < 1:
            raise OptionError(f"points must be 1 or more, got {points}. Fix: e.g. points=4.")
        return list(range(min(int(points), n)))
    items = list(np.ravel(points)) if not isinstance(points, (list, tuple)) else list(points)
    if not items:
        raise OptionError("points is empty. Fix: e.g. points=[0, 3].")
    for i in items:
        if not is_int(i) or not -n <= i < n:
            raise OptionError(f"points holds {i!r}, not a point index 0..{n - 1}. Fix: e.g. "
                              "points=[0, 3], or points=4 for the first four.")
    return [int(i) % n for i in items]


def _orders(d, orders) -> list:
    if orders is None:
        return [1]
    items = [orders] if is_int(orders) else list(orders)
    ks = sorted({int(k) for k in items if is_int(k) and k != 0})
    bad = [k for k in items if not is_int(k) or not 0 <= k <= d.order]
    if bad or not ks:
        raise OptionError(f"orders must be ints in 1..{d.order} (the computed orders; y is "
                          f"shown in each title), got {orders!r}. Fix: e.g. orders=[1, 2], or "
                          "recompute with a higher order.")
    return ks


def _output(d, output) -> int:
    if output is None:
        return 0
    if not is_int(output) or not 0 <= output < d.n_outputs:
        raise OptionError(f"output must be one output index in 0..{d.n_outputs - 1} (a flat "
                          f"index into each point's outputs of shape {d.out_shape}), got "
                          f"{output!r}. Fix: e.g. output=0, or compute with target=labels.")
    return int(output)


def _per_value(d, n, j, k) -> np.ndarray:
    """The k-th pure partials of output j at point n, one per input value: shape S."""
    if k == 1:
        return np.asarray(d[1][n], dtype=np.float64).reshape((d.n_outputs,) + d.in_shape)[j]
    size = int(np.prod(d.in_shape))
    a = np.asarray(d[k][n], dtype=np.float64).reshape((d.n_outputs,) + (size,) * k)[j]
    return a[(np.arange(size),) * k].reshape(d.in_shape)


# -- titles -------------------------------------------------------------------------------
def _y_text(d, n, j) -> str:
    y = np.asarray(d.y[n], dtype=np.float64).reshape(-1)[j]
    targets = getattr(d, "_targets", None)
    name = f"y[{int(targets[n])}]" if targets is not None else \
        "y" if d.n_outputs == 1 else f"y[{j}]"
    return f"{name} = {y:.3g}"


def _saliency_label(k, j, d) -> str:
    y = "y_{target}" if getattr(d, "_targets", None) is not None else \
        "y" if d.n_outputs == 1 else f"y_{{{j}}}"
    if k == 1:
        return rf"$|\partial {y}/\partial x|$"
    return rf"$|\partial^{k} {y}/\partial x^{k}|$"


# -- images -------------------------------------------------------------------------------
def _shown_image(x, c):
    """The point's image as drawn: (H, W, 3) RGB for 3 channels (rescaled to [0, 1] when
    its finite values leave that range; a NaN or inf value black), else (H, W) (one channel,
    the mean of the channels, or the point itself when ``c`` is None; non-finite values
    masked: drawn in the colour map's 'bad' colour)."""
    x = np.asarray(x, dtype=np.float64)
    if c is None:
        return np.ma.masked_invalid(x), "gray"
    hwc = np.moveaxis(x, c, -1)
    if hwc.shape[-1] == 3:
        kept = np.isfinite(hwc)
        lo = float(hwc[kept].min(initial=0.0))
        hi = float(hwc[kept].max(initial=0.0))
        if lo < 0 or hi > 1:
            hwc = (hwc - lo) / (hi - lo) if hi > lo else np.zeros_like(hwc)
        return np.where(kept, hwc, 0.0), None
    return np.ma.masked_invalid(hwc.mean(axis=-1)), "gray"


def _size_map(axis, values, cmap, **kwargs):
    """``values`` (sizes >= 0) drawn from 0 to their largest finite value, NaN and inf in
    red; returns (the image, its caption: "max 0.12", "all 0", "all NaN", "max 0.1, 3 NaN")."""
    bad = ~np.isfinite(values)
    largest = float(np.max(values[~bad], initial=0.0))
    colours = colormaps[cmap].with_extremes(bad="#d62728")
    art = axis.imshow(np.ma.masked_invalid(values), cmap=colours,
                      norm=Normalize(0.0, largest or 1.0), interpolation="nearest", **kwargs)
    n_bad = int(bad.sum())
    if n_bad == values.size:
        return art, "all NaN" if np.isnan(values).all() else "all non-finite"
    said = "all 0" if largest == 0 else f"max {largest:.2g}"
    if n_bad:
        said += f", {n_bad} NaN/inf in red"
    return art, said


def _images(d, chosen, ks, j, c, cmap, fig, ax, figsize):
    rows = ["input"] + ks
    cells = [(row, n) for row in rows for n in chosen]
    ncols = len(chosen)
    fig, pairs = panels_for(fig, ax, cells, figsize or (1.9 * ncols + 0.6, 2.0 * len(rows)),
                            len(rows), ncols)
    channels = 1 if c is None else d.in_shape[c]
    for (row, n), axis in pairs:
        if row == "input":
            image, gray = _shown_image(np.asarray(d.x[n]).reshape(d.in_shape), c)
            axis.imshow(image, cmap=gray, interpolation="nearest")
            axis.set_title(f"point {n}\n{_y_text(d, n, j)}", fontsize=9)
        else:
            values = saliency_map(d, n, output=j, order=row, channel_axis=c)
            _, said = _size_map(axis, values, cmap)
            reduced = f", max of {channels} ch." if channels > 1 else ""
            axis.set_title(f"{_saliency_label(row, j, d)}\n({said}{reduced})", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        remember(fig, (row, n), axis)
    return fig


# -- sequences ----------------------------------------------------------------------------
def _sequences(d, chosen, ks, j, cmap, fig, ax, figsize):
    columns = ["input"] + ks
    cells = [(col, n) for n in chosen for col in columns]
    # (T, F) points are drawn transposed; (C, L) points (a Conv1d's) as they are
    channels_first = getattr(d, "_time_axis", 0) == 1
    f, t = d.in_shape if channels_first else d.in_shape[::-1]

    def shown(a):
        return a if channels_first else a.T
    width = min(max(2.5, 0.25 * t + 1.5), 6.0)
    fig, pairs = panels_for(fig, ax, cells, figsize or (width * len(columns),
                                                        0.6 + max(1.6, 0.22 * f + 1.0) * len(chosen)),
                            len(chosen), len(columns))
    extent = (-0.5, t - 0.5, f - 0.5, -0.5)
    for (col, n), axis in pairs:
        if col == "input":
            values = shown(np.asarray(d.x[n], dtype=np.float64).reshape(d.in_shape))
            art = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto",
                              interpolation="nearest", extent=extent)
            axis.set_title(f"point {n}: x ({_y_text(d, n, j)})", fontsize=9)
        else:
            values = shown(saliency_map(d, n, output=j, order=col))
            art, said = _size_map(axis, values, cmap, aspect="auto", extent=extent)
            shown_said = "" if said.startswith("max ") and "NaN" not in said else f" ({said})"
            axis.set_title(f"point {n}: {_saliency_label(col, j, d)}{shown_said}", fontsize=9)
        fig.colorbar(art, ax=axis, shrink=0.9)
        axis.set_xlabel("position" if channels_first else "time step")
        axis.set_ylabel("channel" if channels_first else "feature")
        for which in (axis.xaxis, axis.yaxis):  # whole time steps and features only
            which.set_major_locator(MaxNLocator(integer=True))
        remember(fig, (col, n), axis)
    return fig
