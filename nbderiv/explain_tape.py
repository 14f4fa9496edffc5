"""Why a gradient came back ``None``, read from the cell's own code (``%%nnderiv explain``).

:func:`none_causes_from_code` finds the call that produced the ``None`` the student holds
(``g = tape.gradient(target, source)`` in TensorFlow, ``g = t.grad`` in torch) and reads the
code around it: whether the tape watched the source (or the source is a ``tf.Variable``),
whether the target was computed outside that tape's ``with`` block, and which operations
without a gradient (``tf.round``, ``tf.floor``, ``tf.math.ceil``, ``tf.math.rint``,
``tf.argmax``, a cast to an integer dtype, ``tf.stop_gradient``, ``.numpy()``, NumPy
functions, ``model.predict``) the source passes through on its way to the target. Only what the
code shows is said; when it shows nothing, only what is known (the tape did not record the
target as depending on the source). Nothing here imports a framework.

>>> code = '''
... V = tf.Variable(X)
... with tf.GradientTape() as tape:
...     u = m(tf.round(V * 10) / 10)
... g = tape.gradient(u, V)
... '''
>>> [c[0] for c in tape_causes("g", code, {})]
['no-gradient-op']
"""

from __future__ import annotations

import ast
import textwrap

from .explain_errors import _with_keyword

GRADIENT_CALLS = ("gradient", "jacobian", "batch_jacobian")
# TensorFlow operations whose gradient is None (checked: tape.gradient through each is None)
NO_GRADIENT = {
    "round": "has no gradient (its derivative is 0 almost everywhere, and TensorFlow "
             "registers none)",
    "rint": "has no gradient (like tf.round)",
    "floor": "has no gradient (its derivative is 0 almost everywhere, and TensorFlow "
             "registers none)",
    "ceil": "has no gradient (its derivative is 0 almost everywhere, and TensorFlow "
            "registers none)",
    "argmax": "returns integer indices, which carry no gradient",
    "argmin": "returns integer indices, which carry no gradient",
    "stop_gradient": "stops the gradient by design",
    "numpy": "leaves TensorFlow (a NumPy array; the tape records TensorFlow operations only)",
    "predict": "returns a NumPy array (the tape records TensorFlow operations only, not "
               "model.predict)",
}


def _text(node) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # noqa: BLE001 - a node ast cannot write back
        return ""


def _names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _targets(target) -> list:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _targets(t)]
    if isinstance(target, ast.Starred):
        return _targets(target.value)
    return []


def _assignments(tree) -> list:
    """[(lineno, [names], value, node)] of every assignment, in line order."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            names = [n for t in node.targets for n in _targets(t)]
            out.append((node.lineno, names, node.value, node))
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            out.append((node.lineno, _targets(node.target), node.value, node))
    return sorted(out, key=lambda a: a[0])


def _gradient_call(value):
    """(tape, target node, source node) of ``tape.gradient(target, source)`` (also behind an
    index: ``tape.gradient(u, [x, t])[0]`` gives the source ``x``); None otherwise."""
    index = None
    if isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant):
        index, value = value.slice.value, value.value
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and value.func.attr in GRADIENT_CALLS and isinstance(value.func.value, ast.Name)):
        return None
    args = list(value.args)
    kw = {k.arg: k.value for k in value.keywords}
    target = args[0] if args else kw.get("target")
    source = args[1] if len(args) > 1 else kw.get("sources")
    if target is None or source is None:
        return None
    if isinstance(source, (ast.List, ast.Tuple)):
        if isinstance(index, int) and 0 <= index < len(source.elts):
            source = source.elts[index]
        elif len(source.elts) == 1:
            source = source.elts[0]
        else:
            return None
    return value.func.value.id, target, source


def _tape_block(tree, tape, before):
    """The last ``with tf.GradientTape(...) as tape:`` that starts before line ``before``."""
    found = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and node.lineno < before:
            for item in node.items:
                call = item.context_expr
                if (isinstance(call, ast.Call) and _text(call.func).endswith("GradientTape")
                        and isinstance(item.optional_vars, ast.Name)
                        and item.optional_vars.id == tape):
                    if found is None or node.lineno > found.lineno:
                        found = node
    return found


def _is_variable(value) -> bool:
    return any("Variable" in c.__name__ for c in type(value).__mro__)


def _cut(call, tainted):
    """The name of the operation without a gradient that ``call`` applies to a value made
    from the source (``tainted``), or None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else (
        func.id if isinstance(func, ast.Name) else None)
    args = list(call.args) + [k.value for k in call.keywords]
    on_source = any(_names(a) & tainted for a in call.args) or (
        isinstance(func, ast.Attribute) and _names(func.value) & tainted)
    if not on_source:
        return None
    text = _text(func)
    if name == "cast":
        dtype = _text(args[1]) if len(args) > 1 else ""
        if any(s in dtype for s in ("int", "bool")):
            return f"tf.cast(..., {dtype})"
        return None
    if name == "numpy" and isinstance(func, ast.Attribute) and not call.args:
        return ".numpy()"
    if name == "predict":
        return f"{text}()"
    if name in NO_GRADIENT:
        return text
    if text.startswith(("np.", "numpy.")):
        return text
    return None


