"""Forward Taylor mode for ``nn.Sequential`` stacks of ``Linear`` layers and elementwise
activations: propagates truncated Taylor coefficients along one input direction, so
order K costs about K**2 elementwise passes instead of the 3**K of nested autograd.

A coefficient list ``c = [c0, c1, ..., cK]`` stands for x(t) = sum_k c_k t**k; the k-th
derivative along the direction is k! * c_k. ``None`` stands for an exact zero.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
>>> taylor_plan(net, [1]) is not None
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .taylor_series import compose, poly_derivatives

_IDENTITY = (nn.Identity, nn.Flatten)


def _horner(coeffs, s):
    result = torch.full_like(s, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        result = result * s + c
    return result


def _from_poly(fn, base_poly, scale=1.0):
    def value_and_derivs(x, order):
        s = fn(x * scale) if scale != 1.0 else fn(x)
        ders = [_horner(p, s) * (scale ** (m + 1)) for m, p in
                enumerate(poly_derivatives(base_poly, order))]
        return s, ders
    return value_and_derivs


def _piecewise_linear(fn, slope):
    def value_and_derivs(x, order):
        return fn(x), [slope(x)] + [None] * (order - 1)
    return value_and_derivs


def _by_autograd(fn):
    def value_and_derivs(x, order):
        with torch.enable_grad():
            a = x.detach().requires_grad_(True)
            y = fn(a)
            ders, cur = [], y
            for k in range(order):
                g = torch.autograd.grad(cur.sum(), a, create_graph=k + 1 < order,
                                        allow_unused=True)[0]
                if g is None:
                    ders += [None] * (order - k)
                    break
                ders.append(g.detach())
                cur = g
        return y.detach(), ders
    return value_and_derivs


def _softplus(module):
    beta, threshold = module.beta, module.threshold
    sig = _from_poly(torch.sigmoid, [0.0, 1.0, -1.0], scale=float(beta))

    def value_and_derivs(x, order):
        _, sig_ders = sig(x, order - 1) if order > 1 else (None, [])
        first = torch.sigmoid(beta * x)
        linear = beta * x > threshold  # torch returns x itself there
        first = torch.where(linear, torch.ones_like(first), first)
        higher = [torch.where(linear, torch.zeros_like(d), d) for d in sig_ders]
        return F.softplus(x, beta, threshold), [first] + higher
    return value_and_derivs


def _quadratic_ode(fn, b, fused_first):
    """Propagation through an activation with s' = a + b*s - s**2 (tanh: a=1, b=0;
    sigmoid: a=0, b=1), by the Taylor recurrences for z = s(u(t)), w = s'(u(t)):

        k z_k = sum_{j=1..k} j u_j w_{k-j},    w_k = b z_k - sum_{i=0..k} z_i z_{k-i}.

    About k fused multiply-adds per coefficient and one call of ``fn``; order 1 is a single
    fused ``*_backward`` kernel (what reverse mode itself runs)."""
    def propagate(u, order):
        z0 = fn(u[0])
        if order == 1:
            return [z0, None if u[1] is None else fused_first(u[1], z0)]
        zero = z0.new_zeros(())
        w = [torch.addcmul(z0 if b else z0.new_ones(()), z0, z0, value=-1.0)]
        z = [z0]
        for k in range(1, order + 1):
            acc = None
            for j in range(k, 0, -1):  # j = k first: coefficient 1, a plain product
                if u[j] is None or w[k - j] is None:
                    continue
                if acc is None:
                    acc = torch.mul(u[j], w[k - j]) if j == k else \
                        torch.addcmul(zero, u[j], w[k - j], value=j / k)
                else:
                    acc.addcmul_(u[j], w[k - j], value=j / k)
            z.append(acc)
            if k == order:
                break
            wk = None if acc is None else torch.addcmul(acc if b else zero, z0, acc, value=-2.0)
            for i in range(1, k // 2 + 1):
                a, c = z[i], z[k - i]
                if a is None or c is None:
                    continue
                coef = -1.0 if 2 * i == k else -2.0
                wk = torch.addcmul(zero, a, c, value=coef) if wk is None else \
                    wk.addcmul_(a, c, value=coef)
            w.append(wk)
        return z
    return propagate


def _generic(value_and_derivs):
    """Propagation from sigma(c0) and its derivatives (Faa di Bruno on the series powers)."""
    return lambda c, order: _apply_act(value_and_derivs, c, order)


def _plain(module, cls) -> bool:
    """``module`` is a ``cls`` that runs ``cls``'s own forward: a subclass with a forward of
    its own (a scaled tanh, an always-on dropout) computes something else."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _activation(module):
    """A function (coefficients, order) -> coefficients for an elementwise activation."""
    if _plain(module, nn.Tanh):
        return _quadratic_ode(torch.tanh, 0, torch.ops.aten.tanh_backward)
    if _plain(module, nn.Sigmoid):
        return _quadratic_ode(torch.sigmoid, 1, torch.ops.aten.sigmoid_backward)
    vd = _value_and_derivs(module)
    return None if vd is None else _generic(vd)


