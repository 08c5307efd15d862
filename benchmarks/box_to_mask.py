"""Box -> mask quality and speed of the model-free level set against classical baselines.

Ground-truth boxes go in, masks come out; every prediction is scored 1.0 for COCO mask AP.

    python benchmarks/box_to_mask.py                   # every folder of ../shared/data with masks
    python benchmarks/box_to_mask.py FOLDER [FOLDER..] [--max-images N] [--methods ours,box]
    python benchmarks/box_to_mask.py ../shared/data/ct3slice-dev --per-instance  # small sets
    python benchmarks/box_to_mask.py ../shared/data/ct3slice-dev --methods "ours (cut)" \
        --set polish=20                               # ours with other segment_boxes options
    python benchmarks/box_to_mask.py --loose 0.1      # boxes up to 10% loose per side

Prints one markdown table: per folder and method, mean IoU, share of instances with
IoU > 0.5 and > 0.75, COCO mask AP (pycocotools, maxDets 1000) and milliseconds per box
(median over images of image time / boxes, batched over each image's boxes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage.filters import threshold_otsu
from skimage.segmentation import morphological_chan_vese

from boxlevelset import segment_boxes
from boxlevelset.levelset import LOOSE_BOXES, PAPER_ENERGY
from boxlevelset.data import BoxFolder, load_box_folder
from boxlevelset.evaluate import coco_mask_ap, mask_iou
from boxlevelset.export import masks_to_rle
from boxlevelset.image import as_float_image, pixel_bounds

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CT_WINDOW = "abdomen"


def _int_boxes(boxes: np.ndarray, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Each box's pixel range (c0, r0, c1, r1) as ints, the rounding segment_boxes uses."""
    return [tuple(int(v) for v in b) for b in pixel_bounds(boxes, h, w)]


def _gray(img01: np.ndarray) -> np.ndarray:
    return img01.mean(axis=2) if img01.ndim == 3 else img01


