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
import torch.nn.functional as F
from oracle import assert_close, block_diagonal_conv_weight
from task_modules import AttentionClassifier, EncoderClassifier, Seq2SeqClassifier
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
_DECODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TEXT)


def _padded_tokens():
    """Keyword inputs: token ids with an attention mask that pads two rows on the left."""
    ids = torch.randint(3, 50, (8, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[4, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _masked_sequence():
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[1, -2:] = mask[4, -1:] = True
    return {"x": torch.randn(8, 6, 4), "mask": mask}


def _source_target():
    return {"src": torch.randn(8, 5, 16), "tgt": torch.randn(8, 3, 16)}


def _seq2seq_tokens():
    return {**_padded_tokens(), "decoder_input_ids": torch.randint(3, 50, (8, 4))}


def _speech():
    return {"input_features": torch.randn(8, 8, 16), "decoder_input_ids": torch.randint(3, 50, (8, 4))}
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
                    attention_probs_dropout_prob=0.0, **_TEXT), "classifier", _padded_tokens, None),
    "hf_distilbert": (_hf("DistilBertConfig", "DistilBertForSequenceClassification", dim=16, n_layers=2, n_heads=2,
                          hidden_dim=32, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, **_TEXT),
                      "classifier", _tokens, None),
    "hf_gpt2": (_hf("GPT2Config", "GPT2ForSequenceClassification", n_embd=16, n_layer=2, n_head=2, n_positions=16,
                    pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    **_TEXT), "score", _tokens, None),
    # PyTorch's own transformer (its fused inference path off where the attention is wrapped)
    "torch_transformer_encoder": (EncoderClassifier, "head", _masked_sequence, None),
    "torch_transformer": (Seq2SeqClassifier, "head", _source_target, None),
    # transformers' keyword calls: padded batches, causal LMs (logits per position, a key/value cache),
    # encoder-decoders (decoder inputs, the encoder's states), Whisper's Conv1d front end kept shared
    "hf_llama": (_hf("LlamaConfig", "LlamaForCausalLM", **_DECODER), "lm_head", _padded_tokens, None),
    "hf_qwen2": (_hf("Qwen2Config", "Qwen2ForCausalLM", **_DECODER), "lm_head", _padded_tokens, None),
    "hf_t5": (_hf("T5Config", "T5ForConditionalGeneration", d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **_TEXT), "lm_head",
              _seq2seq_tokens, None),
    "hf_whisper": (_hf("WhisperConfig", "WhisperForConditionalGeneration", num_mel_bins=8, encoder_layers=1,
                       decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, d_model=16,
                       encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
                       dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                       **_TEXT), "proj_out", _speech, None,
                   {"exclude": ["model.encoder.conv1", "model.encoder.conv2"]}),
}
CLASSES = 7  # of the added task (the base has 10)
_RANDOM = ("Dropout", "StochasticDepth", "DropPath")


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _args(x):
    """A batch (a tensor, or a dict of keyword inputs) as ``(positional, keyword)`` inputs."""
    return ((), x) if isinstance(x, dict) else ((x,), {})


def _call(model, x, *task):
    """``model(x)`` / ``model(**x)``, with the task ids when ``model`` is a TaskModel."""
    args, kwargs = _args(x)
    return model(*args, task_ids=task[0], **kwargs) if task else model(*args, **kwargs)


def _rows(x, index):
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def _double(x):
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x.double() if x.is_floating_point() else x


