"""npe2 writer: a Labels layer as a label image (PNG/TIFF) or a CT label volume (NIfTI/NRRD/MHA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._layers import META_KEY

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer. Volumes keep the source CT's spacing, origin and direction,
    which the widget stores in the labels layer's metadata; a layer without that geometry
    is written with its layer scale as spacing (a 2D layer as one slice)."""
    from boxlevelset.export import write_label_image

    data = np.asarray(data)
    lower = path.lower()
    if lower.endswith(VOLUME_SUFFIXES):
        from boxlevelset.data import write_label_volume

        volume = ((meta.get("metadata") or {}).get(META_KEY) or {}).get("volume")
        if volume is None:
            scale = meta.get("scale")
            if data.ndim == 2:  # one slice: a volume of depth 1, as SimpleITK writes a 2D image
                data = data[None]
                scale = None if scale is None else (1.0, *scale)
            volume = _geometry_from_scale(data, scale, path)
        return [str(write_label_volume(path, data, like=volume) or path)]
    if data.ndim != 2:
        raise ValueError(f"{path}: a {data.ndim}D labels layer is written as a volume "
                         "(.nii.gz, .nrrd, .mha), not as a 2D label image")
    return [str(write_label_image(path, data))]


def _geometry_from_scale(data: np.ndarray, scale: Any, path: str) -> Any:
    from boxlevelset.data import Volume

    if data.ndim != 3:
        raise ValueError(f"{path}: a label volume needs 3D labels, got shape {data.shape}")
    sz, sy, sx = (float(s) for s in (scale if scale is not None else (1.0, 1.0, 1.0)))
    return Volume(array=data.astype(np.float32), spacing=(sx, sy, sz), origin=(0.0, 0.0, 0.0),
                  direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), path=Path(path))
