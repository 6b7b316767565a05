"""A small convolutional image classifier, used as an offline judge of generated digits.

It plays the role Inception plays for ImageNet: `features` gives penultimate activations (for
classifier-feature FID) and `forward` gives logits (for class accuracy of conditional samples).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["DigitClassifier", "ClassifierConfig"]


@dataclass
class ClassifierConfig:
    """Shape of a DigitClassifier."""

    in_channels: int = 1
    """Input channels."""
    num_classes: int = 10
    """Output classes."""
    width: int = 32
    """Channels of the first stage; later stages double it."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitClassifier(nn.Module):
    """Three conv stages (two 2x poolings), global average pooling and a linear head; any input size."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        w = self.config.width
        self.body = nn.Sequential(
            _stage(self.config.in_channels, w),
            nn.MaxPool2d(2),
            _stage(w, 2 * w),
            nn.MaxPool2d(2),
            _stage(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(4 * w, self.config.num_classes)

    @property
    def feature_dim(self) -> int:
        return 4 * self.config.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, feature_dim) pooled features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (N, num_classes)
