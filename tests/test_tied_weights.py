"""Models with tied weights (an embedding shared with a language-model head) go through the library's checkpoint:
the shared tensor is stored once and the sharing holds after loading (transformers' GPT-2 LM head and T5)."""
import json
import warnings

import pytest
import torch

import halrp_fast as hf
from halrp_fast.continual.checkpoint import load_into, read_manifest, save_checkpoint

tr = pytest.importorskip("transformers")


def gpt2():
    config = tr.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=50, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    return tr.GPT2LMHeadModel(config), "lm_head", ("model.transformer.wte.weight", "model.lm_head.heads.0.weight")


def t5():
    config = tr.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                         tie_word_embeddings=True, decoder_start_token_id=0)
    tied = ("model.shared.weight", "model.encoder.embed_tokens.weight")
    return tr.T5ForConditionalGeneration(config), "lm_head", tied


def convert(build):
    torch.manual_seed(0)
    model, head, tied = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = hf.convert(model.eval(), head=head)
    return converted, tied


@pytest.mark.parametrize("build", [gpt2, t5], ids=["gpt2_lm_head", "t5"])
def test_tied_weights_checkpoint_once_and_stay_tied(build, tmp_path):
    model, (a, b) = convert(build)
    state = model.state_dict()
    assert state[a].data_ptr() == state[b].data_ptr()  # tied in the model itself
    t = model.add_task(50)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.perturbed_layers().values():
            layer.set_rank(t, 0.1 * torch.randn(layer.out_features, 2, generator=gen),
                           0.1 * torch.randn(layer.in_features, 2, generator=gen))
        state[a].add_(0.25)  # a trained base: both names see the change
    manifest = save_checkpoint(tmp_path, model)
    base = manifest["tasks"][0]
    stored_once = {a, b} - set(base["tensors"])
    assert len(stored_once) == 1 and base["aliases"][stored_once.pop()] in (a, b)
    assert json.loads((tmp_path / "manifest.json").read_text())["tasks"][0]["aliases"] == base["aliases"]

    fresh, _ = convert(build)
    load_into(fresh, tmp_path, read_manifest(tmp_path))
    loaded = fresh.state_dict()
    assert loaded[a].data_ptr() == loaded[b].data_ptr()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
    if build is gpt2:  # (a converted encoder-decoder needs keyword inputs: compared by its tensors above)
        ids = torch.randint(2, 50, (2, 5))
        with torch.no_grad():
            for task in (0, t):
                assert torch.equal(fresh(ids, task).logits, model(ids, task).logits)


def test_a_lazy_load_keeps_the_bases_tied_weights(tmp_path):
    model, (a, b) = convert(gpt2)
    model.add_task(50)
    save_checkpoint(tmp_path, model)
    fresh, _ = convert(gpt2)
    load_into(fresh, tmp_path, lazy=True)
    fresh.ensure_loaded()
    loaded = fresh.state_dict()
    assert loaded[a].data_ptr() == loaded[b].data_ptr()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
