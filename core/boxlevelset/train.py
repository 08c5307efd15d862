"""Training: box-supervised SOLOv2 on a box-labeled folder, one device or many (torchrun).

The recipe follows the paper's official schedule (AdamW, weight decay 0.1 with none on norms and
biases, linear warm-up, x0.1 steps, grad clip 1.0, random shorter side + flip). `train()` is the
single entry point used by the command line, the napari fine-tune button and torchrun:

    config = TrainConfig(data="my_folder", preset="lite", output_dir="runs/lite")
    checkpoint = train(config, callbacks=[print])

Under torchrun (WORLD_SIZE > 1) the same call runs DistributedDataParallel with a
DistributedSampler; only rank 0 writes checkpoints and logs and calls the callbacks, and the
losses it logs (and passes to callbacks) are the mean over the ranks.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from boxlevelset.model import LITE_HEADS, SIZE_DIVISOR

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Preset values fill the TrainConfig fields the caller left as None; anything given explicitly
# wins. "model" holds ModelConfig overrides (architecture, grids, thresholds ...).
PRESETS: dict[str, dict[str, Any]] = {
    # Pascal VOC 3x (paper Table 1): 36 epochs, x0.1 at 27 and 33, lr 5e-5 for batch 8.
    "voc_r50_3x": dict(
        backbone="resnet50", lr=5e-5, batch_size=8, epochs=36, lr_steps=(27 / 36, 33 / 36),
        warmup_iters=2000, min_size=(640, 800), max_size=1333,
        model=dict(mask_threshold=0.7),
    ),
    "voc_r101_3x": dict(
        backbone="resnet101", lr=5e-5, batch_size=8, epochs=36, lr_steps=(27 / 36, 33 / 36),
        warmup_iters=2000, min_size=(640, 800), max_size=1333,
        model=dict(mask_threshold=0.7),
    ),
    # COCO 3x, the paper's 8-GPU schedule (batch 16 in total: 2 per GPU under torchrun).
    "coco_r101_3x": dict(
        backbone="resnet101", lr=1e-4, batch_size=16, epochs=36, lr_steps=(27 / 36, 33 / 36),
        warmup_iters=2000, min_size=(640, 800), max_size=1333,
        model=dict(mask_threshold=0.55),
    ),
    # iSAID and LiTS 1x: 12 epochs, x0.1 at 8 and 11.
    "isaid_r50_1x": dict(
        backbone="resnet50", lr=1e-4, batch_size=16, epochs=12, lr_steps=(8 / 12, 11 / 12),
        warmup_iters=2000, min_size=(640, 800), max_size=1333,
        model=dict(mask_threshold=0.55),
    ),
    "lits_r50_1x": dict(
        backbone="resnet50", lr=1e-4, batch_size=16, epochs=12, lr_steps=(8 / 12, 11 / 12),
        warmup_iters=2000, min_size=(512, 512), max_size=512,
        model=dict(mask_threshold=0.55),
    ),
    # Fine-tuning on a laptop CPU in minutes: ImageNet EfficientNet-Lite0 from the shipped
    # wheel, slim heads, small inputs, a larger learning rate and a short warm-up.
    "lite": dict(
        backbone="efficientnet_lite0", lr=1e-3, batch_size=4, epochs=24, lr_steps=(0.75, 0.92),
        warmup_iters=50, min_size=(256, 384), max_size=512,
        model=dict(LITE_HEADS),
    ),
}

# Used for fields that neither the caller nor the preset set.
_BASE_DEFAULTS: dict[str, Any] = dict(
    backbone="resnet50", epochs=12, lr=1e-4, batch_size=2, warmup_iters=500,
    lr_steps=(8 / 12, 11 / 12), min_size=(640, 800), max_size=1333,
    weight_decay=0.1, warmup_factor=0.001, lr_gamma=0.1, grad_clip=1.0, flip_prob=0.5,
    seed=0, supervision="box", crop=0,
)


class _DefaultWindow:
    """TrainConfig.window left unset: the abdomen window. Not None, which means "no window"
    (HU scaled to their own range), so that a resumed run can tell an unset window from a
    chosen one and keep its checkpoint's."""

    def __repr__(self) -> str:
        return "DEFAULT_WINDOW"


DEFAULT_WINDOW: Any = _DefaultWindow()

