"""The `boxlevelset` command line: segment, train, evaluate, predict.

    boxlevelset segment --sample --out out/          # shipped nuclei image + boxes
    boxlevelset segment FOLDER --out out/            # a box-labeled folder (COCO / VOC)
    boxlevelset segment a.png --boxes boxes.json     # images with boxes from a JSON file
    boxlevelset segment a.png --boxes '[[10, 20, 80, 90]]'   # or boxes given inline
    boxlevelset train FOLDER --preset lite --out runs/lite
    boxlevelset evaluate model.pth FOLDER
    boxlevelset predict model.pth FOLDER --out out/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boxlevelset.image import as_boxes, resolve_window

SAMPLES = Path(__file__).parent / "samples"


def _boxes_from_json(
    path: Path | str,
) -> tuple[dict[str, np.ndarray] | np.ndarray, list[str] | None]:
    """Boxes from a JSON file, or from JSON text given in its place (text that starts with
    '[' or '{' and is not a file): a list of [x0, y0, x1, y1] (same boxes for every
    image), or {"boxes_xyxy": [...], "categories": [a name per box]} (categories
    optional), or {image file name: [[x0, y0, x1, y1], ...], ...}. Returns the boxes and
    the category names (None when not given)."""
    text = str(path)
    inline = text.lstrip()[:1] in ("[", "{") and not Path(text).is_file()
    try:
        data = json.loads(text if inline else Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        what = "boxes given as JSON text" if inline else "cannot read boxes JSON"
        raise ValueError(f"{text}: {what} ({exc})") from None
    names = None
    if isinstance(data, dict) and "boxes_xyxy" in data:
        names = data.get("categories")
        data = data["boxes_xyxy"]
        if names is not None and not isinstance(data, list):
            raise ValueError(f"{path}: 'categories' name the boxes of a 'boxes_xyxy' list")
    elif isinstance(data, dict) and "categories" in data:
        raise ValueError(f"{path}: 'categories' go with 'boxes_xyxy' (a list of boxes), not "
                         "with boxes per file name")
    if isinstance(data, dict):
        # Keys as given: "a/img.png" and "b/img.png" are two images (see _boxes_per_input).
        per_file = {}
        for key, value in data.items():
            try:
                per_file[key] = as_boxes(value)
            except ValueError as exc:
                raise ValueError(f"{path}: boxes for {key}: {exc}") from None
        return per_file, None
    try:
        boxes = as_boxes(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if names is not None and (not isinstance(names, list) or len(names) != len(boxes)
                              or not all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"{path}: 'categories' must list a name for each of the "
                         f"{len(boxes)} boxes")
    return boxes, names


def _folder_for(args: argparse.Namespace):
    """A BoxFolder holding the images to segment and their boxes."""
    from boxlevelset.data import (
        BoxFolder,
        ImageReadError,
        Record,
        clip_and_filter,
        load_box_folder,
        read_image,
    )

    if args.sample:
        if args.inputs or args.boxes is not None:
            raise ValueError("--sample runs on the shipped image and boxes; give either "
                             "--sample or images with --boxes")
        args.inputs = [SAMPLES / "nuclei.png"]
        args.boxes = SAMPLES / "nuclei_boxes.json"
    if not args.inputs:
        raise ValueError("give images, a box-labeled folder, or --sample")
    if any(_is_box_source(Path(p)) for p in args.inputs):
        if len(args.inputs) > 1 or args.boxes is not None:
            raise ValueError("a folder (or its COCO .json) is segmented alone, with the boxes "
                             "of its annotations (annotations.json or Annotations/); --boxes "
                             "is for image files")
        folder = load_box_folder(args.inputs[0], window=args.window or "abdomen")
        if not any(len(r.boxes) for r in folder.records):
            raise ValueError(f"{args.inputs[0]}: no boxes to segment (a box-labeled folder "
                             "has annotations.json or Annotations/; for plain images give "
                             "the files with --boxes)")
        return folder
    if args.boxes is None:
        raise ValueError("image files need --boxes: [[x0, y0, x1, y1], ...] as JSON text or a file")
    boxes, names = _boxes_from_json(args.boxes)
    if isinstance(boxes, dict):
        boxes = _boxes_per_input(boxes, args.inputs, args.boxes)
    categories = list(dict.fromkeys(names or ["object"]))
    root, file_names = _common_root(args.inputs)
    records, unreadable = [], []
    for i, (name, file_name) in enumerate(zip(args.inputs, file_names), start=1):
        path = Path(name)
        try:
            image = read_image(path)
        except ImageReadError as err:  # one damaged file does not cost the others' masks
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            unreadable.append(str(err))
            continue
        b = boxes[i - 1] if isinstance(boxes, list) else boxes
        height, width = image.shape[:2]
        clipped, keep = clip_and_filter(b, width, height)
        if not keep.all():
            warnings.warn(f"{path}: dropped {int((~keep).sum())} box(es) outside the "
                          f"{width}x{height} image", stacklevel=2)
        cats = np.array([categories.index(n) + 1 for n in names] if names
                        else [1] * len(b), np.int64).reshape(-1)
        records.append(Record(
            image_id=i, file_name=file_name, path=path, width=width, height=height,
            boxes=clipped[keep], category_ids=cats[keep],
            segmentations=[None] * int(keep.sum()),
        ))
    if not records:
        raise ValueError("no image could be read: " + "; ".join(unreadable))
    cat_rows = [{"id": k, "name": n} for k, n in enumerate(categories, start=1)]
    return BoxFolder(root, cat_rows, records)


def _boxes_per_input(boxes: dict[str, np.ndarray], inputs: Sequence[Path | str],
                     source: Any) -> list[np.ndarray]:
    """The boxes of each input from {file name: boxes}: a key names the input whose path
    ends with it ("img.png", or "a/img.png" to tell a/img.png from b/img.png); the longest
    match wins. ValueError for a key that names no input, or several; a warning for an
    input no key names."""
    paths = [Path(p).absolute().parts for p in inputs]
    best: list[tuple[int, np.ndarray]] = [(0, np.zeros((0, 4)))] * len(paths)
    for key, value in boxes.items():
        parts = tuple(q for q in Path(key).parts if q != ".")
        if Path(key).is_absolute():
            hits = [i for i, p in enumerate(paths) if p == Path(key).absolute().parts]
        else:
            hits = [i for i, p in enumerate(paths) if parts and p[-len(parts):] == parts]
        if not hits:
            raise ValueError(f"{source}: boxes for {key}, which no input image is named "
                             f"(inputs: {', '.join(str(p) for p in inputs)})")
        if len(hits) > 1:
            raise ValueError(f"{source}: {key} names {len(hits)} inputs "
                             f"({', '.join(str(inputs[i]) for i in hits)}); give the boxes "
                             "with the folder in the name (e.g. a/img.png)")
        if len(parts) > best[hits[0]][0]:
            best[hits[0]] = (len(parts), value)
    unnamed = [str(inputs[i]) for i, (matched, _) in enumerate(best) if not matched]
    if unnamed:  # most likely a typo in a key: say so rather than write empty masks quietly
        warnings.warn(f"{source}: no boxes for {', '.join(unnamed)}; "
                      f"{'it gets' if len(unnamed) == 1 else 'they get'} no masks", stacklevel=3)
    return [value for _, value in best]


def _is_box_source(path: Path) -> bool:
    """A box-labeled folder, or a COCO .json file that load_box_folder reads as one."""
    return path.is_dir() or (path.suffix.lower() == ".json" and path.is_file())


def _common_root(inputs: Sequence[Path | str]) -> tuple[Path, list[str]]:
    """The folder of the image inputs and their COCO file names relative to it: bare names
    when they differ, else paths from the inputs' common folder (a/img.png and b/img.png
    must not both be "img.png" in masks.json)."""
    paths = [Path(p) for p in inputs]
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return paths[0].parent, names
    absolute = [p.absolute() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return root, [p.relative_to(root).as_posix() for p in absolute]


def run_segment(args: argparse.Namespace) -> int:
    """Masks from boxes for every image: COCO JSON (RLE), label images, overlay PNGs."""
    from tqdm import tqdm

    from boxlevelset.export import write_coco, write_label_image
    from boxlevelset.levelset import LOOSE_BOXES, segment_boxes
    from boxlevelset.data import coco_image_entry
    from boxlevelset.predict import OutputStems, overlay_image, write_png

    if args.refine and not args.model:
        raise ValueError("--refine refines a model's masks: give --model too")
    if args.tile is not None:
        if not args.model:
            raise ValueError("--tile prompts a model in tiles: give --model too")
        from boxlevelset.tiles import check_tiling

        check_tiling(args.tile, args.overlap)
    resolve_window(args.window)  # a bad window is an error before any work
    folder = _folder_for(args)
    model = None
    if args.model:
        from boxlevelset.model import load_model

        model = load_model(args.model, device=args.device)
    out = Path(args.out)
    images, annotations, empty = [], [], 0
    stems = OutputStems()
    for record, image in folder.readable(tqdm(folder.records, desc="segment", unit="image")):
        boxes = np.asarray(record.boxes, float).reshape(-1, 4)
        options = {k: v for k, v in (("iterations", args.iterations),
                                     ("histogram", args.histogram)) if v is not None}
        if args.loose_boxes:
            options.update(LOOSE_BOXES)
        if model is not None:
            options["refine"] = args.refine
        elif args.solver:
            options["solver"] = args.solver
        pixels, window = image, args.window  # a window given for image files: they hold HU
        if record.slice_index is not None:
            # CT: the slice in Hounsfield units with the folder's window, not the uint8
            # picture of it; segment_boxes then applies its CT defaults (the cut).
            pixels, window = folder.slice_hu(record), folder.window
        # Each mask over its box only, kept as RLE: memory follows the boxes' area, not
        # masks x image size (961 nuclei on a 2048x2048 image held 6 GB as HxW masks).
        prompt = model
        if model is not None and args.tile is not None:  # each box on the tile holding it
            from boxlevelset.tiles import TiledPredictor

            prompt = TiledPredictor(model, args.tile, args.overlap).set_image(pixels, window)
        masks = segment_boxes(pixels, boxes, model=prompt, window=window, cropped=True,
                              **options)
        images.append(coco_image_entry(record))
        annotations += [{"image_id": int(record.image_id), "category_id": int(category),
                         "segmentation": rle}
                        for rle, category in zip(masks.to_rle(), record.category_ids)]
        empty += sum(not crop.any() for crop in masks.crops)
        stem = stems(record)
        write_label_image(out / "labels" / f"{stem}.{args.label_format}", masks.to_labels())
        write_png(out / "overlays" / f"{stem}.png", overlay_image(image, masks))
    path = write_coco(out / "masks.json", images, annotations, folder.categories)
    n = len(annotations)
    found = f"{n} masks" + (f" ({empty} empty: no object found in the box)" if empty else "")
    print(f"{len(images)} images, {found} -> {path}, {out / 'labels'}, {out / 'overlays'}")
    return 0


def _non_negative(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ..." message
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``boxlevelset`` command line: segment, train, predict, evaluate."""
    from boxlevelset import predict, train

    parser = argparse.ArgumentParser(
        prog="boxlevelset",
        description="Box-supervised instance segmentation with level-set evolution.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="masks from boxes (model-free level set, or --model)")
    seg.add_argument("inputs", nargs="*", type=Path, help="images, or one box-labeled folder")
    seg.add_argument("--boxes",
                     help='boxes for image inputs, a JSON file or JSON text: '
                          '[[x0, y0, x1, y1], ...] for every image, '
                          '{"a.png": [[x0, y0, x1, y1], ...], ...} per file name ("dir/a.png" '
                          'tells same-named files apart), or '
                          '{"boxes_xyxy": [...]}')
    seg.add_argument("--sample", action="store_true", help="run on the shipped nuclei sample")
    # -o / --output / --out, as train and predict take them.
    seg.add_argument("-o", "--output", "--out", dest="out", type=Path,
                     default=Path("boxlevelset-out"), help="output folder")
    seg.add_argument("--model", help="checkpoint for model-based masks (default: model-free)")
    seg.add_argument("--device", default=None, help="cpu / cuda (model only)")
    seg.add_argument("--tile", type=int, metavar="PX",
                     help="with --model, on images far larger than its training images: "
                          "prompt each box on an overlapping tile of PX x PX pixels around "
                          "it (default: the whole image, resized to the model's input)")
    seg.add_argument("--overlap", type=int, metavar="PX",
                     help="pixels neighbouring tiles share (default: a quarter of --tile)")
    seg.add_argument("--window", default=None,
                     help="CT window: a preset (abdomen, liver, lung, bone) or level,width "
                          "(--window=-600,1500 for a negative level); for a folder's volumes "
                          "(default abdomen), or for image files holding Hounsfield units")
    seg.add_argument("--iterations", type=_non_negative(int),
                     help="level-set iterations of the evolution (model-free; after the "
                          "graph cut, CT's default, 10 polishing steps are taken instead)")
    seg.add_argument("--histogram", type=_non_negative(float), metavar="W",
                     help="weight of the histogram region term (default 10; 0: the paper's "
                          "energy alone)")
    seg.add_argument("--solver", choices=("evolve", "cut"), default=None,
                     help="model-free solver: evolve (gradient descent; default for images) or "
                          "cut (global graph cut, then a short evolution; default for CT)")
    seg.add_argument("--loose-boxes", action="store_true",
                     help="boxes drawn loosely, not touching their objects on every side: "
                          "drop the energy's tight-box terms (levelset.LOOSE_BOXES)")
    seg.add_argument("--refine", type=_non_negative(int), default=0, metavar="N",
                     help="with --model: N level-set steps starting from the model's masks")
    seg.add_argument("--label-format", choices=("png", "tif"), default="png")
    seg.set_defaults(func=run_segment)

    tr = sub.add_parser("train", help="train or fine-tune on a box-labeled folder")
    train.add_train_arguments(tr)
    tr.set_defaults(func=train.run_train)
    ev = sub.add_parser("evaluate", help="mask AP of a model on a folder with masks")
    predict.add_evaluate_arguments(ev)
    ev.set_defaults(func=predict.run_evaluate)
    pr = sub.add_parser("predict", help="all instances of every image with a model")
    predict.add_predict_arguments(pr)
    pr.set_defaults(func=predict.run_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``boxlevelset`` with ``argv`` (default: sys.argv); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from boxlevelset.backbone import PretrainedWeightsError
    from boxlevelset.train import TrainingDiverged

    try:
        return int(args.func(args) or 0)
    # OSError: paths, permissions; PretrainedWeightsError: ImageNet weights offline
    except (ValueError, OSError, TrainingDiverged, PretrainedWeightsError) as exc:
        print(f"boxlevelset {args.command}: error: {exc}", file=sys.stderr)
        return 2
