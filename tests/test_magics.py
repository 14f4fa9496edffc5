"""The ``%nnderiv`` magic through a real IPython shell: every option, the returned value,
the range shorthand, one-line errors (exactly ``UsageError``), the summary displayed exactly
once, and the same in a real Jupyter kernel; a torch and a Keras model."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.magic_parsing import LineError, split_line  # noqa: E402

HEADER = "Derivatives of"


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    if "nbderiv" in ip.extension_manager.loaded:  # e.g. by the magics module's doctest
        ip.extension_manager.unload_extension("nbderiv")
    with capture_output() as out:
        ip.run_line_magic("load_ext", "nbderiv")
    assert out.stdout == "" and out.stderr == "" and not out.outputs  # prints nothing
    ip.run_cell(
        "import torch\n"
        "tanh = torch.nn.Sequential(torch.nn.Tanh())            # y = tanh(x), no Linear\n"
        "pair = lambda X: (X[:, 0] ** 2 * torch.sin(X[:, 1])).unsqueeze(1)\n"
        "x = torch.linspace(-2, 2, 21, dtype=torch.float64)\n"
        "X2 = torch.rand(30, 2, dtype=torch.float64)\n"
        "torch.manual_seed(0)\n"
        "net3 = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))\n"
        "lin2 = torch.nn.Sequential(torch.nn.Linear(2, 1))\n",
        store_history=False,
    )
    yield ip
    ip.run_line_magic("unload_ext", "nbderiv")


def run(shell, cell):
    """(ExecutionResult, captured) of one cell; fails the test on an unexpected error."""
    with capture_output() as out:
        result = shell.run_cell(cell, store_history=False)
    return result, out


def shown(out) -> int:
    """How many times the summary appeared: displays plus the displayhook's Out[] text."""
    texts = [o.data.get("text/plain", "") for o in out.outputs]
    return sum(t.count(HEADER) for t in texts) + out.stdout.count(HEADER)


def magic(shell, line):
    with capture_output() as out:
        value = shell.run_line_magic("nnderiv", line)
    return value, out


def usage_error(shell, line) -> str:
    with pytest.raises(UsageError) as info:
        magic(shell, line)
    assert type(info.value) is UsageError  # exactly that class: IPython prints one line
    return str(info.value)


def tanh_k(x, k):
    t = np.tanh(x)
    return {0: t, 1: 1 - t ** 2, 2: -2 * t * (1 - t ** 2), 3: (1 - t ** 2) * (6 * t ** 2 - 2)}[k]


# -- value and display ---------------------------------------------------------------------------
def test_returns_derivatives_and_shows_the_summary_exactly_once(shell):
    result, out = run(shell, "%nnderiv tanh x")  # the cell's last value
    assert result.success and isinstance(result.result, nbderiv.Derivatives)
    assert shown(out) == 1
    assert [sorted(o.data) for o in out.outputs] == [["text/html", "text/plain"]]
    d = result.result
    xs = np.linspace(-2, 2, 21)
    for k in (1, 2):
        np.testing.assert_allclose(d[k][:, 0, 0, 0] if k == 2 else d[k][:, 0, 0],
                                   tanh_k(xs, k), atol=1e-12)

    result, out = run(shell, "d = %nnderiv tanh x")  # assigned: still shown, once
    assert result.success and shown(out) == 1
    assert isinstance(shell.user_ns["d"], nbderiv.Derivatives)

    result, out = run(shell, "d = %nnderiv tanh x\nd")  # shown once within the cell
    assert shown(out) == 1
    result, out = run(shell, "d")  # a later cell displays it normally again
    assert shown(out) == 1

    result, out = run(shell, "%nnderiv tanh x -q")
    assert result.success and isinstance(result.result, nbderiv.Derivatives)
    assert shown(out) == 0 and not out.outputs
    value, out = magic(shell, "tanh x --quiet")
    assert isinstance(value, nbderiv.Derivatives) and shown(out) == 0


def test_order_options(shell):
    for line in ("tanh x -o 3", "tanh x --order 3", "tanh x --order=3", "tanh x -o3",
                 "-o 3 tanh x"):
        d, _ = magic(shell, line + " -q")
        assert d.order == 3, line
        np.testing.assert_allclose(d[3].reshape(-1), tanh_k(np.linspace(-2, 2, 21), 3),
                                   atol=1e-12)
    assert magic(shell, "tanh x -q")[0].order == 2  # default
    assert "--order must be 1 or more" in usage_error(shell, "tanh x -o 0")
    assert "invalid int value" in usage_error(shell, "tanh x -o two")


def test_wrt(shell):
    d, _ = magic(shell, "pair X2 --wrt 1 -q")
    X = shell.user_ns["X2"].numpy()
    assert d.wrt == (1,)
    np.testing.assert_allclose(d[1][:, 0, 0], X[:, 0] ** 2 * np.cos(X[:, 1]), atol=1e-12)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], -X[:, 0] ** 2 * np.sin(X[:, 1]), atol=1e-12)
    d, _ = magic(shell, "pair X2 --wrt=0,1 -o 1 -q")
    assert d.wrt == (0, 1)
    assert "out of range" in usage_error(shell, "pair X2 --wrt 5")
    assert "--wrt takes input indices" in usage_error(shell, "pair X2 --wrt a,b")


