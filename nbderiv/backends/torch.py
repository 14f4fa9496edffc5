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
from contextlib import contextmanager

import numpy as np
import torch

from ..call import Verdict
from ..errors import OptionError
from ..inputs import check_output
from .base import Backend, Block, assemble
from .torch_autodiff import (
    KinkWatcher,
    exact_norms,
    grad_enabled,
    nested_forward,
    nested_reverse,
    to_numpy,
)
from .torch_code import torch_code
from .torch_taylor import global_hooks, runs_class_forward, taylor_derivatives, taylor_plan

_ACTIVATION_NAMES = {
    "ReLU", "LeakyReLU", "ReLU6", "PReLU", "RReLU", "Hardtanh", "Hardshrink", "Softshrink",
    "Threshold", "Tanh", "Sigmoid", "Softplus", "SiLU", "GELU", "ELU", "CELU", "SELU", "Mish",
    "Hardswish", "Hardsigmoid", "Tanhshrink", "LogSigmoid", "Softsign", "Softmax", "LogSoftmax",
}
_STOCHASTIC_OR_BATCH = ("Dropout", "BatchNorm", "InstanceNorm", "SyncBatchNorm", "AlphaDropout")


def _np_dtype(torch_dtype) -> np.dtype:
    """The NumPy dtype of a torch float dtype; bfloat16 (which NumPy lacks) as float32, for
    inputs only: a bfloat16 *model* is refused by :func:`_model_dtype`."""
    return np.dtype(str(torch_dtype).replace("torch.", "")) if torch_dtype != torch.bfloat16 \
        else np.dtype(np.float32)


def _model_dtype(t) -> np.dtype:
    """The dtype to differentiate a model whose first float tensor is ``t`` in: its own,
    float16 included; bfloat16 is refused clearly (NumPy has no bfloat16, and feeding the
    model float32 would fail inside it and be blamed on the input)."""
    if t.dtype == torch.bfloat16:
        from ..errors import ModelTypeError

        raise ModelTypeError(
            "the model's parameters are bfloat16, which nbderiv cannot compute in (its arrays "
            "are NumPy's, which has no bfloat16); bfloat16 keeps about 3 significant digits, "
            "too few for derivatives in any case. Fix: differentiate a float32 copy, "
            "nbderiv.derivatives(copy.deepcopy(model).float(), x), or float64 for higher orders.")
    return _np_dtype(t.dtype)


def _first_float_tensor(model):
    if isinstance(model, torch.nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):  # stops at the first
            if t.is_floating_point():
                return t
    return None


