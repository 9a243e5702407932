"""Segmentation networks, each a plain nn.Module:
(N, in_channels, H, W) → logits (N, num_classes, H, W)."""

from .deeplab import DeepLab
from .fcn import FCN
from .segnet import SegNet
from .unet import UNet

__all__ = ["DeepLab", "FCN", "SegNet", "UNet"]
