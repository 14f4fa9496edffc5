"""``%%nnderiv explain``: run the cell, catch its autograd error, explain what it computed.

The cell runs in the notebook's namespace as if it were run normally. A classic autograd error
(:mod:`nbderiv.explain_errors`) is explained instead of its traceback, and torch's warning
about ``.grad`` of a non-leaf tensor is explained instead of being printed; any other error or
warning is shown unchanged. The variables the cell created or changed that hold a
derivative-like array (and ``X.grad``, and the cell's last value) are explained with
:func:`nbderiv.explain`. :class:`ExplainCell` holds the methods of
:class:`nbderiv.magics.NbderivMagics` that do this (they use its ``shell``, ``_evaluate``,
``_display`` and ``_shown``).
"""

from __future__ import annotations

import ast
import re
import sys
import warnings

import numpy as np
from IPython.core.error import UsageError

from .errors import NbderivError


class Explanations(list):
    """The list ``%%nnderiv explain`` returns (a list that can be marked as shown)."""



class ExplainCell:
    """The ``%%nnderiv explain`` methods of :class:`nbderiv.magics.NbderivMagics`."""

    def _explain_cell(self, parsed, cell):
        """Run ``cell`` and explain it; ``parsed`` is the magic's line as read by
        :func:`nbderiv.magic_parsing._parse_cell_line`."""
        mode, model_expr, x_expr, order, wrt = parsed
        shell = self.shell
        ns = shell.user_ns
        before = dict(ns)
        x_grad_before = self._x_grad(x_expr, quiet=True)
        assigned = _assigned_names(shell, cell)
        source = _transformed(shell, cell)
        raised, seen = {}, []
        from .explain_errors import explain_error, explain_warning

        own_showtraceback = shell.__dict__.get("showtraceback")
        original = shell.showtraceback

        def showtraceback(*args, **kwargs):
            value = sys.exc_info()[1]
            if value is not None and _classic(value):
                raised["exc"], raised["tb"] = value, sys.exc_info()[2]
                return None  # explained below, instead of the traceback
            return original(*args, **kwargs)

        shell.showtraceback = showtraceback
        outer_result = getattr(shell.displayhook, "exec_result", None)
        try:
            with warnings.catch_warnings():
                # torch warns once per line; here every time, so that it can be explained
                warnings.filterwarnings("always", message=r"The \.grad attribute of a Tensor "
                                        r"that is not a leaf Tensor")
                shown_before = warnings.showwarning

                def showwarning(message, category, filename, lineno, file=None, line=None):
                    seen.append((str(message), lineno))
                    if explain_warning(str(message)) is not None:
                        return None  # explained below, instead of printed (as tracebacks)
                    return shown_before(message, category, filename, lineno, file, line)

                warnings.showwarning = showwarning
                result = shell.run_cell(cell, store_history=False)
        finally:
            shell.displayhook.exec_result = outer_result  # the nested run_cell cleared it
            if own_showtraceback is None:
                shell.__dict__.pop("showtraceback", None)
            else:
                shell.showtraceback = own_showtraceback
        out = Explanations()
        if "exc" in raised:
            lineno, text = _cell_line(raised["tb"], source)
            out.append(explain_error(raised["exc"], source=source, line=text, lineno=lineno))
        for message, lineno in seen:
            text = _line_at(source, lineno) or _first_grad_line(source)
            e = explain_warning(message, source=source, line=text,
                                lineno=lineno if _line_at(source, lineno) else None)
            if e is not None and not any(o.code == e.code for o in out):
                out.append(e)
        if result.success and model_expr is not None:
            out.extend(self._explain_values(model_expr, x_expr, order, wrt, before, assigned,
                                            x_grad_before, result.result, source))
        display = self._display()
        for e in out:
            display(e)
        return self._shown(out)

    def _x_grad(self, x_expr, quiet=False):
        if x_expr is None:
            return None
        try:
            x = eval(x_expr, self.shell.user_global_ns, self.shell.user_ns)  # noqa: S307
        except Exception:  # noqa: BLE001 - X may be created by the cell itself
            if quiet:
                return None
            raise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(x, "grad", None) if _framework_module(x) == "torch" else None

    def _explain_values(self, model_expr, x_expr, order, wrt, before, assigned, x_grad_before,
                        last_value, source):
        from .api import derivatives
        from .explain import explain, to_array
        from .explain_match import match

        model = self._evaluate(model_expr, "MODEL")
        x = self._evaluate(x_expr, "X")
        try:
            d = derivatives(model, x, order=1, wrt=wrt)
        except NbderivError as exc:
            raise UsageError(str(exc)) from None
        n, d_out, n_in = d.y.shape[0], d.y.shape[1], d[1].shape[-1]
        sizes = {n * d_out * n_in ** k for k in range(1, 4)} | {n * n_in ** k for k in range(1, 4)}
        sizes.add(n * d_out * n * n_in)
        candidates = []
        ns = self.shell.user_ns
        for name, value in list(ns.items()):
            if name.startswith("_") or name in ("In", "Out", "exit", "quit", "get_ipython"):
                continue
            if name in before and before[name] is value and name not in assigned:
                continue
            candidates.append((name, value))
        if _framework_module(x) == "torch":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grad = getattr(x, "grad", None)
            if grad is not x_grad_before or (grad is None and all(
                    v is not None for _, v in candidates) and re.search(
                    rf"{re.escape(x_expr)}\s*\.\s*grad\b", source)):
                candidates.append((f"{x_expr}.grad", grad))
        if last_value is not None and not any(v is last_value for _, v in candidates):
            candidates.append(("the cell's value", last_value))
        out = []
        for name, value in candidates:
            if value is model or value is x or _is_weight(value):
                continue
            if value is None:
                if name == "the cell's value":
                    continue
            elif not _array_like(value):
                continue
            try:
                arr = to_array(value)
            except Exception:  # noqa: BLE001 - not numbers: not a derivative
                continue
            if arr is not None:
                if arr.size not in sizes or arr.size == 0:
                    continue
                arr64 = arr.astype(np.float64) if arr.dtype != bool else arr
                if (match(arr64, d.y, "float32") is not None
                        or match(arr64, d.x, "float32") is not None):
                    continue  # the outputs or the inputs themselves, not a derivative
            try:
                out.append(explain(value, model, x, order, wrt=wrt,
                                   names=(name, model_expr, x_expr)))
            except NbderivError as exc:
                raise UsageError(f"explaining {name}: {exc}") from None
        return out


