"""Fine-tune widget: train the box-supervised model on a folder (or this viewer's boxes)
in a background thread_worker, with progress, a live loss plot, Stop, and the new model
loaded into the box-to-mask widget when done."""

from __future__ import annotations

import torch  # noqa: F401  -- torch must be imported before the Qt application exists

import math
import threading
from pathlib import Path
from typing import Any

import napari
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._box_to_mask import (
    BoxToMaskWidget,
    LayerCombo,
    _unwrap,
    closed_by_napari,
    hbox,
    pixels_spin,
)
from ._train_process import compiler_stack_unsafe_here, forward_warnings, train_in_subprocess
from ._layers import DEFAULT_CATEGORY, companion_layer

SOURCE_FOLDER = "Box-labeled folder"
SOURCE_VIEWER = "Boxes in this viewer"


def holds_run(folder: Path) -> bool:
    """True when `folder` holds a training run's model, checkpoint or loss log."""
    from boxlevelset.train import run_files

    return bool(run_files(folder))


def fresh_run_folder(chosen: Path) -> Path:
    """`chosen` itself, unless it holds an earlier run: then the first `<chosen>-N` (N >= 2)
    that holds none, so a new fine-tune never replaces an earlier model or log (a folder
    left by a run that failed before writing any is used again)."""
    if not holds_run(chosen):
        return chosen
    n = 2
    while holds_run(candidate := chosen.with_name(f"{chosen.name}-{n}")):
        n += 1
    return candidate


class _Bridge(QObject):
    """Carries TrainEvents and the engine's warnings from the training thread to the GUI
    thread (queued signals)."""

    event = Signal(object)
    warning = Signal(str)


