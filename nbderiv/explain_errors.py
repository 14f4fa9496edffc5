"""The classic autograd errors, explained for the code that raised them.

:func:`explain_error` reads an exception (and, where given, the cell's source and the line
that raised) and returns an :class:`ErrorExplanation` with a code, a message that names the
student's own line and tensors, and the fix; ``None`` for any other error (shown unchanged).
:func:`explain_warning` does the same for torch's warning about ``.grad`` of a non-leaf.

Codes: ``no-grad-required``, ``non-scalar-backward``, ``unused-input``, ``graph-freed``,
``inplace-modified``, ``numpy-requires-grad``, ``non-leaf-grad``, ``integer-dtype``,
``func-grad-non-scalar`` (``torch.func.grad``), and for
TensorFlow ``tape-used-twice``, ``gradient-of-none``, ``numpy-in-tape``.
Nothing here imports a framework.

>>> e = explain_error(RuntimeError("grad can be implicitly created only for scalar outputs"),
...                   line="y.backward()")
>>> e.code
'non-scalar-backward'
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

# changing a leaf that requires grad in place: the same code, its own words
LEAF_INPLACE = (r"a (view of a )?leaf Variable that requires grad is being used in an in-place "
                r"operation")
# (code, pattern of the error's text)
PATTERNS = (
    ("no-grad-required", r"element 0 of tensors does not require grad|One of the "
                         r"differentiated Tensors does not require grad"),
    ("non-scalar-backward", r"grad can be implicitly created only for scalar outputs"),
    ("unused-input", r"(One of the differentiated Tensors|The differentiated Tensor at index "
                     r"\d+) appears to not have been used in the graph"),
    ("graph-freed", r"Trying to backward through the graph a second time"),
    ("inplace-modified", r"one of the variables needed for gradient computation has been "
                         r"modified by an inplace operation"),
    ("inplace-modified", LEAF_INPLACE),
    ("numpy-requires-grad", r"Can't call numpy\(\) on Tensor that requires grad"),
    ("integer-dtype", r"only Tensors of floating point(?: and complex)? dtype can require "
                      r"gradients|dtype of the watched tensor must be floating"),
    # TensorFlow
    ("tape-used-twice", r"A non-persistent GradientTape can only be used to compute one set "
                        r"of gradients"),
    ("gradient-of-none", r"Argument `target` should be a list or nested structure of Tensors.*"
                         r"but received None"),
    # tape.gradient of a NumPy array (model.predict, .numpy() inside the tape)
    ("numpy-in-tape", r"'numpy\.ndarray' object has no attribute '_id'"),
    # torch.func.grad of a function whose output is not one number (vmap(grad(net))(x))
    ("func-grad-non-scalar", r"Expected f\(\*args\) to return a scalar Tensor, got tensor with "
                             r"\d+ dims"),
)
# torch.autograd.grad(y, x) where y has a graph (the weights) but x does not require grad
INPUT_NO_GRAD = r"One of the differentiated Tensors does not require grad"
NON_LEAF = r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"
CODES = tuple(dict.fromkeys(code for code, _ in PATTERNS)) + ("non-leaf-grad",)


@dataclass
class ErrorExplanation:
    """What a classic autograd error means for this code: ``code``, ``message`` (plain words,
    naming the line that raised), ``fix`` (code), ``error`` (the original error's last line),
    ``line`` (the student's line, where known)."""

    code: str
    message: str
    fix: str
    error: str = ""
    line: str | None = None

    def __repr__(self) -> str:
        lines = [f"[{self.code}] {self.message}"]
        if self.error:
            lines.append(f"The error: {self.error}")
        if self.fix:
            lines.append("Fix:")
            lines += ["    " + t for t in self.fix.splitlines()]
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        from html import escape

        parts = [f'<div class="nbderiv-explain"><p><b style="color:#b30000">'
                 f"[{escape(self.code)}]</b> {escape(self.message)}</p>"]
        if self.error:
            parts.append(f"<p>The error: <code>{escape(self.error)}</code></p>")
        if self.fix:
            parts.append(f"<p><b>Fix:</b></p><pre>{escape(self.fix)}</pre>")
        return "".join(parts) + "</div>"


def classify(text: str) -> str | None:
    """The code of an error or warning text, or None."""
    for code, pattern in PATTERNS:
        if re.search(pattern, text):
            return code
    if re.search(NON_LEAF, text):
        return "non-leaf-grad"
    return None


def _calls(line: str) -> list:
    """The calls in ``line`` (outermost first), read with ``ast``; a block header such as
    ``with ...:`` is read with a body added; [] when the line does not parse."""
    text = (line or "").strip()
    for candidate in (text, text + "\n    pass", text.rstrip(":") + ":\n    pass"):
        try:
            tree = ast.parse(candidate)
        except SyntaxError:
            continue
        return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    return []


def _func_name(call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _receiver(line: str, method: str) -> str | None:
    """``'loss'`` for ``line = "loss.backward()"`` and method ``backward``."""
    for call in _calls(line):
        if isinstance(call.func, ast.Attribute) and call.func.attr == method:
            return ast.unparse(call.func.value)
    m = re.search(r"([A-Za-z_][\w\.]*)\s*\.\s*" + method + r"\s*\(", line or "")
    return m.group(1).strip() if m else None


def _grad_args(line: str, names=("grad",)):
    """(outputs, inputs) of ``torch.autograd.grad(outputs, inputs, ...)`` in ``line`` (of
    ``tape.gradient(target, sources)`` with ``names=("gradient",)``), as written."""
    for call in _calls(line):
        if _func_name(call) not in names:
            continue
        args = list(call.args)
        kw = {k.arg: k.value for k in call.keywords}
        out = args[0] if args else kw.get("outputs", kw.get("target"))
        inp = args[1] if len(args) > 1 else kw.get("inputs", kw.get("sources"))
        if out is not None and inp is not None:
            return ast.unparse(out), ast.unparse(inp)
    return None, None


def _assignment(name: str, source: str) -> str | None:
    """The cell's (first) line assigning ``name`` (``u = net(x)``, ``u, v = ...``), dedented,
    or None."""
    if not name or not re.fullmatch(r"[A-Za-z_]\w*", name):
        return None
    for raw in (source or "").splitlines():
        if re.match(rf"\s*{re.escape(name)}\s*(,[^=]*)?=(?!=)", raw):
            return raw.split("#", 1)[0].strip()
    return None


def _recomputed(out: str, inp: str | None, line: str, source: str, note: str) -> str:
    """Fix code: ``inp`` asks for gradients (the cell's own leaf where it makes one and
    ``inp`` is None: a ``backward()``), the cell's lines computing ``out`` from it run again
    without what cut the graph (``.detach()``, ``.data``; dedented out of a ``no_grad``
    block: every line on the way, ``yd = net(x).detach()`` before ``loss = (yd**2).sum()``),
    then the cell's failing line (or a grad call of ``out``)."""
    root = re.match(r"[A-Za-z_]\w*", out or "")
    root = root.group(0) if root else "y"  # y of y.sum() or y[:, 0]
    leaf = _leaf_line(source) if inp is None else None
    if inp is None:
        inp = leaf[0] if leaf else "x"
    lines = [leaf[1] if leaf else
             f"{inp} = {inp}.detach().requires_grad_(True)   # a leaf that asks for gradients"]
    chain = _lines_computing(root, inp, source, line)
    if not chain:  # nothing computed from inp in the cell: the line that made root, at least
        made = _assignment(root, source)
        chain = [made] if made is not None else []
    for made in chain:
        again = re.sub(r"\.detach\(\)|\.data\b", "", made)
        lines.append(f"{again}      # {note}" if again != made or made is chain[-1] else again)
    if not chain:
        lines.append(f"{root} = model({inp})      # {note}")
    call = (line or "").split("#", 1)[0].strip()
    lines.append(call if re.search(r"\bgrad\(|\.backward\(", call) else
                 f"g, = torch.autograd.grad({out}, {inp}, grad_outputs=torch.ones_like({out}))")
    return "\n".join(lines)


def _leaf_line(source):
    """(name, line) of the cell's last line making a leaf that asks for gradients (``xd =
    X.clone().requires_grad_(True)``), or None."""
    found = None
    for raw in (source or "").splitlines():
        code = raw.split("#", 1)[0].strip()
        m = re.match(r"([A-Za-z_]\w*)\s*=(?!=).*requires_grad_\(\s*(True)?\s*\)\s*$", code)
        if m:
            found = (m.group(1), code)
    return found


def _lines_computing(root, inp, source, line) -> list:
    """The cell's assignment lines (dedented, in order) that compute ``root`` from ``inp``:
    the last assignment of ``root`` before the failing ``line``, then those of the names it
    reads, back to ``inp``. [] when the cell does not assign ``root``."""
    try:
        tree = ast.parse(textwrap.dedent(source or ""))
    except SyntaxError:
        made = _assignment(root, source)
        return [made] if made is not None else []
    text = textwrap.dedent(source or "")
    stop = None
    failing = (line or "").split("#", 1)[0].strip()
    steps = []  # (lineno, names assigned, names read, code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            code = (ast.get_source_segment(text, node) or "").strip()
            if failing and code == failing and stop is None:
                stop = node.lineno
            steps.append((node.lineno, names,
                          {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}, code))
    steps.sort()
    if stop is None:  # the failing line is no assignment (loss.backward()): find it by text
        for i, raw in enumerate(text.splitlines(), 1):
            if failing and raw.strip().startswith(failing):
                stop = i
    steps = [step for step in steps if stop is None or step[0] < stop]
    tainted = {inp}  # the names computed from inp, on the way to root
    for _, names, reads, _ in steps:
        if reads & tainted:
            tainted |= names
    needed, picked = {root}, []
    for _, names, reads, code in reversed(steps):
        if names & needed and reads & tainted and inp not in names and "\n" not in code:
            picked.append(code)
            needed = (needed - names) | (reads - {inp})
    return picked[::-1]


def _with_keyword(call: str, keyword: str) -> str:
    """``call`` with ``keyword`` (``"create_graph=True"``) added to its backward/grad call
    (comment dropped)."""
    code = call.split("#", 1)[0].rstrip()
    m = _GRAD_CALL.search(code)
    if m is None or keyword.split("=")[0] in code:
        return code
    depth, i = 1, m.end()
    while i < len(code) and depth:
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        i += 1
    if depth:  # the call continues on the next line: left as it is
        return code
    inside = code[m.end():i - 1].strip()
    return code[:i - 1] + (f", {keyword}" if inside else keyword) + code[i - 1:]


def _floating(line: str, source: str) -> str:
    """Fix code for an integer tensor: the cell's line made floating point, in its framework."""
    code = (line or "").split("#", 1)[0].strip()
    tensorflow = re.search(r"\btf\.|GradientTape", source or code) and not re.search(
        r"\btorch\.", code)
    if tensorflow:
        watched = re.search(r"\.watch\(\s*([A-Za-z_]\w*)", source or "")
        x = watched.group(1) if watched else "x"
        return (f"{x} = tf.cast({x}, tf.float32)      # floating point before the tape watches "
                f"it\n# then run the tape again")
    bare = re.fullmatch(r"([A-Za-z_]\w*)\s*\.requires_grad_\(.*\)", code)
    if bare:  # x.requires_grad_(True) on its own: a float copy has to be named
        x = bare.group(1)
        return f"{x} = {x}.float().requires_grad_(True)      # floating point (float32) first"
    if ".requires_grad_(" in code:
        fixed = re.sub(r"\.(long|int|short)\(\)(?=\.requires_grad_\()", "", code)
        return fixed.replace(".requires_grad_(", ".float().requires_grad_(", 1) + \
            "      # floating point (float32) first"
    m = re.match(r"\s*([A-Za-z_]\w*)\s*=", code)
    x = m.group(1) if m else "x"
    return (f"{x} = {x}.float().requires_grad_(True)      # floating point: "
            f"torch.arange(5, dtype=torch.float32), np.float32 arrays")


def _first_use(source: str, patterns) -> str | None:
    """The first line of ``source`` matching the first pattern that matches any line."""
    for p in patterns:
        for raw in (source or "").splitlines():
            if re.search(p, raw.split("#", 1)[0]):
                return raw.strip()
    return None


def explain_error(exc, *, source: str = "", line: str | None = None,
                  lineno: int | None = None, ns=None) -> ErrorExplanation | None:
    """Explain ``exc`` if it is one of the classic autograd errors, else None. ``source`` is
    the cell, ``line`` the cell's line that raised (``lineno`` its number, 1-based), ``ns``
    the namespace it ran in (where given: which of a tape's arguments is a NumPy array)."""
    text = str(exc)
    code = classify(text)
    if code is None or code == "non-leaf-grad":
        return None
    first = text.strip().splitlines()[0] if text.strip() else ""
    error = f"{type(exc).__name__}: {first}"
    where = f"line {lineno} (`{line.strip()}`)" if line and lineno else (
        f"`{line.strip()}`" if line else "your cell")
    words = (_inplace_leaf if re.search(LEAF_INPLACE, text) else
             _input_no_grad if re.search(INPUT_NO_GRAD, text) else _WORDS[code])
    if code == "numpy-in-tape" and _numpy_source(line or "", ns):
        words = _numpy_source_in_tape
    return ErrorExplanation(code, *words(where, line or "", source or ""),
                            error=error, line=line)


def explain_warning(message: str, *, source: str = "", line: str | None = None,
                    lineno: int | None = None) -> ErrorExplanation | None:
    """``non-leaf-grad`` for torch's warning about ``.grad`` of a non-leaf tensor."""
    if classify(str(message)) != "non-leaf-grad":
        return None
    where = f"line {lineno} (`{line.strip()}`)" if line and lineno else (
        f"`{line.strip()}`" if line else "your cell")
    m = re.search(r"([A-Za-z_][\w\.]*)\s*\.grad\b", line or "")
    t = m.group(1) if m else "x"
    made = _first_use(source, [rf"\b{re.escape(t)}\s*=.*\.(to|cuda|float|double)\(",
                               rf"\b{re.escape(t)}\s*=.*requires_grad"])
    how = (f" It was made by `{made}`: requires_grad was set on the tensor before that step, "
           f"so {t} is the result of an operation, not a leaf." if made else "")
    return ErrorExplanation(
        "non-leaf-grad",
        f"{where} reads {t}.grad, but {t} is not a leaf tensor (it was computed from another "
        f"tensor that requires grad, e.g. by arithmetic, .to(device) or .float()), and torch "
        f"fills .grad only for leaves: {t}.grad is None.{how}",
        f"{t} = {t}.detach().requires_grad_(True)   # a leaf: make it the last step before "
        f"the model\n# or: {t}.retain_grad() before backward(); or use torch.autograd.grad("
        f"y, {t}, grad_outputs=torch.ones_like(y))",
        error=f"UserWarning: {str(message).splitlines()[0][:200]}", line=line)


# -- the words of each code ----------------------------------------------------------------------------
def _grad_without_graph(t, source):
    """The line that made ``t`` (e.g. ``u_x``, ``g[:, 0]``) with a grad call lacking
    ``create_graph=True``, or None: such a result is plain numbers, with no grad_fn."""
    m = re.match(r"[A-Za-z_]\w*", t or "")
    if not m:
        return None
    made = _first_use(source, [rf"(^|[\s(,]){re.escape(m.group(0))}\s*[,)\]]*\s*=[^=].*"
                               r"\b(autograd\.grad|grad|gradient)\s*\("])
    return made if made and "create_graph=True" not in made else None


def _no_grad(where, line, source):
    t = _receiver(line, "backward") or _grad_args(line)[0] or "the output"
    made = _grad_without_graph(t, source)
    if made:
        kept = (" Its retain_graph=True keeps the graph of the output for another pass, but "
                "builds none for the derivative." if "retain_graph=True" in made else "")
        y, _ = _grad_args(made)
        again = _assignment(y, source) if y else None  # its graph was freed by that call
        fix = ((again + "      # again: the first grad call freed its graph\n" if again else "")
               + _with_keyword(made, "create_graph=True") + "      # a graph to differentiate\n"
               + line.strip())
        return (f"{where} differentiates {t}, but {t} has no grad_fn: it is the result of "
                f"`{made}`, and a grad call returns plain numbers, with no graph of their own, "
                f"unless it is given create_graph=True.{kept} There is nothing to "
                f"differentiate.", fix)
    cause = None
    for pattern, why in (
            (r"no_grad\(", "it was computed under `torch.no_grad()`"),
            (r"\.detach\(", "`.detach()` cut it from the graph"),
            (r"\.data\b", "`.data` gives a tensor that is not tracked"),
            (r"inference_mode\(", "it was computed under `torch.inference_mode()`"),
            (r"torch\.(tensor|from_numpy|as_tensor)\(", "a tensor built from numbers "
             "(torch.tensor / from_numpy) starts a new graph")):
        use = _first_use(source, [pattern])
        if use:
            cause = f"{why} (`{use}`)"
            break
    asked = _first_use(source, [r"requires_grad_\(\s*(True)?\s*\)|requires_grad\s*=\s*True"])
    if cause is None and asked:
        cause = (f"the graph was cut on the way: the input does require grad (`{asked}`), so "
                 "the function or model called on it loses the connection inside, e.g. a "
                 "forward that uses .detach(), .numpy() or NumPy functions, torch.tensor(...) / "
                 "torch.from_numpy, or .item()")
    if cause is None:
        cause = ("nothing it was computed from has requires_grad=True: the input was created "
                 "without requires_grad (torch.linspace/rand/tensor(...) default to False)")
    return (f"{where} differentiates {t}, but {t} has no grad_fn: autograd did not record how it "
            f"was computed, because {cause}. There is nothing to differentiate.",
            _recomputed(t, _grad_args(line)[1], line, source,
                        "outside torch.no_grad(), no .detach()/.data"))


def _non_scalar(where, line, source):
    t = _receiver(line, "backward") or _grad_args(line)[0] or "the output"
    return (f"{where} asks for the gradient of {t}, which has more than one element: backward() "
            f"and autograd.grad without grad_outputs only work on a scalar (one number), "
            f"because the gradient of a vector is a Jacobian. For per-point derivatives pass "
            f"grad_outputs=torch.ones_like({t}) (exact per point when the points are "
            f"independent and {t} has one output column), or one column at a time.",
            f"g, = torch.autograd.grad({t}, x, grad_outputs=torch.ones_like({t}))\n"
            f"# or {t}.backward(torch.ones_like({t})); several outputs: one call per column "
            f"{t}[:, j]")


def _unused(where, line, source):
    out, inp = _grad_args(line)
    inp = inp or "an input"
    return (f"{where} differentiates with respect to {inp}, but (one of) these tensors was not "
            f"used to compute {out or 'the output'}: autograd found no path from it. Either the "
            f"model ignores that input, or the output was computed from another tensor (a copy "
            f"made by .detach(), torch.tensor(...), or a tensor re-created after the forward "
            f"pass).",
            _recomputed(out or "y", inp if inp.isidentifier() else "x", line, source,
                        "computed from the very tensor you differentiate by")
            + "\n# or, for an input the model does not use: allow_unused=True, "
              "materialize_grads=True (zeros)")


def _freed(where, line, source):
    culprit = _freeing_call(line, source)
    if culprit is None:  # an earlier cell, or this very line run again (a loop)
        return (f"{where} differentiates through a graph whose saved values were already "
                f"freed: a backward/grad call that ran before it (in an earlier cell, or this "
                f"line in a loop) released the graph, as each call does unless told otherwise. "
                f"For a second derivative the first call needs create_graph=True (which also "
                f"keeps the graph); to differentiate the same output twice, "
                f"retain_graph=True, or recompute y = model(x).",
                "g, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y), "
                "create_graph=True)\n"
                "g2, = torch.autograd.grad(g, x, grad_outputs=torch.ones_like(g), "
                "retain_graph=True)  # second derivative\n"
                "# x of several columns: g2 adds them up; d2y/dx0^2 alone:\n"
                "# g2_00 = torch.autograd.grad(g[:, 0:1], x, torch.ones_like(g[:, 0:1]), "
                "retain_graph=True)[0][:, 0:1]")
    y = sorted(_differentiated_names(culprit))
    return (f"{where} differentiates through a graph whose saved values were already freed, "
            f"by the call before it that ran backward through the same graph: `{culprit}`. "
            f"It has neither retain_graph=True nor create_graph=True, so it released the graph "
            f"(that of {y[0] if y else 'its output'}, back to the input). Give "
            f"that call retain_graph=True (or create_graph=True where you differentiate its "
            f"result again), or recompute the output before the second call.",
            _rerun_with(culprit, line, source))


def _rerun_with(culprit, line, source) -> str:
    """Fix code for a freed graph: the cell's lines again, from the one computing the output
    the cell's first grad call differentiates through the failing ``line``, with
    ``retain_graph=True`` on ``culprit`` (the graph is gone: running that call alone again
    would fail the same way); the fixed call alone where those lines are not found."""
    fixed = _with_keyword(culprit, "retain_graph=True") + "   # keeps the graph for what follows"
    same = _differentiated_names(culprit) & _differentiated_names(line or "")
    made = re.match(r"\s*([A-Za-z_]\w*)", culprit)
    note = ""
    if same and made and _differentiated_names(culprit) == _differentiated_names(line or ""):
        y, g = sorted(same)[0], made.group(1)
        note = f"\n# both calls differentiate {y}: the second gives its first derivative again."
        if ".backward(" in culprit:
            note += ("\n# .backward() adds to .grad: after both calls it holds that gradient "
                     "twice (set .grad = None in between).")
        else:
            note += f"\n# A second derivative differentiates {g} (made with create_graph=True)."
    lines = (source or "").splitlines()
    target = (line or "").strip()
    end = _failing_line(lines, target)
    first = next((raw for raw in lines if _GRAD_CALL.search(raw.split("#", 1)[0])), None)
    names = _differentiated_names(first) if first else set()
    start = next((i for i, raw in enumerate(lines[:end or 0]) if any(
        re.match(rf"\s*{re.escape(n)}\s*(,[^=]*)?=(?!=)", raw) for n in names)), None)
    text = None if end is None or start is None else \
        _lines_again(lines[start:end + 1], culprit, fixed)
    return (text or fixed) + note


def _lines_again(lines, old: str, new: str) -> str | None:
    """The cell's ``lines`` again, dedented, the line that reads ``old`` (stripped) written
    ``new`` in its place and indentation; None where they do not parse on their own (they
    start or end inside a block)."""
    at = next((i for i, raw in enumerate(lines) if raw.strip() == old), None)
    chunk = [raw.replace(old, new) if i == at else raw for i, raw in enumerate(lines)]
    text = textwrap.dedent("\n".join(chunk))
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text


_GRAD_CALL = re.compile(r"\.backward\(|\bgrad\(|\.gradient\(")


def _failing_line(lines, target) -> int | None:
    """The index of the line that failed, ``target`` (stripped), among the cell's ``lines``:
    its last occurrence (the same line written twice, loss.backward() then loss.backward()
    again: the first one ran); None when it is not there."""
    return next((i for i in range(len(lines) - 1, -1, -1)
                 if target and lines[i].strip() == target), None)


def _freeing_call(line, source):
    """The backward/grad call before ``line`` in ``source`` that keeps no graph (no
    retain_graph=True, no create_graph=True) and freed the graph ``line`` needs: the last one
    differentiating a tensor named in what ``line`` differentiates (``u_x[:, 0]`` before
    ``u_x[:, 1]``), else the last one; None when there is none."""
    lines = (source or "").splitlines()
    target = (line or "").strip()
    end = _failing_line(lines, target)
    end = len(lines) if end is None else end
    wanted = _differentiated_names(target)
    last = shared = None
    for raw in lines[:end]:
        code = raw.split("#", 1)[0]
        if _GRAD_CALL.search(code) and not re.search(
                r"(retain_graph|create_graph)\s*=\s*True", code):
            last = raw.strip()
            if wanted & _differentiated_names(code):
                shared = last
    return shared or last


_NOT_TENSORS = frozenset({"torch", "autograd", "grad", "ones_like", "sum", "mean", "tf", "np",
                          "backward", "gradient", "tape", "reduce_sum", "reduce_mean"})


def _differentiated_names(code: str) -> set:
    """The names in what a backward/grad call differentiates: ``grad``'s first argument, or
    the expression ``.backward()`` is called on."""
    code = code.split("#", 1)[0]
    m = _GRAD_CALL.search(code)
    if m is None:
        return set()
    if m.group().startswith(".backward"):
        expr = re.split(r"[=,(]\s*", code[:m.start()])[-1]
    else:
        depth, i = 0, m.end()
        while i < len(code) and not (depth == 0 and code[i] in ",)"):
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(code[i], 0)
            i += 1
        expr = code[m.end():i]
    return set(re.findall(r"[A-Za-z_]\w*", expr)) - _NOT_TENSORS


def _inplace(where, line, source):
    use = _first_use(source, [r"\w\s*(\+|-|\*|/)=", r"\[[^\]]*\]\s*=[^=]",
                              r"\.(?!requires_grad_)\w+_\("])
    return (f"{where} needs a tensor that autograd saved during the forward pass, but it was "
            f"changed in place afterwards"
            + (f" (e.g. `{use}`)" if use else "")
            + ": `x += ...`, `x[...] = ...` or a method ending in `_` overwrite the values "
              "autograd needs (it counts versions and refuses). Use out-of-place operations.",
            "x = x + 1            # instead of x += 1 / x.add_(1)\n"
            "y = torch.cat([y[:, :1], 2 * y[:, 1:]], dim=1)   # instead of y[:, 1:] *= 2\n"
            "# or .clone() before changing a tensor in place")


def _inplace_leaf(where, line, source):
    m = re.search(r"([A-Za-z_][\w\.]*)\s*(\[[^\]]*\])?\s*(\+|-|\*|/|\*\*)?=[^=]", line or "") \
        or re.search(r"([A-Za-z_][\w\.]*)\s*\.\s*\w+_\(", line or "")
    t = m.group(1) if m else "x"
    return (f"{where} changes {t} in place, but {t} is a leaf tensor that requires grad (or a "
            f"view of one, such as a slice): it is the tensor you differentiate with respect "
            f"to, so autograd needs its values to stay as they were, and torch refuses. Do the "
            f"change out of place, or before requires_grad_.",
            f"{t} = ({t} - {t}.mean()).detach().requires_grad_(True)   # e.g.: a new leaf, "
            f"made out of place\n# or change the values first, then {t}.requires_grad_(True)")


def _numpy(where, line, source):
    t = _receiver(line, "numpy")
    if t is None:  # .numpy() is called inside a function or model that this line calls
        return (f"{where} calls a function or model whose code calls .numpy() on a tensor "
                f"that requires grad (the input, or a result computed from it): NumPy cannot "
                f"record gradients, so torch refuses rather than silently cutting the graph. "
                f"Inside a model's forward use torch operations instead; .detach().numpy() "
                f"there would run, but the derivative would then be zero / None.",
                "# inside forward: torch operations throughout, e.g.\n"
                "z = torch.sin(x)                    # instead of np.sin(x.numpy())\n"
                "# NumPy only after differentiating: g.detach().cpu().numpy()")
    return (f"{where} calls .numpy() on {t}, which requires grad: NumPy cannot record "
            f"gradients, so torch refuses rather than silently cutting the graph. To look at the "
            f"numbers, detach first; inside a model's forward use torch operations instead, "
            f"or the derivative will be zero / None.",
            f"{t}.detach().cpu().numpy()      # for printing or plotting\n"
            "# inside forward: torch.sin(x) instead of np.sin(x.numpy())")


def _integer(where, line, source):
    return (f"{where} asks for gradients of an integer tensor: derivatives need floating point "
            f"inputs (torch refuses requires_grad on integers; a TensorFlow tape ignores an "
            f"integer tensor and gradient() returns None). torch.arange/tf.range of ints and "
            f"integer NumPy arrays are the usual source.",
            _floating(line, source))


def _input_no_grad(where, line, source):
    out, inp = _grad_args(line)
    inp, out = inp or "x", out or "the output"
    return (f"{where} differentiates with respect to {inp}, but {inp}.requires_grad is False: "
            f"autograd only tracks tensors that ask for it (torch.linspace/rand/tensor(...) "
            f"default to False). There is a graph ({out} is computed through the model's "
            f"weights), but none that starts at {inp}.",
            _watch_then_recompute(inp, out, source))


def _watch_then_recompute(inp, out, source) -> str:
    """Fix code: ``inp`` asks for gradients, then the cell's own line computing ``out`` runs
    again (the model called as the cell calls it, on all its arguments), then the gradient.

    >>> print(_watch_then_recompute("tt", "u", "x = a\\nu = pinn(x, tt)\\nv = u.sum()"))
    tt = tt.detach().requires_grad_(True)   # before u is computed from it
    u = pinn(x, tt)
    g, = torch.autograd.grad(u, tt, grad_outputs=torch.ones_like(u))
    """
    computed = None
    if out and re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", out):
        for text in source.splitlines():
            if re.match(rf"\s*{re.escape(out)}\s*(,\s*)?=(?!=)", text):
                computed = text.strip()
                break
    if computed is None:
        return (f"{inp} = {inp}.detach().requires_grad_(True)   # before the model sees {inp}\n"
                f"y = model({inp})\n"
                f"g, = torch.autograd.grad(y, {inp}, grad_outputs=torch.ones_like(y))")
    return (f"{inp} = {inp}.detach().requires_grad_(True)   # before {out} is computed from it\n"
            f"{computed}\n"
            f"g, = torch.autograd.grad({out}, {inp}, grad_outputs=torch.ones_like({out}))")


def _tape_twice(where, line, source):
    tape = _receiver(line, "gradient") or _receiver(line, "jacobian") or "tape"
    tape = tape.split(".")[0]
    first = _first_use(source, [rf"\b{re.escape(tape)}\s*\.\s*(gradient|jacobian|"
                                r"batch_jacobian)\s*\("])
    nested = _second_derivative_tapes(where, tape, first, line, source)
    if nested is not None:
        return nested
    return (f"{where} asks {tape} for gradients a second time"
            + (f" (the first: `{first}`)" if first and first != line.strip() else "")
            + ", but a GradientTape releases what it recorded after its first gradient/jacobian "
              "call unless it was made with persistent=True.",
            f"with tf.GradientTape(persistent=True) as {tape}:   # several gradient calls\n"
            "    ...\n"
            f"# then: del {tape}  when done (one call with a list of targets,\n"
            f"# {tape}.gradient([u, v], x), would give the gradient of u + v, not each)")


def ordinal(k) -> str:
    """``"second"`` for 2: the order of a derivative in words."""
    return {0: "zeroth", 1: "first", 2: "second", 3: "third"}.get(k, f"order-{k}")


def _second_derivative_tapes(where, tape, first, line, source):
    """(message, fix) where the second gradient call differentiates the first one's result
    (``dy = tape.gradient(y, x)`` then ``tape.gradient(dy, x)``): a second derivative, which
    needs the first gradient taken inside an outer tape's block (persistent=True alone gives
    None: the first gradient ran outside every tape). None otherwise."""
    if not first or first == line.strip():
        return None
    m = re.match(r"\s*([A-Za-z_]\w*)\s*,?\s*=[^=]", first)
    target, _ = _grad_args(line, names=("gradient",))
    y, x = _grad_args(first, names=("gradient",))
    if m is None or target != m.group(1) or not y or not x:
        return None
    dy = m.group(1)
    assigned = re.match(r"\s*([A-Za-z_]\w*)\s*,?\s*=[^=]", line or "")
    d2 = assigned.group(1) if assigned else "d2"
    # the chain of gradient calls back to the model: u_xx <- u_x <- u = model(x)
    steps = [(d2, "outer", dy)]  # (result, tape, what it differentiates), outermost first
    tapes_used = {"outer"}
    target_name, source_line = dy, first
    model_line = None
    for _ in range(6):
        src_tape = (_receiver(source_line, "gradient") or tape).split(".")[0]
        inner, _ = _grad_args(source_line, names=("gradient",))
        name = src_tape if src_tape not in tapes_used else f"{src_tape}_{len(steps)}"
        tapes_used.add(name)
        steps.append((target_name, name, inner))
        made = _first_use(source, [rf"^\s*{re.escape(inner)}\s*=[^=]"]) \
            if inner and inner.isidentifier() else None
        if made is None or ".gradient(" not in made:
            model_line = made.strip() if made else f"{inner} = model({x})"
            break
        target_name, source_line = inner, made
    if model_line is None:
        return None
    order = len(steps)
    nth = ordinal(order)
    lines = []
    for i, (_, name, _) in enumerate(steps):  # the tapes, outermost first
        lines += [f"{'    ' * i}with tf.GradientTape() as {name}:",
                  f"{'    ' * (i + 1)}{name}.watch({x})"]
    lines.append(f"{'    ' * len(steps)}{model_line}")
    for i in range(len(steps) - 1, 0, -1):  # each gradient inside the blocks around it
        result, name, inner = steps[i]
        lines.append(f"{'    ' * i}{result} = {name}.gradient({inner}, {x})"
                     + ("      # inside the outer tape's block: recorded" if i == 1 else ""))
    lines.append(f"{d2} = outer.gradient({dy}, {x})      # the {nth} derivative")
    if order == 2:
        lines.append(f"# x of several columns: gradient adds them up; for d2/dx0^2 take column "
                     f"0 where {dy} is made, ...gradient(...)[:, 0:1], and keep [:, 0:1] of "
                     f"{d2}")
    else:
        lines.append("# x of several columns: each gradient call adds them up; take the "
                     "column you want, [:, 0:1], where each result is made")
    fix = "\n".join(lines)
    if _inside_block(source, tape, first):  # recorded: persistent=True would do
        why = (f"{tape} released its recording after the first gradient call. {dy} was "
               f"computed inside {tape}'s block, so {tape} did record it: with "
               f"tf.GradientTape(persistent=True) the same cell gives the second derivative "
               f"(TensorFlow warns that a gradient inside its own tape's block is slow).")
    else:
        why = (f"{tape} released its recording after the first gradient call, and even with "
               f"persistent=True the answer would be None, because {dy} was computed after "
               f"the with-block, where no tape records.")
    return (f"{where} differentiates {dy}, the result of `{first}`: a {nth} derivative. "
            f"One tape cannot give it: {why} Take the first gradient inside an outer tape's "
            f"block (nested tapes), then ask the outer tape for the gradient of {dy}.", fix)


def _inside_block(source, tape, line) -> bool:
    """Whether the cell's ``line`` sits inside the block of ``with ... as <tape>:``."""
    lines = (source or "").splitlines()
    head = next((i for i, raw in enumerate(lines)
                 if re.match(rf"\s*with\b.*\bas\s+{re.escape(tape)}\s*:", raw)), None)
    if head is None:
        return False
    indent = len(lines[head]) - len(lines[head].lstrip())
    for raw in lines[head + 1:]:
        if not raw.strip():
            continue
        if len(raw) - len(raw.lstrip()) <= indent:  # the block ended before the line
            return False
        if raw.strip() == line.strip():
            return True
    return False


def _gradient_of_none(where, line, source):
    target, sources = _grad_args(line, names=("gradient", "jacobian", "batch_jacobian"))
    target = target or "the target"
    made = _first_use(source, [rf"(^|[\s(,]){re.escape(target)}\s*=[^=].*\b(gradient|jacobian)"
                               r"\s*\("]) if target.isidentifier() else None
    why = ""
    if made:
        inner = _receiver(made, "gradient") or _receiver(made, "jacobian")
        _, src = _grad_args(made, names=("gradient", "jacobian", "batch_jacobian"))
        watched = inner and src and re.search(
            rf"\b{re.escape(inner)}\s*\.\s*watch\(\s*{re.escape(src)}\s*\)", source or "")
        why = (f" {target} is None: it comes from `{made}`, which returned None (that tape "
               f"found no path from {src} to its target"
               + ("" if watched or not inner or not src else
                  f"; there is no {inner}.watch({src}) in this cell, and a tape records a "
                  f"constant tensor only when it is watched, a tf.Variable always")
               + ").")
    return (f"{where} asks for the gradient of {target}, but {target} is None, not a tensor: "
            f"there is nothing to differentiate.{why}",
            "with tf.GradientTape() as outer:\n    outer.watch(x)\n"
            "    with tf.GradientTape() as inner:\n        inner.watch(x)\n        u = model(x)\n"
            "    g = inner.gradient(u, x)      # inside the outer block, x watched by both\n"
            "h = outer.gradient(g, x)")


def _numpy_in_tape(where, line, source):
    target, sources = _grad_args(line, names=("gradient", "jacobian", "batch_jacobian"))
    target = target or "the target"
    made = _assignment(target, source) if target.isidentifier() else None
    how = ""
    if made and ".predict(" in made:
        how = (f" It comes from `{made}`: model.predict runs the model outside the tape (in "
               f"batches, through NumPy) and returns a NumPy array.")
    elif made and ".numpy()" in made:
        how = f" It comes from `{made}`: .numpy() leaves TensorFlow."
    fixed = None
    if made:
        fixed = re.sub(r"([A-Za-z_][\w\.]*)\.predict\(\s*([^,()]+(?:\([^()]*\))?)[^)]*\)",
                       r"\1(\2)", made)
        fixed = fixed.replace(".numpy()", "")
    return (f"{where} asks the tape for the gradient of {target}, which is a NumPy array, not a "
            f"tensor: the tape records TensorFlow operations only, so it has no record of how "
            f"{target} was computed (TensorFlow then fails with a cryptic AttributeError "
            f"about '_id').{how} Inside the tape, call the model itself: y = model(x).",
            _rerun_tape_block(made, fixed, line, source) if fixed and fixed != made else
            "with tf.GradientTape() as tape:\n    tape.watch(x)\n    y = model(x)      # "
            "a tensor the tape records (not model.predict(x), not .numpy())\n"
            "g = tape.gradient(y, x)")


def _numpy_source(line, ns) -> bool:
    """Whether the tape call on ``line`` differentiates with respect to a NumPy array of
    ``ns`` (``tape.gradient(pred, xn)``, xn an ndarray) while its target is no array."""
    if not ns:
        return False
    target, sources = _grad_args(line, names=("gradient", "jacobian", "batch_jacobian"))
    if not sources or not sources.isidentifier():
        return False
    kind = type(ns.get(sources)).__module__
    return kind == "numpy" and type(ns.get(target)).__module__ != "numpy"


def _numpy_source_in_tape(where, line, source):
    target, x = _grad_args(line, names=("gradient", "jacobian", "batch_jacobian"))
    tape = (_receiver(line, "gradient") or _receiver(line, "jacobian")
            or _receiver(line, "batch_jacobian") or "tape").split(".")[0]
    xt = f"{x}_t"
    lines = (source or "").splitlines()
    end = next((i for i, raw in enumerate(lines) if raw.strip() == (line or "").strip()), None)
    start = None if end is None else next(
        (i for i in range(end, -1, -1) if re.search(rf"GradientTape\(.*\bas\s+{tape}\b",
                                                     lines[i])), None)
    fix = [f"{xt} = tf.convert_to_tensor({x})      # a tensor the tape can watch"]
    if start is not None:
        block = textwrap.dedent("\n".join(lines[start:end + 1])).splitlines()
        body = next((raw for raw in block[1:] if raw.strip()), "    ")
        indent = body[:len(body) - len(body.lstrip())] or "    "
        swapped = [re.sub(rf"\b{re.escape(x)}\b", xt, raw) for raw in block]
        fix += swapped[:1] + [f"{indent}{tape}.watch({xt})"] + swapped[1:]
    else:
        fix += [f"with tf.GradientTape() as {tape}:", f"    {tape}.watch({xt})",
                f"    y = model({xt})", f"g = {tape}.gradient(y, {xt})"]
    return (f"{where} asks the tape for the gradient with respect to {x}, which is a NumPy "
            f"array, not a tensor: the tape watches tensors only, so it has nothing recorded "
            f"for {x} (the model converted it to a new tensor inside, which the tape never "
            f"saw), and TensorFlow fails with a cryptic AttributeError about '_id'. {target} "
            f"itself is fine. Convert {x} to a tensor before the tape and watch that tensor.",
            "\n".join(fix))


def _rerun_tape_block(made, fixed, line, source) -> str:
    """The cell's tape block again, from its ``with`` line through the failing ``line``, with
    the line ``made`` replaced by ``fixed``; ``fixed`` alone where that block is not found."""
    lines = (source or "").splitlines()
    at = next((i for i, raw in enumerate(lines) if raw.strip() == made), None)
    end = next((i for i, raw in enumerate(lines) if raw.strip() == (line or "").strip()), None)
    start = None if at is None else next(
        (i for i in range(at, -1, -1) if re.search(r"GradientTape\(", lines[i])), None)
    fixed += "      # a tensor the tape records"
    text = None if start is None or end is None or end < at else \
        _lines_again(lines[start:end + 1], made, fixed)
    return text or fixed


def _func_grad(where, line, source):
    """torch.func.grad(f) of an f that returns a tensor with axes: under vmap, f sees one
    point and returns that point's outputs, shape (d_out,) for a Linear head."""
    calls = _calls(line)  # outermost first
    mapped = any(_func_name(c) == "vmap" for c in calls)
    grads = [c for c in calls if _func_name(c) == "grad" and c.args and (
        isinstance(c.func, ast.Name) or ast.unparse(c.func).endswith("func.grad"))]
    f = ast.unparse(grads[-1].args[0]) if grads else "f"
    called = next((c for c in calls if isinstance(c.func, ast.Call) and c.args), None)
    x = ast.unparse(called.args[0]) if called is not None else "x"
    point = (f"under vmap, {f} is called on one point (its batch axis taken away) and "
             f"returns that point's outputs, e.g. shape (1,) for a model ending in "
             f"Linear(..., 1): one dim, not a scalar" if mapped else
             f"{f} is called on the whole batch and returns one output per point, while "
             f"torch.func.grad wants a function of one point (mapped over the points by vmap)")
    if len(grads) >= 2:  # grad(grad(f)): a second derivative
        fix = (f"from torch.func import vmap, hessian\n"
               f"H = vmap(hessian({f}))({x})      # (N, d_out, d_in, d_in): per-point Hessians\n"
               f"# one output: vmap(hessian(lambda p: {f}(p)[0]))({x})  # (N, d_in, d_in)")
    else:
        fix = (f"from torch.func import vmap, jacrev, grad\n"
               f"J = vmap(jacrev({f}))({x})       # (N, d_out, d_in): per-point Jacobians\n"
               f"# one output: vmap(grad(lambda p: {f}(p)[0]))({x})  # (N, d_in)")
    return (f"{where} takes torch.func.grad of {f}, which must return a scalar (a tensor with "
            f"0 dims): grad differentiates one number. Here {point}. Index one output "
            f"({f}(p)[0]) or use jacrev / hessian, which differentiate every output.", fix)


_WORDS = {"func-grad-non-scalar": _func_grad, "numpy-in-tape": _numpy_in_tape, "tape-used-twice": _tape_twice, "gradient-of-none": _gradient_of_none, "no-grad-required": _no_grad, "non-scalar-backward": _non_scalar,
          "unused-input": _unused, "graph-freed": _freed, "inplace-modified": _inplace,
          "numpy-requires-grad": _numpy, "integer-dtype": _integer}
