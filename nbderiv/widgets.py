"""The ipywidgets explorer: :func:`explore`.

The only nbderiv module that imports ipywidgets, and it does so inside the function that
builds the widget: the helpers here (``input_dim``, ``slider_grid``, ``domain_pair``) are
light, so the ``%nnderiv`` magic can use them without loading any widget machinery. Every
derivative comes from :func:`nbderiv.derivatives`; every picture from :mod:`nbderiv.plot`.
Nothing here trains a network (that is :mod:`nbderiv.teaching`) or imports IPython.

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
import re
import time
from contextlib import contextmanager

import numpy as np

from .backends import framework_name
from .errors import InputShapeError, ModelCallError, NbderivError, OptionError, OutputError
from .options import positive_int
from .reference_views import reference_derivatives

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
EXPLORER_TAKES = ("works on models of flat feature inputs, x of shape (N, d_in), with one slider "
                  "per input feature")
D_IN_FIX = "pass d_in= (the number of input features)"


# -- light helpers (no ipywidgets) ---------------------------------------------------------------
def resolve_framework(model, framework=None) -> str | None:
    """The framework that runs ``model``, by the one rule of
    :func:`nbderiv.backends.framework_name` (kept under this name for the magics)."""
    return framework_name(model, framework=framework)


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
        return positive_int(d_in, "d_in")
    fix = f"Fix: {D_IN_FIX}."
    from .backends import numpy_model_error

    if numpy_model_error(model) is not None:
        raise numpy_model_error(model)
    fw = framework_name(model, framework=framework)
    if fw is not None:
        from .backends import get_backend

        width = get_backend(fw).input_width(model)
        if isinstance(width, int):  # a per-point shape (images, sequences) is no slider's
            return width
    if fw is None:
        raise OptionError("cannot tell which framework runs this callable. Fix: pass "
                          "framework='torch' or framework='tensorflow'.")
    from .api import derivatives  # anything else: does it take one feature?

    try:
        derivatives(model, np.zeros((2, 1)), order=1, framework=fw)
    except NbderivError as exc:
        text = str(exc).split(" Fix:")[0].rstrip(". ")
        said = re.search(r"\bthe model raised .*", text)  # not the probe's layout again
        said = said and re.sub(r" when nbderiv first called it on x of shape \([^)]*\) \(passed "
                               r"as \([^)]*\)\)", "", said.group(0))
        raise OptionError(f"cannot tell how many inputs the model takes: its first layer does not "
                          f"say, and it does not accept one feature per point (nbderiv's probe, "
                          f"x of shape (2, 1)): {said or text}. {fix}") from None
    return 1


# -- what the explorer can show ------------------------------------------------------------------
def point_shape(model, framework=None) -> tuple | None:
    """The per-point shape the model's first layer expects when it has several axes (an image
    (C, H, W) or (H, W, C), a sequence (T, F); None for sizes it leaves free), read without
    calling the model; None for vectors of features and when it cannot be read."""
    fw = framework_name(model, framework=framework)
    if fw is None:
        return None
    from .backends import get_backend

    try:
        width = get_backend(fw).input_width(model)
    except NbderivError:  # an unbuilt or lazy model: input_dim says what to do
        return None
    if isinstance(width, tuple) and len(width) > 1:
        return width
    return None


def required_positional(fn, skip=()) -> list | None:
    """The names of ``fn``'s positional parameters without a default, or None when its
    signature cannot be read."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is p.empty and p.name not in skip]


def separate_inputs(model, framework) -> list | None:
    """[(name, per-point shape or None)] for a model that takes several separate inputs (a
    Keras model of several ``Input``s, a torch ``forward(x, t)``, a Keras layer's
    ``call(x, t)``, a function ``f(x, t)``), from its structure alone; None for a model of
    one input (or one the magic cannot read)."""
    if framework == "tensorflow":
        from .backends.tensorflow_keras import graph_kind, is_keras_layer

        if graph_kind(model) == "functional":
            inputs = list(model.inputs)
            if len(inputs) < 2:
                return None
            if isinstance(model.input, dict):  # passed in the order of their sorted keys
                names = sorted(model.input)
                inputs = [model.input[k] for k in names]
            else:  # named as d.inputs names them: automatic names are arg0, arg1, ...
                names = [getattr(t, "name", None) or "" for t in inputs]
                if any(not nm or nm.startswith(("keras_tensor", "input_layer"))
                       for nm in names):
                    names = [f"arg{i}" for i in range(len(inputs))]
            return [(nm, tuple(t.shape[1:])) for nm, t in zip(names, inputs)]
        if graph_kind(model) is not None:
            return None
        fn = model.call if is_keras_layer(model) else model
        names = required_positional(fn, skip=("training", "mask"))
    elif framework == "torch":
        forward = getattr(model, "forward", None)
        names = required_positional(forward if forward is not None else model)
    else:
        return None
    return [(nm, None) for nm in names] if names and len(names) >= 2 else None


