"""Level-set energies inside boxes (Eq. 3, 4, 8, 9 of Li et al., ECCV 2022) and the
model-free box-to-mask evolution built on them (which adds a histogram region term with
context around the box; the training loss uses the paper's energies only).

Every energy is evaluated on the pixels inside each instance's box only, stored as one
ragged list of pixels for all instances together (``BoxPixels``). Per-instance sums are
segment sums (``index_add``), so the cost grows with the summed box area and there is no
Python loop over instances.

Box convention: (x0, y0, x1, y1) in pixels of the map the energy is computed on; a box
covers columns floor(x0) .. ceil(x1) - 1 and rows floor(y0) .. ceil(y1) - 1 (inclusive
rounding, as the official code's box masks). Boxes are clipped to the map; a box with no
pixel left raises ValueError; an empty set of boxes gives empty results.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch import Tensor

from boxlevelset.export import BoxMasks
from boxlevelset.image import (
    Window,
    as_boxes,
    as_float_image,
    axis_contrast,
    check_image_shape,
    clip_boxes,
    pixel_bounds,
)

__all__ = [
    "BoxPixels",
    "box_pixels",
    "box_masks",
    "region_energy",
    "length_energy",
    "box_projection_loss",
    "levelset_energy",
    "evolution_energy",
    "segment_boxes",
    "mask_energy",
    "ENERGY_OPTIONS",
    "clean_mask",
    "PAPER_ENERGY",
    "LOOSE_BOXES",
]

_EPS = 1e-5


@dataclass
class BoxPixels:
    """All pixels inside N boxes, concatenated box after box, row-major inside a box."""

    instance: Tensor  # [P] instance of each pixel
    y: Tensor  # [P] row in the map
    x: Tensor  # [P] column in the map
    local_x: Tensor  # [P] column inside the box
    local_y: Tensor  # [P] row inside the box
    widths: Tensor  # [N] box widths in pixels
    heights: Tensor  # [N] box heights in pixels
    counts: Tensor  # [N] pixels per box (widths * heights)

    @property
    def num_instances(self) -> int:
        """N, the number of boxes."""
        return int(self.counts.shape[0])


def _integer_bounds(boxes: Tensor, height: int, width: int) -> Tensor:
    """``image.pixel_bounds`` of boxes [N, 4] in an HxW map, on the boxes' device; ValueError
    on a wrong shape, NaN/inf, or a box with no pixel in the map."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    bounds = pixel_bounds(boxes.detach().to(torch.float64).cpu().numpy(), height, width)
    empty = (bounds[:, 2] <= bounds[:, 0]) | (bounds[:, 3] <= bounds[:, 1])
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"box {i} {boxes[i].tolist()} has zero area inside the {width}x{height} map "
            f"({int(empty.sum())} such boxes)"
        )
    return torch.from_numpy(bounds).to(boxes.device)


def _layout(bounds: Tensor | np.ndarray) -> BoxPixels:
    """The pixels of integer boxes (c0, r0, c1, r1) [N, 4] (non-empty), box after box.

    A tensor's layout stays on its device (the training energies); a numpy array's is
    computed in numpy (the model-free path's crops: there, tiny torch ops cost more in
    thread hand-offs than in arithmetic, seen at 100+ ms on the loaded 2-core CPU).
    """
    if isinstance(bounds, np.ndarray):
        arange, repeat = np.arange, np.repeat
    else:
        arange, repeat = partial(torch.arange, device=bounds.device), torch.repeat_interleave
    widths = bounds[:, 2] - bounds[:, 0]
    heights = bounds[:, 3] - bounds[:, 1]
    counts = widths * heights
    instance = repeat(arange(len(counts)), counts)
    k = arange(len(instance)) - (counts.cumsum(0) - counts)[instance]  # index inside the box
    w = widths[instance]
    local_y = k // w
    local_x = k - local_y * w
    fields = {"instance": instance, "y": bounds[:, 1][instance] + local_y,
              "x": bounds[:, 0][instance] + local_x, "local_x": local_x, "local_y": local_y,
              "widths": widths, "heights": heights, "counts": counts}
    if isinstance(bounds, np.ndarray):
        fields = {name: torch.from_numpy(v) for name, v in fields.items()}
    return BoxPixels(**fields)


def box_pixels(boxes: Tensor, height: int, width: int) -> BoxPixels:
    """Index every pixel inside every box of an HxW map, without a loop over boxes."""
    return _layout(_integer_bounds(boxes, height, width))


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Filled box masks [N, H, W] (bool) with the module's rounding convention."""
    bounds = _integer_bounds(boxes, height, width)
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    inside_y = (ys[None] >= bounds[:, 1:2]) & (ys[None] < bounds[:, 3:4])
    inside_x = (xs[None] >= bounds[:, 0:1]) & (xs[None] < bounds[:, 2:3])
    return inside_y[:, :, None] & inside_x[:, None, :]


def _segment_sum(values: Tensor, index: Tensor, n: int) -> Tensor:
    out = values.new_zeros((n,) + values.shape[1:])
    return out.index_add(0, index, values)


def _work_dtype(t: Tensor) -> torch.dtype:
    # Energies are sums over many pixels: never accumulate them in half precision.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --- energies on ragged pixels (shared by the map API and the model-free evolution) ---


def _region_energy_ragged(p: Tensor, feats: Tensor, pix: BoxPixels) -> Tensor:
    """Eq. 3-4 with c1, c2 from Eq. 4 (not detached). p: [P], feats: [P, C] -> [N]."""
    n = pix.num_instances
    q = 1.0 - p
    sum_p = _segment_sum(p, pix.instance, n)
    sum_q = _segment_sum(q, pix.instance, n)
    c1 = _segment_sum(p[:, None] * feats, pix.instance, n) / sum_p.clamp(min=_EPS)[:, None]
    c2 = _segment_sum(q[:, None] * feats, pix.instance, n) / sum_q.clamp(min=_EPS)[:, None]
    inside = (feats - c1[pix.instance]).pow(2).sum(1) * p
    outside = (feats - c2[pix.instance]).pow(2).sum(1) * q
    energy = _segment_sum(inside + outside, pix.instance, n)
    return energy / (feats.shape[1] * pix.counts.to(energy.dtype))


