"""TensorFlow / Keras 3 backend: per-point derivatives by forward Taylor mode (Keras
Sequential stacks of Dense and elementwise layers, one input direction), nested
``tf.GradientTape`` (reverse mode, one gradient per output and distinct partial) or nested
``tf.autodiff.ForwardAccumulator`` (forward mode, many outputs); see
:func:`choose_methods`. Each is traced once per model with ``tf.function`` and cached
(weakly, with the model), so repeated calls reuse the trace. On the CPU, a trace run a second
time on the same number of rows (>= 1 024) is compiled with XLA for that shape (see
``_Traced``); ``NBDERIV_XLA=0`` turns that off.

Keras models are called with ``training=False``; their variables are put back after
every call, nothing is created on them, ``trainable`` is never touched. TensorFlow's C++
log lines (start-up notices, graph-optimizer remarks) are filtered out of nbderiv's calls
without changing any logging setting.

>>> import numpy as np, tensorflow as tf
>>> from nbderiv.backends.tensorflow import BACKEND
>>> ctx = BACKEND.context(tf.sin, None, np.float64)
>>> y, (d1,), method = BACKEND.derivatives(tf.sin, [np.zeros((2, 1))], 1, (0,), ctx)
>>> d1[:, 0, 0].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import re
import sys
import tempfile
import types
import weakref

import numpy as np

from ..errors import OptionError
from ..findings import PROBE_POINTS
from ..inputs import check_output
from ..result_memory import owned, result_array
from .base import (
    Backend,
    block_starts,
    equal_block_size,
    fill_symmetric,
    sorted_multi_indices,
)
from .tensorflow_code import tensorflow_code

# TensorFlow's C++ log lines ("I0000 00:00:... port.cc:153] oneDNN custom operations ...",
# "W0000 ... util.cc:163] Not handling type DT_DOUBLE") and absl's preamble.
_TF_LOG_LINE = re.compile(r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] |"
                          r"WARNING: All log messages before absl::InitializeLog|"
                          r"To enable the following instructions: )")


@contextlib.contextmanager
def _quiet_tf_logs():
    """Drop TensorFlow's C++ log lines written to file descriptor 2 meanwhile (start-up
    notices, graph-optimizer remarks); any other output is passed on afterwards. No logging
    setting or environment variable is changed."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (some embedded interpreters): nothing to filter
        yield
        return
    sink = tempfile.TemporaryFile()
    python_err = io.StringIO()
    try:
        os.dup2(sink.fileno(), 2)
        with contextlib.redirect_stderr(python_err):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace")
        sink.close()
        kept = "".join(line for line in text.splitlines(keepends=True)
                       if not _TF_LOG_LINE.match(line))
        if kept:
            os.write(2, kept.encode())
        if python_err.getvalue():
            sys.stderr.write(python_err.getvalue())


if "tensorflow" in sys.modules:
    import tensorflow as tf
else:  # pragma: no cover - depends on what the user imported first
    with _quiet_tf_logs():
        import tensorflow as tf

from tensorflow.python.framework import op_def_registry  # noqa: E402 (op types' flags)

# after the quiet import: these modules import TensorFlow themselves
from .tensorflow_keras import (  # noqa: E402
    StructureWatch,
    argument_names,
    float64_copy,
    invoke,
    is_keras_layer,
    layer_summary,
    model_variables,
    structure_key,
)
from .tensorflow_taylor import taylor_plan, taylor_values  # noqa: E402

_ZERO = tf.UnconnectedGradients.ZERO
_KINKS = {"Relu": (0.0,), "LeakyRelu": (0.0,), "Relu6": (0.0, 6.0)}
_FORWARD = "forward-jvp"
_REVERSE = "reverse-ones"
_TAYLOR = "taylor"
_PROBE = (-1,)  # the probe outputs among the values (not a multi-index: those are >= 0)


