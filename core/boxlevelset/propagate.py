"""One object's mask carried through the slices of a volume, slice by slice.

A box is drawn on one slice; its mask there gives the next slice's box, and so on. The
box a mask gives is not a box the user drew: it is not tight on the next slice's object,
so the energy that assumes tight boxes (box projection, background ring) would fill it
out to its edges, and each slice's leak would widen the next box until the masks become
rectangles (seen on the IRCAD volume: a liver box ran into bowel, stomach and muscle).
Here each slice is segmented with ``SLICE_OPTIONS`` (no box projection, no ring), started
from the previous slice's mask (from the inscribed ellipse, objects under ten pixels across
were lost), and its mask is held within ``band`` pixels of the previous one, so an outline
moves at most that far per slice.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Generator

import numpy as np
from scipy import ndimage

from boxlevelset.evaluate import mask_iou
from boxlevelset.image import Window, apply_window, bounding_box

# How far (pixels) an outline may move from one slice to the next. Three pixels let a
# liver follow its own outline through the IRCAD volume (0.57 mm pixels, 1.6 mm slices)
# while a leak into a neighbour of the same density grows by at most that much per slice;
# benchmarks/propagate.py measures it on ct3slice-dev.
BAND = 3
# The walk stops where a slice's mask overlaps the previous one less than this (IoU), or
# where its mean intensity moves from the start mask's by more than this share of the start
# slice's contrast between the object and a ring just outside it: a measure that holds for
# HU, windowed or not, and for any image's range.
MIN_OVERLAP = 0.5
INTENSITY_TOLERANCE = 0.5

# segment_boxes options for each slice: LOOSE_BOXES' two tight-box terms off, evolved from
# the previous mask. Not LOOSE_BOXES itself: here the box is the previous mask + band, so
# the object does reach near its edges, and on ct3slice-dev the box-edge cost of
# LOOSE_BOXES moved no IoU by more than 0.01 while its cut (the CT default) lost a vertebra
# (0.842 -> 0.783 from our own start mask; benchmarks/propagate.py).
SLICE_OPTIONS: dict[str, object] = {"context": 0.0, "alpha": 0.0, "solver": "evolve"}

Segmenter = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def within_band(mask: np.ndarray, previous: np.ndarray, band: int = BAND) -> np.ndarray:
    """``mask`` cut to ``band`` pixels around ``previous``; of the pieces left, the largest
    and those at least ``levelset.MIN_PIECE`` of its size stay (a vertebra's body and arch
    are two pieces on many slices; a leak cut by the band can leave specks)."""
    from boxlevelset.levelset import clean_mask

    held = mask & ndimage.binary_dilation(previous, _disk(band))
    return clean_mask(held, fill_holes=False, largest_component=True)


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
) -> Generator[tuple[int, np.ndarray], np.ndarray | None, None]:
    """Carry ``mask`` (the object on slice ``plane``) to the slices above, then below.

    Yields (slice index, HxW bool mask) for each slice reached: upwards (plane + 1, + 2, ...)
    until a stop, then downwards from plane - 1. Each slice is segmented in the previous
    mask's bounding box grown by ``band``, starting from the previous mask, and the result
    is held within ``band`` pixels of it. A direction stops at the volume's end, after
    ``max_slices`` slices, or at the first slice whose mask is empty, overlaps the previous
    slice's mask less than ``min_overlap`` (IoU), or whose mean intensity moves from the
    start mask's by more than ``intensity_tolerance`` x the start slice's contrast between
    the object and a ring just outside it (a jump into another structure).

    A caller that keeps another mask for a yielded slice (a hand correction) sends it:
    ``walk.send(mask)`` carries on from that mask instead, and returns the next slice.

    Args:
        volume: ZxHxW (or ZxHxWxC) array, or a lazy one (dask, napari layer data): only
            the slices visited are read. CT in Hounsfield units with ``window``.
        plane: index of the slice ``mask`` lies on.
        mask: HxW boolean mask of the object on that slice.
        window: CT (level, width) or preset name, as in ``segment_boxes``.
        band: pixels an outline may move from one slice to the next.
        min_overlap: the walk stops at a slice whose mask overlaps the previous one less
            than this (IoU).
        intensity_tolerance: the walk stops at a slice whose mean intensity moves from the
            start mask's by more than this share of the start slice's object-to-ring
            contrast.
        max_slices: at most this many slices each way (None: to the volume's ends).
        segment: (slice index, box [4], previous slice's mask) -> HxW mask; default:
            ``segment_boxes`` on that slice with ``SLICE_OPTIONS``, started from the
            previous mask (a model can be plugged in here).

    A slice with NaN/inf pixels around the object (no data) ends that direction of the walk
    with a warning.

    Raises:
        ValueError: an empty mask, a mask or slice that does not fit the volume, a negative
            band, or a mask of the wrong shape from the segmenter or sent back.
    """
    from boxlevelset.levelset import segment_boxes

    volume = volume if hasattr(volume, "shape") else np.asarray(volume)  # dask stays lazy
    start = np.asarray(mask, dtype=bool)
    plane, band = operator.index(plane), operator.index(band)
    if volume.ndim not in (3, 4) or tuple(volume.shape[1:3]) != start.shape:
        raise ValueError(f"volume of shape {volume.shape} does not hold masks of shape "
                         f"{start.shape} (expected ZxHxW or ZxHxWxC)")
    if not 0 <= plane < volume.shape[0]:
        raise ValueError(f"slice {plane} is outside the volume's {volume.shape[0]} slices")
    if band < 0:
        raise ValueError(f"band must be >= 0 pixels, got {band}")
    if not start.any():
        raise ValueError("the mask to propagate is empty")

    def intensity(pixels: np.ndarray, where: np.ndarray) -> float:
        """Mean over ``where`` (channels averaged), windowed for CT; NaN pixels left out."""
        values = np.asarray(pixels[where], dtype=np.float64)
        if window is not None:
            values = apply_window(values, window)
        return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan

    first = np.asarray(volume[plane])
    level = intensity(first, start)
    ring = ndimage.binary_dilation(start, _disk(band + 2)) & ~ndimage.binary_dilation(start)
    if not np.isfinite(level):
        raise ValueError(f"slice {plane}: the mask to propagate covers no finite pixels")
    # A mask filling its slice has no ring: its own slice's spread stands in for contrast.
    outside = intensity(first, ring) if ring.any() else np.nan
    contrast = abs(level - outside) if np.isfinite(outside) else float(np.nanstd(first))
    tolerance = intensity_tolerance * contrast

    for step in (1, -1):
        previous, z = start, plane + step
        while 0 <= z < volume.shape[0] and (max_slices is None or abs(z - plane) <= max_slices):
            pixels = np.asarray(volume[z])
            box = bounding_box(previous, band)
            if segment is not None:
                found = np.asarray(segment(z, box, previous))
            elif not np.isfinite(pixels[int(box[1]):int(box[3]), int(box[0]):int(box[2])]).all():
                # No data where the object would be (padding of a registered volume): this
                # direction ends here; the other one is still walked.
                warnings.warn(f"propagation stops before slice {z}: NaN or inf pixels "
                              "around the object there", stacklevel=2)
                break
            else:
                found = segment_boxes(pixels, box[None], window=window,
                                      init_masks=[previous], **SLICE_OPTIONS)[0]
            if found.shape != start.shape:
                raise ValueError(f"slice {z}: the segmenter gave a mask of shape "
                                 f"{found.shape}, not {start.shape}")
            new = within_band(found.astype(bool), previous, band)
            if (not new.any() or mask_iou(new, previous) < min_overlap
                    or not abs(intensity(pixels, new) - level) <= tolerance):
                break
            kept = yield z, new
            if kept is not None and np.shape(kept) != start.shape:
                raise ValueError(f"the mask sent for slice {z} has shape {np.shape(kept)}, "
                                 f"not {start.shape}")
            previous = new if kept is None else np.asarray(kept, dtype=bool)
            if not previous.any():  # the caller emptied this slice: nothing to carry on
                break
            z += step
