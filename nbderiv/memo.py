"""What earlier calls established about a model, kept while the model stays exactly as it was.

A call probes the model with a few forward passes (outputs per point, randomness, coupling),
compares autodiff with central differences of the forward pass at a few points, and looks for
points at a kink (ReLU, clamp, abs, ...). On the same model in the same state the answers are
the same, so a later call reuses them (:class:`Facts`) instead of running those forward passes
again: the probe's verdict for points of the same shape, the layer summary, the absence of
calls to piecewise functions, and for the very same points (new data is looked at again: saturation, broken graphs
and kinks depend on where you look) the comparison and the points at a kink. Repeated calls
(an explorer redrawn, a benchmark, a loop) then cost little more than the derivatives
themselves.

"The same state" is what the backend's ``state_key`` says: for a torch module, its
submodules (also those kept in plain lists and dicts), their training flags and settings
(objects of your own such as a config, an ``argparse.Namespace`` or a slots dataclass by
value, a few levels down), forward and backward hooks, the methods and class attributes of
its classes of your own (a ``forward`` or a flag set on the class counts) and the
module-level variables their code reads, also through a helper function it calls (a flag
``CENTER = True``), and every parameter and buffer by identity, version and a fingerprint
of its values (an optimizer step, fused or not, ``load_state_dict`` or an edit through
``.data`` changes it); for a Keras model its layers, activations, settings and variable
values. Not seen: a setting inside a list or dict of more than 64 items, or four levels
down; what a function reaches through its closure (a hook's, a helper's) or two helper calls
away; a private attribute of a custom Keras layer. Any model the backend gives no key for (a
lambda or other wrapper) is probed every time, and :func:`forget` drops what was
remembered. The facts are held per model object, weakly: they
go with the model (with a copy of the last points seen, up to :data:`KINKS_BYTES`).

>>> from nbderiv.memo import StructureWatch
>>> class Thing: ...
>>> a = Thing()
>>> watch = StructureWatch(("key", id(a)), [a])
>>> watch.same(("key", id(a)))
True
>>> del a
>>> watch.same(("key", id(Thing())))  # the object is gone: nothing counts as the same
False
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)  # compared by identity (kinks holds an array)
class Facts:
    """What calls on one model, in one state, with points of one shape, have established."""

    verdict: object = None   # the probe's Verdict, from forward passes (None: not yet probed)
    # {(wrt, points, their x): (fd_max, noise)} where autodiff matched the forward pass's
    # central differences at those points (the differences' largest slopes and their rounding
    # level, see confirm.graph_consistency): the same points again need no new look
    graph_agrees: dict = field(default_factory=dict)
    kink_free: bool = False  # a forward pass called no piecewise-linear function
    # forward mode's derivatives agreed with reverse mode's at a few points (True), or did not
    # (False: an operation with a wrong forward-mode rule, so reverse mode is used)
    forward_agrees: bool | None = None
    # (a copy of the points, the rows among them at a kink (ReLU, clamp, abs, ...)): the very same points
    # again need no new look (points up to KINKS_BYTES; one copy per model, see remember)
    kinks: tuple = None
    # answers read from the model's structure (the layer summary, a backend's own): see kept()
    structure: dict = field(default_factory=dict)


def _bits(a: np.ndarray) -> np.ndarray:
    """The array's bits as unsigned integers (NaN equals the same NaN, -0.0 differs from 0.0)."""
    return a.reshape(-1).view(f"u{a.dtype.itemsize}")


def _kinks_apply(call) -> bool:
    """Whether the kink memo is used for this call: facts looked up, a model whose verdict came
    from the probe or the facts (a plain stack settled by its structure reads no facts before
    its blocks run), one that may call a piecewise function, points small enough to keep."""
    known = call.known
    return known is not None and call.verdict is not None and not call.verdict.structural \
        and not known.kink_free and sum(a.nbytes for a in call.args) <= KINKS_BYTES


def recalled_kinks(call) -> list | None:
    """The rows at a kink that an earlier call found at exactly these points (every column:
    targets and per-point keyword arguments included) on this model state, or None."""
    if not _kinks_apply(call) or call.known.kinks is None:
        return None
    seen, rows = call.known.kinks
    features = call.features()
    same = seen.shape == features.shape and seen.dtype == features.dtype \
        and np.array_equal(_bits(seen), _bits(features))
    return rows if same else None


