"""Reduced ResNet-18 of the paper (``nf`` = 32 base filters, blocks [2, 2, 2, 2])."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._util import check_args


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """``x (N, in_channels, H, W)`` → logits ``(N, num_classes)``; global average pooling makes it
    work for any image size ≥ 8 (stem stride 1 for images up to 32 pixels, 2 above)."""

    #: Outside its conv, linear and BatchNorm layers it only applies per-channel operations, so a converted copy
    #: may run mixed-task batches in the grouped layout (see ``halrp_fast.TaskModel``).
    halrp_grouped_mixed_batches = True

    def __init__(self, in_channels: int = 3, img_size: int = 32, num_classes: int = 10, nf: int = 32) -> None:
        super().__init__()
        check_args(in_channels, img_size, num_classes)
        stem_stride = 1 if img_size <= 32 else 2
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, in_planes = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = nf * 2**i
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.last = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.last(out)


def resnet18(in_channels: int = 3, img_size: int = 32, num_classes: int = 10, nf: int = 32) -> ResNet18:
    model = ResNet18(in_channels, img_size, num_classes, nf)
    # lets checkpoints rebuild the architecture
    model._halrp_spec = {"name": "resnet18",
                          "kwargs": dict(in_channels=in_channels, img_size=img_size, num_classes=num_classes, nf=nf)}
    return model
