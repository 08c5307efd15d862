"""npe2 reader: images, CT volumes (HU, window presets, physical spacing) and box-labeled
folders."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from boxlevelset.export import lower_suffix
from boxlevelset.image import WINDOW_PRESETS

from ._layers import (
    DEFAULT_CATEGORY,
    META_KEY,
    boxes_layer_kwargs,
    boxes_to_rectangles,
    companion_name,
    window_contrast,
)

# boxlevelset.data's suffixes, spelled out here: napari imports this module to ask
# whether it reads a file, and the engine's data module is not needed for that answer.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_WINDOW = "abdomen"

LayerData = tuple[Any, dict, str]


def _is_dicom_dir(path: Path) -> bool:
    try:
        return any(p.suffix.lower() in (".dcm", ".dicom") or p.suffix == "" and p.is_file()
                   and p.name.upper().startswith("IM") for p in path.iterdir())
    except OSError:
        return False


def _is_box_folder(path: Path) -> bool:
    return (path / "annotations.json").is_file() or (path / "Annotations").is_dir()


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for `path` if this plugin handles it, else None.

    Handled: CT volumes (.nii/.nii.gz/.nrrd/.mha, DICOM series folders), single images
    (PNG/JPEG/TIFF/BMP), box-labeled folders (COCO annotations.json + images/, Pascal VOC)
    and a COCO annotations .json file (its folder is opened).
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        if _is_box_folder(p):
            return read_box_folder
        if _is_dicom_dir(p):
            return read_ct
        return None
    suffix = lower_suffix(p)
    if suffix in VOLUME_SUFFIXES:
        return read_ct
    if suffix in IMAGE_SUFFIXES:
        return read_image_layer
    if suffix == ".json" and (p.parent / "images").is_dir() and _looks_like_coco(p):
        return read_box_folder
    return None


def _looks_like_coco(path: Path) -> bool:
    """A JSON file whose start names an "images" list (COCO); other JSON is declined. Only
    the first 64 kB is read: napari asks every reader about every file it opens."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(65536)
    except OSError:
        return False
    return head.lstrip().startswith("{") and '"images"' in head


def read_image_layer(path: str | os.PathLike) -> list[LayerData]:
    """One image (PNG/JPEG/TIFF/BMP) as an Image layer; a TIFF stack of planes (a z-stack
    or time series) as a 3D one, boxed and propagated slice by slice like a CT volume. A
    TIFF whose channels are not colour (2, or more than 4: nuclei and membrane stains)
    opens as one layer per channel, so that no channel is taken for a slice."""
    from boxlevelset.data import read_image, read_tiff

    path = Path(path[0] if isinstance(path, list) else path)
    if lower_suffix(path) in (".tif", ".tiff"):
        image, stack = read_tiff(path)
    else:
        image, stack = read_image(path), False
    channels = image.shape[-1] if image.ndim == 3 + stack else 0
    if channels == 1:
        image, channels = image[..., 0], 0
    meta = {META_KEY: {"kind": "image", "file_names": [path.name], "source": str(path)}}
    if channels in (0, 3, 4):
        return [(image, {"name": path.stem, "rgb": channels > 0, "metadata": meta}, "image")]
    return [(np.ascontiguousarray(image[..., c]),
             {"name": f"{path.stem} [{c}]", "rgb": False, "metadata": meta}, "image")
            for c in range(channels)]


def ct_layer_data(volume: Any, name: str, window: str = DEFAULT_WINDOW) -> LayerData:
    """An Image layer for a CT `boxlevelset.data.Volume`: HU values, window, spacing as scale."""
    sx, sy, sz = (float(s) for s in volume.spacing)
    array = np.asarray(volume.array)
    meta = {META_KEY: {"kind": "ct", "volume": volume, "window": window,
                       "file_names": [Path(str(volume.path)).name]}}
    kwargs = {
        "name": name,
        "colormap": "gray",
        "contrast_limits": window_contrast(WINDOW_PRESETS[window]),
        "scale": (sz, sy, sx) if array.ndim == 3 else (sy, sx),
        "metadata": meta,
    }
    return array, kwargs, "image"


