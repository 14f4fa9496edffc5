#!/usr/bin/env bash
# `make binder-check`: rebuild what Binder (repo2docker) would build from binder/,
# without Docker or conda, and run the tutorial notebooks in it.
#
#  1. Stage the repository as a git clone would hold it (tracked files plus
#     untracked files that .gitignore does not exclude) in a temp dir, because
#     Binder builds from a clone: a file that git ignores is missing there too.
#  2. Make a FRESH venv with the Python that binder/runtime.txt names.
#  3. From the staged repository root -- the working directory repo2docker uses
#     (${REPO_DIR}) -- run `pip install -r binder/requirements.txt`, so that
#     local lines such as `-e .` resolve exactly as they will on Binder.
#  4. Run binder/postBuild if present, as repo2docker does (`./binder/postBuild`).
#  5. Smoke-test imports and `jupyter lab --version`, then run the notebooks
#     under nbval, through binder/start if present (as Binder's entrypoint does).
#
# Environment knobs: BINDER_CHECK_KEEP=1 keeps the temp dir; BINDER_CHECK_DIR=path
# uses that (empty or new) dir instead of a mktemp one; BINDER_CHECK_INPLACE=1
# installs from the work tree itself instead of a staged copy; PYTHON=... picks
# the interpreter.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$SRC"

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export TF_ENABLE_ONEDNN_OPTS="${TF_ENABLE_ONEDNN_OPTS:-0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONNOUSERSITE=1
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME || true

T0=$SECONDS
say() { printf '[binder-check %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

[ -f binder/requirements.txt ] || die "binder/requirements.txt is missing"

# --- work dir -----------------------------------------------------------------
if [ -n "${BINDER_CHECK_DIR:-}" ]; then
  WORK="$BINDER_CHECK_DIR"
  mkdir -p "$WORK"
  [ -z "$(ls -A "$WORK")" ] || die "BINDER_CHECK_DIR=$WORK is not empty"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/nbderiv-binder-check.XXXXXX")"
fi
cleanup() {
  if [ "${BINDER_CHECK_KEEP:-0}" = 1 ]; then
    say "kept $WORK"
  else
    say "removing $WORK"
    rm -rf "$WORK"
    say "removed"
  fi
}
trap cleanup EXIT
say "work dir: $WORK"

# --- 1. stage the repository as a clone would have it ---------------------------
if [ "${BINDER_CHECK_INPLACE:-0}" != 1 ] && git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  REPO="$WORK/repo"
  mkdir -p "$REPO"
  # tracked + untracked-but-not-ignored files that exist now
  git -C "$SRC" ls-files -z --cached --others --exclude-standard --deduplicate \
    | while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi  # skip deleted files
      done \
    | tar -C "$SRC" --null -T - -cf - | tar -C "$REPO" -xf -
  say "staged $(find "$REPO" -type f | wc -l) files as a clone would hold them (git ls-files)"
else
  REPO="$SRC"
  say "installing from the work tree itself ($REPO)"
fi
cd "$REPO"
for f in binder/requirements.txt binder/runtime.txt binder/postBuild binder/start; do
  if [ -e "$SRC/$f" ] && [ ! -e "$REPO/$f" ]; then
    die "$f exists here but git ignores it, so Binder would not see it"
  fi
done

# --- 2. fresh venv with the runtime.txt Python ----------------------------------
PYVER=""
if [ -f binder/runtime.txt ]; then
  PYVER="$(sed -n 's/^python-\([0-9]*\.[0-9]*\).*/\1/p' binder/runtime.txt | head -n1)"
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -n "$PYVER" ] && command -v "python$PYVER" >/dev/null 2>&1; then
    PYTHON="python$PYVER"
  else
    PYTHON=python3
  fi
fi
HAVE="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -n "$PYVER" ] && [ "$HAVE" != "$PYVER" ]; then
  die "binder/runtime.txt asks for Python $PYVER but $PYTHON is $HAVE (set PYTHON=...)"
