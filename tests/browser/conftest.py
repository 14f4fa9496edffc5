"""Real-browser harness: a throw-away JupyterLab server driven by Debian's Chromium.

Fixtures
    lab_server  session-scoped; starts ``jupyter lab`` on 127.0.0.1 with a token and all of
                its runtime/config/settings/workspace folders in a temporary directory, and
                stops it (and every process it spawned, kernels included) at the end.
    lab_browser session-scoped; headless /usr/bin/chromium through the ``playwright`` package
                (never a browser downloaded by ``playwright install``).
    lab_page    function-scoped; a fresh browser context + page whose console messages and
                uncaught page errors are recorded (see ``console_messages`` and
                ``assert_no_widget_console_errors``).

Helpers
    open_notebook(page, server, relpath)  open ``lab/tree/<relpath>`` and wait for kernel idle
    run_all_and_wait(page)                Run All, wait until every code cell has executed
    output_texts(page)                    inner text of every rendered output
    assert_no_error_outputs(page)         no tracebacks / error outputs / broken widgets
    find_labelled_control(...)            an ipywidgets control by its description label
    change_control(...)                   move a slider by one step / pick another option
    widget_fingerprint(...)               plot images + readout texts of a widget area

Environment
    NBDERIV_BROWSER_TIMEOUT  seconds allowed for Run All (default 90)
    NBDERIV_SCREENSHOT_DIR   if set, tests also copy their widget screenshots there
    CHROMIUM                 path of the Chromium binary (default /usr/bin/chromium)
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_TIMEOUT = 60.0
RUN_ALL_TIMEOUT = float(os.environ.get("NBDERIV_BROWSER_TIMEOUT", "90"))
UI_TIMEOUT_MS = 30_000
# Words in a browser console error that point at the widget machinery.
WIDGET_WORDS = ("widget", "ipywidgets", "jupyter-widgets", "jupyterlab-manager")

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError as exc:  # pragma: no cover - depends on the environment
    sync_playwright = None
    PlaywrightError = Exception
    _PLAYWRIGHT_IMPORT_ERROR = repr(exc)
else:
    _PLAYWRIGHT_IMPORT_ERROR = ""


def _skip_loudly(reason: str) -> None:
    banner = "BROWSER TEST SKIPPED: " + reason
    print("\n" + "!" * len(banner) + "\n" + banner + "\n" + "!" * len(banner), file=sys.stderr)
    pytest.skip(banner)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


# --------------------------------------------------------------------------- server


@dataclass
class LabServer:
    base_url: str  # ends with "/"
    token: str
    root_dir: Path
    tmp_dir: Path
    log_path: Path
    process: subprocess.Popen

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path.lstrip('/')}{sep}token={self.token}"

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_command() -> list[str]:
    """``python -m jupyter`` of the interpreter running pytest, else the repo's venv."""
    if importlib.util.find_spec("jupyterlab") is not None:
        return [sys.executable, "-m", "jupyter"]
    venv_jupyter = REPO_ROOT / ".venv" / "bin" / "jupyter"
    if venv_jupyter.exists():
        return [str(venv_jupyter)]
    _skip_loudly(f"jupyterlab is not installed for {sys.executable} (nor in {venv_jupyter.parent})")
    raise AssertionError("unreachable")


_LAB_SETTINGS = {
    # No news, no update checks, no toasts over the widgets.
    "@jupyterlab/apputils-extension/notification": {
        "checkForUpdates": False,
        "fetchNews": "false",
        "doNotDisturbMode": True,
    },
    # Never write executed outputs back into the repository's notebooks.
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}


