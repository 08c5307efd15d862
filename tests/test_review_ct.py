"""Review of the CT workflow (loose boxes drawn by hand on the shipped CT slice): a new
window applied with one press of Segment is taken back by one undo."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

from pathlib import Path

import numpy as np
import pytest

import boxlevelset
from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._layers import boxes_to_rectangles

pytestmark = pytest.mark.plugin
CT_SLICE = Path(boxlevelset.__file__).parent / "samples" / "ct_slice.nii.gz"
# The sample's liver and spine boxes, each side pushed out by hand-drawn slack.
LOOSE = [(66.0, 130.0, 364.0, 382.0), (208.0, 327.0, 306.0, 446.0)]


@pytest.fixture
def ct_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.open(str(CT_SLICE), plugin="boxlevelset-napari")[0]
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    plane = 0 if image.data.ndim == 3 else None
    for box in LOOSE:  # drawn one by one, Live: one mask each
        boxes.add_rectangles(boxes_to_rectangles(np.asarray([box]), plane=plane))
    return viewer, widget, image, widget.labels_layer(create=False)


def test_one_undo_takes_back_a_segment_press_that_redid_every_box(ct_widget):
    _viewer, widget, image, labels = ct_widget
    assert widget.loose_check.isChecked()  # ticked by itself on CT
    before = np.asarray(labels.data).copy()
    assert len(np.unique(before)) == 3  # background, liver, spine
    image.contrast_limits = (-60.0, 190.0)  # a narrower window, then Segment
    widget.segment()
    after = np.asarray(labels.data).copy()
    for box_id in (1, 2):  # both masks were redone with the new window
        assert not np.array_equal(before == box_id, after == box_id)
    labels.undo()  # one step back: the masks as they were before the press
    np.testing.assert_array_equal(np.asarray(labels.data), before)


def test_a_saved_ct_folder_reopens_in_the_window_it_was_annotated_in(ct_widget, tmp_path):
    """It had come back in the abdomen window whatever window the annotator used."""
    from boxlevelset_napari._export import save_annotations
    from boxlevelset_napari._reader import napari_get_reader

    viewer, widget, image, labels = ct_widget
    image.contrast_limits = (-60.0, 190.0)
    folder = save_annotations(tmp_path / "ct_boxes", image, widget.boxes_layer(create=False),
                              labels, ["object"])
    (_data, kwargs, kind), *_ = napari_get_reader(str(folder))(str(folder))
    assert kind == "image" and tuple(kwargs["contrast_limits"]) == pytest.approx((-60.0, 190.0))


def test_segment_after_undoing_a_segment_press_segments_again(ct_widget):
    """One undo took back a whole Segment press, but the widget still held the undone
    settings as current, and the next press did nothing."""
    _viewer, widget, _image, labels = ct_widget
    loose = np.asarray(labels.data).copy()
    widget.loose_check.click()  # untick: the tight-box energy
    widget.segment()
    tight = np.asarray(labels.data).copy()
    assert not np.array_equal(tight, loose)
    labels.undo()
    np.testing.assert_array_equal(np.asarray(labels.data), loose)
    widget.segment()  # the settings shown are the tight ones: their masks come back
    np.testing.assert_array_equal(np.asarray(labels.data), tight)


def test_the_unused_default_class_is_not_saved(ct_widget, tmp_path):
    """Boxes all named by hand: the widget's default 'object' had been saved as the first
    class and came back as the class of the next box drawn."""
    import json

    from boxlevelset_napari._export import save_annotations

    _viewer, widget, image, labels = ct_widget
    boxes = widget.boxes_layer(create=False)
    boxes.features["category"] = ["liver", "spine"]
    folder = save_annotations(tmp_path / "named", image, boxes, labels,
                              ["object", "liver", "spine"])
    names = [c["name"] for c in json.loads((folder / "annotations.json").read_text())["categories"]]
    assert names == ["liver", "spine"]


def test_segment_with_nothing_to_do_says_so(ct_widget):
    _viewer, widget, _image, _labels = ct_widget
    widget.segment()
    assert widget.status.text() == "every mask is up to date: nothing to segment"
