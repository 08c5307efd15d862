"""Shared pytest fixtures: tiny synthetic data written on the fly (no network, no big files)."""

from __future__ import annotations

# torch's optimizers import torch._dynamo, and with it triton where a CUDA build of torch
# brought it; triton's LLVM crashes the process when it loads after Mesa's OpenGL (which
# the plugin tests' viewers load under Xvfb). Loading it first lets the in-thread
# fine-tuning test run in any test order (FineTuneWidget itself trains in a spawned process
# in that case).
import torch._dynamo  # noqa: F401, E402

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

TINY_CATEGORIES = [{"id": 1, "name": "blob"}, {"id": 2, "name": "block"}]


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from threads; on a shared 2-core box they spin and crawl.
    Modules of training tests use it with pytest.mark.usefixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_scene(seed: int, size: int = 64) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """One dark RGB image with 2-3 bright, non-overlapping ellipses (cat 1) / rectangles (cat 2)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 30, size=(size, size, 3), dtype=np.uint8)
    masks, cats = [], []
    # Fixed quadrant centres keep objects apart so every mask is a single clean component.
    centres = [(16, 16), (47, 18), (20, 46), (46, 46)]
    shift = rng.integers(-3, 4, size=2)  # vary positions between images
    for k, (cx, cy) in enumerate(centres[: 2 + seed % 2]):
        cx, cy = int(cx + shift[0]), int(cy + shift[1])
        m = np.zeros((size, size), np.uint8)
        if k % 2 == 0:
            cv2.ellipse(m, (cx, cy), (9, 6 + k), 20 * k, 0, 360, 1, -1)
            cats.append(1)
        else:
            cv2.rectangle(m, (cx - 8, cy - 6), (cx + 7, cy + 5), 1, -1)
            cats.append(2)
        colour = rng.integers(170, 255, size=3)
        image[m.astype(bool)] = colour
        masks.append(m.astype(bool))
    return image, masks, cats


@pytest.fixture
def tiny_box_folder(tmp_path: Path) -> Path:
    """A COCO box-labeled folder: images/ (3 RGB PNGs, 64x64) + annotations.json.

    Annotations carry bbox (x, y, w, h, tight around the mask), category_id (1 blob / 2 block),
    area and an RLE segmentation (counts as str), so both box training and mask scoring work.
    """
    root = tmp_path / "tiny_boxes"
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(3):
        image, masks, cats = _tiny_scene(i)
        name = f"tiny_{i}.png"
        cv2.imwrite(str(root / "images" / name), image[..., ::-1])  # cv2 writes BGR
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
        for m, c in zip(masks, cats):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            ys, xs = np.nonzero(m)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": c,
                "bbox": [float(xs.min()), float(ys.min()),
                         float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())],
                "area": float(m.sum()),
                "iscrowd": 0,
                "segmentation": rle,
            })
    coco = {"images": images, "annotations": annotations, "categories": TINY_CATEGORIES}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root
