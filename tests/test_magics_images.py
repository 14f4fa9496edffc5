"""``%nnderiv`` on images and sequences through a real IPython shell: X of any per-point
shape passes through, ``--target`` (an int or a name in the notebook) selects one output per
point, ``--plot`` shows the saliency maps, order 1 unless asked, errors are one line."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("IPython")
pytest.importorskip("matplotlib")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

import nbderiv  # noqa: E402


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    if "nbderiv" not in ip.extension_manager.loaded:
        with capture_output():
            ip.run_line_magic("load_ext", "nbderiv")
    result = ip.run_cell(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),\n"
        "                          torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).double()\n"
        "images = torch.rand(5, 3, 6, 6, dtype=torch.float64)\n"
        "labels = torch.tensor([0, 1, 2, 1, 0])\n"
        "class Seq(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.rnn = torch.nn.LSTM(2, 4, batch_first=True)\n"
        "        self.head = torch.nn.Linear(4, 1)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.rnn(x)[0][:, -1])\n"
        "seq = Seq().double()\n"
        "series = torch.rand(3, 9, 2, dtype=torch.float64)\n",
        store_history=False)
    assert result.success
    return ip


def magic(shell, line):
    with capture_output() as out:
        value = shell.run_line_magic("nnderiv", line)
    return value, out


def pngs(out) -> int:
    return sum("image/png" in o.data for o in out.outputs)


def test_images_pass_through_with_target_name_and_plot(shell):
    d, out = magic(shell, "cnn images --target labels --plot")
    ns = shell.user_ns
    assert d.order == 1                      # images: order 1 unless asked
    assert d[1].shape == (5, 1, 3, 6, 6)
    assert d.axes(1) == ("point", "output", "input axis 1", "input axis 2", "input axis 3")
    full = nbderiv.derivatives(ns["cnn"], ns["images"])
    np.testing.assert_allclose(d[1][:, 0], full[1][np.arange(5), ns["labels"].numpy()],
                               atol=1e-12)
    assert pngs(out) == 1                    # the saliency figure


def test_target_int_and_explicit_order(shell):
    d, _ = magic(shell, "cnn images[:2] --target 2 -o 2 --quiet")
    assert d.order == 2
    assert d[2].shape == (2, 1) + (3, 6, 6) * 2
    full = nbderiv.derivatives(shell.user_ns["cnn"], shell.user_ns["images"][:2])
    np.testing.assert_allclose(d[1][:, 0], full[1][:, 2], atol=1e-12)


def test_sequences_plot_the_time_feature_heat_map(shell):
    d, out = magic(shell, "seq series --plot")
    assert d[1].shape == (3, 1, 9, 2) and d.order == 1
    assert pngs(out) == 1
    fig = d.plot()
    np.testing.assert_allclose(fig.panels[1, 0].images[0].get_array(), np.abs(d[1][0, 0]).T)


def test_plot_of_order_two_maps_draws_both_orders(shell, monkeypatch):
    """--order 2 --plot on images draws order 2 too (it drew order 1 alone, silently)."""
    from nbderiv.result import Derivatives

    drawn = []
    original = Derivatives.plot

    def recording(self, **kwargs):
        fig = original(self, **kwargs)
        drawn.append(sorted({key[0] for key in fig.panels if key[0] != "input"}))
        return fig

    monkeypatch.setattr(Derivatives, "plot", recording)
    d, out = magic(shell, "cnn images[:2] --target 0 -o 2 --plot")
    assert d.order == 2 and pngs(out) == 1
    assert drawn == [[1, 2]]


def test_printed_code_runs_with_the_names_on_the_line(shell):
    """--code prints code for the magic's own MODEL and X (it named model and x, which the
    notebook may not have, or may hold something else), and rebinds neither."""
    shell.run_cell("model, x = 'not the model', 'not the points'\n"
                   "lin2 = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Tanh()).double()",
                   store_history=False)
    for line, n in (("cnn images[:2] --code -o 1", 2), ("lin2 -1:1:5 --code -o 2", 25)):
        d, out = magic(shell, line)
        result = shell.run_cell(out.stdout, store_history=False)
        assert result.success, out.stdout
        k = d.order
        got = np.asarray(shell.user_ns[f"d{k}"])
        assert got.shape[0] == n
        np.testing.assert_allclose(got.reshape(d[k].shape), d[k], rtol=1e-10, atol=1e-12)
        assert shell.user_ns["x"] == "not the points"  # the notebook's own x is left alone
        assert shell.user_ns["model"] == "not the model"


def test_vector_inputs_keep_order_two(shell):
    shell.run_cell("mlp = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())\n"
                   "pts = torch.rand(4, 2)", store_history=False)
    d, _ = magic(shell, "mlp pts --quiet")
    assert d.order == 2


@pytest.mark.parametrize("line, words", [
    ("cnn images --target 7", "target 7 is out of range"),
    ("cnn images --target nolabels", "--target 'nolabels'"),
    ("cnn images --order 0", "--order must be 1 or more"),
])
def test_errors_are_one_line(shell, line, words):
    with pytest.raises(UsageError) as info:
        magic(shell, line)
    assert type(info.value) is UsageError
    assert words in str(info.value)
