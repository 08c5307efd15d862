"""SOLOv2 grid target assignment from boxes, points NMS and Matrix NMS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LevelTargets:
    """Targets of one FPN level for one image.

    labels: [S, S] int64 class index per cell, -1 for background.
    objects: [S, S] int64 index of the assigned box per cell, -1 for background.
    """

    labels: Tensor
    objects: Tensor


def assign_targets(
    boxes: Tensor,
    labels: Tensor,
    image_size: tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[tuple[float, float]],
    sigma: float = 0.2,
    min_box_pixels: float = 10.0,
) -> list[LevelTargets]:
    """Assign boxes to grid cells of every level, as SOLOv2 does with masks but from boxes.

    A box goes to each level whose scale range holds sqrt(w h). On that level the cells of its
    centre region (the box scaled by ``sigma`` around its centre, clamped to at most the 3 x 3
    cells around the centre cell) take its label. Boxes covering fewer than ``min_box_pixels``
    input pixels are skipped (the official code checks its full-resolution box masks). Later
    boxes overwrite earlier ones on shared cells. image_size is the (padded) network input
    (H, W); boxes are xyxy pixels in it.
    """
    height, width = image_size
    device = boxes.device
    boxes = boxes.detach().float().cpu()
    labels = labels.detach().long().cpu()
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    scale = (w * h).sqrt()
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    out = []
    big_enough = w * h >= min_box_pixels
    for s, (lo, hi) in zip(num_grids, scale_ranges):
        cell_labels = torch.full((s, s), -1, dtype=torch.long)
        cell_objects = torch.full((s, s), -1, dtype=torch.long)
        hit = (scale >= lo) & (scale <= hi) & big_enough
        for i in torch.nonzero(hit, as_tuple=False).flatten().tolist():
            half_w, half_h = 0.5 * sigma * float(w[i]), 0.5 * sigma * float(h[i])
            x, y = float(cx[i]), float(cy[i])

            def cell(v: float, size: int) -> int:
                return min(s - 1, max(0, int(v / size * s)))

            cw, ch = cell(x, width), cell(y, height)
            top = max(cell(y - half_h, height), ch - 1)
            down = min(cell(y + half_h, height), ch + 1)
            left = max(cell(x - half_w, width), cw - 1)
            right = min(cell(x + half_w, width), cw + 1)
            cell_labels[top : down + 1, left : right + 1] = labels[i]
            cell_objects[top : down + 1, left : right + 1] = i
        out.append(LevelTargets(cell_labels.to(device), cell_objects.to(device)))
    return out


def points_nms(heat: Tensor) -> Tensor:
    """Keep a category score only where it is the maximum of its 2x2 neighbourhood: [B, K, S, S]."""
    hmax = F.max_pool2d(heat, (2, 2), stride=1, padding=1)
    return heat * (hmax[:, :, :-1, :-1] == heat).to(heat.dtype)


def matrix_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> Tensor:
    """SOLOv2 Matrix NMS: decayed scores for masks already sorted by descending score.

    masks [N, H, W] bool or float; labels [N]; scores [N]. Each mask's score is multiplied by
    min over higher-scored masks i of f(iou_ij) / f(max iou of i with masks above i), with
    f(x) = exp(-sigma x^2) (gaussian) or 1 - x (linear), counting same-class pairs only.
    """
    n = len(labels)
    if n == 0:
        return scores
    flat = masks.reshape(n, -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).triu(diagonal=1)
    same = (labels[:, None] == labels[None, :]).float().triu(diagonal=1)
    decay_iou = iou * same
    compensate = decay_iou.max(0).values[:, None].expand(n, n)  # [i, j] = max iou of i above it
    if kernel == "gaussian":
        coeff = torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * compensate**2)
    elif kernel == "linear":
        coeff = (1 - decay_iou) / (1 - compensate).clamp(min=1e-6)
    else:
        raise ValueError(f"unknown Matrix NMS kernel {kernel!r}; use 'gaussian' or 'linear'")
    return scores * coeff.min(0).values


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes (x1/y1 exclusive) of [N, H, W] bool masks; zeros for empty masks."""
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows = masks.any(2)
    cols = masks.any(1)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))