def _convert(name, example=None):
    build, head, _, factory, *options = MODELS[name]
    torch.manual_seed(0)
    original = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.convert(original, head=head, head_factory=factory, example_input=example,
                           **(options[0] if options else {}))
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
    original, model = _convert(name, example=_rows(x, slice(0, 1)))
    model.eval()
    with torch.no_grad():
        assert torch.equal(_logits(_call(model, x, 0)), _logits(_call(original, x)))  # task 0: the original exactly
    t = model.add_task(CLASSES)
    _perturb(model, t)
    ids = torch.tensor([t, 0] * 4)
    model.eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            mixed = _logits(_call(model, x, ids))
            for task, width in ((t, CLASSES), (0, None)):
                assert_close(mixed[ids == task][..., :width], _logits(_call(model, x, task))[ids == task],
                             torch.float32)
    with torch.no_grad():
        single = _logits(_call(model, x, t))
        assert not torch.allclose(single, _logits(_call(model, x, 0))[..., :CLASSES])  # the task's layers are its own
        # stand-ins (norms, heads, attention; inside serving() every task-aware module, prepared once): bit for bit
        assert torch.equal(_logits(model._forward(*_args(x), t, stand_ins=False)), single)
        with model.serving():
            for _ in range(2):
                assert torch.equal(_logits(_call(model, x, t)), single)
                assert torch.equal(_logits(_call(model, x, 0)), _logits(_call(original, x)))
        assert_close(_logits(_call(model.export_task(t).eval(), x)), single, torch.float32)
        fresh = _convert(name)[1]
        fresh.add_task(CLASSES)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(_logits(_call(fresh.eval(), x, t)), single)
        save_checkpoint(tmp_path, model)
        for lazy in (False, True):
            reloaded = _convert(name)[1]
            load_into(reloaded, tmp_path, lazy=lazy)
            assert torch.equal(_logits(_call(reloaded.eval(), x, t)), single)
            assert reloaded.ranks(t) == model.ranks(t)
    # Train mode: each task's BatchNorm statistics come from its own rows, so a task's rows of the mixed batch equal
    # the task's single-task batch of those rows.  In float64: BatchNorm over 4 rows of 1×1 maps amplifies float32
    # rounding beyond any fixed tolerance.
    model = model.double()
    x = _double(x)
    _train_still(model)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            mixed = _logits(_call(model, x, ids))
            for task, width in ((t, CLASSES), (0, None)):
                assert_close(mixed[ids == task][..., :width], _logits(_call(model, _rows(x, ids == task), task)),
                             torch.float64)
    with torch.no_grad(), model.serving():  # BatchNorm on batch statistics through the stand-ins
        rows = _rows(x, ids == t)
        assert torch.equal(_logits(_call(model, rows, t)), _logits(model._forward(*_args(rows), t, stand_ins=False)))


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
    x = _double(MODELS[name][2]())
    _, model = _convert(name)
    t = model.add_task(CLASSES)
    _perturb(model, t)
    model = model.double()
    model.freeze_task(0)
    _train_still(model)
    exported = model.export_task(t)
    _train_still(exported)
    out = _logits(_call(exported, x))
    probe = torch.randn(out.shape, dtype=torch.float64)
    (out * probe).sum().backward()
    (_logits(_call(model, x, t)) * probe).sum().backward()
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


# ------------------------------------------------------------------------------------------------ language models
def _lm(name):
    """A converted language model with a perturbed task 1 (its own layers and head) and the prompt batch."""
    tr = pytest.importorskip("transformers")
    builders = {
        "llama": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**_DECODER)),
        "qwen2_sliding": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(
            use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            **_DECODER)),
        "gpt2_lm": lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TEXT)),
        "t5": lambda: tr.T5ForConditionalGeneration(tr.T5Config(
            d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1, **_TEXT)),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.convert(builders[name]().eval(), head="lm_head").eval()
    t = model.add_task(50)
    _perturb(model, t, 0.3)
    heads = model.heads.heads
    with torch.no_grad():
        heads[t].weight.copy_(heads[0].weight + 0.3 * torch.randn_like(heads[0].weight))
    return model, t, _padded_tokens()


def _cache_tensors(cache):
    """Every key and value tensor of a transformers cache (both caches of an encoder-decoder one)."""
    if hasattr(cache, "self_attention_cache"):
        return _cache_tensors(cache.self_attention_cache) + _cache_tensors(cache.cross_attention_cache)
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


def _new_cache(model, kind, encoder_decoder):
    tr = pytest.importorskip("transformers")
    config = model.model.config
    make = (lambda: tr.StaticCache(config=config, max_cache_len=16)) if kind == "static" else tr.DynamicCache
    # the cross-attention cache holds the encoder's length: dynamic
    return tr.EncoderDecoderCache(make(), tr.DynamicCache()) if encoder_decoder else make()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gpt2_lm", "t5"])