@contextlib.contextmanager
def _exact_moments():
    """Keras' normalization layers get their mean and variance from ``tf.nn.moments``, which
    stops the gradient through the mean inside the variance: exact for first derivatives
    (d var / d mean = 0), wrong for second and higher ones. While nbderiv traces and runs its
    computations, Keras uses the plain formula instead; the original is put back after."""
    module = sys.modules.get("keras.src.backend.tensorflow.nn")
    original = getattr(module, "_compute_moments", None)
    if original is None:
        yield
        return
    module._compute_moments = _plain_moments
    try:
        yield
    finally:
        module._compute_moments = original


def _plain_moments(x, axes, keepdims):
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


# -- the computations (run eagerly or inside tf.function) ------------------------------
def _split(X, widths):
    return tf.split(X, widths, axis=1) if len(widths) > 1 else [X]


def _reverse_values(fn, X, order, wrt, d_out):
    """Nested tapes, per-point by the ones trick: the gradient of sum_n T[n, j] with respect to
    X is every point's own gradient, because point n's output depends only on X[n]."""
    m = len(wrt)
    n = tf.shape(X)[0]
    seeds = [None] if d_out == 1 else [
        tf.one_hot(tf.fill([n], j), d_out, dtype=X.dtype) for j in range(d_out)]

    def level(k):
        if k == 0:
            return {(): fn(X)}
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(X)
            lower = level(k - 1)
        out = dict(lower)
        for idx, T in lower.items():
            if len(idx) != k - 1:
                continue
            cols = [tape.gradient(T, X, output_gradients=s, unconnected_gradients=_ZERO)
                    for s in seeds]
            G = tf.stack(cols, axis=1)  # (n, d_out, D)
            for p in range(idx[-1] if idx else 0, m):
                out[idx + (p,)] = G[:, :, wrt[p]]
        return out

    return level(order)


def _forward_values(fn, X, order, wrt):
    """Nested forward accumulators: a chain of ``order`` directional derivatives along
    inputs i1 <= ... <= iK also yields every lower-order partial of its suffixes."""
    n, width = tf.shape(X)[0], X.shape[1]
    basis = [tf.one_hot(tf.fill([n], i), width, dtype=X.dtype) for i in wrt]

    def nest(chain):
        if not chain:
            return [fn(X)]
        with tf.autodiff.ForwardAccumulator(X, basis[chain[0]]) as acc:
            inner = nest(chain[1:])
        return inner + [acc.jvp(inner[-1], unconnected_gradients=_ZERO)]

    values = {}
    for chain in sorted_multi_indices(len(wrt), order):
        suffixes = [chain[order - j:] for j in range(order + 1)]
        if all(s in values for s in suffixes):
            continue
        for s, v in zip(suffixes, nest(chain)):
            values.setdefault(s, v)
    return values


def _kink_hits(fn, X):
    """Inside a trace: (True for points where a Relu / LeakyRelu / Relu6 input is at a kink,
    the number of such operations applied to the points)."""
    graph = tf.compat.v1.get_default_graph()
    seen = {id(op) for op in graph.get_operations()}
    fn(X)
    hits, count = tf.zeros(tf.shape(X)[:1], dtype=tf.bool), 0
    for op in graph.get_operations():
        if id(op) in seen or op.type not in _KINKS:
            continue
        z = op.inputs[0]
        if z.shape.rank is None or z.shape.rank < 1 or z.shape[0] is not None:
            continue  # not batch-major (e.g. a constraint on weights)
        flat = tf.reshape(z, (tf.shape(z)[0], -1))
        count += 1
        for k in _KINKS[op.type]:
            hits = tf.logical_or(hits, tf.reduce_any(tf.equal(flat, k), axis=1))
    return hits, count


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


def _graph_op_types(graph) -> set:
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


class _Snapshot:
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


def _before_writing():
    """Called before running anything that may write variables (eager model code, a trace
    that writes or has not been inspected yet): every open snapshot is taken now."""
    for snapshot in _OPEN_SNAPSHOTS:
        snapshot.take()


def _graph_writes(types: set) -> bool:
    return any(_op_writes(t) for t in types)


def _graph_has_seeded_random(types: set) -> bool:
    return bool(types & (_SEEDED_RANDOM | _OPAQUE))


# -- the per-model cache of traced functions --------------------------------------------
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG: dict = {}  # models that cannot be weakly referenced (a few, kept alive)


