"""``nbderiv.explain``: what a student's own derivative array is, in plain words.

A student computed ``mine`` (a NumPy array, a torch tensor, a ``tf.Tensor``, a list, or
``None``) and believes it holds derivatives of ``model`` at ``x``. nbderiv computes the truth
itself with :func:`nbderiv.derivatives` (and, where needed, :func:`nbderiv.full_jacobian`) and
says which of these ``mine`` is (the codes are a contract, documented in ``docs/explain.md``):

``correct``, ``correct-reshaped``, ``axes-permuted``, ``summed-outputs``,
``cross-sample-jacobian``, ``coupled-samples``, ``wrong-order``, ``none``,
``zeros-graph-broken``, ``wrong``.

A code is raised only where the numbers support it: values are compared entry by entry with a
tolerance suited to the dtype (the looser of ``mine``'s and the truth's: float16, float32 or
float64), relative to the largest value of the array compared with, and ``correct`` is never
said of anything outside that tolerance.

This module knows nothing of Jupyter; the ``%%nnderiv explain`` cell magic
(:mod:`nbderiv.magics`) calls it for every derivative-like variable a cell creates.

>>> import torch, nbderiv
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
>>> x = torch.linspace(-1, 1, 20).reshape(-1, 1).requires_grad_(True)
>>> y = net(x)
>>> g, = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))
>>> nbderiv.explain(g, net, x).code
'summed-outputs'
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field

import numpy as np

# relative tolerance per dtype (of the largest value of the array compared with); the
# comparison takes the looser of mine's dtype and the truth's
RTOL = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-3, "float64": 1e-7}
# an absolute floor, far below anything a student would call a number
ATOL_FLOOR = {"float16": 1e-4, "bfloat16": 1e-4, "float32": 1e-9, "float64": 1e-15}
MAX_ORDER = 3          # orders tried when none is given
MAX_PERMUTED_AXES = 6  # permutations tried up to this many (squeezed) axes
CODES = ("correct", "correct-reshaped", "summed-outputs", "cross-sample-jacobian",
         "axes-permuted", "wrong-order", "coupled-samples", "none", "zeros-graph-broken",
         "wrong")


# -- the result -----------------------------------------------------------------------------------
@dataclass
class Explanation:
    """What ``mine`` is (``code``), in plain words (``message``), the corrected code in the
    student's framework (``fix``), the correct array in nbderiv's layout ``(N, d_out) +
    (n_inputs,) * order`` (``truth``) and the findings of the derivatives computed for it."""

    code: str
    message: str
    fix: str
    truth: np.ndarray | None = field(default=None, repr=False)
    findings: list = field(default_factory=list, repr=False)
    order: int | None = None
    name: str = "mine"
    framework: str | None = None

    def __repr__(self) -> str:
        lines = [f"[{self.code}] {self.message}"]
        if self.fix:
            lines.append("Fix:")
            lines += ["    " + line for line in self.fix.splitlines()]
        for f in self.findings:
            lines.append(f"finding [{f.code}] {f.message}")
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        from html import escape

        colour = {"correct": "#1a7f37", "correct-reshaped": "#1a7f37"}.get(self.code, "#b35900")
        parts = [f'<div class="nbderiv-explain"><p><b style="color:{colour}">[{escape(self.code)}]'
                 f"</b> {escape(self.message)}</p>"]
        if self.fix:
            parts.append(f"<p><b>Fix:</b></p><pre>{escape(self.fix)}</pre>")
        if self.findings:
            parts.append("<ul>" + "".join(f"<li><code>{escape(f.code)}</code>: "
                                          f"{escape(f.message)}</li>" for f in self.findings)
                         + "</ul>")
        return "".join(parts) + "</div>"


# -- reading mine -------------------------------------------------------------------------------
def _is_tensor(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith(("torch", "tensorflow", "keras", "jax"))


def to_array(mine):
    """``mine`` as a NumPy array (``None`` stays ``None``): torch tensors are detached, a
    1-tuple such as ``torch.autograd.grad``'s result is unwrapped. Raises TypeError for
    anything that is not numbers."""
    if mine is None:
        return None
    if isinstance(mine, (tuple, list)) and len(mine) == 1 and (mine[0] is None
                                                              or _is_tensor(mine[0])):
        return to_array(mine[0])
    if hasattr(mine, "detach") and callable(mine.detach):
        mine = mine.detach()
        if hasattr(mine, "cpu"):
            mine = mine.cpu()
        if str(getattr(mine, "dtype", "")) == "torch.bfloat16":
            mine = mine.float()
        return np.asarray(mine.numpy())
    if hasattr(mine, "numpy") and _is_tensor(mine):
        return np.asarray(mine.numpy())
    if isinstance(mine, (list, tuple)):
        mine = [to_array(m) if _is_tensor(m) else m for m in mine]
    arr = np.asarray(mine)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == bool):
        raise TypeError(f"mine must be numbers (an array or tensor) or None, got "
                        f"{type(mine).__name__}")
    return arr


def _dtype_name(arr) -> str:
    if arr is None:
        return "float32"
    name = str(arr.dtype)
    return name if name in RTOL else ("float64" if np.issubdtype(arr.dtype, np.floating)
                                      else "float32")


def _looser(*names) -> str:
    return max(names, key=lambda n: RTOL.get(n, 0))


def _framework_of(obj) -> str | None:
    mod = type(obj).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith(("tensorflow", "keras", "tf_keras")):
        return "tensorflow"
    return None


# -- the truth ----------------------------------------------------------------------------------
class _Truth:
    """Derivatives of ``model`` at ``x``, computed lazily to the highest order asked for."""

    def __init__(self, model, x, wrt):
        self.model, self.x, self.wrt = model, x, wrt
        self.d = None
        self._J = None
        self._fd = None

    def get(self, k):
        from .api import derivatives

        if self.d is None or self.d.order < k:
            self.d = derivatives(self.model, self.x, order=max(k, 1), wrt=self.wrt)
        return self.d.y if k == 0 else self.d[k]

    @property
    def n(self):
        return self.get(0).shape[0]

    @property
    def d_out(self):
        return self.get(0).shape[1]

    @property
    def n_wrt(self):
        return len(self.d.wrt) if self.d is not None else self.get(1).shape[-1]

    @property
    def codes(self):
        self.get(1)
        return self.d.codes

    @property
    def coupled(self):
        return "coupled-samples" in self.codes

    def jacobian(self):
        """The cross-sample Jacobian (N, d_out, N, n_wrt), restricted to the wrt inputs."""
        if self._J is None:
            from .api import full_jacobian

            J = full_jacobian(self.model, self.x)
            self._J = J[..., list(self.d.wrt)] if self.d is not None else J
        return self._J

    def fd_first(self):
        """Float64 central differences of the forward pass (order 1): the truth when the graph
        is cut inside the model and autodiff says 0."""
        if self._fd is None:
            from .api import derivatives

            d = derivatives(self.model, self.x, order=1, wrt=self.wrt, check=True)
            ref = getattr(d.check, "reference", {}).get(1) if d.check is not None else None
            self._fd = ref if ref is not None and np.isfinite(ref).all() else d[1]
        return self._fd


# -- comparing ------------------------------------------------------------------------------------
def _close(a, b, dtype) -> np.ndarray:
    """Entry-wise: |a - b| within the tolerance of ``dtype``, relative to max |b|."""
    scale = float(np.nanmax(np.abs(b))) if b.size else 0.0
    atol = RTOL[dtype] * scale + ATOL_FLOOR[dtype]
    with np.errstate(invalid="ignore"):
        return np.isclose(a, b, rtol=RTOL[dtype], atol=atol, equal_nan=True)


def _squeezed_shape(shape):
    return tuple(s for s in shape if s != 1)


def match(M, T, dtype):
    """How ``M`` holds the values of ``T``: ("same", None), ("reshape", None) (the same values
    in C order in another shape), ("permute", perm) (the axes of squeezed M in another order),
    or None."""
    if M.size != T.size:
        return None
    Tf = T.astype(np.float64)
    if M.shape == T.shape and _close(M, Tf, dtype).all():
        return "same", None
    if _close(M.reshape(T.shape), Tf, dtype).all():
        return "reshape", None
    ms, ts = _squeezed_shape(M.shape), _squeezed_shape(T.shape)
    if len(ms) != len(ts) or sorted(ms) != sorted(ts) or len(ms) > MAX_PERMUTED_AXES:
        return None
    Ms, Ts = M.reshape(ms), Tf.reshape(ts)
    for perm in itertools.permutations(range(len(ms))):
        if perm == tuple(range(len(ms))) or tuple(ms[p] for p in perm) != ts:
            continue
        if _close(Ms.transpose(perm), Ts, dtype).all():
            return "permute", perm
    return None


# -- words -----------------------------------------------------------------------------------------
def _shape(s) -> str:
    s = tuple(int(v) for v in s)
    return f"({s[0]},)" if len(s) == 1 else str(s)


def _num(v) -> str:
    return f"{float(v):.4g}"


def _ordinal(k) -> str:
    return {0: "zeroth", 1: "first", 2: "second", 3: "third"}.get(k, f"order-{k}")


def _axis_names(k) -> list:
    return ["point", "output"] + (["input"] if k == 1 else
                                  [f"input {i + 1}" for i in range(k)])


def _layout(k) -> str:
    return "(N, d_out" + ", n_inputs" * k + ")"


def _reshape_code(name, how, perm, src_shape, dst_shape, framework) -> str:
    """Code that turns ``name`` (shape src_shape) into nbderiv's layout dst_shape."""
    dst = _shape(dst_shape)
    if how in ("same", None):
        return name
    if how == "reshape":
        return f"{name}.reshape{dst}" if framework != "tensorflow" else \
            f"tf.reshape({name}, {dst})"
    sq = _shape(_squeezed_shape(src_shape))
    expr = name
    if tuple(src_shape) != _squeezed_shape(src_shape):
        expr = f"{expr}.reshape{sq}" if framework != "tensorflow" else f"tf.reshape({expr}, {sq})"
    p = tuple(int(v) for v in perm)
    if framework == "torch":
        expr = f"{expr}.permute{p}"
    elif framework == "tensorflow":
        expr = f"tf.transpose({expr}, {list(p)})"
    else:
        expr = f"np.transpose({expr}, {p})"
    if _squeezed_shape(dst_shape) != tuple(dst_shape):
        expr = f"{expr}.reshape{dst}" if framework != "tensorflow" else f"tf.reshape({expr}, {dst})"
    return expr