# What a resumed run takes from its checkpoint unless the caller sets it: the schedule (its
# length, learning rates and steps, batch, scales) and what the samples depend on.
_RESUMED_FIELDS = (*_BASE_DEFAULTS, "max_iterations", "window")


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Fields left as None take the preset's value, then a base default. Either `epochs` or
    `max_iterations` sets the schedule length (`max_iterations` wins); `lr_steps` are
    fractions of it at which the learning rate is multiplied by `lr_gamma`. A resumed run
    continues its checkpoint's schedule: only the fields given here (not None) change it.
    """

    data: str | Path = ""
    preset: str | None = None
    output_dir: str | Path = "runs/boxlevelset"
    backbone: str | None = None
    pretrained: bool | str = True
    model: dict | None = None  # ModelConfig overrides, e.g. {"fpn_channels": 64}
    epochs: int | None = None
    max_iterations: int | None = None
    batch_size: int | None = None  # in total, over all processes
    lr: float | None = None
    weight_decay: float | None = None  # 0.1
    warmup_iters: int | None = None
    warmup_factor: float | None = None  # 0.001
    lr_steps: tuple[float, ...] | None = None
    lr_gamma: float | None = None  # 0.1
    grad_clip: float | None = None  # 1.0
    min_size: tuple[int, int] | None = None  # random shorter side, inclusive range
    max_size: int | None = None  # cap on the longer side
    flip_prob: float | None = None  # 0.5
    # Train on random crops of crop x crop pixels (each around a box) of images larger than
    # that, before the resize: a stitched microscopy scan resized whole shrinks its objects
    # (0: whole images). Predict such images with tiles of about this size.
    crop: int | None = None
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    amp: bool | None = None  # None: on for CUDA (bf16 where supported, else fp16 + GradScaler)
    checkpoint_every: int = 500
    resume: str | Path | None = None  # a last.pth, or "auto" for output_dir/last.pth if present
    init_checkpoint: str | Path | None = None  # fine-tune from a saved model
    num_workers: int = 0
    seed: int | None = None  # 0
    supervision: str | None = None  # "box" (the paper, default) or "mask" (the ceiling)
    # CT window for volume slices (DEFAULT_WINDOW: "abdomen"; None: no window)
    window: str | tuple[float, float] | None = DEFAULT_WINDOW
    class_names: list[str] | None = None  # read from the folder when None
    log_path: str | Path | None = None  # per-iteration losses: .csv (default) or .jsonl
    time_limit: float | None = None  # seconds; stop cleanly (with a checkpoint) when reached
    # DDP's search for parameters no loss reached, an extra pass over the autograd graph every
    # step: none are (every branch stays in the loss, with a zero where a level or a batch has
    # no positives; tests/test_train.py checks it), so it is off.
    find_unused_parameters: bool = False
    rank_digest: bool = False  # write each rank's weight digest (checks DDP replicas agree)
    # A new (not resumed) run may replace an earlier run's files in output_dir; without it,
    # such a folder is refused before anything is written.
    overwrite: bool = False
    stop_event: threading.Event | None = field(default=None, repr=False, compare=False)
    # The _RESUMED_FIELDS the caller set (not None) before presets and defaults filled the rest.
    given: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unset = {k: None for k in _RESUMED_FIELDS} | {"window": DEFAULT_WINDOW}
        self.given = frozenset(k for k in _RESUMED_FIELDS if getattr(self, k) is not unset[k])
        if self.window is DEFAULT_WINDOW:
            self.window = "abdomen"
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS.get(self.preset, {}) if self.preset else {}
        # Model overrides merge: the caller's keys win over the preset's.
        self.model = {**preset.get("model", {}), **(self.model or {})}
        for key, base in _BASE_DEFAULTS.items():
            if getattr(self, key) is None:
                value = preset.get(key, base)
                setattr(self, key, dict(value) if isinstance(value, dict) else value)
        self.lr_steps = tuple(float(s) for s in self.lr_steps)
        self.min_size = _size_range(self.min_size)
        if self.supervision not in ("box", "mask"):
            raise ValueError(f"supervision must be 'box' or 'mask', got {self.supervision!r}")
        if any(not 0.0 < s <= 1.0 for s in self.lr_steps):
            raise ValueError(
                f"lr_steps are fractions of the schedule in (0, 1], got {self.lr_steps}")
        if int(self.crop) != self.crop or not (self.crop == 0 or self.crop >= 32):
            raise ValueError(f"crop must be 0 (whole images) or a size >= 32 px, got {self.crop}")
        for name in ("batch_size", "max_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_iterations is None and int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_iterations is not None and int(self.max_iterations) < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")

    def resumed_from(self, saved: dict[str, Any]) -> TrainConfig:
        """This config with the settings it left unset taken from `saved` (the `train_config`
        of the checkpoint it resumes), so a resumed run keeps its schedule and supervision.
        Setting either `epochs` or `max_iterations` replaces both."""
        keep = set(self.given)
        if keep & {"epochs", "max_iterations"}:
            keep |= {"epochs", "max_iterations"}
        values = {k: saved[k] for k in _RESUMED_FIELDS if k not in keep and k in saved}
        return self.filled_in(**values) if values else self

    def filled_in(self, **values: Any) -> TrainConfig:
        """A copy with ``values`` set for the caller: ``given`` stays what the caller set
        (``dataclasses.replace`` alone re-runs ``__post_init__``, which would count every
        field filled in by then as set)."""
        copy = dataclasses.replace(self, **values)
        copy.given = self.given
        return copy

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (paths as str, no stop_event) stored in checkpoints."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("stop_event", "given"):
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _size_range(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, float)):
        value = (value, value)
    value = tuple(value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2:
        raise ValueError(f"min_size must be one size or a (min, max) range, got {value}")
    lo, hi = (int(v) for v in value)
    if lo < 1 or hi < lo:
        raise ValueError(f"min_size must be a (min, max) range of positive sizes, got {value}")
    return lo, hi


@dataclass
class TrainEvent:
    """What callbacks receive after every iteration (and once more with done=True)."""

    iteration: int  # completed iterations
    max_iterations: int
    epoch: int
    losses: dict[str, float]
    lr: float
    eta_seconds: float
    checkpoint: Path | None = None  # written at this iteration, if any
    done: bool = False


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stops; the last checkpoint is kept."""


class StopTraining(Exception):
    """Raise from a callback to stop training cleanly (a checkpoint is saved first)."""


# ---------------------------------------------------------------------------------------------
# Data: dataset, transforms, collate
# ---------------------------------------------------------------------------------------------


def to_rgb255(image: np.ndarray, window: Any = None) -> np.ndarray:
    """Any HxW / HxWxC image -> HxWx3 float32 RGB in [0, 255] (what SOLOv2.forward expects)."""
    from boxlevelset.image import as_rgb

    return np.ascontiguousarray(as_rgb(image, window) * 255.0, dtype=np.float32)


