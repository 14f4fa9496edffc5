"""Keras models as the TensorFlow backend sees them: how to call one, which activations it
uses, and a float64 copy with the same weights (for the finite-difference check).

Imported by ``nbderiv.backends.tensorflow`` (after its quiet ``import tensorflow``); Keras
itself is never imported here: a model that is a Keras object means Keras is loaded.

>>> import keras
>>> net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh"),
...                         keras.layers.Dense(1)])
>>> layer_summary(net)["activations"]
['tanh', 'linear']
>>> float64_copy(net).weights[0].dtype
'float64'
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import sys
import types
import weakref

import numpy as np
import tensorflow as tf

from ..wrapped import FRAMEWORK_PACKAGES, code_names, code_state, objects_inside

_NAMED = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "PReLU": "PReLU", "ELU": "elu",
          "Softmax": "softmax"}
_CONTAINERS = ("Sequential", "Functional", "InputLayer")


# -- what kind of model, and how to call it ------------------------------------------------
def _keras():
    return sys.modules.get("keras")


def is_keras_layer(model) -> bool:
    keras = _keras()
    return keras is not None and isinstance(model, keras.layers.Layer)


def graph_kind(model):
    """'sequential' / 'functional' for Keras graph models whose call is Keras' own, else None."""
    if not is_keras_layer(model):
        return None
    if "call" in vars(model):  # replaced on the instance: not Keras' own call
        return None
    cls = type(model)
    call = cls.call
    known = _GRAPH_KINDS.get(cls)
    if known is not None and known[0]() is call:
        return known[1]
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    kind = None
    if issubclass(cls, Sequential) and call is Sequential.call:
        kind = "sequential"
    elif issubclass(cls, Functional) and call is Functional.call:
        kind = "functional"
    try:  # held weakly: a call that refers to its class must not keep the class alive
        _GRAPH_KINDS[cls] = (weakref.ref(call), kind)
    except TypeError:
        pass
    return kind


# graph_kind depends on the class and its ``call`` alone (unless the instance replaces it):
# remembered per class
_GRAPH_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _python_function(model):
    """The Python function a ``tf.function`` wraps (what it holds is what it runs: the
    models in its closure, the model it was made from); ``model`` itself otherwise."""
    if isinstance(model, tf.types.experimental.GenericFunction):
        return getattr(model, "python_function", model)
    return model


def model_variables(model) -> list:
    """Every variable of a Keras layer or ``tf.Module`` (trainable or not); for a wrapper (a
    lambda, partial, bound method, closure, callable object or ``tf.function``), those of the
    Keras layers, ``tf.Module``s and variables it holds, each once; else []."""
    model = _python_function(model)
    if is_keras_layer(model) or isinstance(model, tf.Module):
        return list(model.variables)
    if not callable(model):
        return []
    keras = _keras()
    single = (tf.Variable,) + ((keras.Variable,) if keras is not None else ())
    found, seen = [], set()
    for obj in objects_inside(model):
        if is_keras_layer(obj) or isinstance(obj, tf.Module):
            held = obj.variables
        else:
            held = [obj] if isinstance(obj, single) else []
        for v in held:
            if id(v) not in seen:
                seen.add(id(v))
                found.append(v)
    return found


def held_layers(model) -> list:
    """The Keras layers a wrapper holds (none of them inside another); [model] for a layer."""
    model = _python_function(model)
    if is_keras_layer(model):
        return [model]
    if not callable(model):
        return []
    layers = [o for o in objects_inside(model) if is_keras_layer(o)]
    inner = {id(sub) for layer in layers
             for sub in layer._flatten_layers(include_self=False, recursive=True)}
    return [layer for layer in layers if id(layer) not in inner]


# public attributes that Keras itself changes while training or predicting (not structure)
_RUNTIME_FLAGS = frozenset({"built", "trainable", "stop_training", "stop_predicting",
                            "stop_evaluating", "steps_per_execution"})


