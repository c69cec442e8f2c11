"""Mixed-task inference in the grouped layout (task groups side by side along the channels)."""
import pytest
import torch
from task_modules import eval_batchnorm_with_random_stats
from torch import nn

import halrp_fast as hf
from halrp_fast import models
from halrp_fast.nn import TaskBatchNorm, TaskHeads
from halrp_fast.nn._context import grouped_selection, select_tasks
from halrp_fast.nn.conv import TaskConv2d

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def with_tasks(model: hf.TaskModel, n_tasks: int, rank: int, seed: int) -> hf.TaskModel:
    """``model`` with ``n_tasks`` random tasks (scales, low-rank terms, biases, BatchNorm statistics, heads)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_tasks):
        t = model.add_task(4 + t_extra(model))
        for layer in model.perturbed_layers().values():
            k = min(rank, layer.out_features, layer.in_features)
            with torch.no_grad():
                layer.r[str(t)].copy_(1 + 0.2 * torch.randn(layer.out_features, generator=g, dtype=torch.float64))
                layer.s[str(t)].copy_(1 + 0.2 * torch.randn(layer.in_features, generator=g, dtype=torch.float64))
                if layer.bias is not None:
                    layer.task_bias[str(t)].normal_(generator=g)
            layer.set_rank(t, 0.1 * torch.randn(layer.out_features, k, generator=g, dtype=torch.float64),
                           0.1 * torch.randn(layer.in_features, k, generator=g, dtype=torch.float64))
        for module in model.task_modules().values():
            if isinstance(module, TaskBatchNorm):
                bn = module.bns[t]
                with torch.no_grad():
                    if bn.track_running_stats:
                        bn.running_mean.normal_(generator=g)
                        bn.running_var.uniform_(0.5, 2.0, generator=g)
                    bn.weight.normal_(generator=g)
                    bn.bias.normal_(generator=g)
    return model.eval()


def t_extra(model):
    return model.num_tasks % 3  # heads of different widths: the mixed logits are padded with -inf


def per_group_reference(model, x, ids):
    """Each task's rows through the single-task path (row layout), put back in batch order."""
    out = torch.full((len(ids), max(model.num_classes)), float("-inf"), dtype=x.dtype)
    for t in ids.unique().tolist():
        rows = (ids == t).nonzero().flatten()
        y = model(x[rows], t)
        out[rows, :y.shape[1]] = y
    return out


def grouped_calls(monkeypatch):
    """Count the convs served in the grouped layout."""
    served = []
    original = TaskConv2d._forward_grouped

    def spy(self, x, sel):
        out = original(self, x, sel)
        served.append(out is not None)
        return out

    monkeypatch.setattr(TaskConv2d, "_forward_grouped", spy)
    return served


ID_CASES = {
    "balanced_interleaved": lambda: torch.arange(12) % 4,
    "padded_shuffled": lambda: torch.tensor([1] * 4 + [2] * 3 + [3] * 4 + [0] * 4)[torch.randperm(15)],
    "sorted_in_order": lambda: torch.tensor([0, 0, 0, 2, 2, 2, 3, 3, 3]),
}


@pytest.mark.parametrize("name", ["lenet", "alexnet", "resnet18"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(ID_CASES))
def test_grouped_mixed_batch_equals_each_task_alone(name, layout, case, monkeypatch):
    torch.manual_seed(0)
    size = 32 if name == "alexnet" else 16  # AlexNet's three conv/pool stages need 32 pixels
    model = with_tasks(hf.convert(getattr(models, name)(3, size, 5)).double(), 3, rank=5, seed=1)
    model.to(memory_format=layout)
    assert model.grouped_mixed_batches
    ids = ID_CASES[case]()
    x = torch.randn(len(ids), 3, size, size, dtype=torch.float64).contiguous(memory_format=layout)
    served = grouped_calls(monkeypatch)
    with torch.no_grad():
        y = model(x, ids)
    assert len(served) == sum(isinstance(m, TaskConv2d) for m in model.modules())
    # deep convs whose weights are large against their images run the mixed op in rows, by the cost rule
    assert served[0] and (name != "lenet" or all(served))
    served.clear()
    with torch.no_grad():
        ref = per_group_reference(model, x, ids)
    assert not served  # single-task calls never group
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_alexnet_batch_statistics_normalise_in_rows_when_padded(monkeypatch):
    # AlexNet's BatchNorm keeps no running statistics: padding rows would enter a task's batch statistics, so
    # each BatchNorm normalises the task groups in rows and returns its output to the grouped layout.
    model = with_tasks(hf.convert(models.alexnet(3, 32, 5)).double(), 2, rank=3, seed=2)
    ids = torch.tensor([1, 1, 1, 2, 2])
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    served = grouped_calls(monkeypatch)
    calls = []
    original = TaskBatchNorm._forward_grouped
    monkeypatch.setattr(TaskBatchNorm, "_forward_grouped",
                        lambda self, x, sel: calls.append(1) or original(self, x, sel))
    with torch.no_grad():
        y = model(x, ids)
    assert served[0] and len(calls) == 3  # every BatchNorm was given the grouped layout
    torch.testing.assert_close(y, per_group_reference(model, x, ids), rtol=1e-10, atol=1e-10)


class Residual(nn.Module):
    """A residual block whose branches decide differently: the 3×3 conv's 64×64 weight is large against its
    6×6 images (mixed op in rows), the 1×1 shortcut's is small (grouped conv)."""

    halrp_grouped_mixed_batches = True

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 1)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.shortcut = nn.Conv2d(64, 64, 1)
        self.last = nn.Linear(64, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.last((self.conv(x) + self.shortcut(x)).mean((2, 3)))


def test_branches_of_a_residual_sum_stay_in_one_layout(monkeypatch):
    model = with_tasks(hf.convert(Residual()).double(), 3, rank=2, seed=5)
    served = grouped_calls(monkeypatch)
    ids = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 3])
    x = torch.randn(10, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = model(x, ids)
    assert served == [True, False, True]
    torch.testing.assert_close(y, per_group_reference(model, x, ids), rtol=1e-10, atol=1e-10)


def test_too_unequal_groups_and_autograd_use_rows(monkeypatch):
    model = with_tasks(hf.convert(models.lenet(3, 16, 5)).double(), 2, rank=3, seed=3)
    x = torch.randn(10, 3, 16, 16, dtype=torch.float64)
    served = grouped_calls(monkeypatch)
    unequal = torch.tensor([1] + [2] * 9)  # padding 2·9 − 10 = 8 rows > 25 %
    with torch.no_grad():
        y = model(x, unequal)
    torch.testing.assert_close(y, per_group_reference(model, x, unequal), rtol=1e-10, atol=1e-10)
    balanced = torch.tensor([1, 2] * 5)
    y = model(x, balanced)  # autograd on: the convs need their factored form
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), per_group_reference(model, x, balanced), rtol=1e-10, atol=1e-10)
    assert not served


