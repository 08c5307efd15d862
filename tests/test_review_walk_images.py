"""Walk-through review: two images in one viewer, driven from the widget's combos."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import numpy as np
import pytest

from test_review_plugin import _blob_image

from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._layers import boxes_to_rectangles

pytestmark = pytest.mark.plugin


def _two_images_with_a_box_each(viewer):
    """Images a and b, each with one box segmented; b chosen last."""
    viewer.add_image(_blob_image(0), name="a")
    viewer.add_image(_blob_image(1), name="b")
    widget = BoxToMaskWidget(viewer)
    for name in ("a", "b"):
        widget.image_combo.setCurrentText(name)
        boxes = widget.boxes_layer()
        boxes.add_rectangles(boxes_to_rectangles(np.array([[14.0, 12, 38, 36]])))
    return widget


def test_picking_another_images_boxes_picks_that_image(make_napari_viewer_proxy):
    """With image b chosen, picking 'a boxes' in the Boxes combo kept b as the image: Segment
    then segmented a's boxes on b's pixels and painted them into 'b masks'. The image (and
    its masks layer) now follows the boxes layer."""
    viewer = make_napari_viewer_proxy()
    widget = _two_images_with_a_box_each(viewer)
    masks_a, masks_b = viewer.layers["a masks"], viewer.layers["b masks"]
    before_a, before_b = np.array(masks_a.data), np.array(masks_b.data)

    widget.boxes_combo.setCurrentText("a boxes")
    assert widget.image_combo.currentText() == "a"
    assert widget.labels_combo.currentText() == "a masks"
    widget.segment()
    assert np.array_equal(masks_b.data, before_b)  # nothing of a's painted on b
    assert np.array_equal(masks_a.data, before_a)


def test_picking_an_image_makes_its_boxes_layer_active(make_napari_viewer_proxy):
    """Choosing image a again selected 'a boxes' in the widget but left 'b boxes' active in
    the layer list: the next box drawn went into b's layer, which the widget no longer
    listened to, and got no mask."""
    viewer = make_napari_viewer_proxy()
    widget = _two_images_with_a_box_each(viewer)
    assert viewer.layers.selection.active.name == "b boxes"
    widget.image_combo.setCurrentText("a")
    assert viewer.layers.selection.active.name == "a boxes"


def test_deleting_the_image_leaves_its_masks_to_it(make_napari_viewer_proxy):
    """Deleting image a moved the widget to b (same size) with a new 'b boxes', but kept
    'a masks' as the masks layer (no image named a was left to tell whose it was): b's
    masks were painted among a's."""
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_blob_image(1), name="b")
    viewer.add_image(_blob_image(0), name="a")
    widget = BoxToMaskWidget(viewer)
    widget.image_combo.setCurrentText("a")
    widget.boxes_layer().add_rectangles(boxes_to_rectangles(np.array([[14.0, 12, 38, 36]])))
    masks_a = viewer.layers["a masks"]
    before = np.array(masks_a.data)
    viewer.layers.remove("a")
    assert widget.image_combo.currentText() == "b"
    widget.boxes_layer().add_rectangles(boxes_to_rectangles(np.array([[14.0, 12, 38, 36]])))
    assert np.array_equal(masks_a.data, before)
    assert widget.labels_combo.currentText() == "b masks"


def test_the_ct_samples_boxes_belong_to_its_image(make_napari_viewer_proxy):
    """The CT sample named its boxes 'ct boxes' beside the image 'ct_slice': nothing told
    they were that image's, so choosing a second image kept the widget on them and Segment
    painted the CT's boxes onto the other image."""
    viewer = make_napari_viewer_proxy()
    viewer.open_sample("boxlevelset-napari", "ct_slice")
    widget = BoxToMaskWidget(viewer)
    assert widget.boxes_combo.currentText() == "ct_slice boxes"
    viewer.add_image(np.zeros(viewer.layers["ct_slice"].data.shape, np.float32), name="other")
    widget.image_combo.setCurrentText("other")
    assert widget.boxes_combo.currentText() == "other boxes"
