"""napari plugin for boxlevelset: draw boxes, get instance masks, correct, export, fine-tune.

The plugin only goes through the engine's public API (`boxlevelset`); the engine never imports
Qt or napari. Widgets, reader, writer and sample data are declared in `napari.yaml` (npe2).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
