"""The ``%nnderiv`` line magic (``%load_ext nbderiv``): derivatives in one line of a notebook.

The only nbderiv module that imports IPython. Loading the extension registers the magic and
does nothing else: no framework, no matplotlib, no widgets are imported, nothing is printed.

Display: the magic displays the ``Derivatives`` summary itself and returns the object, so
``d = %nnderiv net x`` shows the summary and keeps ``d``. When the magic is the last line of
a cell, IPython would display the returned value again (as ``%timeit -o`` does); nbderiv
marks the returned object as already shown for the rest of that cell, so the summary
appears exactly once either way (``Out[n]`` and ``_`` still hold the value). ``--quiet``
displays nothing at all, not even as the cell's last value.

Errors are one line: :class:`IPython.core.error.UsageError` (exactly that class, which
IPython prints without a traceback) for unknown names, unparseable expressions, bad
options and every nbderiv error.

The line reads like Python: ``# ...`` outside quotes is a comment, ``%nnderiv?`` shows the
help with or without a trailing comment (IPython then looks for a magic named ``nnderiv?``,
which nbderiv registers), and ``%nbderiv`` (the package's name) is the
same magic. A range shorthand ``LOW:HIGH:COUNT`` on a model with two inputs is a COUNT x COUNT
grid, which the summary states; a grid too large for memory is refused before anything is
allocated.

``%%nnderiv explain [MODEL X] [--order K] [--wrt I,J]`` (also ``%%nbderiv``) is a cell magic:
it runs the cell in the notebook's namespace as if it were run normally (its variables stay,
its last value is shown), then explains what went wrong. A classic autograd error
(:mod:`nbderiv.explain_errors`) is shown as what it means for this code, with the fix, instead
of the traceback; any other error is shown unchanged. If the cell ran, every variable it
created or changed that holds an array, a tensor or None of a derivative-like size for MODEL at
X (and ``X.grad``, and the cell's last value) is explained with :func:`nbderiv.explain`. The
magic displays each explanation once and returns them in a list.

>>> from IPython.core.interactiveshell import InteractiveShell
>>> shell = InteractiveShell.instance()
>>> shell.run_line_magic("load_ext", "nbderiv")
>>> _ = shell.run_cell("import torch; net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh())")
>>> d = shell.run_line_magic("nnderiv", "net -2:2:50 --quiet")
>>> d[2].shape
(50, 4, 1, 1)
"""

from __future__ import annotations

import ast
import re
import sys
import warnings

import numpy as np
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .errors import NbderivError

FULL_MAX_POINTS = 100   # --full draws an (N*d_out) x (N*d_in) image: small N only
RANGE_POINTS = {1: 200, 2: 50}  # points (per side) of a range without a count
RANGE_MAX_BYTES = 2 * 2**30  # a range's points and their derivatives may take this much
MAGIC_NAMES = ("nnderiv", "nbderiv")  # %nbderiv: the package's name, the same magic
# '%nnderiv?  # all options': IPython sends '%nnderiv?' alone to pinfo, but with a trailing
# comment it looks up a magic named 'nnderiv?', so the help answers under those names too
HELP_NAMES = {f"{name}{marks}": marks for name in MAGIC_NAMES for marks in ("?", "??")}
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER}):({_NUMBER})(?::(\d+))?$")
_VALUE_OPTIONS = {"-o", "--order", "--wrt", "--framework", "--target", "--reference"}
_FLAG_OPTIONS = {"-p", "--plot", "--check", "--code", "--full", "--widget", "-q", "--quiet",
                 "-h", "--help"}
_OPENING, _CLOSING = "([{", ")]}"


# -- parsing ----------------------------------------------------------------------------------
def split_line(line: str) -> list:
    """Split a magic's line on blanks outside brackets and quotes, so that
    ``torch.linspace(-2, 2, 200)`` stays one argument; ``#`` outside quotes starts a comment,
    as in Python.

    >>> split_line("net torch.linspace(-2, 2, 200) -o 3   # three orders")
    ['net', 'torch.linspace(-2, 2, 200)', '-o', '3']
    """
    tokens, current, stack, quote = [], [], [], None
    escaped = False
    for ch in line:
        if quote:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == "#":
            break  # a comment, to the end of the line
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch in _OPENING:
            stack.append(_CLOSING[_OPENING.index(ch)])
            current.append(ch)
        elif ch in _CLOSING:
            if not stack or stack.pop() != ch:
                raise UsageError(f"unbalanced {ch!r} in: {line.strip()}")
            current.append(ch)
        elif ch.isspace() and not stack:
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if quote or stack:
        missing = quote or stack[-1]
        raise UsageError(f"unclosed expression (missing {missing!r}) in: {line.strip()}")
    if current:
        tokens.append("".join(current))
    return tokens


