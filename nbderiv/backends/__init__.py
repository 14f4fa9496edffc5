"""The backend registry: which framework owns a model, answered without importing any.

A backend module (``nbderiv/backends/<framework>.py``) is imported only when its
framework is already in ``sys.modules`` (or named explicitly with ``framework=``), so
using nbderiv with torch never imports TensorFlow, and the reverse.

Order matters: Keras is checked before torch, because under ``KERAS_BACKEND=torch`` a
Keras model is also a ``torch.nn.Module``.

>>> from nbderiv.backends import known_frameworks
>>> known_frameworks()
('tensorflow', 'torch')
"""

from __future__ import annotations

import importlib
import sys

from ..errors import BackendError, ModelTypeError, OptionError
from ..wrapped import objects_inside, uncompiled

# name -> module that implements it, in detection order (Keras/TensorFlow before torch).
_MODULES = {"tensorflow": "nbderiv.backends.tensorflow", "torch": "nbderiv.backends.torch"}
_ALIASES = {"tf": "tensorflow", "keras": "tensorflow", "pytorch": "torch"}
_instances: dict = {}


def known_frameworks() -> tuple:
    return tuple(_MODULES)


def _loaded_class(module: str, *path: str):
    """A class from an already imported module, or None (never imports anything)."""
    obj = sys.modules.get(module)
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj if isinstance(obj, type) else None


def _isinstance_loaded(obj, *candidates) -> bool:
    classes = tuple(c for c in (_loaded_class(*cand) for cand in candidates) if c is not None)
    return bool(classes) and isinstance(obj, classes)


def _is_model_class(obj) -> bool:
    """Whether ``obj`` is a class of torch modules or Keras layers (not one of them)."""
    if not isinstance(obj, type):
        return False
    classes = tuple(c for c in (_loaded_class(*cand) for cand in (
        ("keras", "Layer"), ("keras", "layers", "Layer"), ("tensorflow", "Module"),
        ("torch", "nn", "Module"))) if c is not None)
    return bool(classes) and issubclass(obj, classes)


def _keras_backend_name() -> str | None:
    keras = sys.modules.get("keras")
    try:
        return keras.backend.backend() if keras is not None else None
    except Exception:  # pragma: no cover - exotic keras builds
        return None


def _framework_kind(obj) -> str | None:
    """'keras', 'tensorflow' (a tf.Module), 'torch', or None, from obj's class alone."""
    if _isinstance_loaded(obj, ("keras", "Layer"), ("keras", "layers", "Layer")):
        return "keras"
    if _isinstance_loaded(obj, ("tensorflow", "Module")):
        return "tensorflow"
    if _isinstance_loaded(obj, ("torch", "nn", "Module")):
        return "torch"
    if _isinstance_loaded(obj, ("tensorflow", "types", "experimental", "PolymorphicFunction"),
                          ("tensorflow", "types", "experimental", "GenericFunction")):
        return "tensorflow"  # a tf.function
    return None


def model_framework(obj) -> str | None:
    """'tensorflow' or 'torch' when ``obj`` is itself a model (a torch module, a Keras layer or
    model, a tf.Module), from its class alone; None for anything else (a function, a lambda,
    a NumPy ufunc), whatever it calls.

    >>> import numpy as np
    >>> model_framework(np.sin) is None
    True
    """
    return framework_of_model(obj) if _framework_kind(obj) is not None else None


def _keras_framework() -> str:
    backend = _keras_backend_name()
    if backend == "tensorflow":
        return "tensorflow"
    if backend == "torch":
        return "torch"  # a Keras-on-torch model is a torch.nn.Module computing with torch ops
    raise BackendError(
        f"this Keras model runs on the {backend!r} backend, which nbderiv does not support. "
        "Fix: set KERAS_BACKEND=tensorflow (or torch) before importing keras."
    )


def framework_of_model(model) -> str | None:
    """'tensorflow', 'torch', or None, from the model's class (its whole MRO); for a wrapper
    (a lambda, ``functools.partial``, bound method, closure or callable object), from the
    models it holds (:func:`nbderiv.wrapped.objects_inside`), Keras before torch.

    >>> framework_of_model(lambda x: x) is None
    True

    A ``torch.compile``'d module or function counts as the model it was given
    (:func:`nbderiv.wrapped.uncompiled`).
    """
    model = uncompiled(model)
    kind = _framework_kind(model)
    if kind is None and callable(model):
        kinds = _wrapper_kinds(model)
        kind = next((k for k in ("keras", "tensorflow", "torch") if k in kinds), None)
    return _keras_framework() if kind == "keras" else kind


def _of_model_or_input(model, x) -> str | None:
    """The model's framework, else x's; for a wrapper holding models of both frameworks, the
    one x belongs to."""
    model = uncompiled(model)
    name, from_x = framework_of_model(model), framework_of_input(x)
    if name is not None and from_x is not None and from_x != name \
            and _framework_kind(model) is None and len(_wrapper_kinds(model)) > 1:
        return from_x
    return name or from_x


