"""Which code a student's array is (``correct``, ``summed-outputs``, ``wrong-order``, ...):
the rules behind :func:`nbderiv.explain`, each with its message and fix.

:class:`_Context` holds the names and the truth of one call; :meth:`_Context.classify` tries
the codes in turn and returns the explanation built by ``make`` (the ``Explanation`` class of
:mod:`nbderiv.explain`, passed in so that this module does not import it).
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from .backends.tensorflow_code import MOMENTS_RESTORE, MOMENTS_SWAP
from .explain_causes import none_causes
from .explain_errors import ordinal as _ordinal
from .explain_fix import (
    _framework_of,
    _layout,
    _many,
    _reshape_code,
    _shape,
    diagonal_blocks_code,
    fix_code,
)
from .explain_match import RTOL, _close, _dtype_name, _looser, match

MAX_ORDER = 3          # orders tried when none is given

MOMENTS_NOTE = (
    " Cause: the model's Keras normalization layers (LayerNormalization, GroupNormalization) "
    "take the variance from tf.nn.moments, which stops the gradient through the mean inside "
    "it: right for first derivatives, wrong from the second on, whatever the dtype. The truth "
    "here uses the plain variance formula; the fix below does the same while it "
    "differentiates.")


# cross-sample Jacobians up to this many entries are searched for a row or column
SLICE_JACOBIAN_MAX = 1 << 20


def _num(v) -> str:
    return f"{float(v):.4g}"


def _axis_names(k) -> list:
    return ["point", "output"] + (["input"] if k == 1 else
                                  [f"input {i + 1}" for i in range(k)])


class _Context:
    def __init__(self, name, mname, xname, framework, truth, wrt, mine, x, model, *, make):
        self.make = make  # builds the result: nbderiv.explain.Explanation
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
        return self.make(code=code, message=message, fix=fix, truth=truth,
                         findings=list(d.findings), order=k, name=self.name,
                         framework=self.framework)

    def tuple_code(self, k, wrt) -> str:
        """For x given as a tuple of arguments: nbderiv's call of order k (it splits the
        features back into the model's arguments; ``d.code`` prints the plain code)."""
        extra = "" if wrt is None else f", wrt={list(wrt)}"
        return (f"# {self.xname} is a tuple of arguments: nbderiv calls the model on them "
                f"(print(d.code) shows the plain code)\n"
                f"d = nbderiv.derivatives({self.mname}, {self.xname}, order={k}{extra})\n"
                f"d{k} = d[{k}]      # {self.layout(k, wrt=wrt is not None)}")

    def fix(self, k, eval_first=False):
        """The code that computes the right order-k derivative; where the model cuts its
        own graph (finding graph-broken), no autodiff outside it can: what to change in it,
        and the central differences of its outputs meanwhile."""
        code = self.autodiff_fix(k, eval_first)
        if "graph-broken" not in self.truth.codes:
            return code
        return ("# The model itself cuts the graph: no autodiff outside it can follow x "
                "through the cut.\n"
                "# 1. In forward/call keep framework operations throughout, e.g.\n"
                "#    torch.tanh(x) instead of np.tanh(x.detach().numpy()); no .detach(), "
                ".item(), tf.stop_gradient.\n"
                "# 2. Then the per-point derivative (uncomment once the model is fixed):\n"
                + "\n".join("# " + line for line in code.splitlines()) + "\n"
                "# Meanwhile, the derivative of the model as it is now, by float64 central "
                "differences of its outputs:\n"
                f"d{k} = nbderiv.derivatives({self.mname}, {self.xname}, order={k}, "
                f"check=True).check.reference[{k}]")

    def autodiff_fix(self, k, eval_first=False):
        if isinstance(self.x, tuple):
            return self.tuple_code(k, self.wrt)
        if k >= 2 and not eval_first and self.truth.coupled:
            # torch.func.vmap runs each point alone (and refuses BatchNorm's update in training
            # mode): the per-point blocks of a model that couples points, from nbderiv
            wrt = "" if self.wrt is None else f", wrt={list(self.wrt)}"
            return (f"# this model couples the points: each point's derivative with the rest "
                    f"of the batch held fixed\nd = nbderiv.derivatives({self.mname}, "
                    f"{self.xname}, order={k}{wrt})\nd{k} = d[{k}]      # {self.layout(k)}")
        return fix_code(self.framework, k, model=self.mname, x=self.xname, wrt=self.wrt,
                        eval_first=eval_first, dtype=str(self.truth.get(1).dtype),
                        **self.shapes(), loop=self.loop(), keep=self.notebook_names())

    def shapes(self):
        """``pshape`` (S, one point's own shape) and ``oshape`` (O, one point's output's)."""
        try:  # a tuple of arguments: their features side by side, one axis per point
            pshape = () if isinstance(self.x, tuple) else tuple(
                int(v) for v in np.shape(self.x)[1:])
        except (TypeError, ValueError):
            pshape = ()
        return {"pshape": pshape, "oshape": tuple(int(v) for v in self.truth.get(0).shape[1:])}

    def many(self):
        """Whether points or outputs have several axes: nbderiv's layout is (N,) + O + S * k."""
        return _many(**self.shapes())

    def layout(self, k, wrt=True):
        """nbderiv's layout of order k in words (S named where points have several axes)."""
        return _layout(k, **self.shapes(), wrt=self.wrt if wrt else None)

    def loop(self):
        """torch.func.vmap cannot batch torch's recurrent layers (nn.GRU): the torch fix runs
        one point at a time for a model holding one."""
        import sys

        torch = sys.modules.get("torch")
        modules = getattr(self.model, "modules", None)
        if self.framework != "torch" or torch is None or not callable(modules):
            return False
        try:
            return any(isinstance(m, torch.nn.RNNBase) for m in modules())
        except TypeError:
            return False

    def dims(self):
        t = self.truth
        return t.n, t.d_out, t.n_wrt

    def what(self, k):
        n, d_out, n_in = self.dims()
        T = self.truth.get(k)
        return (f"the {_ordinal(k)} derivative{'s' if k else ''} of {self.mname} at the {n} "
                f"points of {self.xname}, shape {_shape(T.shape)} = {self.layout(k)}")

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
        zeros = bool(M.size) and not np.any(M)
        if zeros and order is None:  # zeros fit any order whose truth is 0: no guessing up
            meant = self.order_in_cell()  # unless the cell's code says (grad of a grad)
            found = self.match_order(M, meant) if meant in orders else None
            if found is not None and found.code.startswith("correct"):
                return found
            found = self.zeros_of_unknown_order(M, orders)
            if found is not None:
                return found
        for k in orders:
            found = self.match_order(M, k)
            if found is not None:
                return found
        if self.truth.random or self.random_in_cell():
            return self.random(order or orders[0])
        n, d_out, n_in = self.dims()
        if order is not None and not zeros:  # (zeros match every order whose truth is 0)
            for k in [j for j in range(0, MAX_ORDER + 1) if j != order]:
                T = self.truth.get(k)
                how = match(M, T, self.dtype_for(M, k))
                if how is not None:
                    return self.wrong_order(M, order, k, how)
            for k in [j for j in range(1, MAX_ORDER + 1) if j != order]:
                found = self.match_order(M, k)  # e.g. one output's first derivative
                if found is not None and found.code not in ("wrong", "correct"):
                    return self.result(
                        "wrong-order",
                        f"{name} (shape {_shape(M.shape)}) was meant to be the "
                        f"{_ordinal(order)} derivative, but it is of order {k}: "
                        + found.message + (
                            " For order 2 or more, differentiate the first derivative "
                            "again: create_graph=True on the first torch.autograd.grad (or a "
                            "nested GradientTape), then the gradient of each of its entries."
                            if order > k else ""), order)
        else:
            T = self.truth.get(0)
            how = match(M, T, self.dtype_for(M, 0))
            if how is not None:
                return self.result(
                    "wrong-order",
                    f"{name} (shape {_shape(M.shape)}) holds the outputs y = {self.mname}"
                    f"({self.xname}) themselves (shape {_shape(T.shape)}), not a derivative: "
                    "nothing was differentiated.", 1)
        for k in (orders if order is not None else (1, 2)):
            if k <= 2:
                found = self.parts(M, k)
                if found is not None:
                    return found
        k = order if order is not None else orders[0]
        T = self.truth_k(k)
        if self.zeros_against(M, k, T):
            return self.zeros_graph_broken(M, k, T)
        if M.size == T.size:
            Mv = M.reshape(T.shape).astype(np.float64)
            bad = ~_close(Mv, T.astype(np.float64), self.dtype_for(M, k))
            if bad.any() and np.all(Mv[bad] == 0) and np.all(T[bad] != 0):
                return self.zeros_graph_broken(M, k, T, partial=bad)
        found = self.accumulated(M)
        if found is not None:
            return found
        return self.wrong(M, k, T)

    def accumulated(self, M):
        """``wrong``, named: the first derivative plus the second, which ``.grad`` holds after
        ``u.backward(create_graph=True)`` then ``x.grad.backward(ones)`` (backward adds into
        ``.grad``; the first result is the very same tensor, changed too)."""
        if self.truth.random or self.truth.coupled or not np.issubdtype(M.dtype, np.number):
            return None
        T1 = self.truth_k(1).astype(np.float64)
        if M.size != T1.size:
            return None
        try:
            both = T1 + self.truth_k(2).astype(np.float64).sum(axis=-1)   # d1 + d2, sum over j
        except Exception:  # noqa: BLE001 - no second derivative to compare with: not this
            return None
        dtype = self.dtype_for(M, 1)
        if match(M, both, dtype) is None or match(M, T1, dtype) is not None:
            return None
        return self.result(
            "wrong",
            f"{self.name} (shape {_shape(M.shape)}) is the first derivative PLUS the second "
            f"(summed over its second input axis): .grad adds every backward pass into the "
            f"same tensor, so after u.backward(torch.ones_like(u), create_graph=True) and "
            f"then x.grad.backward(...), x.grad holds d1 + d2, and the first result you kept "
            f"(u_x = x.grad) is that very tensor, changed too. Use torch.autograd.grad, which "
            f"returns new tensors instead of adding to .grad (or x.grad = None between the "
            f"passes).", 2, fix=self.fix(2))

    def cross_sample_second(self, M, T, dtype):
        """``cross-sample-jacobian`` at order 2: the Hessian of the summed output over the
        whole batch, (N, n_inputs, N, n_inputs), or a Jacobian of a Jacobian over it,
        (N, d_out, N, n_inputs, N, n_inputs): the per-point second derivatives on its
        diagonal, the rest 0 for points that do not interact."""
        n, d_out, n_in = self.dims()
        if d_out == 1 and M.size == (n * n_in) ** 2:
            shape, words = (n, n_in, n, n_in), (
                "the Hessian of the summed output over the whole batch, d2(sum_n y[n]) / "
                "dx[m] dx[p] for every pair of points", "(N, n_inputs, N, n_inputs)")
        elif M.size == n ** 3 * d_out * n_in ** 2:
            shape, words = (n, d_out, n, n_in, n, n_in), (
                "a Jacobian of a Jacobian over the whole batch, d2 y[n] / dx[m] dx[p] for "
                "every triple of points", "(N, d_out, N, n_inputs, N, n_inputs)")
        else:
            return None
        Mf = np.asarray(M, dtype=np.float64).reshape(shape)
        i = np.arange(n)
        diagonal = (i, slice(None)) * (len(shape) // 2)  # [i, :, i, :] or [i, :, i, :, i, :]
        if not _close(Mf[diagonal].reshape(T.shape), T.astype(np.float64), dtype).all():
            return None
        rest = Mf.copy()
        rest[diagonal] = 0
        target = self.name if self.name.isidentifier() else "mine"
        get = f"{target}.reshape{_shape(shape)}[{', '.join(['i, :'] * (len(shape) // 2))}]"
        extract = (f"i = {'torch' if self.orig_framework == 'torch' else 'np'}.arange({n})\n"
                   f"d2 = {get}" + ("[:, None]" if len(shape) == 4 else "")
                   + f"      # {_shape(T.shape)} = {self.layout(2)}")
        if self.orig_framework == "tensorflow":
            extract = extract.replace(f"{target}.reshape", f"np.reshape(np.asarray({target}), ") \
                .replace(f"{_shape(shape)}[", f"{_shape(shape)})[")
        return self.result(
            "cross-sample-jacobian",
            f"{self.name} (shape {_shape(M.shape)}) is {words[0]}, shape {words[1]}: "
            f"{M.size // T.size}x larger than needed. Its diagonal "
            f"({'m = p = n' if len(shape) == 6 else 'm = p'}) holds the per-point second "
            f"derivatives, shape {_shape(T.shape)} = {self.layout(2)}"
            + (" (the rest is all zero: the points are independent)" if not np.any(rest) else
               f" (the rest up to {_num(np.abs(rest).max())})") + ".", 2,
            fix=extract + "\n# cheaper, without the batch-sized axes:\n" + self.fix(2),
            truth=T)

    def cross_sample_slice(self, M, T, dtype):
        """``cross-sample-jacobian`` for one slice of the full Jacobian J (N, d_out, N,
        n_inputs) at a fixed point p: its column J[:, :, p, :] (every point's output
        differentiated by point p's input) or its row J[p] (point p's output by every point's
        input), all outputs or one. For points that do not interact every entry but point p's
        is 0: no graph is cut there."""
        n, d_out, _ = self.dims()
        J = self.truth.jacobian().astype(np.float64)
        picks = [("column", p, j) for p in range(n) for j in (None, *range(d_out))] + \
            [("row", p, j) for p in range(n) for j in (None, *range(d_out))]
        for kind, p, j in picks:
            part = J[:, :, p, :] if kind == "column" else J[p].transpose(1, 0, 2)  # (N, d_out, n)
            if j is not None:
                if d_out == 1:
                    continue  # the same numbers as all outputs
                part = part[:, j]
            if part.size != M.size or match(M, part, dtype) is None:
                continue
            if match(M, T if j is None else T[:, j], dtype) is not None:
                return None  # the slice is the derivative itself (one point)
            others = np.delete(part, p, axis=0)
            if not np.any(others):  # points that do not interact: row p and column p agree
                kind = "row or column"
            out = "" if j is None else f"output {j}, "
            o = j if j is not None else ":"
            column = (f"J[:, {o}, {p}, :], every point's output differentiated with respect "
                      f"to point {p}'s input, dy[n]/dx[{p}] for n = 0..{n - 1}")
            row = (f"J[{p}, {o}, :, :], point {p}'s output differentiated with respect to "
                   f"every point's input, dy[{p}]/dx[m] for m = 0..{n - 1}")
            where = {"column": column, "row": row}.get(kind, f"{column} (or its row {row})")
            zeros = (f"Point n's output depends only on point n's input, so every entry but "
                     f"point {p}'s is 0: those zeros are right, no graph is cut."
                     if not np.any(others) else
                     f"This model couples points, so the other entries are not 0 (up to "
                     f"{_num(np.abs(others).max())}), but they are not the per-point "
                     f"derivatives either.")
            return self.result(
                "cross-sample-jacobian",
                f"{self.name} (shape {_shape(M.shape)}) is one {kind} of the cross-sample "
                f"Jacobian J = dy[n]/dx[m] (shape {_shape(J.shape)} = (N, d_out, N, "
                f"n_inputs), what torch.autograd.functional.jacobian(model, x) or "
                f"tape.jacobian gives): {out}{where}. {zeros} The per-point "
                f"derivatives are J's diagonal blocks J[i, :, i, :] with i = arange({n}), "
                f"shape {_shape(T.shape)} = {self.layout(1)}.", 1,
                fix="# the per-point derivatives, without the N x N Jacobian:\n" + self.fix(1))
        return None

    def coupled_alone(self, M, k, alone):
        """``coupled-samples``: each point differentiated with the model run on it alone."""
        T = self.truth.get(k)
        p = int(np.argmax(np.abs(T - alone).reshape(len(T), -1).max(axis=1)))
        train = "train-mode" in self.truth.codes
        cause = ("a layer in training mode (finding train-mode: batch statistics, e.g. "
                 "BatchNorm)" if train else "its forward pass (it mixes the rows of the batch, "
                 "e.g. x - x.mean(0), a normalisation over the batch, attention across points)")
        return self.result(
            "coupled-samples",
            f"{self.name} (shape {_shape(M.shape)}) is each point's {_ordinal(k)} derivative "
            f"with {self.mname} run on that point alone, a batch of one (what vmap(jacrev) or a "
            f"loop over the points computes). This model couples the points through {cause}, "
            f"so a point alone is another input than the same point in the batch: at point "
            f"{p} yours is {_num(np.abs(alone[p]).max())} at most, the derivative with the rest "
            f"of the batch held fixed {_num(np.abs(T[p]).max())}. nbderiv reports the latter, "
            f"shape {_shape(T.shape)} = {self.layout(k)}.", k,
            fix=("# each point's derivative, the rest of the batch held fixed (what nbderiv "
                 "reports):\n" + diagonal_blocks_code(
                     self.framework, model=self.mname, x=self.xname, wrt=self.wrt,
                     dtype=str(self.truth.get(1).dtype), **self.shapes()))
            if k == 1 else None)

    def random(self, k):
        """``random-model``: the model draws random numbers while it runs (or the cell calls
        a Keras model with training=True, which makes it draw them): no truth to compare
        with."""
        torch_model = self.framework == "torch"
        if not self.truth.random:  # the cell's training=True: the model is fine as it is
            return self.result(
                "random-model",
                f"the cell calls {self.mname} with training=True: its Dropout (or noise) "
                "layers then drop random units (finding train-mode with training=True), so "
                f"{self.name} is the derivative of one random draw of the network, another on "
                "every call, not the model's. Call it with training=False (the default) to "
                "differentiate the model itself.", k, fix=self.fix(k))
        return self.result(
            "random-model",
            f"{self.mname} gives random outputs (finding train-mode: e.g. Dropout in training "
            "mode, or noise drawn in forward): its derivative changes from call to call, so "
            f"{self.name} cannot be judged against one draw. Switch the randomness off "
            + ("(model.eval()) " if torch_model else "(call it with training=False) ")
            + "and differentiate that deterministic model.", k,
            fix=self.fix(k, eval_first=True))

    def random_in_cell(self) -> bool:
        """Whether the cell calls a Keras model with training=True and the model then draws
        random numbers (Dropout, GaussianNoise): two such passes differ (a BatchNorm's batch
        statistics alone do not)."""
        cell = getattr(self, "cell", None)
        if not cell or self.framework != "tensorflow" or not re.search(
                r"\btraining\s*=\s*True\b", cell[0] or ""):
            return False
        from .compute import one_at_a_time, open_call, probe

        try:
            call = open_call(self.model, self.x, None, kwargs={"training": True})
            with one_at_a_time(call):  # (its state put back: moving statistics, seeds)
                return bool(probe(call).stochastic)
        except Exception:  # the model takes no training argument: not this
            return False

    def selected_outputs(self, M, k, T, dtype):
        """``selected-outputs``: for each point, the derivative of one output (the same one
        for all points, or one per point: a saliency map for each point's label)."""
        name, (n, d_out, _) = self.name, self.dims()
        Tf = T.reshape(n, d_out, -1).astype(np.float64)
        Mf = M.reshape(n, -1).astype(np.float64)
        close = np.stack([_close(Mf, Tf[:, j], dtype).all(axis=1) for j in range(d_out)], 1)
        if not close.any(axis=1).all():
            return None
        picks = close.argmax(axis=1)
        truth = T[np.arange(n), picks][:, None]
        if (picks == picks[0]).all():
            j = int(picks[0])
            message = (f"{name} (shape {_shape(M.shape)}) is the {_ordinal(k)} derivative of "
                       f"output {j} alone, right for that output; the model has {d_out} "
                       f"outputs. All of them: shape {_shape(T.shape)} = {self.layout(k)}.")
            fix = (f"d = nbderiv.derivatives({self.mname}, {self.xname}, order={k}, "
                   f"target={j})   # output {j}: d[{k}] has shape {_shape(truth.shape)}\n"
                   f"# every output:\n" + self.fix(k))
        else:
            shown = ", ".join(map(str, picks[:8].tolist())) + (", ..." if n > 8 else "")
            message = (f"{name} (shape {_shape(M.shape)}) holds, for each point, the "
                       f"{_ordinal(k)} derivative of one of the {d_out} outputs: outputs "
                       f"[{shown}] for points 0, 1, ... (a saliency map for each point's own "
                       f"target, e.g. its label): right for those outputs. nbderiv gives the "
                       f"same with target=.")
            fix = (f"targets = [{', '.join(map(str, picks.tolist()))}]   # e.g. the labels\n"
                   f"d = nbderiv.derivatives({self.mname}, {self.xname}, order={k}, "
                   f"target=targets)   # d[{k}]: shape {_shape(truth.shape)}")
        return self.result("selected-outputs", message, k, fix=fix, truth=truth)

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
            to = _reshape_code(name, kind, perm, M.shape, T.shape, self.orig_framework,
                               self.mine)
            # x.grad = x.grad.reshape(...) would fail (a .grad keeps its tensor's shape)
            target = name if name.isidentifier() else f"d{k}"
            if kind == "reshape":
                return self.result(
                    "correct-reshaped",
                    f"{name} has the right values: {self.what(k)}; only the shape differs: "
                    f"yours is {_shape(M.shape)}. The same numbers in nbderiv's layout: {to}.",
                    k, fix=f"{target} = {to}      # {self.layout(k)}", truth=T)
            names = [a for a, s in zip(_axis_names(k), T.shape) if s != 1]
            yours = [names[perm.index(a)] for a in range(len(perm))]
            return self.result(
                "axes-permuted",
                f"{name} (shape {_shape(M.shape)}) holds the right values of "
                f"{self.what(k)}, but with the axes in another order: yours run "
                f"({', '.join(yours)}), nbderiv's layout is ({', '.join(names)})"
                f"{' (axes of size 1 left out)' if len(names) < T.ndim else ''}. Put them "
                f"back with {to}.", k, fix=f"{target} = {to}      # {self.layout(k)}\n# or compute it "
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
                    f"{self.layout(k)}.", k)
        if d_out > 1 and n > 1 and M.size == n * n_in ** k and np.issubdtype(M.dtype, np.number):
            S = T.sum(axis=1)
            if match(M.astype(np.float64) * (n * d_out), S, dtype) is not None:
                return self.result(
                    "summed-outputs",
                    f"{name} (shape {_shape(M.shape)}) is the MEAN over the {n} points and "
                    f"the {d_out} outputs of y: y.mean().backward() (or a mean loss) gives "
                    f"each point's {_ordinal(k)} derivative summed over the outputs, then "
                    f"divided by N * d_out = {n * d_out}. Not each output's own derivative, "
                    f"and not on the derivative's scale: take one derivative per output, "
                    f"shape {_shape(T.shape)} = {self.layout(k)}.", k)
        if d_out > 1 and M.size == n * n_in ** k and n_in ** k > 1:
            found = self.selected_outputs(M, k, T, dtype)
            if found is not None:
                return found
        if k == 1 and M.size == n * d_out * n * n_in and n > 1:
            J = self.truth.jacobian()
            how = match(M, J, dtype)
            if how is not None:
                fw = "torch" if self.orig_framework == "torch" else self.orig_framework
                target = name if name.isidentifier() or name.endswith(".grad") else "mine"
                reshaped = (f"{target}.reshape{_shape(J.shape)}" if fw == "torch" else
                            f"np.reshape(np.asarray({target}), {_shape(J.shape)})")
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
                    + f": J = {reshaped}; J[i, :, i, :] with "
                    f"i = arange({n}) gives {_shape(T.shape)}.", 1,
                    fix=(diagonal_blocks_code(fw, mine=target, jshape=J.shape)
                         + "\n# cheaper, without the N x N Jacobian"
                         + (" (only for points that do not interact):\n" if np.any(off)
                            else ":\n") + self.fix(1)))
        if k == 1 and n > 1 and M.size in (n * d_out * n_in, n * n_in) \
                and n * n * d_out * n_in <= SLICE_JACOBIAN_MAX:
            found = self.cross_sample_slice(M, T, dtype)
            if found is not None:
                return found
        if k == 2 and n > 1 and not self.truth.coupled:
            found = self.cross_sample_second(M, T, dtype)
            if found is not None:
                return found
        if self.truth.coupled and M.size == T.size:
            alone = self.truth.alone(k)
            if alone is not None and match(M, alone, dtype) is not None \
                    and match(M, T, dtype) is None:
                return self.coupled_alone(M, k, alone)
        if k == 1 and self.truth.coupled:
            J = self.truth.jacobian()
            C = J.sum(axis=0).transpose(1, 0, 2)  # (N, d_out, n): column sums
            how = match(M, C, dtype)
            summed = False
            if how is None and d_out > 1:
                how, summed = match(M, C.sum(axis=1), dtype), True
            if how is not None:
                diff = np.abs(C - T)
                train = "train-mode" in self.truth.codes
                cause = ("this model couples the points through a layer in training mode "
                         "(finding train-mode: batch statistics, e.g. BatchNorm)" if train else
                         "this model's forward couples the points (it mixes the rows of the "
                         "batch, e.g. x.mean(0), a normalisation over the batch, or attention "
                         "across points)")
                fix = ("# each point's derivative, the rest of the batch held fixed (what "
                       "nbderiv reports):\n"
                       + diagonal_blocks_code(self.framework, model=self.mname, x=self.xname,
                                              wrt=self.wrt,
                                              dtype=str(self.truth.get(1).dtype)))
                if train:  # an alternative, commented out: running the fix gives the above
                    fix += ("\n# or the model in inference mode (running statistics: other "
                            "numbers than above, and it changes the model's mode):\n"
                            + "\n".join("# " + line for line in
                                        self.fix(1, eval_first=True).splitlines()))
                return self.result(
                    "coupled-samples",
                    f"{name} (shape {_shape(M.shape)}) is what the grad_outputs=ones trick "
                    f"gives{' (summed over the outputs too)' if summed else ''}: the column "
                    f"sums of the N x N Jacobian, sum over n of dy[n]/dx[m]. That equals the "
                    f"per-point derivative only when each point's output depends on its own "
                    f"input alone, and {cause}: here the cross-terms make it off by up to "
                    f"{_num(diff.max())} against true per-point values (the diagonal blocks "
                    f"dy[n]/dx[n] of that Jacobian) of at most {_num(np.abs(T).max())}.", 1,
                    fix=fix)
        return None

    # -- parts of the derivative (PINN columns, Hessian rows, the Laplacian) ----------------
    def full_truth(self):
        """Derivatives with respect to every input (the truth itself when wrt is None)."""
        if self.wrt is None:
            return self.truth
        if getattr(self, "_full", None) is None:
            from .explain_match import _Truth

            self._full = _Truth(self.model, self.x, None)
        return self._full

    def input_name(self, i):
        names = list(getattr(self.full_truth().d, "inputs", ()) or ())
        return f"input {i} ({names[i]})" if i < len(names) else f"input {i}"

    def parts(self, M, k):
        """``correct-part``, ``summed-inputs``, or ``wrong`` naming the input mixed up, for an
        array holding part of the derivative of order k (1 or 2): one input's column (u_t),
        the columns in another order, a row, an entry or the diagonal of each point's Hessian,
        the Laplacian, or the rows of the Hessian summed (grad(u_x, x, ones_like(u_x)))."""
        full = self.full_truth()
        if k > 2 or (k == 2 and "graph-broken" in full.codes):
            return None  # autodiff's own second derivative is no truth there
        F = full.get(k) if not (k == 1 and "graph-broken" in full.codes) else full.fd_first()
        n, d_out = F.shape[0], F.shape[1]
        n_all = F.shape[-1]
        sizes = (n * d_out, n * d_out * n_all, n * n_all) + ((n,) if d_out > 1 else ())
        if n_all < 2 or M.size not in sizes:
            return None
        dtype = self.dtype_for(M, k)
        wrt = None if self.wrt is None else [int(w) for w in self.truth.d.wrt]
        name, shp = self.name, _shape(M.shape)
        fixes = {}

        def fits(P):
            return P.size == M.size and match(M, P, dtype) is not None

        found = []  # (kind, index, part)
        if k == 1:
            found += [("column", (i,), F[:, :, i]) for i in range(n_all)]
            if d_out > 1:  # one output's column (u_x of a (u, v) model), or the outputs' sum
                found += [("output-column", (j, i), F[:, j, i]) for j in range(d_out)
                          for i in range(n_all)]
                found += [("summed-column", (i,), F[:, :, i].sum(axis=1))
                          for i in range(n_all)]
            if 2 < d_out <= 8:  # some of the outputs summed (tape.gradient of two columns)
                found += [("summed-some-outputs", tuple(c), F[:, list(c)].sum(axis=1))
                          for r in range(2, d_out) for c in itertools.combinations(range(d_out), r)]
        else:
            found += [("entry", (i, j), F[:, :, i, j]) for i in range(n_all)
                      for j in range(i, n_all)]
            found += [("laplacian", (), np.einsum("noii->no", F))]
            found += [("row", (i,), F[:, :, i, :]) for i in range(n_all)]
            found += [("diagonal", (), np.einsum("noii->noi", F))]
            found += [("summed-inputs", (), F.sum(axis=2))]
            found += [("summed-inputs-column", (j,), F.sum(axis=2)[:, :, j])
                      for j in range(n_all)]
            found += [("summed-entries", (), F.sum(axis=(2, 3)))]
            if d_out > 1:
                found += [("summed-inputs-outputs", (), F.sum(axis=(1, 2)))]
                found += [("output-entry", (o, i, j), F[:, o, i, j]) for o in range(d_out)
                          for i in range(n_all) for j in range(i, n_all)]
                # one output's row of its Hessian (grad(du[:, 0:1], x) of a (u, v) model),
                # its Laplacian, its diagonal, the sum of its entries
                found += [("output-row", (o, i), F[:, o, i, :]) for o in range(d_out)
                          for i in range(n_all)]
                found += [("output-laplacian", (o,), np.einsum("nii->n", F[:, o]))
                          for o in range(d_out)]
                found += [("output-diagonal", (o,), np.einsum("nii->ni", F[:, o]))
                          for o in range(d_out)]
                found += [("summed-entries-output", (o,), F[:, o].sum(axis=(1, 2)))
                          for o in range(d_out)]
        candidates = found
        found = [f for f in found if fits(f[2])]
        if not found:
            if k == 1 and M.size == F.size and n_all <= 6:
                return self.columns_swapped(M, F, dtype)
            return self.part_times(M, k, candidates, dtype)
        kind, idx, P = found[0]
        also = [f for f in found[1:] if f[0] == kind]
        also_note = ("" if not also else " (here it also equals "
                     + ", ".join(self.part_words(f[0], f[1], k) for f in also[:3])
                     + ": they coincide at these points)")
        words = self.part_words(kind, idx, k)
        if kind == "summed-inputs-column":
            j = idx[0]
            names = list(getattr(self.full_truth().d, "inputs", ()) or ())
            short = [names[i] if i < len(names) else f"x{i}" for i in range(n_all)]
            terms = " + ".join(f"d2y/d{short[i]} d{short[j]}" for i in range(n_all))
            return self.result(
                "summed-inputs",
                f"{name} (shape {shp}) is column {j} of the rows of each point's Hessian "
                f"summed: {terms}, not the second derivative with respect to "
                f"{self.input_name(j)} alone. {self.summed_columns_words(j)}", 2,
                fix=self.fix_full(2) + f"\nd2 = d2[:, :, {j}, {j}]      # the second derivative "
                f"with respect to {self.input_name(j)} twice", truth=F[:, :, j, j])
        if kind.startswith("summed-entries"):
            out = "" if kind == "summed-entries" else f" of output {idx[0]}"
            return self.result(
                "summed-inputs",
                f"{name} (shape {shp}) is the SUM of every entry of each point's Hessian{out}: "
                f"sum over i and j of d2y/dx_i dx_j (for inputs (x, t): u_xx + 2 u_xt + u_tt), "
                f"not the Laplacian (u_xx + u_tt, the diagonal's sum) nor one second "
                f"derivative. The grad_outputs=ones trick (or a .sum(1)) summed the first "
                f"derivative's columns before differentiating again. Take the entries you "
                f"need from the whole second derivative, shape {_shape(F.shape)} = "
                f"{self.layout(2)}.", 2, fix=self.fix_full(2), truth=P)
        if kind == "summed-some-outputs":
            outs = " + ".join(f"output {o}" for o in idx)
            return self.result(
                "summed-outputs",
                f"{name} (shape {shp}) is the SUM of the first derivatives of {outs} (of the "
                f"model's {d_out}), not one output's own: tape.gradient (or "
                f"grad_outputs=ones) of several output columns adds their derivatives "
                f"together. Each output's own: shape {_shape(F.shape)} = {self.layout(1)}; "
                f"output j is d1[:, j].", 1, fix=self.fix_full(1), truth=P)
        if kind.startswith("summed-inputs"):
            return self.result(
                "summed-inputs",
                f"{name} (shape {shp}) is the SUM over the rows of each point's Hessian"
                f"{' and over the outputs' if kind.endswith('outputs') else ''}: entry j holds "
                f"sum over i of d2y/dx_i dx_j (for inputs (x, t): [u_xx + u_tx, u_xt + u_tt]), "
                f"not the second derivative of one input. {self.summed_columns_words(0)} The "
                f"whole second derivative has shape {_shape(F.shape)} = {self.layout(2)}.", 2,
                fix=self.fix_full(2), truth=P)
        if kind == "summed-column":
            return self.summed_column(M, idx[0], F, dtype)
        meant = None
        if wrt is not None:
            meant = [self.input_name(w) for w in wrt]
            if kind == "column" and idx[0] in wrt or kind == "entry" and set(idx) <= set(wrt):
                return None  # the wrt derivative itself: compared (and reported) already
            if kind.startswith("output-") and set(idx[1:]) <= set(wrt):
                meant = None  # one output's part of the wrt derivative: a correct part
        if wrt is not None and meant is not None:
            return self.result(
                "wrong",
                f"{name} (shape {shp}) holds {words}{also_note}, not the derivative with "
                f"respect to {', '.join(meant)} that wrt={wrt} asks for: that is the other "
                f"input's {'column' if kind == 'column' else 'part'}. The {_ordinal(k)} "
                f"derivative with respect to {', '.join(meant)} has shape "
                f"{_shape(self.truth.get(k).shape)} = {self.layout(k)}.", k,
                truth=self.truth.get(k))
        fixes = self.fix_full(k)
        sel = {"column": f"d{k} = d{k}[:, :, {idx[0] if idx else 0}]",
               "entry": f"d{k} = d{k}[:, :, {idx[0]}, {idx[-1]}]" if idx else "",
               "output-column": f"d{k} = d{k}[:, {idx[0]}, {idx[-1]}]" if idx else "",
               "output-entry": f"d{k} = d{k}[:, {', '.join(map(str, idx))}]" if idx else "",
               "row": f"d{k} = d{k}[:, :, {idx[0] if idx else 0}, :]",
               "output-row": f"d{k} = d{k}[:, {idx[0]}, {idx[-1]}, :]" if idx else "",
               "output-laplacian": (f"lap = d{k}[:, {idx[0]}].diagonal(0, 1, 2).sum(-1)"
                                    if self.framework == "torch" else
                                    f"lap = np.trace(np.asarray(d{k})[:, {idx[0]}], axis1=1, "
                                    f"axis2=2)") if idx else "",
               "output-diagonal": (f"d{k} = d{k}[:, {idx[0]}].diagonal(0, 1, 2)"
                                   if self.framework == "torch" else
                                   f"d{k} = np.diagonal(np.asarray(d{k})[:, {idx[0]}], "
                                   f"axis1=1, axis2=2)") if idx else "",
               "laplacian": f"lap = d{k}.diagonal(0, 2, 3).sum(-1)" if self.framework == "torch"
               else f"lap = np.trace(np.asarray(d{k}), axis1=2, axis2=3)",
               "diagonal": f"d{k} = d{k}.diagonal(0, 2, 3)" if self.framework == "torch"
               else f"d{k} = np.diagonal(np.asarray(d{k}), axis1=2, axis2=3)"}[kind]
        return self.result(
            "correct-part",
            f"{name} (shape {shp}) holds the right values of {words}{also_note}, at the {n} "
            f"points of {self.xname}, within {dtype} tolerance: a part of the {_ordinal(k)} "
            f"derivative, whose whole has shape {_shape(F.shape)} = {self.layout(k)}.", k,
            fix=fixes + "\n" + sel + "      # the part you computed", truth=P)

    def summed_columns_words(self, j):
        """Why the first derivative's columns were summed, and how to take one, in the
        student's framework."""
        if self.orig_framework == "tensorflow":
            return (f"That is what an outer tape's gradient of u_x gives when u_x holds all "
                    f"the first-derivative columns (outer.gradient(u_x, x)): the gradient of "
                    f"several columns adds their derivatives together. Differentiate one "
                    f"column, taken inside the outer tape's block: u_x = inner.gradient(u, "
                    f"x)[:, {j}:{j + 1}], then u_xx = outer.gradient(u_x, x)[:, {j}].")
        return (f"That is what torch.autograd.grad(u_x, x, grad_outputs=torch.ones_like(u_x))"
                f"{'[0]' if j is None else f'[0][:, {j}]'} gives when u_x holds all the "
                f"first-derivative columns: the ones add the columns' derivatives together. "
                f"Differentiate one column: u_xx = torch.autograd.grad(u_x[:, {j}], x, "
                f"torch.ones_like(u_x[:, {j}]), create_graph=True)[0][:, {j}].")

    def fix_full(self, k):
        if isinstance(self.x, tuple):
            return self.tuple_code(k, None)
        return fix_code(self.framework, k, model=self.mname, x=self.xname, wrt=None,
                        dtype=str(self.truth.get(1).dtype), keep=self.notebook_names())

    def notebook_names(self) -> frozenset:
        """The notebook's names (under %%nnderiv explain) that fix code should not rebind
        with names of its own (f, x_, y); its results d1 ... dK are meant to be bound."""
        cell = getattr(self, "cell", None)
        if not cell:
            return frozenset()
        return frozenset(k for k in cell[1] if isinstance(k, str)
                         and not re.fullmatch(r"d\d+", k))

    def part_times(self, M, k, candidates, dtype):
        """``wrong`` for an array that is a part of the derivative (u_xx, a column, the
        Laplacian) times a constant factor (a chain-rule factor, a sign); None otherwise."""
        Mf = np.asarray(M, dtype=np.float64).reshape(-1)
        for kind, idx, P in candidates:
            if kind.startswith("summed") or P.size != M.size:
                continue
            Pf = np.asarray(P, dtype=np.float64).reshape(-1)
            scale = float(Pf @ Pf)
            if scale == 0 or not np.all(np.isfinite(Mf)):
                continue
            c = float(Mf @ Pf) / scale
            if abs(c) < 1e-12 or abs(c - 1) < 1e-6 or not _close(Mf, c * Pf, dtype).all():
                continue
            words = self.part_words(kind, idx, k)
            return self.result(
                "wrong",
                f"{self.name} (shape {_shape(M.shape)}) is {_num(c)} times {words}: a "
                f"constant factor (a chain-rule factor, e.g. from scaled inputs, or a sign) "
                f"on an otherwise right {_ordinal(k)} derivative.", k,
                fix=self.fix_full(k), truth=P)
        return None

    def part_words(self, kind, idx, k):
        nm = self.input_name
        if kind == "column":
            return f"the first derivative with respect to {nm(idx[0])} alone"
        if kind == "entry":
            i, j = idx
            return (f"the second derivative with respect to {nm(i)} twice" if i == j else
                    f"the mixed second derivative with respect to {nm(i)} and {nm(j)}")
        if kind == "output-column":
            return f"the first derivative of output {idx[0]} with respect to {nm(idx[1])} alone"
        if kind == "output-entry":
            o, i, j = idx
            return (f"the second derivative of output {o} with respect to {nm(i)} twice"
                    if i == j else f"the mixed second derivative of output {o} with respect "
                    f"to {nm(i)} and {nm(j)}")
        if kind == "row":
            return (f"row {idx[0]} of each point's Hessian: the derivative of dy/d({nm(idx[0])}) "
                    "with respect to every input")
        if kind == "laplacian":
            return ("the Laplacian: the sum over the inputs of the second derivatives "
                    "d2y/dx_i2 (the trace of each point's Hessian)")
        if kind == "diagonal":
            return "the diagonal of each point's Hessian: d2y/dx_i2 for every input i"
        if kind == "output-row":
            o, i = idx
            return (f"row {i} of the Hessian of output {o}: the derivative of dy_{o}/d({nm(i)}) "
                    "with respect to every input")
        if kind == "output-laplacian":
            return (f"the Laplacian of output {idx[0]}: the sum over the inputs of its second "
                    "derivatives (the trace of its Hessian)")
        if kind == "output-diagonal":
            return f"the diagonal of the Hessian of output {idx[0]}: its d2y/dx_i2 for every input i"
        return kind

    def summed_column(self, M, i, F, dtype):
        """``summed-outputs`` for one input's column of a first derivative summed over the
        outputs (u_x = grads[:, 0] after grad(uv, x, ones_like(uv)) of a (u, v) model)."""
        name, d_out = self.name, F.shape[1]
        C = F[:, :, i].astype(np.float64)  # (N, d_out): each output's derivative wrt input i
        p = int(np.argmax(np.abs(C - C[:, :1]).max(axis=1)))
        outs = ", ".join(_num(C[p, o]) for o in range(min(d_out, 4))) + (
            ", ..." if d_out > 4 else "")
        return self.result(
            "summed-outputs",
            f"{name} (shape {_shape(M.shape)}) is the SUM over the {d_out} outputs of the "
            f"first derivative with respect to {self.input_name(i)} alone (dy_0/dx_{i} + "
            f"dy_1/dx_{i}{' + ...' if d_out > 2 else ''}), not one output's own: grad_outputs=ones_like(y) (or tape.gradient "
            f"of a model with several outputs) adds the outputs' derivatives together before "
            f"the column is taken. E.g. at point {p}: yours {_num(C[p].sum())}, outputs "
            f"{outs}. Each output's own: column {i} of the whole first derivative, shape "
            f"{_shape(F.shape)} = {self.layout(1)}.", 1,
            fix=self.fix_full(1) + f"\nd1 = d1[:, :, {i}]      # (N, d_out): each output's "
            f"derivative with respect to input {i}; output j: d1[:, j]", truth=C)

    def columns_swapped(self, M, F, dtype):
        """``wrong`` naming the columns of a first derivative that are in another order."""
        n_all = F.shape[-1]
        Mv = M.reshape(F.shape).astype(np.float64)
        perm = []
        for c in range(n_all):
            hits = [i for i in range(n_all) if _close(Mv[..., c], F[..., i], dtype).all()]
            if len(hits) != 1:
                return None
            perm.append(hits[0])
        if sorted(perm) != list(range(n_all)) or perm == list(range(n_all)):
            return None
        cols = "; ".join(f"your column {c} holds the derivative with respect to "
                         f"{self.input_name(i)}" for c, i in enumerate(perm) if c != i)
        inv = [perm.index(i) for i in range(n_all)]
        target = self.name if self.name.isidentifier() else "mine"
        return self.result(
            "wrong",
            f"{self.name} (shape {_shape(M.shape)}) holds the right first derivatives, but with "
            f"the input columns in another order: {cols}. That is the other input's column. "
            f"In nbderiv's layout (columns in the order of the inputs): {target}[..., {inv}].",
            1, fix=f"{target} = {target}[..., {inv}]      # columns in the inputs' order\n"
            "# or compute it directly:\n" + self.fix(1), truth=self.truth.get(1))

    def wrong_order(self, M, order, k, how):
        name = self.name
        kind, perm = how
        T = self.truth.get(k)
        if k == 0:
            what = f"the outputs y = {self.mname}({self.xname}) themselves (order 0)"
        else:
            what = f"the {_ordinal(k)} derivative (shape {_shape(T.shape)})"
        as_code = _reshape_code(name, kind, perm, M.shape, T.shape, self.orig_framework,
                                self.mine)
        shape_note = "" if kind == "same" else f" (as {as_code})"
        return self.result(
            "wrong-order",
            f"{name} (shape {_shape(M.shape)}) was meant to be the {_ordinal(order)} "
            f"derivative, but it holds {what}{shape_note}. "
            + ("For a derivative of order 2 or more, the first derivative must be "
               "differentiated again: create_graph=True on the first torch.autograd.grad (or "
               "a nested GradientTape), then the gradient of each of its entries. "
               if order > k else "It went one differentiation too far. ")
            + f"The {_ordinal(order)} derivative has shape {_shape(self.truth.get(order).shape)}"
            f" = {self.layout(order)}.", order)

    def order_in_cell(self):
        """The order the cell's code makes this name (``%%nnderiv explain``: a gradient of a
        gradient is 2), or None."""
        cell = getattr(self, "cell", None)
        if not cell:
            return None
        from .explain_tape import differentiation_depths

        return differentiation_depths(cell[0]).get(self.name)

    def zeros_against(self, M, k, T) -> bool:
        """Whether ``M`` is all zeros, of the size of ``T`` (the order-k truth) or of one of its
        outputs, where ``T`` is not 0 within ``M``'s tolerance."""
        return bool(M.size) and not np.any(M) \
            and M.size in (T.size, T.size // max(self.dims()[1], 1)) \
            and bool(np.any(~_close(np.zeros_like(T, dtype=float), T.astype(float),
                                    self.dtype_for(M, k))))

    def zeros_of_unknown_order(self, M, orders):
        """All zeros, order not given, where the lowest order its shape fits has a truth
        that is not 0 but a higher one's is (a ReLU net's second derivative): the zeros are
        read at the lowest order, and the message says which order they would be right for."""
        k0 = orders[0]
        T0 = self.truth_k(k0)
        if not self.zeros_against(M, k0, T0):
            return None
        k1 = next((k for k in orders[1:] if (found := self.match_order(M, k)) is not None
                   and found.code.startswith("correct")), None)
        if k1 is None:
            return None
        note = (f" If {self.name} was meant as the {_ordinal(k1)} derivative instead, all "
                f"zeros is right there ({self.mname}'s {_ordinal(k1)} derivatives are 0 at "
                f"these points): zeros alone cannot tell the two apart. Pass order={k1} to "
                "check it as such.")
        return self.zeros_graph_broken(M, k0, T0, note=note)

    def zeros_graph_broken(self, M, k, T, partial=None, note=""):
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
        fix = self.fix(k)  # (where the model cuts its graph: central differences)
        return self.result(
            "zeros-graph-broken",
            f"{name} (shape {_shape(M.shape)}) is zero where the true {_ordinal(k)} derivative "
            f"is not.{where} The truth reaches {_num(T[big])} at point {big[0]}. {because}"
            + note, k, fix=fix, truth=T)

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
                        f"{_ordinal(k)} derivative has shape {_shape(T.shape)} = {self.layout(k)}."
                        + note, k)
        if M.size != T.size:
            sizes = {f"order {j}": n * d_out * n_in ** j for j in range(1, MAX_ORDER + 1)}
            if M.size in {n, n * d_out, n * n_in, n * d_out * n_in}:  # the size of a part
                return self.result(
                    "wrong",
                    f"{name} (shape {_shape(M.shape)}, {M.size} numbers) has the size of a "
                    f"part of a derivative of {self.mname} (one input's column, one output, "
                    f"a row or an entry of the Hessian, the Laplacian), but its values match "
                    f"none of them, nor their sums, within {dtype} tolerance. The whole "
                    f"{_ordinal(k)} derivative has shape {_shape(T.shape)} = "
                    f"{self.layout(k)}." + note, k)
            return self.result(
                "wrong",
                f"{name} has shape {_shape(M.shape)} ({M.size} numbers), which fits no "
                f"derivative of {self.mname} at these points: the {_ordinal(k)} derivative "
                f"has shape {_shape(T.shape)} = {self.layout(k)} ({T.size} numbers; "
                + ", ".join(f"{a}: {b}" for a, b in sizes.items()) + ")." + note, k)
        Mv = M.reshape(T.shape).astype(np.float64)
        nonfinite = ~np.isfinite(Mv) & np.isfinite(Tf)
        if nonfinite.any():
            return self.non_finite(M, k, Mv, Tf, nonfinite, note)
        bad = ~_close(Mv, Tf, dtype)
        diff = np.abs(Mv - Tf)
        diff[~np.isfinite(diff)] = np.inf
        at = np.unravel_index(np.argmax(np.where(bad, diff, -1)), T.shape)
        idx = ", ".join([f"point {at[0]}", f"output {at[1]}"]
                        + [f"input {self.input_index(i)}" for i in at[2:]])
        scale = float(np.abs(Tf).max()) or 1.0
        rel = float(diff[at]) / scale
        ratio = ""
        nz = np.abs(Tf) > RTOL[dtype] * scale
        if nz.any():
            r = Mv[nz] / Tf[nz]
            c = float(np.median(r))
            if c != 0 and abs(c - 1) > 10 * RTOL[dtype] and np.allclose(
                    Mv, c * Tf, rtol=10 * RTOL[dtype], atol=10 * RTOL[dtype] * scale):
                times = round(c)
                if self.orig_framework == "torch" and 2 <= times <= 16 and \
                        abs(c - times) <= 10 * RTOL[dtype] * times:
                    ratio = (f" Everywhere, yours is exactly {times} times the truth: a factor "
                             f"{times} in the code, or .grad adding up: {times} backward() "
                             f"calls without x.grad = None (or x.grad.zero_()) in between give "
                             f"{times} times the derivative. Clear .grad before each backward "
                             f"pass, or use torch.autograd.grad, which returns the derivative "
                             f"instead of adding to .grad.")
                elif n > 1 and abs(c * n - 1) <= 10 * RTOL[dtype]:
                    ratio = (f" Everywhere, yours is {_num(c)} = 1/{n} times the truth, 1/N "
                             f"for the N = {n} points: the gradient of a mean over the batch "
                             f"(y.mean().backward(), a mean loss, tf.reduce_mean) instead of "
                             f"a sum, which divides every point's derivative by N. "
                             f"Differentiate the sum (y.sum(), grad_outputs=ones_like(y)), "
                             f"or multiply by {n}.")
                else:
                    ratio = (f" Everywhere, yours is {_num(c)} times the truth: a constant "
                             "factor is missing or extra (a chain-rule factor such as the "
                             "scale of normalised inputs, or a wrong sign).")
        if not ratio and k == 1 and n_in > 1:
            ratio = self.column_factors(Mv, Tf, dtype)
        shape_note = "" if M.shape == T.shape else \
            f" (compared as {name}.reshape{_shape(T.shape)})"
        fix = None
        if k >= 2 and "moments" in self.truth.d._code_notes:
            note += MOMENTS_NOTE
            fix = MOMENTS_SWAP + self.fix(k) + "\n" + MOMENTS_RESTORE
        return self.result(
            "wrong",
            f"{name} differs from {self.what(k)}{shape_note}: {int(bad.sum())} of {T.size} "
            f"entries are off beyond {dtype} tolerance; the largest difference, "
            f"{_num(diff[at])} ({100 * rel:.3g}% of the largest true value "
            f"{_num(scale)}), is at {idx}: yours {_num(Mv[at])}, truth {_num(Tf[at])}."
            + ratio + note, k, fix=fix, truth=T)

    def column_factors(self, Mv, Tf, dtype) -> str:
        """Words for a first derivative whose every input column is the truth's times a
        constant of its own (not all 1): the chain rule of inputs normalised per column,
        z = (x - mu) / sigma, left out (du/dz = sigma * du/dx); "" otherwise."""
        n_in = Tf.shape[-1]
        scale = float(np.abs(Tf).max()) or 1.0
        factors = []
        for i in range(n_in):
            t, m = Tf[..., i].reshape(-1), Mv[..., i].reshape(-1)
            nz = np.abs(t) > 10 * RTOL[dtype] * scale
            if not nz.any():
                return ""
            factors.append(float(np.median(m[nz] / t[nz])))
        c = np.array(factors)
        if np.all(np.abs(c - 1) <= 10 * RTOL[dtype]) or np.any(c == 0) or not _close(
                Mv, Tf * c, dtype).all():
            return ""
        names = ", ".join(f"{_num(v)} for {self.input_name(i)}" for i, v in enumerate(c))
        return (f" Each input's column is the truth times a constant of its own ({names}): "
                f"a chain-rule factor per input, e.g. inputs normalised per column, z = (x - "
                f"mu) / sigma, differentiated with respect to z: du/dz = sigma * du/dx, so "
                f"du/dx = du/dz / sigma, column by column.")

    def non_finite(self, M, k, Mv, Tf, nonfinite, note):
        """``wrong`` for an array holding NaN or inf where the truth is finite."""
        name = self.name
        what = " and ".join(w for w, has in (("NaN", np.isnan(Mv[nonfinite]).any()),
                                             ("inf", np.isinf(Mv[nonfinite]).any())) if has)
        at = tuple(int(i) for i in np.argwhere(nonfinite)[0])
        idx = ", ".join([f"point {at[0]}", f"output {at[1]}"]
                        + [f"input {self.input_index(i)}" for i in at[2:]])
        count = int(nonfinite.sum())
        shape_note = "" if M.shape == Tf.shape else \
            f" (compared as {name}.reshape{_shape(Tf.shape)})"
        return self.result(
            "wrong",
            f"{name} holds {what} in {count} of its {Mv.size} entries (the first at {idx}) "
            f"where {self.what(k)} is finite (truth {_num(Tf[at])} there){shape_note}: the "
            f"values went non-finite in the computation that produced {name}, not in the "
            f"model's derivative." + note, k, truth=self.truth.get(k))

    def input_index(self, i):
        """The model's input number of position ``i`` of the derivative's input axes (its
        place in wrt)."""
        wrt = getattr(self.truth.d, "wrt", None)
        return int(wrt[i]) if wrt is not None and i < len(wrt) else int(i)

    # -- None --------------------------------------------------------------------------------------
    def none(self, k=None):
        """``k``: the order meant (None: 1, or what the cell's code shows, a gradient of a
        gradient being a second derivative)."""
        from_code = self.none_from_code()
        if k is None:
            k = from_code[2] if from_code is not None and len(from_code) > 2 else 1
        causes = none_causes(self.model, self.x, self.truth, self.framework, self.xname,
                             self.mname)
        intro = f"The cause that fits {self.mname} and {self.xname}:"
        if from_code is not None:
            causes, intro = from_code[:2]
        T = self.truth_k(k)  # central differences where the model cuts its own graph
        head = (f"{self.name} is None: autodiff returned no gradient at all (the true "
                f"{_ordinal(k)} derivative has shape {_shape(T.shape)}, largest value "
                f"{_num(np.abs(T).max()) if T.size else 0}).")
        first = causes[0]
        message = f"{head} {intro} {first[1]}"
        if len(causes) > 1:
            message += " Other possible causes: " + " ".join(c[1] for c in causes[1:3])
        fix = first[2] + "\n# the per-point derivative itself:\n" + self.fix(k)
        return self.result("none", message, k, fix=fix, truth=T)

    def none_from_code(self):
        """(causes, intro) for a None traced through the cell's code (``%%nnderiv explain``
        gives it): the tape.gradient call that made it in TensorFlow, the tensor whose .grad
        it is in torch; None when there is no code or it shows no such call."""
        cell = getattr(self, "cell", None)
        if cell is None:
            return None
        source, ns = cell
        from .explain_tape import grad_owner, tape_causes, unused_grad_causes

        if self.framework == "tensorflow":
            code = tape_causes(self.name, source, ns, self.mname)
            if code is None:
                return None
            # facts about x and the model stay; the tape-level guesses give way to the code
            facts = [c for c in none_causes(self.model, self.x, self.truth, self.framework,
                                            self.xname, self.mname)
                     if c[0] in ("integer-dtype", "graph-cut-in-model", "output-not-connected")]
            if code[0][0] == "not-recorded":
                return (facts, f"The cause that fits {self.mname} and {self.xname}:") \
                    if facts else (code, "What is known:")
            return code + facts, "The cause in this cell:"
        chain = unused_grad_causes(self.name, source)
        if chain is not None:
            return chain[0], "The cause in this cell:", chain[1]
        owner = grad_owner(self.name, source)
        obj = ns.get(owner) if owner else None
        if obj is None or obj is self.x or _framework_of(obj) != "torch":
            return None
        return (none_causes(self.model, obj, self.truth, self.framework, owner, self.mname),
                f"The cause that fits {owner}, whose .grad this is:")
