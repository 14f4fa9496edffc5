"""Memory for result arrays: plain NumPy by default, an opt-in pool for repeated large results.

By default :func:`result_array` is ``np.empty``: after ``del d`` (and ``gc.collect()`` if
``d`` sits in a reference cycle) a result's memory goes back exactly as NumPy gives it back,
and nothing is kept for the whole process.

Opt in where large results are computed again and again in one process (benchmarks, a loop
over 100 000 points with hundreds of outputs): ``keep("1GiB")``, or the environment variable
``NBDERIV_KEEP_RESULTS=1GiB`` set before nbderiv is first used. At N = 100 000 points a model
with 501 outputs gives 200 MB per derivative order; NumPy takes an array that large fresh
from the system each time (the C library maps anything above 32 MB anew) and the kernel maps
and zeroes it page by page as it is first written: 50-120 ms for 400 MB on the development
machine, up to a second on a busy virtual machine, longer than computing the derivatives.
With the pool, once every array viewing a buffer of ``POOLED_BYTES`` or more is gone, the
buffer is kept (up to the limit, in all) for the next result that needs as much, as the
frameworks' caching allocators do with their own tensors. Smaller arrays never use it (the C
library's heap reuses those already). ``release()`` frees the kept buffers; ``keep(0)``
turns the pool off again.

>>> a = result_array((200_000, 100), np.float32)   # 80 MB: by default a plain np.empty
>>> a.base is None, owned(a)
(True, True)
>>> previous = keep("1GiB")                        # opt in
>>> b = result_array((200_000, 100), np.float32)
>>> address = b.ctypes.data
>>> del b                                          # its buffer is kept ...
>>> result_array((200_000, 100), np.float32).ctypes.data == address   # ... and reused
True
>>> release() >= 80_000_000                        # hands the kept buffers back
True
>>> _ = keep(previous)                             # as before (no pool by default)
"""

from __future__ import annotations

import os

import numpy as np

from .options import byte_count

POOLED_BYTES = 16 * 2**20  # smaller arrays: always np.empty (the C library's heap reuses those)
ENV_VAR = "NBDERIV_KEEP_RESULTS"


def _limit(value, name: str) -> int:
    """Bytes the pool may keep: 0 (off) for 0, None, False or "0", else a byte count."""
    if value is None or value is False or (isinstance(value, str) and value.strip() in ("", "0")):
        return 0
    if not isinstance(value, str) and value == 0:
        return 0
    return byte_count(value, name)


KEEP_BYTES = _limit(os.environ.get(ENV_VAR), ENV_VAR)  # freed buffers kept, at most; 0: no pool

# raw uint8 buffers no array uses, oldest first. Races between threads can only drop a
# buffer (it is then freed as usual), never hand one out twice: a buffer is taken under the
# GIL by a single list.pop.
_idle: list = []


def keep(nbytes) -> int:
    """Keeps up to ``nbytes`` of dropped large results for reuse (an int, or a string such as
    ``"1GiB"``); ``0`` turns the pool off and frees what it kept. Returns the previous limit,
    so ``previous = keep("1GiB")`` ... ``keep(previous)`` restores it. It pays where large
    results are computed repeatedly (benchmarks, loops at 100 000 points with many outputs);
    the memory it keeps stays with the process until :func:`release` or ``keep(0)``."""
    global KEEP_BYTES
    previous, KEEP_BYTES = KEEP_BYTES, _limit(nbytes, "keep")
    _trim()
    return previous


class _Lease:
    """Owns one raw buffer while arrays view it (it is their ``base``); when the last of
    them is gone, the buffer goes back to the idle list (if the pool is still on)."""

    def __init__(self, raw, shape, dtype):
        self.raw = raw
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": dtype.str,
                                    "data": (raw.ctypes.data, False)}

    def __del__(self):
        try:
            _give_back(self.raw)
        except Exception:  # interpreter shutdown: nothing left to keep it for
            pass


def result_array(shape, dtype) -> np.ndarray:
    """An uninitialised, writable, C-contiguous array like ``np.empty(shape, dtype)``. Only
    with the pool on (:func:`keep`), one of ``POOLED_BYTES`` or more reuses a buffer a
    dropped result left behind where one fits."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if (not POOLED_BYTES <= nbytes <= KEEP_BYTES or dtype.hasobject
            or dtype.fields is not None):
        return np.empty(shape, dtype)
    raw = _take(nbytes)
    if raw is None:
        raw = np.empty(nbytes, np.uint8)
    return np.asarray(_Lease(raw, shape, dtype))


def owned(a: np.ndarray) -> bool:
    """Whether ``a`` holds its own memory (a plain NumPy array or one from
    :func:`result_array`), so it is no view of a framework's tensor or of another array."""
    return bool(a.flags.owndata) or isinstance(a.base, _Lease)


def release() -> int:
    """Frees the kept buffers (the pool stays on if it was); returns how many bytes they held."""
    freed = 0
    while _idle:
        try:
            freed += _idle.pop().nbytes
        except IndexError:
            break
    return freed


def _take(nbytes: int):
    """The smallest idle buffer of nbytes to 2 * nbytes, removed from the idle list."""
    fits = [(raw.nbytes, i) for i, raw in enumerate(list(_idle))
            if nbytes <= raw.nbytes <= 2 * nbytes]
    if not fits:
        return None
    _, i = min(fits)
    try:
        raw = _idle.pop(i)
    except IndexError:  # another thread took one meanwhile
        return None
    return raw if nbytes <= raw.nbytes <= 2 * nbytes else None


def _give_back(raw) -> None:
    if raw.nbytes <= KEEP_BYTES:
        _idle.append(raw)
    _trim()


def _trim() -> None:
    """Drops the oldest kept buffers until they fit the limit (all of them when it is 0)."""
    while sum(r.nbytes for r in list(_idle)) > KEEP_BYTES:
        try:
            _idle.pop(0)  # the oldest goes first
        except IndexError:
            break
