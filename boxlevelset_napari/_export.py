"""Exports from viewer layers: COCO JSON with RLE, label images, CT label volumes, box folders.

Plain functions over napari layers (no Qt), all writing through the engine's atomic writers.
A 3D image is a stack of planes (CT slices or the images of a box folder); each plane that
holds boxes or masks becomes one image entry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from boxlevelset.data import IMAGE_SUFFIXES
from boxlevelset.export import BoxMasks, lower_suffix
from boxlevelset.image import apply_window

from ._layers import DEFAULT_CATEGORY, contrast_window, plugin_meta, rectangle_to_box


def _is_stack(image: Any) -> bool:
    return image.data.ndim - (1 if image.rgb else 0) == 3


def _planes(image: Any) -> list[int | None]:
    return list(range(image.data.shape[0])) if _is_stack(image) else [None]


def _plane(array: Any, plane: int | None) -> np.ndarray:
    return np.asarray(array if plane is None else array[plane])


def _plane_size(image: Any, plane: int | None) -> tuple[int, int]:
    """(height, width) of a plane, without the padding a stacked folder added."""
    meta = plugin_meta(image)
    if plane is not None and meta.get("kind") == "folder":
        return tuple(meta["sizes"][plane])
    shape = image.data.shape[1:] if plane is not None else image.data.shape
    return int(shape[0]), int(shape[1])


def _entry(image: Any, plane: int | None, image_id: int) -> dict:
    """COCO image entry for one plane (file name from the source when known)."""
    meta = plugin_meta(image)
    names = meta.get("file_names") or []
    height, width = _plane_size(image, plane)
    entry = {"id": image_id, "height": height, "width": width}
    if meta.get("kind") == "folder" and plane is not None:
        entry["file_name"] = names[plane]
        if meta.get("z_stack"):  # the planes of one stack may share its file
            entry["plane"] = int(plane)
    elif meta.get("kind") == "ct":
        entry["file_name"] = names[0] if names else f"{image.name}.nii.gz"
        if plane is not None:
            entry["slice_index"] = int(plane)
    elif plane is not None:
        entry["file_name"] = f"{image.name}_{plane:04d}.png"
    else:
        entry["file_name"] = names[0] if names else f"{image.name}.png"
    return entry


def _source_file(image: Any, plane: int | None) -> Path | None:
    """The file a plane of a folder (or a single image) was read from, where it still
    exists: Save annotations copies it as it is instead of encoding its pixels again."""
    meta = plugin_meta(image)
    if meta.get("kind") == "folder":
        paths = meta.get("paths") or []
        index = 0 if plane is None else plane
        source = paths[index] if index < len(paths) else None
    elif meta.get("kind") == "image":
        source = meta.get("source")
    else:
        return None
    return Path(source) if source and Path(source).is_file() else None


def _categories(image: Any, class_names: list[str]) -> list[dict]:
    """COCO categories: the source folder's ids when it has them, else 1..K in class order."""
    cats = [dict(c) for c in plugin_meta(image).get("categories", [])]
    known = {c["name"] for c in cats}
    next_id = max((int(c["id"]) for c in cats), default=0) + 1
    for name in class_names:
        if name not in known:
            cats.append({"id": next_id, "name": name})
            known.add(name)
            next_id += 1
    return cats


def _boxes_and_categories(image: Any, boxes: Any, class_names: Sequence[str]):
    """(stacked, boxes per plane, COCO categories, name -> id) shared by both exports:
    categories are the widget's classes followed by any other class the boxes use; the
    widget's default class is left out when the boxes have classes of their own and none
    of its (it would become the reopened folder's first class, for the next box)."""
    stacked = _is_stack(image)
    per_plane = _ensure_stack_plane(_boxes_by_plane(boxes), stacked)
    used = [cat for items in per_plane.values() for _bid, _box, cat in items]
    names = list(class_names)
    if used and DEFAULT_CATEGORY not in used and len(names) > 1:
        names = [n for n in names if n != DEFAULT_CATEGORY]
    cats = _categories(image, list(dict.fromkeys([*names, *used])))
    return stacked, per_plane, cats, {c["name"]: int(c["id"]) for c in cats}


