"""Saving a folder again where it was read from: a name two entries share must not cost the
folder its stack."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import json

import numpy as np
import pytest
import tifffile
from napari.layers import Layer

from boxlevelset.data import load_box_folder, save_box_folder
from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._reader import napari_get_reader

BOX = np.array([[12.0, 10.0, 30.0, 26.0]])
CATS = [{"id": 1, "name": "cell"}]


def _stack() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 200, (5, 40, 48)).astype(np.uint8)


def test_a_name_used_twice_is_refused_before_anything_is_written(tmp_path):
    """save_box_folder found the second use of a name while writing: the first file had
    already replaced the folder's own (here the whole stack by one 2D picture)."""
    stack = _stack()
    root = save_box_folder(tmp_path / "f", [("cells.tif", stack, BOX, [1], None, 1)], CATS)
    plane = stack[1]
    with pytest.raises(ValueError, match="'cells.tif' used twice"):
        save_box_folder(root, [("cells.tif", plane, BOX, [1], None),
                               ("cells.tif", plane, BOX, [1], None)], CATS)
    assert np.array_equal(tifffile.imread(root / "images" / "cells.tif"), stack)
    with pytest.raises(ValueError, match="cells.tif: two different stacks"):
        save_box_folder(root, [("cells.tif", stack, BOX, [1], None, 1),
                               ("cells.tif", stack.copy(), BOX, [1], None, 2)], CATS)
    with pytest.raises(ValueError, match="'cells.tif' used twice"):
        save_box_folder(root, [("cells.tif", stack, BOX, [1], None, 1),
                               ("cells.tif", plane, BOX, [1], None)], CATS)


@pytest.mark.plugin
def test_a_merged_stack_folder_saved_in_place_keeps_every_plane(tmp_path,
                                                              make_napari_viewer_proxy):
    """Two annotators' entries for one plane of a saved stack, merged by hand: the reader
    stacks them one after another (each from cells.tif); Save annotations over the folder
    wrote the first as cells.tif (the stack gone), then failed on the second: the folder
    then showed that one plane for every entry."""
    stack = _stack()
    items = [("cells.tif", stack, BOX, [1], None, z) for z in (1, 3)]
    root = save_box_folder(tmp_path / "f", items, CATS)
    coco = json.loads((root / "annotations.json").read_text())
    coco["images"].append(dict(coco["images"][0], id=3))
    coco["annotations"].append(dict(coco["annotations"][0], id=3, image_id=3))
    (root / "annotations.json").write_text(json.dumps(coco))
    layer_data = sorted(napari_get_reader(str(root))(str(root)),
                        key=lambda d: {"image": 0, "shapes": 1}.get(d[2], 2))
    layers = [Layer.create(data, dict(kwargs), kind) for data, kwargs, kind in layer_data]
    shown = np.array(layers[0].data)
    assert np.array_equal(shown, stack[[1, 3, 1]])
    viewer = make_napari_viewer_proxy()
    for layer in layers:
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    widget.hand_combo.setCurrentText("keep")
    widget.export("folder", str(root))
    folder = load_box_folder(root)
    assert len({r.file_name for r in folder.records}) == 3
    assert [len(r.boxes) for r in folder.records] == [1, 1, 1]
    for record, plane in zip(folder.records, shown):
        assert np.array_equal(folder.load_image(record), plane)


def _open_in(viewer, path) -> BoxToMaskWidget:
    layer_data = napari_get_reader(str(path))(str(path))
    for data, kwargs, kind in layer_data:
        viewer.add_layer(Layer.create(data, dict(kwargs), kind))
    return BoxToMaskWidget(viewer)


def test_a_folder_saved_in_place_keeps_its_unboxed_images_and_their_bytes(
        tmp_path, make_napari_viewer_proxy):
    """A folder of three photos, one of them boxed, saved where it was read from: the two
    photos still to do were dropped from annotations.json (gone on reopening), and every
    JPEG was decoded and encoded again at each save, losing detail each time."""
    import cv2

    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        photo = rng.integers(0, 60, (40, 48, 3)).astype(np.uint8)
        photo[10:26, 12:30] = 220
        cv2.imwrite(str(root / "images" / name), photo)
    before = {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}
    coco = {"images": [{"id": i, "file_name": n, "height": 40, "width": 48}
                       for i, n in enumerate(before, start=1)],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "iscrowd": 0,
                             "bbox": [12, 10, 18, 16], "area": 288}],
            "categories": CATS}
    (root / "annotations.json").write_text(json.dumps(coco))

    widget = _open_in(make_napari_viewer_proxy(), root)
    widget.segment()
    widget.export("folder", str(root))
    folder = load_box_folder(root)
    assert [(r.file_name, len(r.boxes)) for r in folder.records] == [
        ("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 0)]
    assert len(folder.records[1].segmentations) == 1 and folder.records[1].segmentations[0]
    assert {p.name: p.read_bytes() for p in (root / "images").iterdir()} == before

    # A single photo opened on its own and saved elsewhere keeps its bytes too.
    single = tmp_path / "one.jpg"
    single.write_bytes(before["a.jpg"])
    viewer = make_napari_viewer_proxy()
    widget = _open_in(viewer, single)
    boxes = widget.new_boxes_layer()
    from boxlevelset_napari._layers import boxes_to_rectangles

    boxes.add_rectangles(boxes_to_rectangles(BOX))
    widget.export("folder", str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "images" / "one.jpg").read_bytes() == before["a.jpg"]
