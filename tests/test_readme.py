"""Every ```python block of README.md, then of docs/*.md, runs in order in one real IPython
shell, exactly as written: magics, trailing comments and all, as a newcomer pastes them into
a notebook. A block of ``>>>`` examples is a doctest transcript: its examples run in the same
shell's namespace and their printed output must match.

Blocks that are not meant to run (shell commands, output) are fenced as ```bash or ```text.
"""

from __future__ import annotations

import doctest
import os
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("IPython")

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
BUDGET_S = 60  # the README runs in CI: its snippets stay small


def python_blocks(path: Path) -> list:
    """[(line number, source)] of the ```python blocks of ``path``, in order."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1) == "python"]


def test_the_block_reader_sees_every_fence():
    text = "a\n```python\nx = 1  # c\n```\n```bash\nmake lab\n```\n```python\n%nnderiv?\n```\n"
    path = ROOT / "tests" / "_fences.md"
    try:
        path.write_text(text)
        assert python_blocks(path) == [(2, "x = 1  # c\n"), (8, "%nnderiv?\n")]
    finally:
        path.unlink()
    # every fence of the README is read (none is swallowed by a neighbour)
    readme = (ROOT / "README.md").read_text()
    fences = len(re.findall(r"^```", readme, re.M))
    assert fences == 2 * len(FENCE.findall(readme))
    assert len(python_blocks(ROOT / "README.md")) >= 8


def run_cell(shell, source: str, where: str):
    with capture_output() as out:
        result = shell.run_cell(source, store_history=False)
    shown = out.stdout + out.stderr
    assert result.error_before_exec is None, f"{where}: {result.error_before_exec!r}\n{shown}"
    assert result.error_in_exec is None, f"{where}: {result.error_in_exec!r}\n{shown}"
    assert "UsageError" not in shown and "Traceback" not in shown, f"{where}:\n{shown}"
    return out


def run_doctest(shell, source: str, where: str):
    """The ``>>>`` examples of one block, in the shell's own namespace, output compared."""
    test = doctest.DocTestParser().get_doctest(source, {}, where, where, 0)
    test.globs = shell.user_ns  # the same namespace as the other blocks, not a copy
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append, clear_globs=False)
    assert runner.failures == 0, f"{where}:\n" + "".join(report)


@pytest.fixture(scope="module")
def shell():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    ip = InteractiveShell.instance()
    ip.reset(new_session=False)
    yield ip
    if "nbderiv" in ip.extension_manager.loaded:
        ip.extension_manager.unload_extension("nbderiv")
    ip.reset(new_session=False)


def test_every_python_block_runs_as_written(shell):
    t0 = time.perf_counter()
    ran = 0
    for path in DOCUMENTS:
        for line, source in python_blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if source.lstrip().startswith(">>>"):
                run_doctest(shell, source, where)
            else:
                run_cell(shell, source, where)
            ran += 1
    assert ran >= 8
    elapsed = time.perf_counter() - t0
    assert elapsed < BUDGET_S * 2, f"the snippets took {elapsed:.0f} s (budget {BUDGET_S} s)"


def test_a_failing_snippet_fails_the_test(shell):
    """The checks above catch errors, magics' UsageErrors and wrong doctest output."""
    with pytest.raises(AssertionError, match="NameError"):
        run_cell(shell, "undefined_name_in_a_snippet\n", "snippet")
    with pytest.raises(AssertionError, match="UsageError"):
        run_cell(shell, "%nnderiv_nonexistent x   # a magic that does not exist\n", "snippet")
    with pytest.raises(AssertionError, match="Expected"):
        run_doctest(shell, ">>> 1 + 1\n3\n", "snippet")
    with pytest.raises(AssertionError, match="SyntaxError"):
        run_cell(shell, "x = (\n", "snippet")


# -- what the README says gets installed ---------------------------------------------------------
@pytest.mark.parametrize("platform, machine, tensorflow", [
    ("linux", "x86_64", "tensorflow-cpu"), ("win32", "AMD64", "tensorflow-cpu"),
    ("darwin", "arm64", "tensorflow"), ("darwin", "x86_64", "tensorflow"),
    ("linux", "aarch64", "tensorflow"), ("win32", "ARM64", "tensorflow")])
def test_the_tensorflow_extra_installs_one_wheel_that_exists_there(platform, machine, tensorflow):
    """tensorflow-cpu has wheels for Linux and Windows on x86_64 only; elsewhere `tensorflow`
    (CPU-only there). pyproject.toml and binder/requirements.txt pick by the same markers."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    env = {"sys_platform": platform, "platform_machine": machine}
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["tensorflow"]
    binder = [line.split("#")[0].strip() for line in
              (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    for lines in (extra, [line for line in binder if line.startswith("tensorflow")]):
        picked = {Requirement(line).name for line in lines
                  if Requirement(line).marker is None or Requirement(line).marker.evaluate(env)}
        assert picked & {"tensorflow", "tensorflow-cpu"} == {tensorflow}, (env, lines)


def test_the_pytorch_cpu_index_is_asked_for_where_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    index = "https://download.pytorch.org/whl/cpu"
    assert index in readme
    binder = (ROOT / "binder" / "requirements.txt").read_text()
    assert f"--extra-index-url {index}" in binder.splitlines()
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_CPU_INDEX ?= {index}" in makefile and "--extra-index-url $(TORCH_CPU_INDEX)" in makefile
