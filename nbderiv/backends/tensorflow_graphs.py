"""Traced computations, cached per model: each computation is traced once with
``tf.function`` (batch dimension free) and kept with the model (weakly keyed, dropped with
it or when its layers are edited); Python code that cannot be traced runs eagerly. A hot
shape runs XLA-compiled (see :class:`XlaTier`).

>>> import numpy as np, tensorflow as tf
>>> traced = Traced(lambda X: {(): tf.sin(X)}, 1, tf.float64)
>>> traced(tf.zeros((2, 1), tf.float64))[()].numpy().ravel().tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import weakref

import tensorflow as tf

from ..memo import StructureWatch
from .tensorflow_keras import structure_key
from .tensorflow_quiet import quiet_tf_logs
from .tensorflow_state import (
    before_writing,
    graph_has_seeded_random,
    graph_op_types,
    graph_writes,
)

# -- the per-model cache of traced functions --------------------------------------------
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG: dict = {}  # models that cannot be weakly referenced (a few, kept alive)


def _owner(model):
    return model.__self__ if inspect.ismethod(model) else model


def cache_for(model) -> dict:
    """Traces and facts for one model, dropped with the model (weakly keyed)."""
    owner = _owner(model)
    try:
        cache = _CACHE.get(owner)  # a lookup makes no new weak reference; setdefault would
        return cache if cache is not None else _CACHE.setdefault(owner, {})
    except TypeError:
        if len(_STRONG) > 16:
            _STRONG.clear()
        return _STRONG.setdefault(id(owner), (owner, {}))[1]


def forget_if_edited(model):
    """Drop the model's cached traces and facts if its layers changed since they were made."""
    cache = cache_for(model)
    key, objects = structure_key(_owner(model))
    if model is not _owner(model):  # a bound method: its function's reads too
        more = structure_key(model)
        key, objects = (key, more[0]), list(objects) + list(more[1])
    watch = cache.get("structure")
    if watch is not None and watch.same(key):
        return
    if watch is not None:
        cache.clear()
    cache["structure"] = StructureWatch(key, objects)


def remembered(model, fact, compute):
    """A fact about the model's structure (its float dtype, layer summary, Taylor plan),
    computed once and dropped with the traces when the model is edited."""
    cache = cache_for(model)
    key = cache_key(model, "fact", *fact)  # a bound method is not its object
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def model_ref(model):
    """A callable returning ``model``, holding it weakly where possible, so that cached
    traces (values of the weakly keyed cache) do not keep the model alive."""
    if inspect.ismethod(model):
        return _WeakBoundMethod(model)
    try:
        return weakref.ref(model)
    except TypeError:
        return lambda: model


class _WeakBoundMethod:
    """Like ``weakref.WeakMethod`` but without a callback: WeakMethod's callback can run
    after the WeakMethod itself was collected in the same garbage cycle (CPython 3.11),
    which prints an "Exception ignored" traceback into the user's notebook."""

    __slots__ = ("_self", "_func")

    def __init__(self, method):
        self._self = weakref.ref(method.__self__)
        func = method.__func__
        try:
            self._func = weakref.ref(func)
        except TypeError:  # a callable that takes no weak reference is held as it is
            self._func = lambda: func

    def __call__(self):
        obj, func = self._self(), self._func()
        return None if obj is None or func is None else types.MethodType(func, obj)


def cache_key(model, *key):
    return (id(model.__func__) if inspect.ismethod(model) else 0,) + key


