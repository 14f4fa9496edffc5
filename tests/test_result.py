"""The ``Derivatives`` result: indexing, axis names, metadata, deterministic rendering."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.errors import OptionError  # noqa: E402
from nbderiv.result import Derivatives, Finding  # noqa: E402


def make_result(order=2, seed=0, n=7, d_in=2, d_out=1):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, d_out)).double()
    x = torch.rand(n, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return net, x, nbderiv.derivatives(net, x, order=order)


def test_d0_is_y_and_matches_the_model_output():
    net, x, d = make_result()
    assert d[0] is d.y
    assert isinstance(d.y, np.ndarray) and d.y.shape == (7, 1)
    with torch.no_grad():
        np.testing.assert_allclose(d.y, net(x).numpy(), rtol=1e-14)


def test_d_x_is_the_input_as_numpy():
    _, x, d = make_result()
    assert isinstance(d.x, np.ndarray) and d.x.shape == (7, 2)
    np.testing.assert_array_equal(d.x, x.numpy())


def test_shapes_follow_the_contract():
    _, _, d = make_result(order=3, d_in=2, d_out=3)
    assert d.order == 3
    for k in range(1, 4):
        assert isinstance(d[k], np.ndarray)
        assert d[k].shape == (7, 3) + (2,) * k


@pytest.mark.parametrize("k", [-1, 3, 4, 10])
def test_index_outside_0_to_order_is_a_clear_index_error(k):
    _, _, d = make_result(order=2)
    with pytest.raises(IndexError) as info:
        d[k]
    msg = str(info.value)
    assert str(k) in msg and "order" in msg
    assert "2" in msg  # says which orders it holds


def test_axes_names():
    _, _, d = make_result(order=3)
    assert d.axes(0) == ("point", "output")
    assert d.axes(1) == ("point", "output", "input")
    assert d.axes(2) == ("point", "output", "input", "input")
    assert d.axes(3) == ("point", "output", "input", "input", "input")
    for k in range(4):
        assert len(d.axes(k)) == d[k].ndim
    with pytest.raises(IndexError):
        d.axes(4)


def test_framework_method_inputs():
    _, _, d = make_result()
    assert d.framework == "torch"
    assert isinstance(d.method, str) and d.method.strip()
    assert d.inputs == ("x[0]", "x[1]")
    _, _, d1 = make_result(d_in=1)
    assert d1.inputs == ("x",)


def test_findings_is_a_list_of_findings():
    _, _, d = make_result()
    assert isinstance(d.findings, list)
    assert all(isinstance(f, Finding) for f in d.findings)
    dr = nbderiv.derivatives(nn.Linear(1, 1).double(), torch.zeros(3, dtype=torch.float64))
    f = dr.finding("input-reshaped")
    assert isinstance(f, Finding)
    assert f.code == "input-reshaped" and f.severity in ("info", "warning", "error")
    assert f.message and f.fix
    assert dr.finding("no-such-code") is None


def test_finding_rejects_unknown_severity():
    with pytest.raises(ValueError):
        Finding("x", "fatal", "message")


def test_repr_is_deterministic_and_informative():
    _, _, a = make_result(order=2, seed=3)
    _, _, b = make_result(order=2, seed=3)
    assert repr(a) == repr(b)
    assert a._repr_html_() == b._repr_html_()
    for text in (repr(a), a._repr_html_()):
        assert not re.search(r"0x[0-9a-fA-F]{4,}", text), "memory address in the rendering"
        assert "point" in text and "output" in text and "input" in text
        assert "(7, 1, 2)" in text and "(7, 1, 2, 2)" in text and "(7, 1)" in text
        assert "x[0]" in text and "x[1]" in text
    assert "<" in a._repr_html_() and "</" in a._repr_html_()


def test_header_names_the_orders_computed():
    assert "orders 1..2 [" in repr(make_result(order=2)[2])
    one = make_result(order=1)[2]
    for text in (repr(one), one._repr_html_()):
        assert "order 1 [" in text and "1..1" not in text


def test_repr_of_different_results_differ():
    _, _, a = make_result(order=2, seed=3)
    _, _, b = make_result(order=2, seed=4)
    assert repr(a) != repr(b)


def test_repr_escapes_html_in_names():
    d = Derivatives(x=np.zeros((2, 1)), y=np.zeros((2, 1)), orders=[np.zeros((2, 1, 1))],
                    framework="torch", method="m", inputs=("<b>",))
    html = d._repr_html_()
    assert "<b>" not in html.split("inputs:")[-1]
    assert "&lt;b&gt;" in html


def test_repr_shows_non_finite_values():
    d = Derivatives(x=np.zeros((2, 1)), y=np.array([[1.0], [np.nan]]),
                    orders=[np.array([[[np.inf]], [[1.0]]])], framework="torch", method="m")
    text = repr(d)
    assert "non-finite" in text or "nan" in text.lower()


# -- the method tags: explained in the HTML summary, the plain text unchanged -------------------
def _bare(method, notes=()):
    return Derivatives(x=np.zeros((3, 1)), y=np.zeros((3, 1)), orders=[np.ones((3, 1, 1))],
                       framework="torch", method=method, notes=notes)


@pytest.mark.parametrize("method, tags", [
    ("taylor", ["taylor"]),
    ("reverse-ones", ["reverse-ones"]),
    ("forward-jvp", ["forward-jvp"]),
    ("per-point-blocks", ["per-point-blocks"]),
    ("taylor (XLA)", ["taylor", "XLA"]),
    ("reverse-ones (chunked)", ["reverse-ones", "chunked"]),
    ("forward-jvp (XLA) (chunked)", ["forward-jvp", "XLA", "chunked"]),
])
def test_every_method_tag_is_explained_in_the_html_summary(method, tags):
    from nbderiv.result import METHOD_TAGS, explain_method

    assert [tag for tag, _ in explain_method(method)] == tags
    d = _bare(method)
    page = d._repr_html_()
    tooltip = re.search(r'<span class="nbderiv-method" title="([^"]*)"[^>]*>([^<]*)</span>', page)
    assert tooltip and tooltip.group(2) == method
    note = re.search(r'<p class="nbderiv-method-note">(.*?)</p>', page).group(1)
    for tag in tags:
        text = METHOD_TAGS[tag]
        assert f"{tag}: {text}" in tooltip.group(1).replace("&#x27;", "'")
        assert f"<code>{tag}</code>: {text}" in note.replace("&#x27;", "'")
        assert "\n" not in text and len(text) < 200  # one line each
    # the plain-text summary keeps its form: the method as before, no explanation
    assert repr(d).splitlines()[0].endswith(f"[torch, {method}]")
    assert "nbderiv-method" not in repr(d) and "Taylor mode" not in repr(d)


def test_unknown_method_is_shown_without_a_tooltip():
    page = _bare("something-new")._repr_html_()
    assert "something-new]" in page and "nbderiv-method" not in page


def test_the_readme_explains_every_method_tag():
    from pathlib import Path

    from nbderiv.result import METHOD_TAGS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for tag in METHOD_TAGS:
        shown = f"`({tag})`" if tag in ("XLA", "chunked") else f"`{tag}`"
        assert re.search(rf"^- {re.escape(shown)}: \S", readme, re.M), tag


def test_real_results_name_explained_methods(torch_mlp):
    """The methods the torch backend picks: each tag of each one has its explanation."""
    from nbderiv.result import METHOD_TAGS, method_tags

    x = torch.rand(64, 1, dtype=torch.float64)

    class Wrapped(nn.Module):  # not a plain Sequential: no Taylor mode
        def __init__(self, d_out):
            super().__init__()
            self.net = torch_mlp([1, 8, d_out])

        def forward(self, x):
            return self.net(x)

    bn = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    results = [nbderiv.derivatives(torch_mlp([1, 8, 1]), x, order=2),
               nbderiv.derivatives(Wrapped(1), x, order=2),
               nbderiv.derivatives(Wrapped(6), x, order=2),
               nbderiv.derivatives(bn, x),
               nbderiv.derivatives(Wrapped(1), x, order=2, chunk_size=16)]
    methods = [d.method for d in results]
    assert {t for m in methods for t in method_tags(m)} >= {
        "taylor", "reverse-ones", "forward-jvp", "per-point-blocks", "chunked"}, methods
    for m in methods:
        assert all(tag in METHOD_TAGS for tag in method_tags(m)), m


def test_notes_are_shown_in_both_summaries():
    d = _bare("taylor", notes=["grid: 3 x 3 = 9 points"])
    assert "  grid: 3 x 3 = 9 points" in repr(d).splitlines()
    assert "<p>grid: 3 x 3 = 9 points</p>" in d._repr_html_()
    assert "grid" not in repr(_bare("taylor"))


def test_the_error_against_a_reference_is_shown_per_order():
    torch = pytest.importorskip("torch")
    import nbderiv

    d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 9), order=2, reference=np.sin)
    assert set(d.reference_errors) >= {1, 2}
    assert d.reference_errors[1][0] < 1e-6  # sin' = cos, from the reference by differences
    assert "vs reference: " in repr(d) and "order 2: max abs err" in repr(d)
    assert "vs reference:" in d._repr_html_()
    plain = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 9), order=2)
    assert "vs reference" not in repr(plain) and plain.reference_errors is None


def test_a_framework_function_as_reference_is_refused_with_the_numpy_form():
    """reference= is a function of NumPy arrays; torch.sin fails on them: one clear error."""
    x = torch.linspace(-1, 1, 5).reshape(-1, 1)
    with pytest.raises(OptionError, match=r"the reference raised TypeError.*reference=np\.sin"):
        nbderiv.derivatives(torch.sin, x, reference=torch.sin)
    errors = nbderiv.derivatives(torch.sin, x, reference=np.sin).reference_errors
    assert errors[1][0] < 1e-6  # d sin = cos, against float64 central differences


class _XT(nn.Module):
    def forward(self, x, t):
        return torch.sin(x) * t


def test_a_reference_of_a_tuple_x_takes_the_arguments_as_the_model_does():
    """x = (x, t): a one-argument reference fails, and the fix offered takes (x, t) (it
    offered lambda x: np.sin(x), what had just failed); that fix works."""
    x = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None]
    t = torch.linspace(1, 2, 6, dtype=torch.float64)[:, None]
    with pytest.raises(OptionError) as info:
        nbderiv.derivatives(_XT(), (x, t), reference=lambda z: np.sin(z))
    assert "reference=lambda x, t:" in str(info.value)
    d = nbderiv.derivatives(_XT(), (x, t), reference=lambda x, t: np.sin(x) * t)
    assert d.reference_errors[1][0] < 1e-6
