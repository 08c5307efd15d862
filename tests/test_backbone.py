"""Backbones: torchvision-compatible ResNet names, frozen stages, strides, shipped Lite0 weights."""

from __future__ import annotations

import urllib.error
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from boxlevelset.backbone import (
    Conv2dSame,
    EfficientNetLite0,
    FrozenBatchNorm2d,
    PretrainedWeightsError,
    ResNet,
    build_backbone,
    load_efficientnet_weights,
    load_resnet_weights,
    shipped_efficientnet_lite0_path,
)

# A few torchvision resnet50 state-dict entries, written out by hand from torchvision's layout.
TORCHVISION_R50_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_mean": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.3.bn2.bias": (128,),
    "layer3.5.bn3.weight": (1024,),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
}
# torchvision resnet50 has 320 keys: stem conv + bn (1 + 5), 16 bottlenecks x (3 convs + 3 bns
# x 5 entries) = 288, 4 downsamples x (1 + 5) = 24, fc weight + bias = 2. Without fc and without
# the 53 num_batches_tracked entries (1 + 16*3 + 4) that leaves 320 - 2 - 53 = 265.
TORCHVISION_R50_COUNT = 320
R50_NUM_BATCHES_TRACKED = 1 + 16 * 3 + 4
OUR_R50_COUNT = TORCHVISION_R50_COUNT - 2 - R50_NUM_BATCHES_TRACKED


@pytest.fixture(scope="module")
def r50() -> ResNet:
    torch.manual_seed(0)
    return build_backbone("resnet50", pretrained=False).eval()


@pytest.fixture(scope="module")
def r101() -> ResNet:
    return build_backbone("resnet101", pretrained=False).eval()


def _torchvision_style(state: dict) -> OrderedDict:
    """Our state dict as torchvision would save it: BN num_batches_tracked + an fc layer."""
    out = OrderedDict()
    for k, v in state.items():
        out[k] = v
        if k.endswith("running_var"):
            out[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    out["fc.weight"] = torch.zeros(1000, 2048)
    out["fc.bias"] = torch.zeros(1000)
    return out


def test_resnet50_keys_match_torchvision_and_round_trip(r50, tmp_path):
    state = r50.state_dict()
    assert len(state) == OUR_R50_COUNT == 265
    for key, shape in TORCHVISION_R50_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("fc.") for k in state)
    # Our own state dict loads strictly into a fresh model ...
    fresh = ResNet(50)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(r50(x), fresh.eval()(x)):
            assert torch.equal(a, b)
    # ... and so does a torchvision-format file (fc + num_batches_tracked), through the loader.
    tv = _torchvision_style(state)
    assert len(tv) == TORCHVISION_R50_COUNT
    path = tmp_path / "resnet50_tv.pth"
    torch.save(tv, path)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_resnet_weights(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_resnet101_key_count(r101):
    # torchvision resnet101: 33 bottlenecks -> 6 + 33*18 + 4*6 + 2 = 626 keys; ours drops fc and
    # the 1 + 33*3 + 4 = 104 num_batches_tracked -> 520.
    assert len(r101.state_dict()) == 626 - 2 - 104 == 520
    assert tuple(r101.state_dict()["layer3.22.conv2.weight"].shape) == (256, 256, 3, 3)


def test_resnet_frozen_stages_and_frozen_bn(r50):
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in r50.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in r50.modules()) == 53
    for name, p in r50.named_parameters():
        frozen = name.startswith(("conv1.", "layer1."))
        assert p.requires_grad is not frozen, name
    assert all(not n.startswith("bn") for n, _ in r50.named_parameters())  # BN has no params

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eval_out = r50.eval()(x)
    buffers = {k: v.clone() for k, v in r50.named_buffers()}
    r50.train()
    try:
        train_out = r50(x)
        sum(f.mean() for f in train_out).backward()
    finally:
        r50.eval()
    for a, b in zip(eval_out, train_out):
        assert torch.allclose(a, b, atol=1e-5)  # no batch statistics in train mode
    for k, v in r50.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert r50.layer1[0].conv1.weight.grad is None
    assert r50.layer2[0].conv1.weight.grad is not None
    r50.zero_grad(set_to_none=True)


def test_frozen_stages_range():
    b = build_backbone("efficientnet_lite0", pretrained=False, frozen_stages=-1)
    assert all(p.requires_grad for p in b.parameters())
    b = build_backbone("efficientnet_lite0", pretrained=False, frozen_stages=2)
    grads = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else ""):
             p.requires_grad for n, p in b.named_parameters()}
    assert not grads["conv_stem"]
    assert [grads[f"blocks.{i}"] for i in range(16)] == [False] * 5 + [True] * 11
    with pytest.raises(ValueError, match="frozen_stages"):
        build_backbone("efficientnet_lite0", pretrained=False, frozen_stages=5)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", pretrained=False)


