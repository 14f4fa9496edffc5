"""Numbers that confirm a finding before it is raised, from the model's own forward passes.

A finding is a claim to a student, so each one that can be checked is checked at the points it
names: :func:`kinks_confirmed` compares one-sided slopes of the output (``at-kink``),
:func:`graph_consistency` compares autodiff with central differences of the forward pass
(``graph-broken``, ``saturated``). Only the backend's ``forwards`` (and ``float64_copy``) are
used, so this works for every framework. Points are evaluated one batch at a time; for a model
that couples points each probe point is evaluated inside the original batch.

>>> import numpy as np, torch
>>> from nbderiv.compute import open_call, probe
>>> call = open_call(torch.abs, torch.tensor([[0.0], [1.0]]), None)
>>> _ = probe(call)
>>> kinks_confirmed(call, [0, 1])
[0]
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np

KINK_CHECKS = 24       # at most this many candidate points are checked for a kink
GRAPH_POINTS = 4       # points at which autodiff is compared with the forward pass
_COUPLED_ROWS = 4096   # most rows evaluated for a model that couples points


def _forward_rows(call, queries, at, batch_rows=None):
    """The model's outputs (q, d_out) at ``queries`` ((q, D) features); ``at[r]`` is the
    point that query r stands in for (used for models that couple points: it replaces that
    point in the batch of the first ``batch_rows`` points, default all). None when the
    evaluation would be too large."""
    widths = call.widths
    cuts = np.cumsum(widths)[:-1]
    # one point: the probe could not see a coupling (batch statistics in training mode, a
    # mean over the batch), so each query runs alone, in a batch of one as the call did
    coupled = (call.verdict is not None and call.verdict.coupled) or call.n == 1
    if not coupled:
        (y,) = call.backend.forwards(call, [list(np.split(queries, cuts, axis=1))])
        return np.asarray(y, dtype=np.float64).reshape(queries.shape[0], -1)
    base = call.features()[:batch_rows]
    if queries.shape[0] * base.shape[0] > _COUPLED_ROWS:
        return None
    batches = []
    for q, n in zip(queries, at):
        full = base.copy()
        full[n] = q
        batches.append(list(np.split(full.astype(call.dtype), cuts, axis=1)))
    ys = call.backend.forwards(call, batches)
    return np.stack([np.asarray(y, dtype=np.float64)[n].reshape(-1) for y, n in zip(ys, at)])


def _directions(width: int, wrt, count: int, seed: int = 0) -> list:
    """Unit directions over the ``wrt`` features (zero elsewhere), (D,) each: the only one for
    a single feature, else ``count`` seeded random ones (never tangent to a kink surface,
    almost surely)."""
    if len(wrt) == 1:
        v = np.zeros(width)
        v[wrt[0]] = 1.0
        return [v]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        v = np.zeros(width)
        v[list(wrt)] = rng.normal(size=len(wrt))
        out.append(v / np.linalg.norm(v))
    return out


def _axes_or_random(width: int, wrt, most: int, count: int, seed: int) -> list:
    """Unit directions along each input of ``wrt`` (D,) when there are at most ``most`` of
    them, else ``count`` seeded random ones over them (:func:`_directions`)."""
    if len(wrt) > most:
        return _directions(width, wrt, count, seed=seed)
    dirs = []
    for i in wrt:
        v = np.zeros(width)
        v[i] = 1.0
        dirs.append(v)
    return dirs


def _diagonals(width: int, wrt) -> list:
    """Two unit directions across the inputs of ``wrt``: all of them together, and with
    alternating signs (along which x * y curves at a point where each axis alone is flat)."""
    out = []
    for signs in (np.ones(len(wrt)), np.where(np.arange(len(wrt)) % 2, -1.0, 1.0)):
        v = np.zeros(width)
        v[list(wrt)] = signs / np.sqrt(len(wrt))
        out.append(v)
    return out


def _moved(X, scale, dirs, steps) -> list:
    """The points ``X`` themselves, then moved by each step both ways (+, -) along each
    direction, in steps scaled by ``scale`` (1 + |x|): rows [X, (dir, step, sign)...]."""
    return [X] + [X + sign * step * v * scale for v in dirs for step in steps
                  for sign in (1.0, -1.0)]


def _effective_eps(call, y, half=False) -> float:
    """The rounding unit the outputs were computed with: float32's if every value is exactly a
    float32 (a "float64" copy that computed in float32), else the dtype's. ``half``: also
    bfloat16's or float16's if every value is exactly one (autocast inside the model, then
    ``.float()``); only where a larger unit can only withhold a claim (not for sweeps that
    look for jumps: small integer outputs are exact bfloat16 values too)."""
    eps = float(np.finfo(call.dtype).eps)
    f32 = float(np.finfo(np.float32).eps)
    if call.dtype == np.float64 and np.all(y.astype(np.float32).astype(np.float64) == y):
        eps = f32
    if half and eps <= f32:
        finite = y[np.isfinite(y)].astype(np.float32)
        if finite.size and np.array_equal(finite.astype(np.float64), y[np.isfinite(y)]):
            if not np.any(finite.view(np.uint32) & 0xFFFF):  # bfloat16: 8 bits of mantissa
                eps = 2.0 ** -7
            else:
                with np.errstate(over="ignore"):  # beyond float16's range: inf, not equal
                    half_again = finite.astype(np.float16).astype(np.float32)
                if np.array_equal(half_again, finite):
                    eps = float(np.finfo(np.float16).eps)
    return eps


def _float64_call(call):
    """The call on a float64 copy of the model (or the model's own dtype if none); one copy
    per call, shared by its checks (a TensorFlow copy is traced anew: seconds for an RNN)."""
    if call.dtype == np.float64:
        return call
    model = call.__dict__.get("_float64_model")
    try:
        if model is None:
            model = call.__dict__["_float64_model"] = call.backend.float64_copy(call.model)
    except Exception:  # the check is then done in the model's own dtype
        return call
    f64 = np.dtype("float64")
    return call.with_args([a.astype(f64) for a in call.args], model=model, dtype=f64,
                          verdict=call.verdict)


def kinks_confirmed(call, candidates, wrt=None, limit: int = KINK_CHECKS,
                    float64: bool = True, coarse: bool = False, d1=None):
    """The candidate points (at most ``limit`` are checked) at which the output's one-sided
    slopes differ: along a direction v, (f(x + hv) - f(x))/h and (f(x) - f(x - hv))/h differ
    beyond rounding, at two steps h and h/16 alike (a smooth curvature shrinks with h, a kink
    does not). A dead region (slope 0 on both sides) or a unit whose input is 0 on a whole
    neighbourhood is no kink. Evaluated in float64 where a float64 copy of the model exists.

    With ``d1`` (autodiff's first derivatives, rows = points): (kinks, conventions), where
    ``conventions`` are the other candidates, at which the output is smooth (its kinks cancel,
    as in relu(z) - relu(-z) = z) but autodiff's convention at the kinks (relu'(0) = 0) gives
    another slope than the converged central differences."""
    candidates = [int(n) for n in candidates][:limit]
    if not candidates:
        return [] if d1 is None else ([], [])
    wrt = tuple(range(call.input_width)) if wrt is None else tuple(wrt)
    c64 = _float64_call(call) if float64 else call
    X = c64.features()[candidates].astype(np.float64)
    scale = 1.0 + np.abs(X)                                     # (P, D)
    dirs = _directions(call.width, wrt, 2)
    h1 = 1e-5 if c64.dtype == np.float64 and not coarse else 1e-2
    steps = (h1, h1 / 16)
    rows, at = [X], list(candidates)
    for v in dirs:
        for h in steps:
            for sign in (1.0, -1.0):
                rows.append(X + sign * h * v * scale)
                at += candidates
    try:
        y = _forward_rows(c64, np.concatenate(rows).astype(c64.dtype), at)
    except Exception:
        if c64 is call:
            raise
        # no float64 copy after all (a function holding a float32 model): its own dtype
        return kinks_confirmed(call, candidates, wrt, limit, float64=False, coarse=True, d1=d1)
    if y is None:
        return [] if d1 is None else ([], [])
    P = len(candidates)
    y = y.reshape(len(rows), P, -1)
    eps = _effective_eps(c64, y)
    if eps > 1e-10 and h1 < 1e-3:  # the copy computed in float32 after all: redo with its steps
        return kinks_confirmed(call, candidates, wrt, limit, float64=False, coarse=True, d1=d1)
    f0 = y[0]
    confirmed = np.zeros(P, dtype=bool)
    off = np.zeros(P, dtype=bool)  # smooth, but autodiff's slope is another
    r = 1
    for v in dirs:
        jumps, noises, slopes, slope_noises = [], [], [], []
        for h in steps:
            plus, minus = y[r], y[r + 1]
            r += 2
            jumps.append(np.abs(plus - 2 * f0 + minus) / h)
            noises.append(16 * eps * (np.abs(plus) + 2 * np.abs(f0) + np.abs(minus)) / h
                          + 1e-6 * np.maximum(np.abs(plus - f0), np.abs(f0 - minus)) / h)
            slopes.append((plus - minus) / (2 * h))             # per unit of v * scale
            slope_noises.append(16 * eps * (np.abs(plus) + np.abs(minus)) / (2 * h))
        (j1, j2), (_, n2) = jumps, noises
        hit = (j2 > n2) & (j2 >= 0.3 * j1)
        confirmed |= np.nan_to_num(hit).any(axis=1)
        if d1 is not None:
            (s1, s2), (_, sn2) = slopes, slope_noises
            d1 = np.asarray(d1)
            known = np.array([n < d1.shape[0] for n in candidates])  # d1 of the first rows
            rows_d1 = np.full((P,) + d1.shape[1:], np.nan)
            rows_d1[known] = d1[[n for n in candidates if n < d1.shape[0]]]
            rows_d1 = rows_d1.reshape(P, s1.shape[1], -1)
            g = np.einsum("pjm,pm->pj", rows_d1, (v[None, :] * scale)[:, list(wrt)])
            converged = np.abs(s1 - s2) <= 0.25 * np.abs(s2 - g) + 2 * sn2
            wrong = (np.abs(s2 - g) > 8 * sn2 + 0.01 * (np.abs(g) + np.abs(s2))) & converged
            off |= np.nan_to_num(wrong & ~hit).any(axis=1)
    kinks = [n for n, c in zip(candidates, confirmed) if c]
    if d1 is None:
        return kinks
    return kinks, [n for n, c, o in zip(candidates, confirmed, off) if o and not c]


def graph_points(call, d1, skip=(), points: int = GRAPH_POINTS, extra=()) -> list:
    """The points :func:`graph_consistency` looks at: the first rows where x and d1 are
    finite, leaving out ``skip`` (points at a kink), then those of ``extra`` that are."""
    X_all = call.features()
    skip = set(skip)
    look = min(d1.shape[0], points + len(skip) + 64)  # the first rows hold enough candidates
    ok = np.isfinite(X_all[:look]).all(axis=1) & np.isfinite(
        d1[:look].reshape(look, -1)).all(axis=1)
    rows = np.flatnonzero(ok)
    chosen = rows[:points].tolist() if not skip else \
        list(itertools.islice((n for n in rows.tolist() if n not in skip), points))
    for n in extra:
        if n < d1.shape[0] and n not in skip and n not in chosen and \
                np.isfinite(X_all[n]).all() and np.isfinite(d1[n]).all():
            chosen.append(int(n))
    return chosen


def _narrow_scale(X_all, scale, eps) -> np.ndarray:
    """``scale`` (P, m), the steps' unit at each point (1 + |x|), brought down to the inputs'
    spread over all the points where that spread is narrow (under a tenth of 1 + max |x|:
    x in [-1e-4, 1e-4] for a model reading x / 1e-4, where steps of 1 + |x| span hundreds of
    its periods), but not below sqrt(eps) (1 + max |x|) (x's own rounding)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an input with no finite value
        finite = np.where(np.isfinite(X_all), X_all, np.nan).astype(np.float64)
        top = np.nan_to_num(np.nanmax(np.abs(finite), axis=0), nan=0.0)
        spread = np.nan_to_num(np.nanmax(finite, axis=0) - np.nanmin(finite, axis=0), nan=0.0)
    if X_all.shape[0] < 2:
        return scale
    unit = 1.0 + top
    narrow = (spread < 0.1 * unit) & (spread > 0)
    if not narrow.any():
        return scale
    small = np.maximum(spread, np.sqrt(eps) * unit)
    return np.where(narrow[None, :], np.minimum(scale, small[None, :]), scale)


def graph_consistency(call, d1, wrt, zero_inputs=(), skip=(), points: int = GRAPH_POINTS,
                      extra=(), at=None):
    """Autodiff against central differences of the forward pass, at up to ``points`` of the
    first rows of ``d1`` ((n, d_out, m), rows = points 0..n-1), in the model's dtype.

    Along ``zero_inputs`` (indices into ``wrt`` where autodiff says the output does not depend
    on that input) and two random directions, at steps h and h/4. Returns a dict:
    ``moves[i]`` = (points, outputs (d_out,) bool, largest slope) where input wrt[i] (one of
    ``zero_inputs``) changes the output beyond rounding; ``varies[i]`` = outputs (d_out,) bool
    that change with input wrt[i] without a slope (a stationary point: the change shrinks like
    h**2 or faster, so d1 = 0 is right there); ``curved`` (d_out,) bool: outputs that change
    evenly on both sides of some point along a random direction, more than they change
    oddly (a stationary point: a small gradient there is no saturation); ``disagree`` = points where the differences (converged: the same at both
    steps) and autodiff disagree; ``checked`` = the points looked at; ``fd_max`` (d_out,) the
    largest |finite-difference slope| per unit step along the random directions, scaled by
    the input's size; ``noise`` (d_out,) the rounding level of that estimate. ``at``: the
    points to look at, given (else :func:`graph_points` chooses them)."""
    n_rows = d1.shape[0]
    X_all = call.features()
    pts = graph_points(call, d1, skip, points, extra) if at is None else list(at)
    result = {"moves": {}, "disagree": [], "checked": pts, "fd_max": None, "noise": None}
    if not pts:
        return result
    X = X_all[pts].astype(np.float64)
    eps = float(np.finfo(call.dtype).eps)
    scale = _narrow_scale(X_all, 1.0 + np.abs(X), eps)
    h1 = 4 * eps ** (1 / 3)
    steps = (h1, h1 / 4)
    dirs = []
    for i in zero_inputs:
        v = np.zeros(call.width)
        v[wrt[i]] = 1.0
        dirs.append(("zero", i, v))
    dirs += [("random", None, v) for v in _directions(call.width, wrt, 2, seed=1)]
    rows = _moved(X, scale, [v for _, _, v in dirs], steps)  # the points themselves first: f0
    y = _forward_rows(call, np.concatenate(rows).astype(call.dtype), list(pts) * len(rows),
                      batch_rows=n_rows)
    if y is None:
        return result
    P = len(pts)
    y = y.reshape(len(rows), P, -1)
    eps = _effective_eps(call, y)
    # claims (a cut) allow for the rounding the outputs really have: bfloat16's under autocast
    claim = _effective_eps(call, y, half=True) / eps
    f0, y = y[0], y[1:]
    result["varies"] = {}
    curved = np.zeros(y.shape[2], dtype=bool)
    fd_max = np.zeros(y.shape[2])
    noise_max = np.zeros(y.shape[2])
    disagree = np.zeros(P, dtype=bool)
    r = 0
    for kind, i, v in dirs:
        fds, noises = [], []
        for h in steps:
            plus, minus = y[r], y[r + 1]
            r += 2
            fds.append((plus - minus) / (2 * h))               # (P, d_out), per unit of v*scale
            noises.append(32 * eps * (np.abs(plus) + np.abs(minus)) / (2 * h))
        (fd1, fd2), (_, noise2) = fds, noises
        g = np.einsum("pjm,pm->pj", d1[pts].astype(np.float64),
                      (v[None, :] * scale)[:, list(wrt)])
        converged = np.abs(fd1 - fd2) <= 0.25 * np.abs(fd2 - g) + 2 * noise2
        converged &= ~_kink_within(y[r - 4:r], f0, steps, fd2 - g, eps)
        if kind == "zero":
            moving = np.nan_to_num((np.abs(fd2) > 8 * claim * noise2) & converged)
            if moving.any():
                moving &= _finer_agree(call, X, scale, pts, v, steps[1], fd2, g, n_rows)
            hits = [pts[p] for p in np.flatnonzero(moving.any(axis=1))]
            if hits:
                # the slope in x's own units (the steps are scaled by 1 + |x|)
                slope = np.abs(fd2) / scale[:, [wrt[i]]]
                result["moves"][i] = (hits, moving.any(axis=0), np.nanmax(slope[moving]))
            # no slope, but the output changes (z**2 or z**3 at 0: a stationary point, where
            # d1 = 0 is right): the output depends on this input
            # (a change that shrinks with the step at least like h**2; a jump does not shrink)
            changes = []
            for back in (4, 2):  # the larger step, then the smaller one
                plus, minus = y[r - back], y[r - back + 1]
                change = np.fmax(np.abs(plus - f0), np.abs(minus - f0))
                noise = 8 * 32 * eps * (np.abs(plus) + np.abs(minus) + np.abs(f0)) + 1e-300
                changes.append((change, change > noise))
            (c1, seen1), (c2, seen2) = changes
            # (in float32 the smaller step's change, 16x smaller, may sink below rounding)
            varies = np.nan_to_num(seen1 & (~seen2 | (c2 <= 0.25 * c1)))
            if varies.any():
                result["varies"][i] = varies.any(axis=0)
        else:
            # a stationary point: the output changes along v, but evenly on both sides
            plus, minus = y[r - 4], y[r - 3]  # the larger step
            even, odd = np.abs(plus + minus - 2 * f0), np.abs(plus - minus)
            level = 8 * 32 * eps * (np.abs(plus) + np.abs(minus) + 2 * np.abs(f0)) + 1e-300
            curved |= np.nan_to_num((even > level) & (even > odd)).any(axis=0)
            off = (np.abs(fd2 - g) > 8 * claim * noise2 + 0.01 * (np.abs(g) + np.abs(fd2))) \
                & converged
            if np.nan_to_num(off).any():
                off &= _finer_agree(call, X, scale, pts, v, steps[1], fd2, g, n_rows)
            disagree |= np.nan_to_num(off).any(axis=1)
            fd_max = np.fmax(fd_max, np.nanmax(np.abs(fd2), axis=0))
            noise_max = np.fmax(noise_max, np.nanmax(noise2, axis=0))
    result["disagree"] = [pts[p] for p in np.flatnonzero(disagree)]
    result["fd_max"], result["noise"] = fd_max, noise_max
    result["curved"] = curved
    return result


def _kink_within(y, f0, steps, gap, eps) -> np.ndarray:
    """(P, d_out) bool: a kink lies within both steps of the point (``y``: the rows at +h,
    -h, +h/4, -h/4). There the central differences average two one-sided slopes (abs at
    x = -1e-6 with a step of 0.02 gives 0, not -1) and disagree with autodiff, which is right.
    The one-sided slopes differ by a jump that stays as the step shrinks; a smooth function's
    (its curvature) shrinks with the step. ``gap``: the disagreement to explain, fd - g."""
    evens = []
    for k, h in enumerate(steps):
        plus, minus = y[2 * k], y[2 * k + 1]
        evens.append((np.abs(plus + minus - 2 * f0) / h,
                      8 * 32 * eps * (np.abs(plus) + np.abs(minus) + 2 * np.abs(f0)) / h))
    (e1, _), (e2, noise2) = evens
    return np.nan_to_num((e2 > 0.5 * e1) & (e2 >= 0.5 * np.abs(gap)) & (e2 > noise2))


def _finer_agree(call, X, scale, pts, v, h, fd, g, n_rows) -> np.ndarray:
    """(P, d_out) bool: whether central differences along ``v`` at the finer steps h/4 and
    h/16 still give the slope ``fd`` (of step ``h``) rather than autodiff's ``g``, or are too
    rounded to tell. A frequency that step h cannot follow (sin(1000 x), a positional
    encoding in float32) averages out of the differences at every coarse step alike, which
    reads as converged; finer steps start to follow it and move towards autodiff."""
    rows, at = [], []
    for t in (h / 4, h / 16):
        for sign in (1.0, -1.0):
            rows.append(X + sign * t * v * scale)
            at += pts
    y = _forward_rows(call, np.concatenate(rows).astype(call.dtype), at, batch_rows=n_rows)
    if y is None:
        return np.zeros_like(fd, dtype=bool)
    y = y.reshape(len(rows), len(pts), -1)
    eps = _effective_eps(call, y, half=True)
    agree = np.ones_like(fd, dtype=bool)
    for k, t in enumerate((h / 4, h / 16)):
        plus, minus = y[2 * k], y[2 * k + 1]
        slope = (plus - minus) / (2 * t)
        noise = 32 * eps * (np.abs(plus) + np.abs(minus)) / (2 * t)
        blurred = 8 * noise >= np.abs(fd - g)     # too rounded at this step to tell
        agree &= blurred | (np.abs(slope - fd) <= 0.25 * np.abs(fd - g) + 2 * noise)
    return np.nan_to_num(agree)


def _float64_first(call, rows, wrt):
    """(the sub-call, its first derivative) of a float64 copy of a float32 (or lower) model on
    the points ``rows``, as one batch; None where there is no float64 copy, it computes in
    float32 inside (a function holding a model), or it fails."""
    c64 = _float64_call(call)
    if c64 is call:
        return None
    sub = c64.with_args([a[list(rows)] for a in c64.args], verdict=call.verdict)
    try:
        (y,) = call.backend.forwards(sub, [sub.args])
        if _effective_eps(sub, np.asarray(y, dtype=np.float64)) > 1e-10:
            return None
        return sub, call.backend.derivatives(sub, sub.args, 1, wrt).orders[0]
    except Exception:  # the copy is not a float64 model after all
        return None


def graph_consistency_float64(call, wrt, zero_inputs, pts, rows=None):
    """:func:`graph_consistency` again at the points ``pts``, on a float64 copy of a float32
    (or lower) model, with autodiff in float64 too; None where there is no float64 copy or it
    fails. float32's steps (about 2% of x) do not resolve a high frequency (sin(1000 x), a
    positional encoding), whose differences then read as a disagreement with autodiff, and
    its rounding can hide a small one: a disagreement is claimed only where float64 sees it.
    ``rows``: for a model that couples points, the batch (the first ``rows`` points) each
    point is evaluated in; else the points are evaluated alone."""
    if call.dtype == np.float64 or not pts:
        return None
    first = _float64_first(call, range(rows) if rows is not None else pts, wrt)
    if first is None:
        return None
    sub, d1 = first
    at = list(pts) if rows is not None else list(range(len(pts)))
    try:
        out = graph_consistency(sub, d1, wrt, zero_inputs, at=at)
    except Exception:  # the copy is not a float64 model after all: keep the first look
        return None
    if rows is None:  # rows of the sub-call -> the points they stand for
        out["checked"] = list(pts)
        out["disagree"] = [pts[p] for p in out["disagree"]]
        out["moves"] = {i: ([pts[p] for p in hits], outputs, top)
                        for i, (hits, outputs, top) in out["moves"].items()}
    return out


def float64_first_derivative(call, wrt, points):
    """The first derivative (len(points), d_out, len(wrt)) of a float64 copy of a float32 (or
    lower) model at ``points``, each point alone; None for a float64 model, one that couples
    its points, or where there is no float64 copy (or it computes in float32 inside)."""
    coupled = call.verdict is not None and call.verdict.coupled
    if call.dtype == np.float64 or not points or coupled or call.hidden_coupling is not None:
        return None
    first = _float64_first(call, points, wrt)
    if first is None:
        return None
    d1 = np.asarray(first[1], dtype=np.float64)
    return d1.reshape(d1.shape[0], d1.shape[1], -1)


def unchanged_nearby(call, points, wrt, outputs):
    """The points among ``points`` where ``outputs`` (indices) stay exactly as they are
    (within rounding) when x moves by a small step and by a quarter of it, both ways, along
    each input of ``wrt`` (4 random directions over them beyond 8 inputs): a flat piece of
    the output. None where some point shows a slope instead (the same central difference at
    both steps, beyond rounding: a graph autodiff does not see through, not a flat piece) or
    the model cannot be evaluated there. A point within a step of a piece's edge is neither."""
    if not points:
        return None
    X = call.features()[points].astype(np.float64)
    scale = 1.0 + np.abs(X)
    h = 16 * float(np.finfo(call.dtype).eps) ** 0.5
    dirs = _axes_or_random(call.width, wrt, most=8, count=4, seed=2)
    steps = (h, h / 4)
    rows = _moved(X, scale, dirs, steps)
    y = _forward_rows(call, np.concatenate(rows).astype(call.dtype), list(points) * len(rows))
    if y is None:
        return None
    y = y.reshape(len(rows), len(points), -1)[:, :, list(outputs)]       # (R, P, k)
    f0 = y[0]
    eps = _effective_eps(call, y)
    level = 8 * 32 * eps * np.abs(y).max(axis=0) + 1e-300                # (P, k)
    with np.errstate(invalid="ignore"):
        moved = ~(np.abs(y[1:] - f0) <= level).all(axis=(0, 2))           # NaN: moved
        d = y[1:].reshape(len(dirs), 2, 2, len(points), -1)              # dir, step, sign
        fd = (d[:, :, 0] - d[:, :, 1]) / (2 * np.array(steps)[None, :, None, None])
        both = (np.abs(d - f0) > level).all(axis=2).all(axis=1)          # (dirs, P, k)
        sloped = both & (np.abs(fd[:, 0] - fd[:, 1]) <= 0.25 * np.abs(fd[:, 1]))
    if np.any(sloped):
        return None
    return [p for p, m in zip(points, moved) if not m]


def curvature_seen(call, points, wrt) -> list:
    """The points among ``points`` where the forward pass curves: central second differences
    along each input of ``wrt`` (2 random directions beyond 4 inputs), in a float64 copy where
    there is one, are well above rounding and the same at two steps (a kink within the step
    gives no such agreement). Where autodiff's second derivative is exactly 0, such points
    show that it is not (a backward pass that cannot be differentiated again)."""
    if not points:
        return []
    c = _float64_call(call)
    try:
        return _curved(c, points, wrt)
    except Exception:  # the float64 copy cannot run these points (a copy of a function
        if c is call:  # around a float32 network): in the model's own dtype, else no claim
            return []
    try:
        return _curved(call, points, wrt)
    except Exception:
        return []


def _curved(c, points, wrt) -> list:
    X = c.features()[points].astype(np.float64)
    scale = 1.0 + np.abs(X)
    eps = float(np.finfo(c.dtype).eps)
    # below float64 the noise allowance (1024 eps / h**2) needs a wider step than eps**(1/4)
    h = eps ** 0.25 * (1 if c.dtype == np.float64 else 4)
    dirs = _axes_or_random(c.width, wrt, most=4, count=2, seed=3)
    if 2 <= len(wrt) <= 4:  # a saddle (x * y at 0) curves along diagonals only
        dirs += _diagonals(c.width, wrt)
    steps = (h, h / 2)
    rows = _moved(X, scale, dirs, steps)
    y = _forward_rows(c, np.concatenate(rows).astype(c.dtype), list(points) * len(rows))
    if y is None:
        return []
    y = y.reshape(len(rows), len(points), -1)
    eps = _effective_eps(c, y)
    f0 = y[0]
    d = y[1:].reshape(len(dirs), 2, 2, len(points), -1)                  # dir, step, sign
    s2 = (d[:, :, 0] + d[:, :, 1] - 2 * f0) / (np.array(steps)[None, :, None, None] ** 2 *
                                                (scale.max(axis=1) ** 2)[None, None, :, None])
    noise = 4 * 32 * eps * (np.abs(d).max(axis=2) + np.abs(f0)) / (
        np.array(steps)[None, :, None, None] ** 2 * (scale.max(axis=1) ** 2)[None, None, :, None])
    with np.errstate(invalid="ignore"):
        seen = (np.abs(s2[:, 1]) > 8 * noise[:, 1]) & \
            (np.abs(s2[:, 0] - s2[:, 1]) <= 0.25 * np.abs(s2[:, 1]))
    return [p for p, hit in zip(points, np.nan_to_num(seen).any(axis=(0, 2))) if hit]


REACH = (1.0, 3.0, 10.0, 30.0, 100.0)  # how far :func:`output_reach` moves x, in units of 1 + |x|


def output_reach(call, points, wrt, reach=REACH):
    """((d_out,) reach, (d_out,) growing): the largest change of each output when x moves far
    from ``points`` (along two random directions over the ``wrt`` features, both ways, by
    ``reach`` times 1 + |x|), how much the output can change at all; and whether that change
    still grows over the last stretch (by more than 2x from the last-but-one distance to the
    last: a polynomial, z**4 near its flat minimum, grows at least 3.3x; saturating units
    level off). A model whose units are saturated at the points wakes up farther out (its
    output then changes by about its own size); an output that is large only by a constant
    offset does not. None where the model fails or gives no finite value out there."""
    if not points:
        return None
    X = call.features()[points].astype(np.float64)
    scale = 1.0 + np.abs(X)
    directions = _directions(call.width, wrt, 2, seed=2)
    rows = [X] + [X + sign * t * v * scale for v in directions
                  for t in reach for sign in (1.0, -1.0)]
    y = _swept(call, rows, points)
    if y is None:
        return None
    y = y.reshape(len(rows), len(points), -1)
    with np.errstate(invalid="ignore"):
        change = np.abs(y[1:] - y[0])
    if not np.isfinite(change).any():
        return None
    change = np.where(np.isfinite(change), change, np.nan)
    # (directions, distances, signs, points, d_out) -> the largest change at each distance
    at = change.reshape(len(directions), len(reach), 2, len(points), -1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN at a distance
        by_distance = np.nanmax(at, axis=(0, 2, 3))            # (distances, d_out)
        growing = np.nan_to_num(by_distance[-1] > 2 * by_distance[-2], nan=False)
    return np.nanmax(change, axis=(0, 1)), growing


def jumps_only(call, points, inputs, wrt, reach: float = 0.5, steps: int = 24) -> dict:
    """{i: outputs (d_out,) bool} for the inputs wrt[i] (of ``inputs``, where autodiff says 0
    and small steps change nothing) along which the output changes in jumps only: a sweep of
    2 * ``steps`` + 1 evaluations over +-``reach`` * (1 + |x|) at ``points`` finds a few
    changes between neighbours, each between two stretches where the output stays exactly the
    same, and the largest of them stays as large when its interval is halved down to a few
    rounding steps of x (rounding, an integer cast, argmax: piecewise constant; a steep tanh
    spreads its change once the interval is narrow enough, a ReLU waking up changes at every
    step after its kink). Stairs too fine for the sweep (round(100 x) / 100: a jump at every
    evaluation) are looked for again over nearer ranges, down to ``reach`` / 256, as is a
    model that fails on the swept points (an index beyond a lookup table). Empty where none
    is found."""
    if not points or not inputs:
        return {}
    X = call.features()[points].astype(np.float64)
    scale = 1.0 + np.abs(X)
    found = {}
    for near in (reach, reach / 4, reach / 16, reach / 64, reach / 256):
        todo = [i for i in inputs if i not in found]
        if not todo:
            break
        directions = []
        for i in todo:
            v = np.zeros(call.width)
            v[wrt[i]] = 1.0
            directions.append(v)
        ts = np.linspace(-near, near, 2 * steps + 1)
        y = _swept(call, [X + t * v * scale for v in directions for t in ts], points)
        if y is None:
            continue
        found.update(_stairs(call, X, scale, directions, todo, ts, y, points, steps))
    return found


def _stairs(call, X, scale, directions, inputs, ts, y, points, steps) -> dict:
    """{i: outputs (d_out,) bool} of :func:`jumps_only` for one sweep ``y`` over ``ts``."""
    eps = _effective_eps(call, y)
    y = y.reshape(len(inputs), len(ts), len(points), -1)
    found = {}
    for a, (i, yi) in enumerate(zip(inputs, y)):
        step = np.abs(np.diff(yi, axis=0))                      # (2 steps, P, d_out)
        noise = 32 * eps * (np.abs(yi[1:]) + np.abs(yi[:-1]))
        changed = np.nan_to_num(step > 8 * noise + 1e-300)
        count = changed.sum(axis=0)                             # (P, d_out)
        # each jump between two exactly flat stretches (a saturating tanh also changes less
        # than rounding next to its last visible step, but not by exactly 0)
        flat = np.pad(step == 0, ((1, 1), (0, 0), (0, 0)), constant_values=True)
        jumps_alone = ~(changed & ~(flat[:-2] & flat[2:])).any(axis=0)
        stairs = (count >= 1) & (count <= steps // 3) & jumps_alone
        if stairs.any():
            stairs &= _still_jumps(call, X, scale, directions[a], ts, yi, step, stairs, points)
        if stairs.any():
            found[i] = stairs.any(axis=0)
    return found


def _swept(call, rows, points):
    """The model's outputs at the swept rows (for ``points`` each), or None where the model
    fails there (e.g. an index moved out of an embedding's range)."""
    try:
        return _forward_rows(call, np.concatenate(rows).astype(call.dtype),
                             list(points) * len(rows))
    except Exception:
        return None


def _still_jumps(call, X, scale, v, ts, y, step, stairs, points) -> np.ndarray:
    """(P, d_out) bool: whether each point's largest change along ``v`` (of the swept ``y``,
    its neighbour differences ``step``) is still a jump of at least a quarter of its size
    once its interval is halved down to a few rounding steps of x."""
    P = X.shape[0]
    k = np.argmax(np.where(stairs[None], step, -1).max(axis=2), axis=0)   # (P,) the jump
    lo, hi = ts[k].copy(), ts[k + 1].copy()
    y_lo, y_hi = y[k, np.arange(P)], y[k + 1, np.arange(P)]              # (P, d_out)
    jump = np.abs(y_hi - y_lo)
    resolution = 4 * float(np.finfo(call.dtype).eps)
    for _ in range(64):
        if np.all(hi - lo <= resolution):
            break
        mid = (lo + hi) / 2
        y_mid = _swept(call, [X + mid[:, None] * v * scale], points)
        if y_mid is None:
            return np.zeros_like(stairs)
        y_mid = y_mid.reshape(P, -1)
        left = np.abs(y_mid - y_lo).max(axis=1) >= np.abs(y_hi - y_mid).max(axis=1)
        hi, y_hi = np.where(left, mid, hi), np.where(left[:, None], y_mid, y_hi)
        lo, y_lo = np.where(left, lo, mid), np.where(left[:, None], y_lo, y_mid)
    return stairs & (np.abs(y_hi - y_lo) >= 0.25 * jump)
