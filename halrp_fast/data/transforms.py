"""Batch loaders that build each task's inputs on the fly from one shared uint8 image tensor."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
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
                 label_map: torch.Tensor | None = None, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if drop_last and len(indices) < batch_size:
            raise ValueError(f"{len(indices)} samples make no full batch of batch_size={batch_size} (the last partial "
                             f"batch is dropped): use a smaller batch size or more samples")
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.shuffle, self.transform, self.label_map = batch_size, shuffle, transform, label_map
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.indices) // self.batch_size
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def dataset_size(self) -> int:
        return len(self.indices)

    def __iter__(self):
        order = self.indices[torch.randperm(len(self.indices))] if self.shuffle else self.indices
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            y = self.labels[idx]
            if self.label_map is not None:
                y = self.label_map[y]
            yield self.transform(self.images[idx]), y


def image_transform(img_size: int, channels: int, mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(B, H, W)`` → float ``(B, channels, img_size, img_size)``: zero-pad (or resize, when larger) to
    ``img_size``, scale to [0, 1], standardise (``mean``/``std`` of the padded images, as torchvision's ``Pad``
    then ``Normalize``), repeat the channel."""

    def apply(batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().unsqueeze(1) / 255.0
        h, w = x.shape[-2:]
        if h <= img_size and w <= img_size:
            top, left = (img_size - h) // 2, (img_size - w) // 2
            x = F.pad(x, (left, img_size - w - left, top, img_size - h - top))
        else:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        return ((x - mean) / std).expand(-1, channels, -1, -1).contiguous()

    return apply


def permuted_transform(channels: int, mean: float, std: float,
                       permutation: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(B, S, S)`` → float ``(B, channels, S, S)``: scale to [0, 1], standardise, repeat the channel, then
    permute all ``channels·S²`` values of each image (so the channels differ), as the authors' PMNIST."""

    def apply(batch: torch.Tensor) -> torch.Tensor:
        x = ((batch.float() / 255.0 - mean) / std).unsqueeze(1).expand(-1, channels, -1, -1)
        return x.reshape(len(x), -1)[:, permutation].view(len(x), channels, *batch.shape[1:])

    return apply


def random_crop_flip(transform: Callable[[torch.Tensor], torch.Tensor],
                     pad: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training augmentation before ``transform``: each uint8 image ``(B, C, H, W)`` is zero-padded by ``pad``,
    cropped back to ``H×W`` at a random offset and flipped left-right with probability ½ (torchvision's
    ``RandomCrop(H, padding=pad)`` then ``RandomHorizontalFlip()``), drawing from torch's global RNG."""

    def apply(batch: torch.Tensor) -> torch.Tensor:
        b, _, h, w = batch.shape
        padded = F.pad(batch, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (b,)).tolist()
        left = torch.randint(0, 2 * pad + 1, (b,)).tolist()
        flip = (torch.rand(b) < 0.5).tolist()
        out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(top, left, strict=True))])
        if any(flip):
            out[flip] = out[flip].flip(-1)
        return transform(out)

    return apply


def resize_grey(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W)`` → uint8 ``(N, size, size)`` by PIL's bilinear resize (what torchvision's ``Resize`` does
    to a PIL image, rounding included)."""
    from PIL import Image

    if images.shape[-2:] == (size, size):
        return images
    arrays = [np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in images.numpy()]
    return torch.from_numpy(np.stack(arrays)) if arrays else images.new_zeros((0, size, size))


def color_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(B, C, H, W)`` → float, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255.0 - m) / s

    return apply