def _why(op) -> str:
    if op.startswith("tf.cast"):
        return "casts to an integer dtype, and integers carry no gradient"
    if op.startswith(("np.", "numpy.")):
        return "is a NumPy function (the tape records TensorFlow operations only)"
    key = op.rstrip("()").rsplit(".", 1)[-1]
    return NO_GRADIENT.get(key, "has no gradient")


def tape_causes(name, source, ns, model_name="model"):
    """[(cause, sentence, fix)] read from the code for the ``None`` held by ``name``, the
    cell's ``tape.gradient`` call; None when the code shows no such call."""
    try:
        tree = ast.parse(source or "")
    except SyntaxError:
        return None
    lines = (source or "").splitlines()
    assigns = _assignments(tree)
    call = None
    for _lineno, names, value, node in assigns:
        if name in names:
            found = _gradient_call(value)
            call = (found, node) if found is not None else None
    if call is None:
        return None
    (tape, target, src), grad_node = call
    grad_line = lines[grad_node.lineno - 1].strip() if grad_node.lineno <= len(lines) else ""
    src_text, target_text = _text(src), _text(target)
    block = _tape_block(tree, tape, grad_node.lineno)
    if block is None:
        return None
    start, end = block.lineno, block.end_lineno
    watched = any(
        isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "watch"
        and _text(c.func.value) == tape and c.args
        and src_text in ([_text(e) for e in c.args[0].elts]
                         if isinstance(c.args[0], (ast.List, ast.Tuple)) else [_text(c.args[0])])
        for n in block.body for c in ast.walk(n))
    variable = isinstance(src, ast.Name) and _is_variable(ns.get(src.id))
    note = (f" ({src_text} is watched: a watch does not help here)." if watched else
            f" ({src_text} is a tf.Variable, which a tape watches: a watch does not help "
            "here)." if variable else ".")
    causes = []
    # the target (a name) last assigned before the gradient call, outside the tape's block
    if isinstance(target, ast.Name):
        made = [a for a in assigns if target.id in a[1] and a[0] < grad_node.lineno]
        if made:
            lineno, _, value, node = made[-1]
            if not (start <= lineno <= end):
                line = lines[lineno - 1].strip()
                inner = _gradient_call(value)
                what = (f"the inner gradient `{line}`" if inner is not None else f"`{line}`")
                causes.append((
                    "computed-outside-tape",
                    f"{target.id} is computed by {what} on line {lineno}, outside the `with` "
                    f"block of {tape} (lines {start}-{end}): {tape} records only what runs "
                    f"inside its block, so it never saw {target.id} being made from "
                    f"{src_text} and {tape}.gradient({target.id}, {src_text}) is None" + note,
                    f"with tf.GradientTape() as {tape}:\n    ...\n    {line}      # inside "
                    f"the block of {tape}, so that {tape} records it\n{grad_line}"))
    # the target is an expression of the gradient call itself (ky[:, 0]), after the block
    if not isinstance(target, ast.Name) and grad_node.lineno > end and not causes:
        root = next((n for n in ast.walk(target) if isinstance(n, ast.Name)), None)
        kept = f"{root.id}_part" if root is not None else "target"
        causes.append((
            "computed-outside-tape",
            f"{target_text} is computed in the gradient call itself (line {grad_node.lineno}: "
            f"`{grad_line}`), after the `with` block of {tape} (lines {start}-{end}) ended: "
            f"{tape} records only what runs inside its block, so it never saw {target_text} "
            f"being made from {src_text}, and {tape}.gradient({target_text}, {src_text}) is "
            f"None" + note,
            _block_again(lines, block, [], [f"{kept} = {target_text}      # inside the "
                                             f"block of {tape}, so that {tape} records it"])
            + "\n" + grad_line.replace(target_text, kept, 1)))
    # the model called on a copy of the source made before the block (xs = kx * 1.0)
    if isinstance(target, ast.Name) and isinstance(src, ast.Name) and not causes:
        inside = [a for a in assigns if target.id in a[1] and start <= a[0] <= end
                  and a[0] < grad_node.lineno]
        if inside:
            lineno, _, value, _node = inside[-1]
            made_inside = {n for a in assigns if start <= a[0] < lineno for n in a[1]}
            for other in sorted(_names(value) - {src.id} - made_inside):
                before = [a for a in assigns if other in a[1] and a[0] < start]
                if before and src.id in _names(before[-1][2]):
                    b_line = lines[before[-1][0] - 1].strip()
                    line = lines[lineno - 1].strip()
                    causes.append((
                        "computed-outside-tape",
                        f"{target.id} is computed from {other} (line {lineno}: `{line}`), not "
                        f"from {src_text}: {other} was made from {src_text} on line "
                        f"{before[-1][0]} (`{b_line}`), before the `with` block of {tape}, "
                        f"where no tape records, so {tape} sees no path from {src_text} to "
                        f"{target.id} and {tape}.gradient({target.id}, {src_text}) is None"
                        + note,
                        _block_again(lines, block, [f"{b_line}      # inside the block, so "
                                                    f"that {tape} records it"], [])
                        + "\n" + grad_line))
                    break
    # operations without a gradient between the source and the target, inside the block
    if isinstance(src, ast.Name):
        tainted, cuts = {src.id}, []
        for lineno, names, value, _node in assigns:
            if not (start <= lineno <= end) or lineno >= grad_node.lineno:
                continue
            if _names(value) & tainted:
                for c in ast.walk(value):
                    if isinstance(c, ast.Call):
                        op = _cut(c, tainted)
                        if op is not None:
                            cuts.append((op, lineno))
                tainted |= set(names)
        for c in ast.walk(target):
            if isinstance(c, ast.Call):
                op = _cut(c, tainted)
                if op is not None:
                    cuts.append((op, grad_node.lineno))
        seen = set()
        for op, lineno in cuts:
            if op in seen:
                continue
            seen.add(op)
            line = lines[lineno - 1].strip()
            causes.append((
                "no-gradient-op",
                f"{src_text} reaches {target_text} through {op} (line {lineno}: `{line}`), which "
                f"{_why(op)}: the tape has no gradient to pass back through it, so "
                f"{tape}.gradient({target_text}, {src_text}) is None" + note,
                "# keep the path from the input to the output differentiable: no tf.round/"
                "floor/ceil/argmax, integer casts, .numpy(), NumPy functions or predict "
                f"between {src_text} and the model's output\nwith tf.GradientTape() as {tape}:"
                f"\n    {tape}.watch({src_text})\n    y = {model_name}({src_text})"))
    if causes:
        return causes
    if watched or variable:
        how = ("watched" if watched else "a tf.Variable, which a tape watches")
        return [("not-recorded",
                 f"{tape}.gradient({target_text}, {src_text}) returned None: {tape} did not "
                 f"record {target_text} as depending on {src_text}. {src_text} is {how}, so "
                 "a missing watch is not the cause; this cell's code does not show which step "
                 f"between {src_text} and {target_text} the tape did not record.",
                 f"with tf.GradientTape() as {tape}:\n    {tape}.watch({src_text})\n"
                 f"    y = {model_name}({src_text})      # TensorFlow operations only, inside "
                 f"the block\ng = {tape}.gradient(y, {src_text})")]
    return None


