"""Fine-tune widget: a few iterations through the thread_worker, progress, Stop, errors,
the reloaded model used by the box-to-mask widget (model mode and segment everything)."""

from __future__ import annotations

import torch  # noqa: F401  -- before Qt (napari) is imported

import numpy as np
import pytest

from boxlevelset.model import SOLOv2
from boxlevelset import segment_boxes
from boxlevelset_napari._box_to_mask import (
    METHOD_MODEL,
    METHOD_MODEL_REFINED,
    REFINE_STEPS,
    BoxToMaskWidget,
)
from boxlevelset_napari._finetune import SOURCE_VIEWER, FineTuneWidget
from boxlevelset_napari._layers import boxes_to_rectangles

pytestmark = [pytest.mark.plugin, pytest.mark.usefixtures("one_torch_thread")]

TINY = dict(
    pretrained=False, min_size=(64, 80), max_size=96, batch_size=2, warmup_iters=2,
    checkpoint_every=100,
    model=dict(fpn_channels=16, head_channels=16, stacked_convs=1, mask_feature_channels=16,
               mask_feature_mid_channels=16, num_grids=(12, 10, 8, 6, 4),
               feature_guide_channels=3, tree_filter_max_side=32, score_threshold=0.01),
)



def test_finetune_progress_reload_and_model_mode(tmp_path, tiny_box_folder, qtbot,
                                                 make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    image = (np.random.default_rng(0).integers(0, 30, (64, 64, 3))).astype(np.uint8)
    image[10:30, 12:28] = 220
    viewer.add_image(image, name="img", rgb=True)
    box_widget = BoxToMaskWidget(viewer)
    tune = FineTuneWidget(viewer)
    tune.folder_edit.setText(str(tiny_box_folder))
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.device_combo.setCurrentText("cpu")
    tune.config_overrides = dict(TINY, max_iterations=3)
    with qtbot.waitSignal(tune.finished, timeout=120_000):
        worker = tune.start()
        assert worker is not None and not tune.start_btn.isEnabled()
    assert tune.error is None, tune.error
    its = [e.iteration for e in tune.events]
    assert its[-1] == 3 and its == sorted(set(its))  # the last one plotted once, not twice
    assert all(np.isfinite(list(e.losses.values())).all() for e in tune.events)
    assert len(tune.plot.values) == len(its) >= 3
    assert tune.checkpoint is not None and tune.checkpoint.is_file()
    assert tune.process_check.isChecked()  # this run trained in a child process
    assert isinstance(tune.model, SOLOv2)
    assert box_widget.model is tune.model  # the new model went straight to box-to-mask
    assert box_widget.method_combo.currentText() == METHOD_MODEL
    assert "blob" in box_widget.class_names and "block" in box_widget.class_names
    assert tune.start_btn.isEnabled() and not tune.stop_btn.isEnabled()

    # Model mode: a box gives a mask from the model, inside its box, under the box's id.
    boxes = box_widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.array([[8.0, 6.0, 32.0, 34.0]])))
    labels = box_widget.labels_layer(create=False)
    box_id = int(boxes.features["box_id"][0])
    from boxlevelset.model import Predictor
    expect = Predictor(tune.model).set_image(image).predict_boxes(np.array([[8.0, 6, 32, 34]]))[0]
    assert np.array_equal(labels.data == box_id, expect)

    # "Model + level set": the model's mask refined by level-set steps, as the engine does it.
    box_widget.method_combo.setCurrentText(METHOD_MODEL_REFINED)
    boxes.add_rectangles(boxes_to_rectangles(np.array([[36.0, 30.0, 60.0, 58.0]])))
    refined_id = int(boxes.features["box_id"][1])
    expect = segment_boxes(image, np.array([[36.0, 30, 60, 58]]), model=tune.model,
                           refine=REFINE_STEPS)[0]
    assert np.array_equal(labels.data == refined_id, expect & ~(labels.data == box_id))
    box_widget.method_combo.setCurrentText(METHOD_MODEL)