def fix_code(framework, order, *, model="model", x="x", wrt=None, eval_first=False,
             dtype="float32") -> str:
    """Short, runnable code computing the per-point derivative of ``order`` in nbderiv's
    layout (N, d_out) + (n_inputs,) * order, in the student's framework."""
    order = max(int(order or 1), 1)
    name = f"d{order}"
    keep = ""
    if wrt is not None:
        cols = [int(c) for c in wrt]
        if framework == "tensorflow":
            keep = "".join(f"\n{name} = tf.gather({name}, {cols}, axis={2 + i})"
                           for i in range(order)).lstrip("\n")
        else:
            keep = f"{name} = {name}" + "".join(f"[{':, ' * (2 + i)}{cols}]"
                                                for i in range(order))
        keep += "      # only the inputs in wrt"
    if framework == "tensorflow":
        tfdtype = "tf.float64" if dtype == "float64" else "tf.float32"
        lines = [f"x_ = tf.reshape(tf.cast({x}, {tfdtype}), ({_len(x, 'tensorflow')}, -1))"
                 "      # (N, d_in) floats"]
        if eval_first:
            lines.append(f"# {model}(x_, training=False): batch statistics off")
        call = f"{model}(x_, training=False)" if eval_first else f"{model}(x_)"
        indent = ""
        for k in range(order, 0, -1):
            lines.append(f"{indent}with tf.GradientTape() as tape{k}:")
            indent += "    "
            lines.append(f"{indent}tape{k}.watch(x_)")
        lines.append(f"{indent}y = tf.reshape({call}, ({_len(x, 'tensorflow')}, -1))"
                     "      # (N, d_out)")
        prev = "y"
        for k in range(1, order + 1):
            indent = indent[:-4]
            lines.append(f"{indent}d{k} = tape{k}.batch_jacobian({prev}, x_)"
                         f"      # {_layout(k)}")
            prev = f"d{k}"
        if keep:
            lines.append(keep)
        return "\n".join(lines)
    if framework == "torch":
        tdtype = "torch.float64" if dtype == "float64" else "torch.float32"
        lines = []
        if eval_first:
            lines.append(f"{model}.eval()                      # batch statistics off: points "
                         "independent")
        lines.append(f"x_ = torch.as_tensor({x}).detach().to({tdtype}).reshape(len({x}), -1)"
                     "  # (N, d_in)")
        lines.append(f"f = lambda p: {model}(p.unsqueeze(0)).reshape(-1)"
                     "      # one point (d_in,) -> (d_out,)")
        inner = "f"
        for _ in range(order):
            inner = f"torch.func.jacrev({inner})"
        lines.append(f"{name} = torch.func.vmap({inner})(x_)      # {_layout(order)}")
        if keep:
            lines.append(keep)
        return "\n".join(lines)
    return f"d = nbderiv.derivatives({model}, {x}, order={order})\n{name} = d[{order}]"


