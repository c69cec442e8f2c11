"""AlexNet of the paper's 5-Datasets / TinyImageNet experiments: conv 64-128-256, fc 2048-2048,
BatchNorm without running statistics, dropout."""
from __future__ import annotations

from torch import nn

from ._util import check_args, flat_features


def _bn2d(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=False)


class AlexNet(nn.Module):
    """``x (N, in_channels, img_size, img_size)`` → logits ``(N, num_classes)``."""

    #: Outside its conv, linear and BatchNorm layers it only applies per-channel operations, so a converted copy
    #: may run mixed-task batches in the grouped layout (see ``halrp_fast.TaskModel``).
    halrp_grouped_mixed_batches = True

    def __init__(self, in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        check_args(in_channels, img_size, num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 4, bias=False), _bn2d(64), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, bias=False), _bn2d(128), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 2, bias=False), _bn2d(256), nn.ReLU(), nn.Dropout(0.5), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        n = flat_features(self.features, in_channels, img_size)
        self.fc = nn.Sequential(
            nn.Linear(n, 2048, bias=False), nn.BatchNorm1d(2048, track_running_stats=False), nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048, track_running_stats=False), nn.ReLU(),
            nn.Dropout(0.5),
        )
        self.last = nn.Linear(2048, num_classes, bias=False)

    def forward(self, x):
        return self.last(self.fc(self.features(x)))


def alexnet(in_channels: int = 3, img_size: int = 32, num_classes: int = 10) -> AlexNet:
    model = AlexNet(in_channels, img_size, num_classes)
    # lets checkpoints rebuild the architecture
    model._halrp_spec = {"name": "alexnet",
                          "kwargs": dict(in_channels=in_channels, img_size=img_size, num_classes=num_classes)}
    return model