def _boxes_by_plane(boxes: Any) -> dict[int | None, list[tuple[int, np.ndarray, str]]]:
    out: dict[int | None, list] = {}
    if boxes is None:
        return out
    feats = boxes.features
    ids = feats["box_id"].to_numpy(dtype=np.int64) if "box_id" in feats else \
        np.arange(1, len(boxes.data) + 1)
    cats = feats["category"].astype(str).to_numpy() if "category" in feats else \
        np.full(len(boxes.data), DEFAULT_CATEGORY, dtype=object)
    for vertices, box_id, cat in zip(boxes.data, ids, cats):
        plane, box = rectangle_to_box(vertices)
        out.setdefault(plane, []).append((int(box_id), box, str(cat)))
    return out


def _box_classes(per_plane: dict) -> dict[int, str]:
    """Label id -> class of its box, over all planes: a mask propagated through slices keeps
    its box's label id on planes without a box."""
    return {bid: cat for items in per_plane.values() for bid, _box, cat in items}


def _ensure_stack_plane(boxes_planes: dict, stacked: bool) -> dict:
    # A 2D boxes layer over a 2D image has plane None; keep keys consistent with _planes().
    if stacked:
        return boxes_planes
    merged: list = []
    for items in boxes_planes.values():
        merged.extend(items)
    return {None: merged} if merged else {}


def export_coco(path: str | os.PathLike, image: Any, boxes: Any, labels: Any,
                class_names: list[str]) -> Path:
    """COCO JSON with one RLE-encoded annotation per label id on each plane.

    A label whose id is a box's `box_id` takes that box's category; labels painted by hand
    without a box take the first class. Planes without any label are left out.
    """
    from boxlevelset.export import write_coco

    if labels is None:
        raise ValueError("there are no masks to export yet (segment some boxes first)")
    stacked, per_plane, cats, cat_id = _boxes_and_categories(image, boxes, class_names)
    default_cat = int(cats[0]["id"])  # masks without a box: the first class
    box_cat = _box_classes(per_plane)
    images, annotations = [], []
    for plane in _planes(image):
        height, width = _plane_size(image, plane)
        lab = _plane(labels.data, plane)[:height, :width]
        ids = [int(v) for v in np.unique(lab) if v != 0]
        if not ids:
            continue
        image_id = len(images) + 1
        images.append(_entry(image, plane, image_id))
        # RLE from each label's bounding box: a plane-sized mask per label held 4 GB for
        # 961 nuclei of a 2048x2048 tile.
        for label_id, rle in zip(ids, BoxMasks.from_labels(lab, ids).to_rle()):
            annotations.append({
                "image_id": image_id,
                "segmentation": rle,
                "category_id": cat_id.get(box_cat.get(label_id, ""), default_cat),
            })
    if not images:
        raise ValueError("the labels layer is empty: nothing to export")
    return write_coco(path, images, annotations, cats)


def export_label_image(path: str | os.PathLike, labels: Any) -> Path | list[Path]:
    """Label image (.png uint16 / .tif). A 3D labels layer gives one file per plane
    (`<name>_<plane>.<ext>`)."""
    from boxlevelset.export import write_label_image

    if labels is None:
        raise ValueError("there are no masks to export yet (segment some boxes first)")
    from boxlevelset.export import atomic_path, check_label_image_path

    path = check_label_image_path(path)  # before the planes' temporary names hide the suffix
    data = np.asarray(labels.data)
    if data.ndim == 2:
        return write_label_image(path, data)
    targets = [path.with_name(f"{path.stem}_{k:04d}{path.suffix}") for k in range(len(data))]
    blocked = next((t for t in targets if t.is_dir()), None)
    if blocked is not None:
        raise IsADirectoryError(f"{blocked} is a folder; choose another name for the planes")
    # All planes or none: every file is written under a temporary name first, and the
    # files take their names only once all are written.
    with ExitStack() as stack:
        for target, plane in zip(targets, data):
            write_label_image(stack.enter_context(atomic_path(target)), plane)
    return targets


