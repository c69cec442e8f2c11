"""BatchNorm whose batch statistics span every process of a data-parallel run (CPU and GPU).

``torch.nn.SyncBatchNorm`` runs on GPUs only; data-parallel HALRP must equal a one-process run on the same
global batch on any device, so :func:`synced_batchnorm` makes every BatchNorm of a module tree, while the
context is active, normalise with the mean and variance of the *global* batch: the per-channel sums are
summed over the processes with an autograd-aware all-reduce (two passes: the mean, then the centred
squares), and the running statistics are updated with those global values, exactly as one process would.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as all_reduce_autograd


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_autograd(t, op=dist.ReduceOp.SUM)


def _synced_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with batch statistics over all processes (``x (N, C, ...)``)."""
    uses_batch_stats = bn.training or bn.running_mean is None
    if not uses_batch_stats:
        return bn._halrp_plain_forward(x)
    bn._check_input_dim(x)
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() // max(x.shape[1], 1)], dtype=torch.float64, device=x.device)
    dist.all_reduce(count)
    n = float(count)
    if n <= 1 and bn.training:
        raise ValueError(f"BatchNorm needs more than one value per channel over all processes, got {int(n)}")
    mean = _global_sum(x.sum(dims)) / n
    centred = x - mean.view(shape)
    var = _global_sum((centred * centred).sum(dims)) / n
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
    return y


@contextmanager
def synced_batchnorm(module: nn.Module, active: bool = True):
    """While active, every BatchNorm in ``module`` normalises with global-batch statistics (no-op when
    ``active`` is false or no process group is initialised)."""
    if not active or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield module
        return
    patched = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and "forward" not in m.__dict__]
    for m in patched:
        m._halrp_plain_forward = m.forward
        m.forward = types.MethodType(_synced_forward, m)
    try:
        yield module
    finally:
        for m in patched:
            del m.forward
            del m._halrp_plain_forward