def structure_key(model):
    """(key, objects): what a traced computation of ``model`` bakes in besides variable
    values: its layers, their activations, their variables (by identity) and their public
    scalar settings (``Rescaling.scale``, ``LeakyReLU.negative_slope``, ``lora_enabled``, ...).
    ``key`` holds the identities as numbers; ``objects`` are the objects behind them, which a
    :class:`~nbderiv.memo.StructureWatch` holds weakly so that a freed object's address reused by a new one
    still counts as a change. A model edited in place gets a new key, so its old traces are
    dropped. (None, []) for anything that is not a Keras layer."""
    if not is_keras_layer(model):  # a function, a tf.Module: what its code reads
        return code_state(model)
    parts, objects = [], []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        function = vars(layer).get("function")
        if type(layer).__name__ == "Lambda" and callable(function):  # the Python it runs
            parts.append(code_state(function)[0])
            objects += code_state(function)[1]
        act = getattr(layer, "activation", None)
        if inspect.ismethod(act):  # a new bound method each time: its function and object
            objects.append(act.__self__)
            act = act.__func__
        call = vars(layer).get("call")  # a call replaced on the instance (None: the class's)
        # Keras' own containers: no settings
        settings = () if graph_kind(layer) else _settings(layer, objects)
        own = getattr(layer, "_trainable_variables", []) + \
            getattr(layer, "_non_trainable_variables", [])
        parts.append((id(layer), id(act), id(call), settings, tuple(map(id, own))))
        objects += (layer, act, call)
        objects.extend(own)
    return tuple(parts), objects


_FINGERPRINT_MAX = 1 << 22  # variable values read for a state key, at most


def state_key(model) -> tuple:
    """(key, objects) for :mod:`nbderiv.memo`: the :func:`structure_key` of a Keras model and
    a fingerprint of its variables' values (Keras variables keep no version counter: a
    training step is seen in the values). (None, ()) for anything else, and for models with
    more than ``_FINGERPRINT_MAX`` values (reading them all would cost more than it saves)."""
    if not is_keras_layer(model):
        return None, ()
    key, objects = structure_key(model)
    if key is None:
        return None, ()
    variables = model_variables(model)
    if sum(math.prod(v.shape) for v in variables) > _FINGERPRINT_MAX:
        return None, ()
    values = hash(tuple(hash(np.asarray(v.numpy()).tobytes()) for v in variables))
    return (key, values), objects


_SETTING_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SCALARS = (int, float, bool, str)


def _settings(layer, objects) -> tuple:
    """The layer's public settings (names listed once per layer): scalars, and lists, tuples
    and dicts of them (a config dict read in ``call``; Keras' tracked lists and dicts too) as
    values; a value that has become something else (an array, say) by identity (the object
    added to ``objects``). A layer class of your own adds the module-level values its methods
    read (``SCALE = 3.0`` baked into a traced graph)."""
    try:
        names = _SETTING_NAMES[layer]
    except (KeyError, TypeError):
        names = tuple(k for k, v in vars(layer).items()
                      if not k.startswith("_") and k not in _RUNTIME_FLAGS
                      and _plain_value(v) is not None)
        try:
            _SETTING_NAMES[layer] = names
        except TypeError:
            pass
    values = vars(layer)
    out = []
    for k in names:
        v = values.get(k)
        plain = _plain_value(v)
        if plain is not None:
            out.append(plain)
        else:
            out.append(("object", id(v)))
            objects.append(v)
    return tuple(out) + _code_globals(type(layer))


def _plain_value(v, depth=3):
    """``v`` as a hashable value if it is a scalar, or a small list / tuple / dict of them
    (``depth`` levels down), else None."""
    if type(v) in _SCALARS or v is None:
        return (type(v).__name__, v)
    if depth <= 0 or not isinstance(v, (list, tuple, dict)) or len(v) > 64:
        return None
    items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
    out = []
    for k, item in items:
        inner = _plain_value(item, depth - 1)
        if inner is None or not (type(k) in _SCALARS or k is None):
            return None
        out.append((k, inner))
    return (type(v).__name__, tuple(out))


@functools.lru_cache(maxsize=2048)
def _global_names(code) -> tuple:
    return tuple(sorted(code_names(code)))


def _code_globals(cls) -> tuple:
    """The plain module-level values (numbers, flags, small lists and dicts of them) that the
    methods of a layer class of your own read, by name; () for Keras' own classes."""
    names = []
    for c in cls.__mro__:
        if (getattr(c, "__module__", "") or "").split(".")[0] in FRAMEWORK_PACKAGES | {"builtins"}:
            continue
        for fn in vars(c).values():
            code = getattr(fn, "__code__", None)
            if code is None:
                continue
            for name in _global_names(code):
                if name in fn.__globals__:
                    plain = _plain_value(fn.__globals__[name])
                    if plain is not None:
                        names.append((c.__qualname__, name, plain))
    return tuple(names)


