"""Subclasses of nn.Linear / nn.Conv2d through ``convert``: converted only when their computation is known
(inherited forward, or registered), a registered "own forward" runs with each task's weight, anything else is refused
by name.  Task ``t``'s reference: the layer's own class, float64, holding ``diag(r) W diag(s) + U Vᵀ``
(``oracle.merged``) and the task's bias.

Provider: whatever ``auto`` picks on CPU (the modules' computation is what is checked here).
"""
import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close, task_weight
from torch import nn
from torch.nn.utils import parametrizations

import halrp_fast as hf
from halrp_fast.nn import TaskConv2d, TaskLinear, TaskReparametrized, register_layer_subclass
from halrp_fast.nn.subclasses import _REGISTRY


class FlippedConv(nn.Conv2d):
    """Computes something else than nn.Conv2d: the kernel flipped."""

    def forward(self, x):
        return F.conv2d(x, self.weight.flip(-1, -2), self.bias, self.stride, self.padding, self.dilation, self.groups)


class TaggedConv(nn.Conv2d):
    """A subclass that only adds an attribute: computes as nn.Conv2d."""

    tag = "mine"


class TaggedFlippedConv(FlippedConv):
    """Inherits FlippedConv's forward."""


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias)


def _net(conv_cls=nn.Conv2d, linear_cls=nn.Linear):
    return nn.Sequential(conv_cls(3, 6, 3, padding=1), nn.ReLU(), conv_cls(6, 6, 3, stride=2, groups=3),
                         nn.Flatten(), linear_cls(6 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 4))


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    saved = dict(_REGISTRY)
    yield _REGISTRY
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _perturb(model, t, scale=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.perturbed_layers().values():
            layer.set_rank(t, scale * torch.randn(layer.out_features, 3, generator=gen, dtype=layer.weight.dtype),
                           scale * torch.randn(layer.in_features, 3, generator=gen, dtype=layer.weight.dtype))
            layer.r[str(t)].add_(scale * torch.randn(layer.out_features, generator=gen, dtype=layer.weight.dtype))
            layer.s[str(t)].add_(scale * torch.randn(layer.in_features, generator=gen, dtype=layer.weight.dtype))
            if layer.bias is not None:
                layer.task_bias[str(t)].add_(scale)


def _reference(model, t: int) -> nn.Module:
    """Task ``t``'s exported model in float64 with every converted layer's weight and bias recomputed from the
    layer's tensors by the oracle — the layer's own class does the rest."""
    ref = model.export_task(t).double()
    sources = model.plain_sources()
    with torch.no_grad():
        for name, layer in model.perturbed_layers().items():
            weight_path, bias_path = sources[name]
            r, s, U, V, b = layer.task_tensors(t)
            ref.get_parameter(weight_path).copy_(task_weight(layer.weight, r, s, U, V, getattr(layer, "groups", 1)))
            if bias_path is not None:
                ref.get_parameter(bias_path).copy_(b.double())
    return ref


def test_subclasses_that_compute_as_their_base_convert_to_the_fused_layers():
    torch.manual_seed(0)
    original = _net(TaggedConv).eval()
    model = hf.convert(original)
    assert all(isinstance(model.model[i], TaskConv2d) for i in (0, 2))
    x = torch.randn(5, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))


