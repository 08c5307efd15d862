"""Sample data: a DSB2018 nuclei image and a CT slice, each with boxes (licences in samples/)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import numpy as np

from ._layers import (
    DEFAULT_CATEGORY,
    META_KEY,
    boxes_layer_kwargs,
    boxes_to_rectangles,
    companion_name,
)
from ._reader import ct_layer_data


def _samples() -> Path:
    return Path(str(files("boxlevelset") / "samples"))


def make_sample_nuclei() -> list[tuple]:
    """Nuclei (DSB2018 stage 1, CC0) with 28 boxes on a boxes layer, ready to segment."""
    from boxlevelset.data import read_image

    root = _samples()
    image = read_image(root / "nuclei.png")
    boxes = np.asarray(json.loads((root / "nuclei_boxes.json").read_text())["boxes_xyxy"])
    rgb = image.ndim == 3 and image.shape[2] in (3, 4)
    meta = {META_KEY: {"kind": "image", "file_names": ["nuclei.png"]}}
    kwargs = boxes_layer_kwargs(["nucleus"] * len(boxes), list(range(1, len(boxes) + 1)),
                                default_category="nucleus", name=companion_name("nuclei", "boxes"),
                                class_names=["nucleus"])
    return [
        (image, {"name": "nuclei", "rgb": rgb, "metadata": meta}, "image"),
        (boxes_to_rectangles(boxes), kwargs, "shapes"),
    ]


def make_sample_ct() -> list[tuple]:
    """One axial CT slice (dcmqi test data, BSD-3) in HU with liver and spine boxes."""
    from boxlevelset.data import read_volume

    root = _samples()
    volume = read_volume(root / "ct_slice.nii.gz")
    info = json.loads((root / "ct_slice_boxes.json").read_text())
    boxes = np.asarray(info["boxes_xyxy"])
    cats = list(info.get("categories", [DEFAULT_CATEGORY] * len(boxes)))
    image = ct_layer_data(volume, "ct_slice")
    ndim = np.asarray(volume.array).ndim
    plane = 0 if ndim == 3 else None
    kwargs = boxes_layer_kwargs(cats, list(range(1, len(boxes) + 1)), default_category=cats[0],
                                name=companion_name("ct_slice", "boxes"), scale=image[1]["scale"],
                                class_names=sorted(set(cats), key=cats.index))
    kwargs["ndim"] = ndim
    return [image, (boxes_to_rectangles(boxes, plane=plane), kwargs, "shapes")]
