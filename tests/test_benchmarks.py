"""The benchmark script still runs end to end (``benchmarks/run.py --quick``): every case gives
nbderiv a row whose values match the float64 truth, and every competitor either ran or says why
not. Timings are printed by the script, never asserted here."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-startup",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "quick.json").read_text())
    # a worker that died loses all its framework's rows: say so here, with its log
    assert not data["meta"]["failed_workers"], (data["meta"]["failed_workers"],
                                                proc.stderr[-3000:])
    return data, (out / "quick.md").read_text()


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    return run


def _compiled(src, filename):
    """The functions of ``src``, as if they were defined in the file ``filename``."""
    namespace = {"time": time}
    exec(compile(src, filename, "exec"), namespace)
    return namespace


FRAMEWORK_SRC = """
interrupted = []
def framework_op(seconds):
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:  # Python work inside the "framework"
            pass
    except BaseException:
        interrupted.append(True)
        raise
    return "done"
"""
IDIOM_SRC = """
def idiom(op, log, calls):
    for _ in range(calls):
        log.append(op(0.05))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.01:  # the idiom's own Python work between calls
            pass
"""


@pytest.mark.slow
def test_every_case_has_an_accurate_nbderiv_row(quick_run):
    data, _ = quick_run
    cases = {(e["framework"], e["model"], e["order"], e["n"]) for e in data["entries"]}
    assert {c[0] for c in cases} == {"torch", "tensorflow"}
    for case in cases:
        rows = [e for e in data["entries"]
                if (e["framework"], e["model"], e["order"], e["n"]) == case
                and e["kind"] == "nbderiv"]
        assert len(rows) == 1, case
        row = rows[0]
        assert row["status"] == "ok", (case, row["reason"])
        assert row["err_rel"] < 1e-4, (case, row["err_rel"])  # float32 against float64
        assert row["median_s"] > 0 and row["method"], case


@pytest.mark.slow
def test_competitors_ran_or_say_why(quick_run):
    data, text = quick_run
    for e in data["entries"]:
        assert e["status"] in ("ok", "skipped", "error"), e
        if e["status"] != "ok":
            assert e["reason"], e
            assert e["reason"][:40] in text  # listed under "Skipped or failed"
        elif e["kind"] == "idiom":
            assert e["err_rel"] < 5e-2, (e["competitor"], e["err_rel"])


@pytest.mark.slow
def test_settings_and_memory_are_reported(quick_run):
    data, text = quick_run
    assert data["meta"]["settings"]["tf_allocator"] == "bfc"
    assert "TensorFlow's BFC CPU allocator" in text
    tf_rows = [e for e in data["entries"] if e["framework"] == "tensorflow"
               and e["status"] == "ok"]
    # the TensorFlow worker reads its allocator's peak: a number for every competitor that ran
    assert tf_rows and all(e["peak_delta_mb"] is not None for e in tf_rows)
    assert any(t["target"].startswith("tensorflow: nbderiv's own overhead")
               for t in data["targets"])


@pytest.mark.slow
def test_time_against_n_is_measured_side_by_side(quick_run):
    data, text = quick_run
    pairs = {(x["framework"], x["model"], x["order"]) for x in data["scaling"]}
    assert pairs == {("torch", "A", 1), ("tensorflow", "A", 1)}  # the quick case at 100 and 1 000
    for x in data["scaling"]:
        assert (x["small"], x["large"]) == (100, 1_000)
        for kind in ("nbderiv", "forward"):
            assert x[f"{kind}_ratio"] == pytest.approx(x[f"{kind}_large_s"] / x[f"{kind}_small_s"])
        assert len(x["times_s"]["nbderiv 100"]) == 3 * x["reps"]
        assert len(x["times_s"]["nbderiv 1000"]) == x["reps"]
        assert 1 <= len(x["times_s"]["forward 100"]) == len(x["times_s"]["forward 1000"])
    assert "## Time against N, side by side" in text


def test_call_timeout_fires_between_framework_calls_only():
    """The warm-up timeout is raised in the benchmark's own code (here an idiom's loop), never
    inside a framework's internals (here a function of another file that runs 0.05 s per call):
    an exception at an arbitrary point inside TensorFlow left it corrupt (see _alarm)."""
    run = _bench()
    fw = _compiled(FRAMEWORK_SRC, "/site-packages/fakeframework/ops.py")
    idiom = _compiled(IDIOM_SRC, str(run.HERE / "idioms_fake.py"))["idiom"]
    log = []
    t0 = time.perf_counter()
    with pytest.raises(run._CallTimeout, match="ran past --call-timeout 0.135 s"):
        with run._alarm(0.135):
            idiom(fw["framework_op"], log, 100)
    assert fw["interrupted"] == []  # never inside the framework
    assert log and set(log) == {"done"} and len(log) < 100  # stopped between its calls
    assert time.perf_counter() - t0 < 30


def test_call_timeout_lets_one_long_framework_call_finish_and_sends_no_signal():
    """A single framework call past the time is not interrupted (the caller reports it), and
    no SIGALRM is involved: a signal during TensorFlow's eager GradientTape corrupted its heap
    even with a handler that raised nothing."""
    run = _bench()
    fw = _compiled(FRAMEWORK_SRC, "/site-packages/fakeframework/ops.py")
    handler = signal.getsignal(signal.SIGALRM)
    with run._alarm(0.05):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is handler
        assert fw["framework_op"](0.3) == "done"
    assert fw["interrupted"] == []
    with run._alarm(5.0):  # no timeout: nothing happens, and nothing is left behind
        fw["framework_op"](0.01)
    time.sleep(0.05)  # a stray exception would be raised here


def test_a_competitor_failing_after_its_warm_up_does_not_stop_the_worker():
    """Each failure is reported on its own row; before, one exception in the repetitions killed
    the worker process and every row of its framework was lost."""
    run = _bench()
    import numpy as np

    calls = {"flaky": 0}

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] > 2:  # the two warm-up calls pass, the repetitions fail
            raise IndexError("list index out of range")
        return np.ones((4, 1, 1))

    def comp(name, kind, fn):
        return SimpleNamespace(name=name, kind=kind, run=fn, sync=lambda: None,
                               standard=lambda r: np.asarray(r), scaling=1.0, mem_scaling=1.0,
                               units_at=None, bytes_at=None)

    mod = SimpleNamespace(
        as_tensor=lambda x, device: x, truth=lambda model, X, order: np.ones((4, 1, 1)),
        competitors=lambda model, X, order, device, nbd: [
            comp("forward", "forward", lambda: np.ones((4, 1, 1))),
            comp("flaky idiom", "nbderiv", flaky),  # nbderiv kind: two warm-up calls
            comp("steady idiom", "idiom", lambda: np.ones((4, 1, 1)))])
    args = run.parse(["--quick", "--framework", "torch"])
    last = {}
    rows = {r["competitor"]: r for r in run._run_case(args, mod, None, None, "A", 1, 4, "cpu", last)}
    assert rows["flaky idiom"]["status"] == "error"
    assert "IndexError" in rows["flaky idiom"]["reason"]
    assert "median_s" not in rows["flaky idiom"]
    assert rows["steady idiom"]["status"] == "ok" and rows["steady idiom"]["median_s"] > 0
    assert rows["forward"]["status"] == "ok"
    assert last[("A", 1, "flaky idiom")][1] is None  # not tried again at a larger N


def test_forward_and_nbderiv_are_never_skipped():
    """The targets are about these two: a slow call at the previous N must not predict them
    out of the next one, as it does for the idioms."""
    run = _bench()

    args = run.parse([])
    slow_previous = (100_000, 3.0, 500.0)  # (N, seconds, MB) at the previous size
    for kind, skipped in (("nbderiv", False), ("forward", False), ("idiom", True)):
        c = SimpleNamespace(kind=kind, scaling=1.0, mem_scaling=1.0, units_at=None,
                            bytes_at=None)
        assert bool(run._skip_reason(args, c, 1_000_000, slow_previous, 0.1)) is skipped, kind


def test_versions_imports_another_revision_beside_this_one(tmp_path):
    """benchmarks/versions.py: the base revision is its own package, not this checkout's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    try:
        import versions
    finally:
        sys.path.pop(0)
    base_api = versions.import_revision("HEAD", tmp_path)
    import nbderiv.api

    assert base_api is not nbderiv.api and base_api.__name__ == "nbderiv_base.api"
    assert Path(base_api.__file__).is_relative_to(tmp_path)
    torch = pytest.importorskip("torch")
    d = base_api.derivatives(lambda x: x ** 3, torch.tensor([2.0]), order=2)
    assert float(d[2][0, 0, 0, 0]) == 12.0
    for name in [m for m in sys.modules if m.split(".")[0] == "nbderiv_base"]:
        del sys.modules[name]
    sys.path.remove(str(tmp_path))
