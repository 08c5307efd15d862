"""Box-prompted masks of a trained model, with and without level-set refinement, against the
model-free level set, on a folder with ground-truth masks (GT boxes in, one mask per box).

    python benchmarks/box_prompt_refine.py CHECKPOINT FOLDER [--refine 10 25] [--paper-energy]
        [--feature-steps 5 10 --feature-lr 0.1]

Prints mean IoU, COCO mask AP (every mask scored 1.0, maxDets 1000) and seconds per method.

``--feature-steps`` adds DESIGN.md's literal form of refinement: Adam steps on the prompts'
stride-4 mask logits, descending the training loss itself (lambda_image x the energy on the
image + lambda_feature x the energy on I_f, the tree-filtered masks, + the box projection).
``segment_boxes(..., refine=N)`` instead evolves the image energy on crops of up to 64 px,
which this comparison is there to justify.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from boxlevelset import load_model, segment_boxes
from boxlevelset.levelset import PAPER_ENERGY
from boxlevelset.data import load_box_folder
from boxlevelset.evaluate import coco_mask_ap, mask_iou
from boxlevelset.export import masks_to_rle
from boxlevelset.image import as_boxes, pixel_bounds
from boxlevelset.losses import levelset_instance_loss
from boxlevelset.model import Predictor


def feature_refined(model, image: np.ndarray, boxes: np.ndarray, steps: int,
                    lr: float) -> list[np.ndarray]:
    """Box prompts refined by ``steps`` Adam steps of the training loss on their stride-4
    logits (the network stays fixed); masks cut to their boxes at the original size."""
    predictor = Predictor(model).set_image(image)
    feats = predictor.features
    tensor, scale = model.preprocess(image)
    h, w = np.shape(image)[:2]
    arr = as_boxes(boxes)
    logits = predictor.box_logits(arr)  # the prompts' masks before the sigmoid
    batch = torch.zeros(len(logits), dtype=torch.long)
    with torch.no_grad():
        guide = model.guide_conv(feats.mask_feature)
        image_norm = F.avg_pool2d(model.normalize(tensor), 4)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    boxes4 = torch.as_tensor(arr * scale / 4, dtype=torch.float32)
    for _ in range(steps):
        terms = levelset_instance_loss(logits, boxes4, batch, image_norm, image_norm, guide,
                                       model.levelset_weights)
        optimizer.zero_grad()
        sum(t.sum() for t in terms.values()).backward()
        optimizer.step()
    masks = []
    for p, (c0, r0, c1, r1) in zip(predictor.box_probabilities(arr, logits=logits),
                                   pixel_bounds(arr, h, w)):
        m = np.zeros((h, w), bool)
        m[r0:r1, c0:c1] = p > model.config.mask_threshold
        masks.append(m)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("folder")
    parser.add_argument("--refine", type=int, nargs="*", default=[10, 25])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-energy", action="store_true",
                        help="evolve the paper's energy alone (no histogram or edge terms)")
    parser.add_argument("--feature-steps", type=int, nargs="*", default=[],
                        help="also: prompts refined by N steps of the training loss (I_u + I_f)")
    parser.add_argument("--feature-lr", type=float, default=0.1,
                        help="Adam step on the logits for --feature-steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, device="cpu")
    folder = load_box_folder(args.folder)
    gt = folder.to_coco_gt()
    energy = PAPER_ENERGY if args.paper_energy else {}
    methods = [("model-free level set", energy), ("model box prompt", {"model": model})]
    methods += [(f"model + {k} level-set steps", {"model": model, "refine": k, **energy})
                for k in args.refine]
    methods += [(f"model + {k} training-loss steps (I_u + I_f, stride 4, lr {args.feature_lr:g})",
                 {"feature_steps": k}) for k in args.feature_steps]
    print("| method | mean IoU | mask AP | s |\n|---|---|---|---|")
    for name, options in methods:
        ious, results, t0 = [], [], time.perf_counter()
        for rec in folder.records:
            if not len(rec.boxes):
                continue
            image = folder.load_image(rec)
            if "feature_steps" in options:
                masks = feature_refined(model, image, rec.boxes, options["feature_steps"],
                                        args.feature_lr)
            else:
                masks = segment_boxes(image, rec.boxes, **options)
            ious += [mask_iou(p, g) for p, g in zip(masks, folder.gt_masks(rec))]
            for rle, cat in zip(masks_to_rle(np.stack(masks)), rec.category_ids):
                results.append({"image_id": rec.image_id, "category_id": int(cat),
                                "segmentation": rle, "score": 1.0})
        ap = coco_mask_ap(gt, results, max_dets=1000)["AP"]
        print(f"| {name} | {np.mean(ious):.3f} | {ap:.3f} | {time.perf_counter() - t0:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