class LossPlot(QWidget):
    """A minimal live plot of the total loss per iteration (no plotting library needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []
        self.setMinimumHeight(80)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(float(value))
            self.update()

    def clear(self) -> None:
        self.values = []
        self.update()

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt name)
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(30, 30, 36))
        if len(self.values) < 2:
            painter.setPen(QColor(160, 160, 160))
            painter.drawText(self.rect(), Qt.AlignCenter, "loss")
            return
        lo, hi = min(self.values), max(self.values)
        span = hi - lo or 1.0
        w, h = self.width() - 8, self.height() - 8
        n = len(self.values) - 1
        points = QPolygonF([QPointF(4 + w * i / n, 4 + h * (1 - (v - lo) / span))
                            for i, v in enumerate(self.values)])
        painter.setPen(QPen(QColor(255, 200, 0), 1.5))
        painter.drawPolyline(points)
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(6, 14, f"loss {self.values[-1]:.4f}")


class FineTuneWidget(QWidget):
    """Dock widget: fine-tune on boxes with one click."""

    finished = Signal(object)  # the checkpoint path (or None on error)

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.config: Any = None
        self.model: Any = None
        self.checkpoint: Path | None = None
        self.events: list[Any] = []
        self.warnings: list[str] = []  # the engine's warnings during this run, each once
        self.error: BaseException | None = None
        # Extra TrainConfig fields (e.g. a smaller model for a quick run); set by scripts/tests.
        self.config_overrides: dict[str, Any] = {}
        # Set when the chosen output folder held an earlier run and this one went elsewhere.
        self.output_note = ""
        self._progress: Any = None
        self._closed = False
        self._bridge = _Bridge()
        self._bridge.event.connect(self._on_event)
        self._bridge.warning.connect(self._on_warning)
        self._build_ui()

    def event(self, event: QEvent) -> bool:
        # Closing the viewer (or this dock) takes the widget out of its window: stop the
        # run then (it saves its checkpoint at the next iteration), or napari waits for the
        # whole schedule before it can quit, and updates reach deleted widgets.
        if closed_by_napari(self, event) and not self._closed:
            self._closed = True
            self.stop()
            self._bridge.event.disconnect(self._on_event)
            self._bridge.warning.disconnect(self._on_warning)
        return super().event(event)

    def _build_ui(self) -> None:
        from boxlevelset.train import PRESETS

        self.source_combo = QComboBox()
        self.source_combo.addItems([SOURCE_FOLDER, SOURCE_VIEWER])
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder with annotations.json + images/, or VOC")
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._pick_dir(self.folder_edit))
        self.image_combo = LayerCombo(self.viewer, napari.layers.Image)
        self.boxes_combo = LayerCombo(self.viewer, napari.layers.Shapes)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(sorted(PRESETS))
        self.preset_combo.setCurrentText("lite")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(12)
        self.crop_spin = pixels_spin(
            "whole images",
            "Train on random crops of this size (each around a box) of larger images: a "
            "stitched microscopy scan, resized whole to the model's input, shrinks its "
            "objects. Segment with Model tiles of about this size. 'whole images': no crops")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.setToolTip("auto: the GPU when there is one")
        self.output_edit = QLineEdit(str(Path.home() / "boxlevelset_runs" / "finetune"))
        out_browse = QPushButton("Browse…")
        out_browse.clicked.connect(lambda: self._pick_dir(self.output_edit))
        self.process_check = QCheckBox("Separate process")
        self.process_check.setToolTip("Train in a separate process: the viewer stays responsive")
        self.process_check.setChecked(True)
        self.init_edit = QLineEdit()
        self.init_edit.setPlaceholderText("optional: start from this checkpoint")
        self.start_btn = QPushButton("Fine-tune")
        self.start_btn.clicked.connect(self.start)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        self.stop_btn.clicked.connect(self.stop)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.plot = LossPlot()
        # The run's warnings (images left out ...): they outlast the status line's updates.
        self.log_label = QLabel("")
        self.log_label.setWordWrap(True)
        self.log_label.setStyleSheet("color: #e8a33c")
        self.log_label.hide()

        form = QFormLayout()
        form.addRow("Train on", self.source_combo)
        form.addRow("Folder", hbox(self.folder_edit, browse, stretch_first=True))
        form.addRow("Image", self.image_combo)
        form.addRow("Boxes", self.boxes_combo)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Crops", self.crop_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Output", hbox(self.output_edit, out_browse, stretch_first=True))
        form.addRow("Start from", self.init_edit)
        form.addRow("", self.process_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(hbox(self.start_btn, self.stop_btn))
        layout.addWidget(self.plot)
        layout.addWidget(self.status)
        layout.addWidget(self.log_label)
        layout.addStretch(1)

    def _pick_dir(self, edit: QLineEdit) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose folder", edit.text())
        if path:
            edit.setText(path)

    # --------------------------------------------------------------- run
    def _data_folder(self, output_dir: Path) -> Path:
        if self.source_combo.currentText() == SOURCE_FOLDER:
            folder = self.folder_edit.text().strip()
            if not folder:
                raise ValueError("choose a box-labeled folder to train on")
            return Path(folder)
        from ._export import save_annotations

        image, boxes = self.image_combo.layer(), self.boxes_combo.layer()
        if image is None or boxes is None or len(boxes.data) == 0:
            raise ValueError("draw some boxes on an image first (or choose a folder)")
        names = sorted({str(c) for c in boxes.features.get("category", [DEFAULT_CATEGORY])})
        return save_annotations(output_dir / "viewer_annotations", image, boxes,
                                self._masks_layer(image, boxes), names)

    def _masks_layer(self, image: Any, boxes: Any) -> Any:
        """The masks that go with these boxes: a Box to mask widget's, or '<image> masks'.
        Save annotations writes their slices too (a propagated object gives a tight box on
        every slice it reaches), so training sees what Save annotations would save."""
        for widget in BoxToMaskWidget.instances():
            if (widget.viewer is self.viewer and _unwrap(widget.image_combo.layer()) is
                    _unwrap(image) and _unwrap(widget.boxes_combo.layer()) is _unwrap(boxes)):
                return widget.labels_combo.layer()
        return companion_layer(self.viewer.layers, image.name, "masks", napari.layers.Labels)

    def make_config(self) -> Any:
        """The TrainConfig the Fine-tune button runs (its stop_event is what Stop sets)."""
        from boxlevelset.train import TrainConfig

        values = self._config_values()
        return TrainConfig(**values, stop_event=threading.Event())

    def _config_values(self) -> dict[str, Any]:
        chosen = Path(self.config_overrides.get("output_dir")
                      or self.output_edit.text().strip() or "boxlevelset_runs/finetune")
        # Training writes model.pth, last.pth and log.csv into its folder: a second run into
        # the same folder would silently replace the first's, so it goes to a fresh sibling
        # (a resume, which scripts may ask for, continues in the folder it names).
        output_dir = chosen if self.config_overrides.get("resume") else fresh_run_folder(chosen)
        self.output_note = "" if output_dir == chosen else (
            f"{chosen} holds an earlier run (kept); this one writes to {output_dir}")
        values: dict[str, Any] = dict(
            data=str(self._data_folder(output_dir)),
            preset=self.preset_combo.currentText(),
            output_dir=str(output_dir),
            epochs=int(self.epochs_spin.value()),
            device=self.device_combo.currentText(),
            crop=int(self.crop_spin.value()),
        )
        if self.init_edit.text().strip():
            values["init_checkpoint"] = self.init_edit.text().strip()
        values.update(self.config_overrides)
        values["output_dir"] = str(output_dir)
        return values

    def start(self) -> Any:
        """Start fine-tuning in a background thread; returns the worker (None on bad input)."""
        from boxlevelset.train import TrainConfig, train

        if self.worker is not None:
            show_info("boxlevelset: fine-tuning is already running")
            return self.worker
        try:
            values = self._config_values()
            self.config = TrainConfig(**values, stop_event=threading.Event())  # validates
        except Exception as err:
            self._fail(err)
            return None
        self.events, self.warnings, self.error, self.checkpoint = [], [], None, None
        self.plot.clear()
        self.log_label.clear()
        self.log_label.hide()
        config, bridge = self.config, self._bridge
        in_process = self.process_check.isChecked()
        if not in_process and compiler_stack_unsafe_here():
            in_process = True
            show_info("boxlevelset: training in a separate process: building the optimizer "
                      "loads triton, whose LLVM can crash napari after Mesa's OpenGL has loaded")

        def run() -> Path:
            if in_process:
                return train_in_subprocess(values, bridge.event.emit, config.stop_event,
                                           on_warning=bridge.warning.emit)
            with forward_warnings(bridge.warning.emit):
                return train(config, callbacks=[bridge.event.emit])

        # Connecting "errored" keeps thread_worker from re-raising: the error is shown instead.
        self.worker = thread_worker(run)(_connect={
            "returned": self._on_returned, "errored": self._on_errored,
            "finished": self._on_finished})
        self.start_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.status.setText(f"starting… {self.output_note}".strip())
        if self.output_note:
            show_info(f"boxlevelset: {self.output_note}")
        return self.worker

    def stop(self) -> None:
        """Ask training to stop; it saves a checkpoint first, which is then loaded."""
        if self.config is not None and self.config.stop_event is not None:
            self.config.stop_event.set()
            self.stop_btn.setEnabled(False)
            self.status.setText("stopping after this iteration…")

    # ------------------------------------------------------------ events
    def _on_event(self, event: Any) -> None:
        if getattr(event, "done", False) and self.events and \
                self.events[-1].iteration == event.iteration:
            return  # the run's closing event repeats its last iteration: plotted once
        self.events.append(event)
        losses = dict(event.losses or {})
        total = losses.get("loss", sum(v for k, v in losses.items() if k.startswith("loss_")))
        eta = int(event.eta_seconds) if math.isfinite(event.eta_seconds) else 0
        # napari's progress bar runs Qt's event loop when it updates: the run's "finished"
        # can be handled in there and close the bar, and a late event must not open a new one.
        if self._progress is None and self.worker is not None:
            self._progress = progress(total=int(event.max_iterations), desc="fine-tune")
            if self.worker is None:  # the run finished while the bar was being added
                self._progress.close()
                self._progress = None
        bar = self._progress
        if bar is not None:
            bar.update(int(event.iteration) - bar.n)  # emits the value napari's bar shows
            bar.set_description(f"fine-tune loss {total:.3f} ETA {eta}s")  # also refreshes
        self.plot.add(float(total))
        if self.worker is None:  # finished meanwhile: its closing message stays
            return
        self.status.setText(
            f"iteration {event.iteration}/{event.max_iterations}  epoch {event.epoch}  "
            f"loss {total:.4f}  lr {event.lr:.2e}  ETA {eta} s")

    def _on_warning(self, text: str) -> None:
        """A warning of the engine's: a notification and a line under the plot, once a run."""
        if text in self.warnings:
            return
        self.warnings.append(text)
        self.log_label.setText("\n".join(f"warning: {w}" for w in self.warnings))
        self.log_label.show()
        show_warning(f"boxlevelset fine-tune: {text}")

    def _on_returned(self, path: Any) -> None:
        from boxlevelset import load_model

        self.checkpoint = Path(path)
        if self._closed:  # the viewer is gone: the checkpoint is on disk, nothing to show
            return
        try:
            device = self.device_combo.currentText()
            self.model = load_model(self.checkpoint, device=None if device == "auto" else device)
        except Exception as err:
            self._fail(err)
            return
        loaded = 0
        for widget in BoxToMaskWidget.instances():
            if _unwrap(widget.viewer) is _unwrap(self.viewer):
                widget.set_model(self.model, str(self.checkpoint))
                loaded += 1
        where = " and loaded into Box to mask" if loaded else ""
        kept = f" ({self.output_note})" if self.output_note else ""
        self.status.setText(f"done: {self.checkpoint}{where}{kept}")
        show_info(f"boxlevelset: fine-tuned model saved to {self.checkpoint}{where}")

    def _on_errored(self, err: BaseException) -> None:
        self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self.error = err
        if self._closed:
            return
        self.status.setText(f"error: {err}")
        show_error(f"boxlevelset fine-tune failed: {err}")

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        if self._closed:
            return
        self.start_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
        self.finished.emit(self.checkpoint)
