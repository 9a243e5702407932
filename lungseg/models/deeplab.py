"""DeepLabv3+ (Chen et al., 2018, "Encoder-Decoder with Atrous Separable Convolution for Semantic
Image Segmentation") on a small ResNet built here and trained from scratch.

Atrous (dilated) convolutions let the last backbone stages keep a stride-16 (or 8) map while still
growing the receptive field; ASPP looks at that map at several dilation rates plus the whole image;
a light decoder adds stride-4 features back for sharper boundaries.
"""

from collections.abc import Sequence

import torch
from torch import nn

from lungseg.errors import LungsegError

from .layers import (
    conv_bn,
    conv_bn_relu,
    crop,
    init_weights,
    make_dropout,
    pad_to_multiple,
    resize_to,
)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs plus a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels, out_channels, stride=stride, dilation=dilation),
            conv_bn(out_channels, out_channels, dilation=dilation),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else conv_bn(in_channels, out_channels, kernel_size=1, stride=stride)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.convs(x) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: a 1x1 conv, one 3x3 conv per atrous rate and an image-level
    branch, concatenated and projected back to `out_channels`."""

    def __init__(
        self, in_channels: int, out_channels: int, atrous_rates: Sequence[int], dropout: float
    ):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, out_channels, kernel_size=1)])
        for rate in atrous_rates:
            self.branches.append(conv_bn_relu(in_channels, out_channels, dilation=rate))
        # Image pooling gives the global context that large rates lose once they exceed the map
        # (a 3x3 conv at rate 18 on a 16x16 map is effectively a 1x1 conv). No BatchNorm: after
        # global pooling the map is 1x1, so with batch size 1 BatchNorm has a single value per
        # channel and raises in training. The conv's bias takes over BatchNorm's shift, and the
        # projection's BatchNorm below normalises the concatenation.
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            conv_bn_relu((len(atrous_rates) + 2) * out_channels, out_channels, kernel_size=1),
            make_dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [resize_to(self.image_pool(x), x)]
        for branch in self.branches:
            outputs.append(branch(x))
        return self.project(torch.cat(outputs, dim=1))


class DeepLab(nn.Module):
    """DeepLabv3+. `forward`: (N, in_channels, H, W) → logits (N, num_classes, H, W), any H, W.

    Backbone: ResNet stem (7x7 conv stride 2, 3x3 max-pool stride 2) then stages of basic blocks
    with width·(1, 2, 4, 8, ...) channels. Each later stage halves the resolution until
    `output_stride` is reached; from then on stages keep it and double their dilation instead.

    Args:
        width: channels of the stem and first stage.
        dropout: rate of the Dropout after the ASPP projection (0 leaves it out).
        blocks: basic blocks per stage; (2, 2, 2, 2) is ResNet-18's layout.
        output_stride: stride of the map ASPP sees; 16 (dilation 2 in the last stage) or 8
            (dilations 2 and 4 in the last two) with the default 4 stages. 8 is finer and costs
            about 4x the compute in the last stages.
        atrous_rates: dilation rates of ASPP's 3x3 branches, in pixels of the ASPP map. The paper
            uses (6, 12, 18) at output stride 16 and doubles them, (12, 24, 36), at 8 so that they
            cover the same image area; pass them explicitly when changing output_stride.
        aspp_channels: channels of ASPP and the decoder; None means 4·width (256 at width 64, as
            in the paper).
        low_level_channels: channels the stride-4 features are reduced to before joining the
            decoder; None means 3·width/4 (48 at width 64, as in the paper), kept below
            aspp_channels so the decoder does not drown the semantic ASPP features in edges.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        dropout: float = 0.0,
        blocks: Sequence[int] = (2, 2, 2, 2),
        output_stride: int = 16,
        atrous_rates: Sequence[int] = (6, 12, 18),
        aspp_channels: int | None = None,
        low_level_channels: int | None = None,
    ):
        super().__init__()
        stem_stride = 4
        strides = [stem_stride * 2**i for i in range(len(blocks))]
        if output_stride not in strides:
            raise LungsegError(
                f"model.output_stride={output_stride} is not possible with "
                f"model.blocks={list(blocks)}: expected one of {strides} (16 or 8 as in "
                "DeepLabv3+). Set model.output_stride to one of them, or add stages to "
                "model.blocks."
            )
        aspp_channels = aspp_channels or 4 * width
        low_level_channels = low_level_channels or max(1, 3 * width // 4)
        self.output_stride = output_stride

        stem = nn.Sequential(
            conv_bn_relu(in_channels, width, kernel_size=7, stride=2),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages = []
        stride, dilation, channels = stem_stride, 1, width
        for i, num_blocks in enumerate(blocks):
            first_stride = 1
            if i > 0 and stride < output_stride:
                first_stride, stride = 2, stride * 2
            elif i > 0:
                dilation *= 2  # keep the resolution, grow the receptive field instead
            out_channels = width * 2**i
            stage = [BasicBlock(channels, out_channels, first_stride, dilation)]
            stage += [
                BasicBlock(out_channels, out_channels, 1, dilation) for _ in range(num_blocks - 1)
            ]
            stages.append(nn.Sequential(*stage))
            channels = out_channels
        self.low_level = nn.Sequential(stem, stages[0])  # stride 4
        self.high_level = nn.Sequential(*stages[1:])  # stride output_stride

        self.aspp = ASPP(channels, aspp_channels, atrous_rates, dropout)
        self.reduce = conv_bn_relu(width, low_level_channels, kernel_size=1)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, aspp_channels),
            conv_bn_relu(aspp_channels, aspp_channels),
        )
        self.classifier = nn.Conv2d(aspp_channels, num_classes, kernel_size=1)
        init_weights(self)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of an input already padded to a multiple of `output_stride`:
        (low-level at stride 4, high-level at stride `output_stride`)."""
        low = self.low_level(x)
        return low, self.high_level(low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding to a multiple of output_stride makes every stage's map exactly 1/stride of the
        # input, so bilinear upsampling (align_corners=False) puts each feature back over the
        # pixels it came from; with ceil-rounded odd sizes the maps would be shifted slightly.
        x, size = pad_to_multiple(x, self.output_stride)
        low, high = self.features(x)
        y = resize_to(self.aspp(high), low)
        y = self.decoder(torch.cat([y, self.reduce(low)], dim=1))
        return crop(resize_to(self.classifier(y), x), size)
