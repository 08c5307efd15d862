"""One object's mask carried through the slices of a volume, slice by slice.

A box is drawn on one slice; its mask there gives the next slice's box, and so on. The
box a mask gives is not a box the user drew: it is not tight on the next slice's object,
so the energy that assumes tight boxes (box projection, background ring) would fill it
out to its edges, and each slice's leak would widen the next box until the masks become
rectangles (seen on the IRCAD volume: a liver box ran into bowel, stomach and muscle).
Here each slice is segmented with ``LOOSE_BOXES`` and its mask is held within ``band``
pixels of the previous slice's mask, so an outline moves at most that far per slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from scipy import ndimage

from boxlevelset.evaluate import mask_iou
from boxlevelset.image import Window, as_float_image

# How far (pixels) an outline may move from one slice to the next. Three pixels let a
# liver follow its own outline through the IRCAD volume (0.57 mm pixels, 1.6 mm slices)
# while a leak into a neighbour of the same density grows by at most that much per slice;
# benchmarks/propagate.py measures it on ct3slice-dev.
BAND = 3
# The walk stops where a slice's mask overlaps the previous one less than this (IoU), or
# where its mean intensity strays this far from the start slice's (windowed CT in [0, 1];
# other images as a share of the start slice's value range).
MIN_OVERLAP = 0.5
INTENSITY_TOLERANCE = 0.15

Segmenter = Callable[[int, np.ndarray], np.ndarray]


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def bounding_box(mask: np.ndarray, margin: int = 0) -> np.ndarray:
    """(x0, y0, x1, y1) of a non-empty mask's pixels, grown by ``margin`` and clipped."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("bounding box of an empty mask")
    height, width = mask.shape
    return np.array([max(xs.min() - margin, 0), max(ys.min() - margin, 0),
                     min(xs.max() + 1 + margin, width), min(ys.max() + 1 + margin, height)],
                    dtype=np.float64)


def within_band(mask: np.ndarray, previous: np.ndarray, band: int = BAND) -> np.ndarray:
    """``mask`` cut to ``band`` pixels around ``previous``; of the pieces left, the largest
    and those at least ``levelset.MIN_PIECE`` of its size stay (a vertebra's body and arch
    are two pieces on many slices; a leak cut by the band can leave specks)."""
    from boxlevelset.levelset import _clean

    held = mask & ndimage.binary_dilation(previous, _disk(band))
    return _clean(held, fill_holes=False, largest_component=True)


def propagate_mask(
    volume: np.ndarray,
    plane: int,
    mask: np.ndarray,
    *,
    window: Window = None,
    band: int = BAND,
    min_overlap: float = MIN_OVERLAP,
    intensity_tolerance: float = INTENSITY_TOLERANCE,
    max_slices: int | None = None,
    segment: Segmenter | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Carry ``mask`` (the object on slice ``plane``) to the slices above, then below.

    Yields (slice index, HxW bool mask) for each slice reached: upwards (plane + 1, + 2, ...)
    until a stop, then downwards from plane - 1. A direction stops at the volume's end,
    after ``max_slices`` slices, or at the first slice whose mask is empty, overlaps the
    previous slice's mask less than ``min_overlap`` (IoU), or whose mean intensity strays
    more than ``intensity_tolerance`` from the start slice's (a jump into another
    structure).

    Args:
        volume: ZxHxW (or ZxHxWxC) array, or a lazy one (dask, napari layer data): only
            the slices visited are read. CT in Hounsfield units with ``window``.
        plane: index of the slice ``mask`` lies on.
        mask: HxW boolean mask of the object on that slice.
        window: CT (level, width) or preset name, as in ``segment_boxes``.
        band: pixels an outline may move from one slice to the next.
        segment: (slice index, box [4]) -> HxW mask; default: ``segment_boxes`` on that
            slice with ``LOOSE_BOXES`` (the plugin passes its model here).
    """
    from boxlevelset.levelset import LOOSE_BOXES, segment_boxes

    volume = volume if hasattr(volume, "shape") else np.asarray(volume)  # dask stays lazy
    start = np.asarray(mask, dtype=bool)
    if volume.ndim not in (3, 4) or volume.shape[1:3] != start.shape:
        raise ValueError(f"volume of shape {volume.shape} does not hold masks of shape "
                         f"{start.shape} (expected ZxHxW or ZxHxWxC)")
    if not 0 <= plane < volume.shape[0]:
        raise ValueError(f"slice {plane} is outside the volume's {volume.shape[0]} slices")
    if not start.any():
        raise ValueError("the mask to propagate is empty")
    if segment is None:
        def segment(z: int, box: np.ndarray) -> np.ndarray:
            return segment_boxes(np.asarray(volume[z]), box[None], window=window,
                                 **LOOSE_BOXES)[0]

    # Intensities on one scale for the whole walk: windowed CT, else the raw values over the
    # start slice's range (as_float_image alone would stretch each slice to its own range).
    first = np.asarray(volume[plane], dtype=np.float64)
    low, span = np.nanmin(first), max(float(np.nanmax(first) - np.nanmin(first)), 1e-12)

    def mean_intensity(z: int, m: np.ndarray) -> float:
        if window is not None:
            return float(as_float_image(np.asarray(volume[z]), window)[m].mean())
        return float((np.asarray(volume[z], dtype=np.float64)[m].mean() - low) / span)

    level = mean_intensity(plane, start)
    for step in (1, -1):
        previous, z = start, plane + step
        while 0 <= z < volume.shape[0] and (max_slices is None or abs(z - plane) <= max_slices):
            new = within_band(segment(z, bounding_box(previous, band)), previous, band)
            if (not new.any() or mask_iou(new, previous) < min_overlap
                    or abs(mean_intensity(z, new) - level) > intensity_tolerance):
                break
            yield z, new
            previous, z = new, z + step
