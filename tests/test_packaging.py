"""The three package lists agree: pyproject.toml, environment.yml and binder/.

* every distribution of pyproject's runtime dependencies and extras appears in
  environment.yml (under its conda-forge name) and in binder/requirements.txt,
  except the test-only tools listed in ``NOT_ON_BINDER``;
* every pin in constraints.txt is the same exact pin in binder/requirements.txt,
  and is admitted by pyproject.toml's and environment.yml's specifiers;
* binder/ holds what repo2docker needs, and the README's Binder badge (once there
  is a README) opens the tour notebook in JupyterLab.

environment.yml is read by a small parser for the plain YAML subset it uses, so
the test needs no PyYAML; if PyYAML happens to be installed (jupyter-events, a
dependency of jupyterlab, pulls it in) the two parses are compared.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
ENV_YML = ROOT / "environment.yml"
BINDER = ROOT / "binder"
BINDER_REQS = BINDER / "requirements.txt"
README = ROOT / "README.md"

PROJECT = "nbderiv"

# Declared in pyproject's `test` extra but deliberately absent from Binder and from
# environment.yml.  (pytest and nbval ARE kept: binder/check.sh and users in Binder
# run the notebooks with `pytest --nbval`.)
NOT_ON_BINDER = {
    "hypothesis": "property-based unit tests; run by `make test`, never by the notebooks",
    "playwright": "drives a headless Chromium for tests/browser; Binder has no browser",
}

# PyPI distribution name -> conda-forge package name, where they differ.
CONDA_NAME = {
    "torch": "pytorch",
    # conda-forge has one `tensorflow` package; its CPU-only builds carry "cpu_"
    # build strings (the PyPI split into tensorflow / tensorflow-cpu does not exist).
    "tensorflow-cpu": "tensorflow",
}
# conda-forge packages that must be pinned to a CPU-only build string.
CONDA_CPU_ONLY = {"pytorch", "tensorflow"}

EXPECTED_BADGE_URL = (
    "https://mybinder.org/v2/gh/nbderiv/nbderiv/HEAD?urlpath=lab/tree/notebooks/00_tour.ipynb"
)


# --------------------------------------------------------------------------- parsers


def _strip_comment(line: str) -> str:
    # A '#' starts a comment at the line start or after whitespace (pip and YAML alike).
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()


def parse_requirements_txt(path: Path) -> tuple[dict[str, Requirement], list[str]]:
    """Return ({canonical name: Requirement}, [option/local lines such as '-e .'])."""
    reqs: dict[str, Requirement] = {}
    other: list[str] = []
    for raw in path.read_text().splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("-") or line.startswith(".") or line.startswith("/"):
            other.append(line)
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in reqs, f"{path.name}: {req.name} is listed twice"
        reqs[name] = req
    return reqs, other


def parse_simple_yaml(text: str) -> dict:
    """Parse the YAML subset of a conda environment file.

    Supports: top-level ``key: scalar`` and ``key:`` followed by a block list; list
    items that are scalars or a one-key mapping whose value is a nested block list
    (``- pip:`` then ``- -e .``).  Anything else raises ValueError.
    """
    lines = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError("tabs in indentation")
        stripped = _strip_comment(raw)
        if stripped.strip():
            lines.append((len(stripped) - len(stripped.lstrip(" ")), stripped.strip()))

    def scalar(s: str):
        s = s.strip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
            return s[1:-1]
        return s

    def parse_list(i: int, indent: int) -> tuple[list, int]:
        items: list = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            item = lines[i][1][2:].strip()
            i += 1
            m = re.fullmatch(r"([A-Za-z_][\w.-]*):", item)
            if m:  # `- pip:` followed by a deeper block list
                if i >= len(lines) or lines[i][0] <= indent:
                    raise ValueError(f"empty mapping item {item!r}")
                sub, i = parse_list(i, lines[i][0])
                items.append({m.group(1): sub})
            elif re.fullmatch(r"[A-Za-z_][\w.-]*:\s.*", item):
                raise ValueError(f"unsupported inline mapping {item!r}")
            else:
                items.append(scalar(item))
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"unexpected indentation at {lines[i][1]!r}")
        return items, i

    doc: dict = {}
    i = 0
    while i < len(lines):
        indent, content = lines[i]
        if indent != 0:
            raise ValueError(f"unexpected indentation at {content!r}")
        m = re.fullmatch(r"([A-Za-z_][\w.-]*):(?:\s+(.*))?", content)
        if not m:
            raise ValueError(f"cannot parse {content!r}")
        key, value = m.group(1), m.group(2)
        i += 1
        if value:
            doc[key] = scalar(value)
        elif i < len(lines) and lines[i][1].startswith("- "):
            doc[key], i = parse_list(i, lines[i][0])
        else:
            doc[key] = None
    return doc


def parse_conda_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'pytorch=2.13.*=cpu*' -> ('pytorch', '2.13.*', 'cpu*'); 'numpy>=1.24' -> (.., '>=1.24', None)."""
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", spec.strip())
    assert m, f"bad conda spec {spec!r}"
    name, rest = m.group(1).lower(), m.group(2).strip()
    if not rest:
        return name, None, None
    if rest.startswith("=") and not rest.startswith("=="):
        version, _, build = rest[1:].partition("=")
        return name, version or None, build or None
    if " " in rest:  # 'name 2.13.* cpu*' form
        version, build = rest.split(None, 1)
        return name, version, build
    return name, rest, None


