"""Prediction and evaluation of a trained model on a folder (or one image).

    predict_folder(model, "images/", "out/")   # COCO JSON (RLE), label images, overlays
    evaluate_model(model, "val_folder/")       # COCO / VOC mask AP + box-prompted quality

Both accept what `load_box_folder` reads (COCO folder, Pascal VOC, plain image folder; CT
slices come windowed from the folder, by default with the window the model was trained
with) and are what `boxlevelset predict|evaluate` run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boxlevelset.data import IMAGE_SUFFIXES, VOLUME_SUFFIXES, coco_image_entry
from boxlevelset.export import BoxMasks, lower_suffix

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _class_names(model: Any) -> list[str]:
    names = list(getattr(model.config, "class_names", None) or [])
    if not names:
        names = [f"class_{i}" for i in range(int(model.config.num_classes))]
    return names


class _TrainedWindow:
    """Default `window`: the CT window the model was trained with ("abdomen" if unknown)."""

    def __repr__(self) -> str:
        return "the model's training window"


TRAINED_WINDOW: Any = _TrainedWindow()


def resolve_window(model: Any, window: Any) -> Any:
    """`window` itself, or for TRAINED_WINDOW the window of the model's training run (a model
    trained on CT slices windowed one way sees other intensities under another window)."""
    if window is not TRAINED_WINDOW:
        return window
    trained = getattr(model, "train_config", None) or {}
    if "window" in trained:
        return tuple(trained["window"]) if isinstance(trained["window"], list) else \
            trained["window"]
    return "abdomen"


def _load_source(source: str | Path | Any, window: Any) -> Any:
    """A BoxFolder for a folder / COCO json, or a one-record BoxFolder for a single image."""
    from boxlevelset.data import BoxFolder, Record, load_box_folder, read_image

    if isinstance(source, BoxFolder):
        return source
    path = Path(source)
    if path.is_file() and lower_suffix(path) in IMAGE_SUFFIXES:
        image = read_image(path)
        record = Record(image_id=1, file_name=path.name, path=path, width=image.shape[1],
                        height=image.shape[0])
        return BoxFolder(path.parent, [], [record], window=window)
    return load_box_folder(path, window=window)


def _plane_suffix(record: Any) -> str:
    """``_zNNNN`` for a CT slice, ``_pNNNN`` for a plane of a stack, else nothing: entries
    that share one file do not overwrite each other's outputs."""
    if record.slice_index is not None:
        return f"_z{int(record.slice_index):04d}"
    if getattr(record, "plane", None) is not None:
        return f"_p{int(record.plane):04d}"
    return ""


def output_stem(record: Any) -> str:
    """File stem for a record's outputs: the image name without its (volume) suffix, plus
    the slice or plane of entries that share one file (``_plane_suffix``)."""
    return _file_stem(record.file_name) + _plane_suffix(record)


class OutputStems:
    """``output_stem`` made unique within one run: a second image with the same stem (x.png
    beside x.bmp, or a/img.png beside b/img.png in a COCO file) gets its folder and suffix
    in the name instead of overwriting the first one's outputs."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, record: Any) -> str:
        stem = output_stem(record)
        if stem in self._used:
            parts = Path(record.file_name).with_suffix("").parts
            ext = Path(record.file_name).suffix.lstrip(".")
            stem = ("_".join([*parts, ext]) if ext else "_".join(parts)) + _plane_suffix(record)
            base, k = stem, 2
            while stem in self._used:
                stem, k = f"{base}_{k}", k + 1
        self._used.add(stem)
        return stem


def _palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct bright colours (golden-ratio hues), uint8 RGB."""
    import cv2

    hues = ((np.arange(n) * 0.618033988749895 + seed * 0.1) % 1.0 * 179).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 200, np.uint8), np.full(n, 255, np.uint8)], 1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def overlay_image(image: np.ndarray, masks: np.ndarray | BoxMasks,
                  alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture of `image` with each mask ([N, H, W], or a ``BoxMasks``) tinted and
    outlined in its own colour."""
    import cv2

    from boxlevelset.image import as_rgb

    rgb = (as_rgb(image) * 255.0).round().clip(0, 255).astype(np.uint8)
    if len(masks) == 0:
        return rgb
    if isinstance(masks, BoxMasks):  # work on each box, not on N whole images
        parts = [((y0, y1), (x0, x1), crop)
                 for (x0, y0, x1, y1), crop in zip(masks.bounds.tolist(), masks.crops)]
    else:
        parts = [((0, rgb.shape[0]), (0, rgb.shape[1]), mask) for mask in masks]
    out = rgb.astype(np.float32)
    colours = _palette(len(masks))
    for ((y0, y1), (x0, x1), mask), colour in zip(parts, colours):
        region = out[y0:y1, x0:x1]
        region[mask] = (1 - alpha) * region[mask] + alpha * colour
    out = out.round().clip(0, 255).astype(np.uint8)
    for ((y0, _), (x0, _), mask), colour in zip(parts, colours):
        # A zero frame around the mask: outlines along its crop's edge close as in the image.
        framed = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, 0)
        contours, _ = cv2.findContours(framed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                       offset=(x0 - 1, y0 - 1))
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as a PNG, atomically (a crash never leaves half a file)."""
    import cv2

    from boxlevelset.export import atomic_path

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[..., ::-1])):
            raise OSError(f"{path}: OpenCV could not write the PNG")