def _len(x, framework):
    return f"len({x})" if framework != "tensorflow" else f"tf.shape({x})[0]"


# -- the diagnosis ------------------------------------------------------------------------------------
def explain(mine, model, x, order=None, *, wrt=None, names=None) -> Explanation:
    """Say what ``mine`` (the student's derivative of ``model`` at ``x``) is.

    ``order`` is the order ``mine`` is meant to be (inferred from its shape and values when
    not given: orders 1..3 are tried, the one its shape points to first). ``wrt`` as in
    :func:`nbderiv.derivatives`. ``names`` = (mine, model, x): the names used in the
    message and the fix (default ``("mine", "model", "x")``).

    Returns an :class:`Explanation` (``.code``, ``.message``, ``.fix``, ``.truth``,
    ``.findings``).
    """
    if order is not None:
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be a positive int (1, 2, 3, ...) or None (inferred), "
                             f"got {order!r}. Fix: e.g. order=2.")
        order = int(order)
    name, mname, xname = tuple(names) if names is not None else ("mine", "model", "x")
    M = to_array(mine)
    truth = _Truth(model, x, wrt)
    truth.get(order or 1)
    framework = truth.d.framework
    orig_framework = _framework_of(mine) or framework
    ctx = _Context(name, mname, xname, framework, truth, wrt, mine, x, model)
    if M is None:
        return ctx.none(order or 1)
    if M.dtype == bool:
        M = M.astype(np.float64)
    ctx.orig_framework = orig_framework
    return ctx.classify(M, order)