def test_a_subclass_with_its_own_forward_is_refused_by_name_with_every_other():
    with pytest.raises(ValueError) as info:
        hf.convert(_net(TaggedFlippedConv, ScaledLinear))
    message = str(info.value)
    assert "cannot convert 3 module(s)" in message
    for name in ("'0'", "'2'", "'4'"):
        assert name in message
    assert "FlippedConv" in message and "ScaledLinear" in message and "register_layer_subclass" in message
    assert "exclude=['0', '2', '4']" in message
    # excluded, they stay shared (and exactly themselves)
    original = _net(TaggedFlippedConv, ScaledLinear).eval()
    model = hf.convert(original, exclude=["0", "2", "4"])
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_registered_own_forward_runs_with_each_tasks_weight(registry, dtype):
    """Task 0 is the original exactly; task t equals FlippedConv / ScaledLinear holding task t's merged weight;
    mixed rows equal single-task rows; export gives the subclass with the task's weight; gradients flow to r, s,
    U, V and the bias."""
    register_layer_subclass(FlippedConv, runs="own_forward")
    register_layer_subclass(ScaledLinear, runs="own_forward")
    torch.manual_seed(0)
    original = _net(TaggedFlippedConv, ScaledLinear).eval().to(dtype)
    x = torch.randn(6, 3, 7, 7, dtype=dtype)
    model = hf.convert(original, example_input=x[:1])
    for i in (0, 2, 4):
        assert isinstance(model.model[i], TaskReparametrized)
    assert isinstance(model.model[4].projections["layer"], TaskLinear)
    assert isinstance(model.model[2].projections["layer"], TaskConv2d)
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))
    t = model.add_task(4)
    _perturb(model, t)
    reference = _reference(model, t)
    with torch.no_grad():
        single = model(x, t)
        assert_close(single, reference(x.double()).to(dtype), dtype)
        ids = torch.tensor([t, 0, t, t, 0, t])
        mixed = model(x, ids)
        assert_close(mixed[ids == t], single[ids == t], dtype)
        assert_close(mixed[ids == 0], original(x)[ids == 0], dtype)
        exported = model.export_task(t)
        assert type(exported[2]) is TaggedFlippedConv and type(exported[4]) is ScaledLinear
        assert_close(exported(x), single, dtype)
    model.freeze_task(0)
    model(x, t).square().sum().backward()
    for layer in model.perturbed_layers().values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.task_tensors(t))


def test_parametrized_and_hooked_layers_are_refused():
    net = _net()
    parametrizations.weight_norm(net[0])
    net[4].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ValueError) as info:
        hf.convert(net)
    message = str(info.value)
    assert "'0': its ['weight'] are parametrized" in message
    assert "'4': it has forward hooks" in message


def test_register_layer_subclass_checks_its_arguments():
    with pytest.raises(TypeError, match="cls must be a subclass of nn.Linear or nn.Conv2d"):
        register_layer_subclass(nn.Conv1d, runs="own_forward")
    with pytest.raises(ValueError, match="runs must be"):
        register_layer_subclass(FlippedConv, runs="sometimes")


# ------------------------------------------------------------------------------------------------ timm's layers
def _timm_layers():
    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    del timm
    return {
        "StdConv2d": lambda: StdConv2d(4, 6, 3, stride=2, eps=1e-8),
        "StdConv2dSame": lambda: StdConv2dSame(4, 6, 3, stride=2, padding="same"),
        "ScaledStdConv2d": lambda: ScaledStdConv2d(4, 6, 3, padding=1),
        "ScaledStdConv2dSame": lambda: ScaledStdConv2dSame(4, 6, 3, stride=2),
        "Conv2dSame": lambda: Conv2dSame(4, 6, 3, stride=2, bias=True),
        "Conv2dSame_depthwise": lambda: Conv2dSame(4, 4, 5, stride=2, groups=4),
    }


@pytest.mark.parametrize("kind", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame",
                                  "Conv2dSame", "Conv2dSame_depthwise"])
@pytest.mark.parametrize("size", [7, 32])
def test_timm_conv_subclasses_keep_their_computation(kind, size):
    """Weight standardisation and TensorFlow "same" padding, on odd and even input sizes: task 0 is the original
    exactly, task t is the timm layer holding task t's merged weight (float64), its export the same."""
    build = _timm_layers()[kind]
    torch.manual_seed(0)
    conv = build()
    with torch.no_grad():
        conv.weight.normal_()
    original = nn.Sequential(conv, nn.Flatten(1), nn.LazyLinear(3)).eval()
    x = torch.randn(3, 4, size, size)
    original(x)  # materialise the lazy head
    model = hf.convert(original, example_input=x)
    assert isinstance(model.model[0], TaskReparametrized)
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))
        t = model.add_task(3)
        _perturb(model, t, 0.3)
        reference = _reference(model, t)
        got = model(x, t)
        assert_close(got, reference(x.double()).float(), torch.float32)
        assert not torch.allclose(got[:, :3], original(x))
        assert_close(model.export_task(t)(x), got, torch.float32)
