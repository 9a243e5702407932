"""Building blocks shared by the architectures in lungseg.models.

Everything here works on (N, C, H, W) tensors and is plain torch.nn, so the networks stay
TorchScript/ONNX friendly.
"""

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Conv → BatchNorm. "Same" padding, so with stride 1 the spatial size is kept."""
    # No conv bias: the BatchNorm that follows subtracts the per-channel mean and would cancel it.
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=dilation * (kernel_size - 1) // 2,
        dilation=dilation,
        bias=False,
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Conv → BatchNorm → ReLU, the unit every architecture here is built from."""
    return nn.Sequential(
        *conv_bn(in_channels, out_channels, kernel_size, stride, dilation), nn.ReLU(inplace=True)
    )


def conv_stack(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """`num_convs` 3x3 conv_bn_relu layers; the first one maps in_channels → out_channels."""
    return nn.Sequential(
        *[
            conv_bn_relu(in_channels if i == 0 else out_channels, out_channels)
            for i in range(num_convs)
        ]
    )


def make_dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p == 0 so a disabled dropout leaves no layer behind.

    Element-wise nn.Dropout, not channel-wise nn.Dropout2d, everywhere: it is what the
    reference implementations we reproduce used (Keras U-Net tutorial, FCN's fc6/fc7,
    DeepLab's ASPP projection), so their dropout rates carry over unchanged.
    """
    return nn.Dropout(p) if p > 0 else nn.Identity()


def vgg_plan(in_channels: int, width: int, depth: int = 5) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, num_convs) for each stage of a VGG-16-style encoder.

    VGG-16 has 2, 2, 3, 3, 3 convs with 64, 128, 256, 512, 512 channels; here 64 → `width`.
    Channels stop doubling at 8·width, as in VGG, because the deepest stages run on tiny maps
    where more channels cost many parameters and add little.
    """
    plan = []
    for i in range(depth):
        out_channels = width * 2 ** min(i, 3)
        plan.append((in_channels, out_channels, 2 if i < 2 else 3))
        in_channels = out_channels
    return plan


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom and right so H and W are multiples of `multiple`.

    Returns the padded tensor and the original (H, W) for `crop`. Padding only at the bottom
    and right keeps every original pixel at its coordinates, so cropping back is a slice.
    """
    h, w = x.shape[-2], x.shape[-1]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    # Replicate the edge rather than reflect or zero-pad: reflect needs the padding to be smaller
    # than the image (a 20-pixel image padded to 32 fails), and after intensity normalisation zero
    # is an ordinary tissue value, so a zero strip would add a fake edge for the convs to react to.
    return F.pad(x, [0, pad_w, 0, pad_h], mode="replicate"), (h, w)


def crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo `pad_to_multiple`: keep the top-left (H, W) of a (N, C, H', W') tensor."""
    return x[..., : size[0], : size[1]]


def resize_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize `x` to the spatial size of `reference`.

    The size comes from a tensor's shape rather than a scale factor, so the result always matches
    exactly, also when traced for export.
    """
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (zero bias), BatchNorm/GroupNorm with weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            # fan_out as in torchvision's ResNet: keeps the gradient scale steady going backwards,
            # which is what matters when training from scratch with BatchNorm after each conv.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
