"""The call record: everything the core knows about one ``(model, x)`` pair.

The api opens one :class:`Call` per public call; the probe, the chunk loop, the findings,
the finite-difference check and the backends all read it (and only the core writes it).

>>> import numpy as np

from .memo import Facts, recall
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

from .memo import Facts, recall


@dataclass
class Verdict:
    """What the probe found: outputs per point, randomness, coupling between points."""

    d_out: int
    stochastic: bool = False
    coupled: bool = False
    out_shape: tuple = None  # each point's output shape O (prod(O) == d_out)
    structural: bool = False  # settled by the model's structure (a plain stack of layers)
    # outputs differ from pass to pass only because forward updates the model's own state
    self_updating: bool = False
    # coupled only through the number of points: leaving one out changed the others' outputs,
    # moving some did not (a model that uses x.shape[0])
    size_only: bool = False

    def __post_init__(self):
        if self.out_shape is None:
            self.out_shape = (self.d_out,)


@dataclass(frozen=True)
class Extra:
    """Per-point data the model gets but that is never differentiated: a keyword argument
    (``name``) or, with ``name == ""``, the target output of each point. Its values travel as
    the last columns of the feature matrix, so that every block and probe slices them with
    the points, and are turned back into ``shape`` and ``dtype`` inside the model call."""

    name: str
    shape: tuple
    dtype: str


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
    extras: tuple = ()        # Extra specs: the last len(extras) arrays of args
    constants: dict = field(default_factory=dict)  # keyword arguments passed as they are
    shared_names: tuple = ()  # those of them marked nbderiv.shared
    verdict: Verdict | None = None
    findings: list = field(default_factory=list)
    non_finite_x: list | None = None  # rows of x with a NaN or inf, once looked for
    known: Facts | None = None  # see ``facts``
    state: tuple = (None, ())  # the model's state key when the facts were looked up
    kink_rows: list | None = None  # points at a kink, once looked for (or known: memo)
    # a model whose forward pass couples points where autodiff sees no coupling: (the points
    # to compare autodiff with the forward pass at besides the first ones, the coupling
    # finding's numbers); see api._differentiate and result_checks
    hidden_coupling: tuple | None = None
    block_rows: int | None = None  # points per backend call (chunk_size, memory budget)

    @property
    def facts(self) -> Facts:
        """What earlier calls on this very model state, with points of this shape, established
        (:mod:`nbderiv.memo`), looked up on first use: a call that needs none of it (a plain
        stack of layers, settled by its structure) never reads the model's state key."""
        if self.known is None:
            self.known = recall(self)
        return self.known

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
    def n_inputs(self) -> int:
        """Arguments that are differentiated (the first ones of args; extras follow)."""
        return len(self.args) - len(self.extras)

    @property
    def input_width(self) -> int:
        """Features that can be differentiated (D without the extras)."""
        return sum(self.widths[:self.n_inputs])

    def input_features(self) -> np.ndarray:
        """The differentiated arguments side by side, (N, D without the extras)."""
        args = self.args[:self.n_inputs]
        return args[0] if len(args) == 1 else np.concatenate(args, axis=1)

    @property
    def point_shapes(self) -> list:
        """Each point's shape per argument, S_i (the model is called on (n, *S_i) arrays)."""
        shapes = getattr(self.inputs, "point_shapes", None)
        shapes = list(shapes) if shapes else [(w,) for w in self.widths[:self.n_inputs]]
        return shapes + [e.shape for e in self.extras]

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
        if "model" in changes or "dtype" in changes:  # another model: nothing is known yet
            changes.setdefault("known", Facts())
        return dataclasses.replace(self, args=list(args), findings=[], non_finite_x=None,
                                   kink_rows=None, **changes)
