"""Input/output checks as users of COCO tools, microscopy and CT would make them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from boxlevelset.cli import main
from boxlevelset.data import load_box_folder, read_image
from boxlevelset.evaluate import coco_mask_ap, voc_mask_ap
from boxlevelset.export import write_coco


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco_folder(root: Path, images: list[dict], annotations: list[dict],
                 categories: list[dict] | None = None) -> Path:
    """images/ with a dark 50x70 PNG per image entry, and annotations.json."""
    (root / "images").mkdir(parents=True)
    for im in images:
        picture = np.zeros((im["height"], im["width"], 3), np.uint8)
        picture[10:30, 10:30] = 200
        cv2.imwrite(str(root / "images" / im["file_name"]), picture)
    coco = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "a"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_duplicate_image_ids_are_refused_when_the_folder_loads(tmp_path: Path) -> None:
    # Before: both images got both boxes, every image was segmented, and only the final
    # masks.json write failed with "image ids must be unique", naming neither.
    images = [{"id": 7, "file_name": "a.png", "width": 70, "height": 50},
              {"id": 7, "file_name": "b.png", "width": 70, "height": 50}]
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 20]}]
    root = _coco_folder(tmp_path / "dup", images, anns)
    with pytest.raises(ValueError, match=r"image id 7 is used twice \('a.png' and 'b.png'\)"):
        load_box_folder(root)
    with pytest.raises(ValueError, match="7 is used by 'a.png' and 'b.png'"):
        write_coco(tmp_path / "x.json", images, [], [{"id": 1, "name": "a"}])


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder in which creating a file fails: a read-only one, or sysfs for root."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (ro, Path("/sys")):
        try:
            (folder / ".probe").touch()
        except OSError:
            return folder
        (folder / ".probe").unlink()
    pytest.skip("no folder this user cannot write to")


def test_write_into_read_only_folder_names_the_destination(tmp_path: Path) -> None:
    folder = _unwritable_folder(tmp_path)
    target = folder / "masks.json"
    try:
        with pytest.raises(OSError) as info:
            write_coco(target, [], [], [])
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)
    # Before: "[Errno 13] Permission denied: '<folder>/.masks.json.k2j4x9.json'".
    assert str(target) in str(info.value)
    assert ".masks.json." not in str(info.value)


def test_folder_ground_truth_keeps_the_files_area(tmp_path: Path) -> None:
    # A COCO rectangle polygon 31.5 x 32.5: its stated area (the polygon's, 1023.75 px) is
    # small, its rasterised mask (1056 px) medium; pycocotools splits by the stated area.
    poly = [10.0, 10.0, 41.5, 10.0, 41.5, 42.5, 10.0, 42.5]
    area = 31.5 * 32.5
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], 100, 100))
    assert area < 32 ** 2 < mask_utils.area(rle)
    ann = {"id": 1, "image_id": 1, "category_id": 1, "area": area, "iscrowd": 0,
           "bbox": [10.0, 10.0, 31.5, 32.5], "segmentation": [poly]}
    root = _coco_folder(tmp_path / "poly", [{"id": 1, "file_name": "p.png", "width": 100,
                                            "height": 100}], [ann])
    gt_file = json.loads((root / "annotations.json").read_text())
    gt_folder = load_box_folder(root).to_coco_gt()
    assert gt_folder["annotations"][0]["area"] == pytest.approx(area)
    results = [{"image_id": 1, "category_id": 1, "score": 0.9,
                "segmentation": _rle(mask_utils.decode(rle))}]
    assert coco_mask_ap(gt_folder, results) == coco_mask_ap(gt_file, results)
    assert coco_mask_ap(gt_folder, results)["APs"] == pytest.approx(1.0)


def test_segment_takes_a_coco_json_file(tiny_box_folder: Path, tmp_path: Path) -> None:
    # load_box_folder (train, evaluate) reads a COCO .json path; segment said "image files
    # need --boxes".
    out = tmp_path / "out"
    assert main(["segment", str(tiny_box_folder / "annotations.json"), "-o", str(out),
                 "--iterations", "2"]) == 0
    coco = json.loads((out / "masks.json").read_text())
    source = json.loads((tiny_box_folder / "annotations.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == \
        [im["file_name"] for im in source["images"]]
    assert len(coco["annotations"]) == len(source["annotations"])


def test_segment_keeps_same_named_images_apart(tmp_path: Path) -> None:
    picture = np.zeros((50, 70, 3), np.uint8)
    picture[10:30, 10:30] = 200
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "img.png"), picture)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png"),
                 "--boxes", "[[8, 8, 32, 32]]", "-o", str(out), "--iterations", "2"]) == 0
    coco = json.loads((out / "masks.json").read_text())
    # Before: both entries were "img.png", so masks.json could not tell them apart.
    assert [im["file_name"] for im in coco["images"]] == ["a/img.png", "b/img.png"]
    assert len(list((out / "labels").iterdir())) == 2


def test_exif_size_mismatch_says_why(tmp_path: Path) -> None:
    # A phone photo stored 60x40 and tagged "rotate 90": read upright as 40x60. A COCO file
    # from a tool that ignores EXIF says 60x40; the warning must say where 40x60 comes from.
    (tmp_path / "ex" / "images").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(
        tmp_path / "ex" / "images" / "phone.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "ex" / "images" / "phone.jpg").shape == (60, 40, 3)
    coco = {"images": [{"id": 1, "file_name": "phone.jpg", "width": 60, "height": 40},
                       {"id": 2, "file_name": "phone.jpg", "width": 40, "height": 60}],
            "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "ex" / "annotations.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match="after its EXIF orientation is applied"):
        folder = load_box_folder(tmp_path / "ex")
    assert [r.image_id for r in folder.records] == [2]


def test_plain_folder_leaves_out_hidden_files(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "cells.png"), np.zeros((20, 30), np.uint8))
    # What macOS writes beside each image on a USB disk (AppleDouble), and a dotfile.
    (tmp_path / "._cells.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (tmp_path / ".thumb.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "skipping unreadable image" for each
        folder = load_box_folder(tmp_path)
    assert [r.file_name for r in folder.records] == ["cells.png"]


def test_single_plane_tiff_with_a_z_axis_reads_as_an_image(tmp_path: Path) -> None:
    plane = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    tifffile.imwrite(tmp_path / "one.tif", plane[None])  # numpy's (1, H, W)
    np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), plane)


def test_voc_ap_ignores_a_detection_inside_a_crowd_region() -> None:
    h, w = 80, 100

    def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        return m

    gt = {"images": [{"id": 1, "file_name": "c.png", "width": w, "height": h}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
               "segmentation": _rle(box(5, 25, 5, 25))},
              {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0,
               "segmentation": _rle(box(5, 35, 40, 60))},
              {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1,
               "segmentation": _rle(box(40, 75, 10, 90))}]}

    def det(mask: np.ndarray, score: float) -> dict:
        return {"image_id": 1, "category_id": 1, "segmentation": _rle(mask), "score": score}

    results = [det(box(45, 60, 20, 40), 0.95),  # one object of the crowd: ignored
               det(box(5, 25, 5, 24), 0.9),     # TP
               det(box(0, 10, 80, 95), 0.7),    # FP
               det(box(5, 30, 40, 55), 0.5)]    # IoU 0.625: TP at 0.5, FP at 0.75
    # By hand, AP50: TP, FP, TP of 2 -> precision 1 at recall 0.5, 2/3 at recall 1.
    voc = voc_mask_ap(gt, results, iou_thresholds=(0.5, 0.75))
    assert voc["AP50"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc["AP75"] == pytest.approx(0.5)
    # Before, the crowd detection was a false positive (plain IoU 300/2800): AP50 0.5.


def test_boxes_per_file_name_tell_same_named_images_apart(tmp_path: Path) -> None:
    picture = np.zeros((50, 70, 3), np.uint8)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "img.png"), picture)
    inputs = [str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png")]
    out = tmp_path / "out"
    boxes = {"a/img.png": [[8, 8, 32, 32]], "b/img.png": [[38, 18, 67, 47], [8, 8, 32, 32]]}
    assert main(["segment", *inputs, "--boxes", json.dumps(boxes), "-o", str(out),
                 "--iterations", "2"]) == 0
    coco = json.loads((out / "masks.json").read_text())
    # Before: keys were cut to "img.png", so b's two boxes went to both images.
    assert [a["image_id"] for a in coco["annotations"]] == [1, 2, 2]
    # A bare name that fits both is an error, not a guess.
    assert main(["segment", *inputs, "--boxes", '{"img.png": [[8, 8, 32, 32]]}',
                 "-o", str(out)]) == 2


def test_flat_polygon_is_a_clear_error(tmp_path: Path) -> None:
    # [x, y, x, y, ...] without the outer list, as some converters write it: pycocotools
    # raised TypeError, which `boxlevelset evaluate` showed as a traceback.
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
           "segmentation": [10, 10, 30, 10, 30, 30, 10, 30]}
    root = _coco_folder(tmp_path / "flat", [{"id": 1, "file_name": "f.png", "width": 70,
                                            "height": 50}], [ann])
    with pytest.raises(ValueError, match=r"f.png: annotation 0: .*list of polygons"):
        load_box_folder(root).to_coco_gt()


def test_an_input_that_per_file_boxes_do_not_name_is_warned_about(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.full((20, 30), 90, np.uint8))
    boxes = json.dumps({"a.png": [[2, 2, 12, 12]]})
    with pytest.warns(UserWarning, match=r"no boxes for .*b\.png; it gets no masks"):
        rc = main(["segment", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                   "--boxes", boxes, "-o", str(tmp_path / "out")])
    assert rc == 0


@pytest.mark.parametrize("broken, field", [
    ({"annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5]}]}, "category_id"),
    ({"images": [{"id": 1, "width": 20, "height": 20}]}, "file_name"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                       "bbox": ["a", 1, 5, 5]}]}, "could not convert"),
])
def test_a_malformed_coco_entry_is_an_error_naming_the_file(tmp_path: Path, broken, field):
    """A missing field had ended the command line in a KeyError traceback."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 20), 90, np.uint8))
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
            "annotations": [], "categories": [{"id": 1, "name": "x"}], **broken}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"annotations.json: .*{field}"):
        load_box_folder(tmp_path)
    assert main(["segment", str(tmp_path), "-o", str(tmp_path / "out")]) == 2


def test_bad_boxes_for_one_file_name_that_file(tmp_path: Path, capsys) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 30), 90, np.uint8))
    boxes = json.dumps({"a.png": [[1, 2, 3]]})
    assert main(["segment", str(tmp_path / "a.png"), "--boxes", boxes,
                 "-o", str(tmp_path / "out")]) == 2
    assert "boxes for a.png" in capsys.readouterr().err


def test_a_list_model_option_without_json_brackets_says_how() -> None:
    import argparse

    from boxlevelset.train import _key_value

    with pytest.raises(argparse.ArgumentTypeError, match=r"num_grids=\[12,10,8\]"):
        _key_value("num_grids=12,10,8")
    assert _key_value("num_grids=[12,10,8]") == ("num_grids", (12, 10, 8))


def test_a_bad_window_is_not_blamed_on_the_annotation_file(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 20), 90, np.uint8))
    (tmp_path / "annotations.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
         "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(ValueError, match="^unknown window preset 'foo'"):
        load_box_folder(tmp_path, window="foo")