def _positional_names(fn) -> list | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in ("training", "mask")]


def argument_names(model) -> list | None:
    """Keras ``Input`` names of a functional model (None for automatic names), else the
    positional parameter names of ``call`` / the callable."""
    if graph_kind(model) == "functional":
        struct = model.input
        if isinstance(struct, dict):
            return sorted(struct)
        names = [getattr(t, "name", None) for t in model.inputs]
        auto = any(not n or n.startswith(("keras_tensor", "input_layer")) for n in names)
        return None if auto else names
    if is_keras_layer(model):
        return _positional_names(model.call)
    return _positional_names(model)


def invoke(model, parts, kwargs=None):
    """``model`` applied to a list of argument tensors, in the calling convention it expects.

    Keras models run as ``model(x)`` runs them: no ``training=`` is passed, so every layer is
    in inference mode except one the model itself forces into training mode
    (``BatchNormalization()(h, training=True)``, ``call(self, x, training=True)``), which then
    runs as it does for its user (and is found by the probe: coupled points, randomness). A
    functional model gets its inputs in the structure it was built with (else Keras warns); a
    subclassed model gets every input in its compute dtype (Keras itself casts only the first
    argument). ``kwargs``: extra keyword arguments (never differentiated; ``training=`` among
    them is passed on).
    """
    kw = dict(kwargs or {})
    kind = graph_kind(model)
    if kind == "functional":
        struct = model.input
        if isinstance(struct, dict):
            return model(dict(zip(sorted(struct), parts)), **kw)
        if isinstance(struct, (list, tuple)):
            return model(list(parts), **kw)
    if kind is not None:
        return model(parts[0] if len(parts) == 1 else list(parts), **kw)
    if not is_keras_layer(model):
        return model(*parts, **kw)
    want = tf.as_dtype(model.compute_dtype)
    parts = [tf.cast(p, want) if p.dtype != want and p.dtype.is_floating else p for p in parts]
    if len(parts) == 1:
        return model(parts[0], **kw)
    if len(_positional_names(model.call) or []) >= len(parts):
        return model(*parts, **kw)
    return model(list(parts), **kw)


# -- structure, for diagnostics --------------------------------------------------------------
def _activation_name(layer) -> str | None:
    kind = type(layer).__name__
    if kind == "ReLU":
        cfg = layer.get_config()
        if cfg.get("max_value") == 6:
            return "relu6"
        return "leaky_relu" if cfg.get("negative_slope") else "relu"
    if kind in _NAMED:
        return _NAMED[kind]
    act = getattr(layer, "activation", None)
    if callable(act):
        return getattr(act, "__name__", type(act).__name__)
    return None


def _is_keras_builtin(layer) -> bool:
    return type(layer).__module__.startswith("keras.") and type(layer).__name__ != "Lambda"


def layer_summary(model) -> dict:
    """{'activations': [Keras activation names], 'train_mode': [], 'opaque': bool}.

    ``train_mode`` is empty: Keras layers run in inference mode when the model is called as
    ``model(x)``, except those the model forces into training mode (found by the probe).
    ``opaque`` is False only for Sequential / functional models of built-in layers.
    """
    if not is_keras_layer(model):  # a wrapper: the activations of the layers it holds
        inner = [layer_summary(layer) for layer in held_layers(model)]
        return {"activations": [a for s in inner for a in s["activations"]], "train_mode": [],
                "opaque": True, "half_compute": [h for s in inner for h in s["half_compute"]]}
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    activations = [a for a in map(_activation_name, layers or [model]) if a is not None]
    opaque = graph_kind(model) is None or not all(
        _is_keras_builtin(layer) or type(layer).__name__ in _CONTAINERS for layer in layers)
    return {"activations": activations, "train_mode": [], "opaque": opaque,
            "half_compute": _half_compute(layers or [model])}


def _half_compute(layers) -> list:
    """'name (dtype)' of the layers whose dtype policy computes in float16 or bfloat16
    (Keras mixed precision: float32 variables, half-precision arithmetic)."""
    out = []
    for layer in layers:
        compute = str(getattr(layer, "compute_dtype", "") or "")
        if compute in ("float16", "bfloat16"):
            out.append(f"{layer.name} ({compute})")
    return out


# -- float64 copies --------------------------------------------------------------------------
def _floating(dtype) -> bool:
    try:
        return tf.as_dtype(dtype).is_floating
    except (TypeError, ValueError):
        return False


