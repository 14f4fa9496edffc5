"""nbderiv benchmark: per-point input derivatives, nbderiv against the hand-written idioms.

    python benchmarks/run.py                      # full run (``make bench``), < 10 min on 2 cores
    python benchmarks/run.py --quick              # smoke run, < 1 min
    python benchmarks/run.py --framework torch --device cuda --out benchmarks/results/gpu

How it measures (see benchmarks/README.md):
- one worker process per framework; inside it, for each case (model, order, N) every
  competitor runs once as warm-up (that call also gives its in-process peak-memory
  increase and its result, compared with a float64 truth), then ``reps`` repetitions
  round-robin over the competitors (rotating the start), and the median is reported;
- idioms predicted (from the previous N) to take longer than ``--max-call`` seconds per call,
  or to need more than ``--max-bytes``, are skipped and say so (forward and nbderiv never);
- after the cases, t(large N) / t(small N) of nbderiv is timed side by side, both sizes in
  the same rounds (``_run_scaling``);
- peak memory of the big cases comes from a fresh subprocess per case, two at a time:
  ``ru_maxrss`` after each competitor's call, the high-water mark reset before it;
- the main process imports no framework; it merges, prints, and writes JSON, CSV and a
  Markdown table with the machine and versions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import ctypes
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

MODELS = {  # name: layer sizes (tanh between linear layers)
    "A": [1, 64, 64, 64, 1],
    "B": [2, 128, 128, 128, 1],
    "C": [1, 50, 50, 50, 501],
}
NS = [100, 1_000, 10_000, 100_000]
FULL_CASES = ([("A", k, NS) for k in (1, 2, 3, 4)] + [("A", 2, [1_000_000])]
              + [(m, k, NS) for m in ("B", "C") for k in (1, 2)])
QUICK_CASES = [("A", 1, [100, 1_000]), ("A", 2, [1_000]), ("A", 4, [1_000]), ("C", 1, [1_000])]
FULL_SCALING = ((10_000, 100_000), (100_000, 1_000_000))  # t(large)/t(small), side by side
QUICK_SCALING = ((100, 1_000),)
FORWARD_SCALING_ROUNDS = 3
# nbderiv's TensorFlow backend compiles a shape with XLA on its second run: two warm-up calls
# keep that one-time compile out of the timed repetitions, as tracing is kept out for the
# idioms
WARMUP_CALLS = {"nbderiv": 2}
TRUTH_POINTS = 10_000          # errors are checked on at most this many (evenly spaced) points
CORRECT_REL = 5e-2             # an idiom only counts as "best" if its max relative error is below
NESTED_IDIOMS = ("autograd.grad nested", "GradientTape nested (eager)",
                 "GradientTape nested (tf.function)")
FRAMEWORK_MODULES = {"torch": "idioms_torch", "tensorflow": "idioms_tensorflow"}


# -- shared data: the same weights and points for every framework --------------------------
def weights_for(model: str, seed: int = 0):
    """[(kernel (in, out), bias (out,))] float32, PyTorch's default uniform initialisation."""
    import numpy as np

    rng = np.random.default_rng([seed, ord(model)])
    sizes = MODELS[model]
    out = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        bound = 1 / np.sqrt(a)
        out.append((rng.uniform(-bound, bound, (a, b)).astype(np.float32),
                    rng.uniform(-bound, bound, b).astype(np.float32)))
    return out


def points_for(model: str, n: int, seed: int = 1):
    import numpy as np

    rng = np.random.default_rng([seed, ord(model), n])
    return rng.uniform(-1, 1, (n, MODELS[model][0])).astype(np.float32)


def describe(model: str) -> str:
    return "→".join(map(str, MODELS[model])) + " tanh"