def argument_widths(model, framework, d_in=None) -> tuple:
    """(widths, feature names) of a model that takes several separate inputs, one slider per
    feature (a PINN's ``forward(x, t)``: ((1, 1), ['x', 't'])), or (None, None) for a model
    of one input array. A width the model does not declare is 1, unless ``d_in`` gives the
    widths, one per input (``d_in=(2, 1)`` for ``forward(xy, t)``).

    >>> import torch
    >>> class Heat(torch.nn.Module):
    ...     def forward(self, x, t):
    ...         return torch.exp(-t) * torch.sin(x)
    >>> argument_widths(Heat(), "torch")
    ((1, 1), ['x', 't'])
    """
    from .inputs import _feature_names

    separate = None if framework is None else separate_inputs(model, framework)
    if separate is None:
        if isinstance(d_in, (tuple, list)):
            raise OptionError(f"d_in={tuple(d_in)!r} gives one width per separate input, but "
                              "the model takes one input array. Fix: pass its number of "
                              "features, e.g. d_in=2.")
        return None, None
    names = [name for name, _ in separate]
    declared = []
    for name, shape in separate:
        if shape is not None and (len(shape) != 1 or shape[0] is None):
            raise OptionError(
                f"nbderiv.explore {EXPLORER_TAKES}; the model's input {name} has per-point "
                f"shape {shape}. Fix: see its derivatives with nbderiv.derivatives(model, "
                f"({', '.join(names)})).plot() instead.")
        declared.append(None if shape is None else int(shape[0]))
    fix = (f"Fix: pass one width per input, d_in=({', '.join(str(w or 1) for w in declared)}"
           f"{',' if len(names) == 1 else ''}) for inputs {', '.join(names)}.")
    if d_in is None:
        widths = tuple(w or 1 for w in declared)
    elif isinstance(d_in, (tuple, list)):
        if len(d_in) != len(names):
            raise OptionError(f"d_in gives {len(d_in)} width(s), the model takes {len(names)} "
                              f"separate inputs ({', '.join(names)}). {fix}")
        widths = tuple(positive_int(w, "d_in", example=1) for w in d_in)
        clash = [(nm, w, own) for nm, w, own in zip(names, widths, declared)
                 if own is not None and own != w]
        if clash:
            nm, w, own = clash[0]
            raise OptionError(f"d_in gives input {nm} width {w}; the model declares {own}. "
                              f"{fix}")
    else:
        total = positive_int(d_in, "d_in")
        widths = tuple(w or 1 for w in declared)
        if total != sum(widths):
            raise OptionError(f"d_in={total}, but the model takes {len(names)} separate inputs "
                              f"({', '.join(names)}) of {sum(widths)} feature(s) in all, as "
                              f"far as nbderiv can tell. {fix}")
    shapes = tuple((w,) for w in widths)
    return widths, list(_feature_names(tuple(names), widths, shapes))


def _saliency_fix(model_name: str, x_name: str) -> str:
    return (f"%nnderiv {model_name} {x_name} --plot (saliency maps) or "
            f"nbderiv.derivatives({model_name}, {x_name}).plot()")


