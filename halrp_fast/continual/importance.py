"""Layer importance: the empirical Fisher information of each layer's weight."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistContext, all_reduce_sum_
from .training import batch_to, check_labels, logits_of, shard


def empirical_fisher(model: nn.Module, weights: dict[str, torch.Tensor], loader: Iterable,
                     device: torch.device | str = "cpu", dist: DistContext | None = None,
                     forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """``importance[name] = Σ_batches mean(∂L_b/∂W_name)² · n_b / n_batches``.

    ``L_b`` is the mean cross-entropy of batch ``b`` (true labels, model in eval mode), ``n_b`` its size;
    ``weights`` maps names to parameters of ``model`` (the conv/linear weights).  The model's train/eval
    mode and its parameters' gradients are left as they were.  With an active ``dist`` every process
    takes its part of each batch and the gradients are summed over the processes before squaring, so
    the result is the one-process value on every process.  ``forward`` computes ``model(x)`` another way (a
    compiled pass on ``model``'s own parameters, in ``model``'s train/eval mode at each call); default: ``model``.
    """
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in weights}
    batches = 0
    dtype = next(iter(weights.values())).dtype if weights else None  # inputs in the model's floating-point type
    was_training = model.training
    saved = {name: w.grad for name, w in weights.items()}
    model.eval()
    try:
        for x, y in loader:
            x, y, n = shard(*batch_to(x, y, device, dtype), dist)
            logits = logits_of(model(x) if forward is None else forward(x))
            check_labels(y, logits.shape[-1], f"importance, batch {batches + 1}")
            loss = F.cross_entropy(logits, y, reduction="sum") / n
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (name, _), g in zip(weights.items(), grads, strict=True):
                sums[name] += all_reduce_sum_(g.double(), dist).pow(2).mean() * n
            batches += 1
    finally:
        model.train(was_training)
        for name, w in weights.items():
            w.grad = saved[name]
    if batches == 0:
        raise ValueError("the importance loader yielded no batch")
    return {name: float(v / batches) for name, v in sums.items()}