# -- memory probes (Linux) ------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else None


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Resident-memory high-water mark around one call: resets VmHWM via clear_refs."""

    def __enter__(self):
        _trim()
        self.ok = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = True
        except OSError:
            self.ok = False
        self.base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _status_kb("VmHWM")
        self.delta_mb = (peak - self.base) / 1024 if self.ok and peak and self.base else None
        return False


class TensorMemory:
    """Peak increase of the framework's own tensor memory around one call, where its allocator
    keeps statistics (TensorFlow's BFC allocator: a pool that grows in doubling regions and is
    never handed back, so the resident-set increase says little there); else delta_mb is None."""

    def __init__(self, mod):
        self.mod, self.delta_mb = mod, None

    def __enter__(self):
        reset = getattr(self.mod, "tensor_memory_reset", None)
        self.before = None
        if reset is not None:
            reset()
            self.before = self.mod.tensor_memory_mb()
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            after = self.mod.tensor_memory_mb()
            if after is not None:
                self.delta_mb = after[1] - self.before[0]
        return False


# -- the worker: one framework, all cases, in one process ----------------------------------
def _load_framework(framework, threads=0):
    mod = importlib.import_module(FRAMEWORK_MODULES[framework])
    mod.set_threads(threads)
    nbd = None
    nbd_error = None
    try:
        import nbderiv

        if framework != "torch":
            importlib.import_module(f"nbderiv.backends.{framework}")
        nbd = nbderiv
    except Exception as exc:  # the backend may not exist yet: the idioms still run
        nbd_error = f"{type(exc).__name__}: {exc}"
    return mod, nbd, nbd_error


def _timed(comp):
    """(seconds, result) of one call, the garbage collector paused during it. No collection
    here: a full collection walks every Python object and leaves the CPU caches cold, which
    added about 0.7 ms to the next TensorFlow call at N = 10 000 (2.1 -> 2.85 ms, measured).
    The callers collect once per round instead (see _collect)."""
    gc.disable()
    try:
        comp.sync()
        t0 = time.perf_counter()
        result = comp.run()
        comp.sync()
        return time.perf_counter() - t0, result
    finally:
        gc.enable()


def _subset(n):
    import numpy as np

    if n <= TRUTH_POINTS:
        return None
    return np.linspace(0, n - 1, TRUTH_POINTS).round().astype(np.int64)


def _error(values, truth, sel):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if sel is not None:
        values = values[sel]
    if values.shape != truth.shape:
        return None, None, f"shape {values.shape} != truth {truth.shape}"
    diff = np.abs(values - truth)
    if not np.all(np.isfinite(diff)):
        return float("inf"), float("inf"), "non-finite"
    err = float(diff.max())
    scale = float(np.abs(truth).max()) or 1.0
    return err, err / scale, None


def _skip_reason(args, c, n, prev, forward_s):
    """Why this competitor is not run at this size, or ''."""
    if prev is not None and prev[1] is None:
        return f"failed at N={prev[0]:,}: {prev[2]}"
    if c.kind in ("nbderiv", "forward"):  # what the targets are about: always measured
        return ""  # (nbderiv chunks by its own memory_budget; forward is the unit)
    predicted = None
    if prev is not None and prev[0] < n:
        predicted = prev[1] * (n / prev[0]) ** c.scaling
    elif c.units_at is not None and forward_s:
        predicted = forward_s * c.units_at(n)
    if predicted is not None and predicted > args.max_call:
        return f"predicted {predicted:.3g} s per call > --max-call {args.max_call:g} s"
    need = None
    if prev is not None and prev[2] is not None and prev[2] > 16 and prev[0] < n:
        need = 1.5 * prev[2] * 2**20 * (n / prev[0]) ** c.mem_scaling  # measured, extrapolated
    elif c.bytes_at is not None:
        need = c.bytes_at(n)
    if need is not None and need > args.max_bytes:
        return (f"needs ~{need / 2**30:.3g} GiB > --max-bytes {args.max_bytes / 2**30:g} GiB")
    return ""


class _CallTimeout(Exception):
    def __str__(self):
        return self.args[0] if self.args else "warm-up call ran past --call-timeout"


ALARM_RECHECK_S = 0.002  # inside framework code when the time is up: look again this soon


@contextlib.contextmanager
def _alarm(seconds):
    """Abandon a runaway warm-up call after ``seconds``, between framework calls.

    No signal is used: a watchdog thread waits, then raises :class:`_CallTimeout` in the main
    thread (``PyThreadState_SetAsyncExc``) only while that thread is in the benchmark's own
    code (a file of this folder: the idioms' loops, this harness), never inside PyTorch's or
    TensorFlow's internals; there it looks again every ``ALARM_RECHECK_S``. A call that never
    comes back to benchmark code (one framework call, or an idiom that spends nearly all its
    time inside the framework) therefore finishes, and the caller reports it as past the time.

    It used to be a SIGALRM timer whose handler raised wherever the main thread was.
    The quick run's 3 s timeout fired in every run (TensorFlow's eager nested GradientTape on
    model C, 501 outputs), and a SIGALRM during that TensorFlow computation corrupted its heap,
    even with a handler that raised nothing: the worker later aborted ("corrupted size vs.
    prev_size") or raised ``IndexError`` from ``pfor``, all TensorFlow rows were lost, and
    three tests of tests/test_benchmarks.py failed together, now and then."""
    main_id = threading.main_thread().ident
    done, lock, armed = threading.Event(), threading.Lock(), [True]

    def watch():
        if done.wait(seconds):
            return
        while True:
            with lock:
                if not armed[0]:
                    return
                frame = sys._current_frames().get(main_id)
                if frame is not None and _benchmark_code(frame.f_code):
                    armed[0] = False
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main_id),
                                                              ctypes.py_object(_CallTimeout))
                    return
            if done.wait(ALARM_RECHECK_S):
                return

    if threading.get_ident() != main_id:
        raise RuntimeError("_alarm watches the main thread only")
    watchdog = threading.Thread(target=watch, name="call-timeout", daemon=True)
    watchdog.start()
    try:
        yield
    except _CallTimeout as exc:
        if exc.args:
            raise
        raise _CallTimeout(f"warm-up call ran past --call-timeout {seconds:g} s") from None
    finally:
        with lock:
            armed[0] = False
        done.set()
        watchdog.join()


def _benchmark_code(code) -> bool:
    """Is ``code`` the benchmark's own (a file in this folder, not the alarm's clean-up)?"""
    return code.co_filename.startswith(str(HERE) + os.sep) and code not in _ALARM_CODES


_ALARM_CODES = {_alarm.__wrapped__.__code__}


def run_worker(args) -> list:
    mod, nbd, nbd_error = _load_framework(args.framework, args.threads)
    device = args.device if args.framework == "torch" else "cpu"
    getattr(mod, "check_device", lambda d: None)(device)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.models:
        cases = [c for c in cases if c[0] in args.models]
    if args.orders:
        cases = [c for c in cases if c[1] in args.orders]
    if nbd_error:
        _log(f"[{args.framework}] nbderiv rows left out: {nbd_error}")
    entries, last = [], {}  # last[(model, order, name)] = (n, seconds) for predictions
    for model_name, order, ns in cases:
        weights = weights_for(model_name)
        model = mod.build_model(weights, device)
        for n in ns:
            entries += _run_case(args, mod, nbd, model, model_name, order, n, device, last)
        del model
        _trim()
    scaling = []
    if nbd is not None:
        sizes = QUICK_SCALING if args.quick else FULL_SCALING
        for model_name, order, small, large in scaling_pairs(cases, sizes):
            try:
                scaling.append(_run_scaling(args, mod, nbd, model_name, order, small, large,
                                            device))
            except Exception as exc:  # reported; the rows of the cases are kept
                _log(f"[{args.framework}] scaling {model_name} order {order} failed: "
                     f"{type(exc).__name__}: {str(exc)[:200]}")
            _trim()
    return entries, scaling


def scaling_pairs(cases, sizes=FULL_SCALING) -> list:
    """(model, order, small N, large N) for each (small, large) of ``sizes`` that a model and
    order are measured at: in the full run the time-proportional-to-N targets, 10 000 against
    100 000 and 100 000 against 1 000 000.

    >>> scaling_pairs([("A", 2, [10_000, 100_000]), ("A", 2, [1_000_000]), ("B", 1, [100])])
    [('A', 2, 10000, 100000), ('A', 2, 100000, 1000000)]
    """
    measured = {}
    for model_name, order, ns in cases:
        measured.setdefault((model_name, order), set()).update(ns)
    pairs = []
    for (model_name, order), ns in measured.items():
        for small, large in sizes:
            if small in ns and large in ns:
                pairs.append((model_name, order, small, large))
    return pairs


def _run_scaling(args, mod, nbd, model_name, order, small, large, device) -> dict:
    """t(large) / t(small), the two sizes timed side by side: each round calls nbderiv three
    times at the small N and once at the large one, the order of the two alternating between
    rounds (5 rounds where the large call takes over half a second, else ``reps``). The forward
    pass, for comparison, once at each size in the first ``FORWARD_SCALING_ROUNDS`` rounds.
    Measured in separate cases minutes apart, the two medians can fall into different phases
    of a shared machine's load, and their ratio then swings by ±20 %; side by side, both see
    the same conditions."""
    t0 = time.perf_counter()
    model = mod.build_model(weights_for(model_name), device)
    comps = {}
    for n in (small, large):
        X = mod.as_tensor(points_for(model_name, n), device)
        for c in mod.competitors(model, X, order, device, nbd):
            if c.kind in ("forward", "nbderiv"):
                comps[(c.kind, n)] = c
    times = {key: [] for key in comps}
    warm = {}
    for key, c in comps.items():  # warm-up (tracing, compilation, caches)
        for _ in range(WARMUP_CALLS.get(c.kind, 1)):
            warm[key] = _timed(c)[0]
    rounds = min(args.reps, 5) if warm[("nbderiv", large)] > 0.5 else args.reps
    for r in range(rounds):
        gc.collect()
        plan = [("nbderiv", n) for n in (small, small, small, large)]
        if r < FORWARD_SCALING_ROUNDS:
            plan += [("forward", small), ("forward", large)]
        for key in (plan if r % 2 == 0 else plan[::-1]):
            seconds, result = _timed(comps[key])
            del result
            times[key].append(seconds)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    out = dict(framework=args.framework, device=str(device), model=model_name, order=order,
               small=small, large=large, reps=rounds,
               times_s={f"{kind} {n}": ts for (kind, n), ts in times.items()})
    for kind in ("nbderiv", "forward"):
        out[f"{kind}_small_s"], out[f"{kind}_large_s"] = med[(kind, small)], med[(kind, large)]
        out[f"{kind}_ratio"] = med[(kind, large)] / med[(kind, small)]
    _log(f"[{args.framework}] scaling {model_name} order {order} N={small:,} -> {large:,}: "
         f"nbderiv {out['nbderiv_ratio']:.2f}, forward {out['forward_ratio']:.2f} "
         f"({rounds} rounds, {time.perf_counter() - t0:.1f} s)")
    del model, comps
    return out


def _run_case(args, mod, nbd, model, model_name, order, n, device, last):

    x = points_for(model_name, n)
    X = mod.as_tensor(x, device)
    sel = _subset(n)
    t0 = time.perf_counter()
    truth = mod.truth(model, mod.as_tensor(x if sel is None else x[sel], device), order)
    truth_s = time.perf_counter() - t0
    comps = mod.competitors(model, X, order, device, nbd)
    gc.collect()
    gc.freeze()  # what exists now is never garbage: keeps each round's collection cheap
    base = dict(framework=args.framework, device=str(device), model=model_name, order=order, n=n,
                checked_points=int(n if sel is None else len(sel)))
    rows, active, warm = {}, [], {}
    for c in comps:
        row = dict(base, competitor=c.name, kind=c.kind, status="ok", reason="")
        rows[c.name] = row
        why = _skip_reason(args, c, n, last.get((model_name, order, c.name)),
                           warm.get("forward"))
        if why:
            row.update(status="skipped", reason=why)
            continue
        # warm-up: one call, with its peak memory and its error against the truth
        gc.collect()
        try:
            with PeakMemory() as pm, TensorMemory(mod) as tm, _alarm(args.call_timeout):
                seconds, result = _timed(c)
            row["peak_delta_mb"] = pm.delta_mb if tm.delta_mb is None else tm.delta_mb
            if c.kind == "nbderiv":
                row["method"] = getattr(result, "method", "")
            if c.standard is not None:
                err, rel, why = _error(c.standard(result), truth, sel)
                row.update(err_abs=err, err_rel=rel)
                if why:
                    row["reason"] = why
            del result
        except Exception as exc:  # an idiom that fails (e.g. out of memory) is reported
            _failed(row, last, (model_name, order, c.name), n, exc)
            _trim()
            continue
        if seconds > args.call_timeout:  # one framework call, not interruptible (see _alarm)
            _failed(row, last, (model_name, order, c.name), n, _CallTimeout(
                f"warm-up call took {seconds:.3g} s, past --call-timeout {args.call_timeout:g} s"))
            continue
        if args.max_call < seconds <= args.call_timeout / 2 or \
                WARMUP_CALLS.get(c.kind, 1) > 1 and seconds <= args.call_timeout / 2:
            # the first call may include one-time work (tracing, caches): time a second one
            try:
                with _alarm(args.call_timeout):
                    seconds, result = _timed(c)
                del result
            except Exception as exc:
                _failed(row, last, (model_name, order, c.name), n, exc)
                continue
        active.append(c)
        warm[c.name] = seconds
        last[(model_name, order, c.name)] = (n, seconds, pm.delta_mb)
    # repetitions, round robin over the fast competitors and always over forward and nbderiv;
    # a slow idiom (> --slow-call) is timed once more after its warm-up, one past --max-call
    # not at all (its second call is kept)
    repeat = [c for c in active if warm[c.name] <= args.slow_call
              or (c.kind in ("forward", "nbderiv") and warm[c.name] <= args.max_call)]
    once = [c for c in active if c not in repeat and warm[c.name] <= args.max_call]
    per_rep = sum(warm[c.name] for c in repeat)
    reps = args.reps
    if per_rep > 0:
        reps = max(args.min_reps, min(args.reps, int(args.case_budget / per_rep)))
    times = {c.name: [] for c in active}
    for r in range(reps if repeat else 0):
        k = r % len(repeat)
        gc.collect()  # once per round: the cold caches after it fall on a rotating competitor
        for c in repeat[k:] + repeat[:k]:
            if c not in active:  # failed in an earlier round
                continue
            try:
                seconds, result = _timed(c)
            except Exception as exc:  # reported on its row; the other competitors go on
                _failed(rows[c.name], last, (model_name, order, c.name), n, exc)
                active.remove(c)
                continue
            if c.kind == "nbderiv":  # the method of the timed calls (a JIT may differ from warm-up)
                rows[c.name]["method"] = getattr(result, "method", rows[c.name].get("method"))
            del result
            times[c.name].append(seconds)
    for c in once:  # three times (the median) up to 0.5 s per call, else once
        for _ in range(3 if warm[c.name] <= 0.5 else 1):
            gc.collect()
            try:
                seconds, result = _timed(c)
            except Exception as exc:
                _failed(rows[c.name], last, (model_name, order, c.name), n, exc)
                active.remove(c)
                break
            del result
            times[c.name].append(seconds)
    for c in active:
        row = rows[c.name]
        ts = times[c.name] or [warm[c.name]]
        row.update(median_s=statistics.median(ts), times_s=ts, reps=len(times[c.name]),
                   warmup_s=warm[c.name])
        if not times[c.name]:
            row["reason"] = (row["reason"] + "; " if row["reason"] else "") + \
                "one call after the warm-up only: slower than --max-call"
        last[(model_name, order, c.name)] = (n, row["median_s"], row.get("peak_delta_mb"))
    fwd = rows.get("forward", {}).get("median_s")
    _log(f"[{args.framework}] {model_name} order {order} N={n:>7}: "
         + ", ".join(f"{name}={_fmt_s(r.get('median_s'))}" for name, r in rows.items())
         + f"  (truth {truth_s:.2f} s, {reps} reps, case {time.perf_counter() - t0:.1f} s)")
    out = list(rows.values())
    for row in out:
        row["truth_s"] = truth_s
        if fwd and row.get("median_s"):
            row["ratio_forward"] = row["median_s"] / fwd
    del X, truth
    gc.unfreeze()
    _trim()
    return out


def _failed(row, last, key, n, exc):
    """Mark a competitor's row as failed (the reason kept) and keep it out of larger N."""
    row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
    for k in ("median_s", "times_s", "reps", "warmup_s"):
        row.pop(k, None)
    last[key] = (n, None, row["reason"])


