"""Framework-free assertions shared by the test modules (imported as ``from checks import``)."""

from __future__ import annotations

import numpy as np


def assert_close(got, ref, tol, what=""):
    """max |got - ref| <= tol * max(1, max |ref|), compared in float64; shapes must agree."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def keras_or_skip():
    """The keras module with nbderiv's Keras/TensorFlow backend importable, or the test
    skipped (imported only when called: a torch-only run never loads TensorFlow)."""
    import os

    import pytest

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = pytest.importorskip("keras")
    try:
        import nbderiv.backends.tensorflow  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the Keras/TensorFlow backend is not importable: {exc}")
    return keras


def per_point_differences(f, x, h=1e-6):
    """dy_n/dx_n, (n, d_out, m), by float64 central differences of ``f`` on the whole batch
    ((n, m) NumPy array -> (n, d_out)), every other point held fixed: the truth for a model
    whose forward pass couples points where autodiff does not see it."""
    x = np.asarray(x, dtype=np.float64)
    n, m = x.shape
    out = None
    for i in range(n):
        for j in range(m):
            plus, minus = x.copy(), x.copy()
            plus[i, j] += h
            minus[i, j] -= h
            col = (np.asarray(f(plus)) - np.asarray(f(minus)))[i].reshape(-1) / (2 * h)
            if out is None:
                out = np.zeros((n, col.shape[0], m))
            out[i, :, j] = col
    return out


def nbderiv_shell(setup: str):
    """IPython's shell with ``%load_ext nbderiv`` done (once) and ``setup`` run in it."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    if "nbderiv" not in ip.extension_manager.loaded:
        with capture_output():
            ip.run_line_magic("load_ext", "nbderiv")
    ip.run_cell(setup, store_history=False)
    return ip
