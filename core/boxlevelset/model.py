"""SOLOv2 with the box-supervised level-set instance loss, a box-prompted Predictor, checkpoints.

Training sees only boxes (``supervision="box"``): focal loss on the category grid plus, for each
positive cell, the level-set instance loss of DESIGN.md Eq. 11 on the cell's mask. With
``supervision="mask"`` the instance loss is SOLOv2's dice on ground-truth masks (the ceiling).
Masks are compared at output stride 4/4/8/16/16 for the five levels (the stride-4 dynamic-conv
output average-pooled) unless ``per_level_mask_stride`` is off (then all at stride 4).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boxlevelset.export import BoxMasks
from boxlevelset.heads import FPN, GridHead, MaskFeatureHead
from boxlevelset.image import Window, as_boxes, as_rgb, pixel_bounds
from boxlevelset.losses import (
    LevelSetWeights,
    dice_loss,
    levelset_instance_loss,
    sigmoid_focal_loss,
)
from boxlevelset.targets import assign_targets, masks_to_boxes, matrix_nms, points_nms

SIZE_DIVISOR = 32


@dataclass
class Instances:
    """Instances of one image: masks [N, H, W] bool (or, from ``predict(cropped=True)``, a
    ``BoxMasks``: each mask over its box), boxes [N, 4] xyxy, labels [N], scores [N]."""

    masks: np.ndarray | BoxMasks
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


# Widths of the lite model's FPN and heads (ModelConfig.lite, the "lite" training preset).
LITE_HEADS: dict[str, int] = dict(
    fpn_channels=64, head_channels=64, stacked_convs=2, mask_feature_channels=64,
    mask_feature_mid_channels=64,
)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a SOLOv2 level-set model (stored inside checkpoints)."""

    backbone: str = "resnet50"
    num_classes: int = 20
    class_names: tuple[str, ...] = ()
    frozen_stages: int = 1
    # Network widths (SOLOv2 defaults; the lite preset shrinks them).
    fpn_channels: int = 256
    head_channels: int = 256
    stacked_convs: int = 4
    mask_feature_channels: int = 256
    mask_feature_mid_channels: int = 128
    # Grid levels (P2 halved, P3, P4, P5, P6 at P5 size).
    num_grids: tuple[int, ...] = (40, 36, 24, 16, 12)
    scale_ranges: tuple[tuple[float, float], ...] = (
        (1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)
    )
    strides: tuple[int, ...] = (8, 8, 16, 32, 32)
    sigma: float = 0.2
    min_box_pixels: float = 10.0
    per_level_mask_stride: bool = True
    # Losses.
    supervision: str = "box"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_category: float = 1.0
    # The level-set loss's weights and tree-filter settings: LevelSetWeights' defaults,
    # kept flat here so that checkpoints store them as plain config fields.
    lambda_image: float = LevelSetWeights.lambda_image
    lambda_feature: float = LevelSetWeights.lambda_feature
    alpha_box: float = LevelSetWeights.alpha_box
    gamma: float = LevelSetWeights.gamma
    dice_weight: float = 3.0
    feature_guide_channels: int = 9
    tree_sigma_image: float = LevelSetWeights.tree_sigma_image
    tree_sigma_feature: float = LevelSetWeights.tree_sigma_feature
    tree_filter_max_side: int = LevelSetWeights.tree_filter_max_side
    # Guide of the first tree filter: the normalised network input (as the official code) or
    # the RGB image scaled to [0, 1] ("unit"); sigma 0.02 acts on squared distances in it.
    tree_image_guide: str = "normalized"
    # Inference.
    score_threshold: float = 0.1
    mask_threshold: float = 0.5
    nms_pre: int = 500
    nms_kernel: str = "gaussian"
    nms_sigma: float = 2.0
    update_threshold: float = 0.025
    max_per_image: int = 100
    # Input: shorter side resized to input_size, longer side capped at max_size, padded to /32.
    input_size: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.supervision not in ("box", "mask"):
            raise ValueError(f"supervision must be 'box' or 'mask', got {self.supervision!r}")
        if self.tree_image_guide not in ("normalized", "unit"):
            raise ValueError(
                f"tree_image_guide must be 'normalized' or 'unit', got {self.tree_image_guide!r}"
            )
        if self.nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel must be 'gaussian' or 'linear', got {self.nms_kernel!r}")
        for name in ("score_threshold", "mask_threshold", "update_threshold", "sigma"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.feature_guide_channels < 1 or self.mask_feature_channels < 1:
            raise ValueError("feature_guide_channels and mask_feature_channels must be >= 1")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.class_names = tuple(str(n) for n in self.class_names) or tuple(
            f"class_{i}" for i in range(self.num_classes)
        )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}"
            )
        self.num_grids = tuple(int(s) for s in self.num_grids)
        self.scale_ranges = tuple((float(a), float(b)) for a, b in self.scale_ranges)
        self.strides = tuple(int(s) for s in self.strides)
        if not len(self.num_grids) == len(self.scale_ranges) == len(self.strides) == 5:
            raise ValueError("num_grids, scale_ranges and strides need one entry per level (5)")
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(float(v) for v in value))

    @property
    def mask_strides(self) -> tuple[int, ...]:
        """Output stride of the training masks per level (4/4/8/16/16, or 4 everywhere)."""
        if not self.per_level_mask_stride:
            return (4,) * len(self.strides)
        return tuple(max(4, s // 2) for s in self.strides)

    @classmethod
    def lite(cls, **overrides: Any) -> ModelConfig:
        """A small CPU-friendly configuration: EfficientNet-Lite0, narrow FPN and heads."""
        base: dict[str, Any] = dict(
            backbone="efficientnet_lite0", **LITE_HEADS, input_size=512, max_size=853
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (saved in checkpoints; ``from_dict`` reads them back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from ``asdict`` output (lists become tuples); unknown keys are warned about."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ModelConfig ignores unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def pad_to_multiple(images: Tensor, divisor: int = SIZE_DIVISOR) -> Tensor:
    """Zero-pad [B, C, H, W] on the right and bottom to multiples of ``divisor``."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
    return images


@dataclass
class _Features:
    """Everything the heads produce for a batch (cached by the Predictor)."""

    mask_feature: Tensor  # [B, E, H/4, W/4]
    cates: list[Tensor]  # per level [B, K, S, S]
    kernels: list[Tensor]  # per level [B, E, S, S]
    input_size: tuple[int, int] = field(default=(0, 0))  # padded network input (H, W)


class SOLOv2(nn.Module):
    """SOLOv2 instance segmentation trained from boxes with level-set evolution (or from masks)."""

    def __init__(self, config: ModelConfig, pretrained: bool | str = True) -> None:
        super().__init__()
        from boxlevelset.backbone import build_backbone

        # The backbone's normalisation fills a copy: the caller's config stays as given (a
        # config reused for another backbone must not carry this one's mean and std).
        config = dataclasses.replace(config)
        self.config = config
        # The TrainConfig (as a dict) the weights were trained with, when loaded from a
        # checkpoint that has one: e.g. its CT window, which inference should repeat.
        self.train_config: dict[str, Any] = {}
        self.backbone = build_backbone(
            config.backbone, pretrained=pretrained, frozen_stages=config.frozen_stages
        )
        if config.pixel_mean is None:
            config.pixel_mean = tuple(float(v) for v in self.backbone.pixel_mean)
        if config.pixel_std is None:
            config.pixel_std = tuple(float(v) for v in self.backbone.pixel_std)
        self.register_buffer(
            "pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False
        )
        c = config.fpn_channels
        self.fpn = FPN(self.backbone.out_channels, c)
        self.grid_head = GridHead(
            c,
            config.head_channels,
            config.stacked_convs,
            config.num_classes,
            config.mask_feature_channels,
            config.num_grids,
        )
        self.mask_head = MaskFeatureHead(
            c, config.mask_feature_mid_channels, config.mask_feature_channels
        )
        # Learned guide of the second tree filter (DESIGN: one 3x3 conv over the mask feature).
        self.guide_conv = nn.Conv2d(
            config.mask_feature_channels, config.feature_guide_channels, 3, padding=1
        )

    # ------------------------------------------------------------------ shared pieces
    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.pixel_mean.device

    @property
    def class_names(self) -> tuple[str, ...]:
        """Category names, in the order of the category head's channels."""
        return self.config.class_names

    def normalize(self, images: Tensor) -> Tensor:
        """RGB 0-255 images standardised with the backbone's pixel mean and std."""
        return (images - self.pixel_mean) / self.pixel_std

    def features(self, images: Tensor) -> _Features:
        """Backbone, FPN, grid heads and mask feature for [B, 3, H, W] RGB 0-255 (padded)."""
        x = self.normalize(images)
        fpn = self.fpn(self.backbone(x))
        cates, kernels = self.grid_head(fpn)
        mask_feature = self.mask_head(fpn[:4])
        return _Features(mask_feature, cates, kernels, tuple(images.shape[-2:]))

    def forward(
        self, images: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (dict of scalars, keys ``loss_*``; their sum is the training loss) when
        training, or per-image detections ``dict(masks, boxes, labels, scores)`` in eval mode.

        images: [B, 3, H, W] float RGB in 0-255; padded to a multiple of 32 here if needed.
        targets: per image dict(boxes [N, 4] xyxy pixels, labels [N] 0-based, masks [N, H, W]
        bool, the last only for ``supervision="mask"``).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        images = pad_to_multiple(images.float())
        feats = self.features(images)
        if self.training:
            if targets is None or len(targets) != images.shape[0]:
                raise ValueError("training needs one target dict per image")
            return self.losses(images, feats, targets)
        return [self.detect(feats, b) for b in range(images.shape[0])]

    # ------------------------------------------------------------------ training
    def losses(
        self, images: Tensor, feats: _Features, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The training losses of a padded batch (``forward`` in training mode), as weighted
        scalars whose sum is the loss: ``loss_category`` (focal loss over every grid cell,
        divided by the positives + 1), and per positive cell either ``loss_dice`` against its
        ground-truth mask (``supervision="mask"``) or, from its box alone,
        ``loss_box_projection`` and the level-set energies ``loss_levelset_image`` and
        ``loss_levelset_feature`` (each averaged over the positives). ``targets`` as in
        ``forward``; boxes are clipped to the input."""
        cfg = self.config
        height, width = images.shape[-2:]
        mask_strides = cfg.mask_strides
        cate_targets = []  # per level [B, S, S]
        pos_kernels, pos_boxes, pos_batch, pos_stride, pos_object = [], [], [], [], []
        for b, tgt in enumerate(targets):
            boxes = tgt["boxes"].to(images.device, torch.float32).reshape(-1, 4)
            # Clip to the input; boxes left with no area fall out of every scale range.
            boxes = torch.stack(
                [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                 boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1
            )
            labels = tgt["labels"].to(images.device, torch.long).reshape(-1)
            if len(labels) != len(boxes):
                raise ValueError(f"target {b}: {len(boxes)} boxes but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
                raise ValueError(
                    f"target {b}: labels must lie in [0, {cfg.num_classes}), got "
                    f"{labels.min().item()}..{labels.max().item()}"
                )
            level_targets = assign_targets(
                boxes, labels, (height, width), cfg.num_grids, cfg.scale_ranges,
                cfg.sigma, cfg.min_box_pixels,
            )
            for level, lt in enumerate(level_targets):
                if b == 0:
                    cate_targets.append([])
                cate_targets[level].append(lt.labels)
                cells = torch.nonzero(lt.objects.flatten() >= 0, as_tuple=False).flatten()
                if cells.numel() == 0:
                    continue
                objs = lt.objects.flatten()[cells]
                kern = feats.kernels[level][b].flatten(1)[:, cells].T  # [n, E]
                pos_kernels.append(kern)
                pos_boxes.append(boxes[objs])
                pos_object.append(objs)
                pos_batch.append(torch.full_like(objs, b))
                pos_stride.append(torch.full_like(objs, mask_strides[level]))

        # Category: focal loss over every cell of every level, normalised by positives + 1.
        logits = torch.cat(
            [c.permute(0, 2, 3, 1).reshape(-1, cfg.num_classes) for c in feats.cates]
        )
        labels = torch.cat([torch.stack(t).flatten() for t in cate_targets])
        onehot = torch.zeros_like(logits)
        fg = labels >= 0
        onehot[fg, labels[fg]] = 1.0
        num_pos = int(fg.sum())
        loss_cate = sigmoid_focal_loss(logits, onehot, cfg.focal_alpha, cfg.focal_gamma)
        losses = {"loss_category": cfg.loss_category * loss_cate / (num_pos + 1)}

        keys = ["loss_dice"] if cfg.supervision == "mask" else [
            "loss_box_projection", "loss_levelset_image", "loss_levelset_feature"
        ]
        guide = self.guide_conv(feats.mask_feature) if cfg.supervision == "box" else None
        if not pos_kernels:
            # No positives: zero, but connected to every branch the instance loss would train.
            zero = sum(k.sum() for k in feats.kernels) * 0.0 + feats.mask_feature.sum() * 0.0
            zero = zero + 0.0 * (
                guide.sum() if guide is not None
                else sum(p.sum() for p in self.guide_conv.parameters())
            )
            losses.update({k: zero for k in keys})
            return losses

        kernels = torch.cat(pos_kernels)
        boxes = torch.cat(pos_boxes)
        batch_index = torch.cat(pos_batch)
        strides = torch.cat(pos_stride)
        objects = torch.cat(pos_object)
        # Dynamic 1x1 convs, one matmul per image.
        mask_logits = self.dynamic_masks(feats.mask_feature, kernels, batch_index)  # [P, h4, w4]
        sums = {k: mask_logits.new_zeros(()) for k in keys}
        normalized = self.normalize(images)
        for stride in torch.unique(strides).tolist():
            sel = torch.nonzero(strides == stride, as_tuple=False).flatten()
            factor = stride // 4
            logits_s = mask_logits[sel]
            if factor > 1:
                logits_s = F.avg_pool2d(logits_s[:, None], factor)[:, 0]
            if cfg.supervision == "mask":
                gt = torch.stack(
                    [self._target_mask(targets, int(b), int(o), (height, width))
                     for b, o in zip(batch_index[sel].tolist(), objects[sel].tolist())]
                )
                gt = (F.avg_pool2d(gt[:, None], stride)[:, 0] >= 0.5).float()
                sums["loss_dice"] = sums["loss_dice"] + cfg.dice_weight * dice_loss(
                    logits_s.sigmoid(), gt
                ).sum()
                # The guide conv is unused with masks; keep it in the graph for DDP.
                sums["loss_dice"] = sums["loss_dice"] + 0.0 * sum(
                    p.sum() for p in self.guide_conv.parameters()
                )
                continue
            image_norm = F.avg_pool2d(normalized, stride)
            terms = levelset_instance_loss(
                logits_s,
                boxes[sel] / stride,
                batch_index[sel],
                image_norm,
                image_norm if cfg.tree_image_guide == "normalized"
                else F.avg_pool2d(images / 255.0, stride),
                F.avg_pool2d(guide, factor) if factor > 1 else guide,
                self.levelset_weights,
            )
            for name, value in terms.items():
                sums["loss_" + name] = sums["loss_" + name] + value.sum()
        total = len(kernels)
        losses.update({k: v / total for k, v in sums.items()})
        return losses

    @property
    def levelset_weights(self) -> LevelSetWeights:
        """The level-set loss weights of this model's config."""
        return LevelSetWeights(**{f.name: getattr(self.config, f.name)
                                  for f in fields(LevelSetWeights)})

    @staticmethod
    def _target_mask(
        targets: list[dict[str, Tensor]], b: int, obj: int, size: tuple[int, int]
    ) -> Tensor:
        if "masks" not in targets[b]:
            raise ValueError("supervision='mask' needs 'masks' in every target dict")
        m = targets[b]["masks"][obj].float()
        h, w = m.shape[-2:]
        return F.pad(m, (0, size[1] - w, 0, size[0] - h))

    @staticmethod
    def dynamic_masks(mask_feature: Tensor, kernels: Tensor, batch_index: Tensor) -> Tensor:
        """Mask logits [N, h, w]: kernel n (1x1 conv weights) over its image's mask feature."""
        e, h, w = mask_feature.shape[1:]
        chunks, order = [], []
        for b in torch.unique(batch_index).tolist():
            sel = torch.nonzero(batch_index == b, as_tuple=False).flatten()
            chunks.append((kernels[sel] @ mask_feature[b].reshape(e, -1)).view(-1, h, w))
            order.append(sel)
        if not chunks:
            return mask_feature.new_zeros((0, h, w))
        # Back to the order of ``kernels`` (dtype follows the matmul, e.g. under autocast).
        return torch.cat(chunks)[torch.argsort(torch.cat(order))]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect(
        self, feats: _Features, b: int = 0, score_threshold: float | None = None
    ) -> dict[str, Tensor]:
        """SOLOv2 post-processing of image ``b``: masks at the padded input size (bool)."""
        probs, labels, scores = self.detect_probs(feats, b, score_threshold)
        h, w = feats.input_size
        masks = _threshold_resized(probs, (h, w), (h, w), (h, w), self.config.mask_threshold)
        return {
            "masks": masks,
            "boxes": masks_to_boxes(masks),
            "labels": labels,
            "scores": scores,
        }

    @torch.no_grad()
    def detect_probs(
        self, feats: _Features, b: int = 0, score_threshold: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mask probabilities at stride 4 [N, h4, w4], labels [N] and scores [N] for image b."""
        cfg = self.config
        thr = cfg.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= thr <= 1.0:  # NaN too: a score of 50 (percent?) silently kept nothing
            raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        cates = torch.cat(
            [points_nms(c[b : b + 1].sigmoid())[0].flatten(1).T for c in feats.cates]
        )  # [cells, K]
        kernels = torch.cat([k[b].flatten(1).T for k in feats.kernels])  # [cells, E]
        cell_strides = torch.cat(
            [torch.full((s * s,), st, device=cates.device)
             for s, st in zip(cfg.num_grids, cfg.strides)]
        )
        empty = (
            feats.mask_feature.new_zeros((0,) + tuple(feats.mask_feature.shape[-2:])),
            torch.zeros(0, dtype=torch.long, device=cates.device),
            cates.new_zeros(0),
        )
        cand = torch.nonzero(cates > thr, as_tuple=False)
        if cand.numel() == 0:
            return empty
        scores = cates[cand[:, 0], cand[:, 1]]
        # A near-zero threshold would make a mask for every cell and class: bound the work to the
        # best 2 x nms_pre category scores (only nms_pre of them reach Matrix NMS anyway).
        if len(scores) > 2 * cfg.nms_pre:
            top = scores.topk(2 * cfg.nms_pre).indices
            cand, scores = cand[top], scores[top]
        labels = cand[:, 1]
        # One mask per cell, shared by the classes that fire on it.
        cells, inverse = torch.unique(cand[:, 0], return_inverse=True)
        probs = self.dynamic_masks(
            feats.mask_feature[b : b + 1], kernels[cells], torch.zeros_like(cells)
        ).sigmoid()[inverse]
        masks = probs > cfg.mask_threshold
        areas = masks.flatten(1).sum(1).float()
        keep = areas > cell_strides[cand[:, 0]]  # drop masks smaller than their level's stride
        if not keep.any():
            return empty
        probs, masks, areas, scores, labels = (
            probs[keep], masks[keep], areas[keep], scores[keep], labels[keep]
        )
        maskness = (probs * masks).flatten(1).sum(1) / areas
        scores = scores * maskness
        order = scores.argsort(descending=True)[: cfg.nms_pre]
        probs, masks, scores, labels = probs[order], masks[order], scores[order], labels[order]
        scores = matrix_nms(masks, labels, scores, cfg.nms_kernel, cfg.nms_sigma)
        # SOLOv2's two thresholds (category score before, update_threshold after the mask
        # weighting and Matrix NMS); a threshold the caller gives also holds for the final
        # scores, so "score >= t" in a viewer or on the command line means what it says.
        final = cfg.update_threshold if score_threshold is None else max(cfg.update_threshold,
                                                                          thr)
        keep = scores >= final
        probs, scores, labels = probs[keep], scores[keep], labels[keep]
        order = scores.argsort(descending=True)[: cfg.max_per_image]
        return probs[order], labels[order], scores[order]

    # ------------------------------------------------------------------ numpy front end
    def resized_size(self, height: int, width: int) -> tuple[tuple[int, int], float]:
        """Network input size (before padding) and scale for an image of the given size."""
        cfg = self.config
        scale = min(cfg.input_size / min(height, width), cfg.max_size / max(height, width))
        return (max(1, round(height * scale)), max(1, round(width * scale))), scale

    def preprocess(self, image: np.ndarray, window: Window = None) -> tuple[Tensor, float]:
        """numpy image (HxW or HxWxC, any dtype, CT with a window) -> ([1, 3, H', W'] 0-255
        RGB padded to /32 on the model's device, scale from original to network pixels)."""
        import cv2

        img = as_rgb(image, window)
        (nh, nw), scale = self.resized_size(*img.shape[:2])
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)) * 255.0)[None]
        return pad_to_multiple(tensor.to(self.device)), scale

    @torch.no_grad()
    def predict(
        self, image: np.ndarray, window: Window = None, score_threshold: float | None = None,
        cropped: bool = False, tile: int | None = None, overlap: int | None = None,
    ) -> Instances:
        """Every instance in one numpy image, masks at the image's own size; with
        ``score_threshold``, only instances whose final score reaches it (default: the
        config's SOLOv2 thresholds); with ``cropped``, the masks over their boxes only
        (``Predictor.predict``). With ``tile``, the image is predicted in overlapping tiles
        of that many pixels (``overlap``, default tile // 4) and the instances merged
        (``boxlevelset.tiles.predict_tiled``): for images much larger than the training
        images, e.g. a microscopy mosaic, which the whole-image resize would shrink."""
        if tile is None:
            return Predictor(self).set_image(image, window).predict(score_threshold, cropped)
        from boxlevelset.tiles import TiledPredictor

        return TiledPredictor(self, tile, overlap).set_image(image, window).predict(
            score_threshold, cropped)


def _resized(probs: Tensor, padded: tuple[int, int], valid: tuple[int, int],
             out: tuple[int, int]) -> Tensor:
    """Stride-4 probabilities [N, h, w] -> float32 [N, *out] at the original image size."""
    p = F.interpolate(probs[:, None].float(), size=padded, mode="bilinear", align_corners=False)
    p = p[..., : valid[0], : valid[1]]
    if tuple(p.shape[-2:]) != tuple(out):
        p = F.interpolate(p, size=out, mode="bilinear", align_corners=False)
    return p[:, 0]


def _linear_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] float64 weights of a 1D linear resize as F.interpolate(mode="bilinear",
    align_corners=False, size=...) computes it (source index clamped at 0, no antialias)."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, i0), 1 - frac, accumulate=True)
    weights.index_put_((rows, i1), frac, accumulate=True)
    return weights


def _resize_matrices(size: tuple[int, int], padded: tuple[int, int], valid: tuple[int, int],
                     out: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Row [out_h, h] and column [out_w, w] matrices M with M_r @ p @ M_c.T equal to
    ``_resized(p)`` for a stride-4 map p of ``size``."""
    mats = []
    for n, pad, val, o in zip(size, padded, valid, out):
        m = _linear_matrix(n, pad)[:val]
        if val != o:
            m = _linear_matrix(val, o) @ m
        mats.append(m.to(device=device, dtype=torch.float32))
    return mats[0], mats[1]


def _threshold_resized(
    probs: Tensor,
    padded: tuple[int, int],
    valid: tuple[int, int],
    out: tuple[int, int],
    threshold: float,
    chunk: int = 16,
) -> Tensor:
    """Stride-4 probabilities -> bool masks: upsample to the padded input, crop the valid
    region, resize to ``out``; in chunks so 100 full-size float masks never sit in memory."""
    result = torch.zeros((len(probs),) + tuple(out), dtype=torch.bool, device=probs.device)
    for i in range(0, len(probs), chunk):
        p = F.interpolate(probs[i : i + chunk, None], size=padded, mode="bilinear",
                          align_corners=False)
        p = p[..., : valid[0], : valid[1]]
        if tuple(p.shape[-2:]) != tuple(out):
            p = F.interpolate(p, size=out, mode="bilinear", align_corners=False)
        result[i : i + chunk] = p[:, 0] > threshold
    return result


class Predictor:
    """SamPredictor-style front end: ``set_image`` runs the network once; each box then costs a
    kernel lookup and one 1x1 dynamic conv."""

    def __init__(self, model: SOLOv2) -> None:
        if not all(hasattr(model, a) for a in ("preprocess", "features", "dynamic_masks")):
            hint = (" (a checkpoint path: load it first with boxlevelset.load_model(path))"
                    if isinstance(model, (str, os.PathLike)) else "")
            raise TypeError(f"Predictor needs a SOLOv2 model, got {type(model).__name__}"
                            f"{hint}")
        self.model = model
        self._feats: _Features | None = None
        self._orig: tuple[int, int] = (0, 0)
        self._valid: tuple[int, int] = (0, 0)
        self._scale = 1.0

    @property
    def is_image_set(self) -> bool:
        """Whether ``set_image`` holds an image's features."""
        return self._feats is not None

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the image given to ``set_image`` (None before): the size of every mask
        this predictor returns, whatever image a caller has in mind."""
        return tuple(self._orig) if self._feats is not None else None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, window: Window = None) -> Predictor:
        """Preprocess ``image`` and cache its backbone, FPN, grid and mask features."""
        tensor, scale = self.model.preprocess(image, window)
        self._orig = tuple(np.asarray(image).shape[:2])
        self._valid, self._scale = self.model.resized_size(*self._orig)
        was_training = self.model.training
        self.model.eval()  # frozen statistics for inference; the caller's mode is restored
        try:
            self._feats = self.model.features(tensor)
        finally:
            self.model.train(was_training)
        return self

    def reset_image(self) -> None:
        """Drop the held image's features (frees their memory)."""
        self._feats = None

    @property
    def features(self) -> _Features:
        """The held image's network outputs (backbone, FPN, grid heads, mask feature), as
        ``SOLOv2.features`` returned them for the padded input."""
        return self._require()

    def _require(self) -> _Features:
        if self._feats is None:
            raise RuntimeError("call set_image(image) before predicting")
        return self._feats

    def level_for_box(self, size: float) -> int:
        """FPN level whose scale range holds ``size`` = sqrt(w h) in network pixels.

        Where ranges overlap, the level whose range centre (geometric) is nearest in log scale
        wins; outside every range, the nearest range."""
        ranges = np.log(np.asarray(self.model.config.scale_ranges, dtype=np.float64))
        size = np.log(max(float(size), 1e-6))
        inside = (ranges[:, 0] <= size) & (size <= ranges[:, 1])
        if inside.any():
            dist = np.where(inside, np.abs(size - ranges.mean(1)), np.inf)
        else:
            dist = np.abs(ranges - size).min(1)
        return int(np.argmin(dist))

    @torch.no_grad()
    def predict_boxes(self, boxes: np.ndarray | Sequence[Sequence[float]],
                      cropped: bool = False) -> list[np.ndarray] | BoxMasks:
        """One bool HxW mask (original image size) per xyxy box, zero outside its box; with
        ``cropped``, the masks over their boxes only (``BoxMasks``)."""
        threshold = self.model.config.mask_threshold
        self._require()
        h0, w0 = self._orig
        masks = BoxMasks(pixel_bounds(boxes, h0, w0),
                         [p > threshold for p in self.box_probabilities(boxes)], (h0, w0))
        return masks if cropped else masks.to_masks()

    @torch.no_grad()
    def box_logits(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> Tensor:
        """Stride-4 mask logits [N, H/4, W/4] of the padded network input, one per xyxy box
        (original image pixels): the dynamic kernel of the grid cell at the box centre, on
        the level whose scale range holds the box."""
        feats = self._require()
        cfg = self.model.config
        ph, pw = feats.input_size
        h0, w0 = self._orig
        # The part of each box inside the image picks the kernel (level from its size, cell
        # from its centre), as training clips its boxes and segment_boxes clips before this.
        arr = as_boxes(boxes).copy()
        arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, w0)
        arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, h0)
        kernels = []
        for x0, y0, x1, y1 in arr * self._scale:
            level = self.level_for_box(np.sqrt(max(x1 - x0, 0) * max(y1 - y0, 0)))
            s = cfg.num_grids[level]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            i = min(s - 1, max(0, int(cy / ph * s)))
            j = min(s - 1, max(0, int(cx / pw * s)))
            kernels.append(feats.kernels[level][0, :, i, j])
        if not kernels:
            return feats.mask_feature.new_zeros((0,) + tuple(feats.mask_feature.shape[-2:]))
        kern = torch.stack(kernels)
        return self.model.dynamic_masks(
            feats.mask_feature, kern, torch.zeros(len(kern), dtype=torch.long, device=kern.device)
        )

    @torch.no_grad()
    def box_probabilities(self, boxes: np.ndarray | Sequence[Sequence[float]],
                          logits: Tensor | None = None) -> list[np.ndarray]:
        """Per xyxy box, the mask probabilities inside it (float32, at the original image
        resolution, rows floor(y0)..ceil(y1)-1 and columns floor(x0)..ceil(x1)-1, clipped):
        the kernel of the grid cell at the box centre, on the level whose scale range holds
        the box, or the sigmoid of ``logits`` ([N, H/4, W/4] as ``box_logits`` gives, e.g.
        after refining them). Memory follows the summed box area, not boxes x image size."""
        feats = self._require()
        arr = as_boxes(boxes)
        h0, w0 = self._orig
        if len(arr) == 0:
            return []
        if logits is None:
            logits = self.box_logits(arr)
        elif len(logits) != len(arr):
            raise ValueError(f"{len(logits)} logit maps for {len(arr)} boxes")
        probs = logits.detach().sigmoid().float()
        bounds = pixel_bounds(arr, h0, w0)
        # The two bilinear resizes of _resized (stride 4 -> padded input, crop the valid part,
        # -> original size) as one matrix per axis, applied to each box's rows and columns
        # only: a full-size map per box cost 16 x image size of memory per chunk (GBs on a
        # large mosaic) and time per box in proportion to the image.
        rows, cols = _resize_matrices(tuple(probs.shape[-2:]), feats.input_size,
                                      self._valid, self._orig, probs.device)
        crops = []
        for prob, (c0, r0, c1, r1) in zip(probs, bounds):
            crop = rows[r0:r1] @ prob @ cols[c0:c1].T
            crops.append(crop.cpu().numpy().astype(np.float32, copy=False))
        return crops

    @torch.no_grad()
    def predict(self, score_threshold: float | None = None, cropped: bool = False) -> Instances:
        """Every instance of the cached image (SOLOv2 inference), masks at the original size;
        with ``cropped``, ``masks`` is a ``BoxMasks`` (each over its tight box), so that the
        hundreds of instances of a large image cost their area, not instances x image."""
        feats = self._require()
        probs, labels, scores = self.model.detect_probs(feats, 0, score_threshold)
        masks = self._masks_over_boxes(probs.float())
        found = np.array([crop.size > 0 for crop in masks.crops], bool)
        masks = masks.select(found)
        keep = torch.from_numpy(found).to(labels.device)
        return Instances(
            masks=masks if cropped else masks.to_array(),
            boxes=masks.bounds.astype(np.float32),
            labels=labels[keep].cpu().numpy().astype(np.int64),
            scores=scores[keep].cpu().numpy().astype(np.float32),
        )

    def _masks_over_boxes(self, probs: Tensor) -> BoxMasks:
        """Stride-4 probabilities [N, h, w] -> masks at the original size over their tight
        boxes (empty masks: bounds (0, 0, 0, 0)). The two bilinear resizes are one matrix
        per axis (``_resize_matrices``); an output pixel is a convex combination of the
        stride-4 cells under it, so only the rows and columns of cells above the threshold
        can pass it, and only they are computed."""
        feats = self._require()
        threshold = self.model.config.mask_threshold
        rows, cols = _resize_matrices(tuple(probs.shape[-2:]), feats.input_size, self._valid,
                                      self._orig, probs.device)
        bounds, crops = [], []
        for prob in probs:
            hot = prob > threshold
            ys = xs = np.zeros(0, np.int64)
            if hot.any():
                r0, r1 = _reach(rows, hot.any(1))
                c0, c1 = _reach(cols, hot.any(0))
                crop = ((rows[r0:r1] @ prob @ cols[c0:c1].T) > threshold).cpu().numpy()
                ys, xs = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
            if ys.size == 0:  # no pixel passes: an empty mask
                bounds.append([0, 0, 0, 0])
                crops.append(np.zeros((0, 0), bool))
                continue
            crops.append(crop[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1])
            bounds.append([c0 + xs[0], r0 + ys[0], c0 + xs[-1] + 1, r0 + ys[-1] + 1])
        return BoxMasks(np.array(bounds, np.int64).reshape(-1, 4), crops, tuple(self._orig))


def _reach(matrix: Tensor, cells: Tensor) -> tuple[int, int]:
    """The output range [start, stop) whose resize weights (rows of ``matrix``) touch any of
    the input ``cells`` (bool over its columns)."""
    index = torch.nonzero(cells)[:, 0]
    touched = torch.nonzero((matrix[:, int(index[0]):int(index[-1]) + 1] > 0).any(1))[:, 0]
    return int(touched[0]), int(touched[-1]) + 1


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, model: SOLOv2, **extra: Any) -> Path:
    """Write dict(model=state_dict, config=asdict(config), **extra) atomically (temp + replace)."""
    from boxlevelset.export import atomic_write  # the usual file permissions, not mkstemp's

    path = Path(path)
    # Weights on the CPU: a checkpoint saved from a GPU run loads with a plain torch.load
    # on a machine without one.
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {"model": weights, "config": asdict(model.config), **extra}
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; clear errors for wrong files."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))
        raise IsADirectoryError(
            f"{str(path)!r} is a folder, not a checkpoint file; pass the file itself"
            + (f" ({', '.join(str(path / n) for n in inside)})" if inside else
               " (a training run writes model.pth and last.pth)"))
    if not path.is_file():
        hint = ("; models are loaded from checkpoint files (none ship with the package: "
                "train one with `boxlevelset train` or the plugin's fine-tune)"
                if not path.suffix and len(path.parts) == 1 else "")
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist{hint}")
    try:
        # Tensors and plain data only: a full unpickle runs whatever code the file holds,
        # and users open checkpoints from anywhere (the plugin's file picker). Ours hold
        # nothing else (TrainConfig.to_dict stores paths as str).
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable boxlevelset checkpoint (it must hold tensors "
                         f"and plain data only; {type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not a boxlevelset checkpoint (needs 'model' and 'config')")
    return state


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device from 'cpu', 'cuda', 'cuda:1', ...; ValueError for an unknown name or a
    CUDA device this machine does not have (torch's own RuntimeError reads like a crash)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(path_or_name: str | os.PathLike, device: str | torch.device | None = None) -> SOLOv2:
    """SOLOv2 from a checkpoint path, on ``device`` ("cpu", "cuda", "cuda:N"; None or "auto":
    CUDA if available), in eval mode."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # as train's device="auto"
    device = parse_device(device)
    state = load_checkpoint(path_or_name, "cpu")
    config = ModelConfig.from_dict(dict(state["config"]))
    model = SOLOv2(config, pretrained=False)
    model.load_state_dict(state["model"])
    model.train_config = dict(state.get("train_config") or {})
    return model.to(device).eval()
