"""Writing results: atomic files, COCO JSON with RLE masks, label images.

Everything here writes through a temporary file in the destination folder followed by
os.replace, so a crash or a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from pycocotools import mask as mask_utils

# Multi-part suffixes that writers (SimpleITK, cv2) recognise only as a whole.
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def lower_suffix(path: Path) -> str:
    """A file's suffix in lower case, whole for multi-part ones (".nii.gz"): the type check
    of readers and writers. Temporary files carry it too: SimpleITK picks its writer from
    the suffix and knows only ".mha", not ".MHA" (it wrote an empty file under ".MHA")."""
    name = path.name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (same folder, same suffix) that replaces `path` on success.

    For writers that want a file name rather than a file object (cv2.imwrite, SimpleITK,
    tifffile): they pick the format from the suffix, so the temporary name keeps it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The name is shortened in the prefix: with the random part and the suffix added, a
        # name near the file system's 255-byte limit would not fit.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.",
                                        suffix=lower_suffix(path))
    except OSError as err:
        if err.errno is None:
            raise
        # mkstemp's own message names a random hidden file the user never asked for.
        raise type(err)(err.errno, err.strerror, str(path)) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _match_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on success it replaces `path`.

    `mode` is "w" (text, utf-8 by default) or "wb". On an exception the temporary file is
    removed and `path` is left untouched.
    """
    if "r" in mode or "a" in mode or "+" in mode:
        raise ValueError(f"atomic_write only supports write modes ('w', 'wb'), got {mode!r}")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def _match_umask(path: Path) -> None:
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _as_mask_stack(masks: np.ndarray | Sequence[np.ndarray], name: str = "masks") -> np.ndarray:
    """Return masks as a bool array [N, H, W] (a list of HxW masks is stacked)."""
    if isinstance(masks, np.ndarray):
        arr = masks
    else:
        masks = list(masks)
        if not masks:
            return np.zeros((0, 0, 0), dtype=bool)
        arr = np.stack([np.asarray(m) for m in masks])
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W] (or HxW), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def masks_to_rle(masks: np.ndarray | Sequence[np.ndarray]) -> list[dict]:
    """Encode bool masks [N, H, W] as COCO RLE dicts {"size": [H, W], "counts": str}."""
    arr = _as_mask_stack(masks)
    if arr.shape[0] == 0:
        return []
    # pycocotools wants Fortran-ordered uint8 H x W x N.
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON serialisable
    return rles


