"""The interface every framework backend implements, documented in one place.

The core (``nbderiv.compute``) does everything shared: it prepares the inputs, probes the
model, picks the strategy, cuts the points into blocks and assembles the results. A backend
answers narrow questions and runs one block. Every method that touches points gets the
:class:`~nbderiv.call.Call` (model, dtype, device, d_out once probed) and the block's
``args``: a list of numpy arrays, one per model argument, each (n, d_i) in ``call.dtype``;
D = sum(d_i) features in all; ``wrt`` is a tuple of m feature indices into 0..D-1.
Derivative arrays are (n, d_out) + (m,) * k.

**Required** (an abstract method each): ``to_numpy``, ``compute_dtype``, ``forwards``,
``derivatives``, ``per_point_derivatives``, ``full_jacobian``, ``preserved``,
``layer_summary``, ``equivalent_code``, ``float64_copy``; plus the class attribute ``name``.

**Optional**: the members of :data:`OPTIONAL` have a safe default here; a backend that
overrides one must list it in its ``optional`` set (checked when the class is defined), so
what a backend offers is declared, never probed with ``hasattr``.

>>> from nbderiv.backends.base import sorted_multi_indices
>>> sorted_multi_indices(2, 2)
[(0, 0), (0, 1), (1, 1)]
"""

from __future__ import annotations

import functools
import itertools
import math
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from ..result_memory import owned, result_array

OPTIONAL = frozenset({
    "begin", "device", "argument_names", "known_verdict", "block_rows", "bytes_per_point",
    "kink_points", "input_width", "few_threads", "state_key", "seeded_forwards", "code_notes",
    "activations_called", "restored_forwards", "state_back", "named_inputs",
    "seeded_cross_terms",
})


class Block(NamedTuple):
    """What :meth:`Backend.derivatives` returns for one block of points."""

    y: np.ndarray        # (n, d_out)
    orders: list         # [d1, ..., d_order], d_k of shape (n, d_out) + (m,) * k
    method: str          # how they were computed (see the README's method tags)
    kinks: np.ndarray | None = None  # (n,) bool: the point is at a ReLU-type kink, when
    #                                  the backend looked during the pass (else None)


