"""Real torchvision models (random initialisation, tiny inputs) through convert(): what converts today is checked
end to end (task 0 is the original exactly, mixed batches equal single-task rows, export_task, state-dict round
trip, every task parameter gets a gradient); what does not is refused by name, never silently wrong."""
import warnings

import pytest
import torch
from oracle import assert_close

import halrp_fast as hf

tv = pytest.importorskip("torchvision")


def _vit():
    return tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                       mlp_dim=32, num_classes=10)


# name → (builder, head, input size); classifiers that are not a bare Linear name their head module
CONVERTIBLE = {
    "resnet18": (lambda: tv.models.resnet18(num_classes=10), "fc", 32),
    "densenet121": (lambda: tv.models.densenet121(num_classes=10), "classifier", 32),
    "squeezenet1_0": (lambda: tv.models.squeezenet1_0(num_classes=10), "classifier", 48),
    "vit_small_config": (_vit, "heads", 32),
}


def _head_factory(name, model):
    if name == "squeezenet1_0":
        return lambda c: torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Conv2d(512, c, 1), torch.nn.ReLU(),
                                             torch.nn.AdaptiveAvgPool2d(1))
    if name == "vit_small_config":
        return lambda c: torch.nn.Sequential(torch.nn.Linear(16, c))
    return None


def _perturb(model, t):
    gen = torch.Generator().manual_seed(t)
    for layer in model.perturbed_layers().values():
        layer.set_rank(t, 0.05 * torch.randn(layer.out_features, 2, generator=gen),
                       0.05 * torch.randn(layer.in_features, 2, generator=gen))
        with torch.no_grad():
            layer.r[str(t)].add_(0.05 * torch.randn(layer.out_features, generator=gen))


@pytest.mark.parametrize("name", list(CONVERTIBLE))
def test_convertible_model_end_to_end(name):
    torch.manual_seed(0)
    build, head, size = CONVERTIBLE[name]
    original = build().eval()
    x = torch.randn(4, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ViT's attention projections stay shared, with a warning
        model = hf.convert(original, head=head, head_factory=_head_factory(name, original), example_input=x[:1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))  # task 0 is the original model exactly
    t = model.add_task(7)
    _perturb(model, t)
    model.eval()
    ids = torch.tensor([t, 0, t, 0])
    with torch.no_grad():
        mixed = model(x, ids)
        single = model(x, t)
        base = model(x, 0)
        assert_close(mixed[ids == t][:, :7], single[ids == t], torch.float32)
        assert_close(mixed[ids == 0], base[ids == 0], torch.float32)
        assert_close(model.export_task(t).eval()(x), single, torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = hf.convert(build(), head=head, head_factory=_head_factory(name, original))
        fresh.add_task(7)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.eval()(x, t), single)
    model.train()
    model.freeze_task(0)
    model(x, t).sum().backward()
    missing = [n for n, p in model.named_task_parameters(t).items() if p.grad is None]
    assert not missing, f"task parameters without a gradient: {missing}"


def test_models_with_grouped_convs_are_refused_naming_every_layer():
    model = tv.models.mobilenet_v3_small(num_classes=10)
    grouped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    with pytest.raises(ValueError) as info:
        hf.convert(model, head="classifier.3")
    message = str(info.value)
    assert f"{len(grouped)} module(s)" in message
    assert all(f"'{n}'" in message for n in grouped)


def test_swin_reads_its_projection_weights_and_is_refused_not_silently_wrong():
    """torchvision's swin_t passes qkv.weight / proj.weight to a function: those layers would compute the base for
    every task.  With an example input convert names them; without, the first later task stops."""
    model = tv.models.swin_t(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"read directly by other code.*attn\.qkv"):
        hf.convert(model, head="head", example_input=x)
    converted = hf.convert(model, head="head")
    t = converted.add_task(5)
    with pytest.raises(RuntimeError, match=r"attn\.qkv'?: its weight was read outside its forward"):
        converted.eval()(x, t)
