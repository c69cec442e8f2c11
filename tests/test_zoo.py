"""Real torchvision, timm and transformers models (random initialisation, tiny inputs) through ``convert()`` with no
``exclude``, each checked the same way:

* convert with an example input (the coverage check: every converted layer runs, none has its weight read by
  other code) and task 0 equals the original model exactly;
* a later task's mixed batches equal its single-task rows in eval and train mode (BatchNorm batch statistics;
  dropout and stochastic depth held still), with and without grad; ``export_task(t)`` equals ``model(x, t)``;
* state-dict and checkpoint round trips reproduce every task;
* float64: the gradients of every layer's ``r, s, U, V`` and bias equal the chain rule through
  ``W_t = diag(r) W diag(s) + U Vᵀ`` (grouped convs: its block-diagonal part) applied to the exported model's
  weight gradients.

Provider: whatever ``auto`` picks on CPU (the ops' own tests check every provider); these tests check the modules.
"""
import warnings
from functools import partial

import pytest
import torch
from oracle import assert_close, block_diagonal_conv_weight
from task_modules import AttentionClassifier
from torch import nn

import halrp_fast as hf
from halrp_fast.continual.checkpoint import load_into, save_checkpoint

tv = pytest.importorskip("torchvision")


def _tv(name, **kw):
    return lambda: getattr(tv.models, name)(num_classes=10, **kw)


def _tv_vit():
    return tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                       mlp_dim=32, num_classes=10)


def _squeeze_head(c):
    return nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, c, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def _timm(name, **kw):
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, num_classes=10, **kw)
    return build


def _timm_bit():
    """A small BiT ResNet-V2: weight-standardised convs (timm's StdConv2d) and GroupNorm, a 1×1 conv classifier."""
    timm = pytest.importorskip("timm")
    from timm.layers import GroupNormAct, StdConv2d
    return timm.models.resnetv2.ResNetV2(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_chs=32,
                                         stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
                                         norm_layer=partial(GroupNormAct, num_groups=8), num_classes=10)


def _conv_head(channels):
    return lambda c: nn.Conv2d(channels, c, 1)


def _hf(config, model, **kw):
    def build():
        tr = pytest.importorskip("transformers")
        return getattr(tr, model)(getattr(tr, config)(num_labels=10, **kw))
    return build


def _images(size):
    return lambda: torch.randn(8, 3, size, size)


def _tokens():
    return torch.randint(2, 50, (8, 7))


_TEXT = dict(vocab_size=50)  # dropout off: train-mode outputs are compared (attention dropout is functional)
# name → (builder, head, input, head_factory)
MODELS = {
    "tv_resnet18": (_tv("resnet18"), "fc", _images(32), None),
    "tv_resnet50": (_tv("resnet50"), "fc", _images(32), None),
    "tv_mobilenet_v3_small": (_tv("mobilenet_v3_small"), "classifier.3", _images(32), None),
    "tv_efficientnet_b0": (_tv("efficientnet_b0"), "classifier.1", _images(32), None),
    "tv_convnext_tiny": (_tv("convnext_tiny"), "classifier.2", _images(32), None),
    "tv_regnet_y_400mf": (_tv("regnet_y_400mf"), "fc", _images(32), None),
    "tv_shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), "fc", _images(32), None),
    "tv_squeezenet1_0": (_tv("squeezenet1_0"), "classifier", _images(48), _squeeze_head),
    "tv_densenet121": (_tv("densenet121"), "classifier", _images(32), None),
    "tv_alexnet": (_tv("alexnet"), "classifier.6", _images(64), None),
    "tv_vgg11_bn": (_tv("vgg11_bn"), "classifier.6", _images(32), None),
    "tv_vit_small_config": (_tv_vit, "heads.head", _images(32), None),
    "tv_swin_t": (_tv("swin_t"), "head", _images(32), None),
    "timm_resnet18": (_timm("resnet18"), "fc", _images(32), None),
    "timm_mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), "classifier", _images(32), None),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32), "head", _images(32), None),
    "timm_resnetv2_bit": (_timm_bit, "head.fc", _images(32), _conv_head(256)),
    # tf_efficientnet_* at test size: TensorFlow "same" padding (timm's Conv2dSame) and TF's BatchNorm eps
    "timm_tf_efficientnet": (_timm("test_efficientnet", pad_type="same", bn_eps=1e-3), "classifier", _images(33),
                             None),
    "timm_test_nfnet": (_timm("test_nfnet"), "head.fc", _images(32), None),
    "hf_vit": (_hf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, num_hidden_layers=2,
                   num_attention_heads=2, hidden_size=16, intermediate_size=32), "classifier", _images(32), None),
    "hf_bert": (_hf("BertConfig", "BertForSequenceClassification", hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, **_TEXT), "classifier", _tokens, None),
    "hf_distilbert": (_hf("DistilBertConfig", "DistilBertForSequenceClassification", dim=16, n_layers=2, n_heads=2,
                          hidden_dim=32, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, **_TEXT),
                      "classifier", _tokens, None),
    "hf_gpt2": (_hf("GPT2Config", "GPT2ForSequenceClassification", n_embd=16, n_layer=2, n_head=2, n_positions=16,
                    pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    **_TEXT), "score", _tokens, None),
}
CLASSES = 7  # of the added task (the base has 10)
_RANDOM = ("Dropout", "StochasticDepth", "DropPath")


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _convert(name, example=None):
    build, head, _, factory = MODELS[name]
    torch.manual_seed(0)
    original = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.convert(original, head=head, head_factory=factory, example_input=example)
    return original, model