def test_frozen_batchnorm_matches_batchnorm_eval():
    bn = torch.nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(4, eps=1e-3)
    frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked ignored
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(frozen(x), bn.eval()(x), atol=1e-6)


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "efficientnet_lite0"])
def test_feature_strides_and_channels(name, request):
    if name.startswith("resnet"):
        b = request.getfixturevalue({"resnet50": "r50", "resnet101": "r101"}[name])
    else:
        b = build_backbone(name, pretrained=False).eval()
    expected = {"resnet50": [256, 512, 1024, 2048], "resnet101": [256, 512, 1024, 2048],
                "efficientnet_lite0": [24, 40, 112, 320]}[name]
    assert b.out_channels == expected
    assert len(b.pixel_mean) == 3 and len(b.pixel_std) == 3
    with torch.no_grad():
        feats = b(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(expected, (4, 8, 16, 32))]


def test_conv2d_same_pads_like_tensorflow():
    conv = Conv2dSame(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 8, 7)
    # TF SAME, stride 2: H=8 needs 1 pad row (bottom); W=7 needs 2 (one each side).
    ref = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)
    out = conv(x)
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out, ref, atol=1e-6)


def test_shipped_lite0_weights_load_in_order():
    src = torch.load(shipped_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    m = build_backbone("efficientnet_lite0", pretrained=True)
    sd = m.state_dict()
    assert torch.equal(sd["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(sd["blocks.0.depthwise_conv.weight"],
                       src["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(sd["blocks.15.bn2.running_var"], src["_blocks.15._bn2.running_var"])
    assert not any(k.startswith(("conv_head", "fc")) for k in sd)


def test_lite0_classifies_chelsea_as_cat():
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    m = load_efficientnet_weights(EfficientNetLite0(with_head=True), True).eval()
    images = [resize(im, (224, 224), anti_aliasing=True, preserve_range=True)
              for im in (skimage_data.chelsea(), skimage_data.coffee())]
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2)
    mean = torch.tensor(m.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(m.pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = m.classify((x - mean) / std).softmax(1)
    cat, coffee = probs
    # ImageNet: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
    assert cat.argmax().item() in range(281, 286), cat.topk(5)
    assert set(cat.topk(5).indices.tolist()) >= {281, 282, 285}
    assert cat[281:286].sum() > 0.5
    # 967 espresso, 968 cup.
    assert coffee.argmax().item() in (967, 968), coffee.topk(5)


def test_lite0_own_checkpoint_round_trip_and_bad_files(tmp_path, r50):
    torch.manual_seed(0)
    full = EfficientNetLite0(with_head=True)
    path = tmp_path / "lite0_own.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    headless = load_efficientnet_weights(EfficientNetLite0(), path)  # by name, head dropped
    for k, v in headless.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    # A detector checkpoint (dict(model=...) with 'backbone.' keys) initialises the backbone.
    detector = tmp_path / "detector.pth"
    torch.save({"model": {**{f"backbone.{k}": v for k, v in headless.state_dict().items()},
                          "fpn.conv.weight": torch.zeros(1)}, "config": {}}, detector)
    again = build_backbone("efficientnet_lite0", pretrained=detector)
    for k, v in again.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k

    # In-order mapping checks every shape: a 5x5 depthwise kernel swapped for a 3x3 one fails.
    shipped = torch.load(shipped_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    shipped["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    wrong = tmp_path / "wrong_lite0.pth"
    torch.save(shipped, wrong)
    with pytest.raises(ValueError, match=r"wrong_lite0.pth.*_blocks\.3\._depthwise_conv"):
        load_efficientnet_weights(EfficientNetLite0(), wrong)
    # A ResNet file is rejected by name, naming the file.
    resnet_file = tmp_path / "resnet_part.pth"
    torch.save(OrderedDict(list(r50.state_dict().items())[:10]), resnet_file)
    with pytest.raises(ValueError, match="resnet_part.pth"):
        load_efficientnet_weights(EfficientNetLite0(), resnet_file)
    with pytest.raises(ValueError, match="missing keys"):
        load_resnet_weights(ResNet(50), shipped_efficientnet_lite0_path())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_backbone("efficientnet_lite0", pretrained=str(junk))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet50", pretrained=tmp_path / "missing.pth")


def test_resnet_pretrained_offline_gives_clear_error(monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone("resnet50", pretrained=True)
    assert calls == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]
    message = str(info.value)
    assert "internet" in message and "efficientnet_lite0" in message and ".pth" in message