def test_plot_check_code_full(shell):
    d, out = magic(shell, "tanh x --plot")
    kinds = [sorted(o.data) for o in out.outputs]
    assert kinds == [["text/html", "text/plain"], ["image/png", "text/plain"]]
    assert out.outputs[1].data["image/png"][:4] in (b"\x89PNG", "iVBO")  # bytes or base64

    d, out = magic(shell, "tanh x --check")
    assert d.check is not None and d.check.passed
    assert "check:" in out.outputs[0].data["text/plain"]

    d, out = magic(shell, "tanh x --code -o 1")  # the code, for the line's own names
    # (its own names get a _ where the notebook has them: y_, X_)
    assert d.code and re.search(r"\by_* = tanh\(X_*\)", out.stdout) and "model(" not in out.stdout

    d, out = magic(shell, "tanh x[:6] --full")
    assert [sorted(o.data) for o in out.outputs][1] == ["image/png", "text/plain"]
    assert "too many" in usage_error(shell, "tanh -2:2:500 --full")
    assert "cannot be combined" in usage_error(shell, "tanh x -q --plot")


def test_widget_option(shell):
    w, out = magic(shell, "tanh -1:1:50 --widget")
    assert "application/vnd.jupyter.widget-view+json" in out.outputs[0].data
    assert w.controls["domain"].value == (-1.0, 1.0)
    assert w.last_data["x"].shape == (50,)
    np.testing.assert_allclose(w.last_data["y"][1], tanh_k(np.linspace(-1, 1, 50), 1),
                               atol=1e-6)
    w, _ = magic(shell, "tanh x --widget -o 3")
    assert w.controls["order"].value == 3 and w.last_data["x"].shape == (21,)
    result, out = run(shell, "%nnderiv tanh --widget")  # shown once as the last line too
    assert len(out.outputs) == 1 and result.result is not None
    assert "cannot be combined" in usage_error(shell, "tanh x --widget --plot")


def test_help(shell):
    value, out = magic(shell, "--help")
    assert value is None and "--order" in out.stdout and "--widget" in out.stdout
    assert "-o" in shell.find_line_magic("nnderiv").__doc__


@pytest.mark.parametrize("cell", ["%nnderiv?", "%nnderiv?                            # all options",
                                  "%nbderiv?  # the alias", "%nnderiv??  # with the source"])
def test_question_mark_shows_the_help_through_the_shell(shell, cell):
    """IPython sends ``%nnderiv?`` to pinfo, which shows the magic's docstring (options
    included); with a trailing comment it would look for a magic named ``nnderiv?``."""
    result, out = run(shell, cell)
    assert result.success, (result.error_before_exec, result.error_in_exec, out.stderr)
    assert "not found" not in out.stdout + out.stderr
    text = out.stdout + "".join(o.data.get("text/plain", "") for o in out.outputs)
    assert "Per-point derivatives of MODEL at X" in text
    assert "--order" in text and "--widget" in text


def test_help_with_a_comment_in_the_cell_that_loads_the_extension():
    """A notebook cell that starts with %load_ext: IPython transforms the whole cell before
    running it, so the help must answer under the name IPython looks up ('nnderiv?')."""
    ip = InteractiveShell.instance()
    if "nbderiv" in ip.extension_manager.loaded:
        ip.extension_manager.unload_extension("nbderiv")
    try:
        assert ip.find_line_magic("nnderiv?") is None  # unloaded: gone
        result, out = run(ip, "%load_ext nbderiv\n%nnderiv??   # the source too\n"
                              "%nnderiv?    # all options\n")
        assert result.success, (result.error_in_exec, out.stderr)
        text = out.stdout + "".join(o.data.get("text/plain", "") for o in out.outputs)
        assert text.count("Per-point derivatives of MODEL at X") >= 2 and "--order" in text
    finally:
        ip.extension_manager.unload_extension("nbderiv")
        ip.run_line_magic("load_ext", "nbderiv")  # as the module's fixture left it


def test_trailing_comments_are_ignored_like_python(shell):
    result, out = run(shell, "d = %nnderiv tanh x --order 3 -q      # three orders, quietly")
    assert result.success, (result.error_in_exec, out.stderr)
    assert shell.user_ns["d"].order == 3
    result, out = run(shell, "%nnderiv tanh x --plot      # summary (axes, values, findings) + figure")
    assert result.success and [sorted(o.data) for o in out.outputs][1] == ["image/png",
                                                                           "text/plain"]
    # a '#' inside quotes belongs to the expression
    shell.run_cell("table = {'a#b': x}", store_history=False)
    d, _ = magic(shell, "tanh table['a#b'] -q  # the 'a#b' column")
    assert d.n_points == 21
    d, _ = magic(shell, 'tanh table["a#b"][:3] -q#no space')
    assert d.n_points == 3
    assert split_line("net x  # c") == ["net", "x"]
    assert split_line("net f('#', \"#\") # c") == ["net", "f('#', \"#\")"]
    assert split_line(r"net f('\'#') # c") == ["net", r"f('\'#')"]
    assert "unclosed" in usage_error(shell, "tanh torch.linspace(-2, 2  # open")


