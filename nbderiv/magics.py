"""The ``%nnderiv`` line magic (``%load_ext nbderiv``): derivatives in one line of a notebook.

With :mod:`nbderiv.magic_explain` (the ``%%nnderiv explain`` machinery), the only nbderiv
module that imports IPython; the lines are read by :mod:`nbderiv.magic_parsing`. Loading the
extension registers the magic and does nothing else: no framework, no matplotlib, no widgets
are imported, nothing is printed.

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
grid, which the summary states: two features of one argument, or two separate inputs of one
feature each (a torch ``forward(x, t)``, a Keras model of two ``Input``s), passed as the tuple
``(x, t)``; a grid too large for memory is refused before anything is allocated.

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
import difflib
import re

import numpy as np
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .errors import NbderivError
from .explain_fix import fresh_name
from .magic_explain import ExplainCell
from .magic_parsing import (
    RANGE_POINTS,
    LineError,
    _argv,
    _count,
    _parse_cell_line,
    _parse_wrt,
    check_grid_size,
    parse_range,
    split_line,
    unquoted,
)

FULL_MAX_POINTS = 100   # --full draws an (N*d_out) x (N*d_in) image: small N only
MAGIC_NAMES = ("nnderiv", "nbderiv")  # %nbderiv: the package's name, the same magic
# '%nnderiv?  # all options': IPython sends '%nnderiv?' alone to pinfo, but with a trailing
# comment it looks up a magic named 'nnderiv?', so the help answers under those names too
HELP_NAMES = {f"{name}{marks}": marks for name in MAGIC_NAMES for marks in ("?", "??")}


# -- the magic ---------------------------------------------------------------------------------
@magics_class
class NbderivMagics(ExplainCell, Magics):
    """``%nnderiv`` (also ``%nbderiv``): see :meth:`nnderiv`."""

    @magic_arguments()
    @argument("model", help="the network: a name or expression in the notebook (e.g. net)")
    @argument("x", nargs="?", default=None,
              help="the points: a name or expression (x, x[:100], torch.linspace(-2, 2, 200)) "
                   "or a range LOW:HIGH:N (N points for one input, an N x N grid for two: "
                   "two features, or two separate inputs such as forward(x, t))")
    @argument("-o", "--order", type=int, default=None,
              help="highest derivative order (default 2; 1 when each point of X is an image "
                   "or a sequence)")
    @argument("--target", default=None, metavar="T",
              help="one output per point: an int or an expression in the notebook (e.g. "
                   "labels), as derivatives(..., target=T); saliency maps with --plot")
    @argument("--wrt", default=None, metavar="I,J", help="differentiate w.r.t. these inputs only")
    @argument("--reference", default=None, metavar="F",
              help="a known truth: a NumPy function of x giving y (e.g. np.sin, or "
                   "'lambda x: x**2' in quotes), or a dict {k: f_k} of closed-form "
                   "derivatives; the error per order is shown")
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
        tokens = _usage(split_line, line)
        if {"-h", "--help"} & set(tokens):
            print(parser.format_help())
            return None
        args = _parsed(parser, _usage(_argv, tokens))
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
        except (NbderivError, LineError) as exc:
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
        return self._explain_cell(_usage(_parse_cell_line, line), cell)

    cell_magic("nbderiv")(nnderiv_cell)

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

    def _reference(self, text):
        """--reference F: a name or expression in the notebook, or one in quotes (a lambda,
        which holds blanks: --reference 'lambda x: x**2'); it must give a function of x or a
        dict {k: f_k}."""
        expr = unquoted(text)
        value = self._evaluate(expr, "--reference")
        if callable(value) or isinstance(value, dict):
            return value
        raise UsageError(
            f"--reference {text} gave {type(value).__name__} {_short(value)}, not a function "
            "or a dict. Fix: pass a function of x giving y, by name (--reference np.sin, "
            "--reference f) or as an expression in quotes (--reference 'lambda x: x**2'), or "
            "a dict of closed-form derivatives (--reference '{1: np.cos, 2: lambda x: "
            "-np.sin(x)}').")

    def _points(self, model, text, framework=None, order=2):
        """(x, framework, note) for the X argument: a range shorthand or an expression; the
        note says how many points a grid has (None for one input or an expression)."""
        if text is None:
            raise UsageError("missing X: say where to differentiate, e.g. %nnderiv net x or "
                             "%nnderiv net -2:2:200.")
        rng = parse_range(text)
        if rng is None:
            return self._evaluate(text, "X"), None, None
        from .backends import framework_name

        framework = framework_name(model, framework=framework)
        if framework is None:
            raise UsageError("a range needs to know the model's framework, and this callable "
                             "does not say. Fix: pass X as a tensor, e.g. "
                             "torch.linspace(-2, 2, 200).")
        lo, hi, n = rng
        from .widgets import separate_inputs

        separate = separate_inputs(model, framework)
        if separate is not None:  # forward(x, t), a Keras model of several Inputs
            d_in = len(separate)
            _one_feature_each(text, separate)
        else:
            d_in = _input_width(model, framework, _RANGE_FIX)
        if d_in not in RANGE_POINTS:
            what = "separate inputs" if separate is not None else "inputs"
            example = (f"a tuple of {d_in} arrays of shape (N, 1), one per input"
                       if separate is not None else f"an array of shape (N, {d_in})")
            raise UsageError(f"a range like {text} makes points for models with 1 or 2 inputs; "
                             f"this one takes {d_in} {what}. Fix: pass X as {example}.")
        n = n or RANGE_POINTS[d_in]
        check_grid_size(text, n, d_in, order)  # before anything is allocated
        g = np.linspace(lo, hi, n, dtype=np.float32)
        if d_in == 1:
            return g.reshape(-1, 1), framework, None
        a, b = np.meshgrid(g, g)
        note = (f"grid: {_count(n)} x {_count(n)} = {_count(n ** d_in)} points ({text} on each "
                f"of the {d_in} inputs)")
        if separate is not None:  # one argument each, as derivatives() reads a tuple
            pair = (a.reshape(-1, 1), b.reshape(-1, 1))
            keys = _named_inputs(model, framework)  # a Keras model on a dict of Inputs
            return (dict(zip(keys, pair)) if keys else pair), framework, note
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
        reference = None if args.reference is None else self._reference(args.reference)
        # --full: the cross-sample Jacobian from the same call (one probe, one set of checks)
        J = None
        options = dict(wrt=_parse_wrt(args.wrt), framework=framework, check=args.check,
                       target=target, reference=reference)
        if args.full and target is None:
            from .api import DEFAULT_JACOBIAN_BUDGET, derivatives_and_jacobian

            d, J = derivatives_and_jacobian(model, x, order, **options,
                                            jacobian_budget=DEFAULT_JACOBIAN_BUDGET)
        else:
            d = derivatives(model, x, order=order, **options)
        if note is not None:
            d.notes = [*getattr(d, "notes", ()), note]
        if args.quiet:
            return self._shown(d)
        display = self._display()
        display(d)
        if args.plot and not _per_point_axes(x) and len(d.wrt) > 2:  # the result stands
            print(f"--plot draws curves along one input or heat maps over two; this result has "
                  f"{len(d.wrt)} differentiated inputs ({', '.join(d.inputs[:6])}), so nothing "
                  f"was drawn. Fix: add --wrt 0 (curves along {d.inputs[0]}) or --wrt 0,1 "
                  f"(heat maps over {d.inputs[0]} and {d.inputs[1]}).")
        elif args.plot:  # maps of images and sequences: every order computed, as for curves
            display(d.plot(orders=list(range(1, order + 1))) if _per_point_axes(x) and order > 1
                    else d.plot())
        if args.full:
            from .plot import draw_jacobian, plot_jacobian

            display(draw_jacobian(J) if J is not None else
                    plot_jacobian(model, x, framework=framework, max_points=FULL_MAX_POINTS))
        if args.code:
            print(_code_with_names(d.code, args.model, args.x, x, keep=self.shell.user_ns,
                                   target_text=args.target))
        return self._shown(d)

    def _widget(self, model, args):
        from .backends import framework_name
        from .widgets import (
            EXPLORER_TAKES,
            explore,
            explorer_input_dim,
            point_shape,
            separate_inputs,
        )

        domain, n, framework = (-3.0, 3.0), 200, framework_name(model, framework=args.framework)
        rng = None if args.x is None else parse_range(args.x)
        d_in = None  # separate inputs (forward(x, t)): the explorer reads their widths itself
        given = None if args.x is None or rng is not None else \
            _as_numpy(self._evaluate(args.x, "X"))
        if given is not None and given.ndim >= 3 and point_shape(model, framework) is None:
            # points of several axes, which the model's first layer does not tell (an RNN)
            kind = "an image" if given.ndim >= 4 else "a sequence"
            raise UsageError(
                f"the explorer (--widget) {EXPLORER_TAKES}; {args.x} holds points of shape "
                f"{tuple(given.shape[1:])}: each point is {kind}, not a vector of features. "
                f"Fix: see its derivatives with %nnderiv {args.model} {args.x} --plot "
                "(saliency maps).")
        if framework is not None and separate_inputs(model, framework) is None:
            d_in = explorer_input_dim(
                model, framework=framework, what="the explorer (--widget)",
                d_in_fix=_WIDGET_FIX, model_name=args.model,
                x_name=args.x if args.x is not None and rng is None else None)
        if args.x is not None:
            if rng is not None:
                domain, n = (rng[0], rng[1]), rng[2] or RANGE_POINTS[1]
            else:
                values = given
                if values.size < 2 or not np.ptp(values) > 0:
                    raise UsageError("--widget takes its domain from X, which needs at least two "
                                     "distinct values. Fix: pass a range such as -2:2:200.")
                domain, n = (float(values.min()), float(values.max())), max(len(values), 2)
        w = explore(model, domain=domain, n=n, framework=framework, order=min(args.order, 4),
                    max_order=max(args.order, 4), d_in=d_in)
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



_RANGE_FIX = ("Fix: pass X as an array of shape (N, d_in) instead of a range, e.g. "
              "np.linspace(-2, 2, 200).reshape(-1, 1) for one input feature; for a model of "
              "images or sequences, an array of its points, (N, C, H, W) or (N, T, F).")
_WIDGET_FIX = ("open the explorer with the width given, nbderiv.explore(model, d_in=...) (the "
               "number of input features)")


_EXPLORER_FIX = "Fix: pass d_in= (the number of input features)."


def _input_width(model, framework, fix) -> int:
    """The number of input features, as the explorer reads it (:func:`nbderiv.widgets.input_dim`);
    where it can tell only by ``d_in=``, which the explorer takes and the magic does not, the
    refusal ends with the magic's own ``fix`` instead."""
    from .errors import OptionError
    from .widgets import input_dim

    try:
        return input_dim(model, framework=framework)
    except OptionError as exc:
        text = str(exc)
        if text.endswith(_EXPLORER_FIX):
            text = f"{text[:-len(_EXPLORER_FIX)]}{fix}"
        raise UsageError(text) from None