@dataclass(frozen=True)
class BoxMasks:
    """N instance masks of one image, each stored over its box only (it is zero outside):
    memory and work grow with the boxes' area, not with N whole images (961 nuclei on a
    2048x2048 image: 0.9 MB here, 4 GB as HxW masks). ``segment_boxes(..., cropped=True)``
    returns one.

    bounds: [N, 4] int pixel ranges (x0, y0, x1, y1), end exclusive; crops: N bool arrays,
    crop i of shape (y1 - y0, x1 - x0); size: the image's (height, width).
    """

    bounds: np.ndarray
    crops: list[np.ndarray]
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_masks(cls, masks: np.ndarray | Sequence[np.ndarray] | BoxMasks,
                   size: tuple[int, int]) -> BoxMasks:
        """HxW masks ([N, H, W], or a BoxMasks, returned as it is) of an image of ``size``,
        each over the whole image."""
        if isinstance(masks, BoxMasks):
            return masks
        height, width = size
        stack = np.asarray(masks, dtype=bool).reshape(-1, height, width)
        return cls(np.tile([0, 0, width, height], (len(stack), 1)), list(stack), (height, width))

    @classmethod
    def from_labels(cls, labels: np.ndarray, ids: Sequence[int]) -> BoxMasks:
        """The masks of label ids ``ids`` in an HxW label image, each over the bounding box
        of its pixels (an id without pixels: an empty mask at (0, 0, 0, 0))."""
        from scipy import ndimage

        lab = np.asarray(labels)
        ids = [int(i) for i in ids]
        found: list = []
        slot = {i: i for i in ids if i > 0}  # label id -> its index + 1 in found
        if slot and np.issubdtype(lab.dtype, np.integer):
            dense = lab
            if max(slot) > 4 * len(slot) + 4096:  # sparse ids (found has max id entries)
                values, inverse = np.unique(lab, return_inverse=True)
                dense = inverse.reshape(lab.shape) + 1
                where = np.searchsorted(values, list(slot))
                slot = {i: int(k) + 1 for i, k in zip(slot, where)
                        if k < len(values) and values[k] == i}
            # One pass finds every positive label's bounding slices.
            found = ndimage.find_objects(dense, max_label=max(slot.values(), default=0))
        bounds, crops = [], []
        for i in ids:
            if i in slot and slot[i] <= len(found):
                span = found[slot[i] - 1]
            else:  # a negative or non-integer label: its own pass
                rows, cols = np.nonzero(lab == i)
                span = None if rows.size == 0 else (
                    slice(int(rows.min()), int(rows.max()) + 1),
                    slice(int(cols.min()), int(cols.max()) + 1))
            if span is None:
                bounds.append([0, 0, 0, 0])
                crops.append(np.zeros((0, 0), bool))
                continue
            bounds.append([span[1].start, span[0].start, span[1].stop, span[0].stop])
            crops.append(lab[span] == i)
        return cls(np.array(bounds, np.int64).reshape(-1, 4), crops,
                   (int(lab.shape[0]), int(lab.shape[1])))

    @classmethod
    def from_rle(cls, rles: Sequence[dict], size: tuple[int, int]) -> BoxMasks:
        """COCO RLEs (compressed or not) of an image of ``size`` (height, width), each
        decoded over the bounding box of its pixels only."""
        height, width = size
        bounds, crops = [], []
        for rle in rles:
            if [int(v) for v in rle["size"]] != [height, width]:
                raise ValueError(f"RLE size {list(rle['size'])} does not match image size "
                                 f"[{height}, {width}]")
            counts = rle["counts"]
            if not isinstance(counts, list):
                counts = _rle_string_counts(counts)
            edges = np.cumsum(np.asarray(counts, np.int64))  # run ends, zeros first
            starts, ends = edges[0:-1:2], edges[1::2]  # the runs of ones
            keep = ends > starts
            starts, ends = starts[keep], ends[keep]
            if starts.size == 0:
                bounds.append([0, 0, 0, 0])
                crops.append(np.zeros((0, 0), bool))
                continue
            # Column-major: only the columns the runs cross are laid out, whole.
            x0, x1 = int(starts[0] // height), int((ends[-1] - 1) // height) + 1
            edges = np.concatenate([[x0 * height], np.stack([starts, ends], 1).ravel(),
                                    [x1 * height]])
            values = np.tile([False, True], len(starts) + 1)[:len(edges) - 1]
            columns = np.repeat(values, np.diff(edges)).reshape(x1 - x0, height).T
            rows = np.flatnonzero(columns.any(1))
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            bounds.append([x0, y0, x1, y1])
            crops.append(columns[y0:y1])
        return cls(np.array(bounds, np.int64).reshape(-1, 4), crops, (height, width))

    def full(self, i: int) -> np.ndarray:
        """Mask i as an HxW bool array."""
        x0, y0, x1, y1 = (int(v) for v in self.bounds[i])
        mask = np.zeros(self.size, bool)
        mask[y0:y1, x0:x1] = self.crops[i]
        return mask

    def select(self, index: Sequence[int] | np.ndarray) -> BoxMasks:
        """The masks at ``index`` (positions, or a bool array over the masks), in its order."""
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        return BoxMasks(self.bounds[index].reshape(-1, 4), [self.crops[i] for i in index.tolist()],
                        self.size)

    def to_masks(self) -> list[np.ndarray]:
        """Every mask as an HxW bool array."""
        return [self.full(i) for i in range(len(self))]

    def to_array(self) -> np.ndarray:
        """The masks as one [N, H, W] bool array ([0, H, W] for none)."""
        return np.stack(self.to_masks()) if len(self) else np.zeros((0, *self.size), bool)

    def to_rle(self) -> list[dict]:
        """COCO RLE of each mask, the same as ``masks_to_rle`` of the HxW masks, computed
        from the crops (run starts and ends in column-major order)."""
        height, width = self.size
        out = []
        for (x0, y0, x1, y1), crop in zip(self.bounds.tolist(), self.crops):
            # Zero rows above and below each column: a run ends inside its column.
            column = np.zeros((crop.shape[0] + 2, crop.shape[1]), np.int8)
            column[1:-1] = crop
            steps = np.diff(column, axis=0).T  # columns first: image order is column-major
            cols, rows = np.nonzero(steps == 1)
            starts = (x0 + cols) * height + y0 + rows
            cols, rows = np.nonzero(steps == -1)
            ends = (x0 + cols) * height + y0 + rows
            # A run down to the image's last row goes on at the next column's first row.
            joined = np.flatnonzero(ends[:-1] == starts[1:])
            starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
            edges = np.stack([starts, ends], 1).ravel()
            counts = np.diff(np.concatenate([[0], edges, [height * width]]))
            if len(counts) > 1 and counts[-1] == 0:  # no zeros after a run to the end
                counts = counts[:-1]
            out.append(segmentation_to_rle({"size": [height, width], "counts": counts.tolist()},
                                           height, width))
        return out

    def to_labels(self) -> np.ndarray:
        """An int32 label image (1..N), earlier masks winning overlaps, as
        ``masks_to_labels`` paints the HxW masks."""
        labels = np.zeros(self.size, np.int32)
        for i, ((x0, y0, x1, y1), crop) in enumerate(zip(self.bounds.tolist(), self.crops), 1):
            region = labels[y0:y1, x0:x1]
            region[crop & (region == 0)] = i
        return labels


def crop_overlap(a_box: Sequence[int], a: np.ndarray, b_box: Sequence[int],
                 b: np.ndarray) -> int:
    """Pixels two masks given over their boxes (x0, y0, x1, y1) share."""
    x0, y0 = max(a_box[0], b_box[0]), max(a_box[1], b_box[1])
    x1, y1 = min(a_box[2], b_box[2]), min(a_box[3], b_box[3])
    if x1 <= x0 or y1 <= y0:
        return 0
    return int((a[y0 - a_box[1]:y1 - a_box[1], x0 - a_box[0]:x1 - a_box[0]] &
                b[y0 - b_box[1]:y1 - b_box[1], x0 - b_box[0]:x1 - b_box[0]]).sum())


def _rle_string_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString: 5 bits a
    character, a sign bit, and from the fourth count on the difference to the count two
    places before)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    out: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Turn any COCO segmentation (polygon list, uncompressed or compressed RLE) into one RLE.

    The returned RLE has str counts. Raises ValueError for malformed input or a size that
    disagrees with (height, width).
    """
    if isinstance(segmentation, list):
        odd = [p for p in segmentation if not isinstance(p, (list, tuple))]
        if odd:
            # [x0, y0, x1, y1, ...] without the outer list: pycocotools fails on it with a
            # TypeError deep inside; say what COCO expects instead.
            raise ValueError("polygon segmentation must be a list of polygons "
                             f"[[x0, y0, x1, y1, ...], ...], got a list holding "
                             f"{type(odd[0]).__name__} values")
        polys = [p for p in segmentation if len(p) >= 6]  # a polygon needs 3 points
        if not polys:
            raise ValueError("polygon segmentation has no polygon with at least 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match image size [{height}, {width}]")
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    rle = dict(rle)
    if isinstance(rle["counts"], bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode any COCO segmentation to a bool HxW mask."""
    rle = segmentation_to_rle(segmentation, height, width)
    return mask_utils.decode(rle).astype(bool)


