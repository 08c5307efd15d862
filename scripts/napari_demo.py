"""Open napari with the Box-to-mask widget on the shipped nuclei sample (boxes included)."""

import torch  # noqa: F401  (import torch before Qt starts: known crash otherwise)
import napari

viewer = napari.Viewer(title="boxlevelset-napari")
viewer.open_sample("boxlevelset-napari", "nuclei")
viewer.window.add_plugin_dock_widget("boxlevelset-napari", "Box to mask")
napari.run()
