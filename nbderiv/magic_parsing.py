"""Reading the lines of ``%nnderiv`` and ``%%nnderiv explain``: tokens, options, ranges.

Plain Python, no IPython: a line that cannot be read raises :class:`LineError` (a
``ValueError``), which :mod:`nbderiv.magics` turns into IPython's one-line ``UsageError``. A
range ``LOW:HIGH:COUNT`` is read here, and a grid too large for memory is refused here,
before anything is allocated.
"""

from __future__ import annotations

import ast
import re

RANGE_POINTS = {1: 200, 2: 50}  # points (per side) of a range without a count
RANGE_MAX_BYTES = 2 * 2**30  # a range's points and their derivatives may take this much
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER}):({_NUMBER})(?::(\d+))?$")
_RANGE_ANY_COUNT = re.compile(rf"^({_NUMBER}):({_NUMBER}):(\S+)$")  # a count that is no int
_VALUE_OPTIONS = {"-o", "--order", "--wrt", "--framework", "--target", "--reference"}
_FLAG_OPTIONS = {"-p", "--plot", "--check", "--code", "--full", "--widget", "-q", "--quiet",
                 "-h", "--help"}
_OPENING, _CLOSING = "([{", ")]}"



class LineError(ValueError):
    """A magic's line that cannot be read; the magics show it as one line (``UsageError``)."""


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
                raise LineError(f"unbalanced {ch!r} in: {line.strip()}")
            current.append(ch)
        elif ch.isspace() and not stack:
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if quote or stack:
        missing = quote or stack[-1]
        raise LineError(f"unclosed expression (missing {missing!r}) in: {line.strip()}")
    if current:
        tokens.append("".join(current))
    return tokens


def refuse_bare_lambda(tokens: list, magic: str = "%nnderiv") -> None:
    """A lambda on a magic's line is split at its blanks (``lambda``, ``z:``, ``net(z)``):
    say to put it in parentheses, or to name it first.

    >>> refuse_bare_lambda(["lambda", "z:", "net(z)", "x"])
    Traceback (most recent call last):
    ...
    nbderiv.magic_parsing.LineError: MODEL 'lambda z: net(z) x' is a lambda without parentheses: the line is split at its blanks, so it reads as several arguments. Fix: %nnderiv (lambda z: net(z)) x, or name it first: f = lambda z: net(z), then %nnderiv f x.
    """
    if not tokens or not re.match(r"lambda\b", tokens[0]):
        return
    rest = tokens
    # the lambda: a run of tokens that reads as one Python expression, before any option
    # (the line splits at blanks outside brackets: ``t ** 3`` is three tokens)
    options = next((i for i, t in enumerate(rest) if re.match(r"-(-|[a-z])", t)), len(rest))
    ends = []
    for i in range(1, options + 1):
        try:
            ast.parse(" ".join(rest[:i]), mode="eval")
        except SyntaxError:
            continue
        ends.append(i)
    # X follows the lambda: the longest expression that leaves a token for it, if any
    end = next((i for i in reversed(ends) if i < len(rest)), ends[-1] if ends else None)
    if end is None:
        guess, after = " ".join(rest), "X"
    else:
        guess, after = " ".join(rest[:end]), " ".join(rest[end:]) or "X"
    raise LineError(f"MODEL {' '.join(rest)!r} is a lambda without parentheses: the line is "
                    "split at its blanks, so it reads as several arguments. Fix: "
                    f"{magic} ({guess}) {after}, or name it first: f = {guess}, then "
                    f"{magic} f {after}.")


def _argv(tokens: list) -> list:
    """Options first, then ``--`` and the positionals: a leading minus sign (``-2:2:200``,
    ``-x``) never turns an expression into an option."""
    refuse_bare_lambda(tokens)
    options, positionals = [], []
    it = iter(tokens)
    for t in it:
        head = t.split("=", 1)[0]
        if t in _VALUE_OPTIONS:
            options.append(t)
            nxt = next(it, None)
            if nxt is not None:
                _whole_value(t, nxt)
                options.append(nxt)
        elif head in _VALUE_OPTIONS and "=" in t and t.startswith("--"):
            _whole_value(head, t.split("=", 1)[1])
            options.append(t)
        elif re.fullmatch(r"-o\d+", t) or t in _FLAG_OPTIONS or re.fullmatch(r"-[pqh]{2,}", t):
            options.append(t)
        elif t.startswith("--"):
            options.append(t)  # unknown: argparse reports it
        else:
            positionals.append(t)
    return options + ["--"] + positionals


def _whole_value(option: str, value: str) -> None:
    """Refuse an option's value that is the start of a lambda cut at its first blank
    (``--reference lambda x: x**2``): the line splits on blanks outside quotes and brackets,
    so the rest of the lambda would be read as other arguments."""
    if re.match(r"lambda\b", value):
        try:
            compile(value, "<magic>", "eval")
        except SyntaxError:
            raise LineError(f"{option} got {value!r}, the start of a lambda: the magic "
                            "splits its line at blanks outside quotes and brackets, so a "
                            "lambda written without quotes is cut at its first blank. Fix: "
                            f"put it in quotes, e.g. {option} 'lambda x: x**2'.") from None


