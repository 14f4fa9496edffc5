"""The tutorial notebooks are regression tests, not decoration.

What ``pytest --nbval`` (run by ``make test``) cannot check about itself is checked here:

* every notebook in ``notebooks/`` is collected by nbval with the exact flags of ``make
  test`` (``--nbval``, never ``--nbval-lax``), one test item per code cell;
* every notebook was executed top to bottom in one fresh kernel (execution counts 1, 2, ...),
  stores its outputs, and shows no error and no stderr (leaked warnings or TF log lines);
* outputs are compared for real: at most the explorer-widget cell is ignored, nothing is
  skipped, no ``# NBVAL_IGNORE_OUTPUT`` comments, and the sanitize rules are commented and
  leave the key numbers alone;
* the stored outputs state the facts each notebook teaches (20 and 16, not 12; the shapes
  (501, 1) and (501, 1, 1); the finding codes; "≈ 2 within tolerance: True");
* figures are PNG (nbval skips PNG but compares SVG);
* the notebooks are their own source (no generator, no notebook text in Python strings):
  each is valid nbformat 4, stored as Jupyter itself writes it, with unique cell ids, the
  ``python3`` kernel, no empty cells and no per-cell timing metadata, and ``make notebooks``
  re-executes them in place without adding timings;
* the tour has what the browser test drives: ``%nnderiv`` on torch and Keras, ``--plot``,
  ``--check``, ``--code``, the ReLU finding, and ``nbderiv.explore`` as a cell's last output.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SANITIZE = NOTEBOOKS / "sanitize.cfg"
MAKEFILE = ROOT / "Makefile"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
GALLERY = {  # the questions students ask most (issue 19), each explained by %%nnderiv explain
    "06_element_0_does_not_require_grad", "07_tape_gradient_is_none",
    "08_grad_of_non_scalar_output", "09_grad_is_none_on_non_leaf", "10_numpy_inside_forward",
    "11_grad_outputs_ones_sums_outputs", "12_backward_through_the_graph_twice",
    "13_inplace_modification", "14_vanishing_input_gradients", "15_pinn_normalised_inputs",
}
EXPECTED = {
    "00_tour", "01_relu_second_derivative", "02_grad_outputs_ones",
    "03_second_derivative_scalar", "04_jacobian_shapes_pinn", "05_saliency_and_sequences",
} | GALLERY
IGNORE_TAGS = {"nbval-ignore-output", "nbval-skip"}
IGNORE_COMMENTS = ("NBVAL_IGNORE_OUTPUT", "NBVAL_SKIP", "PYTEST_VALIDATE_IGNORE_OUTPUT")

# What each notebook's stored outputs must say (as text), so that re-executing a notebook
# with a wrong result and committing it fails here even though nbval would then agree.
FACTS = {
    "00_tour": [
        "point × output × input × input", "piecewise-linear", "[tensorflow,", "[torch,",
        "finite differences agree: True", "Hessian symmetric: True", "torch.autograd.grad(",
        "second derivative all zero: True",
    ],
    "01_relu_second_derivative": [
        # x = 1 is a dead region (issue 18), not a kink: all first-layer units off, y flat
        "d2y/dx2     (6, 6)", "['input-reshaped', 'piecewise-linear']\n",
        "first-layer units on at x = 1: 0 of 128", "y constant on [0.9, 1.2]: True",
        "left and right slopes at x = 1: 0.0 0.0", "at-kink raised: False",
        "second derivative ≈ 2 within tolerance: True", "batch_jacobian agrees with nbderiv: True",
        "ReLU  findings ['piecewise-linear'], mean d2y/dx2 0.0, ≈ 2 within tolerance: False",
        "≈ 2 within tolerance: True, finite differences agree: True",
        "relu      mean |d2y/dx2 - 2| = 2.0",
    ],
    "02_grad_outputs_ones": [
        "torch.Size([100, 2])", "off-diagonal blocks all zero: True",
        "ones trick = column sums: True", "RuntimeError, graph already freed: True",
        "d[2] matches the closed form: True", "['train-mode', 'coupled-samples']",
        "nbderiv gives the per-point blocks: True", "running statistics untouched: True",
        "ones trick = nbderiv: True",
    ],
    "03_second_derivative_scalar": [
        "dy/dx   = 20.0", "d2y/dx2 = 16.0", "autograd matches the closed form: True",
        "finite differences: 20.0 16.0", "autograd:    16.0 14.0",
        "autograd_hessian installed: False", "orders 1, 2, 3: [20.0, 16.0, 6.0]",
        "torch.func.hessian:                torch.Size([1, 1]) 16.0",
        "second derivative matches -2x/(1+x^2)^2: True",
    ],
    "04_jacobian_shapes_pinn": [
        "u_x:  (501, 1)", "u_xx: (501, 1, 1) all zero: True",
        "Tanh, lambda _: u_x    all zero: True", "Tanh, nested jacobian  all zero: False",
        "ReLU, nested jacobian  all zero: True", "x (3, 1) -> (3, 501, 3, 1)",
        "func.hessian:   (501, 1, 1)", "('point', 'output', 'input', 'input') (50, 501, 1, 1)",
        "d[2] equals vmap(hessian): True", "['piecewise-linear']",
    ],
    "05_saliency_and_sequences": [
        "test accuracy: 1.00", "(64, 1, 3, 16, 16)",
        "('point', 'output', 'input axis 1', 'input axis 2', 'input axis 3')",
        "nbderiv equals autograd's x.grad: True",
        "share of the saliency in the squares >= 0.5 for every image: True",
        "a square pixel matters over 5x more than a noise pixel: True",
        "(32, 1, 10, 3) equals nbderiv: True",
        "two largest mean |dy/dx| at (t, f): [(2, 0), (7, 1)]",
        "within 0.15 of the true gradient everywhere: True",
    ],
    # the gallery: the code %%nnderiv explain names, and the check of the fix
    "06_element_0_does_not_require_grad": [
        "[no-grad-required]", "names the cause: True", "autograd matches the chain rule by hand: True"],
    "07_tape_gradient_is_none": [
        "[none]", "dydx is None: True", "tape.gradient matches the chain rule by hand: True"],
    "08_grad_of_non_scalar_output": [
        "[non-scalar-backward]", "[summed-outputs]",
        "g = sum over the outputs of the true Jacobian: True", "matches the chain rule by hand: True"],
    "09_grad_is_none_on_non_leaf": [
        "[non-leaf-grad]", "x.grad matches the chain rule by hand: True"],
    "10_numpy_inside_forward": [
        "[numpy-requires-grad]", "[zeros-graph-broken]", "graph-broken",
        "autograd matches the derivative by hand: True"],
    "11_grad_outputs_ones_sums_outputs": [
        "[summed-outputs]", "grads = du/d(x,t) + dv/d(x,t): True",
        "per-output derivatives match float64 central differences: True"],
    "12_backward_through_the_graph_twice": [
        "[graph-freed]", "first and second derivative match float64 central differences: True"],
    "13_inplace_modification": [
        "[inplace-modified]", "matches float64 central differences: True"],
    "14_vanishing_input_gradients": [
        "saturated", "saliency matches float64 central differences: True"],
    "15_pinn_normalised_inputs": [
        "[wrong]", "du/dz / sigma                           True", "nbderiv d[1] = cos x"],
}
# Strings no output may contain: the post's wrong answers presented as results, errors.
FORBIDDEN = ["d2y/dx2 = 12", "Traceback (most recent call last)"]
# Key outputs that no sanitize rule may touch.
KEY_TEXTS = [
    "d2y/dx2 = 16.0", "dy/dx   = 20.0", "(501, 1, 1)", "second derivative ≈ 2 within tolerance: True",
    "['piecewise-linear']", "coupled-samples", "finite differences agree: True",
    "min -0.02056  mean 0.2921  max 0.4295", "OK vs float64 central differences (h=0.0002)",
    "torch.Size([100, 2])", "<NbderivFigure size 640x630 with 3 Axes>",
]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _joined(t) -> str:
    return t if isinstance(t, str) else "".join(t)


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        t = output["text"]
    elif output["output_type"] in ("display_data", "execute_result"):
        t = output["data"].get("text/plain", "")
    else:  # error
        t = "\n".join(output.get("traceback", []))
    return t if isinstance(t, str) else "".join(t)


def _all_text(nb: dict) -> str:
    return "\n".join(_text(o) for c in _code_cells(nb) for o in c.get("outputs", []))


def _ids(paths):
    return [p.stem for p in paths]


def test_the_tutorials_and_the_gallery_exist():
    assert {p.stem for p in PATHS} == EXPECTED


def test_make_test_runs_nbval_strictly_over_the_notebooks_folder():
    make = MAKEFILE.read_text()
    nbval = re.search(r"^NBVAL\s*:?=\s*(.+)$", make, re.M)
    assert nbval, "the Makefile defines no NBVAL flags"
    flags = nbval.group(1).split()
    assert "--nbval" in flags and "--nbval-current-env" in flags
    assert flags[flags.index("--nbval-sanitize-with") + 1] == "notebooks/sanitize.cfg"
    assert "--nbval-lax" not in make
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", make, re.M)
    assert test_recipe and re.search(r"pytest \$\(NBVAL\) notebooks\b", test_recipe.group(1))


@pytest.mark.skipif(importlib.util.find_spec("nbval") is None, reason="nbval is not installed")
def test_nbval_collects_one_item_per_code_cell_of_every_notebook():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", str(SANITIZE), "--collect-only", "-q", "-p", "no:cacheprovider",
         str(NOTEBOOKS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    collected = {}
    for line in out.stdout.splitlines():
        m = re.match(r"notebooks/(\w+)\.ipynb::Cell \d+$", line.strip())
        if m:
            collected[m.group(1)] = collected.get(m.group(1), 0) + 1
    expected = {p.stem: len(_code_cells(_load(p))) for p in PATHS}
    assert collected == expected


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_executed_top_to_bottom_with_outputs_and_no_errors(path):
    nb = _load(path)
    cells = _code_cells(nb)
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name} was not executed top to bottom in one kernel: counts {counts}. "
        "Fix: make notebooks (re-executes every notebook in place, in a fresh kernel each)")
    with_output = [c for c in cells if c.get("outputs")]
    assert len(with_output) >= len(cells) - 3, "most code cells must show something"
    for c in cells:
        for o in c.get("outputs", []):
            assert o["output_type"] != "error", f"{path.name}: error in\n{_source(c)}"
            assert not (o["output_type"] == "stream" and o["name"] == "stderr"), (
                f"{path.name}: stderr output (a leaked warning or log line) in\n{_source(c)}\n"
                f"{_text(o)}")


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_outputs_are_compared_not_ignored(path):
    cells = _code_cells(_load(path))
    ignored = [c for c in cells if IGNORE_TAGS & set(c.get("metadata", {}).get("tags", []))]
    assert len(ignored) <= 1, f"{path.name}: {len(ignored)} cells escape comparison"
    for c in ignored:
        assert "nbval-skip" not in c["metadata"]["tags"], "no cell may be skipped"
        assert re.search(r"explore\(|--widget", _source(c)), (
            "only a widget cell may ignore its output; got:\n" + _source(c))
    for c in cells:
        assert not any(m in _source(c) for m in IGNORE_COMMENTS), _source(c)


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_first_cell_sets_tensorflow_environment_before_any_import(path):
    cells = _code_cells(_load(path))
    first = _source(cells[0])
    assert 'os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"' in first
    assert 'os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"' in first
    assert not re.search(r"^\s*(import|from)\s+(tensorflow|keras|nbderiv|torch)\b", first, re.M)


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_stored_outputs_state_the_facts(path):
    text = _all_text(_load(path))
    missing = [f for f in FACTS[path.stem] if f not in text]
    assert not missing, f"{path.name} outputs lack {missing}"
    present = [f for f in FORBIDDEN if f in text]
    assert not present, f"{path.name} outputs contain {present}"


def test_relu_notebook_explains_the_zero_slope_at_1_as_a_dead_region_not_a_kink():
    """Issue 18: x = 1 lies in a dead region (every first-layer unit off, y flat around it);
    the notebook once taught it as the relu'(0) convention at a kink."""
    nb = _load(NOTEBOOKS / "01_relu_second_derivative.ipynb")
    prose = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "dead region" in prose and "128 first-layer units is off" in prose
    assert "relu'(0) = 0), not a derivative" not in prose
    assert "at-kink:" not in _all_text(nb)


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_figures_are_png_not_svg(path):
    for c in _code_cells(_load(path)):
        for o in c.get("outputs", []):
            assert "image/svg+xml" not in o.get("data", {}), "nbval compares SVG: use PNG"


