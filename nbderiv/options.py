"""Checks of the options every public function takes: one place, one wording.

Each check returns the cleaned value or raises :class:`~nbderiv.errors.OptionError` (a
``ValueError``) whose message names the option, what it got, and a ``Fix:``.

>>> from nbderiv.options import positive_int, byte_count
>>> positive_int(3, "order"), byte_count("1GB", "memory_budget")
(3, 1000000000)
"""

from __future__ import annotations

import re

import numpy as np

from .errors import OptionError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def is_int(value) -> bool:
    """A true integer (a Python or NumPy int, never a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value, name: str, minimum: int = 1, example=None) -> int:
    """``value`` as an int of at least ``minimum``, else a clear OptionError."""
    if not is_int(value) or value < minimum:
        example = example if example is not None else max(minimum, 2)
        least = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise OptionError(f"{name} must be {least}, got {value!r}. Fix: e.g. {name}={example}.")
    return int(value)


def flag(value, name: str) -> bool:
    """``value`` as a bool (True/False, or a NumPy bool), else a clear OptionError."""
    if not isinstance(value, (bool, np.bool_)):
        raise OptionError(f"{name} must be True or False, got {value!r}. Fix: {name}=True.")
    return bool(value)


def byte_count(value, name: str) -> int:
    """A positive number of bytes: an int, or a string such as ``"512MB"`` / ``"1GiB"``."""
    fix = f"Fix: e.g. {name}=2**30 or {name}='1GB'."
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise OptionError(f"{name} must be a number of bytes, got {value!r}. {fix}")
        value = float(match.group(1)) * _UNITS[unit]
        if value >= 1:
            return int(value)
    elif is_int(value) and value >= 1:
        return int(value)
    elif isinstance(value, (float, np.floating)) and np.isfinite(value) and value >= 1:
        return int(value)
    raise OptionError(f"{name} must be a positive number of bytes, got {value!r}. {fix}")
