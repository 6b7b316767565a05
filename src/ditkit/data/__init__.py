"""Datasets yielding (image in [-1, 1], label), and batch-level augmentation."""

from .datasets import (
    DataError,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    center_crop_resize,
    load_mnist,
    random_hflip,
)

__all__ = [
    "DataError",
    "ImageFolderDataset",
    "TensorImageDataset",
    "build_dataset",
    "center_crop_resize",
    "load_mnist",
    "random_hflip",
]