def _rle_bbox_area(rle: dict) -> tuple[list[float], float]:
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return bbox, float(mask_utils.area(rle))


def coco_results(
    image_id: int,
    masks: np.ndarray | Sequence[np.ndarray] | BoxMasks,
    scores: Sequence[float] | np.ndarray,
    category_ids: Sequence[int] | np.ndarray,
) -> list[dict]:
    """COCO result entries (image_id, category_id, segmentation RLE, score, bbox, area).

    `category_ids` are COCO category ids (not 0-based label indices). The bbox and area come
    from the mask so they stay consistent with the segmentation.
    """
    rles = masks.to_rle() if isinstance(masks, BoxMasks) else masks_to_rle(masks)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    category_ids = np.asarray(category_ids).reshape(-1)
    if not (len(rles) == len(scores) == len(category_ids)):
        raise ValueError(
            f"masks, scores and category_ids differ in length: {len(rles)}, {len(scores)}, "
            f"{len(category_ids)}"
        )
    results = []
    for rle, score, cat in zip(rles, scores, category_ids):
        bbox, area = _rle_bbox_area(rle)
        results.append({
            "image_id": int(image_id),
            "category_id": int(cat),
            "segmentation": rle,
            "score": float(score),
            "bbox": bbox,
            "area": area,
        })
    return results


