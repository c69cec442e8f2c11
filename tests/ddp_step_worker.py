"""Worker of ``test_distributed.py``: one data-parallel training step of a channels-last LeNet (BatchNorm statistics
over both processes) against the same step in one process on the whole batch; prints the worst relative
gradient error on rank 0.  Run under ``torchrun --nproc-per-node 2``."""
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from halrp_fast import models
from halrp_fast.continual.distributed import init_from_env, shutdown
from halrp_fast.continual.training import shard
from halrp_fast.nn.sync_batchnorm import synced_batchnorm

ctx = init_from_env()
torch.manual_seed(0)
model = models.lenet(3, 16, 4).to(memory_format=torch.channels_last).train()
x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
F.cross_entropy(model(x), y, reduction="sum").backward()
expected = {n: p.grad.clone() for n, p in model.named_parameters()}
model.zero_grad()
net = DistributedDataParallel(model, broadcast_buffers=False)
xs, ys, n = shard(x, y, ctx)
with synced_batchnorm(model, True):
    (F.cross_entropy(net(xs), ys, reduction="sum") * ctx.world_size).backward()
# biases in front of a BatchNorm have a zero gradient up to rounding: only the other parameters are compared
worst = max(((p.grad - expected[name]).abs().max() / expected[name].abs().max()).item()
            for name, p in model.named_parameters() if "weight" in name)
if ctx.rank == 0:
    print(f"worst relative gradient error {worst:.3e}")
shutdown(ctx)