def test_sanitize_rules_are_commented_and_spare_the_key_outputs():
    text = SANITIZE.read_text()
    rules = re.findall(r"^regex: (.*)$\n^replace: (.*)$", text, flags=re.M)  # nbval's own parse
    assert rules, "sanitize.cfg holds no rules"
    n_regex = len(re.findall(r"^regex:", text, flags=re.M))
    assert n_regex == len(rules), "a regex: line without its replace: line"
    lines = text.splitlines()
    for regex, _ in rules:
        at = lines.index(f"regex: {regex}")
        before = lines[at - 1].strip()
        above = lines[at - 2].strip() if at >= 2 else ""
        assert before.startswith("#") or above.startswith("#"), f"uncommented rule {regex!r}"
        pattern = re.compile(regex)
        assert not pattern.fullmatch(""), f"rule {regex!r} matches the empty string"
        for key in KEY_TEXTS:
            assert pattern.sub("X", key) == key, f"rule {regex!r} rewrites key output {key!r}"


def test_sanitize_rules_do_rewrite_what_they_are_for():
    rules = re.findall(r"^regex: (.*)$\n^replace: (.*)$", SANITIZE.read_text(), flags=re.M)

    def clean(s):
        for regex, replace in rules:
            s = re.sub(regex, replace, s)
        return s

    assert clean("order 1: max abs err 4.3e-08, rel 1.8e-07;") == \
        clean("order 1: max abs err 5e-08, rel 2.4e-07;")
    assert clean("<function f at 0x7f3a12b4c0d0>") == clean("<function f at 0x7f00deadbeef>")
    assert clean("1/1 ━━━━━━━━━━━━━━━━━━━━ 0s 31ms/step") == \
        clean("1/1 ━━━━━━━━━━━━━━━━━━━━ 0s 4ms/step")
    assert clean("W0000 00:00:1732705432.123456   12345 cuda_dnn.cc:42] msg\nok") == \
        clean("W0000 00:00:1732705999.654321   99 cuda_dnn.cc:42] msg\nok")