def _annotations_from(entry: dict, images_by_id: dict[int, dict]) -> list[dict]:
    """Expand one annotation argument of write_coco into COCO annotation dicts (no ids yet)."""
    if "image_id" not in entry:
        raise ValueError(f"annotation without image_id: keys {sorted(entry)}")
    image_id = int(entry["image_id"])
    if image_id not in images_by_id:
        raise ValueError(f"annotation refers to image_id {image_id}, which is not in images")
    image = images_by_id[image_id]
    h, w = int(image["height"]), int(image["width"])
    if "masks" in entry:  # one entry per image holding all of its instances
        masks = _as_mask_stack(entry["masks"])
        n = masks.shape[0]
        cats = np.asarray(entry.get("category_ids", [1] * n)).reshape(-1)
        scores = entry.get("scores")
        if len(cats) != n or (scores is not None and len(scores) != n):
            raise ValueError(f"image {image_id}: masks, category_ids and scores differ in length")
        singles = [
            {"image_id": image_id, "mask": masks[i], "category_id": int(cats[i]),
             **({"score": float(scores[i])} if scores is not None else {})}
            for i in range(n)
        ]
        return [a for s in singles for a in _annotations_from(s, images_by_id)]
    if "mask" in entry:
        mask = np.asarray(entry["mask"], dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"image {image_id}: mask shape {mask.shape} is not ({h}, {w})")
        rle = masks_to_rle(mask[None])[0]
    elif "segmentation" in entry:
        rle = segmentation_to_rle(entry["segmentation"], h, w)
    else:
        raise ValueError(f"image {image_id}: annotation needs 'mask', 'masks' or 'segmentation'")
    bbox, area = _rle_bbox_area(rle)
    out = {
        "image_id": image_id,
        "category_id": int(entry.get("category_id", 1)),
        "bbox": [float(v) for v in entry["bbox"]] if "bbox" in entry else bbox,
        "area": area,
        "iscrowd": 0,
        "segmentation": rle,
    }
    if entry.get("score") is not None:
        out["score"] = float(entry["score"])
    return [out]


def write_coco(
    path: str | os.PathLike,
    images: Sequence[dict],
    annotations: Sequence[dict],
    categories: Sequence[dict],
) -> Path:
    """Write a COCO instance-segmentation JSON atomically and return its path.

    images: dicts with file_name, height, width, id (extra keys such as slice_index are kept).
    annotations: either one dict per instance with image_id, category_id, and "mask" (bool HxW)
    or "segmentation" (RLE/polygon), optional "score" and "bbox" (x, y, w, h); or one dict per
    image with image_id, "masks" [N,H,W], "category_ids" [N] and optional "scores" [N].
    Masks are stored as RLE; bbox and area are computed from the mask unless bbox is given.
    """
    images = [dict(im) for im in images]
    for im in images:
        missing = {"file_name", "height", "width", "id"} - set(im)
        if missing:
            raise ValueError(f"image entry {im} lacks {sorted(missing)}")
    images_by_id: dict[int, dict] = {}
    for im in images:
        if int(im["id"]) in images_by_id:
            raise ValueError(f"image ids must be unique: {int(im['id'])} is used by "
                             f"{images_by_id[int(im['id'])]['file_name']!r} and "
                             f"{im['file_name']!r}")
        images_by_id[int(im["id"])] = im
    cats = [{"id": int(c["id"]), "name": str(c["name"]), **{k: v for k, v in c.items()
            if k not in ("id", "name")}} for c in categories]
    anns = [a for entry in annotations for a in _annotations_from(entry, images_by_id)]
    known = {c["id"] for c in cats}
    unknown = sorted({a["category_id"] for a in anns} - known)
    if unknown:
        raise ValueError(f"annotations use category ids {unknown} that are not in categories")
    for i, ann in enumerate(anns, start=1):
        ann["id"] = i
    coco = {"images": images, "annotations": anns, "categories": cats}
    path = Path(path)
    with atomic_write(path) as handle:
        json.dump(coco, handle, default=_json_scalar)
    return path


