"""Review of the plugin as users drive it: a second image in the same viewer, relabelling
boxes from the class dropdown, fine-tune progress events around the run's end."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

from types import SimpleNamespace

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._finetune import FineTuneWidget
from boxlevelset_napari._layers import boxes_to_rectangles

pytestmark = pytest.mark.plugin


def _blob_image(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 30, size=(size, size)).astype(np.uint8)
    image[14:34, 16:36] = 210
    return image


def _add_box(layer, box) -> None:
    layer.add_rectangles(boxes_to_rectangles(np.asarray([box], dtype=float)))


def _image_a_with_a_mask(viewer):
    """Image 'a' with one box segmented: (widget, a's boxes, a's masks, a copy of them)."""
    viewer.add_image(_blob_image(0), name="a")
    widget = BoxToMaskWidget(viewer)
    boxes_a = widget.new_boxes_layer()
    _add_box(boxes_a, (14, 12, 38, 36))
    masks_a = widget.labels_layer(create=False)
    return widget, boxes_a, masks_a, np.array(masks_a.data)


def test_a_second_image_gets_its_own_masks_layer(make_napari_viewer_proxy):
    """Choosing a second image (same size) and pressing New had painted its masks into the
    first image's masks layer; choosing the first image again brings back its layers."""
    viewer = make_napari_viewer_proxy()
    widget, boxes_a, masks_a, before = _image_a_with_a_mask(viewer)
    assert before.any()

    viewer.add_image(_blob_image(1), name="b")
    widget.image_combo.setCurrentText("b")
    boxes_b = widget.new_boxes_layer()
    _add_box(boxes_b, (14, 12, 38, 36))
    masks_b = widget.labels_layer(create=False)
    assert masks_b.name == "b masks"
    assert (masks_b.data == int(boxes_b.features["box_id"][0])).any()
    assert np.array_equal(masks_a.data, before)  # a's masks untouched

    widget.image_combo.setCurrentText("a")
    assert widget.boxes_combo.currentText() == "a boxes"
    assert widget.labels_combo.currentText() == "a masks"


def test_a_second_image_of_another_size_does_not_fail(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_blob_image(0), name="a")
    widget = BoxToMaskWidget(viewer)
    _add_box(widget.new_boxes_layer(), (14, 12, 38, 36))
    viewer.add_image(np.dstack([_blob_image(2, 80)] * 3), name="photo", rgb=True)
    widget.image_combo.setCurrentText("photo")
    boxes = widget.new_boxes_layer()
    _add_box(boxes, (14, 12, 38, 36))  # raised "mask shape (80, 80) does not match labels"
    masks = widget.labels_layer(create=False)
    assert masks.data.shape == (80, 80)
    assert (masks.data == int(boxes.features["box_id"][0])).any()


def test_picking_the_shown_class_relabels_the_selected_boxes(make_napari_viewer_proxy):
    """Select boxes, pick the class the dropdown already shows: they take it (the text did
    not change, so nothing happened)."""
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_blob_image(0), name="img")
    widget = BoxToMaskWidget(viewer)
    widget.class_combo.addItems(["cell", "debris"])
    boxes = widget.new_boxes_layer()
    widget.class_combo.setCurrentText("cell")
    _add_box(boxes, (14, 12, 38, 36))
    widget.class_combo.setCurrentText("debris")  # for the next box, while drawing
    _add_box(boxes, (40, 40, 60, 60))
    assert list(boxes.features["category"]) == ["cell", "debris"]

    boxes.mode = "select"
    boxes.selected_data = {0}
    widget.class_combo.activated.emit(widget.class_combo.findText("debris"))  # the user's pick
    assert list(boxes.features["category"]) == ["debris", "debris"]


def test_training_events_around_the_end_of_the_run(make_napari_viewer):
    """napari's progress bar runs Qt's event loop while it updates: the run's end, handled
    in there, closed the bar under _on_event (AttributeError in a Qt slot, which aborts a
    PyQt5 app), and a late event opened a bar nobody closed."""
    viewer = make_napari_viewer()
    tune = FineTuneWidget(viewer)
    tune.worker = object()  # a run in progress

    def event(iteration: int) -> SimpleNamespace:
        return SimpleNamespace(iteration=iteration, max_iterations=10, epoch=0, lr=1e-3,
                               losses={"loss": 1.0 / iteration}, eta_seconds=5.0)

    tune._on_event(event(1))
    shown = []
    tune._progress.events.value.connect(lambda e: shown.append(e.value))
    tune._on_event(event(2))
    assert shown and shown[-1] == 2  # the bar's value moves, not only its text
    QTimer.singleShot(0, tune._on_finished)  # the run ends while the bar updates
    tune._on_event(event(3))
    assert tune._progress is None and tune.worker is None
    tune._on_event(event(4))  # a late event: no new bar
    assert tune._progress is None
    assert len(tune.plot.values) == 4


