"""Box-to-mask widget on volumes and with layers a user changes under it: the propagate
button, renamed layers, napari's own shapes layer over a scaled volume, boxes on slices the
volume lacks, a uint8 Labels layer running out of ids, and the exports of propagated
masks."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import json
import re

import numpy as np
import pytest
from qtpy.QtCore import Qt

from boxlevelset.data import load_box_folder
from boxlevelset.propagate import BAND
from boxlevelset_napari._box_to_mask import METHOD_LEVELSET, BoxToMaskWidget
from boxlevelset_napari._export import export_label_image
from boxlevelset_napari._layers import (
    boxes_layer_kwargs,
    boxes_to_rectangles,
    rectangle_to_box,
    rectangles_to_boxes,
)

pytestmark = pytest.mark.plugin
BOX = (12, 10, 30, 26)  # the bright block of _volume, x0 y0 x1 y1


def _volume() -> np.ndarray:
    """Six noisy slices with a bright block on slices 1-4."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 30, size=(6, 40, 48)).astype(np.uint8)
    volume[1:5, 10:26, 12:30] = 200
    return volume


def _add_box(layer, box, plane=None) -> None:
    layer.add_rectangles(boxes_to_rectangles(np.asarray([box], dtype=float), plane=plane))


def _slices_with(labels, label_id: int) -> list[int]:
    return [z for z in range(labels.data.shape[0]) if (labels.data[z] == label_id).any()]


@pytest.fixture
def volume_widget(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_volume(), name="vol")
    return viewer, BoxToMaskWidget(viewer)


def _walk_setup(volume_widget, box=BOX, plane=2):
    viewer, widget = volume_widget
    boxes = widget.new_boxes_layer()
    _add_box(boxes, box, plane=plane)
    boxes.selected_data = {0}
    return widget, boxes, widget.labels_layer(create=False), int(boxes.features["box_id"][0])


def test_rectangles_to_boxes_is_rectangle_to_box_of_each():
    # All at once (the boxes of a nuclei tile), one by one where the shapes differ.
    rng = np.random.default_rng(0)
    flat = boxes_to_rectangles(rng.uniform(0, 50, (6, 4)).cumsum(1))
    rotated = [r @ np.array([[0.8, 0.6], [-0.6, 0.8]]) for r in flat]
    stacked = boxes_to_rectangles(np.array([[1, 2, 9, 12], [3, 4, 5, 6]], float), plane=7)
    polygon = [rng.uniform(0, 30, (5, 2))]
    for rects in (flat, rotated, stacked, flat + polygon, []):
        got = rectangles_to_boxes(rects)
        want = [rectangle_to_box(r) for r in rects]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert all(np.array_equal(g[1], w[1]) for g, w in zip(got, want))


def test_propagate_button_walks_the_slices(volume_widget, qtbot):
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    assert _slices_with(labels, box_id) == [2]
    # Clicked, not called: Qt once passed the button's checked=False on as max_slices.
    qtbot.mouseClick(widget.propagate_btn, Qt.LeftButton)
    assert _slices_with(labels, box_id) == [1, 2, 3, 4]


def test_propagation_stops_after_the_slices_asked_for(volume_widget, qtbot):
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    assert widget.slices_spin.text() == "all"
    widget.slices_spin.setValue(1)
    qtbot.mouseClick(widget.propagate_btn, Qt.LeftButton)
    assert _slices_with(labels, box_id) == [1, 2, 3]