def unquoted(text: str) -> str:
    """The expression inside ``text`` when ``text`` is one quoted string (the way to pass an
    expression holding blanks, such as a lambda), else ``text`` as it is.

    >>> unquoted("'lambda x: x**2'")
    'lambda x: x**2'
    >>> unquoted("np.sin")
    'np.sin'
    """
    text = text.strip()
    if len(text) < 2 or text[0] not in "'\"" or text[-1] != text[0]:
        return text
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text
    return value if isinstance(value, str) else text


def parse_range(text: str):
    """``"-2:2:200"`` -> (-2.0, 2.0, 200); ``"0:1"`` -> (0.0, 1.0, None); else None. A count
    that is not a whole number written in digits (``0:1:1e3``, ``0:1:2.5``) is refused.

    >>> parse_range("-2:2:200")
    (-2.0, 2.0, 200)
    >>> parse_range("0:1:1e3")
    Traceback (most recent call last):
    ...
    nbderiv.magic_parsing.LineError: range '0:1:1e3': the number of points must be an int written in digits, got '1e3'. Fix: 0:1:1000.
    """
    m = _RANGE.match(text.strip())
    if m is None:
        _refuse_count(text.strip())
        return None
    lo, hi, n = float(m.group(1)), float(m.group(2)), m.group(3)
    if not lo < hi:
        raise LineError(f"range {text!r} needs low < high, e.g. -2:2:200.")
    if n is not None and int(n) < 2:
        raise LineError(f"range {text!r} needs at least 2 points, e.g. -2:2:200.")
    return lo, hi, None if n is None else int(n)


def _refuse_count(text: str) -> None:
    """Refuse ``LOW:HIGH:COUNT`` whose COUNT is not an int in digits (``1e9``, ``2.5``,
    ``-5``): without this the line would be read as a Python expression, which says only
    "invalid syntax"."""
    m = _RANGE_ANY_COUNT.match(text)
    if m is None:
        return
    lo, hi, count = m.groups()
    try:
        value = float(count)
    except ValueError:
        value = None
    if value is not None and value.is_integer() and 2 <= value <= 10**12:
        fix = f"{lo}:{hi}:{int(value)}"
    else:
        fix = f"a count of 2 or more, e.g. {lo}:{hi}:200"
    raise LineError(f"range {text!r}: the number of points must be an int written in digits, "
                    f"got {count!r}. Fix: {fix}.")


def _parse_wrt(text):
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""] or None
    except ValueError:
        raise LineError(f"--wrt takes input indices separated by commas (e.g. --wrt 0,1), got "
                         f"{text!r}.") from None



def _parse_cell_line(line):
    """(mode, MODEL, X, order, wrt) of ``explain [MODEL X] [--order K] [--wrt I,J]``."""
    tokens = split_line(line)
    usage = ("usage: %%nnderiv explain [MODEL X] [--order K] [--wrt I,J], e.g. "
             "%%nnderiv explain net x --order 2")
    if not tokens or tokens[0] != "explain":
        raise LineError(f"the cell magic %%nnderiv takes 'explain' first; {usage}.")
    refuse_bare_lambda(tokens[1:], "%%nnderiv explain")
    order, wrt, positionals = None, None, []
    it = iter(tokens[1:])
    for t in it:
        head, _, value = t.partition("=")
        if head in ("-o", "--order") or re.fullmatch(r"-o\d+", t):
            value = value or (t[2:] if re.fullmatch(r"-o\d+", t) else next(it, None))
            try:
                order = int(value)
            except (TypeError, ValueError):
                raise LineError(f"--order takes a positive integer, got {value!r}; "
                                 f"{usage}.") from None
            if order < 1:
                raise LineError(f"--order must be 1 or more, got {order}.")
        elif head == "--wrt":
            wrt = _parse_wrt(value or next(it, None))
        elif t.startswith("--") or (t.startswith("-") and t[1:2].isalpha()
                                    and len(t) == 2):
            raise LineError(f"unknown option {t}; {usage}.")
        else:
            positionals.append(t)
    if len(positionals) == 1:
        raise LineError(f"MODEL {positionals[0]!r} given without X: say where the "
                         f"derivatives were taken; {usage}.")
    if len(positionals) > 2:
        raise LineError(f"too many arguments {positionals[2:]}; {usage}.")
    model, x = (positionals + [None, None])[:2]
    return "explain", model, x, order, wrt



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
    """Refuse a range whose grid would not fit (``LineError`` naming the size and the fix)."""
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
    raise LineError(
        f"the range {text} on a model with {d_in} input(s) is {grid}: about {_bytes(need)} for "
        f"the points and their derivatives up to order {order}, more than the "
        f"{_bytes(budget)} a range may take. Fix: fewer points, e.g. {lo}:{side} "
        f"({_count(side ** d_in)} points), or pass your own X.")