class ChannelMixing(nn.Module):
    """Concatenates two branches along the channels: the grouped layout would mix tasks here."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.mix = nn.Conv2d(6, 5, 1)
        self.last = nn.Linear(5, 3)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.last(y.mean((2, 3)))


def test_user_models_are_not_grouped_unless_asked(monkeypatch):
    model = with_tasks(hf.convert(ChannelMixing()).double(), 2, rank=2, seed=4)
    assert not model.grouped_mixed_batches
    served = grouped_calls(monkeypatch)
    ids = torch.tensor([1, 2, 1, 2])
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = model(x, ids)
    assert not served
    torch.testing.assert_close(y, per_group_reference(model, x, ids), rtol=1e-10, atol=1e-10)
    assert not hf.convert(models.lenet(3, 16, 5), grouped_mixed_batches=False).grouped_mixed_batches
    assert hf.convert(ChannelMixing(), grouped_mixed_batches=True).grouped_mixed_batches


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("counts", [[3, 3, 3], [3, 2, 3]])
def test_group_then_ungroup_restores_the_rows(layout, counts):
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    grouped = grouped_selection(select_tasks(ids, len(ids), len(counts))).grouped
    assert grouped.padded == (len(set(counts)) > 1)
    x4 = torch.randn(len(ids), 5, 4, 3).contiguous(memory_format=layout)
    g = grouped.group(x4)
    assert g.shape == (max(counts), 5 * len(counts), 4, 3)
    assert g.is_contiguous(memory_format=layout)
    for task, n in enumerate(counts):
        start = sum(counts[:task])
        torch.testing.assert_close(g[:n, 5 * task:5 * task + 5], x4[start:start + n], rtol=0, atol=0)
        assert (g[n:, 5 * task:5 * task + 5] == 0).all()
    back = grouped.ungroup(g)
    torch.testing.assert_close(back, x4, rtol=0, atol=0)
    assert back.is_contiguous(memory_format=layout)
    x2 = torch.randn(len(ids), 7)
    assert grouped.holds(grouped.group(x2)) and not grouped.holds(x2)
    torch.testing.assert_close(grouped.ungroup(grouped.group(x2)), x2, rtol=0, atol=0)


def test_grouping_refuses_padding_above_a_quarter():
    ids = torch.tensor([0, 1, 1, 1])  # 2 groups of 3 rows for 4 samples: 50 % padding
    assert grouped_selection(select_tasks(ids, 4, 2)) is None


@pytest.mark.parametrize("dims", [(6,), (6, 3, 2)])
def test_batchnorm_eval_equal_sorted_groups(dims):
    # Rows sorted into equal task groups take the broadcast form instead of per-row gathered statistics.
    base = nn.BatchNorm1d(6) if len(dims) == 1 else nn.BatchNorm2d(6)
    bn = eval_batchnorm_with_random_stats(base, new_tasks=2)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, *dims)
    if len(dims) == 3:
        x = x.contiguous(memory_format=torch.channels_last)
    assert select_tasks(ids, 6, 3).equal_group_size == 2
    y = bn(x, ids)
    for n, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[n:n + 1], bn.bns[t](x[n:n + 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_heads_of_one_shape_over_equal_sorted_groups(bias):
    # Equal task groups and heads of one shape take one batched product instead of a product per task.
    heads = TaskHeads(nn.Linear(6, 4, bias=bias))
    for _ in range(2):
        heads.add_task(4)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 6, requires_grad=True)
    assert heads._same_linear_heads([0, 1, 2]) is not None
    y = heads(x, ids)
    for n, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[n:n + 1], heads.heads[t](x[n:n + 1]), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()  # trains every present head
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in heads.heads)
    heads.add_task(3)  # another width: the per-task path pads with -inf
    assert heads._same_linear_heads([0, 3]) is None
