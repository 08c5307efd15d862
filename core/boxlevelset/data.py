"""Reading images, CT volumes and box-labeled folders (COCO, Pascal VOC, plain images).

A box-labeled folder is `images/` plus a COCO `annotations.json` whose annotations need only
`bbox` (x, y, w, h) and `category_id`; a `segmentation` is kept for scoring only. CT image
entries point at a volume file (or DICOM series folder) and name their slice with
`slice_index`, the z index of the array SimpleITK returns. The planes of a stack that is not
CT (a microscopy z-stack) point at its multi-page TIFF and name their plane with "plane".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .export import (
    BoxMasks,
    atomic_path,
    atomic_write,
    decode_segmentation,
    lower_suffix,
    segmentation_to_rle,
)
from .image import Window, apply_window, resolve_window

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class ImageReadError(ValueError):
    """An image or volume file is missing, corrupt or of an unsupported kind (message names it)."""


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for volume files SimpleITK reads (.nii, .nii.gz, .nrrd, .mha, .mhd) or folders."""
    path = Path(path)
    return path.is_dir() or lower_suffix(path) in VOLUME_SUFFIXES


# ----------------------------------------------------------------------------- 2D images


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP file as HxW or HxWxC (RGB/RGBA order), keeping its dtype.

    uint8, uint16 and float images come back unchanged in value; JPEG EXIF orientation is
    applied. Raises ImageReadError naming the file if it is missing, corrupt or unsupported.
    """
    import cv2

    path = Path(path)
    suffix = lower_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(
            f"{path}: unsupported image type {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(IMAGE_SUFFIXES)}"
        )
    if not path.is_file():
        raise ImageReadError(f"{path}: file does not exist")
    if suffix in (".tif", ".tiff"):
        image = _read_tiff(path)
    else:
        # np.fromfile + imdecode also works for non-ASCII paths, where cv2.imread fails.
        data = np.fromfile(str(path), dtype=np.uint8)
        flags = cv2.IMREAD_COLOR if suffix in (".jpg", ".jpeg") else cv2.IMREAD_UNCHANGED
        image = cv2.imdecode(data, flags) if data.size else None
        if image is None:
            raise ImageReadError(f"{path}: cannot decode image (corrupt or not a {suffix} file)")
        image = _swap_red_blue(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or image.size == 0:
        raise ImageReadError(f"{path}: expected a 2D image, got an array of shape {image.shape}")
    return np.ascontiguousarray(image)


def _swap_red_blue(image: np.ndarray) -> np.ndarray:
    """RGB(A) <-> OpenCV's BGR(A) (the same swap both ways); other images as they are."""
    if image.ndim == 3 and image.shape[2] == 3:
        return image[..., ::-1]
    if image.ndim == 3 and image.shape[2] == 4:
        return image[..., [2, 1, 0, 3]]
    return image


def read_tiff(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """A TIFF's pixels and whether they are a stack of planes: (HxW or HxWxC, False) for an
    image, (ZxHxW or ZxHxWxC, True) for a stack.

    tifffile's axes tell channels from planes: samples of a page (planar RGB, as some
    microscopes write it) and an ImageJ/OME channel axis come last, as channels; pages
    are planes (three grey pages are a z-stack, not RGB). Pages written one by one (each
    its own series, as acquisition scripts append them) stack when they match. Compressed
    files tifffile cannot decode without imagecodecs (LZW, as OpenCV writes) are read page
    by page through OpenCV. ImageReadError names the file if it cannot be read."""
    import cv2
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            first = series[0]
            if len(series) > 1 and all((s.shape, s.dtype, s.axes) == (first.shape, first.dtype,
                                                                       first.axes)
                                       for s in series):
                image = np.stack([np.asarray(s.asarray()) for s in series])
                axes = "Q" + first.axes
            else:
                image, axes = np.asarray(first.asarray()), first.axes
    except Exception as err:  # tifffile raises many kinds of errors for bad files
        # Without the optional imagecodecs package tifffile cannot decompress LZW/JPEG
        # TIFFs (OpenCV's default); OpenCV's own libtiff can, so try it before giving up.
        ok, pages = cv2.imdecodemulti(np.fromfile(str(path), dtype=np.uint8),
                                      cv2.IMREAD_UNCHANGED)
        if not ok or not pages:
            raise ImageReadError(f"{path}: cannot read TIFF ({err})") from err
        pages = [_swap_red_blue(p) for p in pages]
        if len(pages) == 1:
            return pages[0], False
        if len({(p.shape, p.dtype) for p in pages}) > 1:
            raise ImageReadError(f"{path}: TIFF pages differ in size or type; expected an "
                                 "image or one stack of planes") from err
        return np.stack(pages), True
    # Channels last: samples of a page (planar RGB) or an ImageJ/OME channel axis.
    for channel in ("S", "C"):
        if channel in axes:
            image = np.moveaxis(image, axes.index(channel), -1)
            axes = axes.replace(channel, "") + "S"
            break
    planes = image.ndim - ("S" in axes)
    if planes > 3:
        raise ImageReadError(f"{path}: TIFF holds an array of shape {image.shape} (axes "
                             f"{axes}); expected an image or one stack of planes")
    return image, planes == 3


def _read_tiff(path: Path) -> np.ndarray:
    image, stack = read_tiff(path)
    if stack and image.shape[0] == 1:  # one plane saved with a z axis (numpy's arr[None])
        return image[0]
    if stack:
        raise ImageReadError(
            f"{path}: TIFF holds a stack of shape {image.shape}, not a 2D image; "
            "save single planes or open it in napari as a stack"
        )
    return image


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header without decoding pixels; ImageReadError if bad."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ImageReadError(f"{path}: file does not exist")
    suffix = lower_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported image type {suffix!r}")
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:  # header only: no decompression
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)),
                          default=0)
                size = int(page.imagelength), int(page.imagewidth)
        except Exception as err:
            raise ImageReadError(f"{path}: cannot read TIFF header ({err})") from err
        if end > path.stat().st_size:  # an interrupted copy: the pixel data is cut short
            raise ImageReadError(f"{path}: TIFF is truncated ({path.stat().st_size} bytes, its "
                                 f"pixel data ends at byte {end})")
        return size
    try:
        with warnings.catch_warnings():
            # Pillow's guard against decompression bombs is for untrusted web images; a
            # user's own large scan or slide is read (by OpenCV) like any other image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if suffix in (".jpg", ".jpeg"):
                    # read_image applies EXIF orientation, so report the rotated size.
                    orientation = im.getexif().get(0x0112, 1)
                    if orientation in (5, 6, 7, 8):
                        width, height = height, width
                if suffix == ".png":
                    # Chunk checksums up to the end marker, without decompressing: a PNG cut
                    # short (an interrupted copy) fails here, not later inside training.
                    im.verify()
    except Image.DecompressionBombError as err:
        # Raised before Pillow returns the size; the message holds it, but parsing it is
        # brittle, so decode the header another way: OpenCV reads the whole image.
        try:
            height, width = read_image(path).shape[:2]
        except ImageReadError:
            raise ImageReadError(f"{path}: cannot read image ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read image header ({err})") from err
    return int(height), int(width)


