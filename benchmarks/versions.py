"""This checkout's nbderiv against another revision's, side by side in one process, on the
real-architecture cases of ``real_models.py`` (warm calls, interleaved rounds with the
fastest hand-written idiom; medians and ratios).

    python benchmarks/versions.py --base HEAD~1 torch-lstm-o1 torch-transformer-o1

The base revision's ``nbderiv/`` is taken with ``git archive`` into a temporary folder and
imported as ``nbderiv_base`` (its module paths renamed), so both versions see the same
model, the same points and the same machine state in every round.
"""

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import real_models as R  # noqa: E402


def import_revision(rev: str, into: Path):
    """``nbderiv`` as it is at ``rev``, imported as the package ``nbderiv_base``."""
    data = subprocess.run(["git", "archive", rev, "nbderiv"], cwd=HERE.parent, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    root = into / "nbderiv_base"
    (into / "nbderiv").rename(root)
    for path in root.rglob("*.py"):  # module paths named in strings (lazy imports)
        text = path.read_text()
        path.write_text(text.replace('"nbderiv.', '"nbderiv_base.'))
    sys.path.insert(0, str(into))
    import nbderiv_base.api

    return nbderiv_base.api


def compare(case, base_api, rounds):
    import nbderiv.api as head_api

    name, framework, model, order, n = next(c for c in R.CASES if c[0] == case)
    net, X = R.setup(framework, model, n)
    idioms = R.idioms(framework, net, X, order)
    ref = head_api.derivatives(net, X, order=order, progress=False)[order].reshape(n, -1)

    def agrees(key):  # only idioms that run and give nbderiv's numbers compete
        try:
            v = R._array(idioms[key]()).reshape(n, -1)
        except Exception:
            return False
        return float(abs(v - ref).max()) <= 1e-3 * max(float(abs(ref).max()), 1e-30)
    idioms = {k: fn for k, fn in idioms.items() if agrees(k)}
    best = min(idioms, key=lambda k: _median(idioms[k], 5))
    fns = {"this checkout": lambda: head_api.derivatives(net, X, order=order, progress=False),
           "base": lambda: base_api.derivatives(net, X, order=order, progress=False),
           best: idioms[best]}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % 3:] + keys[:r % 3]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{case} (order {order}, N = {n}), medians of {rounds} interleaved rounds:")
    for k in keys:
        print(f"  {k:32s} {med[k] * 1e3:8.2f} ms   {med[k] / med[best]:.2f}x the idiom")
    print(f"  this checkout / base: {med['this checkout'] / med['base']:.3f}")


def _median(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="+", help="case names of real_models.CASES")
    p.add_argument("--base", default="HEAD", help="the git revision to compare with")
    p.add_argument("--rounds", type=int, default=60)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base_api = import_revision(a.base, Path(tmp))
        for case in a.cases:
            compare(case, base_api, a.rounds)


if __name__ == "__main__":
    main()
