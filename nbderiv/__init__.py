"""nbderiv: per-point derivatives of neural networks with respect to their inputs.

``import nbderiv`` imports no framework (neither torch nor TensorFlow), no matplotlib,
no IPython: each is loaded only when something needs it.

>>> import nbderiv
>>> [n for n in ('derivatives', 'explain', 'explore') if n in nbderiv.__all__]
['derivatives', 'explain', 'explore']
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "derivatives": "nbderiv.api",
    "diagnose": "nbderiv.api",
    "full_jacobian": "nbderiv.api",
    "explain": "nbderiv.explain",
    "Explanation": "nbderiv.explain",
    "Derivatives": "nbderiv.result",
    "Finding": "nbderiv.result",
    "NbderivError": "nbderiv.errors",
    "shared": "nbderiv.inputs",
    "plot_derivatives": "nbderiv.plot",
    "plot_jacobian": "nbderiv.plot",
    "plot_saliency": "nbderiv.plot_maps",
    "explore": "nbderiv.widgets",
    "compare_activations": "nbderiv.teaching",
}
__all__ = sorted(_EXPORTS) + ["load_ipython_extension", "unload_ipython_extension"]
# submodules the README names as ``nbderiv.<name>`` (framework-free, loaded on first use)
_SUBMODULES = ("memo", "result_memory")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"nbderiv.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbderiv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython):
    """``%load_ext nbderiv``: registers the ``%nnderiv`` magic (imports no framework)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as unload

    unload(ipython)
