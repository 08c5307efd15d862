"""Where the model-free level set loses to GrabCut on the CT slices, per ground-truth box.

    python benchmarks/ct_liver_gap.py [FOLDER]      # default ../shared/data/ct3slice-dev

Prints, per box: IoU of ours (segment_boxes' evolution, its default for images), of the
graph cut it runs on CT (solver="cut") and of GrabCut (box_to_mask.py's), their
false-positive and false-negative pixels; for ours, the Hounsfield units of its
largest false-positive region against the object's core (the ground truth eroded by 5 px);
the evolution energy (segment_boxes' defaults, at its 64 px crop) of the ground-truth mask
minus that of our mask (> 0: the energy prefers our mask); and the IoU after a
star-convexity clean-up (drop what a ray from the mask's most interior point reaches only
after a gap of more than 3% of the mask's side), a post-process we measured and did not keep.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from box_to_mask import CT_WINDOW, DATA, _image_for, grabcut
from boxlevelset import segment_boxes
from boxlevelset import levelset as L
from boxlevelset.data import load_box_folder
from boxlevelset.evaluate import mask_iou


def energy_gap(img: np.ndarray, box: np.ndarray, truth: np.ndarray, ours: np.ndarray) -> float:
    """E(ground truth) - E(ours) under segment_boxes' default energy at its crop size."""
    e_truth, e_ours = L.mask_energy(img, np.stack([box, box]), [truth, ours])
    return float(e_truth - e_ours)


def star_clean(mask: np.ndarray, gap: float = 0.03) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(ys) < 10:
        return mask
    dist = ndimage.distance_transform_edt(mask)
    cy, cx = np.unravel_index(dist.argmax(), dist.shape)
    t = np.linspace(0.0, 1.0, 48)[None]
    outside = ~mask[np.rint(cy + (ys[:, None] - cy) * t).astype(int),
                    np.rint(cx + (xs[:, None] - cx) * t).astype(int)]
    run = np.zeros(len(ys))
    longest = np.zeros(len(ys))
    for k in range(outside.shape[1]):  # longest run of samples outside the mask, per ray
        run = np.where(outside[:, k], run + 1, 0)
        longest = np.maximum(longest, run)
    side = max(np.ptp(ys), np.ptp(xs)) + 1
    keep = longest * np.hypot(ys - cy, xs - cx) / 47 <= gap * side
    out = np.zeros_like(mask)
    out[ys[keep], xs[keep]] = True
    return L.clean_mask(out, fill_holes=True, largest_component=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DATA / "ct3slice-dev")
    folder = load_box_folder(parser.parse_args().folder, window=CT_WINDOW)
    names = {c["id"]: c["name"] for c in folder.categories}
    print("| box | ours IoU | cut IoU | GrabCut IoU | ours FP / FN px | cut FP / FN px | "
          "GrabCut FP / FN px | ours' largest FP region, HU | object core, HU | "
          "E(truth) - E(ours) | ours + star clean-up IoU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rec in folder.records:
        hu = folder.slice_hu(rec).astype(np.float64)
        img = _image_for(folder, rec)
        ours_all = segment_boxes(img, rec.boxes, solver="evolve")
        cut_all = segment_boxes(img, rec.boxes, solver="cut")
        gc_all = grabcut(img, rec.boxes)
        for box, cat, truth, ours, cut, gc in zip(rec.boxes, rec.category_ids,
                                                  folder.gt_masks(rec), ours_all, cut_all, gc_all):
            fp = ours & ~truth
            labels, n = ndimage.label(fp)
            region = labels == 1 + np.bincount(labels.ravel())[1:].argmax() if n else fp
            core = ndimage.binary_erosion(truth, iterations=5)
            print(f"| {rec.image_id}:{names.get(int(cat), cat)} | {mask_iou(ours, truth):.3f} | "
                  f"{mask_iou(cut, truth):.3f} | {mask_iou(gc, truth):.3f} | "
                  f"{fp.sum()} / {(truth & ~ours).sum()} | "
                  f"{(cut & ~truth).sum()} / {(truth & ~cut).sum()} | "
                  f"{(gc & ~truth).sum()} / {(truth & ~gc).sum()} | "
                  f"{hu[region].mean():.0f} ± {hu[region].std():.0f} ({region.sum()} px) | "
                  f"{hu[core].mean():.0f} ± {hu[core].std():.0f} | "
                  f"{energy_gap(img, box, truth, ours):+.2f} | "
                  f"{mask_iou(star_clean(ours), truth):.3f} |", flush=True)


if __name__ == "__main__":
    main()
