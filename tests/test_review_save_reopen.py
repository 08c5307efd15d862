"""Save annotations, then open the folder again: it comes back as it was saved (a 2D image
as 2D, a stack's planes at their own z and scale, a propagated CT box as one object)."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from napari.layers import Layer
from test_plugin_io import _write_ct

from boxlevelset.data import load_box_folder
from boxlevelset.export import read_coco_masks
from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._layers import boxes_to_rectangles, rectangle_to_box
from boxlevelset_napari._reader import napari_get_reader

pytestmark = pytest.mark.plugin


def _open(path: Path) -> list:
    """The reader's layers as image, boxes, masks (it hands the boxes over last, on top)."""
    layer_data = napari_get_reader(str(path))(str(path))
    if len(layer_data) > 1:  # a folder: boxes above the masks, active for drawing
        assert layer_data[-1][2] == "shapes"
    layer_data = sorted(layer_data, key=lambda d: {"image": 0, "shapes": 1}.get(d[2], 2))
    return [Layer.create(data, dict(kwargs), kind) for data, kwargs, kind in layer_data]


def _objects(labels: np.ndarray) -> set[bytes]:
    """Each label's pixels (over all planes), whatever its id: equal sets = same objects."""
    labels = np.asarray(labels)
    return {(labels == v).tobytes() for v in np.unique(labels) if v != 0}


def _scene(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, size=shape).astype(np.uint8)
    image[..., 10:26, 12:30] = 200
    return image


def test_a_saved_2d_image_reopens_as_2d(tmp_path, make_napari_viewer_proxy):
    """It had come back as a one-plane stack (1, H, W) with 3D boxes and masks; and, at the
    world origin, where the image had been moved (translate) elsewhere."""
    viewer = make_napari_viewer_proxy()
    image = viewer.add_image(_scene((40, 48)), name="photo", scale=(0.5, 0.5),
                             translate=(3.0, -2.0))
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.array([[10.0, 8.0, 32.0, 28.0]])))
    labels = widget.labels_layer(create=False)
    assert labels.data.any()
    saved = widget.export("folder", str(tmp_path / "saved"))

    again, again_boxes, again_labels = _open(saved)
    assert again.data.shape == image.data.shape and again.ndim == 2
    assert np.array_equal(again.data, image.data)
    assert again_boxes.ndim == 2 and again_labels.data.shape == labels.data.shape
    assert _objects(again_labels.data) == _objects(labels.data)
    assert tuple(again.scale) == tuple(again_boxes.scale) == tuple(again_labels.scale) == \
        pytest.approx((0.5, 0.5))
    assert tuple(again.translate) == tuple(again_boxes.translate) == \
        tuple(again_labels.translate) == pytest.approx((3.0, -2.0))
    assert np.allclose(rectangle_to_box(again_boxes.data[0])[1], [10, 8, 32, 28])

    # Reopened, annotated further and saved again: still one 2D image.
    viewer2 = make_napari_viewer_proxy()
    for layer in (again, again_boxes, again_labels):
        viewer2.add_layer(layer)
    widget2 = BoxToMaskWidget(viewer2)
    widget2.hand_combo.setCurrentText("keep")
    again_boxes.add_rectangles(boxes_to_rectangles(np.array([[34.0, 2.0, 46.0, 9.0]])))
    resaved = widget2.export("folder", str(tmp_path / "resaved"))
    third, third_boxes, _ = _open(resaved)
    assert third.data.shape == image.data.shape and len(third_boxes.data) == 2


def test_folders_of_several_images_still_open_stacked(tmp_path, tiny_box_folder,
                                                      make_napari_viewer_proxy):
    image, boxes, labels = _open(tiny_box_folder)
    assert image.data.shape == (3, 64, 64, 3)  # made by hand: a stack, plane = image
    viewer = make_napari_viewer_proxy()
    for layer in (image, boxes, labels):
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    widget.hand_combo.setCurrentText("keep")
    saved = widget.export("folder", str(tmp_path / "saved"))
    coco = json.loads((saved / "annotations.json").read_text())
    assert all("plane" not in im for im in coco["images"])  # separate images, no z
    again, again_boxes, again_labels = _open(saved)
    assert again.data.shape == (3, 64, 64, 3)
    assert np.array_equal(again.data, image.data)
    assert _objects(again_labels.data) == _objects(labels.data)