def _perturb(model, t, scale=0.05):
    gen = torch.Generator().manual_seed(t)
    with torch.no_grad():
        for layer in model.perturbed_layers().values():
            layer.set_rank(t, scale * torch.randn(layer.out_features, 2, generator=gen),
                           scale * torch.randn(layer.in_features, 2, generator=gen))
            layer.r[str(t)].add_(scale * torch.randn(layer.out_features, generator=gen))
            layer.s[str(t)].add_(scale * torch.randn(layer.in_features, generator=gen))
            if layer.bias is not None:
                layer.task_bias[str(t)].add_(scale * torch.randn(layer.out_features, generator=gen))


def _train_still(model):
    """Train mode (BatchNorm on batch statistics) with dropout and stochastic depth switched off."""
    model.train()
    for m in model.modules():
        if any(k in type(m).__name__ for k in _RANDOM):
            m.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_model_converts_and_serves_every_task(name, tmp_path):
    x = MODELS[name][2]()
    torch.manual_seed(1)
    original, model = _convert(name, example=x[:1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(_logits(model(x, 0)), _logits(original(x)))  # task 0 is the original exactly
    t = model.add_task(CLASSES)
    _perturb(model, t)
    ids = torch.tensor([t, 0] * 4)
    model.eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            mixed = _logits(model(x, ids))
            for task, width in ((t, CLASSES), (0, 10)):
                assert_close(mixed[ids == task][:, :width], _logits(model(x, task))[ids == task], torch.float32)
    with torch.no_grad():
        single = _logits(model(x, t))
        assert not torch.allclose(single, _logits(model(x, 0))[:, :CLASSES])  # the task's layers are its own
        # stand-ins (norms, heads, attention; inside serving() every task-aware module, prepared once): bit for bit
        assert torch.equal(_logits(model._forward(x, t, stand_ins=False)), single)
        with model.serving():
            for _ in range(2):
                assert torch.equal(_logits(model(x, t)), single)
                assert torch.equal(_logits(model(x, 0)), _logits(original(x)))
        assert_close(_logits(model.export_task(t).eval()(x)), single, torch.float32)
        fresh = _convert(name)[1]
        fresh.add_task(CLASSES)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(_logits(fresh.eval()(x, t)), single)
        save_checkpoint(tmp_path, model)
        for lazy in (False, True):
            reloaded = _convert(name)[1]
            load_into(reloaded, tmp_path, lazy=lazy)
            assert torch.equal(_logits(reloaded.eval()(x, t)), single)
            assert reloaded.ranks(t) == model.ranks(t)
    # Train mode: each task's BatchNorm statistics come from its own rows, so a task's rows of the mixed batch equal
    # the task's single-task batch of those rows.  In float64: BatchNorm over 4 rows of 1×1 maps amplifies float32
    # rounding beyond any fixed tolerance.
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    _train_still(model)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            mixed = _logits(model(x, ids))
            for task, width in ((t, CLASSES), (0, 10)):
                assert_close(mixed[ids == task][:, :width], _logits(model(x[ids == task], task)), torch.float64)
    with torch.no_grad(), model.serving():  # BatchNorm on batch statistics through the stand-ins
        rows = x[ids == t]
        assert torch.equal(_logits(model(rows, t)), _logits(model._forward(rows, t, stand_ins=False)))


def _expected_grads(layer, G, t):
    """The chain rule through the merged weight: gradients of (r, s, U, V) given ``G``, the gradient of the plain
    layer's weight in the layer's ``(out, in[, kh, kw])`` layout."""
    W = layer.weight.detach()
    r, s, U, V = (p.detach() for p in layer.task_tensors(t)[:4])
    groups = getattr(layer, "groups", 1)
    if W.dim() == 4:
        G, W = block_diagonal_conv_weight(G, groups), block_diagonal_conv_weight(W, groups)
        return ((G * W * s[None, :, None, None]).sum((1, 2, 3)), (G * W * r[:, None, None, None]).sum((0, 2, 3)),
                G.sum((2, 3)) @ V, G.sum((2, 3)).T @ U)
    return (G * W * s[None, :]).sum(1), (G * W * r[:, None]).sum(0), G @ V, G.T @ U


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_task_gradients_equal_the_chain_rule_through_the_merged_weight(name):
    """float64: every task-aware layer's r, s, U, V and bias gradients against the exported plain model's."""
    x = MODELS[name][2]()
    _, model = _convert(name)
    t = model.add_task(CLASSES)
    _perturb(model, t)
    model = model.double()
    model.freeze_task(0)
    _train_still(model)
    if x.is_floating_point():
        x = x.double()
    exported = model.export_task(t)
    _train_still(exported)
    probe = torch.randn(x.shape[0], CLASSES, dtype=torch.float64)
    (_logits(exported(x)) * probe).sum().backward()
    (_logits(model(x, t)) * probe).sum().backward()
    sources = model.plain_sources()
    for lname, layer in model.perturbed_layers().items():
        weight_path, bias_path = sources[lname]
        G = exported.get_parameter(weight_path).grad
        if layer.plain_transposed:
            G = G.T
        got = layer.task_tensors(t)
        for value, expected in zip(got[:4], _expected_grads(layer, G, t), strict=True):
            assert_close(value.grad, expected, torch.float64)
        if bias_path is not None:
            assert_close(got[4].grad, exported.get_parameter(bias_path).grad, torch.float64)


def test_reading_a_converted_layers_weight_behind_its_back_is_refused():
    """An attention module the library does not know that passes ``self.qkv.weight`` to a function: with an
    example input convert names the layer; without, the first later task stops."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
            return torch.softmax(q @ k.mT, -1) @ v

    net = nn.Sequential(Attention(), nn.Flatten(), nn.Linear(40, 3))
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"read directly by other code.*'0\.qkv'"):
        hf.convert(net, example_input=x)
    converted = hf.convert(net)
    t = converted.add_task(3)
    with pytest.raises(RuntimeError, match=r"0\.qkv.*had their weights read by other code"):
        converted(x, t)


def test_multihead_attention_sequence_first_mixed_batches_and_masks():
    """nn.MultiheadAttention with batch_first=False, a key-padding mask and returned weights: mixed rows equal each
    task's rows (the batch dimension of the sequence-first inputs is 1, that of the mask and weights 0)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            seq = x.transpose(0, 1)
            mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            mask[:, -1] = True
            out, weights = self.attn(seq, seq, seq, key_padding_mask=mask)
            return self.fc(out.mean(0)) + weights.sum((1, 2))[:, None]

    torch.manual_seed(0)
    model = hf.convert(Block(), head="fc")
    t = model.add_task(3)
    _perturb(model, t, 0.3)
    assert set(model.ranks(t)) == {"attn.projections.in_proj", "attn.projections.out_proj"}
    x = torch.randn(4, 5, 8)
    ids = torch.tensor([t, 0, 0, t])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            mixed = model.eval()(x, ids)
            assert_close(mixed[ids == t], model(x, t)[ids == t], torch.float32)
            assert_close(mixed[ids == 0], model(x, 0)[ids == 0], torch.float32)
    with torch.no_grad():
        assert_close(model.export_task(t)(x), model(x, t), torch.float32)
        assert isinstance(model.export_task(t).attn, nn.MultiheadAttention)


def test_wrapped_attention_serving_follows_every_change_of_its_projections():
    """Without autograd a later task's attention reuses its prepared weights while the projections are unchanged: an
    in-place step, a replaced perturbation and a new base all show in the next call (against the exported model,
    rebuilt each time), and task 0 after freezing still equals the original module."""
    torch.manual_seed(0)
    model = hf.convert(AttentionClassifier().eval(), head="last").eval()
    t = model.add_task(3)
    _perturb(model, t, 0.3)
    x = torch.randn(4, 5, 8)
    in_proj = model.model.mha.projections["in_proj"]

    def check():
        with torch.no_grad():
            assert_close(model(x, t), model.export_task(t)(x), torch.float32)

    check()
    with torch.no_grad():
        in_proj.U[str(t)].mul_(-2)  # an optimiser-like in-place step
    check()
    in_proj.set_rank(t, torch.randn(24, 3), torch.randn(8, 3))  # new U, V parameters
    check()
    with torch.no_grad():
        in_proj.weight.add_(0.5)  # the base itself
    check()
    model.freeze_task(0)
    with torch.no_grad():
        assert_close(model(x, 0), model.export_task(0)(x), torch.float32)


def test_a_wrapped_attentions_own_parameters_train_with_the_base():
    """swin_t's relative position bias tables live in the wrapped attention modules: they are task 0's parameters
    (trained with the base, frozen with it), not any later task's."""
    model = _convert("tv_swin_t")[1]
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and tables <= set(model.named_task_parameters(0))
    t = model.add_task(CLASSES)
    assert not tables & set(model.named_task_parameters(t))
    model.freeze_task(0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in tables)


@pytest.mark.parametrize("name", ["tv_vit_small_config", "tv_swin_t"])
def test_reparametrized_attention_compiles_without_graph_breaks(name):
    """A later task of a model with wrapped attention under torch.compile(fullgraph=True): training forward and
    backward and inference equal eager."""
    torch._dynamo.reset()  # graphs compiled by earlier tests (TaskModel.forward is one code object for all models)
    x = MODELS[name][2]()[:2]
    _, model = _convert(name)
    t = model.add_task(CLASSES)
    _perturb(model, t)
    model.freeze_task(0)
    _train_still(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t)
    assert_close(out, model(x, t), torch.float32)
    out.sum().backward()
    assert all(p.grad is not None for p in model.task_parameters(t))
    model.eval()
    with torch.no_grad():
        assert_close(compiled(x, t), model(x, t), torch.float32)
