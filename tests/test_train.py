"""Training loop, checkpoints, stop/resume, NaN guard, prediction and evaluation on tiny data."""

from __future__ import annotations

import argparse
import csv
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from boxlevelset.train import (
    PRESETS,
    BoxDataset,
    ResizeFlip,
    StopTraining,
    TrainConfig,
    TrainEvent,
    add_train_arguments,
    collate,
    config_from_args,
    lr_factor,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A model small enough for a few CPU iterations in about a second each.
TINY_MODEL = dict(
    fpn_channels=16, head_channels=16, stacked_convs=1, mask_feature_channels=16,
    mask_feature_mid_channels=16, num_grids=(12, 10, 8, 6, 4), feature_guide_channels=3,
    tree_filter_max_side=32, score_threshold=0.01,
)



def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data=data, preset="lite", output_dir=out, max_iterations=3, batch_size=2,
        min_size=(64, 80), max_size=96, pretrained=False, checkpoint_every=100,
        warmup_iters=2, model=dict(TINY_MODEL),
    )
    values.update(overrides)
    return TrainConfig(**values)


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[TrainEvent]]:
    """One 3-iteration box-supervised run shared by the tests that need a trained model."""
    import conftest

    base = tmp_path_factory.mktemp("trained")
    data = conftest.tiny_box_folder.__wrapped__(base)
    events: list[TrainEvent] = []
    path = train(tiny_config(data, base / "run"), callbacks=[events.append])
    return data, path, events


# ------------------------------------------------------------------------- pure pieces


def test_presets_resolve_and_explicit_values_win():
    cfg = TrainConfig(data="x", preset="voc_r50_3x")
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.warmup_iters) == (5e-5, 8, 36, 2000)
    assert cfg.min_size == (640, 800) and cfg.backbone == "resnet50"
    assert cfg.weight_decay == 0.1 and cfg.grad_clip == 1.0
    assert cfg.lr_steps == pytest.approx((27 / 36, 33 / 36))
    coco = TrainConfig(data="x", preset="coco_r101_3x", lr=3e-4)
    assert (coco.lr, coco.batch_size, coco.backbone) == (3e-4, 16, "resnet101")
    lits = TrainConfig(data="x", preset="lits_r50_1x")
    assert lits.epochs == 12 and lits.lr_steps == pytest.approx((8 / 12, 11 / 12))
    lite = TrainConfig(data="x", preset="lite", model={"fpn_channels": 32})
    assert lite.backbone == "efficientnet_lite0"
    assert lite.model["fpn_channels"] == 32 and lite.model["head_channels"] == 64
    assert set(PRESETS) == {"voc_r50_3x", "voc_r101_3x", "coco_r101_3x", "isaid_r50_1x",
                            "lits_r50_1x", "lite"}
    assert "stop_event" not in TrainConfig(data="x", stop_event=threading.Event()).to_dict()
    json.dumps(lite.to_dict())  # serialisable for checkpoints


