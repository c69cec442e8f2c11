"""The paper's networks are the authors' networks.

Each network is restated here independently, in plain ``torch.nn``, from the description of the authors' code
(lijiaqi/HALRP: ``models/lenet.py``, ``models/alexnet.py``, ``models/resnet.py`` as ``agents/HALRP_Res.py`` builds
it, with BatchNorm running statistics).  The library's network, loaded with the restatement's weights, must give
the same outputs in train and eval mode (float64), with the same parameter names, shapes and count.  The
parameter counts and head widths are literal figures of the authors' networks (their classes, instantiated at
these sizes), so a mistake shared by both restatements still fails.  Provider: whatever serves the converted
model's task 0 (the dense layers; no perturbation is involved).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import halrp_fast as hf


class View(nn.Module):
    """The authors' ``View(n)``: ``x.view(-1, n)``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.reshape(-1, self.n)


class LeNetRestated(nn.Module):
    def __init__(self, classes: int, img: int) -> None:
        super().__init__()
        feat = 50 * (img // 4) ** 2
        self.features = nn.Sequential(
            nn.Conv2d(3, 20, 5, padding=2), nn.BatchNorm2d(20), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5, padding=2), nn.BatchNorm2d(50), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            View(feat),
            nn.Linear(feat, 800), nn.BatchNorm1d(800), nn.ReLU(inplace=True),
            nn.Linear(800, 500), nn.BatchNorm1d(500), nn.ReLU(inplace=True),
        )
        self.last = nn.Linear(500, classes)

    def forward(self, x):
        return self.last(self.features(x))


class AlexNetRestated(nn.Module):
    def __init__(self, classes: int, img: int) -> None:
        super().__init__()
        s = ((((img - 3) // 2) - 2) // 2 - 1) // 2  # conv 4, pool 2, conv 3, pool 2, conv 2, pool 2; no padding
        no_stats = dict(track_running_stats=False)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 4), nn.BatchNorm2d(64, **no_stats), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128, **no_stats), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 2), nn.BatchNorm2d(256, **no_stats), nn.ReLU(), nn.Dropout(0.5), nn.MaxPool2d(2),
            View(256 * s * s),
            nn.Linear(256 * s * s, 2048), nn.BatchNorm1d(2048, **no_stats), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(2048, 2048), nn.BatchNorm1d(2048, **no_stats), nn.ReLU(), nn.Dropout(0.5),
        )
        self.last = nn.Linear(2048, classes)

    def forward(self, x):
        return self.last(self.features(x))


class BlockRestated(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=True), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18Restated(nn.Module):
    def __init__(self, classes: int, img: int, nf: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, nf, 3, 1, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(nf)
        widths, cin = (nf, 2 * nf, 4 * nf, 8 * nf), nf
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BlockRestated(cin, w, stride), BlockRestated(w, w, 1)))
            cin = w
        ss = img // 16  # three stride-2 stages, then a 2×2 average pooling
        self.last = nn.Linear(8 * nf * ss * ss, classes, bias=True)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        h = F.avg_pool2d(h, 2)
        return self.last(h.view(h.size(0), -1))


# (network, image size) → (builder, restatement, parameter count at 10 classes, flattened features entering the
# first linear layer); the figures are those of the authors' classes
CASES = {
    ("lenet", 32): (hf.models.lenet, LeNetRestated, 2_995_620, 3_200),
    ("alexnet", 32): (hf.models.alexnet, AlexNetRestated, 6_533_450, 1_024),
    ("alexnet", 64): (hf.models.alexnet, AlexNetRestated, 23_310_666, 9_216),
    ("resnet18", 32): (hf.models.resnet18, ResNet18Restated, 2_807_690, 1_024),
    ("resnet18", 64): (hf.models.resnet18, ResNet18Restated, 2_838_410, 4_096),
}


def _pair(key, classes=10, seed=0):
    build, restated, _, _ = CASES[key]
    torch.manual_seed(seed)
    ours = build(3, key[1], classes).double()
    torch.manual_seed(seed)
    ref = restated(classes, key[1]).double()
    return ours, ref


def _outputs(model, x, train: bool, seed: int = 3):
    model.train(train)
    torch.manual_seed(seed)  # the same dropout masks for both networks (same layers, same order)
    return model(x)


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0]}-{k[1]}px")
def test_same_architecture_names_shapes_count(key):
    ours, ref = _pair(key)
    _, _, count, flat = CASES[key]
    assert {n: p.shape for n, p in ours.state_dict().items()} == {n: p.shape for n, p in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count
    assert next(m for m in ours.modules() if isinstance(m, nn.Linear)).in_features == flat
    for m in ours.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.bias is not None, m


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0]}-{k[1]}px")
def test_same_initialisation_under_the_same_seed(key):
    """The layers are built in the authors' order, so one seed gives one set of initial weights."""
    ours, ref = _pair(key, seed=11)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0]}-{k[1]}px")
def test_same_outputs_in_train_and_eval_mode(key):
    ours, ref = _pair(key)
    torch.manual_seed(5)
    ref.load_state_dict({n: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                         for n, v in ref.state_dict().items()})  # BatchNorm statistics and affine away from defaults
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, key[1], key[1], dtype=torch.float64)
    for train in (True, False):
        torch.testing.assert_close(_outputs(ours, x, train), _outputs(ref, x, train), rtol=0, atol=1e-10)
    # the train-mode pass moved the running statistics the same way (LeNet, ResNet-18; AlexNet keeps none)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_batchnorm_statistics_policy():
    lenet, alexnet, resnet = (CASES[k][0](3, 32, 10) for k in (("lenet", 32), ("alexnet", 32), ("resnet18", 32)))
    bns = lambda m: [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]  # noqa: E731
    assert all(b.track_running_stats for b in bns(lenet)) and len(bns(lenet)) == 4
    assert not any(b.track_running_stats for b in bns(alexnet)) and len(bns(alexnet)) == 5
    assert all(b.track_running_stats for b in bns(resnet)) and len(bns(resnet)) == 20
    dropouts = [m.p for m in alexnet.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.5, 0.5, 0.5]
    pools = [(m.kernel_size, m.stride, m.padding) for m in lenet.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools == [(2, 2, 0), (2, 2, 0)]


@pytest.mark.parametrize("key", [("lenet", 32), ("alexnet", 32), ("resnet18", 32)], ids=lambda k: k[0])
def test_converted_task0_is_the_plain_network(key):
    ours, _ = _pair(key)
    model = hf.convert(ours)
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        expected = _outputs(ours, x, train)
        model.train(train)
        torch.manual_seed(3)
        torch.testing.assert_close(model(x, 0), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("build,too_small", [(hf.models.lenet, 3), (hf.models.alexnet, 16),
                                             (hf.models.resnet18, 8)])
def test_too_small_images_are_one_clear_error(build, too_small):
    with pytest.raises(ValueError, match=f"img_size={too_small} is too small"):
        build(3, too_small, 10)
