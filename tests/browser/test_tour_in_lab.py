"""End-to-end: the tour notebook runs in a real JupyterLab and its widgets react.

``test_harness_with_fixture_notebook`` checks the harness itself on a tiny notebook
(an IntSlider driving a matplotlib plot through ``interactive_output``);
``test_tour_notebook`` does the same for ``notebooks/00_tour.ipynb``.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from .conftest import (
    REPO_ROOT,
    assert_no_error_outputs,
    assert_no_widget_console_errors,
    change_control,
    control_kind,
    find_labelled_control,
    open_notebook,
    output_texts,
    run_all_and_wait,
    save_widget_screenshot,
    wait_fingerprint_change,
    widget_fingerprint,
)

pytestmark = pytest.mark.browser

FIXTURE_NOTEBOOK = "tests/browser/fixture_widget.ipynb"
TOUR_NOTEBOOK = "notebooks/00_tour.ipynb"
# Words the tour's rendered outputs must contain: the axis names of the nbderiv summary
# and the ReLU finding.
TOUR_WORDS = ("point", "output", "input", "piecewise-linear")
ORDER_LABEL = "order"


def _digest(relpath: str) -> str:
    return hashlib.sha256((REPO_ROOT / relpath).read_bytes()).hexdigest()


def _widget_area(ctrl):
    """The outermost (cell-level) output that holds ``ctrl``: the whole widget."""
    return ctrl.locator(
        "xpath=(ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
        " ' jp-OutputArea-output ')])[1]"
    )


def _all_labels(page) -> list[str]:
    return page.locator(".jp-OutputArea-output .widget-label").all_inner_texts()


def _exercise_control(page, ctrl, what: str) -> tuple[str, str]:
    """Change ``ctrl`` and assert that the plot (or a readout) in its widget changed."""
    area = _widget_area(ctrl)
    assert area.count() == 1, f"cannot find the output area around the {what} control"
    before = widget_fingerprint(area)
    assert (
        json.loads(before)["imgs"] or json.loads(before)["svgs"] or json.loads(before)["texts"]
    ), f"the widget around the {what} control shows no plot or readout before the change"
    old, new = change_control(ctrl)
    after = wait_fingerprint_change(area, before)
    assert after != before, (
        f"changing {what} from {old!r} to {new!r} did not change the widget's plot or readout"
    )
    return old, new


def test_harness_with_fixture_notebook(lab_page, lab_server, tmp_path, record_property):
    page = lab_page
    digest = _digest(FIXTURE_NOTEBOOK)
    open_notebook(page, lab_server, FIXTURE_NOTEBOOK)
    run_all_and_wait(page)
    assert_no_error_outputs(page)

    text = "\n".join(output_texts(page))
    assert "fixture ready: one slider, one plot" in text

    ctrl = find_labelled_control(page, "k")
    assert ctrl is not None, f"no slider labelled 'k'; labels seen: {_all_labels(page)}"
    assert control_kind(ctrl) == "widget-slider"
    area = _widget_area(ctrl)
    first = json.loads(widget_fingerprint(area))
    assert len(first["imgs"]) == 1 and first["imgs"][0].startswith("data:image/png;base64,"), first

    old, new = _exercise_control(page, ctrl, "k")
    assert (old, new) == ("1", "2"), "ArrowRight must move an IntSlider by exactly one step"
    second = json.loads(widget_fingerprint(area))
    assert second["imgs"] and second["imgs"] != first["imgs"]

    assert_no_error_outputs(page)
    assert_no_widget_console_errors(page)
    save_widget_screenshot(area, tmp_path, "fixture_widget.png", record_property)
    assert _digest(FIXTURE_NOTEBOOK) == digest, "the lab wrote to the notebook (autosave?)"


@pytest.mark.skipif(
    not (REPO_ROOT / TOUR_NOTEBOOK).is_file(),
    reason=f"{TOUR_NOTEBOOK} does not exist yet; nothing to drive in JupyterLab",
)
def test_tour_notebook(lab_page, lab_server, tmp_path, record_property):
    page = lab_page
    digest = _digest(TOUR_NOTEBOOK)
    open_notebook(page, lab_server, TOUR_NOTEBOOK)
    run_all_and_wait(page)
    assert_no_error_outputs(page)

    text = "\n".join(output_texts(page)).lower()
    missing = [w for w in TOUR_WORDS if w not in text]
    assert not missing, f"tour outputs lack {missing}; outputs were:\n{text[:4000]}"

    ctrl = find_labelled_control(page, ORDER_LABEL)
    assert ctrl is not None, (
        f"no explorer control labelled {ORDER_LABEL!r} (nbderiv.explore); "
        f"widget labels seen: {_all_labels(page)}"
    )
    _exercise_control(page, ctrl, ORDER_LABEL)

    assert_no_error_outputs(page)
    assert_no_widget_console_errors(page)
    save_widget_screenshot(_widget_area(ctrl), tmp_path, "explorer.png", record_property)
    assert _digest(TOUR_NOTEBOOK) == digest, "the lab wrote to the notebook (autosave?)"
