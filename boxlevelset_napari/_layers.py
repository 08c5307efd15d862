"""Layer conventions shared by the reader, the sample data, the widgets and the exports.

A boxes layer is a napari Shapes layer of rectangles whose features hold, per box, its
`category` (a class name) and its `box_id` (the label id of its mask). Image, boxes and
labels layers that belong together share the same `scale`, so shape vertices are in image
pixel coordinates. Plugin facts about an image (CT volume geometry, source file names of a
stacked folder) live under `layer.metadata["boxlevelset"]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

META_KEY = "boxlevelset"
DEFAULT_CATEGORY = "object"


def companion_name(image_name: str, kind: str) -> str:
    """The name of an image's boxes or masks layer (``kind`` "boxes" or "masks"): the
    reader, the samples and the widgets all name them '<image> boxes' and '<image> masks',
    and the widgets tell by that name which image a layer belongs to."""
    return f"{image_name} {kind}"


def companion_layer(layers: Any, image_name: str, kind: str, layer_type: type) -> Any:
    """The image's boxes or masks layer among ``layers`` (a napari layer list), if there
    is one of ``layer_type``, else None."""
    name = companion_name(image_name, kind)
    return layers[name] if name in layers and isinstance(layers[name], layer_type) else None


def plugin_meta(layer: Any) -> dict:
    """The plugin's metadata dict of a layer (empty when it has none)."""
    meta = getattr(layer, "metadata", None) or {}
    return meta.get(META_KEY, {}) or {}


def window_contrast(window: tuple[float, float]) -> tuple[float, float]:
    """(level, width) -> contrast limits (low, high)."""
    level, width = window
    return level - width / 2.0, level + width / 2.0


def contrast_window(limits: tuple[float, float]) -> tuple[float, float]:
    """Contrast limits (low, high) -> (level, width) window."""
    lo, hi = float(limits[0]), float(limits[1])
    return (lo + hi) / 2.0, max(hi - lo, 1e-6)


def boxes_to_rectangles(boxes: np.ndarray, plane: int | None = None) -> list[np.ndarray]:
    """(x0, y0, x1, y1) boxes -> napari rectangles (4 vertices, (row, col) or (plane, row, col))."""
    rects = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=np.float64)
        if plane is not None:
            rect = np.concatenate([np.full((4, 1), float(plane)), rect], axis=1)
        rects.append(rect)
    return rects


def rectangle_to_box(vertices: np.ndarray) -> tuple[int | None, np.ndarray]:
    """napari rectangle vertices -> (plane or None, (x0, y0, x1, y1)).

    Vertices are (row, col) or (plane, row, col); rotated rectangles are replaced by their
    axis-aligned bounding box (min/max over the four corners).
    """
    v = np.asarray(vertices, dtype=np.float64)
    plane = None
    if v.shape[1] >= 3:
        plane = int(round(float(v[0, -3])))
    rows, cols = v[:, -2], v[:, -1]
    return plane, np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)


def rectangles_to_boxes(rectangles: Sequence[np.ndarray]) -> list[tuple[int | None, np.ndarray]]:
    """``rectangle_to_box`` of each rectangle, over all of them at once when they have the
    same shape (the boxes layer of a nuclei tile holds thousands: one by one, they cost
    11 ms per box drawn at 960)."""
    if not rectangles:
        return []
    try:
        v = np.stack([np.asarray(r, dtype=np.float64) for r in rectangles])
    except ValueError:  # vertex arrays of different shapes
        return [rectangle_to_box(r) for r in rectangles]
    rows, cols = v[..., -2], v[..., -1]
    boxes = np.stack([cols.min(1), rows.min(1), cols.max(1), rows.max(1)], 1)
    planes = ([int(round(float(z))) for z in v[:, 0, -3]] if v.shape[2] >= 3
              else [None] * len(v))
    return list(zip(planes, boxes))


def box_features(categories: list[str], box_ids: list[int]) -> pd.DataFrame:
    """Features table for a boxes layer."""
    return pd.DataFrame({
        "category": pd.Series(list(categories), dtype=object),
        "box_id": pd.Series(list(box_ids), dtype=np.int64),
    })


def boxes_layer_kwargs(
    categories: list[str] | None = None,
    box_ids: list[int] | None = None,
    *,
    default_category: str = DEFAULT_CATEGORY,
    scale: Any = None,
    name: str = "boxes",
    class_names: list[str] | None = None,
) -> dict:
    """Keyword arguments for a boxes Shapes layer (used by the reader and the widget)."""
    categories = list(categories or [])
    box_ids = list(box_ids or [])
    kwargs = dict(
        name=name,
        shape_type="rectangle",
        edge_color="#ffd000",
        edge_width=1.5,
        face_color="transparent",
        features=box_features(categories, box_ids),
        feature_defaults={"category": default_category, "box_id": -1},
        metadata={META_KEY: {"class_names": list(class_names or [default_category])}},
    )
    if scale is not None:
        kwargs["scale"] = scale
    return kwargs
