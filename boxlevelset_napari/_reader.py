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
    window_contrast,
)

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

    Images of different sizes are padded into one stack (plane = image index, in the
    folder's order); the boxes layer holds each box on its plane with its category, and the
    labels layer the folder's masks when it has any (label id = box id).
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
    images = [np.asarray(folder.load_image(r)) for r in records]

    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    rgb = any(im.ndim == 3 for im in images)
    channels = (3,) if rgb else ()
    # The widest type of all images: uint8 beside uint16 must not wrap the 16-bit ones.
    dtype = np.result_type(*[im.dtype for im in images])
    stack = np.zeros((len(images), height, width, *channels), dtype=dtype)
    for k, image in enumerate(images):
        if rgb and image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = image[..., :3] if rgb else image
        stack[k, : image.shape[0], : image.shape[1]] = image
    labels = np.zeros((len(images), height, width), dtype=np.int32)
    box_kwargs, rects, has_masks = _boxes_and_masks(folder, records, range(len(records)),
                                                    labels, root.name)
    folder_meta = {
        "kind": "folder",
        "root": str(root),
        "file_names": [r.file_name for r in records],
        "sizes": [tuple(int(s) for s in im.shape[:2]) for im in images],
        "categories": [dict(c) for c in folder.categories],
    }
    layers: list[LayerData] = [
        (stack, {"name": root.name, "rgb": rgb, "metadata": {META_KEY: folder_meta}}, "image")
    ]
    layers.append((rects, box_kwargs, "shapes"))
    if has_masks:
        layers.append((labels, {"name": f"{root.name} masks",
                                "metadata": {META_KEY: dict(folder_meta)}}, "labels"))
    return layers


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
    layers: list[LayerData] = [image, (rects, box_kwargs, "shapes")]
    if labels.any():
        meta = {META_KEY: dict(image[1]["metadata"][META_KEY])}
        layers.append((labels, {"name": f"{root.name} masks", "scale": scale,
                                "metadata": meta}, "labels"))
    return layers


def _boxes_and_masks(folder: Any, records: list, planes: Any, labels: np.ndarray,
                     name: str) -> tuple[dict, list, bool]:
    """Each record's boxes on its plane of a 3D boxes layer (kwargs, rectangles), label id =
    box id, and its masks painted into ``labels`` on that plane; also whether any record
    has masks."""
    cat_names = {int(c["id"]): str(c["name"]) for c in folder.categories}
    class_names = [str(c["name"]) for c in folder.categories] or [DEFAULT_CATEGORY]
    rects, cats, ids = [], [], []
    has_masks = False
    for record, plane in zip(records, planes):
        gt = folder.gt_masks(record)
        for j, box in enumerate(np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)):
            box_id = len(ids) + 1
            rects.extend(boxes_to_rectangles(box[None], plane=plane))
            cats.append(cat_names.get(int(record.category_ids[j]), str(record.category_ids[j])))
            ids.append(box_id)
            if gt is not None and j < len(gt):
                has_masks = True
                target = labels[plane, : gt[j].shape[0], : gt[j].shape[1]]
                target[gt[j] & (target == 0)] = box_id  # earlier boxes win overlaps
    box_kwargs = boxes_layer_kwargs(cats, ids, name=f"{name} boxes", class_names=class_names,
                                    default_category=class_names[0])
    box_kwargs["ndim"] = 3
    return box_kwargs, rects, has_masks

