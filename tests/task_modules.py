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


class EncoderClassifier(torch.nn.Module):
    """``x (N, L, 4)`` with a key padding mask ``(N, L)`` → linear embedding → ``nn.TransformerEncoder`` (2 layers,
    batch first, final LayerNorm) → mean over the positions that are not padding → ``head`` (10 classes).  (PyTorch's
    fused path gives zeros at padded positions, its standard path other values: a model reads only the others.)"""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 16)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(16))
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = (~mask).unsqueeze(-1).to(x.dtype)
        encoded = self.encoder(self.embed(x), src_key_padding_mask=mask)
        return self.head((encoded * keep).sum(1) / keep.sum(1))


class Seq2SeqClassifier(torch.nn.Module):
    """``src (N, S, 16)``, ``tgt (N, T, 16)`` → ``nn.Transformer`` (a causal target mask; ``batch_first=False``: the
    inputs are transposed) → ``head`` on every target position ``(N, T, 10)``."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.transformer = torch.nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=batch_first)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        if self.batch_first:
            return self.head(self.transformer(src, tgt, tgt_mask=causal))
        out = self.transformer(src.transpose(0, 1), tgt.transpose(0, 1), tgt_mask=causal)
        return self.head(out.transpose(0, 1))
