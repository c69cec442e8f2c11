"""LeNet of the paper's PMNIST / CIFAR-100 experiments: conv 20-50 (5×5), fc 800-500, BatchNorm."""
from __future__ import annotations

from torch import nn

from ._util import check_args, flat_features


class LeNet(nn.Module):
    """``x (N, in_channels, img_size, img_size)`` → logits ``(N, num_classes)``."""

    #: Outside its conv, linear and BatchNorm layers it only applies per-channel operations, so a converted copy
    #: may run mixed-task batches in the grouped layout (see ``halrp_fast.TaskModel``).
    halrp_grouped_mixed_batches = True

    def __init__(self, in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        check_args(in_channels, img_size, num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5, padding=2), nn.BatchNorm2d(20), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(20, 50, 5, padding=2), nn.BatchNorm2d(50), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
        )
        n = flat_features(self.features, in_channels, img_size)
        self.fc = nn.Sequential(
            nn.Linear(n, 800), nn.BatchNorm1d(800), nn.ReLU(),
            nn.Linear(800, 500), nn.BatchNorm1d(500), nn.ReLU(),
        )
        self.last = nn.Linear(500, num_classes)

    def forward(self, x):
        return self.last(self.fc(self.features(x)))


def lenet(in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> LeNet:
    model = LeNet(in_channels, img_size, num_classes)
    # lets checkpoints rebuild the architecture
    model._halrp_spec = {"name": "lenet",
                          "kwargs": dict(in_channels=in_channels, img_size=img_size, num_classes=num_classes)}
    return model