@pytest.mark.parametrize("bad", [dict(preset="nope"), dict(supervision="poly"),
                                 dict(lr_steps=(1.5,)), dict(min_size=(800, 600)),
                                 dict(batch_size=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(data="x", **bad)


def test_lr_schedule_warmup_and_steps():
    f = lambda it: lr_factor(it, 100, 10, 0.001, (0.5, 0.8), 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == pytest.approx(1.0) and f(49) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.1) and f(79) == pytest.approx(0.1)
    assert f(80) == pytest.approx(0.01) and f(99) == pytest.approx(0.01)


def test_resize_flip_moves_boxes_with_masks():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.float32)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, 10:20, 5:25] = True
    boxes = np.array([[5, 10, 25, 20]], np.float32)
    transform = ResizeFlip((80, 80), 1000, flip_prob=1.0)
    out_img, out_boxes, out_masks = transform(image, boxes, masks, rng)
    assert out_img.shape == (80, 120, 3) and out_masks.shape == (1, 80, 120)
    # scaled x2 then flipped: x in [10, 50) -> [70, 110)
    np.testing.assert_allclose(out_boxes, [[70, 20, 110, 40]])
    ys, xs = np.nonzero(out_masks[0])
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (70, 110, 20, 40)
    # the longer side cap wins over the shorter-side target
    capped, _, _ = ResizeFlip((80, 80), 90, 0.0)(image, boxes, None, rng)
    assert capped.shape[:2] == (60, 90)


def test_random_crop_holds_a_box_centre_and_clips_the_rest():
    from boxlevelset.train import random_crop

    h, w = 300, 400
    image = np.arange(h * w, dtype=np.float32).reshape(h, w, 1).repeat(3, 2)
    boxes = np.array([[10, 10, 50, 40], [180, 120, 260, 200], [330, 250, 400, 300],
                      [100, 150, 140, 190]], np.float32)
    masks = np.zeros((4, h, w), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
        m[y0:y1, x0:x1] = True
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        img, out, out_masks, inside = random_crop(image, boxes, masks, 128, rng)
        assert img.shape == (128, 128, 3) and len(out) == inside.sum() == len(out_masks) >= 1
        x0, y0 = int(img[0, 0, 0]) % w, int(img[0, 0, 0]) // w  # where the window lies
        assert 0 <= x0 <= w - 128 and 0 <= y0 <= h - 128
        # The boxes in it, clipped to it, tight on their (cut) masks.
        np.testing.assert_allclose(
            out, np.clip(boxes[inside] - [x0, y0, x0, y0], 0, 128))
        for b, m in zip(out.astype(int), out_masks):
            ys, xs = np.nonzero(m)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == b.tolist()
        seen |= set(np.flatnonzero(inside).tolist())
    assert seen == {0, 1, 2, 3}  # every box is drawn sometimes
    # An image no larger than the crop stays whole; one side larger is cut on that side.
    small = random_crop(image[:100, :120], boxes[:1], None, 128, np.random.default_rng(0))
    assert small[0].shape == (100, 120, 3) and small[3].all()
    wide = random_crop(image[:100], boxes[:1], None, 128, np.random.default_rng(0))
    assert wide[0].shape == (100, 128, 3)


def test_dataset_crops_keep_each_box_with_its_label(tiny_box_folder):
    from boxlevelset.data import load_box_folder

    folder = load_box_folder(tiny_box_folder)
    whole = BoxDataset(folder, folder.class_names, None)
    cropped = BoxDataset(folder, folder.class_names, None, crop=32)  # of 64 px images
    from boxlevelset.train import random_crop

    partial = 0
    for i in range(len(whole)):
        full = whole[i]
        for seed in range(10):
            sample = cropped[(i, seed)]
            assert sample["image"].shape[1:] == (32, 32) and len(sample["boxes"]) >= 1
            assert sample["dropped"] == 0  # boxes outside the crop are not "degenerate"
            # The crop the same seed draws: its boxes, each with its own label.
            _, boxes, _, inside = random_crop(full["image"].permute(1, 2, 0).numpy(),
                                              full["boxes"].numpy(), None, 32,
                                              np.random.default_rng(seed))
            np.testing.assert_array_equal(sample["boxes"].numpy(), boxes)
            np.testing.assert_array_equal(sample["labels"].numpy(), full["labels"].numpy()[inside])
            partial += not inside.all()
    assert partial > 0  # some crops left boxes out
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(data="x", crop=16)
    assert TrainConfig(data="x", preset="lite").crop == 0


def test_cropping_dataset_decodes_each_image_once_within_its_cache(tiny_box_folder,
                                                                     monkeypatch):
    import boxlevelset.train as T
    from boxlevelset.data import load_box_folder

    folder = load_box_folder(tiny_box_folder)
    decoded = []
    real = folder.load_image
    folder.load_image = lambda record: decoded.append(record.file_name) or real(record)
    cropped = BoxDataset(folder, folder.class_names, None, crop=32)
    first = [cropped[(i, seed)]["image"] for seed in range(4) for i in range(3)]
    assert sorted(decoded) == ["tiny_0.png", "tiny_1.png", "tiny_2.png"]  # once each
    again = [cropped[(i, seed)]["image"] for seed in range(4) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the cache is not altered
    # Over the cache's size, images are decoded every time; without crops, never kept.
    monkeypatch.setattr(T, "_CACHE_BYTES", 64 * 64 * 3 * 4)  # one image
    decoded.clear()
    small = BoxDataset(folder, folder.class_names, None, crop=32)
    for _ in range(2):
        for i in range(3):
            small[i]
    assert len(decoded) == 5
    decoded.clear()
    whole = BoxDataset(folder, folder.class_names, None)
    for _ in range(2):
        whole[0]
    assert len(decoded) == 2


def test_dataset_skips_an_image_that_fails_to_decode(tiny_box_folder, caplog):
    from boxlevelset.data import load_box_folder

    folder = load_box_folder(tiny_box_folder)
    # Damaged after the folder was checked (the check reads headers only).
    (tiny_box_folder / "images" / "tiny_1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = BoxDataset(folder, folder.class_names, None)
    with caplog.at_level("WARNING", logger="boxlevelset.train"):
        samples = [ds[i] for i in (1, 1, 0, 2)]
    assert [s["image_id"] for s in samples] == [3, 3, 1, 3]  # the next readable image
    assert caplog.text.count("tiny_1.png") == 1  # warned once


def test_dataset_and_collate_pad_to_32(tiny_box_folder):
    from boxlevelset.data import load_box_folder

    folder = load_box_folder(tiny_box_folder)
    ds = BoxDataset(folder, folder.class_names, ResizeFlip((70, 70), 200, 0.5), with_masks=True)
    assert len(ds) == 3
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    assert a["image"].shape == (3, 70, 70) and a["image"].max() > 150
    images, targets = collate([ds[(0, 3)], ds[(1, 4)]])
    assert images.shape == (2, 3, 96, 96)
    assert images[:, :, 70:].abs().sum() == 0 and images[:, :, :, 70:].abs().sum() == 0
    t = targets[0]
    assert t["masks"].shape[1:] == (96, 96) and len(t["masks"]) == len(t["boxes"])
    assert t["labels"].dtype == torch.int64 and set(t["labels"].tolist()) <= {0, 1}
    # every box still encloses its (resized, flipped) mask
    for box, mask in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
        assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1


def test_cli_arguments_build_config(tmp_path):
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path), "--preset", "lite", "--iterations", "7",
                              "--min-size", "64", "96", "--model", "fpn_channels=16",
                              "--model", "num_grids=[8,6,4,3,2]", "--time-limit", "0.5"])
    cfg = config_from_args(args)
    assert cfg.max_iterations == 7 and cfg.min_size == (64, 96)
    assert cfg.model["fpn_channels"] == 16 and cfg.model["num_grids"] == (8, 6, 4, 3, 2)
    assert cfg.time_limit == 30 and cfg.lr == PRESETS["lite"]["lr"]


# ------------------------------------------------------------------------- training runs


def test_train_events_log_and_checkpoint(trained):
    from boxlevelset.model import load_model

    data, path, events = trained
    assert path.name == "model.pth" and path.exists()
    assert [e.iteration for e in events] == [1, 2, 3, 3]
    assert [e.done for e in events] == [False, False, False, True]
    assert events[-1].checkpoint == path and all(e.max_iterations == 3 for e in events)
    for e in events[:-1]:
        assert {"loss", "loss_category", "loss_box_projection", "loss_levelset_image",
                "loss_levelset_feature"} <= set(e.losses)
        assert all(math.isfinite(v) for v in e.losses.values())
        assert e.lr > 0 and e.eta_seconds >= 0
    # 2 warm-up iterations from 0.001x, then the first x0.1 step at 0.75 of 3 iterations
    lr = PRESETS["lite"]["lr"]
    assert [e.lr for e in events[:3]] == pytest.approx([lr * 0.001, lr * 0.5005, lr * 0.1])
    rows = list(csv.DictReader(open(path.parent / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["loss"]) == pytest.approx(events[0].losses["loss"], rel=1e-4)
    ckpt = _checkpoint(path)
    assert ckpt["iteration"] == 3 and ckpt["class_names"] == ["blob", "block"]
    assert "optimizer" in _checkpoint(path.parent / "last.pth")
    model = load_model(path, device="cpu")
    assert model.class_names == ("blob", "block") and not model.training
    assert model.config.input_size == 72 and model.config.max_size == 96  # mid of training scales


def test_stop_by_callback_then_resume_matches_uninterrupted(tiny_box_folder, tmp_path):
    from boxlevelset.model import load_model

    straight = []
    train(tiny_config(tiny_box_folder, tmp_path / "straight", max_iterations=4),
          callbacks=[lambda e: straight.append((e.iteration, e.lr, e.losses.get("loss")))])
    reference = _checkpoint(tmp_path / "straight" / "model.pth")["model"]

    seen = []

    def stop_at_one(event):
        seen.append(event.iteration)
        if event.iteration == 1 and not event.done:
            raise StopTraining

    cfg = tiny_config(tiny_box_folder, tmp_path / "run", max_iterations=4)
    path = train(cfg, callbacks=[stop_at_one])
    assert path.name == "last.pth" and seen == [1, 1]
    assert not (tmp_path / "run" / "model.pth").exists()
    assert _checkpoint(path)["iteration"] == 1
    load_model(path, device="cpu")  # a stopped run still gives a usable model

    # An interrupted run may have logged past its last checkpoint: resume drops those rows.
    log = tmp_path / "run" / "log.csv"
    log.write_text(log.read_text() + "2" + log.read_text().splitlines()[1][1:] + "\n")
    # Resume mid-epoch (3 images, batch 2): same samples, augmentations, lr and AdamW state
    # as the uninterrupted run, so the same losses and final weights.
    # The resuming command need not repeat the run's model settings (model=None here).
    resumed = []
    cfg = tiny_config(tiny_box_folder, tmp_path / "run", max_iterations=4, resume="auto",
                      model=None)
    final = train(cfg, callbacks=[
        lambda e: resumed.append((e.iteration, e.lr, e.losses.get("loss")))])
    assert final.name == "model.pth"
    assert [r[0] for r in resumed] == [2, 3, 4, 4]
    for got, want in zip(resumed[:3], straight[1:4]):
        assert got[0] == want[0] and got[1] == pytest.approx(want[1])
        assert got[2] == pytest.approx(want[2], rel=1e-4)
    end = _checkpoint(tmp_path / "run" / "last.pth")
    assert end["iteration"] == 4 and end["scheduler"]["last_epoch"] == 4
    assert end["optimizer"]["state"][0]["step"].item() == 4  # AdamW state carried over
    for key, value in _checkpoint(final)["model"].items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]


def test_init_checkpoint_fine_tunes_with_new_classes(trained, tmp_path):
    import conftest

    data, path, _ = trained
    init = _checkpoint(path)["model"]
    folder = conftest.tiny_box_folder.__wrapped__(tmp_path)
    # lr 0: the weights stay as loaded, so the test sees exactly what was initialised.
    out = train(tiny_config(folder, tmp_path / "ft", init_checkpoint=path, max_iterations=1,
                            lr=0.0, class_names=["block", "blob", "extra"],
                            model={"fpn_channels": 999, "mask_threshold": 0.6}))
    ckpt = _checkpoint(out)
    assert list(ckpt["config"]["class_names"]) == ["block", "blob", "extra"]
    assert ckpt["config"]["fpn_channels"] == 16  # architecture comes from the checkpoint
    assert ckpt["config"]["mask_threshold"] == 0.6  # test-time settings may change
    differ = sorted(k for k, v in ckpt["model"].items() if not torch.equal(v, init[k]))
    assert differ and all(k.startswith("grid_head.cate_pred") for k in differ)
    # Each known class keeps its own row of the category branch, found by name: the run
    # was trained as [blob, block]; the new order is [block, blob, extra].
    for key in ("grid_head.cate_pred.weight", "grid_head.cate_pred.bias"):
        torch.testing.assert_close(ckpt["model"][key][:2], init[key][[1, 0]], rtol=0, atol=0)


def test_checkpoints_get_the_usual_file_permissions(trained):
    import os

    _data, path, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.pth", "last.pth"):  # not mkstemp's 0600
        assert (path.parent / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_package_level_train_stays_callable(tiny_box_folder, tmp_path):
    import boxlevelset
    import boxlevelset.train as module  # binds boxlevelset.train to the module

    assert boxlevelset.train is module
    config = tiny_config(tiny_box_folder, tmp_path / "run", max_iterations=1)
    events = []
    path = boxlevelset.train(config, callbacks=[events.append])  # README's call
    assert path.name == "model.pth" and events[-1].done


def test_stop_event_and_returning_false(tiny_box_folder, tmp_path):
    event = threading.Event()
    event.set()  # already set: stops after the first iteration, with a checkpoint
    path = train(tiny_config(tiny_box_folder, tmp_path / "a", stop_event=event))
    assert path.name == "last.pth" and _checkpoint(path)["iteration"] == 1

    calls = []
    path = train(tiny_config(tiny_box_folder, tmp_path / "b"),
                 callbacks=[lambda e: calls.append(e.done) or False])
    assert calls == [False, True] and _checkpoint(path)["iteration"] == 1


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tiny_box_folder, tmp_path, monkeypatch):
    from boxlevelset.model import SOLOv2

    original = SOLOv2.forward
    calls = {"n": 0}

    def forward(self, images, targets=None):
        out = original(self, images, targets)
        calls["n"] += 1
        if self.training and calls["n"] == 2:
            out["loss_category"] = out["loss_category"] * float("nan")
        return out

    monkeypatch.setattr(SOLOv2, "forward", forward)
    cfg = tiny_config(tiny_box_folder, tmp_path / "run", checkpoint_every=1)
    with pytest.raises(RuntimeError, match="iteration 2"):
        train(cfg)
    ckpt = _checkpoint(tmp_path / "run" / "last.pth")
    assert ckpt["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "model.pth").exists()


def test_diverging_features_stop_as_divergence(tiny_box_folder, tmp_path, monkeypatch):
    from boxlevelset.model import SOLOv2
    from boxlevelset.train import TrainingDiverged

    original = SOLOv2.forward

    def forward(self, images, targets=None):  # weights that overflow from iteration 2 on
        if self.training and (tmp_path / "run" / "last.pth").exists():
            with torch.no_grad():
                self.guide_conv.weight.mul_(1e38)
        return original(self, images, targets)

    monkeypatch.setattr(SOLOv2, "forward", forward)
    cfg = tiny_config(tiny_box_folder, tmp_path / "run", checkpoint_every=1, max_iterations=4)
    # Non-finite features reach the tree filter's spanning tree, which used to raise its own
    # ValueError there (on one rank alone under DDP) instead of the divergence stop.
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        train(cfg)
    assert _checkpoint(tmp_path / "run" / "last.pth")["iteration"] in (1, 2, 3)


def test_mask_supervision_trains(tiny_box_folder, tmp_path):
    events = []
    train(tiny_config(tiny_box_folder, tmp_path / "run", supervision="mask", max_iterations=3,
                      num_workers=1),  # 2 epochs through one persistent worker
          callbacks=[events.append])
    assert "loss_dice" in events[0].losses and "loss_box_projection" not in events[0].losses
    assert all(math.isfinite(e.losses["loss"]) for e in events[:-1])


# ------------------------------------------------------------------------- predict / evaluate


def test_predict_folder_and_evaluate(trained, tmp_path):
    from boxlevelset.export import read_coco_masks
    from boxlevelset.model import load_model
    from boxlevelset.predict import evaluate_model, predict_folder

    data, path, _ = trained
    model = load_model(path, device="cpu")
    out = predict_folder(model, data, tmp_path / "pred", score_threshold=0.0)
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == ["blob", "block"]
    assert len(coco["images"]) == 3
    assert sorted(p.name for p in (tmp_path / "pred" / "labels").iterdir()) == [
        "tiny_0.png", "tiny_1.png", "tiny_2.png"]
    assert len(list((tmp_path / "pred" / "overlays").iterdir())) == 3
    masks = read_coco_masks(out)
    assert set(masks) == {"tiny_0.png", "tiny_1.png", "tiny_2.png"}
    # Each image's masks are encoded as it is predicted (whole-image masks kept to the end
    # grew with the folder): the model's own masks, most confident first.
    from boxlevelset.data import read_image

    inst = model.predict(read_image(data / "images" / "tiny_1.png"), score_threshold=0.0)
    order = np.argsort(-inst.scores, kind="stable")
    np.testing.assert_array_equal(masks["tiny_1.png"][0], inst.masks[order])
    scores = [a["score"] for a in coco["annotations"] if a["image_id"] == 2]
    np.testing.assert_allclose(scores, inst.scores[order], rtol=1e-6)
    single = predict_folder(model, data / "images" / "tiny_1.png", tmp_path / "one")
    assert len(json.loads(single.read_text())["images"]) == 1
    # A file damaged after the folder check is skipped with a warning; the others are kept.
    from boxlevelset.data import BoxFolder, ImageReadError, load_box_folder

    folder = load_box_folder(data)

    def load_image(record):
        if record.file_name == "tiny_0.png":
            raise ImageReadError(f"{record.path}: cannot decode image")
        return BoxFolder.load_image(folder, record)

    folder.load_image = load_image
    with pytest.warns(UserWarning, match="tiny_0.png"):
        rest = predict_folder(model, folder, tmp_path / "rest", score_threshold=0.0)
    assert [im["file_name"] for im in json.loads(rest.read_text())["images"]] == [
        "tiny_1.png", "tiny_2.png"]

    metrics = evaluate_model(model, data)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "voc_AP25", "voc_AP50", "voc_AP70",
                "voc_AP75", "box_mIoU", "box_AP", "box_AP50", "ms_per_image"):
        assert key in metrics
    assert 0.0 <= metrics["box_mIoU"] <= 1.0 and -1.0 <= metrics["AP"] <= 1.0
    assert metrics["images"] == 3 and metrics["instances"] == 7
    # In tiles of the images' own size, the same numbers (one tile is the image); in
    # smaller tiles, every image and prompt still scored.
    keys = ("AP", "AP50", "voc_AP50", "box_mIoU", "box_AP", "images", "instances")
    same = evaluate_model(model, data, tile=64)
    assert {k: same[k] for k in keys} == {k: metrics[k] for k in keys}
    tiled = evaluate_model(model, data, tile=32, overlap=8)
    assert tiled["images"] == 3 and 0.0 <= tiled["box_mIoU"] <= 1.0
    assert tiled["box_mIoU"] != metrics["box_mIoU"]
    alone = evaluate_model(model, data, tile=64, box_prompted=False)
    assert {k: alone[k] for k in keys[:3]} == {k: metrics[k] for k in keys[:3]}


class _OracleModel:
    """Predicts the ground truth (plus one bad mask) to check the metric plumbing exactly."""

    def __init__(self, folder):
        self.folder = folder
        self.config = argparse.Namespace(class_names=tuple(folder.class_names), num_classes=2)

    def predict(self, image, score_threshold=None, cropped=False):
        from boxlevelset.model import Instances

        record = next(r for r in self.folder.records
                      if np.array_equal(self.folder.load_image(r), image))
        gt = self.folder.gt_masks(record)
        labels = np.array([c - 1 for c in record.category_ids], np.int64)
        junk = np.zeros_like(gt[:1])
        junk[0, :3, :3] = True
        masks = np.concatenate([gt, junk])  # whole, cropped or not: evaluate takes both
        return Instances(masks, np.zeros((len(gt) + 1, 4), np.float32),
                         np.append(labels, 0), np.append(np.linspace(0.9, 0.5, len(gt)), 0.01))


class _OraclePredictor:
    def __init__(self, model):
        self.model = model

    def set_image(self, image):
        self.image = image
        self.record = next(r for r in self.model.folder.records
                           if np.array_equal(self.model.folder.load_image(r), image))
        return self

    def predict(self, score_threshold=None, cropped=False):
        return self.model.predict(self.image, score_threshold=score_threshold, cropped=cropped)

    def predict_boxes(self, boxes, cropped=False):
        from boxlevelset.export import BoxMasks

        masks = self.model.folder.gt_masks(self.record)
        masks[0] = False  # the first box of each image misses completely
        masks[0, 0, 0] = True
        if not cropped:
            return list(masks)
        h, w = masks.shape[1:]  # each mask over the whole image: the widest box there is
        return BoxMasks(np.tile([0, 0, w, h], (len(masks), 1)), list(masks), (h, w))


def test_evaluate_numbers_against_oracle(tiny_box_folder, monkeypatch):
    import boxlevelset.model
    from boxlevelset.data import load_box_folder
    from boxlevelset.predict import evaluate_model

    folder = load_box_folder(tiny_box_folder)
    monkeypatch.setattr(boxlevelset.model, "Predictor", _OraclePredictor)
    metrics = evaluate_model(_OracleModel(folder), folder)
    # Perfect masks ranked above one low-scored junk mask: COCO and VOC AP are exactly 1.
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["voc_AP50"] == pytest.approx(1.0) and metrics["voc_AP75"] == pytest.approx(1.0)
    # Box prompts: the first box of each image (a "blob") fails -> mean IoU 4/7; "block" AP is
    # 1 and "blob" AP at most its recall 1/4, so the class mean lies in [0.5, 0.625].
    assert metrics["box_mIoU"] == pytest.approx(4 / 7)
    assert 0.5 <= metrics["box_AP"] <= 0.625


def test_a_model_that_finds_nothing_scores_as_pycocotools_says(tiny_box_folder):
    from boxlevelset.data import load_box_folder
    from boxlevelset.evaluate import coco_mask_ap
    from boxlevelset.model import Instances
    from boxlevelset.predict import evaluate_model

    class Blind:
        config = argparse.Namespace(class_names=("blob", "block"), num_classes=2)

        def predict(self, image, score_threshold=None, cropped=False):
            h, w = image.shape[:2]
            return Instances(np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32),
                             np.zeros(0, np.int64), np.zeros(0, np.float32))

    folder = load_box_folder(tiny_box_folder)
    metrics = evaluate_model(Blind(), folder, box_prompted=False)
    # 0 where there is ground truth, -1 for size ranges without any (as with detections).
    reference = coco_mask_ap(folder.to_coco_gt(), [], max_dets=1000)
    assert {k: metrics[k] for k in reference} == pytest.approx(reference)
    assert -1.0 in reference.values()


def test_predict_and_evaluate_command_line(trained, tmp_path, capsys, monkeypatch):
    from boxlevelset.predict import (add_evaluate_arguments, add_predict_arguments,
                                     run_evaluate, run_predict)

    data, path, _ = trained
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        [str(path), str(data), "--out", str(tmp_path / "p"), "--device", "cpu", "--no-overlays"])
    assert run_predict(args) == 0
    assert (tmp_path / "p" / "predictions.json").exists()
    assert not (tmp_path / "p" / "overlays").exists() and (tmp_path / "p" / "labels").exists()
    # In tiles (the tiny folder's images are no larger than one tile: the same file).
    import boxlevelset.tiles as tiles

    real, calls = tiles.predict_tiled, []

    def spy(model, image, tile, overlap, *args):
        calls.append((tile, overlap))
        return real(model, image, tile, overlap, *args)

    monkeypatch.setattr(tiles, "predict_tiled", spy)
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        [str(path), str(data), "--out", str(tmp_path / "t"), "--device", "cpu", "--tile", "512",
         "--overlap", "64", "--no-overlays"])
    assert run_predict(args) == 0
    assert calls == [(512, 64)] * 3
    assert ((tmp_path / "t" / "predictions.json").read_text()
            == (tmp_path / "p" / "predictions.json").read_text())
    from boxlevelset.cli import main

    assert main(["predict", str(path), str(data), "--out", str(tmp_path / "bad"), "--tile", "64",
                 "--overlap", "64"]) == 2
    assert "overlap must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # Box prompts in tiles: a tile the size of the images gives the whole-image masks.
    for out, tiling in (("s", []), ("s64", ["--tile", "64"]), ("s32", ["--tile", "32"])):
        assert main(["segment", str(data), "--model", str(path), "--device", "cpu",
                     "-o", str(tmp_path / out), *tiling]) == 0
    s, s64, s32 = (json.loads((tmp_path / d / "masks.json").read_text())["annotations"]
                   for d in ("s", "s64", "s32"))
    assert s64 == s and len(s32) == len(s) == 7 and s32 != s
    args = add_evaluate_arguments(argparse.ArgumentParser()).parse_args(
        [str(path), str(data), "--device", "cpu", "--json", str(tmp_path / "m.json")])
    assert run_evaluate(args) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "| box_mIoU |" in capsys.readouterr().out and 0 <= metrics["box_mIoU"] <= 1
    # Box prompts refined by the level set: the 3-iteration model's masks are poor, the
    # refined ones follow the tiny folder's bright shapes.
    args = add_evaluate_arguments(argparse.ArgumentParser()).parse_args(
        [str(path), str(data), "--device", "cpu", "--refine", "15", "--json",
         str(tmp_path / "r.json")])
    assert run_evaluate(args) == 0
    refined = json.loads((tmp_path / "r.json").read_text())
    assert refined["box_mIoU"] > max(0.8, metrics["box_mIoU"])
    assert refined["AP"] == metrics["AP"]  # the automatic path is untouched