def test_nbderiv_is_the_same_magic(shell):
    result, out = run(shell, "%nbderiv tanh x")
    assert result.success and isinstance(result.result, nbderiv.Derivatives)
    assert shown(out) == 1
    d = shell.run_line_magic("nbderiv", "tanh x -o 1 -q")
    np.testing.assert_allclose(d[1][:, 0, 0], tanh_k(np.linspace(-2, 2, 21), 1), atol=1e-12)
    assert shell.find_line_magic("nbderiv").__doc__ == shell.find_line_magic("nnderiv").__doc__
    result, out = run(shell, "%nbderiv nett x")
    assert type(result.error_in_exec) is UsageError


# -- the range shorthand ----------------------------------------------------------------------------
def test_range_shorthand_one_and_two_inputs(shell):
    d, _ = magic(shell, "tanh -2:2:200 -q")
    np.testing.assert_allclose(d.x[:, 0], np.linspace(-2, 2, 200), atol=1e-6)
    np.testing.assert_allclose(d[1][:, 0, 0], tanh_k(d.x[:, 0].astype(float), 1), atol=1e-6)
    assert magic(shell, "tanh 0:1 -q")[0].n_points == 200  # default count
    d, _ = magic(shell, "lin2 -1:1:7 -q -o 1")  # two inputs: a 7 x 7 grid
    assert d.n_points == 49
    g = np.linspace(-1, 1, 7)
    want = np.array([(a, b) for b in g for a in g])
    np.testing.assert_allclose(np.sort(d.x.view([("a", d.x.dtype), ("b", d.x.dtype)]), axis=0)
                               .view(d.x.dtype).reshape(-1, 2),
                               want[np.lexsort((want[:, 1], want[:, 0]))], atol=1e-6)
    w = shell.user_ns["lin2"][0].weight.detach().numpy()[0]
    np.testing.assert_allclose(d[1][:, 0, :], np.broadcast_to(w, (49, 2)), atol=1e-6)
    assert "1 or 2 inputs" in usage_error(shell, "net3 -1:1:5")
    assert "low < high" in usage_error(shell, "tanh 2:-2:10")


def test_a_grid_says_how_many_points_it_has(shell):
    result, out = run(shell, "%nnderiv lin2 -2:2:20 -o 1")
    d = result.result
    assert d.n_points == 400
    note = "grid: 20 x 20 = 400 points (-2:2:20 on each of the 2 inputs)"
    assert d.notes == [note]
    summary = out.outputs[0].data
    assert note in summary["text/plain"] and note in summary["text/html"]
    d, _ = magic(shell, "lin2 -1:1:200 -q -o 1")
    assert d.n_points == 40_000 and d.notes == [
        "grid: 200 x 200 = 40 000 points (-1:1:200 on each of the 2 inputs)"]
    assert magic(shell, "lin2 0:1 -q -o 1")[0].notes == [  # the default count
        "grid: 50 x 50 = 2 500 points (0:1 on each of the 2 inputs)"]
    d, _ = magic(shell, "tanh -2:2:200 -q")  # one input: 200 points, nothing to say
    assert d.n_points == 200 and d.notes == []
    assert magic(shell, "lin2 X2 -q -o 1")[0].notes == []  # an expression: as given


def test_a_grid_too_large_is_refused_before_anything_is_allocated(shell, monkeypatch):
    from nbderiv import magic_parsing, magics

    def no_linspace(*a, **k):
        raise AssertionError("the grid was being built")

    monkeypatch.setattr(magics.np, "linspace", no_linspace)
    monkeypatch.setattr(magics.np, "meshgrid", no_linspace)
    msg = usage_error(shell, "lin2 -2:2:100000")
    assert "100 000 x 100 000 grid = 10 000 000 000 points" in msg
    assert "GiB" in msg and "Fix: fewer points, e.g. -2:2:" in msg
    assert "MemoryError" not in msg
    msg = usage_error(shell, "tanh 0:1:10000000000 -o 4")  # one input, far too many points
    assert "10 000 000 000 points" in msg and "Fix:" in msg
    monkeypatch.undo()
    side = int(msg.split("e.g. 0:1:")[1].split()[0])  # the suggestion itself fits
    assert magic_parsing.grid_bytes(side, 1, 4) <= magic_parsing.RANGE_MAX_BYTES
    msg = usage_error(shell, "lin2 -2:2:100000")
    side = int(msg.split("e.g. -2:2:")[1].split()[0])
    assert 1000 <= side and magic_parsing.grid_bytes(side, 2, 2) <= \
        magic_parsing.RANGE_MAX_BYTES