# ----------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """A CT/MR volume: array (z, y, x) float32 (Hounsfield units for CT) plus its geometry."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def sitk_image_io(path: Path) -> str:
    """The SimpleITK reader to name for a volume file ("" lets SimpleITK choose): it picks
    the MetaImage reader by a lower-case suffix only ("scan.MHA" found no reader); NIfTI
    and NRRD are recognised by their contents."""
    return "MetaImageIO" if lower_suffix(path) in (".mha", ".mhd") else ""


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a volume with SimpleITK: .nii/.nii.gz/.nrrd/.mha/.mhd file or a DICOM series folder.

    The array is (z, y, x) float32; spacing and origin are (x, y, z) like SimpleITK, direction
    the 9 row-major entries of the 3x3 direction matrix. A 2D file becomes a single slice.
    Raises ImageReadError naming the path when it is missing, unreadable or not a volume.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file or folder does not exist")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageReadError(f"{path}: folder holds no DICOM series")
            # Several series in one folder: take the one with the most slices.
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            if lower_suffix(path) not in VOLUME_SUFFIXES:
                raise ImageReadError(
                    f"{path}: unsupported volume type; expected {', '.join(VOLUME_SUFFIXES)} "
                    "or a DICOM series folder"
                )
            image = sitk.ReadImage(str(path), imageIO=sitk_image_io(path))
    except RuntimeError as err:  # SimpleITK reports every read failure as RuntimeError
        raise ImageReadError(f"{path}: cannot read volume ({str(err).strip().splitlines()[-1]})") \
            from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: volume has vector pixels; expected a scalar (CT) volume")
    dim = image.GetDimension()
    if dim == 2:
        image = sitk.JoinSeries(image)
    elif dim != 3:
        raise ImageReadError(f"{path}: expected a 3D volume, got {dim} dimensions")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return Volume(
        array=array,
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
        path=path,
    )


def write_label_volume(path: str | os.PathLike, labels: np.ndarray, like: Volume) -> Path:
    """Write a (z, y, x) integer label volume atomically with `like`'s spacing/origin/direction.

    The format follows the suffix (.nii, .nii.gz, .nrrd, .mha); labels are stored as uint8,
    uint16 or int32, the smallest that fits.
    """
    path = Path(path)
    if lower_suffix(path) not in (".nii", ".nii.gz", ".nrrd", ".mha"):
        raise ValueError(f"{path}: label volumes are written as .nii, .nii.gz, .nrrd or .mha")
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise ValueError(
            f"{path}: labels shape {labels.shape} differs from the volume's {like.array.shape}"
        )
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0:
        raise ValueError(f"{path}: labels must be non-negative")
    dtype = np.uint8 if hi < 256 else np.uint16 if hi < 65536 else np.int32
    _write_sitk(path, labels.astype(dtype), like)
    return path