def conda_version_admits(version_spec: str | None, version: str) -> bool:
    if version_spec is None:
        return True
    if version_spec[0].isdigit():  # conda 'x.y.*' or exact 'x.y.z'
        version_spec = "==" + version_spec
    return Version(version) in SpecifierSet(version_spec.replace(" ", ""))


# --------------------------------------------------------------------------- data


def _pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def declared_requirements() -> dict[str, list[Requirement]]:
    """Runtime dependencies plus every extra, self-references (nbderiv[...]) dropped."""
    project = _pyproject()["project"]
    out: dict[str, list[Requirement]] = {}
    groups = [project.get("dependencies", [])]
    groups += list(project.get("optional-dependencies", {}).values())
    for group in groups:
        for line in group:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name == PROJECT:
                continue
            out.setdefault(name, []).append(req)
    return out


def constraint_pins() -> dict[str, Version]:
    pins = {}
    reqs, other = parse_requirements_txt(CONSTRAINTS)
    assert not other, f"constraints.txt has option lines: {other}"
    for name, req in reqs.items():
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt: {req} is not a single exact pin"
        )
        pins[name] = Version(specs[0].version)
    return pins


def environment() -> dict:
    text = ENV_YML.read_text()
    doc = parse_simple_yaml(text)
    if importlib.util.find_spec("yaml") is not None:
        import yaml

        assert yaml.safe_load(text) == doc, "the hand parser disagrees with PyYAML"
    return doc


def conda_specs() -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """({conda name: (version spec, build spec)}, pip section lines)."""
    specs: dict[str, tuple[str | None, str | None]] = {}
    pip_lines: list[str] = []
    for dep in environment()["dependencies"]:
        if isinstance(dep, dict):
            assert list(dep) == ["pip"], f"unexpected mapping in dependencies: {dep}"
            pip_lines.extend(dep["pip"])
            continue
        name, version, build = parse_conda_spec(dep)
        assert name not in specs, f"environment.yml lists {name} twice"
        specs[name] = (version, build)
    return specs, pip_lines


def binder_requirements() -> tuple[dict[str, Requirement], list[str]]:
    return parse_requirements_txt(BINDER_REQS)


# --------------------------------------------------------------------------- tests


