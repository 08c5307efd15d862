"""A trained model on images far larger than the ones it learned from, tile by tile.

The model resizes every input so that its shorter side is ``config.input_size`` (512 for
the lite preset): a 2048x2048 microscopy tile shrinks fourfold, its nuclei fall below the
smallest grid cells, and at most ``config.max_per_image`` instances survive. Here the
image is cut into overlapping tiles about the size of the training images; each tile is
resized as a whole image would be, its masks are shifted back, and an instance that two
tiles both found is kept once.

Merging, as segment-anything's automatic mask generator does across its crops: a mask
whose box touches a tile side that lies inside the image may be cut off there, so whole
masks come first, then by score; a candidate is dropped when it overlaps a kept mask of
its class by more than ``iou_threshold`` (IoU), or, when it is such a cut mask, when more
than half of it lies in a kept mask. An object survives whole when some tile holds all of
it: ``overlap`` should exceed the objects' size.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from boxlevelset.export import BoxMasks
from boxlevelset.image import Window, as_rgb


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the tiles along an axis of ``length`` pixels: tiles of ``tile`` pixels
    (one tile when the axis is no longer), spread evenly from 0 to ``length - tile`` so that
    neighbours share at least ``overlap`` pixels."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_windows(height: int, width: int, tile: int,
                 overlap: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of every tile of an image, row by row (see ``tile_starts``)."""
    check_tiling(tile, overlap)
    return [(x, y, min(width, x + tile), min(height, y + tile))
            for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def check_tiling(tile: int, overlap: int) -> None:
    """ValueError unless ``tile`` >= 32 and 0 <= ``overlap`` < ``tile`` are whole pixels."""
    if int(tile) != tile or tile < 32:
        raise ValueError(f"tile must be a whole number of pixels >= 32, got {tile}")
    if int(overlap) != overlap or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be a whole number of pixels in [0, tile={tile}), "
                         f"got {overlap}")


def predict_tiled(
    model: Any, image: np.ndarray, tile: int, overlap: int | None = None,
    window: Window = None, score_threshold: float | None = None, iou_threshold: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Every instance of ``image`` found by ``model`` (a ``SOLOv2``) on overlapping tiles of
    ``tile`` x ``tile`` pixels, merged (see the module docstring).

    Args:
        model: the trained model (``boxlevelset.load_model``).
        image: HxW or HxWxC, as ``model.predict`` takes it; it is scaled to [0, 1] once, as a
            whole, so that every tile shares one intensity scale.
        tile: tile side in image pixels: about the size of the images the model was trained
            on. An image no larger than one tile is predicted whole.
        overlap: pixels shared by neighbouring tiles (default ``tile // 4``); an object wider
            than this may be found in pieces.
        window: CT (level, width) or preset name, for images in Hounsfield units.
        score_threshold: as ``model.predict``'s, for every tile.
        iou_threshold: overlap (IoU) above which two masks of one class are one instance.
        progress: called with (tiles done, tiles) after each tile.

    Returns:
        ``Instances`` with ``BoxMasks`` masks (each over its box) in image pixels, by
        decreasing score.
    """
    from boxlevelset.model import Instances

    overlap = tile // 4 if overlap is None else overlap
    check_tiling(tile, overlap)
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    rgb = as_rgb(image, window)  # one scale for all tiles: floats in [0, 1] stay as they are
    height, width = rgb.shape[:2]
    windows = tile_windows(height, width, tile, overlap)
    bounds, crops, labels, scores, cut = [], [], [], [], []
    for done, (x0, y0, x1, y1) in enumerate(windows, start=1):
        inst = model.predict(rgb[y0:y1, x0:x1], score_threshold=score_threshold, cropped=True)
        b = inst.masks.bounds + np.array([x0, y0, x0, y0])
        # A side of the tile inside the image may have cut the mask short.
        inner = np.array([x0 > 0, y0 > 0, x1 < width, y1 < height])
        on_side = np.column_stack([b[:, 0] <= x0, b[:, 1] <= y0, b[:, 2] >= x1, b[:, 3] >= y1])
        bounds.append(b)
        crops += inst.masks.crops
        labels.append(inst.labels)
        scores.append(inst.scores)
        cut.append((on_side & inner).any(1))
        if progress is not None:
            progress(done, len(windows))
    masks = BoxMasks(np.concatenate(bounds).astype(np.int64).reshape(-1, 4), crops,
                     (height, width))
    labels_a, scores_a = np.concatenate(labels), np.concatenate(scores)
    keep = merge_instances(masks, labels_a, scores_a, np.concatenate(cut), iou_threshold)
    order = keep[np.argsort(-scores_a[keep], kind="stable")]
    masks = masks.select(order)
    return Instances(masks=masks, boxes=masks.bounds.astype(np.float32),
                     labels=labels_a[order].astype(np.int64),
                     scores=scores_a[order].astype(np.float32))


def merge_instances(masks: BoxMasks, labels: np.ndarray, scores: np.ndarray, cut: np.ndarray,
                    iou_threshold: float = 0.5) -> np.ndarray:
    """Indices of the instances to keep when several tiles found one object: greedily,
    whole masks (``cut`` False) before cut ones, each by decreasing score; a candidate goes
    when its IoU with a kept mask of its label exceeds ``iou_threshold``, or when it is cut
    and more than half of it lies in a kept mask of its label."""
    n = len(masks)
    areas = np.array([int(c.sum()) for c in masks.crops], np.int64)
    order = np.lexsort((-np.asarray(scores, np.float64), np.asarray(cut, bool)))
    kept: list[int] = []
    kept_bounds = np.zeros((n, 4), np.int64)
    for i in order:
        if areas[i] == 0:
            continue
        bx = masks.bounds[i]
        kb = kept_bounds[: len(kept)]
        near = np.flatnonzero((kb[:, 0] < bx[2]) & (bx[0] < kb[:, 2]) & (kb[:, 1] < bx[3])
                              & (bx[1] < kb[:, 3]))
        duplicate = False
        for k in near:
            j = kept[k]
            if labels[j] != labels[i]:
                continue
            inter = _intersection(masks, i, j)
            union = areas[i] + areas[j] - inter
            if inter > iou_threshold * union or (cut[i] and 2 * inter > areas[i]):
                duplicate = True
                break
        if not duplicate:
            kept_bounds[len(kept)] = bx
            kept.append(int(i))
    return np.asarray(kept, np.int64)


def _intersection(masks: BoxMasks, i: int, j: int) -> int:
    """Pixels masks i and j share, over the overlap of their boxes."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = masks.bounds[i], masks.bounds[j]
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return 0
    a = masks.crops[i][y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
    b = masks.crops[j][y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return int((a & b).sum())
