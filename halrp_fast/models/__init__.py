"""The paper's networks, as the authors' code builds them: LeNet, AlexNet and the reduced ResNet-18.

Each returns an ordinary ``nn.Module`` whose classifier is named ``last``; convert it with
``halrp_fast.convert(model, head="last")``.  ``docs/FIDELITY.md`` lists every element against the authors'
implementation.
"""
from .alexnet import alexnet
from .lenet import lenet
from .resnet import resnet18

__all__ = ["alexnet", "lenet", "resnet18"]