def test_expressions_with_spaces_and_minus_signs(shell):
    d, _ = magic(shell, "tanh torch.linspace(-2, 2, 200) -q")
    assert d.n_points == 200
    d, _ = magic(shell, "tanh x[:5] -q")
    assert d.n_points == 5
    d, _ = magic(shell, "tanh -x -q")
    np.testing.assert_allclose(d.x[:, 0], -shell.user_ns["x"].numpy())
    d, _ = magic(shell, "tanh ( x * 2 ) -q")
    np.testing.assert_allclose(d.x[:, 0], 2 * shell.user_ns["x"].numpy())
    d, _ = magic(shell, "(lambda t: t ** 3) x -q -o 3")
    np.testing.assert_allclose(d[3].reshape(-1), 6.0)


def test_plot_of_three_inputs_says_the_magics_own_wrt(shell):
    d, out = magic(shell, "net3 torch.rand(9, 3) --plot")  # the result, and what to add
    assert d.order == 2 and "--wrt 0" in out.stdout and "wrt=" not in out.stdout
    d, out = magic(shell, "net3 torch.rand(9, 3) --wrt 0 --plot")  # what it says works
    assert any("image/png" in o.data for o in out.outputs)


def test_a_lambda_without_parentheses_is_told_to_wrap_it(shell):
    said = usage_error(shell, "lambda t: t ** 3 x -o 3")
    fix = said.split("Fix: ")[1].split(", or name it first")[0]
    assert fix == "%nnderiv (lambda t: t ** 3) x -o 3", said
    d, _ = magic(shell, fix.removeprefix("%nnderiv ") + " -q")  # what it says works
    np.testing.assert_allclose(d[3].reshape(-1), 6.0)
    said = usage_error(shell, "lambda t:torch.sin(t) x")
    assert "Fix: %nnderiv (lambda t:torch.sin(t)) x, or name it first" in said


def test_split_line():
    assert split_line("net torch.linspace(-2, 2, 200)") == ["net", "torch.linspace(-2, 2, 200)"]
    assert split_line(' f(x["a b"], [1, (2, 3)])  -o 2 ') == ['f(x["a b"], [1, (2, 3)])', "-o", "2"]
    for bad in ("net f(x", "net x]", "net 'x"):
        with pytest.raises(LineError):  # the magic shows it as exactly UsageError
            split_line(bad)


# -- errors -----------------------------------------------------------------------------------
def test_errors_are_one_readable_usage_error(shell):
    msg = usage_error(shell, "nett x")
    assert "MODEL" in msg and "'nett'" in msg and "not defined" in msg
    msg = usage_error(shell, "tanh xx")
    assert "X" in msg and "'xx'" in msg and "not defined" in msg
    assert "cannot parse" in usage_error(shell, "tanh x[1:2:3:4]")
    assert "unclosed" in usage_error(shell, "tanh torch.linspace(-2, 2")
    assert "IndexError" in usage_error(shell, "tanh x[99]")
    assert "unrecognized arguments: --bogus" in usage_error(shell, "tanh x --bogus")
    assert "unrecognized arguments" in usage_error(shell, "tanh x x x")
    assert "missing X" in usage_error(shell, "tanh")
    # core errors keep their message
    msg = usage_error(shell, "net3 x")  # 3 inputs expected, 1 given
    assert "rejected the input" in msg and "Fix:" in msg
    assert "must be a torch.nn.Module" in usage_error(shell, "42 x")
    shell.run_cell("class Picky(torch.nn.Module):\n"
                   "    def forward(self, x):\n"
                   "        if float(x.detach().max()) > 5: raise ValueError('above 5')\n"
                   "        return torch.tanh(x)\n", store_history=False)
    msg = usage_error(shell, "Picky() torch.linspace(0, 9, 50)")  # fails past the probe points
    assert "the model raised ValueError" in msg and "above 5" in msg and "Fix:" in msg
    # through run_cell, IPython shows one line, no traceback
    result, out = run(shell, "%nnderiv nett x")
    assert type(result.error_in_exec) is UsageError
    assert "Traceback" not in out.stdout + out.stderr


# -- a real kernel: the summary appears once, whatever the cell does with the value ----------------
def test_display_once_in_a_real_kernel():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = ["%load_ext nbderiv",
             "import torch\nnet = torch.nn.Sequential(torch.nn.Tanh())\n"
             "x = torch.linspace(-1, 1, 5)",
             "%nnderiv net x", "d = %nnderiv net x", "d", "%nnderiv net x -q", "%nnderiv net nope",
             "d.plot()"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     allow_errors=True, resources={"metadata": {"path": env_root}})
    client.execute()
    outs = [c.outputs for c in nb.cells]
    assert outs[0] == [] and outs[1] == []  # %load_ext prints nothing
    for i in (2, 3, 4):
        summaries = [o for o in outs[i] if "text/html" in o.get("data", {})]
        assert len(summaries) == 1 and len(outs[i]) == 1, (cells[i], outs[i])
    assert outs[2][0]["output_type"] == "display_data"
    assert outs[4][0]["output_type"] == "execute_result"
    assert outs[5] == []
    (err,) = outs[6]  # IPython prints a UsageError as one line on stderr, no traceback
    assert err["output_type"] == "stream" and err["name"] == "stderr"
    assert err["text"].startswith("UsageError: X 'nope'") and err["text"].count("\n") == 1
    (figure,) = outs[7]  # a returned figure shows itself once, as PNG
    assert "image/png" in figure["data"]