def _sorted_instances(inst: Any, size: tuple[int, int]) -> tuple[BoxMasks, np.ndarray,
                                                                 np.ndarray]:
    """(masks, labels, scores) by decreasing score, so label images favour confident masks;
    the masks as ``BoxMasks`` of an image of ``size`` (a model may give them whole)."""
    order = np.argsort(-np.asarray(inst.scores), kind="stable")
    masks = BoxMasks.from_masks(inst.masks, size).select(order)
    return masks, np.asarray(inst.labels, np.int64)[order], np.asarray(inst.scores)[order]


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def predict_folder(
    model: Any, source: str | Path | Any, out_dir: str | Path, *,
    score_threshold: float | None = None, window: Any = TRAINED_WINDOW, labels: bool = True,
    overlays: bool = True, progress: bool = False, tile: int | None = None,
    overlap: int | None = None,
) -> Path:
    """Predict every image of a folder (or one image) and write the results under `out_dir`.

    A CT volume file is predicted slice by slice (see `predict_volume`). Otherwise writes
    `predictions.json` (COCO, masks as RLE, categories = the model's classes with ids 1..K),
    and unless disabled `labels/<name>.png` (uint16 instance labels, the most confident mask
    wins overlaps; `.tif` when over 65535 instances) and `overlays/<name>.png` (the image with
    the masks tinted). With `tile`, each image is predicted in overlapping tiles of that
    many pixels (`overlap`; ``boxlevelset.tiles.predict_tiled``). Returns the JSON path.
    """
    from boxlevelset.export import write_coco, write_label_image

    window = resolve_window(model, window)
    _check_tile(tile, overlap)  # before any image is read
    if isinstance(source, (str, Path)) and _is_volume_file(Path(source)):
        return predict_volume(model, source, out_dir, score_threshold=score_threshold,
                              window=window, progress=progress, labels=labels, tile=tile,
                              overlap=overlap)
    folder = _load_source(source, window)
    if len(folder) == 0:
        raise ValueError(f"{source}: no images to predict")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(_class_names(model))]
    images, annotations = [], []
    records = folder.records
    stems = OutputStems()
    if progress:
        from tqdm import tqdm
        records = tqdm(records, desc="predict", unit="image")
    for record, image in folder.readable(records):
        # Each mask over its box, as RLE at once: whole-image masks cost instances x image
        # size, and a folder's, kept to the end, grew with the folder.
        inst = _instances(model, image, None, score_threshold, tile, overlap)
        masks, labs, scores = _sorted_instances(inst, image.shape[:2])
        images.append(coco_image_entry(record))
        annotations += _rle_annotations(int(record.image_id), masks, labs + 1, scores)
        stem = stems(record)
        if labels:
            label_image = masks.to_labels()
            suffix = ".png" if len(masks) < 65536 else ".tif"
            write_label_image(out_dir / "labels" / f"{stem}{suffix}", label_image)
        if overlays:
            write_png(out_dir / "overlays" / f"{stem}.png", overlay_image(image, masks))
    path = write_coco(out_dir / "predictions.json", images, annotations, categories)
    logger.info("%d images, %d instances -> %s", len(images), len(annotations), path)
    return path


def _instances(model: Any, image: np.ndarray, window: Any, score_threshold: float | None,
               tile: int | None, overlap: int | None) -> Any:
    """The model's instances of one image, each mask over its box; in tiles with ``tile``."""
    if tile is None:
        kwargs = {} if window is None else {"window": window}
        return model.predict(image, score_threshold=score_threshold, cropped=True, **kwargs)
    from boxlevelset.tiles import predict_tiled

    return predict_tiled(model, image, tile, overlap, window, score_threshold)


def _check_tile(tile: int | None, overlap: int | None) -> None:
    """ValueError for tile settings ``predict_tiled`` would refuse (none: no tiles)."""
    if tile is not None:
        from boxlevelset.tiles import check_tiling

        check_tiling(tile, overlap)