# -- memory children: one fresh process per case ---------------------------------------------
def run_memory_child(args) -> dict:
    """Peak resident memory of one call of each named competitor, one after another in this
    fresh process: before each call the freed heap is trimmed and the kernel's high-water
    mark is reset (/proc/self/clear_refs), so ru_maxrss afterwards is that call's peak."""
    mod, nbd, nbd_error = _load_framework(args.framework, args.threads)
    device = args.device if args.framework == "torch" else "cpu"
    model = mod.build_model(weights_for(args.model), device)
    X = mod.as_tensor(points_for(args.model, args.n), device)
    comps = {c.name: c for c in mod.competitors(model, X, args.order, device, nbd)}
    out = {}
    for name in args.competitor.split("|"):
        reset = getattr(mod, "device_peak_reset", None)
        if reset is not None:
            reset(device)
        if name not in comps:
            out[name] = {"error": f"{name} is not available here"
                         + (f" ({nbd_error})" if name == "nbderiv" and nbd_error else "")}
            continue
        with PeakMemory() as pm:
            try:
                with _alarm(args.call_timeout):
                    seconds, result = _timed(comps[name])
                del result
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out[name] = {"peak_rss_mb": peak_kb / 1024, "base_rss_mb": (pm.base or 0) / 1024,
                     "hwm_reset": pm.ok, "seconds": seconds}
        dev = getattr(mod, "device_peak_mb", None)
        if dev is not None and dev(device) is not None:
            out[name]["device_peak_mb"] = dev(device)
        _trim()
    return out