# -- Keras ------------------------------------------------------------------------------------------
def test_keras_model(shell):
    try:
        import nbderiv.backends.tensorflow  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the Keras/TensorFlow backend is not importable: {exc}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    result, _ = run(shell,
                    "import keras, numpy as np, tensorflow as tf\n"
                    "kin = keras.Input((1,))\n"
                    "dense = keras.layers.Dense(1, activation='tanh')\n"
                    "kmodel = keras.Model(kin, dense(kin))\n"
                    "dense.set_weights([np.array([[1.5]]), np.array([-0.3])])\n"
                    "kx = tf.linspace(-2.0, 2.0, 11)[:, None]\n")
    assert result.success, result.error_in_exec
    d, out = magic(shell, "kmodel kx")
    assert d.framework == "tensorflow" and shown(out) == 1
    xs = np.linspace(-2, 2, 11)
    np.testing.assert_allclose(d[1][:, 0, 0], 1.5 * tanh_k(1.5 * xs - 0.3, 1), atol=1e-5)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], 1.5 ** 2 * tanh_k(1.5 * xs - 0.3, 2), atol=1e-4)
    d, _ = magic(shell, "kmodel -1:1:9 -q -o 1")  # range: the input width read from kmodel
    np.testing.assert_allclose(d.x[:, 0], np.linspace(-1, 1, 9), atol=1e-6)
    np.testing.assert_allclose(d[1][:, 0, 0], 1.5 * tanh_k(1.5 * d.x[:, 0] - 0.3, 1), atol=1e-5)
    result, _ = run(shell, "kseq = keras.Sequential([keras.layers.Dense(1)])")  # unbuilt
    msg = usage_error(shell, "kseq -1:1:5")
    # fixes that exist (the magic has no d_in= option): build it, or pass the points
    assert "Fix: pass d_in=" not in msg and "Fix: build it with one call" in msg
    assert "an array of shape (N, d_in) (in %nnderiv instead of a range" in msg
    assert not shell.user_ns["kseq"].built  # never called, so never built for a wrong width


def test_quiet_check_and_framework_option(shell):
    """--check is a computation, so -q may go with it (nothing shown, d.check filled); a plain
    function on a numpy X gets its framework from --framework."""
    shell.run_cell("import numpy as np, torch\nxs = np.linspace(0, 1, 5)", store_history=False)
    d = shell.run_line_magic("nnderiv", "torch.sin xs --framework torch --check -q")
    assert d.check is not None and d.check.passed
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(np.linspace(0, 1, 5)), atol=1e-6)
    with pytest.raises(UsageError, match="framework"):
        shell.run_line_magic("nnderiv", "torch.sin xs -q")


def test_reference_option_shows_the_error_per_order(shell):
    shell.run_cell("import numpy as np, torch\nxs = torch.linspace(0, 1, 9)")
    d = shell.run_line_magic("nnderiv", "torch.sin xs --order 2 --reference np.sin -q")
    assert set(d.reference_errors) >= {1, 2}
    assert all(rel < 1e-5 for _, rel in d.reference_errors.values())
    assert "vs reference: " in repr(d)


@pytest.mark.parametrize("given", ["'lambda x: np.sin(x)'", '"lambda x: np.sin(x)"',
                                   "='lambda x: np.sin(x)'", "'np.sin'",
                                   "'{1: np.cos, 2: lambda x: -np.sin(x)}'"])
def test_reference_takes_a_quoted_expression_such_as_a_lambda(shell, given):
    shell.run_cell("import numpy as np, torch\nxs = torch.linspace(0, 1, 9, dtype=torch.float64)")
    sep = "" if given.startswith("=") else " "
    d = shell.run_line_magic("nnderiv", f"torch.sin xs --order 2 --reference{sep}{given} -q")
    assert set(d.reference_errors) >= {1, 2}
    assert all(rel < 1e-5 for _, rel in d.reference_errors.values())


def test_reference_that_is_no_function_or_dict_is_one_clear_line(shell):
    shell.run_cell("import numpy as np, torch\nxs = torch.linspace(0, 1, 9)\nthree = 3")
    text = usage_error(shell, "torch.sin xs --reference three -q")
    assert "--reference three gave int 3, not a function or a dict" in text
    assert "--reference 'lambda x: x**2'" in text
    text = usage_error(shell, "torch.sin xs --reference '[np.sin]' -q")
    assert "gave list [<ufunc 'sin'>], not a function or a dict" in text
    # a lambda without quotes is cut at its first blank: told to quote it
    text = usage_error(shell, "torch.sin xs --reference lambda x: np.sin(x) -q")
    assert "--reference got 'lambda'" in text and "put it in quotes" in text
    assert "unrecognized arguments" not in text
    text = usage_error(shell, "torch.sin xs --reference 'no_such_name' -q")
    assert "--reference 'no_such_name'" in text and "is not defined" in text


