"""Training from the user's side: resuming, interrupting, output folders (review findings)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import boxlevelset.train as T
from boxlevelset.train import TrainConfig, add_train_arguments, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = dict(
    fpn_channels=16, head_channels=16, stacked_convs=1, mask_feature_channels=16,
    mask_feature_mid_channels=16, num_grids=(12, 10, 8, 6, 4), feature_guide_channels=3,
    tree_filter_max_side=32, score_threshold=0.01,
)



def _cli_args(data: Path, out: Path, *extra: str):
    import argparse

    argv = [str(data), "-o", str(out), "--min-size", "64", "80", "--max-size", "96",
            "--batch-size", "2", "--warmup", "2", "--no-pretrained", "--no-progress"]
    for key, value in TINY_MODEL.items():
        argv += ["--model", f"{key}={json.dumps(value)}"]
    return add_train_arguments(argparse.ArgumentParser()).parse_args(argv + list(extra))


def test_resume_without_repeating_the_schedule_continues_it(tiny_box_folder, tmp_path):
    # A mask-supervised 3-iteration run at small scales, stopped after its first iteration.
    stop = threading.Event()
    stop.set()
    first = train(TrainConfig(
        data=tiny_box_folder, preset="lite", output_dir=tmp_path / "run", max_iterations=3,
        batch_size=2, min_size=(64, 80), max_size=96, warmup_iters=2, pretrained=False,
        supervision="mask", seed=3, model=dict(TINY_MODEL), stop_event=stop))
    assert first.name == "last.pth"
    # `boxlevelset train FOLDER --resume auto -o run`: nothing of the schedule repeated.
    events = []
    path = train(TrainConfig(data=tiny_box_folder, preset="lite", output_dir=tmp_path / "run",
                             resume="auto", pretrained=False), callbacks=[events.append])
    assert [e.iteration for e in events] == [2, 3, 3] and events[0].max_iterations == 3
    assert path.name == "model.pth"
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=False)["train_config"]
    assert saved["min_size"] == (64, 80) and saved["max_size"] == 96
    assert saved["supervision"] == "mask" and saved["seed"] == 3 and saved["batch_size"] == 2


def test_resume_takes_explicit_changes(tiny_box_folder):
    saved = TrainConfig(data=tiny_box_folder, preset="lite", max_iterations=3, lr=0.5).to_dict()
    again = TrainConfig(data=tiny_box_folder, preset="lite", epochs=2, resume="x",
                        lr=0.25).resumed_from(saved)
    assert again.epochs == 2 and again.max_iterations is None and again.lr == 0.25
    assert again.batch_size == saved["batch_size"]


def test_ctrl_c_stops_the_command_line_run_with_a_checkpoint(tiny_box_folder, tmp_path,
                                                             monkeypatch):
    from boxlevelset.model import load_model

    real = T.train

    def interrupted(config, callbacks=(), progress=False):
        # The user presses Ctrl-C during the first iteration's callbacks.
        def press(event):
            if event.iteration == 1 and not event.done:
                os.kill(os.getpid(), signal.SIGINT)
        return real(config, callbacks=[press], progress=progress)

    monkeypatch.setattr(T, "train", interrupted)
    before = signal.getsignal(signal.SIGINT)
    try:
        code = T.run_train(_cli_args(tiny_box_folder, tmp_path / "run", "--iterations", "50"))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the run without a checkpoint")
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is before
    last = torch.load(tmp_path / "run" / "last.pth", weights_only=False)
    assert 1 <= last["iteration"] < 50 and not (tmp_path / "run" / "model.pth").exists()
    load_model(tmp_path / "run" / "last.pth", device="cpu")


def test_command_line_does_not_overwrite_an_earlier_run(tiny_box_folder, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pth").write_bytes(b"an earlier model")
    calls = []
    monkeypatch.setattr(T, "train", lambda config, **kw: calls.append(config) or out / "x")
    with pytest.raises(ValueError, match="already holds a training run.*model.pth.*--overwrite"):
        T.run_train(_cli_args(tiny_box_folder, out))
    assert not calls and (out / "model.pth").read_bytes() == b"an earlier model"
    assert T.run_train(_cli_args(tiny_box_folder, out, "--overwrite")) == 0 and calls
    (out / "last.pth").write_bytes(b"state")
    assert T.run_train(_cli_args(tiny_box_folder, out, "--resume", "auto")) == 0


def test_output_folder_that_is_a_file_fails_first_with_its_name(tiny_box_folder, tmp_path,
                                                                monkeypatch):
    import boxlevelset.data

    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    monkeypatch.setattr(boxlevelset.data, "load_box_folder",
                        lambda *a, **k: pytest.fail("data loaded before the output was checked"))
    with pytest.raises(ValueError, match="taken.*is a file"):
        train(TrainConfig(data=tiny_box_folder, preset="lite", output_dir=taken,
                          pretrained=False))
    with pytest.raises(ValueError, match="cannot create the output folder.*taken.*is a file"):
        train(TrainConfig(data=tiny_box_folder, preset="lite", output_dir=taken / "run",
                          pretrained=False))
    # A run that fails on its data leaves no empty output folder behind.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not exist"):
        train(TrainConfig(data=tmp_path / "typo", preset="lite", output_dir=tmp_path / "new",
                          pretrained=False))
    assert not (tmp_path / "new").exists()


def test_predict_and_evaluate_window_ct_as_the_model_was_trained(tmp_path, monkeypatch):
    import boxlevelset.predict as P
    from boxlevelset.model import ModelConfig, SOLOv2, load_model, save_checkpoint

    config = ModelConfig(backbone="efficientnet_lite0", num_classes=1, **TINY_MODEL)
    save_checkpoint(tmp_path / "model.pth", SOLOv2(config, pretrained=False),
                    train_config={"window": "lung"})
    model = load_model(tmp_path / "model.pth", device="cpu")
    seen = []

    def source(folder, window):
        seen.append(window)
        raise StopTraining  # enough: the folder would be loaded with this window

    class StopTraining(Exception):
        pass

    monkeypatch.setattr(P, "_load_source", source)
    for call in (lambda **kw: P.evaluate_model(model, "ct_folder", **kw),
                 lambda **kw: P.predict_folder(model, "ct_folder", tmp_path / "out", **kw)):
        with pytest.raises(StopTraining):
            call()
        with pytest.raises(StopTraining):
            call(window="bone")  # an explicit window wins
    assert seen == ["lung", "bone", "lung", "bone"]
    args = P.add_evaluate_arguments(__import__("argparse").ArgumentParser()).parse_args(
        [str(tmp_path / "model.pth"), "ct_folder"])
    with pytest.raises(StopTraining):
        P.run_evaluate(args)
    assert seen[-1] == "lung"
    # A model without a training record (built in code) keeps the old default.
    assert P.resolve_window(SOLOv2(config, pretrained=False), P.TRAINED_WINDOW) == "abdomen"


def test_resume_keeps_the_ct_window_of_the_run_it_continues(tiny_box_folder, tmp_path,
                                                            monkeypatch):
    """`train CT --window lung`, then `train CT --resume auto`: the resumed run had gone on
    with abdomen-windowed slices (the default was indistinguishable from a choice)."""
    import boxlevelset.data

    real = boxlevelset.data.load_box_folder
    windows = []

    def spy(path, window="abdomen"):
        windows.append(window)  # the window training reads the CT slices with
        return real(path, window=window)

    monkeypatch.setattr(boxlevelset.data, "load_box_folder", spy)
    out = tmp_path / "run"
    assert T.run_train(_cli_args(tiny_box_folder, out, "--window", "lung",
                                 "--iterations", "1")) == 0
    assert T.run_train(_cli_args(tiny_box_folder, out, "--resume", "auto",
                                 "--iterations", "2")) == 0
    assert windows == ["lung", "lung"]
    saved = torch.load(out / "last.pth", weights_only=False)
    assert saved["iteration"] == 2 and saved["train_config"]["window"] == "lung"
    # A window given on resume wins; a new run without one still gets abdomen.
    assert T.run_train(_cli_args(tiny_box_folder, out, "--resume", "auto", "--iterations", "3",
                                 "--window", "bone")) == 0
    assert windows[-1] == "bone"
    fresh = TrainConfig(data=tiny_box_folder, preset="lite")
    assert fresh.window == "abdomen" and "window" not in fresh.given


def test_images_without_boxes_are_reported_by_default(tiny_box_folder, tmp_path, caplog):
    """Images without boxes were left out of training with an info message that only -v
    shows; a user who expected them to count had no notice."""
    import logging

    coco = json.loads((tiny_box_folder / "annotations.json").read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 3]
    (tiny_box_folder / "annotations.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO, logger="boxlevelset.train"):
        train(TrainConfig(data=tiny_box_folder, preset="lite", output_dir=tmp_path / "run",
                          max_iterations=1, batch_size=2, min_size=(64, 80), max_size=96,
                          warmup_iters=1, pretrained=False, model=dict(TINY_MODEL)))
    notes = [r for r in caplog.records if "without boxes" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    assert notes[0].getMessage() == "1 image without boxes is not used for training: tiny_2.png"
    # Many such images: counted, not listed.
    many = T._skipped_empty_message([f"img_{i}.png" for i in range(7)])
    assert many == "7 images without boxes are not used for training"


def test_resume_with_a_new_lr_and_weight_decay_uses_them(tiny_box_folder, tmp_path):
    """The optimizer's saved state had brought back the old lr and weight decay, whatever
    the resumed run was given."""
    common = dict(data=tiny_box_folder, output_dir=tmp_path, pretrained=False, min_size=(64, 64),
                  max_size=64, batch_size=1, warmup_iters=0, lr_steps=(), model=TINY_MODEL)
    train(TrainConfig(**common, max_iterations=1, lr=0.01, weight_decay=0.1))
    seen = []
    train(TrainConfig(**common, max_iterations=2, lr=0.002, weight_decay=0.0, resume="auto"),
          callbacks=[lambda event: seen.append(event.lr)])
    assert seen and all(lr == pytest.approx(0.002) for lr in seen)
    groups = torch.load(tmp_path / "last.pth", weights_only=False)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]


def test_fp16_steps_that_all_overflow_end_the_run(tiny_box_folder, tmp_path, monkeypatch):
    """With fp16 and the GradScaler, non-finite gradients at every step had been skipped
    silently: the run "finished" and saved a model that never took an optimizer step."""
    from boxlevelset.model import SOLOv2

    monkeypatch.setattr(T, "_amp_settings", lambda config, device: (True, torch.float16))
    real_losses = SOLOv2.losses

    def trapped(self, images, feats, targets):
        losses = real_losses(self, images, feats, targets)
        # Value 0, gradient 0 x inf = NaN on every weight of the first layer.
        weight = next(p for p in self.parameters() if p.requires_grad)
        losses["loss_trap"] = torch.sqrt(0.0 * weight.sum())
        return losses

    monkeypatch.setattr(SOLOv2, "losses", trapped)
    monkeypatch.setattr(T, "MAX_SKIPPED_STEPS", 3)  # 24 by default: a short test
    config = TrainConfig(data=tiny_box_folder, output_dir=tmp_path, pretrained=False,
                         min_size=(64, 64), max_size=64, batch_size=1, warmup_iters=0,
                         max_iterations=6, model=TINY_MODEL)
    with pytest.raises(T.TrainingDiverged, match="steps in a row had non-finite gradients"):
        train(config)
    assert not (tmp_path / "model.pth").exists()


def test_one_request_sent_twice_still_saves(tiny_box_folder, tmp_path, monkeypatch):
    """torchrun forwards the SIGTERM a job scheduler also sends to the workers: the second
    copy, milliseconds later, had aborted the run without saving."""
    real = T.train

    def terminated(config, callbacks=(), progress=False):
        def twice(event):
            if event.iteration == 1 and not event.done:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
        return real(config, callbacks=[twice], progress=progress)

    monkeypatch.setattr(T, "train", terminated)
    code = T.run_train(_cli_args(tiny_box_folder, tmp_path / "run", "--iterations", "50"))
    assert code == 143 and (tmp_path / "run" / "last.pth").is_file()
    monkeypatch.setattr(T._StopOnSignal, "REPEAT_SECONDS", 0.0)  # a second, later request
    with pytest.raises(KeyboardInterrupt):
        T.run_train(_cli_args(tiny_box_folder, tmp_path / "again", "--iterations", "50"))


def test_one_named_gpu_for_several_processes_is_refused(tiny_box_folder, tmp_path,
                                                        monkeypatch):
    """Under torchrun, device="cuda:0" put every rank on that GPU."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="names one GPU, but 2 processes"):
        train(TrainConfig(data=tiny_box_folder, output_dir=tmp_path, device="cuda:0",
                          pretrained=False, max_iterations=1, model=TINY_MODEL))