def measure_memory(args, entries, python, budget_s):
    """Subprocess peak RSS for the cases with N >= --memory-min-n: one process per case, two
    at a time (each reads only its own peak; the times of this phase are not reported)."""
    cases = {}
    for e in entries:
        key = e["kind"] in ("forward", "nbderiv") or e.get("best_idiom") or \
            e["competitor"] in NESTED_IDIOMS
        if e["status"] == "ok" and e["n"] >= args.memory_min_n and (
                e["kind"] == "nbderiv" if args.quick else (key or args.memory_all)):
            cases.setdefault((e["framework"], e["device"], e["model"], e["order"], e["n"]),
                             []).append(e)
    start = time.perf_counter()

    def measure(case):
        (fw, device, model, order, n), group = case
        if time.perf_counter() - start > budget_s:
            for e in group:
                e["mem_note"] = "memory subprocess skipped: --memory-budget spent"
            return
        cmd = [python, str(Path(__file__).resolve()), "--memory-child", "--framework", fw,
               "--device", device, "--threads", str(args.threads), "--model", model,
               "--order", str(order), "--n", str(n), "--call-timeout", str(args.call_timeout),
               "--competitor", "|".join(e["competitor"] for e in group)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout,
                                  cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not line:
                raise RuntimeError(proc.stderr.strip()[-300:])
            res = json.loads(line[-1])
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            for e in group:
                e["mem_note"] = f"memory subprocess failed: {str(exc)[:200]}"
            return
        for e in group:
            r = res.get(e["competitor"], {})
            if "peak_rss_mb" not in r:
                e["mem_note"] = r.get("error", "not measured")
                continue
            e["rss_peak_mb"] = r["peak_rss_mb"]
            e["rss_base_mb"] = r["base_rss_mb"]
            e["rss_delta_mb"] = r["peak_rss_mb"] - r["base_rss_mb"]
            if "device_peak_mb" in r:
                e["device_peak_mb"] = r["device_peak_mb"]
        _log(f"  memory {fw} {model} order {order} N={n:,}: " + ", ".join(
            f"{e['competitor']} {e['rss_peak_mb']:.0f} MB" for e in group if "rss_peak_mb" in e))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(measure, sorted(cases.items())))


