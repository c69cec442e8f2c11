"""convert() on the paper's networks and other models; TaskModel behaviour end to end."""
import pytest
import torch
from task_modules import AttentionClassifier
from torch import nn

import halrp_fast as hf
from halrp_fast.models.alexnet import AlexNet
from halrp_fast.nn import PerturbedLayer, TaskBatchNorm, TaskConv2d, TaskHeads, TaskLinear
from halrp_fast.nn._context import TaskModule

MODELS = {
    "lenet": lambda: hf.models.lenet(3, 32, 10),
    "alexnet": lambda: hf.models.alexnet(3, 32, 10),
    "resnet18": lambda: hf.models.resnet18(3, 32, 10),
}


def perturb(model: hf.TaskModel, t: int, k: int = 3, scale: float = 0.05) -> None:
    for name, layer in model.perturbed_layers().items():
        model.set_rank(t, name, scale * torch.randn(layer.out_features, k), scale * torch.randn(layer.in_features, k))
        with torch.no_grad():
            layer.r[str(t)].add_(0.1 * torch.randn(layer.out_features))


@pytest.fixture(params=list(MODELS))
def base(request):
    return MODELS[request.param]()


def test_task0_reproduces_the_original(base):
    model = hf.convert(base)
    x = torch.randn(4, 3, 32, 32)
    base.eval()
    model.eval()
    torch.testing.assert_close(model(x, 0), base(x))
    kinds = {type(m) for m in model.model.modules()}
    assert {TaskConv2d, TaskBatchNorm, TaskHeads} <= kinds  # ResNet-18 has no hidden linear layer
    wrapped = {id(c) for m in model.model.modules() if isinstance(m, (TaskBatchNorm, TaskHeads)) for c in m.modules()}
    leftovers = [m for m in model.model.modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)) and id(m) not in wrapped]
    assert not leftovers


def test_a_new_task_trains_every_parameter_after_the_base_is_frozen(base):
    """After task 0 is frozen, a new task's r, s, U, V, biases, BatchNorm affine parameters and head all get
    gradients (a copy of the frozen base's BatchNorm once stayed frozen); the base gets none."""
    model = hf.convert(base)
    model.freeze_task(0)
    t = model.add_task(4)
    perturb(model, t)
    model.train()
    model(torch.randn(4, 3, 32, 32), t).square().sum().backward()
    params = model.named_task_parameters(t)
    assert any(".bns." in n for n in params)
    no_grad = [n for n, p in params.items() if not p.requires_grad or p.grad is None]
    assert not no_grad
    assert all(p.grad is None for p in model.task_parameters(0))


def test_convert_does_not_touch_the_input(base):
    hf.convert(base)
    assert any(type(m) is nn.Conv2d for m in base.modules())


def test_mixed_batch_equals_single_task_batches(base):
    model = hf.convert(base)
    t1, t2 = model.add_task(5), model.add_task(10)
    perturb(model, t1)
    perturb(model, t2)
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    ids = torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        y = model(x, ids)
        for t in (0, 1, 2):
            rows = (ids == t).nonzero().flatten()
            if isinstance(base, AlexNet):
                ref = model(x[rows], t)  # batch statistics: compare per task group
            else:
                ref = torch.cat([model(x[i:i + 1], t) for i in rows.tolist()])
            c = model.num_classes[t]
            torch.testing.assert_close(y[rows, :c], ref, rtol=1e-4, atol=1e-4)
            assert torch.isinf(y[rows, c:]).all()


def test_training_touches_only_the_task(base):
    model = hf.convert(base)
    t = model.add_task(4)
    perturb(model, t)
    model.freeze_task(0)
    params = model.task_parameters(t)
    names = set(model.named_task_parameters(t))
    assert all(".U." in n or ".V." in n or ".r." in n or ".s." in n or "task_bias" in n or "bns.1." in n
               or "heads.1." in n for n in names), names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32), t), torch.randint(0, 4, (8,)))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)


def test_task0_parameters_cover_the_base_including_unconverted_layers():
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))  # PReLU: not converted
    model = hf.convert(base)
    names = set(model.named_task_parameters(0))
    expected = ("0.weight", "0.bias", "1.weight", "3.heads.0.weight", "3.heads.0.bias")
    assert {f"model.{n}" for n in expected} == names


