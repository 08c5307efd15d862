"""Scoring instance masks: COCO mask AP (pycocotools), VOC-style mask AP, plain IoUs.

COCOeval's default caps detections at 100 per image, which silently caps recall on microscopy
images holding hundreds of nuclei, so coco_mask_ap raises the cap (max_dets, 1000 by default).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .export import BoxMasks, crop_overlap, segmentation_to_rle

def _quiet() -> contextlib.AbstractContextManager:
    # pycocotools prints progress ("creating index...", timings) on stdout.
    return contextlib.redirect_stdout(io.StringIO())


def _prepare_gt(gt_coco: dict) -> tuple[dict, dict[int, dict]]:
    """Copy the GT dict with RLE segmentations, area and iscrowd filled in; check it."""
    if not isinstance(gt_coco, dict) or "images" not in gt_coco:
        raise ValueError("gt_coco must be a COCO dict with 'images', 'annotations', 'categories'")
    images = {int(im["id"]): im for im in gt_coco["images"]}
    anns = []
    for ann in gt_coco.get("annotations", []):
        if ann.get("segmentation") is None:
            raise ValueError(
                f"ground-truth annotation {ann.get('id')} (image {ann.get('image_id')}) has no "
                "segmentation; mask AP needs a mask for every ground-truth instance"
            )
        image = images.get(int(ann["image_id"]))
        if image is None:
            raise ValueError(f"ground-truth annotation {ann.get('id')} refers to unknown image")
        rle = segmentation_to_rle(ann["segmentation"], int(image["height"]), int(image["width"]))
        anns.append({**ann, "segmentation": rle, "iscrowd": int(ann.get("iscrowd", 0)),
                     "area": float(ann.get("area", mask_utils.area(rle))),
                     "bbox": ann.get("bbox", [float(v) for v in mask_utils.toBbox(rle)])})
    for i, ann in enumerate(anns, start=1):
        ann["id"] = i  # pycocotools needs unique, non-zero ids
    gt = {"images": list(gt_coco["images"]), "annotations": anns,
          "categories": list(gt_coco.get("categories", []))}
    return gt, images


def _prepare_results(results: Sequence[dict], gt: dict, images: dict[int, dict]) -> list[dict]:
    """Copy results with RLE segmentations, area, bbox and ids; reject unknown images/classes."""
    cat_ids = {int(c["id"]) for c in gt["categories"]}
    out = []
    for i, res in enumerate(results, start=1):
        image = images.get(int(res["image_id"]))
        if image is None:
            raise ValueError(f"result {i - 1} refers to image_id {res['image_id']}, not in the GT")
        if int(res["category_id"]) not in cat_ids:
            raise ValueError(
                f"result {i - 1} has category_id {res['category_id']}, not among the GT category "
                f"ids {sorted(cat_ids)} (0-based labels must be mapped to category ids)"
            )
        missing = {"score", "segmentation"} - set(res)
        if missing:
            raise ValueError(f"result {i - 1} lacks {sorted(missing)}")
        rle = segmentation_to_rle(res["segmentation"], int(image["height"]), int(image["width"]))
        out.append({"id": i, "image_id": int(res["image_id"]),
                    "category_id": int(res["category_id"]), "score": float(res["score"]),
                    "segmentation": rle, "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    return out


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def coco_mask_ap(gt_coco: dict, results: Sequence[dict], max_dets: int = 1000) -> dict:
    """COCO mask AP of `results` against `gt_coco`, via pycocotools' COCOeval ("segm").

    gt_coco: COCO dict (images, annotations with segmentation as RLE or polygons,
    categories), e.g. BoxFolder.to_coco_gt(). results: COCO result dicts (image_id,
    category_id, segmentation, score), e.g. from export.coco_results. maxDets is
    [1, 10, max_dets] and every number is read at max_dets. Returns floats AP, AP50, AP75,
    APs, APm, APl in [0, 1], or -1.0 where undefined (no ground truth in that range).
    """
    if max_dets < 1:
        raise ValueError(f"max_dets must be positive, got {max_dets}")
    gt_dict, images = _prepare_gt(gt_coco)
    dt_dict = {"images": gt_dict["images"], "categories": gt_dict["categories"],
               "annotations": _prepare_results(results, gt_dict, images)}
    evaluator = COCOeval(_coco(gt_dict), _coco(dt_dict), iouType="segm")
    evaluator.params.maxDets = [1, 10, int(max_dets)]
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    # Read the numbers from the precision array ourselves: COCOeval.summarize() asks for
    # maxDets=100 for the headline AP and returns -1 when 100 is not in the list.
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, maxdets]
    params = evaluator.params
    area_index = {name: i for i, name in enumerate(params.areaRngLbl)}

    def mean_ap(iou: float | None, area: str) -> float:
        p = precision[:, :, :, area_index[area], -1]
        if iou is not None:
            p = p[np.flatnonzero(np.isclose(params.iouThrs, iou))]
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else -1.0

    return {
        "AP": mean_ap(None, "all"),
        "AP50": mean_ap(0.5, "all"),
        "AP75": mean_ap(0.75, "all"),
        "APs": mean_ap(None, "small"),
        "APm": mean_ap(None, "medium"),
        "APl": mean_ap(None, "large"),
    }


def _voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool) -> float:
    if eleven_point:  # VOC2007: mean of the best precision at recall >= 0, 0.1, ..., 1
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    # VOC2010+: area under the precision envelope (precision made monotone decreasing).
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def voc_mask_ap(
    gt_coco: dict,
    results: Sequence[dict],
    iou_thresholds: Sequence[float] = (0.25, 0.5, 0.7, 0.75),
    eleven_point: bool = False,
) -> dict:
    """Pascal-VOC-style mask AP at each IoU threshold, as reported in the paper (AP25 ... AP75).

    Per category, detections are taken in decreasing score over all images; each one is
    matched greedily, as in the VOC devkit, to the ground-truth mask of its image it overlaps
    most (mask IoU): a true positive if that IoU reaches the threshold and the instance is not
    yet taken, a false positive otherwise (duplicates too). Crowd regions are "difficult"
    (neither counted nor penalised): as in COCOeval, a detection that matches no instance is
    ignored when the share of it inside a crowd region reaches the threshold (plain IoU with
    a region of many objects is small for a detection of one of them). AP is the area under
    the precision-recall curve with the precision envelope (VOC2010+ all-point), or the
    VOC2007 11-point mean with eleven_point.
    Returns {"AP25": ..., "AP50": ...}: the mean over categories with ground truth, in [0, 1],
    or -1.0 when there is no ground truth at all.
    """
    gt_dict, images = _prepare_gt(gt_coco)
    dets = _prepare_results(results, gt_dict, images)
    thresholds = [float(t) for t in iou_thresholds]
    per_cat: dict[str, list[float]] = {f"AP{round(t * 100)}": [] for t in thresholds}
    for cat in sorted({int(c["id"]) for c in gt_dict["categories"]}):
        gts: dict[int, list[dict]] = {}
        for ann in gt_dict["annotations"]:
            if ann["category_id"] == cat:
                gts.setdefault(ann["image_id"], []).append(ann)
        n_pos = sum(1 for anns in gts.values() for a in anns if not a["iscrowd"])
        if n_pos == 0:
            continue
        cat_dets = sorted((d for d in dets if d["category_id"] == cat), key=lambda d: -d["score"])
        # Per detection, the best-overlapping instance (IoU) and the largest share of it
        # inside a crowd region (pycocotools' iscrowd IoU) do not depend on the threshold.
        best = []
        for det in cat_dets:
            anns = gts.get(det["image_id"], [])
            crowd = [a["iscrowd"] for a in anns]
            ious = (mask_utils.iou([det["segmentation"]], [a["segmentation"] for a in anns],
                                   crowd)[0] if anns else np.zeros(0))
            is_crowd = np.asarray(crowd, bool)
            single = np.where(is_crowd, -1.0, ious)
            j = int(np.argmax(single)) if (~is_crowd).any() else -1
            best.append((det["image_id"], j, float(single[j]) if j >= 0 else 0.0,
                         float(ious[is_crowd].max()) if is_crowd.any() else 0.0))
        for t, key in zip(thresholds, per_cat):
            taken: set[tuple[int, int]] = set()
            tp = np.zeros(len(best))
            fp = np.zeros(len(best))
            for k, (image_id, j, iou, crowd_share) in enumerate(best):
                if j >= 0 and iou >= t and (image_id, j) not in taken:
                    taken.add((image_id, j))
                    tp[k] = 1
                elif crowd_share >= t:
                    continue  # inside a crowd region (difficult): ignored
                else:
                    fp[k] = 1
            keep = (tp + fp) > 0
            tp, fp = np.cumsum(tp[keep]), np.cumsum(fp[keep])
            recall = tp / n_pos
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            per_cat[key].append(_voc_ap(recall, precision, eleven_point) if len(tp) else 0.0)
    return {key: float(np.mean(v)) if v else -1.0 for key, v in per_cat.items()}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """IoU of two HxW masks (float), or the [N, M] IoU matrix of mask stacks [N,H,W], [M,H,W].

    Two empty masks have IoU 0.0 (nothing to agree on), so empty predictions never score.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.ndim == 2 and b.ndim == 2:
        if a.shape != b.shape:
            raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 0.0
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"expected two HxW masks or [N,H,W] and [M,H,W], got {a.shape}, {b.shape}")
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(np.float64)