# -- start-up costs --------------------------------------------------------------------------
def startup_costs(python, repeats=5) -> dict:
    code_import = ("import time,sys; t=time.perf_counter(); import nbderiv; "
                   "dt=time.perf_counter()-t; "
                   "print(dt, int('torch' in sys.modules), int('tensorflow' in sys.modules))")
    code_magic = ("import time,sys\n"
                  "from IPython.core.interactiveshell import InteractiveShell\n"
                  "sh=InteractiveShell.instance()\n"
                  "t=time.perf_counter(); sh.run_line_magic('load_ext','nbderiv'); "
                  "dt=time.perf_counter()-t\n"
                  "ok=int(any('nnderiv' in k for k in sh.magics_manager.magics['line']))\n"
                  "print(dt, int('torch' in sys.modules), int('tensorflow' in sys.modules), ok)")
    out = {}
    for key, code in (("import_nbderiv", code_import), ("load_ext_nbderiv", code_magic)):
        vals, frameworks, err = [], 0, ""
        for _ in range(repeats):
            proc = subprocess.run([python, "-c", code], capture_output=True, text=True,
                                  cwd=ROOT, timeout=120)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                break
            parts = proc.stdout.split()
            vals.append(float(parts[0]))
            frameworks = max(frameworks, int(parts[1]) + int(parts[2]))
            if key == "load_ext_nbderiv" and parts[3] == "0":
                err = "no %nnderiv magic registered"
        out[key] = {"median_s": statistics.median(vals) if vals else None,
                    "imports_framework": bool(frameworks), "error": err}
    return out


# -- merging, targets, output ---------------------------------------------------------------
def annotate(entries):
    groups = {}
    for e in entries:
        groups.setdefault((e["framework"], e["model"], e["order"], e["n"]), []).append(e)
    for group in groups.values():
        ok = [e for e in group if e["kind"] == "idiom" and e["status"] == "ok"
              and e.get("median_s") and e.get("err_rel") is not None
              and e["err_rel"] < CORRECT_REL]
        best = min(ok, key=lambda e: e["median_s"]) if ok else None
        for e in group:
            if best is not None and e.get("median_s"):
                e["ratio_best_idiom"] = e["median_s"] / best["median_s"]
                e["best_idiom_name"] = best["competitor"]
        if best is not None:
            best["best_idiom"] = True


def _find(entries, **kw):
    for e in entries:
        if all(e.get(k) == v for k, v in kw.items()):
            return e
    return None


def _scaled(scaling, fw, model, order, small, large, entries):
    """(ratio, text) for t(large)/t(small) of nbderiv: side by side where measured so (the
    ratio of the case tables' medians and the forward pass's own side-by-side ratio shown
    next to it), else from the case tables; None if neither has it."""
    sel = dict(framework=fw, model=model, order=order, kind="nbderiv")
    a, b = _find(entries, n=small, **sel), _find(entries, n=large, **sel)
    tables = b["median_s"] / a["median_s"] if a and b and a.get("median_s") and \
        b.get("median_s") else None
    s = next((x for x in scaling if (x["framework"], x["model"], x["order"], x["small"],
                                     x["large"]) == (fw, model, order, small, large)), None)
    if s is None:
        return None if tables is None else (tables, f"{tables:.2f}")
    text = f"{s['nbderiv_ratio']:.2f} side by side (forward pass {s['forward_ratio']:.2f}"
    if tables is not None:
        text += f"; {tables:.2f} from the tables"
    return s["nbderiv_ratio"], text + ")"


