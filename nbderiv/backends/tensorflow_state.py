"""A TensorFlow model's variables: the dtype they make nbderiv compute in, and keeping them
as they were: snapshots taken lazily (only before something that may write them runs) and
restored when nbderiv's call ends, and the inspection of traced graphs that tells whether
they may write variables or draw seeded random numbers.

>>> import keras
>>> net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)])
>>> with preserved(net):
...     before_writing()
...     _ = net.weights[0].assign(net.weights[0] * 0)
>>> bool(abs(net.weights[0].numpy()).sum() > 0)
True
"""

from __future__ import annotations

import contextlib
import re
import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry  # op types' flags

from ..errors import ModelTypeError
from .tensorflow_keras import graph_kind, model_variables


# -- the dtype to compute in ---------------------------------------------------------------
def variables_dtype(model):
    """The dtype of the model's first float variable (float16 included), or None; bfloat16
    variables are refused clearly (NumPy has no bfloat16). A mixed_bfloat16 policy keeps
    float32 variables: such a model is fed float32, and computes in bfloat16 inside."""
    for v in model_variables(model):
        dt = tf.as_dtype(v.dtype)
        if dt == tf.bfloat16:
            raise ModelTypeError(
                "the model's variables are bfloat16, which nbderiv cannot compute in (its "
                "arrays are NumPy's, which has no bfloat16); bfloat16 keeps about 3 significant "
                "digits, too few for derivatives in any case. Fix: build the model with "
                "dtype='float32' (or keras.config.set_dtype_policy('float32')) and copy the "
                "weights over, or use float64 for higher orders.")
        if dt.is_floating:
            return np.dtype(dt.as_numpy_dtype)
    return None


def declared_input_dtype(model):
    """The float dtype all Keras ``Input``s of a Sequential / functional model declare, or
    None (no declared inputs, or several dtypes); for a ``tf.function`` with an
    ``input_signature``, the dtype its TensorSpecs declare."""
    signature = getattr(model, "input_signature", None) \
        if isinstance(model, tf.types.experimental.GenericFunction) else None
    if signature:
        dtypes = {tf.as_dtype(spec.dtype) for spec in tf.nest.flatten(signature)
                  if hasattr(spec, "dtype")}
    elif graph_kind(model) is None:
        return None
    else:
        try:
            dtypes = {tf.as_dtype(t.dtype) for t in model.inputs}
        except Exception:  # a Sequential without an Input has no inputs yet
            return None
    if len(dtypes) != 1:
        return None
    dt = dtypes.pop()
    return np.dtype(dt.as_numpy_dtype) if dt.is_floating and dt != tf.bfloat16 else None


# -- keeping the user's variables as they were -----------------------------------------
_OPEN_SNAPSHOTS: list = []  # one per preserved() block now open, innermost last

# Stateful graph operations that are known not to write any variable; every other stateful
# operation (assignments, scatter and optimizer updates, tf.random.Generator and seed-generator
# state, counters) counts as possibly writing. Function bodies (calls, control flow, forward
# accumulators) are looked into; Python code run from the graph (py_function, numpy_function,
# even when declared stateless) and calls whose body is elsewhere count as possibly writing.
# Random operations with their own state: two of them given the same seed draw the same
# numbers, while one of them run twice does not (what the randomness probe must look at).
_SEEDED_RANDOM = frozenset({
    "RandomStandardNormal", "RandomUniform", "RandomUniformInt", "TruncatedNormal",
    "RandomGamma", "RandomPoissonV2", "RandomShuffle", "Multinomial",
    "ParameterizedTruncatedNormal"})
_READ_ONLY_STATEFUL = _SEEDED_RANDOM | {
    "ReadVariableOp", "VarHandleOp", "VarIsInitializedOp", "Placeholder", "NoOp",
    # calls and control flow: stateful only when their bodies are, and those are looked into
    "StatefulPartitionedCall", "PartitionedCall", "While", "If", "Case"}
_OPAQUE = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "RemoteCall"})
# writes through reference variables, whose op definitions are not flagged stateful
_WRITES_BY_NAME = re.compile(r"^(Resource)?(Sparse)?(Assign|Scatter|Apply|StridedSliceAssign)")


def graph_op_types(graph) -> set:
    """The operation types in a traced graph and in every function body it calls."""
    graph_def = graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


def _op_writes(op_type: str) -> bool:
    if op_type in _OPAQUE or _WRITES_BY_NAME.match(op_type):
        return True
    if op_type in _READ_ONLY_STATEFUL:
        return False
    op_def = op_def_registry.get(op_type)
    return op_def is None or op_def.is_stateful  # an unknown op may do anything


class Snapshot:
    """The model's variables, copied the first time something that may write them is about
    to run: a traced computation seen to hold no writing operation never pays for the copy."""

    def __init__(self, model):
        self.model, self.saved = model, None

    def take(self):
        if self.saved is None:
            self.saved = [(v, np.array(v.numpy(), copy=True)) for v in model_variables(self.model)]

    def restore(self):
        for v, value in self.saved or ():
            if not np.array_equal(v.numpy(), value, equal_nan=True):
                v.assign(value)


def before_writing():
    """Called before running anything that may write variables (eager model code, a trace
    that writes or has not been inspected yet): every open snapshot is taken now."""
    for snapshot in _OPEN_SNAPSHOTS:
        snapshot.take()


def graph_writes(types: set) -> bool:
    return any(_op_writes(t) for t in types)


def graph_has_seeded_random(types: set) -> bool:
    return bool(types & (_SEEDED_RANDOM | _OPAQUE))


@contextlib.contextmanager
def preserved(model):
    """The model's variables, and the global random streams unseeded draws advance, are put
    back as they were when the block ends."""
    snapshot = Snapshot(model)
    streams = _GlobalStreams()
    _OPEN_SNAPSHOTS.append(snapshot)
    try:
        yield
    finally:
        _OPEN_SNAPSHOTS.remove(snapshot)
        snapshot.restore()
        streams.restore()


class _GlobalStreams:
    """The streams of random numbers every unseeded draw advances: Keras' global
    SeedGenerator (``keras.random.normal(shape)`` without ``seed=``) and ``tf.random``'s
    global Generator, saved where they exist (Keras is never imported here) and put back
    (one created during the block is dropped again, as if never drawn from)."""

    _KERAS = "keras.src.backend.common.global_state"
    _KERAS_NAME = "global_seed_generator"

    def __init__(self):
        from tensorflow.python.ops import stateful_random_ops
        self.tf_module = stateful_random_ops
        self.tf_generator = getattr(stateful_random_ops, "global_generator", None)
        self.tf_state = _state_of(self.tf_generator)
        keras_state = sys.modules.get(self._KERAS)
        self.keras_generator = None if keras_state is None else \
            keras_state.get_global_attribute(self._KERAS_NAME)
        self.keras_state = _state_of(self.keras_generator)

    def restore(self):
        if getattr(self.tf_module, "global_generator", None) is not self.tf_generator:
            self.tf_module.global_generator = self.tf_generator
        _put_state(self.tf_generator, self.tf_state)
        keras_state = sys.modules.get(self._KERAS)
        if keras_state is not None and \
                keras_state.get_global_attribute(self._KERAS_NAME) is not self.keras_generator:
            keras_state.set_global_attribute(self._KERAS_NAME, self.keras_generator)
        _put_state(self.keras_generator, self.keras_state)


def _state_of(generator):
    return None if generator is None else np.array(generator.state.numpy(), copy=True)


def _put_state(generator, value):
    if generator is not None and not np.array_equal(generator.state.numpy(), value):
        generator.state.assign(value)
