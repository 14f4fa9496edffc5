"""``import nbderiv`` and ``%load_ext nbderiv`` stay light: no framework, no matplotlib, no
widgets (and ``import nbderiv`` no IPython); each is checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorflow", "keras", "matplotlib", "ipywidgets")

IMPORT = """
import json, sys, time
start = time.perf_counter()
import nbderiv
elapsed = time.perf_counter() - start
names = sorted(nbderiv.__all__)
print(json.dumps({"seconds": elapsed, "modules": sorted(m.split(".")[0] for m in sys.modules),
                  "names": names}))
"""

LOAD_EXT = """
import io, json, sys, contextlib
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
before = set(m.split(".")[0] for m in sys.modules)
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    shell.run_line_magic("load_ext", "nbderiv")
print(json.dumps({"modules": sorted(m.split(".")[0] for m in sys.modules),
                  "before": sorted(before), "printed": out.getvalue() + err.getvalue(),
                  "registered": "nnderiv" in shell.magics_manager.magics["line"]}))
"""

PLOT = """
import json, sys
import torch, nbderiv
d = nbderiv.derivatives(torch.sin, torch.linspace(0, 1, 5), order=1)
d.plot()._repr_png_()
nbderiv.plot_jacobian(torch.sin, torch.linspace(0, 1, 3))
print(json.dumps({"pyplot": "matplotlib.pyplot" in sys.modules}))
"""

NOTEBOOK_LAYER = """
import json, sys
import nbderiv.widgets, nbderiv.teaching
loaded = sorted(m.split(".")[0] for m in sys.modules)
try:
    nbderiv.compare_activations(lambda x: x**2, framework="tensorflow")
except nbderiv.NbderivError as exc:
    refused = str(exc)
print(json.dumps({"loaded": loaded, "refused": refused,
                  "after": sorted(m.split(".")[0] for m in sys.modules)}))
"""


def _run(code: str) -> dict:
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_nbderiv_is_light_and_fast():
    runs = [_run(IMPORT) for _ in range(3)]
    loaded = set(runs[0]["modules"])
    assert not loaded & set(HEAVY + ("IPython",)), sorted(loaded & set(HEAVY + ("IPython",)))
    assert min(r["seconds"] for r in runs) < 0.1, [r["seconds"] for r in runs]
    assert {"plot_derivatives", "plot_jacobian", "explore", "compare_activations"} <= \
        set(runs[0]["names"])


def test_load_ext_registers_the_magic_quietly_without_heavy_imports():
    pytest.importorskip("IPython")
    r = _run(LOAD_EXT)
    assert r["registered"] and r["printed"] == ""
    new = set(r["modules"]) - set(r["before"])
    assert not new & set(HEAVY), sorted(new & set(HEAVY))
    assert not set(r["modules"]) & set(HEAVY)


def test_plots_never_touch_pyplot():
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    assert _run(PLOT)["pyplot"] is False


def test_the_notebook_layer_imports_its_libraries_only_when_used():
    """Importing the explorer and the teaching helpers loads no framework, matplotlib,
    ipywidgets or IPython; refusing to train a TensorFlow net imports no TensorFlow."""
    r = _run(NOTEBOOK_LAYER)
    heavy = set(HEAVY + ("IPython",))
    assert not set(r["loaded"]) & heavy, sorted(set(r["loaded"]) & heavy)
    assert "PyTorch" in r["refused"] and not set(r["after"]) & heavy


SUBMODULES = """
import json, sys
import nbderiv
forget, keep = nbderiv.memo.forget, nbderiv.result_memory.keep  # as the README writes them
print(json.dumps({"modules": sorted(m.split(".")[0] for m in sys.modules)}))
"""


def test_the_submodules_the_readme_names_work_right_after_import():
    loaded = set(_run(SUBMODULES)["modules"])
    assert not loaded & set(HEAVY + ("IPython",)), sorted(loaded & set(HEAVY + ("IPython",)))
