"""FCN-8s (Long, Shelhamer & Darrell, 2015, "Fully Convolutional Networks for Semantic
Segmentation") on a VGG-16-style backbone built here and trained from scratch, hence BatchNorm
after every backbone conv.
"""

import torch
from torch import nn

from .layers import (
    conv_stack,
    crop,
    init_weights,
    make_dropout,
    pad_to_multiple,
    resize_to,
    vgg_plan,
)


class FCN(nn.Module):
    """FCN-8s. `forward`: (N, in_channels, H, W) → logits (N, num_classes, H, W), any H, W.

    The backbone has 5 stages, each ending in a 2x2 max-pool, so it has stride 32; "fc6"/"fc7"
    run as convolutions on pool5; class scores from fc7 are upsampled ×2, added to scores from
    pool4, upsampled ×2, added to scores from pool3, and upsampled ×8. With ``skips`` 3 or 4
    the fusion goes on to pool2 (FCN-4s) and pool1 (FCN-2s), the paper's "finer strides" that
    it found of little use on PASCAL VOC but that fine organ boundaries need (lungs scored at
    512 px; README, "Measured").

    Args:
        width: channels of the first stage; stages have width·(1, 2, 4, 8, 8).
        dropout: rate of the Dropout after fc6 and after fc7 (0 leaves them out).
        head_channels: channels of fc6 and fc7; None means 16·width (VGG's 4096 is 64·64, but
            1024 at width 64 is plenty for a few classes).
        head_kernel_size: fc6's kernel; 7 as VGG's fc6, which sees a 7x7 window of pool5.
        skips: pools whose scores are fused, from pool4 down: 2 = FCN-8s (pool4, pool3),
            3 = FCN-4s (+ pool2), 4 = FCN-2s (+ pool1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        dropout: float = 0.0,
        head_channels: int | None = None,
        head_kernel_size: int = 7,
        skips: int = 2,
    ):
        super().__init__()
        if skips not in (2, 3, 4):
            raise ValueError(f"skips must be 2 (FCN-8s), 3 (FCN-4s) or 4 (FCN-2s), not {skips}")
        head_channels = head_channels or 16 * width
        stages = [
            nn.Sequential(conv_stack(c_in, c_out, n), nn.MaxPool2d(kernel_size=2, stride=2))
            for c_in, c_out, n in vgg_plan(in_channels, width, depth=5)
        ]
        self.multiple = 32
        self.to_pool3 = nn.Sequential(*stages[:3])
        self.to_pool4 = stages[3]
        self.to_pool5 = stages[4]

        # No BatchNorm in fc6/fc7 (as in VGG): at stride 32 a small image gives a 1x1 map, and
        # BatchNorm cannot take a variance over one value when training with batch size 1.
        self.fc = nn.Sequential(
            nn.Conv2d(8 * width, head_channels, head_kernel_size, padding=head_kernel_size // 2),
            nn.ReLU(inplace=True),
            make_dropout(dropout),
            nn.Conv2d(head_channels, head_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            make_dropout(dropout),
        )
        self.score_fr = nn.Conv2d(head_channels, num_classes, kernel_size=1)
        self.score_pool4 = nn.Conv2d(8 * width, num_classes, kernel_size=1)
        self.score_pool3 = nn.Conv2d(4 * width, num_classes, kernel_size=1)
        # pool2 and pool1 (2·width and width channels), finest last; only those fused.
        self.score_finer = nn.ModuleList(
            nn.Conv2d(c, num_classes, kernel_size=1) for c in (2 * width, width)[: skips - 2]
        )
        init_weights(self)
        # The paper zero-initialises the skip scores, so training starts from the coarse FCN-32s
        # prediction and the finer skips are added only as far as they help.
        for score in (self.score_pool4, self.score_pool3, *self.score_finer):
            nn.init.zeros_(score.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, self.multiple)
        pool1 = self.to_pool3[0](x)
        pool2 = self.to_pool3[1](pool1)
        pool3 = self.to_pool3[2](pool2)
        pool4 = self.to_pool4(pool3)
        score = self.score_fr(self.fc(self.to_pool5(pool4)))
        # Fixed bilinear upsampling rather than transposed convs initialised to bilinear: no
        # parameters, the size is taken from the skip so it always matches, and it exports as a
        # plain Resize. A learned deconvolution would start out as exactly this interpolation.
        score = resize_to(score, pool4) + self.score_pool4(pool4)
        score = resize_to(score, pool3) + self.score_pool3(pool3)
        for pool, score_pool in zip(
            (pool2, pool1)[: len(self.score_finer)], self.score_finer, strict=True
        ):
            score = resize_to(score, pool) + score_pool(pool)
        return crop(resize_to(score, x), size)