def read_ct(path: str | os.PathLike) -> list[LayerData]:
    """A CT volume (NIfTI, NRRD, MHA or a DICOM series folder) as a HU Image layer."""
    from boxlevelset.data import read_volume

    path = Path(path[0] if isinstance(path, list) else path)
    volume = read_volume(path)
    name = path.name[: -len(lower_suffix(path))] if path.is_file() else path.name
    if path.is_file() and _holds_labels(path, volume.array):
        # A label volume (this plugin's own NIfTI export, or a segmentation from another
        # tool): a Labels layer on the volume's grid, not an image in a CT window.
        sx, sy, sz = (float(v) for v in volume.spacing)
        meta = {META_KEY: {"kind": "ct", "volume": volume,
                           "file_names": [path.name]}}
        return [(volume.array.astype(np.int32), {"name": name, "scale": (sz, sy, sx),
                                                 "metadata": meta}, "labels")]
    return [ct_layer_data(volume, name)]


def _holds_labels(path: Path, array: np.ndarray) -> bool:
    """True for a volume stored as unsigned integers (how label volumes are written: CT is
    stored signed or as floats, since air is -1000 HU) with few distinct values (an MR
    image stored as uint16 has thousands; a sample of the voxels tells)."""
    import SimpleITK as sitk

    from boxlevelset.data import sitk_image_io

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(sitk_image_io(path))
    try:
        reader.ReadImageInformation()  # the header only
    except RuntimeError:
        return False
    if reader.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32):
        return False
    return np.unique(array.ravel()[::97]).size <= 256


def read_box_folder(path: str | os.PathLike) -> list[LayerData]:
    """A box-labeled folder as image + boxes (+ masks) layers.

    A folder of one 2D image opens as that 2D image. Images of several sizes are padded
    into one stack (plane = image index, in the folder's order), except the planes of a
    z-stack saved by *Save annotations* (image entries with "plane"): the stack's TIFF
    opens whole, every plane with its pixels; in folders saved before the stack was kept
    whole (each plane a 2D image), the planes go back to their own z in a stack as deep as
    the saved one ("planes" in the COCO info), planes not saved left empty. The layer
    scale and translate saved in the info come back.
    The boxes layer holds each box on its plane with its category, and the labels layer
    the folder's masks when it has any (label id = box id; the slices of one object of a
    stack or volume, saved under one "object_id", share its box's label; separate images
    never share an object).
    """
    from boxlevelset.data import load_box_folder

    path = Path(path[0] if isinstance(path, list) else path)
    root = path.parent if path.is_file() else path
    folder = load_box_folder(path)  # a COCO .json path: that file, not annotations.json
    records = list(folder.records)
    if not records:
        raise ValueError(f"{root}: the folder holds no readable images")
    if all(r.slice_index is not None for r in records) and len({r.path for r in records}) == 1:
        return _ct_folder_layers(folder, records, root)
    z_depth = _stack_depth(folder, records)
    whole = folder.stack(records[0]) if z_depth and len({r.path for r in records}) == 1 \
        else None
    if whole is not None:  # a z-stack saved whole: all its planes, as they are
        stack = whole
        z_depth = len(whole)
        images = [whole[r.plane] for r in records]
    else:
        images = [np.asarray(folder.load_image(r)) for r in records]
    planes = [r.plane for r in records] if z_depth else list(range(len(records)))
    depth = z_depth or len(records)
    flat = depth == 1 and not z_depth  # one 2D image, not a plane of a stack

    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    rgb = any(im.ndim == 3 for im in images)
    if whole is None:
        channels = (3,) if rgb else ()
        # The widest type of all images: uint8 beside uint16 must not wrap the 16-bit ones.
        dtype = np.result_type(*[im.dtype for im in images])
        stack = np.zeros((depth, height, width, *channels), dtype=dtype)
        for plane, image in zip(planes, images):
            if rgb and image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            image = image[..., :3] if rgb else image
            stack[plane, : image.shape[0], : image.shape[1]] = image
    labels = np.zeros((depth, height, width), dtype=np.int32)
    # Only the planes of one stack hold slices of one object: separate images never share one.
    box_kwargs, rects, has_masks = _boxes_and_masks(folder, records, planes, labels, root.name,
                                                    objects=bool(z_depth))
    # Planes not saved (whole, the stack's file holds them all).
    names = [records[0].file_name if whole is not None else f"{root.name}_{z:04d}.png"
             for z in range(depth)]
    sizes = [(height, width)] * depth
    paths: list[str | None] = [None] * depth  # each plane's own file, kept as it is on save
    for plane, record, image in zip(planes, records, images):
        names[plane], sizes[plane] = record.file_name, tuple(int(s) for s in image.shape[:2])
        if whole is None and record.plane is None:  # a file of its own, not a stack's
            paths[plane] = str(record.path)
    folder_meta = {
        "kind": "folder",
        "root": str(root),
        "file_names": names,
        "paths": paths,
        "sizes": sizes,
        "categories": [dict(c) for c in folder.categories],
        "z_stack": bool(z_depth),  # saved again with each plane's place
    }
    image_kwargs = {"name": root.name, "rgb": rgb, "metadata": {META_KEY: folder_meta}}
    labels_kwargs = {"name": companion_name(root.name, "masks"),
                     "metadata": {META_KEY: dict(folder_meta)}}
    if flat:
        stack, labels = stack[0], labels[0]
        rects = [r[:, 1:] for r in rects]
        box_kwargs["ndim"] = 2
    scale = _saved_geometry(folder.info, "scale", box_kwargs["ndim"])
    translate = _saved_geometry(folder.info, "translate", box_kwargs["ndim"])
    for kwargs in (image_kwargs, box_kwargs, labels_kwargs):
        if scale is not None:
            kwargs["scale"] = scale
        if translate is not None:
            kwargs["translate"] = translate
    # Boxes last: above the masks and the active layer, ready to draw (as the widget does).
    layers: list[LayerData] = [(stack, image_kwargs, "image")]
    if has_masks:
        layers.append((labels, labels_kwargs, "labels"))
    return [*layers, (rects, box_kwargs, "shapes")]


