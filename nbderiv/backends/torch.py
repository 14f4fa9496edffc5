"""PyTorch backend: per-point derivatives of one block of points by forward Taylor mode
(plain stacks of Linear layers and elementwise activations, one input direction), nested
``torch.autograd.grad`` (reverse mode, one backward pass per output and distinct partial) or
nested forward-mode ``torch.func.jvp`` (when outputs outnumber the differentiated inputs).

Never calls ``.backward()``, never touches ``.grad``, ``requires_grad`` or the training
mode; buffers that a forward pass updates (BatchNorm statistics) are put back.

>>> import torch, numpy as np, nbderiv
>>> from nbderiv.compute import open_call, probe
>>> call = open_call(torch.sin, torch.zeros(2, 1, dtype=torch.float64), None)
>>> _ = probe(call)
>>> call.backend.derivatives(call, call.args, 1, (0,)).orders[0][:, 0, 0].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings
import weakref
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from ..call import Verdict
from ..errors import InputTypeError, ModelTypeError, NbderivError
from ..inputs import check_output, check_target
from ..memo import kept
from ..wrapped import objects_inside, uncompiled, with_replaced
from .base import Backend, Block, assemble
from .torch_autodiff import (
    exact_norms,
    forward_agrees,
    grad_enabled,
    nested_forward,
    nested_reverse,
    to_numpy,
)
from .torch_code import torch_code
from .torch_kinks import KinkWatcher
from .torch_snapshot import TorchState, state_key
from .torch_state import (
    DENSE,
    batched_backward_pays,
    compiled_inside,
    dense_widths,
    expected_by,
    first_float_tensor,
    held_outside,
    kink_free,
    model_dtype,
    modules_of,
    named_modules,
    np_dtype,
    plain_modules,
    refuse_lazy,
    script_ops,
)
from .torch_taylor import taylor_derivatives, taylor_plan

_ACTIVATION_NAMES = {
    "ReLU", "LeakyReLU", "ReLU6", "PReLU", "RReLU", "Hardtanh", "Hardshrink", "Softshrink",
    "Threshold", "Tanh", "Sigmoid", "Softplus", "SiLU", "GELU", "ELU", "CELU", "SELU", "Mish",
    "Hardswish", "Hardsigmoid", "Tanhshrink", "LogSigmoid", "Softsign", "Softmax", "LogSoftmax",
}
_ATTENTION = frozenset({"MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
                        "Transformer", "TransformerEncoder", "TransformerDecoder"})
_STOCHASTIC_OR_BATCH = ("Dropout", "BatchNorm", "InstanceNorm", "SyncBatchNorm", "AlphaDropout",
                        "FeatureAlphaDropout", "RReLU")


class TorchBackend(Backend):
    name = "torch"
    optional = frozenset({"device", "argument_names", "known_verdict", "block_rows",
                          "bytes_per_point", "kink_points", "input_width", "few_threads",
                          "state_key", "seeded_forwards", "code_notes", "activations_called",
                          "restored_forwards", "state_back", "seeded_cross_terms"})

    def __init__(self):
        self._saved = []  # (model, TorchState) of the calls under way, innermost last

    # -- conversion and placement ------------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.is_meta:
                raise InputTypeError(
                    f"x is a tensor on the 'meta' device, shape {tuple(t.shape)}: it has a "
                    "shape but no values, so there are no points to differentiate at. Fix: "
                    "pass real values, e.g. torch.randn(*x.shape) or your data, on the CPU "
                    "or the GPU (and a model with real weights).")
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.cpu().numpy().copy()
        return np.asarray(x)

    def compute_dtype(self, model, x_dtype) -> np.dtype:
        t = first_float_tensor(model)
        if t is not None:
            return model_dtype(t)
        if x_dtype is not None and np.dtype(x_dtype).kind == "f":
            return np.dtype(x_dtype)
        return np_dtype(torch.get_default_dtype())

    def device(self, model, x):
        t = first_float_tensor(model)
        if t is not None:
            return t.device
        first = x[0] if isinstance(x, tuple) and x else x
        return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")

    def argument_names(self, model, n_args):
        model = uncompiled(model)
        fn = model.forward if isinstance(model, torch.nn.Module) else model
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return None
        names = [p.name for p in params
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return names[:n_args] if len(names) >= n_args else None

    # -- evaluation ------------------------------------------------------------------
    @staticmethod
    def _tensor(call, args):
        with torch.inference_mode(False):  # a normal tensor even inside the user's inference_mode
            arrays = [torch.as_tensor(a) for a in args]
            X = torch.cat(arrays, dim=1) if len(arrays) > 1 else arrays[0]
            return X.to(device=call.device or "cpu",
                        dtype=getattr(torch, call.dtype.name)).clone()

    @staticmethod
    def _caller(call, flat=True):
        """fn(X) -> (n, d_out): splits the (n, D) feature matrix into the model's arguments,
        each reshaped to (n, *S_i), and the call's extras (keyword arguments, the target);
        ``flat=False`` keeps the output's own shape (n, *O)."""
        model, shapes = uncompiled(call.model), [tuple(s) for s in call.point_shapes]
        # compiled code beneath the model runs as plain PyTorch (see _eager); a module
        # compiled in place (module.compile()) runs its plain call, hooks included
        eager = _eager if kept(call, "compiled inside", lambda: compiled_inside(model)) \
            else nullcontext
        if isinstance(model, torch.nn.Module) and vars(model).get("_compiled_call_impl"):
            model = model._call_impl
        widths = [math.prod(s) for s in shapes]
        n_in, extras, constants = call.n_inputs, call.extras, dict(call.constants)
        for name, value in constants.items():  # NumPy constants as the model's tensors
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                constants[name] = torch.as_tensor(
                    value, device=call.device or "cpu",
                    dtype=getattr(torch, call.dtype.name) if value.dtype.kind == "f" else None)

        def fn(X):
            parts = torch.split(X, widths, dim=1) if len(widths) > 1 else (X,)
            parts = [p if len(s) == 1 else p.reshape((p.shape[0],) + s)
                     for p, s in zip(parts, shapes)]
            kwargs, target = dict(constants), None
            for extra, p in zip(extras, parts[n_in:]):
                value = p.detach().reshape((p.shape[0],) + extra.shape)
                value = value != 0 if extra.dtype == "bool" else \
                    value.to(getattr(torch, extra.dtype))
                if extra.name:
                    kwargs[extra.name] = value
                else:
                    target = value
            with eager():
                out = model(*parts[:n_in], **kwargs)
            if not isinstance(out, torch.Tensor):
                check_output(None, False, "", X.shape[0], type(out).__name__, out)
            shape = check_output(tuple(out.shape), out.is_floating_point() or out.is_complex(),
                                 str(out.dtype).replace("torch.", ""), X.shape[0])
            if target is not None:
                check_target(int(target.max()), shape[1])
                return out.reshape(shape).gather(1, target.reshape(-1, 1))
            return out.reshape(shape) if flat else out
        return fn

    def known_verdict(self, call):
        """For a plain stack of per-point layers (:data:`DENSE`, no hooks) taking one input
        whose width fits its first layer: d_out from the Linear layers, stochastic only with an
        active Dropout, never coupled. Else None, and the probe runs (it also reports an input
        the model rejects)."""
        model = uncompiled(call.model)
        if len(call.args) != 1 or len(call.point_shapes[0]) != 1 or call.constants \
                or not plain_modules(model, DENSE):
            return None  # (keyword arguments: the probe sees whether the model takes them)
        width, stochastic = call.width, False
        for m in model.modules():
            kind = type(m)
            if kind is torch.nn.Linear:  # the weight's shape, which may differ from in/out_features
                if m.weight.ndim != 2 or m.weight.shape[1] != width:
                    return None
                width = m.weight.shape[0]
            elif kind is torch.nn.LayerNorm:
                if tuple(m.normalized_shape) != (width,):
                    return None
            elif kind is torch.nn.PReLU:
                if m.num_parameters not in (1, width):
                    return None
            elif kind is torch.nn.Flatten:
                if m.start_dim not in (1, -1) or m.end_dim != -1:
                    return None
            elif kind is torch.nn.Dropout:  # p = 1 gives zeros, not random numbers
                stochastic |= m.training and 0 < m.p < 1
        return Verdict(width, stochastic, False)

    def forwards(self, call, batches, seed=None, restore=False) -> list:
        """Separate model calls on slices of one tensor: one copy to the device and one back
        (each copy waits for the GPU). ``seed``: torch's generators seeded with it before each
        batch (see :meth:`seeded_forwards`); ``restore``: the model's state put back before
        each batch (see :meth:`restored_forwards`)."""
        fn = self._caller(call, flat=False)
        stacked = self._tensor(call, [np.concatenate(parts) for parts in zip(*batches)])
        saved = TorchState(modules_of(call.model)) if restore else None

        def run():
            ys = []
            # each batch in fresh memory: a view at an odd offset of the stacked rows can take
            # another BLAS path and round differently, which would read as randomness
            for part in torch.split(stacked, batches[0][0].shape[0]):
                if seed is not None:
                    torch.manual_seed(seed)
                if saved is not None:
                    saved.restore()
                ys.append(fn(part.clone()))
            return np.split(to_numpy(torch.cat(ys)), len(batches))
        return _forward_only(call.model, run)

    def restored_forwards(self, call, batches) -> list:
        return self.forwards(call, batches, restore=True)

    def seeded_forwards(self, call, batches) -> list:
        cuda = _cuda_devices(call)
        with torch.random.fork_rng(devices=cuda):  # the user's generator state put back
            return self.forwards(call, batches, seed=0)

    def seeded_cross_terms(self, call, batch, rows):
        cuda = _cuda_devices(call)
        fn = self._caller(call)
        try:
            with torch.random.fork_rng(devices=cuda), grad_enabled(True):
                torch.manual_seed(0)
                X = self._tensor(call, batch).requires_grad_(True)
                y = fn(X)
                keep = torch.ones(X.shape[0], dtype=torch.bool)
                keep[list(rows)] = False
                if not keep.any() or not y.requires_grad:
                    return None
                (g,) = torch.autograd.grad(y[keep.to(y.device)].sum(), X, allow_unused=True)
        except Exception:  # a confirmation: a model it does not suit is not an error
            return None
        return g is not None and bool(g[list(rows)].abs().max() > 0)

    def derivatives(self, call, args, order, wrt, out=None) -> Block:
        _refuse_script_norms(call, order)
        X = self._tensor(call, args)
        widths = [a.shape[1] for a in args]
        vectors = all(len(shape) == 1 for shape in call.point_shapes)
        model = uncompiled(call.model)
        plan = taylor_plan(model, widths) if len(wrt) == 1 and vectors \
            and not (call.extras or call.constants) else None
        if plan is not None:  # forward Taylor mode: linear layers and elementwise activations
            with grad_enabled(False):
                if out is not None:  # straight into the result arrays
                    views = [torch.from_numpy(b).view(b.shape[0], out.y.shape[1])
                             for b in [out.y] + list(out.orders)]
                    taylor_derivatives(plan, X, order, wrt[0], out=(views[0], views[1:]))
                    return Block(out.y, out.orders, "taylor")
                y, ders = taylor_derivatives(plan, X, order, wrt[0])
            return Block(to_numpy(y), [to_numpy(d) for d in ders], "taylor")
        fn = self._caller(call)
        batch = kept(call, "batched", lambda: batched_backward_pays(call))
        forward = call.d_out > len(wrt)
        # reverse mode runs the model once: the kinks are looked for in that same pass
        known_free = call.known is not None and call.known.kink_free  # (facts read already)
        watcher = None if call.kink_rows is not None or known_free \
            or kink_free(model) or call.facts.kink_free else KinkWatcher(X.shape[0])
        with grad_enabled(True), exact_norms(order, forward=forward):
            y = None
            if forward and call.facts.forward_agrees is not False:
                try:
                    y, values = nested_forward(fn, X, order, wrt)
                    method = "forward-jvp"
                except (RuntimeError, NotImplementedError):  # no forward-mode rule
                    y = None
                if y is not None and call.facts.forward_agrees is None and order > 1:
                    # a wrong forward-mode rule (torch.linalg.det) is not reverse mode's
                    try:
                        agrees = forward_agrees(fn, X, order, wrt, values)
                    except (RuntimeError, NotImplementedError):  # no reverse rule: unchecked
                        agrees = True
                    call.facts.forward_agrees = agrees
                    y = y if agrees else None
            if y is None:
                y, values = nested_reverse(_watched(fn, watcher), X, order, wrt, batch)
                method = "reverse-ones"
            else:
                watcher = None  # forward mode ran the model under no watcher
        if watcher is not None and not watcher.calls:
            call.facts.kink_free = True
        return Block(y, assemble(values, y, order, len(wrt)), method,
                     None if watcher is None else watcher.hits)

    def per_point_derivatives(self, call, args, order, wrt) -> Block:
        _refuse_script_norms(call, order)
        fn = self._caller(call)
        base = self._tensor(call, args)
        rows, per_order = [], [[] for _ in range(order)]
        with grad_enabled(True), exact_norms(order):
            for i in range(base.shape[0]):
                def row_fn(Z, i=i):
                    full = torch.cat([base[:i], Z, base[i + 1:]], dim=0)
                    return fn(full)[i:i + 1]
                y, values = nested_reverse(row_fn, base[i:i + 1].clone(), order, wrt)
                rows.append(y)
                for k, arr in enumerate(assemble(values, y, order, len(wrt))):
                    per_order[k].append(arr)
        return Block(np.concatenate(rows), [np.concatenate(p) for p in per_order],
                     "per-point-blocks")

    def full_jacobian(self, call, args) -> np.ndarray:
        fn = self._caller(call)
        X = self._tensor(call, args)
        with grad_enabled(True):
            J = torch.autograd.functional.jacobian(fn, X)
        return to_numpy(J)

    @contextmanager
    def preserved(self, model):
        """Every torch module of the model (or held by a wrapper: a lambda, partial, bound
        method, closure) is put back as it was: training flags, buffers and parameters (also
        when written inside forward), ``.grad`` and ``requires_grad``; and torch's global
        random state. A lazy module not yet
        initialised is refused first (its first call would initialise it for good)."""
        saved = TorchState(modules_of(model))  # (refuses an uninitialised lazy layer)
        self._saved.append((model, saved))
        # the global random state too: a model that draws random numbers (dropout in training
        # mode) leaves the user's generator where it was
        rng = torch.random.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            yield
        finally:
            self._saved.remove((model, saved))
            saved.restore()
            torch.random.set_rng_state(rng)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def state_back(self, call) -> None:
        """The model's state as it was when the call began (the innermost :meth:`preserved`
        of this model): for a model whose forward updates its own state, the derivatives are
        taken from the state the user had, not the one the probe's passes left."""
        for model, saved in reversed(self._saved):
            if model is call.model:
                saved.restore()
                return

    def block_rows(self, call):
        """About 2**18 values of the widest layer, so that one block's intermediates stay in
        cache (measured 1.3-2x faster per point than one batch of 10**5 on a 2-core CPU).
        Only for plain stacks of per-point layers on the CPU; otherwise no limit (a GPU wants
        large batches)."""
        widths = kept(call, "dense widths", lambda: dense_widths(uncompiled(call.model)))
        if not widths or getattr(call.device, "type", "cpu") != "cpu":
            return None
        return int(min(8192, max(1024, 2 ** 18 // max(widths))))

    def bytes_per_point(self, call, order, m):
        model, width, d_out = uncompiled(call.model), call.width, call.d_out
        if kept(call, "dense widths", lambda: dense_widths(model)) \
                and getattr(call.device, "type", "cpu") == "cpu":
            # the work runs in blocks of block_rows rows (a few MB whatever N is), so only the
            # inputs (a numpy array and a tensor) grow with the number of points
            return 16 * width
        hidden = 64
        if isinstance(model, torch.nn.Module):
            hidden = kept(call, "hidden", lambda: sum(
                p.shape[0] for p in model.parameters() if p.ndim >= 2) or 64)
        item = call.dtype.itemsize
        values = hidden + width + d_out  # one row of every layer's output
        if m == 1 and taylor_plan(model, [width]) is not None:
            # Taylor mode: order + 1 coefficients of each value, and a few temporaries
            return int(values * item * (order + 1) * 4)
        # nested autograd: each level keeps the graph below it and roughly triples it
        return int(values * item * 6 * (3 ** (order - 1)) * max(1, min(m, 4)))

    def equivalent_code(self, *, order, wrt, widths, shapes=None, out_shape=None, notes=()):
        return torch_code(order=order, wrt=wrt, widths=widths, shapes=shapes,
                          out_shape=out_shape, notes=notes)

    def code_notes(self, call, order):
        """What plain nested autograd needs besides for this model (see
        :func:`~nbderiv.backends.torch_autodiff.exact_norms`): "attention" from order 2 (the
        fused attention kernel has no second derivative: the math kernel), "layer_norm" /
        "instance_norm" from order 3 (those fused kernels give wrong third derivatives; batch
        norm needs nothing: an affine map with running statistics, coupled points without).
        Read from the model's modules and from the functions its forward pass calls (a
        functional ``F.layer_norm`` or ``F.scaled_dot_product_attention`` has no module)."""
        notes = ()
        model = uncompiled(call.model)
        if not isinstance(model, torch.nn.Module) and \
                call.dtype != np_dtype(torch.get_default_dtype()):
            notes += (f"dtype:{call.dtype.name}",)  # a wrapper's model in another dtype
        if order < 2:
            return notes

        def kinds():
            return {_kind(m) for _, m in named_modules(modules_of(call.model))}
        found = kept(call, "module kinds", kinds)
        called = self._functions_called(call)
        if found & _ATTENTION or "attention" in called:
            notes += ("attention",)
        if order >= 3:
            notes += tuple(note for kind, note in (("LayerNorm", "layer_norm"),
                                                   ("InstanceNorm", "instance_norm"))
                           if any(kind in k for k in found) or note in called)
        return notes

    def activations_called(self, call) -> frozenset:
        return frozenset(n for n in self._functions_called(call)
                         if n.startswith(("act:", "flat:")))

    def _functions_called(self, call) -> frozenset:
        """Which of layer norm, instance norm and scaled-dot-product attention the model's
        forward pass calls, however spelled (a module, ``F.layer_norm``, ``torch.layer_norm``),
        and which smooth activations ("act:tanh", ...), seen on its first two points; empty
        where that pass fails. Kept with the model's state."""
        return kept(call, "functions called", lambda: self._record_functions(call))

    def _record_functions(self, call) -> frozenset:
        recorder = _FunctionRecorder()
        fn = self._caller(call)
        X = self._tensor(call, [a[:2] for a in call.args])
        try:
            with recorder:
                _forward_only(call.model, lambda: fn(X))
        except Exception:  # e.g. batch statistics of too few points: the modules still tell
            return frozenset()
        return frozenset(recorder.notes())

    # -- structure, for diagnostics --------------------------------------------------
    def kink_points(self, call, args, chunk=65536):
        if kink_free(uncompiled(call.model)):  # no layer that can call a piecewise function
            return []
        return _forward_only(call.model, lambda: self._kink_points(call, args, chunk))

    def _kink_points(self, call, args, chunk):
        n = args[0].shape[0]
        hits = np.zeros(n, dtype=bool)
        fn = self._caller(call)
        if n > 16:  # a look at a few points first: no piecewise call at all, no search
            few = KinkWatcher(8)
            with few:
                fn(self._tensor(call, [a[:8] for a in args]))
            if not few.calls:
                call.facts.kink_free = True  # not worth another look on this state
                return []
        calls = 0
        for s in range(0, n, chunk):
            part = [a[s:s + chunk] for a in args]
            watcher = KinkWatcher(part[0].shape[0])
            with watcher:
                fn(self._tensor(call, part))
            hits[s:s + chunk] = watcher.hits
            calls += watcher.calls
        if not calls:
            call.facts.kink_free = True
        return np.flatnonzero(hits).tolist()

    def layer_summary(self, model) -> dict:
        """Activations, layers in training mode and opacity of the model, or of every torch
        module a wrapper holds (a wrapper is always opaque: it may do anything around them)."""
        model = uncompiled(model)
        roots = modules_of(model)
        activations, train_mode, outside, batch_stats, seq_first = [], [], [], [], []
        opaque = not isinstance(model, torch.nn.Module)
        extra = held_outside(roots)  # in plain lists or dicts: outside the module tree
        held = {id(m) for _, m in extra}
        for name, module in list(named_modules(roots)) + extra:
            cls = type(module)
            kind = _torch_kind(module)
            if kind in _ACTIVATION_NAMES:
                activations.append(kind)
            # batch norm without running statistics: the batch's own in either mode
            no_running = "BatchNorm" in kind and not getattr(module, "track_running_stats", True)
            if no_running:
                batch_stats.append(f"{name or 'model'} ({kind})")
            # attention that reads axis 0 as the sequence: it mixes the points of the batch
            if (kind == "MultiheadAttention" or isinstance(module, torch.nn.RNNBase)) \
                    and not getattr(module, "batch_first", True):  # (an RNN: time-major)
                seq_first.append(f"{name or 'model'} ({kind})")
            # an LSTM / GRU / RNN of several layers drops out between them in training
            rnn_dropout = isinstance(module, torch.nn.RNNBase) and module.num_layers > 1 \
                and module.dropout > 0
            if module.training and (rnn_dropout or any(kind.startswith(p)
                                                       for p in _STOCHASTIC_OR_BATCH)):
                same_in_eval = (kind.startswith("Dropout") and getattr(module, "p", 1) == 0) or (
                    kind.startswith("InstanceNorm")  # its own statistics in either mode
                    and not getattr(module, "track_running_stats", False)) or no_running
                label = kind + (f", dropout={module.dropout:g} between its {module.num_layers}"
                                " layers" if rnn_dropout else "")
                if not same_in_eval:
                    train_mode.append(f"{name or 'model'} ({label})")
                    if id(module) in held:  # model.eval() does not reach it
                        outside.append(name)
            if not cls.__module__.startswith("torch.nn") and inspect.getattr_static(
                    cls, "forward", None) is not torch.nn.Sequential.forward:
                opaque = True
        summary = {"activations": activations, "train_mode": train_mode, "opaque": opaque}
        if outside:
            summary["outside_tree"] = outside
        if batch_stats:
            summary["batch_stats"] = batch_stats
        if seq_first:
            summary["seq_first"] = seq_first
        return summary

    def state_key(self, model) -> tuple:
        """The model's state key; inside :meth:`preserved`, the key of the state saved when
        the innermost call began (the same walk and copy of the values)."""
        if self._saved and self._saved[-1][0] is model and isinstance(model, torch.nn.Module):
            return self._saved[-1][1].key()
        return state_key(uncompiled(model))

    def input_width(self, model):
        """What the layer that receives the input expects, read without calling the model:
        an int (features, for a Linear), a per-point shape with None for free sizes (a Conv
        layer: (C, None, None); a batch-first RNN: (None, F)), or None when unknown. Only a
        layer that surely comes first counts: the head of an ``nn.Sequential`` chain, or the
        first Linear of a module built from Linear layers and activations alone. A wrapper
        (lambda, partial): what the modules it holds expect, when they agree."""
        model = uncompiled(model)
        if not isinstance(model, torch.nn.Module):
            roots = modules_of(model)
            refuse_lazy(roots)
            claims = {repr(self.input_width(root)): self.input_width(root) for root in roots}
            return claims.popitem()[1] if len(claims) == 1 else None
        refuse_lazy([model])
        first = model
        while isinstance(first, torch.nn.Sequential) and len(first):
            first = first[0]
        if first is not model or not list(model.children()):
            return expected_by(first)
        if all(type(m).__module__.startswith("torch.nn.modules.") and
               isinstance(m, (torch.nn.Linear, torch.nn.Sequential, torch.nn.Dropout,
                              torch.nn.Identity, torch.nn.Flatten)) or
               type(m).__module__ == "torch.nn.modules.activation"
               for m in itertools.islice(model.modules(), 1, None)):
            width = next((m.in_features for m in model.modules()
                          if isinstance(m, torch.nn.Linear)), None)
            return width
        return None

    @contextmanager
    def few_threads(self):
        """One thread: for a few hundred points, BLAS threads mostly wait on each other."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def float64_copy(self, model):
        """A float64 copy of the model, layers kept in plain lists or dicts included (which
        ``.to()`` does not reach); a ``torch.compile``'d model's original."""
        model = uncompiled(model)
        if isinstance(model, torch.nn.Module):
            with warnings.catch_warnings():  # .to() of a TorchScript copy reads its
                # parameters' .grad through the C++ object, and torch warns of non-leaves
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
                twin = copy.deepcopy(model).to(torch.float64)
                for _, held in held_outside([twin], functions=False):  # copied ones only
                    held.to(torch.float64)
            return twin
        # a wrapper (lambda z: net(z.reshape(...)), a partial, a bound method): the same
        # wrapper around float64 copies of the modules it holds
        return with_replaced(model, lambda obj: self.float64_copy(obj)
                             if isinstance(obj, torch.nn.Module) else None) or model


def _kind(module) -> str:
    """A module's class name; for a TorchScript module, the name of the class it was made from
    (``Linear``, ``Dropout``), not ``RecursiveScriptModule``."""
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", None) or type(module).__name__
    return type(module).__name__


def _torch_kind(module) -> str:
    """:func:`_kind` of the torch class the module is (or derives from): a class of your own
    named ``BatchNormed`` is no BatchNorm (its behaviour is what its own code does), one
    derived from ``nn.Dropout`` is a Dropout."""
    if isinstance(module, torch.jit.ScriptModule):
        return _kind(module)
    for c in type(module).__mro__:
        if (getattr(c, "__module__", "") or "").startswith("torch."):
            return c.__name__
    return type(module).__name__


def _eager():
    """Code that ``torch.compile`` compiled runs as plain PyTorch while nbderiv calls a model
    that holds some (:func:`~nbderiv.backends.torch_state.compiled_inside`: a compiled
    module or function inside a wrapper or a model): compiled backward graphs refuse
    ``create_graph``, which nested autodiff needs, and the numbers are the same. Only for
    those models: the stance makes every call about 10 ms slower."""
    return torch.compiler.set_stance("force_eager")


# models whose forward pass needs gradients recorded (torch.autograd.grad inside it: a PINN
# residual), found when a forward-only pass without them failed and one with them worked
_NEEDS_GRAD = weakref.WeakSet()


class _FunctionRecorder(torch.overrides.TorchFunctionMode):
    """Records the torch functions called under it (and calls them as they are)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            self.seen.add(func)
        except TypeError:  # not hashable
            pass
        return func(*args, **(kwargs or {}))

    def notes(self):
        F = torch.nn.functional
        spelled = {"layer_norm": (F.layer_norm, torch.layer_norm, torch.native_layer_norm),
                   "instance_norm": (F.instance_norm, torch.instance_norm),
                   "attention": (F.scaled_dot_product_attention,)}
        notes = [note for note, funcs in spelled.items() if any(f in self.seen for f in funcs)]
        T = torch.Tensor
        smooth = {"tanh": (torch.tanh, T.tanh, F.tanh), "sigmoid": (torch.sigmoid, T.sigmoid,
                                                                   F.sigmoid),
                  "gelu": (F.gelu,), "silu": (F.silu,), "softplus": (F.softplus,),
                  "elu": (F.elu,), "selu": (F.selu, torch.selu), "celu": (F.celu,),
                  "mish": (F.mish,), "softsign": (F.softsign,), "logsigmoid": (F.logsigmoid,)}
        pieces = {"clamp": (torch.clamp, torch.clip, T.clamp, T.clip, torch.clamp_min,
                            T.clamp_min, torch.clamp_max, T.clamp_max, F.hardtanh, F.relu6),
                  "relu": (torch.relu, T.relu, F.relu)}
        return notes + [f"act:{name}" for name, funcs in smooth.items()
                        if any(f in self.seen for f in funcs)] + \
            [f"flat:{name}" for name, funcs in pieces.items()
             if any(f in self.seen for f in funcs)]


def _cuda_devices(call) -> list:
    """The CUDA device whose generator a seeded pass forks, as torch.random.fork_rng takes it
    (none for a CPU call)."""
    return [call.device.index or 0] if getattr(call.device, "type", "") == "cuda" else []


def _forward_only(model, run):
    """``run()``, the model's forward-only passes (no derivatives of them are taken), with
    gradients off: less memory and time. A model that takes derivatives inside its forward
    pass (``torch.autograd.grad`` of its output with respect to its input, as a PINN residual
    does) fails without them: it is run again with them on, and is remembered as such. When
    that fails too, the first error is raised."""
    try:
        known = model in _NEEDS_GRAD
    except TypeError:  # not weakly referable, or unhashable
        known = False
    if known:
        with grad_enabled(True):
            return run()
    try:
        with grad_enabled(False):
            return run()
    except (NbderivError, MemoryError):
        raise
    except Exception as exc:
        first = exc
    try:
        with grad_enabled(True):
            out = run()
    except Exception:
        raise first from None
    try:
        _NEEDS_GRAD.add(model)
    except TypeError:
        pass
    return out


def _refuse_script_norms(call, order):
    """From order 3, nbderiv differentiates layer norm, instance norm and batch norm with the
    batch's statistics through plain formulas (:func:`~nbderiv.backends.torch_autodiff.
    exact_norms`): PyTorch's fused kernels give wrong third derivatives. Inside TorchScript it
    cannot swap them: refused."""
    if order < 3:
        return
    ops = kept(call, "script ops", lambda: script_ops(call.model))
    found = sorted(ops & {"layer_norm", "instance_norm"})
    if "batch_norm" in ops and _batch_statistics(call.model):
        found.append("batch_norm (with the batch's statistics)")
    if found:
        raise ModelTypeError(
            f"the model runs TorchScript code (torch.jit.script / torch.jit.trace) that calls "
            f"{' and '.join(found)}, whose fused kernel gives wrong derivatives from order 3; "
            f"nbderiv computes them through the plain formula instead, which it cannot do "
            f"inside TorchScript. Fix: differentiate the Python module you scripted or traced "
            f"(nbderiv.derivatives(net, x, order={order}) instead of torch.jit.script(net)), or "
            f"ask for order 2 at most.")


def _batch_statistics(model) -> bool:
    """Whether a batch norm may normalise with the batch's own statistics: a module in training
    mode, a batch norm without running statistics, or a scripted function (which nbderiv
    cannot read that from)."""
    model = uncompiled(model)
    script = torch.jit.ScriptFunction
    if isinstance(model, script) or (not isinstance(model, torch.nn.Module) and any(
            isinstance(o, script) for o in objects_inside(model))):
        return True
    roots = modules_of(model)
    for _, m in itertools.chain(named_modules(roots), held_outside(roots)):
        kind = getattr(m, "original_name", None) or type(m).__name__
        if m.training or ("BatchNorm" in kind and getattr(m, "running_mean", None) is None):
            return True
    return False


def _watched(fn, watcher):
    """``fn`` run under ``watcher`` (a :class:`KinkWatcher`; None: ``fn`` itself)."""
    if watcher is None:
        return fn

    def watched(X):
        with watcher:
            return fn(X)
    return watched


BACKEND = TorchBackend()