def _rle_annotations(image_id: int, masks: BoxMasks, category_ids: np.ndarray,
                     scores: np.ndarray) -> list[dict]:
    """write_coco's annotations of one image's instances, masks encoded now (RLE)."""
    return [{"image_id": image_id, "segmentation": rle, "category_id": int(c),
             "score": float(s)} for rle, c, s in zip(masks.to_rle(), category_ids, scores)]


def _file_stem(file_name: str) -> str:
    """A file's name without its suffix, whole for multi-part ones (ct.nii.gz -> ct)."""
    name = Path(file_name).name
    return name[: len(name) - len(lower_suffix(Path(name)))]


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and lower_suffix(path) in VOLUME_SUFFIXES


def predict_volume(
    model: Any, path: str | Path, out_dir: str | Path, *, score_threshold: float | None = None,
    window: Any = TRAINED_WINDOW, slices: Sequence[int] | None = None, progress: bool = False,
    labels: bool = True, tile: int | None = None, overlap: int | None = None,
) -> Path:
    """Predict every axial slice (or `slices`) of a CT volume file, windowed with `window`
    (by default the window the model was trained with), in tiles with `tile` (as
    `predict_folder`).

    Writes `predictions.json` (COCO, one image entry per slice with its slice_index) and,
    unless `labels` is False, `<name>_labels.nii.gz` (instance labels numbered across the
    whole volume, with the volume's spacing, origin and direction). Returns the JSON path.
    """
    from boxlevelset.data import read_volume, write_label_volume
    from boxlevelset.export import write_coco

    window = resolve_window(model, window)
    volume = read_volume(path)
    depth = volume.shape[0]
    indices = list(range(depth)) if slices is None else [int(z) for z in slices]
    bad = [z for z in indices if not 0 <= z < depth]
    if bad:
        raise ValueError(f"{path}: slice {bad[0]} is outside the volume's {depth} slices")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_volume = np.zeros(volume.shape, np.int32)
    images, annotations, next_label = [], [], 1
    iterator = indices
    if progress:
        from tqdm import tqdm
        iterator = tqdm(indices, desc="predict", unit="slice")
    name = Path(path).name
    for image_id, z in enumerate(iterator, start=1):
        inst = _instances(model, volume.array[z], window, score_threshold, tile, overlap)
        masks, labs, scores = _sorted_instances(inst, volume.shape[1:3])
        # Confident masks first; later ones do not overwrite them.
        for (x0, y0, x1, y1), crop in zip(masks.bounds.tolist(), masks.crops):
            region = label_volume[z, y0:y1, x0:x1]
            region[crop & (region == 0)] = next_label
            next_label += 1
        images.append({"id": image_id, "file_name": name, "height": volume.shape[1],
                       "width": volume.shape[2], "slice_index": z})
        annotations += _rle_annotations(image_id, masks, labs + 1, scores)
    if labels:
        stem = _file_stem(name)
        write_label_volume(out_dir / f"{stem}_labels.nii.gz", label_volume, like=volume)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(_class_names(model))]
    return write_coco(out_dir / "predictions.json", images, annotations, categories)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _category_map(model_names: Sequence[str], folder: Any, class_agnostic: bool | None
                  ) -> dict[int, int] | None:
    """Model label -> folder category id, or None for class-agnostic scoring."""
    folder_ids = {c["name"]: int(c["id"]) for c in folder.categories}
    if class_agnostic:
        return None
    if set(folder_ids) <= set(model_names):
        return {i: folder_ids[n] for i, n in enumerate(model_names) if n in folder_ids}
    if class_agnostic is None:
        logger.info("model classes %s do not cover the folder's %s: scoring class-agnostic",
                    list(model_names)[:5], sorted(folder_ids)[:5])
        return None
    raise ValueError(f"{folder.root}: categories {sorted(set(folder_ids) - set(model_names))} "
                     "are not among the model's classes (use class_agnostic=True)")


