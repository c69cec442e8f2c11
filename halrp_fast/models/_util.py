from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def flat_features(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, in_channels: int,
                  img_size: int) -> int:
    """Features per sample that ``forward`` (the layers of ``module`` before the classifier) produces for one
    ``(in_channels, img_size, img_size)`` image, run in eval mode (``module``'s mode is restored)."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = forward(torch.zeros(2, in_channels, img_size, img_size))  # 2: BatchNorm without running statistics
    except RuntimeError as exc:
        raise ValueError(f"img_size={img_size} is too small for this network: {exc}") from None
    finally:
        module.train(training)
    return out[0].numel()


def check_args(**values: int) -> None:
    """Each value must be a positive int; the error names the argument."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def record_spec(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """Record how :mod:`halrp_fast.models` rebuilds ``model`` (checkpoints then need no user code)."""
    model._halrp_spec = {"name": name, "kwargs": kwargs}
    return model