def test_state_dict_round_trip(base):
    model = hf.convert(base)
    for n in (3, 7):
        perturb(model, model.add_task(n))
    model.set_rank(1, next(iter(model.perturbed_layers())), torch.randn(model.perturbed_layers()[
        next(iter(model.perturbed_layers()))].out_features, 9), torch.randn(
        model.perturbed_layers()[next(iter(model.perturbed_layers()))].in_features, 9))
    fresh = hf.convert(MODELS_BY_TYPE[type(base)]())
    fresh.load_state_dict(model.state_dict())
    assert fresh.num_classes == model.num_classes and fresh.ranks(1) == model.ranks(1)
    model.eval()
    fresh.eval()
    x = torch.randn(6, 3, 32, 32)
    ids = torch.tensor([2, 1, 0, 2, 1, 0])  # two per task: AlexNet's BatchNorm uses batch statistics
    with torch.no_grad():
        a, b = model(x, ids), fresh(x, ids)
    torch.testing.assert_close(a, b)


MODELS_BY_TYPE = {type(f()): f for f in MODELS.values()}


def test_export_task_is_plain_and_equal(base):
    model = hf.convert(base)
    t = model.add_task(6)
    perturb(model, t)
    model.eval()
    plain = model.export_task(t)
    plain.eval()
    assert not any(type(m).__module__.startswith("halrp_fast.nn") for m in plain.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x, t), rtol=1e-4, atol=1e-5)


def test_channels_last_input():
    model = hf.convert(hf.models.resnet18(3, 16, 4))
    perturb(model, model.add_task(4))
    model.train()
    x = torch.randn(2, 3, 16, 16)
    y = model(x.to(memory_format=torch.channels_last), 1)
    torch.testing.assert_close(y, model(x, 1), rtol=1e-4, atol=1e-5)


def test_torch_compile_converted_model():
    model = hf.convert(hf.models.lenet(3, 16, 5))
    perturb(model, model.add_task(5))
    model.train()
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(model, backend="aot_eager")
    y = compiled(x, 1)
    torch.testing.assert_close(y, model(x, 1), rtol=1e-4, atol=1e-5)
    y.sum().backward()


def test_head_by_name_and_nested_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleDict({"lin": nn.Linear(4, 4)})
            self.norm = nn.BatchNorm1d(4)

        def forward(self, x):
            return torch.relu(self.norm(self.inner["lin"](x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.classifier = nn.Linear(4, 3)
            self.aux = nn.Linear(4, 4)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.classifier(self.aux(x))

    model = hf.convert(Net(), head="classifier")
    assert isinstance(model.model.classifier, TaskHeads)
    assert isinstance(model.model.blocks[1].inner["lin"], TaskLinear)
    assert isinstance(model.model.aux, TaskLinear)
    model.add_task(2)
    assert model(torch.randn(5, 4), 1).shape == (5, 2)


@pytest.mark.parametrize("name", list(MODELS))
def test_task_modules_walk_equals_named_modules(name):
    """task_modules() skips the per-task containers (its cost does not grow with the tasks) but finds what
    named_modules() finds, in the same order, a shared module under its first name only."""
    net = MODELS[name]()
    net.alias = next(iter(net.children()))  # one submodule under two names
    model = hf.convert(net)
    for _ in range(3):
        model.add_task(4)
    expected = {n: m for n, m in model.model.named_modules() if isinstance(m, TaskModule)}
    assert len(expected) > 3
    assert list(model.task_modules().items()) == list(expected.items())
    layers = {n: m for n, m in expected.items() if isinstance(m, PerturbedLayer)}
    assert list(model.perturbed_layers().items()) == list(layers.items())


def test_exclude_and_grouped_conv():
    with pytest.raises(ValueError, match="lazy"):
        hf.convert(nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 3)))
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Linear(128, 3))
    model = hf.convert(net)
    assert isinstance(model.model[0], TaskConv2d) and model.model[0].groups == 4
    model = hf.convert(net, exclude=["0"])
    assert type(model.model[0]) is nn.Conv2d and isinstance(model.model[1], TaskConv2d)


def test_multihead_attention_projections_are_perturbed():
    net = AttentionClassifier()
    x = torch.randn(2, 5, 8)
    model = hf.convert(net, example_input=x)
    assert sorted(model.perturbed_layers()) == ["mha.projections.in_proj", "mha.projections.out_proj"]
    assert torch.equal(model(x, 0), net(x))
    t = model.add_task(4)
    perturb(model, t)
    assert model(x, torch.tensor([0, 1])).shape == (2, 4)
    assert not torch.allclose(model(x, t)[:, :3], model.heads.heads[t](net.mha(x, x, x)[0].mean(1))[:, :3])


def test_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    base = tv.models.resnet18(num_classes=10)
    model = hf.convert(base, head="fc")
    perturb(model, model.add_task(7))
    model.eval()
    base.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0), base(x))
        assert model(x, torch.tensor([1, 0])).shape == (2, 10)