def _owner(model):
    return model.__self__ if inspect.ismethod(model) else model


def _cache_for(model) -> dict:
    """Traces and facts for one model, dropped with the model (weakly keyed)."""
    owner = _owner(model)
    try:
        cache = _CACHE.get(owner)  # a lookup makes no new weak reference; setdefault would
        return cache if cache is not None else _CACHE.setdefault(owner, {})
    except TypeError:
        if len(_STRONG) > 16:
            _STRONG.clear()
        return _STRONG.setdefault(id(owner), (owner, {}))[1]


def _forget_if_edited(model):
    """Drop the model's cached traces and facts if its layers changed since they were made."""
    cache = _cache_for(model)
    key, objects = structure_key(_owner(model))
    watch = cache.get("structure")
    if watch is not None and watch.same(key):
        return
    if watch is not None:
        cache.clear()
    cache["structure"] = StructureWatch(key, objects)


def _remembered(model, fact, compute):
    """A fact about the model's structure (its float dtype, layer summary, Taylor plan),
    computed once and dropped with the traces when the model is edited."""
    cache = _cache_for(model)
    key = _cache_key(model, "fact", *fact)  # a bound method is not its object
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _model_ref(model):
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


def _cache_key(model, *key):
    return (id(model.__func__) if inspect.ismethod(model) else 0,) + key


class _Traced:
    """A computation traced once with ``tf.function`` (batch dimension free, so every N and
    the last, shorter chunk reuse it), with an eager fallback for Python code that cannot be
    traced (``.numpy()`` or Python control flow on tensor values).

    Hot shapes are compiled with XLA (see :meth:`_compiled`): the second run of a read-only,
    randomness-free trace on the same number of rows (at least ``XLA_MIN_ROWS``, on the CPU)
    compiles it for that shape, and later runs of that shape use the compiled program, which
    fuses the elementwise work of the derivative passes (measured 1.3-2.5x faster)."""

    XLA_MIN_ROWS = 1024   # below, a run is dispatch-bound and compiling does not pay
    XLA_MAX_SHAPES = 8    # compiled programs kept per computation (each row count is one)

    def __init__(self, python_fn, width, dtype):
        self.python_fn = python_fn
        self.signature = [tf.TensorSpec((None, width), dtype)]
        # a partial has no __code__: TensorFlow then counts retracing per function, not per
        # source line (shared lambdas would trigger its "frequent retracing" warning)
        self.traced = tf.function(functools.partial(python_fn), reduce_retracing=True,
                                  input_signature=self.signature)
        self.eager = False    # tracing failed: run the Python function as it is
        self.broken = False   # this strategy failed: try the next one
        self.warm = False
        self.writes = True    # may write variables (until the trace is seen to hold no such op)
        self.seeded_random = True  # may hold stateful random ops (until seen not to)
        self.facts = {}       # what the trace revealed (e.g. the number of kink operations)
        self.seen_rows = set()     # row counts run once without XLA
        self.xla = None            # the XLA-compiled graph; False once compiling failed
        self.xla_rows = set()      # row counts it has been compiled for
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
        if self.warm:
            if self.writes:
                _before_writing()
            out = self._compiled(X)
            # else the traced graph itself, without tf.function's dispatch
            return out if out is not None else self.concrete(X)
        _before_writing()
        if not self.eager:
            try:
                with _quiet_tf_logs():  # the first run optimizes the graph, with remarks
                    self.concrete = self.traced.get_concrete_function()
                    types = _graph_op_types(self.concrete.graph)
                    self.writes = _graph_writes(types)
                    self.seeded_random = _graph_has_seeded_random(types)
                    # a row count that a sibling (the same strategy with or without the fused
                    # probe, sharing seen_rows) has run before is compiled at once
                    out = self._compiled(X)
                    if out is None:
                        out = self.concrete(X)
                self.warm = True
                return out
            except Exception:
                self.eager = True
        return self.python_fn(X)

    def _compiled(self, X):
        """The outputs of the XLA-compiled graph, or None where it is not used: traces that
        may write variables or draw random numbers (kept exactly as traced), fewer than
        XLA_MIN_ROWS rows, a GPU (not measured), ``NBDERIV_XLA=0``, or a row count seen for
        the first time (a one-off shape never pays for compiling). If XLA cannot compile the
        graph (an op without an XLA kernel), the plain graph is used from then on."""
        rows = X.shape[0]
        if self.xla is False or self.writes or self.seeded_random or not _xla_enabled():
            return None
        if rows in self.xla_rows:
            self.last_compiled = True
            return self.xla(X)
        if rows < self.XLA_MIN_ROWS or len(self.xla_rows) >= self.XLA_MAX_SHAPES:
            return None
        if rows not in self.seen_rows:
            self.seen_rows.add(rows)
            return None
        try:
            if self.xla is None:
                concrete = self.concrete
                self.xla = tf.function(lambda Z: concrete(Z), jit_compile=True,
                                       input_signature=self.signature).get_concrete_function()
            with _quiet_tf_logs():  # XLA's start-up notices
                out = self.xla(X)
        except Exception:
            self.xla = False
            return None
        self.xla_rows.add(rows)
        self.last_compiled = True
        return out


