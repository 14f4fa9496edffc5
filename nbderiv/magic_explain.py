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
import functools
import re
import sys
import warnings

import numpy as np
from IPython.core.error import UsageError

from .errors import NbderivError
from .magic_parsing import parse_range


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
            out.append(explain_error(raised["exc"], source=source, line=text, lineno=lineno,
                                     ns=shell.user_ns))
        for message, lineno in seen:
            text = _line_at(source, lineno) or _first_grad_line(source)
            e = explain_warning(message, source=source, line=text,
                                lineno=lineno if _line_at(source, lineno) else None)
            if e is not None and not any(o.code == e.code for o in out):
                out.append(e)
        left = []
        if result.success and model_expr is not None:
            out.extend(self._explain_values(model_expr, x_expr, order, wrt, before, assigned,
                                            x_grad_before, result.result, source, left))
        if result.success and not out:
            print(_nothing_line(source, self.shell.user_ns, model_expr, x_expr, left))
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
                        last_value, source, left=None):
        """The explanations of what the cell computed as derivatives; ``left`` (a list) is
        given (name, why) for each derivative-like name that is not explained."""
        from .api import derivatives
        from .explain import explain, to_array
        from .explain_match import match
        from .explain_tape import differentiation_depths

        left = [] if left is None else left
        model = self._evaluate(model_expr, "MODEL")
        if parse_range(x_expr) is not None:
            raise UsageError(
                f"X {x_expr!r} is a range; %%nnderiv explain compares what the cell computed "
                f"with the model at the very points the cell used, so X names them (a "
                f"variable of the notebook, e.g. %%nnderiv explain {model_expr} xs). Ranges "
                f"such as {x_expr} are for the line magic: %nnderiv {model_expr} {x_expr}.")
        x = self._evaluate(x_expr, "X")
        try:
            d = derivatives(model, x, order=1, wrt=wrt)
        except NbderivError as exc:
            raise UsageError(str(exc)) from None
        n, d_out, n_in = d.y.shape[0], d.y.shape[1], d[1].shape[-1]
        n_all = len(getattr(d, "inputs", ()) or ()) if wrt is not None else n_in
        sizes = {n * d_out * n_in ** k for k in range(1, 4)} | {n * n_in ** k for k in range(1, 4)}
        sizes.add(n * d_out * n * n_in)  # the cross-sample Jacobian
        # the Hessian of the summed output (torch.func.hessian(net)(xs) of one output), and
        # a Jacobian of a Jacobian, over the whole batch
        sizes |= {(n * n_in) ** 2 * d_out, n ** 3 * d_out * n_in ** 2}
        sizes |= {n, n * d_out, n * d_out * max(n_all, 1)}  # parts: u_t, u_xx, a Hessian row
        candidates = []
        ns = self.shell.user_ns
        # only what the cell computed as derivatives (grad, .grad, jacobian, tape.gradient, ...)
        # or from them: not every array that happens to have a matching size
        direct, derived, last_is_derivative = derivative_names(source, ns)
        for name, value in list(ns.items()):
            if name.startswith("_") or name in ("In", "Out", "exit", "quit", "get_ipython"):
                continue
            if name in before and before[name] is value and name not in assigned:
                continue
            if name in direct or name in derived:
                candidates.append((name, value))
        for name in sorted(assigned):  # X.grad of a leaf copy of X that the cell made
            value = ns.get(name)
            if name in direct or _framework_module(value) != "torch" or value is x:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g = getattr(value, "grad", None)
            if g is not None and getattr(value, "is_leaf", False) and _same_values(value, x):
                candidates.append((f"{name}.grad", g))
        if _framework_module(x) == "torch":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grad = getattr(x, "grad", None)
            if grad is not x_grad_before or (grad is None and all(
                    v is not None for _, v in candidates) and re.search(
                    rf"{re.escape(x_expr)}\s*\.\s*grad\b", source)):
                candidates.append((f"{x_expr}.grad", grad))
        if (last_value is not None and last_is_derivative
                and not any(v is last_value for _, v in candidates)):
            candidates.append(("the cell's value", last_value))
        out, seen = [], set()
        depths = differentiation_depths(source)
        for name, value in candidates:
            if value is model or value is x or _is_weight(value):
                continue
            if value is not None:
                if id(value) in seen:
                    continue
                seen.add(id(value))
            if value is None:
                if name == "the cell's value":
                    continue
            elif not _array_like(value):
                left.append((name, "not an array"))
                continue
            try:
                arr = to_array(value)
            except Exception as exc:  # noqa: BLE001 - not numbers: not a derivative
                several = str(exc).startswith("mine is a")
                left.append((name, "arrays of several shapes (gradients with respect to the "
                                   "model's weights?), not a derivative with respect to X"
                             if several else "not numbers"))
                continue
            if arr is not None:
                if arr.size not in sizes or arr.size == 0:
                    left.append((name, f"{arr.size} numbers, no derivative's size"))
                    continue
                arr64 = arr.astype(np.float64) if arr.dtype != bool else arr
                if (match(arr64, d.y, "float32") is not None
                        or match(arr64, d.x, "float32") is not None):
                    left.append((name, "the outputs or the inputs themselves"))
                    continue  # the outputs or the inputs themselves, not a derivative
            try:
                e = explain(value, model, x, _order_of(name, order, depths), wrt=wrt,
                            names=(name, model_expr, x_expr), _cell=(source, ns))
            except NbderivError as exc:
                raise UsageError(f"explaining {name}: {exc}") from None
            if name in derived and name not in direct and e.code in (
                    "wrong", "zeros-graph-broken", "none"):
                left.append((name, "arithmetic on derivatives, no derivative itself"))
                continue  # arithmetic on derivatives (a PDE residual): not meant as one
            out.append(e)
        return out