def _argv(tokens: list) -> list:
    """Options first, then ``--`` and the positionals: a leading minus sign (``-2:2:200``,
    ``-x``) never turns an expression into an option."""
    options, positionals = [], []
    it = iter(tokens)
    for t in it:
        head = t.split("=", 1)[0]
        if t in _VALUE_OPTIONS:
            options.append(t)
            nxt = next(it, None)
            if nxt is not None:
                options.append(nxt)
        elif head in _VALUE_OPTIONS and "=" in t and t.startswith("--"):
            options.append(t)
        elif re.fullmatch(r"-o\d+", t) or t in _FLAG_OPTIONS or re.fullmatch(r"-[pqh]{2,}", t):
            options.append(t)
        elif t.startswith("--"):
            options.append(t)  # unknown: argparse reports it
        else:
            positionals.append(t)
    return options + ["--"] + positionals


def parse_range(text: str):
    """``"-2:2:200"`` -> (-2.0, 2.0, 200); ``"0:1"`` -> (0.0, 1.0, None); else None."""
    m = _RANGE.match(text.strip())
    if m is None:
        return None
    lo, hi, n = float(m.group(1)), float(m.group(2)), m.group(3)
    if not lo < hi:
        raise UsageError(f"range {text!r} needs low < high, e.g. -2:2:200.")
    if n is not None and int(n) < 2:
        raise UsageError(f"range {text!r} needs at least 2 points, e.g. -2:2:200.")
    return lo, hi, None if n is None else int(n)


def _parse_wrt(text):
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""] or None
    except ValueError:
        raise UsageError(f"--wrt takes input indices separated by commas (e.g. --wrt 0,1), got "
                         f"{text!r}.") from None


