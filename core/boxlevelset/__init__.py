"""boxlevelset: box-supervised instance segmentation with level-set evolution.

Public API (everything else -- plugin, command line, benchmarks -- goes through it):

    segment_boxes(image, boxes, model=None, **options) -> list of HxW bool masks
        (cropped=True: a BoxMasks, each mask over its box)
    propagate_mask(volume, plane, mask, **options) -> (slice, mask) through a volume
    load_model(path_or_name, device=None) -> model ready for inference
    model.predict(image) -> instances (masks, boxes, labels, scores)
        (tile=N: a large image in overlapping N px tiles, ``predict_tiled``)
    train(config, callbacks=...) -> path of the final checkpoint
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Lazy attributes keep `import boxlevelset` cheap (the plugin imports it at napari start-up).
_LAZY = {
    "segment_boxes": "boxlevelset.levelset",
    "BoxMasks": "boxlevelset.export",
    "propagate_mask": "boxlevelset.propagate",
    "load_model": "boxlevelset.model",
    "SOLOv2": "boxlevelset.model",
    "Predictor": "boxlevelset.model",
    "predict_tiled": "boxlevelset.tiles",
    "train": "boxlevelset.train",
    "TrainConfig": "boxlevelset.train",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'boxlevelset' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy API shows in dir() and tab completion
    return sorted(set(globals()) | set(_LAZY))