def explorer_input_dim(model, *, framework=None, d_in=None, what="nbderiv.explore",
                       d_in_fix=D_IN_FIX, model_name="model", x_name=None) -> int:
    """:func:`input_dim` for the explorer, which gives each input feature a slider: a model
    whose points have several axes (images, sequences) is refused (``d_in=`` too), saying
    what it takes and what shows its derivatives instead. ``what`` names the explorer,
    ``d_in_fix`` the way to give the width, ``model_name`` / ``x_name`` the names in the
    suggested ``%nnderiv`` line (the magic passes its own)."""
    shape = point_shape(model, framework)
    if shape is not None:
        kind, one = ("images", "an image") if len(shape) >= 3 else ("sequences", "a sequence")
        from .model_errors import expected_input

        takes = expected_input(shape) or f"points of shape {shape}"
        raise OptionError(
            f"{what} {EXPLORER_TAKES}; this model takes {takes}: each point is {one}, "
            "not a vector of features. Fix: see its derivatives with "
            f"{_saliency_fix(model_name, x_name or kind)}.")
    try:
        return input_dim(model, framework=framework, d_in=d_in)
    except OptionError as exc:
        text, end = str(exc), f"Fix: {D_IN_FIX}."
        if not text.endswith(end):
            raise
        raise OptionError(
            f"{text[:-len(end)]}{what[0].upper()}{what[1:]} {EXPLORER_TAKES}. Fix: {d_in_fix}, "
            f"if the model takes vectors of features; if each point is an image or a sequence, "
            f"see its derivatives with {_saliency_fix(model_name, x_name or 'images')} "
            "instead.") from None