def test_the_notebooks_are_their_own_source():
    """A teacher edits a notebook in JupyterLab and saves it: that file is the source. No
    generator may exist beside them, and nothing may point to one."""
    assert sorted(p.name for p in NOTEBOOKS.iterdir() if p.suffix == ".py") == []
    for path in (MAKEFILE, ROOT / "binder" / "check.sh", ROOT / "README.md",
                 *sorted((ROOT / "tests").glob("*.py"))):
        if path == Path(__file__):
            continue
        assert "build_notebooks" not in path.read_text(encoding="utf-8"), path


def test_make_notebooks_executes_them_in_place_without_timings():
    make = MAKEFILE.read_text()
    recipe = re.search(r"^notebooks:.*\n((?:\t.*\n)+)", make, re.M)
    assert recipe, "the Makefile has no notebooks target"
    command = recipe.group(1)
    for part in ("nbconvert", "--execute", "--inplace", "notebooks/*.ipynb",
                 "--ExecutePreprocessor.record_timing=False"):
        assert part in command, f"`make notebooks` lacks {part}"


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_valid_nbformat_as_jupyter_writes_it(path):
    nbformat = pytest.importorskip("nbformat")
    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4 and nb.nbformat_minor >= 5, "cell ids need nbformat 4.5"
    nbformat.validate(nb)
    assert text == nbformat.writes(nb) + "\n", (
        f"{path.name} is not stored as Jupyter writes it (indent, key order, final newline). "
        "Fix: open and save it in JupyterLab, or run `make notebooks`.")
    ids = [c.id for c in nb.cells]
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"
    assert nb.metadata.kernelspec.name == "python3", "nbval and nbconvert start this kernel"
    assert nb.metadata.language_info.name == "python"
    for c in nb.cells:
        assert c.source.strip(), f"{path.name}: an empty {c.cell_type} cell ({c.id})"
        assert "execution" not in c.metadata, (
            f"{path.name}: per-cell timing metadata in {c.id}. Fix: make notebooks "
            "(it executes without recording timings).")