def test_stop_keeps_checkpoint_and_errors_are_shown(tmp_path, tiny_box_folder, qtbot,
                                                   make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    tune = FineTuneWidget(viewer)
    tune.folder_edit.setText(str(tiny_box_folder))
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.device_combo.setCurrentText("cpu")
    tune.config_overrides = dict(TINY, max_iterations=500)
    tune.process_check.setChecked(False)  # in-thread mode (the first test covers the process)
    stopped = []

    def stop_early(event):
        if not stopped:
            stopped.append(event.iteration)
            tune.stop()

    tune._bridge.event.connect(stop_early)
    with qtbot.waitSignal(tune.finished, timeout=120_000):
        tune.start()
    assert tune.error is None, tune.error
    assert stopped and tune.events[-1].iteration < 50  # stopped long before 500
    assert tune.checkpoint is not None and tune.checkpoint.name == "last.pth"
    assert isinstance(tune.model, SOLOv2)  # the stopped run's checkpoint is loaded

    # A folder that does not exist: the error is shown in the widget, nothing re-raised
    # (in-thread mode here: the worker's own exception path).
    tune.folder_edit.setText(str(tmp_path / "missing"))
    tune.config_overrides = dict(TINY, max_iterations=2)
    with qtbot.capture_exceptions() as raised:
        with qtbot.waitSignal(tune.finished, timeout=60_000):
            tune.start()
    assert not raised
    assert tune.error is not None and "missing" in tune.status.text()

    # Training on the viewer's own boxes writes the box folder first.
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:30, 12:28] = 200
    viewer.add_image(image, name="img", rgb=True)
    shapes = viewer.add_shapes(boxes_to_rectangles(np.array([[12.0, 10, 28, 30]])),
                               features={"category": ["thing"], "box_id": [1]})
    tune.source_combo.setCurrentText(SOURCE_VIEWER)
    tune.image_combo.select(viewer.layers["img"])
    tune.boxes_combo.select(shapes)
    config = tune.make_config()
    from boxlevelset.data import load_box_folder
    folder = load_box_folder(config.data)
    assert [c["name"] for c in folder.categories] == ["thing"]
    assert np.allclose(folder.records[0].boxes, [[12, 10, 28, 30]])
    # Crops of a large image: the setting reaches training ("whole images" is 0).
    assert config.crop == 0
    tune.crop_spin.setValue(384)
    assert tune.make_config().crop == 384


def test_a_second_finetune_keeps_the_first_run(tmp_path, tiny_box_folder, qtbot,
                                               make_napari_viewer_proxy):
    """Fine-tune twice with the same output folder: the second run had replaced the first's
    model.pth, last.pth and log.csv. It now writes to a fresh sibling folder, says so in the
    status line, and its own model is the one loaded into Box to mask."""
    viewer = make_napari_viewer_proxy()
    box_widget = BoxToMaskWidget(viewer)
    tune = FineTuneWidget(viewer)
    tune.folder_edit.setText(str(tiny_box_folder))
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.device_combo.setCurrentText("cpu")
    tune.process_check.setChecked(False)
    tune.config_overrides = dict(TINY, max_iterations=1)
    with qtbot.waitSignal(tune.finished, timeout=120_000):
        tune.start()
    assert tune.error is None, tune.error
    first = tmp_path / "run"
    assert tune.checkpoint == first / "model.pth" and "earlier run" not in tune.status.text()
    kept = {name: (first / name).read_bytes() for name in ("model.pth", "last.pth", "log.csv")}

    for n in (2, 3):  # the widget unchanged, Fine-tune pressed again (and again)
        with qtbot.waitSignal(tune.finished, timeout=120_000):
            tune.start()
        assert tune.error is None, tune.error
        fresh = tmp_path / f"run-{n}"
        assert tune.checkpoint == fresh / "model.pth" and tune.checkpoint.is_file()
        assert f"run-{n}" in tune.status.text() and "earlier run" in tune.status.text()
        assert box_widget.model is tune.model and box_widget.model_path == str(tune.checkpoint)
    assert {name: (first / name).read_bytes() for name in kept} == kept
    assert tune.output_edit.text() == str(first)  # the user's choice is left as it was


