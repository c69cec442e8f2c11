from __future__ import annotations

import torch
from torch import nn


def flat_features(features: nn.Module, in_channels: int, img_size: int) -> int:
    """Number of features ``features`` produces for one ``(in_channels, img_size, img_size)`` image."""
    with torch.no_grad():
        training = features.training
        features.eval()
        try:
            out = features(torch.zeros(1, in_channels, img_size, img_size))
        except RuntimeError as exc:
            raise ValueError(f"img_size={img_size} is too small for this network: {exc}") from None
        finally:
            features.train(training)
    return out.numel()


def check_args(in_channels: int, img_size: int, num_classes: int) -> None:
    for name, v in (("in_channels", in_channels), ("img_size", img_size), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