def _write_sitk(path: Path, array: np.ndarray, like: Volume) -> None:
    """Write a (z, y, x) array atomically with `like`'s spacing, origin and direction."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(v) for v in like.spacing])
    image.SetOrigin([float(v) for v in like.origin])
    image.SetDirection([float(v) for v in like.direction])
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)  # True: compress where the format allows


# ----------------------------------------------------------------------------- records


@dataclass
class Record:
    """One image (or CT slice) of a box-labeled folder and its boxes.

    boxes are (x0, y0, x1, y1) float32 pixels clipped to the image; category_ids are the
    folder's category ids; segmentations holds, per box, a COCO RLE dict, a polygon list or
    None. slice_index is the z index for CT entries (path is then the volume), else None.
    areas holds, per box, the annotation's own "area" (None where it has none), or is empty:
    COCO's small/medium/large split reads that field, not the mask's pixel count.
    plane is, for an image of a stack of planes (not CT), its index in that stack (the
    image entry's "plane"), else None: path is then the stack's multi-page TIFF (as Save
    annotations writes it; load_image reads that plane) or, in folders saved before, the
    plane alone as a 2D image. object_ids and prompts hold, per box, the
    annotation's "object_id" and "prompt" flag (None where it has none), or are empty: the
    napari plugin saves an object that spans slices as one annotation per slice under one
    object id, with "prompt" true on the box that was drawn and false on the others.
    Training reads neither.
    """

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    category_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    segmentations: list = field(default_factory=list)
    slice_index: int | None = None
    crowd: list = field(default_factory=list)
    areas: list = field(default_factory=list)
    plane: int | None = None
    object_ids: list = field(default_factory=list)
    prompts: list = field(default_factory=list)

    @property
    def name(self) -> str:
        """The file name, with the slice or plane for entries that share a file
        ("ct.nii.gz[12]", "cells.tif[3]")."""
        z = self.slice_index if self.slice_index is not None else self.plane
        return str(self.file_name) if z is None else f"{self.file_name}[{int(z)}]"


def coco_image_entry(record: Record) -> dict:
    """The COCO ``images`` entry of a record (with ``slice_index`` for CT slices, and
    "plane" for the planes of a stack, which may share its file)."""
    entry = {"id": int(record.image_id), "file_name": record.file_name,
             "height": int(record.height), "width": int(record.width)}
    if record.slice_index is not None:
        entry["slice_index"] = int(record.slice_index)
    if record.plane is not None:
        entry["plane"] = int(record.plane)
    return entry


class BoxFolder:
    """A loaded box-labeled folder: categories, records and image/mask access."""

    def __init__(
        self,
        root: Path,
        categories: list[dict],
        records: list[Record],
        window: Window = "abdomen",
    ) -> None:
        self.root = Path(root)
        self.categories = categories
        self.records = records
        self.window = resolve_window(window)
        # The COCO file's "info" (save_box_folder stores e.g. the CT window the annotator
        # used there), {} where it has none.
        self.info: dict[str, Any] = {}
        self._volumes: dict[Path, Volume] = {}
        self._stacks: dict[Path, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __repr__(self) -> str:
        boxes = sum(len(r.boxes) for r in self.records)
        return (f"BoxFolder({str(self.root)!r}, {len(self.records)} images, {boxes} boxes, "
                f"{len(self.categories)} categories)")

    @property
    def class_names(self) -> list[str]:
        """Category names in category order (index = 0-based label)."""
        return [c["name"] for c in self.categories]

    def volume(self, record: Record) -> Volume:
        """The (cached) volume a CT record points at."""
        if record.slice_index is None:
            raise ValueError(f"{record.path}: record is a 2D image, not a volume slice")
        path = record.path
        if path not in self._volumes:
            self._volumes[path] = read_volume(path)
        return self._volumes[path]

    def slice_hu(self, record: Record) -> np.ndarray:
        """A CT record's slice in Hounsfield units, HxW (ValueError for a 2D image)."""
        return self.volume(record).array[record.slice_index]

    def stack(self, record: Record) -> np.ndarray | None:
        """The (cached) stack of planes, ZxHxW(xC), in the TIFF a record with a "plane"
        points at; None where that file is a 2D image (a plane saved alone) or the record
        has no plane. ImageReadError names the file if it cannot be read."""
        path = record.path
        if record.plane is None or lower_suffix(path) not in (".tif", ".tiff"):
            return None
        if path not in self._stacks:
            image, is_stack = read_tiff(path)
            self._stacks[path] = image if is_stack else None
        return self._stacks[path]

    def load_image(self, record: Record) -> np.ndarray:
        """The record's pixels: the 2D image as read, a stack's plane as it is (not
        windowed: it holds no Hounsfield units), or the CT slice windowed to uint8 HxW."""
        if record.slice_index is None:
            stack = self.stack(record)
            if stack is None:
                return read_image(record.path)
            if record.plane >= len(stack):
                raise ImageReadError(f"{record.path}: plane {record.plane} outside the "
                                     f"stack's 0..{len(stack) - 1}")
            return np.ascontiguousarray(stack[record.plane])
        hu = self.slice_hu(record)
        window = self.window or resolve_window("abdomen")
        return np.round(apply_window(hu, window) * 255.0).astype(np.uint8)

    def readable(self, records: Iterable[Record] | None = None
                 ) -> Iterator[tuple[Record, np.ndarray]]:
        """(record, ``load_image(record)``) for each record (default: all), skipping one
        that fails to load with a warning naming it: the folder check reads headers only,
        and one damaged file must not cost the others' results."""
        for record in self.records if records is None else records:
            try:
                image = self.load_image(record)
            except ImageReadError as err:
                warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
                continue
            yield record, image

    def gt_masks(self, record: Record) -> np.ndarray | None:
        """Decode the record's segmentations to bool [N, H, W]; None if any box has none."""
        if any(s is None for s in record.segmentations):
            return None
        masks = np.zeros((len(record.segmentations), record.height, record.width), dtype=bool)
        for i, seg in enumerate(record.segmentations):
            try:
                masks[i] = decode_segmentation(seg, record.height, record.width)
            except ValueError as err:
                raise ValueError(f"{record.file_name}: annotation {i}: {err}") from err
        return masks

    def gt_box_masks(self, record: Record) -> BoxMasks | None:
        """The record's segmentations, each decoded over its own bounding box only
        (``BoxMasks``); None if any box has none. A 2048x2048 tile's 961 nuclei take 0.9 MB
        here, 4 GB from ``gt_masks``."""
        rles = self._gt_rles(record)
        if any(r is None for r in rles):
            return None
        return BoxMasks.from_rle(rles, (record.height, record.width))

    def _gt_rles(self, record: Record) -> list[dict | None]:
        # Convert straight to RLE (no decode/encode round trip: thousands of nuclei stay fast).
        if any(s is None for s in record.segmentations):
            return [None] * len(record.boxes)
        out = []
        for i, seg in enumerate(record.segmentations):
            try:
                out.append(segmentation_to_rle(seg, record.height, record.width))
            except ValueError as err:
                raise ValueError(f"{record.file_name}: annotation {i}: {err}") from err
        return out

    def to_coco_gt(self) -> dict:
        """A COCO ground-truth dict (segmentations as RLE, area) for pycocotools: the boxes
        with iscrowd 0, then the folder's crowd annotations with iscrowd 1.

        Boxes without a segmentation get no "segmentation" key (mask AP then refuses them).
        """
        images, annotations = [], []
        for rec in self.records:
            images.append(coco_image_entry(rec))
            rles = self._gt_rles(rec)
            # The file's own areas where every box has one (a list out of step with the
            # boxes, after someone filtered them, is not trusted).
            areas = rec.areas if len(rec.areas) == len(rec.boxes) else [None] * len(rec.boxes)
            for box, cat, rle, area in zip(rec.boxes, rec.category_ids, rles, areas):
                x0, y0, x1, y1 = (float(v) for v in box)
                ann = {"id": len(annotations) + 1, "image_id": rec.image_id,
                       "category_id": int(cat), "bbox": [x0, y0, x1 - x0, y1 - y0],
                       "iscrowd": 0}
                if rle is not None:
                    ann["segmentation"] = rle
                    # pycocotools sorts instances into small/medium/large by the file's
                    # "area" (for COCO polygons, the polygon's area), so keep it.
                    ann["area"] = float(area) if area is not None else float(mask_utils.area(rle))
                else:
                    ann["area"] = (x1 - x0) * (y1 - y0)
                annotations.append(ann)
            for ann in rec.crowd:  # ignore regions: matched detections are neither TP nor FP
                rle = segmentation_to_rle(ann["segmentation"], rec.height, rec.width)
                area = ann.get("area")
                annotations.append({
                    "id": len(annotations) + 1, "image_id": rec.image_id,
                    "category_id": int(ann["category_id"]), "bbox": list(ann["bbox"]),
                    "iscrowd": 1, "segmentation": rle,
                    "area": float(area) if area is not None else float(mask_utils.area(rle)),
                })
        return {"images": images, "annotations": annotations,
                "categories": [dict(c) for c in self.categories]}


# ----------------------------------------------------------------------------- loading


def load_box_folder(path: str | os.PathLike, window: Window = "abdomen") -> BoxFolder:
    """Load a box-labeled folder.

    Recognised layouts, in this order: a COCO `annotations.json` (or a path to any COCO .json)
    with images under `images/` (or beside the json); Pascal VOC (`Annotations/*.xml` +
    `JPEGImages/`, categories from the <name> tags, sorted); a plain folder of images (or its
    `images/` subfolder; hidden files left out), giving records without boxes. Missing or
    unreadable images are skipped with a warning naming them; boxes are clipped to the image
    and zero-area ones are dropped (count logged); crowd annotations (iscrowd 1) are no
    boxes, only ignore regions for scoring (Record.crowd). Duplicate image ids are a
    ValueError. `window` is used by load_image for CT slices. Raises ValueError naming the
    folder if it holds no images.
    """
    path = Path(path)
    resolve_window(window)  # a bad window is the caller's, not the annotation file's
    if not path.exists():
        raise ValueError(f"{path}: folder does not exist")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path}: expected a folder or a COCO .json file")
        return _naming_the_file(path, lambda: _load_coco(path, path.parent, window))
    if (path / "annotations.json").is_file():
        json_path = path / "annotations.json"
        return _naming_the_file(json_path, lambda: _load_coco(json_path, path, window))
    if (path / "Annotations").is_dir():
        return _naming_the_file(path / "Annotations", lambda: _load_voc(path, window))
    return _load_plain(path, window)