def test_propagation_carries_the_hand_corrected_mask(volume_widget):
    """A user erases the part of the mask they do not want, then propagates: the slices
    follow the corrected mask, not the one the widget first painted."""
    viewer, widget = volume_widget
    viewer.layers["vol"].data[1:5, 10:26, 30:40] = 200  # a neighbour of the same brightness
    boxes = widget.new_boxes_layer()
    _add_box(boxes, (12, 10, 40, 26), plane=2)
    labels = widget.labels_layer(create=False)
    box_id = int(boxes.features["box_id"][0])
    assert (labels.data[2, 10:26, 30:40] == box_id).all()  # block and neighbour: one mask
    ys, xs = np.nonzero(labels.data[2, :, 30:] == box_id)
    labels.data_setitem((np.full(ys.shape, 2), ys, xs + 30), 0)  # the user erases the neighbour
    widget.hand_combo.setCurrentText("keep")
    boxes.selected_data = {0}
    added = widget.propagate_selected()
    assert added[box_id] == 3
    for z, steps in ((1, 1), (3, 1), (4, 2)):
        mask = labels.data[z] == box_id
        assert mask[10:26, 12:30].mean() > 0.9, z
        # An outline moves at most BAND pixels per slice: the neighbour stays out.
        assert not mask[:, 30 + BAND * steps + 1 :].any(), z


def test_a_shorter_walk_clears_what_a_longer_one_left_and_one_undo_takes_it_back(
        volume_widget):
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    widget.propagate_selected()
    assert _slices_with(labels, box_id) == [1, 2, 3, 4]
    widget.slices_spin.setValue(1)
    widget.propagate_selected()
    assert _slices_with(labels, box_id) == [1, 2, 3]  # slice 4 was left behind before
    assert "1 slice(s) of an earlier, longer walk cleared" in widget.status.text()
    labels.undo()  # the whole second walk, not its last slice
    assert _slices_with(labels, box_id) == [1, 2, 3, 4]


def test_after_undoing_a_walk_the_next_walk_paints_again(volume_widget):
    """Undo left planes the widget had painted empty, which the next walk took for hand
    edits: with 'keep' it painted nothing ever again, with 'ask' it asked three times."""
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    asked = []
    widget.confirm_overwrite = lambda box_id: asked.append(box_id) or False
    widget.propagate_selected()
    labels.undo()
    assert _slices_with(labels, box_id) == [2]
    assert widget.propagate_selected() == {box_id: 3}
    assert _slices_with(labels, box_id) == [1, 2, 3, 4] and asked == []


def test_masks_undo_brings_back_are_not_hand_edits(volume_widget):
    """After an undo restored masks an earlier walk painted, the next walk asked about
    each of them as if edited by hand (a review: 6 dialogs for one real edit)."""
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    widget.propagate_selected()  # slices 1-4
    ys, xs = np.nonzero(labels.data[2, :, 22:] == box_id)
    labels.data_setitem((np.full(ys.shape, 2), ys, xs + 22), 0)  # the user trims the start
    widget.propagate_selected()  # 1, 3, 4 now follow the trimmed start
    assert not (labels.data[1, :, 26:] == box_id).any()
    labels.undo()  # that walk: 1, 3, 4 as the first walk painted them
    assert (labels.data[1, :, 26:] == box_id).any()
    asked = []
    widget.confirm_overwrite = lambda box_id: asked.append(box_id) or True
    widget.propagate_selected()
    assert asked == [] and not (labels.data[1, :, 26:] == box_id).any()


def test_masks_layer_chosen_again_keeps_its_propagated_slices_as_the_widgets(
        volume_widget):
    viewer, widget = volume_widget
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    widget.propagate_selected()
    scratch = viewer.add_labels(np.zeros((6, 40, 48), np.int32), name="scratch")
    widget.labels_combo.select(scratch)
    widget.labels_combo.select(labels)
    asked = []
    widget.confirm_overwrite = lambda box_id: asked.append(box_id) or False
    assert widget.propagate_selected() == {box_id: 3} and asked == []


