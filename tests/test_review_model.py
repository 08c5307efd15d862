"""Review of the trained-model path as a user meets it: load_model, Predictor, segment_boxes
with a model, model.predict (a tiny untrained model: these are behaviours, not quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boxlevelset
from boxlevelset.model import ModelConfig, Predictor, SOLOv2, load_model, save_checkpoint

TINY = dict(
    fpn_channels=16, head_channels=16, stacked_convs=1, mask_feature_channels=16,
    mask_feature_mid_channels=16, feature_guide_channels=3, input_size=96, max_size=128,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> SOLOv2:
    torch.manual_seed(0)
    cfg = ModelConfig.lite(num_classes=2, class_names=("a", "b"), **TINY)
    return SOLOv2(cfg, pretrained=False).eval()


def _image(size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    img[30:60, 20:50] += 150
    return img


def test_load_model_accepts_device_auto(model, tmp_path):
    # `boxlevelset predict/evaluate --device auto` (train and the plugin take "auto") failed
    # with "unknown device 'auto'".
    path = save_checkpoint(tmp_path / "model.pth", model)
    loaded = load_model(path, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected
    assert load_model(path, device="cpu").device.type == "cpu"


def test_load_model_on_run_folder_says_it_is_a_folder(model, tmp_path):
    # A run folder gave "checkpoint 'runs/lite' does not exist" although it exists.
    save_checkpoint(tmp_path / "model.pth", model)
    with pytest.raises(IsADirectoryError, match="is a folder.*model.pth"):
        load_model(tmp_path, device="cpu")


def test_model_rejects_more_than_three_channels_clearly(model):
    # Five-channel microscopy crashed inside torch ("size of tensor a (5) must match ...").
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 5), dtype=np.uint8)
    with pytest.raises(ValueError, match="5 channels"):
        model.predict(img)
    with pytest.raises(ValueError, match="5 channels"):
        boxlevelset.segment_boxes(img, [[5, 5, 30, 30]], model=model)


def test_score_threshold_outside_unit_interval_is_an_error(model):
    # predict(score_threshold=50) (percent?) silently returned no instance at all.
    img = _image()
    with pytest.raises(ValueError, match="score_threshold"):
        model.predict(img, score_threshold=50)
    with pytest.raises(ValueError, match="score_threshold"):
        model.predict(img, score_threshold=-0.1)
    assert len(model.predict(img, score_threshold=1.0)) == 0


def test_segment_boxes_with_a_checkpoint_path_says_load_model():
    # model="runs/lite/model.pth" gave AttributeError: 'str' object has no attribute ...
    img = _image()
    with pytest.raises(TypeError, match="load_model"):
        boxlevelset.segment_boxes(img, [[10, 10, 40, 40]], model="runs/lite/model.pth")


def test_predictor_picks_kernel_from_the_box_part_inside_the_image(model):
    # Predictor.predict_boxes took the kernel of the unclipped box (another level and cell)
    # while training and segment_boxes clip boxes to the image: the same box gave two masks.
    img = _image()
    p = Predictor(model).set_image(img)
    outside = np.array([[-200.0, -200.0, 40.0, 40.0]])
    inside = np.array([[0.0, 0.0, 40.0, 40.0]])
    a = p.box_probabilities(outside)[0]
    b = p.box_probabilities(inside)[0]
    assert a.shape == b.shape == (40, 40)
    np.testing.assert_array_equal(a, b)
    direct = p.predict_boxes(outside)[0]
    via = boxlevelset.segment_boxes(img, outside, model=p)[0]
    np.testing.assert_array_equal(direct, via)
    assert not direct[40:].any() and not direct[:, 40:].any()


def test_predictor_reports_the_size_of_the_image_it_holds(model):
    # Lets a caller that is handed a Predictor check it holds an image of the right size.
    p = Predictor(model)
    assert p.image_size is None
    p.set_image(_image(96))
    assert p.image_size == (96, 96)
    p.set_image(np.zeros((50, 70), np.uint8))
    assert p.image_size == (50, 70) and p.predict_boxes([[0, 0, 10, 10]])[0].shape == (50, 70)
    p.reset_image()
    assert p.image_size is None


@pytest.mark.parametrize("shape", [(96, 96), (50, 70), (300, 200), (33, 257, 3)])
def test_box_probabilities_match_full_size_maps_and_stay_small(model, shape):
    # box_probabilities resized one full-image map per box (16 at a time: 16 x image size of
    # float memory, GBs on a large mosaic; 0.9 s for 300 boxes on 1024 px): now each box's
    # rows and columns only, with the same numbers as the full-size resize.
    from boxlevelset.image import pixel_bounds
    from boxlevelset.model import _resized

    img = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    h, w = shape[:2]
    p = Predictor(model).set_image(img)
    boxes = np.array([[0, 0, w, h], [w * 0.3, h * 0.2, w * 0.9, h * 0.7],
                      [w - 3.5, h - 2.2, w + 20, h + 9], [1.5, 0.5, 2.5, 1.5]])
    crops = p.box_probabilities(boxes)
    full = _resized(p.box_logits(boxes).sigmoid(), p._feats.input_size, p._valid,
                    p._orig).numpy()
    for crop, f, (c0, r0, c1, r1) in zip(crops, full, pixel_bounds(boxes, h, w)):
        assert crop.dtype == np.float32 and crop.shape == (r1 - r0, c1 - c0)
        np.testing.assert_allclose(crop, f[r0:r1, c0:c1], atol=1e-5)


def test_box_probabilities_build_no_full_size_map(model, monkeypatch):
    import boxlevelset.model as M

    img = np.zeros((1024, 1536), np.uint8)
    p = Predictor(model).set_image(img)

    def full_size(*args, **kwargs):
        raise AssertionError("a full-image probability map was built for a box")

    monkeypatch.setattr(M, "_resized", full_size)
    boxes = np.array([[10.0 + i, 10, 40 + i, 40] for i in range(40)])
    crops = p.box_probabilities(boxes)
    assert [c.shape for c in crops] == [(30, 30)] * 40
    assert all(m.sum() <= 900 for m in p.predict_boxes(boxes))


def test_segment_boxes_refuses_a_predictor_holding_another_image(model):
    """A Predictor reused on another image had returned masks of the held image's size
    (empty for this box), or a cv2 error with refine."""
    p = Predictor(model).set_image(_image(96))
    other = _image(128)
    with pytest.raises(ValueError, match="holds an image of 96x96 pixels, not this 128x128"):
        boxlevelset.segment_boxes(other, [[70, 70, 120, 120]], model=p)
    with pytest.raises(ValueError, match="refine must be >= 0"):
        boxlevelset.segment_boxes(_image(96), [[10, 10, 50, 50]], model=p, refine=-3)
    assert boxlevelset.segment_boxes(_image(96), [[10, 10, 50, 50]], model=p)[0].shape == (96, 96)


class _Payload:
    """Stands for any Python object a foreign pickle may carry (unpickling runs its code)."""


def test_a_checkpoint_holding_python_objects_is_not_unpickled(tmp_path):
    from boxlevelset.model import load_checkpoint

    path = tmp_path / "foreign.pth"
    torch.save({"model": {}, "config": {}, "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="tensors and plain data only"):
        load_checkpoint(path)


def test_building_a_model_leaves_the_callers_config_as_given():
    """SOLOv2 filled the backbone's pixel mean and std into the caller's ModelConfig, so a
    config reused for another backbone normalised with the first one's statistics."""
    cfg = ModelConfig.lite(num_classes=2, class_names=("a", "b"), **TINY)
    model = SOLOv2(cfg, pretrained=False)
    assert cfg.pixel_mean is None and cfg.pixel_std is None
    assert model.config.pixel_mean is not None


def test_evaluate_leaves_out_an_image_cut_short(model, tiny_box_folder):
    """One damaged file had stopped the whole evaluation (the folder check reads headers
    only); now it is skipped with a warning and its ground truth is not scored."""
    from boxlevelset.data import load_box_folder
    from boxlevelset.predict import evaluate_model

    folder = load_box_folder(tiny_box_folder)
    damaged = tiny_box_folder / "images" / "tiny_1.png"  # cut short after the folder loaded
    damaged.write_bytes(damaged.read_bytes()[:120])
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        out = evaluate_model(model, folder, class_agnostic=True)
    assert out["images"] == 2 and out["instances"] > 0


def test_box_probabilities_of_given_logits(model):
    """Refined logits (box_prompt_refine) go through the same crop-wise resize as the
    prompts' own: given the prompts' logits, the same numbers; given others, theirs."""
    img = np.random.default_rng(2).integers(0, 255, (50, 70), dtype=np.uint8)
    p = Predictor(model).set_image(img)
    boxes = np.array([[5, 4, 40, 30], [30, 20, 69, 49]], dtype=float)
    logits = p.box_logits(boxes)
    same = p.box_probabilities(boxes, logits=logits)
    for a, b in zip(same, p.box_probabilities(boxes)):
        np.testing.assert_array_equal(a, b)
    high = p.box_probabilities(boxes, logits=torch.full_like(logits, 20.0))
    assert all(np.allclose(c, 1.0) for c in high)
    assert p.features.mask_feature.shape[-2:] == logits.shape[-2:]
    with pytest.raises(ValueError, match="1 logit maps for 2 boxes"):
        p.box_probabilities(boxes, logits=logits[:1])