def test_segmenting_many_boxes_keeps_no_plane_per_box(make_napari_viewer_proxy):
    """Each box kept a whole-plane copy of its mask (4 MB a box at 2000x2000: 1 GB for 250
    nuclei), and every box's painting worked on the whole plane."""
    import tracemalloc

    viewer = make_napari_viewer_proxy()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 30, size=(1000, 1000)).astype(np.uint8)
    boxes_xyxy = []
    for k in range(30):
        y, x = 40 + 150 * (k // 6), 40 + 150 * (k % 6)
        image[y + 4:y + 20, x + 4:x + 20] = 220
        boxes_xyxy.append((x, y, x + 24, y + 24))
    viewer.add_image(image, name="big")
    widget = BoxToMaskWidget(viewer)
    widget.live_check.setChecked(False)
    boxes = widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.asarray(boxes_xyxy, dtype=float)))
    widget.labels_layer(create=True)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    widget.segment()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    labels = widget.labels_layer(create=False)
    ids = boxes.features["box_id"].to_numpy()
    assert all((labels.data == i).sum() > 100 for i in ids)
    assert kept < 10e6, f"{kept / 1e6:.0f} MB kept for 30 boxes"  # was 30 MB, a plane a box
    # A moved box's mask still follows it, and a hand edit is still seen as one.
    widget.hand_combo.setCurrentText("keep")
    data = [np.asarray(d) for d in boxes.data]
    data[0] = data[0] + 2
    boxes.data = data
    first = labels.data == ids[0]
    assert first.any() and not first[:42, :].any()
    labels.data_setitem(np.nonzero(labels.data == ids[1]), 0)
    labels.data_setitem((np.array([45]), np.array([195])), int(ids[1]))
    edited = labels.data.copy()
    data[1] = data[1] + 2
    boxes.data = data
    assert np.array_equal(labels.data, edited)  # "keep": the edit stays


def test_choosing_an_image_without_boxes_gives_it_its_own_boxes_layer(
        make_napari_viewer_proxy):
    """Choosing image b kept the widget on 'a boxes': a box drawn next was segmented on b
    (and painted into b's masks) although it sat in a's layer. b now gets 'b boxes', active
    for drawing, and a's boxes and masks stay as they were."""
    viewer = make_napari_viewer_proxy()
    widget, boxes_a, masks_a, before = _image_a_with_a_mask(viewer)

    viewer.add_image(_blob_image(1), name="b")
    widget.image_combo.setCurrentText("b")
    assert widget.boxes_combo.currentText() == "b boxes"
    boxes_b = widget.boxes_layer(create=False)
    assert viewer.layers.selection.active.name == "b boxes"
    assert boxes_b.mode == "add_rectangle"
    _add_box(boxes_b, (14, 12, 38, 36))
    assert widget.labels_combo.currentText() == "b masks"
    assert np.array_equal(masks_a.data, before)
    assert len(boxes_a.data) == 1

    # A boxes layer that belongs to no image (napari's own 'Shapes') is kept on a switch.
    shapes = viewer.add_shapes(name="Shapes", ndim=2)
    widget.boxes_combo.select(shapes)
    widget.image_combo.setCurrentText("a")
    assert widget.boxes_combo.currentText() == "a boxes"
    widget.boxes_combo.select(shapes)
    viewer.add_image(_blob_image(2), name="c")
    widget.image_combo.setCurrentText("c")
    assert widget.boxes_combo.currentText() == "Shapes"


def test_deleting_the_image_leaves_its_boxes_to_it(make_napari_viewer_proxy):
    """Deleting image a moved the widget to image b but kept it on 'a boxes' (no image of
    that name was left to tell whose they were): b's boxes went into a's layer."""
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_blob_image(1), name="b")
    viewer.add_image(_blob_image(0), name="a")
    widget = BoxToMaskWidget(viewer)
    widget.image_combo.setCurrentText("a")
    _add_box(widget.new_boxes_layer(), (14, 12, 38, 36))
    viewer.layers.remove("a")
    assert widget.image_combo.currentText() == "b"
    assert widget.boxes_combo.currentText() == "b boxes"
