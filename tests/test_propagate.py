"""boxlevelset.propagate: a mask carried through the slices of a synthetic volume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from boxlevelset.evaluate import mask_iou
from boxlevelset.propagate import BAND, bounding_box, propagate_mask, within_band


def _cone_volume(depth: int = 9, size: int = 96, shrink: int = 3, seed: int = 0):
    """A bright disc shrinking by ``shrink`` px per slice from slice 0, among blobs of
    intermediate grey: [Z, H, W] volume and the true discs."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:depth, :size, :size]
    radius = np.maximum(30 - shrink * zz, 0)
    discs = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius**2
    blobs = np.zeros((size, size))
    gy, gx = np.mgrid[:size, :size]
    for cy, cx in rng.integers(0, size, (30, 2)):
        blobs += np.exp(-((gy - cy) ** 2 + (gx - cx) ** 2) / 50.0)
    volume = np.where(discs, 150.0, 40.0 + 60.0 * np.clip(blobs, 0, 1)[None])
    return volume + rng.normal(0, 10, volume.shape), discs


def _double_cone_volume():
    """_cone_volume mirrored about slice 8, where the disc is largest: 17 slices."""
    volume, discs = _cone_volume(depth=9, shrink=2)
    return np.concatenate([volume[::-1], volume[1:]]), np.concatenate([discs[::-1], discs[1:]])


def test_a_shrinking_object_is_followed_and_each_outline_moves_at_most_band():
    volume, discs = _cone_volume()
    got = dict(propagate_mask(volume, 0, discs[0]))
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7]  # only upwards: nothing below slice 0
    for z in range(1, 8):
        assert mask_iou(got[z], discs[z]) > 0.9, z
    # Slice 8 (a radius of 6 among the blobs) is where the walk ends.
    previous = discs[0]
    for z in sorted(got):
        assert ndimage.distance_transform_edt(~previous)[got[z]].max() <= BAND
        previous = got[z]


def test_the_tight_box_energy_on_the_same_walk_fills_its_loose_boxes():
    """Why propagation turns the tight-box terms off: the box a mask gives on the next
    slice is loose, and the default energy (box projection, ring) stretches the mask to its
    edges."""
    from boxlevelset import segment_boxes

    volume, discs = _cone_volume()
    previous, ious = discs[0], []
    for z in range(1, 8):
        previous = segment_boxes(volume[z], bounding_box(previous, 2)[None])[0]
        ious.append(mask_iou(previous, discs[z]))
    got = dict(propagate_mask(volume, 0, discs[0]))
    assert ious[5] < 0.85 < mask_iou(got[6], discs[6])


def test_both_directions_from_the_middle_and_max_slices():
    volume, discs = _double_cone_volume()
    got = list(propagate_mask(volume, 8, discs[8], max_slices=3))
    assert [z for z, _ in got] == [9, 10, 11, 7, 6, 5]
    assert all(mask_iou(m, discs[z]) > 0.95 for z, m in got)


def test_stops_where_the_intensity_jumps():
    volume, discs = _cone_volume(shrink=1)
    volume[4:][discs[4:]] += 300.0  # another structure from slice 4 on
    got = dict(propagate_mask(volume, 0, discs[0]))
    assert sorted(got) == [1, 2, 3]


def test_a_custom_segmenter_gets_the_grown_box_and_its_mask_is_held_to_the_band():
    volume = np.zeros((3, 40, 40))
    start = np.zeros((40, 40), bool)
    start[15:25, 10:20] = True
    seen = []

    def everything(z, box, previous):
        seen.append((z, tuple(box), int(previous.sum())))
        return np.full((40, 40), 255, np.uint8)  # a 0/255 mask counts as a mask

    got = dict(propagate_mask(volume, 1, start, segment=everything, min_overlap=0.0,
                              intensity_tolerance=1.0, band=2))
    assert seen[0] == (2, (8.0, 13.0, 22.0, 27.0), 100)
    np.testing.assert_array_equal(got[2], ndimage.binary_dilation(start, np.array(
        [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]],
        bool)))
    assert sorted(got) == [0, 2]