class ResizeFlip:
    """Random shorter side in [min_size] (longer side capped at max_size) and horizontal flip.

    Applied jointly to the image (bilinear), its xyxy boxes and optional masks (nearest).
    """

    def __init__(self, min_size: tuple[int, int], max_size: int, flip_prob: float) -> None:
        self.min_size = _size_range(min_size)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        import cv2

        h, w = image.shape[:2]
        short = int(rng.integers(self.min_size[0], self.min_size[1] + 1))
        scale = min(short / min(h, w), self.max_size / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR  # as at inference
            image = cv2.resize(image, (nw, nh), interpolation=interp)
            if masks is not None and len(masks):
                masks = np.stack([
                    cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
                    for m in masks
                ]).astype(bool)
            elif masks is not None:
                masks = np.zeros((0, nh, nw), bool)
        boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
            if masks is not None:
                masks = masks[:, :, ::-1]
        image = np.ascontiguousarray(image)
        if masks is not None:
            masks = np.ascontiguousarray(masks)
        return image, boxes.astype(np.float32).reshape(-1, 4), masks


def random_crop(
    image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """A size x size window (narrower along a shorter side) of the image that holds the
    centre of a box drawn at random, anywhere such: (image, boxes clipped to it, their
    masks, which boxes are in it). A clipped box stays tight: its object runs on to the
    window's edge, as the box projection then says."""
    h, w = image.shape[:2]
    if max(h, w) <= size or len(boxes) == 0:
        return image, boxes, masks, np.ones(len(boxes), bool)
    cx, cy = (boxes[int(rng.integers(len(boxes)))].reshape(2, 2).mean(0))
    origin = []
    for centre, length in ((cx, w), (cy, h)):
        span = min(size, length)
        lo = int(np.clip(np.floor(centre) - span + 1, 0, length - span))
        hi = int(np.clip(np.floor(centre), 0, length - span))
        origin.append(int(rng.integers(lo, hi + 1)))
    x0, y0 = origin
    x1, y1 = x0 + min(size, w), y0 + min(size, h)
    clipped = np.clip(boxes - np.array([x0, y0, x0, y0], np.float32), 0,
                      np.array([x1 - x0, y1 - y0] * 2, np.float32))
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    image = np.ascontiguousarray(image[y0:y1, x0:x1])
    if masks is not None:
        masks = np.ascontiguousarray(masks[inside][:, y0:y1, x0:x1])
    return image, clipped[inside], masks, inside


# Decoded images a cropping BoxDataset keeps (per data-loading process).
_CACHE_BYTES = 2**30


class BoxDataset(torch.utils.data.Dataset):
    """Records of a BoxFolder that carry boxes, as training samples.

    Indexing takes an int or (index, augmentation_seed), so random transforms are reproducible
    regardless of worker count and across resumes.
    """

    def __init__(
        self, folder: Any, class_names: Sequence[str], transform: ResizeFlip | None,
        with_masks: bool = False, min_box_size: float = 1.0, crop: int = 0,
    ) -> None:
        self.folder = folder
        by_name = {name: i for i, name in enumerate(class_names)}
        self.category_to_label: dict[int, int] = {}
        for cat in folder.categories:
            if cat["name"] not in by_name:
                raise ValueError(
                    f"{folder.root}: category {cat['name']!r} is not among the model's classes "
                    f"{list(class_names)}"
                )
            self.category_to_label[int(cat["id"])] = by_name[cat["name"]]
        self.transform = transform
        self.crop = int(crop)  # random crops of larger images first (random_crop)
        self.with_masks = with_masks
        self.min_box_size = float(min_box_size)
        self.records = [r for r in folder.records if len(r.boxes)]
        # Images without boxes: named in the warning train() gives (a box-only run cannot
        # use them, but a user may have meant them to count, e.g. as negatives).
        self.empty_names = [r.name for r in folder.records if not len(r.boxes)]
        self.skipped_empty = len(self.empty_names)
        self._unreadable: set[Path] = set()
        # With crops, a few large images are decoded again and again (a 3480x2080 PNG:
        # about 0.1 s a sample): the decoded pixels are kept, up to _CACHE_BYTES.
        self._cache: dict[int, np.ndarray] = {}
        if with_masks:
            for r in self.records:
                if any(s is None for s in r.segmentations):
                    raise ValueError(
                        f"supervision='mask' needs a segmentation for every box, but "
                        f"{r.file_name} in {folder.root} has boxes without one"
                    )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record, image = self._readable(index)
        boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
        labels = np.array([self.category_to_label[int(c)] for c in record.category_ids], np.int64)
        masks = None
        if self.with_masks:
            masks = self.folder.gt_masks(record)
            if masks is None:
                raise ValueError(f"{record.file_name}: supervision='mask' but no masks")
        rng = np.random.default_rng(seed)
        if self.crop:
            image, boxes, masks, inside = random_crop(image, boxes, masks, self.crop, rng)
            labels = labels[inside]
        if self.transform is not None:
            image, boxes, masks = self.transform(image, boxes, masks, rng)
        # Boxes that shrink below a pixel after resizing carry no signal: drop them.
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & (
            (boxes[:, 3] - boxes[:, 1]) >= self.min_box_size)
        sample = {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(labels[keep]),
            "image_id": int(record.image_id),
            "dropped": int((~keep).sum()),
        }
        if masks is not None:
            sample["masks"] = torch.from_numpy(masks[keep])
        return sample

    def _readable(self, index: int) -> tuple[Any, np.ndarray]:
        """The record at `index` and its RGB pixels; a file that fails to decode (the folder
        check reads headers, PNG checksums and TIFF lengths: a file damaged after the folder
        loaded passes it) is skipped with a warning naming it, and the next readable record
        takes its place, so one bad file does not end a run."""
        from boxlevelset.data import ImageReadError

        for step in range(len(self.records)):
            position = (index + step) % len(self.records)
            record = self.records[position]
            if position in self._cache:
                return record, self._cache[position]
            try:
                pixels = to_rgb255(self.folder.load_image(record))
                if self.crop and sum(a.nbytes for a in self._cache.values()) + pixels.nbytes \
                        <= _CACHE_BYTES:
                    self._cache[position] = pixels
                return record, pixels
            except ImageReadError as err:
                if record.path not in self._unreadable:
                    self._unreadable.add(record.path)
                    logger.warning("skipping unreadable image in training: %s", err)
        raise ImageReadError(f"{self.folder.root}: no image of the folder can be read")


def _skipped_empty_message(names: Sequence[str], listed: int = 5) -> str:
    """How many images have no boxes (so training leaves them out), naming them when few."""
    n = len(names)
    text = f"{n} image{'s' if n != 1 else ''} without boxes {'are' if n != 1 else 'is'} " \
           "not used for training"
    return text + (f": {', '.join(names)}" if n <= listed else "")


def collate(samples: list[dict[str, Any]], divisor: int = SIZE_DIVISOR
            ) -> tuple[torch.Tensor, list[dict]]:
    """Pad images (bottom/right, zeros) to a common size divisible by `divisor` (the
    network's, as ``model.pad_to_multiple`` pads a single image; masks padded with them)."""
    h = max(s["image"].shape[1] for s in samples)
    w = max(s["image"].shape[2] for s in samples)
    h, w = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
    images = torch.zeros(len(samples), 3, h, w, dtype=torch.float32)
    targets = []
    for i, s in enumerate(samples):
        _, ih, iw = s["image"].shape
        images[i, :, :ih, :iw] = s["image"]
        target = {"boxes": s["boxes"], "labels": s["labels"], "image_id": s["image_id"],
                  "image_size": (ih, iw), "dropped": s["dropped"]}
        if "masks" in s:
            masks = torch.zeros(len(s["masks"]), h, w, dtype=torch.bool)
            masks[:, :ih, :iw] = s["masks"]
            target["masks"] = masks
        targets.append(target)
    return images, targets


class _EpochSampler(torch.utils.data.Sampler):
    """(index, augmentation seed) pairs of one epoch for this rank, from `skip` samples on.

    Shuffling and the rank split come from DistributedSampler (also for one process);
    `set_epoch(epoch, skip)` is read in the main process at each `iter(loader)`, so one
    DataLoader (with persistent workers) serves every epoch, and a resumed run continues
    mid-epoch with the same samples and augmentations it would have had.
    """

    def __init__(self, n: int, world: int, rank: int, seed: int) -> None:
        self.base = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.rank, self.seed = rank, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _items(self) -> list[tuple[int, int]]:
        self.base.set_epoch(self.epoch)
        return [
            (int(idx), int(np.random.SeedSequence(
                [self.seed, self.epoch, self.rank, pos]).generate_state(1)[0]))
            for pos, idx in enumerate(self.base)
        ][self.skip:]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norm scales/shifts, biases) as in the paper."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _apply_given_optimizer_settings(config: TrainConfig, optimizer: torch.optim.Optimizer,
                                    scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """A resumed run's optimizer state brings back the saved lr and weight decay; those the
    caller gave for this run replace them (the schedule's factors still apply to the lr)."""
    if "lr" in config.given:
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler.base_lrs = [float(config.lr)] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = float(config.lr)
            group["lr"] = float(config.lr) * factor
    if "weight_decay" in config.given:
        for group in optimizer.param_groups:  # the decaying group holds the weight matrices
            if any(p.ndim > 1 for p in group["params"]):
                group["weight_decay"] = float(config.weight_decay)


def lr_factor(iteration: int, max_iterations: int, warmup_iters: int, warmup_factor: float,
              steps: Sequence[float], gamma: float) -> float:
    """Learning-rate multiplier at `iteration` (0-based): linear warm-up, then x gamma steps."""
    factor = gamma ** sum(iteration >= int(round(s * max_iterations)) for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------


# Parameters with one row per class (the category branch's last convolution).
_CLASS_ROWS = ("cate_pred.weight", "cate_pred.bias")


def build_model(config: TrainConfig, class_names: Sequence[str]) -> nn.Module:
    """SOLOv2 for `class_names`: fresh from the config, or initialised from a checkpoint.

    With `init_checkpoint`, the architecture comes from the checkpoint; weights whose shapes
    still fit are loaded (a different class list re-initialises only the category output).
    """
    from boxlevelset.model import ModelConfig, SOLOv2, load_checkpoint

    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    if config.init_checkpoint:
        ckpt = load_checkpoint(config.init_checkpoint, "cpu")
        values = {k: v for k, v in dict(ckpt["config"]).items() if k in valid}
    else:
        ckpt = None
        values = {"backbone": config.backbone}
    # Test at the middle of the training scales unless told otherwise.
    values.update(input_size=int(round(sum(config.min_size) / 2)), max_size=int(config.max_size))
    overrides = dict(config.model or {})
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; valid: {sorted(valid)}")
    if ckpt is not None:  # the architecture is fixed by the checkpoint; keep only test knobs
        overrides = {k: v for k, v in overrides.items()
                     if "threshold" in k or k in ("input_size", "max_size")}
    values.update(overrides)
    values.update(num_classes=len(class_names), class_names=list(class_names),
                  supervision=config.supervision)
    model_config = ModelConfig(**{k: v for k, v in values.items() if k in valid})
    model = SOLOv2(model_config, pretrained=False if ckpt is not None else config.pretrained)
    if ckpt is not None:
        own = model.state_dict()
        old_names = list(dict(ckpt["config"]).get("class_names") or [])
        state = {k: v for k, v in ckpt["model"].items() if k in own and own[k].shape == v.shape
                 and not k.endswith(_CLASS_ROWS)}
        # The category branch's rows are classes: a class keeps its row by name (a new class
        # list may reorder, rename or add classes); classes new to the model keep their
        # fresh initialisation.
        for key in (k for k in own if k.endswith(_CLASS_ROWS) and k in ckpt["model"]):
            rows = own[key].clone()
            for i, name in enumerate(class_names):
                if name in old_names and old_names.index(name) < len(ckpt["model"][key]):
                    rows[i] = ckpt["model"][key][old_names.index(name)]
            state[key] = rows
        fresh = [name for name in class_names if name not in old_names]
        if fresh:
            logger.info("init from %s: classes new to the model: %s", config.init_checkpoint,
                        ", ".join(fresh))
        skipped = sorted(set(own) - set(state))
        model.load_state_dict(state, strict=False)
        if skipped:
            logger.info("init from %s: %d tensors re-initialised (%s)", config.init_checkpoint,
                        len(skipped), ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))
    return model


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def _dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the torchrun environment; (1, 0, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' under torchrun -> cuda:LOCAL_RANK."""
    from boxlevelset.model import parse_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def _any_rank(flag: bool, distributed: bool, device: torch.device) -> bool:
    """True if `flag` holds on any rank (so every rank takes the same branch)."""
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over the ranks (one all_reduce); a NaN or inf on any rank
    makes that mean non-finite on every rank, so all of them see a divergence together."""
    keys = sorted(values)  # the same order on every rank
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    mean = dict(zip(keys, (t / torch.distributed.get_world_size()).tolist()))
    return {k: mean[k] for k in values}  # the log's columns keep the model's order


def weights_digest(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 over a model's state dict (names, dtypes and bytes), for comparing replicas."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Logging and checkpoints
# ---------------------------------------------------------------------------------------------


class _LossLog:
    """Per-iteration losses appended to a CSV (columns fixed by the first row) or JSON lines.

    On resume (`keep_until` = the checkpoint's iteration) rows written after that checkpoint
    by the interrupted run are dropped, so every iteration appears once.
    """

    def __init__(self, path: Path, keep_until: int | None = None) -> None:
        self.path = path
        self.jsonl = path.suffix in (".jsonl", ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None
        kept: list[str] = []
        if keep_until is not None and path.exists():
            lines = path.read_text().splitlines()
            if self.jsonl:
                kept = [ln for ln in lines if ln.strip()
                        and int(json.loads(ln).get("iteration", 0)) <= keep_until]
            elif lines:
                self.columns = next(csv.reader(lines[:1]))
                col = self.columns.index("iteration") if "iteration" in self.columns else 0
                kept = lines[:1] + [ln for ln in lines[1:]
                                    if int(next(csv.reader([ln]))[col]) <= keep_until]
        self.file = open(path, "w", newline="")
        for line in kept:
            self.file.write(line + "\n")

    def write(self, row: dict[str, Any]) -> None:
        if self.jsonl:
            self.file.write(json.dumps(row) + "\n")
        else:
            if self.columns is None:
                self.columns = list(row)
                csv.writer(self.file).writerow(self.columns)
            csv.writer(self.file).writerow([_fmt(row.get(c, "")) for c in self.columns])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _check_output_dir(out_dir: Path) -> None:
    """ValueError naming the output folder when it cannot be created or written; creates
    nothing, so a run that fails on its data leaves no empty folder behind."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is a file, not a folder")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the output folder {str(out_dir)!r}: "
                         f"{str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "output folder" if existing == out_dir else "folder to create it in"
        raise ValueError(f"cannot write to the {what} {str(existing)!r}")


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _save(path: Path, model: nn.Module, **extra: Any) -> Path:
    from boxlevelset.model import save_checkpoint

    save_checkpoint(path, model, **extra)
    return path


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _call_callbacks(callbacks: Iterable[Callable], event: TrainEvent) -> bool:
    """Run the callbacks; False if any asked to stop (returned False or raised StopTraining)."""
    keep_going = True
    for cb in callbacks:
        try:
            if cb(event) is False:
                keep_going = False
        except StopTraining:
            keep_going = False
    return keep_going


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Consecutive fp16 steps skipped by the GradScaler before the run counts as diverged: each
# halves the loss scale, and from 2**16 this many leave it far below 1.
MAX_SKIPPED_STEPS = 24


def _amp_settings(config: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype | None]:
    use = device.type == "cuda" if config.amp is None else bool(config.amp)
    if use and device.type != "cuda":
        raise ValueError("amp=True needs a CUDA device (mixed precision is off on CPU)")
    if not use:
        return False, None
    # Native bf16 only (Ampere on): by default torch also says yes where it is emulated (T4,
    # V100), slowly; those get fp16 with the GradScaler.
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return True, torch.bfloat16 if native_bf16 else torch.float16


def train(
    config: TrainConfig, callbacks: Sequence[Callable[[TrainEvent], Any]] = (),
    progress: bool = False,
) -> Path:
    """Train (or fine-tune, or resume) a box-supervised SOLOv2 and return the final checkpoint.

    Writes `output_dir/last.pth` (full state, resumable) every `checkpoint_every` iterations,
    on stop and at the end, and `output_dir/model.pth` (weights + config) at the end. A stop
    request (callback returning False, StopTraining, `config.stop_event`, `time_limit`) saves
    `last.pth` and returns it. A NaN/inf loss or gradient raises TrainingDiverged (a
    RuntimeError) without saving.
    """
    from boxlevelset.data import load_box_folder

    world, rank, local_rank = _dist_env()
    distributed = world > 1
    if distributed and ":" in str(config.device):
        # Every rank would take that one GPU (NCCL: "Duplicate GPU"): each takes its own.
        raise ValueError(f"device {config.device!r} names one GPU, but {world} processes "
                         "train together: give 'cuda' or 'auto' (each takes cuda:LOCAL_RANK)")
    device = resolve_device(config.device, local_rank)
    # A process group the caller set up is the caller's to end; one made here ends here.
    own_group = distributed and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    callbacks = list(callbacks) if is_main else []
    out_dir = Path(config.output_dir)
    last_path, final_path = out_dir / "last.pth", out_dir / "model.pth"
    log: _LossLog | None = None
    bar = None
    try:
        problem = None
        if is_main:  # before the data loads: a bad output path fails in a second, not later
            try:
                _check_output_dir(out_dir)
                _refuse_earlier_run(config)
            except ValueError as err:
                problem = str(err)
        if distributed:  # every rank fails with rank 0's reason, not with a broken connection
            shared = [problem]
            torch.distributed.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem:
            raise ValueError(problem)
        resume = config.resume
        if resume == "auto":
            resume = last_path if last_path.exists() else None
            if distributed:  # rank 0 decides: output folders may be local to each node
                shared = [str(resume) if resume else None]
                torch.distributed.broadcast_object_list(shared, src=0)
                resume = Path(shared[0]) if shared[0] else None
        ckpt = None
        if resume:
            from boxlevelset.model import load_checkpoint

            ckpt = load_checkpoint(resume, "cpu")
            for key in ("model", "optimizer", "scheduler", "iteration"):
                if key not in ckpt:
                    raise ValueError(f"{resume}: cannot resume, the checkpoint has no {key!r} "
                                     "(to fine-tune from a model file, pass it as --init / "
                                     "init_checkpoint)")
            # Continue the checkpoint's schedule: a resume that does not repeat --iterations
            # (or the lr, batch, supervision ...) must not switch to the preset's.
            config = config.resumed_from(dict(ckpt.get("train_config") or {}))
        _seed_everything(config.seed)
        folder = load_box_folder(config.data, window=config.window)
        saved_window = folder.info.get("window")
        if "window" not in config.given and isinstance(saved_window, list) \
                and len(saved_window) == 2 and not (ckpt is not None and "window" in
                                                    (ckpt.get("train_config") or {})):
            # A CT folder saved by the plugin names the window its boxes were drawn in: the
            # model learns the slices as the annotator saw them (and predict repeats it).
            config = config.filled_in(window=tuple(float(v) for v in saved_window))
            folder.window = config.window
        # A resumed run keeps its checkpoint's classes and architecture: the command that
        # resumes it need not repeat the original model settings.
        class_names = list(ckpt["config"]["class_names"] if ckpt is not None else
                           config.class_names or [c["name"] for c in folder.categories])
        if not class_names:
            raise ValueError(f"{config.data}: the folder defines no categories to train on")
        dataset = BoxDataset(
            folder, class_names, ResizeFlip(config.min_size, config.max_size, config.flip_prob),
            with_masks=config.supervision == "mask", crop=config.crop)
        if len(dataset) == 0:
            raise ValueError(f"{config.data}: no image has a box annotation to train on")
        if is_main and dataset.skipped_empty:
            # A warning, not info: shown by default, as skipped unreadable images are.
            logger.warning("%s", _skipped_empty_message(dataset.empty_names))

        per_rank_batch = max(1, int(config.batch_size) // world)
        if distributed and int(config.batch_size) % world:
            logger.warning("batch_size %d is not divisible by %d processes: using %d per process",
                           config.batch_size, world, per_rank_batch)
        samples_per_rank = math.ceil(len(dataset) / world)
        iters_per_epoch = math.ceil(samples_per_rank / per_rank_batch)
        max_iter = int(config.max_iterations or int(config.epochs) * iters_per_epoch)

        if ckpt is not None:
            from boxlevelset.model import ModelConfig, SOLOv2

            model = SOLOv2(ModelConfig.from_dict(dict(ckpt["config"])), pretrained=False)
        else:
            # Rank 0 first: pretrained weights are downloaded once into the shared cache,
            # then read by the others, instead of N downloads racing for one file.
            if distributed and not is_main:
                torch.distributed.barrier()
            model = build_model(config, class_names)
            if distributed and is_main:
                torch.distributed.barrier()
        model = model.to(device)
        model.train()
        optimizer = build_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: lr_factor(it, max_iter, int(config.warmup_iters),
                                            config.warmup_factor, config.lr_steps,
                                            config.lr_gamma))
        use_amp, amp_dtype = _amp_settings(config, device)
        scaler = torch.amp.GradScaler(device.type,
                                      enabled=use_amp and amp_dtype == torch.float16)

        start_iter = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _apply_given_optimizer_settings(config, optimizer, scheduler)
            if ckpt.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
            start_iter = int(ckpt["iteration"])
            if is_main:
                logger.info("resumed from %s at iteration %d", resume, start_iter)

        net: nn.Module = model
        if distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters)

        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            log_path = Path(config.log_path) if config.log_path else out_dir / "log.csv"
            log = _LossLog(log_path, keep_until=start_iter if resume else None)
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=max_iter, initial=start_iter, desc="train", unit="it")

        train_state = {"train_config": config.to_dict(), "class_names": class_names}

        def save_last(iteration: int) -> Path | None:
            if not is_main:
                return None
            return _save(last_path, model, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict() if scaler.is_enabled() else None,
                         iteration=iteration, **train_state)

        sampler = _EpochSampler(len(dataset), world, rank, config.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank_batch, sampler=sampler, collate_fn=collate,
            num_workers=config.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=config.num_workers > 0)
        it = start_iter
        last_saved: Path | None = Path(resume) if resume else None
        stopped = False
        t_start = time.perf_counter()
        iter_times: list[float] = []
        dropped_total = 0
        skipped_in_a_row = 0  # fp16 steps the GradScaler skipped for non-finite gradients
        epoch = it // iters_per_epoch
        while it < max_iter and not stopped:
            epoch = it // iters_per_epoch
            sampler.set_epoch(epoch, skip=(it % iters_per_epoch) * per_rank_batch)
            t_iter = time.perf_counter()
            for images, targets in loader:
                dropped_total += sum(t.pop("dropped") for t in targets)
                images = images.to(device, non_blocking=True)
                targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                            for k, v in t.items()} for t in targets]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss_dict = net(images, targets)
                loss_dict = {k: v.float() for k, v in loss_dict.items() if k.startswith("loss")}
                loss = sum(loss_dict.values())
                losses = {k: float(v.detach()) for k, v in loss_dict.items()}
                losses["loss"] = float(loss.detach())
                if distributed:  # what is logged is the whole batch's, not rank 0's share
                    losses = _mean_over_ranks(losses, device)
                if not math.isfinite(losses["loss"]):  # on any rank: the mean is not finite
                    raise TrainingDiverged(
                        f"training diverged: non-finite loss at iteration {it + 1} ({losses}); "
                        f"this state was not saved, last good checkpoint: "
                        f"{last_saved or 'none'}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                 config.grad_clip))
                if not scaler.is_enabled() and not math.isfinite(grad_norm):
                    raise TrainingDiverged(
                        f"training diverged: non-finite gradient norm at iteration {it + 1}; "
                        f"this state was not saved, last good checkpoint: "
                        f"{last_saved or 'none'}")
                scale = scaler.get_scale() if scaler.is_enabled() else 0.0
                scaler.step(optimizer)  # skips the step (fp16 only) if grads overflowed
                scaler.update()
                if scaler.is_enabled():
                    # A skipped step lowers the scale. A few are normal while it settles;
                    # a run of them means the gradients are non-finite at any scale, and
                    # the run would "finish" without a single optimizer step.
                    skipped_in_a_row = skipped_in_a_row + 1 if scaler.get_scale() < scale else 0
                    if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                        raise TrainingDiverged(
                            f"training diverged: {skipped_in_a_row} steps in a row had "
                            f"non-finite gradients under fp16 (loss scale now "
                            f"{scaler.get_scale():g}) at iteration {it + 1}; this state was not "
                            f"saved, last good checkpoint: {last_saved or 'none'}")
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                it += 1

                now = time.perf_counter()
                iter_times.append(now - t_iter)
                t_iter = now
                recent = iter_times[-20:]
                eta = (max_iter - it) * (sum(recent) / len(recent))

                want_stop = (config.stop_event is not None and config.stop_event.is_set()) or (
                    config.time_limit is not None and now - t_start >= config.time_limit)
                checkpoint = None
                if is_main:
                    log.write({"iteration": it, "epoch": epoch, "lr": lr, **losses,
                               "grad_norm": grad_norm, "time": now - t_start})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}")
                    if it % config.checkpoint_every == 0 and it < max_iter:
                        checkpoint = last_saved = save_last(it)
                    event = TrainEvent(it, max_iter, epoch, losses, lr, eta, checkpoint)
                    if not _call_callbacks(callbacks, event):
                        want_stop = True
                stopped = _any_rank(want_stop, distributed, device) and it < max_iter
                if stopped or it >= max_iter:
                    break

        if is_main and dropped_total:
            logger.info("%d boxes smaller than a pixel after resizing were dropped", dropped_total)
        if config.rank_digest:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"weights-rank{rank}.sha256").write_text(weights_digest(model) + "\n")
        result = last_path if stopped else final_path
        if is_main:
            save_last(it)
            if not stopped:
                _save(final_path, model, iteration=it, **train_state)
            elapsed = time.perf_counter() - t_start
            logger.info("%s after %d iterations (%.1f s): %s",
                        "stopped" if stopped else "finished", it, elapsed, result)
            last_losses = losses if it > start_iter else {}
            _call_callbacks(callbacks, TrainEvent(it, max_iter, epoch, last_losses,
                                                  optimizer.param_groups[0]["lr"], 0.0,
                                                  result, done=True))
        if distributed:
            torch.distributed.barrier()
        return result
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Command line (registered as `boxlevelset train` by boxlevelset.cli; also `python -m`)
# ---------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        if "," in value:  # 12,10,8 reads as text and fails later, far from the cause
            raise argparse.ArgumentTypeError(
                f"{text!r}: a list is given as JSON, e.g. {key.strip()}=[{value}]") from None
        parsed = value
    if isinstance(parsed, list):
        parsed = tuple(tuple(p) if isinstance(p, list) else p for p in parsed)
    return key.strip(), parsed


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `boxlevelset train`; unset options fall back to the preset."""
    p = parser
    p.add_argument("data", help="box-labeled folder (images/ + annotations.json, or Pascal VOC)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="lite",
                   help="training recipe (default: lite, for CPU fine-tuning)")
    p.add_argument("-o", "--output", "--out", dest="output", default="runs/boxlevelset",
                   help="output directory")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="schedule length (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="images per iteration over all processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--warmup", type=int, help="linear warm-up iterations")
    p.add_argument("--min-size", type=int, nargs="+", metavar="PX",
                   help="shorter side: one value or a MIN MAX range")
    p.add_argument("--max-size", type=int, help="cap on the longer side")
    p.add_argument("--crop", type=int, metavar="PX",
                   help="train on random PX x PX crops (each around a box) of larger images, "
                        "e.g. stitched microscopy scans, which whole would shrink to the "
                        "input size; predict them with --tile of about PX (default: 0, whole "
                        "images)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None,
                     help="mixed precision (default: on with CUDA)")
    amp.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--supervision", choices=("box", "mask"),
                   help="box (the paper, default) or mask (fully supervised ceiling)")
    p.add_argument("--init", help="fine-tune from this model checkpoint")
    p.add_argument("--resume",
                   help="resume from a last.pth ('auto': OUTPUT/last.pth if present); the run "
                        "continues its own schedule unless options here change it")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUTPUT that holds an earlier one (replacing "
                        "its model.pth, last.pth and log)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--seed", type=int, help="shuffling and augmentation seed (default 0)")
    p.add_argument("--window",
                   help="CT window for volume slices: a preset or level,width (default: "
                        "abdomen, or on --resume the resumed run's)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone init")
    p.add_argument("--model", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override, e.g. --model fpn_channels=64 (repeatable)")
    p.add_argument("--log", help="loss log path (.csv or .jsonl; default OUTPUT/log.csv)")
    p.add_argument("--time-limit", type=float, help="stop cleanly after this many minutes")
    p.add_argument("--rank-digest", action="store_true",
                   help="write each process's weight digest to OUTPUT (checks DDP replicas)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `add_train_arguments` options."""
    return TrainConfig(
        data=args.data, preset=args.preset, output_dir=args.output, epochs=args.epochs,
        max_iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_iters=args.warmup,
        min_size=tuple(args.min_size) if args.min_size else None, max_size=args.max_size,
        crop=args.crop,
        device=args.device, amp=args.amp, supervision=args.supervision,
        init_checkpoint=args.init, resume=args.resume, checkpoint_every=args.checkpoint_every,
        num_workers=args.workers, seed=args.seed,
        window=DEFAULT_WINDOW if args.window is None else args.window,
        pretrained=not args.no_pretrained, model=dict(args.model), log_path=args.log,
        time_limit=args.time_limit * 60 if args.time_limit else None,
        rank_digest=args.rank_digest, overwrite=getattr(args, "overwrite", False),
    )


