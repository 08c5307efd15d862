"""Plugin reader, sample data, writer and exports: CT geometry kept, COCO round trip identical."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from napari.layers import Layer

from boxlevelset.data import load_box_folder, read_volume
from boxlevelset.export import read_coco_masks
from boxlevelset_napari._box_to_mask import BoxToMaskWidget
from boxlevelset_napari._layers import boxes_to_rectangles
from boxlevelset_napari._reader import napari_get_reader
from boxlevelset_napari._sample_data import make_sample_ct, make_sample_nuclei
from boxlevelset_napari._writer import write_labels

pytestmark = pytest.mark.plugin
SAMPLES = Path(str(files("boxlevelset") / "samples"))


KIND_ORDER = {"image": 0, "shapes": 1, "labels": 2}  # unpacked as image, boxes, masks


def _layers(layer_data):
    layer_data = sorted(layer_data, key=lambda d: KIND_ORDER[d[2]])
    return [Layer.create(data, dict(kwargs), kind) for data, kwargs, kind in layer_data]


def plugin_meta_of(kwargs: dict) -> dict:
    from boxlevelset_napari._layers import META_KEY

    return kwargs["metadata"][META_KEY]


def _write_ct(path: Path) -> sitk.Image:
    """A small anisotropic, oblique CT volume: a 'liver' (60 HU) block in water."""
    arr = np.full((6, 40, 48), -1000, np.int16)
    arr[:, 5:35, 5:43] = 0
    arr[1:5, 10:26, 12:30] = 60
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.5, 30.0, 101.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return image


def test_reader_claims_the_right_paths(tmp_path, tiny_box_folder):
    ct = tmp_path / "ct.nii.gz"
    _write_ct(ct)
    assert napari_get_reader(str(ct)) is not None
    assert napari_get_reader(str(tiny_box_folder)) is not None
    assert napari_get_reader(str(tiny_box_folder / "annotations.json")) is not None
    assert napari_get_reader(str(SAMPLES / "nuclei.png")) is not None
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a folder of nothing we know
    png = str(SAMPLES / "nuclei.png")
    (data, kwargs, kind), = napari_get_reader(png)(png)
    assert kind == "image" and data.shape[:2] == (256, 256)
    labels = np.zeros((8, 9), np.int32)
    labels[2:5, 3:6] = 7
    out = write_labels(str(tmp_path / "l.tif"), labels, {})
    import tifffile
    assert np.array_equal(tifffile.imread(out[0]), labels)
    # A 2D layer saved under a volume name: one slice, the layer scale as spacing.
    (out,) = write_labels(str(tmp_path / "l.nii.gz"), labels, {"scale": (0.5, 0.7)})
    volume = read_volume(out)
    assert np.array_equal(volume.array, labels[None])
    assert volume.spacing == pytest.approx((0.7, 0.5, 1.0))


def test_reader_opens_the_json_it_is_given_and_declines_other_json(tiny_box_folder):
    coco = tiny_box_folder / "annotations.json"
    train = tiny_box_folder / "train.json"
    subset = json.loads(coco.read_text())
    subset["annotations"] = subset["annotations"][:2]
    train.write_text(json.dumps(subset))
    image, boxes, *_ = _layers(napari_get_reader(str(train))(str(train)))
    assert len(boxes.data) == 2  # train.json's boxes, not annotations.json's
    coco.unlink()  # a folder whose only COCO file has another name
    image, boxes, *_ = _layers(napari_get_reader(str(train))(str(train)))
    assert len(boxes.data) == 2
    config = tiny_box_folder / "config.json"
    config.write_text(json.dumps({"learning_rate": 0.1}))
    assert napari_get_reader(str(config)) is None


def test_reader_stacks_mixed_bit_depths_without_wrapping(tiny_box_folder):
    import cv2

    deep = (np.full((64, 64, 3), 4000, np.uint16))
    cv2.imwrite(str(tiny_box_folder / "images" / "tiny_2.png"), deep)
    image, *_ = _layers(napari_get_reader(str(tiny_box_folder))(str(tiny_box_folder)))
    assert image.data.dtype == np.uint16 and image.data[2].max() == 4000


def test_manifest_claims_no_file_it_does_not_read():
    import npe2

    manifest = npe2.PluginManifest.from_file(
        Path(__file__).resolve().parents[1] / "boxlevelset_napari" / "napari.yaml")
    (reader,) = manifest.contributions.readers
    assert "*" not in reader.filename_patterns and "*.mhd" in reader.filename_patterns


def test_ct_reader_window_scale_and_nifti_export_keep_geometry(tmp_path, make_napari_viewer_proxy):
    src = _write_ct(tmp_path / "ct.nii.gz")
    path = str(tmp_path / "ct.nii.gz")
    (data, kwargs, kind), = napari_get_reader(path)(path)
    assert kind == "image" and data.shape == (6, 40, 48)
    assert kwargs["scale"] == pytest.approx((2.5, 0.8, 0.7))  # (z, y, x) physical spacing
    assert kwargs["contrast_limits"] == pytest.approx((-160.0, 240.0))  # abdomen 40/400
    assert data[2, 15, 20] == 60  # Hounsfield units, not rescaled

    viewer = make_napari_viewer_proxy()
    image = viewer.add_image(data, **kwargs)
    widget = BoxToMaskWidget(viewer)
    widget.image_combo.select(image)
    boxes = widget.new_boxes_layer()
    assert boxes.ndim == 3 and tuple(boxes.scale) == pytest.approx((2.5, 0.8, 0.7))
    image.contrast_limits = (-20.0, 140.0)  # the liver preset 60/160: window follows the layer
    boxes.add_rectangles([np.array([[2, 7, 9], [2, 7, 33], [2, 29, 33], [2, 29, 9]], float)])
    labels = widget.labels_layer(create=False)
    assert labels.data.shape == (6, 40, 48)
    box_id = int(boxes.features["box_id"][0])
    # The block is the only structure in the box: its mask is found on slice 2 only.
    assert (labels.data[2] == box_id).sum() > 0.8 * 16 * 18
    assert not np.delete(labels.data, 2, axis=0).any()

    # Propagation through slices: the block spans slices 1..4.
    boxes.selected_data = {0}
    widget.overlap_spin.setValue(0.5)
    added = widget.propagate_selected()
    assert added[box_id] == 3
    assert [bool((labels.data[z] == box_id).any()) for z in range(6)] == [
        False, True, True, True, True, False]

    out = widget.export("nifti", str(tmp_path / "out" / "labels.nii.gz"))
    back = sitk.ReadImage(str(out))
    assert back.GetSpacing() == pytest.approx(src.GetSpacing())
    assert back.GetOrigin() == pytest.approx(src.GetOrigin())
    assert back.GetDirection() == pytest.approx(src.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), labels.data)
    # The npe2 writer does the same from the labels layer's metadata.
    written = write_labels(str(tmp_path / "w.nrrd"), labels.data, {"metadata": labels.metadata})
    assert read_volume(written[0]).origin == pytest.approx(src.GetOrigin())
    # Saved as a box folder, the CT stays a volume in Hounsfield units with its geometry,
    # one entry per annotated slice (it was saved as windowed 8-bit PNGs).
    saved = load_box_folder(widget.export("folder", str(tmp_path / "saved")))
    assert [r.slice_index for r in saved] == [1, 2, 3, 4]
    record = saved[1]
    np.testing.assert_array_equal(saved.slice_hu(record), data[2])
    assert saved.volume(record).spacing == pytest.approx(src.GetSpacing())
    assert np.array_equal(saved.gt_masks(record)[0], labels.data[2] == box_id)
    # Reopened, it is the CT again (HU, window, spacing), each box on its own slice: it had
    # come back as an 8-bit stack of the annotated slices, neighbours across any gap.
    path = str(tmp_path / "saved")
    (vol, vol_kwargs, _), (masks, _, _), (rects, box_kwargs, _) = napari_get_reader(path)(path)
    assert vol.shape == data.shape and vol[2, 15, 20] == 60
    assert plugin_meta_of(vol_kwargs)["kind"] == "ct"
    assert vol_kwargs["scale"] == box_kwargs["scale"] == pytest.approx(kwargs["scale"])
    # The box drawn on slice 2 comes back as that one box, its propagated masks as its label.
    assert [int(r[0, 0]) for r in rects] == [2]
    assert all((masks[z] == 1).any() for z in (1, 2, 3, 4)) and not masks[0].any()
    # The exported label volume opens again as labels on the CT's grid, not as a CT image.
    (again, again_kwargs, again_kind), = napari_get_reader(str(out))(str(out))
    assert again_kind == "labels" and np.array_equal(again, labels.data)
    assert again_kwargs["scale"] == pytest.approx(kwargs["scale"])


def test_sample_data_segments_and_coco_round_trip(tmp_path, make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    layers = _layers(make_sample_nuclei())
    for layer in layers:
        viewer.add_layer(layer)
    image, boxes = layers
    assert len(boxes.data) == 28 and set(boxes.features["category"]) == {"nucleus"}
    widget = BoxToMaskWidget(viewer)
    assert widget.boxes_combo.layer().name == boxes.name
    assert widget.image_combo.layer().name == image.name
    widget.segment()
    labels = widget.labels_layer(create=False)
    ids = set(np.unique(labels.data)) - {0}
    assert len(ids) >= 26 and ids <= set(boxes.features["box_id"])

    out = widget.export("coco", str(tmp_path / "coco.json"))
    (masks, cats), = read_coco_masks(out).values()
    assert len(masks) == len(ids)
    expect = np.stack([labels.data == i for i in sorted(ids)])
    assert np.array_equal(masks, expect)  # masks identical after RLE and back
    assert set(cats.tolist()) == {1}
    coco = json.loads(Path(out).read_text())
    assert coco["categories"] == [{"id": 1, "name": "nucleus"}]
    assert coco["images"][0]["file_name"] == "nuclei.png"

    png = widget.export("labels", str(tmp_path / "labels.png"))
    import cv2
    assert np.array_equal(cv2.imread(str(png), cv2.IMREAD_UNCHANGED), labels.data)


def test_export_and_save_read_each_label_over_its_bounding_box(
        tmp_path, make_napari_viewer_proxy, monkeypatch):
    # COCO export and Save annotations held a plane-sized mask per label (4 GB for 961
    # nuclei on a 2048x2048 tile): they now read each label over its bounding box.
    import boxlevelset.export as E

    viewer = make_napari_viewer_proxy()
    for layer in _layers(make_sample_nuclei()):
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    widget.segment()
    labels = widget.labels_layer(create=False).data.copy()
    labels[250:, 250:] = 999  # a mask painted by hand, with no box: saved with its tight box
    widget.labels_layer(create=False).data = labels
    ids = sorted(set(np.unique(labels).tolist()) - {0})

    def whole(*args):
        raise AssertionError("a plane-sized mask per label was made")

    monkeypatch.setattr(E.BoxMasks, "full", whole)
    monkeypatch.setattr(E, "masks_to_rle", whole)
    (masks, _), = read_coco_masks(widget.export("coco", str(tmp_path / "coco.json"))).values()
    np.testing.assert_array_equal(masks, np.stack([labels == i for i in ids]))
    saved = load_box_folder(widget.export("folder", str(tmp_path / "saved")))
    rec, = saved.records
    assert len(rec.boxes) == len(ids) and [250, 250, 256, 256] in rec.boxes.tolist()
    got = saved.gt_masks(rec)
    assert all(np.array_equal(m, labels == labels[m][0]) for m in got)


def test_box_folder_open_export_save_reopen(tmp_path, tiny_box_folder, make_napari_viewer_proxy):
    layer_data = napari_get_reader(str(tiny_box_folder))(str(tiny_box_folder))
    image, boxes, labels = _layers(layer_data)
    folder = load_box_folder(tiny_box_folder)
    assert image.data.shape == (3, 64, 64, 3) and image.rgb
    assert len(boxes.data) == sum(len(r.boxes) for r in folder.records)
    assert set(boxes.features["category"]) == {"blob", "block"}
    viewer = make_napari_viewer_proxy()
    for layer in (image, boxes, labels):
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    widget.hand_combo.setCurrentText("keep")  # never a modal dialog in a test
    widget.labels_combo.select(labels)
    before = labels.data.copy()
    widget.segment()  # folder masks are adopted, not re-segmented
    assert np.array_equal(labels.data, before)

    coco = widget.export("coco", str(tmp_path / "export.json"))
    got = read_coco_masks(coco)
    for record in folder.records:
        masks, cats = got[record.file_name]
        assert np.array_equal(masks, folder.gt_masks(record))
        assert np.array_equal(cats, record.category_ids)

    saved = widget.export("folder", str(tmp_path / "saved"))
    again = load_box_folder(saved)
    assert [r.file_name for r in again.records] == [r.file_name for r in folder.records]
    for a, b in zip(again.records, folder.records):
        assert np.allclose(a.boxes, b.boxes)
        assert [again.categories[[c["id"] for c in again.categories].index(i)]["name"]
                for i in a.category_ids] == \
            [folder.categories[[c["id"] for c in folder.categories].index(i)]["name"]
             for i in b.category_ids]
        assert np.array_equal(again.gt_masks(a), folder.gt_masks(b))
        assert np.array_equal(again.load_image(a), folder.load_image(b))


def test_folder_opened_after_the_widget_keeps_its_masks(tiny_box_folder,
                                                      make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    widget = BoxToMaskWidget(viewer)  # opened first, as from the Plugins menu
    widget.hand_combo.setCurrentText("keep")
    for layer in _layers(napari_get_reader(str(tiny_box_folder))(str(tiny_box_folder))):
        viewer.add_layer(layer)
    labels = viewer.layers[f"{tiny_box_folder.name} masks"]
    assert widget.labels_combo.currentText() == labels.name
    before = labels.data.copy()
    widget.segment()  # the folder's masks are adopted, not segmented again elsewhere
    assert np.array_equal(labels.data, before)
    assert len([layer for layer in viewer.layers if layer.name.endswith("masks")]) == 1


def test_ct_sample_has_hu_window_and_boxes():
    image, boxes = _layers(make_sample_ct())
    vol = read_volume(SAMPLES / "ct_slice.nii.gz")
    assert image.data.shape == vol.array.shape
    assert tuple(image.contrast_limits) == pytest.approx((-160.0, 240.0))
    assert tuple(image.scale) == pytest.approx(tuple(reversed(vol.spacing)))
    assert list(boxes.features["category"]) == ["liver", "spine"]


def test_a_tiff_z_stack_opens_as_a_stack_that_boxes_and_propagates(tmp_path,
                                                                   make_napari_viewer_proxy):
    """Three grey pages had opened as one RGB picture; five as an error."""
    import tifffile

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 40, size=(3, 40, 48)).astype(np.uint8)
    stack[:, 10:26, 12:30] = 200
    tifffile.imwrite(tmp_path / "cells.tif", stack, photometric="minisblack")
    path = str(tmp_path / "cells.tif")
    (data, kwargs, kind), = napari_get_reader(path)(path)
    assert kind == "image" and data.shape == (3, 40, 48) and not kwargs["rgb"]

    viewer = make_napari_viewer_proxy()
    for layer in _layers([(data, kwargs, kind)]):
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    boxes.add_rectangles([np.array([[1, 10, 12], [1, 10, 30], [1, 26, 30], [1, 26, 12]], float)])
    labels = widget.labels_layer(create=False)
    box_id = int(boxes.features["box_id"][0])
    assert (labels.data[1] == box_id).sum() > 0.9 * 16 * 18 and not labels.data[0].any()
    boxes.selected_data = {0}
    assert widget.propagate_selected() == {box_id: 2}
    assert all((labels.data[z] == box_id).sum() > 0.9 * 16 * 18 for z in (0, 2))


def test_a_two_stain_tiff_opens_as_one_layer_per_channel(tmp_path):
    """Two channels (nuclei, membrane) had opened as a two-slice stack that Propagate walked
    from one stain into the other."""
    import tifffile

    tifffile.imwrite(tmp_path / "stains.tif", np.zeros((5, 2, 16, 20), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    path = str(tmp_path / "stains.tif")
    layers = napari_get_reader(path)(path)
    assert [(d.shape, k["name"], k["rgb"]) for d, k, _ in layers] == [
        ((5, 16, 20), "stains [0]", False), ((5, 16, 20), "stains [1]", False)]


def test_loose_boxes_follow_the_image_kind_until_the_user_sets_them(make_napari_viewer_proxy):
    """CT boxes drawn by hand get the loose-box energy by default (on CT it holds its masks
    at any looseness); photos and microscopy keep the tight-box energy; a user's own choice
    stays."""
    from boxlevelset import segment_boxes
    from boxlevelset.levelset import LOOSE_BOXES

    viewer = make_napari_viewer_proxy()
    nuclei = _layers(make_sample_nuclei())
    ct = _layers(make_sample_ct())
    for layer in nuclei + ct:
        viewer.add_layer(layer)
    widget = BoxToMaskWidget(viewer)
    widget.image_combo.select(ct[0])
    assert widget.loose_check.isChecked()
    widget.image_combo.select(nuclei[0])
    assert not widget.loose_check.isChecked()
    widget.image_combo.select(ct[0])
    boxes = widget.new_boxes_layer()
    box = np.array([[200.0, 320.0, 310.0, 450.0]])  # a vertebra, a hand's loose box
    boxes.add_rectangles(boxes_to_rectangles(box, plane=0))
    hu = np.asarray(ct[0].data[0])
    want = segment_boxes(hu, box, window=(40.0, 400.0), **LOOSE_BOXES)[0]
    got = widget.labels_layer(create=False).data[0] == int(boxes.features["box_id"][0])
    assert np.array_equal(got, want)
    widget.loose_check.click()  # the user unticks it: that stays, whatever image is chosen
    widget.image_combo.select(nuclei[0])
    widget.image_combo.select(ct[0])
    assert not widget.loose_check.isChecked()


def test_the_readers_suffixes_are_the_engines():
    # The reader spells them out to stay light to import; they must not drift apart.
    from boxlevelset import data
    from boxlevelset_napari import _reader

    assert set(_reader.IMAGE_SUFFIXES) == set(data.IMAGE_SUFFIXES)
    assert set(_reader.VOLUME_SUFFIXES) == set(data.VOLUME_SUFFIXES)
