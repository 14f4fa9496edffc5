"""``%nnderiv ... --code`` prints code that runs in the notebook as it is: on the line's own
names (a model called ``p`` or ``a``, a range), without rebinding them, giving the magic's
own numbers (which are checked against float64 ``torch.func`` in test_magics.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("IPython")

from checks import nbderiv_shell  # noqa: E402

SETUP = """
import torch, numpy as np
torch.manual_seed(0)
p = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
a = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
t = torch.linspace(-2, 2, 10).reshape(-1, 1)
class PINN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    def forward(self, x, t):
        return self.l(torch.cat([x, t], 1))
pinn = PINN()
"""


@pytest.fixture(scope="module")
def shell():
    return nbderiv_shell(SETUP)


def code_and_result(shell, line):
    from IPython.utils.capture import capture_output

    d = shell.run_line_magic("nnderiv", line + " --quiet")
    with capture_output() as out:
        shell.run_line_magic("nnderiv", line + " --code")
    return out.stdout, d


def run(shell, code):
    from IPython.utils.capture import capture_output

    with capture_output():
        result = shell.run_cell(code, store_history=False)
    assert result.success, (code, result.error_in_exec)
    d1 = shell.user_ns["d1"]
    return np.asarray(d1.detach() if hasattr(d1, "detach") else d1)


@pytest.mark.parametrize("line, name", [("p t", "p"), ("a -1:1:4", "a"), ("p -1:1:5", "p")])
def test_code_for_a_model_named_like_a_temporary_runs_and_keeps_it(shell, line, name):
    model = shell.user_ns[name]
    before = {k: shell.user_ns[k] for k in ("p", "a", "t", "pinn")}
    code, d = code_and_result(shell, line + " --order 2")
    run(shell, code)
    assert shell.user_ns[name] is model
    assert all(shell.user_ns[k] is v for k, v in before.items())  # the notebook's names kept
    np.testing.assert_allclose(shell.user_ns["d2"].detach().numpy()
                               if hasattr(shell.user_ns["d2"], "detach")
                               else shell.user_ns["d2"], d[2], rtol=1e-5, atol=1e-6)


def test_range_for_a_two_argument_model_is_the_magics_grid(shell):
    code, d = code_and_result(shell, "pinn -1:1:8")
    assert d[1].shape == (64, 1, 2)
    d1 = run(shell, code)
    assert d1.shape == (64, 1, 2)
    np.testing.assert_allclose(d1, d[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("line, words", [
    ("p t --ordr 2", "did you mean --order?"),
    ("p t --plto", "did you mean --plot?"),
    ("p t extra", "takes MODEL and X, then options"),
])
def test_unknown_arguments_say_the_likely_fix(shell, line, words):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError) as info:
        shell.run_line_magic("nnderiv", line)
    assert words in str(info.value)
    assert "'2'" not in str(info.value)  # an unknown option's value is not another argument


def test_explain_with_a_range_for_x_says_ranges_are_for_the_line_magic(shell):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("nnderiv", "explain p -1:1:8", "g = 1\n")
    assert "is a range" in str(info.value) and "%nnderiv p -1:1:8" in str(info.value)


def test_code_with_a_target_reads_the_lines_labels(shell):
    """--target labs --code: the printed code read a variable `target` the notebook does not
    have (NameError); it reads the line's own labels, and gives the magic's numbers (each
    point's own class score's gradient; truth: float64 vmap(jacrev) rows picked by label)."""
    shell.run_cell("torch.manual_seed(0)\n"
                   "cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Tanh(), "
                   "torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 4))\n"
                   "imgs, labs = torch.rand(3, 3, 6, 6), torch.tensor([0, 3, 1])\n",
                   store_history=False)
    code, d = code_and_result(shell, "cnn imgs --target labs")
    assert "target" not in code.split("#")[0] or "labs" in code
    got = run(shell, code)
    ns = shell.user_ns
    c64 = __import__("copy").deepcopy(ns["cnn"]).double()
    J = torch.func.vmap(torch.func.jacrev(lambda q: c64(q[None])[0]))(ns["imgs"].double())
    truth = J[torch.arange(3), ns["labs"]].detach().numpy()
    np.testing.assert_allclose(got.reshape(3, -1), truth.reshape(3, -1), atol=1e-6)
    np.testing.assert_allclose(d[1].reshape(3, -1), truth.reshape(3, -1), atol=1e-6)
