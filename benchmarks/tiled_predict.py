"""A trained model on a mosaic far larger than its training images: whole or in tiles.

    python benchmarks/tiled_predict.py CHECKPOINT FOLDER [--tiles 256 384 512] [--overlap 64]

FOLDER is a box-labeled folder with masks the model did not train on (train_dsb.py's
held-out split: `--out DIR` keeps it in DIR/split/test). Its images are laid side by side,
in their own pixels, into one mosaic (as a microscope's stitched tile scan), with their
ground-truth masks. Printed, as mask AP (pycocotools, up to 1000 detections) and seconds:

* each image predicted on its own (what the model does at the size it trained at),
* the mosaic predicted whole (the model shrinks it to its input size),
* the mosaic in tiles of each size given (``boxlevelset.tiles.predict_tiled``),

each for the model alone and prompted with the ground-truth boxes (mean IoU and mask AP,
every prompt scored 1.0; in tiles, ``TiledPredictor``: each box on the tile holding it).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from boxlevelset.data import load_box_folder
from boxlevelset.evaluate import coco_mask_ap, matched_ious
from boxlevelset.export import BoxMasks
from boxlevelset.image import as_rgb
from boxlevelset.model import Predictor, load_model
from boxlevelset.tiles import TiledPredictor


def mosaic(folder_path: Path) -> tuple[np.ndarray, BoxMasks, list[tuple[np.ndarray, BoxMasks]]]:
    """The folder's images in a near-square grid of cells as large as its largest image
    (black between them), the ground truth moved with them; and each (image, masks)."""
    parts = image_parts(folder_path)
    canvas, truth = lay_out(parts)
    return canvas, truth, parts


def image_parts(folder_path: Path) -> list[tuple[np.ndarray, BoxMasks]]:
    """(RGB image in [0, 1], ground-truth masks) of each image of a box folder with masks."""
    folder = load_box_folder(folder_path)
    parts = []
    for record, image in folder.readable():
        masks = folder.gt_box_masks(record)
        if masks is not None and len(masks):
            parts.append((as_rgb(image), masks))
    return parts


def lay_out(parts: list[tuple[np.ndarray, BoxMasks]]) -> tuple[np.ndarray, BoxMasks]:
    """(RGB image in [0, 1], masks) pairs side by side in their own pixels, in a
    near-square grid of cells as large as the largest image: the mosaic and its masks."""
    cell_h = max(img.shape[0] for img, _ in parts)
    cell_w = max(img.shape[1] for img, _ in parts)
    cols = math.ceil(math.sqrt(len(parts)))
    rows = math.ceil(len(parts) / cols)
    canvas = np.zeros((rows * cell_h, cols * cell_w, 3), np.float32)
    bounds, crops = [], []
    for k, (img, masks) in enumerate(parts):
        y, x = (k // cols) * cell_h, (k % cols) * cell_w
        canvas[y : y + img.shape[0], x : x + img.shape[1]] = img
        bounds.append(masks.bounds + np.array([x, y, x, y]))
        crops += masks.crops
    return canvas, BoxMasks(np.concatenate(bounds), crops, canvas.shape[:2])


def coco_pair(image_id: int, truth: BoxMasks, found: BoxMasks, scores: np.ndarray,
              gt: dict, results: list) -> None:
    """Add one image's ground truth and predictions to COCO gt / results (class-agnostic)."""
    h, w = truth.size
    gt["images"].append({"id": image_id, "height": h, "width": w})
    for rle in truth.to_rle():
        gt["annotations"].append({"image_id": image_id, "category_id": 1, "segmentation": rle})
    for rle, s in zip(found.to_rle(), scores):
        results.append({"image_id": image_id, "category_id": 1, "segmentation": rle,
                        "score": float(s)})


def score(model: Any, canvas: np.ndarray, truth: BoxMasks, tile: int | None,
          overlap: int | None = None) -> tuple[int, float, float, float, float]:
    """The model on the whole mosaic (``tile`` None) or in tiles: (instances found, mask AP,
    seconds, mean IoU and mask AP of the ground-truth boxes as prompts)."""
    predictor = Predictor(model) if tile is None else TiledPredictor(model, tile, overlap)
    t0 = time.perf_counter()
    inst = predictor.set_image(canvas).predict(cropped=True)
    seconds = time.perf_counter() - t0
    gt, results = empty_gt(), []
    coco_pair(1, truth, inst.masks, inst.scores, gt, results)
    boxes = truth.bounds.astype(np.float64)
    box_masks = predictor.predict_boxes(boxes, cropped=True)
    prompted_gt, prompted = empty_gt(), []
    coco_pair(1, truth, box_masks, np.ones(len(boxes)), prompted_gt, prompted)
    return (len(inst), coco_mask_ap(gt, results)["AP"], seconds,
            float(np.mean(matched_ious(truth, box_masks))),
            coco_mask_ap(prompted_gt, prompted)["AP"])


def empty_gt() -> dict:
    return {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--overlap", type=int, default=64)
    args = parser.parse_args()
    model = load_model(args.checkpoint, device="cpu")
    canvas, truth, parts = mosaic(args.folder)
    n_truth = len(truth)
    print(f"{len(parts)} images, {n_truth} objects, mosaic {canvas.shape[1]}x{canvas.shape[0]}; "
          f"model input {model.config.input_size} px (max {model.config.max_size}), at most "
          f"{model.config.max_per_image} instances per call\n")
    rows = []
    gt, results, prompted_gt, prompted, ious = empty_gt(), [], empty_gt(), [], []
    t0 = time.perf_counter()
    found = 0
    for k, (img, masks) in enumerate(parts, start=1):
        predictor = Predictor(model).set_image(img)
        inst = predictor.predict(cropped=True)
        coco_pair(k, masks, inst.masks, inst.scores, gt, results)
        found += len(inst)
        boxes = masks.bounds.astype(np.float64)
        box_masks = predictor.predict_boxes(boxes, cropped=True)
        coco_pair(k, masks, box_masks, np.ones(len(boxes)), prompted_gt, prompted)
        ious += list(matched_ious(masks, box_masks))
    rows.append(("each image on its own", found, coco_mask_ap(gt, results)["AP"],
                 time.perf_counter() - t0, float(np.mean(ious)),
                 coco_mask_ap(prompted_gt, prompted)["AP"]))
    runs = [("mosaic, whole", None)] + [(f"mosaic, tiles of {t} px", t) for t in args.tiles]
    for name, tile in runs:
        rows.append((name, *score(model, canvas, truth, tile, args.overlap)))
    print("| input | instances found | mask AP | seconds | GT box prompts: mIoU | AP |\n"
          "|---|---|---|---|---|---|")
    for name, n, ap, seconds, miou, box_ap in rows:
        print(f"| {name} | {n} | {ap:.3f} | {seconds:.1f} | {miou:.3f} | {box_ap:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