class _ThresholdModel:
    """Fake model: one instance per slice, the pixels above 100 HU (checks windowing is passed)."""

    config = argparse.Namespace(class_names=("organ",), num_classes=1)

    def predict(self, image, window=None, score_threshold=None, cropped=False):
        from boxlevelset.model import Instances

        assert window == "liver" and image.dtype == np.float32  # raw HU + the window
        mask = image > 100
        n = int(mask.any())
        return Instances(mask[None][:n], np.zeros((n, 4), np.float32), np.zeros(n, np.int64),
                         np.full(n, 0.9, np.float32))


def test_predict_volume_writes_label_volume_with_geometry(tmp_path):
    import SimpleITK as sitk

    from boxlevelset.data import read_volume
    from boxlevelset.predict import predict_folder

    hu = np.full((3, 20, 30), -500, np.int16)
    hu[0, 2:8, 3:9] = 200
    hu[2, 10:15, 5:25] = 300  # slice 1 stays empty
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    out = predict_folder(_ThresholdModel(), tmp_path / "ct.nii.gz", tmp_path / "out",
                         window="liver")
    coco = json.loads(out.read_text())
    assert [im["slice_index"] for im in coco["images"]] == [0, 1, 2]
    assert len(coco["annotations"]) == 2
    labels = read_volume(tmp_path / "out" / "ct_labels.nii.gz")
    assert labels.spacing == pytest.approx((0.7, 0.7, 2.5))
    assert labels.origin == pytest.approx((10.0, -5.0, 3.0))
    expected = np.zeros(hu.shape, np.int32)
    expected[0][hu[0] > 100] = 1
    expected[2][hu[2] > 100] = 2  # numbered across the volume
    np.testing.assert_array_equal(labels.array.astype(np.int32), expected)
    # --no-labels holds for volumes too.
    predict_folder(_ThresholdModel(), tmp_path / "ct.nii.gz", tmp_path / "bare",
                   window="liver", labels=False)
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["predictions.json"]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
@pytest.mark.parametrize("supervision", ["box", "mask"])
def test_every_trainable_parameter_gets_a_gradient_in_every_step(backbone, supervision):
    """DDP runs without its per-step search for unused parameters (find_unused_parameters
    False): that holds only while every trainable parameter takes part in every step's
    loss, with positives on every level, on some, or on none (boxes all dropped)."""
    from boxlevelset.train import build_model

    config = TrainConfig(data="unused", preset="lite", backbone=backbone, pretrained=False,
                         supervision=supervision, model=dict(TINY_MODEL, frozen_stages=-1))
    assert config.find_unused_parameters is False
    model = build_model(config, ["a", "b"]).train()
    images = torch.rand(2, 3, 96, 96) * 255
    batches = {
        "every size": [[[2, 2, 12, 12], [10, 10, 60, 50], [0, 0, 96, 96]], [[20, 30, 90, 80]]],
        "one image empty": [[[10, 10, 60, 50]], []],
        "no boxes": [[], []],
    }
    for name, per_image in batches.items():
        targets = []
        for boxes in per_image:
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            masks = torch.zeros(len(boxes), 96, 96, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long),
                            "masks": masks})
        model.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (name, unused)
