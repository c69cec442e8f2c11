"""AlexNet of the paper's 5-Datasets and TinyImageNet experiments.

Layer for layer the authors' network: ``features`` = three blocks conv (64 4×4, 128 3×3, 256 2×2; no padding),
BatchNorm, ReLU, dropout (0.2, 0.2, 0.5), max-pool 2×2; flatten; two blocks linear 2048, BatchNorm, ReLU,
dropout 0.5; head ``last`` = linear 2048 → classes.  Every conv and linear layer has a bias; BatchNorm keeps no
running statistics, so eval mode normalises with the batch's own statistics, as in training.  The indices inside
``features`` are the authors', so a state dict of their AlexNet loads as it is.
"""
from __future__ import annotations

from torch import nn

from ._util import check_args, flat_features, record_spec


def _block(conv: nn.Conv2d, dropout: float) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(conv.out_channels, track_running_stats=False), nn.ReLU(), nn.Dropout(dropout),
            nn.MaxPool2d(2)]


class AlexNet(nn.Module):
    """``x (N, in_channels, img_size, img_size)`` → logits ``(N, num_classes)``; ``img_size ≥ 23``.

    Flattened features: ``256 · s²`` with ``s`` the side after the three blocks (2 at 32 px: 1,024; 6 at 64 px:
    9,216).
    """

    #: Outside its conv, linear and BatchNorm layers it only applies per-channel operations, so a converted copy
    #: may run mixed-task batches in the grouped layout (see ``halrp_fast.TaskModel``).
    halrp_grouped_mixed_batches = True

    def __init__(self, in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        check_args(in_channels=in_channels, img_size=img_size, num_classes=num_classes)
        convs = nn.Sequential(
            *_block(nn.Conv2d(in_channels, 64, 4), 0.2),
            *_block(nn.Conv2d(64, 128, 3), 0.2),
            *_block(nn.Conv2d(128, 256, 2), 0.5),
            nn.Flatten(),
        )
        n = flat_features(convs, convs, in_channels, img_size)
        self.features = nn.Sequential(
            *convs,
            nn.Linear(n, 2048), nn.BatchNorm1d(2048, track_running_stats=False), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(2048, 2048), nn.BatchNorm1d(2048, track_running_stats=False), nn.ReLU(), nn.Dropout(0.5),
        )
        self.last = nn.Linear(2048, num_classes)

    def forward(self, x):
        return self.last(self.features(x))


def alexnet(in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> AlexNet:
    return record_spec(AlexNet(in_channels, img_size, num_classes), "alexnet",
                       in_channels=in_channels, img_size=img_size, num_classes=num_classes)