class TorchBackend(Backend):
    name = "torch"
    optional = frozenset({"device", "argument_names", "known_verdict", "block_rows",
                          "bytes_per_point", "kink_points", "input_width", "few_threads"})

    # -- conversion and placement ------------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.cpu().numpy().copy()
        return np.asarray(x)

    def compute_dtype(self, model, x_dtype) -> np.dtype:
        t = _first_float_tensor(model)
        if t is not None:
            return _model_dtype(t)
        if x_dtype is not None and np.dtype(x_dtype).kind == "f":
            return np.dtype(x_dtype)
        return _np_dtype(torch.get_default_dtype())

    def device(self, model, x):
        t = _first_float_tensor(model)
        if t is not None:
            return t.device
        first = x[0] if isinstance(x, tuple) and x else x
        return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")

    def argument_names(self, model, n_args):
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
    def _caller(model, widths):
        """fn(X) -> (n, d_out): splits the (n, D) feature matrix into the model's arguments."""
        def fn(X):
            parts = torch.split(X, widths, dim=1) if len(widths) > 1 else (X,)
            out = model(*parts)
            if not isinstance(out, torch.Tensor):
                check_output(None, False, "", X.shape[0], type(out).__name__)
            shape = check_output(tuple(out.shape), out.is_floating_point() or out.is_complex(),
                                 str(out.dtype).replace("torch.", ""), X.shape[0])
            return out.reshape(shape)
        return fn

    def known_verdict(self, call):
        """For a plain stack of per-point layers (:data:`_DENSE`, no hooks) taking one input
        whose width fits its first layer: d_out from the Linear layers, stochastic only with an
        active Dropout, never coupled. Else None, and the probe runs (it also reports an input
        the model rejects)."""
        model = call.model
        if len(call.args) != 1 or not _plain_modules(model, _DENSE):
            return None
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

    def forwards(self, call, batches) -> list:
        """Separate model calls on slices of one tensor: one copy to the device and one back
        (each copy waits for the GPU)."""
        fn = self._caller(call.model, [a.shape[1] for a in batches[0]])
        stacked = self._tensor(call, [np.concatenate(parts) for parts in zip(*batches)])
        with grad_enabled(False):
            ys = [fn(part) for part in torch.split(stacked, batches[0][0].shape[0])]
            return np.split(to_numpy(torch.cat(ys)), len(batches))

    def derivatives(self, call, args, order, wrt, out=None) -> Block:
        X = self._tensor(call, args)
        widths = [a.shape[1] for a in args]
        plan = taylor_plan(call.model, widths) if len(wrt) == 1 else None
        if plan is not None:  # forward Taylor mode: linear layers and elementwise activations
            with grad_enabled(False):
                if out is not None:  # straight into the result arrays
                    views = [torch.from_numpy(b).view(b.shape[0], out.y.shape[1])
                             for b in [out.y] + list(out.orders)]
                    taylor_derivatives(plan, X, order, wrt[0], out=(views[0], views[1:]))
                    return Block(out.y, out.orders, "taylor")
                y, ders = taylor_derivatives(plan, X, order, wrt[0])
            return Block(to_numpy(y), [to_numpy(d) for d in ders], "taylor")
        fn = self._caller(call.model, widths)
        with grad_enabled(True), exact_norms(order):
            if call.d_out > len(wrt):
                try:
                    y, values = nested_forward(fn, X, order, wrt)
                    method = "forward-jvp"
                except (RuntimeError, NotImplementedError):
                    y, values = nested_reverse(fn, X, order, wrt)
                    method = "reverse-ones"
            else:
                y, values = nested_reverse(fn, X, order, wrt)
                method = "reverse-ones"
        return Block(y, assemble(values, y, order, len(wrt)), method)

    def per_point_derivatives(self, call, args, order, wrt) -> Block:
        fn = self._caller(call.model, [a.shape[1] for a in args])
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
        fn = self._caller(call.model, [a.shape[1] for a in args])
        X = self._tensor(call, args)
        with grad_enabled(True):
            J = torch.autograd.functional.jacobian(fn, X)
        return to_numpy(J)

    @contextmanager
    def preserved(self, model):
        if not isinstance(model, torch.nn.Module):
            yield
            return
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        modes = [(m, m.training) for m in model.modules()]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)
            for m, mode in modes:
                m.training = mode

    def block_rows(self, call):
        """About 2**18 values of the widest layer, so that one block's intermediates stay in
        cache (measured 1.3-2x faster per point than one batch of 10**5 on a 2-core CPU).
        Only for plain stacks of per-point layers on the CPU; otherwise no limit (a GPU wants
        large batches)."""
        widths = _dense_widths(call.model)
        if not widths or getattr(call.device, "type", "cpu") != "cpu":
            return None
        return int(min(8192, max(1024, 2 ** 18 // max(widths))))

    def bytes_per_point(self, call, order, m):
        model, width, d_out = call.model, call.width, call.d_out
        if _dense_widths(model) and getattr(call.device, "type", "cpu") == "cpu":
            # the work runs in blocks of block_rows rows (a few MB whatever N is), so only the
            # inputs (a numpy array and a tensor) grow with the number of points
            return 16 * width
        hidden = 64
        if isinstance(model, torch.nn.Module):
            hidden = sum(p.shape[0] for p in model.parameters() if p.ndim >= 2) or 64
        item = call.dtype.itemsize
        values = hidden + width + d_out  # one row of every layer's output
        if m == 1 and taylor_plan(model, [width]) is not None:
            # Taylor mode: order + 1 coefficients of each value, and a few temporaries
            return int(values * item * (order + 1) * 4)
        # nested autograd: each level keeps the graph below it and roughly triples it
        return int(values * item * 6 * (3 ** (order - 1)) * max(1, min(m, 4)))

    def equivalent_code(self, *, order, wrt, widths):
        return torch_code(order=order, wrt=wrt, widths=widths)

    # -- structure, for diagnostics --------------------------------------------------
    def kink_points(self, call, args, chunk=65536):
        if _kink_free(call.model):  # no layer that can call a piecewise-linear function
            return []
        n = args[0].shape[0]
        hits = np.zeros(n, dtype=bool)
        fn = self._caller(call.model, [a.shape[1] for a in args])
        with grad_enabled(False):
            for s in range(0, n, chunk):
                part = [a[s:s + chunk] for a in args]
                watcher = KinkWatcher(part[0].shape[0])
                with watcher:
                    fn(self._tensor(call, part))
                hits[s:s + chunk] = watcher.hits
        return np.flatnonzero(hits).tolist()

    def layer_summary(self, model) -> dict:
        if not isinstance(model, torch.nn.Module):
            return {"activations": [], "train_mode": [], "opaque": True}
        activations, train_mode, opaque = [], [], False
        for name, module in model.named_modules():
            cls = type(module)
            kind = cls.__name__
            if kind in _ACTIVATION_NAMES:
                activations.append(kind)
            if module.training and any(kind.startswith(p) for p in _STOCHASTIC_OR_BATCH):
                if not (kind.startswith("Dropout") and getattr(module, "p", 1) == 0):
                    train_mode.append(f"{name or 'model'} ({kind})")
            if not cls.__module__.startswith("torch.nn") and type(module).forward is not \
                    torch.nn.Sequential.forward:
                opaque = True
        return {"activations": activations, "train_mode": train_mode, "opaque": opaque}

    def input_width(self, model):
        if not isinstance(model, torch.nn.Module):
            return None
        for module in model.modules():
            if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
                raise OptionError("the model has a lazy layer, which its first call would "
                                  "initialise for whatever width it sees. Fix: pass d_in= "
                                  "(the number of input features).")
            width = getattr(module, "in_features", None)
            if isinstance(width, int) and width > 0:
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
        if isinstance(model, torch.nn.Module):
            return copy.deepcopy(model).to(torch.float64)
        return model


# Layers whose forward never calls a piecewise-linear function (exact classes: a subclass
# may override forward). A model built only from these needs no kink search.
_KINK_FREE = (
    torch.nn.Linear, torch.nn.Bilinear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.LayerNorm,
    torch.nn.GroupNorm, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.SiLU,
    torch.nn.GELU, torch.nn.ELU, torch.nn.CELU, torch.nn.SELU, torch.nn.Mish, torch.nn.Softsign,
    torch.nn.Tanhshrink, torch.nn.LogSigmoid, torch.nn.Softmax, torch.nn.LogSoftmax,
)
# Layers that act on each point's feature vector alone (no batch statistics), with sizes
# that the Linear layers tell: their work can be split into blocks of rows.
_DENSE = (
    torch.nn.Linear, torch.nn.Identity, torch.nn.Flatten, torch.nn.Dropout, torch.nn.LayerNorm,
    torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.SiLU, torch.nn.GELU,
    torch.nn.ELU, torch.nn.CELU, torch.nn.SELU, torch.nn.Mish, torch.nn.Softsign,
    torch.nn.Tanhshrink, torch.nn.LogSigmoid, torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ReLU6,
    torch.nn.Hardtanh, torch.nn.PReLU,
)


def _plain_modules(model, allowed) -> bool:
    """Every module is an exact instance of ``allowed`` or a plain nn.Sequential, no hooks."""
    if not isinstance(model, torch.nn.Module):
        return False
    if global_hooks():
        return False
    for m in model.modules():
        if not runs_class_forward(m):  # hooked, or its forward replaced on the instance
            return False
        if type(m) in allowed:
            continue
        if isinstance(m, torch.nn.Sequential) and type(m).forward is torch.nn.Sequential.forward:
            continue
        return False
    return True


def _kink_free(model) -> bool:
    return _plain_modules(model, _KINK_FREE)


def _dense_widths(model):
    """The Linear layers' widths if the model is a plain stack of per-point layers, else []."""
    if not _plain_modules(model, _DENSE):
        return []
    return [max(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, torch.nn.Linear)]


BACKEND = TorchBackend()
