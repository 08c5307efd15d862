"""Export: atomic writes, RLE, COCO JSON round trip, label images."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils

from boxlevelset.export import (
    BoxMasks,
    _rle_string_counts,
    atomic_write,
    coco_results,
    masks_to_labels,
    masks_to_rle,
    read_coco_masks,
    segmentation_to_rle,
    write_coco,
    write_label_image,
)


def _random_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        masks[i, y0:y0 + rng.integers(2, 8), x0:x0 + rng.integers(2, 8)] = True
        masks[i] ^= rng.random((h, w)) < 0.02  # irregular shapes, not just rectangles
    return masks


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    with atomic_write(target) as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp left behind
    with pytest.raises(ValueError):
        with atomic_write(target, "r"):
            pass


def test_masks_to_rle_round_trip():
    masks = _random_masks(5, 23, 31)
    rles = masks_to_rle(masks)
    assert len(rles) == 5 and all(isinstance(r["counts"], str) for r in rles)
    json.dumps(rles)  # serialisable
    decoded = np.stack([mask_utils.decode(r) for r in rles]).astype(bool)
    np.testing.assert_array_equal(decoded, masks)
    assert masks_to_rle(np.zeros((0, 4, 4), bool)) == []


def test_polygon_and_uncompressed_rle_convert():
    poly = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]  # rectangle
    rle = segmentation_to_rle(poly, 10, 12)
    assert rle["size"] == [10, 12] and mask_utils.area(rle) > 0
    m = mask_utils.decode(rle).astype(bool)
    uncompressed = {"size": [10, 12], "counts": [int(v) for v in _runs(m)]}
    np.testing.assert_array_equal(mask_utils.decode(segmentation_to_rle(uncompressed, 10, 12)), m)
    with pytest.raises(ValueError, match="size"):
        segmentation_to_rle(rle, 11, 12)


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.int8)  # column-major like COCO
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change])).tolist()


def test_coco_results_fields():
    masks = _random_masks(3, 20, 20, seed=1)
    res = coco_results(7, masks, [0.9, 0.5, 0.1], [1, 2, 1])
    assert [r["category_id"] for r in res] == [1, 2, 1]
    assert [r["score"] for r in res] == [0.9, 0.5, 0.1]
    for r, m in zip(res, masks):
        assert r["image_id"] == 7 and r["area"] == m.sum()
        ys, xs = np.nonzero(m)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    with pytest.raises(ValueError, match="length"):
        coco_results(1, masks, [0.5], [1, 2, 1])


def test_write_coco_then_read_coco_masks_identical(tmp_path):
    m1, m2 = _random_masks(4, 30, 40, seed=2), _random_masks(2, 16, 16, seed=3)
    images = [{"id": 1, "file_name": "a.png", "height": 30, "width": 40},
              {"id": 2, "file_name": "b.png", "height": 16, "width": 16},
              {"id": 3, "file_name": "empty.png", "height": 8, "width": 9}]
    annotations = [
        {"image_id": 1, "masks": m1, "category_ids": [1, 2, 2, 1], "scores": [.9, .8, .7, .6]},
        {"image_id": 2, "mask": m2[0], "category_id": 2},
        {"image_id": 2, "mask": m2[1], "category_id": 1, "score": 0.3},
    ]
    cats = [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
    path = write_coco(tmp_path / "out" / "pred.json", images, annotations, cats)
    coco = json.loads(path.read_text())
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 7))
    assert coco["annotations"][0]["score"] == 0.9 and "score" not in coco["annotations"][4]
    assert coco["annotations"][0]["area"] == m1[0].sum()
    assert coco["categories"] == cats
    back = read_coco_masks(path)
    np.testing.assert_array_equal(back["a.png"][0], m1)
    np.testing.assert_array_equal(back["a.png"][1], [1, 2, 2, 1])
    np.testing.assert_array_equal(back["b.png"][0], m2)
    np.testing.assert_array_equal(back["b.png"][1], [2, 1])
    assert back["empty.png"][0].shape == (0, 8, 9)
    with pytest.raises(ValueError, match="category ids"):
        write_coco(tmp_path / "bad.json", images, [{"image_id": 1, "mask": m1[0],
                                                    "category_id": 5}], cats)
    with pytest.raises(ValueError, match="image_id 9"):
        write_coco(tmp_path / "bad.json", images, [{"image_id": 9, "mask": m1[0]}], cats)
    assert not (tmp_path / "bad.json").exists()


def test_write_coco_takes_numpy_numbers_in_image_fields(tmp_path):
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    images = [{"id": np.int64(1), "file_name": "a.png", "height": np.int64(3),
               "width": np.int32(4), "slice_index": np.int64(7)}]
    path = write_coco(tmp_path / "p.json", images,
                      [{"image_id": 1, "mask": mask, "category_id": 1}], [{"id": 1, "name": "x"}])
    coco = json.loads(path.read_text())
    assert coco["images"][0]["slice_index"] == 7 and coco["images"][0]["width"] == 4


def test_label_image_with_a_name_near_the_length_limit(tmp_path):
    name = "x" * 240 + ".png"  # fits the 255-byte limit; a temporary name must too
    write_label_image(tmp_path / name, np.ones((4, 5), np.int32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_read_coco_masks_rejects_non_coco(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="x.json"):
        read_coco_masks(bad)


def test_masks_to_labels_first_mask_wins():
    masks = np.zeros((3, 4, 5), bool)
    masks[0, 0:2, 0:2] = True
    masks[1, 1:3, 1:3] = True  # overlaps mask 0 at (1, 1)
    masks[2, 3, 4] = True
    labels = masks_to_labels(masks)
    assert labels.dtype == np.int32
    expected = np.zeros((4, 5), np.int32)
    expected[0:2, 0:2] = 1
    expected[1:3, 1:3][expected[1:3, 1:3] == 0] = 2
    expected[3, 4] = 3
    np.testing.assert_array_equal(labels, expected)


def test_write_label_image_png_and_tiff(tmp_path):
    labels = np.arange(12 * 9, dtype=np.int32).reshape(12, 9) * 500  # up to 53,500 > uint8
    png = write_label_image(tmp_path / "labels.png", labels)
    back = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    tif = write_label_image(tmp_path / "labels.tif", labels)
    np.testing.assert_array_equal(tifffile.imread(tif), labels)
    big = labels * 10  # beyond uint16: TIFF keeps it, PNG refuses
    np.testing.assert_array_equal(tifffile.imread(write_label_image(tmp_path / "b.tiff", big)), big)
    with pytest.raises(ValueError, match="16-bit"):
        write_label_image(tmp_path / "big.png", big)
    with pytest.raises(ValueError, match="jpg"):
        write_label_image(tmp_path / "labels.jpg", labels)


def test_box_masks_give_the_rle_and_labels_of_their_whole_image_masks():
    # Masks kept over their boxes: RLE (run starts and ends, column-major) and labels come
    # from the crops, equal to those of the HxW masks, boxes on the image's edges included
    # (a run down a whole column goes on into the next one), empty and full boxes too.
    rng = np.random.default_rng(0)
    for trial in range(400):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        bounds, crops, full = [], [], []
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
            crop = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.0, 0.4, 0.8, 1.0])
            mask = np.zeros((h, w), bool)
            mask[y0:y1, x0:x1] = crop
            bounds.append([x0, y0, x1, y1])
            crops.append(crop)
            full.append(mask)
        masks = BoxMasks(np.array(bounds), crops, (h, w))
        assert masks.to_rle() == masks_to_rle(np.stack(full)), trial
        np.testing.assert_array_equal(masks.to_labels(), masks_to_labels(np.stack(full)))
        assert all((a == b).all() for a, b in zip(masks.to_masks(), full))
        # ... and back: each RLE decoded over its own box, compressed or as plain counts.
        rles = masks.to_rle()
        plain = [{"size": [h, w], "counts": _rle_string_counts(r["counts"])} for r in rles]
        for given in (rles, plain):
            back = BoxMasks.from_rle(given, (h, w))
            assert all((a == b).all() for a, b in zip(back.to_masks(), full)), trial
            assert all(c.size == 0 or (c[0].any() and c[-1].any() and c[:, 0].any()
                                       and c[:, -1].any()) for c in back.crops)  # tight
    empty = BoxMasks(np.zeros((0, 4), np.int64), [], (5, 7))
    assert len(empty) == 0 and empty.to_rle() == [] and empty.to_labels().shape == (5, 7)


def test_overlay_from_box_masks_equals_overlay_from_whole_masks():
    from boxlevelset.predict import overlay_image

    rng = np.random.default_rng(1)
    image = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    bounds = np.array([[0, 0, 12, 30], [5, 3, 40, 20], [30, 25, 40, 30]])  # image edges too
    crops = [rng.random((y1 - y0, x1 - x0)) < 0.7 for x0, y0, x1, y1 in bounds]
    masks = BoxMasks(bounds, crops, (30, 40))
    whole = overlay_image(image, np.stack(masks.to_masks()))
    np.testing.assert_array_equal(overlay_image(image, masks), whole)
    untouched = ~np.stack(masks.to_masks()).any(0)
    assert (whole[untouched] == image[untouched]).all() and (whole != image).any()


def test_rle_string_counts_read_large_and_falling_counts():
    # Counts stored as differences, several characters each: a 3000x4000 mask with a hole.
    mask = np.zeros((3000, 4000), bool)
    mask[100:2900, 5:3990] = True
    mask[1500:1600, 2000:2100] = False
    rle = masks_to_rle(mask[None])[0]
    plain = mask_utils.frPyObjects({"size": [3000, 4000],
                                    "counts": _rle_string_counts(rle["counts"])}, 3000, 4000)
    np.testing.assert_array_equal(mask_utils.decode(plain), mask)
    back = BoxMasks.from_rle([rle], (3000, 4000))
    assert back.bounds.tolist() == [[5, 100, 3990, 2900]]
    np.testing.assert_array_equal(back.full(0), mask)


def test_box_masks_select_and_from_masks():
    rng = np.random.default_rng(2)
    whole = rng.random((4, 9, 11)) < 0.4
    masks = BoxMasks.from_masks(whole, (9, 11))
    assert masks.bounds.tolist() == [[0, 0, 11, 9]] * 4 and BoxMasks.from_masks(masks, (9, 11)) \
        is masks
    picked = masks.select([3, 1])
    assert all((a == b).all() for a, b in zip(picked.to_masks(), whole[[3, 1]]))
    flagged = masks.select(np.array([True, False, False, True]))
    assert all((a == b).all() for a, b in zip(flagged.to_masks(), whole[[0, 3]]))
    assert len(masks.select([])) == 0 and masks.select([]).bounds.shape == (0, 4)
    np.testing.assert_array_equal(masks.to_array(), whole)
    empty = masks.select([]).to_array()
    assert empty.shape == (0, 9, 11) and empty.dtype == bool
