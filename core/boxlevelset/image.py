"""Image normalisation shared by the engine: dtype handling, CT windowing, box checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# CT window presets as (level, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

Window = tuple[float, float] | str | None


def resolve_window(window: Window) -> tuple[float, float] | None:
    """Turn a preset name, a (level, width) pair or the text "level,width" into (level, width)."""
    if window is None:
        return None
    if isinstance(window, str):
        if window.lower() in WINDOW_PRESETS:
            return WINDOW_PRESETS[window.lower()]
        try:  # "level,width" as a command line gives it
            parts = tuple(float(v) for v in window.split(","))
            if len(parts) != 2:
                raise ValueError
            window = parts
        except ValueError:
            raise ValueError(
                f"unknown window preset {window!r}; choose one of {sorted(WINDOW_PRESETS)} "
                "or give level,width (e.g. 40,400)"
            ) from None
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be (level, width) or a preset name, got {window!r}") \
            from None
    if not (np.isfinite(level) and np.isfinite(width)):
        raise ValueError(f"window level and width must be finite numbers, got {window!r}")
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level, width


def as_rgb(image: np.ndarray, window: Window = None) -> np.ndarray:
    """HxWx3 float32 RGB in [0, 1] from any image ``as_float_image`` takes: grey repeated,
    two channels (microscopy) as red and green with an empty blue. ValueError for more
    than three channels after RGBA's alpha is dropped: which three to show is the user's
    choice."""
    arr = as_float_image(image, window)
    if arr.shape[2] > 3:
        raise ValueError(f"expected a grey, two-channel or RGB(A) image; got {arr.shape[2]} "
                         f"channels (shape {np.shape(image)}): pick up to 3 channels first")
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 2:
        return np.concatenate([arr, np.zeros_like(arr[..., :1])], axis=2)
    return arr


def apply_window(image: np.ndarray, window: Window) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through a (level, width) window or a preset name."""
    resolved = resolve_window(window)
    if resolved is None:
        raise ValueError("apply_window needs a window")
    level, width = resolved
    lo = level - width / 2.0
    return np.clip((np.asarray(image, dtype=np.float32) - lo) / width, 0.0, 1.0)


def check_image_shape(image: np.ndarray) -> None:
    """ValueError unless ``image`` is HxW or HxWxC (channels last) with pixels."""
    shape = np.shape(image)
    if len(shape) == 3 and shape[2] not in (1, 2, 3, 4) and shape[0] in (1, 3, 4):
        raise ValueError(f"image must be HxW or HxWxC (channels last), got shape {shape}")
    if len(shape) not in (2, 3) or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"image must be HxW or HxWxC, got shape {shape}")


def as_float_image(image: np.ndarray, window: Window = None,
                   allow_nonfinite: bool = False,
                   region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Return an HxWxC float32 image in [0, 1].

    uint8 is divided by 255; other integer types are stretched to the image's own range
    (microscopy rarely fills 16 bits), floats too unless already in [0, 1]. With a
    window, values are treated as Hounsfield units and windowed first. Raises ValueError
    for wrong dimensions, and for non-finite values unless ``allow_nonfinite`` (they are
    then NaN in the result and left out of the scaling).

    ``region`` (x0, y0, x1, y1), in pixels: only those pixels are converted, scaled as in
    the whole image (the same values as that crop of the whole result), so that a few
    boxes on a 12-megapixel photo do not pay for converting all of it.
    """
    arr = np.asarray(image)
    check_image_shape(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"image must be numeric, got dtype {arr.dtype}")
    has_values = True
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        if not allow_nonfinite:
            raise ValueError("image contains NaN or inf values")
        finite = np.isfinite(arr)
        has_values = bool(finite.any())
        arr = np.where(finite, arr, np.nan)  # inf too: it has no place on a scale
    if arr.ndim == 3 and arr.shape[2] == 4:  # drop alpha
        arr = arr[..., :3]
    part = arr if region is None else arr[region[1]:region[3], region[0]:region[2]]
    resolved = resolve_window(window)
    if resolved is not None:
        out = apply_window(part, resolved)
    elif arr.dtype == np.uint8:
        out = part.astype(np.float32) / 255.0
    else:
        out = part.astype(np.float32)
        # The range of the whole image, in float32 as ``out`` holds it (rounding keeps order).
        lo = float(np.float32(np.nanmin(arr))) if has_values else 0.0
        hi = float(np.float32(np.nanmax(arr))) if has_values else 0.0
        if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
            pass
        elif hi > lo:
            out = (out - lo) / (hi - lo)
        else:
            out = np.zeros_like(out)
    if out.ndim == 2:
        out = out[..., None]
    return np.ascontiguousarray(out, dtype=np.float32)


def as_boxes(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Validate boxes as an Nx4 float array of (x0, y0, x1, y1); empty input gives 0x4."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be an Nx4 array of (x0, y0, x1, y1), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("boxes contain NaN or inf values")
    return arr


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip (x0, y0, x1, y1) boxes to the image and raise ValueError on any of zero area."""
    arr = as_boxes(boxes).copy()
    arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, width)
    arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, height)
    bad = np.flatnonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))
    if bad.size:
        given = as_boxes(boxes)[bad[0]]
        # A far corner before the near one is most often a box given as (x, y, width, height).
        hint = (" (its x1 or y1 is below x0 or y0: boxes are corners (x0, y0, x1, y1), not "
                "(x, y, width, height))" if given[2] < given[0] or given[3] < given[1] else "")
        raise ValueError(
            f"box {int(bad[0])} {given.tolist()} has zero area inside the "
            f"{width}x{height} image ({bad.size} such boxes){hint}"
        )
    return arr


def pixel_bounds(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel ranges (c0, r0, c1, r1) [N, 4] int of xyxy boxes: columns floor(x0) ..
    ceil(x1) - 1 and rows floor(y0) .. ceil(y1) - 1 (inclusive rounding), clipped."""
    arr = as_boxes(boxes)
    low = np.floor(arr[:, :2]).clip(min=0)
    # At least `low`: a box wholly left of or above the image must give an empty range (a
    # negative end would slice from the far side as a Python index).
    high = np.maximum(np.minimum(np.ceil(arr[:, 2:]), [width, height]), low)
    return np.concatenate([low, high], 1).astype(np.int64)


def bounding_box(mask: np.ndarray, margin: int = 0) -> np.ndarray:
    """(x0, y0, x1, y1) of a non-empty HxW mask's pixels (float64), grown by ``margin`` and
    clipped to the mask's extent."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("bounding box of an empty mask")
    height, width = np.shape(mask)
    return np.array([max(xs.min() - margin, 0), max(ys.min() - margin, 0),
                     min(xs.max() + 1 + margin, width), min(ys.max() + 1 + margin, height)],
                    dtype=np.float64)


def axis_contrast(crop: np.ndarray, edge: float) -> tuple[np.ndarray, np.ndarray, float]:
    """|dI|^2 across each right link [H, W-1] and lower link [H-1, W] of a crop, and the
    scale edge / (2 mean |dI|^2) over those links (GrabCut's pairwise normalisation)."""
    dx = ((crop[:, 1:] - crop[:, :-1]) ** 2).sum(-1).astype(np.float64)
    dy = ((crop[1:] - crop[:-1]) ** 2).sum(-1).astype(np.float64)
    mean = (dx.sum() + dy.sum()) / max(1, dx.size + dy.size)
    return dx, dy, edge / (2.0 * mean + 1e-12)
