"""ipywidgets explorers: :func:`explore` and :func:`compare_activations`.

The only nbderiv module that imports ipywidgets, and it does so inside the functions that
build widgets: the helpers here (``input_dim``, ``resolve_framework``, ``slider_grid``) are
light, so the ``%nnderiv`` magic can use them without loading any widget machinery. Every
derivative comes from :func:`nbderiv.derivatives`; every picture from :mod:`nbderiv.plot`.

The plot is an ``ipywidgets.Image`` holding PNG bytes: it needs no pyplot state, it can be
unit-tested (``w.image.value``), and a browser sees a new image whenever a control moves.

>>> import torch, nbderiv
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
>>> w = nbderiv.explore(net, domain=(-2, 2), n=50)
>>> w.controls["order"].value = 3
>>> sorted(w.last_data["y"]), w.last_data["x"].shape
([0, 1, 2, 3], (50,))
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .errors import NbderivError, OptionError

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


# -- light helpers (no ipywidgets) ---------------------------------------------------------------
def resolve_framework(model, framework=None) -> str | None:
    """The framework that runs ``model``: ``framework`` if given, else the model's own (from
    its class, see :func:`nbderiv.backends.framework_of_model`), else the only framework
    already imported, else None. Imports nothing."""
    if framework is not None:
        return framework
    from .backends import framework_of_model

    found = framework_of_model(model)
    if found is not None:
        return found
    loaded = [name for name, module in (("torch", "torch"), ("tensorflow", "tensorflow"))
              if module in sys.modules]
    return loaded[0] if len(loaded) == 1 else None


def input_dim(model, *, framework=None, d_in=None) -> int:
    """The number of input features ``model`` expects, found without changing the model.

    ``d_in`` wins when given. A torch module: its first layer with ``in_features`` (a lazy
    layer is never run: it would be initialised). A Keras model: ``model.inputs``' last axis
    (an unbuilt Keras model is never called: that would build it for the wrong width).
    Anything else (``torch.sin``, a lambda): 1, after checking it accepts one feature.

    >>> import torch
    >>> input_dim(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()))
    3
    """
    if d_in is not None:
        if isinstance(d_in, bool) or not isinstance(d_in, (int, np.integer)) or d_in < 1:
            raise OptionError(f"d_in must be a positive int, got {d_in!r}.")
        return int(d_in)
    fix = "Fix: pass d_in= (the number of input features)."
    fw = resolve_framework(model, framework)
    if fw is not None:
        from .backends import get_backend

        width = get_backend(fw).input_width(model)
        if width is not None:
            return width
    if fw is None:
        raise OptionError("cannot tell which framework runs this callable. Fix: pass "
                          "framework='torch' or framework='tensorflow'.")
    from .api import derivatives  # anything else: does it take one feature?

    try:
        derivatives(model, np.zeros((2, 1)), order=1, framework=fw)
    except NbderivError as exc:
        raise OptionError(f"cannot tell how many inputs the model takes (it does not accept one "
                          f"feature: {str(exc).split('. Fix')[0]}). {fix}") from None
    return 1


def slider_grid(lo: float, hi: float, per_span: int = 50):
    """(min, max, step, decimals) of a slider grid around [lo, hi]: a 1-2-5 step of about
    ``span / per_span`` and bounds one half-span beyond each end, all on the grid."""
    span = float(hi) - float(lo)
    if not (math.isfinite(span) and span > 0):
        raise OptionError(f"domain must be (low, high) with low < high, got ({lo}, {hi}).")
    raw = span / per_span
    power = 10.0 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10) if m * power >= raw), default=10 * power)
    decimals = max(0, -math.floor(math.log10(step))) + 1
    lo_b = round(math.floor((lo - span / 2) / step) * step, decimals)
    hi_b = round(math.ceil((hi + span / 2) / step) * step, decimals)
    return lo_b, hi_b, round(step, decimals + 1), decimals


def snap(value: float, grid) -> float:
    """``value`` moved onto the slider grid (and inside its bounds)."""
    lo, hi, step, decimals = grid
    v = lo + round((float(value) - lo) / step) * step
    return round(min(max(v, lo), hi), decimals)


def _sup(k: int) -> str:
    return "" if k == 1 else str(k).translate(SUPERSCRIPTS)


def _plain_label(k: int, y: str = "y", x: str = "x") -> str:
    return y if k == 0 else f"∂{_sup(k)}{y}/∂{x}{_sup(k)}"


# -- explore -------------------------------------------------------------------------------------
def explore(model, domain=(-3, 3), n=200, reference=None, *, framework=None, d_in=None,
            order=2, max_order=4, point=None, width=512):
    """An interactive view of y and its derivatives along one input of ``model``.

    Controls (``w.controls``): ``"order"`` (Dropdown 1..max_order), ``"output"`` (Dropdown,
    models with several outputs), ``"input"`` (Dropdown, d_in > 1) with one FloatSlider per
    other input fixing its value (``"x[1]"``, ...), ``"domain"`` (FloatRangeSlider) and
    ``"finite differences"`` (Checkbox: overlay of ``check=True``). ``reference`` is the true
    function (a callable taking the same (N, d_in) input); its derivatives are drawn dashed.

    Returns an ``ipywidgets.VBox`` with ``w.image`` (an ``Image`` with the PNG plot),
    ``w.readout`` (an ``HTML`` summary), ``w.last_data`` (``x``, ``X``, ``y`` {k: (n,)},
    ``reference`` / ``fd`` {k: (n,)} or None, ``derivatives``, ``elapsed_ms``...) and
    ``w.refresh()``. Each change recomputes with :func:`nbderiv.derivatives` and redraws.
    ``d_in`` gives the input width when it cannot be read from the model (see
    :func:`input_dim`); ``point`` the starting values of the inputs; ``width`` the plot's
    width in pixels.

    >>> import torch, nbderiv
    >>> w = nbderiv.explore(torch.sin, domain=(0, 1), n=11, reference=torch.sin, framework="torch")
    >>> float(abs(w.last_data["y"][1] - w.last_data["reference"][1]).max()) < 1e-6
    True
    """
    return _Explorer(model, domain, n, reference, framework, d_in, order, max_order, point,
                     width).box


class _Explorer:
    def __init__(self, model, domain, n, reference, framework, d_in, order, max_order, point,
                 width):
        import ipywidgets as W

        self.model, self.reference = model, reference
        self.framework = resolve_framework(model, framework)
        self.n = _positive_int(n, "n", 2)
        max_order = _positive_int(max_order, "max_order", 1)
        order = _positive_int(order, "order", 1)
        if order > max_order:
            raise OptionError(f"order={order} is above max_order={max_order}.")
        lo, hi = _domain(domain)
        self.grid = slider_grid(lo, hi)
        self.d_in = input_dim(model, framework=self.framework, d_in=d_in)
        point = np.zeros(self.d_in) if point is None else np.asarray(point, dtype=float)
        if point.shape != (self.d_in,):
            raise OptionError(f"point must hold {self.d_in} value(s) (one per input), got "
                              f"shape {point.shape}.")
        names = ["x"] if self.d_in == 1 else [f"x[{i}]" for i in range(self.d_in)]
        self.names = names
        c = {}
        c["order"] = W.Dropdown(options=list(range(1, max_order + 1)), value=order,
                                description="order")
        if self.d_in > 1:
            c["input"] = W.Dropdown(options=[(nm, i) for i, nm in enumerate(names)], value=0,
                                    description="input")
        self.fixed = {}
        for i, nm in enumerate(names if self.d_in > 1 else []):
            lo_b, hi_b, step, _ = self.grid
            self.fixed[i] = c[nm] = W.FloatSlider(
                value=snap(point[i], self.grid), min=lo_b, max=hi_b, step=step,
                description=nm, continuous_update=False, readout_format=".4g")
        c["domain"] = W.FloatRangeSlider(
            value=(snap(lo, self.grid), snap(hi, self.grid)), min=self.grid[0],
            max=self.grid[1], step=self.grid[2], description="domain", continuous_update=False,
            readout_format=".4g", layout=W.Layout(width="460px"))
        c["finite differences"] = W.Checkbox(value=False, description="finite differences",
                                             indent=False)
        self.controls = c
        self.image = W.Image(format="png")
        self.dpi = max(30, int(width)) / 6.4
        self.readout = W.HTML()
        self.last_data = None
        self.refresh(raise_errors=True)  # the first computation tells how many outputs
        if self.last_data is not None and self.last_data["derivatives"].n_outputs > 1:
            n_out = self.last_data["derivatives"].n_outputs
            c["output"] = W.Dropdown(options=[(f"y[{j}]", j) for j in range(n_out)], value=0,
                                     description="output")  # output 0: what is drawn already
        self._show_fixed()
        rows = [W.HBox([c[k] for k in ("order", "output", "input") if k in c])]
        rows += [W.HBox(list(self.fixed.values()))] if self.fixed else []
        rows += [W.HBox([c["domain"], c["finite differences"]]), self.readout, self.image]
        self.box = W.VBox(rows)
        for control in c.values():
            control.observe(self._changed, names="value")
        self.box.controls = c
        self.box.image = self.image
        self.box.readout = self.readout
        self.box.refresh = self.refresh
        self.box.last_data = self.last_data

    def _show_fixed(self):
        chosen = self.controls["input"].value if "input" in self.controls else 0
        for i, slider in self.fixed.items():
            slider.layout.display = "none" if i == chosen else None

    def _changed(self, change):
        if change["owner"] is self.controls.get("input"):
            self._show_fixed()
        self.refresh()

    def state(self) -> dict:
        c = self.controls
        return {
            "order": int(c["order"].value),
            "output": int(c["output"].value) if "output" in c else 0,
            "input": int(c["input"].value) if "input" in c else 0,
            "domain": tuple(float(v) for v in c["domain"].value),
            "fixed": {i: float(s.value) for i, s in self.fixed.items()},
            "fd": bool(c["finite differences"].value),
        }

    def points(self, s) -> tuple:
        xs = np.linspace(s["domain"][0], s["domain"][1], self.n)
        X = np.empty((self.n, self.d_in))
        for i in range(self.d_in):
            X[:, i] = xs if i == s["input"] else s["fixed"].get(i, 0.0)
        return xs, X

    def refresh(self, raise_errors=False):
        """Recompute for the current control values and redraw. A failure (an nbderiv error,
        or the model raising) is shown in the readout, keeping the last picture, unless
        ``raise_errors``."""
        s = self.state()
        if not s["domain"][1] > s["domain"][0]:
            self.readout.value = _error_html("the domain is empty: move its ends apart.")
            return
        try:
            data, png, d = self._compute(s)
        except Exception as exc:  # noqa: BLE001 - the model's own errors too: keep the widget alive
            if raise_errors:
                raise
            text = str(exc) if isinstance(exc, NbderivError) else f"{type(exc).__name__}: {exc}"
            self.readout.value = _error_html(text)
            return
        self.image.value = png
        self.readout.value = self._summary(data, d)
        self.last_data = data
        if hasattr(self, "box"):
            self.box.last_data = data

    def _compute(self, s):
        with _few_threads(self.framework):
            return self._compute_now(s)

    def _compute_now(self, s):
        from .api import derivatives

        start = time.perf_counter()
        xs, X = self.points(s)
        i, k_max = s["input"], s["order"]
        d = derivatives(self.model, X, order=k_max, wrt=[i], framework=self.framework,
                        check=s["fd"])
        ref = None
        if self.reference is not None:
            ref = derivatives(self.reference, X, order=k_max, wrt=[i], framework=self.framework)
        computed = time.perf_counter()
        j = min(s["output"], d.n_outputs - 1)

        def pick(a, k, j=j):
            return np.asarray(a)[(slice(None), j) + (0,) * k]

        data = {
            "x": xs, "X": X, "order": k_max, "output": j, "input": i,
            "domain": s["domain"], "fixed": s["fixed"], "fd_shown": s["fd"],
            "y": {k: pick(d[k], k) for k in range(k_max + 1)},
            "reference": None if ref is None else {
                k: pick(ref[k], k, min(j, ref.n_outputs - 1)) for k in range(k_max + 1)},
            "fd": None if not s["fd"] else {k: pick(v, k) for k, v in d.check.reference.items()},
            "derivatives": d,
        }
        png = _render(d, j, ref, s["fd"], dpi=self.dpi)
        data["compute_ms"] = 1000 * (computed - start)
        data["elapsed_ms"] = 1000 * (time.perf_counter() - start)
        return data, png, d

    def _summary(self, data, d) -> str:
        name = self.names[data["input"]]
        held = [f"{self.names[i]} = {v:g}" for i, v in data["fixed"].items() if i != data["input"]]
        y = "y" if d.n_outputs == 1 else f"y[{data['output']}]"
        head = (f"<b>order {data['order']}</b> · output {y} · input {name}"
                + (f" ({', '.join(held)})" if held else "")
                + f" · {self.n} points on [{data['domain'][0]:g}, {data['domain'][1]:g}]")
        maxima = " · ".join(
            f"max |{_plain_label(k, y, name)}| = {float(np.nanmax(np.abs(v))):.4g}"
            for k, v in data["y"].items())
        parts = [head, maxima]
        if data["fd_shown"] and d.check is not None:
            parts.append("finite differences: " + _esc(d.check.summary()))
        if d.findings:
            parts.append("findings: " + ", ".join(f"<code>{_esc(f.code)}</code>"
                                                  for f in d.findings))
        return "<br>".join(parts)


@contextmanager
def _few_threads(framework):
    """The backend's settings for tiny interactive problems (torch: one thread)."""
    if framework is None:
        yield
        return
    from .backends import get_backend

    with get_backend(framework).few_threads():
        yield