def test_in_thread_training_moves_to_a_process_before_triton_first_loads(
        tmp_path, tiny_box_folder, qtbot, make_napari_viewer_proxy, monkeypatch):
    import importlib.util
    import sys

    from boxlevelset_napari import _finetune

    # As in a napari session that has not trained yet, with a CUDA build of torch: triton
    # is installed but not loaded.
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object()
                        if name == "triton" else real_find_spec(name, *a))
    assert _finetune.compiler_stack_unsafe_here()
    spawned = []
    monkeypatch.setattr(_finetune, "train_in_subprocess",
                        lambda values, on_event, stop, **_: spawned.append(values) or tmp_path)
    import boxlevelset.train

    monkeypatch.setattr(boxlevelset.train, "train",
                        lambda *a, **k: pytest.fail("trained in-thread"))
    tune = FineTuneWidget(make_napari_viewer_proxy())
    tune.folder_edit.setText(str(tiny_box_folder))
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.process_check.setChecked(False)
    with qtbot.waitSignal(tune.finished, timeout=60_000):
        tune.start()
    assert len(spawned) == 1


def test_closing_the_widget_stops_training(tmp_path, tiny_box_folder, qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    tune = FineTuneWidget(viewer)
    dock = viewer.window.add_dock_widget(tune, name="Fine-tune")
    tune.folder_edit.setText(str(tiny_box_folder))
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.device_combo.setCurrentText("cpu")
    tune.config_overrides = dict(TINY, max_iterations=100_000)  # far longer than the test
    tune.process_check.setChecked(False)
    worker = tune.start()
    qtbot.waitUntil(lambda: len(tune.events) > 0, timeout=60_000)
    # What closing the viewer or the dock does: the widget leaves its window. Training must
    # stop at its next iteration (napari waits for it before quitting) and keep a checkpoint.
    viewer.window.remove_dock_widget(dock)
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    assert (tmp_path / "run" / "last.pth").exists() and tune.events[-1].iteration < 1000


def test_a_training_process_that_dies_at_start_points_at_the_main_guard(monkeypatch):
    import queue
    import threading

    from boxlevelset_napari import _train_process as T

    class DeadProcess:  # a child that re-ran an unguarded script and died bootstrapping
        exitcode = 1

        def __init__(self, **_):
            pass

        start = join = terminate = lambda self, *a, **k: None

        def is_alive(self):
            return False

    class Context:
        Process = DeadProcess

        def Queue(self):
            return queue.Queue()

        def Event(self):
            return threading.Event()

    monkeypatch.setattr(T.mp, "get_context", lambda _method: Context())
    monkeypatch.setattr(T, "_main_is_unguarded_script", lambda: True)
    with pytest.raises(RuntimeError, match="ended unexpectedly.*__name__ == '__main__'"):
        T.train_in_subprocess({}, lambda e: None, threading.Event(), poll_s=0.01)
    monkeypatch.setattr(T, "_main_is_unguarded_script", lambda: False)
    with pytest.raises(RuntimeError, match=r"ended unexpectedly \(exit code 1\)$"):
        T.train_in_subprocess({}, lambda e: None, threading.Event(), poll_s=0.01)


def test_viewer_boxes_train_on_the_propagated_slices_too(tmp_path, make_napari_viewer_proxy):
    """'Boxes in this viewer' had trained on the drawn boxes alone, while Save annotations
    writes every propagated slice with its tight box."""
    viewer = make_napari_viewer_proxy()
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 30, size=(6, 40, 48)).astype(np.uint8)
    volume[1:5, 10:26, 12:30] = 200
    viewer.add_image(volume, name="vol")
    box_widget = BoxToMaskWidget(viewer)
    boxes = box_widget.new_boxes_layer()
    boxes.add_rectangles(boxes_to_rectangles(np.array([[12.0, 10, 30, 26]]), plane=2))
    boxes.selected_data = {0}
    box_widget.propagate_selected()
    tune = FineTuneWidget(viewer)
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.source_combo.setCurrentText(SOURCE_VIEWER)
    tune.image_combo.select(viewer.layers["vol"])
    tune.boxes_combo.select(boxes)
    from boxlevelset.data import load_box_folder

    folder = load_box_folder(tune.make_config().data)
    assert len(folder.records) == 4  # slices 1-4, not slice 2 alone
    assert all(np.allclose(r.boxes, [[12, 10, 30, 26]], atol=1) for r in folder.records)