def test_a_kept_hand_edit_steers_the_rest_of_the_walk(volume_widget):
    viewer, widget = volume_widget
    viewer.layers["vol"].data[1:5, 10:26, 30:40] = 200  # a neighbour of the same brightness
    widget, _boxes, labels, box_id = _walk_setup(volume_widget, box=(12, 10, 40, 26))
    widget.hand_combo.setCurrentText("keep")
    widget.slices_spin.setValue(1)
    widget.propagate_selected()  # block and neighbour on slices 1-3
    assert (labels.data[3, 10:26, 30:40] == box_id).all()
    ys, xs = np.nonzero(labels.data[3, :, 30:] == box_id)
    labels.data_setitem((np.full(ys.shape, 3), ys, xs + 30), 0)  # the user trims slice 3
    widget.slices_spin.setValue(0)
    widget.propagate_selected()
    assert not (labels.data[3, :, 30:] == box_id).any()  # kept
    # Slice 4 is carried from the trimmed slice 3: its outline moves at most BAND px.
    assert not (labels.data[4, :, 30 + BAND + 1 :] == box_id).any()
    assert "1 hand-edited slice(s) kept and carried on from" in widget.status.text()


def test_covered_slices_are_reported(volume_widget):
    widget, _boxes, labels, box_id = _walk_setup(volume_widget)
    ys, xs = np.nonzero(np.ones((40, 48), bool))
    labels.data_setitem((np.full(ys.shape, 3), ys, xs), 50)  # another label fills slice 3
    widget.propagate_selected()
    assert "1 slice(s) where existing labels cover the mask" in widget.status.text()
    assert _slices_with(labels, box_id) == [1, 2, 4]


def test_boxes_without_a_mask_to_carry_are_named(volume_widget):
    widget, boxes, labels, box_id = _walk_setup(volume_widget)
    ys, xs = np.nonzero(labels.data[2] == box_id)
    labels.data_setitem((np.full(ys.shape, 2), ys, xs), 0)  # the user erased the mask
    widget.hand_combo.setCurrentText("keep")
    assert widget.propagate_selected() == {}
    assert f"box {box_id} has no mask on its slice to carry" in widget.status.text()


