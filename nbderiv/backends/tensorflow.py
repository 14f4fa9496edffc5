"""TensorFlow / Keras 3 backend: per-point derivatives of one block of points by forward
Taylor mode (Keras Sequential stacks of Dense and elementwise layers, one input direction),
nested ``tf.GradientTape`` (reverse mode, one gradient per output and distinct partial) or
nested ``tf.autodiff.ForwardAccumulator`` (forward mode, many outputs); see
:func:`~nbderiv.backends.tensorflow_math.choose_methods`. Each is traced once per model and
cached with it (``tensorflow_graphs``); hot shapes run XLA-compiled (``NBDERIV_XLA=0`` turns
that off).

Keras models are called as ``model(x)`` calls them (no ``training=`` passed: inference mode,
except for a layer the model itself forces into training mode); their variables are put back
after every call (``tensorflow_state``), nothing is created on them, ``trainable`` is never touched.
TensorFlow's C++ log lines are filtered out of nbderiv's calls without changing any logging
setting (``tensorflow_quiet``).

>>> import numpy as np, tensorflow as tf
>>> from nbderiv.compute import open_call, probe
>>> call = open_call(tf.sin, tf.zeros((2, 1), tf.float64), None)
>>> _ = probe(call)
>>> call.backend.derivatives(call, call.args, 1, (0,)).orders[0][:, 0, 0].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import functools
import math
import sys
import types
import weakref

import numpy as np

from .tensorflow_quiet import quiet_tf_logs

if "tensorflow" in sys.modules:
    import tensorflow as tf
else:  # pragma: no cover - depends on what the user imported first
    with quiet_tf_logs():
        import tensorflow as tf

# after the quiet import: these modules import TensorFlow themselves
from ..call import Verdict  # noqa: E402
from ..errors import InputShapeError, InputTypeError, OptionError  # noqa: E402
from ..inputs import check_output  # noqa: E402
from ..result_memory import owned  # noqa: E402
from ..wrapped import attribute_names  # noqa: E402
from . import tensorflow_state as state  # noqa: E402
from .base import Backend, Block, assemble  # noqa: E402
from .tensorflow_code import tensorflow_code  # noqa: E402
from .tensorflow_graphs import (  # noqa: E402
    Traced,
    cache_for,
    cache_key,
    forget_if_edited,
    on_cpu,
    remembered,
)
from .tensorflow_keras import (  # noqa: E402
    argument_names,
    float64_copy,
    held_layers,
    is_keras_layer,
    layer_summary,
    model_variables,
    state_key,
)
from .tensorflow_math import (  # noqa: E402
    BATCHED,
    REVERSE,
    ZERO,
    builder,
    caller,
    check_targets,
    choose_methods,
    exact_moments,
    kink_hits,
    reverse_values,
)
from .tensorflow_taylor import taylor_plan  # noqa: E402


def _shapes(call) -> tuple:
    """What a traced computation depends on besides the model: each argument's per-point
    shape, the extras (keyword arguments, target) and the constant keyword arguments (by
    identity: the trace holds them, so they stay alive while it is cached)."""
    key = tuple(tuple(s) for s in call.point_shapes)
    if call.extras or call.constants:
        key += (call.extras, tuple((k, id(v)) for k, v in sorted(call.constants.items())))
    return key


def _flat_widths(call):
    """The arguments' widths when every argument is a vector per point (Taylor mode's case),
    else None."""
    shapes = call.point_shapes
    if call.extras or call.constants or not all(len(s) == 1 for s in shapes):
        return None
    return [s[0] for s in shapes]


def _batched_rows(method, call, order, wrt):
    """Points per traced run of the batched strategy, whose backward passes hold one copy of
    the graph's values per cotangent of the largest level: at most 2**15 cotangent-rows and
    2**26 cotangent-values at the input; None (one run) for the other strategies."""
    if method != BATCHED:
        return None
    cotangents = call.d_out * math.comb(len(wrt) + order - 2, order - 1)
    return max(1, min((1 << 15) // cotangents, (1 << 26) // (cotangents * call.width)))


def _run_in_parts(traced, X, rows):
    """{key: numpy array} of the traced computation on X, in runs of at most ``rows`` points
    (equal sizes, so that one traced shape serves them all)."""
    n = X.shape[0]
    if rows is None or n <= rows:
        return {key: np.asarray(v) for key, v in traced(X).items()}
    parts = -(-n // rows)
    size = -(-n // parts)
    runs = [traced(X[s:s + size]) for s in range(0, n, size)]
    return {key: np.concatenate([np.asarray(r[key]) for r in runs]) for key in runs[0]}


# Keras layers whose variance comes from tf.nn.moments (see tensorflow_math.exact_moments)
_MOMENTS_LAYERS = frozenset({"LayerNormalization", "GroupNormalization", "BatchNormalization"})


def _keras_inputs(model):
    """The Keras Inputs of a functional or Sequential model, or None (subclassed models,
    plain functions, a model not built)."""
    if not is_keras_layer(model):
        return None
    try:
        inputs = model.inputs
    except Exception:  # subclassed and unbuilt models have no inputs
        return None
    return list(inputs) if inputs else None


def _reads_moments(model) -> bool:
    """Whether a function calls ``tf.nn.moments`` itself (in its own code)."""
    return isinstance(model, types.FunctionType) and \
        "moments" in attribute_names(model.__code__)


class TensorFlowBackend(Backend):
    name = "tensorflow"
    optional = frozenset({"begin", "argument_names", "known_verdict", "block_rows",
                          "bytes_per_point", "kink_points", "input_width", "state_key",
                          "code_notes", "named_inputs"})

    # -- conversion and placement ------------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, (tf.Tensor, tf.Variable)):
            if x.dtype in (tf.bfloat16, tf.float16):
                x = tf.cast(x, tf.float32)
            return x.numpy()  # already a copy
        module = type(x).__module__.split(".")[0]
        if module in ("torch", "jax", "jaxlib"):  # another framework's tensor
            raise InputTypeError(
                f"x is a {module} tensor ({type(x).__name__}), but the model is a Keras / "
                "TensorFlow model, which nbderiv differentiates with TensorFlow. Fix: pass a "
                "NumPy array or a tf.Tensor, e.g. x.detach().cpu().numpy() for a torch tensor.")
        return np.asarray(x)

    def begin(self, model):
        forget_if_edited(model)
        _refuse_fixed_batch(model)

    def compute_dtype(self, model, x_dtype) -> np.dtype:
        """The model's variables' dtype, widened to the dtype its Keras ``Input``s declare
        (a float64 ``Input`` before float32 layers is fed and differentiated in float64;
        what the layers then compute in is the model's own business), else the model's
        dtype, else x's float dtype, else Keras' floatx."""
        own = remembered(model, ("dtype",), lambda: state.variables_dtype(model))
        declared = remembered(model, ("input dtype",), lambda: state.declared_input_dtype(model))
        if declared is not None and (own is None or declared.itemsize > own.itemsize):
            return declared
        if own is not None:
            return own
        if is_keras_layer(model):
            return np.dtype(tf.as_dtype(model.dtype).as_numpy_dtype)
        if x_dtype is not None and np.dtype(x_dtype).kind == "f":
            return np.dtype(x_dtype)
        keras = sys.modules.get("keras")
        return np.dtype(keras.config.floatx() if keras is not None else "float32")

    def argument_names(self, model, n_args):
        """The Inputs' names (a functional model) or call's positional parameters; a Keras
        model with another number of Inputs than x has arguments is refused (Keras would warn
        and use the first ones only: the others' derivatives would read 0)."""
        inputs = _keras_inputs(model)
        if inputs is not None and len(inputs) != n_args:
            raise InputShapeError(
                f"the model takes {len(inputs)} input{'s' if len(inputs) != 1 else ''} (its "
                f"Keras Input{'s' if len(inputs) != 1 else ''}: "
                f"{', '.join(str(tuple(t.shape)) for t in inputs)}), but x is a tuple of "
                f"{n_args} arrays, which nbderiv passes as {n_args} separate inputs. Fix: "
                + ("pass one array, x itself (features side by side: "
                   "np.concatenate([x1, x2], axis=1))." if len(inputs) == 1 else
                   f"pass a tuple of {len(inputs)} arrays, one per Input, in order."))
        names = argument_names(model)
        return names[:n_args] if names and len(names) >= n_args else None

    def named_inputs(self, model):
        """The keys of a Keras model built on a dict of Inputs, in the order of its inputs
        (Keras sorts a dict's keys when it flattens it)."""
        if not is_keras_layer(model):
            return None
        try:
            struct = model.input
        except Exception:  # subclassed and unbuilt models have no input structure
            return None
        return sorted(struct) if isinstance(struct, dict) and len(struct) > 1 else None

    # -- evaluation ------------------------------------------------------------------
    @staticmethod
    def _tensor(call, args):
        X = np.concatenate(args, axis=1) if len(args) > 1 else args[0]
        return tf.constant(X if X.dtype == call.dtype else X.astype(call.dtype))

    def _traced(self, call, key, shapes, build):
        cache = cache_for(call.model)
        full = cache_key(call.model, key, shapes, call.dtype.name)
        if full not in cache:
            width = call.width
            cache[full] = Traced(build(), width, tf.as_dtype(call.dtype))
            if _one_off(call.model):  # a check's float64 copy: run a few times, never traced
                cache[full].eager = True
        return cache[full]

    def _out_shape(self, call, shapes):
        """Each point's output shape O, once an eager call has checked the output."""
        return cache_for(call.model).get(cache_key(call.model, "out shape", shapes,
                                                   call.dtype.name))

    def _d_out(self, call, shapes):
        """The validated output width, once an eager call has checked the output."""
        out_shape = self._out_shape(call, shapes)
        return None if out_shape is None else math.prod(out_shape)

    def _ready(self, call, X, shapes):
        """d_out, from an eager, fully validated call on two points the first time."""
        if self._out_shape(call, shapes) is None:
            state.before_writing()
            y = caller(call, raw=True)(X[:2])
            cache_for(call.model)[cache_key(call.model, "out shape", shapes,
                                            call.dtype.name)] = tuple(y.shape[1:]) or (1,)
        return self._d_out(call, shapes)

    def forwards(self, call, batches) -> list:
        """The separate model calls on same-shaped batches in one traced graph, one dispatch."""
        shapes = _shapes(call)
        X = self._tensor(call, [np.concatenate(parts) for parts in zip(*batches)])
        fn = caller(call, self._ready(call, X, shapes))
        count = len(batches)

        def separately(Xs):  # count model calls, not one on the stacked points
            return tf.concat([fn(part) for part in tf.split(Xs, count)], axis=0)

        traced = self._traced(call, ("forwards", count), shapes, lambda: separately)
        y = traced(X).numpy()
        if y.shape[0] != X.shape[0]:
            check_output(y.shape, True, "", X.shape[0])
        ys = np.split(y, count)
        if traced.eager or traced.seeded_random:
            # seeded random ops repeat their numbers across copies of the op in one graph but
            # not across runs: each batch gets its own run
            ys = [ys[0]] + [np.split(traced(X).numpy(), count)[i] for i in range(1, count)]
        out_shape = self._out_shape(call, shapes)
        return [y.reshape((y.shape[0],) + out_shape) for y in ys]

    def known_verdict(self, call):
        """For a plain Keras Sequential of Dense and elementwise layers (those that Taylor
        mode can run), called as model(x): deterministic, one point at a time, and
        d_out as an earlier call validated it for this input width. Else None (the first call
        for an input width always probes)."""
        d_out = self._d_out(call, _shapes(call))
        if d_out is None or _flat_widths(call) is None \
                or self._taylor_plan(call.model, call.widths, call.dtype.name) is None:
            return None
        return Verdict(d_out, False, False)

    def _route(self, call, X, shapes, order, wrt) -> list:
        """[(method, traced computation)] to try in turn for this model and call shape,
        worked out once and remembered."""
        model = call.model
        cache = cache_for(model)
        key = cache_key(model, "route", order, wrt, shapes, call.dtype.name)
        if key not in cache:
            d_out = self._ready(call, X, shapes)
            fn = caller(call, d_out)
            widths = _flat_widths(call)
            plan = self._taylor_plan(model, widths, call.dtype.name) \
                if len(wrt) == 1 and widths is not None else None
            route = []
            for method in choose_methods(d_out, len(wrt), order, plan is not None):
                build = functools.partial(builder, method, fn, plan, order, wrt, d_out)
                route.append((method, self._traced(call, (method, order, wrt), shapes, build)))
            cache[key] = route
        return cache[key]

    def derivatives(self, call, args, order, wrt, out=None) -> Block:
        """One traced call from the first strategy that works for this model and shape."""
        check_targets(call)  # a traced computation cannot: it is reused with other targets
        shapes, wrt = _shapes(call), tuple(wrt)
        X = self._tensor(call, args)
        route = self._route(call, X, shapes, order, wrt)
        for method, traced in route:  # noqa: B007 - the method that worked is used below
            if traced.broken:
                continue
            try:
                with exact_moments():
                    values = _run_in_parts(traced, X, _batched_rows(method, call, order, wrt))
                break
            except Exception:
                traced.broken = True  # e.g. no forward-mode rule for some op: next strategy
                if all(t.broken for _, t in route):
                    traced.broken = False  # the last strategy: its error is the answer
                    raise
        y = values.pop(())
        if not (owned(y) and y.flags.writeable):  # a read-only view of TensorFlow's buffer
            y = np.array(y)
        if y.shape[0] != X.shape[0]:
            check_output(y.shape, True, "", X.shape[0])
        if method == BATCHED:  # each level came as one (n, L_k, d_out) array (see assemble)
            method = REVERSE
        method += " (XLA)" if traced.last_compiled else ""
        return Block(y, assemble(values, y, order, len(wrt)), method)

    def block_rows(self, call):
        """About 2**19 values of the widest layer, so that a block's intermediates stay in
        cache. Measured on 2 shared CPU cores, float32, N = 100 000: 1-64-64-64-1 in 8 192-row
        blocks about 1.4x faster than in one call; 501 outputs do best in 4 096-row blocks.
        Only on the CPU; a GPU wants whole batches."""
        if not on_cpu():
            return None
        widest = remembered(call.model, ("widest",), lambda: max(
            [int(v.shape[-1]) for v in model_variables(call.model) if len(v.shape) >= 2]
            or [64]))
        return int(min(16384, max(4096, (1 << 19) // max(widest, call.width))))

    def per_point_derivatives(self, call, args, order, wrt) -> Block:
        shapes = _shapes(call)
        base = self._tensor(call, args)
        d_out = self._ready(call, base, shapes)
        fn = caller(call, d_out)
        state.before_writing()  # eager model calls follow
        rows, per_order = [], [[] for _ in range(order)]
        for i in range(base.shape[0]):
            def row_fn(Z, i=i):  # point i moves, every other point stays where it is
                return fn(tf.concat([base[:i], Z, base[i + 1:]], axis=0))[i:i + 1]
            with exact_moments():
                values = {k: v.numpy() for k, v in
                          reverse_values(row_fn, base[i:i + 1], order, wrt, d_out).items()}
            y = values.pop(())
            rows.append(y)
            for k, arr in enumerate(assemble(values, y, order, len(wrt))):
                per_order[k].append(arr)
        return Block(np.concatenate(rows), [np.concatenate(p) for p in per_order],
                     "per-point-blocks")

    def full_jacobian(self, call, args) -> np.ndarray:
        shapes = _shapes(call)
        X = self._tensor(call, args)
        fn = caller(call, self._ready(call, X, shapes))

        def jacobian(Xs):
            with tf.GradientTape() as tape:
                tape.watch(Xs)
                y = fn(Xs)
            return tape.jacobian(y, Xs, unconnected_gradients=ZERO)

        return self._traced(call, ("jacobian",), shapes, lambda: jacobian)(X).numpy()

    def preserved(self, model):
        return state.preserved(model)

    @staticmethod
    def _taylor_plan(model, widths, dtype_name):
        return remembered(model, ("taylor", tuple(widths), dtype_name),
                          lambda: taylor_plan(model, widths, dtype_name))

    def bytes_per_point(self, call, order, m):
        model, width = call.model, call.width
        hidden = remembered(model, ("hidden",), lambda: sum(
            int(v.shape[-1]) for v in model_variables(model) if len(v.shape) >= 2))
        item = call.dtype.itemsize
        values = (hidden or 64) + width + call.d_out  # one row of every layer's output
        if m == 1 and self._taylor_plan(model, [width], call.dtype.name) is not None:
            # Taylor mode: order + 1 coefficients of each value, and a few temporaries
            return int(values * item * (order + 1) * 4)
        # nested tapes: each level keeps the graph below it and roughly triples it
        return int(values * item * 6 * (3 ** order) * max(1, min(m, 4)))

    def equivalent_code(self, *, order, wrt, widths, shapes=None, out_shape=None, notes=()):
        return tensorflow_code(order=order, wrt=wrt, widths=widths, shapes=shapes,
                               out_shape=out_shape, notes=notes)

    def code_notes(self, call, order):
        """("moments",) from order 2 for a model with a Keras normalization layer that takes
        its variance from ``tf.nn.moments`` (see :func:`exact_moments`)."""
        model = call.model
        named = ("named",) if self.named_inputs(model) else ()  # a dict of named inputs
        if order < 2:
            return named

        def normalizes():
            layers = [model] if is_keras_layer(model) else list(held_layers(model))
            return any(type(sub).__name__ in _MOMENTS_LAYERS for layer in layers
                       for sub in layer._flatten_layers(include_self=True, recursive=True))
        moments = remembered(model, ("moments",), normalizes) if is_keras_layer(model) \
            else normalizes() or _reads_moments(model)
        return named + (("moments",) if moments else ())

    # -- structure, for diagnostics --------------------------------------------------
    def kink_points(self, call, args, chunk=65536):
        shapes = _shapes(call)

        def build():
            fn = caller(call, self._ready(call, self._tensor(call, [a[:2] for a in args]),
                                          shapes))

            def hits(Xs):
                h, count = kink_hits(fn, Xs)
                traced.facts["kink_ops"] = count
                return h
            return hits

        traced = self._traced(call, ("kinks",), shapes, build)
        if "kink_ops" not in traced.facts and not traced.trace():
            return []
        if not traced.facts.get("kink_ops"):
            return []  # no ReLU-type operation in the model
        X = self._tensor(call, args)
        hits = np.concatenate([traced(X[s:s + chunk]).numpy()
                               for s in range(0, X.shape[0], chunk)])
        return np.flatnonzero(hits).tolist()

    def state_key(self, model) -> tuple:
        return state_key(model)

    def layer_summary(self, model) -> dict:
        if not is_keras_layer(model):  # a wrapper: the layers it holds may change, no cache
            return layer_summary(model)
        return remembered(model, ("layers",), lambda: layer_summary(model))

    def input_width(self, model):
        if not is_keras_layer(model):
            return None
        try:
            inputs = model.inputs
        except Exception:  # subclassed and unbuilt models have no inputs
            inputs = None
        if not inputs:
            if getattr(model, "built", False):  # subclassed: calling it builds nothing
                return None
            raise OptionError("cannot read the input width of this Keras model: it has no "
                              "Input and is not built yet, so its first call would build it "
                              "for whatever width it sees. Fix: build it with one call on "
                              "data of the right width (model(x)), or give the points "
                              "yourself, an array of shape (N, d_in) (in %nnderiv instead of "
                              "a range; nbderiv.explore takes d_in=).")
        if len(inputs) != 1:
            return None
        shape = tuple(inputs[0].shape)[1:]  # each point's shape, None where free
        if len(shape) == 1:
            return None if shape[0] is None else int(shape[0])
        return tuple(None if s is None else int(s) for s in shape) or None

    def float64_copy(self, model):
        state.before_writing()  # the copy is compared with the model by eager calls
        twin = float64_copy(model)
        try:
            _RUN_EAGERLY.add(twin)
        except TypeError:  # not weakly referenceable: traced as any model
            pass
        return twin


BACKEND = TensorFlowBackend()

# float64 copies made for a check: each runs a few times on a few points, for which tracing
# (seconds for an RNN's derivatives) costs far more than running eagerly
_RUN_EAGERLY: weakref.WeakSet = weakref.WeakSet()


def _one_off(model) -> bool:
    try:
        return model in _RUN_EAGERLY
    except TypeError:
        return False


def _refuse_fixed_batch(model) -> None:
    """A ``tf.function`` whose ``input_signature`` fixes the number of points: nbderiv calls
    the model on a few points, on blocks and on all of them, which such a function refuses
    (TensorFlow's own error names two TensorSpecs, as if x had the wrong shape)."""
    if not isinstance(model, tf.types.experimental.GenericFunction):
        return
    signature = getattr(model, "input_signature", None) or ()
    for spec in tf.nest.flatten(signature):
        shape = getattr(spec, "shape", None)
        if shape is not None and shape.rank and shape[0] is not None:
            fixed = tuple(None if d is None else int(d) for d in shape)
            free = (None,) + fixed[1:]
            raise InputShapeError(
                f"the tf.function's input_signature fixes the number of points: "
                f"TensorSpec(shape={fixed}). nbderiv calls the model on a few points, then on "
                "blocks of them, so the first axis must be free. Fix: input_signature=["
                f"tf.TensorSpec(shape={free}, dtype=...)] (None for the number of points).")