def test_a_saved_stack_keeps_its_planes_and_scale(tmp_path, make_napari_viewer_proxy):
    """Planes 1 and 3 of a five-plane z-stack had come back as planes 0 and 1 of a
    two-plane stack with scale 1; then at their own z, but the planes that were not
    annotated came back empty: the folder kept only the annotated planes' pixels."""
    tifffile.imwrite(tmp_path / "cells.tif", _scene((5, 40, 48)).astype(np.uint16) * 300,
                     photometric="minisblack")
    (data, kwargs, kind), = napari_get_reader(str(tmp_path / "cells.tif"))(
        str(tmp_path / "cells.tif"))
    viewer = make_napari_viewer_proxy()
    viewer.add_image(data, **{**kwargs, "scale": (2.0, 0.5, 0.5)})
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.array([[12.0, 10.0, 30.0, 26.0]]), plane=1))
    boxes.add_rectangles(boxes_to_rectangles(np.array([[11.0, 9.0, 31.0, 27.0]]), plane=3))
    labels = widget.labels_layer(create=False)
    assert [bool(labels.data[z].any()) for z in range(5)] == [False, True, False, True, False]
    saved = widget.export("folder", str(tmp_path / "saved"))
    # The stack is saved whole, once, in its own type; an entry per annotated plane.
    assert [p.name for p in (saved / "images").iterdir()] == ["cells.tif"]
    written = tifffile.imread(saved / "images" / "cells.tif")
    assert written.dtype == np.uint16 and np.array_equal(written, data)
    folder = load_box_folder(saved)  # what training reads: the two annotated planes
    assert [len(r.boxes) for r in folder.records] == [1, 1]
    assert [r.plane for r in folder.records] == [1, 3]
    for record in folder.records:  # each entry's image is its plane, as it is (no window)
        assert np.array_equal(folder.load_image(record), data[record.plane])

    again, again_boxes, again_labels = _open(saved)
    assert again.data.shape == (5, 40, 48)
    for z in range(5):  # every plane, annotated or not, with its pixels
        assert np.array_equal(again.data[z], data[z]), z
    assert sorted(rectangle_to_box(r)[0] for r in again_boxes.data) == [1, 3]
    assert _objects(again_labels.data) == _objects(labels.data)
    for layer in (again, again_boxes, again_labels):
        assert tuple(layer.scale) == pytest.approx((2.0, 0.5, 0.5))

    # Reopened, annotated on one more plane and saved again over the folder it came from:
    # the stack once, every annotated plane's entry, nothing lost.
    viewer2 = make_napari_viewer_proxy()
    for layer in (again, again_boxes, again_labels):
        viewer2.add_layer(layer)
    widget2 = BoxToMaskWidget(viewer2)
    widget2.hand_combo.setCurrentText("keep")
    again_boxes.add_rectangles(boxes_to_rectangles(np.array([[12.0, 10.0, 30.0, 26.0]]),
                                                   plane=4))
    resaved = widget2.export("folder", str(saved))
    assert [p.name for p in (resaved / "images").iterdir()] == ["cells.tif"]
    assert [r.plane for r in load_box_folder(resaved).records] == [1, 3, 4]
    third, third_boxes, third_labels = _open(resaved)
    assert third.data.shape == (5, 40, 48) and np.array_equal(third.data, data)
    assert sorted(rectangle_to_box(r)[0] for r in third_boxes.data) == [1, 3, 4]
    assert _objects(third_labels.data) == _objects(again_labels.data)
    assert tuple(third.scale) == pytest.approx((2.0, 0.5, 0.5))
    # A COCO export of the reopened stack tells its planes apart, though they share a file.
    exported = read_coco_masks(widget2.export("coco", str(tmp_path / "export.json")))
    assert sorted(exported) == ["cells.tif[1]", "cells.tif[3]", "cells.tif[4]"]


def test_a_folder_saved_with_png_planes_still_opens(tmp_path):
    """Folders saved before the stack was kept whole (each annotated plane a PNG with its
    "plane", the depth in the info) reopen as they did: planes at their z, others empty."""
    from boxlevelset.data import save_box_folder

    data = _scene((5, 40, 48))
    box = np.array([[12.0, 10.0, 30.0, 26.0]])
    items = [(f"cells_{z:04d}.png", data[z], box, np.array([1]), None) for z in (1, 3)]
    save_box_folder(tmp_path / "old", items, [{"id": 1, "name": "cell"}],
                    info={"scale": [2.0, 0.5, 0.5], "planes": 5},
                    entry_fields=[{"plane": 1}, {"plane": 3}])
    folder = load_box_folder(tmp_path / "old")
    assert np.array_equal(folder.load_image(folder.records[1]), data[3])
    image, boxes = _open(tmp_path / "old")
    assert image.data.shape == (5, 40, 48) and tuple(image.scale) == (2.0, 0.5, 0.5)
    assert np.array_equal(image.data[[1, 3]], data[[1, 3]])
    assert not image.data[[0, 2, 4]].any()
    assert sorted(rectangle_to_box(r)[0] for r in boxes.data) == [1, 3]


def test_a_stack_folder_with_one_annotated_plane_stays_a_stack(tmp_path,
                                                              make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(_scene((4, 40, 48)), name="zs")
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.array([[12.0, 10.0, 30.0, 26.0]]), plane=2))
    again, again_boxes, _ = _open(widget.export("folder", str(tmp_path / "saved")))
    assert again.data.shape == (4, 40, 48) and rectangle_to_box(again_boxes.data[0])[0] == 2