def evaluate_model(
    model: Any, folder: str | Path | Any, max_dets: int = 1000, *, box_prompted: bool = True,
    refine: int = 0, class_agnostic: bool | None = None, window: Any = TRAINED_WINDOW,
    progress: bool = False, tile: int | None = None, overlap: int | None = None,
) -> dict[str, float]:
    """Score a model on a folder with ground-truth masks.

    Returns COCO mask AP of the model alone ("AP", "AP50", "AP75", "APs", "APm", "APl"; up
    to `max_dets` detections per image), VOC-style mask AP ("voc_AP25", "voc_AP50",
    "voc_AP70", "voc_AP75"), and with `box_prompted` the quality of masks prompted by the
    ground-truth boxes ("box_mIoU": mean IoU with the matching GT mask; "box_AP", ...: COCO AP
    with every prompted mask scored 1.0), plus "images", "instances" and inference times
    ("ms_per_image": the whole model; "box_ms_per_image": the box prompts of an image once
    its features are cached, as in interactive use). With `refine` > 0 the prompted masks
    are the model's masks refined by that many level-set steps (``segment_boxes(...,
    model=, refine=)``, the plugin's "Model + level set"). Class-agnostic when the model's
    classes do not cover the folder's (or when asked): every category is then merged into
    one. Images without objects are predicted too, so their false positives count. With
    `tile`, images are predicted, and prompted, in tiles (``boxlevelset.tiles``).
    """
    from boxlevelset.evaluate import coco_mask_ap, matched_ious, voc_mask_ap
    from boxlevelset.export import coco_results

    _check_tile(tile, overlap)  # before any image is read
    folder = _load_source(folder, resolve_window(model, window))
    # Every image is predicted (images without objects count false positives); box prompts
    # only exist where there are boxes.
    records = list(folder.records)
    n_prompted = sum(1 for r in records if len(r.boxes))
    if not n_prompted:
        raise ValueError(f"{folder.root}: no annotated images to evaluate on")
    gt = folder.to_coco_gt()
    missing = [a for a in gt["annotations"] if "segmentation" not in a]
    if missing:
        bad = {r.image_id: r.file_name for r in folder.records}[missing[0]["image_id"]]
        raise ValueError(f"{folder.root}: {len(missing)} boxes have no mask to score against "
                         f"(first in {bad})")
    mapping = _category_map(_class_names(model), folder, class_agnostic)
    if mapping is None:
        gt = dict(gt, categories=[{"id": 1, "name": "object"}],
                  annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    results: list[dict] = []
    prompted: list[dict] = []
    ious: list[np.ndarray] = []
    t_model = t_box = 0.0
    predictor = None
    if box_prompted:
        from boxlevelset.model import Predictor
        from boxlevelset.tiles import TiledPredictor

        predictor = (Predictor(model) if tile is None
                     else TiledPredictor(model, tile, overlap))
    iterator = records
    if progress:
        from tqdm import tqdm
        iterator = tqdm(records, desc="evaluate", unit="image")
    scored: set[int] = set()
    for record, image in folder.readable(iterator):  # an unreadable image: warned, left out
        scored.add(record.image_id)
        t0 = time.perf_counter()
        if predictor is not None:  # one backbone pass serves both evaluations
            inst = predictor.set_image(image).predict(score_threshold=None, cropped=True)
        else:
            inst = _instances(model, image, None, None, tile, overlap)
        t_model += time.perf_counter() - t0
        masks, labs, scores = _sorted_instances(inst, image.shape[:2])
        if mapping is None:
            cats = np.ones(len(labs), np.int64)
        else:
            keep = np.array([int(lab) in mapping for lab in labs], bool)
            masks, labs, scores = masks.select(keep), labs[keep], scores[keep]
            cats = np.array([mapping[int(lab)] for lab in labs], np.int64)
        results += coco_results(record.image_id, masks, scores, cats)
        if predictor is not None and len(record.boxes):
            # Masks over their boxes: whole-image ones cost boxes x image size (GBs for the
            # hundreds of nuclei of a large tile).
            gt_masks = folder.gt_box_masks(record)
            t0 = time.perf_counter()
            if refine > 0:
                from boxlevelset.levelset import segment_boxes

                box_masks = segment_boxes(image, record.boxes, model=predictor, refine=refine,
                                          cropped=True)
            else:
                box_masks = predictor.predict_boxes(record.boxes, cropped=True)
            t_box += time.perf_counter() - t0
            ious.append(np.asarray(matched_ious(gt_masks, box_masks), np.float64))
            gt_cats = (np.ones(len(record.boxes), np.int64) if mapping is None
                       else np.asarray(record.category_ids, np.int64))
            prompted += coco_results(record.image_id, box_masks, np.ones(len(box_masks)),
                                     gt_cats)
    if not scored:
        raise ValueError(f"{folder.root}: no image could be read")
    if len(scored) < len(records):  # its ground truth is not held against the model
        gt = dict(gt, images=[i for i in gt["images"] if i["id"] in scored],
                  annotations=[a for a in gt["annotations"] if a["image_id"] in scored])
        records = [r for r in records if r.image_id in scored]
        n_prompted = max(1, sum(1 for r in records if len(r.boxes)))
    out: dict[str, float] = {}
    out.update(_ap(coco_mask_ap, gt, results, max_dets))
    for key, value in voc_mask_ap(gt, results).items():
        out[f"voc_{key}"] = float(value)
    if predictor is not None:
        out["box_mIoU"] = float(np.concatenate(ious).mean()) if ious else 0.0
        for key, value in _ap(coco_mask_ap, gt, prompted, max_dets).items():
            out[f"box_{key}"] = value
        out["box_ms_per_image"] = 1000.0 * t_box / n_prompted
    out["images"] = len(records)
    out["instances"] = sum(1 for a in gt["annotations"] if not a["iscrowd"])
    out["ms_per_image"] = 1000.0 * t_model / len(records)
    return out


def _ap(fn: Any, gt: dict, results: list[dict], max_dets: int) -> dict[str, float]:
    """COCO AP dict as floats (an empty result list scores 0, and -1 where a size range has
    no ground truth, as with detections)."""
    return {k: float(v) for k, v in fn(gt, results, max_dets=max_dets).items()}


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column markdown table of evaluate_model's numbers."""
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float)
                     else f"| {key} | {value} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line (registered as `boxlevelset evaluate` / `boxlevelset predict` by boxlevelset.cli)