def _render(d, output, reference, fd, width=6.4, dpi=80) -> bytes:
    """PNG of the explorer's plot. Fixed margins (in inches) instead of constrained layout:
    it halves the drawing time, which dominates a recompute."""
    from .plot import NbderivFigure, plot_derivatives

    panels = d.order + 1
    height = 0.9 + 1.45 * panels
    fig = NbderivFigure(figsize=(width, height), dpi=dpi)
    plot_derivatives(d, output=output, reference=reference, fd=fd, fig=fig)
    fig.subplots_adjust(left=0.95 / width, right=1 - 0.2 / width, bottom=0.5 / height,
                        top=1 - 0.4 / height, hspace=0.12)
    return fig.to_png()


def _esc(text: str) -> str:
    import html

    return html.escape(text)


def _error_html(message: str) -> str:
    return f'<span style="color:#a94442"><b>cannot compute:</b> {_esc(message)}</span>'


def _positive_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise OptionError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _domain(domain):
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise OptionError(f"domain must be a pair (low, high), got {domain!r}. "
                          "Fix: e.g. domain=(-3, 3).") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise OptionError(f"domain must be (low, high) with low < high, got {domain!r}.")
    return lo, hi


# -- compare_activations ----------------------------------------------------------------------------
@dataclass
class Comparison:
    """What :func:`compare_activations` trained and measured.

    ``models`` {activation: trained torch module}, ``derivatives`` {activation: Derivatives
    (order 2) on ``x``}, ``truth`` {k: (n,) true k-th derivative of the target on ``x``},
    ``losses`` {activation: final training MSE}, ``errors`` {activation: {k: mean |d^k y -
    truth|}}, ``figure`` (y, dy/dx, d²y/dx² of every net against the truth). Displays as the
    figure plus a table.
    """

    x: np.ndarray
    models: dict
    derivatives: dict
    truth: dict
    losses: dict
    errors: dict
    figure: object = field(repr=False)
    seed: int = 0

    def _table_html(self) -> str:
        rows = "".join(
            f"<tr><td>{_esc(a)}</td><td>{self.losses[a]:.3g}</td>"
            + "".join(f"<td>{self.errors[a][k]:.3g}</td>" for k in (1, 2)) + "</tr>"
            for a in self.models)
        return ("<table><thead><tr><th>activation</th><th>training MSE</th>"
                "<th>mean |dy/dx − true|</th><th>mean |d²y/dx² − true|</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")

    def _ipython_display_(self):
        """The figure as a PNG output, then the table (separate outputs, so notebook tests
        compare the table's text and skip the image bytes)."""
        from IPython.display import HTML, display

        display(self.figure)
        display(HTML(self._table_html()))

    def __repr__(self) -> str:
        lines = [f"Comparison of {', '.join(self.models)} nets (seed {self.seed}):"]
        lines += [f"  {a:<10} MSE {self.losses[a]:.3g}  mean |d1 - true| {self.errors[a][1]:.3g}"
                  f"  mean |d2 - true| {self.errors[a][2]:.3g}" for a in self.models]
        return "\n".join(lines)


