"""Many boxes on a large image: time and peak memory of the command line's `segment` and of
the plugin's *Segment boxes* press, COCO export, *Save annotations* and reopening.

A synthetic 2048x2048 microscopy image with one bright disc (radius 8-20 px, blurred, on
noise) every 64 px, 961 in all, and a tight box around each: what a biologist's tile of
nuclei looks like to the level set. The command line runs in a child process (its peak
resident memory is the child's); the plugin steps run the Box to mask widget under Xvfb
with *Live* off, each with its peak of numpy and Python allocations (tracemalloc).

    python benchmarks/many_boxes.py [--size 2048] [--skip-plugin]
"""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def nuclei_tile(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image with a disc every 64 px and the discs' boxes (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(30, 8, (size, size))
    boxes = []
    for cy in range(40, size - 40, 64):
        for cx in range(40, size - 40, 64):
            r = int(rng.uniform(8, 20))
            cv2.circle(image, (cx, cy), r, 150, -1)
            boxes.append([cx - r - 1, cy - r - 1, cx + r + 2, cy + r + 2])
    image = cv2.GaussianBlur(image, (0, 0), 1.5).clip(0, 255).astype(np.uint8)
    return image, np.asarray(boxes, np.float64)


def cli_segment(image: np.ndarray, boxes: np.ndarray, folder: Path) -> tuple[float, float]:
    """Wall seconds and peak resident GB of `boxlevelset segment` in a child process."""
    cv2.imwrite(str(folder / "tile.png"), image)
    (folder / "boxes.json").write_text(json.dumps({"tile.png": boxes.tolist()}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "boxlevelset", "segment", str(folder / "tile.png"),
                    "--boxes", str(folder / "boxes.json"), "-o", str(folder / "out")],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # an earlier child peaked higher: the figure would be its
        print("  (peak memory not measurable: an earlier child process peaked higher)")
    return seconds, peak / 1e6  # ru_maxrss is in kB on Linux


def plugin_steps(image: np.ndarray, boxes: np.ndarray, folder: Path) -> list[tuple]:
    """(step, seconds, peak MB of numpy and Python allocations during it (tracemalloc; None
    for the press and the live boxes, timed without it: it slows Python-heavy code; the
    process's peak resident memory is printed after all steps), result) for: one
    *Segment boxes* press over all boxes but 5 (result: labels painted); the last 5 drawn
    one by one in live mode (result: median ms a box); the COCO export; *Save annotations*;
    the saved folder reopened through the plugin's reader (result: labels read back)."""
    import tracemalloc

    import napari

    from boxlevelset_napari._box_to_mask import BoxToMaskWidget
    from boxlevelset_napari._layers import boxes_to_rectangles
    from boxlevelset_napari._reader import napari_get_reader

    viewer = napari.Viewer(show=False)
    viewer.add_image(image, name="tile")
    widget = BoxToMaskWidget(viewer)
    widget.live_check.setChecked(False)
    layer = widget.new_boxes_layer()
    layer.add_rectangles(boxes_to_rectangles(boxes[:-5]))

    def live() -> str:  # five more boxes drawn live among the others: median ms a box
        widget.live_check.setChecked(True)
        times = []
        for box in boxes[-5:]:
            t0 = time.perf_counter()
            layer.add_rectangles(boxes_to_rectangles(box[None]))
            times.append((time.perf_counter() - t0) * 1000)
        return f"{np.median(times):.0f} ms a box"

    def reopen() -> int:
        layers = napari_get_reader(str(folder / "saved"))(str(folder / "saved"))
        labels = next(data for data, _kw, kind in layers if kind == "labels")
        return len(np.unique(labels)) - 1

    def press() -> int:
        widget.segment()
        return len(np.unique(widget.labels_layer(create=False).data)) - 1

    steps = [
        ("Segment boxes", press),
        ("5 boxes drawn live", live),
        ("export COCO", lambda: widget.export("coco", str(folder / "tile.json")) and None),
        ("Save annotations", lambda: widget.export("folder", str(folder / "saved")) and None),
        ("reopen the folder", reopen),
    ]
    rows = []
    for name, step in steps:
        traced = step not in (press, live)
        if traced:
            tracemalloc.start()
        t0 = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 1e6 if traced else None
        tracemalloc.stop()
        rows.append((name, seconds, peak, result))
    widget.close()
    viewer.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--skip-plugin", action="store_true")
    args = parser.parse_args()
    if not args.skip_plugin:
        from boxlevelset_napari._display import ensure_display

        ensure_display()  # re-runs this script under xvfb-run when there is no display
    image, boxes = nuclei_tile(args.size)
    print(f"{len(boxes)} boxes on a {args.size}x{args.size} image, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peak = cli_segment(image, boxes, Path(tmp))
    print(f"boxlevelset segment: {seconds:.1f} s, peak resident {peak:.2f} GB")
    if not args.skip_plugin:
        with tempfile.TemporaryDirectory() as tmp:
            rows = plugin_steps(image, boxes, Path(tmp))
        for name, seconds, peak_mb, result in rows:
            extra = ("" if result is None else f", {result}" if isinstance(result, str)
                     else f", {result} labels")
            memory = "" if peak_mb is None else f", peak allocations {peak_mb:.0f} MB"
            print(f"plugin, {name}: {seconds:.1f} s{memory}{extra}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"plugin process peak resident {peak:.2f} GB (napari included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
