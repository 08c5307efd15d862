"""Tiled prediction: tile layout, merging instances found by two tiles, the model's path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from boxlevelset.export import BoxMasks
from boxlevelset.model import Instances
from boxlevelset.tiles import merge_instances, predict_tiled, tile_starts, tile_windows


@pytest.mark.parametrize("length,tile,overlap", [(100, 100, 10), (101, 100, 10), (1000, 256, 64),
                                                  (2048, 512, 0), (700, 300, 299), (33, 64, 8)])
def test_tiles_cover_the_axis_and_overlap_at_least_as_asked(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(length, starts[-1] + tile) == length  # the last tile ends at the end
    shared = [a + tile - b for a, b in zip(starts, starts[1:])]
    assert all(s >= overlap for s in shared), shared
    # No tile more than needed: one fewer could not keep the overlap.
    if len(starts) > 1:
        assert (len(starts) - 2) * (tile - overlap) + tile < length


def test_tile_windows_and_bad_settings():
    windows = tile_windows(300, 500, 256, 64)
    assert windows[0] == (0, 0, 256, 256) and windows[-1] == (244, 44, 500, 300)
    assert len(windows) == 2 * 3
    covered = np.zeros((300, 500), bool)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for tile, overlap, match in [(16, 0, "tile"), (100.5, 0, "tile"), (64, 64, "overlap"),
                                 (64, -1, "overlap")]:
        with pytest.raises(ValueError, match=match):
            tile_windows(100, 100, tile, overlap)


class ComponentModel:
    """A stand-in for SOLOv2.predict: every 8-connected bright blob of the image it gets
    is an instance (score: its mean brightness), so tiling's geometry is checked exactly."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def predict(self, image, score_threshold=None, cropped=False) -> Instances:
        grey = np.asarray(image, np.float32).reshape(image.shape[0], image.shape[1], -1)[..., 0]
        self.calls.append(grey.shape)
        labels, n = ndimage.label(grey > 0.5, structure=np.ones((3, 3)))
        masks = BoxMasks.from_labels(labels, range(1, n + 1))
        scores = np.array([grey[labels == i].mean() for i in range(1, n + 1)], np.float32)
        return Instances(masks, masks.bounds.astype(np.float32), np.zeros(n, np.int64), scores)


def blob_image(height: int, width: int, radius: int, seed: int = 0) -> np.ndarray:
    """uint8 image of non-touching discs of radius up to ``radius``, one every 3 radii."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    step = 3 * radius
    for cy in range(radius, height, step):
        for cx in range(radius, width, step):
            r = rng.uniform(0.4, 1.0) * radius
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(150, 255)
    return image


def test_tiled_instances_are_the_whole_image_ones_when_tiles_overlap_more_than_objects():
    image = blob_image(301, 257, radius=9)
    whole = ComponentModel().predict(image / 255.0)
    fake = ComponentModel()
    done = []
    tiled = predict_tiled(fake, image, tile=64, overlap=24,
                          progress=lambda k, n: done.append((k, n)))
    # Discs cut by every tile side were found in pieces and merged away: each disc once.
    assert len(fake.calls) == len(tile_windows(301, 257, 64, 24)) > 20
    assert done[-1] == (len(fake.calls), len(fake.calls))
    assert len(tiled) == len(whole) > 50
    assert isinstance(tiled.masks, BoxMasks) and tiled.masks.size == (301, 257)
    got = {tuple(b): m.tobytes() for b, m in zip(tiled.masks.bounds.tolist(), tiled.masks.crops)}
    want = {tuple(b): m.tobytes() for b, m in zip(whole.masks.bounds.tolist(), whole.masks.crops)}
    assert got == want
    assert np.all(np.diff(tiled.scores) <= 0)
    np.testing.assert_array_equal(tiled.boxes, tiled.masks.bounds.astype(np.float32))


def test_an_image_within_one_tile_is_predicted_whole():
    image = blob_image(60, 50, radius=6)
    fake = ComponentModel()
    tiled = predict_tiled(fake, image, tile=64)
    whole = ComponentModel().predict(image / 255.0)
    assert fake.calls == [(60, 50)]
    assert [m.tobytes() for m in tiled.masks.crops] == [
        whole.masks.crops[i].tobytes() for i in np.argsort(-whole.scores, kind="stable")]


def test_merge_prefers_whole_masks_and_keeps_other_classes():
    size = (40, 40)
    full = np.zeros(size, bool)
    full[10:30, 10:30] = True
    piece = np.zeros(size, bool)
    piece[10:30, 10:16] = True  # the left part, cut by a tile side, with a higher score
    other = full.copy()
    stack = [piece, full, full, other]
    masks = BoxMasks.from_masks(np.stack(stack), size)
    labels = np.array([0, 0, 0, 1])
    scores = np.array([0.9, 0.5, 0.4, 0.3])
    cut = np.array([True, False, False, False])
    keep = merge_instances(masks, labels, scores, cut)
    # The whole mask wins over the higher-scoring piece and over its lower-scoring twin;
    # the same pixels as another class stay.
    assert sorted(keep.tolist()) == [1, 3]
    # A whole (uncut) small mask inside a large one is another object: kept.
    keep = merge_instances(masks, labels, scores, np.zeros(4, bool))
    assert sorted(keep.tolist()) == [0, 1, 3]
    # What one tile found together stays: its Matrix NMS has weighed it.
    keep = merge_instances(masks, labels, scores, cut, source=np.zeros(4, int))
    assert sorted(keep.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="iou_threshold"):
        predict_tiled(ComponentModel(), full.astype(np.uint8), tile=32, iou_threshold=2.0)


def test_every_tile_shares_the_whole_image_intensity_scale():
    """A uint16 image is stretched to its own range once, not per tile: faint blobs stay
    faint in a tile that holds nothing brighter (a per-tile stretch would find them)."""
    from boxlevelset.image import as_rgb

    blobs = blob_image(150, 170, radius=8) > 0
    image = np.zeros((150, 170), np.uint16)
    image[:, :85][blobs[:, :85]] = 1000  # faint on the left
    image[:, 85:][blobs[:, 85:]] = 40000
    tiled = predict_tiled(ComponentModel(), image, tile=64, overlap=24)
    whole = ComponentModel().predict(as_rgb(image))
    assert len(tiled) == len(whole) > 0
    assert tiled.masks.bounds[:, 0].min() >= 80  # only the bright right half
    assert sorted(map(tuple, tiled.masks.bounds.tolist())) == sorted(
        map(tuple, whole.masks.bounds.tolist()))