def test_a_mixed_batch_gives_its_outputs_and_caches_in_batch_order(name, kind):
    """A mixed batch with a key/value cache, then one decoding step on that cache: the logits, hidden states,
    attentions and every key and value of the cache are each task's own rows, in batch order."""
    model, t, x = _lm(name)
    encoder_decoder = name == "t5"
    ids = torch.tensor([t, 0, 0, t, t, 0, t, 0])
    step = {"input_ids": torch.randint(3, 50, (8, 1))}
    if encoder_decoder:
        x["decoder_input_ids"] = torch.randint(3, 50, (8, 3))
        step = {"decoder_input_ids": step["input_ids"], "input_ids": x["input_ids"],
                "attention_mask": x["attention_mask"]}
    else:
        step["attention_mask"] = torch.cat([x["attention_mask"], torch.ones(8, 1, dtype=torch.long)], 1)
    extra = {"use_cache": True, "output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        runs = {}
        for task in (ids, 0, t):
            cache = _new_cache(model, kind, encoder_decoder)
            first = model(**x, task_ids=task, cache=cache, **extra)
            held = [v.clone() for v in _cache_tensors(cache)]
            second = model(**step, task_ids=task, cache=cache, **extra)
            runs[task if isinstance(task, int) else "mixed"] = (first, held, second, _cache_tensors(cache))
        mixed = runs["mixed"]
        for task in (0, t):
            rows = ids == task
            single = runs[task]
            for out_mixed, out_single in ((mixed[0], single[0]), (mixed[2], single[2])):
                assert_close(out_mixed.logits[rows], out_single.logits[rows], torch.float32)
                states = [k for k in out_mixed.keys() if k.endswith(("hidden_states", "attentions"))]
                assert states
                for key in states:
                    for a, b in zip(out_mixed[key], out_single[key], strict=True):
                        assert_close(a[rows], b[rows], torch.float32)
            for cache_mixed, cache_single in ((mixed[1], single[1]), (mixed[3], single[3])):
                assert len(cache_mixed) == len(cache_single) > 0
                for a, b in zip(cache_mixed, cache_single, strict=True):
                    assert_close(a[rows], b[rows], torch.float32)


@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gpt2_lm", "t5"])
def test_generate_serves_one_task_and_mixed_batches(name):
    """Greedy and beam-search generation: one task's equals its exported plain model's ``generate``; a mixed batch's
    rows (return sequences kept together, scores included) equal each task's own generation."""
    model, t, x = _lm(name)
    ids = torch.tensor([t, 0, 0, t, t, 0, t, 0])
    settings = ({"num_beams": 1}, {"num_beams": 3, "num_return_sequences": 2},
                {"return_dict_in_generate": True, "output_scores": True, "cache_implementation": "static"})
    with torch.no_grad():
        for options in settings:
            options = {"max_new_tokens": 4, "do_sample": False, **options}
            mixed = model.generate(**x, task_ids=ids, **options)
            repeats = options.get("num_return_sequences", 1)
            for task in (0, t):
                single = model.generate(**x, task_ids=task, **options)
                plain = model.export_task(task).generate(**x, **options)
                rows = (ids == task).repeat_interleave(repeats)
                if isinstance(single, torch.Tensor):
                    assert torch.equal(single, plain)
                    assert torch.equal(mixed[rows], single[rows])
                    continue
                assert torch.equal(single.sequences, plain.sequences)
                assert torch.equal(mixed.sequences[rows], single.sequences[rows])
                for a, b in zip(mixed.scores, single.scores, strict=True):
                    assert_close(a[rows], b[rows], torch.float32)


def test_clip_takes_two_inputs_and_gives_pairwise_logits_in_batch_order():
    """CLIP called with its two inputs positionally (``model(ids, pixels, task_ids=…)``) and a padding mask: task 0
    is the original; in a mixed batch the embeddings are each task's rows and both dimensions of the image-text
    similarities are in batch order (recomputed from the single-task embeddings)."""
    tr = pytest.importorskip("transformers")
    config = tr.CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8}, projection_dim=8)
    torch.manual_seed(0)
    original = tr.CLIPModel(config).eval()
    tokens = _padded_tokens()
    pixels = torch.randn(8, 3, 16, 16)
    model = hf.convert(original, head="text_projection", example_input=(tokens["input_ids"][:1], pixels[:1]))
    t = model.add_task(8)
    _perturb(model, t, 0.3)
    ids = torch.tensor([t, 0, 0, t, t, 0, t, 0])
    mask = tokens["attention_mask"]
    with torch.no_grad():
        base = model(tokens["input_ids"], pixels, task_ids=0, attention_mask=mask)
        assert torch.equal(base.logits_per_image, original(tokens["input_ids"], pixels, attention_mask=mask)
                           .logits_per_image)
        mixed = model(tokens["input_ids"], pixels, task_ids=ids, attention_mask=mask)
        singles = {task: model(tokens["input_ids"], pixels, task_ids=task, attention_mask=mask) for task in (0, t)}
        text, image = torch.empty_like(mixed.text_embeds), torch.empty_like(mixed.image_embeds)
        for task, single in singles.items():
            rows = ids == task
            text[rows], image[rows] = single.text_embeds[rows], single.image_embeds[rows]
        assert_close(mixed.text_embeds, text, torch.float32)
        assert_close(mixed.image_embeds, image, torch.float32)
        scale = original.logit_scale.exp()
        assert_close(mixed.logits_per_image, scale * image @ text.T, torch.float32)
        assert_close(mixed.logits_per_text, scale * text @ image.T, torch.float32)