# -- the magic ---------------------------------------------------------------------------------
@magics_class
class NbderivMagics(Magics):
    """``%nnderiv`` (also ``%nbderiv``): see :meth:`nnderiv`."""

    @magic_arguments()
    @argument("model", help="the network: a name or expression in the notebook (e.g. net)")
    @argument("x", nargs="?", default=None,
              help="the points: a name or expression (x, x[:100], torch.linspace(-2, 2, 200)) "
                   "or a range LOW:HIGH:N (N points for one input, an N x N grid for two)")
    @argument("-o", "--order", type=int, default=None,
              help="highest derivative order (default 2; 1 when each point of X is an image "
                   "or a sequence)")
    @argument("--target", default=None, metavar="T",
              help="one output per point: an int or an expression in the notebook (e.g. "
                   "labels), as derivatives(..., target=T); saliency maps with --plot")
    @argument("--wrt", default=None, metavar="I,J", help="differentiate w.r.t. these inputs only")
    @argument("--reference", default=None, metavar="F",
              help="a known truth: a NumPy function of x giving y (e.g. np.sin), or a dict "
                   "{k: f_k} of closed-form derivatives; the error per order is shown")
    @argument("-p", "--plot", action="store_true", help="draw y and its derivatives")
    @argument("--check", action="store_true", help="compare with finite differences")
    @argument("--code", action="store_true", help="print the equivalent framework code")
    @argument("--full", action="store_true",
              help=f"draw the cross-sample Jacobian (N <= {FULL_MAX_POINTS} points)")
    @argument("--widget", action="store_true", help="open the interactive explorer instead")
    @argument("-q", "--quiet", action="store_true",
              help="display nothing, just return (--check still runs and fills d.check)")
    @argument("--framework", default=None, choices=("torch", "tensorflow"),
              help="the framework of a plain function given a numpy X")
    @argument("-h", "--help", action="store_true", help="show this help")
    @line_magic
    def nnderiv(self, line):
        """Per-point derivatives of MODEL at X, displayed as a summary and returned.

        Examples: ``%nnderiv net x``, ``d = %nnderiv net -2:2:200 -o 3 --plot``,
        ``%nnderiv net x[:10] --full``, ``%nnderiv net --widget``. ``%nbderiv`` is the same
        magic; ``# ...`` ends the line as in Python. A range LOW:HIGH:N on a model with two
        inputs is an N x N grid (the summary says how many points).
        """
        parser = self.nnderiv.parser
        tokens = split_line(line)
        if {"-h", "--help"} & set(tokens):
            print(parser.format_help())
            return None
        args = parser.parse_args(_argv(tokens))
        args.order_given = args.order is not None  # if not, X decides: 2, or 1 for images
        args.order = 2 if args.order is None else args.order
        if args.order < 1:
            raise UsageError(f"--order must be 1 or more, got {args.order}.")
        extras = [name for name in ("plot", "check", "code", "full") if getattr(args, name)]
        shown = [name for name in extras if name != "check"]
        if args.quiet and (shown or args.widget):
            raise UsageError(f"--quiet displays nothing; it cannot be combined with "
                             f"--{(shown or ['widget'])[0]}.")
        model = self._evaluate(args.model, "MODEL")
        try:
            if args.widget:
                if extras:
                    raise UsageError(f"--widget opens the explorer; it cannot be combined with "
                                     f"--{extras[0]}.")
                return self._widget(model, args)
            return self._derivatives(model, args)
        except NbderivError as exc:
            raise UsageError(str(exc)) from None
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model itself failed: still one line
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UsageError(f"the model raised {type(exc).__name__}: {text[:300]}. Fix: check "
                             "the model on these points; nbderiv.derivatives(model, x) shows the "
                             "full traceback.") from None

    line_magic("nbderiv")(nnderiv)  # the package's name: the same magic

    @cell_magic("nnderiv")
    def nnderiv_cell(self, line, cell):
        """``%%nnderiv explain [MODEL X] [--order K] [--wrt I,J]``: run the cell, then explain
        its autograd error, or the derivatives it computed (the variables it created or
        changed), against nbderiv's own per-point derivatives of MODEL at X.

        Returns the list of explanations (``Explanation`` / ``ErrorExplanation``: ``.code``,
        ``.message``, ``.fix``), each displayed once. MODEL and X are optional when only an
        error is to be explained.
        """
        return self._explain_cell(line, cell)

    cell_magic("nbderiv")(nnderiv_cell)

    def _explain_cell(self, line, cell):
        mode, model_expr, x_expr, order, wrt = _parse_cell_line(line)
        shell = self.shell
        ns = shell.user_ns
        before = dict(ns)
        x_grad_before = self._x_grad(x_expr, quiet=True)
        assigned = _assigned_names(shell, cell)
        source = _transformed(shell, cell)
        raised, seen = {}, []
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
                    return shown_before(message, category, filename, lineno, file, line)

                warnings.showwarning = showwarning
                result = shell.run_cell(cell, store_history=False)
        finally:
            shell.displayhook.exec_result = outer_result  # the nested run_cell cleared it
            if own_showtraceback is None:
                shell.__dict__.pop("showtraceback", None)
            else:
                shell.showtraceback = own_showtraceback
        from .explain_errors import explain_error, explain_warning

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
        from .explain import explain, match, to_array

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

    # -- pieces ----------------------------------------------------------------------------
    def _evaluate(self, expr, what):
        try:
            return eval(expr, self.shell.user_global_ns, self.shell.user_ns)  # noqa: S307
        except SyntaxError as exc:
            raise UsageError(f"cannot parse {what} {expr!r}: {exc.msg}.") from None
        except NameError as exc:
            raise UsageError(f"{what} {expr!r}: {exc} in this notebook. Fix: run the cell that "
                             "defines it, or check the spelling.") from None
        except Exception as exc:  # noqa: BLE001 - the user's expression failed
            raise UsageError(f"evaluating {what} {expr!r} raised {type(exc).__name__}: "
                             f"{exc}") from None

    def _points(self, model, text, framework=None, order=2):
        """(x, framework, note) for the X argument: a range shorthand or an expression; the
        note says how many points a grid has (None for one input or an expression)."""
        if text is None:
            raise UsageError("missing X: say where to differentiate, e.g. %nnderiv net x or "
                             "%nnderiv net -2:2:200.")
        rng = parse_range(text)
        if rng is None:
            return self._evaluate(text, "X"), None, None
        from .widgets import input_dim, resolve_framework

        framework = resolve_framework(model, framework)
        if framework is None:
            raise UsageError("a range needs to know the model's framework, and this callable "
                             "does not say. Fix: pass X as a tensor, e.g. "
                             "torch.linspace(-2, 2, 200).")
        d_in = input_dim(model, framework=framework)
        if d_in not in RANGE_POINTS:
            raise UsageError(f"a range like {text} makes points for models with 1 or 2 inputs; "
                             f"this one takes {d_in}. Fix: pass an array of shape (N, {d_in}).")
        lo, hi, n = rng
        n = n or RANGE_POINTS[d_in]
        check_grid_size(text, n, d_in, order)  # before anything is allocated
        g = np.linspace(lo, hi, n, dtype=np.float32)
        if d_in == 1:
            return g.reshape(-1, 1), framework, None
        a, b = np.meshgrid(g, g)
        note = (f"grid: {_count(n)} x {_count(n)} = {_count(n ** d_in)} points ({text} on each "
                f"of the {d_in} inputs)")
        return np.stack([a.ravel(), b.ravel()], axis=1), framework, note

    def _derivatives(self, model, args):
        from .api import derivatives

        x, framework, note = self._points(model, args.x, args.framework, args.order)
        framework = framework or args.framework
        if args.full:
            from .plot import count_points

            n = count_points(x)
            if n is not None and n > FULL_MAX_POINTS:
                raise UsageError(f"--full draws the N x N cross-sample Jacobian; N={n} points is "
                                 f"too many (at most {FULL_MAX_POINTS}). Fix: pass fewer points, "
                                 "e.g. x[:20].")
        order = args.order if args.order_given or not _per_point_axes(x) else 1
        target = None if args.target is None else self._evaluate(args.target, "--target")
        reference = None if args.reference is None else \
            self._evaluate(args.reference, "--reference")
        d = derivatives(model, x, order=order, wrt=_parse_wrt(args.wrt),
                        framework=framework, check=args.check, target=target,
                        reference=reference)
        if note is not None:
            d.notes = [*getattr(d, "notes", ()), note]
        if args.quiet:
            return self._shown(d)
        display = self._display()
        display(d)
        if args.plot:
            display(d.plot())
        if args.full:
            from .plot import plot_jacobian

            display(plot_jacobian(model, x, framework=framework, max_points=FULL_MAX_POINTS))
        if args.code:
            print(d.code)
        return self._shown(d)

    def _widget(self, model, args):
        from .widgets import explore, resolve_framework

        domain, n, framework = (-3.0, 3.0), 200, resolve_framework(model, args.framework)
        if args.x is not None:
            rng = parse_range(args.x)
            if rng is not None:
                domain, n = (rng[0], rng[1]), rng[2] or RANGE_POINTS[1]
            else:
                values = _as_numpy(self._evaluate(args.x, "X"))
                if values.size < 2 or not np.ptp(values) > 0:
                    raise UsageError("--widget takes its domain from X, which needs at least two "
                                     "distinct values. Fix: pass a range such as -2:2:200.")
                domain, n = (float(values.min()), float(values.max())), max(len(values), 2)
        w = explore(model, domain=domain, n=n, framework=framework, order=min(args.order, 4),
                    max_order=max(args.order, 4))
        self._display()(w)
        return self._shown(w)

    @staticmethod
    def _display():
        from IPython.display import display

        return display

    def _shown(self, obj):
        """Mark ``obj`` as displayed until this cell ends (see the module docstring)."""
        def already_shown():
            return None

        try:
            obj._ipython_display_ = already_shown
        except (AttributeError, TypeError):
            return obj

        def forget(*_):
            if obj.__dict__.get("_ipython_display_") is already_shown:
                del obj.__dict__["_ipython_display_"]
            self.shell.events.unregister("post_run_cell", forget)

        self.shell.events.register("post_run_cell", forget)
        return obj