def _wrapper_kinds(model) -> set:
    """The framework kinds of the models a wrapper holds ('keras', 'tensorflow', 'torch')."""
    return {k for k in map(_framework_kind, objects_inside(model)) if k is not None}


def framework_of_input(x) -> str | None:
    """'tensorflow', 'torch', or None, from the type of x (or of the first element of a tuple
    that tells, or of a list's first item: a list of tensors)."""
    if isinstance(x, tuple) and x:
        return next((f for f in map(framework_of_input, x) if f), None)
    if isinstance(x, list) and x:
        return framework_of_input(x[0])
    if _isinstance_loaded(x, ("torch", "Tensor")):
        return "torch"
    if _isinstance_loaded(x, ("tensorflow", "Tensor"), ("tensorflow", "Variable")):
        return "tensorflow"
    return None


def get_backend(name: str):
    """The backend instance for a framework name (imports its module, hence the framework)."""
    name = _ALIASES.get(name, name)
    if name not in _MODULES:
        raise OptionError(
            f"unknown framework {name!r}. Fix: use framework='torch' or framework='tensorflow'."
        )
    if name not in _instances:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise BackendError(
                f"framework {name!r} is not installed ({exc}). Fix: pip install 'nbderiv[{name}]'."
            ) from None
        _instances[name] = module.BACKEND
    return _instances[name]


def framework_name(model, x=None, framework=None) -> str | None:
    """The one rule that picks the framework, without importing any: ``framework`` if given,
    else the model's own (its class), else x's (its type), else the only framework already
    imported, else None.

    >>> framework_name(abs, framework="PyTorch")
    'torch'
    """
    if framework is not None:
        if not isinstance(framework, str):
            raise OptionError(f"framework must be a string such as 'torch', got {framework!r}. "
                              "Fix: framework='torch' or framework='tensorflow'.")
        name = _ALIASES.get(framework.lower(), framework.lower())
        if name not in _MODULES:
            raise OptionError(f"unknown framework {framework!r}. "
                              "Fix: use framework='torch' or framework='tensorflow'.")
        return name
    name = _of_model_or_input(model, x)
    if name is None:
        loaded = [n for n in _MODULES if n in sys.modules]
        name = loaded[0] if len(loaded) == 1 else None
    return name


def numpy_model_error(model):
    """The error for a NumPy function given as the model (np.sin, a ufunc), or None."""
    module = getattr(model, "__module__", None) or ""
    if type(model).__name__ != "ufunc" and module.split(".")[0] != "numpy":
        return None
    name = getattr(model, "__name__", type(model).__name__)
    return ModelTypeError(
        f"the model is the NumPy function np.{name}: nbderiv differentiates with the autodiff "
        "of torch or TensorFlow, and NumPy has none. Fix: use the framework's own function "
        f"(torch.{name} or tf.math.{name} where it exists, e.g. lambda z: torch.sin(z)); "
        "a NumPy function is welcome as reference= to compare a model with.")


def select_backend(model, x, framework=None):
    """The backend for this model and input, by :func:`framework_name`."""
    if numpy_model_error(model) is not None:
        raise numpy_model_error(model)
    if _is_model_class(model):
        raise ModelTypeError(
            f"model is the class {model.__module__}.{model.__qualname__}, not a model: calling "
            "a class builds a new layer, it does not run one. Fix: create the model first, e.g. "
            f"net = {model.__qualname__}(...) with its sizes (and its trained weights), then "
            "nbderiv.derivatives(net, x).")
    if framework is not None:
        chosen = framework_name(model, x, framework)
        # a torch module or a Keras model says its own (a function may mix them)
        own = framework_of_model(model) if _framework_kind(uncompiled(model)) else None
        if own is not None and own != chosen:
            raise OptionError(
                f"framework={framework!r}, but the model is a {own} model "
                f"({type(model).__name__}). Fix: leave framework out (nbderiv reads it from "
                f"the model), or pass framework={own!r}.")
        return get_backend(chosen)
    name = _of_model_or_input(model, x) if callable(model) else framework_of_model(model)
    if name is None:
        if not callable(model):
            raise ModelTypeError(
                f"model must be a torch.nn.Module, a Keras model, or a callable, got "
                f"{type(model).__name__}. Fix: pass the network itself (or a function of x)."
            )
        name = framework_of_input(x)
    if name is None:
        raise ModelTypeError(
            f"cannot tell which framework runs {type(model).__name__!s} on a "
            f"{type(x).__name__} input. Fix: pass framework='torch' or framework='tensorflow', "
            "or pass x as a torch / TensorFlow tensor."
        )
    return get_backend(name)