def test_keyword_calls_return_the_wrapped_models_output_type_with_its_loss():
    """A padded BERT batch with labels: ``model(**inputs, task_ids=…)`` returns transformers'
    ``SequenceClassifierOutput``, whose loss for a mixed batch is the mean of the rows' losses (each row with its
    task's head); a call without task ids names the missing argument."""
    tr = pytest.importorskip("transformers")
    x = _padded_tokens()
    _, model = _convert("hf_bert", example=_rows(x, slice(0, 1)))
    t = model.add_task(CLASSES)
    _perturb(model, t, 0.3)
    ids = torch.tensor([t, 0] * 4)
    labels = torch.tensor([1, 9, 6, 2, 0, 4, 3, 8])
    with torch.no_grad():
        out = model(**x, labels=labels, task_ids=ids)
        assert type(out) is tr.modeling_outputs.SequenceClassifierOutput
        losses = torch.cat([F.cross_entropy(model(**_rows(x, ids == task), task_ids=task).logits, labels[ids == task],
                                            reduction="none") for task in (t, 0)])
        assert_close(out.loss, losses.mean(), torch.float32)
        with pytest.raises(TypeError, match="task_ids is missing"):
            model(**x)


def test_a_sequence_first_pytorch_transformer_serves_one_task_at_a_time():
    """``nn.Transformer(batch_first=False)``: its linear and norm layers see ``(sequence, batch, features)``, so a
    mixed batch is refused by name (even when the sequence is as long as the batch); one task at a time serves, task 0
    is the original exactly, and a layer reached by rows that are not the batch's names itself."""
    torch.manual_seed(0)
    original = Seq2SeqClassifier(batch_first=False).eval()
    x = _source_target()
    model = hf.convert(original, head="head", example_input=_rows(x, slice(0, 1)))
    assert model.sequence_first == ["transformer.encoder.layers.0", "transformer.decoder.layers.0"]
    t = model.add_task(CLASSES)
    _perturb(model, t, 0.3)
    ids = torch.tensor([t, 0] * 4)
    with torch.no_grad():
        assert torch.equal(model(**x, task_ids=0), original(**x))
        assert_close(model(**x, task_ids=t), model.export_task(t)(**x), torch.float32)
        square = {"src": x["src"], "tgt": torch.randn(8, 8, 16)}  # the target as long as the batch
        for batch in (x, square):
            with pytest.raises(ValueError, match=r"transformer\.encoder\.layers\.0.*take sequence-first ones"):
                model(**batch, task_ids=ids)
        model.sequence_first = []  # without the model's word, the first layer to see the rows names itself
        with pytest.raises(ValueError, match=r"'transformer\.encoder\.layers\.0\.norm1' \(LayerNorm\) got a mixed-task "
                                             r"batch of 8 rows as shape \(5, 8, 16\)"):
            model(**x, task_ids=ids)