# What a training run writes into its output folder (the loss log unless log_path moves it).
RUN_FILES = ("model.pth", "last.pth", "log.csv", "log.jsonl")


def run_files(folder: str | os.PathLike, log_path: str | os.PathLike | None = None
              ) -> list[Path]:
    """The files of a training run that ``folder`` holds (``log_path``: a log kept
    elsewhere), which a new run there would replace."""
    folder = Path(folder)
    candidates = [folder / name for name in RUN_FILES]
    if log_path:
        candidates.append(Path(log_path))
    return [f for f in dict.fromkeys(candidates) if f.is_file()]


def _earlier_run(config: TrainConfig) -> list[str]:
    """Files of an earlier run in the output folder that a new (not resumed) run would
    replace; empty when resuming or when the folder holds none."""
    if config.resume and (config.resume != "auto"
                          or (Path(config.output_dir) / "last.pth").exists()):
        return []
    return [str(f) for f in run_files(config.output_dir, config.log_path)]


def _refuse_earlier_run(config: TrainConfig) -> None:
    """ValueError when a new run would replace an earlier run's files and the caller did not
    ask for it (``overwrite``): a second run into the same folder had silently replaced the
    first one's model."""
    earlier = _earlier_run(config)
    if earlier and not config.overwrite:
        can_resume = (Path(config.output_dir) / "last.pth").is_file()
        raise ValueError(
            f"{config.output_dir} already holds a training run ({', '.join(earlier)}); "
            + ("continue it with --resume auto (resume='auto'), " if can_resume else "")
            + "start over with --overwrite (overwrite=True), or choose another --output "
            "(output_dir)")