def lower_precision_layers(model) -> list:
    """The layers in ``model`` (itself and every layer nested in it, the inner layers of
    wrappers such as ``Bidirectional`` and ``TimeDistributed`` included) that keep a float
    variable or a float compute dtype other than float64, by name; for Keras' own containers
    (Sequential, functional models, whose policy casts nothing) their float ``Input``s
    other than float64 instead."""
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if type(layer).__name__ in _CONTAINERS:
            try:
                inputs = list(layer.inputs or []) if graph_kind(layer) else []
            except Exception:  # an unbuilt Sequential has no inputs yet
                inputs = []
            if any(_floating(t.dtype) and str(t.dtype) != "float64" for t in inputs):
                found.append(f"the Input of {layer.name}")
            continue
        own = getattr(layer, "_trainable_variables", []) + \
            getattr(layer, "_non_trainable_variables", [])
        compute = getattr(layer, "compute_dtype", None)
        if (compute is not None and _floating(compute) and str(compute) != "float64") or any(
                _floating(v.dtype) and str(v.dtype) != "float64" for v in own):
            found.append(f"{layer.name} ({type(layer).__name__})")
    return found


def _is_float64(model) -> bool:
    return bool(model.weights) and not lower_precision_layers(model)


def _clone_layer(layer):
    keras = _keras()
    if isinstance(layer, keras.layers.Lambda):  # rebuilt directly: no (unsafe) deserialization
        return keras.layers.Lambda(layer.function, arguments=layer.arguments, dtype="float64",
                                   name=layer.name)
    if not isinstance(layer, keras.layers.Layer):  # an operation (h + a, ops.sin(h)): no
        return type(layer).from_config(layer.get_config())  # dtype, it follows its inputs
    config = _float64_config(dict(layer.get_config()))
    config["dtype"] = "float64"
    return type(layer).from_config(config)


