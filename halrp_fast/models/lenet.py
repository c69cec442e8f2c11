"""LeNet of the paper's PMNIST and CIFAR-100 experiments.

Layer for layer the authors' network: ``features`` = conv 5×5 (20, padding 2), BatchNorm, ReLU, max-pool 2×2 /
2, conv 5×5 (50, padding 2), BatchNorm, ReLU, max-pool 2×2 / 2, flatten, linear 800, BatchNorm, ReLU, linear 500,
BatchNorm, ReLU; head ``last`` = linear 500 → classes.  Every conv and linear layer has a bias, every BatchNorm
keeps running statistics (eval mode uses them).  The indices inside ``features`` are the authors', so a state
dict of their LeNet loads as it is.
"""
from __future__ import annotations

from torch import nn

from ._util import check_args, flat_features, record_spec


class LeNet(nn.Module):
    """``x (N, in_channels, img_size, img_size)`` → logits ``(N, num_classes)``; ``img_size ≥ 4``.

    Flattened features: ``50 · (img_size // 4)²`` (3,200 at 32 px).
    """

    #: Outside its conv, linear and BatchNorm layers it only applies per-channel operations, so a converted copy
    #: may run mixed-task batches in the grouped layout (see ``halrp_fast.TaskModel``).
    halrp_grouped_mixed_batches = True

    def __init__(self, in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        check_args(in_channels=in_channels, img_size=img_size, num_classes=num_classes)
        convs = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5, padding=2), nn.BatchNorm2d(20), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5, padding=2), nn.BatchNorm2d(50), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Flatten(),
        )
        n = flat_features(convs, convs, in_channels, img_size)
        self.features = nn.Sequential(
            *convs,
            nn.Linear(n, 800), nn.BatchNorm1d(800), nn.ReLU(),
            nn.Linear(800, 500), nn.BatchNorm1d(500), nn.ReLU(),
        )
        self.last = nn.Linear(500, num_classes)

    def forward(self, x):
        return self.last(self.features(x))


def lenet(in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> LeNet:
    return record_spec(LeNet(in_channels, img_size, num_classes), "lenet",
                       in_channels=in_channels, img_size=img_size, num_classes=num_classes)
