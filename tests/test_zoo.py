"""Real torchvision, transformers and timm models (random initialisation, tiny inputs) through convert(): what
converts today is checked end to end (task 0 is the original exactly, mixed batches equal single-task rows,
export_task, state-dict round trip, every task parameter gets a gradient); what does not is refused by name, never
silently wrong."""
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
    with pytest.raises(RuntimeError, match=r"attn\.qkv.*had their weights read by other code"):
        converted.eval()(x, t)


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _foreign_end_to_end(build, head, x, classes=3):
    """``classes``: of the added task, as many as the original's head (mixed rows then compare whole)."""
    original = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.convert(original, head=head, example_input=x[:1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(_logits(model(x, 0)), _logits(original(x)))
    t = model.add_task(classes)
    _perturb(model, t)
    ids = torch.tensor([t, 0] * (x.shape[0] // 2))
    with torch.no_grad():
        mixed = _logits(model(x, ids))
        single, base = _logits(model(x, t)), _logits(model(x, 0))
        assert not torch.allclose(single, base)  # the task's layers are its own
        assert_close(mixed[ids == t], single[ids == t], torch.float32)
        assert_close(mixed[ids == 0], base[ids == 0], torch.float32)
        assert_close(_logits(model.export_task(t).eval()(x)), single, torch.float32)
    model.train()
    model.freeze_task(0)
    _logits(model(x, t)).sum().backward()
    missing = [n for n, p in model.named_task_parameters(t).items() if p.grad is None]
    assert not missing, f"task parameters without a gradient: {missing}"


@pytest.mark.parametrize("name", ["vit", "bert", "distilbert"])
def test_transformers_models_end_to_end(name):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "vit":
        cfg = tr.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                           intermediate_size=32, num_labels=3)
        _foreign_end_to_end(lambda: tr.ViTForImageClassification(cfg), "classifier", torch.randn(4, 3, 32, 32))
    elif name == "bert":
        cfg = tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, num_labels=3)
        _foreign_end_to_end(lambda: tr.BertForSequenceClassification(cfg), "classifier", torch.randint(0, 50, (4, 7)))
    else:
        cfg = tr.DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, num_labels=3)
        _foreign_end_to_end(lambda: tr.DistilBertForSequenceClassification(cfg), "classifier",
                            torch.randint(0, 50, (4, 7)))


def test_gpt2_conv1d_projections_are_refused_by_name():
    tr = pytest.importorskip("transformers")
    cfg = tr.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=3, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1)
    with pytest.raises(ValueError, match=r"cannot convert 8 module\(s\).*'transformer\.h\.0\.attn\.c_attn': Conv1D"):
        hf.convert(tr.GPT2ForSequenceClassification(cfg), head="score")


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("vit_tiny_patch16_224", "head")])
def test_timm_models_end_to_end(name, head):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    _foreign_end_to_end(lambda: timm.create_model(name, num_classes=3, **kwargs), head, torch.randn(4, 3, 32, 32))


def test_timm_mobilenet_depthwise_convs_are_refused_by_name():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_small_100", num_classes=3)
    grouped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    with pytest.raises(ValueError, match=rf"cannot convert {len(grouped)} module\(s\)"):
        hf.convert(model, head="classifier")


@pytest.mark.parametrize("name", list(CONVERTIBLE))
def test_task_gradients_equal_those_implied_by_the_merged_weights(name):
    """float64: the gradients of r, s, U, V of every task-aware layer equal the chain rule through
    W_t = diag(r) W diag(s) + U Vᵀ applied to the gradient of W_t in the exported plain model."""
    torch.manual_seed(0)
    build, head, size = CONVERTIBLE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.convert(build(), head=head, head_factory=_head_factory(name, None))
    t = model.add_task(7)
    _perturb(model, t)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.perturbed_layers().values():
            layer.s[str(t)].add_(0.05 * torch.randn(layer.in_features, generator=gen))
    model = model.double().eval()
    model.freeze_task(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    exported = model.export_task(t).eval()
    probe = torch.randn(2, 7, dtype=torch.float64)
    (exported(x) * probe).sum().backward()
    (model(x, t) * probe).sum().backward()
    for lname, layer in model.perturbed_layers().items():
        G = exported.get_submodule(lname).weight.grad
        W = layer.weight.detach()
        r, s, U, V = (p.detach() for p in layer.task_tensors(t)[:4])
        if W.dim() == 4:
            expected_r = (G * W * s[None, :, None, None]).sum((1, 2, 3))
            expected_s = (G * W * r[:, None, None, None]).sum((0, 2, 3))
            G = G.sum((2, 3))
        else:
            expected_r = (G * W * s[None, :]).sum(1)
            expected_s = (G * W * r[:, None]).sum(0)
        got = layer.task_tensors(t)
        assert_close(got[0].grad, expected_r, torch.float64)
        assert_close(got[1].grad, expected_s, torch.float64)
        assert_close(got[2].grad, G @ V, torch.float64)
        assert_close(got[3].grad, G.T @ U, torch.float64)