def _order_of(name, order, depths):
    """The order ``name`` is explained at: ``order`` (--order), except for a lower-order step
    on the way to it (u_t, differentiated again into the u_tt that --order 2 is about),
    which is explained at its own order (``depths``: what the cell's code makes each name).

    >>> _order_of("u_t", 2, {"u_t": 1, "u_tt": 2}), _order_of("u_tt", 2, {"u_t": 1, "u_tt": 2})
    (1, 2)
    """
    k = depths.get(name)
    if order is not None and k and k < order and max(depths.values()) >= order:
        return k
    return order


def _nothing_line(source, ns, model_expr, x_expr, left) -> str:
    """The one line printed when a cell ran and nothing was explained: what was looked for
    and how to get an explanation.

    >>> print(_nothing_line("y = net(x)", {}, "net", "x", []))
    nbderiv explain: nothing to explain: the cell raised no autograd error and computed no derivative (no grad, .grad, jacobian, tape.gradient, ... call) to compare with net at x.
    >>> print(_nothing_line("g, = torch.autograd.grad(y, x, torch.ones_like(y))", {}, None,
    ...                     None, []))
    nbderiv explain: the cell raised no autograd error; to check the derivatives it computed (g) against the model, name the model and its input: %%nnderiv explain MODEL X
    """
    direct, derived, last = derivative_names(source, ns)
    names = sorted(direct) + sorted(derived - direct) + (["the cell's value"] if last else [])
    head = "nbderiv explain: "
    if model_expr is None:
        if names:
            return (head + "the cell raised no autograd error; to check the derivatives it "
                    f"computed ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}) "
                    "against the model, name the model and its input: "
                    "%%nnderiv explain MODEL X")
        return (head + "the cell raised no autograd error, and it computed no derivative (no "
                "grad, .grad, jacobian, tape.gradient, ... call); with %%nnderiv explain MODEL "
                "X the derivatives a cell computes are checked against MODEL at X.")
    if not left and not names:
        return (head + "nothing to explain: the cell raised no autograd error and computed no "
                "derivative (no grad, .grad, jacobian, tape.gradient, ... call) to compare "
                f"with {model_expr} at {x_expr}.")
    why = "; ".join(f"{n}: {w}" for n, w in left[:6])
    return (head + "nothing to explain: the cell raised no autograd error, and no value it "
            "left in the namespace from its derivative computations holds a derivative-like "
            f"array of {model_expr} at {x_expr}" + (f" ({why})." if why else "."))


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


# calls whose result is a derivative (the last name of the called expression)
DERIVATIVE_CALLS = frozenset({
    "grad", "gradient", "gradients", "jacobian", "batch_jacobian", "hessian", "hessians",
    "jacrev", "jacfwd", "vjp", "jvp", "hvp", "vhp", "derivatives", "full_jacobian"})