def _naming_the_file(path: Path, load: Callable[[], BoxFolder]) -> BoxFolder:
    """``load()``, with a malformed entry (a missing field, a value of the wrong type, text
    where a number belongs) reported as a ValueError that names the annotation file."""
    try:
        return load()
    except KeyError as err:
        raise ValueError(f"{path}: an entry has no {err} field") from None
    except TypeError as err:
        raise ValueError(f"{path}: an entry has a value of the wrong type ({err})") from None
    except ValueError as err:
        folder = str(path.parent) if path.parent != Path(".") else None
        if str(path) in str(err) or (folder and folder in str(err)):
            raise  # already names the file or its folder
        raise ValueError(f"{path}: {err}") from None


def _resolve_file(root: Path, file_name: str) -> Path:
    candidate = Path(file_name)
    if candidate.is_absolute():
        return candidate
    for base in (root / "images", root):
        if (base / candidate).exists():
            return base / candidate
    return root / "images" / candidate


def clip_and_filter(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the image; return (clipped float32 boxes, keep mask: finite boxes
    with an area left inside the image)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    boxes = np.where(finite[:, None], boxes, 0.0)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes.astype(np.float32), keep


def _check_image(path: Path, height: int | None, width: int | None,
                 sizes: dict[Path, tuple[int, int] | None] | None = None) -> tuple[int, int] | None:
    """Header-check a 2D image; warn naming it and return None if it cannot be used.

    ``sizes`` caches each file's size (None: unreadable) for entries that share a file;
    every entry is still checked against its own stated size.
    """
    if sizes is None or path not in sizes:
        try:
            size = _image_size(path)
        except ImageReadError as err:
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=4)
            size = None
        if sizes is not None:
            sizes[path] = size
    else:
        size = sizes[path]
    if size is None:
        return None
    h, w = size
    if height is not None and width is not None and (h, w) != (int(height), int(width)):
        hint = ""
        if (w, h) == (int(height), int(width)) and _exif_quarter_turn(path):
            # A phone photo stored on its side: tools that ignore EXIF give the stored size.
            hint = (" after its EXIF orientation is applied (boxes are taken on the upright "
                    "picture, as viewers show it; annotate it upright or rotate the file)")
        warnings.warn(
            f"skipping {path}: annotation says {width}x{height} but the image is {w}x{h}{hint}",
            stacklevel=4,
        )
        return None
    return h, w


