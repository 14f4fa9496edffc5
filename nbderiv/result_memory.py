"""Memory for large result arrays, reused from one call to the next.

At N = 100 000 points a model with 501 outputs gives 200 MB per derivative order. NumPy
takes an array that large fresh from the system each time (the C library maps anything
above 32 MB anew), and the kernel has to map and zero it page by page as it is first
written: 50-120 ms for 400 MB on the development machine, up to a second on a busy virtual
machine, longer than computing the derivatives. Smaller arrays are reused from the C
library's heap, which is why 10 000 points do not pay this. Here the large ones are reused
the same way: once every array viewing a buffer is gone, the buffer is kept (up to
``KEEP_BYTES`` in all) for the next result that needs as much, as the frameworks' caching
allocators do with their own tensors. ``release()`` hands the kept buffers back.

>>> a = result_array((200_000, 100), np.float32)   # 80 MB: a kept buffer if one fits
>>> a.shape, a.dtype, owned(a)
((200000, 100), dtype('float32'), True)
>>> del a
>>> release() >= 80_000_000
True
"""

from __future__ import annotations

import numpy as np

POOLED_BYTES = 16 * 2**20  # smaller arrays: np.empty (the C library's heap reuses those)
KEEP_BYTES = 2**30  # freed buffers kept, at most, in all

# raw uint8 buffers no array uses, oldest first. Races between threads can only drop a
# buffer (it is then freed as usual), never hand one out twice: a buffer is taken under the
# GIL by a single list.pop.
_idle: list = []


class _Lease:
    """Owns one raw buffer while arrays view it (it is their ``base``); when the last of
    them is gone, the buffer goes back to the idle list."""

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
    """An uninitialised, writable, C-contiguous array like ``np.empty(shape, dtype)``; one of
    ``POOLED_BYTES`` or more reuses a buffer a dropped result left behind where one fits."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < POOLED_BYTES or dtype.hasobject or dtype.fields is not None:
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
    """Frees the kept buffers; returns how many bytes they held."""
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
    _idle.append(raw)
    while sum(r.nbytes for r in list(_idle)) > KEEP_BYTES:
        try:
            _idle.pop(0)  # the oldest goes first
        except IndexError:
            break
