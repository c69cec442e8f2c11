"""Task-aware modules: TaskLinear, TaskConv2d, TaskBatchNorm, TaskHeads."""
import copy

import pytest
import torch
from oracle import assert_close, conv, linear
from task_modules import eval_batchnorm_with_random_stats
from torch import nn

from halrp_fast.nn import TaskBatchNorm, TaskConv2d, TaskHeads, TaskLinear


def perturbed_linear_layer(n_in=9, n_out=5, k=3, tasks=2):
    layer = TaskLinear.from_linear(nn.Linear(n_in, n_out))
    for _ in range(tasks):
        t = layer.add_task()
        layer.set_rank(t, 0.3 * torch.randn(n_out, k), 0.3 * torch.randn(n_in, k))
        with torch.no_grad():
            layer.r[str(t)].add_(0.2 * torch.randn(n_out))
            layer.s[str(t)].add_(0.2 * torch.randn(n_in))
            layer.task_bias[str(t)].add_(torch.randn(n_out))
    return layer


def test_task0_is_the_plain_layer():
    lin = nn.Linear(7, 4)
    layer = TaskLinear.from_linear(lin)
    layer.add_task()
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x, 0), lin(x))
    torch.testing.assert_close(layer(x, 1), lin(x))  # a new task starts as the base
    assert layer.rank(1) == 0


def test_task_forward_matches_oracle_train_and_eval():
    layer = perturbed_linear_layer()
    x = torch.randn(6, 9)
    r, s, U, V, b = layer.task_tensors(2)
    expected = linear(x, layer.weight, r, s, U, V, b)
    assert_close(layer(x, 2), expected, torch.float32)  # unmerged op (grad needed)
    with torch.no_grad():
        assert_close(layer(x, 2), expected, torch.float32)  # merged weight
    assert len(layer._merged) == 1


def test_merged_weight_cache_invalidated_by_parameter_change():
    layer = perturbed_linear_layer()
    x = torch.randn(4, 9)
    with torch.no_grad():
        before = layer(x, 1)
        layer.U["1"].mul_(2.0)  # in-place change, as an optimiser step does
        after = layer(x, 1)
    r, s, U, V, b = layer.task_tensors(1)
    assert_close(after, linear(x, layer.weight, r, s, U, V, b), torch.float32)
    assert not torch.allclose(before, after)


def test_merged_weight_used_in_inference_mode():
    layer = perturbed_linear_layer()
    x = torch.randn(4, 9)
    with torch.inference_mode():
        y = layer(x, 1)
    r, s, U, V, b = layer.task_tensors(1)
    assert_close(y, linear(x, layer.weight, r, s, U, V, b), torch.float32)
    y2 = layer(x.requires_grad_(), 1)  # cached value is an ordinary tensor: usable with autograd later
    y2.sum().backward()


def test_mixed_batch_equals_per_row():
    layer = perturbed_linear_layer(tasks=3)
    x = torch.randn(7, 9)
    ids = torch.tensor([3, 0, 1, 3, 2, 0, 1])
    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx():
            y = layer(x, ids)
            for m, t in enumerate(ids.tolist()):
                torch.testing.assert_close(y[m:m + 1], layer(x[m:m + 1], t), rtol=1e-5, atol=1e-5)


def test_mixed_batch_trains_every_present_task():
    layer = perturbed_linear_layer(tasks=3)
    ids = torch.tensor([1, 3, 1])
    layer(torch.randn(3, 9), ids).sum().backward()
    assert layer.U["1"].grad is not None and layer.U["3"].grad is not None
    assert layer.U["2"].grad is None
    assert layer.weight.grad is not None  # the op's frozen-weight gradient is available if asked


def test_set_rank_changes_rank_and_freezes_keep():
    layer = perturbed_linear_layer(k=4)
    layer.set_rank(1, torch.randn(5, 70), torch.randn(9, 70))
    assert layer.rank(1) == 70 and layer.rank(2) == 4
    for p in layer.task_parameters(1):
        p.requires_grad_(False)
    layer.set_rank(1, torch.randn(5, 2), torch.randn(9, 2))
    assert not layer.U["1"].requires_grad


