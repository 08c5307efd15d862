"""Data: image/volume reading, box folders (COCO, CT, VOC, plain), saving and re-reading."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from pycocotools import mask as mask_utils

from boxlevelset.data import (
    BoxFolder,
    ImageReadError,
    Volume,
    load_box_folder,
    read_image,
    read_volume,
    save_box_folder,
    write_label_volume,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # shared/ beside the checkout


# ----------------------------------------------------------------------------- read_image


def test_read_image_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])  # cv2 stores BGR
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)  # back in RGB order
    cv2.imwrite(str(tmp_path / "rgb.bmp"), rgb[..., ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.bmp"), rgb)

    gray16 = rng.integers(0, 65536, (7, 5), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint16 and out.shape == (7, 5)
    np.testing.assert_array_equal(out, gray16)

    flt = rng.random((6, 8)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", flt)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), flt)

    cv2.imwrite(str(tmp_path / "j.jpg"), np.full((10, 12, 3), 128, np.uint8))
    jpg = read_image(tmp_path / "j.jpg")
    assert jpg.shape == (10, 12, 3) and abs(int(jpg.mean()) - 128) <= 1


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png at all \x00\x01\x02")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="missing.png.*does not exist"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageReadError, match="anim.gif.*unsupported"):
        read_image(tmp_path / "anim.gif")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="bad.tif"):
        read_image(tmp_path / "bad.tif")
    assert issubclass(ImageReadError, ValueError)


# ----------------------------------------------------------------------------- COCO folders


def test_tiny_box_folder_loads(tiny_box_folder):
    folder = load_box_folder(tiny_box_folder)
    assert isinstance(folder, BoxFolder) and len(folder) == 3
    assert folder.categories == [{"id": 1, "name": "blob"}, {"id": 2, "name": "block"}]
    coco = json.loads((tiny_box_folder / "annotations.json").read_text())
    anns = [a for a in coco["annotations"] if a["image_id"] == 1]
    rec = folder.records[0]
    assert rec.file_name == "tiny_0.png" and (rec.width, rec.height) == (64, 64)
    assert rec.boxes.dtype == np.float32 and rec.category_ids.dtype == np.int64
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    np.testing.assert_array_equal(rec.boxes, expected)
    np.testing.assert_array_equal(rec.category_ids, [a["category_id"] for a in anns])
    image = folder.load_image(rec)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    masks = folder.gt_masks(rec)
    assert masks.shape == (len(anns), 64, 64) and masks.dtype == bool
    for m, a in zip(masks, anns):
        assert m.sum() == a["area"]
        assert image[m].mean() > 150 > image[~masks.any(0)].mean()  # bright objects, dark ground
    gt = folder.to_coco_gt()
    assert len(gt["annotations"]) == len(coco["annotations"])
    assert all(isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
               for a in gt["annotations"])


def test_corrupt_image_skipped_with_warning(tiny_box_folder):
    (tiny_box_folder / "images" / "tiny_1.png").write_bytes(b"\x89PNG garbage garbage")
    with pytest.warns(UserWarning, match="tiny_1.png"):
        folder = load_box_folder(tiny_box_folder)
    assert [r.file_name for r in folder] == ["tiny_0.png", "tiny_2.png"]


def test_truncated_png_skipped_at_load(tiny_box_folder):
    # An interrupted copy: the header is intact, the pixel data cut short. It must be
    # dropped when the folder loads, not fail later inside training or export.
    path = tiny_box_folder / "images" / "tiny_2.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="tiny_2.png"):
        folder = load_box_folder(tiny_box_folder)
    assert [r.file_name for r in folder] == ["tiny_0.png", "tiny_1.png"]


def test_truncated_tiff_skipped_at_load(tmp_path):
    (tmp_path / "images").mkdir()
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for name in ("whole.tif", "cut.tif"):
        tifffile.imwrite(tmp_path / "images" / name, pixels)
    cut = tmp_path / "images" / "cut.tif"
    cut.write_bytes(cut.read_bytes()[:3000])  # the header survives, the pixels do not
    with pytest.warns(UserWarning, match="cut.tif: TIFF is truncated"):
        folder = load_box_folder(tmp_path)
    assert [r.file_name for r in folder] == ["whole.tif"]


def test_image_above_pillows_bomb_limit_loads(tiny_box_folder, monkeypatch):
    from PIL import Image

    # Pillow refuses images over 2x MAX_IMAGE_PIXELS (~179 Mpx by default) in its header
    # reader; a large scan must load like any other image. Lower the limit for the test.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)
    folder = load_box_folder(tiny_box_folder)
    assert [(r.height, r.width) for r in folder] == [(64, 64)] * 3


def test_every_entry_of_a_shared_file_is_size_checked(tiny_box_folder):
    coco = json.loads((tiny_box_folder / "annotations.json").read_text())
    coco["images"].append(dict(coco["images"][0], id=99, width=65))  # same file, wrong size
    (tiny_box_folder / "annotations.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match="annotation says 65x64"):
        folder = load_box_folder(tiny_box_folder)
    assert [r.image_id for r in folder] == [1, 2, 3]


def test_empty_folder_raises(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing_here"):
        load_box_folder(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_box_folder(tmp_path / "absent")


def test_degenerate_boxes_clipped_and_dropped(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((20, 30), np.uint8))
    poly = [[2, 2, 10, 2, 10, 8, 2, 8]]
    coco = {
        "images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [-5, 10, 15, 20],
             "segmentation": poly},  # sticks out left and bottom: clipped
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [40, 2, 5, 5]},  # outside
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [4, 4, 0, 6]},  # zero width
            {"id": 4, "image_id": 5, "category_id": 3, "bbox": [1, 1, 3, 3], "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO, logger="boxlevelset.data"):
        folder = load_box_folder(tmp_path)
    rec = folder.records[0]
    np.testing.assert_array_equal(rec.boxes, [[0, 10, 10, 20]])
    assert rec.image_id == 5 and rec.segmentations == [poly]
    assert "dropped 2 boxes" in caplog.text
    mask = folder.gt_masks(rec)[0]  # polygon decoded through pycocotools
    assert mask[4, 5] and not mask[15, 20]
    assert folder.to_coco_gt()["annotations"][0]["segmentation"]["size"] == [20, 30]


def test_unknown_category_raises(tiny_box_folder):
    coco = json.loads((tiny_box_folder / "annotations.json").read_text())
    coco["annotations"][0]["category_id"] = 99
    (tiny_box_folder / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category_id 99"):
        load_box_folder(tiny_box_folder)


def test_save_box_folder_round_trip(tmp_path, tiny_box_folder):
    src = load_box_folder(tiny_box_folder)
    items = [(r.file_name, src.load_image(r), r.boxes, r.category_ids, src.gt_masks(r))
             for r in src]
    # One gray image with sub-pixel boxes and no masks, one with no boxes at all.
    items.append(("gray.png", np.full((20, 24), 90, np.uint8), [[1.25, 2.5, 10.75, 19.1]], [2],
                  None))
    items.append(("empty.png", np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), [], None))
    out = save_box_folder(tmp_path / "saved", items, src.categories)
    back = load_box_folder(out)
    assert back.categories == src.categories and len(back) == len(items)
    for rec, (name, image, boxes, cats, masks) in zip(back, items):
        assert rec.file_name == name
        np.testing.assert_array_equal(back.load_image(rec), image)
        np.testing.assert_array_equal(rec.boxes, np.asarray(boxes, np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(rec.category_ids, cats)
        if masks is None:
            assert back.gt_masks(rec) is None if len(boxes) else back.gt_masks(rec).shape[0] == 0
        else:
            np.testing.assert_array_equal(back.gt_masks(rec), masks)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(n for n, *_ in items)
    with pytest.raises(ValueError, match="category ids"):
        save_box_folder(tmp_path / "bad", [("x.png", np.zeros((4, 4), np.uint8), [[0, 0, 2, 2]],
                                            [7], None)], src.categories)


def test_save_box_folder_takes_masks_over_their_boxes(tmp_path, tiny_box_folder):
    # A BoxMasks (each mask over its box) writes the same annotations.json as the masks
    # given whole: the plugin saves a 2048x2048 tile's 961 nuclei without 4 GB of masks.
    from boxlevelset.export import BoxMasks

    src = load_box_folder(tiny_box_folder)
    rec = src.records[0]
    image, masks = src.load_image(rec), src.gt_masks(rec)
    labels = np.zeros(masks.shape[1:], np.int32)
    for i, m in enumerate(masks, start=1):
        labels[m & (labels == 0)] = i
    whole = np.stack([labels == i for i in range(1, len(masks) + 1)])
    cropped = BoxMasks.from_labels(labels, range(1, len(masks) + 1))
    for name, given in (("whole", whole), ("cropped", cropped)):
        save_box_folder(tmp_path / name, [(rec.file_name, image, rec.boxes, rec.category_ids,
                                           given)], src.categories)
    assert (tmp_path / "whole" / "annotations.json").read_text() == \
        (tmp_path / "cropped" / "annotations.json").read_text()
    with pytest.raises(ValueError, match="masks of a"):
        save_box_folder(tmp_path / "bad", [(rec.file_name, image, rec.boxes, rec.category_ids,
                                            BoxMasks(cropped.bounds, cropped.crops, (5, 5)))],
                        src.categories)


def test_gt_box_masks_are_the_gt_masks_over_their_boxes(tiny_box_folder, tmp_path):
    folder = load_box_folder(tiny_box_folder)
    polygon = tmp_path / "poly"  # a polygon segmentation, as COCO's own annotations hold
    save_box_folder(polygon, [("a.png", np.zeros((20, 30), np.uint8), [[2, 3, 25, 18]], [1],
                               None)], [{"id": 1, "name": "thing"}])
    coco = json.loads((polygon / "annotations.json").read_text())
    coco["annotations"][0]["segmentation"] = [[2, 3, 25, 3, 25, 18, 2, 18]]
    (polygon / "annotations.json").write_text(json.dumps(coco))
    for source in (folder, load_box_folder(polygon)):
        for rec in source.records:
            whole, cropped = source.gt_masks(rec), source.gt_box_masks(rec)
            assert cropped.size == (rec.height, rec.width) and len(cropped) == len(whole)
            assert all((a == b).all() for a, b in zip(cropped.to_masks(), whole))


def test_box_masks_from_a_label_image():
    from boxlevelset.export import BoxMasks

    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 15, 2))
        labels = rng.integers(-2, 6, (h, w)) * (rng.random((h, w)) < 0.5)
        huge = np.where(labels > 0, labels * 10**12, labels)  # sparse ids: no 10^12 list
        labels = [labels, np.abs(labels).astype(np.uint16), labels.astype(np.float32),
                  huge][trial % 4]
        ids = [1, 2, 3, 5, 7, -1, -2, 10**12, 3 * 10**12]  # absent ones: empty masks
        found = BoxMasks.from_labels(labels, ids)
        assert found.size == (h, w)
        for i, mask, crop in zip(ids, found.to_masks(), found.crops):
            np.testing.assert_array_equal(mask, labels == i)
            assert crop.size == 0 or (crop[0].any() and crop[-1].any() and crop[:, 0].any()
                                      and crop[:, -1].any())  # tight


# ----------------------------------------------------------------------------- VOC and plain


def _voc_xml(name: str, w: int, h: int, objects: list[tuple[str, list[int]]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return (f"<annotation><filename>{name}</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def test_voc_folder(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    for stem, objects in [("000001", [("dog", [1, 1, 10, 12]), ("cat", [5, 3, 40, 30])]),
                          ("000002", [("person", [20, 10, 60, 38])])]:
        cv2.imwrite(str(tmp_path / "JPEGImages" / f"{stem}.jpg"), np.zeros((30, 50, 3), np.uint8))
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(
            _voc_xml(f"{stem}.jpg", 50, 30, objects))
    folder = load_box_folder(tmp_path)
    assert folder.class_names == ["cat", "dog", "person"]
    assert [c["id"] for c in folder.categories] == [1, 2, 3]
    r1, r2 = folder.records
    # VOC is 1-based inclusive: xmin=1 is column 0, xmax=10 is the exclusive right edge 10.
    np.testing.assert_array_equal(r1.boxes, [[0, 0, 10, 12], [4, 2, 40, 30]])
    np.testing.assert_array_equal(r1.category_ids, [2, 1])
    np.testing.assert_array_equal(r2.boxes, [[19, 9, 50, 30]])  # clipped to the 50x30 image
    assert folder.gt_masks(r1) is None
    assert folder.load_image(r2).shape == (30, 50, 3)


def test_plain_image_folder(tmp_path):
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((5, 7), np.uint8))
    cv2.imwrite(str(tmp_path / "a.tif"), np.zeros((4, 6), np.uint16))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = load_box_folder(tmp_path)
    assert [(r.file_name, r.width, r.height, len(r.boxes)) for r in folder] == [
        ("a.tif", 6, 4, 0), ("b.png", 7, 5, 0)]
    assert folder.categories == []
    # OpenCV writes LZW TIFFs, which tifffile cannot decode without imagecodecs.
    image = folder.load_image(folder.records[0])
    assert image.dtype == np.uint16 and image.shape == (4, 6)


def test_tiff_stack_is_not_an_image(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((6, 16, 16), np.uint8))
    with pytest.raises(ImageReadError, match="stack.tif.*stack"):
        read_image(tmp_path / "stack.tif")


def test_three_grey_pages_are_a_stack_and_planar_rgb_is_an_image(tmp_path):
    """(3, H, W) is ambiguous by shape alone; the TIFF's own axes decide. Three grey pages
    had been read as one RGB picture of a z-stack."""
    from boxlevelset.data import read_tiff

    planes = np.arange(3 * 8 * 10, dtype=np.uint8).reshape(3, 8, 10)
    tifffile.imwrite(tmp_path / "z.tif", planes, photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", planes, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "rgbz.tif", np.zeros((4, 8, 10, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "tzyx.tif", np.zeros((2, 3, 8, 10), np.uint8),
                     photometric="minisblack", metadata={"axes": "TZYX"})
    image, stack = read_tiff(tmp_path / "z.tif")
    assert stack and image.shape == (3, 8, 10)
    with pytest.raises(ImageReadError, match="z.tif.*stack"):
        read_image(tmp_path / "z.tif")
    image, stack = read_tiff(tmp_path / "rgb.tif")
    assert not stack and image.shape == (8, 10, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), np.moveaxis(planes, 0, -1))
    assert read_tiff(tmp_path / "rgbz.tif")[0].shape == (4, 8, 10, 3)
    with pytest.raises(ImageReadError, match="tzyx.tif.*one stack"):
        read_tiff(tmp_path / "tzyx.tif")


def test_lzw_stacks_and_imagej_channels(tmp_path):
    """tifffile cannot decode LZW without imagecodecs; OpenCV's fallback had returned the
    first page of a stack alone. An ImageJ channel axis of 3 is colour, not three planes."""
    from boxlevelset.data import read_tiff

    pages = [np.full((8, 10), 20 * i, np.uint8) for i in range(4)]
    cv2.imwritemulti(str(tmp_path / "lzw.tif"), pages)  # OpenCV writes LZW
    image, stack = read_tiff(tmp_path / "lzw.tif")
    assert stack and image.shape == (4, 8, 10)
    np.testing.assert_array_equal(image[3], pages[3])
    composite = np.arange(3 * 8 * 10, dtype=np.uint8).reshape(3, 8, 10)
    tifffile.imwrite(tmp_path / "cyx.tif", composite, imagej=True, metadata={"axes": "CYX"})
    image, stack = read_tiff(tmp_path / "cyx.tif")
    assert not stack and image.shape == (8, 10, 3)
    np.testing.assert_array_equal(image, np.moveaxis(composite, 0, -1))
    tifffile.imwrite(tmp_path / "zcyx.tif", np.zeros((5, 3, 8, 10), np.uint8), imagej=True,
                     metadata={"axes": "ZCYX"})
    assert read_tiff(tmp_path / "zcyx.tif")[0].shape == (5, 8, 10, 3)
    tifffile.imwrite(tmp_path / "c2.tif", np.zeros((2, 8, 10), np.uint8), imagej=True,
                     metadata={"axes": "CYX"})  # two stains: channels, never two slices
    assert read_tiff(tmp_path / "c2.tif")[0].shape == (8, 10, 2)


def test_pages_written_one_by_one_are_a_stack(tmp_path):
    """Acquisition scripts append planes one write at a time: each is its own tifffile
    series, and only the first had been read."""
    from boxlevelset.data import read_tiff

    for z in range(4):
        tifffile.imwrite(tmp_path / "z.tif", np.full((8, 10), z, np.uint16), append=z > 0)
    image, stack = read_tiff(tmp_path / "z.tif")
    assert stack and image.shape == (4, 8, 10) and list(image[:, 0, 0]) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- volumes


def _synthetic_ct(depth: int = 3, h: int = 8, w: int = 10) -> sitk.Image:
    arr = (np.arange(depth * h * w).reshape(depth, h, w) % 300 - 150).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 5.0, 30.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_volume_round_trip_keeps_geometry(tmp_path, suffix):
    ct = _synthetic_ct()
    sitk.WriteImage(ct, str(tmp_path / f"ct{suffix}"))
    vol = read_volume(tmp_path / f"ct{suffix}")
    assert isinstance(vol, Volume) and vol.array.dtype == np.float32 and vol.shape == (3, 8, 10)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ct))
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5))
    np.testing.assert_allclose(vol.origin, (-10.0, 5.0, 30.0))
    np.testing.assert_allclose(vol.direction, ct.GetDirection(), atol=1e-6)

    labels = np.zeros(vol.shape, np.int32)
    labels[1, 2:5, 3:7] = 1
    labels[2, 0:2, 0:2] = 300  # needs uint16
    out = write_label_volume(tmp_path / f"labels{suffix}", labels, like=vol)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.spacing, vol.spacing)
    np.testing.assert_allclose(back.origin, vol.origin)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"ct{suffix}",
                                                                 f"labels{suffix}"])
    with pytest.raises(ValueError, match="shape"):
        write_label_volume(tmp_path / f"x{suffix}", labels[:2], like=vol)
    # The same file under an upper-case name (SimpleITK knows only lower-case suffixes).
    upper = write_label_volume(tmp_path / f"LABELS{suffix.upper()}", labels, like=vol)
    np.testing.assert_array_equal(read_volume(upper).array, labels)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dicom_series_folder(tmp_path):
    ct = _synthetic_ct()
    ct.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    series = "1.2.826.0.1.3680043.2.1125.1.424242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(ct.GetSize()[2]):
        sl = ct[:, :, z]
        for tag, value in [("0020|000e", series), ("0020|000d", series + ".1"),
                           ("0008|0060", "CT"), ("0020|0013", str(z + 1)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.8\\0.7"),
                           ("0020|0032", "\\".join(str(v) for v in
                                                   ct.TransformIndexToPhysicalPoint((0, 0, z))))]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ct))
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5))
    np.testing.assert_allclose(vol.origin, (-10.0, 5.0, 30.0))


def test_volume_errors(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(ImageReadError, match="bad.nii.gz"):
        read_volume(tmp_path / "bad.nii.gz")
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_volume(tmp_path)
    with pytest.raises(ImageReadError, match="does not exist"):
        read_volume(tmp_path / "gone.nrrd")


def test_ct_entries_in_coco_folder(tmp_path):
    (tmp_path / "images").mkdir()
    sitk.WriteImage(_synthetic_ct(), str(tmp_path / "images" / "ct.nii.gz"))
    coco = {"images": [{"id": i + 1, "file_name": "ct.nii.gz", "width": 10, "height": 8,
                        "slice_index": i} for i in range(3)],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 3]}],
            "categories": [{"id": 1, "name": "liver"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    folder = load_box_folder(tmp_path, window=(0, 300))
    assert [r.slice_index for r in folder] == [0, 1, 2]
    hu = sitk.GetArrayFromImage(_synthetic_ct())[1]
    expected = np.round(np.clip((hu + 150) / 300, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(folder.load_image(folder.records[1]), expected)
    assert folder.volume(folder.records[0]) is folder.volume(folder.records[2])  # cached
    np.testing.assert_array_equal(folder.records[1].boxes, [[1, 1, 5, 4]])


@pytest.mark.skipif(not (DATA / "ct3slice-dev").is_dir(), reason="shared CT data not present")
def test_real_ct3slice_folder():
    folder = load_box_folder(DATA / "ct3slice-dev")
    assert len(folder) == 3 and sum(len(r.boxes) for r in folder) == 6
    assert folder.class_names == ["liver", "spine"]
    assert [r.slice_index for r in folder] == [0, 1, 2]
    rec = folder.records[0]
    image = folder.load_image(rec)
    assert image.shape == (512, 512) and image.dtype == np.uint8
    masks = folder.gt_masks(rec)
    vol = folder.volume(rec)
    liver_hu = np.median(vol.array[0][masks[0]])
    assert 0 < liver_hu < 200  # soft tissue, so the masks line up with the slice
    coco = json.loads((DATA / "ct3slice-dev" / "annotations.json").read_text())
    assert [a["area"] for a in folder.to_coco_gt()["annotations"]] == [
        float(mask_utils.area(a["segmentation"])) for a in coco["annotations"]]


def test_folder_given_as_json_path(tiny_box_folder, tmp_path):
    shutil.copy(tiny_box_folder / "annotations.json", tiny_box_folder / "val.json")
    assert len(load_box_folder(tiny_box_folder / "val.json")) == 3


def test_save_box_folder_with_ct_slices(tmp_path):
    sitk.WriteImage(_synthetic_ct(), str(tmp_path / "src.nrrd"))
    vol = read_volume(tmp_path / "src.nrrd")
    mask = np.zeros((1, 8, 10), bool)
    mask[0, 2:6, 3:8] = True
    items = [("ct.nii.gz", vol, [[3, 2, 8, 6]], [1], mask, 0),
             ("ct.nii.gz", vol, np.zeros((0, 4)), [], None, 2),
             ("photo.png", np.zeros((5, 5, 3), np.uint8), [[0, 0, 2, 2]], [1], None)]
    out = save_box_folder(tmp_path / "saved", items, [{"id": 1, "name": "liver"}])
    back = load_box_folder(out, window="abdomen")
    assert [(r.file_name, r.slice_index) for r in back] == [
        ("ct.nii.gz", 0), ("ct.nii.gz", 2), ("photo.png", None)]
    np.testing.assert_array_equal(back.gt_masks(back.records[0]), mask)
    np.testing.assert_array_equal(back.records[0].boxes, [[3, 2, 8, 6]])
    saved = back.volume(back.records[1])
    np.testing.assert_array_equal(saved.array, vol.array)
    np.testing.assert_allclose(saved.direction, vol.direction, atol=1e-6)
    np.testing.assert_allclose(saved.spacing, vol.spacing)
    assert back.load_image(back.records[1]).shape == (8, 10)
    with pytest.raises(ValueError, match="needs a Volume"):
        save_box_folder(tmp_path / "bad", [("x.nii.gz", vol.array, [], [], None, 0)], [])


def test_crowd_regions_kept_for_scoring_not_training(tmp_path):
    from boxlevelset.evaluate import coco_mask_ap
    from boxlevelset.export import masks_to_rle

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((20, 30), np.uint8))
    obj = np.zeros((20, 30), bool)
    obj[2:8, 2:10] = True
    crowd = np.zeros((20, 30), bool)
    crowd[10:18, 15:28] = True
    crowd_rle = masks_to_rle(crowd[None])[0]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 6],
             "segmentation": masks_to_rle(obj[None])[0], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [15, 10, 13, 8],
             "segmentation": crowd_rle, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    folder = load_box_folder(tmp_path)
    rec = folder.records[0]
    assert len(rec.boxes) == 1 and len(rec.crowd) == 1  # training sees one box
    gt = folder.to_coco_gt()
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    # The more confident detection lies on the crowd region: pycocotools ignores it, so the
    # object alone decides AP (1.0); had the crowd been dropped it would be a false positive.
    dets = [{"image_id": 1, "category_id": 1, "segmentation": masks_to_rle(m[None])[0],
             "score": s} for m, s in ((crowd, 0.9), (obj, 0.8))]
    assert coco_mask_ap(gt, dets)["AP"] == pytest.approx(1.0)
    no_crowd = dict(gt, annotations=gt["annotations"][:1])
    assert coco_mask_ap(no_crowd, dets)["AP"] < 0.9


def test_save_box_folder_writes_a_stack_once_and_reads_its_planes(tmp_path):
    """A z-stack that is not CT is saved whole, one multi-page TIFF in its own type, with an
    entry per annotated plane; each entry's image is its plane as it is (no CT window)."""
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 4000, (5, 8, 10)).astype(np.uint16)
    mask = np.zeros((1, 8, 10), bool)
    mask[0, 2:6, 3:8] = True
    items = [("cells.tif", stack, [[3, 2, 8, 6]], [1], mask, 1),
             ("cells.tif", stack, [[1, 1, 4, 4]], [1], None, 3)]
    out = save_box_folder(tmp_path / "saved", items, [{"id": 1, "name": "cell"}])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["cells.tif"]
    written = tifffile.imread(out / "images" / "cells.tif")
    assert written.dtype == np.uint16 and np.array_equal(written, stack)
    back = load_box_folder(out)
    assert [(r.file_name, r.plane, r.slice_index) for r in back] == [
        ("cells.tif", 1, None), ("cells.tif", 3, None)]
    for record in back:
        np.testing.assert_array_equal(back.load_image(record), stack[record.plane])
    np.testing.assert_array_equal(back.stack(back.records[0]), stack)
    np.testing.assert_array_equal(back.gt_masks(back.records[0]), mask)

    rgb = rng.integers(0, 256, (3, 8, 10, 3)).astype(np.uint8)  # colour planes too
    save_box_folder(tmp_path / "rgb", [("rgb.tif", rgb, [[1, 1, 4, 4]], [1], None, 2)],
                    [{"id": 1, "name": "cell"}])
    (record,) = load_box_folder(tmp_path / "rgb")
    np.testing.assert_array_equal(load_box_folder(tmp_path / "rgb").load_image(record), rgb[2])

    cats = [{"id": 1, "name": "cell"}]
    with pytest.raises(ValueError, match="cells.tif: plane 5 outside 0..4"):
        save_box_folder(tmp_path / "bad", [("cells.tif", stack, [], [], None, 5)], cats)
    with pytest.raises(ValueError, match="cells.tif: two different stacks"):
        save_box_folder(tmp_path / "bad", [("cells.tif", stack, [], [], None, 0),
                                           ("cells.tif", stack.copy(), [], [], None, 1)], cats)
    with pytest.raises(ValueError, match="cells.png: a stack of planes is written as .tif"):
        save_box_folder(tmp_path / "bad", [("cells.png", stack, [], [], None, 0)], cats)


def test_a_plane_outside_its_stack_is_skipped_naming_the_file(tmp_path):
    stack = np.zeros((3, 8, 10), np.uint8)
    items = [("z.tif", stack, [[1, 1, 4, 4]], [1], None, k) for k in (0, 2)]
    out = save_box_folder(tmp_path / "saved", items, [{"id": 1, "name": "cell"}])
    coco = json.loads((out / "annotations.json").read_text())
    coco["images"][1]["plane"] = 7  # edited by hand
    (out / "annotations.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match=r"z.tif: plane 7 outside 0..2"):
        folder = load_box_folder(out)
    assert [r.plane for r in folder] == [0]