def _policy_name(value):
    """The dtype a layer config's ``dtype`` entry names (a string or a serialized
    ``DTypePolicy``), or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return (value.get("config") or {}).get("name")
    return None


def _float64_config(config):
    """``config`` with every float ``dtype`` of the layers serialized inside it (the inner
    layers of ``Bidirectional`` / ``TimeDistributed``, the layers of a nested model) set to
    float64; integer inputs keep their dtype."""
    if isinstance(config, list):
        return [_float64_config(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {k: _float64_config(v) for k, v in config.items()}
    name = _policy_name(out.get("dtype"))
    if name is not None and (name.startswith("mixed_") or _floating(name)):
        out["dtype"] = "float64"
    return out


def _float64_input(tensor):
    shape = (None,) + tuple(tensor.shape[1:])
    return _keras().Input(batch_shape=shape, dtype="float64", name=tensor.name)


def _clone_graph_model(model, kind):
    keras = _keras()
    from keras import tree

    if kind == "sequential":
        inputs = _float64_input(model.inputs[0]) if model.inputs else None
    else:
        inputs = tree.map_structure(_float64_input, model.input)
    clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=_clone_layer)
    clone.set_weights([np.asarray(w, dtype=np.float64) for w in model.get_weights()])
    def inner(m):  # (a clone of a Sequential lists its InputLayer, the original may not)
        return [la for la in m._flatten_layers(include_self=False, recursive=True)
                if type(la).__name__ != "InputLayer"]
    for twin in inner(clone):
        # an adapted preprocessing layer (Normalization) computes what it uses from its
        # adapted weights once, when adapt() ends (and after loading weights, as Keras does)
        if callable(getattr(twin, "finalize_state", None)):
            twin.finalize_state()
    return clone


def _agrees(model, clone, parts) -> bool:
    """The clone reproduces the model's output (to the model's own precision)."""
    saved = [(v, np.array(v.numpy(), copy=True)) for v in model_variables(model)]
    try:  # a model may update its own state when called: put it back
        own = np.asarray(invoke(model, [tf.constant(p, dtype=model.compute_dtype)
                                        for p in parts]), dtype=np.float64)
    finally:
        for v, value in saved:
            if not np.array_equal(v.numpy(), value, equal_nan=True):
                v.assign(value)
    new = np.asarray(invoke(clone, [tf.constant(p, dtype="float64") for p in parts]))
    scale = 1 + np.abs(own).max(initial=0)
    return own.shape == new.shape and bool(np.abs(own - new).max(initial=0) <= 1e-3 * scale)


def _deepcopy_float64(model):
    """A deep copy of a (subclassed) Keras model whose every float variable, dtype policy
    and float constant attribute is float64; its ``__init__`` is never called, so any
    constructor arguments are fine. Layers are copied as shells whose attributes are deep
    copies (Keras' own ``__deepcopy__`` path would serialize the model through its config);
    optimizers, metrics and traced functions are shared (never called on the copy)."""
    keras = _keras()
    from keras.src.saving.keras_saveable import KerasSaveable
    from keras.src.utils.tracking import DotNotTrackScope, Tracker

    layers = list(model._flatten_layers(include_self=True, recursive=True))
    memo = {}
    for v in model.variables:
        floating = tf.as_dtype(v.dtype).is_floating
        new = keras.Variable(np.asarray(v.numpy(), np.float64 if floating else None),
                             dtype="float64" if floating else v.dtype,
                             trainable=v.trainable and floating, name=v.name)
        memo[id(v)] = new
        if hasattr(v, "_value") and hasattr(new, "_value"):
            memo[id(v._value)] = new._value
    policy = keras.DTypePolicy("float64")
    shells = {}
    for layer in layers:
        memo[id(layer._dtype_policy)] = policy
        shells[id(layer)] = memo[id(layer)] = object.__new__(type(layer))
        for value in vars(layer).values():
            for inner in [value] + list(getattr(value, "__dict__", {}).values()):
                # a seed generator's backend module, the backend handle of a preprocessing
                # layer (an adapted Normalization's DynamicBackend, whose __getattr__ recurses
                # on a copy made without __init__): shared, they cannot be copied
                if isinstance(inner, types.ModuleType) or type(inner).__name__ == "DynamicBackend":
                    memo[id(inner)] = inner
            if id(value) in memo:
                continue
            if tf.is_tensor(value) and not isinstance(value, tf.Variable) \
                    and value.dtype.is_floating:
                memo[id(value)] = tf.cast(value, tf.float64)
            elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
                memo[id(value)] = value.astype(np.float64)
            elif (isinstance(value, KerasSaveable) or hasattr(value, "get_concrete_function")) \
                    and not isinstance(value, (keras.layers.Layer, keras.Variable)):
                memo[id(value)] = value
    with DotNotTrackScope():  # the copied trackers already hold their (copied) stores
        for layer in layers:
            shells[id(layer)].__dict__.update(copy.deepcopy(dict(vars(layer)), memo))
    for layer in layers:
        tracker = vars(shells[id(layer)]).get("_tracker")
        if isinstance(tracker, Tracker):  # ids of the copies, not of the originals
            tracker.stored_ids = {name: {id(x) for x in store}
                                  for name, (_, store) in tracker.config.items()}
    return memo[id(model)]


def float64_copy(model):
    """A float64 copy of a Keras model with the same weights, or ``model`` itself when it
    is already float64 or is not a Keras model (a ``tf.Module`` or a plain callable, which
    then gets float64 inputs). Raises (with the reason) when no copy can be made.

    Sequential and functional models are cloned layer by layer in float64 (float64
    ``Input``s); other models (subclassed, with any ``__init__`` arguments) are deep-copied
    with float64 variables and dtype policies (:func:`_deepcopy_float64`). Every layer
    nested in the copy (the inner layers of ``Bidirectional`` and ``TimeDistributed``, the
    layers of a nested model) must come out float64: a copy that keeps one in float32 would
    give a float32 reference under a float64 name, so it is refused (``ValueError`` naming
    those layers). The caller checks that the copy computes in float64 and reproduces the
    model.
    """
    if not is_keras_layer(model) or _is_float64(model):
        return model
    kind = graph_kind(model)
    if kind is not None:
        try:
            clone = _clone_graph_model(model, kind)
            probe = [np.random.default_rng(0).normal(size=(4,) + tuple(t.shape[1:]))
                     for t in model.inputs]
            if not lower_precision_layers(clone) and _agrees(model, clone, probe):
                return clone
        except Exception:  # a layer Keras cannot clone from its config: copy it instead
            pass
    copy64 = _deepcopy_float64(model)
    lower = lower_precision_layers(copy64)
    if lower:
        raise ValueError(f"layer(s) {', '.join(lower[:5])} stay below float64 in the copy")
    return copy64