def test_conv_layer_matches_oracle_and_merged():
    conv_m = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    layer = TaskConv2d.from_conv(conv_m)
    t = layer.add_task()
    layer.set_rank(t, 0.3 * torch.randn(6, 3), 0.3 * torch.randn(4, 3))
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(layer(x, 0), conv_m(x))
    r, s, U, V, b = layer.task_tensors(t)
    expected = conv(x, layer.weight, r, s, U, V, b, (2, 1), (1, 1), (1, 2))
    assert_close(layer(x, t), expected, torch.float32)
    with torch.no_grad():
        assert_close(layer(x, t), expected, torch.float32)
        assert_close(layer.to_plain(t)(x), expected, torch.float32)


def test_conv_padding_same_and_valid():
    layer = TaskConv2d.from_conv(nn.Conv2d(3, 4, 3, padding="same"))
    assert layer.padding == (1, 1)
    assert TaskConv2d.from_conv(nn.Conv2d(3, 4, 3, padding="valid")).padding == (0, 0)
    with pytest.raises(ValueError, match="asymmetrically"):
        TaskConv2d.from_conv(nn.Conv2d(3, 4, 4, padding="same"))


def test_state_dict_round_trip_with_new_ranks():
    layer = perturbed_linear_layer(k=3)
    other = perturbed_linear_layer(k=1)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 9)
    torch.testing.assert_close(other(x, 2), layer(x, 2))
    assert other.rank(2) == 3


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (8, 5)), (nn.BatchNorm2d, (8, 5, 3, 3))])
@pytest.mark.parametrize("track", [True, False])
def test_batchnorm_per_task_statistics(cls, shape, track):
    bn = TaskBatchNorm(cls(5, track_running_stats=track))
    bn.add_task()
    bn.train()
    x0, x1 = torch.randn(*shape), 3 + 2 * torch.randn(*shape)
    bn(x0, 0)
    bn(x1, 1)
    if track:
        assert not torch.allclose(bn.bns[0].running_mean, bn.bns[1].running_mean)
        assert bn.bns[1].running_mean.mean() > 0.2  # moved towards 3
    # mixed batch == per-task batches (compared against copies, since train mode updates statistics)
    x = torch.cat([x0, x1])
    ids = torch.tensor([0] * shape[0] + [1] * shape[0])
    perm = torch.randperm(len(ids))
    for mode in ("train", "eval"):
        getattr(bn, mode)()
        copies = [copy.deepcopy(m) for m in bn.bns]
        y = bn(x[perm], ids[perm])
        ref = torch.cat([copies[0](x0), copies[1](x1)])[perm]
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for m, c in zip(bn.bns, copies):
            if track:
                torch.testing.assert_close(m.running_mean, c.running_mean)


def test_batchnorm_eval_mixed_vectorised_matches_modules():
    bn = eval_batchnorm_with_random_stats(nn.BatchNorm2d(4), new_tasks=2)
    x = torch.randn(5, 4, 2, 2)
    ids = torch.tensor([2, 0, 1, 2, 0])
    y = bn(x, ids)
    for n, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[n:n + 1], bn.bns[t](x[n:n + 1]), rtol=1e-5, atol=1e-6)


def test_heads_own_class_counts_and_mixed_padding():
    heads = TaskHeads(nn.Linear(6, 3))
    assert heads.add_task(5) == 1
    x = torch.randn(4, 6)
    assert heads(x, 0).shape == (4, 3) and heads(x, 1).shape == (4, 5)
    y = heads(x, torch.tensor([0, 1, 0, 1]))
    assert y.shape == (4, 5)
    assert torch.isinf(y[0, 3:]).all() and torch.isfinite(y[1]).all()
    torch.testing.assert_close(y[0, :3], heads(x[:1], 0)[0])
    loss = nn.functional.cross_entropy(y, torch.tensor([2, 4, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(heads.heads[1].weight.grad).all()


def test_heads_factory_for_custom_heads():
    with pytest.raises(TypeError, match="out_features"):  # no linear or conv layer to count classes from
        TaskHeads(nn.Sequential(nn.Dropout(), nn.Identity()), head_factory=lambda c: nn.Linear(4, c))
    # otherwise the classes are those of the head's last linear layer (or the channels of its last conv)
    assert TaskHeads(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
                     head_factory=lambda c: nn.Linear(4, c)).num_classes == [2]
    with pytest.raises(TypeError, match="head_factory"):
        TaskHeads(nn.Sequential(nn.Linear(4, 2)))
    seq = nn.Sequential(nn.Linear(4, 2))
    seq.out_features = 2
    heads = TaskHeads(seq, head_factory=lambda c: nn.Sequential(nn.Linear(4, c)))
    heads.add_task(7)
    assert heads(torch.randn(2, 4), 1).shape == (2, 7)