def _exif_quarter_turn(path: Path) -> bool:
    """True for a JPEG whose EXIF orientation (5-8) turns it a quarter turn when read."""
    from PIL import Image

    if lower_suffix(path) not in (".jpg", ".jpeg"):
        return False
    try:
        with Image.open(path) as im:
            return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except OSError:
        return False


def _load_coco(json_path: Path, root: Path, window: Window) -> BoxFolder:
    try:
        coco = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_path}: cannot read COCO JSON ({err})") from err
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ValueError(f"{json_path}: not a COCO file (needs an 'images' list)")
    if not coco["images"]:
        raise ValueError(f"{root}: {json_path.name} lists no images")
    categories = [{"id": int(c["id"]), "name": str(c["name"])}
                  for c in sorted(coco.get("categories", []), key=lambda c: int(c["id"]))]
    cat_ids = {c["id"] for c in categories}
    # Two entries with one id cannot tell whose annotations are whose (pycocotools keeps
    # the last one silently); refuse before any work rather than fail at export.
    first_name: dict[int, str] = {}
    for im in coco["images"]:
        image_id = int(im["id"])
        if image_id in first_name:
            raise ValueError(f"{json_path}: image id {image_id} is used twice "
                             f"({first_name[image_id]!r} and {im['file_name']!r}); "
                             "image ids must be unique")
        first_name[image_id] = str(im["file_name"])

    per_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        per_image.setdefault(int(ann["image_id"]), []).append(ann)
    image_ids = {int(im["id"]) for im in coco["images"]}
    orphans = sum(len(v) for k, v in per_image.items() if k not in image_ids)
    if orphans:
        logger.warning("%s: %d annotations refer to unknown image ids; ignored", json_path, orphans)

    folder = BoxFolder(root, categories, [], window)
    if isinstance(coco.get("info"), dict):
        folder.info = dict(coco["info"])
    dropped = crowd = 0
    checked: dict[Path, tuple[int, int] | None] = {}
    bad_volumes: set[Path] = set()
    for im in coco["images"]:
        file_name = str(im["file_name"])
        path = _resolve_file(root, file_name)
        slice_index = im.get("slice_index")
        height, width = im.get("height"), im.get("width")
        plane = None
        if slice_index is not None or is_volume_path(path):
            slice_index = int(slice_index or 0)
            if path in bad_volumes:
                continue
            try:
                vol = folder.volume(Record(0, file_name, path, 0, 0, slice_index=slice_index))
            except ImageReadError as err:
                warnings.warn(f"skipping unreadable volume: {err}", stacklevel=3)
                bad_volumes.add(path)  # warn once, not once per slice entry
                continue
            depth, h, w = vol.array.shape
            if not 0 <= slice_index < depth:
                warnings.warn(f"skipping {path}: slice_index {slice_index} outside 0..{depth - 1}",
                              stacklevel=3)
                continue
            if height is not None and width is not None and (int(height), int(width)) != (h, w):
                warnings.warn(f"skipping {path}[{slice_index}]: annotation says {width}x{height} "
                              f"but the slice is {w}x{h}", stacklevel=3)
                continue
        else:
            size = _check_image(path, height, width, checked)
            if size is None:
                continue
            h, w = size
            plane = _index_field(im, "plane")
            try:
                stack = folder.stack(Record(0, file_name, path, w, h, plane=plane))
            except ImageReadError as err:
                warnings.warn(f"skipping unreadable image: {err}", stacklevel=3)
                continue
            if stack is not None and plane >= len(stack):
                warnings.warn(f"skipping {path}: plane {plane} outside 0..{len(stack) - 1}",
                              stacklevel=3)
                continue

        boxes, cats, segs, crowds, areas, objects, prompts = [], [], [], [], [], [], []
        for ann in per_image.get(int(im["id"]), []):
            if ann.get("iscrowd", 0):
                if ann.get("segmentation") and ann.get("category_id") in cat_ids \
                        and len(ann.get("bbox", ())) == 4:
                    crowds.append(ann)
                    crowd += 1
                continue
            if "bbox" not in ann or len(ann["bbox"]) != 4:
                raise ValueError(f"{json_path}: annotation {ann.get('id')} has no 4-number bbox")
            cat = int(ann["category_id"])
            if cat not in cat_ids:
                raise ValueError(
                    f"{json_path}: annotation {ann.get('id')} has category_id {cat}, "
                    f"which is not among the categories {sorted(cat_ids)}"
                )
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            boxes.append((x, y, x + bw, y + bh))
            cats.append(cat)
            segs.append(ann.get("segmentation") or None)
            area = ann.get("area")
            areas.append(float(area) if isinstance(area, (int, float)) else None)
            objects.append(_index_field(ann, "object_id"))
            prompt = ann.get("prompt")
            prompts.append(prompt if isinstance(prompt, bool) else None)
        clipped, keep = clip_and_filter(np.array(boxes), w, h)
        dropped += int((~keep).sum())
        folder.records.append(Record(
            image_id=int(im["id"]), file_name=file_name, path=path, width=w, height=h,
            boxes=clipped[keep], category_ids=np.array(cats, dtype=np.int64)[keep] if cats
            else np.zeros((0,), np.int64),
            segmentations=[s for s, k in zip(segs, keep) if k], slice_index=slice_index,
            crowd=crowds, areas=[a for a, k in zip(areas, keep) if k],
            plane=plane,
            object_ids=[o for o, k in zip(objects, keep) if k],
            prompts=[p for p, k in zip(prompts, keep) if k],
        ))
    if dropped:
        logger.warning("%s: dropped %d boxes with zero area inside their image", json_path, dropped)
    if crowd:
        logger.info("%s: %d crowd annotations kept as ignore regions for scoring, not trained on",
                    json_path, crowd)
    if not folder.records:
        raise ValueError(f"{root}: no readable images among the {len(coco['images'])} listed")
    return folder


