"""Fine-tuning on a folder Save annotations wrote for a z-stack (one multi-page TIFF, an
entry per annotated plane): training reads each entry's plane."""

from __future__ import annotations

import numpy as np
import pytest

from boxlevelset.data import BoxFolder, save_box_folder
from boxlevelset.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = dict(
    fpn_channels=16, head_channels=16, stacked_convs=1, mask_feature_channels=16,
    mask_feature_mid_channels=16, num_grids=(12, 10, 8, 6, 4), feature_guide_channels=3,
    tree_filter_max_side=32, score_threshold=0.01,
)


def test_training_reads_the_planes_of_a_saved_stack(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 300, (5, 64, 64)).astype(np.uint16)  # 16-bit microscopy
    stack[:, 20:40, 16:44] = 3000
    box = np.array([[16.0, 20.0, 44.0, 40.0]])
    items = [("cells.tif", stack, box, [1], None, z) for z in (1, 3)]
    folder = save_box_folder(tmp_path / "saved", items, [{"id": 1, "name": "cell"}])
    config = TrainConfig(data=folder, preset="lite", output_dir=tmp_path / "run",
                         max_iterations=2, batch_size=2, min_size=(64,), max_size=96,
                         pretrained=False, checkpoint_every=100, warmup_iters=1,
                         model=dict(TINY_MODEL))
    seen = []
    load_image = BoxFolder.load_image

    def spy(self, record):
        image = load_image(self, record)
        seen.append((record.plane, image))
        return image

    monkeypatch.setattr(BoxFolder, "load_image", spy)
    events = []
    checkpoint = train(config, callbacks=[events.append])
    assert checkpoint.exists() and events[-1].done
    assert all(np.isfinite(v) for e in events for v in e.losses.values())
    assert seen and {plane for plane, _ in seen} == {1, 3}
    for plane, image in seen:  # the plane itself: 16-bit, not windowed
        assert np.array_equal(image, stack[plane])


def test_segment_names_the_outputs_of_a_stack_by_plane(tmp_path):
    """`boxlevelset segment` on a saved stack folder had named its label images cells,
    cells_tif, cells_tif_2: now each says its plane, as CT slices say their z."""
    from boxlevelset.cli import main

    stack = np.zeros((5, 48, 48), np.uint8)
    stack[:, 12:30, 10:34] = 200
    box = np.array([[10.0, 12.0, 34.0, 30.0]])
    items = [("cells.tif", stack, box, [1], None, z) for z in (1, 3)]
    folder = save_box_folder(tmp_path / "saved", items, [{"id": 1, "name": "cell"}])
    assert main(["segment", str(folder), "--out", str(tmp_path / "out"),
                 "--iterations", "5"]) == 0
    names = sorted(p.name for p in (tmp_path / "out" / "labels").iterdir())
    assert names == ["cells_p0001.png", "cells_p0003.png"]
