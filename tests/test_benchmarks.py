"""The benchmark script still runs end to end (``benchmarks/run.py --quick``): every case gives
nbderiv a row whose values match the float64 truth, and every competitor either ran or says why
not. Timings are printed by the script, never asserted here."""

import json
import subprocess
import sys
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
    return json.loads((out / "quick.json").read_text()), (out / "quick.md").read_text()


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


def test_forward_and_nbderiv_are_never_skipped():
    """The targets are about these two: a slow call at the previous N must not predict them
    out of the next one, as it does for the idioms."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    args = run.parse([])
    slow_previous = (100_000, 3.0, 500.0)  # (N, seconds, MB) at the previous size
    for kind, skipped in (("nbderiv", False), ("forward", False), ("idiom", True)):
        c = SimpleNamespace(kind=kind, scaling=1.0, mem_scaling=1.0, units_at=None,
                            bytes_at=None)
        assert bool(run._skip_reason(args, c, 1_000_000, slow_previous, 0.1)) is skipped, kind