def export_label_volume(path: str | os.PathLike, labels: Any, image: Any) -> Path:
    """CT label volume (NIfTI/NRRD/MHA) with the source volume's spacing, origin, direction."""
    from boxlevelset.data import write_label_volume

    if labels is None:
        raise ValueError("there are no masks to export yet (segment some boxes first)")
    volume = plugin_meta(image).get("volume") or plugin_meta(labels).get("volume")
    if volume is None:
        raise ValueError(f"layer {image.name!r} was not read from a CT volume: its geometry "
                         "(spacing, origin, direction) is unknown; export a label image instead")
    data = np.asarray(labels.data)
    target = np.asarray(volume.array).shape
    if data.shape != target:
        if data.size == int(np.prod(target)):
            data = data.reshape(target)
        else:
            raise ValueError(f"labels shape {data.shape} does not match the volume {target}")
    out = write_label_volume(path, data, like=volume)
    return Path(out) if out is not None else Path(path)


def _plane_uint8(image: Any, plane: int | None) -> np.ndarray:
    """Image plane as saved into a box folder: CT windowed to uint8, padding cropped."""
    height, width = _plane_size(image, plane)
    arr = _plane(image.data, plane)[:height, :width]
    if plugin_meta(image).get("kind") == "ct":
        return (apply_window(arr, contrast_window(image.contrast_limits)) * 255 + 0.5).astype(
            np.uint8)
    return arr


def _add_mask_boxes(per_plane: dict, image: Any, labels: Any, default_class: str) -> None:
    """Masks without a box on their plane (propagated through slices, or painted by hand)
    get the tight box of their pixels, and the class of the box whose label id they carry
    (else the default class), so a saved folder keeps every mask the layer shows."""
    box_cat = _box_classes(per_plane)
    for plane in _planes(image):
        height, width = _plane_size(image, plane)
        lab = _plane(labels.data, plane)[:height, :width]
        drawn = {bid for bid, _box, _cat in per_plane.get(plane, [])}
        ids = [int(v) for v in np.unique(lab) if v != 0 and int(v) not in drawn]
        for label_id, box in zip(ids, BoxMasks.from_labels(lab, ids).bounds.tolist()):
            per_plane.setdefault(plane, []).append(
                (label_id, np.array(box, np.float64), box_cat.get(label_id, default_class)))


