"""Each kind of task-aware module undoes its own add_task; freeze/unfreeze reach exactly a task's parameters."""
import pytest
import torch
from task_modules import AttentionClassifier
from torch import nn

import halrp_fast as hf
from halrp_fast.nn import TaskBatchNorm, TaskConv2d, TaskHeads, TaskLinear, TaskNorm
from halrp_fast.nn.reparametrized import TaskReparametrized


class EveryKind(nn.Module):
    """A conv (with BatchNorm), a LayerNorm, an attention module that reads its own projections, a linear layer and
    the head: one of each task-aware module type."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.attn = AttentionClassifier().mha
        self.fc = nn.Linear(8, 8)
        self.last = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # (N, H*W, 8)
        h = self.norm(h)
        h = self.attn(h, h, h, need_weights=False)[0].mean(1)
        return self.last(torch.relu(self.fc(h)))


KINDS = (TaskConv2d, TaskBatchNorm, TaskNorm, TaskReparametrized, TaskLinear, TaskHeads)


def snapshot(model: hf.TaskModel) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_every_kind_is_present():
    model = hf.convert(EveryKind())
    kinds = {type(m) for m in model.task_modules().values()}
    assert all(any(issubclass(k, kind) for k in kinds) for kind in KINDS), kinds


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_each_kind_removes_what_its_add_task_added(kind):
    model = hf.convert(EveryKind())
    model.add_task(5)
    t = model.add_task(3)
    for name, layer in model.perturbed_layers().items():
        model.set_rank(t, name, torch.randn(layer.out_features, 2), torch.randn(layer.in_features, 2))
    modules = [m for m in model.task_modules().values() if isinstance(m, kind)]
    assert modules
    for m in modules:
        before = {k: v.clone() for k, v in m.state_dict().items()}
        m.add_task() if not isinstance(m, TaskHeads) else m.add_task(7)
        assert m.num_tasks == 4 and set(m.state_dict()) != set(before) or isinstance(m, TaskReparametrized)
        m.remove_last_task()
        after = m.state_dict()
        assert m.num_tasks == 3 and set(after) == set(before), type(m).__name__
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_model_removes_its_last_task_through_every_module():
    torch.manual_seed(0)
    model = hf.convert(EveryKind()).eval()
    model.add_task(5)
    x = torch.randn(2, 3, 4, 4)
    before, out = snapshot(model), model(x, 1)
    model.add_task(6)
    model._remove_last_task()
    assert model.num_tasks == 2 and model.num_classes == [4, 5]
    after = snapshot(model)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(x, 1), out)
    with pytest.raises(ValueError, match="task id 2 is out of range"):
        model(x, 2)


def test_the_base_cannot_be_removed():
    model = hf.convert(EveryKind())
    for m in model.task_modules().values():
        with pytest.raises(ValueError, match="only the base"):
            m.remove_last_task()


def test_freeze_and_unfreeze_reach_exactly_one_tasks_parameters():
    model = hf.convert(EveryKind())
    for _ in range(2):
        model.add_task(3)
    names = {t: set(model.named_task_parameters(t)) for t in range(3)}
    assert names[1] and names[2] and not names[1] & names[2]

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    everything = trainable()
    model.freeze_task(1)
    assert trainable() == everything - names[1]
    model.freeze_task(0)
    assert trainable() == everything - names[1] - names[0]
    model.unfreeze_task(1)
    assert trainable() == everything - names[0]
    model.unfreeze_task(0)
    assert trainable() == everything
    with pytest.raises(ValueError, match="out of range"):
        model.unfreeze_task(3)