class Explanations(list):
    """The list ``%%nnderiv explain`` returns (a list that can be marked as shown)."""


def _parse_cell_line(line):
    """(mode, MODEL, X, order, wrt) of ``explain [MODEL X] [--order K] [--wrt I,J]``."""
    tokens = split_line(line)
    usage = ("usage: %%nnderiv explain [MODEL X] [--order K] [--wrt I,J], e.g. "
             "%%nnderiv explain net x --order 2")
    if not tokens or tokens[0] != "explain":
        raise UsageError(f"the cell magic %%nnderiv takes 'explain' first; {usage}.")
    order, wrt, positionals = None, None, []
    it = iter(tokens[1:])
    for t in it:
        head, _, value = t.partition("=")
        if head in ("-o", "--order") or re.fullmatch(r"-o\d+", t):
            value = value or (t[2:] if re.fullmatch(r"-o\d+", t) else next(it, None))
            try:
                order = int(value)
            except (TypeError, ValueError):
                raise UsageError(f"--order takes a positive integer, got {value!r}; "
                                 f"{usage}.") from None
            if order < 1:
                raise UsageError(f"--order must be 1 or more, got {order}.")
        elif head == "--wrt":
            wrt = _parse_wrt(value or next(it, None))
        elif t.startswith("--") or (t.startswith("-") and t[1:2].isalpha()
                                    and len(t) == 2):
            raise UsageError(f"unknown option {t}; {usage}.")
        else:
            positionals.append(t)
    if len(positionals) == 1:
        raise UsageError(f"MODEL {positionals[0]!r} given without X: say where the "
                         f"derivatives were taken; {usage}.")
    if len(positionals) > 2:
        raise UsageError(f"too many arguments {positionals[2:]}; {usage}.")
    model, x = (positionals + [None, None])[:2]
    return "explain", model, x, order, wrt


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