# ---------------------------------------------------------------------------------------------


def _add_window_and_device(parser: argparse.ArgumentParser) -> None:
    """The --window and --device options of the commands that run a model."""
    parser.add_argument("--window", default=TRAINED_WINDOW,
                        help="CT window for volume slices: a preset or level,width (default: "
                             "the window the model was trained with, else abdomen)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")


def _add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """The --tile and --overlap options of the commands that run a model."""
    parser.add_argument("--tile", type=int, metavar="PX",
                        help="run the model on large images in overlapping tiles of PX x PX "
                             "pixels, about the size of the training images (default: whole "
                             "images, resized to the model's input size)")
    parser.add_argument("--overlap", type=int, metavar="PX",
                        help="pixels neighbouring tiles share (default: a quarter of --tile); "
                             "more than the objects' size")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `boxlevelset evaluate MODEL FOLDER`."""
    parser.add_argument("model", help="model checkpoint (.pth)")
    parser.add_argument("data", help="folder with boxes and ground-truth masks")
    parser.add_argument("--max-dets", type=int, default=1000,
                        help="detections per image scored (COCO's default 100 caps recall)")
    parser.add_argument("--no-box-prompted", action="store_true",
                        help="skip the box-prompted evaluation")
    parser.add_argument("--refine", type=int, default=0, metavar="N",
                        help="box prompts: refine the model's masks by N level-set steps")
    parser.add_argument("--class-agnostic", action="store_true", help="merge all categories")
    _add_tile_arguments(parser)
    _add_window_and_device(parser)
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """`boxlevelset evaluate`: print a metrics table (and write JSON); returns the exit code."""
    from boxlevelset.export import atomic_write
    from boxlevelset.model import load_model

    model = load_model(args.model, device=args.device)
    metrics = evaluate_model(model, args.data, max_dets=args.max_dets,
                             box_prompted=not args.no_box_prompted, refine=args.refine,
                             class_agnostic=True if args.class_agnostic else None,
                             window=args.window, progress=True, tile=args.tile,
                             overlap=args.overlap)
    print(format_metrics(metrics))
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(metrics, f, indent=2)
    return 0


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `boxlevelset predict MODEL INPUT`."""
    parser.add_argument("model", help="model checkpoint (.pth)")
    parser.add_argument("input", help="an image, a folder of images, a box-labeled folder, or a "
                        "CT volume file (.nii.gz, .nrrd, .mha: every slice, windowed)")
    parser.add_argument("-o", "--output", "--out", dest="output", default="predictions",
                        help="output directory")
    parser.add_argument("--score-threshold", type=float, help="keep instances above this score")
    _add_tile_arguments(parser)
    _add_window_and_device(parser)
    parser.add_argument("--no-labels", action="store_true", help="skip label images")
    parser.add_argument("--no-overlays", action="store_true", help="skip overlay PNGs")
    return parser


def run_predict(args: argparse.Namespace) -> int:
    """`boxlevelset predict`: write predictions and print the COCO JSON path."""
    from boxlevelset.model import load_model

    model = load_model(args.model, device=args.device)
    path = predict_folder(model, args.input, args.output, score_threshold=args.score_threshold,
                          window=args.window, labels=not args.no_labels,
                          overlays=not args.no_overlays, progress=True, tile=args.tile,
                          overlap=args.overlap)
    print(path)
    return 0
