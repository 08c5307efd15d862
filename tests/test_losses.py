"""Losses of the SOLOv2 level-set model: focal, dice, and the Eq. 11 instance loss assembly."""

from __future__ import annotations

import math

import pytest
import torch

from boxlevelset.losses import (
    LevelSetWeights,
    dice_loss,
    levelset_instance_loss,
    sigmoid_focal_loss,
    tree_filtered_masks,
)


# Tiny tensors: one torch thread (conftest), no OpenMP thrashing on the shared 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([0.0, 2.0])
    targets = torch.tensor([1.0, 0.0])
    # Positive at p = 0.5: 0.25 * 0.5^2 * log 2; negative at p = sigmoid(2): 0.75 * p^2 * -log(1-p).
    p = 1 / (1 + math.exp(-2.0))
    expected = 0.25 * 0.25 * math.log(2) + 0.75 * p**2 * -math.log(1 - p)
    got = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dice_loss_values():
    p = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert dice_loss(p, p).item() == pytest.approx(1 - 4 / (4 + 0.002), rel=1e-3)
    q = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    assert dice_loss(p, q).item() == pytest.approx(1.0)


def _scene(n_per_image=(2, 1), size=24):
    torch.manual_seed(0)
    b = len(n_per_image)
    batch_index = torch.cat([torch.full((n,), i) for i, n in enumerate(n_per_image)])
    boxes = torch.tensor([[2.0, 3.0, 12.0, 15.0], [10.0, 8.0, 22.0, 20.0], [4.0, 4.0, 18.0, 16.0]])
    boxes = boxes[: len(batch_index)]
    logits = torch.randn(len(batch_index), size, size, requires_grad=True)
    image = torch.rand(b, 3, size, size)
    guide = torch.randn(b, 5, size, size, requires_grad=True)
    return logits, boxes, batch_index, image, guide


def test_tree_filtered_masks_shapes_and_guide_gradient():
    logits, _, batch_index, image, guide = _scene()
    weights = LevelSetWeights(tree_filter_max_side=16)  # exercise the capped-resolution path
    out = tree_filtered_masks(logits.sigmoid(), batch_index, image, guide, weights)
    assert out.shape == (3, 2, 24, 24)
    assert torch.isfinite(out).all()
    # A normalised filter of values in (0, 1) stays in (0, 1).
    assert out.min() >= 0 and out.max() <= 1
    out[:, 1].sum().backward()
    assert guide.grad is not None and guide.grad.abs().sum() > 0


def test_tree_filter_is_per_image():
    """Instances of image 1 must be filtered on image 1's tree, not image 0's."""
    logits, _, batch_index, image, guide = _scene(n_per_image=(1, 1))
    w = LevelSetWeights(tree_filter_max_side=0)
    both = tree_filtered_masks(logits.sigmoid(), batch_index, image, guide, w)
    alone = tree_filtered_masks(logits[1:].sigmoid(), torch.tensor([0]), image[1:], guide[1:], w)
    torch.testing.assert_close(both[1:], alone)


def test_instance_loss_terms_and_weights():
    logits, boxes, batch_index, image, guide = _scene()
    w = LevelSetWeights()
    terms = levelset_instance_loss(logits, boxes, batch_index, image, image, guide, w)
    assert set(terms) == {"box_projection", "levelset_image", "levelset_feature"}
    for v in terms.values():
        assert v.shape == (3,) and torch.isfinite(v).all() and (v >= 0).all()
    doubled = levelset_instance_loss(
        logits, boxes, batch_index, image, image, guide,
        LevelSetWeights(alpha_box=2 * w.alpha_box, lambda_image=2 * w.lambda_image),
    )
    torch.testing.assert_close(doubled["box_projection"], 2 * terms["box_projection"])
    torch.testing.assert_close(doubled["levelset_image"], 2 * terms["levelset_image"])
    sum(v.sum() for v in terms.values()).backward()
    assert logits.grad.abs().sum() > 0 and guide.grad.abs().sum() > 0


def test_box_projection_term_is_zero_for_the_filled_box():
    size = 20
    boxes = torch.tensor([[4.0, 5.0, 14.0, 12.0]])
    logits = torch.full((1, size, size), -20.0)
    logits[0, 5:12, 4:14] = 20.0
    image = torch.rand(1, 3, size, size)
    terms = levelset_instance_loss(
        logits, boxes, torch.tensor([0]), image, image, torch.rand(1, 2, size, size),
        LevelSetWeights(),
    )
    assert terms["box_projection"].item() == pytest.approx(0.0, abs=1e-4)
