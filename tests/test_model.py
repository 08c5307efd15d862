"""SOLOv2 level-set model: targets, Matrix NMS, losses, training signal, Predictor, I/O."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from boxlevelset.model import (
    Instances,
    ModelConfig,
    Predictor,
    SOLOv2,
    load_model,
    save_checkpoint,
)
from boxlevelset.targets import assign_targets, masks_to_boxes, matrix_nms

TINY = dict(
    fpn_channels=16,
    head_channels=16,
    stacked_convs=1,
    mask_feature_channels=16,
    mask_feature_mid_channels=16,
    feature_guide_channels=3,
    input_size=96,
    max_size=128,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box OpenMP
    threads thrash (measured: 0.3 s vs 3-10 s per training step); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int = 0, **overrides) -> SOLOv2:
    torch.manual_seed(seed)
    cfg = ModelConfig.lite(num_classes=2, class_names=("disk", "block"), **{**TINY, **overrides})
    return SOLOv2(cfg, pretrained=False)


def disk_scene(size: int = 96, radius: int = 22):
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    disk = (yy - c + 0.5) ** 2 + (xx - c + 0.5) ** 2 <= radius**2
    image = np.where(disk, 220, 30).astype(np.uint8)
    box = np.array([[c - radius, c - radius, c + radius, c + radius]], dtype=np.float32)
    return image, disk, box


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------- targets and NMS
def test_assign_targets_levels_and_cells():
    cfg = ModelConfig()
    boxes = torch.tensor(
        [[100.0, 100.0, 160.0, 140.0],  # sqrt(wh) = 49: levels 0 (1-96) and 1 (48-192)
         [0.0, 0.0, 250.0, 250.0],  # 250: levels 2 (96-384) and 3 (192-768)
         [200.0, 200.0, 203.0, 203.0]]  # 3x3 = 9 px < 10 -> skipped
    )
    labels = torch.tensor([1, 0, 1])
    t = assign_targets(boxes, labels, (256, 256), cfg.num_grids, cfg.scale_ranges,
                       cfg.sigma, cfg.min_box_pixels)
    # Level 0 (S=40): centre (130, 120) -> cell (18, 20); sigma region rows 18..19, cols 19..21.
    expected0 = torch.full((40, 40), -1)
    expected0[18:20, 19:22] = 0
    assert torch.equal(t[0].objects, expected0)
    assert torch.equal(t[0].labels[18:20, 19:22], torch.ones(2, 3, dtype=torch.long))
    assert (t[0].labels >= 0).sum() == 6
    # Level 1 (S=36): centre cell (16, 18); region rows 16..17, cols 17..19.
    expected1 = torch.full((36, 36), -1)
    expected1[16:18, 17:20] = 0
    assert torch.equal(t[1].objects, expected1)
    # Big box: centre (125, 125); half size 25 -> region clamped to the 3x3 around the centre.
    s = cfg.num_grids[2]  # 24: centre cell 11, region cells 9.4..14 -> 10..12
    assert torch.equal(torch.nonzero(t[2].objects == 1)[:, 0].unique(), torch.tensor([10, 11, 12]))
    assert (t[2].labels == 0).sum() == 9 and s == 24
    assert (t[3].objects == 1).sum() == 9  # S=16: centre 7, region 6..8
    assert (t[4].objects >= 0).sum() == 0
    assert not any((lt.objects == 2).any() for lt in t)


def test_matrix_nms_decays_duplicate_keeps_disjoint():
    a = torch.zeros(3, 8, 8, dtype=torch.bool)
    a[0, :4, :4] = True
    a[1, :4, :4] = True  # duplicate of 0
    a[2, 4:, 4:] = True  # disjoint
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0])
    out = matrix_nms(a, labels, scores, "gaussian", 2.0)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.8 * math.exp(-2.0), 0.7]))
    # Partial overlap: IoU 8 / 24 = 1/3 -> decay exp(-2/9); another class -> untouched.
    b = torch.zeros(3, 8, 8, dtype=torch.bool)
    b[0, :4, :4] = True
    b[1, :4, 2:6] = True
    b[2, :4, :4] = True
    out = matrix_nms(b, torch.tensor([0, 0, 1]), scores, "gaussian", 2.0)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.8 * math.exp(-2.0 / 9.0), 0.7]))
    out = matrix_nms(b, torch.tensor([0, 0, 1]), scores, "linear")
    torch.testing.assert_close(out, torch.tensor([0.9, 0.8 * (2.0 / 3.0), 0.7]))


def test_masks_to_boxes():
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    boxes = masks_to_boxes(m)
    torch.testing.assert_close(boxes, torch.tensor([[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- config
def test_config_round_trip_and_validation():
    cfg = ModelConfig.lite(num_classes=2, class_names=["a", "b"])
    again = ModelConfig.from_dict(asdict(cfg))
    assert again == cfg
    assert cfg.mask_strides == (4, 4, 8, 16, 16)
    assert ModelConfig(num_classes=3).class_names == ("class_0", "class_1", "class_2")
    with pytest.raises(ValueError, match="supervision"):
        ModelConfig(supervision="points")
    with pytest.raises(ValueError, match="class_names"):
        ModelConfig(num_classes=2, class_names=("a",))


# ---------------------------------------------------------------- training losses
def _targets():
    return [
        dict(boxes=torch.tensor([[10.0, 12.0, 50.0, 44.0], [40.0, 40.0, 60.0, 62.0]]),
             labels=torch.tensor([0, 1])),
        dict(boxes=torch.tensor([[4.0, 4.0, 30.0, 28.0]]), labels=torch.tensor([1])),
    ]


@pytest.mark.parametrize("per_level, guide", [(True, "normalized"), (False, "unit")])
def test_train_forward_gradients_reach_every_branch(per_level, guide):
    model = tiny_model(per_level_mask_stride=per_level, tree_image_guide=guide).train()
    images = torch.rand(2, 3, 128, 128) * 255
    targets = _targets()
    # sqrt(wh) = 109: levels 1 and 2, so masks at stride 4 and (per level) 8 are both used.
    targets[1]["boxes"] = torch.cat([targets[1]["boxes"], torch.tensor([[10.0, 10, 120, 118]])])
    targets[1]["labels"] = torch.tensor([1, 0])
    losses = model(images, targets)
    assert set(losses) == {"loss_category", "loss_box_projection", "loss_levelset_image",
                           "loss_levelset_feature"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["loss_box_projection"] > 0 and losses["loss_levelset_feature"] > 0
    sum(losses.values()).backward()
    for name, module in [("kernel branch", model.grid_head.kernel_pred),
                         ("category branch", model.grid_head.cate_pred),
                         ("mask feature", model.mask_head.pred[0]),
                         ("learned guide", model.guide_conv)]:
        grad = module.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_forward_under_autocast(dtype):
    """CUDA training runs the forward under autocast (AMP); CPU autocast takes the same
    mixed-precision path through heads, tree filter and level-set energies here."""
    model = tiny_model().train()
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.autocast("cpu", dtype=dtype):
        losses = model(images, _targets())
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    with torch.no_grad():
        reference = model(images, _targets())
    for k in losses:  # half precision moves these losses by under 0.5% (measured)
        assert abs(losses[k].item() - reference[k].item()) <= 0.02 * abs(reference[k].item()) + 1e-5
    sum(losses.values()).backward()
    assert model.guide_conv.weight.grad is not None
    assert torch.isfinite(model.grid_head.kernel_pred.weight.grad).all()


def test_no_boxes_gives_zero_instance_loss():
    model = tiny_model().train()
    images = torch.rand(1, 3, 64, 64) * 255
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    losses = model(images, empty)
    assert losses["loss_category"] > 0
    for k in ("loss_box_projection", "loss_levelset_image", "loss_levelset_feature"):
        assert losses[k].item() == 0.0 and losses[k].requires_grad
    sum(losses.values()).backward()  # graph-connected, no crash
    bad = [dict(boxes=torch.tensor([[1.0, 1.0, 30.0, 30.0]]), labels=torch.tensor([2]))]
    with pytest.raises(ValueError, match="labels must lie in"):
        model(images, bad)


def test_mask_supervision_uses_dice():
    model = tiny_model(supervision="mask").train()
    images = torch.rand(2, 3, 64, 64) * 255
    targets = _targets()
    for t in targets:
        m = torch.zeros(len(t["boxes"]), 64, 64, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(t["boxes"].long().tolist()):
            m[i, y0:y1, x0:x1] = True
        t["masks"] = m
    losses = model(images, targets)
    assert set(losses) == {"loss_category", "loss_dice"}
    assert 0 < losses["loss_dice"] <= 3.0
    del targets[0]["masks"]
    with pytest.raises(ValueError, match="masks"):
        model(images, targets)


# ---------------------------------------------------------------- learning + Predictor + I/O
@pytest.fixture(scope="module")
def trained():
    """A tiny model fitted for a few steps to one disk: (model, before IoU, losses)."""
    return fit_disk_model()


def fit_disk_model() -> tuple[SOLOv2, float, list[float]]:
    """(model, box-prompt IoU before, losses) of a tiny model fitted 25 steps to one disk."""
    image, disk, box = disk_scene()
    model = tiny_model(seed=1)
    before = iou(Predictor(model).set_image(image).predict_boxes(box)[0], disk)
    tensor, scale = model.preprocess(image)
    assert scale == 1.0 and tensor.shape == (1, 3, 96, 96)
    target = [dict(boxes=torch.from_numpy(box), labels=torch.tensor([0]))]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    history = []
    for _ in range(25):
        losses = model(tensor, target)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    model.eval()
    return model, before, history


def test_training_lowers_loss_and_improves_box_prompt(trained):
    model, before, history = trained
    image, disk, box = disk_scene()
    assert np.mean(history[-3:]) < 0.7 * np.mean(history[:3]), history
    mask = Predictor(model).set_image(image).predict_boxes(box)[0]
    after = iou(mask, disk)
    assert after > before + 0.1 and after > 0.6, (before, after)
    # Nothing outside the box.
    x0, y0, x1, y1 = box[0].astype(int)
    outside = mask.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any()


def test_box_probabilities_and_level_set_refinement(trained):
    from boxlevelset.levelset import segment_boxes

    model, _, _ = trained
    image, disk, box = disk_scene()
    predictor = Predictor(model).set_image(image)
    (prob,) = predictor.box_probabilities(box)
    x0, y0, x1, y1 = box[0].astype(int)
    assert prob.shape == (y1 - y0, x1 - x0) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    mask = predictor.predict_boxes(box)[0]
    assert np.array_equal(mask[y0:y1, x0:x1], prob > model.config.mask_threshold)
    # refine=0 is the model's mask; level-set steps from it move it onto the disk.
    assert np.array_equal(segment_boxes(image, box, model=model)[0], mask)
    refined = segment_boxes(image, box, model=model, refine=25)[0]
    assert iou(refined, disk) > max(iou(mask, disk), 0.9)
    assert not refined[:y0].any() and not refined[:, :x0].any()
    # A box wholly left of or above the image has no pixels (a negative end once sliced
    # from the far side and gave most of the image).
    for outside in ([[-20, -20, -5, -5]], [[-10, 10, -1, 20]]):
        assert not predictor.predict_boxes(outside)[0].any()
        assert predictor.box_probabilities(outside)[0].size == 0


def test_predict_instances_consistent(trained, monkeypatch):
    model, _, _ = trained
    image = np.random.default_rng(0).integers(0, 255, (70, 90)).astype(np.uint8)
    inst = model.predict(image, score_threshold=0.0)
    assert isinstance(inst, Instances)
    n = len(inst)
    assert inst.masks.shape == (n, 70, 90) and inst.masks.dtype == bool
    assert inst.boxes.shape == (n, 4) and inst.boxes.dtype == np.float32
    assert inst.labels.dtype == np.int64 and inst.scores.dtype == np.float32
    assert ((inst.labels >= 0) & (inst.labels < 2)).all()
    assert np.all(np.diff(inst.scores) <= 0)
    assert n <= model.config.max_per_image and n > 0
    # Over their boxes only (a large image's hundreds of instances): the same masks, and
    # the same as the stride-4 maps resized whole by F.interpolate.
    cropped = model.predict(image, score_threshold=0.0, cropped=True)
    np.testing.assert_array_equal(cropped.masks.bounds, inst.boxes.astype(np.int64))
    assert all((a == b).all() for a, b in zip(cropped.masks.to_masks(), inst.masks))
    np.testing.assert_array_equal(cropped.scores, inst.scores)
    import boxlevelset.model as M

    p = M.Predictor(model).set_image(image)
    probs, _, _ = model.detect_probs(p.features, 0, 0.0)
    whole = M._threshold_resized(probs, p.features.input_size, p._valid, p._orig,
                                 model.config.mask_threshold).numpy()
    np.testing.assert_array_equal(whole[whole.reshape(len(whole), -1).any(1)], inst.masks)
    # A threshold the caller gives holds for the final scores too, which the mask weighting
    # and Matrix NMS lower below the category scores it first selects on (here NMS takes
    # 10% off: the best instance passes the category test at t but ends below it).
    t = 0.95 * float(inst.scores[0])
    monkeypatch.setattr(M, "matrix_nms", lambda masks, labels, scores, *args: scores * 0.9)
    assert (model.predict(image, score_threshold=t).scores >= t).all()
    # Boxes are the masks' tight boxes.
    for m, b in zip(inst.masks, inst.boxes):
        ys, xs = np.nonzero(m)
        assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # Eval forward gives padded-size detections.
    out = model(model.preprocess(image)[0])
    assert out[0]["masks"].shape[-2:] == (96, 128)


def test_tiled_predict_finds_objects_the_whole_image_resize_shrinks(trained):
    model, _, _ = trained
    image, disk, _ = disk_scene()
    mosaic = np.tile(image, (2, 3))  # 192 x 288: resized whole to 85 x 128, disks shrink 2.3x
    single = model.predict(image, score_threshold=0.3, cropped=True)
    assert len(single) >= 1 and iou(single.masks.full(0), disk) > 0.6
    tiled = model.predict(mosaic, score_threshold=0.3, cropped=True, tile=96, overlap=0)
    # Tiles of 96 px fall on the copies: each copy's disk is found as in the image alone.
    for ty in range(2):
        for tx in range(3):
            want = np.zeros(mosaic.shape, bool)
            want[96 * ty : 96 * ty + 96, 96 * tx : 96 * tx + 96] = single.masks.full(0)
            assert max(iou(m, want) for m in tiled.masks.to_masks()) == 1.0
    whole = model.predict(mosaic, score_threshold=0.3)
    assert sum(max((iou(m, d) for m in whole.masks), default=0) > 0.6 for d in
               [np.pad(disk, ((96 * ty, 96 - 96 * ty), (96 * tx, 192 - 96 * tx)))
                for ty in range(2) for tx in range(3)]) < 6
    # Whole-image masks on request, as model.predict gives them untiled.
    full = model.predict(mosaic, score_threshold=0.3, tile=96, overlap=0)
    assert full.masks.shape == (len(tiled), 192, 288)
    assert all((a == b).all() for a, b in zip(full.masks, tiled.masks.to_masks()))


def test_tiled_box_prompts_are_the_tiles_own(trained):
    from boxlevelset.levelset import segment_boxes
    from boxlevelset.tiles import TiledPredictor

    model, _, _ = trained
    image, disk, box = disk_scene()
    mosaic = np.tile(image, (2, 3))
    shifts = np.array([[96 * tx, 96 * ty] * 2 for ty in range(2) for tx in range(3)], np.float32)
    boxes = box + shifts
    alone = Predictor(model).set_image(image).box_probabilities(box)[0]
    tiled = TiledPredictor(model, tile=96, overlap=0)
    with pytest.raises(RuntimeError, match="set_image"):
        tiled.predict_boxes(boxes)
    tiled.set_image(mosaic)
    assert tiled.image_size == (192, 288) and tiled.is_image_set
    # Each box is prompted on its own copy's tile: the single image's probabilities.
    for prob in tiled.box_probabilities(boxes):
        np.testing.assert_array_equal(prob, alone)
    masks = tiled.predict_boxes(boxes, cropped=True)
    np.testing.assert_array_equal(masks.bounds, (boxes).astype(np.int64))
    assert len(tiled._tiles) == 6
    # The whole mosaic, shrunk to the 128 px input, prompts coarser masks (0.79 against 0.83).
    whole = Predictor(model).set_image(mosaic).predict_boxes(boxes)
    want = [np.pad(disk, ((96 * ty, 96 - 96 * ty), (96 * tx, 192 - 96 * tx)))
            for ty in range(2) for tx in range(3)]
    assert np.mean([iou(m, d) for m, d in zip(masks.to_masks(), want)]) > np.mean(
        [iou(m, d) for m, d in zip(whole, want)]) + 0.02
    # segment_boxes takes it as a Predictor: refined masks as on the single image.
    refined = segment_boxes(mosaic, boxes, model=tiled, refine=5, cropped=True)
    single = segment_boxes(image, box, model=model, refine=5, cropped=True)
    assert all((c == single.crops[0]).all() for c in refined.crops)
    # A box no tile holds (wider than a tile) gets a tile of its own around it.
    big = np.array([[40.0, 20.0, 200.0, 80.0]])
    (window,) = tiled._windows_for(big.astype(np.int64))
    assert window[0] <= 40 and window[2] >= 200 and window[1] <= 20 and window[3] >= 80
    assert tiled.box_probabilities(big)[0].shape == (60, 160)
    with pytest.raises(ValueError, match="logits"):
        tiled.box_probabilities(boxes, logits=torch.zeros(6, 24, 24))
    with pytest.raises(RuntimeError, match="per tile"):
        tiled.features
    # No larger than one tile: the Predictor's own masks.
    small = TiledPredictor(model, tile=128).set_image(image)
    np.testing.assert_array_equal(small.box_probabilities(box)[0], alone)


def test_save_load_round_trip(trained, tmp_path):
    model, _, _ = trained
    image, _, box = disk_scene()
    path = save_checkpoint(tmp_path / "ck" / "model.pt", model, iteration=25)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = load_model(path, device="cpu")
    assert not loaded.training and loaded.config == model.config
    a = Predictor(model).set_image(image)
    b = Predictor(loaded).set_image(image)
    assert np.array_equal(a.predict_boxes(box)[0], b.predict_boxes(box)[0])
    pa, pb = a.predict(0.0), b.predict(0.0)
    assert np.array_equal(pa.masks, pb.masks) and np.array_equal(pa.scores, pb.scores)
    assert torch.load(path, weights_only=True)["iteration"] == 25


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="none ship with the package"):
        load_model("lite")  # a name, as DESIGN.md's path_or_name suggests
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="boxlevelset checkpoint"):
        load_model(tmp_path / "other.pt")


def test_predictor_level_choice_and_errors():
    p = Predictor(tiny_model())
    assert p.level_for_box(20) == 0
    assert p.level_for_box(60) == 1  # in (1,96) and (48,192): 60 is nearer 96 than 9.8 (log)
    assert p.level_for_box(150) == 2  # in (48,192) and (96,384): nearer 192 than 96
    assert p.level_for_box(5000) == 4
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict_boxes([[0, 0, 5, 5]])


def test_predictor_rescales_non_square_and_windowed_images(trained):
    """Boxes and masks live in original pixels even when the network sees a resized image."""
    model, _, _ = trained
    image, disk, box = disk_scene()
    # Same scene at 1.5x, non-square, as CT Hounsfield units (abdomen window maps 30/220 apart).
    big = np.zeros((150, 180), np.float32) - 160.0
    yy, xx = np.mgrid[:150, :180]
    big_disk = (yy - 72) ** 2 + (xx - 90) ** 2 <= 33**2
    big[big_disk] = 180.0
    big_box = np.array([[57.0, 39.0, 123.0, 105.0]])
    p = Predictor(model).set_image(big, window="abdomen")
    assert p._scale == pytest.approx(96 / 150)
    masks = p.predict_boxes(big_box)
    assert len(masks) == 1 and masks[0].shape == (150, 180) and masks[0].dtype == bool
    assert iou(masks[0], big_disk) > 0.6
    outside = masks[0].copy()
    outside[39:105, 57:123] = False
    assert not outside.any()
    from boxlevelset.levelset import segment_boxes

    via = segment_boxes(big, big_box, model=model, window="abdomen")
    assert np.array_equal(via[0], masks[0])
    cropped = segment_boxes(big, big_box, model=model, window="abdomen", cropped=True)
    assert cropped.bounds.tolist() == [[57, 39, 123, 105]]
    np.testing.assert_array_equal(cropped.crops[0], masks[0][39:105, 57:123])
    assert p.predict_boxes(np.zeros((0, 4))) == []
