"""Datasets yielding (image in [-1, 1], label), the latent cache, and loader batch -> model input."""

from .datasets import (
    DataError,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    center_crop_resize,
    image_to_tensor,
    load_mnist,
    random_hflip,
)
from .tar import TarShardDataset

__all__ = [
    "DataError",
    "ImageFolderDataset",
    "TarShardDataset",
    "TensorImageDataset",
    "build_dataset",
    "center_crop_resize",
    "image_to_tensor",
    "load_mnist",
    "random_hflip",
]
