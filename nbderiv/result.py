"""The result objects: :class:`Derivatives` and :class:`Finding`.

Both render themselves (``repr`` and ``_repr_html_``) deterministically: no memory
addresses, no timings, so notebooks that display them stay stable under nbval.

>>> import numpy as np
>>> from nbderiv.result import Derivatives
>>> d = Derivatives(x=np.zeros((3, 1)), y=np.zeros((3, 1)), orders=[np.ones((3, 1, 1))],
...                 framework="torch", method="reverse-ones")
>>> d[1].shape, d.axes(1)
((3, 1, 1), ('point', 'output', 'input'))
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import numpy as np

SEVERITIES = ("info", "warning", "error")

# Every tag that ``d.method`` can hold, in one line each (the README has the same list). A method
# is one strategy, optionally followed by "(XLA)" and/or "(chunked)", e.g. "taylor (XLA)".
METHOD_TAGS = {
    "taylor": "forward Taylor mode: y's power series pushed through a stack of linear layers "
              "and elementwise activations, about K² elementwise passes for order K",
    "reverse-ones": "nested reverse mode with grad_outputs=ones: one backward pass per output "
                    "and distinct partial, exact per point because points are independent",
    "forward-jvp": "nested forward mode (Jacobian-vector products), chosen when outputs "
                   "outnumber inputs",
    "per-point-blocks": "the points are coupled (e.g. BatchNorm in training mode): each point "
                        "differentiated with the others held fixed, the diagonal blocks "
                        "dy_n/dx_n",
    "XLA": "TensorFlow on the CPU compiled this computation with XLA (a second run on the same "
           "number of points, at least 1 024); the last bits may differ from the first call",
    "chunked": "the points were computed in chunks to stay within the memory budget; the "
               "numbers are those of one pass up to the last bits of rounding",
}


def method_tags(method: str) -> list:
    """The tags of a method string, strategy first: ``"taylor (XLA) (chunked)"`` ->
    ``["taylor", "XLA", "chunked"]``."""
    base, _, rest = (method or "").partition(" (")
    return [base] + re.findall(r"\(([^()]+)\)", "(" + rest if rest else "")


def explain_method(method: str) -> list:
    """``[(tag, one-line explanation)]`` for each tag of ``method`` (unknown tags: no line).

    >>> [tag for tag, _ in explain_method("reverse-ones (chunked)")]
    ['reverse-ones', 'chunked']
    """
    return [(tag, METHOD_TAGS[tag]) for tag in method_tags(method) if tag in METHOD_TAGS]


@dataclass(frozen=True)
class Finding:
    """Something worth knowing about a derivative computation.

    ``code`` is a stable slug (e.g. ``"piecewise-linear"``), ``severity`` is
    ``"info"``, ``"warning"`` or ``"error"``, ``message`` says what and why, ``fix``
    says what to do. ``points`` optionally lists the point indices concerned.
    """

    code: str
    severity: str
    message: str
    fix: str = ""
    points: tuple = field(default=(), compare=False)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def __str__(self) -> str:
        text = f"[{self.severity}] {self.code}: {self.message}"
        return text + (f" Fix: {self.fix}" if self.fix else "")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _stats(a: np.ndarray) -> str:
    if a.size == 0:
        return "empty"
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return "no finite values"
    lo, hi, mean = finite.min(), finite.max(), finite.mean()
    if abs(mean) <= 1e-6 * max(abs(lo), abs(hi)):
        mean = 0.0  # rounding noise of a symmetric set: print 0, stable across machines
    text = f"min {_fmt(lo)}  mean {_fmt(mean)}  max {_fmt(hi)}"
    if finite.size < a.size:
        text += f"  ({a.size - finite.size} non-finite)"
    return text


class Derivatives:
    """Per-point derivatives of a model's outputs with respect to its inputs.

    ``d[k]`` (1 <= k <= ``d.order``) has shape ``(N, d_out) + (n_wrt,) * k`` and
    ``d[k][n, j, i1, ..., ik]`` is the k-th partial of output j with respect to inputs
    ``wrt[i1], ..., wrt[ik]`` at point n. ``d[0]`` is ``d.y`` (N, d_out); ``d.x`` is
    (N, d_in). ``d.inputs`` names the differentiated inputs, ``d.axes(k)`` names the axes.

    >>> import torch, nbderiv
    >>> d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=2)
    >>> d[2].shape
    (5, 1, 1, 1)
    """

    def __init__(self, *, x, y, orders, framework, method, inputs=None, wrt=None,
                 findings=(), check=None, code=None, notes=()):
        self.x = x
        self.y = y
        self._orders = list(orders)
        self.framework = framework
        self.method = method
        n_in = x.shape[1]
        self.wrt = tuple(range(n_in)) if wrt is None else tuple(wrt)
        all_names = tuple(inputs) if inputs is not None else _default_input_names(n_in)
        self.all_inputs = all_names
        self.inputs = all_names if self.wrt == tuple(range(len(all_names))) \
            else tuple(all_names[i] for i in self.wrt)
        self.findings = list(findings)
        self.check = check
        self.reference_errors = None  # {k: (max_abs, max_rel)} with derivatives(reference=...)
        self._code = code
        self._code_notes = ()  # see Backend.code_notes
        self._stochastic = False  # the model's outputs were random (dropout in training)
        self._time_axis = 0  # sequences: 1 where each point is (channels, length) (Conv1d)
        self._targets = None  # target=: each point's chosen output (flat index), for titles
        self.notes = list(notes)  # lines shown in the summary, e.g. the size of a grid
        self.out_shape = tuple(y.shape[1:]) if y.ndim > 1 else (1,)  # each point's output shape
        self.in_shape = (len(self.wrt),)  # the input axes' shape in d[k] (per input axis group)

    def _present(self, out_shape, point_shape=None) -> None:
        """Give y and d[k] each point's own output shape O, and (when every input is kept and
        x is one array of shape (N, *S)) the input axes the point shape S: d[k] becomes
        (N,) + O + S * k; x is (N, *S) whatever ``wrt`` picks. Reshapes only (views, no
        copies)."""
        out_shape = tuple(out_shape)
        n = self.n_points
        whole = point_shape is not None and len(self.wrt) == self.x.shape[1] \
            and self.wrt == tuple(range(self.x.shape[1]))
        in_shape = tuple(point_shape) if whole else (len(self.wrt),)
        # x keeps each point's shape whatever wrt picks (wrt indexes its flattened features)
        if point_shape is not None and len(point_shape) > 1 and \
                self.x.shape[1:] != tuple(point_shape):
            self.x = self.x.reshape((n,) + tuple(point_shape))
        if out_shape == self.out_shape and in_shape == self.in_shape:
            return
        self.y = self.y.reshape((n,) + out_shape)
        self._orders = [d.reshape((n,) + out_shape + in_shape * k)
                        for k, d in enumerate(self._orders, start=1)]
        if whole:
            self.x = self.x.reshape((n,) + in_shape)
        self.out_shape, self.in_shape = out_shape, in_shape

    @property
    def features(self) -> np.ndarray:
        """x as (N, D): each point's input values in one row (C order)."""
        return self.x.reshape(self.x.shape[0], -1)

    # -- array access -------------------------------------------------------------
    @property
    def order(self) -> int:
        return len(self._orders)

    @property
    def n_points(self) -> int:
        return self.y.shape[0]

    @property
    def n_outputs(self) -> int:
        return int(np.prod(self.out_shape))

    def __getitem__(self, k):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"index Derivatives by the order k (an int), got {type(k).__name__}")
        if not 0 <= k <= self.order:
            raise IndexError(
                f"order {k} was not computed: this result holds orders 0..{self.order}. "
                f"Fix: call nbderiv.derivatives(..., order={max(k, 1)})."
            )
        return self.y if k == 0 else self._orders[k - 1]

    def __len__(self) -> int:
        return self.order + 1

    def __iter__(self):
        return (self[k] for k in range(self.order + 1))

    def axes(self, k: int) -> tuple:
        """Names of the axes of ``d[k]``: ``("point", "output") + ("input",) * k`` for vector
        outputs and inputs; an output or input with several axes per point names each, e.g.
        ``("point", "output", "input axis 1", "input axis 2", "input axis 3")`` for images."""
        self[k]  # validates k

        def names(kind, shape):
            return (kind,) if len(shape) == 1 else tuple(
                f"{kind} axis {i}" for i in range(1, len(shape) + 1))

        return ("point",) + names("output", self.out_shape) + names("input", self.in_shape) * k

    @property
    def code(self) -> str | None:
        """Plain framework code computing the same derivatives (see ``nbderiv.codegen``)."""
        if callable(self._code):  # written on first use
            self._code = self._code()
        return self._code

    def finding(self, code: str):
        """The finding with this code, or None."""
        return next((f for f in self.findings if f.code == code), None)

    @property
    def codes(self) -> list:
        """The codes of all findings, in order."""
        return [f.code for f in self.findings]

    def plot(self, **kwargs):
        """Plot y and its derivatives; see :func:`nbderiv.plot.plot_derivatives`."""
        from .plot import plot_derivatives

        return plot_derivatives(self, **kwargs)

    # -- rendering ------------------------------------------------------------------
    def _rows(self):
        for k in range(self.order + 1):
            label = "y" if k == 0 else f"d[{k}]"
            a = self[k]
            yield label, str(tuple(a.shape)), " × ".join(self.axes(k)), _stats(a)

    def _header_start(self) -> str:
        return (f"Derivatives of {self.n_outputs} output(s) w.r.t. {len(self.inputs)} input(s) "
                f"at {self.n_points} point(s), {self._orders_words()} [{self.framework}, ")

    def _orders_words(self) -> str:
        return "order 1" if self.order == 1 else f"orders 1..{self.order}"

    def _header(self) -> str:
        return f"{self._header_start()}{self.method}]"

    def __repr__(self) -> str:
        rows = list(self._rows())
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        lines = [self._header()]
        lines += [f"  {a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {s}" for a, b, c, s in rows]
        lines.append("  inputs: " + self._inputs_text())
        lines += [f"  {note}" for note in getattr(self, "notes", ())]
        if self.check is not None:
            lines.append("  check: " + self.check.summary())
        if self.reference_errors:
            lines.append("  vs reference: " + self._reference_text())
        if self.findings:
            lines.append("  findings:")
            lines += [f"    - {f}" for f in self.findings]
        else:
            lines.append("  findings: none")
        return "\n".join(lines)

    def _inputs_text(self, most: int = 8) -> str:
        """The differentiated inputs' names; a long list (images, sequences) shortened to its
        ends and what it is."""
        names = self.inputs
        if len(names) <= most:
            return ", ".join(names)
        shape = f"; each point of shape {self.in_shape}" if len(self.in_shape) > 1 else ""
        return (", ".join(names[:3]) + ", ..., " + ", ".join(names[-2:])
                + f" ({len(names)} features{shape})")

    def _reference_text(self) -> str:
        return "; ".join(f"order {k}: max abs err {a:.2g}, rel {r:.2g}"
                         for k, (a, r) in sorted(self.reference_errors.items()))

    def _repr_html_(self) -> str:
        esc = html.escape
        body = "".join(
            f"<tr><td><code>{esc(a)}</code></td><td><code>{esc(b)}</code></td>"
            f"<td>{esc(c)}</td><td>{esc(s)}</td></tr>"
            for a, b, c, s in self._rows()
        )
        explained = explain_method(self.method)
        tip = "; ".join(f"{tag}: {text}" for tag, text in explained)
        method = (f'<span class="nbderiv-method" title="{esc(tip)}" '
                  f'style="text-decoration: underline dotted">{esc(str(self.method))}</span>'
                  if tip else esc(str(self.method)))
        parts = [
            '<div class="nbderiv-summary">',
            f"<p><b>{esc(self._header_start())}{method}]</b></p>",
            "<table><thead><tr><th>array</th><th>shape</th><th>axes</th><th>values</th>"
            f"</tr></thead><tbody>{body}</tbody></table>",
            f"<p>inputs: {esc(self._inputs_text())}</p>",
        ]
        parts += [f"<p>{esc(note)}</p>" for note in getattr(self, "notes", ())]
        if self.check is not None:
            parts.append(f"<p>check: {esc(self.check.summary())}</p>")
        if self.reference_errors:
            parts.append(f"<p>vs reference: {esc(self._reference_text())}</p>")
        if self.findings:
            colors = {"info": "#31708f", "warning": "#8a6d3b", "error": "#a94442"}
            items = "".join(
                f'<li><span style="color:{colors[f.severity]}"><b>{esc(f.severity)}</b></span> '
                f"<code>{esc(f.code)}</code>: {esc(f.message)}"
                + (f"<br><i>Fix:</i> {esc(f.fix)}" if f.fix else "")
                + "</li>"
                for f in self.findings
            )
            parts.append(f"<p>findings:</p><ul>{items}</ul>")
        else:
            parts.append("<p>findings: none</p>")
        if explained:
            items = "; ".join(f"<code>{esc(tag)}</code>: {esc(text)}" for tag, text in explained)
            parts.append(f'<p class="nbderiv-method-note"><small>method: {items}.</small></p>')
        parts.append("</div>")
        return "".join(parts)


def _default_input_names(n: int) -> tuple:
    return ("x",) if n == 1 else tuple(f"x[{i}]" for i in range(n))