def test_parsers_on_small_examples():
    doc = parse_simple_yaml(
        "name: x  # c\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n"
        "  - pip\n  - pip:\n      - -e .\n      - 'foo>=1'\n"
    )
    assert doc == {
        "name": "x",
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", "pip", {"pip": ["-e .", "foo>=1"]}],
    }
    with pytest.raises(ValueError):
        parse_simple_yaml("a:\n  b: 1\n")
    assert parse_conda_spec("pytorch=2.13.*=cpu*") == ("pytorch", "2.13.*", "cpu*")
    assert parse_conda_spec("numpy>=1.24") == ("numpy", ">=1.24", None)
    assert parse_conda_spec("pip") == ("pip", None, None)
    assert parse_conda_spec("tensorflow 2.21.* cpu*") == ("tensorflow", "2.21.*", "cpu*")
    assert conda_version_admits("2.13.*", "2.13.0")
    assert not conda_version_admits("2.13.*", "2.14.0")
    assert conda_version_admits(">=1.24", "2.4.6")


def test_exceptions_are_real_test_only_packages():
    test_extra = {
        canonicalize_name(Requirement(r).name)
        for r in _pyproject()["project"]["optional-dependencies"]["test"]
    }
    stale = set(NOT_ON_BINDER) - test_extra
    assert not stale, f"NOT_ON_BINDER names packages that pyproject's test extra lacks: {stale}"


def test_every_declared_package_is_in_environment_yml():
    specs, _ = conda_specs()
    missing = sorted(
        f"{name} (conda: {CONDA_NAME.get(name, name)})"
        for name in declared_requirements()
        if name not in NOT_ON_BINDER and CONDA_NAME.get(name, name) not in specs
    )
    assert not missing, f"environment.yml lacks {missing}"


def test_environment_yml_is_cpu_only_conda_forge():
    env = environment()
    assert env.get("channels", [])[:1] == ["conda-forge"], env.get("channels")
    assert "defaults" not in env.get("channels", [])
    specs, _ = conda_specs()
    for name in CONDA_CPU_ONLY:
        version, build = specs[name]
        assert build and build.startswith("cpu"), (
            f"environment.yml: {name} needs a CPU build selector like '{name}=X.*=cpu*'"
        )
    for name in specs:
        assert "cuda" not in name, f"environment.yml pulls a CUDA package: {name}"


def test_environment_yml_installs_the_repo_and_pip():
    specs, pip_lines = conda_specs()
    assert "pip" in specs, "a pip: section needs `pip` among the conda dependencies"
    # conda/micromamba run pip from the environment file's folder = the repo root.
    assert "-e ." in pip_lines or "." in pip_lines, pip_lines


def test_every_declared_package_is_in_binder_requirements():
    reqs, _ = binder_requirements()
    missing = sorted(n for n in declared_requirements() if n not in NOT_ON_BINDER and n not in reqs)
    assert not missing, f"binder/requirements.txt lacks {missing}"
    extra = sorted(set(NOT_ON_BINDER) & set(reqs))
    assert not extra, f"binder/requirements.txt installs test-only tools {extra}"


def test_constraint_pins_match_binder_pins():
    reqs, _ = binder_requirements()
    for name, version in constraint_pins().items():
        assert name in reqs, f"binder/requirements.txt lacks the pinned {name}"
        assert str(reqs[name].specifier) == f"=={version}", (
            f"binder/requirements.txt has {reqs[name]}, constraints.txt pins {name}=={version}"
        )


def test_constraint_pins_are_admitted_everywhere():
    declared = declared_requirements()
    specs, _ = conda_specs()
    for name, version in constraint_pins().items():
        for req in declared.get(name, []):
            assert version in req.specifier, f"pyproject's {req} excludes the pin {name}=={version}"
        conda_name = CONDA_NAME.get(name, name)
        if conda_name in specs:
            spec = specs[conda_name][0]
            assert conda_version_admits(spec, str(version)), (
                f"environment.yml's {conda_name} {spec} excludes the pin {name}=={version}"
            )


