"""Tests for lungseg.models: shapes at awkward sizes, trainability, export-style inputs, and the
feature that defines each architecture."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lungseg.errors import LungsegError
from lungseg.models import FCN, DeepLab, SegNet, UNet

# name → (class, extra constructor options); the variants exercise options that change the graph.
ARCHS = {
    "unet": (UNet, {}),
    "unet-bilinear": (UNet, {"bilinear": True}),
    "unet-depth3": (UNet, {"depth": 3}),
    "fcn": (FCN, {}),
    "fcn-2s": (FCN, {"skips": 4}),
    "segnet": (SegNet, {}),
    "deeplab": (DeepLab, {}),
    "deeplab-os8": (DeepLab, {"output_stride": 8, "atrous_rates": (12, 24, 36)}),
}
CLASSES = [UNet, FCN, SegNet, DeepLab]
# Odd, non-square, already-aligned and degenerate sizes.
SIZES = [(37, 45), (33, 64), (64, 64), (100, 75), (1, 1)]


def build(name: str, **options) -> nn.Module:
    cls, extra = ARCHS[name]
    return cls(**{"width": 4, **extra, **options})


def num_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("in_channels,num_classes", [(1, 2), (3, 3)])
def test_output_has_input_size(name, in_channels, num_classes):
    net = build(name, in_channels=in_channels, num_classes=num_classes).eval()
    with torch.no_grad():
        for h, w in SIZES:
            logits = net(torch.randn(2, in_channels, h, w))
            assert logits.shape == (2, num_classes, h, w), (h, w)


@pytest.mark.parametrize("name", ARCHS)
def test_trains_with_batch_one_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    net = build(name, dropout=0.1).train()
    logits = net(torch.randn(1, 1, 45, 37))
    assert logits.shape == (1, 2, 45, 37)
    F.cross_entropy(logits, torch.randint(0, 2, (1, 45, 37))).backward()
    for param_name, param in net.named_parameters():
        # None or all-zero means the parameter does not reach the output: a dead branch.
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", ARCHS)
def test_eval_is_deterministic_and_train_applies_dropout(name):
    torch.manual_seed(0)
    net = build(name, dropout=0.5)
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("name", ARCHS)
def test_channels_last_and_bfloat16_autocast(name):
    torch.manual_seed(0)
    net = build(name).eval()
    x = torch.randn(2, 1, 33, 40)
    with torch.no_grad():
        reference = net(x)
        torch.testing.assert_close(
            net(x.to(memory_format=torch.channels_last)), reference, rtol=1e-4, atol=1e-4
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = net(x)
    assert low_precision.shape == reference.shape
    assert torch.isfinite(low_precision).all()
    # Correlation, not a tolerance: bfloat16 rounding flips some max-pool choices, which moves
    # SegNet's unpooled values to other pixels (about 0.98 here), while a broken path gives ~0.
    pair = torch.stack([low_precision.float().flatten(), reference.flatten()])
    assert torch.corrcoef(pair)[0, 1] > 0.9


@pytest.mark.parametrize("cls", CLASSES)
def test_width_scales_parameters_quadratically(cls):
    ratio = num_parameters(cls(width=8)) / num_parameters(cls(width=4))
    assert 3.0 < ratio < 5.0


@pytest.mark.parametrize("cls", CLASSES)
def test_dropout_zero_leaves_no_dropout_layers(cls):
    assert not any(isinstance(m, nn.Dropout) for m in cls(width=4, dropout=0.0).modules())
    dropouts = [m for m in cls(width=4, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)


def test_unet_at_width_64_is_the_original_size():
    assert 28e6 < num_parameters(UNet(width=64, depth=4)) < 35e6


def test_unet_dropout_only_on_the_two_deepest_blocks():
    net = UNet(width=4, dropout=0.5)
    assert [type(m) for m in net.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout] * 2
    assert isinstance(net.encoder[-1][-1], nn.Dropout)
    assert isinstance(net.bottleneck[-1], nn.Dropout)


def test_segnet_unpools_at_the_encoders_max_pool_indices():
    net = SegNet(width=4, depth=5).eval()
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(m.return_indices for m in pools)
    assert any(isinstance(m, nn.MaxUnpool2d) for m in net.modules())

    pooled_indices, unpooled = [], []
    for module in net.modules():
        if isinstance(module, nn.MaxPool2d):
            module.register_forward_hook(lambda m, args, out: pooled_indices.append(out[1]))
        if isinstance(module, nn.MaxUnpool2d):
            module.register_forward_hook(lambda m, args, out: unpooled.append((args[1], out)))
    with torch.no_grad():
        net(torch.randn(1, 1, 37, 45))

    assert len(unpooled) == 5
    for saved, (used, out) in zip(reversed(pooled_indices), unpooled, strict=True):
        assert torch.equal(saved, used)
        # Unpooling puts each value back at one position of its 2x2 window, the rest stay zero.
        n, c, h, w = out.shape
        windows = out.reshape(n, c, h // 2, 2, w // 2, 2)
        assert ((windows != 0).sum(dim=(3, 5)) <= 1).all()


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplab_aspp_input_is_at_output_stride(output_stride):
    net = DeepLab(width=4, output_stride=output_stride).eval()
    with torch.no_grad():
        low, high = net.features(torch.randn(1, 1, 64, 64))
    assert low.shape[-2:] == (16, 16)
    assert high.shape[-2:] == (64 // output_stride, 64 // output_stride)
    assert high.shape[1] == 4 * 8  # width·8 channels in the last stage


def test_deeplab_rejects_an_unreachable_output_stride():
    with pytest.raises(LungsegError, match="output_stride=12"):
        DeepLab(output_stride=12)


def test_fcn_finer_skips_start_as_fcn8s_and_fuse_pool2_and_pool1():
    torch.manual_seed(0)
    fcn8 = FCN(width=4, skips=2).eval()
    fcn2 = FCN(width=4, skips=4).eval()
    extra = {k: v for k, v in fcn2.state_dict().items() if k not in fcn8.state_dict()}
    assert sorted(extra) == [f"score_finer.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert [extra[f"score_finer.{i}.weight"].shape[1] for i in (0, 1)] == [8, 4]  # pool2, pool1
    assert all(not extra[k].any() for k in extra)  # zero-initialised: FCN-8s scores at first
    fcn2.load_state_dict({**fcn8.state_dict(), **extra})  # an FCN-8s checkpoint plus the skips
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        # Zero skips leave the FCN-8s scores, upsampled in x2 steps rather than one x8 step.
        assert torch.allclose(fcn2(x).mean((2, 3)), fcn8(x).mean((2, 3)), atol=1e-3)
        before = fcn2(x)
        fcn2.score_finer[1].weight.fill_(1.0)  # pool1 scores reach the output at stride 2
        assert not torch.allclose(fcn2(x), before)
    with pytest.raises(ValueError, match="skips must be 2"):
        FCN(skips=5)
