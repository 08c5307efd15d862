"""Box-to-mask widget: draw rectangles, get one mask (one label id) per box.

The widget watches a boxes Shapes layer. Every box gets a `box_id` feature that is also
the label id of its mask in the output Labels layer. Adding, moving or deleting a box
updates that box's mask only; pixels the user painted by hand are detected (the label's
pixels differ from what the widget last wrote) and are not overwritten without asking.
Masks come from `boxlevelset.segment_boxes` (model-free level set) or from a loaded model
through `boxlevelset.model.Predictor`.
"""

from __future__ import annotations

import torch  # noqa: F401  -- torch must be imported before the Qt application exists

import contextlib
import hashlib
import time
import weakref
from typing import TYPE_CHECKING, Any

import napari
import numpy as np
import pandas as pd
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    from boxlevelset.export import BoxMasks

from ._layers import (
    DEFAULT_CATEGORY,
    META_KEY,
    boxes_layer_kwargs,
    boxes_to_rectangles,
    companion_layer,
    companion_name,
    contrast_window,
    plugin_meta,
    rectangles_to_boxes,
)

NEW_LAYER = "<new layer>"
# A Segment press over more boxes than this first lists the label ids on each plane (one
# pass), so that new boxes skip two whole-plane checks each; live edits (a box or a few)
# do the checks instead of the pass.
PRESENT_IDS_FROM = 32
METHOD_LEVELSET = "Level set (no model)"  # graph cut first on CT, plain evolution otherwise
METHOD_LEVELSET_EVOLVE = "Level set, evolution only"
METHOD_LEVELSET_CUT = "Level set, graph cut first"
LEVELSET_SOLVERS = {METHOD_LEVELSET: None, METHOD_LEVELSET_EVOLVE: "evolve",
                    METHOD_LEVELSET_CUT: "cut"}
METHOD_MODEL = "Model"
METHOD_MODEL_REFINED = "Model + level set"
# Level-set steps after the model's mask (held-out DSB, benchmarks/box_prompt_refine.py:
# box-prompt mean IoU / AP 0.799 / 0.560 -> 0.885 / 0.743).
REFINE_STEPS = 25
HAND_EDIT_POLICIES = ("ask", "keep", "overwrite")


def pixels_spin(off_text: str, tooltip: str) -> QSpinBox:
    """A size in pixels, in steps of 64, whose 0 shows ``off_text`` (tiles, crops)."""
    spin = QSpinBox()
    spin.setRange(0, 8192)
    spin.setSingleStep(64)
    spin.setSpecialValueText(off_text)
    spin.setSuffix(" px")
    spin.setToolTip(tooltip)
    return spin


def hbox(*widgets: QWidget, stretch_first: bool = False) -> QHBoxLayout:
    """A row of widgets for a form; with stretch_first the first one takes the spare width."""
    row = QHBoxLayout()
    for i, widget in enumerate(widgets):
        row.addWidget(widget, 1 if stretch_first and i == 0 else 0)
    return row


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one type, kept in sync with the layer list."""

    def __init__(self, viewer: napari.Viewer, layer_type: type, allow_new: bool = False):
        super().__init__()
        self._viewer = viewer
        self._type = layer_type
        self._allow_new = allow_new
        self._chosen: Any = None  # the layer object: a rename must not lose the choice
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.currentTextChanged.connect(self._remember)
        self.refresh()

    def _on_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh)
        self.refresh()

    def _remember(self, name: str) -> None:
        self._chosen = _unwrap(self._viewer.layers[name]) if name in self._viewer.layers \
            else None

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        layers = [layer for layer in self._viewer.layers if isinstance(layer, self._type)]
        names = [layer.name for layer in layers]
        chosen = next((layer.name for layer in layers if _unwrap(layer) is self._chosen), None)
        if self._allow_new:
            names = [NEW_LAYER, *names]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if chosen is not None:
            self.setCurrentText(chosen)
        elif current in names:
            self.setCurrentText(current)
        elif names and not self._allow_new:
            self.setCurrentIndex(len(names) - 1)  # newest layer of that type
        self.blockSignals(False)
        self._remember(self.currentText())
        if self.currentText() != current and self.currentText() != chosen:
            self.currentTextChanged.emit(self.currentText())

    def layer(self) -> Any:
        name = self.currentText()
        if not name or name == NEW_LAYER or name not in self._viewer.layers:
            return None
        return self._viewer.layers[name]

    def select(self, layer: Any) -> None:
        self.refresh()
        self.setCurrentText(layer.name)


def closed_by_napari(widget: QWidget, event: QEvent) -> bool:
    """True for the event that takes a docked widget out of its window: napari's dock close
    button and closing the viewer set its parent to None without deleting it (a widget not
    yet docked, as in scripts, is not closed by getting its first parent)."""
    if event.type() != QEvent.ParentChange:
        return False
    if widget.parent() is not None:
        widget.setProperty("boxlevelset_docked", True)
        return False
    return bool(widget.property("boxlevelset_docked"))


Window = tuple[slice, slice]


def _window(mask: np.ndarray) -> Window | None:
    """The rows and columns a 2D boolean mask's pixels span (None for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _span(a: Window | None, b: Window | None) -> Window | None:
    """The smallest window holding both (None for none)."""
    if a is None or b is None:
        return a or b
    return (slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
            slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)))


def _tight(window: Window, crop: np.ndarray) -> tuple[Window | None, np.ndarray | None]:
    """A crop at ``window`` of a plane cut down to its pixels' own window."""
    inner = _window(crop)
    if inner is None:
        return None, None
    top, left = window[0].start, window[1].start
    return ((slice(top + inner[0].start, top + inner[0].stop),
             slice(left + inner[1].start, left + inner[1].stop)), crop[inner])


def _digest_crop(window: Window | None, crop: np.ndarray | None,
                 shape: tuple[int, ...]) -> bytes:
    """A short fingerprint of a plane-sized mask given as its tight crop (kept per painted
    mask instead of the mask)."""
    if window is None:
        key = b"empty" + repr(tuple(shape)).encode()
    else:
        place = (tuple(shape), window[0].start, window[1].start, crop.shape)
        key = np.packbits(crop).tobytes() + repr(place).encode()
    return hashlib.blake2b(key, digest_size=16).digest()


def _digest(mask: np.ndarray) -> bytes:
    """The fingerprint of a plane-sized boolean mask (see _digest_crop)."""
    mask = np.asarray(mask, dtype=bool)
    window = _window(mask)
    return _digest_crop(window, None if window is None else mask[window], mask.shape)


class _Owned:
    """The pixels the widget wrote for one box on one plane, kept as the crop around them:
    a whole plane per box cost 4 MB a box on a 2000x2000 image (1 GB for 250 nuclei)."""

    __slots__ = ("window", "crop")

    def __init__(self, window: Window | None, crop: np.ndarray | None):
        self.window, self.crop = window, crop

    @classmethod
    def of(cls, mask: np.ndarray) -> _Owned:
        """From a plane-sized mask."""
        window = _window(mask)
        return cls(window, None if window is None else mask[window].copy())

    def equals(self, mask: np.ndarray) -> bool:
        """Whether the plane-sized ``mask`` holds exactly these pixels."""
        return self.matches(mask, True, int(np.count_nonzero(mask)))

    def matches(self, plane: np.ndarray, label: Any, count: int) -> bool:
        """Whether ``label``'s pixels in ``plane``, ``count`` of them, are exactly these (the
        count, known for all labels of a plane at once, spares a full-plane compare)."""
        if self.crop is None:
            return count == 0
        return count == int(self.crop.sum()) and \
            np.array_equal(np.asarray(plane[self.window]) == label, self.crop)

    def discard(self, window: Window, crop: np.ndarray) -> None:
        """Drop the pixels of the mask ``crop`` at ``window`` (another box took them)."""
        if self.crop is None:
            return
        (rows, cols), (own_rows, own_cols) = window, self.window
        r0, r1 = max(rows.start, own_rows.start), min(rows.stop, own_rows.stop)
        c0, c1 = max(cols.start, own_cols.start), min(cols.stop, own_cols.stop)
        if r0 < r1 and c0 < c1:
            self.crop[r0 - own_rows.start:r1 - own_rows.start,
                      c0 - own_cols.start:c1 - own_cols.start] &= \
                ~crop[r0 - rows.start:r1 - rows.start, c0 - cols.start:c1 - cols.start]


