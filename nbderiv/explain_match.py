"""The truth that :func:`nbderiv.explain` compares with, and how a student's values match it.

:class:`_Truth` computes nbderiv's own derivatives of the model lazily (the cross-sample
Jacobian and float64 central differences only where needed); :func:`match` says whether an
array holds the same values as another, in the same shape, in another shape (C order), or
with its axes in another order, within a tolerance suited to the dtype.

>>> import numpy as np
>>> mine = np.arange(6.0).reshape(2, 3)
>>> match(mine, mine.T, "float64"), match(mine, mine.reshape(3, 2), "float64")
(('permute', (1, 0)), ('reshape', None))
"""

from __future__ import annotations

import itertools

import numpy as np

# relative tolerance per dtype (of the largest value of the array compared with); the
# comparison takes the looser of mine's dtype and the truth's
RTOL = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-3, "float64": 1e-7}
# an absolute floor, far below anything a student would call a number
ATOL_FLOOR = {"float16": 1e-4, "bfloat16": 1e-4, "float32": 1e-9, "float64": 1e-15}
MAX_PERMUTED_AXES = 6  # permutations tried up to this many (squeezed) axes


def _dtype_name(arr) -> str:
    if arr is None:
        return "float32"
    name = str(arr.dtype)
    return name if name in RTOL else ("float64" if np.issubdtype(arr.dtype, np.floating)
                                      else "float32")


def _looser(*names) -> str:
    return max(names, key=lambda n: RTOL.get(n, 0))


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

    @property
    def random(self):
        """Whether the model's outputs were random (dropout in training mode, noise)."""
        self.get(1)
        return bool(getattr(self.d, "_stochastic", False))

    def alone(self, k, most=64):
        """Order k of each point with the model run on that point alone (a batch of one, as
        ``vmap(jacrev)`` or a loop over the points runs it), in nbderiv's layout; None for
        more than ``most`` points or where the model refuses a batch of one."""
        from .api import derivatives

        if isinstance(self.x, tuple) or self.n > most:
            return None
        try:
            x = np.asarray(self.x) if not hasattr(self.x, "shape") else self.x
            parts = [derivatives(self.model, x[i:i + 1], order=k, wrt=self.wrt)[k]
                     for i in range(self.n)]
        except Exception:  # e.g. batch statistics of one point
            return None
        return np.concatenate(parts)

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
    """Entry-wise: |a - b| within the tolerance of ``dtype``, relative to max |b| (that alone:
    no further allowance relative to each entry, which would double it for the largest)."""
    scale = float(np.nanmax(np.abs(b))) if b.size else 0.0
    atol = RTOL[dtype] * scale + ATOL_FLOOR[dtype]
    with np.errstate(invalid="ignore"):
        return np.isclose(a, b, rtol=0.0, atol=atol, equal_nan=True)


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
