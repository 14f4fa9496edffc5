"""`make lab` starts JupyterLab on notebooks/, as root too (it adds --allow-root there), and
prints the address to open: started here on a free port with a token and no browser, asked
for /lab over 127.0.0.1, then stopped.

The install step is taken as done (``make -o STAMP``): this test never reinstalls the
environment it runs in."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)

pytest.importorskip("jupyterlab", reason="jupyter lab is not installed")
if shutil.which("make") is None:
    pytest.skip("make is not installed", allow_module_level=True)
if not (VENV / "bin" / "jupyter").exists():
    pytest.skip(f"no jupyter in {VENV}/bin", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8", "replace")


def test_make_lab_dry_run_adds_allow_root_only_for_root():
    out = subprocess.run(["make", "-n", "-o", f"{VENV}/.nbderiv-installed", "lab",
                          f"VENV={VENV}"], cwd=ROOT, capture_output=True, text=True, check=True)
    command = [line for line in out.stdout.splitlines() if "jupyter lab" in line
               and not line.startswith("echo")][0]
    assert "notebooks" in command.split()
    assert ("--allow-root" in command.split()) == (os.getuid() == 0)


@pytest.mark.slow
def test_make_lab_serves_the_lab_page(tmp_path):
    port, token = free_port(), "nbderiv-test-token"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), IPYTHONDIR=str(tmp_path / "ipython"))
    args = (f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} "
            f"--ServerApp.port_retries=0 --IdentityProvider.token={token}")
    log = tmp_path / "lab.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            ["make", "-o", f"{VENV}/.nbderiv-installed", "lab", f"VENV={VENV}",
             f"LAB_ARGS={args}"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: make and jupyter stop together
    try:
        url = f"http://127.0.0.1:{port}/lab?token={token}"
        deadline, status, page = time.monotonic() + 120, None, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, page = get(url)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        text = log.read_text()
        assert status == 200, f"no answer from {url} (exit {proc.poll()}):\n{text[-3000:]}"
        assert "JupyterLab" in page
        assert "Running as root is not recommended" not in text
        # the address to open is printed (a token set in advance shows as "token=...")
        printed = rf"http://127\.0\.0\.1:{port}/lab\?token="
        for _ in range(60):
            if re.search(printed, text):
                break
            time.sleep(0.5)
            text = log.read_text()
        assert re.search(printed, text), text[-3000:]
        assert "open the http://127.0.0.1:PORT/lab?token=" in text
        with pytest.raises(urllib.error.HTTPError):  # and the token is required
            get(f"http://127.0.0.1:{port}/api/contents")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    assert proc.returncode is not None