def _json_scalar(value: Any) -> Any:
    """numpy numbers and arrays in caller-supplied fields (an image's height from an array
    shape, an id from a numpy index) as the Python values json can write."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_coco_masks(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a COCO JSON back into {file_name: (masks bool [N,H,W], category_ids int64 [N])}.

    Images without annotations map to an empty [0, H, W] stack. CT entries that share a
    volume file are keyed "file_name[slice_index]" so slices do not overwrite each other,
    and the planes of a stack ("plane") "file_name[plane]" likewise.
    """
    path = Path(path)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read COCO JSON ({err})") from err
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{path}: not a COCO file (needs 'images' and 'annotations')")
    per_image: dict[int, list[dict]] = {int(im["id"]): [] for im in coco["images"]}
    for ann in coco["annotations"]:
        if int(ann["image_id"]) not in per_image:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to unknown image")
        per_image[int(ann["image_id"])].append(ann)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for im in coco["images"]:
        h, w = int(im["height"]), int(im["width"])
        anns = [a for a in per_image[int(im["id"])] if a.get("segmentation") is not None]
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for i, ann in enumerate(anns):
            try:
                masks[i] = decode_segmentation(ann["segmentation"], h, w)
            except ValueError as err:
                raise ValueError(f"{path}: annotation {ann.get('id')}: {err}") from err
        cats = np.array([int(a["category_id"]) for a in anns], dtype=np.int64)
        key = im["file_name"]
        index = im.get("slice_index", im.get("plane"))
        if index is not None:
            key = f"{key}[{int(index)}]"
        out[key] = (masks, cats)
    return out


def masks_to_labels(masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Paint masks [N, H, W] into an int32 label image (1..N); earlier masks win overlaps."""
    arr = _as_mask_stack(masks)
    if arr.shape[0] == 0:
        raise ValueError("masks_to_labels needs at least one mask to know the image size")
    labels = np.zeros(arr.shape[1:], dtype=np.int32)
    for i, m in enumerate(arr, start=1):
        labels[m & (labels == 0)] = i
    return labels


LABEL_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def check_label_image_path(path: str | os.PathLike) -> Path:
    """``path`` if a label image can be written there (by its suffix), else ValueError."""
    path = Path(path)
    if path.suffix.lower() not in LABEL_IMAGE_SUFFIXES:
        raise ValueError(f"{path}: label images are written as .png or .tif, "
                         f"not {path.suffix or '(no suffix)'!r}")
    return path


def write_label_image(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an HxW integer label image atomically: .png as uint16, .tif/.tiff as uint16/int32."""
    import cv2  # local: keep `import boxlevelset.export` light
    import tifffile

    path = check_label_image_path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{path}: label image must be HxW, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative")
    top = int(labels.max()) if labels.size else 0
    suffix = path.suffix.lower()
    if suffix == ".png":
        if top > np.iinfo(np.uint16).max:
            raise ValueError(f"{path}: {top} labels do not fit a 16-bit PNG; write a .tif instead")
        with atomic_path(path) as tmp:
            if not cv2.imwrite(str(tmp), labels.astype(np.uint16)):
                raise OSError(f"{path}: OpenCV could not write the PNG")
    elif suffix in (".tif", ".tiff"):
        dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.int32
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    return path