class XlaTier:
    """XLA for hot shapes, as a small state machine per traced computation.

    A row count is *seen* on its first plain run; on its second run (at least ``MIN_ROWS``
    rows, on the CPU) the graph is compiled for that shape, and later runs of that shape use
    the compiled program, which fuses the elementwise work of the derivative passes (measured
    1.3-2.5x faster). Never for graphs that may write variables or draw seeded random numbers
    (they are kept exactly as traced), on a GPU (not measured), or with ``NBDERIV_XLA=0``. If
    XLA cannot compile the graph (an op without an XLA kernel) the tier turns itself off."""

    MIN_ROWS = 1024   # below, a run is dispatch-bound and compiling does not pay
    MAX_SHAPES = 8    # compiled shapes kept per computation

    def __init__(self, signature):
        self.signature = signature
        self.program = None      # the compiled concrete function; False once compiling failed
        self.compiled_rows = set()
        self.seen_rows = set()   # may be shared between sibling computations

    def run(self, concrete, X):
        """The compiled program's outputs, or None where the plain graph should run."""
        rows = X.shape[0]
        if self.program is False or not xla_enabled():
            return None
        if rows in self.compiled_rows:
            return self.program(X)
        if rows < self.MIN_ROWS or len(self.compiled_rows) >= self.MAX_SHAPES:
            return None
        if rows not in self.seen_rows:
            self.seen_rows.add(rows)
            return None
        try:
            if self.program is None:
                self.program = tf.function(lambda Z: concrete(Z), jit_compile=True,
                                           input_signature=self.signature
                                           ).get_concrete_function()
            with quiet_tf_logs():  # XLA's start-up notices
                out = self.program(X)
        except Exception:
            self.program = False
            return None
        self.compiled_rows.add(rows)
        return out


class Traced:
    """A computation traced once with ``tf.function`` (batch dimension free, so every block
    size reuses it), with an eager fallback for Python code that cannot be traced
    (``.numpy()`` or Python control flow on tensor values), and an :class:`XlaTier`."""

    def __init__(self, python_fn, width, dtype):
        self.python_fn = python_fn
        signature = [tf.TensorSpec((None, width), dtype)]
        # a partial has no __code__: TensorFlow then counts retracing per function, not per
        # source line (shared lambdas would trigger its "frequent retracing" warning)
        self.traced = tf.function(functools.partial(python_fn), reduce_retracing=True,
                                  autograph=False,
                                  input_signature=signature)
        self.concrete = None
        self.eager = False    # tracing failed: run the Python function as it is
        self.broken = False   # this strategy failed: try the next one
        self.writes = True    # may write variables (until the trace is seen to hold no such op)
        self.seeded_random = True  # may hold stateful random ops (until seen not to)
        self.facts = {}       # what the trace revealed (e.g. the number of kink operations)
        self.xla = XlaTier(signature)
        self.last_compiled = False  # whether the last run used the compiled program

    def trace(self) -> bool:
        """Trace without running; False if the Python code cannot be traced."""
        if not self.eager:
            try:
                self.traced.get_concrete_function()
            except Exception:
                self.eager = True
        return not self.eager

    def __call__(self, X):
        self.last_compiled = False
        if self.concrete is None and not self.eager:
            before_writing()
            try:
                with quiet_tf_logs():  # the first run optimizes the graph, with remarks
                    concrete = self.traced.get_concrete_function()
                    types = graph_op_types(concrete.graph)
                    self.writes = graph_writes(types)
                    self.seeded_random = graph_has_seeded_random(types)
                    self.concrete = concrete
                    return self._run(X)
            except Exception:
                self.concrete, self.eager = None, True
        if self.eager:
            before_writing()
            return self.python_fn(X)
        return self._run(X)

    def _run(self, X):
        if self.writes:
            before_writing()
        out = None
        if not (self.writes or self.seeded_random):
            out = self.xla.run(self.concrete, X)
            self.last_compiled = out is not None
        return out if out is not None else self.concrete(X)


def xla_enabled() -> bool:
    return on_cpu() and os.environ.get("NBDERIV_XLA", "1").strip().lower() not in (
        "0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def on_cpu() -> bool:
    """TensorFlow places computations on the CPU (no GPU visible to it)."""
    return not tf.config.list_logical_devices("GPU")