def _total_variation_ragged(
    p: Tensor, pix: BoxPixels, weights: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """L1 total variation of p inside each box (differences between in-box neighbours),
    each right / lower link optionally weighted by weights = (right [P], down [P])."""
    n = pix.num_instances
    idx = torch.arange(p.shape[0], device=p.device)
    w = pix.widths[pix.instance]
    has_right = pix.local_x < w - 1
    has_down = pix.local_y < pix.heights[pix.instance] - 1
    right = idx[has_right]
    down = idx[has_down]
    dx = (p[right + 1] - p[right]).abs()
    dy = (p[down + w[has_down]] - p[down]).abs()
    if weights is not None:
        dx = dx * weights[0][right]
        dy = dy * weights[1][down]
    return _segment_sum(dx, pix.instance[right], n) + _segment_sum(dy, pix.instance[down], n)


def _projection_dice(proj: Tensor, target: Tensor) -> Tensor:
    inter = (proj * target).sum(-1)
    union = proj.pow(2).sum(-1) + target.pow(2).sum(-1) + _EPS
    return 1.0 - 2.0 * inter / union


# --- public energies on [N, H, W] mask logits ---


def _gather(
    mask_logits: Tensor, features: Tensor | None, boxes: Tensor, batch_index: Tensor | None
) -> tuple[Tensor, Tensor | None, BoxPixels]:
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be [N, H, W], got {tuple(mask_logits.shape)}")
    n, h, w = mask_logits.shape
    if boxes.shape[0] != n:
        raise ValueError(f"{n} mask maps but {boxes.shape[0]} boxes")
    pix = box_pixels(boxes.to(mask_logits.device), h, w)
    dtype = _work_dtype(mask_logits)
    flat = pix.y * w + pix.x
    p = torch.sigmoid(mask_logits.to(dtype).reshape(n, h * w)[pix.instance, flat])
    if features is None:
        return p, None, pix
    if features.ndim != 4 or features.shape[-2:] != (h, w):
        raise ValueError(
            f"features must be [B, C, {h}, {w}] like the mask logits, got {tuple(features.shape)}"
        )
    if batch_index is None:
        if features.shape[0] != n:
            raise ValueError("without batch_index, features need one map per instance")
        src = pix.instance
    else:
        src = batch_index.to(mask_logits.device).long()[pix.instance]
    b, c = features.shape[:2]
    feats = features.to(dtype).permute(0, 2, 3, 1).reshape(b, h * w, c)[src, flat]
    return p, feats, pix


def region_energy(
    mask_logits: Tensor, features: Tensor, boxes: Tensor, batch_index: Tensor | None = None
) -> Tensor:
    """Chan-Vese region energy (Eq. 3-4) of each instance inside its box.

    Args:
        mask_logits: [N, H, W] level-set logits phi; H(phi) = sigmoid(phi).
        features: [B, C, H, W] input the energy is measured on (image or deep features).
        boxes: [N, 4] boxes in pixels of the HxW map.
        batch_index: [N] which of the B feature maps each instance refers to; None means
            B == N, one map per instance.

    Returns:
        [N] energies, each (1/C) sum_c sum_x [(I-c1)^2 p + (I-c2)^2 (1-p)] / pixels in box.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros(0, dtype=_work_dtype(mask_logits))
    p, feats, pix = _gather(mask_logits, features, boxes, batch_index)
    return _region_energy_ragged(p, feats, pix)


def length_energy(mask_logits: Tensor, boxes: Tensor) -> Tensor:
    """L1 total variation of sigmoid(phi) inside each box, divided by the box's pixels."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros(0, dtype=_work_dtype(mask_logits))
    p, _, pix = _gather(mask_logits, None, boxes, None)
    return _total_variation_ragged(p, pix) / pix.counts.to(p.dtype)


def box_projection_loss(mask_logits: Tensor, boxes: Tensor) -> Tensor:
    """Box projection term (Eq. 9): 1-D dice of the max-projections of the mask and of the
    filled box, on x plus on y, over the whole map (so mass outside the box is penalised)."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros(0, dtype=_work_dtype(mask_logits))
    n, h, w = mask_logits.shape
    p = torch.sigmoid(mask_logits.to(_work_dtype(mask_logits)))
    target = box_masks(boxes.to(mask_logits.device), h, w).to(p.dtype)
    loss_x = _projection_dice(p.amax(dim=1), target.amax(dim=1))
    loss_y = _projection_dice(p.amax(dim=2), target.amax(dim=2))
    return loss_x + loss_y


def levelset_energy(
    mask_logits: Tensor,
    features: Tensor,
    boxes: Tensor,
    batch_index: Tensor | None = None,
    gamma: float = 1e-5,
) -> Tensor:
    """Region energy plus gamma x length term, per instance ([N])."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros(0, dtype=_work_dtype(mask_logits))
    p, feats, pix = _gather(mask_logits, features, boxes, batch_index)
    counts = pix.counts.to(p.dtype)
    return _region_energy_ragged(p, feats, pix) + gamma * _total_variation_ragged(p, pix) / counts


# --- model-free box-to-mask ---

# segment_boxes options that leave the paper's energy alone (region + plain length + box
# projection, the defaults before the histogram and edge terms), for comparisons.
PAPER_ENERGY: dict[str, Any] = {"histogram": 0.0, "edge": 0.0, "gamma": 0.15, "solver": "evolve"}

# segment_boxes options for boxes drawn loosely around their objects. Two terms of the
# default energy take the box to be tight: the box projection (each side touches the
# object) and the ring just outside the box that teaches the background model what
# borders the object. Around a loose box the ring lies away from the object and misses
# its blurred rim, which the histogram term then counts as object; both terms are off here.
# A third assumption is turned round: the mask's length along the box's edge costs as much
# as any other boundary (border=1), since the box's edge is no longer the object's. Without
# it the cut ran along the box's edge into muscle and bowel of liver density around loose
# CT boxes. The solver stays the default one (the cut on CT, the evolution on images):
# benchmarks/box_to_mask.py --loose, README "Loose boxes".
LOOSE_BOXES: dict[str, Any] = {"context": 0.0, "alpha": 0.0, "border": 1.0}


def _grey_as_one_channel(img: np.ndarray, stored: np.ndarray | None = None) -> np.ndarray:
    """A grey image stored as RGB (R = G = B, as most microscopy PNGs) as one channel: it is
    not a colour image, so it gets no Lab transform, and two constant channels would not
    dilute the region terms, which average over channels. ``stored``: the whole image as
    given, when ``img`` is a region of it (grey or colour is the whole image's property)."""
    if img.shape[2] == 3 and _stored_grey(img if stored is None else np.asarray(stored)):
        return img[..., :1]
    return img


def _stored_grey(image: np.ndarray) -> bool:
    """R = G = B everywhere (NaN and inf count as differing), compared a block of rows at a
    time: a colour photo differs within its first block."""
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        return False
    rows = max(1, (1 << 18) // image.shape[1])
    for r in range(0, image.shape[0], rows):
        block = image[r:r + rows]
        if image.dtype.kind == "f" and not np.isfinite(block[..., :3]).all():
            return False
        if not (np.array_equal(block[..., 0], block[..., 1])
                and np.array_equal(block[..., 0], block[..., 2])):
            return False
    return True


def _crop_raw(img: np.ndarray, bounds, scale: float, smooth: float, lab: bool) -> np.ndarray:
    """A crop resized by ``scale``, in CIE Lab for colour images when ``lab``, smoothed."""
    x0, y0, x1, y1 = bounds
    crop = img[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    if lab and crop.ndim == 3 and crop.shape[2] == 3:
        crop = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2Lab)
    if smooth > 0 and min(crop.shape[:2]) >= 3:
        crop = cv2.GaussianBlur(crop, (0, 0), smooth)
    return crop.reshape(crop.shape[0], crop.shape[1], -1).astype(np.float32)


def _crop_features(
    img: np.ndarray, bounds: np.ndarray, max_side: int, smooth: float, lab: bool,
    context: float = 0.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per box: the crop resized so its longer side is at most max_side, in CIE Lab for
    colour images when ``lab``, smoothed and standardised; and the pixels of a ring
    ``context`` x the box's longer side wide around it (same scaling), [R, C].

    Standardising each crop makes one step size and one gamma work on photos,
    microscopy and CT alike: the energy then measures contrast relative to the box.
    """
    crops, rings = [], []
    height, width = img.shape[:2]
    for b in bounds:
        x0, y0, x1, y1 = (int(v) for v in b)
        scale = min(1.0, max_side / max(x1 - x0, y1 - y0))
        crop = _crop_raw(img, (x0, y0, x1, y1), scale, smooth, lab)
        mean = crop.reshape(-1, crop.shape[-1]).mean(0)
        std = (crop - mean).std() + 1e-3
        crops.append((crop - mean) / std)
        m = round(context * max(x1 - x0, y1 - y0))
        if m < 1:
            rings.append(np.zeros((0, crop.shape[-1]), np.float32))
            continue
        ex = (max(0, x0 - m), max(0, y0 - m), min(width, x1 + m), min(height, y1 + m))
        big = (_crop_raw(img, ex, scale, smooth, lab) - mean) / std
        inside = np.zeros(big.shape[:2], bool)
        ix0, iy0 = round((x0 - ex[0]) * scale), round((y0 - ex[1]) * scale)
        inside[iy0 : iy0 + crop.shape[0], ix0 : ix0 + crop.shape[1]] = True
        rings.append(big[~inside])
    return crops, rings


# Histogram region term: bins over +-3 standard deviations of the standardised crop and
# the ring around the box weighing 3x the box's pixels (chosen on coco128, dsb2018 and
# ct3slice together; see benchmarks/box_to_mask.py). The pseudo-count per bin,
# HIST_PRIOR, lives in _evolve_kernel: its compiled code is cached with the value.
HIST_BINS = 32
RING_WEIGHT = 3.0


def _histograms(crops: list[np.ndarray], rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of every crop pixel per channel [P, C], and per box the background counts
    the ring contributes [N, C, bins] (ring histogram scaled to RING_WEIGHT x the box's
    pixels, plus the pseudo-count)."""
    from boxlevelset._evolve_kernel import HIST_PRIOR

    edges = np.linspace(-3.0, 3.0, HIST_BINS + 1)[1:-1]
    bins = np.concatenate([np.searchsorted(edges, c.reshape(-1, c.shape[-1])) for c in crops])
    ring_counts = np.zeros((len(crops), crops[0].shape[-1], HIST_BINS))
    for i, (crop, ring) in enumerate(zip(crops, rings)):
        if len(ring):
            scale = RING_WEIGHT * crop.shape[0] * crop.shape[1] / len(ring)
            for ch in range(ring.shape[1]):
                counts = np.bincount(np.searchsorted(edges, ring[:, ch]), minlength=HIST_BINS)
                ring_counts[i, ch] = counts * scale
    return bins.astype(np.int64), ring_counts + HIST_PRIOR


def _histogram_energy_ragged(
    p: Tensor, bins: Tensor, ring_counts: Tensor, pix: BoxPixels
) -> Tensor:
    """Histogram region competition per box: sum over channels of N_in H(h_in) + N_out
    H(h_out), where h_in counts p and h_out counts 1 - p plus the ring around the box (known
    background), over (channels x box pixels). Its gradient is -log h_in + log h_out."""
    from boxlevelset._evolve_kernel import HIST_PRIOR

    n, n_ch, n_bins = ring_counts.shape
    slot = (pix.instance[:, None] * n_ch + torch.arange(n_ch)) * n_bins + bins  # [P, C]
    size = n * n_ch * n_bins
    h_in = HIST_PRIOR + p.new_zeros(size).index_add(0, slot.flatten(), p.repeat_interleave(n_ch))
    h_out = ring_counts.flatten().to(p.dtype) + p.new_zeros(size).index_add(
        0, slot.flatten(), (1 - p).repeat_interleave(n_ch)
    )
    energy = 0.0
    for h in (h_in.view(n, n_ch, n_bins), h_out.view(n, n_ch, n_bins)):
        energy = energy - (h * torch.log(h / h.sum(-1, keepdim=True))).sum((1, 2))
    return energy / (n_ch * pix.counts.to(p.dtype))


def _ragged_projection_dice(p: Tensor, pix: BoxPixels) -> Tensor:
    """Box projection (Eq. 9) on ragged crops, where the box is the whole crop."""
    n = pix.num_instances
    losses = []
    for local, sizes in ((pix.local_x, pix.widths), (pix.local_y, pix.heights)):
        offsets = torch.cumsum(sizes, 0) - sizes
        slot = offsets[pix.instance] + local
        proj = p.new_zeros(int(sizes.sum())).scatter_reduce(
            0, slot, p, reduce="amax", include_self=False
        )
        owner = torch.repeat_interleave(torch.arange(n, device=p.device), sizes)
        inter = _segment_sum(proj, owner, n)
        union = _segment_sum(proj.pow(2), owner, n) + sizes.to(p.dtype) + _EPS
        losses.append(1.0 - 2.0 * inter / union)
    return losses[0] + losses[1]


def _ragged_layout(crops: list[np.ndarray]) -> tuple[BoxPixels, Tensor]:
    """Ragged pixel layout of the crops (each crop is its own box, at the origin; built in
    numpy) and their features [P, C]."""
    bounds = np.array([[0, 0, c.shape[1], c.shape[0]] for c in crops], np.int64).reshape(-1, 4)
    feats = torch.from_numpy(np.concatenate([c.reshape(-1, c.shape[-1]) for c in crops]))
    return _layout(bounds), feats


def _edge_weights(crops: list[np.ndarray], edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Contrast-sensitive weights of the length term on each pixel's right and lower
    neighbour link, exp(-edge |dI|^2 / (2 mean |dI|^2)) with the mean over the crop (as
    GrabCut's pairwise term): a boundary costs less along the crop's strong edges."""
    right, down = [], []
    for c in crops:
        dx, dy, scale = axis_contrast(c, edge)
        wr = np.ones(c.shape[:2])  # the last column and row have no such link
        wd = np.ones(c.shape[:2])
        wr[:, :-1] = np.exp(-scale * dx)
        wd[:-1] = np.exp(-scale * dy)
        right.append(wr.ravel())
        down.append(wd.ravel())
    return np.concatenate(right), np.concatenate(down)


def _initial_phi(pix: BoxPixels) -> np.ndarray:
    """An ellipse inscribed in each box: phi = 2 at the centre, 0 on the ellipse, < 0 outside."""
    inst = pix.instance.numpy()
    u = (pix.local_x.numpy() + 0.5) / pix.widths.numpy()[inst] * 2 - 1
    v = (pix.local_y.numpy() + 0.5) / pix.heights.numpy()[inst] * 2 - 1
    return 2.0 * (1.0 - u * u - v * v)


def evolution_energy(
    phi: Tensor, feats: Tensor, pix: BoxPixels, gamma: float, alpha: float,
    hist: tuple[Tensor, Tensor, float] | None = None,
    edges: tuple[Tensor, Tensor] | None = None,
    border: float = 0.0,
) -> Tensor:
    """Energy the model-free evolution descends, per box: region (Eq. 3-4) on the
    standardised crop + gamma x perimeter / sqrt(box pixels) (links weighted by ``edges``
    when given; the mask's length along the box's edge weighted by ``border``) + alpha x
    box projection, + weight x the histogram term when ``hist`` = (bins, ring_counts,
    weight) is given."""
    p = torch.sigmoid(phi)
    length = _total_variation_ragged(p, pix, edges)
    if border:
        length = length + border * _segment_sum(p * _box_sides(pix), pix.instance,
                                                pix.num_instances)
    energy = (
        _region_energy_ragged(p, feats, pix)
        + gamma * length / pix.counts.to(p.dtype).sqrt()
        + alpha * _ragged_projection_dice(p, pix)
    )
    if hist is not None:
        bins, ring_counts, weight = hist
        energy = energy + weight * _histogram_energy_ragged(p, bins, ring_counts, pix)
    return energy


def _box_sides(pix: BoxPixels) -> Tensor:
    """How many sides of its box each pixel lies on (0, 1, 2 at a corner), as float."""
    w = pix.widths[pix.instance]
    h = pix.heights[pix.instance]
    sides = ((pix.local_x == 0).long() + (pix.local_x == w - 1).long()
             + (pix.local_y == 0).long() + (pix.local_y == h - 1).long())
    return sides.to(torch.get_default_dtype())


def _evolve(
    crops: list[np.ndarray],
    iterations: int,
    step_size: float,
    gamma: float,
    alpha: float,
    init: list[np.ndarray] | None = None,
    hist: tuple[np.ndarray, np.ndarray, float] | None = None,
    edge: float = 0.0,
    border: float = 0.0,
) -> list[np.ndarray]:
    """Adam descent on phi of all crops together, from ``init`` (phi per crop) or an
    ellipse inscribed in each box; ``hist`` = (bins, ring_counts, weight) adds the
    histogram term, ``edge`` > 0 makes the length term contrast-sensitive, ``border``
    weighs the mask's length along the box's edge; returns phi per crop.

    The gradient of ``evolution_energy`` is computed in closed form by a compiled kernel
    (tests check it against autograd): at box sizes of tens of pixels, autograd's per-op
    overhead made the evolution ~100x slower than the arithmetic.
    """
    from boxlevelset._evolve_kernel import adam_evolve

    pix, feats = _ragged_layout(crops)
    phi = _initial_phi(pix) if init is None else np.concatenate([i.ravel() for i in init])
    adam_evolve(
        phi,
        feats.numpy().astype(np.float64),
        pix.instance.numpy(),
        pix.local_x.numpy(),
        pix.local_y.numpy(),
        pix.widths.numpy(),
        pix.heights.numpy(),
        iterations,
        step_size,
        gamma,
        alpha,
        hist,
        None if edge <= 0 else _edge_weights(crops, edge),
        border,
    )
    return [part.reshape(c.shape[:2]) for part, c in zip(_per_crop(phi, crops), crops)]


def _per_crop(values: np.ndarray, crops: list[np.ndarray]) -> list[np.ndarray]:
    """Values over all crops' pixels [P, ...] (crop after crop, as ``_ragged_layout``), split
    into one part per crop."""
    return np.split(values, np.cumsum([c.shape[0] * c.shape[1] for c in crops])[:-1])


# solver="cut": weight of the cut's boundary length (Euclidean, relative to sqrt(box pixels),
# as gamma), and the cost of each box-edge pixel of the mask as a fraction of that unit
# length (small: the object touches its box, but background strips along the edge should
# not come for free). Chosen on ct3slice-dev; see benchmarks/box_to_mask.py.
CUT_GAMMA = 3.0
CUT_BORDER = 0.125
CUT_ROUNDS = 5


def _cut(
    crops: list[np.ndarray], hist: tuple[np.ndarray, np.ndarray, float] | None, edge: float,
    gamma: float = CUT_GAMMA, border: float = CUT_BORDER, rounds: int = CUT_ROUNDS,
    start: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Binary masks per crop from alternating region-model estimation and exact graph cuts
    of the linearised energy (``boxlevelset._cut``), from ``start`` (a mask per crop) or the
    inscribed ellipse."""
    from boxlevelset import _cut as C

    sizes = [c.shape[0] * c.shape[1] for c in crops]
    pix, all_feats = _ragged_layout(crops)
    feats = _per_crop(all_feats.numpy().astype(np.float64), crops)
    bins = [None] * len(crops) if hist is None else _per_crop(hist[0], crops)
    ring = [None] * len(crops) if hist is None else hist[1]
    weight = 0.0 if hist is None else hist[2]
    links = [C.link_weights(c, edge) for c in crops]
    pair = [gamma * np.sqrt(n) for n in sizes]  # energies are scaled by pixels per box
    on_edge = _per_crop(_box_sides(pix).numpy(), crops)
    masks = (_per_crop(_initial_phi(pix) > 0, crops) if start is None
             else [m.ravel().astype(bool) for m in start])
    for _ in range(rounds):
        unary = [C.region_derivative(f, b, r, weight, u) + lam * border * e
                 for f, b, r, u, lam, e in zip(feats, bins, ring, masks, pair, on_edge)]
        new = C.min_cut(unary, links, pair)
        if all((a == b).all() for a, b in zip(new, masks)):
            break
        masks = new
    return [u.reshape(c.shape[:2]) for u, c in zip(masks, crops)]


class _BoxInput(NamedTuple):
    """segment_boxes' view of its input (``_image_and_boxes``)."""

    img: np.ndarray  # float HxWxC in [0, 1], or the region of it that the energy reads
    boxes: np.ndarray  # the boxes clipped to the image, in its pixels
    bounds: np.ndarray  # their pixel ranges in ``img``
    origin: tuple[int, int]  # (x, y) of img's first pixel in the image
    size: tuple[int, int]  # the image's (height, width)


def _image_and_boxes(
    image: np.ndarray, boxes: np.ndarray, window: Window, model_free: bool,
    context: float | None = None,
) -> _BoxInput:
    """The float image (a grey image stored as RGB as one channel; model-free, NaN pixels
    outside every box filled in), the boxes clipped to it and their pixel bounds. Given the
    ring width ``context`` (0: no ring), only the region holding the boxes and what the
    energy reads around them (ring, ``_differs_around``'s frame) is converted: the masks
    are the same, and a box on a 12-megapixel photo no longer costs converting all of it."""
    arr = np.asarray(image)
    check_image_shape(arr)  # before its first two axes are read as height and width
    height, width = arr.shape[:2]
    clipped = bounds = None
    region = None
    if context is not None:
        clipped = clip_boxes(as_boxes(boxes), height, width)
        bounds = pixel_bounds(clipped, height, width)
        # NaN is filled from the nearest pixel with data, which may lie beyond any margin.
        if len(bounds) and not (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
            margin = [round(context * max(x1 - x0, y1 - y0)) + _FRAME  # as _crop_features
                      for x0, y0, x1, y1 in bounds.tolist()]
            grown = bounds + np.array(margin, np.int64)[:, None] * np.array([-1, -1, 1, 1])
            region = (max(0, int(grown[:, 0].min())), max(0, int(grown[:, 1].min())),
                      min(width, int(grown[:, 2].max())), min(height, int(grown[:, 3].max())))
    img = as_float_image(arr, window, allow_nonfinite=model_free, region=region)
    img = _grey_as_one_channel(img, arr if region is not None else None)
    if clipped is None:  # the image's own errors (dtype, NaN) come first, as before
        clipped = clip_boxes(as_boxes(boxes), height, width)
        bounds = pixel_bounds(clipped, height, width)
    origin = (0, 0) if region is None else region[:2]
    bounds = bounds - np.array([*origin, *origin], np.int64)
    if model_free and len(bounds) and arr.dtype.kind == "f":  # floats hold NaN
        img = _fill_outside_boxes(img, bounds)
    return _BoxInput(img, clipped, bounds, origin, (height, width))


def _box_crops(
    img: np.ndarray, bounds: np.ndarray, max_side: int, smooth: float, lab: bool,
    histogram: float, context: float,
) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray, float] | None]:
    """The crops the model-free energy is measured on (``_crop_features``) and, when
    ``histogram`` > 0, the histogram term's (bins, ring counts, weight)."""
    crops, rings = _crop_features(img, bounds, max_side, smooth, lab,
                                  context if histogram > 0 else 0.0)
    if histogram <= 0:
        return crops, None
    bins, ring_counts = _histograms(crops, rings)
    return crops, (bins, ring_counts, float(histogram))


# The segment_boxes options that define the model-free energy (mask_energy takes these).
ENERGY_OPTIONS = ("gamma", "alpha", "max_side", "smooth", "lab", "histogram", "context", "edge",
                  "border")


def mask_energy(
    image: np.ndarray, boxes: np.ndarray, masks: Sequence[np.ndarray], window: Window = None,
    **options: Any,
) -> np.ndarray:
    """Per box, the energy segment_boxes' evolution descends (``evolution_energy``) of the
    given HxW mask inside it: on the same crop, with the same terms; the mask is resized to
    the crop and taken as the level set +-4. For diagnosis: the ground truth's energy
    above that of segment_boxes' own mask says the energy, not its minimiser, is at fault.

    ``options`` are segment_boxes' energy options (``ENERGY_OPTIONS``); the rest take its
    defaults. Returns [N] float64; ValueError as segment_boxes, or for masks that are not
    one HxW mask per box.
    """
    unknown = sorted(set(options) - set(ENERGY_OPTIONS))
    if unknown:
        raise TypeError(f"mask_energy takes the energy options {ENERGY_OPTIONS}, not {unknown}")
    defaults = inspect.signature(segment_boxes).parameters
    o = {name: options.get(name, defaults[name].default) for name in ENERGY_OPTIONS}
    img, _, bounds, _, _ = _image_and_boxes(image, boxes, window, model_free=True)
    if len(bounds) == 0:
        return np.zeros(0)
    crops, hist = _box_crops(img, bounds, o["max_side"], o["smooth"], o["lab"],
                             o["histogram"], o["context"])
    inside = _crop_masks(masks, bounds, crops, what="masks")
    phi = torch.from_numpy(np.concatenate([np.where(u, 4.0, -4.0).ravel() for u in inside]))
    pix, feats = _ragged_layout(crops)
    hist_t = None if hist is None else (torch.from_numpy(hist[0]), torch.from_numpy(hist[1]),
                                        hist[2])
    edges = (None if o["edge"] <= 0
             else tuple(torch.from_numpy(e) for e in _edge_weights(crops, o["edge"])))
    border = 0.0 if o["border"] is None else o["border"]
    with torch.no_grad():
        return evolution_energy(phi, feats.double(), pix, o["gamma"], o["alpha"], hist_t,
                                edges, border).numpy()


def segment_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    model: Any = None,
    *,
    window: Window = None,
    iterations: int = 25,
    step_size: float = 0.5,
    gamma: float = 0.25,
    alpha: float = 3.0,
    max_side: int = 64,
    smooth: float = 0.5,
    lab: bool = True,
    refine: int = 0,
    histogram: float = 10.0,
    context: float = 0.1,
    edge: float = 0.3,
    solver: str | None = None,
    polish: int = 10,
    border: float | None = None,
    fill_holes: bool | None = None,
    largest_component: bool = True,
    init_masks: Sequence[np.ndarray] | None = None,
    cropped: bool = False,
) -> list[np.ndarray] | BoxMasks:
    """One instance mask per box.

    Without a model, a level set evolves inside each box on the image alone (region
    energy of Eq. 3-4 + length term + box projection of Eq. 9), all boxes of the image
    together, from an ellipse inscribed in the box. A histogram region term (GrabCut's
    idea in level-set form: a background model that also learns from a thin ring of
    pixels around the box) is added by default; ``histogram=0`` leaves the paper's energy.
    The default energy takes each box to touch its object on all four sides; for boxes
    drawn loosely, pass ``**LOOSE_BOXES`` (no box projection, no ring, the box's edge a
    boundary like any other).
    ``solver="cut"`` (the default for CT, i.e. when a ``window`` is given) first minimises
    the same energy globally by alternating region-model estimates and exact graph cuts,
    then polishes that mask with ``polish`` steps of the evolution: on CT it no longer
    follows vessels and bowel of liver density into the liver's box.
    With a model (see ``boxlevelset.load_model``), the mask comes from the SOLOv2 kernel of
    the grid cell at the box centre (``boxlevelset.model.Predictor``), optionally refined
    by ``refine`` steps of the same evolution.

    Args:
        image: HxW or HxWxC array (uint8, uint16, float; CT in Hounsfield units with window).
            Without a model, NaN/inf (no data) may appear outside the boxes.
        boxes: Nx4 array of (x0, y0, x1, y1) in pixels; clipped to the image.
        model: optional trained model, or a ``Predictor`` already holding this very image,
            set with the same window (interactive use: the backbone then runs once per
            image, not per call; one holding an image of another size is an error).
        window: CT (level, width) or a preset name ("abdomen", "liver", "lung", "bone").
        iterations: gradient steps of the evolution (after the cut, ``polish`` steps are
            taken instead).
        step_size: Adam step on phi.
        gamma: weight of the evolution's length term (perimeter relative to box size); the
            cut weighs its boundary with ``CUT_GAMMA``.
        alpha: weight of the box projection term (evolution only: the cut has none).
        max_side: boxes with a longer side are evolved at this resolution, then upsampled.
        smooth: Gaussian sigma (pixels at evolution resolution) applied to each crop.
        lab: measure colour images in CIE Lab (closer to perceived contrast than RGB).
        refine: with a model, this many level-set steps starting from the model's mask
            (0: the model's mask as it is).
        histogram: weight of the histogram region term (per-channel histograms inside the
            mask vs outside it + the ring; 0 turns it off).
        context: width of that ring around each box, as a fraction of the box's longer
            side (clipped at the image border).
        edge: contrast sensitivity of the length term (0: plain perimeter; larger: a
            boundary along a strong edge of the crop costs less).
        solver: "evolve" (gradient descent from an ellipse inscribed in the box) or "cut"
            (global graph cut, then ``polish`` evolution steps); None picks "cut" when a
            ``window`` is given (CT) and "evolve" otherwise. Without a model only.
        polish: evolution steps after the cut (``solver="cut"``).
        border: weight of the mask's length along the box's edge, as a fraction of the
            length term's unit (the mask against the background beyond the box). None: the
            default for tight boxes, which the object touches on every side: ``CUT_BORDER``
            in the cut, 0 in the evolution (its box projection already pulls the mask to
            the sides). ``LOOSE_BOXES`` sets 1.
        fill_holes, largest_component: clean-up of each mask inside its box (holes filled;
            the largest connected piece kept with any piece of at least ``MIN_PIECE`` of
            its area, smaller ones dropped). ``fill_holes=None`` fills the evolution's holes
            and keeps the cut's: a hole the global cut leaves pays for its whole outline,
            so it is a structure (the spinal canal inside a vertebra), not noise.
        init_masks: without a model, an HxW mask per box to start from instead of the
            inscribed ellipse (the evolution's level set, or the cut's first region models):
            e.g. the object's mask on the neighbouring slice when propagating through a
            volume (``boxlevelset.propagate``).
        cropped: return the masks over their boxes only, as a ``BoxMasks`` (bounds, one
            box-sized mask per box; ``to_rle``, ``to_labels``): many boxes on a large image
            then cost their area, not N whole images.

    Returns:
        N boolean HxW masks, each zero outside its box. An empty box list gives [] (with
        ``cropped``, a ``BoxMasks`` of them, of no masks for no boxes). Without
        a model, a box with no contrast inside (``FLAT``) gets the whole box when the pixels
        around it differ (a uniform object it fits), else an empty mask (no object).

    Raises:
        ValueError: wrong image or box shape, NaN/inf values (inside a box, or anywhere
            with a model), a box with zero area, an unknown solver, a negative ``refine``,
            a ``Predictor`` holding an image of another size.
    """
    if solver is None:
        solver = "evolve" if window is None else "cut"
    if solver not in ("evolve", "cut"):
        raise ValueError(f"solver must be 'evolve' or 'cut', got {solver!r}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0 level-set steps, got {refine}")
    model_free = model is None
    img, clipped, bounds, origin, (height, width) = _image_and_boxes(
        image, boxes, window, model_free,
        context=(context if histogram > 0 else 0.0) if model_free else None)
    if len(clipped) == 0:
        return BoxMasks(np.zeros((0, 4), np.int64), [], (height, width)) if cropped else []
    image_bounds = bounds + np.array([*origin, *origin])  # bounds are in img, a region
    predictor = None
    if model is not None:
        from boxlevelset.model import Predictor

        if isinstance(model, Predictor):  # features of this image already cached
            predictor = model
            if predictor.image_size not in (None, (height, width)):
                raise ValueError(
                    f"the Predictor holds an image of {predictor.image_size[1]}x"
                    f"{predictor.image_size[0]} pixels, not this {width}x{height} one: call "
                    "its set_image with this image first")
        else:
            predictor = Predictor(model)
            predictor.set_image(image, window=window)
        if refine == 0:  # the model's masks as they are: no crops needed
            return predictor.predict_boxes(clipped, cropped=cropped)
        iterations = refine
    crops, hist = _box_crops(img, bounds, max_side, smooth, lab, histogram, context)
    init = None
    if predictor is not None:
        # The model's mask, as a level set at each crop's resolution, starts the evolution.
        init = []
        for prob, crop in zip(predictor.box_probabilities(clipped), crops):
            if prob.shape != crop.shape[:2]:
                prob = cv2.resize(prob, crop.shape[1::-1], interpolation=cv2.INTER_AREA)
            prob = np.clip(prob.astype(np.float64), 0.02, 0.98)
            init.append(np.log(prob / (1 - prob)))
    elif init_masks is not None:
        init = [np.where(u, INIT_LEVEL, -INIT_LEVEL)
                for u in _crop_masks(init_masks, image_bounds, crops)]
    evolve_border = 0.0 if border is None else border
    if predictor is None and solver == "cut":
        start = None if init is None else [phi > 0 for phi in init]
        cut = _cut(crops, hist, edge, border=CUT_BORDER if border is None else border,
                   start=start)
        phis = _evolve(crops, polish, step_size, gamma, alpha,
                       [np.where(u, 2.0, -2.0) for u in cut], hist, edge, evolve_border)
        # A box holds an object, so a cut that keeps (almost) nothing is the energy's trivial
        # minimum, not the object: a small low-contrast object in a loose box, whose whole
        # outline costs more than its region gains (an aorta on CT). The evolution from the
        # start mask or the inscribed ellipse finds its local minimum instead.
        lost = [i for i, u in enumerate(cut) if u.sum() < MIN_CUT_SHARE * u.size]
        if lost:
            again = _evolve([crops[i] for i in lost], iterations, step_size, gamma, alpha,
                            None if init is None else [init[i] for i in lost],
                            _hist_subset(hist, crops, lost), edge, evolve_border)
            for i, phi in zip(lost, again):
                phis[i] = phi
    else:
        phis = _evolve(crops, iterations, step_size, gamma, alpha, init, hist, edge,
                       evolve_border)

    if fill_holes is None:  # the evolution's holes are noise, the cut's structures
        fill_holes = not (predictor is None and solver == "cut")
    crops = []
    for (x0, y0, x1, y1), phi in zip(bounds, phis):
        if predictor is None and img[y0:y1, x0:x1].std() < FLAT:
            # Nothing to separate inside: the object fills the box if its surroundings
            # differ, else there is no object (the evolution drew an arbitrary blob here).
            crops.append(np.full((y1 - y0, x1 - x0), _differs_around(img, (x0, y0, x1, y1))))
            continue
        bh, bw = y1 - y0, x1 - x0
        if phi.shape != (bh, bw):
            phi = cv2.resize(phi, (bw, bh), interpolation=cv2.INTER_LINEAR)
        crops.append(clean_mask(phi > 0, fill_holes, largest_component))
    masks = BoxMasks(image_bounds, crops, (height, width))
    return masks if cropped else masks.to_masks()


# A cut mask under this share of its box's pixels is taken for the trivial empty minimum
# (see segment_boxes): a box the user drew around an object does not hold only a speck.
MIN_CUT_SHARE = 0.05


def _hist_subset(hist: tuple[np.ndarray, np.ndarray, float] | None, crops: list[np.ndarray],
                 keep: list[int]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The histogram term's data (bins per pixel of all crops, ring counts per box) of the
    crops ``keep`` only."""
    if hist is None:
        return None
    bins, ring_counts, weight = hist
    parts = _per_crop(bins, crops)
    return np.concatenate([parts[i] for i in keep]), ring_counts[keep], weight


# A box whose pixels vary less than this (standard deviation, image scaled to [0, 1]: under
# half a grey level of 8 bits) holds no contrast: a uniform object the box fits exactly, or
# blank background, padding, air on CT (constant after windowing).
FLAT = 1.0 / 512


# The frame around a flat box that _differs_around compares it with, in pixels.
_FRAME = 2


def _differs_around(img: np.ndarray, bounds: tuple[int, int, int, int]) -> bool:
    """True when the ``_FRAME``-pixel frame around a flat box differs from its inside (the
    box holds a uniform object); False when it does not, or the box has no frame."""
    x0, y0, x1, y1 = bounds
    height, width = img.shape[:2]
    fx0, fy0 = max(0, x0 - _FRAME), max(0, y0 - _FRAME)
    frame = img[fy0:min(height, y1 + _FRAME), fx0:min(width, x1 + _FRAME)]
    outside = np.ones(frame.shape[:2], bool)
    outside[y0 - fy0:y1 - fy0, x0 - fx0:x1 - fx0] = False
    if not outside.any():
        return False
    inside = img[y0:y1, x0:x1].reshape(-1, img.shape[2]).mean(0)
    return bool(np.abs(frame[outside] - inside).max() >= 2 * FLAT)


# The level set an init mask starts from: +-INIT_LEVEL inside/outside. Smaller than the 2.0
# the cut's result starts the polish with, so that 25 steps can still move an outline the
# init mask got a few pixels wrong (an object shrinking from one slice to the next).
INIT_LEVEL = 1.0


def _crop_masks(masks: Sequence[np.ndarray], bounds: np.ndarray,
                crops: list[np.ndarray], what: str = "init_masks") -> list[np.ndarray]:
    """Each box's part of its HxW mask, at its crop's resolution (bool); errors name the
    masks as ``what``."""
    masks = list(masks)
    if len(masks) != len(bounds):
        raise ValueError(f"{what}: {len(masks)} masks for {len(bounds)} boxes")
    out = []
    for mask, (x0, y0, x1, y1), crop in zip(masks, bounds, crops):
        part = np.asarray(mask, dtype=np.float32)[y0:y1, x0:x1]
        if part.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"{what}: a mask of shape {np.shape(mask)} does not cover "
                             f"box ({x0}, {y0}, {x1}, {y1})")
        if part.shape != crop.shape[:2]:
            part = cv2.resize(part, crop.shape[1::-1], interpolation=cv2.INTER_AREA)
        out.append(part > 0.5)
    return out


def _fill_outside_boxes(img: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """NaN pixels (no data: the padding of a stitched or registered image) outside every
    box take the value of the nearest pixel with data, so the rings around the boxes stay
    usable; a box over such pixels raises ValueError naming it."""
    missing = np.isnan(img).any(-1)
    if not missing.any():
        return img
    for i, (x0, y0, x1, y1) in enumerate(bounds):
        if missing[y0:y1, x0:x1].any():
            raise ValueError(f"box {i} ({x0}, {y0}, {x1}, {y1}) covers NaN or inf pixels; "
                             "boxes must lie on pixels with data")
    from scipy import ndimage

    rows, cols = ndimage.distance_transform_edt(missing, return_distances=False,
                                                return_indices=True)
    return img[rows, cols]


# The clean-up keeps the largest connected piece of a mask and every piece at least this
# fraction of its area: one object per box, but one slice may show it in a few large pieces
# (a vertebra's body and arch on CT); specks go. Against keeping the largest piece alone it
# moves no benchmark mean IoU or AP by more than 0.001, and it keeps the vertebral arches
# the cut separates from the body on IRCAD slices.
MIN_PIECE = 0.25


def clean_mask(mask: np.ndarray, fill_holes: bool, largest_component: bool) -> np.ndarray:
    """The clean-up ``segment_boxes`` applies to each mask inside its box: with
    ``largest_component``, the largest connected piece and every piece of at least
    ``MIN_PIECE`` of its area stay; with ``fill_holes``, holes are filled."""
    from scipy import ndimage

    if largest_component and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(labels.ravel())[1:]
            keep = np.zeros(count + 1, bool)  # a lookup per label: isin sorts every pixel
            keep[1:] = sizes >= MIN_PIECE * sizes.max()
            mask = keep[labels]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask
