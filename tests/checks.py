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
