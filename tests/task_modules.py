"""Builders of per-task modules with non-trivial state, shared by the module tests."""
import torch

from halrp_fast.nn import TaskBatchNorm


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