def test_binder_lower_bounds_follow_pyproject():
    """Unpinned binder lines carry pyproject's specifier (an exact pin must satisfy it)."""
    reqs, _ = binder_requirements()
    pins = constraint_pins()
    for name, declared in declared_requirements().items():
        if name in NOT_ON_BINDER or name in pins or name not in reqs:
            continue  # (absence is test_every_declared_package_is_in_binder_requirements')
        spec = reqs[name].specifier
        for req in declared:
            pinned = [s for s in spec if s.operator == "=="]
            if pinned:
                assert Version(pinned[0].version) in req.specifier, (reqs[name], req)
            else:
                assert spec == req.specifier, f"binder has {reqs[name]}, pyproject {req}"


def test_python_versions_agree():
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    specs, _ = conda_specs()
    env_python = specs["python"][0]
    assert env_python, "environment.yml should pin python"
    runtime = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-(\d+\.\d+)(?:\.\d+)?", runtime)
    assert m, f"binder/runtime.txt should read like 'python-3.11', not {runtime!r}"
    assert conda_version_admits(env_python, m.group(1)), (env_python, runtime)
    assert Version(m.group(1)) in requires, f"{runtime} is outside requires-python {requires}"


def test_binder_folder_has_what_repo2docker_needs():
    assert BINDER_REQS.is_file(), "binder/requirements.txt is missing"
    reqs, other = binder_requirements()
    # repo2docker runs `pip install -r binder/requirements.txt` from the repo root and
    # pip resolves `-e .` against that working directory, so `.` (not `..`) is the repo.
    local = [line for line in other if line in ("-e .", ".", "-e ./", "./")]
    assert local, "binder/requirements.txt must install the repo itself (`-e .`)"
    assert not any(".." in line for line in other), f"'..' would leave the repo: {other}"
    assert not any(line.startswith(("-r", "-c", "--requirement", "--constraint")) for line in other)
    for script in ("postBuild", "start"):
        path = BINDER / script
        if path.exists():
            assert os.access(path, os.X_OK), f"binder/{script} must be executable"
            assert path.read_text().startswith("#!"), f"binder/{script} needs a shebang line"
    start = BINDER / "start"
    if start.exists():
        assert re.search(r'^\s*exec "\$@"\s*$', start.read_text(), re.M), (
            'binder/start must end by handing over with exec "$@"'
        )
    # With a binder/ folder repo2docker ignores top-level config; none may hide there
    # that would silently switch it to another build pack.
    for other_cfg in ("environment.yml", "environment.yaml", "Pipfile", "Project.toml"):
        assert not (BINDER / other_cfg).exists(), (
            f"binder/{other_cfg} would override requirements.txt"
        )


def test_binder_files_are_not_git_ignored():
    git = shutil.which("git")
    if (
        git is None
        or subprocess.run(
            [git, "-C", str(ROOT), "rev-parse", "--is-inside-work-tree"], capture_output=True
        ).returncode
    ):
        pytest.skip("not a git work tree")
    paths = [str(p.relative_to(ROOT)) for p in sorted(BINDER.iterdir()) if p.is_file()]
    paths += ["environment.yml", "pyproject.toml", "constraints.txt"]
    done = subprocess.run(
        [git, "-C", str(ROOT), "check-ignore", *paths], capture_output=True, text=True
    )
    assert done.returncode == 1, f"git ignores files Binder needs: {done.stdout.split()}"


def test_readme_has_binder_badge():
    if not README.exists():
        pytest.skip("README.md does not exist yet")
    text = README.read_text()
    urls = re.findall(r"\]\((https://mybinder\.org/v2/[^)\s]+)\)", text)
    assert urls, "README.md has no Binder link"
    assert EXPECTED_BADGE_URL in urls, f"the Binder link should be {EXPECTED_BADGE_URL}, got {urls}"
    assert re.search(r"!\[[^\]]*\]\(https://mybinder\.org/badge_logo\.svg\)", text), (
        "README.md has no Binder badge image"
    )
