"""Regenerate the README's pictures from nbderiv's own plotting code.

    .venv/bin/python docs/make_figures.py        # writes docs/*.png

derivatives.png  a tanh net fitted to x**2: y, dy/dx, d²y/dx² with the truth and the
                 finite-difference check (``nbderiv.plot_derivatives``)
activations.png  ReLU vs tanh vs softplus nets fitted to x**2: ReLU's second derivative is
                 zero everywhere (``nbderiv.compare_activations``)
jacobian.png     the cross-sample Jacobian of independent points (block diagonal) next to
                 BatchNorm in training mode (coupled points) (``nbderiv.plot_jacobian``)
explorer.png     the picture inside ``nbderiv.explore`` (order 3, finite differences on)

Everything is seeded; torch's global random state is saved and restored.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.plot import NbderivFigure  # noqa: E402

DPI = 100


def save(fig, name: str) -> None:
    path = HERE / name
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    print(f"wrote {path.relative_to(HERE.parent)}")


def square(x):
    return x ** 2


def main() -> None:
    with torch.random.fork_rng(devices=[]):
        comparison = nbderiv.compare_activations(square, ("relu", "tanh", "softplus"),
                                                 steps=600, seed=0, progress=False)
        save(comparison.figure, "activations.png")

        tanh_net = comparison.models["tanh"]
        x = torch.linspace(-2, 2, 161).reshape(-1, 1)
        d = nbderiv.derivatives(tanh_net, x, order=2, check=True)
        save(d.plot(reference=square, fd=True, figsize=(6.4, 6.0)), "derivatives.png")

        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        bn = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16),
                                 torch.nn.Tanh(), torch.nn.Linear(16, 1)).train()
        points = torch.rand(10, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
        fig = NbderivFigure(figsize=(11, 4.4), layout="constrained")
        left, right = fig.subplots(1, 2)
        nbderiv.plot_jacobian(mlp, points, ax=left)
        nbderiv.plot_jacobian(bn, points, ax=right)
        left.set_title("tanh MLP\n" + left.get_title().split("\n", 1)[1], fontsize=10)
        right.set_title("BatchNorm in training mode\n" + right.get_title().split("\n", 1)[1],
                        fontsize=10)
        fig.suptitle("cross-sample Jacobian of 10 points with 2 inputs each")
        save(fig, "jacobian.png")

        w = nbderiv.explore(tanh_net, domain=(-2, 2), reference=square, order=3)
        w.controls["finite differences"].value = True
        (HERE / "explorer.png").write_bytes(bytes(w.image.value))
        print("wrote docs/explorer.png")
    assert np.all(np.asarray(comparison.derivatives["relu"][2]) == 0)


if __name__ == "__main__":
    main()