def _index_field(entry: dict, key: str) -> int | None:
    """``entry[key]`` where it is a non-negative integer (the plugin's "plane" and
    "object_id"), else None: another tool's field of the same name is no reason to refuse
    a folder whose boxes are fine."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _xml_text(node: ET.Element, tag: str, source: Path) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise ValueError(f"{source}: missing <{tag}>")
    return found.text.strip()


def _load_voc(root: Path, window: Window) -> BoxFolder:
    xml_files = sorted((root / "Annotations").glob("*.xml"))
    if not xml_files:
        raise ValueError(f"{root}: Annotations/ holds no .xml files")
    parsed = []
    for xml_path in xml_files:
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            raise ValueError(f"{xml_path}: cannot parse XML ({err})") from err
        objects = []
        for obj in tree.findall("object"):
            bnd = obj.find("bndbox")
            if bnd is None:
                raise ValueError(f"{xml_path}: <object> without <bndbox>")
            coords = [float(_xml_text(bnd, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax")]
            objects.append((_xml_text(obj, "name", xml_path), coords))
        fname_node = tree.find("filename")
        file_name = (fname_node.text.strip() if fname_node is not None and fname_node.text
                     else xml_path.stem + ".jpg")
        size = tree.find("size")
        hw = None
        if size is not None and size.find("width") is not None and size.find("height") is not None:
            hw = (int(float(_xml_text(size, "height", xml_path))),
                  int(float(_xml_text(size, "width", xml_path))))
        parsed.append((xml_path, file_name, hw, objects))

    names = sorted({name for _, _, _, objs in parsed for name, _ in objs})
    categories = [{"id": i, "name": n} for i, n in enumerate(names, start=1)]
    by_name = {c["name"]: c["id"] for c in categories}
    folder = BoxFolder(root, categories, [], window)
    dropped = 0
    for image_id, (xml_path, file_name, hw, objects) in enumerate(parsed, start=1):
        path = root / "JPEGImages" / file_name
        if not path.exists() and (root / "JPEGImages" / (xml_path.stem + ".jpg")).exists():
            path = root / "JPEGImages" / (xml_path.stem + ".jpg")
        # Some VOC XMLs carry a 0x0 <size>; then trust the image itself.
        size = _check_image(path, *(hw if hw and min(hw) > 0 else (None, None)))
        if size is None:
            continue
        h, w = size
        # VOC pixels are 1-based and inclusive: xmin=1 is the first column, so shift the
        # top-left corner by one and keep xmax as the exclusive right edge.
        boxes = np.array([[c[0] - 1, c[1] - 1, c[2], c[3]] for _, c in objects], np.float64)
        clipped, keep = clip_and_filter(boxes, w, h)
        dropped += int((~keep).sum())
        cats = np.array([by_name[n] for n, _ in objects], dtype=np.int64).reshape(-1)
        folder.records.append(Record(
            image_id=image_id, file_name=path.name, path=path, width=w, height=h,
            boxes=clipped[keep], category_ids=cats[keep],
            segmentations=[None] * int(keep.sum()),
        ))
    if dropped:
        logger.warning("%s: dropped %d boxes with zero area inside their image", root, dropped)
    if not folder.records:
        raise ValueError(f"{root}: no readable images among {len(parsed)} VOC annotations")
    return folder


def _load_plain(root: Path, window: Window) -> BoxFolder:
    base = root / "images" if (root / "images").is_dir() else root
    # Hidden files are skipped: macOS leaves "._name.png" metadata beside every image it
    # copies to a USB disk or network share; they are no images.
    files = sorted(p for p in base.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and lower_suffix(p) in IMAGE_SUFFIXES + VOLUME_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no images found (and no annotations.json or Annotations/)")
    folder = BoxFolder(root, [], [], window)
    for path in files:
        if lower_suffix(path) in VOLUME_SUFFIXES:
            # A volume in a plain folder: one record per slice.
            try:
                vol = folder.volume(Record(0, path.name, path, 0, 0, slice_index=0))
            except ImageReadError as err:
                warnings.warn(f"skipping unreadable volume: {err}", stacklevel=3)
                continue
            depth, h, w = vol.array.shape
            for z in range(depth):
                folder.records.append(Record(len(folder.records) + 1, path.name, path, w, h,
                                             slice_index=z))
            continue
        size = _check_image(path, None, None)
        if size is None:
            continue
        folder.records.append(Record(len(folder.records) + 1, path.name, path, size[1], size[0]))
    if not folder.records:
        raise ValueError(f"{root}: none of the {len(files)} image files could be read")
    return folder


# ----------------------------------------------------------------------------- saving


def _write_image(path: Path, image: np.ndarray) -> None:
    import cv2
    import tifffile

    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"{path.name}: image must be HxW or HxWxC, got shape {image.shape}")
    suffix = lower_suffix(path)
    if suffix in (".tif", ".tiff"):
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, image, photometric="rgb" if image.ndim == 3 and
                             image.shape[2] in (3, 4) else "minisblack")
        return
    if suffix not in (".png", ".jpg", ".jpeg", ".bmp"):
        raise ValueError(f"{path.name}: cannot write images of type {suffix!r}")
    if image.dtype not in (np.uint8, np.uint16) or (image.dtype == np.uint16 and suffix != ".png"):
        raise ValueError(
            f"{path.name}: {suffix} holds uint8 (PNG also uint16), got {image.dtype}; "
            "use a .tif name for other types"
        )
    image = _swap_red_blue(image)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(image)):
            raise OSError(f"{path}: OpenCV could not write the image")


def _copy_image(source: Path, path: Path) -> None:
    """Copy an image file as it is (atomically; ``source`` may be ``path`` itself): a JPEG
    decoded and encoded again at each save would lose detail every time."""
    if lower_suffix(source) != lower_suffix(path):
        raise ValueError(f"{path.name}: cannot keep {source.name} under another type's name")
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def _write_stack(path: Path, stack: np.ndarray) -> None:
    """A stack of planes (ZxHxW, or ZxHxWxC colour) as one multi-page TIFF in its own type,
    written atomically; read_tiff reads it back as that stack."""
    import tifffile

    if lower_suffix(path) not in (".tif", ".tiff"):
        raise ValueError(f"{path.name}: a stack of planes is written as .tif or .tiff")
    if stack.ndim not in (3, 4) or (stack.ndim == 4 and stack.shape[3] not in (3, 4)):
        raise ValueError(f"{path.name}: a stack must be ZxHxW or ZxHxWx(3|4), got shape "
                         f"{stack.shape}")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack, photometric="rgb" if stack.ndim == 4 else "minisblack")


def write_volume(path: str | os.PathLike, volume: Volume) -> Path:
    """Write a Volume (float32 array plus geometry) atomically as .nii/.nii.gz/.nrrd/.mha."""
    path = Path(path)
    if lower_suffix(path) not in (".nii", ".nii.gz", ".nrrd", ".mha"):
        raise ValueError(f"{path}: volumes are written as .nii, .nii.gz, .nrrd or .mha")
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise ValueError(f"{path}: volume array must be (z, y, x), got shape {array.shape}")
    _write_sitk(path, array, volume)
    return path


def save_box_folder(
    path: str | os.PathLike,
    images: Sequence[tuple],
    categories: Sequence[dict],
    info: dict[str, Any] | None = None,
    entry_fields: Sequence[dict] | None = None,
    box_fields: Sequence[Sequence[dict]] | None = None,
) -> Path:
    """Write a box-labeled folder: images/<file_name> and a COCO annotations.json.

    images: per image a tuple (file_name, image HxW(xC) or the path of an image file to copy
    as it is, boxes Nx4 xyxy, category_ids N, masks [N,H,W], a ``BoxMasks`` or None). For a
    CT slice use a 6-tuple (file_name, volume: Volume, boxes, category_ids, masks or None,
    slice_index): the volume is written once under file_name (.nii.gz/.nrrd/.mha) and each
    slice becomes an image entry with `slice_index`. For a plane of a stack that is not CT
    (microscopy) use a 6-tuple (file_name, stack ZxHxW(xC) array, boxes, category_ids, masks
    or None, plane): the stack is written once, whole, as a multi-page TIFF under file_name
    (.tif/.tiff) in its own type, and each plane becomes an image entry with "plane" (pass
    the same array object for the planes of one stack). Masks are stored as RLE
    segmentations. Every file is written atomically and annotations.json
    last, so a half-written folder never looks complete. load_box_folder reads the result
    back to the same boxes, categories, masks and pixels (CT: the same volume). ``info``
    (JSON data) goes into the COCO file's "info" and comes back as ``BoxFolder.info``.
    ``entry_fields`` (per image) and ``box_fields`` (per image, per box) are extra keys for
    the image entries and the annotations, e.g. a stack plane's "plane" or an object's
    "object_id" (COCO tools ignore keys they do not know); they may not replace the
    standard ones.
    """
    root = Path(path)
    images = list(images)
    for name, extra in (("entry_fields", entry_fields), ("box_fields", box_fields)):
        if extra is not None and len(extra) != len(images):
            raise ValueError(f"save_box_folder: {len(images)} images but {len(extra)} "
                             f"{name}")
    _check_file_names(images)  # before any file is written: one may be the folder's own
    cats = [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]
    cat_ids = {c["id"] for c in cats}
    # Stacks and volumes written so far: their other planes' entries reuse the file
    # (_check_file_names has already ruled out two sources under one name).
    written: set[str] = set()
    coco_images, annotations = [], []
    for image_id, item in enumerate(images, start=1):
        if len(item) not in (5, 6):
            raise ValueError(f"save_box_folder: entry {image_id - 1} must have 5 or 6 items")
        file_name, image, boxes, category_ids, masks = item[:5]
        file_name = str(file_name)
        slice_index = item[5] if len(item) == 6 else None
        entry: dict[str, Any] = {"id": image_id, "file_name": file_name}
        if slice_index is not None and not isinstance(image, Volume):
            if lower_suffix(Path(file_name)) in VOLUME_SUFFIXES:
                raise ValueError(f"{file_name}: a CT entry (with slice_index) needs a Volume")
            plane, image = int(slice_index), np.asarray(image)
            if not 0 <= plane < len(image):
                raise ValueError(f"{file_name}: plane {plane} outside 0..{len(image) - 1}")
            if file_name not in written:
                _write_stack(root / "images" / file_name, image)
                written.add(file_name)
            h, w = image.shape[1:3]
            entry["plane"] = plane
        elif slice_index is not None:
            depth, h, w = image.array.shape
            if not 0 <= int(slice_index) < depth:
                raise ValueError(f"{file_name}: slice_index {slice_index} outside 0..{depth - 1}")
            if file_name not in written:
                write_volume(root / "images" / file_name, image)
                written.add(file_name)
            entry["slice_index"] = int(slice_index)
        elif isinstance(image, (str, os.PathLike)):  # an image file, kept byte for byte
            h, w = _image_size(Path(image))
            _copy_image(Path(image), root / "images" / file_name)
        else:
            image = np.asarray(image)
            h, w = image.shape[:2]
            _write_image(root / "images" / file_name, image)
        entry.update(width=int(w), height=int(h))
        entry.update(_extra_fields(entry, entry_fields[image_id - 1] if entry_fields else {},
                                   file_name))
        coco_images.append(entry)

        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        category_ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        if len(category_ids) != len(boxes):
            raise ValueError(f"{file_name}: {len(boxes)} boxes but {len(category_ids)} categories")
        unknown = set(category_ids.tolist()) - cat_ids
        if unknown:
            raise ValueError(f"{file_name}: category ids {sorted(unknown)} are not in categories")
        rles: list[dict | None] = [None] * len(boxes)
        areas: list[float | None] = [None] * len(boxes)
        if masks is not None:
            masks = BoxMasks.from_masks(masks, (h, w))
            if masks.size != (h, w):
                raise ValueError(f"{file_name}: masks of a {masks.size[1]}x{masks.size[0]} "
                                 f"image for a {w}x{h} one")
            if len(masks) != len(boxes):
                raise ValueError(f"{file_name}: {len(boxes)} boxes but {len(masks)} masks")
            rles = masks.to_rle()
            areas = [float(crop.sum()) for crop in masks.crops]
        extras = list(box_fields[image_id - 1]) if box_fields else [{}] * len(boxes)
        if len(extras) != len(boxes):
            raise ValueError(f"{file_name}: {len(boxes)} boxes but {len(extras)} box_fields")
        for i, (box, cat, rle) in enumerate(zip(boxes, category_ids, rles)):
            # float32 -> float keeps the exact value, so x + w recovers x1 bit for bit.
            x0, y0, x1, y1 = (float(v) for v in box)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cat),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                   "area": areas[i] if rle is not None else (x1 - x0) * (y1 - y0)}
            if rle is not None:
                ann["segmentation"] = rle
            ann.update(_extra_fields(ann, extras[i], file_name))
            annotations.append(ann)
    coco = {"images": coco_images, "annotations": annotations, "categories": cats}
    if info:
        coco["info"] = dict(info)
    with atomic_write(root / "annotations.json") as handle:
        json.dump(coco, handle)
    return root


def _check_file_names(images: Sequence[tuple]) -> None:
    """ValueError when two entries of save_box_folder would write two pictures under one
    file name: a 2D image's name used twice (or by a stack or volume too), or two different
    stacks or volumes under one name. Checked before anything is written: found while
    writing, the first file had already replaced the folder's own (a whole stack by a
    plane, when a folder is saved again where it was read from)."""
    sources: dict[str, Any] = {}  # file_name -> its stack or volume, None: a 2D image
    for item in images:
        if len(item) not in (5, 6):
            continue  # said where the entry is read
        file_name, image = str(item[0]), item[1]
        if len(item) == 5 or item[5] is None:
            source = None
        else:  # the same object for the planes or slices of one stack or volume
            source = image if isinstance(image, Volume) else np.asarray(image)
            kind = "volumes" if isinstance(image, Volume) else "stacks"
        if file_name in sources:
            if source is None or sources[file_name] is None:
                raise ValueError(f"save_box_folder: file name {file_name!r} used twice")
            if sources[file_name] is not source:
                raise ValueError(f"{file_name}: two different {kind} under one file name")
        sources[file_name] = source


def _extra_fields(entry: dict, extra: dict, file_name: str) -> dict:
    """``extra`` where none of its keys is already one of ``entry``'s (the COCO fields
    save_box_folder writes itself)."""
    clash = sorted(set(extra) & set(entry))
    if clash:
        raise ValueError(f"{file_name}: extra fields {clash} would replace COCO fields")
    return dict(extra)
