"""Where one nbderiv.derivatives call spends its time (cProfile, top functions by own time),
for benchmark model A on a given device; compare with the nested-autograd idiom.

    python benchmarks/profile_call.py --device cuda --n 10000 --order 1
"""

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import idioms_torch as I  # noqa: E402
import numpy as np  # noqa: E402
import run as R  # noqa: E402

import nbderiv  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--calls", type=int, default=50)
    a = p.parse_args()
    I.set_threads(1)
    model = I.build_model(R.weights_for("A"), a.device)
    X = I.as_tensor(R.points_for("A", a.n), a.device)
    sync = I.synchronizer(a.device)
    idiom = {c.name: c for c in I.competitors(model, X, a.order, a.device, nbderiv)}

    def timed(fn):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(a.calls):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return np.median(ts) * 1e3

    for name in ("forward", "autograd.grad nested", "nbderiv"):
        print(f"{name:24s} {timed(idiom[name].run):8.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        nbderiv.derivatives(model, X, order=a.order)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("nbderiv", 25)
    print(out.getvalue())


if __name__ == "__main__":
    main()