def _value_and_derivs(module):
    if _plain(module, nn.Softplus):
        return _softplus(module)
    if _plain(module, nn.ReLU):
        return _piecewise_linear(F.relu, lambda x: (x > 0).to(x.dtype))
    if _plain(module, nn.LeakyReLU):
        s = module.negative_slope
        return _piecewise_linear(lambda x: F.leaky_relu(x, s),
                                 lambda x: torch.where(x > 0, 1.0, torch.full_like(x, s)))
    if _plain(module, nn.Hardtanh):  # includes ReLU6 (which keeps Hardtanh's forward)
        lo, hi = module.min_val, module.max_val
        return _piecewise_linear(lambda x: F.hardtanh(x, lo, hi),
                                 lambda x: ((x > lo) & (x < hi)).to(x.dtype))
    functional = {
        nn.SiLU: F.silu, nn.Mish: F.mish, nn.SELU: F.selu, nn.Softsign: F.softsign,
        nn.Tanhshrink: F.tanhshrink, nn.LogSigmoid: F.logsigmoid,
    }
    for cls, fn in functional.items():
        if type(module) is cls:
            return _by_autograd(fn)
    if type(module) is nn.GELU:
        return _by_autograd(lambda x: F.gelu(x, approximate=module.approximate))
    if type(module) is nn.ELU:
        return _by_autograd(lambda x: F.elu(x, module.alpha))
    if type(module) is nn.CELU:
        return _by_autograd(lambda x: F.celu(x, module.alpha))
    return None


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_forward_hooks_always_called", "_global_module_registration_hooks")
# what ``module(x)`` looks up on the instance before the class: replaced there, it runs
# instead of the class's forward
_CALL_ATTRIBUTES = ("forward", "_call_impl", "_wrapped_call_impl")


def global_hooks() -> bool:
    """Forward hooks registered for every module (``register_module_forward_hook``, ...)."""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in _GLOBAL_HOOKS)


def runs_class_forward(m) -> bool:
    """``m(x)`` runs ``type(m).forward`` itself: no hooks on ``m`` and nothing of the call
    replaced on the instance (``m.forward = ...``, as some wrapping libraries do)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    own = vars(m)
    return not any(name in own for name in _CALL_ATTRIBUTES)


def _flatten(module):
    if not runs_class_forward(module):
        return None
    if type(module) is nn.Sequential or (
            isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward):
        out = []
        for child in module:
            sub = _flatten(child)
            if sub is None:
                return None
            out += sub
        return out
    return [module]


def taylor_plan(model, widths):
    """A list of steps ('linear', module) / ('act', fn) if the model qualifies, else None."""
    if len(widths) != 1 or not isinstance(model, nn.Sequential) or global_hooks():
        return None
    modules = _flatten(model)  # None if any module's call is hooked or replaced
    if not modules:
        return None
    plan = []
    for m in modules:
        if any(_plain(m, cls) for cls in _IDENTITY) or (_plain(m, nn.Dropout) and not m.training):
            continue
        if type(m) is nn.Linear:
            plan.append(("linear", m))
            continue
        act = _activation(m)
        if act is None:
            return None
        plan.append(("act", act))
    return plan


def _apply_act(act, c, order):
    y0, ders = act(c[0], order)
    return compose(y0, ders, c, order, scaled=False)

def taylor_derivatives(plan, X, order, direction, out=None):
    """(y (n, d_out), [d1..dK] each (n, d_out, 1, ..., 1)) along input ``direction``.

    With ``out = (y, [d1..dK])``, (n, d_out) tensors (views of the caller's result arrays),
    the values are written there instead: a last ``Linear`` layer writes its products
    straight into them, with no block-sized copy in between, and nothing is returned."""
    with torch.no_grad():
        e = torch.zeros((1, X.shape[1]), dtype=X.dtype, device=X.device)
        e[0, direction] = 1
        c = [X, e] + [None] * (order - 1)
        last = plan[-1][1] if out is not None and plan[-1][0] == "linear" else None
        for kind, step in plan[:-1] if last is not None else plan:
            if kind == "linear":
                c = [F.linear(c[0], step.weight, step.bias)] + \
                    [None if ck is None else F.linear(ck, step.weight) for ck in c[1:]]
            else:
                c = step(c, order)
        if out is not None:
            _write_block(c, last, out)
            return None
        y = c[0]
        ders = []
        for k in range(1, order + 1):
            ck = c[k]
            if ck is None:
                v = torch.zeros_like(y)
            else:
                v = (ck * float(math.factorial(k)) if k > 1 else ck).expand_as(y)
            ders.append(v.reshape(y.shape + (1,) * k))
    return y, ders


def _write_block(c, last, out):
    """The coefficients ``c`` (before the ``Linear`` layer ``last``, if not None) as values
    and derivatives into the (n, d_out) tensors ``out``."""
    y_out, ders_out = out
    if last is None:
        y_out.copy_(c[0])
    elif last.bias is None:
        torch.mm(c[0], last.weight.t(), out=y_out)
    else:
        torch.addmm(last.bias, c[0], last.weight.t(), out=y_out)
    for k, dst in enumerate(ders_out, start=1):
        ck = c[k]
        if ck is None:
            dst.zero_()
            continue
        if last is not None and ck.shape[0] == dst.shape[0]:
            torch.mm(ck, last.weight.t(), out=dst)
        else:  # a row broadcast over the block (no activation after the input)
            dst.copy_((ck if last is None else F.linear(ck, last.weight)).expand_as(dst))
        if k > 1:
            dst.mul_(float(math.factorial(k)))  # (21! is past int64)
