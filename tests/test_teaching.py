"""nbderiv.teaching: compare_activations trains seeded nets (torch's random state and thread
count put back), measures their derivatives against the target's own, and refuses what it
cannot train with a clear OptionError."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import nbderiv  # noqa: E402
from nbderiv.errors import OptionError  # noqa: E402
from nbderiv.teaching import Comparison, compare_activations  # noqa: E402


def test_the_public_name_is_this_function():
    from nbderiv import widgets

    assert nbderiv.compare_activations is compare_activations
    assert not hasattr(widgets, "compare_activations")  # widgets train nothing


def test_compare_activations_relu_has_no_curvature_and_is_seeded():
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    c = nbderiv.compare_activations(lambda x: x ** 2, ("relu", "softplus"), steps=150,
                                    hidden=(16, 16), n=101, progress=False)
    assert isinstance(c, Comparison)
    assert time.perf_counter() - start < 30
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    np.testing.assert_allclose(c.truth[1], 2 * c.x, atol=1e-12)  # closed form of x**2
    np.testing.assert_allclose(c.truth[2], 2.0)
    relu2 = np.asarray(c.derivatives["relu"][2])
    assert np.all(relu2 == 0)  # piecewise linear: no second derivative anywhere
    inner = np.abs(c.x) <= 1.5
    soft2 = np.asarray(c.derivatives["softplus"][2]).reshape(-1)[inner]
    assert abs(soft2.mean() - 2) < 0.5
    assert c.errors["relu"][2] == pytest.approx(2.0)
    assert "piecewise-linear" in c.derivatives["relu"].codes
    assert [ln.get_label() for ln in c.figure.panels[2].lines] == ["relu", "softplus", "truth"]
    again = nbderiv.compare_activations(lambda x: x ** 2, ("relu", "softplus"), steps=150,
                                        hidden=(16, 16), n=101, progress=False)
    for a in ("relu", "softplus"):
        for p, q in zip(c.models[a].parameters(), again.models[a].parameters(), strict=True):
            assert torch.equal(p, q)
    other = nbderiv.compare_activations(lambda x: x ** 2, ("relu",), steps=5, seed=1,
                                        progress=False)
    assert not torch.equal(next(other.models["relu"].parameters()),
                           next(c.models["relu"].parameters()))
    assert "softplus" in c._table_html() and "softplus" in repr(c)
    assert c.figure.to_png().startswith(b"\x89PNG")


def test_the_comparison_displays_as_figure_then_table():
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    c = compare_activations(lambda x: x ** 2, ("tanh",), steps=3, n=5, progress=False)
    with capture_output() as captured:
        c._ipython_display_()
    kinds = [sorted(o.data) for o in captured.outputs]
    assert "image/png" in kinds[0] and "text/html" in kinds[1]
    assert "tanh" in captured.outputs[1].data["text/html"]


@pytest.mark.parametrize("framework", ["tensorflow", "keras", None])
def test_only_torch_networks_are_trained(framework):
    with pytest.raises(OptionError, match="trains PyTorch networks") as info:
        compare_activations(lambda x: x ** 2, framework=framework)
    assert "Fix: framework='torch'" in str(info.value)


def test_aliases_and_unknown_frameworks():
    c = compare_activations(lambda x: x ** 2, ("tanh",), framework="PyTorch", steps=2, n=3,
                            progress=False)
    assert list(c.models) == ["tanh"]
    with pytest.raises(OptionError, match="unknown framework 'jax'"):
        compare_activations(lambda x: x ** 2, framework="jax")


@pytest.mark.parametrize("kwargs, match", [
    ({"activations": ("swishy",)}, "unknown activation"),
    ({"activations": ()}, "activations is empty"),
    ({"steps": 0}, "steps must be a positive int, got 0"),
    ({"n": 1}, "n must be an int >= 2, got 1"),
    ({"n_train": True}, "n_train must be a positive int"),
    ({"hidden": 32}, "hidden must be a sequence of positive ints"),
    ({"hidden": (8, 0)}, "hidden must be a sequence of positive ints"),
    ({"domain": (1, -1)}, "low < high"),
])
def test_option_errors_say_how_to_fix(kwargs, match):
    start = time.perf_counter()
    with pytest.raises(OptionError, match=match) as info:
        compare_activations(lambda x: x ** 2, **kwargs)
    assert "Fix:" in str(info.value)
    assert time.perf_counter() - start < 5  # refused before training 600 steps