def test_full_takes_the_jacobian_from_the_same_call(shell):
    # a lambda is probed on every call (nbderiv cannot see the state it reads), so the count
    # shows whether --full runs one pipeline or two
    run(shell, "calls = [0]\n"
               "def counted(X):\n"
               "    calls[0] += 1\n"
               "    return torch.sin(X) * X\n")
    count = lambda: shell.user_ns["calls"][0]  # noqa: E731
    start = count()
    magic(shell, "counted x[:6] -q")
    alone = count() - start
    start = count()
    J_alone = nbderiv.full_jacobian(shell.user_ns["counted"], shell.user_ns["x"][:6])
    jacobian_alone = count() - start
    start = count()
    d, out = magic(shell, "counted x[:6] --full")
    both = count() - start
    assert both < alone + jacobian_alone, (both, alone, jacobian_alone)
    fig = out.outputs[1]
    assert "image/png" in fig.data
    # and the picture is of the same Jacobian: diagonal blocks = d[1], zero elsewhere
    x6 = shell.user_ns["x"][:6].numpy()
    np.testing.assert_allclose(np.diagonal(J_alone[:, 0, :, 0]), np.cos(x6) * x6 + np.sin(x6),
                               rtol=1e-12)
    np.testing.assert_allclose(d[1][:, 0, 0], np.cos(x6) * x6 + np.sin(x6), rtol=1e-12)


# -- ranges on models of several separate inputs ---------------------------------------------------
def _keras_backend():
    try:
        import nbderiv.backends.tensorflow  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the Keras/TensorFlow backend is not importable: {exc}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _grid(lo, hi, n):
    """The grid a range gives two inputs, as np.meshgrid lays it out (the first input varies
    fastest)."""
    g = np.linspace(lo, hi, n)
    a, b = np.meshgrid(g, g)
    return a.ravel(), b.ravel()


def test_a_range_on_a_keras_model_of_two_inputs_is_a_grid_over_them(shell):
    """%nnderiv two -2:2:10 on keras.Model([a, b], ...): a 10 x 10 grid passed as the tuple
    (a, b), as derivatives() takes several inputs; it said "cannot tell how many inputs" and
    named a d_in= option that does not exist."""
    _keras_backend()
    result, _ = run(shell,
                    "import keras, numpy as np\n"
                    "ka, kb = keras.Input((1,)), keras.Input((1,))\n"
                    "kdense = keras.layers.Dense(1, activation='tanh')\n"
                    "two = keras.Model([ka, kb], kdense(keras.layers.Concatenate()([ka, kb])))\n"
                    "kdense.set_weights([np.array([[0.7], [-1.3]]), np.array([0.2])])\n")
    assert result.success, result.error_in_exec
    d, _ = magic(shell, "two -2:2:10 -q")
    a, b = _grid(-2, 2, 10)
    assert d.n_points == 100 and d.inputs == ("arg0", "arg1")
    assert d.notes == ["grid: 10 x 10 = 100 points (-2:2:10 on each of the 2 inputs)"]
    np.testing.assert_allclose(d.x, np.stack([a, b], axis=1), atol=1e-6)
    z, w = 0.7 * a - 1.3 * b + 0.2, np.array([0.7, -1.3])  # y = tanh(z): closed forms
    np.testing.assert_allclose(d[1][:, 0, :], tanh_k(z, 1)[:, None] * w, atol=1e-5)
    np.testing.assert_allclose(d[2][:, 0], tanh_k(z, 2)[:, None, None] * np.outer(w, w),
                               atol=1e-5)
    d, _ = magic(shell, "two 0:1 -q -o 1")  # without a count: 50 per input, as for lin2
    assert d.n_points == 2500
    w, _ = magic(shell, "two -1:1:9 --widget")  # the explorer gives each input a slider
    assert [label for label, _ in w.controls["input"].options] == ["arg0", "arg1"]
    z = 0.7 * np.linspace(-1, 1, 9) + 0.2  # along arg0, arg1 held at 0
    np.testing.assert_allclose(w.last_data["y"][1], 0.7 * tanh_k(z, 1), atol=1e-5)


def test_a_range_on_a_keras_model_of_named_inputs_and_wide_inputs(shell):
    _keras_backend()
    result, _ = run(shell,
                    "import keras\n"
                    "kx, kt = keras.Input((1,), name='x'), keras.Input((1,), name='t')\n"
                    "xt = keras.Model({'x': kx, 't': kt}, keras.layers.Multiply()([kx, kt]))\n"
                    "kw = keras.Input((2,), name='w')\n"
                    "wide = keras.Model([kx, kw], keras.layers.Concatenate()([kx, kw]))\n"
                    "k3 = keras.Model([kx, kt, keras.Input((1,), name='s')],\n"
                    "                 keras.layers.Add()([kx, kt]))\n")
    assert result.success, result.error_in_exec
    d, _ = magic(shell, "xt -1:1:5 -q")  # a dict of Inputs: passed in sorted order (t, x)
    t, x = _grid(-1, 1, 5)
    assert d.inputs == ("t", "x")
    np.testing.assert_allclose(d.y[:, 0], t * x, atol=1e-6)  # y = x t
    np.testing.assert_allclose(d[1][:, 0, :], np.stack([x, t], axis=1), atol=1e-6)
    np.testing.assert_allclose(d[2][:, 0], np.broadcast_to([[0, 1], [1, 0]], (25, 2, 2)),
                               atol=1e-6)
    msg = usage_error(shell, "wide -1:1:5")
    assert "input w takes points of shape (2,)" in msg and "(x, w), with w of shape (N, 2)" \
        in msg
    msg = usage_error(shell, "k3 -1:1:5")
    assert "takes 3 separate inputs" in msg and "a tuple of 3 arrays of shape (N, 1)" in msg


