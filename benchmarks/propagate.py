"""Carrying a mask through CT slices: ``boxlevelset.propagate`` against the walk it replaced.

ct3slice-dev (3 consecutive slices, liver and spine masks): a mask on the middle slice, the
ground truth's or the one ``segment_boxes`` gives for its box, is carried to the slices
above and below, and each carried mask is scored against that slice's ground truth (IoU).
"previous walk" is what the plugin did before: the next box is the mask's bounding box + 2
px and the default (tight-box) energy segments it, with no band.

The IRCAD volume has no masks: with --ircad, a liver box and a vertebra box on slice 90 are
carried through the volume by both walks, and a montage of every 4th slice is written for
the eye (--out, default ./propagate_ircad_*.png), with the slices each walk reached.

    python benchmarks/propagate.py [--ircad] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from boxlevelset import segment_boxes
from boxlevelset.data import load_box_folder
from boxlevelset.evaluate import mask_iou
from boxlevelset.image import as_float_image, bounding_box
from boxlevelset.propagate import MIN_OVERLAP, propagate_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WINDOW = "abdomen"
# The previous walk's stop: mean windowed intensity this far from the start slice's.
PREVIOUS_TOLERANCE = 0.15
# IRCAD slice 90: boxes drawn by eye around the liver and the vertebra (x0, y0, x1, y1).
IRCAD_BOXES = {"liver": (50, 95, 335, 392), "vertebra": (236, 280, 305, 416)}


def previous_walk(volume: np.ndarray, plane: int, mask: np.ndarray
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """The plugin's walk before boxlevelset.propagate: box = bounding box + 2 px, default
    energy, same stop rules."""
    def mean(z: int, m: np.ndarray) -> float:
        return float(as_float_image(volume[z], WINDOW)[m].mean())

    level = mean(plane, mask)
    for step in (1, -1):
        prev, z = mask, plane + step
        while 0 <= z < volume.shape[0]:
            new = segment_boxes(volume[z], bounding_box(prev, 2)[None], window=WINDOW)[0]
            if (not new.any() or mask_iou(new, prev) < MIN_OVERLAP
                    or abs(mean(z, new) - level) > PREVIOUS_TOLERANCE):
                break
            yield z, new
            prev, z = new, z + step


def new_walk(volume: np.ndarray, plane: int, mask: np.ndarray
             ) -> Iterator[tuple[int, np.ndarray]]:
    return propagate_mask(volume, plane, mask, window=WINDOW)


WALKS = {"boxlevelset.propagate": new_walk, "previous walk": previous_walk}


def ct3slice() -> None:
    folder = load_box_folder(DATA / "ct3slice-dev", window=WINDOW)
    records = sorted(folder.records, key=lambda r: r.slice_index)
    volume = np.stack([folder.slice_hu(r) for r in records]).astype(np.float32)
    gt = np.stack([folder.gt_masks(r) for r in records], axis=1)  # [instance, z, H, W]
    names = {c["id"]: c["name"] for c in folder.to_coco_gt()["categories"]}
    mid = records[1]
    print("| start mask | object | walk | IoU slice 0 | IoU slice 2 |")
    print("|---|---|---|---|---|")
    ours = segment_boxes(volume[1], mid.boxes, window=WINDOW)
    for start_name in ("ground truth", "segment_boxes"):
        for k, cat in enumerate(mid.category_ids):
            start = gt[k, 1] if start_name == "ground truth" else ours[k]
            for walk_name, walk in WALKS.items():
                got = dict(walk(volume, 1, start))
                cells = [f"{mask_iou(got[z], gt[k, z]):.3f}" if z in got else "stopped"
                         for z in (0, 2)]
                print(f"| {start_name} | {names[int(cat)]} | {walk_name} | "
                      + " | ".join(cells) + " |")


def montage(volume: np.ndarray, masks: dict[int, np.ndarray], path: Path) -> None:
    tiles = []
    for z in range(2, volume.shape[0], 4):
        grey = (as_float_image(volume[z], WINDOW)[..., 0] * 255).astype(np.uint8)
        tile = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        if z in masks:
            contours, _ = cv2.findContours(masks[z].astype(np.uint8), cv2.RETR_LIST,
                                           cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, (0, 0, 255), 2)
        tile = cv2.resize(tile, (256, 256), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, str(z), (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 1)
        tiles.append(tile)
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 8)
    rows = [np.hstack(tiles[i : i + 8]) for i in range(0, len(tiles), 8)]
    cv2.imwrite(str(path), np.vstack(rows))


def ircad(out: Path) -> None:
    import SimpleITK as sitk

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ircad01-volume" / "ircad01.nii.gz")))
    volume = volume.astype(np.float32)
    plane = 90
    for name, box in IRCAD_BOXES.items():
        start = segment_boxes(volume[plane], np.array([box], float), window=WINDOW)[0]
        for walk_name, walk in WALKS.items():
            t0 = time.perf_counter()
            got = {plane: start, **dict(walk(volume, plane, start))}
            ms = (time.perf_counter() - t0) * 1000 / max(1, len(got) - 1)
            tag = "propagate" if walk_name.startswith("boxlevelset") else "previous"
            path = out / f"propagate_ircad_{name}_{tag}.png"
            montage(volume, got, path)
            print(f"IRCAD {name}, {walk_name}: slices {min(got)}-{max(got)} ({ms:.0f} ms "
                  "a slice); "
                  f"mask pixels at 70/90/110: "
                  + "/".join(str(int(got[z].sum())) if z in got else "-" for z in (70, 90, 110))
                  + f" -> {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ircad", action="store_true", help="also walk the IRCAD volume")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for montages")
    args = parser.parse_args()
    ct3slice()
    if args.ircad:
        args.out.mkdir(parents=True, exist_ok=True)
        ircad(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
