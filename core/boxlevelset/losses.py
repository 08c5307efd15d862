"""Losses of the box-supervised SOLOv2: focal category loss, dice, and the level-set instance loss.

The instance loss is DESIGN.md Eq. 11: for each positive mask logit map phi and its box B,

    lambda1 * E(phi; I_u) + lambda2 * E(phi; I_f) + alpha * F_box(phi, B)

with I_u the normalised image at the mask resolution and I_f = [T1, T2] the tree-filtered mask
(T1 guided by the image, T2 by a learned feature map). The energies themselves live in
``boxlevelset.levelset`` and the tree filter in ``boxlevelset.tree_filter``; this module only
assembles them, batched over every positive of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Summed sigmoid focal loss (Lin et al.) between logits and same-shaped {0, 1} targets."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Per-instance SOLOv2 dice loss 1 - 2 sum(pq) / ((sum p^2 + eps) + (sum q^2 + eps)) -> [N]."""
    p = probs.flatten(1)
    q = targets.flatten(1).to(p.dtype)
    inter = (p * q).sum(1)
    return 1 - 2 * inter / ((p * p).sum(1) + eps + (q * q).sum(1) + eps)


@dataclass
class LevelSetWeights:
    """Weights and tree-filter settings of the level-set instance loss (see ModelConfig)."""

    lambda_image: float = 0.05
    lambda_feature: float = 5.0
    alpha_box: float = 3.0
    gamma: float = 1e-5
    tree_sigma_image: float = 0.02
    tree_sigma_feature: float = 1.0
    tree_filter_max_side: int = 96


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def tree_filtered_masks(
    probs: Tensor,
    batch_index: Tensor,
    image_guide: Tensor,
    feature_guide: Tensor,
    weights: LevelSetWeights,
) -> Tensor:
    """I_f = [T1, T2] for every instance: [N, 2, h, w] at the resolution of ``probs``.

    probs: [N, h, w] mask probabilities; image_guide [B, 3, h, w]; feature_guide [B, D, h, w].
    One minimum spanning tree per image (all its instances are channels of one filter call).
    The filter runs at a resolution whose longer side is at most ``tree_filter_max_side``
    (then resized back): the MST passes are sequential in depth, so this caps their cost.
    """
    from boxlevelset.tree_filter import tree_filter

    n, h, w = probs.shape
    if not (torch.isfinite(image_guide).all() and torch.isfinite(feature_guide).all()):
        # Diverged features: a NaN energy lets the training loop stop every rank alike (the
        # spanning tree would raise on this rank alone and leave the others waiting).
        return probs.new_full((n, 2, h, w), float("nan"))
    out = probs.new_zeros((n, 2, h, w))
    cap = int(weights.tree_filter_max_side or 0)
    scale = min(1.0, cap / max(h, w)) if cap > 0 else 1.0
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    for b in torch.unique(batch_index).tolist():
        sel = torch.nonzero(batch_index == b, as_tuple=False).squeeze(1)
        x = _resize(probs[sel][None], size)
        g_img = _resize(image_guide[b : b + 1], size)
        g_feat = _resize(feature_guide[b : b + 1], size)
        t1 = tree_filter(x, g_img, weights.tree_sigma_image)
        t2 = tree_filter(t1, g_feat, weights.tree_sigma_feature)
        filtered = _resize(torch.cat([t1, t2], dim=0), (h, w))  # [2, n_b, h, w]
        out = out.index_copy(0, sel, filtered.transpose(0, 1))
    return out


def levelset_instance_loss(
    mask_logits: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    image_norm: Tensor,
    image_guide: Tensor,
    feature_guide: Tensor,
    weights: LevelSetWeights,
) -> dict[str, Tensor]:
    """Per-instance terms of the box-supervised instance loss at one mask resolution.

    mask_logits [N, h, w]; boxes [N, 4] xyxy in pixels *of this resolution*; batch_index [N];
    image_norm [B, 3, h, w] (normalised network input, I_u); image_guide [B, 3, h, w] (guide of
    T1: the official code uses the normalised image itself); feature_guide [B, D, h, w]
    (learned guide of T2). Returns weighted per-instance tensors ``box_projection``,
    ``levelset_image`` and ``levelset_feature`` ([N]).
    """
    from boxlevelset.levelset import box_projection_loss, levelset_energy

    # float32 under autocast too: the tree filter returns its input's dtype, and bf16 would
    # round the filtered masks to 3 digits (the energies' input).
    probs = mask_logits.float().sigmoid()
    i_f = tree_filtered_masks(probs, batch_index, image_guide, feature_guide, weights)
    e_image = levelset_energy(mask_logits, image_norm, boxes, batch_index, gamma=weights.gamma)
    e_feature = levelset_energy(mask_logits, i_f, boxes, None, gamma=weights.gamma)
    f_box = box_projection_loss(mask_logits, boxes)
    return {
        "box_projection": weights.alpha_box * f_box,
        "levelset_image": weights.lambda_image * e_image,
        "levelset_feature": weights.lambda_feature * e_feature,
    }
