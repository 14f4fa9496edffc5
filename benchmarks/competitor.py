"""The record each competitor of the benchmark is described by, and the layout helper, shared
by the torch and TensorFlow idiom modules (it imports no framework)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Competitor:
    """One way of computing the order-K derivatives of the batch.

    ``kind``: 'forward' (the unit), 'idiom' (hand-written, competes for "best idiom"),
    'naive' (the full N x N Jacobian, shown for its quadratic cost), 'nbderiv'.
    ``scaling``: how its cost grows with N, used to skip sizes predicted to be too slow.
    ``bytes_at``: a rough working-memory estimate (bytes) for N points, or None.
    ``bytes_at`` is used only before a smaller N has been measured; after that the measured
    in-process increase is extrapolated (``mem_scaling``: its power of N).
    ``units_at``: a rough cost in forward passes of N points, used before any timing exists.
    """

    name: str
    kind: str
    run: Callable[[], object]
    standard: Callable[[object], np.ndarray] | None = None
    scaling: int = 1
    bytes_at: Callable[[int], float] | None = None
    units_at: Callable[[int], float] | None = None
    mem_scaling: int = 1
    sync: Callable[[], None] = field(default=lambda: None)


def from_multi(values, n, d_out, d_in, K, to_numpy=np.asarray):
    """The (n, d_out) + (d_in,) * K float64 array from {sorted multi-index: (n, d_out) values}
    (each mixed partial computed once, copied to all its permutations)."""
    out = np.empty((n, d_out) + (d_in,) * K, dtype=np.float64)
    for idx, v in values.items():
        arr = to_numpy(v).reshape(n, d_out)
        for perm in set(itertools.permutations(idx)):
            out[(slice(None), slice(None)) + perm] = arr
    return out
