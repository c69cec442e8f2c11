"""The paper's networks, for any image size: LeNet, AlexNet and the reduced ResNet-18.

Each returns an ordinary ``nn.Module`` whose classifier is named ``last``; convert it with
``halrp_fast.convert(model, head="last")``.
"""
from .alexnet import alexnet
from .lenet import lenet
from .resnet import resnet18

__all__ = ["alexnet", "lenet", "resnet18"]