def _block_again(lines, block, first, last) -> str:
    """The cell's tape block (its ``with`` line and body, dedented), with the lines ``first``
    put at the top of its body (after its watch calls) and ``last`` at its end."""
    body = lines[block.lineno:block.end_lineno]
    head = lines[block.lineno - 1]
    indent = next((raw[:len(raw) - len(raw.lstrip())] for raw in body if raw.strip()),
                  head[:len(head) - len(head.lstrip())] + "    ")
    watches = 0
    while watches < len(body) and ".watch(" in body[watches]:
        watches += 1
    out = [head] + body[:watches] + [indent + t for t in first] + body[watches:] + \
        [indent + t for t in last]
    return textwrap.dedent("\n".join(out))


def grad_owner(name, source):
    """``'xx'`` when the cell assigns ``name = xx.grad`` (the last such assignment), else
    None; ``name`` may be ``'xx.grad'`` itself."""
    if name.endswith(".grad") and name[:-5].isidentifier():
        return name[:-5]
    try:
        tree = ast.parse(source or "")
    except SyntaxError:
        return None
    owner = None
    for _, names, value, _ in _assignments(tree):
        if name in names:
            owner = (value.value.id if isinstance(value, ast.Attribute) and value.attr == "grad"
                     and isinstance(value.value, ast.Name) else None)
    return owner