def targets(entries, startup, scaling=()) -> list:
    """[(target, value text, passed or None)] for every target of the issue."""
    out = []
    frameworks = sorted({e["framework"] for e in entries})
    for fw in frameworks:
        for k in (1, 2):
            e = _find(entries, framework=fw, model="A", order=k, n=10_000, kind="nbderiv")
            if e and e.get("ratio_best_idiom"):
                out.append((f"{fw}: nbderiv ≤ 1.1× fastest idiom, A, N=10 000, order {k}",
                            f"{e['ratio_best_idiom']:.2f}× ({e['best_idiom_name']})",
                            e["ratio_best_idiom"] <= 1.1))
            elif e is not None or _find(entries, framework=fw, model="A", order=k, n=10_000):
                out.append((f"{fw}: nbderiv ≤ 1.1× fastest idiom, A, N=10 000, order {k}",
                            "not measured", None))
        for model, order in sorted({(e["model"], e["order"]) for e in entries
                                    if e["framework"] == fw}):
            got = _scaled(scaling, fw, model, order, 10_000, 100_000, entries)
            if got:
                out.append((f"{fw}: linear in N, {model} order {order}: t(100 000)/t(10 000) ≤ 11",
                            got[1], got[0] <= 11))
        for k in (3, 4):
            for n in (10_000, 100_000):
                e = _find(entries, framework=fw, model="A", order=k, n=n, kind="nbderiv")
                nested = [x for x in entries if x["framework"] == fw and x["model"] == "A"
                          and x["order"] == k and x["n"] == n and x.get("median_s")
                          and x["kind"] == "idiom" and "nested" in x["competitor"]
                          and ("autograd" in x["competitor"] or "GradientTape" in x["competitor"])]
                for ref in nested:
                    if e and e.get("median_s"):
                        speedup = ref["median_s"] / e["median_s"]
                        goal = 2.0 if k == 4 else 1.0
                        out.append((f"{fw}: order {k}, A, N={n:,}: nbderiv vs {ref['competitor']} "
                                    f"(≥ 1×; goal ≥ {goal:g}×)", f"{speedup:.2f}× faster",
                                    speedup >= goal))
        big = _find(entries, framework=fw, model="A", order=2, n=1_000_000, kind="nbderiv")
        if big:
            if big.get("rss_peak_mb"):
                out.append((f"{fw}: N=1 000 000, A, order 2: peak RSS ≤ 2 GB (subprocess)",
                            f"{big['rss_peak_mb']:.0f} MB", big["rss_peak_mb"] <= 2048))
            got = _scaled(scaling, fw, "A", 2, 100_000, 1_000_000, entries)
            if got:
                out.append((f"{fw}: N=1 000 000 in time ∝ N: t(1e6)/t(1e5) ≤ 11", got[1],
                            got[0] <= 11))
        for k in (1, 2):
            e = _find(entries, framework=fw, model="A", order=k, n=100, kind="nbderiv")
            if e and e.get("median_s"):
                best = min((x["median_s"] for x in entries if x["framework"] == fw
                            and x["model"] == "A" and x["order"] == k and x["n"] == 100
                            and x["kind"] == "idiom" and x.get("median_s")), default=None)
                if best is not None:
                    over = (e["median_s"] - best) * 1e3
                    out.append((f"{fw}: nbderiv's own overhead at N=100, A, order {k} ≤ 5 ms "
                                "(nbderiv − fastest idiom)", f"{over:.2f} ms", over <= 5))
    for key, label in (("import_nbderiv", "`import nbderiv` ≤ 0.1 s, no framework imported"),
                       ("load_ext_nbderiv", "`%load_ext nbderiv` ≤ 0.1 s, no framework imported")):
        s = startup.get(key)
        if not s:
            continue
        if s["median_s"] is None or s["error"]:
            out.append((label, f"failed: {s['error']}", False))
        else:
            out.append((label, f"{s['median_s'] * 1e3:.1f} ms"
                        + (" (imports a framework!)" if s["imports_framework"] else ""),
                        s["median_s"] <= 0.1 and not s["imports_framework"]))
    return out


def _fmt_s(s):
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _fmt_mb(v):
    return "—" if v is None else f"{v:,.0f}"


def _fmt_err(v):
    return "—" if v is None else f"{v:.1e}"


def _settings_line(st) -> str:
    return (f"- settings: {st.get('threads')} thread(s) per framework, {st.get('min_reps')}-"
            f"{st.get('reps')} timed repetitions per case after one warm-up call, garbage "
            "collected once per round (not before every call), TensorFlow timing worker with "
            + ("TensorFlow's BFC CPU allocator" if st.get("tf_allocator", "bfc") == "bfc"
               else "the C library's allocator"))


