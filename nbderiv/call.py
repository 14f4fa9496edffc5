"""The call record: everything the core knows about one ``(model, x)`` pair.

The api opens one :class:`Call` per public call; the probe, the chunk loop, the findings,
the finite-difference check and the backends all read it (and only the core writes it).

>>> import numpy as np
>>> from nbderiv.call import Call
>>> from nbderiv.inputs import prepare_inputs
>>> inputs = prepare_inputs(np.zeros((5, 2)), to_numpy=np.asarray)
>>> call = Call(model=abs, backend=None, inputs=inputs, dtype=np.dtype("float64"),
...             args=inputs.cast("float64"), names=("x[0]", "x[1]"))
>>> call.n, call.widths, [a.shape for a in call.rows(1, 3)]
(5, [2], [(2, 2)])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Verdict:
    """What the probe found: outputs per point, randomness, coupling between points."""

    d_out: int
    stochastic: bool = False
    coupled: bool = False


@dataclass
class Call:
    """One (model, x) pair, prepared.

    ``args``: the model's arguments as C-contiguous numpy arrays of shape (N, d_i) in
    ``dtype`` (copies, never the user's data); ``names``: one name per input feature;
    ``device``: where the backend places tensors (None when it does not say);
    ``verdict``: set by the probe; ``findings``: gathered along the way."""

    model: object
    backend: object
    inputs: object            # nbderiv.inputs.PreparedInput: what the user passed
    dtype: np.dtype
    args: list
    names: tuple
    device: object = None
    verdict: Verdict | None = None
    findings: list = field(default_factory=list)
    non_finite_x: list | None = None  # rows of x with a NaN or inf, once looked for

    @property
    def n(self) -> int:
        """Number of points."""
        return self.args[0].shape[0]

    @property
    def widths(self) -> list:
        """Features per argument."""
        return [a.shape[1] for a in self.args]

    @property
    def width(self) -> int:
        """Features in all (D)."""
        return sum(self.widths)

    @property
    def d_out(self) -> int | None:
        """Outputs per point, once the probe has run."""
        return None if self.verdict is None else self.verdict.d_out

    def rows(self, start: int, stop: int) -> list:
        """The arguments restricted to points start..stop-1 (views)."""
        return [a[start:stop] for a in self.args]

    def features(self) -> np.ndarray:
        """All arguments side by side, (N, D)."""
        return self.args[0] if len(self.args) == 1 else np.concatenate(self.args, axis=1)

    def with_args(self, args, **changes) -> Call:
        """A copy of this call on other points (same model unless ``changes`` say)."""
        return dataclasses.replace(self, args=list(args), findings=[], non_finite_x=None,
                                   **changes)