def _stack_depth(folder: Any, records: list) -> int | None:
    """The depth of the z-stack whose planes the records are (each with its own "plane"),
    or None: records without planes, or two on one plane (folders merged by hand), are
    stacked one after another as before."""
    planes = [r.plane for r in records]
    if any(p is None for p in planes) or len(set(planes)) != len(planes):
        return None
    saved = folder.info.get("planes")
    saved = saved if isinstance(saved, int) and not isinstance(saved, bool) else 0
    return max(saved, max(planes) + 1)


def _saved_geometry(info: dict, key: str, ndim: int) -> tuple[float, ...] | None:
    """The layer "scale" or "translate" (``key``) Save annotations put in the COCO info, if
    it fits ``ndim`` (finite; a scale positive)."""
    values = info.get(key)
    if not isinstance(values, list) or len(values) != ndim:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(v) and (v > 0 or key != "scale") for v in out) else None


def _ct_folder_layers(folder: Any, records: list, root: Path) -> list[LayerData]:
    """A folder whose entries are slices of one CT volume (what Save annotations writes for
    a CT layer): the volume in HU with its window and spacing, each box on its own slice,
    the masks in a volume-sized Labels layer. Stacked as 8-bit pictures of the annotated
    slices, it had lost the HU, the geometry and the gaps between slices."""
    volume = folder.volume(records[0])
    image = ct_layer_data(volume, root.name)
    saved = folder.info.get("window")
    if isinstance(saved, list) and len(saved) == 2:  # the window it was annotated in
        image[1]["contrast_limits"] = window_contrast((float(saved[0]), float(saved[1])))
    scale = image[1]["scale"]
    labels = np.zeros(volume.shape, dtype=np.int32)
    box_kwargs, rects, _ = _boxes_and_masks(folder, records,
                                            [r.slice_index for r in records], labels, root.name)
    box_kwargs["scale"] = scale
    layers: list[LayerData] = [image]
    if labels.any():
        meta = {META_KEY: dict(image[1]["metadata"][META_KEY])}
        layers.append((labels, {"name": companion_name(root.name, "masks"), "scale": scale,
                                "metadata": meta}, "labels"))
    return [*layers, (rects, box_kwargs, "shapes")]  # boxes on top, as above