def _one_feature_each(text, separate) -> None:
    """Refuse a range for separate inputs whose Keras ``Input`` holds more than one feature
    (a range gives each input one coordinate)."""
    wide = [(name, shape) for name, shape in separate if shape is not None and shape != (1,)]
    if wide:
        name, shape = wide[0]
        names = ", ".join(nm for nm, _ in separate)
        dims = ", ".join(map(str, shape))
        raise UsageError(f"a range like {text} gives each input one feature, but input {name} "
                         f"takes points of shape {shape}. Fix: pass X as a tuple of arrays, one "
                         f"per input, ({names}), with {name} of shape (N, {dims}).")


def _parsed(parser, argv):
    """``parser.parse_args(argv)``, an unknown option or a third positional argument told
    with the likely fix (the option it resembles; an expression with blanks in parentheses)."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        text = str(exc)
        m = re.search(r"unrecognized arguments: (.*)", text)
        if m is None:
            raise
        options = [o for a in parser._actions for o in a.option_strings]
        hints, after_option = [], False
        for token in m.group(1).split():
            if after_option and not token.startswith("-"):  # the unknown option's value
                after_option = False
                continue
            after_option = token.startswith("-") and "=" not in token
            if token.startswith("-"):
                close = difflib.get_close_matches(token.split("=")[0], options, n=1, cutoff=0.6)
                hints.append(f"{token}: did you mean {close[0]}?" if close else
                             f"{token}: no such option (%nnderiv -h lists them)")
            elif not hints or not hints[-1].startswith("MODEL X"):
                hints.append(f"{token!r}: %nnderiv takes MODEL and X, then options; an "
                             "expression with blanks goes in parentheses, e.g. %nnderiv "
                             "(lambda z: net(z)) (x[:10])")
        raise UsageError(f"{text.rstrip('.')}. " + "; ".join(hints) + ".") from None


def _usage(parse, line):
    """``parse(line)``, a :class:`LineError` raised as ``UsageError`` (exactly that class, which
    IPython prints as one line)."""
    try:
        return parse(line)
    except LineError as exc:
        raise UsageError(str(exc)) from None


def _named_inputs(model, framework):
    """The input names of a model built on a dict of inputs (in its order), or None."""
    from .backends import get_backend

    try:
        return get_backend(framework).named_inputs(model) if framework else None
    except Exception:  # a nicety for the grid: never fail the magic here
        return None


def _code_with_names(code: str, model_text: str, x_text, x, keep=(), target_text=None) -> str:
    """``d.code`` (written for ``model`` and ``x``) with the names on the magic's line put in
    their place (nothing of the notebook's is rebound: an ``x`` of its own stays as it is,
    and the code's own names that are also names in ``keep``, the notebook's, get a ``_``;
    only its results ``d1`` ... ``dK`` are meant to be bound); a range's points are made
    first, as ``x_range``; ``target_text``, the line's ``--target``, in place of ``target``.

    >>> print(_code_with_names("y = model(x)  # the model's x", "net", "-1:1:3", np.zeros((3, 1))))
    import numpy as np
    x_range = np.linspace(-1.0, 1.0, 3, dtype=np.float32).reshape(-1, 1)      # the range -1:1:3
    y = net(x_range)  # the net's x_range
    """
    head = []
    # the names on the line are kept apart from the code's own (a model named p or a)
    theirs = set(re.findall(r"[A-Za-z_]\w*",
                            f"{model_text or ''} {x_text or ''} {target_text or ''}"))
    results = set(re.findall(r"\bd\d+\b", code))
    code = _own_names_apart(code, theirs | ({str(k) for k in keep} - results))
    rng = None if x_text is None else parse_range(x_text)
    if rng is not None:
        lo, hi, _ = rng
        n = len(x[0]) ** (1 / len(x)) if isinstance(x, tuple) else \
            len(x) ** (1 / np.shape(x)[1])  # each argument / feature takes n values
        g = f"np.linspace({float(lo)!r}, {float(hi)!r}, {int(round(n))}, dtype=np.float32)"
        taken = theirs | set(re.findall(r"[A-Za-z_]\w*", code))
        xr = fresh_name("x_range", taken)
        if not isinstance(x, tuple) and np.shape(x)[1] == 1:
            head.append(f"{xr} = {g}.reshape(-1, 1)      # the range {x_text}")
        else:
            a, b = fresh_name("a", taken), fresh_name("b", taken)
            head.append(f"{a}, {b} = np.meshgrid({g}, {g})      # the grid of {x_text}")
            head.append(f"{xr} = ({a}.reshape(-1, 1), {b}.reshape(-1, 1))"
                        if isinstance(x, tuple) else
                        f"{xr} = np.stack([{a}.ravel(), {b}.ravel()], axis=1)")
        x_text = xr
        if "import numpy as np" not in code:
            head.insert(0, "import numpy as np")

    def named(text):  # an expression that is not a plain name goes in parentheses
        return text if re.fullmatch(r"[A-Za-z_][\w.]*(\[[^\]]*\])?|\(.*\)", text) \
            else f"({text})"

    for old, new in (("model", model_text), ("x", x_text), ("target", target_text)):
        if new is not None and new != old:
            put = named(new)
            after = r"(?![\w=])" if old == "target" else r"(?!\w)"  # (not "# target=:")
            code = re.sub(rf"(?<![\w.]){old}{after}", lambda _, put=put: put, code)
    return "\n".join(head + [code]) if head else code


def _own_names_apart(code: str, theirs: set) -> str:
    """``code`` with each name it assigns (or binds in a lambda or loop) that is also one of
    ``theirs`` renamed (``p`` -> ``p_``), so that putting the line's names in does not mix
    them up; ``model`` and ``x``, the placeholders, are left alone."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    bound = {node.id for node in ast.walk(tree)
             if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    bound |= {a.arg for node in ast.walk(tree) if isinstance(node, ast.Lambda)
              for a in node.args.args}
    clash = (bound & theirs) - {"model", "x"}
    taken = theirs | set(re.findall(r"[A-Za-z_]\w*", code))
    for name in sorted(clash):
        new = fresh_name(name + "_", taken)
        taken.add(new)
        code = re.sub(rf"(?<![\w.]){name}(?!\w)", new, code)
    return code


def _per_point_axes(x) -> bool:
    """Whether each point of X has several axes (an image, a sequence): X of shape (N, *S)
    with len(S) > 1, read from its shape only."""
    if isinstance(x, tuple):
        return False
    shape = getattr(x, "shape", None)
    return len(tuple(shape) if shape is not None else np.shape(x)) > 2


def _short(value) -> str:
    """``value`` as a message shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