def _folder_with_problems(tiny_box_folder, tmp_path):
    """tiny_box_folder plus an image without boxes and an image file that cannot be read."""
    import json
    import shutil

    root = tmp_path / "problems"
    shutil.copytree(tiny_box_folder, root)
    coco = json.loads((root / "annotations.json").read_text())
    (root / "images" / "empty.png").write_bytes((root / "images" / "tiny_0.png").read_bytes())
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    coco["images"] += [{"id": 10, "file_name": "empty.png", "width": 64, "height": 64},
                       {"id": 11, "file_name": "corrupt.png", "width": 64, "height": 64}]
    coco["annotations"].append({"id": 100, "image_id": 11, "category_id": 1,
                                "bbox": [4.0, 4.0, 20.0, 20.0], "area": 400.0, "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.mark.parametrize("in_process", [True, False], ids=["process", "thread"])
def test_training_warnings_reach_the_viewer(in_process, tmp_path, tiny_box_folder, qtbot,
                                            make_napari_viewer_proxy):
    """The engine's warnings while loading and training (an image without boxes, an image
    that cannot be read) went to the terminal only: a napari user never saw them. They are
    napari notifications and lines under the loss plot, each once."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    tune = FineTuneWidget(make_napari_viewer_proxy())
    tune.folder_edit.setText(str(_folder_with_problems(tiny_box_folder, tmp_path)))
    tune.output_edit.setText(str(tmp_path / "run"))
    tune.device_combo.setCurrentText("cpu")
    tune.process_check.setChecked(in_process)
    tune.config_overrides = dict(TINY, max_iterations=2)
    before = len(notification_manager.records)
    with qtbot.waitSignal(tune.finished, timeout=120_000):
        tune.start()
    assert tune.error is None, tune.error
    shown = [str(n.message) for n in notification_manager.records[before:]
             if n.severity == NotificationSeverity.WARNING]
    for expected in ("without boxes", "empty.png", "unreadable", "corrupt.png"):
        assert any(expected in text for text in shown), (expected, shown)
        assert expected in tune.log_label.text()
    assert len(shown) == len(set(shown)) == 2  # each once


def test_forwarded_warnings_are_this_threads_engine_warnings_once():
    """A warning repeated every iteration reaches the sink once; another thread's warnings
    (the viewer's, while training runs in a worker) and other packages' are not the run's."""
    import logging
    import threading
    import warnings

    from boxlevelset import data
    from boxlevelset_napari._train_process import forward_warnings

    engine_log = logging.getLogger("boxlevelset.train")
    got: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with forward_warnings(got.append):
            for _ in range(3):
                engine_log.warning("no boxes in %s", "a.png")
                warnings.warn_explicit("unreadable b.png", UserWarning, data.__file__, 1)
            warnings.warn_explicit("elsewhere", UserWarning, "/site-packages/x.py", 1)
            other = threading.Thread(target=lambda: (engine_log.warning("other thread"),
                                                     warnings.warn_explicit(
                                                         "other", UserWarning,
                                                         data.__file__, 2)))
            other.start()
            other.join()
        engine_log.warning("after the run")
    assert got == ["no boxes in a.png", "unreadable b.png"]
