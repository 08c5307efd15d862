"""Box-prompted masks of a trained model, with and without level-set refinement, against the
model-free level set, on a folder with ground-truth masks (GT boxes in, one mask per box).

    python benchmarks/box_prompt_refine.py CHECKPOINT FOLDER [--refine 10 25] [--paper-energy]

Prints mean IoU, COCO mask AP (every mask scored 1.0, maxDets 1000) and seconds per method.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from boxlevelset import load_model, segment_boxes
from boxlevelset.levelset import PAPER_ENERGY
from boxlevelset.data import load_box_folder
from boxlevelset.evaluate import coco_mask_ap, mask_iou
from boxlevelset.export import masks_to_rle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("folder")
    parser.add_argument("--refine", type=int, nargs="*", default=[10, 25])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-energy", action="store_true",
                        help="evolve the paper's energy alone (no histogram or edge terms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, device="cpu")
    folder = load_box_folder(args.folder)
    gt = folder.to_coco_gt()
    energy = PAPER_ENERGY if args.paper_energy else {}
    methods = [("model-free level set", energy), ("model box prompt", {"model": model})]
    methods += [(f"model + {k} level-set steps", {"model": model, "refine": k, **energy})
                for k in args.refine]
    print("| method | mean IoU | mask AP | s |\n|---|---|---|---|")
    for name, options in methods:
        ious, results, t0 = [], [], time.perf_counter()
        for rec in folder.records:
            if not len(rec.boxes):
                continue
            masks = segment_boxes(folder.load_image(rec), rec.boxes, **options)
            ious += [mask_iou(p, g) for p, g in zip(masks, folder.gt_masks(rec))]
            for rle, cat in zip(masks_to_rle(np.stack(masks)), rec.category_ids):
                results.append({"image_id": rec.image_id, "category_id": int(cat),
                                "segmentation": rle, "score": 1.0})
        ap = coco_mask_ap(gt, results, max_dets=1000)["AP"]
        print(f"| {name} | {np.mean(ious):.3f} | {ap:.3f} | {time.perf_counter() - t0:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