def render(entries, meta, target_rows, scaling=()) -> str:
    lines = [f"# nbderiv benchmark ({meta['when']})", "",
             f"- machine: {meta['cpu']} ({meta['cores']} cores), {meta['memory_gb']:.0f} GB RAM, "
             f"{meta['platform']}; load average at start {meta['load_start']}, "
             f"at end {meta['load_end']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("phases_s", {}).items()) + ")",
             _settings_line(meta.get("settings", {})),
             "- cells: median time (ratio to the forward pass of the same N); float32; "
             "“best” = fastest hand-written idiom whose error is below "
             f"{CORRECT_REL:g} relative; err = max |value − float64 truth| / max |truth| of the "
             f"top order over up to {TRUTH_POINTS:,} evenly spaced points; "
             "peak = subprocess peak RSS (MB, whole process) at the largest N where measured, "
             "else the in-process resident increase during one call (Δ MB)", ""]
    for fw, why in meta.get("failed_workers", {}).items():
        lines[-1:-1] = [f"- **{fw}: no rows**: its timing worker failed ({why})"]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, value, ok in target_rows:
        lines.append(f"| {name} | {value} | {'yes' if ok else ('—' if ok is None else 'NO')} |")
    lines.append("")
    if scaling:
        lines += ["## Time against N, side by side", "",
                  "Each round: nbderiv three times at the small N and once at the large N, "
                  "alternating which comes first; the forward pass once at each size in the "
                  f"first {FORWARD_SCALING_ROUNDS} rounds; medians over the rounds.", "",
                  "| framework | model | order | N | nbderiv | ratio | forward pass | ratio |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for x in scaling:
            lines.append(
                f"| {x['framework']} | {x['model']} | {x['order']} | {x['small']:,} → "
                f"{x['large']:,} | {_fmt_s(x['nbderiv_small_s'])} → "
                f"{_fmt_s(x['nbderiv_large_s'])} | {x['nbderiv_ratio']:.2f} | "
                f"{_fmt_s(x['forward_small_s'])} → {_fmt_s(x['forward_large_s'])} | "
                f"{x['forward_ratio']:.2f} |")
        lines.append("")
    for fw in sorted({e["framework"] for e in entries}):
        for model in MODELS:
            for order in sorted({e["order"] for e in entries if e["model"] == model}):
                group = [e for e in entries if e["framework"] == fw and e["model"] == model
                         and e["order"] == order]
                if not group:
                    continue
                ns = sorted({e["n"] for e in group})
                dev = group[0]["device"]
                lines += [f"### {fw} ({dev}) · model {model} ({describe(model)}) · order {order}",
                          "", "| competitor | " + " | ".join(f"N={n:,}" for n in ns)
                          + " | err | peak MB |", "|---|" + "---:|" * (len(ns) + 2)]
                names = list(dict.fromkeys(e["competitor"] for e in group))
                for name in names:
                    cells, errs, peak = [], [], None
                    for n in ns:
                        e = _find(group, competitor=name, n=n)
                        if e is None:
                            cells.append("")
                            continue
                        if e["status"] != "ok":
                            cells.append("skipped" if e["status"] == "skipped" else "error")
                            continue
                        cell = _fmt_s(e["median_s"])
                        if e["kind"] != "forward" and e.get("ratio_forward"):
                            cell += f" ({e['ratio_forward']:.2g}×)"
                        if e["kind"] == "nbderiv" and e.get("ratio_best_idiom"):
                            cell += f" **{e['ratio_best_idiom']:.2f}× best**"
                        if e.get("best_idiom"):
                            cell += " ★"
                        cells.append(cell)
                        if e.get("err_rel") is not None:
                            errs.append(e["err_rel"])
                        if e.get("rss_peak_mb") is not None:
                            peak = f"{_fmt_mb(e['rss_peak_mb'])} @{n:,}"
                        elif peak is None or "Δ" in peak:
                            if e.get("peak_delta_mb") is not None:
                                peak = f"Δ{_fmt_mb(e['peak_delta_mb'])} @{n:,}"
                    lines.append(f"| {name} | " + " | ".join(cells)
                                 + f" | {_fmt_err(max(errs) if errs else None)} | {peak or '—'} |")
                nb = [e for e in group if e["kind"] == "nbderiv" and e.get("method")]
                if nb:
                    lines.append("")
                    lines.append("nbderiv method: " + ", ".join(
                        f"N={e['n']:,}: {e['method']}" for e in nb))
                lines.append("")
    skipped = [e for e in entries if e["status"] != "ok"]
    if skipped:
        lines += ["## Skipped or failed", ""]
        for e in skipped:
            lines.append(f"- {e['framework']} {e['model']} order {e['order']} N={e['n']:,} "
                         f"{e['competitor']}: {e['status']}: {e['reason']}")
        lines.append("")
    return "\n".join(lines)


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem = 0.0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem,
            "platform": f"{platform.system()} {platform.release()}, Python "
                        f"{platform.python_version()}"}


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 min)")
    p.add_argument("--framework", choices=["torch", "tensorflow", "all"], default="all")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (if available)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per framework (default 1: steady medians on a shared "
                        "machine; 0 = the framework's own default)")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for JSON/CSV/MD")
    p.add_argument("--reps", type=int, default=None, help="repetitions after warm-up (max)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--case-budget", type=float, default=None,
                   help="seconds of repetitions per case; fewer reps for slow cases")
    p.add_argument("--max-call", type=float, default=None,
                   help="skip sizes predicted to take longer than this per call (s)")
    p.add_argument("--max-bytes", type=float, default=2 * 2**30,
                   help="skip competitors estimated to need more working memory (bytes)")
    p.add_argument("--slow-call", type=float, default=None,
                   help="competitors slower than this (s) are timed once after the warm-up")
    p.add_argument("--memory-all", action="store_true",
                   help="subprocess memory for every competitor, not only forward, nbderiv, "
                        "the fastest idiom and the nested reverse idiom")
    p.add_argument("--call-timeout", type=float, default=None,
                   help="abandon a warm-up call after this many seconds")
    p.add_argument("--models", nargs="*", choices=list(MODELS))
    p.add_argument("--orders", nargs="*", type=int)
    p.add_argument("--memory-min-n", type=int, default=None,
                   help="subprocess peak memory (one process per case) from this many points")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="seconds for all memory subprocesses of one framework")
    p.add_argument("--child-timeout", type=int, default=300)
    p.add_argument("--no-startup", action="store_true", help="skip import-time measurements")
    p.add_argument("--tf-allocator", choices=["bfc", "system"], default="bfc",
                   help="CPU allocator of the TensorFlow timing worker (default bfc: "
                        "TensorFlow's own, steadier timings; system: the C library's)")
    # internal
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--order", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--competitor", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    defaults = ({"reps": 2, "min_reps": 1, "case_budget": 0.5, "slow_call": 0.1,
                 "max_call": 0.5, "call_timeout": 3.0, "memory_min_n": 1_000,
                 "memory_budget": 10.0} if a.quick else
                {"reps": 7, "min_reps": 5, "case_budget": 3.0, "slow_call": 0.1,
                 "max_call": 2.0, "call_timeout": 20.0, "memory_min_n": 100_000,
                 "memory_budget": 150.0})
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None):
    args = parse(argv)
    sys.path.insert(0, str(HERE))
    if args.memory_child:
        print(json.dumps(run_memory_child(args)), flush=True)
        return 0
    if args.worker:
        entries, scaling = run_worker(args)
        versions = importlib.import_module(FRAMEWORK_MODULES[args.framework]).versions()
        Path(args.worker_out).write_text(json.dumps({"entries": entries, "scaling": scaling,
                                                     "versions": versions}))
        return 0

    start = time.perf_counter()
    load_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
    python = sys.executable
    frameworks = ["torch", "tensorflow"] if args.framework == "all" else [args.framework]
    entries, scaling, versions = [], [], {"python": platform.python_version()}
    phases = {}  # wall seconds per phase, for the run's description
    failed_workers = {}  # framework: why its rows are missing
    for fw in frameworks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "worker.json"
            cmd = [python, str(Path(__file__).resolve()), "--worker", "--framework", fw,
                   "--worker-out", str(out)] + _passthrough(args)
            _log(f"== {fw}: timing worker")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=_worker_env(fw, args))
            phases[f"{fw} timing"] = time.perf_counter() - t0
            if proc.returncode != 0 or not out.exists():
                failed_workers[fw] = f"worker exit status {proc.returncode} (its log is above)"
                _log(f"== {fw}: worker failed (exit {proc.returncode}); its rows are left out")
                continue
            data = json.loads(out.read_text())
        fw_entries = data["entries"]
        scaling += data.get("scaling", [])
        annotate(fw_entries)
        versions.update(data["versions"])
        _log(f"== {fw}: memory subprocesses (N >= {args.memory_min_n:,})")
        t0 = time.perf_counter()
        measure_memory(args, fw_entries, python, args.memory_budget)
        phases[f"{fw} memory"] = time.perf_counter() - t0
        entries += fw_entries
    if not entries:
        _log("no framework produced results; nothing written")
        return 1
    try:
        import numpy

        versions["numpy"] = numpy.__version__
        from importlib.metadata import version

        versions["nbderiv"] = version("nbderiv")
    except Exception:
        pass
    t0 = time.perf_counter()
    startup = {} if args.no_startup else startup_costs(python, 3 if args.quick else 7)
    phases["start-up costs"] = time.perf_counter() - t0
    target_rows = targets(entries, startup, scaling)
    meta = dict(machine_info(), versions=versions, load_start=load_start,
                load_end=" ".join(f"{v:.1f}" for v in os.getloadavg()),
                when=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                command="python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv),
                wall_s=time.perf_counter() - start, phases_s=phases, startup=startup,
                failed_workers=failed_workers,
                settings={k: getattr(args, k) for k in ("threads", "reps", "min_reps",
                                                        "case_budget", "slow_call",
                                                        "max_call", "max_bytes", "memory_min_n",
                                                        "device", "quick", "tf_allocator")})
    text = render(entries, meta, target_rows, scaling)
    print(text)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "full"
    if args.framework != "all":
        stem += f"-{args.framework}"
    if args.device != "cpu":
        stem += f"-{args.device}"
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "targets": [{"target": t, "measured": v, "met": ok}
                                   for t, v, ok in target_rows],
         "scaling": scaling, "entries": entries}, indent=1, default=str))
    cols = ["framework", "device", "model", "order", "n", "competitor", "kind", "status",
            "median_s", "reps", "ratio_forward", "ratio_best_idiom", "best_idiom_name",
            "err_abs", "err_rel", "checked_points", "peak_delta_mb", "rss_peak_mb",
            "rss_base_mb", "device_peak_mb", "method", "reason", "mem_note"]
    with open(out_dir / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for e in entries:
            w.writerow(e)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    _log(f"wrote {out_dir}/{stem}.json, .csv, .md in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _worker_env(framework, args) -> dict:
    """The timing worker's environment. TensorFlow's own (BFC) CPU allocator unless
    ``--tf-allocator system``: with the C library's allocator, memory freed by one competitor
    is handed back to the system during whichever TensorFlow call comes next (seen with
    strace: two 64 MB munmaps, about 9 ms, inside the next call), and at N = 100 000 every
    TensorFlow competitor ran 1.7-2.7x slower in some processes than in others. Memory
    subprocesses keep the default allocator."""
    env = dict(os.environ)
    if framework == "tensorflow" and args.tf_allocator == "bfc":
        env.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    # nbderiv keeps no result memory by default; repeated 200 MB results (model C at
    # N = 100 000) are what its opt-in pool is for. Memory subprocesses measure the default.
    env.setdefault("NBDERIV_KEEP_RESULTS", "1GiB")
    return env


def _passthrough(args):
    out = ["--device", args.device, "--threads", str(args.threads), "--reps", str(args.reps), "--min-reps", str(args.min_reps),
           "--case-budget", str(args.case_budget), "--max-call", str(args.max_call),
           "--slow-call", str(args.slow_call),
           "--call-timeout", str(args.call_timeout),
           "--max-bytes", str(args.max_bytes)]
    if args.quick:
        out.append("--quick")
    if args.models:
        out += ["--models", *args.models]
    if args.orders:
        out += ["--orders", *map(str, args.orders)]
    return out


if __name__ == "__main__":
    sys.exit(main())