def _per_point_axes(x) -> bool:
    """Whether each point of X has several axes (an image, a sequence): X of shape (N, *S)
    with len(S) > 1, read from its shape only."""
    if isinstance(x, tuple):
        return False
    shape = getattr(x, "shape", None)
    return len(tuple(shape) if shape is not None else np.shape(x)) > 2


def _count(n: int) -> str:
    """``40000`` -> ``'40 000'``."""
    return f"{n:,}".replace(",", " ")


def _bytes(b: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "bytes" else f"{b:.3g} {unit}"
        b /= 1024
    return ""  # unreachable


def grid_bytes(n: int, d_in: int, order: int) -> int:
    """A lower bound on the memory of a range's points and their derivatives: N = n**d_in
    float32 points (d_in coordinates, built through d_in meshgrid arrays) and, for one output,
    y and every derivative up to ``order`` (1 + d_in + ... + d_in**order numbers per point).

    >>> grid_bytes(200, 2, 2)   # 40 000 points, 2 + 2 + 1 + 2 + 4 floats each
    1760000
    """
    per_point = 2 * d_in + sum(d_in ** k for k in range(order + 1))
    return n ** d_in * 4 * per_point


def check_grid_size(text: str, n: int, d_in: int, order: int, budget: int = RANGE_MAX_BYTES):
    """Refuse a range whose grid would not fit (``UsageError`` naming the size and the fix)."""
    need = grid_bytes(n, d_in, order)
    if need <= budget:
        return
    per_point = need / n ** d_in
    side = int((budget / per_point) ** (1 / d_in))
    scale = 10 ** (len(str(side)) - 1)
    side = max(2, side // scale * scale)  # a round suggestion
    lo, _, _ = text.rpartition(":")
    shape = " x ".join([_count(n)] * d_in)
    grid = (f"a {shape} grid = {_count(n ** d_in)} points" if d_in > 1
            else f"{_count(n)} points")
    raise UsageError(
        f"the range {text} on a model with {d_in} input(s) is {grid}: about {_bytes(need)} for "
        f"the points and their derivatives up to order {order}, more than the "
        f"{_bytes(budget)} a range may take. Fix: fewer points, e.g. {lo}:{side} "
        f"({_count(side ** d_in)} points), or pass your own X.")


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"X could not be read as numbers: {exc}") from None


def _help_magic(marks):
    """The line magic behind ``%nnderiv?  # ...``: the same as ``%nnderiv?`` (pinfo), or
    ``%nnderiv??`` (pinfo2); whatever follows on the line is ignored."""
    def show_help(line=""):
        from IPython import get_ipython

        get_ipython().run_line_magic("pinfo" if marks == "?" else "pinfo2", "%nnderiv")

    show_help.__doc__ = "Help for %nnderiv (the same as %nnderiv?)."
    return show_help


def load_ipython_extension(ipython):
    """``%load_ext nbderiv``: register ``%nnderiv`` and ``%nbderiv`` (line magics) and
    ``%%nnderiv explain`` / ``%%nbderiv explain`` (cell magics); imports no framework, prints
    nothing."""
    ipython.register_magics(NbderivMagics)
    for name, marks in HELP_NAMES.items():
        ipython.register_magic_function(_help_magic(marks), "line", name)


def unload_ipython_extension(ipython):
    """``%unload_ext nbderiv``: remove ``%nnderiv`` and ``%nbderiv``."""
    for name in (*MAGIC_NAMES, *HELP_NAMES):
        ipython.magics_manager.magics["line"].pop(name, None)
    for name in MAGIC_NAMES:
        ipython.magics_manager.magics["cell"].pop(name, None)