def test_a_range_on_a_torch_forward_of_two_arguments_is_a_grid_over_them(shell):
    """forward(x, t) (a PINN): the range gives x and t one grid coordinate each, as the
    tuple (x, t); the magic passed an (N, 1) or (N, 2) array, and forward() lacked t."""
    result, _ = run(shell,
                    "class PINN(torch.nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.a, self.b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)\n"
                    "    def forward(self, x, t):\n"
                    "        return torch.tanh(self.a(x) * self.b(t))\n"
                    "pinn = PINN()\n"
                    "with torch.no_grad():\n"
                    "    _ = pinn.a.weight.fill_(1.5), pinn.a.bias.fill_(0.0)\n"
                    "    _ = pinn.b.weight.fill_(-0.5), pinn.b.bias.fill_(1.0)\n"
                    "three = lambda x, t, s: x * t * s\n")
    assert result.success, result.error_in_exec
    d, _ = magic(shell, "pinn -1:1:6 -q")
    x, t = _grid(-1, 1, 6)
    assert d.inputs == ("x", "t") and d.n_points == 36
    assert d.notes == ["grid: 6 x 6 = 36 points (-1:1:6 on each of the 2 inputs)"]
    u, v = 1.5 * x, 1 - 0.5 * t  # y = tanh(u v)
    dy = tanh_k(u * v, 1)
    np.testing.assert_allclose(d[1][:, 0, 0], dy * 1.5 * v, atol=1e-5)
    np.testing.assert_allclose(d[1][:, 0, 1], dy * u * -0.5, atol=1e-5)
    # d2y/dx dt = tanh''(uv) (1.5 v)(-0.5 u) + tanh'(uv) (1.5)(-0.5)
    np.testing.assert_allclose(d[2][:, 0, 0, 1],
                               tanh_k(u * v, 2) * 1.5 * v * -0.5 * u + dy * -0.75, atol=1e-5)
    msg = usage_error(shell, "three -1:1:5 --framework torch")  # a function of three
    assert "takes 3 separate inputs" in msg and "tuple of 3 arrays" in msg
    w, _ = magic(shell, "pinn -1:1:6 --widget")  # x and t, each a slider
    assert [label for label, _ in w.controls["input"].options] == ["x", "t"]
    w.controls["input"].value, w.controls["t"].value = 1, 0.0  # along t, x held at 0.5
    w.controls["x"].value = 0.5
    t = np.linspace(-1, 1, 6)
    u, v = 1.5 * 0.5, 1 - 0.5 * t
    np.testing.assert_allclose(w.last_data["y"][1], tanh_k(u * v, 1) * u * -0.5, atol=1e-5)


def test_a_range_count_must_be_an_int(shell):
    msg = usage_error(shell, "tanh 0:1:1e9")  # it said "cannot parse X: invalid syntax"
    assert "the number of points must be an int" in msg and "'1e9'" in msg
    assert "invalid syntax" not in msg
    assert "Fix: 0:1:1000." in usage_error(shell, "tanh 0:1:1e3")
    assert "e.g. 0:1:200" in usage_error(shell, "tanh 0:1:2.5")
    assert "e.g. -2:2:200" in usage_error(shell, "tanh -2:2:-5")
    assert "must be an int" in usage_error(shell, "tanh 0:1:1e3 --widget")
    assert magic(shell, "tanh 0:1:7 -q")[0].n_points == 7  # digits: as before


def test_a_model_whose_width_cannot_be_read_names_fixes_the_magic_has(shell):
    """The magic said "Fix: pass d_in= (the number of input features)", an option it does
    not have (only nbderiv.explore takes d_in=)."""
    result, _ = run(shell,
                    "class Normed(torch.nn.Module):  # its width is not read from its layers\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.norm, self.lin = torch.nn.LayerNorm(3), torch.nn.Linear(3, 1)\n"
                    "    def forward(self, x):\n"
                    "        return self.lin(self.norm(x))\n"
                    "normed = Normed()\n"
                    "lazy = torch.nn.Sequential(torch.nn.LazyLinear(1))\n")
    assert result.success, result.error_in_exec
    msg = usage_error(shell, "normed -1:1:5")
    assert msg.startswith("cannot tell how many inputs the model takes")
    assert "d_in=" not in msg and "Fix: pass X as an array of shape (N, d_in) instead of a " \
        "range" in msg
    msg = usage_error(shell, "normed --widget")
    assert "Fix: open the explorer with the width given, nbderiv.explore(model, d_in=...)" in msg
    msg = usage_error(shell, "lazy -1:1:5")
    assert "Fix: pass d_in=" not in msg and "initialise it with one call" in msg
    from torch.nn.parameter import UninitializedParameter
    assert isinstance(shell.user_ns["lazy"][0].weight, UninitializedParameter)  # never run