def test_a_propagated_ct_box_reopens_as_one_object(tmp_path, make_napari_viewer_proxy):
    """It had come back as four boxes (one per slice), each slice its own label: moving the
    box then redid one slice, propagating again walked from a copy, and an export counted
    four objects."""
    _write_ct(tmp_path / "ct.nii.gz")
    viewer = make_napari_viewer_proxy()
    for layer in _open(tmp_path / "ct.nii.gz"):
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.array([[9.0, 7.0, 33.0, 29.0]]), plane=2))
    boxes.selected_data = {0}
    widget.overlap_spin.setValue(0.5)
    box_id = int(boxes.features["box_id"][0])
    assert widget.propagate_selected() == {box_id: 3}
    labels = widget.labels_layer(create=False)
    saved = widget.export("folder", str(tmp_path / "saved"))
    # Training still sees a tight box on every slice of the object.
    assert [len(r.boxes) for r in load_box_folder(saved).records] == [1, 1, 1, 1]

    image, again_boxes, again_labels = _open(saved)
    assert len(again_boxes.data) == 1 and rectangle_to_box(again_boxes.data[0])[0] == 2
    assert np.allclose(rectangle_to_box(again_boxes.data[0])[1], [9, 7, 33, 29])
    assert _objects(again_labels.data) == _objects(labels.data)  # one label on 4 slices
    new_id = int(again_boxes.features["box_id"][0])
    assert set(np.unique(again_labels.data)) == {0, new_id}

    # The widget takes the reopened box as the owner of every slice of its label.
    viewer2 = make_napari_viewer_proxy()
    for layer in (image, again_boxes, again_labels):
        viewer2.add_layer(layer)
    widget2 = BoxToMaskWidget(viewer2)
    widget2.hand_combo.setCurrentText("keep")
    before = again_labels.data.copy()
    widget2.segment()
    assert np.array_equal(again_labels.data, before)  # adopted, nothing redone
    again_boxes.data = boxes_to_rectangles(np.array([[10.0, 8.0, 32.0, 28.0]]), plane=2)
    assert (again_labels.data[2] == new_id).any()
    keep = [1, 3, 4]
    assert np.array_equal(again_labels.data[keep], before[keep])  # other slices kept
    resaved = widget2.export("folder", str(tmp_path / "resaved"))
    _, third_boxes, third_labels = _open(resaved)
    assert len(third_boxes.data) == 1
    assert _objects(third_labels.data) == _objects(again_labels.data)
    # Deleting the box takes its whole object, every slice, as for a box drawn here.
    again_boxes.selected_data = {0}
    again_boxes.remove_selected()
    assert not again_labels.data.any()


@pytest.mark.parametrize("fields", [{"prompt": True},  # two drawn boxes: merged by hand
                                    {}])  # another tool's object ids (tracks), no prompt
def test_object_fields_from_elsewhere_never_lose_a_box(tmp_path, fields):
    import cv2

    from boxlevelset.export import masks_to_rle

    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / "images" / name), np.full((20, 30), 90, np.uint8))
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 3:9, 3:10] = True
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                       {"id": 2, "file_name": "b.png", "width": 30, "height": 20}],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [2, 2, 9, 9],
                             "segmentation": masks_to_rle(mask)[0], "object_id": 1, **fields}
                            for k in (1, 2)],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    image, boxes, labels = _open(tmp_path)
    assert image.data.shape == (2, 20, 30) and len(boxes.data) == 2
    assert len(set(boxes.features["box_id"])) == 2
    assert set(np.unique(labels.data)) == {0, *boxes.features["box_id"]}


def test_the_extra_fields_are_written_and_read_by_the_engine(tmp_path):
    from boxlevelset.data import save_box_folder

    picture = np.full((20, 30), 90, np.uint8)
    item = ("p_0003.png", picture, np.array([[2.0, 3.0, 12.0, 9.0]]), np.array([1]), None)
    cats = [{"id": 1, "name": "x"}]
    save_box_folder(tmp_path / "f", [item], cats, entry_fields=[{"plane": 3}],
                    box_fields=[[{"object_id": 7, "prompt": True}]])
    (record,) = load_box_folder(tmp_path / "f").records
    assert (record.plane, record.object_ids, record.prompts) == (3, [7], [True])
    coco = json.loads((tmp_path / "f" / "annotations.json").read_text())
    del coco["images"][0]["plane"], coco["annotations"][0]["object_id"]
    (tmp_path / "f" / "annotations.json").write_text(json.dumps(coco))
    (record,) = load_box_folder(tmp_path / "f").records  # a folder without them
    assert (record.plane, record.object_ids) == (None, [None])
    with pytest.raises(ValueError, match=r"p_0003.png: extra fields \['bbox'\]"):
        save_box_folder(tmp_path / "g", [item], cats, box_fields=[[{"bbox": [0, 0, 1, 1]}]])
