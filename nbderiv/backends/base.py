"""The narrow interface every framework backend implements, documented in one place.

Shapes: ``args`` is a list of numpy arrays, one per model argument, each (n, d_i)
in the dtype the backend chose; D = sum(d_i) features in all; ``wrt`` is a tuple of m
feature indices into 0..D-1. Derivative arrays are (n, d_out) + (m,) * k.

>>> from nbderiv.backends.base import sorted_multi_indices
>>> sorted_multi_indices(2, 2)
[(0, 0), (0, 1), (1, 1)]
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np

from ..result_memory import owned, result_array


class Backend:
    """Base class: one subclass per framework, one instance per process."""

    name = ""
    # True: derivatives_and_probe() computes the first chunk and the probe in one dispatch
    fused_probe = False

    def begin(self, model):
        """Called first in every api call, before anything else looks at ``model``: a backend
        that caches facts about a model refreshes them here if the model changed."""

    # -- conversion and placement ------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        """A framework tensor / array-like as a numpy array (a detached copy for tensors)."""
        return np.asarray(x)

    def compute_dtype(self, model, x_dtype) -> np.dtype:
        """The float dtype to differentiate in: the model's, else x's float dtype, else default."""
        raise NotImplementedError

    def argument_names(self, model, n_args: int):
        """Names of the model's positional arguments (for ``d.inputs``), or None."""
        return None

    # -- evaluation ----------------------------------------------------------------
    def forward(self, model, args, context) -> np.ndarray:
        """y (n, d_out) without derivatives, output validated."""
        raise NotImplementedError

    def forwards(self, model, batches, context) -> list:
        """:meth:`forward` on each of several same-shaped batches, as separate model calls
        (so randomness and batch coupling show); a backend may run them in one dispatch."""
        return [self.forward(model, args, context) for args in batches]

    def known_verdict(self, model, args, context):
        """(d_out, stochastic, coupled) where the model's structure alone settles them, so
        that the probe's forward passes can be skipped; None (the default) to probe."""
        return None

    def output_width(self, model, args, context) -> int:
        """d_out, the number of outputs per point (a backend may remember it)."""
        return self.forward(model, [a[:2] for a in args], context).shape[1]

    def derivatives(self, model, args, order, wrt, context):
        """(y, [d1, ..., d_order], method) for independent points."""
        raise NotImplementedError

    def derivatives_and_probe(self, model, args, order, wrt, context):
        """((y, ders, method), (y1, y2, y3)): :meth:`derivatives`, plus the outputs of the
        three probe batches on the first ``min(n, PROBE_POINTS)`` points, as separate model
        calls: those points, again, and with point 0 moved by 0.1 * (1 + |x0|) (what the api's
        ``_probe_batches`` makes). Only for backends with ``fused_probe = True``."""
        raise NotImplementedError

    def per_point_derivatives(self, model, args, order, wrt, context):
        """Like :meth:`derivatives`, for models that couple points: the diagonal blocks
        d^k y_n / d x_n^k with every other point held fixed (cost grows like N**2)."""
        raise NotImplementedError

    def full_jacobian(self, model, args, context) -> np.ndarray:
        """The cross-sample Jacobian (n, d_out, n, D)."""
        raise NotImplementedError

    def context(self, model, x, dtype):
        """Per-call settings (device, dtype, ...) passed back to the methods above."""
        return {"dtype": np.dtype(dtype)}

    @contextmanager
    def preserved(self, model):
        """Put back every piece of model state a forward pass may change (e.g. BN statistics)."""
        yield

    def bytes_per_point(self, model, width: int, d_out: int, order: int, m: int) -> int:
        """A rough upper estimate of working memory per point, for chunking."""
        return 8 * (width + d_out) * (3 ** order) * max(m, 1) * 64

    def rows_in_flight(self, model, widths) -> int | None:
        """The most rows computed at once whatever the chunk (a backend that works in blocks
        of rows), or None when a chunk is computed all at once."""
        return None

    # -- model structure, for diagnostics ------------------------------------------
    def layer_summary(self, model) -> dict:
        """{'activations': [names], 'train_mode': [layer descriptions], 'kinds': [...]}"""
        return {"activations": [], "train_mode": [], "opaque": True}

    def kink_points(self, model, args, context) -> list:
        """Indices of points where a piecewise-linear activation's input is exactly at a kink."""
        return []

    def equivalent_code(self, *, order: int, wrt: tuple, widths: list) -> str:
        """Plain framework code that computes the same derivatives, for a namespace holding
        ``model`` and ``x``; it leaves numpy arrays ``d1`` ... ``d<order>``."""
        raise NotImplementedError

    def input_width(self, model):
        """The number of input features the model expects, read without calling it, or None."""
        return None

    @contextmanager
    def few_threads(self):
        """Settings for tiny interactive problems (the explorer's few hundred points)."""
        yield

    def float64_copy(self, model):
        """A float64 copy of the model (for finite differences), or the model itself if it
        holds no parameters."""
        return model


def sorted_multi_indices(m: int, k: int) -> list:
    """Non-decreasing k-tuples over range(m): one per distinct mixed partial."""
    return list(itertools.combinations_with_replacement(range(m), k))


def fill_symmetric(values: dict, n: int, d_out: int, m: int, k: int, dtype) -> np.ndarray:
    """Build the (n, d_out) + (m,)*k array from {sorted multi-index: (n, d_out) array}.
    One input direction: the one array itself, reshaped, when it is the caller's to give away
    (numpy owns its memory, so it is no view of a framework's tensor; writable, contiguous, of
    the right dtype), else a copy."""
    if m == 1 and len(values) == 1:
        v = next(iter(values.values()))
        if owned(v) and v.flags.writeable and v.flags.c_contiguous \
                and v.dtype == dtype and v.shape == (n, d_out):
            return v.reshape((n, d_out) + (1,) * k)
    out = result_array((n, d_out) + (m,) * k, dtype)
    for idx, v in values.items():
        for perm in set(itertools.permutations(idx)):
            out[(slice(None), slice(None)) + perm] = v
    return out


def equal_block_size(n: int, most: int) -> int:
    """The size of equal blocks covering n rows, at most ``most`` each: 20 000 rows in blocks
    of at most 8 192 as 3 x 6 667, not 2 x 8 192 + 3 616.

    >>> equal_block_size(20000, 8192), equal_block_size(50, 100)
    (6667, 50)
    """
    most = max(1, min(n, most))
    return -(-n // -(-n // most))


def block_starts(n: int, size: int) -> list:
    """Where blocks of ``size`` rows start so that every block has exactly ``size`` rows: the
    last one overlaps the one before instead of being shorter (backends that trace or compile
    per shape then see one shape).

    >>> block_starts(50, 7)
    [0, 7, 14, 21, 28, 35, 42, 43]
    """
    return [max(0, min(s, n - size)) for s in range(0, n, size)]


def code_keeping_wrt(wrt) -> list:
    """Lines of generated code that name the kept inputs (none when all inputs are kept)."""
    if wrt is None:
        return []
    return [f"# Keep only the inputs asked for (wrt={list(wrt)}) on every input axis.",
            f"wrt = {list(wrt)}"]


def code_index_wrt(k: int, wrt) -> str:
    """The index that keeps the ``wrt`` inputs on each of the k input axes of an order-k array
    in generated code, e.g. ``[:, :, wrt][:, :, :, wrt]``; empty when all inputs are kept."""
    return "".join(f"[{':, ' * (2 + a)}wrt]" for a in range(k)) if wrt is not None else ""