def _called_name(call):
    f = call.func
    while isinstance(f, ast.Call):  # torch.func.grad(f)(x)
        f = f.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _user_derivative_functions(tree, ns) -> set:
    """Functions (of the cell, or of the namespace) whose code computes a derivative."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if any(isinstance(c, ast.Call) and _called_name(c) in DERIVATIVE_CALLS
                   for c in ast.walk(node)) and not isinstance(node, ast.Lambda):
                found.add(node.name)
    import inspect
    import types

    def computes_derivative(fn) -> bool:
        for _ in range(4):  # a tf.function, a partial, a decorated function: the one inside
            inner = getattr(fn, "python_function", None) or getattr(fn, "__wrapped__", None) \
                or (fn.func if isinstance(fn, functools.partial) else None)
            if inner is None:
                break
            fn = inner
        if not isinstance(fn, types.FunctionType):
            return False
        try:
            body = ast.parse(inspect.cleandoc("\n" + inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return False
        return any(isinstance(c, ast.Call) and _called_name(c) in DERIVATIVE_CALLS
                   for c in ast.walk(body))

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id not in found:
            if computes_derivative(ns.get(node.func.id)):
                found.add(node.func.id)
        elif isinstance(node.func, ast.Call) and node.func.args and isinstance(
                node.func.args[0], ast.Name) and _called_name(node.func) in _WRAPPERS:
            # tf.function(grads)(x), torch.compile(grads)(x): the wrapped function's code
            if computes_derivative(ns.get(node.func.args[0].id)):
                found.add(_called_name(node.func))
    return found


_WRAPPERS = frozenset({"function", "compile", "jit", "partial"})  # f(...) of a function g


def _target_names(target) -> list:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _target_names(t)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    if isinstance(target, (ast.Subscript, ast.Attribute)):  # g[:, 0] = ..., marks g
        return _target_names(target.value)
    return []


def derivative_names(source, ns=None):
    r"""(direct, derived, last): the names the cell assigns from a derivative computation
    (a grad/jacobian/hessian/tape.gradient call, a ``.grad``, or an index, reshape or call of
    such a name), the names assigned from arithmetic on those (a PDE residual), and whether
    the cell's last expression is one.

    >>> direct, derived, last = derivative_names(
    ...     "u = net(x)\ng, = torch.autograd.grad(u.sum(), x)\nu_x = g[:, 0:1]\n"
    ...     "res = u_x - 1\nM = torch.zeros(8, 2)\n")
    >>> sorted(direct), sorted(derived), last
    (['g', 'u_x'], ['res'], False)
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set(), set(), False
    calls = DERIVATIVE_CALLS | _user_derivative_functions(tree, ns or {})
    direct, derived = set(), set()

    def kind(expr):
        if expr is None:
            return None
        known = direct | derived
        hit = any((isinstance(c, ast.Call) and _called_name(c) in calls)
                  or (isinstance(c, ast.Attribute) and c.attr == "grad")
                  or (isinstance(c, ast.Name) and c.id in known) for c in ast.walk(expr))
        if not hit:
            return None
        return "derived" if isinstance(expr, (ast.BinOp, ast.UnaryOp)) else "direct"

    for _ in range(4):  # a fixed point: names made from names made from derivatives
        size = len(direct) + len(derived)
        for node in ast.walk(tree):
            pairs = []
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                pairs = [(node.target, node.value)]
            elif isinstance(node, ast.NamedExpr):
                pairs = [(node.target, node.value)]
            elif isinstance(node, ast.For):
                pairs = [(node.target, node.iter)]
            elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                  and isinstance(node.value.func, ast.Attribute)):  # grads.append(...)
                call = node.value
                args = ast.Tuple(elts=list(call.args), ctx=ast.Load())
                pairs = [(call.func.value, args)] if call.args else []
            for target, value in pairs:
                k = kind(value)
                for name in _target_names(target):
                    if k == "direct":
                        direct.add(name)
                        derived.discard(name)
                    elif k == "derived" and name not in direct:
                        derived.add(name)
        if len(direct) + len(derived) == size:
            break
    body = tree.body
    last = bool(body) and isinstance(body[-1], ast.Expr) and kind(body[-1].value) is not None
    return direct, derived, last


def _same_values(a, b) -> bool:
    try:
        A = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=float)
        B = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else b, dtype=float)
    except Exception:  # noqa: BLE001 - not numbers
        return False
    return A.shape == B.shape and np.array_equal(A, B)