def slider_grid(lo: float, hi: float, per_span: int = 50):
    """(min, max, step, decimals) of a slider grid around [lo, hi]: a 1-2-5 step of about
    ``span / per_span`` and bounds one half-span beyond each end, all on the grid."""
    span = float(hi) - float(lo)
    if not (math.isfinite(span) and span > 0):
        raise OptionError(f"domain must be (low, high) with low < high, got ({lo}, {hi}). "
                          "Fix: e.g. domain=(-3, 3).")
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
    function (a callable taking the same (N, d_in) input); its derivatives are drawn dashed
    and the readout gives the error against them. One in the model's framework
    (``torch.sin``) is differentiated by autodiff, a NumPy function (``np.sin``) by float64
    central differences (:func:`nbderiv.reference_views.reference_derivatives`).

    The explorer is for models whose points are vectors of features, x of shape (N, d_in);
    a model of images or sequences is refused with what shows its derivatives instead
    (``%nnderiv model images --plot``).

    Returns an ``ipywidgets.VBox`` with ``w.image`` (an ``Image`` with the PNG plot),
    ``w.readout`` (an ``HTML`` summary), ``w.last_data`` (``x``, ``X``, ``y`` {k: (n,)},
    ``reference`` / ``fd`` {k: (n,)} or None, ``reference_method`` (``"autodiff"`` or
    ``"central differences"``), ``derivatives``, ``elapsed_ms``...) and ``w.refresh()``.
    Each change recomputes with :func:`nbderiv.derivatives` and redraws.
    ``d_in`` gives the input width when it cannot be read from the model (see
    :func:`input_dim`); ``point`` the starting values of the inputs; ``width`` the plot's
    width in pixels. A model of several separate inputs (a PINN's ``forward(x, t)``, a Keras
    model of several ``Input``s) gets one slider per feature of each, named after them; an
    input's width is read from its Keras ``Input``, else 1, unless ``d_in`` gives one width
    per input (``d_in=(2, 1)`` for ``forward(xy, t)``); ``reference`` then takes the inputs
    side by side, one (N, d_in) array.

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

        if reference is not None and not callable(reference):
            raise OptionError(f"reference must be the true function of x, got "
                              f"{type(reference).__name__}. Fix: e.g. reference=np.sin, or "
                              "reference=torch.sin for a torch model.")
        self.model, self.reference = model, reference
        self.reference_how = None  # how the reference is differentiated, once it is known
        self.framework = framework_name(model, framework=framework)
        self.n = positive_int(n, "n", 2, example=200)
        max_order = positive_int(max_order, "max_order", example=4)
        order = positive_int(order, "order", example=2)
        if order > max_order:
            raise OptionError(f"order={order} is above max_order={max_order}. "
                              f"Fix: order={max_order} or less, or max_order={order}.")
        lo, hi = domain_pair(domain)
        self.grid = slider_grid(lo, hi)
        self.widths, names = argument_widths(model, self.framework, d_in)
        self.argument_names = None if self.widths is None else \
            [name for name, _ in separate_inputs(model, self.framework)]
        if self.widths is None:
            self.d_in = explorer_input_dim(model, framework=self.framework, d_in=d_in)
            names = ["x"] if self.d_in == 1 else [f"x[{i}]" for i in range(self.d_in)]
        else:
            self.d_in = sum(self.widths)
        point = np.zeros(self.d_in) if point is None else np.asarray(point, dtype=float)
        if point.shape != (self.d_in,):
            raise OptionError(f"point must hold {self.d_in} value(s) (one per input), got "
                              f"shape {point.shape}. Fix: e.g. point={[0.0] * self.d_in}.")
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
        try:
            self.refresh(raise_errors=True)  # the first computation tells how many outputs
        except (InputShapeError, ModelCallError, OutputError) as exc:
            if isinstance(exc, ModelCallError) and "first called it" not in str(exc):
                raise  # it failed while being differentiated: its own fix is the one
            raise _points_refused(exc, self.n, self.d_in, self.argument_names,
                                  self.widths) from None
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
        given = X if self.widths is None else \
            tuple(np.split(X, np.cumsum(self.widths)[:-1], axis=1))  # one array per input
        d = derivatives(self.model, given, order=k_max, wrt=[i], framework=self.framework,
                        check=s["fd"])
        ref = None
        if self.reference is not None:  # the true function: (N, d_out_ref) per order
            truths, self.reference_how = reference_derivatives(
                self.reference, X, k_max, [i], self.framework, how=self.reference_how)
            ref = {k: truths[k].reshape(self.n, -1) for k in range(k_max + 1)}
            if ref[0].shape[1] not in (1, d.n_outputs):
                raise OptionError(
                    f"the reference gives {ref[0].shape[1]} outputs per point, the model "
                    f"{d.n_outputs}. Fix: give one output (compared with each) or "
                    f"{d.n_outputs}.")
        computed = time.perf_counter()
        j = min(s["output"], d.n_outputs - 1)

        def pick(a, k, j=j):
            return np.asarray(a)[(slice(None), j) + (0,) * k]

        data = {
            "x": xs, "X": X, "order": k_max, "output": j, "input": i,
            "domain": s["domain"], "fixed": s["fixed"], "fd_shown": s["fd"],
            "y": {k: pick(d[k], k) for k in range(k_max + 1)},
            "reference": None if ref is None else {
                k: a[:, min(j, a.shape[1] - 1)] for k, a in ref.items()},
            "reference_method": None if ref is None else self.reference_how,
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
        if data["reference"] is not None:  # the error against the known truth, per order
            errors = " · ".join(
                f"{_plain_label(k, y, name)}: {float(np.nanmax(np.abs(v - data['reference'][k]))):.2g}"
                for k, v in data["y"].items() if k >= 1)
            parts.append("max error vs reference: " + errors)
        if data["fd_shown"] and d.check is not None:
            parts.append("finite differences: " + _esc(d.check.summary()))
        if d.findings:
            parts.append("findings: " + ", ".join(f"<code>{_esc(f.code)}</code>"
                                                  for f in d.findings))
        return "<br>".join(parts)


def _points_refused(exc, n: int, d_in: int, names=None, widths=None) -> NbderivError:
    """The model's refusal of the explorer's first points (its first call failed), with fixes
    the explorer has (the model's own error says to reshape x, which is no control of the
    explorer's); ``names`` / ``widths``: the separate inputs, when the model takes several."""
    body = str(exc).split(" Fix:")[0].rstrip(". ")
    if widths is not None:
        given = ", ".join(f"{name} of shape ({n}, {w})" for name, w in zip(names, widths))
        return type(exc)(
            f"the model failed on the explorer's points, {given}: {body}. Fix: if an input "
            f"takes another number of features, pass their widths, one per input, e.g. "
            f"d_in=({', '.join(str(w) for w in widths)}{',' if len(widths) == 1 else ''}) "
            f"with the right numbers; else call the model yourself on inputs of those shapes "
            "and fix the error it raises there.")
    return type(exc)(
        f"the model failed on the explorer's points, {n} points of {d_in} feature(s): {body}. "
        f"nbderiv.explore {EXPLORER_TAKES}. Fix: if the model takes another number of "
        f"features, pass d_in= with that number; if each point is an image or a sequence, see "
        f"its derivatives with {_saliency_fix('model', 'images')} instead; else call the model "
        f"yourself on x of shape ({n}, {d_in}) and fix the error it raises there.")


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


def domain_pair(domain) -> tuple:
    """(low, high) as floats from a pair with low < high, else a clear OptionError.

    >>> domain_pair((-2, 2))
    (-2.0, 2.0)
    """
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise OptionError(f"domain must be a pair (low, high), got {domain!r}. "
                          "Fix: e.g. domain=(-3, 3).") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise OptionError(f"domain must be (low, high) with low < high, got {domain!r}. "
                          "Fix: e.g. domain=(-3, 3).")
    return lo, hi
