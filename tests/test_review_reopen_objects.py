"""Save annotations -> reopen: only the slices of one stack or volume make one object. A
folder of separate images is stacked by the reader one image a plane, but a label id that
turns up on two of its images (napari's paint brush keeps its label from one image to the
next) is two objects, not one object spanning photographs."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import numpy as np
import pytest
from napari.layers import Layer

from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._layers import boxes_to_rectangles, rectangle_to_box
from boxlevelset_napari._reader import napari_get_reader

pytestmark = pytest.mark.plugin


def _open(path) -> list:
    """The reader's layers as image, boxes, masks."""
    layer_data = napari_get_reader(str(path))(str(path))
    layer_data = sorted(layer_data, key=lambda d: {"image": 0, "shapes": 1}.get(d[2], 2))
    return [Layer.create(data, dict(kwargs), kind) for data, kwargs, kind in layer_data]


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 40, (height, width)).astype(np.uint8)
    image[8:24, 10:30] = 200
    return image


def test_one_label_on_two_separate_images_reopens_as_two_objects(tmp_path,
                                                                 make_napari_viewer_proxy):
    """A mask painted by hand on image b with the label of image a's box (1, napari's
    first label) had reopened as part of a's box: no box of its own on b, and deleting a's
    box then erased b's hand-painted mask."""
    from boxlevelset.data import save_box_folder

    (tmp_path / "f").mkdir()
    items = [("a.png", _picture(40, 48, 0), np.zeros((0, 4)), np.zeros(0, int), None),
             ("b.png", _picture(36, 44, 1), np.zeros((0, 4)), np.zeros(0, int), None)]
    save_box_folder(tmp_path / "f", items, [{"id": 1, "name": "cell"}])
    viewer = make_napari_viewer_proxy()
    for layer in _open(tmp_path / "f"):
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    widget.hand_combo.setCurrentText("keep")
    boxes = widget.boxes_layer(create=False)
    boxes.add_rectangles(boxes_to_rectangles(np.array([[10.0, 8.0, 30.0, 24.0]]), plane=0))
    labels = widget.labels_layer(create=False)
    box_id = int(boxes.features["box_id"][0])
    assert box_id == 1 and labels.data[0].any()
    labels.data[1, 10:20, 12:26] = box_id  # painted by hand on b with the same label
    saved = widget.export("folder", str(tmp_path / "saved"))

    image, again_boxes, again_labels = _open(saved)
    assert image.data.shape[0] == 2
    assert sorted(rectangle_to_box(r)[0] for r in again_boxes.data) == [0, 1]  # one each
    on_a, on_b = (set(np.unique(again_labels.data[z])) - {0} for z in (0, 1))
    assert len(on_a) == len(on_b) == 1 and on_a != on_b  # two objects, two labels

    # Deleting a's box leaves b's mask alone.
    viewer2 = make_napari_viewer_proxy()
    for layer in (image, again_boxes, again_labels):
        viewer2.add_layer(layer)
    widget2 = BoxToMaskWidget(viewer2)
    widget2.hand_combo.setCurrentText("keep")
    b_mask = again_labels.data[1].copy()
    a_index = next(i for i, r in enumerate(again_boxes.data) if rectangle_to_box(r)[0] == 0)
    again_boxes.selected_data = {a_index}
    again_boxes.remove_selected()
    assert np.array_equal(again_labels.data[1], b_mask)
