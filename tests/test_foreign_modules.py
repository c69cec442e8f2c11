"""Patterns of third-party model zoos, restated in a few lines each: in-place activations after task layers,
layers without bias in mixed batches with autograd on, BatchNorm subclasses with a built-in activation, conv
classifiers, and several unsupported layers reported at once."""
import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close
from torch import nn

import halrp_fast as hf


def _perturb(model: hf.TaskModel, t: int, k: int = 2) -> None:
    gen = torch.Generator().manual_seed(t)
    for layer in model.perturbed_layers().values():
        layer.set_rank(t, 0.3 * torch.randn(layer.out_features, k, generator=gen),
                       0.3 * torch.randn(layer.in_features, k, generator=gen))
        with torch.no_grad():
            layer.r[str(t)].add_(0.1 * torch.randn(layer.out_features, generator=gen))


@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["rows", "sequence"])
def test_inplace_activation_after_a_task_linear(provider, lead):
    """torchvision's classifiers put ReLU(inplace=True) right after a Linear: a task ≥ 1 trains through it."""
    provider.require("perturbed_linear")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(inplace=True), nn.Linear(5, 3))
    model = hf.convert(net, head="2")
    t = model.add_task(3)
    _perturb(model, t)
    x = torch.randn(*lead, 6)
    out_place = model(x, t)
    out_place.sum().backward()
    grads = [p.grad.clone() for p in model.task_parameters(t)]
    model.zero_grad()
    plain = hf.convert(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)), head="2")
    plain.load_state_dict(model.state_dict())
    expected = plain(x, t)
    expected.sum().backward()
    assert_close(out_place, expected, torch.float32)
    for g, p in zip(grads, plain.task_parameters(t), strict=True):
        assert_close(g, p.grad, torch.float32)


def test_inplace_activation_after_a_task_conv_and_in_mixed_batches(provider):
    provider.require("perturbed_conv2d")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 3))
    model = hf.convert(net, head="3")
    t = model.add_task(3)
    _perturb(model, t)
    for ids in (t, torch.tensor([t, 0, t])):
        model(torch.randn(3, 3, 6, 6), ids).sum().backward()
        assert all(p.grad is not None for p in model.task_parameters(t))
        model.zero_grad()


def test_mixed_batch_with_autograd_on_after_a_task_is_frozen():
    """Layers without bias (every torchvision CNN) in a mixed batch while autograd records: no crash, and each row
    equals its task's single-task output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 5, bias=False), nn.ReLU(), nn.Linear(5, 3))
    model = hf.convert(net, head="6")
    model.freeze_task(0)  # as after learning the base
    for _ in range(2):
        t = model.add_task(3)
        _perturb(model, t)
        model.freeze_task(t)
    model.eval()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0])
    y = model(x, ids)
    y.sum().backward()  # the input still gets its gradient through frozen tasks
    assert x.grad is not None
    for i, task in enumerate(ids.tolist()):
        assert_close(y[i], model(x[i:i + 1], task)[0], torch.float32)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward also applies an activation."""

    def forward(self, x):
        return F.relu6(super().forward(x) * 3.0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_subclass_keeps_its_own_forward_in_mixed_batches(training):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Flatten(), nn.Linear(64, 3))
    model = hf.convert(net, head="3")
    t = model.add_task(3)
    _perturb(model, t)
    with torch.no_grad():
        bn = model.model[1].bns[t]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.train(training)
    x = torch.randn(6, 3, 6, 6)
    ids = torch.tensor([t, 0, t, 0, t, 0])
    with torch.no_grad():
        mixed = model(x, ids)
        for task in (0, t):
            rows = (ids == task).nonzero().flatten()
            assert_close(mixed[rows], model(x[rows], task), torch.float32)


def test_conv_classifier_pads_missing_classes_along_the_channels():
    """A 1×1 conv classifier (squeezenet): a mixed batch of tasks with different class counts is padded with
    -inf along the class channels, not along a spatial dimension."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
            self.classifier = nn.Sequential(nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            return torch.flatten(self.classifier(self.features(x)), 1)

    model = hf.convert(Net(), head="classifier",
                       head_factory=lambda c: nn.Sequential(nn.Conv2d(8, c, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
    assert model.num_classes == [5]
    t = model.add_task(3)
    model.eval()
    x = torch.randn(4, 3, 7, 7)
    with torch.no_grad():
        y = model(x, torch.tensor([0, t, t, 0]))
        assert y.shape == (4, 5)
        assert torch.isinf(y[1, 3:]).all() and torch.isinf(y[2, 3:]).all()
        assert_close(y[1, :3], model(x[1:2], t)[0], torch.float32)
        assert_close(y[0], model(x[0:1], 0)[0], torch.float32)


def test_every_unconvertible_layer_is_named_in_one_error():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2),
                        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError) as info:
        hf.convert(net)
    message = str(info.value)
    assert "3 module(s)" in message
    for name in ("'0'", "'2'", "'3'"):
        assert name in message
    assert "exclude=['0', '2', '3']" in message
    hf.convert(net, exclude=["0", "2", "3"])  # and the exclusion the message suggests works


class ReadsWeights(nn.Module):
    """torchvision swin_t's pattern: attention passes its projections' weights to a function instead of calling
    them, so a converted projection's forward never runs."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.qkv.weight, self.qkv.bias)), self.proj.weight, self.proj.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.attn = ReadsWeights()
        self.aux = nn.Linear(6, 2)  # an auxiliary classifier that the forward never calls
        self.last = nn.Linear(6, 3)

    def forward(self, x):
        return self.last(self.attn(self.embed(x)))


def test_convert_with_an_example_names_layers_that_would_not_be_task_aware():
    with pytest.raises(ValueError) as info:
        hf.convert(Net(), example_input=torch.randn(2, 4))
    message = str(info.value)
    assert "3 converted layer(s)" in message
    assert "never ran in the forward: ['attn.qkv', 'attn.proj', 'aux']" in message
    assert "read directly" in message and "'attn.qkv'" in message and "'attn.proj'" in message
    model = hf.convert(Net(), exclude=["attn", "aux"], example_input=torch.randn(2, 4))
    assert sorted(model.perturbed_layers()) == ["embed"]


def test_a_weight_read_behind_the_layer_is_an_error_for_later_tasks():
    """Without an example input the first forward of a later task stops, naming the layer; the base still runs
    (its weights are the base's), and a frozen export is untouched."""
    model = hf.convert(Net(), exclude=["aux"])
    x = torch.randn(2, 4)
    base = model(x, 0)
    t = model.add_task(3)
    with pytest.raises(RuntimeError, match="layer 'attn.qkv': its weight was read outside its forward"):
        model(x, t)
    with pytest.raises(RuntimeError, match="attn.qkv"):
        model(x, torch.tensor([0, t]))
    assert_close(model(x, 0), base, torch.float32)
    assert model.perturbed_layers()["attn.qkv"].weight.shape == (6, 6)  # reading outside a forward is fine
