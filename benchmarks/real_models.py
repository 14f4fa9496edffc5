"""Real architectures: nbderiv against the fastest hand-written idiom of its framework.

    python benchmarks/real_models.py            # = make bench-real; writes results/real.md/.json
    python benchmarks/real_models.py --framework torch --reps 3

Models: a small residual CNN with BatchNorm (eval) at 3x32x32 with 10 and 100 outputs, an LSTM
regressor on (N, 20, 8), a TransformerEncoder with a mean-pooling head on (N, 10, 16), a PINN
field (x, y, t) -> (u, v, p) and a 12 -> 12 tanh MLP at order 2 (several inputs and outputs;
torch);
a Keras CNN (Conv2D, BatchNormalization) at 32x32x3 and a Keras LSTM regressor on (N, 20, 8).
Warm calls: one process per framework, one thread, every competitor warmed up, then ``reps``
rounds (at least 15 for calls under 50 ms) over the competitors (each round starting one later), medians; the ratio is nbderiv's
median over the fastest idiom's (only idioms that ran and agree with nbderiv compete). First
calls: each in a fresh subprocess (model built and points made first; imports not counted;
the median of three processes for first calls under 5 s), the first call of nbderiv against
the first call of the idiom that was fastest warm.
Targets: order 1 <= 1.2x, order 2 <= 1.5x, first call <= 2x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (name, framework, model, order, N)
CASES = [
    ("torch-cnn10", "torch", "cnn10", 1, 64),
    ("torch-cnn100", "torch", "cnn100", 1, 32),
    ("torch-lstm-o1", "torch", "lstm", 1, 256),
    ("torch-lstm-o1-n2048", "torch", "lstm", 1, 2048),
    ("torch-lstm-o2", "torch", "lstm", 2, 64),
    ("torch-transformer-o1", "torch", "transformer", 1, 128),
    ("torch-transformer-o1-n1024", "torch", "transformer", 1, 1024),
    ("torch-transformer-o2", "torch", "transformer", 2, 32),
    ("torch-pinn3-o2", "torch", "pinn3", 2, 1000),
    ("torch-mlp12-o2", "torch", "mlp12", 2, 1000),
    ("keras-cnn10", "tensorflow", "kcnn", 1, 128),
    ("keras-lstm-o1", "tensorflow", "klstm", 1, 256),
    ("keras-lstm-o1-n2048", "tensorflow", "klstm", 1, 2048),
    ("keras-lstm-o2", "tensorflow", "klstm", 2, 64),
]
TARGET = {1: 1.2, 2: 1.5}
FIRST_TARGET = 2.0


# -- torch ----------------------------------------------------------------------------------
def torch_model(name):
    import torch

    torch.manual_seed(0)

    class Residual(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b1 = torch.nn.BatchNorm2d(c)
            self.c2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b2 = torch.nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))

    class LSTMRegressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 32, batch_first=True)
            self.head = torch.nn.Linear(32, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.rnn(x)[0][:, -1]))

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(16, 1)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    class Field(torch.nn.Module):  # a PINN's field: (x, y, t) -> (u, v, p), or 12 -> 12
        def __init__(self, d):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(d, 64), torch.nn.Linear(64, 64),
                                      torch.nn.Linear(64, d))

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    if name in ("pinn3", "mlp12"):
        d = int(name[4:]) if name.startswith("pinn") else 12
        return Field(d).eval(), (d,)
    if name.startswith("cnn"):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(), Residual(16), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(), Residual(32), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(32, int(name[3:])))
        shape = (3, 32, 32)
    elif name == "lstm":
        net, shape = LSTMRegressor(), (20, 8)
    else:
        net, shape = Encoder(), (10, 16)
    for m in net.modules():  # BatchNorm statistics that are not the defaults
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval(), shape


def torch_idioms(net, X, order):
    """The hand-written idioms: {name: fn() -> (N, d_out, D, ...)}."""
    import torch
    from torch.func import hessian, jacrev, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, D = X.shape[0], X[0].numel()

    def kernels():  # the fused CPU attention kernel has no double backward: math from order 2
        return sdpa_kernel([SDPBackend.MATH]) if order > 1 else contextlib.nullcontext()

    def flat(Z):
        return net(Z).reshape(Z.shape[0], -1)

    def loop():  # nested autograd.grad, one backward pass per output / input column
        with kernels():
            Z = X.detach().requires_grad_(True)
            Y = flat(Z)
            cols = [torch.autograd.grad(Y[:, j].sum(), Z, create_graph=order > 1,
                                        retain_graph=True)[0]
                    .reshape(n, D) for j in range(Y.shape[1])]
            G = torch.stack(cols, 1)
            if order == 1:
                return G
            return torch.stack([torch.stack(
                [torch.autograd.grad(G[:, j, i].sum(), Z, retain_graph=True)[0].reshape(n, D)
                 for i in range(D)], 1) for j in range(G.shape[1])], 1)

    def batched():  # autograd.grad with is_grads_batched over one-hot cotangents
        with kernels():
            Z = X.detach().requires_grad_(True)
            Y = flat(Z)
            d = Y.shape[1]
            if order == 1:
                E = torch.eye(d).unsqueeze(1).expand(d, n, d)
                return torch.autograd.grad(Y, Z, E, is_grads_batched=True)[0] \
                    .reshape(d, n, D).movedim(0, 1)
            E = torch.eye(D).unsqueeze(1).expand(D, n, D)
            hessians = []
            for j in range(Y.shape[1]):  # each output's Hessian: one batched pass on its graph
                g = torch.autograd.grad(Y[:, j].sum(), Z, create_graph=True)[0].reshape(n, D)
                H = torch.autograd.grad(g, Z, E, is_grads_batched=True,
                                        retain_graph=True)[0].reshape(D, n, D)
                hessians.append(H.movedim(0, 1))
            return torch.stack(hessians, 1)

    def functional():  # vmap(jacrev) / vmap(hessian)
        with kernels():
            one = lambda x: flat(x[None])[0]  # noqa: E731
            if order == 1:
                return vmap(jacrev(one))(X).reshape(n, -1, D)
            return vmap(hessian(one))(X).reshape(n, -1, D, D)

    names = {"autograd.grad loop": loop, "autograd.grad is_grads_batched": batched,
             "vmap(jacrev)" if order == 1 else "vmap(hessian)": functional}
    if order == 2 and D > 32:
        names.pop("autograd.grad loop")  # one backward pass per input: 160 / 160 (10x slower)
    return names


def torch_setup(model, n):
    import torch

    torch.set_num_threads(1)
    net, shape = torch_model(model)
    X = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(1))
    return net, X


# -- TensorFlow / Keras ---------------------------------------------------------------------
def keras_model(name):
    import keras

    keras.utils.set_random_seed(0)
    if name == "kcnn":
        layers = [keras.Input((32, 32, 3)),
                  keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                  keras.layers.BatchNormalization(),
                  keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
        return keras.Sequential(layers), (32, 32, 3)
    return keras.Sequential([keras.Input((20, 8)), keras.layers.LSTM(32),
                             keras.layers.Dense(1)]), (20, 8)


def tf_setup(model, n):
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    net, shape = keras_model(model)
    X = np.random.default_rng(1).standard_normal((n,) + shape).astype("float32")
    return net, X


def tf_idioms(net, X, order):
    import tensorflow as tf

    spec = [tf.TensorSpec((None,) + X.shape[1:], tf.float32)]
    n, D = X.shape[0], X[0].size

    def bj(Z):
        with tf.GradientTape() as outer:
            outer.watch(Z)
            with tf.GradientTape() as inner:
                inner.watch(Z)
                y = net(Z, training=False)
            g = tf.reshape(inner.batch_jacobian(y, Z), (tf.shape(Z)[0], -1))
        if order == 1:
            return g
        return outer.batch_jacobian(g, Z)

    traced = tf.function(bj, input_signature=spec)
    Xt = tf.constant(X)
    return {"tf.function(batch_jacobian)": lambda: tf.reshape(traced(Xt), (n, -1) + (D,) * order)}


# -- measuring ------------------------------------------------------------------------------
def setup(framework, model, n):
    return torch_setup(model, n) if framework == "torch" else tf_setup(model, n)


def idioms(framework, net, X, order):
    return torch_idioms(net, X, order) if framework == "torch" else tf_idioms(net, X, order)


def _array(v):
    import numpy as np

    return np.asarray(v.detach() if hasattr(v, "detach") else v)


def warm_case(name, framework, model, order, n, reps):
    import numpy as np

    import nbderiv
    from nbderiv import memo

    net, X = setup(framework, model, n)
    comps = {"nbderiv": lambda: nbderiv.derivatives(net, X, order=order, progress=False)}

    def checks_rerun():  # what nbderiv remembered about the model dropped before each call
        memo.forget(net)
        return comps["nbderiv"]()

    comps.update(idioms(framework, net, X, order))
    d = comps["nbderiv"]()
    t = time.perf_counter()
    comps["nbderiv"]()
    if time.perf_counter() - t < 0.05:  # milliseconds: more rounds for a steadier median
        reps = max(reps, 15)
    ok, errors = {}, {}
    ref = d[order].reshape(n, -1)
    for key, fn in list(comps.items())[1:]:
        try:
            v = _array(fn()).reshape(n, -1)
            fn()
            errors[key] = float(np.abs(v - ref).max() / max(np.abs(ref).max(), 1e-30))
            ok[key] = errors[key] < 1e-3
        except Exception as exc:  # e.g. no forward-mode rule for the LSTM kernel
            errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            ok[key] = False
    running = ["nbderiv", CHECKS_RERUN] + [k for k in ok if ok[k]]
    comps[CHECKS_RERUN] = checks_rerun
    times = {k: [] for k in running}
    for r in range(reps):
        for k in running[r % len(running):] + running[:r % len(running)]:
            t = time.perf_counter()
            comps[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min((k for k in running if k not in ("nbderiv", CHECKS_RERUN)), key=med.get)
    return {"case": name, "framework": framework, "model": model, "order": order, "n": n,
            "method": d.method, "median_s": med, "errors": errors, "best_idiom": best,
            "ratio": med["nbderiv"] / med[best], "target": TARGET[order],
            "ratio_checks_rerun": med[CHECKS_RERUN] / med[best]}


CHECKS_RERUN = "nbderiv, checks rerun"  # nbderiv.memo.forget(model) before each call


def first_call(framework, model, order, n, who):
    """In a fresh process: the seconds of the first call of ``who``."""
    net, X = setup(framework, model, n)
    if who == "nbderiv":
        import importlib

        import numpy.random  # noqa: F401 - numpy loads it on first use

        import nbderiv
        from nbderiv import api, confirm, findings  # noqa: F401 - loaded on first use
        # imports are not counted: nbderiv's own modules load before the timer, as the
        # idioms' do (torch.func, tf.function)
        importlib.import_module(f"nbderiv.backends.{framework}")
        fn = lambda: nbderiv.derivatives(net, X, order=order, progress=False)  # noqa: E731
    else:
        fn = idioms(framework, net, X, order)[who]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def first_calls(row):
    """The first call of nbderiv and of the fastest idiom, each in fresh processes: the median
    of three where a first call takes under 5 s (one fresh process now and then reads 0.4-0.7 s
    slow on this machine, whoever runs in it), else one."""
    out = {}
    for who in ("nbderiv", row["best_idiom"]):
        cmd = [sys.executable, __file__, "--first", row["case"], "--who", who]
        times = []
        while len(times) < (3 if all(t < 5 for t in times) else 1):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("FIRST ")]
            times.append(float(lines[-1].split()[1]) if lines else float("nan"))
            if not lines:
                break
        out[who] = statistics.median(times)
    row["first_s"] = out
    row["first_ratio"] = out["nbderiv"] / out[row["best_idiom"]]
    return row


def render(rows, meta) -> str:
    lines = ["# Real architectures: nbderiv against the fastest hand-written idiom", "",
             f"{meta['machine']}; torch {meta['torch']}, tensorflow {meta['tensorflow']}, "
             f"one thread per framework; medians of {meta['reps']} interleaved rounds (15 for "
             f"calls under 50 ms); "
             f"first calls in fresh subprocesses (median of 3 under 5 s). Generated by `benchmarks/real_models.py`.", "",
             "nbderiv remembers what its checks found about a model while the model is "
             "unchanged (nbderiv.memo); the warm ratio is of repeated calls on the same model, "
             "the last-but-one column of calls that rerun every check "
             "(memo.forget(model) before each).", "",
             "| case | order | N | nbderiv (method) | fastest idiom | ratio (target) | "
             "ratio, checks rerun | first call nbderiv / idiom | first ratio (<= 2) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med, best = r["median_s"], r["best_idiom"]
        first = r.get("first_s", {})
        lines.append(
            f"| {r['case']} | {r['order']} | {r['n']} | {med['nbderiv'] * 1e3:.1f} ms "
            f"({r['method']}) | {best}: {med[best] * 1e3:.1f} ms | **{r['ratio']:.2f}** "
            f"({'ok' if r['ratio'] <= r['target'] else 'MISSED'} <= {r['target']}) | "
            f"{r.get('ratio_checks_rerun', float('nan')):.2f} | "
            + (f"{first['nbderiv']:.2f} s / {first[best]:.2f} s | **{r['first_ratio']:.2f}** "
               f"({'ok' if r['first_ratio'] <= FIRST_TARGET else 'MISSED'}) |"
               if first else "- | - |"))
    lines += ["", "Idioms per case (median ms, or why it did not compete; relative error "
              "against nbderiv):", ""]
    for r in rows:
        parts = []
        for k, e in r["errors"].items():
            t = r["median_s"].get(k)
            parts.append(f"{k}: " + (f"{t * 1e3:.1f} ms (err {e:.1e})" if t is not None
                                     else f"did not compete ({e})"))
        lines.append(f"- {r['case']}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "tensorflow"])
    p.add_argument("--cases", nargs="*")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-first", action="store_true", help="skip the first-call subprocesses")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--first", help=argparse.SUPPRESS)
    p.add_argument("--who", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    table = {c[0]: c for c in CASES}
    if a.first:
        _, fw, model, order, n = table[a.first]
        print("FIRST", first_call(fw, model, order, n, a.who))
        return
    if a.worker:  # one framework's warm cases in this process
        rows = [warm_case(*table[c], a.reps) for c in a.worker.split(",")]
        print("ROWS", json.dumps(rows))
        return
    chosen = [c for c in CASES if (not a.cases or c[0] in a.cases)
              and (not a.framework or c[1] == a.framework)]
    rows = []
    for fw in ("torch", "tensorflow"):
        names = [c[0] for c in chosen if c[1] == fw]
        if not names:
            continue
        print(f"[real] {fw}: {len(names)} cases (warm)", flush=True)
        res = subprocess.run([sys.executable, __file__, "--worker", ",".join(names),
                              "--reps", str(a.reps)], capture_output=True, text=True)
        out = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
        if not out:
            sys.exit(f"{fw} worker failed:\n{res.stderr[-3000:]}")
        rows += json.loads(out[-1][5:])
    if not a.no_first:
        for r in rows:
            print(f"[real] first calls: {r['case']}", flush=True)
            first_calls(r)
    import platform

    import tensorflow as tf
    import torch
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.node()})",
            "torch": torch.__version__, "tensorflow": tf.__version__, "reps": a.reps}
    text = render(rows, meta)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "real.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "real.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
