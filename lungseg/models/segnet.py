"""SegNet (Badrinarayanan, Kendall & Cipolla, 2017, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation").

Its defining feature: the decoder upsamples with max-unpooling, putting each value back where the
encoder's max-pool found its maximum (the saved indices), instead of learning an upsampling or
copying whole feature maps across as U-Net does. Boundaries stay sharp for the price of storing
one index per pooled value.
"""

import torch
from torch import nn

from .layers import (
    conv_bn_relu,
    conv_stack,
    crop,
    init_weights,
    make_dropout,
    pad_to_multiple,
    vgg_plan,
)


class SegNet(nn.Module):
    """SegNet. `forward`: (N, in_channels, H, W) → logits (N, num_classes, H, W), any H, W.

    The encoder is VGG-16-like (2, 2, 3, 3, 3 convs; width·(1, 2, 4, 8, 8) channels), each stage
    ending in a 2x2 max-pool that returns its indices; the decoder mirrors it, each stage starting
    with a max-unpool at those indices.

    Args:
        width: channels of the first stage.
        dropout: Dropout rate on the deepest `dropout_stages` encoder and decoder stages (0 leaves
            them out).
        depth: number of stages; the input is padded to a multiple of 2**depth.
        dropout_stages: how many of the deepest stages get dropout. Bayesian SegNet (Kendall et
            al., 2017) found dropout works best on the central (deepest) stages; 2 is its
            "central four" variant: two encoder and two decoder stages.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        dropout: float = 0.0,
        depth: int = 5,
        dropout_stages: int = 2,
    ):
        super().__init__()
        plan = vgg_plan(in_channels, width, depth)
        self.multiple = 2**depth

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i, (c_in, c_out, n) in enumerate(plan):
            encoder_stage = conv_stack(c_in, c_out, n)
            # The decoder stage mirrors the encoder stage: n convs, the last one going back to the
            # stage's input channels. Stage 0's last conv is the classifier instead.
            decoder_stage = nn.Sequential(*[conv_bn_relu(c_out, c_out) for _ in range(n - 1)])
            if i > 0:
                decoder_stage.append(conv_bn_relu(c_out, c_in))
            if i >= depth - dropout_stages:
                encoder_stage.append(make_dropout(dropout))
                decoder_stage.append(make_dropout(dropout))
            self.encoder.append(encoder_stage)
            self.decoder.insert(0, decoder_stage)  # the decoder runs deepest stage first
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        # 3x3, as in the original, where the classifier is the decoder's last conv.
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=3, padding=1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, self.multiple)
        indices: list[torch.Tensor] = []
        sizes: list[list[int]] = []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = self.pool(x)
            indices.append(idx)
        for stage in self.decoder:
            # output_size is redundant after padding, but makes the shape explicit, not inferred.
            x = stage(self.unpool(x, indices.pop(), output_size=sizes.pop()))
        return crop(self.classifier(x), size)