def test_propagated_masks_keep_their_class_in_both_exports(volume_widget, tmp_path):
    _viewer, widget = volume_widget
    widget.class_combo.addItem("liver")
    widget.class_combo.setCurrentText("liver")
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX, plane=2)
    boxes.selected_data = {0}
    widget.propagate_selected()
    coco = json.loads(widget.export("coco", tmp_path / "masks.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(im["file_name"] for im in coco["images"]) == [
        f"vol_{z:04d}.png" for z in (1, 2, 3, 4)]
    assert {names[a["category_id"]] for a in coco["annotations"]} == {"liver"}
    # The saved box folder holds the propagated slices too, each with the mask's tight box.
    widget.export("folder", tmp_path / "saved")
    folder = load_box_folder(tmp_path / "saved")
    # The stack is saved whole (vol.tif), with an entry per annotated plane.
    assert [(r.file_name, r.plane) for r in folder] == [("vol.tif", z) for z in (1, 2, 3, 4)]
    for record in folder:
        ys, xs = np.nonzero(folder.gt_masks(record)[0])
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        np.testing.assert_array_equal(record.boxes, [BOX if record.plane == 2 else tight])
        assert folder.class_names[int(record.category_ids[0]) - 1] == "liver"


def test_renamed_layers_stay_chosen(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    image = viewer.add_image(_volume()[2], name="slice")
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    labels = widget.labels_layer(create=False)
    labels.name, image.name, boxes.name = "my masks", "my image", "my boxes"
    _add_box(boxes, (2, 2, 8, 8))
    widget.segment()
    assert [layer.name for layer in viewer.layers] == ["my image", "my masks", "my boxes"]
    assert (labels.data == int(boxes.features["box_id"][1])).any()


def test_napari_shapes_layer_over_a_scaled_volume(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_volume(), name="vol", scale=(2.5, 0.8, 0.7), translate=(10, 0, 5))
    widget = BoxToMaskWidget(viewer)
    # napari's own 'new shapes layer' is in world units (scale 1), not image pixels.
    shapes = viewer.add_shapes(ndim=3, name="drawn")
    assert widget.boxes_combo.currentText() == "drawn"
    x0, y0, x1, y1 = BOX
    world = [[2 * 2.5 + 10, y * 0.8, x * 0.7 + 5] for y, x in ((y0, x0), (y0, x1), (y1, x1),
                                                               (y1, x0))]
    # A box drawn with the mouse: napari maps the world position to the layer's data.
    shapes.add_rectangles([np.stack([shapes.world_to_data(v) for v in world])])
    labels = widget.labels_layer(create=False)
    box_id = int(shapes.features["box_id"][0])
    assert _slices_with(labels, box_id) == [2]
    assert (labels.data[2] == box_id).sum() == (_volume()[2] == 200).sum()
    np.testing.assert_allclose(shapes.scale, (2.5, 0.8, 0.7))


def test_box_on_a_slice_the_volume_lacks_is_skipped(volume_widget):
    _viewer, widget = volume_widget
    boxes = widget.new_boxes_layer()
    for plane in (-1, 8):
        _add_box(boxes, BOX, plane=plane)
        assert "box(es) outside the image" in widget.status.text()
    labels = widget.labels_layer(create=False)
    assert labels is None or not labels.data.any()
    # Selected and propagated, or their masks layer switched: a named skip, no IndexError.
    boxes.selected_data = {0, 1}
    assert widget.propagate_selected() == {}
    assert "lies on a slice the volume lacks" in widget.status.text()
    other = widget.viewer.add_labels(np.zeros((6, 40, 48), np.int32), name="other masks")
    widget.labels_combo.select(other)

def test_uint8_labels_layer_widens_instead_of_wrapping(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_volume()[2], name="slice")
    start = np.zeros((40, 48), np.uint8)
    start[0, 0] = 255  # the next id is 256
    labels = viewer.add_labels(start, name="masks")
    widget = BoxToMaskWidget(viewer)
    widget.labels_combo.select(labels)
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    box_id = int(boxes.features["box_id"][0])
    assert box_id == 256
    assert (labels.data == 256).sum() == (_volume()[2] == 200).sum()


def test_class_dropdown_applies_to_a_bound_layer(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_volume()[2], name="slice")
    widget = BoxToMaskWidget(viewer)
    widget.class_combo.addItem("cell")
    widget.class_combo.setCurrentText("cell")
    # A boxes layer whose own default class is another (as a reopened folder's may be).
    other = viewer.add_shapes(None, **boxes_layer_kwargs(default_category="nucleus",
                                                         name="other"))
    assert widget.boxes_combo.currentText() == "other"
    _add_box(other, BOX)
    assert list(other.features["category"]) == ["cell"]


def test_3d_label_export_writes_all_planes_or_none(volume_widget, tmp_path):
    viewer, widget = volume_widget
    labels = viewer.add_labels(np.ones((6, 40, 48), np.int32), name="masks")
    (tmp_path / "l_0003.png").mkdir()  # one plane's file cannot be written
    with pytest.raises(IsADirectoryError, match="l_0003.png"):
        export_label_image(tmp_path / "l.png", labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l_0003.png"]
    (tmp_path / "l_0003.png").rmdir()
    written = export_label_image(tmp_path / "l.png", labels)
    assert [p.name for p in written] == [f"l_{z:04d}.png" for z in range(6)]
    # A wrong suffix names the user's path, not a plane's hidden temporary file.
    for bad, shown in (("x.jpg", "'.jpg'"), ("x", "'(no suffix)'")):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / bad}: ") + ".* not "
                           + re.escape(shown)):
            export_label_image(tmp_path / bad, labels)


def test_float_image_is_saved_as_tiff(make_napari_viewer_proxy, tmp_path):
    viewer = make_napari_viewer_proxy()
    image = _volume()[2].astype(np.float32) * 10.5  # e.g. a deconvolved microscopy image
    viewer.add_image(image, name="float")
    widget = BoxToMaskWidget(viewer)
    _add_box(widget.new_boxes_layer(), BOX)
    widget.export("folder", tmp_path / "saved")
    folder = load_box_folder(tmp_path / "saved")
    assert [r.file_name for r in folder] == ["float.tif"]
    np.testing.assert_array_equal(folder.load_image(folder[0]), image)


def _two_object_slice(viewer) -> BoxToMaskWidget:
    """Slice 2 of the volume with a second bright object at (34, 30, 46, 38), and a widget."""
    image = _volume()[2]
    image[30:38, 34:46] = 200
    viewer.add_image(image, name="slice")
    return BoxToMaskWidget(viewer)


def test_closed_widget_stops_painting(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = _two_object_slice(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Box to mask")
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    labels = widget.labels_layer(create=False)
    assert len(np.unique(labels.data)) == 2
    viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    _add_box(boxes, (34, 30, 46, 38))
    assert len(np.unique(labels.data)) == 2  # no mask for the box drawn after closing
    # A widget opened again takes over the boxes layer and the keys.
    again = BoxToMaskWidget(viewer)
    viewer.window.add_dock_widget(again, name="Box to mask")
    assert again.labels_combo.currentText() == "slice masks"  # not a second masks layer
    again.segment()
    assert len(np.unique(labels.data)) == 3


def test_switching_the_masks_layer_leaves_the_old_one_alone(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    asked = []
    widget.confirm_overwrite = lambda box_id: asked.append(box_id) or False
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    first = widget.labels_layer(create=False)
    before = first.data.copy()
    second = viewer.add_labels(np.zeros_like(first.data), name="second")
    widget.labels_combo.select(second)
    _add_box(boxes, (34, 30, 46, 38))  # live: both boxes now get masks in the new layer
    assert len(np.unique(second.data)) == 3
    boxes.selected_data = {0}
    boxes.remove_selected()  # its mask goes from the new layer, the old layer is the user's
    assert asked == [] and np.array_equal(first.data, before)
    assert not (second.data == int(before.max())).any() and len(np.unique(second.data)) == 2


def test_status_says_what_happened_to_each_box(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    assert widget.status.text() == "1 mask(s) updated"
    # A box inside the first one's mask (a darker speck in it, so that the box is not flat:
    # a flat box inside a uniform object finds no object): existing labels win, so it gets
    # no pixels. It was reported as "1 mask(s) updated".
    viewer.layers["slice"].data[18, 21] = 120
    _add_box(boxes, (16, 14, 26, 22))
    assert "0 mask(s) updated; 1 box(es) got no pixels" in widget.status.text()
    assert f"tick '{widget.overwrite_check.text()}'" in widget.status.text()
    boxes.selected_data = {1}
    boxes.remove_selected()
    assert widget.status.text() == "1 box(es) removed"
    # A box whose mask lies mostly under the first one's keeps a sliver: said so. It was
    # reported as a plain update (a review: a vertebra kept 368 of its 6,332 pixels).
    _add_box(boxes, (14, 12, 34, 28))
    assert ("1 mask(s) updated; 1 box(es) kept less than half their mask"
            in widget.status.text())


def test_segment_redoes_boxes_made_with_other_settings(make_napari_viewer_proxy, monkeypatch):
    from boxlevelset_napari import _box_to_mask as B

    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    calls = []
    real = widget.masks_for
    monkeypatch.setattr(widget, "masks_for", lambda *a, **k: calls.append(a) or real(*a, **k))
    widget.segment()
    assert calls == []  # nothing changed: nothing to redo
    widget.method_combo.setCurrentText(B.METHOD_LEVELSET_CUT)
    _add_box(boxes, (34, 30, 46, 38))  # live: the new box only, the first mask stays
    assert len(calls) == 1 and len(calls[0][1]) == 1
    widget.segment()  # the first box's mask was made by the other method: redone
    assert len(calls) == 2 and len(calls[1][1]) == 1
    widget.loose_check.setChecked(True)
    widget.segment()
    assert len(calls) == 3 and len(calls[2][1]) == 2


def test_choosing_a_class_while_drawing_is_for_the_next_box(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    widget.class_combo.addItem("nucleus")
    widget.class_combo.addItem("cell")
    widget.class_combo.setCurrentText("nucleus")
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    boxes.selected_data = {0}  # as napari leaves a box just drawn
    widget.class_combo.setCurrentText("cell")  # for the next box
    _add_box(boxes, (34, 30, 46, 38))
    assert list(boxes.features["category"]) == ["nucleus", "cell"]
    boxes.mode = "select"  # picked on purpose: relabelled
    boxes.selected_data = {0}
    widget.class_combo.setCurrentText("cell")
    widget.class_combo.setCurrentText("nucleus")
    assert list(boxes.features["category"]) == ["nucleus", "cell"]
    boxes.selected_data = {1}
    widget.class_combo.setCurrentText("cell")
    widget.class_combo.setCurrentText("nucleus")
    assert list(boxes.features["category"]) == ["nucleus", "nucleus"]


def test_first_model_box_says_features_are_being_computed(make_napari_viewer_proxy,
                                                           monkeypatch):
    from test_model import tiny_model

    from boxlevelset.model import Predictor
    from boxlevelset_napari import _box_to_mask as B

    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    widget.set_model(tiny_model())
    widget.method_combo.setCurrentText(B.METHOD_MODEL)
    shown = []
    real = Predictor.set_image
    monkeypatch.setattr(Predictor, "set_image",
                        lambda self, *a, **k: shown.append(widget.status.text())
                        or real(self, *a, **k))
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    _add_box(boxes, (34, 30, 46, 38))  # same image: features are reused, no second pass
    assert shown == ["computing the model's features for this image…"]


def test_segment_everything_leaves_out_what_is_already_labelled(make_napari_viewer_proxy):
    """Proposals on labelled pixels had been added as boxes with empty masks (every run
    again), and counted as instances. The model is a stand-in returning fixed proposals:
    the widget's handling is under test here, the model's in test_model.py."""
    from types import SimpleNamespace

    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    first = np.zeros((40, 48), bool)
    first[10:26, 12:30] = True
    second = np.zeros((40, 48), bool)
    second[30:38, 34:46] = True
    overlapping = first.copy()
    overlapping[8:12, 12:30] = True  # mostly on the first object: a duplicate
    proposals = SimpleNamespace(masks=np.stack([first, overlapping, second]),
                                labels=np.array([0, 0, 0]), scores=np.array([0.9, 0.8, 0.7]))
    widget.model = SimpleNamespace(config=SimpleNamespace(class_names=["blob"]))
    widget._predictor_for = lambda image, plane: SimpleNamespace(
        predict=lambda score_threshold, cropped=False: proposals)  # whole masks either way
    assert widget.segment_everything() == 2
    labels, boxes = widget.labels_layer(create=False), widget.boxes_layer(create=False)
    ids = boxes.features["box_id"].to_numpy()
    assert len(ids) == 2 and all((labels.data == i).sum() > 90 for i in ids)
    assert "1 left out: already labelled" in widget.status.text()
    assert widget.segment_everything() == 0 and len(boxes.data) == 2
    assert "3 left out: already labelled" in widget.status.text()


def test_segment_everything_in_tiles_finds_each_object_once(make_napari_viewer_proxy, qtbot):
    """A mosaic larger than the model's input, in tiles, in a worker thread: each object
    once, whole, though many lie across tile sides. The model is a stand-in that finds
    bright blobs (the merging is checked against a whole-image reference in
    test_tiles.py)."""
    from scipy import ndimage
    from test_tiles import ComponentModel, blob_image
    from types import SimpleNamespace

    viewer = make_napari_viewer_proxy()
    image = blob_image(150, 170, radius=8)
    viewer.add_image(image, name="mosaic")
    widget = BoxToMaskWidget(viewer)
    model = ComponentModel()
    model.config = SimpleNamespace(class_names=["blob"])
    widget.set_model(model)
    widget.score_slider.setValue(10)
    widget.tile_spin.setValue(64)
    shown = []
    widget.tiles_done.connect(lambda done, total: shown.append((done, total)))
    widget.everything_btn.click()
    # The tiles run in a thread: the button waits, the status line counts the tiles.
    assert widget.everything_worker is not None and not widget.everything_btn.isEnabled()
    qtbot.waitUntil(lambda: widget.everything_worker is None, timeout=20_000)
    assert widget.everything_btn.isEnabled()
    assert shown == [(k, 12) for k in range(1, 13)]
    truth, n = ndimage.label(image > 0, structure=np.ones((3, 3)))
    assert len(model.calls) == 12 and n > 30  # 3 x 4 tiles of 64 px, 16 px or more shared
    labels, boxes = widget.labels_layer(create=False), widget.boxes_layer(create=False)
    assert len(boxes.data) == n
    assert f"segment everything: {n} instance(s)" in widget.status.text()
    # Every blob is one label, whole.
    pairs = {(int(a), int(b)) for a, b in zip(truth.ravel(), labels.data.ravel()) if a or b}
    assert len(pairs) == n and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == n


def test_segment_everything_adds_nothing_when_the_image_changed_meanwhile(
        make_napari_viewer_proxy, qtbot):
    """The tiles' instances belong to the image they ran on: picked another image while
    they ran, the widget adds none (they would land on the other image's layers)."""
    import threading
    from types import SimpleNamespace

    from test_tiles import ComponentModel, blob_image

    viewer = make_napari_viewer_proxy()
    viewer.add_image(blob_image(150, 170, radius=8), name="mosaic")
    viewer.add_image(np.zeros((150, 170), np.uint8), name="other")
    widget = BoxToMaskWidget(viewer)
    widget.image_combo.select(viewer.layers["mosaic"])
    gate = threading.Event()
    model = ComponentModel()
    real = model.predict
    model.predict = lambda *a, **k: gate.wait(10) and real(*a, **k)
    model.config = SimpleNamespace(class_names=["blob"])
    widget.set_model(model)
    widget.tile_spin.setValue(64)
    widget.everything_btn.click()
    widget.image_combo.select(viewer.layers["other"])
    gate.set()
    qtbot.waitUntil(lambda: widget.everything_worker is None, timeout=20_000)
    assert "changed while the tiles ran; nothing added" in widget.status.text()
    assert not any(layer.name.endswith("boxes") and len(layer.data) for layer in viewer.layers)


def test_model_boxes_in_tiles_are_prompted_on_their_tile(make_napari_viewer_proxy):
    """With *Model tiles* set, a drawn box is prompted on the tile that holds it (each
    tile's features computed once), as boxlevelset.tiles.TiledPredictor does."""
    from test_model import disk_scene, fit_disk_model

    from boxlevelset.model import Predictor
    from boxlevelset.tiles import TiledPredictor
    from boxlevelset_napari import _box_to_mask as B

    viewer = make_napari_viewer_proxy()
    image = np.tile(disk_scene()[0], (2, 3))  # six disks on 288 x 192 pixels
    viewer.add_image(image, name="mosaic")
    widget = BoxToMaskWidget(viewer)
    model = fit_disk_model()[0]
    widget.set_model(model)
    widget.method_combo.setCurrentText(B.METHOD_MODEL)
    widget.tile_spin.setValue(96)
    boxes = widget.new_boxes_layer()
    box = (122, 26, 166, 70)  # the second disk of the top row
    _add_box(boxes, box)
    labels = widget.labels_layer(create=False)
    want = TiledPredictor(model, 96).set_image(image).predict_boxes(np.array([box], float))[0]
    whole = Predictor(model).set_image(image).predict_boxes(np.array([box], float))[0]
    assert want.sum() > 1000 and not np.array_equal(want, whole)  # the tile's, not the whole's
    np.testing.assert_array_equal(labels.data != 0, want)
    assert isinstance(widget._predictor, TiledPredictor) and len(widget._predictor._tiles) == 1
    # Back to the whole image: the next box is prompted on it.
    widget.tile_spin.setValue(0)
    _add_box(boxes, (26, 122, 70, 166))
    assert type(widget._predictor) is Predictor


def test_a_loaded_model_brings_its_classes_in_place_of_the_unused_default(
        make_napari_viewer_proxy):
    """The dropdown had stayed on 'object': drawn boxes got 'object', Segment everything the
    model's class, and a saved folder held both."""
    from types import SimpleNamespace

    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    boxes = widget.new_boxes_layer()
    widget.set_model(SimpleNamespace(config=SimpleNamespace(class_names=["nucleus", "debris"])))
    assert widget.class_names == ["nucleus", "debris"] and widget.category == "nucleus"
    widget.method_combo.setCurrentText(METHOD_LEVELSET)
    _add_box(boxes, BOX)
    assert list(boxes.features["category"]) == ["nucleus"]
    # Once 'object' is in use, loading a model keeps it and adds the model's classes.
    other = _two_object_slice(make_napari_viewer_proxy())
    other_boxes = other.new_boxes_layer()
    _add_box(other_boxes, BOX)
    other.set_model(SimpleNamespace(config=SimpleNamespace(class_names=["nucleus"])))
    assert other.class_names == ["object", "nucleus"] and other.category == "object"


def test_a_box_moved_to_another_slice_takes_its_mask_along(volume_widget):
    """A box moved to another slice through the API kept its mask on the old slice as well:
    two masks of one box, the old one matching no box."""
    viewer, widget = volume_widget
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX, plane=2)
    labels = widget.labels_layer(create=False)
    box_id = int(boxes.features["box_id"][0])
    assert _slices_with(labels, box_id) == [2]
    boxes.data = [boxes_to_rectangles(np.asarray([BOX], dtype=float), plane=3)[0]]
    assert _slices_with(labels, box_id) == [3]

    # A hand edit on the old slice is the user's: with 'keep' it stays where it is.
    labels.data_setitem(np.nonzero(labels.data == box_id), 0)  # clear, then paint by hand
    labels.data_setitem((np.full(4, 3), np.arange(12, 16), np.full(4, 14)), box_id)
    widget.hand_combo.setCurrentText("keep")
    boxes.data = [boxes_to_rectangles(np.asarray([BOX], dtype=float), plane=1)[0]]
    assert _slices_with(labels, box_id) == [1, 3]


def test_one_undo_takes_back_the_segment_press_after_a_model_is_loaded(
        make_napari_viewer_proxy):
    """Loading a model (as a fine-tune's end does) switches the method to Model; the next
    Segment redoes every box with the model, and one undo brings all level-set masks back."""
    from test_model import tiny_model

    viewer = make_napari_viewer_proxy()
    widget = _two_object_slice(viewer)
    boxes = widget.new_boxes_layer()
    _add_box(boxes, BOX)
    _add_box(boxes, (34, 30, 46, 38))
    labels = widget.labels_layer(create=False)
    levelset = np.array(labels.data)
    widget.set_model(tiny_model())
    widget.segment()
    assert not np.array_equal(labels.data, levelset)  # an untrained model's masks differ
    labels.undo()
    assert np.array_equal(labels.data, levelset)
    # The undone boxes are not hand edits: Segment redoes them with the model, unasked.
    widget.confirm_overwrite = lambda _bid: pytest.fail("asked about the widget's own mask")
    widget.hand_combo.setCurrentText("ask")
    widget.segment()
    assert not np.array_equal(labels.data, levelset)


def test_a_propagated_box_moved_to_another_slice_leaves_no_hole_in_its_walk(volume_widget):
    """Moving the drawn box of a propagated object to another slice erased the mask it
    left: a hole in the middle of the walk's slices. The walk's slices stay whole; the
    slice it moves to gets its new mask."""
    widget, boxes, labels, box_id = _walk_setup(volume_widget)
    widget.propagate_selected()
    assert _slices_with(labels, box_id) == [1, 2, 3, 4]
    boxes.data = [boxes_to_rectangles(np.asarray([BOX], dtype=float), plane=3)[0]]
    assert _slices_with(labels, box_id) == [1, 2, 3, 4]
