"""SOLOv2 network parts: FPN, the category/kernel grid head and the unified mask-feature branch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer when the layer is narrow (at least 4 channels a group)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def conv_gn_relu(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Sequential:
    """Convolution (same size, no bias), group norm, ReLU: the heads' building block."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        group_norm(out_ch),
        nn.ReLU(inplace=True),
    )


def coord_features(x: Tensor) -> Tensor:
    """Two channels of normalised x and y coordinates in [-1, 1], shaped like x: [B, 2, H, W]."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy])[None].expand(b, 2, h, w)


class FPN(nn.Module):
    """Feature pyramid over backbone maps at strides 4..32 -> P2..P6 (P6: stride-2 pool of P5)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class GridHead(nn.Module):
    """SOLOv2 category and kernel towers: per FPN level, an S x S grid of class logits and kernels.

    The kernel tower sees two extra coordinate channels (so kernels know where they are); both
    towers work on the level's feature resized to the grid size S.
    """

    def __init__(
        self,
        in_channels: int,
        head_channels: int,
        stacked_convs: int,
        num_classes: int,
        kernel_channels: int,
        num_grids: Sequence[int],
    ) -> None:
        super().__init__()
        self.num_grids = tuple(num_grids)
        self.kernel_tower = nn.Sequential(
            *(
                conv_gn_relu(in_channels + 2 if i == 0 else head_channels, head_channels)
                for i in range(stacked_convs)
            )
        )
        self.cate_tower = nn.Sequential(
            *(
                conv_gn_relu(in_channels if i == 0 else head_channels, head_channels)
                for i in range(stacked_convs)
            )
        )
        self.kernel_pred = nn.Conv2d(head_channels, kernel_channels, 3, padding=1)
        self.cate_pred = nn.Conv2d(head_channels, num_classes, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Prior 0.01 on every class so the focal loss starts from a sane background rate.
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - 0.01) / 0.01))

    @staticmethod
    def level_inputs(fpn: Sequence[Tensor]) -> list[Tensor]:
        """SOLOv2's split: P2 halved to stride 8, P3, P4, P5, and P6 resized to the P5 size."""
        return [
            F.interpolate(fpn[0], scale_factor=0.5, mode="bilinear", align_corners=False),
            fpn[1],
            fpn[2],
            fpn[3],
            F.interpolate(fpn[4], size=fpn[3].shape[-2:], mode="bilinear", align_corners=False),
        ]

    def forward(self, fpn: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Returns per level category logits [B, K, S, S] and kernels [B, E, S, S]."""
        cates, kernels = [], []
        for feat, s in zip(self.level_inputs(fpn), self.num_grids):
            x = torch.cat([feat, coord_features(feat)], dim=1)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_pred(self.kernel_tower(x)))
            cates.append(self.cate_pred(self.cate_tower(x[:, :-2])))
        return cates, kernels


class MaskFeatureHead(nn.Module):
    """Unified mask feature at stride 4 from P2..P5 (coordinates on the deepest level only)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, levels: int = 4):
        super().__init__()
        self.stages = nn.ModuleList()
        for level in range(levels):
            if level == 0:
                self.stages.append(conv_gn_relu(in_channels, mid_channels))
                continue
            layers: list[nn.Module] = []
            for j in range(level):
                coords = 2 if level == levels - 1 else 0
                c_in = in_channels + coords if j == 0 else mid_channels
                layers.append(conv_gn_relu(c_in, mid_channels))
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.stages.append(nn.Sequential(*layers))
        self.pred = conv_gn_relu(mid_channels, out_channels, kernel=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, fpn: Sequence[Tensor]) -> Tensor:
        n = len(self.stages)
        out = self.stages[0](fpn[0])
        for level in range(1, n):
            x = fpn[level]
            if level == n - 1:
                x = torch.cat([x, coord_features(x)], dim=1)
            y = self.stages[level](x)
            if y.shape[-2:] != out.shape[-2:]:  # odd sizes: align to the stride-4 map
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.pred(out)
