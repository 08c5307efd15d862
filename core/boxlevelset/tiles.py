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
its class from another tile by more than ``iou_threshold`` (IoU), or, when it is such a
cut mask, when more than half of it lies in one. Masks from one tile are never merged:
the model's Matrix NMS has weighed them. An object survives whole when some tile holds
all of it: ``overlap`` should exceed the objects' size.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from boxlevelset.export import BoxMasks, crop_overlap
from boxlevelset.image import Window, as_boxes, as_rgb, pixel_bounds
from boxlevelset.model import Instances, Predictor


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


def check_tiling(tile: int, overlap: int | None = None) -> int:
    """The overlap to use (None: ``tile // 4``); ValueError unless ``tile`` >= 32 and
    0 <= overlap < ``tile`` are whole pixels."""
    if int(tile) != tile or tile < 32:
        raise ValueError(f"tile must be a whole number of pixels >= 32, got {tile}")
    overlap = tile // 4 if overlap is None else overlap
    if int(overlap) != overlap or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be a whole number of pixels in [0, tile={tile}), "
                         f"got {overlap}")
    return int(overlap)


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
    overlap = check_tiling(tile, overlap)
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    rgb = as_rgb(image, window)  # one scale for all tiles: floats in [0, 1] stay as they are
    height, width = rgb.shape[:2]
    windows = tile_windows(height, width, tile, overlap)
    bounds, crops, labels, scores, cut, source = [], [], [], [], [], []
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
        source.append(np.full(len(b), done))
        if progress is not None:
            progress(done, len(windows))
    masks = BoxMasks(np.concatenate(bounds).astype(np.int64).reshape(-1, 4), crops,
                     (height, width))
    labels_a, scores_a = np.concatenate(labels), np.concatenate(scores)
    keep = merge_instances(masks, labels_a, scores_a, np.concatenate(cut), iou_threshold,
                           np.concatenate(source))
    order = keep[np.argsort(-scores_a[keep], kind="stable")]
    masks = masks.select(order)
    return Instances(masks=masks, boxes=masks.bounds.astype(np.float32),
                     labels=labels_a[order].astype(np.int64),
                     scores=scores_a[order].astype(np.float32))


def merge_instances(masks: BoxMasks, labels: np.ndarray, scores: np.ndarray, cut: np.ndarray,
                    iou_threshold: float = 0.5, source: np.ndarray | None = None) -> np.ndarray:
    """Indices of the instances to keep when several tiles found one object: greedily,
    whole masks (``cut`` False) before cut ones, each by decreasing score; a candidate goes
    when its IoU with a kept mask of its label from another tile (``source``: the tile of
    each; default: each its own) exceeds ``iou_threshold``, or when it is cut and more than
    half of it lies in such a mask. What one tile found together, its Matrix NMS has
    already weighed: a tile on its own gives the model's instances."""
    n = len(masks)
    source = np.arange(n) if source is None else np.asarray(source)
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
            if labels[j] != labels[i] or source[j] == source[i]:
                continue
            inter = crop_overlap(masks.bounds[i], masks.crops[i], masks.bounds[j],
                                 masks.crops[j])
            union = areas[i] + areas[j] - inter
            if inter > iou_threshold * union or (cut[i] and 2 * inter > areas[i]):
                duplicate = True
                break
        if not duplicate:
            kept_bounds[len(kept)] = bx
            kept.append(int(i))
    return np.asarray(kept, np.int64)


class TiledPredictor(Predictor):
    """``Predictor`` for images far larger than the model's training images: each box is
    prompted on the tile that holds it with the widest margin (the tile grid of
    ``tile_windows``; a box no tile holds gets a tile centred on it, grown to the box),
    each tile's features computed once, when a box first needs them; ``predict`` runs
    ``predict_tiled``. An image no larger than one tile gives ``Predictor``'s masks.
    ``segment_boxes(image, boxes, model=tiled_predictor, refine=N)`` refines its masks as
    it does a ``Predictor``'s."""

    def __init__(self, model: Any, tile: int, overlap: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        # Predictor's check that this is a SOLOv2 falls to the tiles' own Predictors (box
        # prompts): predict needs only the model's predict.
        self.model = model
        self._feats, self._orig = None, (0, 0)
        self.overlap = check_tiling(tile, overlap)
        self.tile = int(tile)
        self.progress = progress
        self._rgb: np.ndarray | None = None
        self._tiles: dict[tuple[int, int, int, int], Predictor] = {}

    @property
    def is_image_set(self) -> bool:
        return self._rgb is not None

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self._rgb is None else tuple(self._rgb.shape[:2])

    def set_image(self, image: np.ndarray, window: Window = None) -> TiledPredictor:
        """Hold ``image`` scaled to [0, 1] as a whole (one intensity scale for every tile);
        no network pass yet."""
        self._rgb = as_rgb(image, window)
        self._orig = tuple(self._rgb.shape[:2])
        self._tiles = {}
        return self

    def reset_image(self) -> None:
        self._rgb, self._tiles = None, {}

    def _require(self) -> Any:
        if self._rgb is None:
            raise RuntimeError("call set_image(image) before predicting")
        return self._rgb

    @property
    def features(self) -> Any:
        raise RuntimeError("a TiledPredictor holds features per tile, not for the whole image")

    def box_logits(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> Any:
        raise RuntimeError("a TiledPredictor gives box probabilities (box_probabilities), not "
                           "logits over the whole image")

    def box_probabilities(self, boxes: np.ndarray | Sequence[Sequence[float]],
                          logits: Any = None) -> list[np.ndarray]:
        """``Predictor.box_probabilities`` of each box, prompted on its tile."""
        if logits is not None:
            raise ValueError("a TiledPredictor computes its logits per tile: pass no logits")
        rgb = self._require()
        arr = as_boxes(boxes)
        height, width = rgb.shape[:2]
        out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(arr)
        groups: dict[tuple[int, int, int, int], list[int]] = {}
        for i, win in enumerate(self._windows_for(pixel_bounds(arr, height, width))):
            groups.setdefault(win, []).append(i)
        for (x0, y0, x1, y1), members in groups.items():
            predictor = self._tiles.get((x0, y0, x1, y1))
            if predictor is None:
                predictor = Predictor(self.model).set_image(rgb[y0:y1, x0:x1])
                self._tiles[(x0, y0, x1, y1)] = predictor
            shifted = arr[members] - np.array([x0, y0, x0, y0], arr.dtype)
            for i, prob in zip(members, predictor.box_probabilities(shifted)):
                out[i] = prob
        return out

    def _windows_for(self, bounds: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Per box (pixel bounds), the grid tile holding it with the widest margin, else a
        tile centred on the box (grown to it), inside the image."""
        height, width = self._orig
        grid = np.array(tile_windows(height, width, self.tile, self.overlap), np.int64)
        b = np.asarray(bounds, np.int64).reshape(-1, 1, 4)
        margin = np.minimum.reduce([b[..., 0] - grid[:, 0], b[..., 1] - grid[:, 1],
                                    grid[:, 2] - b[..., 2], grid[:, 3] - b[..., 3]])
        best = margin.argmax(1)
        out = []
        for (bx0, by0, bx1, by1), k, m in zip(b[:, 0].tolist(), best.tolist(),
                                              margin[np.arange(len(b)), best].tolist()):
            if m >= 0:
                out.append(tuple(grid[k].tolist()))
                continue
            sides = []
            for lo, hi, length in ((bx0, bx1, width), (by0, by1, height)):
                side = min(length, max(self.tile, hi - lo))
                start = min(max(0, (lo + hi) // 2 - side // 2), length - side)
                sides.append((start, start + side))
            (x0, x1), (y0, y1) = sides
            out.append((x0, y0, x1, y1))
        return out

    def predict(self, score_threshold: float | None = None, cropped: bool = False) -> Any:
        """Every instance of the held image, in tiles (``predict_tiled``)."""
        inst = predict_tiled(self.model, self._require(), self.tile, self.overlap,
                             score_threshold=score_threshold, progress=self.progress)
        if not cropped:
            inst.masks = inst.masks.to_array()
        return inst