class Backend:
    """Base class: one subclass per framework, one instance per process."""

    name = ""
    optional: frozenset = frozenset()  # the OPTIONAL members this backend implements

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = set(cls.optional) - OPTIONAL
        overridden = {m for m in OPTIONAL if getattr(cls, m) is not getattr(Backend, m)}
        if unknown or overridden != set(cls.optional):
            raise TypeError(f"{cls.__name__}.optional must list exactly the optional members "
                            f"it overrides: {sorted(overridden)} (unknown: {sorted(unknown)})")

    # -- required -------------------------------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        """A framework tensor / array-like as a numpy array (a detached copy for tensors)."""
        raise NotImplementedError

    def compute_dtype(self, model, x_dtype) -> np.dtype:
        """The float dtype to differentiate in: the model's, else x's float dtype, else the
        framework's default."""
        raise NotImplementedError

    def forwards(self, call, batches) -> list:
        """The model's outputs (n, d_out) on each of several same-shaped batches (each a list
        of args), as separate model calls so that randomness and batch coupling show. The
        output is validated (one row per point, floating point)."""
        raise NotImplementedError

    def derivatives(self, call, args, order, wrt, out=None) -> Block:
        """y and d_1..d_order of one block of independent points (the ones trick is valid).
        ``out``, when given, is a Block of arrays to write into (views of the full result);
        a backend may write there and return them, or return arrays of its own."""
        raise NotImplementedError

    def per_point_derivatives(self, call, args, order, wrt) -> Block:
        """Like :meth:`derivatives`, for models that couple points: the diagonal blocks
        d^k y_n / d x_n^k with every other point held fixed (cost grows like N**2)."""
        raise NotImplementedError

    def full_jacobian(self, call, args) -> np.ndarray:
        """The cross-sample Jacobian (n, d_out, n, D)."""
        raise NotImplementedError

    @contextmanager
    def preserved(self, model):
        """Put back every piece of model state a forward pass may change (e.g. BatchNorm
        statistics, training flags, variables)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def layer_summary(self, model) -> dict:
        """{'activations': [names], 'train_mode': [layer descriptions], 'opaque': bool}"""
        raise NotImplementedError

    def equivalent_code(self, *, order: int, wrt, widths: list, shapes=None, out_shape=None,
                        notes=()) -> str:
        """Plain framework code that computes the same derivatives, for a namespace holding
        ``model`` and ``x``; it leaves numpy arrays ``d1`` ... ``d<order>`` in the layout of
        ``d[k]``: (N,) + ``out_shape`` + S * k for one argument of per-point shape S
        (``shapes``, default ``(width,)`` each). ``notes``: :meth:`code_notes`."""
        raise NotImplementedError

    def float64_copy(self, model):
        """A float64 copy of the model (for finite differences), or the model itself if it
        holds no parameters."""
        raise NotImplementedError

    # -- optional (safe defaults; list the ones you override in ``optional``) ----------------
    def begin(self, model) -> None:
        """Called first in every call: a backend that caches facts about a model refreshes
        them here if the model changed."""

    def device(self, model, x):
        """Where tensors go (e.g. the model's torch device), or None."""
        return None

    def argument_names(self, model, n_args: int):
        """Names of the model's positional arguments (for ``d.inputs``), or None."""
        return None

    def seeded_forwards(self, call, batches):
        """:meth:`forwards` with the framework's random number generators seeded alike before
        each batch (the user's generator state put back), so that a model with randomness
        (Dropout next to a train-mode BatchNorm) repeats it and the probe can still see
        whether points influence each other; None (the default) where it cannot."""
        return None

    def seeded_cross_terms(self, call, batch, rows):
        """Whether, in one forward pass on ``batch`` with the random number generators seeded
        as :meth:`seeded_forwards` seeds them, autodiff sees the other points' outputs depend
        on the inputs at ``rows``: True / False, or None (the default) where it cannot tell.
        Random draws whose number depends on the data (RReLU draws a slope for each negative
        input only) shift between batches, which reads as coupling in seeded forward passes."""
        return None

    def named_inputs(self, model):
        """The keys of the dict a model takes as its input (a Keras model built on a dict of
        Inputs), in the order the model lists its inputs; None for any other model."""
        return None

    def state_back(self, call) -> None:
        """Put the model's state back as it was when the call began (for a model whose
        forward updates its own state); nothing by default."""

    def restored_forwards(self, call, batches):
        """:meth:`forwards` with the model's state (buffers, parameters) put back as it was
        before each batch, the random generators not seeded: where the outputs then agree, a
        pass differs from the last only by the state forward updated (a running statistic,
        a power iteration), not by random numbers. None (the default) where it cannot."""
        return None

    def known_verdict(self, call):
        """A :class:`~nbderiv.call.Verdict` where the model's structure alone settles it, so
        that the probe's forward passes can be skipped; None (the default) to probe."""
        return None

    def block_rows(self, call) -> int | None:
        """The most points one :meth:`derivatives` call should get (e.g. to keep a block's
        intermediates in cache), or None for no limit."""
        return None

    def bytes_per_point(self, call, order: int, m: int) -> int:
        """A rough upper estimate of working memory per point, for chunking."""
        return 8 * (call.width + (call.d_out or 1)) * (3 ** order) * max(m, 1) * 64

    def kink_points(self, call, args) -> list:
        """Indices of points where a piecewise-linear activation's input is exactly at a kink.
        A backend that finds the model calls no piecewise-linear function at all may set
        ``call.facts.kink_free`` (later calls on the same model state then skip the look)."""
        return []

    def input_width(self, model):
        """The number of input features the model expects, read without calling it, or None."""
        return None

    def activations_called(self, call) -> frozenset:
        """Names of the smooth activation functions ("act:tanh", "act:sigmoid", ...) and of
        the functions with flat pieces ("flat:clamp", "flat:relu") the model's forward pass
        calls as functions, which its layers do not show; empty when unknown."""
        return frozenset()

    def code_notes(self, call, order: int) -> tuple:
        """What the plain code for this model must do besides nested autodiff to give the same
        numbers (e.g. a normalization whose framework kernel has a wrong higher derivative),
        as names :meth:`equivalent_code` knows; () when nothing."""
        return ()

    def state_key(self, model) -> tuple:
        """(key, objects): a hashable key that changes whenever the model may behave
        differently (its structure, settings, parameters, buffers), and the objects the key
        names by identity (held weakly by :mod:`nbderiv.memo`); (None, ()) to have the model
        probed on every call (the default)."""
        return None, ()

    @contextmanager
    def few_threads(self):
        """Settings for tiny interactive problems (the explorer's few hundred points)."""
        yield


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
        out = result_array((n, d_out) + (1,) * k, dtype)
        out.reshape(n, d_out)[...] = v  # one copy (e.g. of a read-only framework buffer)
        return out
    if len(values) == math.comb(m + k - 1, k):  # every partial: one level, one gather
        return fill_level(np.stack([values[key] for key in sorted_multi_indices(m, k)],
                                   axis=1), m, k, dtype)
    out = result_array((n, d_out) + (m,) * k, dtype)
    for idx, v in values.items():
        for perm in set(itertools.permutations(idx)):
            out[(slice(None), slice(None)) + perm] = v
    return out


def fill_level(level: np.ndarray, m: int, k: int, dtype) -> np.ndarray:
    """The (n, d_out) + (m,)*k array from one level array (n, L, d_out) holding the L
    distinct partials in the order of :func:`sorted_multi_indices` (one gather, however many
    inputs: an image's 3 072 first derivatives are one copy, not 3 072).

    >>> level = np.arange(6.0).reshape(1, 3, 2)           # n=1, (0,0), (0,1), (1,1); d_out=2
    >>> fill_level(level, 2, 2, "float64")[0, 1].tolist()  # output 1: symmetric 2 x 2
    [[1.0, 3.0], [3.0, 5.0]]
    """
    n, _, d_out = level.shape
    if m == 1:  # one direction: the caller's array itself where it can be, else one copy
        return fill_symmetric({(0,) * k: level[:, 0]}, n, d_out, 1, k, np.dtype(dtype))
    out = result_array((n, d_out) + (m,) * k, np.dtype(dtype))
    flat = out.reshape(n, d_out, m ** k)
    if k == 1:
        np.copyto(flat, level.transpose(0, 2, 1))
    else:
        places, sources = _symmetric_places(m, k)
        flat[:, :, places] = level[:, sources].transpose(0, 2, 1)
    return out


@functools.lru_cache(maxsize=32)
def _symmetric_places(m: int, k: int) -> tuple:
    """(flat places in (m,)*k, the sorted multi-index each one copies) for every ordering."""
    places, sources = [], []
    for s, idx in enumerate(sorted_multi_indices(m, k)):
        for perm in set(itertools.permutations(idx)):
            places.append(int(np.ravel_multi_index(perm, (m,) * k)))
            sources.append(s)
    return np.array(places), np.array(sources)


def assemble(values: dict, y: np.ndarray, order: int, m: int) -> list:
    """[d1, ..., d_order] from {sorted multi-index: (n, d_out) values}, or, for a level k,
    from ``values[("level", k)]``: all its partials as one (n, L_k, d_out) array."""
    n, d_out = y.shape
    out = []
    for k in range(1, order + 1):
        level = values.get(("level", k))
        if level is not None:
            out.append(fill_level(level, m, k, y.dtype))
        else:
            out.append(fill_symmetric({idx: v for idx, v in values.items()
                                       if len(idx) == k and idx[0] != "level"},
                                      n, d_out, m, k, y.dtype))
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


def code_in_layout(value: str, k: int, wrt, out_shape, flat=None) -> str:
    """Generated code for the order-k array ``value`` ((N, d_out) + S * k), indexed by ``wrt``
    and reshaped to d[k]'s layout (N,) + O + S * k. ``flat``: code for its reshape to
    (N, d_out) + (D,) * k, needed before ``wrt`` indexes points of several axes.

    >>> code_in_layout("d1_all", 1, [0, 2], (1,))
    'd1_all[:, :, wrt]'
    """
    if wrt is not None and flat:
        value += flat
    value += code_index_wrt(k, wrt)
    if out_shape is not None and len(out_shape) > 1:  # the output's own axes O
        tail = f"{len(wrt)}, " * k if wrt is not None else "*X.shape[1:], " * k
        value += f".reshape(len(X), {', '.join(map(str, out_shape))}, {tail.rstrip(', ')})"
    return value


def code_index_wrt(k: int, wrt) -> str:
    """The index that keeps the ``wrt`` inputs on each of the k input axes of an order-k array
    in generated code, e.g. ``[:, :, wrt][:, :, :, wrt]``; empty when all inputs are kept."""
    return "".join(f"[{':, ' * (2 + a)}wrt]" for a in range(k)) if wrt is not None else ""