def filled_box(img01: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    return _in_each_box(img01, boxes, lambda crop: None)


def _pick_polarity(fg: np.ndarray) -> np.ndarray:
    """Foreground is the phase that covers less of the box border (the box hugs the object)."""
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    return fg if border.mean() <= 0.5 else ~fg


def _in_each_box(
    img01: np.ndarray, boxes: np.ndarray, crop_mask: Callable[[np.ndarray], np.ndarray | None]
) -> list[np.ndarray]:
    """One full-size mask per box from crop_mask(gray crop); None (a crop it cannot handle)
    keeps the filled box."""
    gray = _gray(img01)
    h, w = gray.shape
    out = []
    for x0, y0, x1, y1 in _int_boxes(boxes, h, w):
        m = np.zeros((h, w), bool)
        inside = crop_mask(gray[y0:y1, x0:x1])
        m[y0:y1, x0:x1] = True if inside is None else inside
        out.append(m)
    return out


def otsu(img01: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    def crop_mask(crop: np.ndarray) -> np.ndarray | None:
        if crop.size > 1 and crop.max() > crop.min():
            return _pick_polarity(crop > threshold_otsu(crop))
        return None

    return _in_each_box(img01, boxes, crop_mask)


def morph_chan_vese(img01: np.ndarray, boxes: np.ndarray, max_side: int = 128) -> list[np.ndarray]:
    """scikit-image's morphological Chan-Vese in the box from an inscribed disk; crops are
    evolved at most max_side pixels long (ours uses 64) to keep the benchmark tractable."""

    def crop_mask(crop: np.ndarray) -> np.ndarray | None:
        if min(crop.shape) < 3:
            return None
        scale = min(1.0, max_side / max(crop.shape))
        small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        yy, xx = np.mgrid[: small.shape[0], : small.shape[1]]
        u = (xx + 0.5) / small.shape[1] * 2 - 1
        v = (yy + 0.5) / small.shape[0] * 2 - 1
        ls = morphological_chan_vese(small, 50, init_level_set=(u * u + v * v) < 1.0)
        return cv2.resize(ls.astype(np.uint8), crop.shape[::-1],
                          interpolation=cv2.INTER_NEAREST).astype(bool)

    return _in_each_box(img01, boxes, crop_mask)


def grabcut(img01: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    rgb = img01 if img01.shape[2] == 3 else np.repeat(img01[..., :1], 3, axis=2)
    u8 = np.ascontiguousarray((rgb * 255).astype(np.uint8))
    h, w = u8.shape[:2]
    out = []
    for x0, y0, x1, y1 in _int_boxes(boxes, h, w):
        # Context around the box: GrabCut learns the background model from it.
        mx, my = max(5, (x1 - x0) // 4), max(5, (y1 - y0) // 4)
        cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
        crop = u8[cy0:cy1, cx0:cx1]
        rect = (x0 - cx0, y0 - cy0, max(1, x1 - x0), max(1, y1 - y0))
        gc = np.zeros(crop.shape[:2], np.uint8)
        m = np.zeros((h, w), bool)
        try:
            bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
            cv2.setRNGSeed(0)  # its k-means start draws from OpenCV's global generator
            cv2.grabCut(crop, gc, rect, bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
            fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        except cv2.error:  # tiny boxes: GrabCut cannot fit its colour models
            fg = np.zeros(crop.shape[:2], bool)
            fg[rect[1] : rect[1] + rect[3], rect[0] : rect[0] + rect[2]] = True
        m[cy0:cy1, cx0:cx1] = fg
        m[:, :x0] = m[:, x1:] = False
        m[:y0] = m[y1:] = False
        if not m.any():  # GrabCut gave up (small or low-contrast box): keep the box
            m[y0:y1, x0:x1] = True
        out.append(m)
    return out


class _Ours:
    """segment_boxes with fixed options. CT slices are handed over as users hand them: in
    Hounsfield units with the window, so that segment_boxes picks its CT solver itself."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def __call__(self, img: np.ndarray, boxes: np.ndarray,
                 window: Any = None) -> list[np.ndarray]:
        return segment_boxes(img, boxes, window=window, **self.options)


# segment_boxes picks "evolve" for images and "cut" for CT (when given a window); both run
# on every folder here. --set adds segment_boxes options to these rows.
OURS: dict[str, dict[str, Any]] = {
    "ours (evolve)": {"solver": "evolve"},
    "ours (cut)": {"solver": "cut"},
    "ours (paper energy)": dict(PAPER_ENERGY),
    "ours (loose boxes)": dict(LOOSE_BOXES),  # hand-drawn boxes: the cut on CT, as users get
}
METHODS: dict[str, Callable[[np.ndarray, np.ndarray], list[np.ndarray]]] = {
    **{name: _Ours(**options) for name, options in OURS.items()},
    "filled box": filled_box,
    "Otsu in box": otsu,
    "morph. Chan-Vese": morph_chan_vese,
    "GrabCut": grabcut,
}


def _image_for(folder: BoxFolder, record) -> np.ndarray:
    """[0,1] float image; CT slices windowed from Hounsfield units."""
    if record.slice_index is not None:
        hu = folder.slice_hu(record)
        return as_float_image(hu, window=CT_WINDOW)
    return as_float_image(folder.load_image(record))


def loosen(boxes: np.ndarray, fraction: float, rng: np.random.Generator, height: int,
           width: int) -> np.ndarray:
    """Boxes as a hurried user draws them: each side pushed outward by a uniform random
    share in [0, fraction) of the box's width (left, right) or height (top, bottom)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    size = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    push = rng.uniform(0.0, fraction, boxes.shape) * size * np.array([-1, -1, 1, 1])
    return np.clip(boxes + push, 0, [width, height, width, height]).astype(np.float32)


def run_folder(path: Path, methods: list[str], max_images: int | None,
               per_instance: bool = False, loose: float = 0.0) -> list[dict]:
    folder = load_box_folder(path, window=CT_WINDOW)
    gt = folder.to_coco_gt()
    records = [r for r in folder.records if len(r.boxes)][:max_images]
    rng = np.random.default_rng(0)  # the same loose boxes for every method
    boxes = {r.image_id: loosen(r.boxes, loose, rng, r.height, r.width) if loose else r.boxes
             for r in records}
    rows = []
    for name in methods:
        fn = METHODS[name]
        ious, results, per_box_ms = [], [], []
        for rec in records:
            ct = isinstance(fn, _Ours) and rec.slice_index is not None
            img = folder.slice_hu(rec) if ct else _image_for(folder, rec)
            gt_masks = folder.gt_masks(rec)
            t0 = time.perf_counter()
            pred = fn(img, boxes[rec.image_id], CT_WINDOW) if ct else fn(img, boxes[rec.image_id])
            dt = (time.perf_counter() - t0) * 1000
            per_box_ms.append(dt / len(rec.boxes))
            ious.extend(mask_iou(p, g) for p, g in zip(pred, gt_masks))
            for m, rle, cat in zip(pred, masks_to_rle(np.stack(pred)), rec.category_ids):
                results.append(
                    {"image_id": rec.image_id, "category_id": int(cat), "segmentation": rle,
                     "score": 1.0}
                )
        ious_a = np.asarray(ious)
        keep = {r.image_id for r in records}
        gt_sub = dict(gt, images=[i for i in gt["images"] if i["id"] in keep],
                      annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
        ap = coco_mask_ap(gt_sub, results, max_dets=1000)
        rows.append({
            "folder": path.name, "method": name, "boxes": len(ious_a),
            "mIoU": ious_a.mean(), "IoU>0.5": (ious_a > 0.5).mean(),
            "IoU>0.75": (ious_a > 0.75).mean(), "AP": ap["AP"], "AP50": ap["AP50"],
            "ms/box": float(np.median(per_box_ms)),
        })
        print(f"  {path.name:14s} {name:18s} mIoU {ious_a.mean():.3f}  AP {ap['AP']:.3f}",
              file=sys.stderr)
        if per_instance:
            cats = {c["id"]: c["name"] for c in gt["categories"]}
            labels = [f"{r.image_id}:{cats.get(int(c), c)}"
                      for r in records for c in r.category_ids]
            print(f"  {name}: " + ", ".join(f"{lab} {v:.3f}" for lab, v in zip(labels, ious)))
    return rows


def latency(max_side_px: int = 256, repeats: int = 3) -> dict:
    """Median ms per box of ours on real boxes up to max_side_px, batched per image."""
    per_box = []
    for name in ("coco128-dev", "dsb2018-dev"):
        folder = load_box_folder(DATA / name)
        for rec in folder.records[:20]:
            sides = np.maximum(rec.boxes[:, 2] - rec.boxes[:, 0], rec.boxes[:, 3] - rec.boxes[:, 1])
            boxes = rec.boxes[sides <= max_side_px]
            if len(boxes) == 0:
                continue
            img = folder.load_image(rec)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                segment_boxes(img, boxes)
                times.append(time.perf_counter() - t0)
            per_box.append(min(times) * 1000 / len(boxes))
    return {"median_ms_per_box": float(np.median(per_box)),
            "p90": float(np.percentile(per_box, 90))}


def latency_one_box(boxes_per_image: int = 5, repeats: int = 3) -> dict:
    """ms of one box per call (the plugin's live mode: each finished box is segmented on
    its own), on COCO photos as they are and scaled up to a 12-megapixel phone photo
    (4032x3024, the boxes with them): median and p90 over the first 20 photos' first
    ``boxes_per_image`` boxes."""
    folder = load_box_folder(DATA / "coco128-dev")
    times: dict[str, list[float]] = {"photo": [], "12 MP": []}
    for rec in folder.records[:20]:
        img = folder.load_image(rec)
        big = cv2.resize(img, (4032, 3024), interpolation=cv2.INTER_LINEAR)
        scale = np.array([4032 / rec.width, 3024 / rec.height] * 2)
        for box in rec.boxes[:boxes_per_image]:
            for name, arr, b in (("photo", img, box), ("12 MP", big, box * scale)):
                best = np.inf
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    segment_boxes(arr, b[None])
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best * 1000)
    return {name: (float(np.median(v)), float(np.percentile(v, 90))) for name, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--per-instance", action="store_true",
                        help="also print every box's IoU (image id:category) per method")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="a segment_boxes option for the ours rows, e.g. polish=20 or "
                             "fill_holes=false (values read as JSON; repeatable)")
    parser.add_argument("--loose", type=float, default=0.0, metavar="F",
                        help="hand-drawn boxes: push each side of every ground-truth box "
                             "outward by a random share in [0, F) of the box side (seed 0)")
    args = parser.parse_args()
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected OPTION=VALUE")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    for name, options in OURS.items():
        METHODS[name] = _Ours(**{**options, **extra})
    folders = args.folders or [DATA / n for n in ("coco128-dev", "dsb2018-dev", "ct3slice-dev")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}")
    rows = []
    for f in folders:
        rows.extend(run_folder(f, methods, args.max_images, args.per_instance, args.loose))
    print(f"torch threads {torch.get_num_threads()}, images per folder: "
          f"{args.max_images or 'all'}" + (f", boxes loosened by up to {args.loose:.0%} per side"
                                           if args.loose else "") + "\n")
    print("| folder | method | boxes | mean IoU | IoU>0.5 | IoU>0.75 | mask AP | AP50 | ms/box |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['folder']} | {r['method']} | {r['boxes']} | {r['mIoU']:.3f} | "
              f"{r['IoU>0.5']:.3f} | {r['IoU>0.75']:.3f} | {r['AP']:.3f} | {r['AP50']:.3f} | "
              f"{r['ms/box']:.1f} |")
    if not args.no_latency:
        lat = latency()
        print("\nours, boxes up to 256 px, batched per image: "
              f"median {lat['median_ms_per_box']:.1f}"
              f" ms/box (p90 {lat['p90']:.1f})")
        for name, (median, p90) in latency_one_box().items():
            print(f"ours, one box per call, COCO boxes on the {name}: median {median:.1f} ms "
                  f"(p90 {p90:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
