"""Batch loaders that build each task's inputs on the fly from one shared uint8 image tensor."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class BatchLoader:
    """Iterates ``(transform(images[idx]), labels[idx])`` over mini-batches.

    ``images`` (any shape ``(N, ...)``) stay shared between tasks; the task-specific preprocessing
    (padding, channel expansion, pixel permutation, normalisation) runs per batch, so ten permuted copies of a
    dataset cost no memory.  Shuffling draws from torch's global RNG, which the learner seeds per task.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch_size: int,
                 shuffle: bool, transform: Callable[[torch.Tensor], torch.Tensor],
                 label_map: torch.Tensor | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.shuffle, self.transform, self.label_map = batch_size, shuffle, transform, label_map

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def dataset_size(self) -> int:
        return len(self.indices)

    def __iter__(self):
        order = self.indices[torch.randperm(len(self.indices))] if self.shuffle else self.indices
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            y = self.labels[idx]
            if self.label_map is not None:
                y = self.label_map[y]
            yield self.transform(self.images[idx]), y


def image_transform(img_size: int, channels: int, mean: float, std: float,
                    permutation: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(B, H, W)`` → float ``(B, channels, img_size, img_size)``: scale to [0, 1], standardise,
    zero-pad (or resize, when larger) to ``img_size``, permute the pixels of the padded image, repeat channels."""

    def apply(batch: torch.Tensor) -> torch.Tensor:
        x = (batch.float() / 255.0 - mean) / std
        x = x.unsqueeze(1)
        h, w = x.shape[-2:]
        if h <= img_size and w <= img_size:
            top, left = (img_size - h) // 2, (img_size - w) // 2
            x = F.pad(x, (left, img_size - w - left, top, img_size - h - top))
        else:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        if permutation is not None:
            x = x.flatten(2)[:, :, permutation].view(x.shape)
        return x.expand(-1, channels, -1, -1).contiguous()

    return apply


def color_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(B, C, H, W)`` → float, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255.0 - m) / s

    return apply