def _launched() -> bool:
    """Whether torchrun (or another launcher of several processes) started this one."""
    return "TORCHELASTIC_RUN_ID" in os.environ or _dist_env()[0] > 1


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (kill, job schedulers) stop training cleanly: the run
    finishes its iteration and writes last.pth instead of losing everything since the last
    periodic checkpoint. A second signal, sent on purpose later, aborts at once. Handlers are
    installed only in the main thread (Python's rule) and restored on exit."""

    SIGNALS = ("SIGINT", "SIGTERM")
    # torchrun forwards the signals it gets to its workers, and SLURM signals every process
    # of a job: a worker gets one request twice within milliseconds. Repeats this soon, and
    # any repeat under torchrun (which kills its workers itself after its own timeout), are
    # the same request.
    REPEAT_SECONDS = 5.0

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.received: int | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if _launched() or time.monotonic() - self._first < self.REPEAT_SECONDS:
                return
            raise KeyboardInterrupt
        self.received = signum
        self._first = time.monotonic()
        self.event.set()
        again = ("torchrun stops the workers itself if saving takes too long" if _launched()
                 else "send it again to abort without saving")
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration and saving "
              f"last.pth ({again})", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    self._previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for num, handler in self._previous.items():
            signal.signal(num, handler)


def run_train(args: argparse.Namespace) -> int:
    """`boxlevelset train`: train and print the checkpoint path; returns the exit code
    (128 + the signal's number when SIGINT/SIGTERM stopped it, as shells report it)."""
    config = config_from_args(args)
    _, rank, _ = _dist_env()
    _refuse_earlier_run(config)  # before the signal handlers and the data
    config.stop_event = config.stop_event or threading.Event()
    with _StopOnSignal(config.stop_event) as stopper:
        path = train(config, progress=not args.no_progress and rank == 0)
    if rank == 0:
        print(path)
    return 128 + stopper.received if stopper.received is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m boxlevelset.train` (what torchrun launches)."""
    parser = add_train_arguments(argparse.ArgumentParser(
        prog="python -m boxlevelset.train", description="Train box-supervised SOLOv2."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_train(args)


class _CallableModule(types.ModuleType):
    """``boxlevelset.train`` names both this module and its ``train`` function; once the
    module is imported, Python binds the package attribute to the module. Calling the
    module calls the function, so ``boxlevelset.train(config)`` works either way (and
    ``import boxlevelset.train`` still gives the module)."""

    def __call__(self, config: TrainConfig,
                 callbacks: Sequence[Callable[[TrainEvent], Any]] = (),
                 progress: bool = False) -> Path:
        return train(config, callbacks, progress)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(main())