def _write_lab_settings(settings_dir: Path) -> None:
    """User settings for this throw-away lab (JUPYTERLAB_SETTINGS_DIR)."""
    for name, values in _LAB_SETTINGS.items():
        path = settings_dir / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _server_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    dirs = {
        "JUPYTER_RUNTIME_DIR": tmp / "runtime",
        "JUPYTER_CONFIG_DIR": tmp / "config",
        "JUPYTER_DATA_DIR": tmp / "data",
        "JUPYTERLAB_SETTINGS_DIR": tmp / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp / "lab-workspaces",
        "IPYTHONDIR": tmp / "ipython",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    _write_lab_settings(dirs["JUPYTERLAB_SETTINGS_DIR"])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # The kernel must use matplotlib's inline backend (PNG <img> outputs); a stray
    # MPLBACKEND=Agg from the caller's shell would silently swallow every figure.
    env.pop("MPLBACKEND", None)
    env.pop("JUPYTER_PATH", None)
    # Kernels import nbderiv from this checkout even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _wait_until_up(server: LabServer, deadline: float) -> None:
    status_url = server.url("api/status")
    last_err: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"jupyter lab exited with code {server.process.returncode} before it was ready."
                f"\n--- server log ---\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(status_url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last_err = exc
        time.sleep(0.25)
    raise RuntimeError(
        f"jupyter lab did not answer {status_url} within {SERVER_START_TIMEOUT:.0f} s "
        f"(last error: {last_err!r}).\n--- server log ---\n{server.log_tail()}"
    )


def _descendants(pid: int) -> list:
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop_server(server: LabServer) -> None:
    proc = server.process
    # Remember every process the server spawned: kernels run in their own sessions,
    # so they are not in the server's process group.
    children = _descendants(proc.pid)
    if proc.poll() is None:
        try:  # polite: lets the server shut its kernels down
            req = urllib.request.Request(server.url("api/shutdown"), method="POST", data=b"")
            urllib.request.urlopen(req, timeout=5).close()
        except (urllib.error.URLError, OSError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)  # its own group (start_new_session=True)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        try:
            if child.is_running():
                child.kill()
        except Exception:  # psutil.Error; gone already
            pass


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory):
    """A JupyterLab server rooted at the repository; yields a ``LabServer``."""
    tmp = tmp_path_factory.mktemp("jupyterlab")
    env = _server_env(tmp)
    token = secrets.token_hex(24)
    log_path = tmp / "server.log"
    server = None
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        cmd = _jupyter_command() + [
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={REPO_ROOT}",
            "--ServerApp.terminals_enabled=False",
            # Checkpoints (made when a notebook is opened) go to tmp, not the repository.
            f"--FileCheckpoints.checkpoint_dir={tmp / 'checkpoints'}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # containers / CI often run as root
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            cmd,
            cwd=str(REPO_ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        server = LabServer(
            base_url=f"http://127.0.0.1:{port}/",
            token=token,
            root_dir=REPO_ROOT,
            tmp_dir=tmp,
            log_path=log_path,
            process=proc,
        )
        try:
            _wait_until_up(server, time.monotonic() + SERVER_START_TIMEOUT)
            break
        except RuntimeError as exc:
            last_error = exc
            _stop_server(server)
            server = None
    if server is None:
        raise RuntimeError(f"could not start jupyter lab: {last_error}")
    try:
        yield server
    finally:
        _stop_server(server)


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def lab_browser():
    if sync_playwright is None:
        _skip_loudly(
            f"the python 'playwright' package is not importable ({_PLAYWRIGHT_IMPORT_ERROR})"
        )
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _skip_loudly(
            f"no Chromium at {CHROMIUM}; install Debian's (apt-get install chromium) "
            "or point CHROMIUM at one"
        )
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except PlaywrightError as exc:
        pw.stop()
        msg = str(exc)
        if "Executable doesn't exist" in msg or "ENOENT" in msg:
            _skip_loudly(f"Chromium at {CHROMIUM} cannot be started: {msg.splitlines()[0]}")
        raise  # a Chromium that exists but crashes is a real failure
    try:
        yield browser
    finally:
        try:
            browser.close()
        finally:
            pw.stop()


_CONSOLE: dict[int, list[str]] = {}


def console_messages(page) -> list[str]:
    """Console messages (``"<type>: <text>"``) and page errors recorded for ``page``."""
    return _CONSOLE.setdefault(id(page), [])


@pytest.fixture
def lab_page(lab_browser, lab_server, request, tmp_path):
    """A fresh page in its own browser context, with console capture."""
    context = lab_browser.new_context(viewport={"width": 1400, "height": 2000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    log = console_messages(page)
    page.on("console", lambda msg: log.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: log.append(f"pageerror: {err}"))
    try:
        yield page
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            shot = tmp_path / "failure-page.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
                print(f"\n[browser] failure screenshot: {shot}")
            except Exception as exc:  # noqa: BLE001 - best effort diagnostics
                print(f"\n[browser] could not take failure screenshot: {exc}")
            print("[browser] console:\n  " + "\n  ".join(log[-40:]))
            print("[browser] server log tail:\n" + lab_server.log_tail(40))
        _CONSOLE.pop(id(page), None)
        context.close()


# --------------------------------------------------------------------------- helpers

_JS_PANEL_STATE = """
() => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return {ready: false, why: 'no window.jupyterapp'};
  const panel = app.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return {ready: false, why: 'no notebook panel'};
  const sc = panel.sessionContext;
  const kernel = sc.session && sc.session.kernel;
  const cells = panel.content.widgets || [];
  const code = cells.filter(c => c.model.type === 'code');
  return {
    ready: true,
    path: panel.context ? panel.context.path : null,
    kernel: kernel ? kernel.status : null,
    connection: kernel ? kernel.connectionStatus : null,
    nCode: code.length,
    executed: code.filter(c => c.model.executionCount !== null).length,
    running: code.filter(c => c.model.executionState === 'running').length,
  };
}
"""


def _panel_state(page) -> dict:
    return page.evaluate(_JS_PANEL_STATE)


def _accept_kernel_dialog(page) -> None:
    """Accept a 'Select Kernel' dialog if one is up (notebooks without kernelspec)."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        btn = dialog.locator("button.jp-mod-accept")
        if btn.count():
            btn.first.click()


def open_notebook(page, server: LabServer, relpath: str, timeout: float = 60.0) -> None:
    """Open ``relpath`` (relative to the server root) in JupyterLab and wait for an idle kernel."""
    page.goto(server.url(f"lab/tree/{relpath}"), wait_until="domcontentloaded")
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell", timeout=timeout * 1000
    )
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        _accept_kernel_dialog(page)
        state = _panel_state(page)
        if (
            state.get("ready")
            and state.get("path") == relpath
            and state.get("kernel") == "idle"
            and state.get("connection") == "connected"
        ):
            return
        time.sleep(0.25)
    raise AssertionError(
        f"notebook {relpath} did not reach an idle kernel in {timeout:.0f} s: {state}"
    )


def run_all_and_wait(page, timeout: float = RUN_ALL_TIMEOUT) -> dict:
    """Run every cell and wait until each code cell has an execution count and the kernel is idle.

    Fails early (with the outputs seen so far) when execution stops before every cell ran,
    e.g. because a cell raised and the kernel aborted the rest of the queue.
    """
    page.evaluate(
        """() => {
          window.__nbderivRunAll = 'pending';
          window.jupyterapp.commands.execute('notebook:run-all-cells').then(
            ok => { window.__nbderivRunAll = ok === false ? 'failed' : 'done'; },
            err => { window.__nbderivRunAll = 'error: ' + err; });
        }"""
    )
    deadline = time.monotonic() + timeout
    state: dict = {}
    stable = 0
    while time.monotonic() < deadline:
        state = _panel_state(page)
        state["runAll"] = page.evaluate("() => window.__nbderivRunAll")
        settled = (
            state["runAll"] != "pending" and state["running"] == 0 and state["kernel"] == "idle"
        )
        if settled and state["executed"] == state["nCode"]:
            stable += 1
            if stable >= 3:  # idle for a few polls in a row: comm messages have landed
                _wait_widgets_rendered(page)
                return state
        elif settled and state["runAll"] != "done":
            break  # execution stopped early: report below
        else:
            stable = 0
        time.sleep(0.3)
    assert_no_error_outputs(page)  # the most useful message when a cell raised
    raise AssertionError(
        f"Run All did not finish within {timeout:.0f} s: {state}\noutputs:\n"
        + "\n---\n".join(output_texts(page))
    )


def _wait_widgets_rendered(page, timeout: float = 20.0) -> None:
    """Wait until no widget view is still a 'Loading widget...' placeholder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = page.locator(".jp-OutputArea-output", has_text="Loading widget...").count()
        if pending == 0:
            return
        time.sleep(0.25)
    raise AssertionError(
        "ipywidgets views stayed at 'Loading widget...' (widget manager not working)"
    )


def output_texts(page) -> list[str]:
    """Inner text of every rendered output (never the cell sources)."""
    return page.locator(".jp-OutputArea-output").all_inner_texts()


_ERROR_SELECTORS = (
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]',
    '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]',
)
_STDERR_SELECTOR = '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'


def assert_no_error_outputs(page) -> None:
    """No traceback anywhere in the rendered outputs (widget Output areas included)."""
    problems: list[str] = []
    for sel in _ERROR_SELECTORS:
        for text in page.locator(sel).all_inner_texts():
            problems.append("error output:\n" + text)
    # JupyterLab 4 renders error outputs as stderr text, and a traceback raised inside a
    # widget callback lands as stderr in that widget's Output area.
    for text in page.locator(_STDERR_SELECTOR).all_inner_texts():
        if "Traceback" in text:
            problems.append("stderr with traceback:\n" + text)
    for text in page.locator(f".jp-RenderedText:not({_STDERR_SELECTOR})").all_inner_texts():
        if "Traceback (most recent call last)" in text:
            problems.append("printed traceback:\n" + text)
    for text in output_texts(page):
        if "Error displaying widget" in text:
            problems.append("broken widget view:\n" + text)
    # Error outputs stored in the notebook model (independent of how they render).
    model_errors = page.evaluate(
        """() => {
          const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
          if (!panel || !panel.content) return [];
          const found = [];
          for (const cell of panel.content.widgets) {
            if (cell.model.type !== 'code') continue;
            const outs = cell.model.outputs;
            for (let i = 0; i < outs.length; i++) {
              const o = outs.get(i).toJSON();
              if (o.output_type === 'error') found.push(o.ename + ': ' + o.evalue);
            }
          }
          return found;
        }"""
    )
    problems.extend("error output in cell model: " + e for e in model_errors)
    seen: set[str] = set()
    unique = [p for p in problems if not (p in seen or seen.add(p))]
    assert not unique, "notebook outputs show errors:\n\n" + "\n\n".join(unique)


def widget_console_errors(page) -> list[str]:
    """Console errors / page errors that mention the widget machinery."""
    out = []
    for line in console_messages(page):
        kind, _, text = line.partition(": ")
        if kind in ("error", "pageerror") and any(w in text.lower() for w in WIDGET_WORDS):
            out.append(line)
    return out


def assert_no_widget_console_errors(page) -> None:
    errors = widget_console_errors(page)
    assert not errors, "browser console shows widget errors:\n" + "\n".join(errors)


# ----------------------------------------------------------------- widget helpers

CONTROL_SELECTOR = (
    ".widget-slider, .widget-dropdown, .widget-toggle-buttons, .widget-radio, "
    ".widget-select, .widget-inline-hbox"
)


def find_labelled_control(page, label: str, scope=None):
    """The ipywidgets control whose description label contains ``label`` (case-insensitive).

    Returns the control's container locator (``.widget-slider``, ``.widget-dropdown``, ...).
    """
    if scope is None:
        candidates = page.locator(f".jp-OutputArea-output :is({CONTROL_SELECTOR})")
    else:
        candidates = scope.locator(f":is({CONTROL_SELECTOR})")
    want = label.strip().lower()
    partial = None
    for i in range(candidates.count()):
        ctrl = candidates.nth(i)
        lab = ctrl.locator(":scope > .widget-label, :scope > label")
        if lab.count() == 0:
            continue
        text = (lab.first.inner_text() or "").strip().rstrip(":").strip().lower()
        if text == want:
            return ctrl
        if partial is None and want in text:
            partial = ctrl
    return partial


def control_kind(ctrl) -> str:
    classes = ctrl.get_attribute("class") or ""
    for kind in (
        "widget-slider",
        "widget-dropdown",
        "widget-toggle-buttons",
        "widget-radio",
        "widget-select",
    ):
        if kind in classes.split():
            return kind
    return "other"


def control_value(ctrl) -> str:
    kind = control_kind(ctrl)
    if kind == "widget-slider":
        return ctrl.locator(".widget-readout").first.inner_text().strip()
    if kind in ("widget-dropdown", "widget-select"):
        return ctrl.locator("select").first.evaluate(
            "s => s.options[s.selectedIndex] ? s.options[s.selectedIndex].text : ''"
        )
    if kind == "widget-toggle-buttons":
        return ctrl.locator("button.mod-active").first.inner_text().strip()
    if kind == "widget-radio":
        return ctrl.locator("input:checked").first.evaluate("i => i.value")
    return ctrl.inner_text()


def change_control(ctrl) -> tuple[str, str]:
    """Move a slider by one step (keyboard, so it stays on its grid) or pick the next option.

    Returns ``(before, after)`` values as the control displays them.
    """
    kind = control_kind(ctrl)
    before = control_value(ctrl)
    if kind == "widget-slider":
        handle = ctrl.locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        if _wait_value_change(ctrl, before) == before:
            handle.press("ArrowLeft")  # at the maximum already: go back one step instead
    elif kind in ("widget-dropdown", "widget-select"):
        select = ctrl.locator("select").first
        options = select.evaluate("s => Array.from(s.options).map(o => o.value)")
        current = select.evaluate("s => s.value")
        others = [o for o in options if o != current]
        assert others, "dropdown has a single option; nothing to change"
        idx = options.index(current) if current in options else -1
        target = options[idx + 1] if 0 <= idx < len(options) - 1 else others[0]
        select.select_option(value=target)
    elif kind == "widget-toggle-buttons":
        buttons = ctrl.locator("button:not(.mod-active)")
        assert buttons.count(), "toggle buttons have a single option; nothing to change"
        buttons.first.click()
    elif kind == "widget-radio":
        radios = ctrl.locator("input:not(:checked)")
        assert radios.count(), "radio buttons have a single option; nothing to change"
        radios.first.check()
    else:
        raise AssertionError(f"do not know how to change control {ctrl.get_attribute('class')!r}")
    after = _wait_value_change(ctrl, before)
    assert after != before, f"control value did not change (still {before!r})"
    return before, after


def _wait_value_change(ctrl, before: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    value = before
    while time.monotonic() < deadline:
        value = control_value(ctrl)
        if value != before:
            return value
        time.sleep(0.1)
    return value


_JS_FINGERPRINT = """
(root) => {
  const imgs = Array.from(root.querySelectorAll('img')).map(i => i.getAttribute('src') || '');
  const texts = Array.from(root.querySelectorAll(
      '.widget-output .jp-OutputArea-output:not(:has(img)), .widget-html-content, .widget-readout'))
    .filter(e => !e.closest('.widget-slider, .widget-dropdown, .widget-select'))
    .map(e => e.innerText.trim());
  const svgs = Array.from(root.querySelectorAll('svg')).filter(s => !s.closest('.jp-Toolbar'))
    .map(s => s.outerHTML.length + ':' + s.outerHTML.slice(-200));
  return JSON.stringify({imgs, texts, svgs});
}
"""


def widget_fingerprint(area) -> str:
    """What a plot-carrying widget area shows: image data URLs, SVGs and readout texts
    (the controls' own readouts excluded)."""
    return area.evaluate(_JS_FINGERPRINT)


def wait_fingerprint_change(area, before: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    now = before
    while time.monotonic() < deadline:
        now = widget_fingerprint(area)
        data = json.loads(now)
        # An Output widget is briefly empty while it re-draws: wait for content.
        if now != before and (data["imgs"] or data["texts"] or data["svgs"]):
            time.sleep(0.3)
            settled = widget_fingerprint(area)
            if settled == now:
                return now
            now = settled
        time.sleep(0.2)
    return now


def save_widget_screenshot(area, tmp_path: Path, name: str, record_property=None) -> Path:
    """Screenshot ``area`` to ``tmp_path/name``; copy to $NBDERIV_SCREENSHOT_DIR/<name> when set."""
    area.scroll_into_view_if_needed()
    path = tmp_path / name
    area.screenshot(path=str(path))
    assert path.stat().st_size > 1000, f"screenshot {path} looks empty"
    print(f"\n[browser] widget screenshot: {path}")
    if record_property is not None:
        record_property("screenshot", str(path))
    extra = os.environ.get("NBDERIV_SCREENSHOT_DIR")
    if extra:
        dest_dir = Path(extra)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / name
        shutil.copyfile(path, dest)
        print(f"[browser] copied to: {dest}")
        if record_property is not None:
            record_property("screenshot_copy", str(dest))
    return path