def _transformed(shell, cell) -> str:
    try:
        return shell.transform_cell(cell)
    except Exception:  # noqa: BLE001 - IPython reports it when the cell runs
        return cell


def _assigned_names(shell, cell) -> set:
    """Names the cell assigns (=, +=, for, with ... as, :=, import), whatever their values."""
    try:
        tree = ast.parse(_transformed(shell, cell))
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
    return names


def _classic(exc) -> bool:
    from .explain_errors import classify

    code = classify(str(exc))
    return code is not None and code != "non-leaf-grad"


def _cell_line(tb, source):
    """(line number, text) of the last traceback frame inside the cell itself."""
    cell_file, found = None, (None, None)
    while tb is not None:
        code = tb.tb_frame.f_code
        if cell_file is None and code.co_name == "<module>":
            cell_file = code.co_filename
        if cell_file is not None and code.co_filename == cell_file:
            found = (tb.tb_lineno, _line_at(source, tb.tb_lineno))
        tb = tb.tb_next
    return found


def _line_at(source, lineno):
    lines = source.splitlines()
    if lineno is not None and 1 <= lineno <= len(lines):
        return lines[lineno - 1]
    return None


def _first_grad_line(source):
    for line in source.splitlines():
        if re.search(r"\.grad\b", line.split("#", 1)[0]):
            return line
    return None


def _framework_module(obj):
    mod = type(obj).__module__
    return "torch" if mod.startswith("torch") else (
        "tensorflow" if mod.startswith(("tensorflow", "keras")) else None)


def _is_weight(value) -> bool:
    """Model weights (torch Parameters, TensorFlow Variables) are never a student's result."""
    names = {c.__name__ for c in type(value).__mro__}
    return bool(names & {"Parameter", "Variable", "ResourceVariable", "KerasVariable"})


def _array_like(value) -> bool:
    if isinstance(value, np.ndarray) or _framework_module(value) is not None:
        return hasattr(value, "shape")
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    return False
