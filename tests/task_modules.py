"""Builders of per-task modules with non-trivial state, shared by the module tests."""
import torch

from halrp_fast.nn import TaskBatchNorm


class AttentionClassifier(torch.nn.Module):
    """``x (N, L, 8)`` → self-attention (``mha``, 2 heads, batch first) → mean over the sequence → ``last`` (3 classes):
    the smallest model whose attention module reads its projections' weights itself."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.last = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.mha(x, x, x, need_weights=False)[0].mean(1))


def eval_batchnorm_with_random_stats(base: torch.nn.Module, new_tasks: int) -> TaskBatchNorm:
    """A TaskBatchNorm over ``base`` with ``new_tasks`` added, every task's running statistics and
    affine parameters drawn at random (variances in [0.5, 2]), in eval mode."""
    bn = TaskBatchNorm(base)
    for _ in range(new_tasks):
        bn.add_task()
    with torch.no_grad():
        for m in bn.bns:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.normal_()
            m.bias.normal_()
    return bn.eval()