def test_a_range_on_a_built_subclassed_keras_model(shell):
    """A subclassed Keras model has no Input even once built: the range tries one feature
    (the model was built, so calling it builds nothing); it was refused as "not built"."""
    _keras_backend()
    result, _ = run(shell,
                    "import keras, numpy as np\n"
                    "class KSub(keras.Model):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.d = keras.layers.Dense(1, activation='tanh')\n"
                    "    def call(self, x):\n"
                    "        return self.d(x)\n"
                    "ksub = KSub()\n"
                    "_ = ksub(np.zeros((1, 1), 'float32'))\n"
                    "ksub.d.set_weights([np.array([[0.8]]), np.array([0.1])])\n"
                    "ksub3 = KSub()\n"
                    "_ = ksub3(np.zeros((1, 3), 'float32'))\n")
    assert result.success, result.error_in_exec
    d, _ = magic(shell, "ksub -1:1:9 -q")
    xs = np.linspace(-1, 1, 9)
    np.testing.assert_allclose(d[1][:, 0, 0], 0.8 * tanh_k(0.8 * xs + 0.1, 1), atol=1e-5)
    np.testing.assert_allclose(d[2][:, 0, 0, 0], 0.64 * tanh_k(0.8 * xs + 0.1, 2), atol=1e-5)
    msg = usage_error(shell, "ksub3 -1:1:9")  # three features: one does not fit
    assert msg.startswith("cannot tell how many inputs") and "Fix: pass X as an array" in msg


def test_widget_on_images_says_the_explorer_takes_feature_vectors_and_what_works(shell):
    """It said "Fix: pass d_in=" (no option of the magic's) and showed nbderiv's own probe
    shape (2, 1); the explorer has a slider per input feature, so it cannot take images."""
    result, _ = run(shell,
                    "import numpy as np, torch\n"
                    "torch.manual_seed(0)\n"
                    "tcnn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(),\n"
                    "                           torch.nn.Flatten(), torch.nn.Linear(48, 5))\n"
                    "timgs = torch.randn(3, 2, 6, 6)\n")
    assert result.success, result.error_in_exec
    models = [("tcnn", "timgs", "C=2 channels (shape (N, 2, H, W))")]
    try:
        _keras_backend()
    except pytest.skip.Exception:
        pass
    else:
        result, _ = run(shell,
                        "import keras\n"
                        "keras.utils.set_random_seed(0)\n"
                        "kcnn = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3),\n"
                        "                         keras.layers.Flatten(), keras.layers.Dense(5)])\n"
                        "kimgs = np.random.default_rng(0).normal(size=(3, 6, 6, 2))"
                        ".astype('float32')\n")
        assert result.success, result.error_in_exec
        models.append(("kcnn", "kimgs", "points of shape (6, 6, 2)"))
    for name, images, takes in models:
        for line in (f"{name} {images} --widget", f"{name} --widget"):
            msg = usage_error(shell, line)
            assert "the explorer (--widget) works on models of flat feature inputs, x of shape " \
                "(N, d_in), with one slider per input feature" in msg
            assert takes in msg and "each point is an image" in msg
            assert "d_in=" not in msg and "(2, 1)" not in msg
        msg = usage_error(shell, f"{name} {images} --widget")
        assert f"Fix: see its derivatives with %nnderiv {name} {images} --plot" in msg
        d, out = magic(shell, f"{name} {images} --plot")  # what it points to works
        assert d.n_points == 3 and any("image/png" in o.data for o in out.outputs)


def test_widget_on_sequences_whose_first_layer_says_nothing_points_to_the_plot(shell):
    # an LSTM regressor reads its width from nothing nbderiv can see: the refusal quoted the
    # model's error on a probe of one feature, run on with "got 1. the explorer"
    result, _ = run(shell,
                    "import torch\n"
                    "torch.manual_seed(0)\n"
                    "class Reg(torch.nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.rnn = torch.nn.LSTM(3, 4, batch_first=True)\n"
                    "        self.head = torch.nn.Linear(4, 1)\n"
                    "    def forward(self, x):\n"
                    "        return self.head(self.rnn(x)[0][:, -1])\n"
                    "reg = Reg().eval()\n"
                    "seqs = torch.randn(5, 7, 3)\n")
    assert result.success, result.error_in_exec
    msg = usage_error(shell, "reg seqs --widget")
    assert "seqs holds points of shape (7, 3): each point is a sequence" in msg
    assert "Fix: see its derivatives with %nnderiv reg seqs --plot" in msg
    msg = usage_error(shell, "reg --widget")  # no X: the model's words, sentences kept apart
    assert ". The explorer (--widget) works on" in msg
    msg = usage_error(shell, "reg -2:2:10")
    assert "(N, C, H, W) or (N, T, F)" in msg
    d, out = magic(shell, "reg seqs --plot")  # what it points to works: d[1] vs torch's own
    jac = torch.autograd.functional.jacobian(
        lambda s: shell.user_ns["reg"](s[None])[0], shell.user_ns["seqs"][2])
    np.testing.assert_allclose(d[1][2], jac.numpy(), atol=1e-6)