def save_annotations(folder: str | os.PathLike, image: Any, boxes: Any, labels: Any,
                     class_names: list[str]) -> Path:
    """Write the box-labeled folder format (images/ + annotations.json) for the planes with
    boxes or masks, with masks (RLE) where the labels layer has them, so the folder can be
    reopened with the plugin's reader and fine-tuned on. A mask without a box on its plane
    gets the tight box around it.

    Each annotation carries its label id as "object_id", and "prompt" true on a box drawn
    in the viewer (false on a tight box made from a mask), so that a mask propagated
    through slices reopens as one object with its one box. A stack is saved whole, so
    that it reopens with every plane to annotate further: a CT volume as the volume (HU,
    geometry) with "slice_index" entries; another z-stack (nor a folder of separate
    images) as one multi-page TIFF in the layer's type, its annotated planes' entries
    carrying their index as "plane", and "info" the stack's plane count; "info" also
    holds the layer scale (a CT volume has its spacing)."""
    from boxlevelset.data import save_box_folder

    if boxes is None or len(boxes.data) == 0:
        raise ValueError("there are no boxes to save")
    stacked, per_plane, cats, cat_id = _boxes_and_categories(image, boxes, class_names)
    drawn = {(plane, bid) for plane, items in per_plane.items() for bid, _box, _cat in items}
    if labels is not None:
        _add_mask_boxes(per_plane, image, labels, cats[0]["name"])
    # A CT volume is saved as itself (Hounsfield units, spacing, origin, direction) with an
    # entry per annotated slice, not as windowed 8-bit pictures of the slices.
    meta = plugin_meta(image)
    volume = meta.get("volume") if stacked and meta.get("kind") == "ct" else None
    # A z-stack keeps its planes' places (a stacked folder's planes are separate images).
    z_stack = stacked and volume is None and (meta.get("kind") != "folder" or
                                              bool(meta.get("z_stack")))
    # ... saved whole, once: planes without boxes are kept to reopen and annotate later.
    whole = np.asarray(image.data) if z_stack else None
    if stacked and volume is None and whole is None:
        # So are the images of a folder that have no boxes yet (they are still to do).
        for plane in range(image.data.shape[0]):
            if plane not in per_plane and _source_file(image, plane) is not None:
                per_plane[plane] = []
    items, box_fields = [], []
    written: set[str] = set()  # the 2D pictures' file names
    for plane in sorted(per_plane, key=lambda p: -1 if p is None else p):
        entries = per_plane[plane]
        height, width = _plane_size(image, plane)
        name = _entry(image, plane, 0)["file_name"]
        if volume is not None:
            if not name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
                name = f"{Path(name).name.split('.')[0]}.nii.gz"  # e.g. a DICOM series
            pixels = volume
        elif whole is not None:
            name, pixels = _stack_file_name(image), whole
        else:
            if lower_suffix(Path(name)) not in IMAGE_SUFFIXES:
                name = f"{Path(name).name.split('.')[0]}_{plane or 0:04d}.png"
            source = _source_file(image, plane)
            if source is not None and Path(name).suffix.lower() == source.suffix.lower():
                pixels = source  # copied as it is: no second JPEG encoding, no lost bits
            else:
                pixels = _plane_uint8(image, plane)
                if pixels.dtype not in (np.uint8, np.uint16):  # PNG cannot hold it
                    name = f"{Path(name).stem}.tif"
            # Planes that came from one file (entries of a stack, merged folders) are
            # separate pictures here: each its own file.
            stem, suffix, k = Path(name).stem, Path(name).suffix, 2
            while name in written:
                name, k = f"{stem}_{plane or 0:04d}{'' if k == 2 else f'_{k}'}{suffix}", k + 1
            written.add(name)
        box_arr = np.array([b for _bid, b, _cat in entries], np.float32).reshape(-1, 4)
        box_arr[:, [0, 2]] = box_arr[:, [0, 2]].clip(0, width)
        box_arr[:, [1, 3]] = box_arr[:, [1, 3]].clip(0, height)
        cat_ids = np.array([cat_id[cat] for _bid, _box, cat in entries], dtype=np.int64)
        masks = None
        if labels is not None:
            lab = _plane(labels.data, plane)[:height, :width]
            found = BoxMasks.from_labels(lab, [bid for bid, _box, _cat in entries])
            if any(crop.any() for crop in found.crops):
                masks = found
        # A plane of a stack saved whole names its plane (a CT slice its slice_index).
        items.append((name, pixels, box_arr, cat_ids, masks) +
                     (() if volume is None and whole is None else (plane,)))
        box_fields.append([{"object_id": bid, "prompt": (plane, bid) in drawn}
                           for bid, _box, _cat in entries])
    if volume is not None:
        # The window the annotator worked in comes back with the folder (the reader sets it).
        info = {"window": [float(v) for v in contrast_window(image.contrast_limits)]}
    else:
        info = {"scale": [float(v) for v in image.scale]}
        if np.any(np.asarray(image.translate) != 0):  # where the layer sits in the world
            info["translate"] = [float(v) for v in image.translate]
        if z_stack:
            info["planes"] = int(image.data.shape[0])
    return Path(save_box_folder(folder, items, cats, info=info, box_fields=box_fields))


def _stack_file_name(image: Any) -> str:
    """The TIFF a z-stack is saved as: the file it was read from (a TIFF stack, or the one
    stack file of a reopened folder), else the layer's name."""
    names = set(plugin_meta(image).get("file_names") or [])
    if len(names) == 1:
        name = Path(names.pop()).name
        if name.lower().endswith((".tif", ".tiff")):
            return name
    return f"{image.name}.tif"
