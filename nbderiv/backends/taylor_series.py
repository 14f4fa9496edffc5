"""Truncated Taylor-series arithmetic shared by the Taylor modes of every backend.

Pure Python over anything that supports ``*`` and ``+`` (framework tensors, numpy arrays,
floats). A series is a list ``[c0, c1, ..., cK]`` standing for sum_k c_k t**k; ``None``
stands for an exact zero, so no work is spent on it.

>>> poly_derivatives([1.0, 0.0, -1.0], 2)   # tanh' = 1 - s**2, tanh'' = -2 s (1 - s**2)
[[1.0, 0.0, -1.0], [0.0, -2.0, 0.0, 2.0]]
>>> compose(0.0, [1.0, 0.0], [0.0, 1.0, 0.0], 2, scaled=False)   # sigma(t) to order 2
[0.0, 1.0, 0.0]
"""

from __future__ import annotations

import math


def poly_derivatives(base_poly, order):
    """Polynomials P_m (coefficient lists in s), m = 1..order, with sigma^(m) = P_m(s), for an
    activation whose derivative is a polynomial in its value: ds/dx = base_poly(s), so
    P_{m+1} = P_m' * base_poly."""
    polys = [[0.0, 1.0]]  # P_0(s) = s
    for _ in range(order):
        p = polys[-1]
        dp = [i * p[i] for i in range(1, len(p))] or [0.0]
        out = [0.0] * (len(dp) + len(base_poly) - 1)
        for i, a in enumerate(dp):
            for j, b in enumerate(base_poly):
                out[i + j] += a * b
        polys.append(out)
    return polys[1:]


def series_powers(c, order):
    """powers[m][k] = [t^k] (sum_{i>=1} c_i t^i)^m for m = 1..order (powers[0] is unused)."""
    first = [None] + list(c[1:])
    powers = [None, first]
    for m in range(2, order + 1):
        prev, cur = powers[m - 1], [None] * (order + 1)
        for k in range(m, order + 1):
            acc = None
            for i in range(1, k - m + 2):
                a, b = prev[k - i], c[i]
                if a is None or b is None:
                    continue
                acc = a * b if acc is None else acc + a * b
            cur[k] = acc
        powers.append(cur)
    return powers


def compose(y0, ders, c, order, *, scaled):
    """Taylor coefficients of sigma(x(t)) for the series ``c`` of x(t) (Faa di Bruno, truncated).

    ``y0`` = sigma(c0); ``ders[m-1]`` = sigma^(m)(c0), or sigma^(m)(c0) / m! when ``scaled``.
    """
    powers = series_powers(c, order)
    out = [y0]
    for k in range(1, order + 1):
        acc = None
        for m in range(1, k + 1):
            d, p = ders[m - 1], powers[m][k]
            if d is None or p is None:
                continue
            term = d * p if scaled or m == 1 else d * p / math.factorial(m)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out
