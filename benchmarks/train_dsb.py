"""Fine-tune the `lite` preset on DSB2018 nuclei from boxes only, and from masks, and compare.

Splits ../shared/data/dsb2018-dev by image (default 60 train / 20 held out, fixed seed),
trains `lite` with box supervision (the paper's level-set loss) and with mask supervision (the
SOLOv2 dice ceiling) on the same schedule within a time budget each, then scores on the held-out
images:

* model alone (automatic instances, COCO mask AP with up to 1000 detections per image),
* the model prompted with the ground-truth boxes (Predictor.predict_boxes),
* model-free `segment_boxes` on the ground-truth boxes (no training at all),
* filled ground-truth boxes (the trivial baseline),

and prints a markdown table, the box/mask AP ratio, training it/s and inference ms/image.

    python benchmarks/train_dsb.py                          # 25 min per supervision
    python benchmarks/train_dsb.py --minutes 1 --max-images 6   # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018-dev"
METRIC_KEYS = ("AP", "AP50", "AP75", "mIoU")


# --------------------------------------------------------------------------------------- split


def split_folder(source: Path, dest: Path, n_train: int, n_test: int, seed: int,
                 max_images: int | None = None) -> tuple[Path, Path]:
    """Write train/ and test/ box folders (symlinked images, filtered annotations.json).

    Images are shuffled with `seed` and taken by image, so no image is in both. With
    `max_images`, the split keeps the train:test proportion within that many images.
    """
    coco = json.loads((source / "annotations.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    annotated = {a["image_id"] for a in coco["annotations"]}
    images = [im for im in images if im["id"] in annotated]
    random.Random(seed).shuffle(images)
    if max_images is not None and max_images < n_train + n_test:
        n_test_small = max(1, round(max_images * n_test / (n_train + n_test)))
        n_train, n_test = max(1, max_images - n_test_small), n_test_small
    if n_train + n_test > len(images):
        raise ValueError(f"{source}: {len(images)} annotated images, asked for "
                         f"{n_train} + {n_test}")
    parts = {"train": images[:n_train], "test": images[n_train:n_train + n_test]}
    out = []
    for name, part in parts.items():
        root = dest / name
        (root / "images").mkdir(parents=True, exist_ok=True)
        ids = {im["id"] for im in part}
        for im in part:
            link = root / "images" / Path(im["file_name"]).name
            if not link.exists():
                os.symlink((source / "images" / Path(im["file_name"]).name).resolve(), link)
        sub = {
            "images": [dict(im, file_name=Path(im["file_name"]).name) for im in part],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
            "categories": coco["categories"],
        }
        (root / "annotations.json").write_text(json.dumps(sub))
        out.append(root)
    return out[0], out[1]


# --------------------------------------------------------------------------------------- train


def _timed_iterations(events: list[tuple[int, float]]) -> float:
    """Seconds per iteration from (iteration, time) pairs, skipping the first (warm-up)."""
    if len(events) < 3:
        return float("nan")
    (i0, t0), (i1, t1) = events[1], events[-1]
    return (t1 - t0) / max(1, i1 - i0)


def train_within(config_kwargs: dict[str, Any], minutes: float, out: Path,
                 calibration_iters: int = 12) -> tuple[Path, float, int]:
    """Train with a schedule sized to fit `minutes`: time a few iterations first, then set
    max_iterations so the run ends in the budget (time_limit stops it cleanly otherwise).
    Iterations vary 0.8-2 s with the random image sizes here: 4 calibration iterations once
    overestimated the cost by 16% and the run ended after 23.7 of 29 minutes.
    Returns (checkpoint, measured iterations per second, iterations done)."""
    from boxlevelset.train import TrainConfig, train

    stamps: list[tuple[int, float]] = []

    def clock(event):
        if not event.done:
            stamps.append((event.iteration, time.perf_counter()))

    calib = TrainConfig(**config_kwargs, output_dir=out / "calibration", overwrite=True,
                        max_iterations=calibration_iters, checkpoint_every=10**6)
    train(calib, callbacks=[clock])
    sec_per_iter = _timed_iterations(stamps)
    budget = minutes * 60.0
    iterations = max(2, int(0.95 * budget / sec_per_iter))
    stamps.clear()
    cfg = TrainConfig(**config_kwargs, output_dir=out, overwrite=True, max_iterations=iterations,
                      checkpoint_every=max(50, iterations // 10), time_limit=budget)
    t0 = time.perf_counter()
    path = train(cfg, callbacks=[clock], progress=sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    done = stamps[-1][0] if stamps else 0
    print(f"  {out.name}: {done}/{iterations} iterations in {elapsed / 60:.1f} min "
          f"({done / elapsed:.2f} it/s incl. set-up; calibration {1 / sec_per_iter:.2f} it/s)",
          flush=True)
    # Speed from the run itself; a run too short to time falls back to the calibration.
    its = 1.0 / _timed_iterations(stamps) if len(stamps) > 2 else 1.0 / sec_per_iter
    return path, its, done


# --------------------------------------------------------------------------------------- score


def score_prompted(folder_path: Path, segment) -> dict[str, float]:
    """COCO mask AP (every mask scored 1.0) and mean IoU of masks made from the GT boxes."""
    from boxlevelset.data import load_box_folder
    from boxlevelset.evaluate import coco_mask_ap, matched_ious
    from boxlevelset.export import coco_results

    folder = load_box_folder(folder_path)
    gt = folder.to_coco_gt()
    results, ious, seconds = [], [], 0.0
    for record in folder.records:
        image = folder.load_image(record)
        t0 = time.perf_counter()
        masks = np.asarray(segment(image, record.boxes), dtype=bool)
        seconds += time.perf_counter() - t0
        ious.append(matched_ious(folder.gt_masks(record), masks))
        results += coco_results(record.image_id, masks, np.ones(len(masks)),
                                record.category_ids)
    ap = coco_mask_ap(gt, results, max_dets=1000)
    return {**ap, "mIoU": float(np.concatenate(ious).mean()),
            "ms_per_image": 1000 * seconds / len(folder.records)}


def filled_boxes(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    from boxlevelset.levelset import box_masks

    h, w = image.shape[:2]
    return box_masks(torch.as_tensor(np.asarray(boxes), dtype=torch.float32), h, w).numpy()


def model_free(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    from boxlevelset.levelset import segment_boxes

    return segment_boxes(image, boxes)


def model_free_paper_energy(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    from boxlevelset.levelset import PAPER_ENERGY, segment_boxes

    return segment_boxes(image, boxes, **PAPER_ENERGY)


def score_model(checkpoint: Path, test: Path) -> tuple[dict, dict]:
    """(automatic, box-prompted) metric dicts of a trained checkpoint on the test folder."""
    from boxlevelset.model import load_model
    from boxlevelset.predict import evaluate_model

    model = load_model(checkpoint, device="cpu")
    m = evaluate_model(model, test, max_dets=1000)
    auto = {k: m[k] for k in ("AP", "AP50", "AP75")}
    auto.update(mIoU=float("nan"), ms_per_image=m["ms_per_image"])
    boxed = {"AP": m["box_AP"], "AP50": m["box_AP50"], "AP75": m["box_AP75"],
             "mIoU": m["box_mIoU"], "ms_per_image": m["box_ms_per_image"]}
    return auto, boxed


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| method | AP | AP50 | AP75 | mIoU (GT boxes) | ms/image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, m in rows:
        cells = [f"{100 * m[k]:.1f}" if np.isfinite(m[k]) else "-" for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['ms_per_image']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- main


def build_parser(description: str, data: Path, n_train: int, n_test: int
                 ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, default=data)
    p.add_argument("--train-images", type=int, default=n_train)
    p.add_argument("--test-images", type=int, default=n_test)
    p.add_argument("--max-images", type=int, help="use only this many images (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=25.0, help="training budget per run")
    p.add_argument("--supervision", choices=("both", "box", "mask", "none"), default="both",
                   help="which models to train (none: only the model-free and filled-box rows)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-size", type=int, nargs=2, default=(256, 384))
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ModelConfig overrides (JSON values)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--skip-model-free", action="store_true")
    return p


def run(args: argparse.Namespace, title: str, model_defaults: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.out or Path(tempfile.mkdtemp(prefix="boxlevelset-bench-"))
    train_dir, test_dir = split_folder(args.data, work / "split", args.train_images,
                                       args.test_images, args.seed, args.max_images)
    n_train = len(json.loads((train_dir / "annotations.json").read_text())["images"])
    n_test = len(json.loads((test_dir / "annotations.json").read_text())["images"])
    print(f"# {title}\n\n{args.data.name}: {n_train} training / {n_test} held-out images "
          f"(seed {args.seed}); `lite` preset, {args.minutes:g} min per run, batch "
          f"{args.batch_size}, shorter side {tuple(args.min_size)}, torch threads "
          f"{torch.get_num_threads()}; working folder {work}\n", flush=True)
    model = dict(model_defaults)
    for item in args.model:
        key, value = item.split("=", 1)
        model[key] = json.loads(value)
    base = dict(data=train_dir, preset="lite", batch_size=args.batch_size, lr=args.lr,
                min_size=tuple(args.min_size), max_size=args.max_size, model=model,
                seed=args.seed)
    rows: list[tuple[str, dict]] = []
    speeds: dict[str, float] = {}
    auto_ap: dict[str, float] = {}
    boxed_ap: dict[str, float] = {}
    kinds = {"both": ("box", "mask"), "none": ()}.get(args.supervision, (args.supervision,))
    for kind in kinds:
        path, its, _ = train_within(dict(base, supervision=kind), args.minutes, work / kind)
        speeds[kind] = its
        auto, boxed = score_model(path, test_dir)
        label = "boxes (level set)" if kind == "box" else "masks (dice, ceiling)"
        rows += [(f"model trained on {label}", auto),
                 (f"model trained on {label}, GT box prompts", boxed)]
        auto_ap[kind], boxed_ap[kind] = auto["AP"], boxed["AP"]
    if not args.skip_model_free:
        rows.append(("segment_boxes, model-free, GT boxes", score_prompted(test_dir, model_free)))
        rows.append(("segment_boxes, model-free, paper energy only, GT boxes",
                     score_prompted(test_dir, model_free_paper_energy)))
    rows.append(("filled GT boxes", score_prompted(test_dir, filled_boxes)))
    print(table(rows))
    print()
    if "box" in auto_ap and "mask" in auto_ap:
        for name, ap in (("automatic", auto_ap), ("GT box prompts", boxed_ap)):
            ratio = ap["box"] / ap["mask"] if ap["mask"] > 0 else float("nan")
            print(f"box/mask AP ratio ({name}): {ratio:.2f}")
    for kind, its in speeds.items():
        print(f"training speed ({kind} supervision): {its:.2f} it/s "
              f"({its * args.batch_size:.2f} images/s)")


def main() -> None:
    args = build_parser(__doc__.splitlines()[0], DSB, 60, 20).parse_args()
    # Nuclei crowd hundreds to an image: keep more candidates and detections than COCO's 100.
    run(args, "DSB2018 nuclei: box-supervised vs mask-supervised `lite`",
        dict(nms_pre=1000, max_per_image=500))


if __name__ == "__main__":
    main()