def _boxes_and_masks(folder: Any, records: list, planes: Any, labels: np.ndarray,
                     name: str, objects: bool = True) -> tuple[dict, list, bool]:
    """Each record's boxes on its plane of a 3D boxes layer (kwargs, rectangles), label id =
    box id, and its masks painted into ``labels`` on that plane; also whether any record
    has masks. With ``objects`` (the planes are slices of one volume or stack), the slices
    of one saved object are one box, their masks its label."""
    cat_names = {int(c["id"]): str(c["name"]) for c in folder.categories}
    class_names = [str(c["name"]) for c in folder.categories] or [DEFAULT_CATEGORY]
    planes = list(planes)
    owners = _object_owners(records, planes) if objects else {}
    rects, cats, ids = [], [], []
    label_of: dict[tuple[int, int], int] = {}
    for k, (record, plane) in enumerate(zip(records, planes)):
        for j, box in enumerate(np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)):
            if (k, j) in owners:
                continue  # a slice of an object whose box is elsewhere
            box_id = label_of[(k, j)] = len(ids) + 1
            rects.extend(boxes_to_rectangles(box[None], plane=plane))
            cats.append(cat_names.get(int(record.category_ids[j]), str(record.category_ids[j])))
            ids.append(box_id)
    has_masks = False
    for k, (record, plane) in enumerate(zip(records, planes)):
        # Each mask over its own box: a 2048x2048 tile's 961 nuclei decoded whole took 4 GB.
        gt = folder.gt_box_masks(record)
        if gt is None:
            continue
        has_masks = has_masks or len(gt) > 0
        for j, ((x0, y0, x1, y1), crop) in enumerate(zip(gt.bounds.tolist(), gt.crops)):
            target = labels[plane, y0:y1, x0:x1]
            # Earlier boxes win overlaps.
            target[crop & (target == 0)] = label_of[owners.get((k, j), (k, j))]
    box_kwargs = boxes_layer_kwargs(cats, ids, name=companion_name(name, "boxes"),
                                    class_names=class_names,
                                    default_category=class_names[0])
    box_kwargs["ndim"] = 3
    return box_kwargs, rects, has_masks


def _object_owners(records: list, planes: list) -> dict[tuple[int, int], tuple[int, int]]:
    """(record, box) of each annotation that is a slice of an object saved by Save
    annotations ("object_id", and "prompt" true or false) -> (record, box) of the object's
    box: the one with "prompt" true (the box drawn), else its first slice. Only slices
    whose mask is read join (their box is the mask's); an object id whose annotations do
    not make one object (two prompt boxes, two on one plane: folders merged by hand) joins
    nothing, nor do ids without a "prompt" (another tool's tracks), so no box is lost."""
    def prompt(k: int, j: int) -> bool:
        return records[k].prompts[j] is True

    def masked(k: int) -> bool:  # as BoxFolder.gt_masks reads them: all of a record's or none
        return all(s is not None for s in records[k].segmentations)

    groups: dict[int, list[tuple[int, int]]] = {}
    for k, record in enumerate(records):
        if len(record.object_ids) == len(record.prompts) == len(record.boxes):
            for j, object_id in enumerate(record.object_ids):
                if object_id is not None and record.prompts[j] is not None:
                    groups.setdefault(object_id, []).append((k, j))
    owners: dict[tuple[int, int], tuple[int, int]] = {}
    for members in groups.values():
        on = [planes[k] for k, _ in members]
        prompted = [m for m in members if prompt(*m)]
        if len(members) < 2 or len(set(on)) != len(on) or len(prompted) > 1:
            continue
        owner = prompted[0] if prompted else members[0]
        for member in members:
            if member != owner and masked(member[0]):
                owners[member] = owner
    return owners