def test_objects_a_few_pixels_across_are_carried():
    """From an ellipse inscribed in the grown box the level set lost objects under ten
    pixels across; started from the previous mask it keeps them."""
    rng = np.random.default_rng(0)
    for side in (2, 4, 8):
        volume = rng.integers(0, 30, (6, 40, 48)).astype(np.uint8)
        volume[1:5, 10 : 10 + side, 12 : 12 + side] = 200
        truth = np.zeros((40, 48), bool)
        truth[10 : 10 + side, 12 : 12 + side] = True
        got = dict(propagate_mask(volume, 2, truth))
        assert sorted(got) == [1, 3, 4], side
        assert all(np.array_equal(m, truth) for m in got.values()), side


def test_hounsfield_units_without_a_window_still_stop_at_another_structure():
    """The tolerance is a share of the object's contrast to its surroundings: with raw HU
    (range -1024..1023) a share of the slice's range had let a 300 HU jump through."""
    volume, discs = _cone_volume(shrink=1)
    volume = volume - 60.0  # object ~90 HU, surroundings ~-20..40 HU
    volume[:, 0, 0], volume[:, -1, -1] = -1024.0, 1023.0
    volume[4:][discs[4:]] += 300.0
    assert sorted(dict(propagate_mask(volume, 0, discs[0]))) == [1, 2, 3]
    assert sorted(dict(propagate_mask(volume, 0, discs[0], window=(40, 400)))) == [1, 2, 3]


def test_nan_pixels_inside_the_start_mask_do_not_disable_the_stop():
    volume, discs = _cone_volume(shrink=1)
    volume[4:][discs[4:]] += 300.0
    volume[0, 48, 48] = np.nan
    volume[1:, :5, :5] = np.nan  # no data in a corner, away from the walk
    assert sorted(dict(propagate_mask(volume, 0, discs[0]))) == [1, 2, 3]
    assert sorted(dict(propagate_mask(volume, 0, discs[0], window="abdomen"))) == [1, 2, 3]


def test_a_mask_sent_back_steers_the_next_slice():
    """The plugin sends the mask it kept (a hand correction) and the walk carries that."""
    volume = np.zeros((4, 40, 40))
    start = np.zeros((40, 40), bool)
    start[10:30, 10:30] = True
    volume[:, 10:30, 10:30] = 1.0
    walk = propagate_mask(volume, 0, start, segment=lambda z, box, previous: previous)
    z, mask = next(walk)
    assert z == 1 and np.array_equal(mask, start)
    corrected = start.copy()
    corrected[:, 20:] = False
    z, mask = walk.send(corrected)
    assert z == 2 and np.array_equal(mask, corrected)


def test_within_band_keeps_large_pieces_and_drops_specks():
    previous = np.zeros((30, 30), bool)
    previous[5:25, 5:12] = previous[5:25, 18:25] = True  # two pieces, as body and arch
    mask = previous.copy()
    mask[0, 0] = True  # outside the band
    mask[14, 14] = True  # a speck inside it
    held = within_band(mask, previous, band=2)
    np.testing.assert_array_equal(held, previous)


def test_bad_input_is_named():
    volume = np.zeros((3, 20, 20))
    mask = np.zeros((20, 20), bool)
    with pytest.raises(ValueError, match="empty"):
        next(propagate_mask(volume, 1, mask))
    mask[5:10, 5:10] = True
    with pytest.raises(ValueError, match="outside the volume"):
        next(propagate_mask(volume, 3, mask))
    with pytest.raises(ValueError, match="does not hold masks"):
        next(propagate_mask(volume, 1, mask[:10]))
    with pytest.raises(ValueError, match="empty mask"):
        bounding_box(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="band"):
        next(propagate_mask(volume, 1, mask, band=-1))
    with pytest.raises(ValueError, match="slice 2: the segmenter gave a mask of shape"):
        next(propagate_mask(volume, 1, mask, segment=lambda z, box, prev: mask[:5]))
    walk = propagate_mask(volume, 1, mask, segment=lambda z, box, prev: prev)
    next(walk)
    with pytest.raises(ValueError, match="the mask sent for slice 2 has shape"):
        walk.send(mask[:5])


def test_a_slice_without_data_ends_that_direction_only():
    volume, discs = _double_cone_volume()
    volume[11, :22] = np.nan  # rows of no data on slice 11, inside its box
    with pytest.warns(UserWarning, match="stops before slice 11: NaN"):
        got = dict(propagate_mask(volume, 8, discs[8], max_slices=4))
    assert sorted(got) == [4, 5, 6, 7, 9, 10]
