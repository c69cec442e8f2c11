"""Reduced ResNet-18 of the paper's 5-Datasets and TinyImageNet experiments.

The authors' network as their HALRP agent builds it: ``nf`` = 32 base filters, blocks [2, 2, 2, 2] with strides
1, 2, 2, 2; a 3×3 stem of stride 1 at every image size; every conv (stem, blocks and 1×1 shortcuts) has a bias;
BatchNorm keeps running statistics (eval mode uses them); after the last block a 2×2 average pooling of stride 2,
then flatten, and the head ``last`` = linear ``8·nf·(img_size/16)²`` → classes with a bias.  Module names follow
the usual ResNet layout (``conv1``, ``bn1``, ``layer1 … layer4``, ``last``), not the authors' flattened copy.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._util import check_args, flat_features, record_spec


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm; a 1×1 conv + BatchNorm shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """``x (N, in_channels, img_size, img_size)`` → logits ``(N, num_classes)``; ``img_size ≥ 16``.

    Flattened features: ``8·nf · s²`` with ``s = ⌊⌈img_size/8⌉ / 2⌋`` (2 at 32 px: 1,024; 4 at 64 px: 4,096).
    """

    #: Outside its conv, linear and BatchNorm layers it only applies per-channel operations, so a converted copy
    #: may run mixed-task batches in the grouped layout (see ``halrp_fast.TaskModel``).
    halrp_grouped_mixed_batches = True

    def __init__(self, in_channels: int = 3, img_size: int = 32, num_classes: int = 10, nf: int = 32) -> None:
        super().__init__()
        check_args(in_channels=in_channels, img_size=img_size, num_classes=num_classes, nf=nf)
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, in_planes = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = nf * 2**i
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        n = flat_features(self.trunk, self, in_channels, img_size)
        self.last = nn.Linear(n, num_classes)

    def trunk(self, x):
        """Everything before the head: ``(N, C, H, W)`` → flattened features ``(N, 8·nf·s²)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, 2).flatten(1)

    def forward(self, x):
        return self.last(self.trunk(x))


def resnet18(in_channels: int = 3, img_size: int = 32, num_classes: int = 10, nf: int = 32) -> ResNet18:
    return record_spec(ResNet18(in_channels, img_size, num_classes, nf), "resnet18",
                       in_channels=in_channels, img_size=img_size, num_classes=num_classes, nf=nf)
