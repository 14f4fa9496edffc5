"""Teaching helpers that train networks: :func:`compare_activations` and its :class:`Comparison`.

The only nbderiv module that trains networks for you. The training itself is PyTorch code,
so it lives with the torch backend (:mod:`nbderiv.backends.torch_train`), imported here only
when a comparison runs; every derivative comes from :func:`nbderiv.derivatives` and every
picture from :mod:`nbderiv.plot`. IPython is imported only to display a result.

>>> import nbderiv
>>> c = nbderiv.compare_activations(lambda x: x**2, ("relu", "tanh"), steps=50,
...                                 progress=False)
>>> float(abs(c.derivatives["relu"][2]).max())
0.0
"""

from __future__ import annotations

import html
import importlib
from dataclasses import dataclass, field

import numpy as np

from .errors import BackendError, OptionError
from .options import is_int, positive_int
from .widgets import domain_pair


@dataclass
class Comparison:
    """What :func:`compare_activations` trained and measured.

    ``models`` {activation: trained torch module}, ``derivatives`` {activation: Derivatives
    (order 2) on ``x``}, ``truth`` {k: (n,) true k-th derivative of the target on ``x``},
    ``losses`` {activation: final training MSE}, ``errors`` {activation: {k: mean |d^k y -
    truth|}}, ``figure`` (y, dy/dx, d²y/dx² of every net against the truth). Displays as the
    figure plus a table.
    """

    x: np.ndarray
    models: dict
    derivatives: dict
    truth: dict
    losses: dict
    errors: dict
    figure: object = field(repr=False)
    seed: int = 0

    def _table_html(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(a)}</td><td>{self.losses[a]:.3g}</td>"
            + "".join(f"<td>{self.errors[a][k]:.3g}</td>" for k in (1, 2)) + "</tr>"
            for a in self.models)
        return ("<table><thead><tr><th>activation</th><th>training MSE</th>"
                "<th>mean |dy/dx − true|</th><th>mean |d²y/dx² − true|</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")

    def _ipython_display_(self):
        """The figure as a PNG output, then the table (separate outputs, so notebook tests
        compare the table's text and skip the image bytes)."""
        from IPython.display import HTML, display

        display(self.figure)
        display(HTML(self._table_html()))

    def __repr__(self) -> str:
        lines = [f"Comparison of {', '.join(self.models)} nets (seed {self.seed}):"]
        lines += [f"  {a:<10} MSE {self.losses[a]:.3g}  mean |d1 - true| {self.errors[a][1]:.3g}"
                  f"  mean |d2 - true| {self.errors[a][2]:.3g}" for a in self.models]
        return "\n".join(lines)


def compare_activations(target, activations=("relu", "tanh", "softplus"), *, framework="torch",
                        domain=(-2, 2), hidden=(32, 32), steps=600, lr=1e-2, n_train=64,
                        n=200, seed=0, progress=True):
    """Train one small seeded net per activation on a 1-D ``target`` and compare their
    first and second derivatives with the target's own.

    Each net is ``Linear(1, h) -> act -> ... -> Linear(h, 1)`` trained by full-batch Adam
    (``steps`` steps, MSE on ``n_train`` evenly spaced points of ``domain``); the global
    torch random state is restored afterwards, so the same ``seed`` gives the same nets.
    ``target`` takes a torch tensor (e.g. ``lambda x: x**2``); its true derivatives come
    from differentiating ``target`` itself. Returns a :class:`Comparison` (models,
    derivatives (order 2 on ``n`` points: ``x`` (n,)), truth, errors, figure), which
    displays as the figure and a table.

    >>> c = compare_activations(lambda x: x**2, "softplus", steps=5, n=11, progress=False)
    >>> c.x.shape, c.derivatives["softplus"][2].shape
    ((11,), (11, 1, 1, 1))
    """
    trainer = _torch_trainer(framework)
    lo, hi = domain_pair(domain)
    if isinstance(activations, str):
        activations = (activations,)
    acts = dict(trainer.activation_class(a) for a in activations)
    if not acts:
        raise OptionError("activations is empty. Fix: e.g. ('relu', 'tanh').")
    steps = positive_int(steps, "steps", example=600)
    n = positive_int(n, "n", 2, example=200)
    n_train = positive_int(n_train, "n_train", example=64)
    hidden = _layer_widths(hidden)
    models, losses = {}, {}
    bar = _progress_bar(len(acts) * steps, progress)
    try:
        for a, (name, cls) in enumerate(acts.items()):
            models[name], losses[name] = trainer.fit_1d(
                target, cls, hidden=hidden, steps=steps, lr=lr, n_train=n_train,
                domain=(lo, hi), seed=seed + a, on_step=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    from .api import derivatives
    from .plot import plot_comparison

    x = np.linspace(lo, hi, n).reshape(-1, 1)
    truth_d = derivatives(target, x, order=2, framework="torch")
    truth = {k: np.asarray(truth_d[k]).reshape(-1) for k in range(3)}
    ders, errors = {}, {}
    for name, model in models.items():
        d = derivatives(model, x, order=2)
        ders[name] = d
        errors[name] = {k: float(np.mean(np.abs(np.asarray(d[k]).reshape(-1) - truth[k])))
                        for k in range(3)}
    fig = plot_comparison(x[:, 0], {name: ders[name] for name in models}, truth)
    return Comparison(x[:, 0], models, ders, truth, losses, errors, fig, seed)


def _torch_trainer(framework):
    """The module that trains the nets, :mod:`nbderiv.backends.torch_train`: only PyTorch
    networks are trained (the name is checked by :func:`nbderiv.backends.framework_name`;
    an unsupported framework is refused before anything is imported)."""
    from .backends import framework_name

    if framework is None or framework_name(None, framework=framework) != "torch":
        raise OptionError(f"compare_activations trains PyTorch networks; framework={framework!r} "
                          "is not supported. Fix: framework='torch'.")
    try:
        return importlib.import_module("nbderiv.backends.torch_train")
    except ImportError as exc:
        raise BackendError(f"framework 'torch' is not installed ({exc}). "
                           "Fix: pip install 'nbderiv[torch]'.") from None


def _layer_widths(hidden) -> tuple:
    """``hidden`` as a tuple of positive ints (the hidden layers' widths)."""
    try:
        widths = tuple(hidden) if not isinstance(hidden, str) else None
    except TypeError:
        widths = None
    if widths is None or not all(is_int(h) and h >= 1 for h in widths):
        raise OptionError(f"hidden must be a sequence of positive ints (the hidden layers' "
                          f"widths), got {hidden!r}. Fix: e.g. hidden=(32, 32).")
    return tuple(int(h) for h in widths)


def _progress_bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety
        return None
    return tqdm(total=total, desc="training", unit="step", leave=False)