fi
VENV="$WORK/venv"
"$PYTHON" -m venv "$VENV"
export PATH="$VENV/bin:$PATH"
# Keep user-level Jupyter/IPython/matplotlib state out of the check.
export JUPYTER_CONFIG_DIR="$WORK/home/jupyter-config"
export JUPYTER_DATA_DIR="$WORK/home/jupyter-data"
export JUPYTER_RUNTIME_DIR="$WORK/home/jupyter-runtime"
export IPYTHONDIR="$WORK/home/ipython"
export MPLCONFIGDIR="$WORK/home/matplotlib"
mkdir -p "$WORK/home"
say "fresh venv: $("$VENV/bin/python" -V 2>&1) at $VENV"

# --- 3. what repo2docker runs, from the repository root -------------------------
t=$SECONDS
REQS=binder/requirements.txt
# An --extra-index-url that cannot be reached costs pip retries for every package: where
# this machine cannot reach one (an offline mirror), the check installs without it and says
# so (Binder itself reaches it). The file is filtered into the work dir; `-e .` still
# resolves against the repository root, the working directory.
for url in $(sed -n 's/^--extra-index-url[ =]*//p' binder/requirements.txt); do
  if ! "$VENV/bin/python" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1].rstrip('/') + '/', timeout=10)" "$url" >/dev/null 2>&1; then
    say "note: $url is out of reach here; checking without it (torch then comes from pip's own indexes)"
    grep -v -F -- "$url" "$REQS" > "$WORK/requirements.txt"
    REQS="$WORK/requirements.txt"
  fi
done
# (the grep drops only this machine's notes about its local package mirror)
"$VENV/bin/python" -m pip install --quiet -r "$REQS" 2>&1 \
  | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; } \
  || die "pip install -r binder/requirements.txt"
say "pip install -r binder/requirements.txt took $((SECONDS - t))s"
"$VENV/bin/python" -m pip check || die "pip check found conflicting requirements"

# --- 4. postBuild -----------------------------------------------------------------
if [ -e binder/postBuild ]; then
  [ -x binder/postBuild ] || say "note: binder/postBuild is not executable (repo2docker chmods it anyway)"
  t=$SECONDS
  bash binder/postBuild || die "binder/postBuild"
  say "binder/postBuild took $((SECONDS - t))s"
else
  say "no binder/postBuild"
fi

RUN=()
if [ -e binder/start ]; then RUN=(bash binder/start); fi

# --- 5a. smoke test -----------------------------------------------------------------
"${RUN[@]}" "$VENV/bin/python" - <<'PY' || die "imports"
import importlib

for name in ("nbderiv", "numpy", "torch", "tensorflow", "keras", "ipywidgets",
             "matplotlib", "tqdm", "IPython", "nbval"):
    mod = importlib.import_module(name)
    print(f"  import {name:<11} {getattr(mod, '__version__', '')}")
import torch

print(f"  torch built with CUDA: {torch.version.cuda or 'no (CPU build)'}")
PY
LABV="$("${RUN[@]}" "$VENV/bin/jupyter" lab --version)" || die "jupyter lab --version"
echo "  jupyter lab --version: $LABV"

# --- 5b. notebooks under nbval ----------------------------------------------------
shopt -s nullglob
NOTEBOOKS=(notebooks/*.ipynb)
if [ ${#NOTEBOOKS[@]} -eq 0 ]; then
  say "no notebooks/*.ipynb yet: only the smoke test ran"
  say "OK (smoke test only) in $((SECONDS - T0))s"
  exit 0
fi
NBVAL=(--nbval --nbval-current-env)
if [ -f notebooks/sanitize.cfg ]; then
  NBVAL+=(--nbval-sanitize-with notebooks/sanitize.cfg)
else
  say "note: notebooks/sanitize.cfg is missing; running nbval without sanitizers"
fi
say "running nbval over ${#NOTEBOOKS[@]} notebook(s): ${NOTEBOOKS[*]}"
t=$SECONDS
# -p no:cacheprovider: nothing written into the (possibly in-place) repository
"${RUN[@]}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${NBVAL[@]}" "${NOTEBOOKS[@]}" \
  || die "nbval"
say "nbval took $((SECONDS - t))s"
say "OK in $((SECONDS - T0))s"