def test_tour_has_what_the_browser_test_drives():
    nb = _load(NOTEBOOKS / "00_tour.ipynb")
    cells = _code_cells(nb)
    sources = "\n".join(_source(c) for c in cells)
    assert "%load_ext nbderiv" in sources
    for option in ("--plot", "--check", "--code"):
        assert re.search(rf"%nnderiv .*{option}", sources), option
    text = _all_text(nb)
    assert "[torch," in text and "[tensorflow," in text, "%nnderiv on a torch and a Keras model"
    assert "piecewise-linear" in text
    html = "\n".join(_joined(o["data"].get("text/html", "")) for c in cells
                     for o in c.get("outputs", []) if "data" in o)
    assert all(w in html for w in ("point", "output", "input", "piecewise-linear"))
    explorer = [c for c in cells if "nbderiv.explore(" in _source(c)]
    assert explorer, "the tour needs an explorer widget"
    last_line = _source(explorer[-1]).strip().splitlines()[-1]
    assert last_line.startswith("nbderiv.explore("), "explore(...) must be the cell's last value"
    last_output = explorer[-1]["outputs"][-1]
    assert "application/vnd.jupyter.widget-view+json" in last_output["data"]
    assert "description='order'" in _joined(last_output["data"]["text/plain"])
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json")
    assert state and state["state"], "widget state is stored so viewers can render the widget"