def _autograd_call(value):
    """The ``torch.autograd.grad(...)`` call node of ``value`` (also ``grad(...)[0]``, and
    ``grad(...)`` unpacked), or None."""
    if isinstance(value, ast.Subscript):
        value = value.value
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "grad" and "autograd" in _text(func):
            return value
    return None


def _keyword_true(call, name) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def unused_grad_causes(name, source):
    """([(code, why, fix)], order) for a torch ``None`` that ``name = torch.autograd.grad(a,
    x, allow_unused=True)[0]`` made, where ``a`` comes from an earlier ``grad`` call without
    ``create_graph=True``: that first derivative is a plain tensor with no graph back to x
    (``requires_grad_(True)`` on it makes a new leaf), and allow_unused=True turned autograd's
    error into None. None when the cell shows no such chain."""
    try:
        tree = ast.parse(textwrap.dedent(source or ""))
    except SyntaxError:
        return None
    made = {}  # name -> (line, its grad call) of the assignments from a grad call
    found = None
    for line, names, value, node in _assignments(tree):
        call = _autograd_call(value)
        if call is None:
            continue
        if name in names and _keyword_true(call, "allow_unused"):
            found = (line, call, node)
        for n in names:
            made.setdefault(n, (line, call, node))
    if found is None or not found[1].args:
        return None
    line, call, node = found
    for base in sorted(_names(call.args[0])):
        first = made.get(base)
        if first is None or first[0] >= line or _keyword_true(first[1], "create_graph"):
            continue
        first_text = _text(first[2])
        fixed_first = _with_keyword(first_text, "create_graph=True")
        again = ast.parse(_text(call)).body[0].value
        again.keywords = [k for k in again.keywords if k.arg != "allow_unused"]
        fixed_line = _text(node).replace(_text(call), ast.unparse(again))
        why = (f"{base} comes from `{first_text}`, which has no create_graph=True: autograd "
               f"returns it as a plain tensor with no graph back to the input (a "
               f"requires_grad_(True) on it makes it a new leaf, unconnected to the input), so "
               f"nothing links `{_text(node)}` to its input; allow_unused=True turned "
               "autograd's error ('One of the differentiated Tensors appears to not have been "
               "used in the graph') into this None.")
        fix = (f"{fixed_first}   # keeps the graph: {base} can be differentiated again\n"
               f"{fixed_line}   # no allow_unused: a None should be an error")
        return [("first-derivative-without-graph", why, fix)], 2
    return None


def differentiation_depths(source) -> dict:
    r"""{name: how many differentiations made it} for the names a cell assigns from a
    gradient call (``torch.autograd.grad``, ``grad``, ``tape.gradient`` / ``jacobian`` /
    ``batch_jacobian``: one more than its target's), or from such names (an index, a
    reshape: as deep as they are). What the cell's code says each derivative is meant to be.

    >>> differentiation_depths("u = net(t)\n"
    ...     "u_t = torch.autograd.grad(u, t, torch.ones_like(u), create_graph=True)[0]\n"
    ...     "u_tt = torch.autograd.grad(u_t, t, torch.ones_like(u_t))[0]\nv = u_tt[:, 0]")
    {'u_t': 1, 'u_tt': 2, 'v': 2}
    """
    try:
        tree = ast.parse(textwrap.dedent(source or ""))
    except SyntaxError:
        return {}
    depths = {}

    def deepest(node) -> int:
        return max((depths.get(n, 0) for n in _names(node)), default=0)

    for _, names, value, _ in _assignments(tree):
        target = _differentiated(value)
        depth = deepest(target) + 1 if target is not None else deepest(value)
        for name in names:
            if depth:
                depths[name] = depth
            else:
                depths.pop(name, None)
    return depths


def _differentiated(value):
    """The target node of a gradient call (``grad(u, x)[0]``, ``tape.gradient(u, x)``), or
    None for anything else."""
    tape = _gradient_call(value)
    if tape is not None:
        return tape[1]
    if isinstance(value, ast.Subscript):
        value = value.value
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "grad" and (value.args or value.keywords):
            kw = {k.arg: k.value for k in value.keywords}
            return value.args[0] if value.args else kw.get("outputs")
    return None