class _Context:
    def __init__(self, name, mname, xname, framework, truth, wrt, mine, x, model):
        self.name, self.mname, self.xname = name, mname, xname
        self.framework, self.truth, self.wrt = framework, truth, wrt
        self.mine, self.x, self.model = mine, x, model
        self.orig_framework = framework

    # -- helpers ---------------------------------------------------------------------------------
    def result(self, code, message, k, fix=None, truth=None):
        d = self.truth.d
        if fix is None:
            fix = self.fix(k)
        if truth is None:
            truth = self.truth.get(k) if k else self.truth.get(1)
        return Explanation(code=code, message=message, fix=fix, truth=truth,
                           findings=list(d.findings), order=k, name=self.name,
                           framework=self.framework)

    def fix(self, k, eval_first=False):
        return fix_code(self.framework, k, model=self.mname, x=self.xname, wrt=self.wrt,
                        eval_first=eval_first, dtype=str(self.truth.get(1).dtype))

    def dims(self):
        t = self.truth
        return t.n, t.d_out, t.n_wrt

    def what(self, k):
        n, d_out, n_in = self.dims()
        T = self.truth.get(k)
        return (f"the {_ordinal(k)} derivative{'s' if k else ''} of {self.mname} at the {n} "
                f"points of {self.xname}, shape {_shape(T.shape)} = {_layout(k)}")

    def dtype_for(self, M, k):
        return _looser(_dtype_name(M), _dtype_name(self.truth.get(max(k, 1))))

    def truth_k(self, k):
        """The truth to compare with: autodiff, or central differences of the forward pass
        where the model cuts its own graph (autodiff says 0 there)."""
        if k == 1 and "graph-broken" in self.truth.codes:
            return self.truth.fd_first()
        return self.truth.get(k)

    def preferred_orders(self, M):
        n, d_out, n_in = self.dims()
        orders = list(range(1, MAX_ORDER + 1))

        def rank(k):
            size = n * d_out * n_in ** k
            exact = M.shape == (n, d_out) + (n_in,) * k
            return (not exact, M.size != size and M.size != n * n_in ** k,
                    M.ndim != 2 + k, k)
        return sorted(orders, key=rank)

    # -- the codes ---------------------------------------------------------------------------------
    def classify(self, M, order):
        name = self.name
        if "graph-broken" in self.truth.codes and M.size and not np.any(M):
            return self.zeros_graph_broken(M, order or 1, self.truth_k(order or 1))
        orders = [order] if order is not None else self.preferred_orders(M)
        for k in orders:
            found = self.match_order(M, k)
            if found is not None:
                return found
        n, d_out, n_in = self.dims()
        if order is not None:
            for k in [j for j in range(0, MAX_ORDER + 1) if j != order]:
                T = self.truth.get(k)
                how = match(M, T, self.dtype_for(M, k))
                if how is not None:
                    return self.wrong_order(M, order, k, how)
        else:
            T = self.truth.get(0)
            how = match(M, T, self.dtype_for(M, 0))
            if how is not None:
                return self.result(
                    "wrong-order",
                    f"{name} (shape {_shape(M.shape)}) holds the outputs y = {self.mname}"
                    f"({self.xname}) themselves (shape {_shape(T.shape)}), not a derivative: "
                    "nothing was differentiated.", 1)
        k = order if order is not None else orders[0]
        T = self.truth_k(k)
        if M.size and not np.any(M) and np.any(~_close(np.zeros_like(T, dtype=float),
                                                       T.astype(float), self.dtype_for(M, k))):
            if M.size in (T.size, T.size // max(d_out, 1)):
                return self.zeros_graph_broken(M, k, T)
        if M.size == T.size:
            Mv = M.reshape(T.shape).astype(np.float64)
            bad = ~_close(Mv, T.astype(np.float64), self.dtype_for(M, k))
            if bad.any() and np.all(Mv[bad] == 0) and np.all(T[bad] != 0):
                return self.zeros_graph_broken(M, k, T, partial=bad)
        return self.wrong(M, k, T)

    def match_order(self, M, k):
        name, (n, d_out, n_in) = self.name, self.dims()
        T = self.truth_k(k)
        dtype = self.dtype_for(M, k)
        how = match(M, T, dtype)
        if how is not None:
            kind, perm = how
            if kind == "same":
                return self.result(
                    "correct", f"{name} is correct: {self.what(k)}, within {dtype} "
                    f"tolerance (largest difference {_num(np.abs(M - T).max())}).", k,
                    fix="", truth=T)
            to = _reshape_code(name, kind, perm, M.shape, T.shape, self.orig_framework)
            # x.grad = x.grad.reshape(...) would fail (a .grad keeps its tensor's shape)
            target = name if name.isidentifier() else f"d{k}"
            if kind == "reshape":
                return self.result(
                    "correct-reshaped",
                    f"{name} has the right values: {self.what(k)}; only the shape differs: "
                    f"yours is {_shape(M.shape)}. The same numbers in nbderiv's layout: {to}.",
                    k, fix=f"{target} = {to}      # {_layout(k)}", truth=T)
            names = [a for a, s in zip(_axis_names(k), T.shape) if s != 1]
            yours = [names[perm.index(a)] for a in range(len(perm))]
            return self.result(
                "axes-permuted",
                f"{name} (shape {_shape(M.shape)}) holds the right values of "
                f"{self.what(k)}, but with the axes in another order: yours run "
                f"({', '.join(yours)}), nbderiv's layout is ({', '.join(names)})"
                f"{' (axes of size 1 left out)' if len(names) < T.ndim else ''}. Put them "
                f"back with {to}.", k, fix=f"{target} = {to}      # {_layout(k)}\n# or compute it "
                f"directly:\n" + self.fix(k), truth=T)
        if d_out > 1:
            S = T.sum(axis=1)
            how = match(M, S, dtype)
            if how is not None:
                j = np.unravel_index(np.argmax(np.abs(T - T[:, :1]).reshape(-1)), T.shape)
                return self.result(
                    "summed-outputs",
                    f"{name} (shape {_shape(M.shape)}) is the SUM over the {d_out} outputs of "
                    f"the per-point {_ordinal(k)} derivative, not each output's own: "
                    f"grad_outputs=ones_like(y) (or tape.gradient of a model with several "
                    f"outputs) adds the outputs' derivatives together. E.g. at point "
                    f"{j[0]}: yours {_num(S[j[0]][(...,) + tuple(j[2:])])}, outputs "
                    + ", ".join(_num(T[(j[0], o) + tuple(j[2:])]) for o in range(min(d_out, 4)))
                    + (", ..." if d_out > 4 else "")
                    + f". Take one derivative per output, shape {_shape(T.shape)} = "
                    f"{_layout(k)}.", k)
        if k == 1 and M.size == n * d_out * n * n_in and n > 1:
            J = self.truth.jacobian()
            how = match(M, J, dtype)
            if how is not None:
                off = J.copy()
                idx = np.arange(n)
                off[idx, :, idx, :] = 0
                return self.result(
                    "cross-sample-jacobian",
                    f"{name} (shape {_shape(M.shape)}) is the full cross-sample Jacobian "
                    f"dy[n]/dx[m] over all pairs of the {n} points, shape "
                    f"{_shape(J.shape)} = (N, d_out, N, n_inputs): it is {n}x larger than "
                    f"needed. Its block diagonal (m = n) holds the per-point derivatives "
                    + ("(the off-diagonal blocks are all zero: the points are independent)"
                       if not np.any(off) else
                       f"(off-diagonal blocks up to {_num(np.abs(off).max())}: this model "
                       "couples points)")
                    + f": J = {name}.reshape{_shape(J.shape)}; J[i, :, i, :] with "
                    f"i = arange({n}) gives {_shape(T.shape)}.", 1,
                    fix=(f"J = {name}.reshape{_shape(J.shape)}\n"
                         f"i = {'torch.arange' if self.orig_framework == 'torch' else 'np.arange'}"
                         f"({n})\nd1 = J[i, :, i, :]      # (N, d_out, n_inputs): the diagonal"
                         " blocks\n# cheaper, without the N x N Jacobian:\n" + self.fix(1)))
        if k == 1 and self.truth.coupled:
            J = self.truth.jacobian()
            C = J.sum(axis=0).transpose(1, 0, 2)  # (N, d_out, n): column sums
            how = match(M, C, dtype)
            summed = False
            if how is None and d_out > 1:
                how, summed = match(M, C.sum(axis=1), dtype), True
            if how is not None:
                diff = np.abs(C - T)
                return self.result(
                    "coupled-samples",
                    f"{name} (shape {_shape(M.shape)}) is what the grad_outputs=ones trick "
                    f"gives{' (summed over the outputs too)' if summed else ''}: the column "
                    f"sums of the N x N Jacobian, sum over n of dy[n]/dx[m]. That equals the "
                    f"per-point derivative only when each point's output depends on its own "
                    f"input alone, and this model couples the points (batch statistics, e.g. "
                    f"BatchNorm in training mode): here the cross-terms make it off by up to "
                    f"{_num(diff.max())} against true per-point values of at most "
                    f"{_num(np.abs(T).max())}.", 1, fix=self.fix(1, eval_first=True))
        return None

    def wrong_order(self, M, order, k, how):
        name = self.name
        kind, perm = how
        T = self.truth.get(k)
        if k == 0:
            what = f"the outputs y = {self.mname}({self.xname}) themselves (order 0)"
        else:
            what = f"the {_ordinal(k)} derivative (shape {_shape(T.shape)})"
        shape_note = "" if kind == "same" else \
            f" (as {_reshape_code(name, kind, perm, M.shape, T.shape, self.orig_framework)})"
        return self.result(
            "wrong-order",
            f"{name} (shape {_shape(M.shape)}) was meant to be the {_ordinal(order)} "
            f"derivative, but it holds {what}{shape_note}. "
            + ("For a derivative of order 2 or more, the first derivative must be "
               "differentiated again: create_graph=True on the first torch.autograd.grad (or "
               "a nested GradientTape), then the gradient of each of its entries. "
               if order > k else "It went one differentiation too far. ")
            + f"The {_ordinal(order)} derivative has shape {_shape(self.truth.get(order).shape)}"
            f" = {_layout(order)}.", order)

    def zeros_graph_broken(self, M, k, T, partial=None):
        name = self.name
        where = ""
        if partial is not None:
            n_bad = int(partial.sum())
            where = (f" {n_bad} of its {T.size} entries are exactly 0 where the truth is not "
                     f"(the rest are right)")
            axes = np.argwhere(partial)
            if T.ndim >= 3 and len(np.unique(axes[:, -1])) < T.shape[-1]:
                cols = sorted({int(c) for c in axes[:, -1]})
                where += f", all in input column(s) {cols}"
            where += "."
        else:
            where = f" All its {M.size} entries are exactly 0."
        big = np.unravel_index(np.argmax(np.abs(T)), T.shape)
        model_cut = "graph-broken" in self.truth.codes
        because = (f"{self.mname} itself cuts the graph inside its forward pass (nbderiv's "
                   "finding graph-broken: the output changes with the input, but autodiff sees "
                   "no path), so every autodiff route gives 0; the true values here are "
                   "float64 central differences of the forward pass."
                   if model_cut else
                   "Autodiff returns 0 for an input it sees no path to: the graph was cut "
                   "between the input and the output (.detach(), .numpy() or NumPy functions, "
                   ".item(), torch.no_grad(), tf.stop_gradient, an integer cast, or "
                   "allow_unused=True / unconnected_gradients='zero' on a tensor that was "
                   "replaced by a copy).")
        fix = self.fix(k)
        if model_cut:
            fix = ("# inside forward/call: keep framework operations throughout, e.g.\n"
                   "# torch.tanh(x) instead of np.tanh(x.detach().numpy()); no .detach(), "
                   ".item(), tf.stop_gradient\n" + fix)
        return self.result(
            "zeros-graph-broken",
            f"{name} (shape {_shape(M.shape)}) is zero where the true {_ordinal(k)} derivative "
            f"is not.{where} The truth reaches {_num(T[big])} at point {big[0]}. {because}",
            k, fix=fix, truth=T)

    def wrong(self, M, k, T):
        name, (n, d_out, n_in) = self.name, self.dims()
        dtype = self.dtype_for(M, k)
        Tf = T.astype(np.float64)
        note = ""
        if self.truth.coupled:
            note = (" Note: this model couples the points (finding coupled-samples), so any "
                    "per-point trick over the whole batch (grad_outputs=ones) mixes points.")
        if M.size != T.size and d_out > 1 and M.size == T.size // d_out:
            for j in range(d_out):
                if match(M, T[:, j:j + 1], dtype) is not None:
                    return self.result(
                        "wrong",
                        f"{name} (shape {_shape(M.shape)}) holds the {_ordinal(k)} derivative "
                        f"of output {j} alone, which is right for that output; the other "
                        f"{d_out - 1} output(s) of {self.mname} are missing: the full "
                        f"{_ordinal(k)} derivative has shape {_shape(T.shape)} = {_layout(k)}."
                        + note, k)
        if M.size != T.size:
            sizes = {f"order {j}": n * d_out * n_in ** j for j in range(1, MAX_ORDER + 1)}
            return self.result(
                "wrong",
                f"{name} has shape {_shape(M.shape)} ({M.size} numbers), which fits no "
                f"derivative of {self.mname} at these points: the {_ordinal(k)} derivative "
                f"has shape {_shape(T.shape)} = {_layout(k)} ({T.size} numbers; "
                + ", ".join(f"{a}: {b}" for a, b in sizes.items()) + ")." + note, k)
        Mv = M.reshape(T.shape).astype(np.float64)
        bad = ~_close(Mv, Tf, dtype)
        diff = np.abs(Mv - Tf)
        diff[~np.isfinite(diff)] = np.inf
        at = np.unravel_index(np.argmax(np.where(bad, diff, -1)), T.shape)
        idx = ", ".join([f"point {at[0]}", f"output {at[1]}"]
                        + [f"input {i}" for i in at[2:]])
        scale = float(np.abs(Tf).max()) or 1.0
        rel = float(diff[at]) / scale
        ratio = ""
        nz = np.abs(Tf) > RTOL[dtype] * scale
        if nz.any():
            r = Mv[nz] / Tf[nz]
            c = float(np.median(r))
            if c != 0 and abs(c - 1) > 10 * RTOL[dtype] and np.allclose(
                    Mv, c * Tf, rtol=10 * RTOL[dtype], atol=10 * RTOL[dtype] * scale):
                ratio = (f" Everywhere, yours is {_num(c)} times the truth: a constant factor "
                         "is missing or extra (a chain-rule factor such as the scale of "
                         "normalised inputs, or a wrong sign).")
        shape_note = "" if M.shape == T.shape else \
            f" (compared as {name}.reshape{_shape(T.shape)})"
        return self.result(
            "wrong",
            f"{name} differs from {self.what(k)}{shape_note}: {int(bad.sum())} of {T.size} "
            f"entries are off beyond {dtype} tolerance; the largest difference, "
            f"{_num(diff[at])} ({100 * rel:.3g}% of the largest true value "
            f"{_num(scale)}), is at {idx}: yours {_num(Mv[at])}, truth {_num(Tf[at])}."
            + ratio + note, k, truth=T)

    # -- None --------------------------------------------------------------------------------------
    def none(self, k):
        causes = none_causes(self.model, self.x, self.truth, self.framework, self.xname,
                             self.mname)
        T = self.truth_k(k)  # central differences where the model cuts its own graph
        head = (f"{self.name} is None: autodiff returned no gradient at all (the true "
                f"{_ordinal(k)} derivative has shape {_shape(T.shape)}, largest value "
                f"{_num(np.abs(T).max()) if T.size else 0}).")
        first = causes[0]
        message = f"{head} The cause that fits {self.mname} and {self.xname}: {first[1]}"
        if len(causes) > 1:
            message += " Other possible causes: " + " ".join(c[1] for c in causes[1:3])
        fix = first[2] + "\n# the per-point derivative itself:\n" + self.fix(k)
        return self.result("none", message, k, fix=fix, truth=T)


def none_causes(model, x, truth, framework, xname="x", mname="model") -> list:
    """[(cause, sentence, fix line)] for a gradient that came back None, the one that fits
    this model and x first."""
    causes = []
    codes = truth.codes
    xf = _framework_of(x)
    dtype = getattr(x, "dtype", None)
    if dtype is None and not isinstance(x, tuple):
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError):
            dtype = ""
    dtype = str(dtype)
    integer = any(s in dtype for s in ("int", "bool")) and "float" not in dtype
    if integer:
        if framework == "tensorflow":
            causes.append(("integer-dtype",
                           f"{xname} has an integer dtype ({dtype}): a GradientTape does not "
                           "watch integer tensors (it only logs a warning), so tape.gradient "
                           "returns None.",
                           f"{xname} = tf.cast({xname}, tf.float32)      # then tape.watch("
                           f"{xname})"))
        else:
            causes.append(("integer-dtype",
                           f"{xname} has an integer dtype ({dtype}): only floating point "
                           "tensors can require gradients.",
                           f"{xname} = {xname}.float().requires_grad_(True)"))
    if "graph-broken" in codes:
        causes.append(("graph-cut-in-model",
                       f"{mname} cuts the graph inside its forward pass (finding graph-broken): "
                       "the output changes with the input, but autodiff sees no path.",
                       "# use framework operations throughout forward/call: no .detach(), "
                       ".numpy(), .item(), tf.stop_gradient"))
    if "no-input-dependence" in codes:
        causes.append(("output-not-connected",
                       f"the output of {mname} does not depend on {xname} at all (finding "
                       "no-input-dependence): the true derivative is 0, and autodiff reports "
                       "an unused input as None.",
                       "# torch: torch.autograd.grad(..., allow_unused=True, materialize_grads="
                       "True); TF: tape.gradient(y, x, unconnected_gradients='zero')"))
    if framework == "tensorflow":
        if xf is None:
            causes.append(("not-a-tensor",
                           f"{xname} is a {type(x).__name__}, not a tf.Tensor: a tape watches "
                           "tensors only (and model.predict / .numpy() inside the tape leave it "
                           "as well).",
                           f"{xname} = tf.convert_to_tensor({xname}, tf.float32)\n"
                           f"with tf.GradientTape() as tape:\n    tape.watch({xname})\n"
                           f"    y = {mname}({xname})"))
        elif "Variable" not in type(x).__name__ and not integer:
            causes.append(("not-watched",
                           f"{xname} is a constant tf.Tensor, which a GradientTape does not "
                           f"record unless told to: without tape.watch({xname}) the tape sees "
                           f"no path from {xname} to y (model.predict or .numpy() inside the "
                           "tape cut it the same way).",
                           f"with tf.GradientTape() as tape:\n    tape.watch({xname})      # "
                           f"before using {xname}\n    y = {mname}({xname})\n"
                           f"g = tape.gradient(y, {xname})"))
        elif not integer:
            causes.append(("computed-outside-tape",
                           f"{xname} is a tf.Variable, so the tape watches it: y was computed "
                           "outside the `with tf.GradientTape()` block, or through "
                           "model.predict / .numpy() / NumPy functions, which the tape does not "
                           "record.",
                           f"with tf.GradientTape() as tape:\n    y = {mname}({xname})      # "
                           "the model call inside the tape, no .numpy()/predict"))
    else:
        if xf is None and not integer:
            causes.append(("not-a-tensor",
                           f"{xname} is a {type(x).__name__}, not a torch tensor: torch tracks "
                           "gradients only for tensors with requires_grad=True.",
                           f"{xname} = torch.tensor({xname}, dtype=torch.float32, "
                           "requires_grad=True)"))
        elif xf == "torch" and not integer:
            if not getattr(x, "requires_grad", False):
                causes.append(("no-requires-grad",
                               f"{xname}.requires_grad is False, so autograd never tracks "
                               f"{xname} and {xname}.grad stays None (backward() works when "
                               "the model's parameters require grad, but fills only theirs).",
                               f"{xname} = {xname}.detach().requires_grad_(True)      # before "
                               f"y = {mname}({xname})"))
            elif not getattr(x, "is_leaf", True):
                causes.append(("non-leaf",
                               f"{xname} is not a leaf tensor (it was made from another tensor "
                               "that requires grad, by arithmetic or .to(device)/.float()), and "
                               f"torch fills .grad only for leaves: {xname}.grad is None.",
                               f"{xname} = {xname}.detach().requires_grad_(True)      # a "
                               f"leaf; or {xname}.retain_grad() before backward()"))
            else:
                causes.append(("not-run",
                               f"{xname} requires grad and is a leaf, so {xname}.grad is None "
                               "only before backward() has run on an output of it (or after "
                               "zero_grad(set_to_none=True)), or for an output that does not "
                               f"use this very {xname} (a copy made with .detach() or "
                               "torch.tensor(...) was used instead).",
                               f"y = {mname}({xname}); y.sum().backward()      # then "
                               f"{xname}.grad"))
    if not causes:
        causes.append(("unknown", "no cause could be pinned down from the model and x alone.",
                       "# compute the gradient with the code below"))
    return causes


class _CallableModule(type(sys.modules[__name__])):
    """Importing ``nbderiv.explain`` (the module) makes Python set the package attribute
    ``nbderiv.explain`` to the module, hiding the function of the same name: the module is
    therefore callable and calls :func:`explain`, so ``nbderiv.explain(mine, model, x)`` works
    whichever of the two the attribute holds."""

    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
