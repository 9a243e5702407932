"""U-Net (Ronneberger et al., 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation"), with BatchNorm after every conv and "same" padding so the output has the input's
size.

With width=64, depth=4 it is the original 64→128→256→512→1024 network (about 31 M parameters),
as in the Keras tutorial this project reproduces, including its Dropout on the two deepest
blocks.
"""

import torch
from torch import nn

from .layers import conv_stack, crop, init_weights, make_dropout, pad_to_multiple


class UpBlock(nn.Module):
    """Upsample ×2, concatenate with the encoder's skip, two 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool):
        super().__init__()
        if bilinear:
            # Fixed interpolation plus a 1x1 conv to halve the channels: fewer parameters than a
            # transposed conv and no checkerboard artefacts from its overlapping kernels.
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        else:
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.convs = conv_stack(2 * out_channels, out_channels, num_convs=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # The input is padded to a multiple of 2**depth, so ×2 always lands on the skip's size.
        return self.convs(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net. `forward`: (N, in_channels, H, W) → logits (N, num_classes, H, W), any H, W.

    Args:
        width: channels of the first stage; stage i has width·2**i, the bottleneck width·2**depth.
        dropout: rate of the Dropout after the deepest encoder block and after the bottleneck
            (0 leaves them out).
        depth: number of 2x2 max-pools; the input is padded to a multiple of 2**depth.
        bilinear: upsample with bilinear interpolation + 1x1 conv instead of a 2x2 transposed conv.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        dropout: float = 0.0,
        depth: int = 4,
        bilinear: bool = False,
    ):
        super().__init__()
        channels = [width * 2**i for i in range(depth + 1)]
        self.multiple = 2**depth

        self.encoder = nn.ModuleList()
        for i in range(depth):
            stage = conv_stack(in_channels if i == 0 else channels[i - 1], channels[i], 2)
            if i == depth - 1:
                # The Keras tutorial drops out here; the dropped map is both pooled and used as the
                # skip, so the decoder cannot bypass the regularisation through the skip.
                stage.append(make_dropout(dropout))
            self.encoder.append(stage)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = conv_stack(channels[-2], channels[-1], 2)
        self.bottleneck.append(make_dropout(dropout))

        self.decoder = nn.ModuleList(
            UpBlock(channels[i + 1], channels[i], bilinear) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(width, num_classes, kernel_size=1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, self.multiple)
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block in self.decoder:
            x = block(x, skips.pop())
        return crop(self.head(x), size)