def compare_activations(target, activations=("relu", "tanh", "softplus"), *, framework="torch",
                        domain=(-2, 2), hidden=(32, 32), steps=600, lr=1e-2, n_train=64,
                        n=200, seed=0, progress=True):
    """Train one small seeded net per activation on a 1-D ``target`` and compare their
    first and second derivatives with the target's own.

    Each net is ``Linear(1, h) -> act -> ... -> Linear(h, 1)`` trained by full-batch Adam
    (``steps`` steps, MSE on ``n_train`` evenly spaced points of ``domain``); the global
    torch random state is restored afterwards, so the same ``seed`` gives the same nets.
    ``target`` takes a torch tensor (e.g. ``lambda x: x**2``); its true derivatives come
    from differentiating ``target`` itself. Returns a :class:`Comparison` (models,
    derivatives, truth, errors, figure), which displays as the figure and a table.

    >>> import nbderiv
    >>> c = nbderiv.compare_activations(lambda x: x**2, ("relu", "tanh"), steps=50,
    ...                                 progress=False)
    >>> float(abs(c.derivatives["relu"][2]).max())
    0.0
    """
    from .api import derivatives
    from .backends import get_backend
    from .plot import plot_comparison

    trainer = get_backend(framework)
    if not hasattr(trainer, "fit_1d"):
        raise OptionError(f"compare_activations trains PyTorch networks; framework={framework!r} "
                          "is not supported. Fix: framework='torch'.")
    lo, hi = _domain(domain)
    if isinstance(activations, str):
        activations = (activations,)
    acts = dict(trainer.activation_class(a) for a in activations)
    if not acts:
        raise OptionError("activations is empty. Fix: e.g. ('relu', 'tanh').")
    steps = _positive_int(steps, "steps", 1)
    models, losses = {}, {}
    bar = _progress_bar(len(acts) * steps, progress)
    try:
        for a, (name, cls) in enumerate(acts.items()):
            models[name], losses[name] = trainer.fit_1d(
                target, cls, hidden=hidden, steps=steps, lr=lr, n_train=n_train,
                domain=(lo, hi), seed=seed + a, on_step=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    x = np.linspace(lo, hi, _positive_int(n, "n", 2)).reshape(-1, 1)
    truth_d = derivatives(target, x, order=2, framework="torch")
    truth = {k: np.asarray(truth_d[k]).reshape(-1) for k in range(3)}
    ders, errors = {}, {}
    for name, model in models.items():
        d = derivatives(model, x, order=2)
        ders[name] = d
        errors[name] = {k: float(np.mean(np.abs(np.asarray(d[k]).reshape(-1) - truth[k])))
                        for k in range(3)}
    fig = plot_comparison(x[:, 0], {name: ders[name] for name in models}, truth)
    return Comparison(x[:, 0], models, ders, truth, losses, errors, fig, seed)


def _progress_bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety
        return None
    return tqdm(total=total, desc="training", unit="step", leave=False)
