"""lungseg: 2D medical image segmentation with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
