"""One family of errors, each naming the problem and the fix.

Every error nbderiv raises on bad input is a subclass of :class:`NbderivError` and
also of ``ValueError`` or ``TypeError``, so ordinary ``except ValueError`` code works.

>>> from nbderiv.errors import InputShapeError
>>> issubclass(InputShapeError, ValueError)
True
"""

from __future__ import annotations


class NbderivError(Exception):
    """Base class of every error nbderiv raises on purpose."""


class ModelTypeError(NbderivError, TypeError):
    """The model is not something nbderiv can differentiate (or its framework is unclear)."""


class InputTypeError(NbderivError, TypeError):
    """The input is not numeric."""


class InputShapeError(NbderivError, ValueError):
    """The input's shape does not fit the model or nbderiv's (N, d_in) convention."""


class OutputError(NbderivError, ValueError):
    """The model's output cannot be differentiated per point (wrong batch size, dtype, type)."""


class OptionError(NbderivError, ValueError):
    """A keyword argument (order, wrt, framework, budget) has a bad value."""


class MemoryBudgetError(NbderivError, ValueError):
    """A requested array would exceed the memory budget."""


class BackendError(NbderivError, ValueError):
    """The model's framework is recognised but this configuration is not supported."""


class ModelCallError(NbderivError, ValueError):
    """The model itself raised while nbderiv was evaluating or differentiating it."""
