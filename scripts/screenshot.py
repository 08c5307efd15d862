"""Open napari with the plugin on a shipped sample, segment its boxes, save a screenshot.

    python scripts/screenshot.py [--sample nuclei|ct] [--out docs/screenshot.png] [--canvas-only]

Without a display it re-runs itself under `xvfb-run` (napari needs an OpenGL context, which
Xvfb + Mesa provide; Qt's offscreen platform does not).
"""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt

import argparse
import time
from pathlib import Path

from boxlevelset_napari._display import ensure_display


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" /
                                             "screenshot.png"))
    parser.add_argument("--canvas-only", action="store_true")
    parser.add_argument("--sample", choices=("nuclei", "ct"), default="nuclei",
                        help="the nuclei image, or the CT slice (segmented with the CT default)")
    args = parser.parse_args()
    ensure_display()

    import napari
    from napari.layers import Layer, Shapes
    from qtpy.QtWidgets import QApplication

    from boxlevelset_napari._box_to_mask import BoxToMaskWidget
    from boxlevelset_napari._sample_data import make_sample_ct, make_sample_nuclei

    viewer = napari.Viewer(title="boxlevelset: boxes to masks")
    viewer.window.resize(1700, 1000)
    sample = make_sample_ct() if args.sample == "ct" else make_sample_nuclei()
    layers = [viewer.add_layer(Layer.create(data, dict(kwargs), kind))
              for data, kwargs, kind in sample]
    boxes = next(layer for layer in layers if isinstance(layer, Shapes))
    widget = BoxToMaskWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Box to mask", area="right")
    t0 = time.perf_counter()
    widget.segment()
    print(f"segmented {len(boxes.data)} boxes in {time.perf_counter() - t0:.2f} s")
    labels = widget.labels_layer(create=False)
    labels.opacity = 0.55
    boxes.edge_width = 1.0
    viewer.layers.selection.active = boxes
    boxes.mode = "add_rectangle"
    for _ in range(20):  # let Qt lay out the window before fitting the view to the canvas
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    try:  # start-up toasts (e.g. napari's PyQt5 deprecation notice) would cover the image
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
    except ImportError:
        pass
    for _ in range(10):
        QApplication.processEvents()
        time.sleep(0.05)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=args.canvas_only, flash=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main()
