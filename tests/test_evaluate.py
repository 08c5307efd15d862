"""Evaluate: COCO mask AP against pycocotools and hand-computed cases, VOC AP, IoUs."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from boxlevelset.data import load_box_folder
from boxlevelset.evaluate import coco_mask_ap, matched_ious, mask_iou, voc_mask_ap
from boxlevelset.export import coco_results, masks_to_rle


def _gt(masks_per_image: list[np.ndarray], cats_per_image: list[list[int]] | None = None,
        categories=({"id": 1, "name": "a"},)) -> dict:
    images, anns = [], []
    for i, masks in enumerate(masks_per_image, start=1):
        h, w = masks.shape[1:]
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        cats = cats_per_image[i - 1] if cats_per_image else [1] * len(masks)
        for rle, m, c in zip(masks_to_rle(masks), masks, cats):
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "iscrowd": 0,
                         "segmentation": rle, "area": float(m.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                                  float(np.ptp(ys) + 1)]})
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in categories]}


def _squares(boxes: list[tuple[int, int, int, int]], h: int = 40, w: int = 40) -> np.ndarray:
    masks = np.zeros((len(boxes), h, w), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    return masks


def test_perfect_predictions_score_one(tiny_box_folder):
    folder = load_box_folder(tiny_box_folder)
    results = []
    for rec in folder:
        masks = folder.gt_masks(rec)
        results += coco_results(rec.image_id, masks, np.linspace(0.9, 0.5, len(masks)),
                                rec.category_ids)
    gt = folder.to_coco_gt()
    ap = coco_mask_ap(gt, results)
    assert set(ap) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert ap["AP"] == ap["AP50"] == ap["AP75"] == ap["APs"] == 1.0
    assert ap["APm"] == ap["APl"] == -1.0  # no object of 32^2 px or more: undefined
    assert voc_mask_ap(gt, results) == {"AP25": 1.0, "AP50": 1.0, "AP70": 1.0, "AP75": 1.0}
    assert gt["annotations"][0]["segmentation"]["counts"]  # input left unmodified
    assert isinstance(gt["annotations"][0]["segmentation"]["counts"], str)


def test_half_recall_hand_checked():
    # Two GT objects, one predicted perfectly: precision 1 up to recall 0.5, nothing after.
    gt_masks = _squares([(2, 2, 12, 12), (20, 20, 30, 30)])
    gt = _gt([gt_masks])
    results = coco_results(1, gt_masks[:1], [0.9], [1])
    ap = coco_mask_ap(gt, results)
    # COCO samples precision at 101 recall points 0, 0.01, ..., 1: 51 of them are <= 0.5.
    assert ap["AP50"] == pytest.approx(51 / 101)
    assert ap["AP"] == pytest.approx(51 / 101)
    voc = voc_mask_ap(gt, results, iou_thresholds=(0.5,))
    assert voc == {"AP50": pytest.approx(0.5)}
    assert voc_mask_ap(gt, [], iou_thresholds=(0.5,)) == {"AP50": 0.0}
    assert coco_mask_ap(gt, [])["AP"] == 0.0


def test_voc_ap_hand_checked():
    gt_masks = _squares([(0, 0, 10, 10), (20, 20, 30, 30)])
    gt = _gt([gt_masks])
    partial = np.zeros((1, 40, 40), bool)
    partial[0, 20:30, 20:26] = True  # IoU 0.6 with the second GT object
    preds = np.concatenate([gt_masks[:1], _squares([(32, 0, 38, 6)]), partial])
    results = coco_results(1, preds, [0.9, 0.8, 0.7], [1, 1, 1])
    voc = voc_mask_ap(gt, results)
    # At IoU <= 0.6: TP, FP, TP -> PR points (0.5, 1), (0.5, 1/2), (1, 2/3).
    assert voc["AP25"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc["AP50"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # At 0.7 and 0.75 the partial mask is a miss: only recall 0.5 at precision 1.
    assert voc["AP70"] == pytest.approx(0.5) and voc["AP75"] == pytest.approx(0.5)
    eleven = voc_mask_ap(gt, results, iou_thresholds=(0.5,), eleven_point=True)
    assert eleven["AP50"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # A duplicate of an already matched object is a false positive.
    dup = coco_results(1, np.concatenate([gt_masks, gt_masks[:1]]), [0.9, 0.8, 0.95], [1, 1, 1])
    assert voc_mask_ap(gt, dup, iou_thresholds=(0.5,))["AP50"] == pytest.approx(
        0.5 * 1 + 0.5 * 2 / 3)


def test_matches_pycocotools_printed_summary():
    rng = np.random.default_rng(3)
    gt_list, res = [], []
    for image_id in (1, 2, 3):
        boxes = []
        for _ in range(6):
            x, y = rng.integers(0, 100, 2)
            s = int(rng.integers(4, 40))
            boxes.append((x, y, x + s, y + s))
        masks = _squares(boxes, 140, 140)
        gt_list.append(masks)
        # Noisy predictions: shifted copies, one missed, one spurious, varied scores.
        pred = np.roll(masks[1:], shift=int(rng.integers(0, 4)), axis=2)
        pred = np.concatenate([pred, _squares([(120, 120, 135, 138)], 140, 140)])
        res += coco_results(image_id, pred, rng.random(len(pred)), [1] * len(pred))
    gt = _gt(gt_list)

    # pycocotools' own run with its defaults (maxDets 100: these images hold < 100 objects).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_gt = COCO()
        coco_gt.dataset = {k: list(v) for k, v in gt.items()}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in res]), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    printed = [float(v) for v in re.findall(r"Average Precision.*= ([-\d.]+)", out.getvalue())]
    ours = coco_mask_ap(gt, res)
    assert 0.05 < ours["AP"] < 0.95  # a non-trivial case
    for key, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), printed):
        assert round(ours[key], 3) == pytest.approx(value, abs=1e-9), key
    np.testing.assert_allclose([ours[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")],
                               evaluator.stats[:6])


def test_max_dets_above_100_matters():
    # 150 tiny objects in one image, all predicted perfectly.
    boxes = [(8 * c + 1, 8 * r + 1, 8 * c + 6, 8 * r + 6) for r in range(10) for c in range(15)]
    masks = _squares(boxes, 80, 120)
    gt = _gt([masks])
    results = coco_results(1, masks, np.linspace(1.0, 0.1, 150), [1] * 150)
    assert coco_mask_ap(gt, results, max_dets=1000)["AP"] == 1.0
    capped = coco_mask_ap(gt, results, max_dets=100)["AP"]
    assert capped < 0.7  # recall capped at 100/150


def test_bad_results_are_rejected():
    gt = _gt([_squares([(0, 0, 5, 5)])])
    good = coco_results(1, _squares([(0, 0, 5, 5)]), [0.5], [1])
    with pytest.raises(ValueError, match="category_id 0"):
        coco_mask_ap(gt, [{**good[0], "category_id": 0}])
    with pytest.raises(ValueError, match="image_id 4"):
        coco_mask_ap(gt, [{**good[0], "image_id": 4}])
    no_masks = {**gt, "annotations": [{k: v for k, v in a.items() if k != "segmentation"}
                                      for a in gt["annotations"]]}
    with pytest.raises(ValueError, match="no segmentation"):
        coco_mask_ap(no_masks, good)


def test_multi_category_mean():
    gt_masks = _squares([(0, 0, 10, 10), (20, 20, 30, 30)])
    cats = ({"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "unused"})
    gt = _gt([gt_masks], [[1, 2]], cats)
    # Category 1 perfect, category 2 predicted with the wrong class -> AP 1 and 0, mean 0.5.
    results = coco_results(1, gt_masks, [0.9, 0.8], [1, 1])
    assert coco_mask_ap(gt, results)["AP"] == pytest.approx(0.5)
    assert voc_mask_ap(gt, results)["AP50"] == pytest.approx(0.5)


def test_mask_iou_and_matched_ious():
    a = np.zeros((6, 6), bool)
    a[0:2, 0:4] = True  # 8 px
    b = np.zeros((6, 6), bool)
    b[1:3, 0:4] = True  # 8 px, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0
    matrix = mask_iou(np.stack([a, b]), np.stack([b, a, np.zeros_like(a)]))
    np.testing.assert_allclose(matrix, [[1 / 3, 1, 0], [1, 1 / 3, 0]])
    np.testing.assert_allclose(matched_ious([a, b], [b, b]), [1 / 3, 1.0])
    with pytest.raises(ValueError, match="2 ground-truth masks but 1"):
        matched_ious([a, b], [a])
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, np.zeros((5, 6), bool))


def test_matched_ious_and_results_of_masks_over_their_boxes():
    # Box-prompted evaluation keeps masks over their boxes (BoxMasks): the same IoUs and
    # COCO results as the whole-image masks, boxes apart, overlapping, nested or empty.
    from boxlevelset.export import BoxMasks

    rng = np.random.default_rng(0)
    gt = BoxMasks.from_labels(rng.integers(0, 4, (30, 40)) * (rng.random((30, 40)) < 0.3),
                              [1, 2, 3, 9])
    pred = BoxMasks(np.array([[0, 0, 40, 30], [5, 5, 20, 12], [30, 20, 40, 30], [1, 1, 2, 2]]),
                    [rng.random((30, 40)) < 0.2, rng.random((7, 15)) < 0.5,
                     rng.random((10, 10)) < 0.5, np.zeros((1, 1), bool)], (30, 40))
    whole = matched_ious(np.stack(gt.to_masks()), np.stack(pred.to_masks()))
    np.testing.assert_array_equal(matched_ious(gt, pred), whole)
    assert whole[3] == 0.0 and (whole[:3] > 0).all()
    assert coco_results(7, pred, [1, 1, 1, 1], [2, 2, 2, 2]) == coco_results(
        7, np.stack(pred.to_masks()), [1, 1, 1, 1], [2, 2, 2, 2])
    with pytest.raises(ValueError, match="3 predictions"):
        matched_ious(gt, BoxMasks(pred.bounds[:3], pred.crops[:3], (30, 40)))