def test_a_resumed_config_remembers_what_the_caller_set(tiny_box_folder):
    """resumed_from re-ran __post_init__, and every field the checkpoint filled in counted
    as set by the caller, so its lr replaced the optimizer's even when none was given."""
    saved = TrainConfig(data=tiny_box_folder, preset="lite", max_iterations=3).to_dict()
    del saved["lr"]
    again = TrainConfig(data=tiny_box_folder, preset="lite", resume="x", batch_size=1)
    assert again.resumed_from(saved).given == {"batch_size"}


def test_window_none_still_means_no_window(tiny_box_folder):
    """None is "no CT window" (HU scaled to their own range); unset is the abdomen window."""
    assert TrainConfig(data=tiny_box_folder, window=None).window is None
    assert TrainConfig(data=tiny_box_folder).window == "abdomen"
    saved = TrainConfig(data=tiny_box_folder, window=None).to_dict()
    assert TrainConfig(data=tiny_box_folder, resume="x").resumed_from(saved).window is None


def test_a_ct_folder_trains_in_the_window_it_was_annotated_in(tmp_path):
    """The plugin saves the annotator's window in a CT folder; training had windowed its
    slices as abdomen regardless (and predict then repeated that window)."""
    import json as json_

    import boxlevelset
    from boxlevelset.data import read_volume, save_box_folder

    samples = Path(boxlevelset.__file__).parent / "samples"
    volume = read_volume(samples / "ct_slice.nii.gz")
    boxes = np.array(json_.loads((samples / "ct_slice_boxes.json").read_text())["boxes_xyxy"])
    folder = save_box_folder(tmp_path / "ct", [("ct.nii.gz", volume, boxes,
                                                np.ones(len(boxes), np.int64), None, 0)],
                             [{"id": 1, "name": "organ"}], info={"window": [-20.0, 300.0]})
    common = dict(data=folder, pretrained=False, min_size=(64, 64), max_size=64,
                  batch_size=1, max_iterations=1, model=TINY_MODEL)
    out = train(TrainConfig(output_dir=tmp_path / "run", **common))
    assert list(torch.load(out, weights_only=True)["train_config"]["window"]) == [-20.0, 300.0]
    out = train(TrainConfig(output_dir=tmp_path / "lung", window="lung", **common))
    assert torch.load(out, weights_only=True)["train_config"]["window"] == "lung"


def test_train_from_python_does_not_replace_an_earlier_run(tiny_box_folder, tmp_path):
    """Only the command line and the plugin had protected an earlier run: a second
    boxlevelset.train() into the same folder silently replaced its model."""
    common = dict(data=tiny_box_folder, output_dir=tmp_path, pretrained=False, min_size=(64, 64),
                  max_size=64, batch_size=1, warmup_iters=0, lr_steps=(), model=TINY_MODEL,
                  max_iterations=1)
    first = train(TrainConfig(**common))
    before = first.read_bytes()
    with pytest.raises(ValueError, match="already holds a training run.*model.pth.*overwrite"):
        train(TrainConfig(**common, seed=5))
    assert first.read_bytes() == before
    again = train(TrainConfig(**common, seed=5, overwrite=True))
    assert again == first and again.read_bytes() != before