def _summary(head: str, notes: list[tuple[int, str]]) -> str:
    """A status line: ``head``, then "; <count> <text>" for each note that counted any."""
    return head + "".join(f"; {count} {text}" for count, text in notes if count)


def _unwrap(obj: Any) -> Any:
    """The layer behind napari's PublicOnlyProxy (plugins receive proxied viewers)."""
    return getattr(obj, "__wrapped__", obj)


class BoxToMaskWidget(QWidget):
    """Dock widget: boxes on a Shapes layer -> one mask per box in a Labels layer."""

    # Live widgets, so a finished fine-tune run can hand its model to the viewer's widget.
    _instances: weakref.WeakSet = weakref.WeakSet()
    # (tiles done, tiles) from Segment everything's worker thread, shown in the GUI thread.
    tiles_done = Signal(int, int)

    @classmethod
    def instances(cls) -> list[BoxToMaskWidget]:
        return list(cls._instances)

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        BoxToMaskWidget._instances.add(self)
        self.viewer = napari_viewer
        self.model: Any = None
        self.model_path: str | None = None
        self._predictor: Any = None
        self._predictor_key: tuple | None = None
        self.everything_worker: Any = None  # Segment everything's tiles, while they run
        self._detached = False
        self.tiles_done.connect(self._tile_done)
        self._bound: Any = None  # the boxes layer whose events we listen to
        self._busy = False
        self._defer_refresh = False  # while Segment paints many boxes: one redraw at the end
        # While Segment paints many boxes: the label ids on each plane (a superset: ids are
        # only added by painting), so a box whose id is not there skips whole-plane checks.
        self._present: dict[int | None, set[int]] | None = None
        self._geom: dict[int, tuple] = {}  # box_id -> (plane, x0, y0, x1, y1) last segmented
        self._written: dict[int, dict[int, _Owned]] = {}  # box_id -> plane -> owned pixels
        # Digests of every mask the widget painted, per (box_id, plane): napari's undo and
        # redo bring back earlier ones, which are the widget's work, not hand edits.
        self._painted: dict[tuple[int, int | None], set[bytes]] = {}
        self._locked: set[int] = set()  # accepted boxes: edits no longer change their masks
        self._next_label = 1
        self.last_latency_s: float | None = None
        # Ask the user through a dialog; tests and scripts may replace this callable.
        self.confirm_overwrite = self._ask_overwrite
        self._build_ui()
        self._match_masks_layer()
        self.viewer.layers.events.inserted.connect(self._match_masks_layer)
        self._bind_boxes()
        self._keys = {"Shift-S": lambda _v: self.segment(), "Shift-A": lambda _v: self.accept()}
        for key, action in self._keys.items():
            self.viewer.bind_key(key, action, overwrite=True)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layers = napari.layers
        self.image_combo = LayerCombo(self.viewer, layers.Image)
        self.boxes_combo = LayerCombo(self.viewer, layers.Shapes)
        self.labels_combo = LayerCombo(self.viewer, layers.Labels, allow_new=True)
        self.new_boxes_btn = QPushButton("New")
        self.new_boxes_btn.clicked.connect(self.new_boxes_layer)
        self.new_boxes_btn.setToolTip(
            "New boxes layer. Draw each box around one object: tight, and the level set takes "
            "the box's sides as the object's extent; loosely, with 'Loose boxes' ticked "
            "(on CT images it is ticked by itself)")
        self.class_combo = QComboBox()
        self.class_combo.setEditable(True)
        self.class_combo.addItem(DEFAULT_CATEGORY)
        self.class_combo.setToolTip("Category of new (and selected) boxes; type a name to add one")
        self.class_combo.currentTextChanged.connect(self.set_category)
        # Picking the class the box already shows changes no text: relabel on the pick too.
        self.class_combo.activated.connect(
            lambda index: self.set_category(self.class_combo.itemText(index)))

        self.method_combo = QComboBox()
        self.method_combo.addItems([*LEVELSET_SOLVERS, METHOD_MODEL, METHOD_MODEL_REFINED])
        self.method_combo.setToolTip(
            "Level set (no model): a graph cut then a short evolution on CT layers, the "
            "evolution alone on other images; the two 'Level set, ...' entries force one")
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("checkpoint (.pt)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.load_btn = QPushButton("Load model")
        self.load_btn.clicked.connect(lambda: self.load_model(self.model_edit.text()))
        self.model_label = QLabel("no model loaded")

        # Short labels, the explanation in tooltips: the dock must leave room for the image.
        self.live_check = QCheckBox("Live")
        self.live_check.setToolTip("Segment each box when it is drawn or edited")
        self.live_check.setChecked(True)
        self.overwrite_check = QCheckBox("Overwrite labels")
        self.overwrite_check.setToolTip("New masks overwrite existing labels (otherwise "
                                        "existing labels win overlaps)")
        self.loose_check = QCheckBox("Loose boxes")
        self.loose_check.setToolTip(
            "The level set takes each box to touch its object on all four sides; tick this "
            "for boxes drawn loosely (no box projection, no background ring, and the mask "
            "pays for running along the box's edge). Ticked by itself for CT images until "
            "you set it")
        # On CT the loose-box energy holds its masks at any looseness and gives up 0.014 mean
        # IoU on exact boxes (README "Loose boxes"): boxes drawn by hand get it by default,
        # until the user sets the box themselves (clicked: user actions only).
        self._loose_set_by_user = False
        self.loose_check.clicked.connect(self._loose_clicked)
        self.hand_combo = QComboBox()
        self.hand_combo.addItems(HAND_EDIT_POLICIES)
        self.segment_btn = QPushButton("Segment boxes (Shift-S)")
        self.segment_btn.clicked.connect(self.segment)
        self.accept_btn = QPushButton("Accept masks (Shift-A)")
        self.accept_btn.setToolTip("Lock the current masks: editing or deleting their boxes "
                                   "no longer changes them")
        self.accept_btn.clicked.connect(self.accept)

        self.score_slider = QSlider(Qt.Horizontal)
        self.score_slider.setRange(0, 100)
        self.score_slider.setValue(30)
        self.score_label = QLabel("0.30")
        self.score_slider.valueChanged.connect(
            lambda v: self.score_label.setText(f"{v / 100:.2f}"))
        self.everything_btn = QPushButton("Segment everything")
        self.everything_btn.clicked.connect(self.segment_everything)
        self.tile_spin = pixels_spin(
            "whole image",
            "Run the model (box prompts and Segment everything) in overlapping tiles of "
            "this size, about the size of the images it was trained on: a large microscopy "
            "mosaic, shrunk whole to the model's input, loses its small objects. 'whole "
            "image': no tiles")
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.05, 0.99)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setValue(0.5)
        self.slices_spin = QSpinBox()
        self.slices_spin.setRange(0, 9999)
        self.slices_spin.setSpecialValueText("all")  # 0: until the walk stops by itself
        self.slices_spin.setToolTip("At most this many slices above and below the box's "
                                    "slice (an organ's ends are where a walk leaks most)")
        self.propagate_btn = QPushButton("Propagate selected box")
        self.propagate_btn.setToolTip("Carry the selected box's mask, with your corrections, "
                                      "to the slices above and below, each slice's mask "
                                      "giving the next box")
        # Through a lambda: Qt would pass the button's checked=False as max_slices.
        self.propagate_btn.clicked.connect(lambda: self.propagate_selected())

        self.export_coco_btn = QPushButton("Export COCO JSON…")
        self.export_coco_btn.clicked.connect(lambda: self._export_dialog("coco"))
        self.export_labels_btn = QPushButton("Export label image…")
        self.export_labels_btn.clicked.connect(lambda: self._export_dialog("labels"))
        self.export_nifti_btn = QPushButton("Export label volume (NIfTI)…")
        self.export_nifti_btn.clicked.connect(lambda: self._export_dialog("nifti"))
        self.save_btn = QPushButton("Save annotations (box folder)…")
        self.save_btn.clicked.connect(lambda: self._export_dialog("folder"))
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Boxes", hbox(self.boxes_combo, self.new_boxes_btn, stretch_first=True))
        form.addRow("Masks into", self.labels_combo)
        form.addRow("Class", self.class_combo)
        form.addRow("Method", self.method_combo)
        form.addRow("Model", hbox(self.model_edit, browse, stretch_first=True))
        form.addRow("Device", hbox(self.device_combo, self.load_btn))
        form.addRow("", self.model_label)
        form.addRow("Model tiles", self.tile_spin)
        self.hand_combo.setToolTip("Masks edited by hand, when their box is moved or "
                                   "deleted or a propagation reaches their slice: ask, keep "
                                   "them (a propagation carries on from a kept one), or "
                                   "overwrite them")
        form.addRow("Hand edits", self.hand_combo)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(hbox(self.live_check, self.overwrite_check, self.loose_check))
        layout.addWidget(self.segment_btn)
        layout.addWidget(self.accept_btn)
        group = QGroupBox("Model: segment everything")
        g = QHBoxLayout(group)
        g.addWidget(QLabel("score ≥"))
        g.addWidget(self.score_slider, 1)
        g.addWidget(self.score_label)
        g.addWidget(self.everything_btn)
        layout.addWidget(group)
        group = QGroupBox("Volumes: propagate")
        g = QVBoxLayout(group)
        g.addLayout(hbox(QLabel("min overlap"), self.overlap_spin, QLabel("slices"),
                         self.slices_spin))
        g.addWidget(self.propagate_btn)
        layout.addWidget(group)
        group = QGroupBox("Export")
        g = QVBoxLayout(group)
        for btn in (self.export_coco_btn, self.export_labels_btn, self.export_nifti_btn,
                    self.save_btn):
            g.addWidget(btn)
        layout.addWidget(group)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.boxes_combo.currentTextChanged.connect(self._on_boxes_changed)
        self.labels_combo.currentTextChanged.connect(lambda _t: self._switch_masks_layer())
        self.image_combo.currentTextChanged.connect(lambda _t: self._update_enabled())
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        self._image_ref = _unwrap(self.image_combo.layer())
        self._loose_for(self.image_combo.layer())
        self._update_enabled()

    def event(self, event: QEvent) -> bool:
        # A closed dock's widget is not deleted: stop answering box edits, or it keeps painting.
        if closed_by_napari(self, event):
            self.detach()
        return super().event(event)

    def _on_image_changed(self, *_: Any) -> None:
        """Another image chosen (by hand, or because the old one was closed): take its own
        boxes and masks layers when it has them. A masks layer of another image is let go
        (back to a new layer): this image's masks painted there mixed two images' labels,
        or failed on the other size."""
        image = self.image_combo.layer()
        previous, self._image_ref = self._image_ref, _unwrap(image)
        if image is None or _unwrap(image) is previous:
            return
        self._loose_for(image)
        layers = self.viewer.layers
        labels = self.labels_combo.layer()
        if labels is not None and not self._masks_fit(labels, image, previous):
            self.labels_combo.setCurrentText(NEW_LAYER)
        self._match_masks_layer()
        own = companion_layer(layers, image.name, "boxes", napari.layers.Shapes)
        if own is not None:
            self.boxes_combo.select(own)
            # The next box drawn goes into the active layer: make it the one we listen to.
            layers.selection.active = own
        elif self._named_for_another_image(self.boxes_combo.layer(), "boxes", image, previous):
            # Boxes drawn next in the old image's layer would be segmented on this image.
            self.new_boxes_layer()

    def _on_boxes_changed(self, *_: Any) -> None:
        """Another boxes layer chosen: when it is named after another image ('<image>
        boxes'), that image is chosen first, so its boxes are segmented on its own pixels
        and into its own masks layer."""
        boxes = self.boxes_combo.layer()
        owner = next((layer for layer in self.viewer.layers
                      if isinstance(layer, napari.layers.Image) and boxes is not None
                      and boxes.name == companion_name(layer.name, "boxes")), None)
        if owner is not None and _unwrap(owner) is not _unwrap(self.image_combo.layer()):
            self.image_combo.select(owner)  # _on_image_changed also matches the masks layer
        self._bind_boxes()

    def _other_images(self, image: Any, previous: Any = None) -> list:
        """The image layers other than ``image``, and ``previous``, the image chosen before
        (which may just have been deleted: its layers are still its own)."""
        this = _unwrap(image)
        others = [layer for layer in self.viewer.layers
                  if isinstance(layer, napari.layers.Image) and _unwrap(layer) is not this]
        if previous is not None and previous is not this:
            others.append(previous)
        return others

    def _named_for_another_image(self, layer: Any, kind: str, image: Any,
                                 previous: Any = None) -> bool:
        """Whether ``layer`` is the boxes or masks layer (``kind``) of an image layer other
        than ``image``, or of ``previous``, by its name (``companion_name``)."""
        return layer is not None and any(layer.name == companion_name(other.name, kind)
                                         for other in self._other_images(image, previous))

    def _loose_clicked(self, *_: Any) -> None:
        self._loose_set_by_user = True

    def _loose_for(self, image: Any) -> None:
        """*Loose boxes* follows the image's kind (ticked for CT) until the user sets it."""
        if image is not None and not self._loose_set_by_user:
            self.loose_check.setChecked(self._window(image) is not None)

    def _masks_fit(self, labels: Any, image: Any, previous: Any = None) -> bool:
        """Whether ``labels`` can hold ``image``'s masks: the same pixel grid, and not named
        after another image layer ('<other> masks', as this widget and the reader name
        them) nor after ``previous``, the image chosen before (perhaps just deleted)."""
        shape = image.data.shape[:-1] if image.rgb else image.data.shape
        if tuple(labels.data.shape) != tuple(shape):
            return False
        return not self._named_for_another_image(labels, "masks", image, previous)

    def _match_masks_layer(self, *_: Any) -> None:
        """While 'Masks into' says new layer, take the image's own masks layer when there
        is one ('<image> masks', as this widget and the folder reader name it), so a
        reopened folder's masks are kept and a reopened widget does not start a second
        masks layer."""
        image = self.image_combo.layer()
        if image is None or self.labels_combo.currentText() != NEW_LAYER:
            return
        own = companion_layer(self.viewer.layers, image.name, "masks", napari.layers.Labels)
        if own is not None:
            self.labels_combo.select(own)

    def detach(self) -> None:
        """Stop listening to the boxes layer and release the keys (the widget was closed)."""
        self._detached = True  # a Segment everything still running adds nothing
        self.boxes_combo.blockSignals(True)  # no re-binding from layer-list events
        self.viewer.layers.events.inserted.disconnect(self._match_masks_layer)
        self._unbind_boxes()
        for key, action in self._keys.items():
            unbound = self.viewer.bind_key(key, None)
            if unbound is not None and unbound is not action:  # a newer widget's: keep it
                self.viewer.bind_key(key, unbound, overwrite=True)

    def _update_enabled(self) -> None:
        image = self.image_combo.layer()
        self.everything_btn.setEnabled(self.model is not None and image is not None
                                       and self.everything_worker is None)
        self.propagate_btn.setEnabled(image is not None and self._spatial_ndim(image) == 3)
        self.export_nifti_btn.setEnabled(
            image is not None and plugin_meta(image).get("kind") == "ct")

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------ layers
    @staticmethod
    def _spatial_ndim(image: Any) -> int:
        return image.data.ndim - (1 if image.rgb else 0)

    def _image(self) -> Any:
        image = self.image_combo.layer()
        if image is None:
            raise ValueError("add or open an image first")
        if image.multiscale:
            raise ValueError(f"image layer {image.name!r} is multiscale; open a single-scale image")
        if self._spatial_ndim(image) not in (2, 3):
            raise ValueError(f"image layer {image.name!r} must be 2D or a 3D stack, "
                             f"got shape {image.data.shape}")
        return image

    def new_boxes_layer(self) -> Any:
        """Add an empty boxes layer over the current image, in rectangle mode."""
        image = self._image()
        kwargs = boxes_layer_kwargs(default_category=self.category, scale=image.scale,
                                    name=companion_name(image.name, "boxes"),
                                    class_names=self.class_names)
        kwargs["ndim"] = self._spatial_ndim(image)
        kwargs["translate"] = image.translate
        layer = self.viewer.add_shapes(None, **kwargs)
        self.boxes_combo.select(layer)
        self._bind_boxes()
        layer.mode = "add_rectangle"
        return layer

    def boxes_layer(self, create: bool = True) -> Any:
        layer = self.boxes_combo.layer()
        if layer is None and create:
            layer = self.new_boxes_layer()
        return layer

    def labels_layer(self, create: bool = True) -> Any:
        layer = self.labels_combo.layer()
        if layer is None and create:
            image = self._image()
            shape = image.data.shape[:-1] if image.rgb else image.data.shape
            meta = {META_KEY: dict(plugin_meta(image))}
            layer = self.viewer.add_labels(np.zeros(shape, dtype=np.int32),
                                           name=companion_name(image.name, "masks"),
                                           scale=image.scale,
                                           translate=image.translate, metadata=meta)
            boxes = self.boxes_combo.layer()
            if boxes is not None:  # keep the boxes above the masks and active for drawing
                self.viewer.layers.move(self.viewer.layers.index(layer),
                                        self.viewer.layers.index(boxes))
                self.viewer.layers.selection.active = boxes
            self.labels_combo.select(layer)
        return layer

    def _bind_boxes(self) -> None:
        layer = self.boxes_combo.layer()
        if _unwrap(layer) is _unwrap(self._bound):
            return
        self._unbind_boxes()
        self._bound = layer
        self._geom.clear()
        self._written.clear()
        self._locked.clear()
        if layer is None:
            return
        names = list(plugin_meta(layer).get("class_names", []))
        if names and self.class_names == [DEFAULT_CATEGORY]:  # untouched default: replace it
            self.class_combo.blockSignals(True)
            self.class_combo.clear()
            self.class_combo.blockSignals(False)
        for name in names:
            if self.class_combo.findText(name) < 0:
                self.class_combo.addItem(name)
        if "category" in layer.features and len(layer.features):
            for name in layer.features["category"].astype(str).unique():
                if self.class_combo.findText(name) < 0:
                    self.class_combo.addItem(name)
        features = layer.features
        if "category" not in features or "box_id" not in features:
            # A plain Shapes layer (napari's own 'new shapes layer'): add the box columns.
            features = features.copy()
            if "category" not in features:
                features["category"] = pd.Series([self.category] * len(features), dtype=object)
            if "box_id" not in features:
                features["box_id"] = np.full(len(features), -1, dtype=np.int64)
            layer.features = features
        # New boxes get the class the dropdown shows, not the layer's own earlier default.
        layer.feature_defaults = {"category": self.category, "box_id": -1}
        self._to_image_pixels(layer)
        layer.events.data.connect(self._on_data)
        # napari's paste adds shapes without a data event; it does emit a features event.
        layer.events.features.connect(self._on_features)
        self._adopt_existing()

    def _unbind_boxes(self) -> None:
        if self._bound is not None:
            try:
                self._bound.events.data.disconnect(self._on_data)
                self._bound.events.features.disconnect(self._on_features)
            except (TypeError, RuntimeError, ValueError):
                pass
        self._bound = None

    def _to_image_pixels(self, layer: Any) -> None:
        """Give a boxes layer the image's scale and translate, moving its vertices so the
        boxes stay where they are on screen: box vertices are then image pixels. (napari's
        own 'new shapes layer' button makes a layer of scale 1, in world units.)"""
        image = self.image_combo.layer()
        if image is None or layer.ndim != self._spatial_ndim(image):
            return
        scale, translate = np.asarray(layer.scale), np.asarray(layer.translate)
        to_scale, to_translate = np.asarray(image.scale), np.asarray(image.translate)
        if np.allclose(scale, to_scale) and np.allclose(translate, to_translate):
            return
        data = [(np.asarray(v) * scale + translate - to_translate) / to_scale
                for v in layer.data]
        self._busy = True
        try:
            layer.scale, layer.translate = to_scale, to_translate
            if data:
                features = layer.features.copy()
                layer.data = data
                layer.features = features
        finally:
            self._busy = False

    def _switch_masks_layer(self) -> None:
        """Masks go to another layer: what the widget wrote belongs to the old one (the
        user's now, left as it is); boxes with pixels in the new one keep them."""
        self._geom.clear()
        self._written.clear()
        self._painted.clear()
        self._locked.clear()
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        """Boxes whose label already has pixels (e.g. a reopened folder, or a masks layer
        chosen again) keep those masks, on every plane: a propagated box's label spans
        slices."""
        labels = self.labels_combo.layer()
        if labels is None or self._bound is None:
            return
        data = np.asarray(labels.data)
        boxes = [b for b in self._boxes() if b[0] not in self._written]
        if not boxes:
            return
        # label -> planes holding it, in one pass (not one whole-plane compare per box: 0.2 s
        # for the 961 boxes of a 2048x2048 tile)
        planes_of: dict[int, list] = {}
        for z in range(data.shape[0]) if data.ndim == 3 else [None]:
            for label in np.unique(data if z is None else data[z]):
                planes_of.setdefault(int(label), []).append(z)
        for box_id, plane, box, _cat in boxes:
            planes = planes_of.get(box_id, [])
            owned = {p: (data[p] if p is not None else data) == box_id for p in planes}
            owned = {p: m for p, m in owned.items() if m.any()}
            if not owned:
                continue
            if plane in owned:
                self._geom[box_id] = self._key(plane, box)
            self._written[box_id] = {p: _Owned.of(m) for p, m in owned.items()}
            for p, m in owned.items():
                self._painted.setdefault((box_id, p), set()).add(_digest(m))

    # ----------------------------------------------------------- categories
    @property
    def category(self) -> str:
        return self.class_combo.currentText().strip() or DEFAULT_CATEGORY

    @property
    def class_names(self) -> list[str]:
        return [self.class_combo.itemText(i) for i in range(self.class_combo.count())]

    def set_category(self, name: str) -> None:
        """Category for new boxes, also applied to the boxes selected in select mode."""
        name = name.strip()
        layer = self.boxes_combo.layer()
        if not name or layer is None:
            return
        layer.feature_defaults = {"category": name, "box_id": -1}
        # napari keeps a just-drawn box selected: while drawing, a new class is for the next
        # box; in select mode it relabels the boxes the user picked.
        selected = sorted(layer.selected_data) if str(layer.mode) in ("select", "direct") else []
        if selected:
            features = layer.features.copy()
            features.loc[selected, "category"] = name
            layer.features = features

    # --------------------------------------------------------------- boxes
    def _boxes(self) -> list[tuple[int, int | None, np.ndarray, str]]:
        """(box_id, plane, (x0, y0, x1, y1), category) per rectangle; gives new boxes an id."""
        layer = self._bound
        if layer is None:
            return []
        features = layer.features
        ids = (features["box_id"].to_numpy(dtype=np.int64).copy()
               if "box_id" in features else np.full(len(layer.data), -1, dtype=np.int64))
        cats = (features["category"].astype(str).to_numpy() if "category" in features
                else np.full(len(layer.data), self.category, dtype=object))
        seen: set[int] = set()
        changed = False
        for i, box_id in enumerate(ids):
            if box_id <= 0 or box_id in seen:  # new, or a copy-pasted box
                ids[i] = self._new_label_id(ids)
                changed = True
            seen.add(int(ids[i]))
        if changed:
            new = features.copy()
            new["box_id"] = ids
            if "category" not in new:
                new["category"] = cats
            self._busy = True
            try:
                layer.features = new
            finally:
                self._busy = False
        return [(int(box_id), plane, box, str(cat))
                for box_id, (plane, box), cat in zip(ids, rectangles_to_boxes(layer.data), cats)]

    def _new_label_id(self, ids: np.ndarray) -> int:
        labels = self.labels_combo.layer()
        top = max(int(ids.max(initial=0)), max(self._written, default=0), self._next_label - 1)
        if labels is not None and labels.data.size:
            top = max(top, int(np.asarray(labels.data).max()))
        self._next_label = top + 2
        return top + 1

    def _on_data(self, event: Any) -> None:
        if self._busy:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("ADDED") or action.endswith("CHANGED") or action == "added" \
                or action == "changed":
            self.sync(segment=self.live_check.isChecked())
        elif action.endswith("REMOVED") or action == "removed":
            self.sync(segment=False)

    def _on_features(self, _event: Any = None) -> None:
        if self._busy or self._bound is None or "box_id" not in self._bound.features:
            return
        ids = self._bound.features["box_id"].to_numpy()
        if len(ids) and ((ids <= 0).any() or len(np.unique(ids)) != len(ids)):
            self.sync(segment=self.live_check.isChecked())

    def sync(self, segment: bool = True, settings_changed: bool = False) -> None:
        """Bring masks in line with boxes: drop masks of deleted boxes, segment new/moved ones
        (and, with ``settings_changed``, those made with other settings)."""
        t0 = time.perf_counter()
        try:
            boxes = self._boxes()
            present = {b[0] for b in boxes}
            removed = [b for b in self._written if b not in present]
            for box_id in removed:
                self._remove_box(box_id)
            for box_id in [b for b in self._geom if b not in present]:
                self._geom.pop(box_id, None)
            self._locked &= present
            if segment:
                # Live edits redo the boxes that moved; a new method or window applies to
                # the existing masks only when the user presses Segment.
                n = None if settings_changed else 5  # plane + 4 coordinates
                settings = self._settings()  # once: thousands of boxes on a nuclei tile
                todo = [b for b in boxes if b[0] not in self._locked and
                        (self._geom.get(b[0]) or ())[:n] != self._key(b[1], b[2], settings)[:n]]
                plane_ids: dict = {}  # the label ids on each plane, once per press
                if settings_changed:  # Segment also redoes what an undo took back
                    queued = {b[0] for b in todo}
                    todo += [b for b in self._undone(boxes, plane_ids)
                             if b[0] not in self._locked and b[0] not in queued]
                    if not todo:  # say so, rather than leave the last action's message
                        self._say("every mask is up to date: nothing to segment")
                self._segment(todo, plane_ids)
            elif removed:
                self._say(f"{len(removed)} box(es) removed")
        except Exception as err:  # shown in the viewer, not only in the terminal
            show_error(f"boxlevelset: {err}")
            self._say(f"error: {err}")
            raise
        finally:
            self.last_latency_s = time.perf_counter() - t0

    def _key(self, plane: int | None, box: np.ndarray, settings: tuple | None = None) -> tuple:
        """What a box's mask was made from: its place, and the settings that change the mask
        (``_settings``), so Segment redoes boxes whose settings changed."""
        return (plane, *np.asarray(box, dtype=np.float64).tolist(),
                *(self._settings() if settings is None else settings))

    def _settings(self) -> tuple:
        """The settings that change a mask: method, loose boxes, the CT window."""
        image = self.image_combo.layer()
        window = self._window(image) if image is not None else None
        return self.method_combo.currentText(), self.loose_check.isChecked(), window

    def segment(self) -> None:
        """Segment every box that has no mask yet, was moved, or was segmented with other
        settings (method, loose boxes, CT window) since its mask was made."""
        self.boxes_layer(create=True)
        self.sync(segment=True, settings_changed=True)

    def accept(self) -> None:
        """Lock the current masks: editing or deleting their boxes no longer changes them."""
        self._locked |= set(self._geom)
        self._say(f"{len(self._locked)} masks accepted")

    # --------------------------------------------------------- segmenting
    def _window(self, image: Any) -> tuple[float, float] | None:
        if plugin_meta(image).get("kind") == "ct":
            return contrast_window(image.contrast_limits)
        return None

    def _plane_image(self, image: Any, plane: int | None) -> np.ndarray:
        data = image.data
        if self._spatial_ndim(image) == 3:
            if plane is None:
                raise ValueError("boxes on a 3D image need a slice index")
            plane = int(np.clip(plane, 0, data.shape[0] - 1))
            data = data[plane]
        return np.asarray(data)

    def _predictor_for(self, image: Any, plane: int | None) -> Any:
        from boxlevelset.model import Predictor

        window = self._window(image)
        tile = self.tile_spin.value()
        key = (id(self.model), id(_unwrap(image)), plane, window, image.data.shape, tile)
        if self._predictor is None or self._predictor_key != key:
            if tile:  # features per tile, computed as boxes need them
                from boxlevelset.tiles import TiledPredictor

                predictor = TiledPredictor(self.model, tile, progress=self.tiles_done.emit)
            else:
                # The backbone runs once per image (seconds on a CPU); say so before it starts.
                self._say("computing the model's features for this image…")
                self.status.repaint()  # drawn now; processEvents could re-enter this handler
                predictor = Predictor(self.model)
            predictor.set_image(self._plane_image(image, plane), window=window)
            self._predictor, self._predictor_key = predictor, key
        return self._predictor

    def _tile_done(self, done: int, total: int) -> None:
        """Segment everything's progress over the tiles, in the status line."""
        self._say(f"segment everything: tile {done} of {total}…")

    def masks_for(self, plane: int | None, boxes: np.ndarray, loose: bool | None = None,
                  cropped: bool = False) -> list[np.ndarray] | BoxMasks:
        """Masks for (x0, y0, x1, y1) boxes on one plane of the current image; ``loose``
        overrides the *Loose boxes* tick (propagated boxes are loose); ``cropped``: each
        over its box only (``segment_boxes(..., cropped=True)``)."""
        image = self._image()
        from boxlevelset import segment_boxes
        from boxlevelset.levelset import LOOSE_BOXES

        method = self.method_combo.currentText()
        plane_image = self._plane_image(image, plane)
        loose = self.loose_check.isChecked() if loose is None else loose
        options = dict(LOOSE_BOXES) if loose else {}
        if method in (METHOD_MODEL, METHOD_MODEL_REFINED):
            if self.model is None:
                raise ValueError(f"method is '{method}' but no model is loaded")
            refine = REFINE_STEPS if method == METHOD_MODEL_REFINED else 0
            return segment_boxes(plane_image, boxes, model=self._predictor_for(image, plane),
                                 window=self._window(image), refine=refine, cropped=cropped,
                                 **options)
        if LEVELSET_SOLVERS[method] is not None:  # a solver chosen by name wins
            options["solver"] = LEVELSET_SOLVERS[method]
        return segment_boxes(plane_image, boxes, window=self._window(image), cropped=cropped,
                             **options)

    def _segment(self, todo: list[tuple[int, int | None, np.ndarray, str]],
                 plane_ids: dict | None = None) -> None:
        """Segment and paint ``todo``'s boxes; ``plane_ids``: the label ids on planes whose
        ids were listed since the last paint (``_undone``), not listed again."""
        if not todo:
            return
        image = self._image()
        depth = image.data.shape[0] if self._spatial_ndim(image) == 3 else None
        height, width = self._plane_image(image, 0 if depth else None).shape[:2]
        by_plane: dict[int | None, list] = {}
        skipped = 0
        for item in todo:
            if depth is not None and (item[1] is None or not 0 <= item[1] < depth):
                skipped += 1  # a box on a slice the volume does not have
                continue
            box = item[2].copy()
            box[[0, 2]] = box[[0, 2]].clip(0, width)
            box[[1, 3]] = box[[1, 3]].clip(0, height)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                skipped += 1
                continue
            by_plane.setdefault(item[1], []).append((item[0], box, item))
        outcome = {"painted": 0, "partly": 0, "covered": 0, "nothing": 0, "kept": 0}
        # napari redraws the whole labels plane after each write (20 ms a box at 2000x2000):
        # a batch of boxes is drawn once, at the end.
        self._defer_refresh = len(todo) > 1
        # One press of Segment (e.g. after a new window redid every box) is one undo step,
        # as a propagated walk is: napari recorded one step per box painted.
        labels = self.labels_layer(create=True) if by_plane else None
        if labels is not None and len(todo) > PRESENT_IDS_FROM:
            known = plane_ids or {}
            self._present = {
                plane: known[plane] if plane in known
                else set(np.unique(self._plane_view(labels, plane)).tolist())
                for plane in by_plane}
        try:
            with labels.block_history() if labels is not None else contextlib.nullcontext():
                for plane, items in by_plane.items():
                    # Each mask over its box: 961 whole-plane masks of a 2048x2048 image
                    # cost 1.5 s to build alone.
                    masks = self.masks_for(plane, np.stack([b for _, b, _ in items]),
                                           cropped=True)
                    for (box_id, _box, item), crop, (x0, y0, _, _) in zip(
                            items, masks.crops, masks.bounds.tolist()):
                        self._leave_old_plane(labels, box_id, plane)
                        outcome[self._paint(box_id, plane, crop, at=(y0, x0))] += 1
                        self._geom[box_id] = self._key(item[1], item[2])
        finally:
            if self._defer_refresh and self.labels_combo.layer() is not None:
                self.labels_combo.layer().refresh()
            self._defer_refresh = False
            self._present = None
        if skipped:
            show_warning(f"boxlevelset: {skipped} box(es) outside the image or too small")
        self._say(_summary(f"{outcome['painted'] + outcome['partly']} mask(s) updated", [
            (outcome["partly"], "box(es) kept less than half their mask: existing labels "
                                "cover the rest (tick 'Overwrite labels')"),
            (outcome["covered"], "box(es) got no pixels: existing labels cover their masks "
                                 "(tick 'Overwrite labels')"),
            (outcome["nothing"], "box(es) where the method found no object"),
            (outcome["kept"], "hand-edited mask(s) kept"),
            (skipped, "box(es) outside the image or under one pixel skipped")]))

    # ------------------------------------------------------------ painting
    def _leave_old_plane(self, labels: Any, box_id: int, plane: int | None) -> None:
        """A box moved to another slice (through the API: napari's mouse keeps a shape on
        its slice) takes its mask along: the mask on the slice it left is erased, unless
        the user keeps a hand edit there. A propagated box's walk stays whole: the slice
        it left is one of the walk's, and erasing it would leave a hole in the object."""
        old = (self._geom.get(box_id) or (plane,))[0]
        written = self._written.get(box_id, {})
        if old == plane or set(written) != {old} or not self._may_replace(box_id, [old]):
            return
        self._erase(labels, box_id, old)
        del written[old]

    def _undone(self, boxes: list, plane_ids: dict | None = None) -> list:
        """Boxes whose mask napari's undo or redo swapped for an earlier one the widget had
        painted: their settings key still says they are up to date, so Segment would leave
        the earlier mask. Hand edits are not among them (their pixels were never painted).
        The label ids found on each plane go into ``plane_ids`` (for ``_segment``)."""
        labels = self.labels_combo.layer()
        if labels is None:
            return []
        out, counts = [], {}
        for item in boxes:
            box_id, plane = item[0], item[1]
            owned = self._written.get(box_id, {}).get(plane)
            if owned is None:
                continue
            view = self._plane_view(labels, plane)
            if plane not in counts:  # one pass over each plane, not one per box
                ids, n = np.unique(np.asarray(view), return_counts=True)
                counts[plane] = dict(zip(ids.tolist(), n.tolist()))
                if plane_ids is not None:
                    plane_ids[plane] = set(counts[plane])
            if not owned.matches(view, box_id, counts[plane].get(box_id, 0)) and \
                    _digest(np.asarray(view) == box_id) in self._painted.get((box_id, plane), ()):
                out.append(item)
        return out

    def _plane_view(self, labels: Any, plane: int | None) -> np.ndarray:
        return labels.data[plane] if plane is not None and labels.data.ndim == 3 else labels.data

    def _hand_edited(self, box_id: int, planes: list | None = None,
                     known: dict | None = None) -> bool:
        """True when the label's pixels differ from what the widget last wrote there. A plane
        where the label has no pixels left has nothing to lose: napari's undo of the
        widget's own painting leaves such planes, and they count as free, not edited; so
        does a mask the widget painted there before (undo and redo bring those back).
        ``known``: plane -> the label's pixels there (plane == box_id), already compared,
        or None for none."""
        labels = self.labels_combo.layer()
        if labels is None:
            return False
        written = self._written.get(box_id, {})
        if planes is None:
            if not written:  # pixels under this id that we never wrote
                return bool((np.asarray(labels.data) == box_id).any())
            planes = list(written)
        for plane in planes:
            if known is not None and plane in known:
                current = known[plane]
            else:
                current = (None if self._absent(box_id, plane)
                           else self._plane_view(labels, plane) == box_id)
            if current is None:
                continue  # no pixels: nothing to lose
            owned = written.get(plane)
            if current.any() and (owned is None or not owned.equals(current)) and \
                    _digest(current) not in self._painted.get((box_id, plane), ()):
                return True
        return False

    def _absent(self, box_id: int, plane: int | None) -> bool:
        """True when label ``box_id`` is known to have no pixels on ``plane`` (only while
        Segment paints many boxes: see ``_present``)."""
        present = None if self._present is None else self._present.get(plane)
        return present is not None and box_id not in present

    def _ask_overwrite(self, box_id: int) -> bool:
        answer = QMessageBox.question(
            self, "Hand-edited mask",
            f"The mask of box {box_id} was edited by hand. Discard your edits (the mask is "
            "replaced or erased as the box's change asks)?",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _may_replace(self, box_id: int, planes: list | None = None,
                     known: dict | None = None) -> bool:
        if not self._hand_edited(box_id, planes, known):
            return True
        policy = self.hand_combo.currentText()
        if policy == "overwrite":
            return True
        if policy == "keep":
            return False
        return bool(self.confirm_overwrite(box_id))

    def _set_pixels(self, labels: Any, plane: int | None, changed: np.ndarray,
                    values: np.ndarray, offset: tuple[int, int] = (0, 0)) -> None:
        """Write label values through data_setitem so napari's undo history records it;
        ``changed`` may be a crop of the plane whose corner is at ``offset``."""
        idx = np.nonzero(changed)
        if idx[0].size == 0:
            return
        idx = (idx[0] + offset[0], idx[1] + offset[1])
        if plane is not None and labels.data.ndim == 3:
            idx = (np.full(idx[0].shape, plane, dtype=idx[0].dtype), *idx)
        labels.data_setitem(idx, values, refresh=not self._defer_refresh)

    def _paint(self, box_id: int, plane: int | None, mask: np.ndarray,
               at: tuple[int, int] = (0, 0)) -> str:
        """Replace box `box_id`'s pixels on `plane` by `mask`, a plane-sized mask or a part
        of one whose first pixel is at row, column `at`. Returns "painted", "partly"
        (existing labels win over half of it), "covered" (they win every pixel of it),
        "kept" (the user keeps a hand-edited mask) or "nothing" (an empty mask)."""
        labels = self.labels_layer(create=True)
        if np.issubdtype(labels.data.dtype, np.integer) and \
                box_id > np.iinfo(labels.data.dtype).max:
            # Widen the layer (e.g. a uint8 Labels layer at id 256): the id would wrap.
            labels.data = np.asarray(labels.data).astype(np.int32)
        view = self._plane_view(labels, plane)
        # The whole plane: a hand edit may have put this id anywhere (unless it is known to
        # have no pixels there). The hand-edit check reads the same compare.
        old = None if self._absent(box_id, plane) else view == box_id
        if not self._may_replace(box_id, [plane], known={plane: old}):
            return "kept"
        mask = np.asarray(mask, dtype=bool)
        top, left = at
        if top < 0 or left < 0 or top + mask.shape[0] > view.shape[0] or \
                left + mask.shape[1] > view.shape[1]:
            raise ValueError(f"mask shape {mask.shape} at {at} does not fit labels {view.shape}")
        overwrite = self.overwrite_check.isChecked()
        # The rest works on the window of the new mask and the old one: whole-plane work
        # per box made 200 boxes on a 2000x2000 image take 17 s.
        drawn, drawn_crop = _tight((slice(top, None), slice(left, None)), mask)
        window = _span(None if old is None else _window(old), drawn)
        owned, crop = None, None
        if window is not None:
            here = view[window]
            was = np.zeros(here.shape, bool) if old is None else old[window]
            new_mask = np.zeros(here.shape, bool)
            if drawn is not None:
                new_mask[drawn[0].start - window[0].start:drawn[0].stop - window[0].start,
                         drawn[1].start - window[1].start:drawn[1].stop - window[1].start] = \
                    drawn_crop
            target = new_mask if overwrite else new_mask & ((here == 0) | was)  # labels win
            new = np.where(was & ~target, 0, here)
            new = np.where(target, box_id, new).astype(view.dtype)
            changed = new != here
            self._set_pixels(labels, plane, changed, new[changed],
                             (window[0].start, window[1].start))
            owned, crop = _tight(window, target)
        if self._present is not None and plane in self._present:
            self._present[plane].add(box_id)
        self._written.setdefault(box_id, {})[plane] = _Owned(owned, crop)
        self._painted.setdefault((box_id, plane), set()).add(
            _digest_crop(owned, crop, view.shape))
        if overwrite and owned is not None:  # other boxes lost these pixels on purpose
            for other, planes in self._written.items():
                if other != box_id and plane in planes:
                    planes[plane].discard(owned, crop)
        wanted = int(mask.sum())
        if not wanted:
            return "nothing"
        if crop is None:
            return "covered"
        return "partly" if 2 * int(crop.sum()) < wanted else "painted"

    def _remove_box(self, box_id: int) -> None:
        written = self._written.pop(box_id, {})
        self._geom.pop(box_id, None)
        if box_id in self._locked:
            return
        labels = self.labels_combo.layer()
        if labels is None:
            return
        self._written[box_id] = written  # for the hand-edit check
        replace = self._may_replace(box_id)
        self._written.pop(box_id, None)
        if not replace:
            return
        for plane in written:
            self._erase(labels, box_id, plane)

    def _erase(self, labels: Any, box_id: int, plane: int | None) -> None:
        view = self._plane_view(labels, plane)
        changed = view == box_id
        self._set_pixels(labels, plane, changed, np.zeros(int(changed.sum()), view.dtype))

    # ------------------------------------------------------------- model
    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model checkpoint", "",
                                              "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.model_edit.setText(path)

    def load_model(self, path: str, device: str | None = None) -> Any:
        """Load a checkpoint (boxlevelset.load_model) and switch the method to 'Model'."""
        from boxlevelset import load_model

        if not path:
            show_warning("boxlevelset: choose a checkpoint file first")
            return None
        device = device or self.device_combo.currentText()
        try:
            model = load_model(path, device=None if device == "auto" else device)
        except Exception as err:
            show_error(f"boxlevelset: cannot load model {path}: {err}")
            self.model_label.setText(f"load failed: {err}")
            raise
        self.set_model(model, path)
        return model

    def set_model(self, model: Any, path: str | None = None) -> None:
        """Use `model` for box-to-mask (e.g. the checkpoint a fine-tune run just wrote)."""
        self.model, self.model_path = model, path
        self._predictor = self._predictor_key = None
        if path:
            self.model_edit.setText(str(path))
        names = list(getattr(getattr(model, "config", None), "class_names", []) or [])
        layer = self.boxes_combo.layer()
        untouched = self.class_names == [DEFAULT_CATEGORY] and not (
            layer is not None and "category" in layer.features
            and (layer.features["category"].astype(str) == DEFAULT_CATEGORY).any())
        self.class_combo.blockSignals(True)  # no relabelling of boxes selected right now
        if names and untouched:  # the default 'object', unused: the model's classes instead
            self.class_combo.clear()
        for name in names:
            if self.class_combo.findText(name) < 0:
                self.class_combo.addItem(name)
        if names and untouched:
            self.class_combo.setCurrentText(names[0])
            if layer is not None:  # the next box drawn gets the model's class
                layer.feature_defaults = {"category": names[0], "box_id": -1}
        self.class_combo.blockSignals(False)
        self.model_label.setText(f"model: {path or type(model).__name__}")
        self.method_combo.setCurrentText(METHOD_MODEL)
        self._update_enabled()

    def _add_instances(self, plane: int | None, masks: BoxMasks, categories: list[str]) -> int:
        """Add the masks' tight boxes with the masks (no re-segmentation)."""
        boxes = masks.bounds.astype(np.float64)
        layer = self.boxes_layer(create=True)
        self.labels_layer(create=True)
        if len(masks) == 0:
            return 0
        self._busy = True
        try:
            n0 = len(layer.data)
            layer.add_rectangles(boxes_to_rectangles(boxes, plane=plane))
            features = layer.features.copy()
            ids = []
            for k in range(len(masks)):
                ids.append(self._new_label_id(features["box_id"].to_numpy(dtype=np.int64)))
                features.loc[n0 + k, "box_id"] = ids[-1]
            features.loc[n0:, "category"] = categories
            features["box_id"] = features["box_id"].astype(np.int64)
            layer.features = features
        finally:
            self._busy = False
        for box_id, box, crop in zip(ids, boxes, masks.crops):
            self._paint(box_id, plane, crop, at=(int(box[1]), int(box[0])))
            self._geom[box_id] = self._key(plane, box)
        return len(masks)

    def _current_plane(self, image: Any) -> int | None:
        if self._spatial_ndim(image) != 3:
            return None
        world = self.viewer.dims.point[0]
        return int(np.clip(round((world - image.translate[0]) / image.scale[0]), 0,
                           image.data.shape[0] - 1))

    def segment_everything(self) -> int | None:
        """With a model: propose all instances of the image (or current slice) as boxes +
        masks; returns how many were added. In *Model tiles* (a large image: seconds of
        work) the tiles run in a ``thread_worker``, the viewer stays usable, the status
        line counts the tiles, and the instances are added when they are done (returns
        None; ``everything_worker`` is the running worker)."""
        from boxlevelset.tiles import TiledPredictor

        if self.model is None:
            raise ValueError("segment everything needs a loaded model")
        if self.everything_worker is not None:
            return None  # one run at a time: the button is disabled while it runs
        image = self._image()
        plane = self._current_plane(image)
        threshold = self.score_slider.value() / 100.0
        predictor = self._predictor_for(image, plane)
        if not isinstance(predictor, TiledPredictor):
            # Each mask over its box: a large image's hundreds of proposals cost their area.
            instances = predictor.predict(score_threshold=threshold, cropped=True)
            return self._add_everything(instances, plane, threshold)
        from napari.qt.threading import thread_worker

        worker = thread_worker(predictor.predict, start_thread=False)(
            score_threshold=threshold, cropped=True)
        key = self._predictor_key

        def added(instances: Any) -> None:
            if self._detached:
                return
            now = self.image_combo.layer()
            if (self._predictor_key != key or now is None or _unwrap(now) is not _unwrap(image)
                    or self._current_plane(now) != plane):
                self._say("segment everything: the image or its slice changed while the "
                          "tiles ran; nothing added")
                return
            self._add_everything(instances, plane, threshold)

        def failed(err: Exception) -> None:
            show_error(f"boxlevelset: {err}")
            self._say(f"error: {err}")

        def done() -> None:
            self.everything_worker = None
            self._update_enabled()

        worker.returned.connect(added)
        worker.errored.connect(failed)
        worker.finished.connect(done)
        self.everything_worker = worker
        self._update_enabled()
        self._say("segment everything: starting the tiles…")
        worker.start()
        return None

    def _add_everything(self, instances: Any, plane: int | None, threshold: float) -> int:
        """Add the proposals not already labelled as boxes + masks; say how many."""
        from boxlevelset.export import BoxMasks

        names = list(getattr(self.model.config, "class_names", []) or [])
        cats = [names[int(k)] if int(k) < len(names) else str(int(k)) for k in instances.labels]
        # A proposal at least half on labelled pixels (an object already annotated, or one
        # just taken by a higher-scoring proposal) would add a duplicate box with a sliver
        # of a mask, or none: it is left out.
        taken = np.asarray(self._plane_view(self.labels_layer(create=True), plane)) != 0
        keep, duplicates = [], 0
        masks = BoxMasks.from_masks(instances.masks, taken.shape)  # as it is when cropped
        for i, ((x0, y0, x1, y1), crop) in enumerate(zip(masks.bounds.tolist(), masks.crops)):
            if not crop.any():
                continue
            region = taken[y0:y1, x0:x1]
            if (crop & region).sum() * 2 >= crop.sum():
                duplicates += 1
                continue
            keep.append(i)
            region |= crop
        n = self._add_instances(plane, masks.select(keep), [cats[i] for i in keep])
        self._say(_summary(f"segment everything: {n} instance(s) with score ≥ "
                           f"{threshold:.2f} added",
                           [(duplicates, "left out: already labelled")]))
        return n

    # ------------------------------------------------------- propagation
    def propagate_selected(self, max_slices: int | None = None) -> dict[int, int]:
        """Propagate each selected box through neighbouring slices of a 3D image.

        The box's mask as the labels show it (hand corrections included) is carried slice
        by slice (``boxlevelset.propagate``: each slice's mask gives the next slice's box,
        started from the previous mask and held within a few pixels of it); a slice whose
        hand-edited mask the user keeps steers the walk from there on. The walk stops when
        a mask is empty, overlaps the previous one (IoU) less than the threshold, or
        changes mean intensity. The masks get the box's label id, so one box gives one 3D
        object; the box's masks from an earlier, longer walk are cleared, and one undo
        takes a box's whole walk back. ``max_slices`` bounds the walk in each direction
        (0: no slices); by default the widget's *slices* box does, where "all" (0) means no
        bound. Returns {box_id: number of slices painted} for each selected box with a mask
        to carry.
        """
        try:
            return self._propagate(max_slices)
        except Exception as err:  # shown in the viewer, not only in the terminal
            show_error(f"boxlevelset: {err}")
            self._say(f"error: {err}")
            raise

    def _propagate(self, max_slices: int | None) -> dict[int, int]:
        from boxlevelset.propagate import propagate_mask

        if max_slices is None and self.slices_spin.value() > 0:
            max_slices = self.slices_spin.value()
        image = self._image()
        if self._spatial_ndim(image) != 3:
            raise ValueError("propagation needs a 3D image (a volume or a stack)")
        layer = self.boxes_layer(create=False)
        if layer is None or not layer.selected_data:
            raise ValueError("select a box to propagate")
        boxes = {b[0]: b for b in self._boxes()}
        ids = layer.features["box_id"].to_numpy(dtype=np.int64)
        self.sync(segment=True)
        segment = None
        if self.method_combo.currentText() in (METHOD_MODEL, METHOD_MODEL_REFINED):
            def segment(z: int, box: np.ndarray, previous: np.ndarray) -> np.ndarray:
                return self.masks_for(z, box[None], loose=True)[0]
        labels = self.labels_layer(create=True)
        depth = image.data.shape[0]
        added: dict[int, int] = {}
        outcome = {"painted": 0, "partly": 0, "covered": 0, "kept": 0, "cleared": 0}
        problems = []
        for row in sorted(layer.selected_data):
            box_id = int(ids[row])
            plane = boxes[box_id][1]
            if plane is None or not 0 <= plane < depth:
                problems.append(f"box {box_id} lies on a slice the volume lacks")
                continue
            # The mask as the labels show it now: a hand correction is what gets carried.
            start = np.asarray(self._plane_view(labels, plane)) == box_id
            if not start.any():
                problems.append(f"box {box_id} has no mask on its slice to carry")
                continue
            walk = propagate_mask(
                image.data, plane, start, window=self._window(image),
                min_overlap=float(self.overlap_spin.value()), max_slices=max_slices,
                segment=segment)
            reached, count = {plane}, 0
            with labels.block_history():  # one undo takes the whole walk back
                step = next(walk, None)
                while step is not None:
                    z, mask = step
                    result = self._paint(box_id, z, mask)
                    reached.add(z)
                    count += result in ("painted", "partly")
                    outcome[result if result in outcome else "covered"] += 1
                    kept = (np.asarray(self._plane_view(labels, z)) == box_id
                            if result == "kept" else None)
                    try:
                        step = walk.send(kept)
                    except StopIteration:
                        step = None
                outcome["cleared"] += self._clear_planes(
                    box_id, [p for p in self._written.get(box_id, {}) if p not in reached])
            added[box_id] = count
        msg = _summary(f"propagated: {sum(added.values())} slice mask(s) added", [
            (outcome["partly"], "slice(s) where existing labels cover most of the mask "
                                "(tick 'Overwrite labels')"),
            (outcome["covered"], "slice(s) where existing labels cover the mask "
                                 "(tick 'Overwrite labels')"),
            (outcome["kept"], "hand-edited slice(s) kept and carried on from"),
            (outcome["cleared"], "slice(s) of an earlier, longer walk cleared")])
        if problems:
            msg += "; " + "; ".join(problems)
            show_warning("boxlevelset: " + "; ".join(problems))
        self._say(msg)
        return added

    def _clear_planes(self, box_id: int, planes: list) -> int:
        """Erase box ``box_id``'s masks on ``planes`` (those the hand-edit policy lets go);
        returns how many were cleared."""
        labels = self.labels_combo.layer()
        cleared = 0
        for plane in planes:
            if labels is None or not self._may_replace(box_id, [plane]):
                continue
            self._erase(labels, box_id, plane)
            self._written[box_id].pop(plane, None)
            cleared += 1
        return cleared

    # ------------------------------------------------------------ export
    def _export_dialog(self, kind: str) -> None:
        filters = {"coco": "COCO JSON (*.json)", "labels": "Label image (*.png *.tif *.tiff)",
                   "nifti": "Label volume (*.nii.gz *.nii *.nrrd *.mha)"}
        try:
            if kind == "folder":
                path = QFileDialog.getExistingDirectory(self, "Save annotations into folder")
            else:
                path, _ = QFileDialog.getSaveFileName(self, "Export", "", filters[kind])
            if not path:
                return
            self.export(kind, path)
        except Exception as err:
            show_error(f"boxlevelset: export failed: {err}")
            self._say(f"export failed: {err}")

    def export(self, kind: str, path: str) -> Any:
        """Export the current image's annotations: kind 'coco', 'labels', 'nifti' or 'folder'."""
        from . import _export

        image = self._image()
        labels = self.labels_layer(create=False)
        boxes = self.boxes_layer(create=False)
        if boxes is not None:
            self._boxes()  # make sure every box has an id
        if kind == "coco":
            out = _export.export_coco(path, image, boxes, labels, self.class_names)
        elif kind == "labels":
            out = _export.export_label_image(path, labels)
        elif kind == "nifti":
            out = _export.export_label_volume(path, labels, image)
        elif kind == "folder":
            out = _export.save_annotations(path, image, boxes, labels, self.class_names)
        else:
            raise ValueError(f"unknown export kind {kind!r}")
        show_info(f"boxlevelset: wrote {out}")
        self._say(f"wrote {out}")
        return out
