"""What ``convert`` leaves shared is said (``TaskModel.summary()``, one log line, a warning when nothing is
perturbed), and RMSNorm — PyTorch's and the ones model libraries write — is per task like LayerNorm.

Provider: whatever ``auto`` picks on CPU (the modules' bookkeeping is what is checked here).
"""
import logging

import pytest
import torch
from oracle import assert_close
from torch import nn

import halrp_fast as hf
from halrp_fast.nn import TaskNorm


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.norm = nn.RMSNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.norm(self.rnn(self.embed(ids))[0][:, -1]))


def test_summary_names_every_shared_module_and_nothing_perturbed_warns(caplog):
    with caplog.at_level(logging.INFO, logger="halrp_fast"), pytest.warns(UserWarning, match="no layer to perturb"):
        model = hf.convert(Recurrent())
    assert model.shared_modules() == {"embed": ("Embedding", 80), "rnn": ("GRU", 3 * 8 * 4 + 3 * 8 * 8 + 2 * 3 * 8)}
    text = model.summary()
    assert "1 norms" in text and "head 'fc'" in text
    assert "'rnn' (GRU, 336)" in text and "'embed' (Embedding, 80)" in text
    assert [r.getMessage() for r in caplog.records] == [f"convert: {text}"]


def test_summary_lists_excluded_layers_as_shared():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5), nn.ReLU(), nn.Linear(5, 2))
    net(torch.randn(1, 3, 6, 6))
    model = hf.convert(net, exclude=["2"])
    assert model.shared_modules() == {"2": ("Linear", 64 * 5 + 5)}
    assert "its own: 1 perturbed conv layers, head '4'" in model.summary()


def _rms_models():
    yield "torch", nn.RMSNorm
    tr = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    yield "llama", LlamaRMSNorm
    yield "t5", T5LayerNorm
    del tr


@pytest.mark.parametrize("kind", ["torch", "llama", "t5"])
def test_rmsnorm_is_per_task(kind):
    """Task 0 is the original exactly; task t has its own weight; mixed rows equal single-task rows; the exported
    model holds the task's norm."""
    norm_cls = dict(_rms_models())[kind]
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 8), norm_cls(8), nn.Linear(8, 3)).eval()
    model = hf.convert(original)
    assert isinstance(model.model[1], TaskNorm)
    x = torch.randn(6, 6)
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))
        t = model.add_task(3)
        norm_t = model.model[1].module_of(t)
        norm_t.weight.mul_(torch.linspace(0.5, 2.0, 8))
        assert norm_t.weight.requires_grad and not torch.equal(norm_t.weight, model.model[1].module_of(0).weight)
        ids = torch.tensor([t, 0, t, 0, 0, t])
        single = model(x, t)
        assert not torch.allclose(single, original(x))
        assert_close(model(x, ids)[ids == t], single[ids == t], torch.float32)
        exported = model.export_task(t)
        assert type(exported[1]) is norm_cls
        assert_close(exported(x), single, torch.float32)
    assert any(p is norm_t.weight for p in model.task_parameters(t))