KINKS_BYTES = 1 << 22  # points larger than this (4 MB) are looked at for kinks on every call


class StructureWatch:
    """A stored key and the objects it names, held weakly where they can be (others, such as
    None or numbers, are kept as they are): while all of them live, equal keys mean the very
    same objects; once one of them is freed, :meth:`same` is False for any key (a freed
    object's address may be reused by a new one)."""

    __slots__ = ("key", "held", "freed")

    def __init__(self, key, objects):
        self.key, self.held, self.freed = key, [], [False]
        freed = self.freed

        def on_free(_ref, freed=freed):  # no reference back to the watch: no cycle
            freed[0] = True

        for obj in objects:
            try:
                self.held.append(weakref.ref(obj, on_free))
            except TypeError:  # None, numbers, builtins: kept as they are
                self.held.append(obj)

    def same(self, key) -> bool:
        return not self.freed[0] and key == self.key


# model -> (StructureWatch of its state, {call shape key: Facts})
_REMEMBERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call_key(call) -> tuple:
    """What of the call, besides the model, the facts depend on: each point's shape, the
    dtype, the extras, whether the probe could see several points (one point cannot show
    coupling), the device."""
    key = call.__dict__.get("_memo_key")
    if key is None:
        key = call.__dict__["_memo_key"] = (
            tuple(map(tuple, call.point_shapes)), call.dtype.str, call.n_inputs, call.extras,
            min(call.n, 2), str(call.device))
    return key


def _state(call):
    """(key, objects) of the model's state, or (None, ()) when there is nothing to remember
    by: the backend cannot say, or keyword arguments are passed as they are (objects the
    facts may depend on)."""
    if call.constants:
        return None, ()
    return call.backend.state_key(call.model)


def recall(call) -> Facts:
    """The facts earlier calls established for this model state and call shape, or new ones
    (which the call fills in and :func:`remember` keeps). Reads the model's state key once
    (``call.facts`` calls this on first use, before the forward passes that need it)."""
    call.state = _state(call)
    key = call.state[0]
    if key is None:
        return Facts()
    try:
        entry = _REMEMBERED.get(call.model)
    except TypeError:  # not weakly referenceable or not hashable
        return Facts()
    if entry is not None and entry[0].same(key):
        return entry[1].setdefault(_call_key(call), Facts())
    return Facts()


def remember(call) -> None:
    """Keep ``call.facts`` under the state key read before the call (a model that changed
    itself during the call, beyond what nbderiv puts back, reads as another state next time:
    it is probed again)."""
    if call.known is None:  # nothing was looked up, so nothing was learnt
        return
    key, objects = call.state
    if key is None:
        return
    try:
        entry, shape = _REMEMBERED.get(call.model), _call_key(call)
        recalled = entry is not None and entry[1].get(shape) is call.facts
        if entry is None or not (recalled or entry[0].same(key)):
            entry = _REMEMBERED[call.model] = (StructureWatch(key, objects), {})
        entry[1][shape] = call.facts
        _keep_kinks(call, entry[1])
    except TypeError:  # not weakly referenceable or not hashable
        pass


def _keep_kinks(call, facts_of_model: dict) -> None:
    """The points and the rows at a kink among them, kept for the next call on the same points;
    one copy of points per model (the other point shapes' copies are dropped)."""
    kinks = call.known.kinks
    if call.kink_rows is None or not _kinks_apply(call) \
            or (kinks is not None and call.kink_rows is kinks[1]):  # recalled: kept already
        return
    features = call.features()
    call.known.kinks = (features.copy() if features is call.args[0] else features,
                        call.kink_rows)
    for other in facts_of_model.values():
        if other is not call.known:
            other.kinks = None


def kept(call, name, compute):
    """``compute()``, kept under ``name`` with the call's facts when they were looked up
    already (never looked up just for this): for answers read from the model's structure
    alone (the layer summary, its layer widths, whether it convolves), which the backend's
    state key covers."""
    known = call.known
    if known is None:
        return compute()
    value = known.structure.get(name)
    if value is None:
        value = known.structure[name] = compute()
    return value


def forget(model=None) -> None:
    """Drop what was remembered about ``model`` (every model when None); the next call
    probes again."""
    if model is None:
        _REMEMBERED.clear()
    else:
        _REMEMBERED.pop(model, None)