def matched_ious(
    gt_masks: np.ndarray | Sequence[np.ndarray] | BoxMasks,
    pred_masks: np.ndarray | Sequence[np.ndarray] | BoxMasks,
) -> np.ndarray:
    """IoU of pred_masks[i] with gt_masks[i] for each i (box-prompted evaluation), float64 [N];
    two ``BoxMasks`` are compared where their boxes overlap only."""
    if isinstance(gt_masks, BoxMasks) and isinstance(pred_masks, BoxMasks):
        if len(gt_masks) != len(pred_masks):
            raise ValueError(f"{len(gt_masks)} ground-truth masks but {len(pred_masks)} "
                             "predictions")
        return np.array([_crop_iou(*pair) for pair in zip(
            gt_masks.bounds.tolist(), gt_masks.crops, pred_masks.bounds.tolist(),
            pred_masks.crops)], dtype=np.float64)
    gt = [np.asarray(m, dtype=bool) for m in gt_masks]
    pred = [np.asarray(m, dtype=bool) for m in pred_masks]
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} ground-truth masks but {len(pred)} predictions")
    return np.array([mask_iou(g, p) for g, p in zip(gt, pred)], dtype=np.float64)


def _crop_iou(a_box: Sequence[int], a: np.ndarray, b_box: Sequence[int], b: np.ndarray) -> float:
    """IoU of two masks given over their boxes (x0, y0, x1, y1); 0.0 for two empty ones, as
    ``mask_iou``."""
    inter = crop_overlap(a_box, a, b_box, b)
    union = int(a.sum()) + int(b.sum()) - inter
    return inter / union if union else 0.0