def _xla_enabled() -> bool:
    return _on_cpu() and os.environ.get("NBDERIV_XLA", "1").strip().lower() not in (
        "0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def _on_cpu() -> bool:
    """TensorFlow places computations on the CPU (no GPU visible to it)."""
    return not tf.config.list_logical_devices("GPU")


def _variables_dtype(model):
    """The dtype of the model's first float variable (bfloat16 computed as float32), or None."""
    for v in model_variables(model):
        dt = tf.as_dtype(v.dtype)
        if dt.is_floating:
            return np.dtype(dt.as_numpy_dtype) if dt != tf.bfloat16 else np.dtype(np.float32)
    return None


def _caller(model, widths, d_out=None):
    """fn(X (n, D)) -> (n, d_out) in X's dtype: splits the features into the model's
    arguments. Without ``d_out`` the output is validated (eager calls); with it, it is only
    reshaped (inside traces)."""
    ref = _model_ref(model)

    def fn(X):
        out = invoke(ref(), _split(X, widths))
        if d_out is None:
            out = _as_output(out, X.shape[0])
        else:
            out = tf.reshape(tf.convert_to_tensor(out), (-1, d_out))
        return tf.cast(out, X.dtype) if out.dtype.is_floating and out.dtype != X.dtype else out
    return fn


def _as_output(out, n):
    """Validate what the model returned and reshape it to (n, d_out)."""
    if not (isinstance(out, (tf.Tensor, tf.Variable, np.ndarray)) or tf.is_tensor(out)):
        check_output(None, False, "", n, type(out).__name__)
    out = tf.convert_to_tensor(out)
    shape = check_output(tuple(out.shape), out.dtype.is_floating or out.dtype.is_complex,
                         out.dtype.name, n)
    return tf.reshape(out, shape)


def _builder(method, fn, plan, order, wrt, d_out, probe=False):
    if method == _TAYLOR:
        values = lambda X: taylor_values(plan, X, order, wrt[0])  # noqa: E731
    elif method == _FORWARD:
        values = lambda X: _forward_values(fn, X, order, wrt)  # noqa: E731
    else:
        values = lambda X: _reverse_values(fn, X, order, wrt, d_out)  # noqa: E731
    return _with_probe(values, fn) if probe else values


def _with_probe(values_fn, fn):
    """values_fn plus, under the key _PROBE, the api's probe computed in the same graph:
    three separate model calls on the first points, the same again, and with point 0 moved
    by 0.1 * (1 + |x0|) (see nbderiv.api._probe_batches)."""
    def run(X):
        values = values_fn(X)
        P = X[:tf.minimum(tf.shape(X)[0], PROBE_POINTS)]
        moved = tf.concat([P[:1] + 0.1 * (1 + tf.abs(P[:1])), P[1:]], axis=0)
        values[_PROBE] = tf.concat([fn(P), fn(P), fn(moved)], axis=0)
        return values
    return run


def choose_methods(d_out: int, m: int, order: int, taylor: bool) -> list:
    """Strategies to try, best first. Measured (2 shared CPU cores, float32, N = 10 000,
    model 1-64-64-64-1 tanh, traced, cost in forward passes at orders 1..4): nested tapes
    1.3 / 2.7 / 6.4 / 27, Taylor mode 1.5 / 2.1 / 3.5 / 5.9, nested forward accumulators
    1.8 / 4.0 / 27 / 215; for 501 outputs (1-50-50-50-501) Taylor 1.3 / 1.5 / 4.5 / 7,
    accumulators 1.9 / 3.7, tapes over 200 at order 1. Accumulators nested three deep or
    more are slow and fragile in TensorFlow: forward mode is used at orders 1 and 2 only."""
    if taylor and (order >= 2 or d_out > 1):
        return [_TAYLOR, _REVERSE]
    if d_out > m and order <= 2:
        return [_FORWARD, _REVERSE]
    return [_REVERSE]


def _assemble(values, y, order, m):
    n, d_out = y.shape
    return [fill_symmetric({idx: v for idx, v in values.items() if len(idx) == k},
                           n, d_out, m, k, y.dtype) for k in range(1, order + 1)]


class TensorFlowBackend(Backend):
    name = "tensorflow"
    fused_probe = True  # one traced call: the first chunk and the probe (saves a dispatch)

    # -- conversion and placement ------------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, (tf.Tensor, tf.Variable)):
            if x.dtype in (tf.bfloat16, tf.float16):
                x = tf.cast(x, tf.float32)
            return x.numpy()  # already a copy
        return np.asarray(x)

    def begin(self, model):
        _forget_if_edited(model)

    def compute_dtype(self, model, x_dtype) -> np.dtype:
        own = _remembered(model, ("dtype",), lambda: _variables_dtype(model))
        if own is not None:
            return own
        if is_keras_layer(model):
            return np.dtype(tf.as_dtype(model.dtype).as_numpy_dtype)
        if x_dtype is not None and np.dtype(x_dtype).kind == "f":
            return np.dtype(x_dtype)
        keras = sys.modules.get("keras")
        return np.dtype(keras.config.floatx() if keras is not None else "float32")

    def context(self, model, x, dtype):
        return {"dtype": np.dtype(dtype), "tf_dtype": tf.as_dtype(np.dtype(dtype))}

    def argument_names(self, model, n_args):
        names = argument_names(model)
        return names[:n_args] if names and len(names) >= n_args else None

    # -- evaluation ------------------------------------------------------------------
    @staticmethod
    def _array(args, context) -> np.ndarray:
        X = np.concatenate(args, axis=1) if len(args) > 1 else args[0]
        return X if X.dtype == context["dtype"] else X.astype(context["dtype"])

    def _tensor(self, args, context):
        return tf.constant(self._array(args, context))

    def _route(self, model, X, widths, order, wrt, context, probe) -> list:
        """[(method, traced computation)] to try in turn for this model and call shape,
        worked out once (the model's output is validated on the way) and remembered."""
        cache = _cache_for(model)
        key = _cache_key(model, "route", order, wrt, probe, tuple(widths), context["dtype"].name)
        if key not in cache:
            d_out = self._ready(model, X, widths, context)
            fn = _caller(model, widths, d_out)
            plan = self._taylor_plan(model, widths, context["dtype"].name) \
                if len(wrt) == 1 else None
            route = []
            for method in choose_methods(d_out, len(wrt), order, plan is not None):
                build = functools.partial(_builder, method, fn, plan, order, wrt, d_out, probe)
                traced = self._traced(model, (method, order, wrt) + (("probed",) if probe else ()),
                                      widths, context, build)
                # with and without the fused probe: a row count seen by either is hot for both
                traced.seen_rows = _remembered(
                    model, ("seen rows", method, order, wrt, tuple(widths),
                            context["dtype"].name), set)
                route.append((method, traced))
            cache[key] = route
        return cache[key]

    def _traced(self, model, key, widths, context, build):
        cache = _cache_for(model)
        full = _cache_key(model, key, tuple(widths), context["dtype"].name)
        if full not in cache:
            cache[full] = _Traced(build(), sum(widths), context["tf_dtype"])
        return cache[full]

    def _d_out(self, model, widths, context):
        """The validated output width, once an eager call has checked the output."""
        return _cache_for(model).get(_cache_key(model, "d_out", tuple(widths),
                                                context["dtype"].name))

    def _validate(self, model, X, widths, context):
        """An eager, fully validated call (the first one for this model): y and d_out."""
        _before_writing()
        y = _caller(model, widths)(X)
        _cache_for(model)[_cache_key(model, "d_out", tuple(widths),
                                     context["dtype"].name)] = int(y.shape[1])
        return y

    def _ready(self, model, X, widths, context):
        d_out = self._d_out(model, widths, context)
        if d_out is None:
            d_out = int(self._validate(model, X[:2], widths, context).shape[1])
        return d_out

    def forward(self, model, args, context) -> np.ndarray:
        widths = [a.shape[1] for a in args]
        X = self._tensor(args, context)
        # validated eagerly once, then always the same trace: repeated calls agree bit for bit
        d_out = self._ready(model, X, widths, context)
        traced = self._traced(model, ("forward",), widths, context,
                              lambda: _caller(model, widths, d_out))
        y = traced(X).numpy()
        if y.shape[0] != X.shape[0]:
            check_output(y.shape, True, "", X.shape[0])
        return y

    def forwards(self, model, batches, context) -> list:
        """The separate model calls on same-shaped batches in one traced graph, one dispatch."""
        widths = [a.shape[1] for a in batches[0]]
        X = self._tensor([np.concatenate(parts) for parts in zip(*batches)], context)
        d_out = self._ready(model, X, widths, context)
        fn = _caller(model, widths, d_out)
        count = len(batches)

        def separately(Xs):  # count model calls, not one on the stacked points
            return tf.concat([fn(part) for part in tf.split(Xs, count)], axis=0)

        traced = self._traced(model, ("forwards", count), widths, context, lambda: separately)
        y = traced(X).numpy()
        if y.shape[0] != X.shape[0]:
            check_output(y.shape, True, "", X.shape[0])
        ys = np.split(y, count)
        if traced.eager or traced.seeded_random:
            # seeded random ops repeat their numbers across copies of the op in one graph but
            # not across runs: each batch gets its own run
            ys = [ys[0]] + [np.split(traced(X).numpy(), count)[i] for i in range(1, count)]
        return ys

    def known_verdict(self, model, args, context):
        """For a plain Keras Sequential of Dense and elementwise layers (those that Taylor
        mode can run), called with training=False: deterministic, one point at a time, and
        d_out as an earlier call validated it for this input width. Else None (the first call
        for an input width always probes)."""
        widths = [a.shape[1] for a in args]
        d_out = self._d_out(model, widths, context)
        if d_out is None or self._taylor_plan(model, widths, context["dtype"].name) is None:
            return None
        return d_out, False, False

    def output_width(self, model, args, context) -> int:
        widths = [a.shape[1] for a in args]
        d_out = self._d_out(model, widths, context)
        if d_out is None:
            d_out = int(self._validate(model, self._tensor([a[:2] for a in args], context),
                                       widths, context).shape[1])
        return d_out

    def derivatives(self, model, args, order, wrt, context):
        return self._derivatives(model, args, order, wrt, context, probe=False)[0]

    def derivatives_and_probe(self, model, args, order, wrt, context):
        return self._derivatives(model, args, order, wrt, context, probe=True)

    def _derivatives(self, model, args, order, wrt, context, probe):
        """Cache-sized blocks of rows, each one traced call. One block: the probe rides on it.
        Several: all of one shape (the last one overlaps the one before), so that a single
        compiled program serves them all, and the probe runs on its own few points."""
        widths, wrt = [a.shape[1] for a in args], tuple(wrt)
        X = self._array(args, context)  # sliced here, each block made a tensor on its own
        n, rows = X.shape[0], self._block_rows(model, widths, context)
        if n <= 2 * rows:  # up to two blocks' worth: one call costs less than two dispatches
            values, method, compiled = self._run(model, tf.constant(X), widths, order, wrt,
                                                 context, probe)
            probe_method = method
        else:
            rows = equal_block_size(n, rows)
            values, compiled = {}, False
            if probe:
                part, probe_method, _ = self._run(model, tf.constant(X[:PROBE_POINTS]), widths,
                                                  order, wrt, context, True)
                values[_PROBE] = part[_PROBE]
            for s in block_starts(n, rows):  # one shape: the last block overlaps
                part, method, block_compiled = self._run(
                    model, tf.constant(X[s:s + rows]), widths, order, wrt, context, False)
                compiled |= block_compiled
                if () not in values:  # every result allocated once, filled block by block
                    values.update({idx: result_array((n,) + v.shape[1:], v.dtype)
                                   for idx, v in part.items()})
                for idx, v in part.items():
                    values[idx][s:s + rows] = v
        probe_outputs = None
        if probe:
            both = values.pop(_PROBE)
            k = both.shape[0] // 3
            probe_outputs = (both[:k], both[k:2 * k], both[2 * k:])
            # the route is known by now (the probe has run): no input needed to look it up
            ran = dict(self._route(model, None, widths, order, wrt, context, True))[probe_method]
            if ran.eager or ran.seeded_random:
                # seeded random ops draw the same numbers in every copy within one run: the
                # second look at the probe points must be a run of its own
                again = self._run(model, tf.constant(X[:k]), widths, order, wrt, context,
                                  True)[0]
                probe_outputs = (probe_outputs[0], again[_PROBE][:k], probe_outputs[2])
        y = values.pop(())
        if not (owned(y) and y.flags.writeable):  # a view of TensorFlow's buffer
            y = np.array(y)  # (with several blocks it is already the array filled here)
        if y.shape[0] != n:
            check_output(y.shape, True, "", n)
        if compiled:
            method += " (XLA)"
        return (y, _assemble(values, y, order, len(wrt)), method), probe_outputs

    def _run(self, model, X, widths, order, wrt, context, probe):
        """({multi-index: values}, method, XLA-compiled?) from the first strategy that works
        here."""
        route = self._route(model, X, widths, order, wrt, context, probe)
        for method, traced in route:  # noqa: B007 (method is returned)
            if traced.broken:
                continue
            try:
                with _exact_moments():
                    # read-only views of TensorFlow's buffers, copied once by the caller
                    out = traced(X)
                    return ({idx: np.asarray(v) for idx, v in out.items()}, method,
                            traced.last_compiled)
            except Exception:
                traced.broken = True  # e.g. no forward-mode rule for some op: next strategy
                if all(t.broken for _, t in route):
                    traced.broken = False  # the last strategy: its error is the answer
                    raise
        raise AssertionError("unreachable: the last strategy is never marked broken")

    def _block_rows(self, model, widths, context) -> int:
        """Rows per traced call for inputs of more than twice as many: about 2**19 values of
        the widest layer, so that a block's intermediates stay in cache. Measured on 2 shared
        CPU cores, float32, N = 100 000: 1-64-64-64-1 in 8 192-row blocks about 1.4x faster
        than in one call; 501 outputs do best in 4 096-row blocks. Only on the CPU; a GPU
        wants whole batches."""
        if not _on_cpu():
            return 1 << 62
        widest = _remembered(model, ("widest",), lambda: max(
            [int(v.shape[-1]) for v in model_variables(model) if len(v.shape) >= 2] or [64]))
        return int(min(16384, max(4096, (1 << 19) // max(widest, sum(widths)))))

    def rows_in_flight(self, model, widths):
        # up to twice a block's rows run as one call (see _derivatives); a GPU takes all
        return 2 * self._block_rows(model, widths, None) if _on_cpu() else None

    def per_point_derivatives(self, model, args, order, wrt, context):
        widths = [a.shape[1] for a in args]
        base = self._tensor(args, context)
        d_out = self._ready(model, base, widths, context)
        fn = _caller(model, widths, d_out)
        _before_writing()  # eager model calls follow
        rows, per_order = [], [[] for _ in range(order)]
        for i in range(base.shape[0]):
            def row_fn(Z, i=i):  # point i moves, every other point stays where it is
                return fn(tf.concat([base[:i], Z, base[i + 1:]], axis=0))[i:i + 1]
            with _exact_moments():
                values = {k: v.numpy() for k, v in
                          _reverse_values(row_fn, base[i:i + 1], order, wrt, d_out).items()}
            y = values.pop(())
            rows.append(y)
            for k, arr in enumerate(_assemble(values, y, order, len(wrt))):
                per_order[k].append(arr)
        return np.concatenate(rows), [np.concatenate(p) for p in per_order], "per-point-blocks"

    def full_jacobian(self, model, args, context) -> np.ndarray:
        widths = [a.shape[1] for a in args]
        X = self._tensor(args, context)
        fn = _caller(model, widths, self._ready(model, X, widths, context))

        def jacobian(Xs):
            with tf.GradientTape() as tape:
                tape.watch(Xs)
                y = fn(Xs)
            return tape.jacobian(y, Xs, unconnected_gradients=_ZERO)

        return self._traced(model, ("jacobian",), widths, context, lambda: jacobian)(X).numpy()

    @contextlib.contextmanager
    def preserved(self, model):
        snapshot = _Snapshot(model)
        _OPEN_SNAPSHOTS.append(snapshot)
        try:
            yield
        finally:
            _OPEN_SNAPSHOTS.remove(snapshot)
            snapshot.restore()

    @staticmethod
    def _taylor_plan(model, widths, dtype_name):
        return _remembered(model, ("taylor", tuple(widths), dtype_name),
                           lambda: taylor_plan(model, widths, dtype_name))

    def bytes_per_point(self, model, width, d_out, order, m):
        hidden = _remembered(model, ("hidden",), lambda: sum(
            int(v.shape[-1]) for v in model_variables(model) if len(v.shape) >= 2))
        dtype = _remembered(model, ("dtype",), lambda: _variables_dtype(model))
        item = dtype.itemsize if dtype is not None else 8
        values = (hidden or 64) + width + d_out  # one row of every layer's output
        if m == 1 and dtype is not None and \
                self._taylor_plan(model, [width], dtype.name) is not None:
            # Taylor mode: order + 1 coefficients of each value, and a few temporaries
            return int(values * item * (order + 1) * 4)
        # nested tapes: each level keeps the graph below it and roughly triples it
        return int(values * item * 6 * (3 ** order) * max(1, min(m, 4)))

    def equivalent_code(self, *, order, wrt, widths):
        return tensorflow_code(order=order, wrt=wrt, widths=widths)

    # -- structure, for diagnostics --------------------------------------------------
    def kink_points(self, model, args, context, chunk=65536):
        widths = [a.shape[1] for a in args]

        def build():
            fn = _caller(model, widths, self.output_width(model, args, context))

            def hits(Xs):
                h, count = _kink_hits(fn, Xs)
                traced.facts["kink_ops"] = count
                return h
            return hits

        traced = self._traced(model, ("kinks",), widths, context, build)
        if "kink_ops" not in traced.facts and not traced.trace():
            return []
        if not traced.facts.get("kink_ops"):
            return []  # no ReLU-type operation in the model
        X = self._tensor(args, context)
        hits = np.concatenate([traced(X[s:s + chunk]).numpy()
                               for s in range(0, X.shape[0], chunk)])
        return np.flatnonzero(hits).tolist()

    def layer_summary(self, model) -> dict:
        return _remembered(model, ("layers",), lambda: layer_summary(model))

    def input_width(self, model):
        if not is_keras_layer(model):
            return None
        try:
            inputs = model.inputs
        except Exception:  # subclassed and unbuilt models have no inputs
            inputs = None
        if not inputs:
            raise OptionError("cannot read the input width of this Keras model without building "
                              "it (it has no Input). Fix: pass d_in= (the number of input "
                              "features).")
        if len(inputs) == 1 and tuple(inputs[0].shape)[-1] is not None:
            return int(tuple(inputs[0].shape)[-1])
        return None

    def float64_copy(self, model):
        _before_writing()  # the copy is compared with the model by eager calls
        return float64_copy(model)


BACKEND = TensorFlowBackend()
