"""Mixed-task ops: row m equals the single-task op with task task_ids[m]; float64 oracle per row."""
import pytest
import torch
from oracle import assert_close, conv_mt, linear_mt
from torch.library import opcheck

import halrp_fast as hf


def banks(T, n_in, n_out, k, dtype=torch.float32, bias=True, ranks=None):
    g = dict(dtype=dtype)
    R = 1 + 0.3 * torch.randn(T, n_out, **g)
    S = 1 + 0.3 * torch.randn(T, n_in, **g)
    U = 0.3 * torch.randn(T, n_out, k, **g)
    V = 0.3 * torch.randn(T, n_in, k, **g)
    if ranks is not None:  # zero-pad per-task ranks below k
        for t, kt in enumerate(ranks):
            U[t, :, kt:] = 0
            V[t, :, kt:] = 0
    B = torch.randn(T, n_out, **g) if bias else None
    return R, S, U, V, B


ID_CASES = {
    "unsorted": [3, 0, 2, 0, 1, 3, 3],
    "single": [2, 2, 2, 2],
    "one_row": [1],
    "all_distinct": [4, 1, 0, 3, 2],
    "empty": [],
}


@pytest.mark.parametrize("case", list(ID_CASES))
@pytest.mark.parametrize("k", [0, 1, 17, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_mt_matches_oracle(case, k, dtype, provider):
    provider.require("perturbed_linear_mt", dtype)
    ids = torch.tensor(ID_CASES[case], dtype=torch.int64)
    x = torch.randn(len(ids), 13, dtype=dtype)
    W = torch.randn(11, 13, dtype=dtype) / 13**0.5
    bk = banks(5, 13, 11, k, dtype, ranks=[k, max(k - 1, 0), 0, k, 1 if k else 0])
    y = hf.perturbed_linear_mt(x, ids, W, *bk)
    assert y.shape == (len(ids), 11)
    assert_close(y, linear_mt(x, ids, W, *bk), dtype)


@pytest.mark.parametrize("k", [8, 16, 24, 32])  # the vectorised row forms (8 ranks per vector) of the cpp provider
@pytest.mark.parametrize("n_out", [5, 16, 37])  # tail only, whole blocks of 8 outputs, blocks and a tail
@pytest.mark.parametrize("bias", [True, False])
def test_linear_mt_vector_ranks_match_oracle(k, n_out, bias, provider):
    provider.require("perturbed_linear_mt", torch.float32)
    ids = torch.tensor([3, 0, 2, 0, 1, 3, 4])  # one or two rows per task: the row-wise low-rank form
    x = torch.randn(len(ids), 29)
    W = torch.randn(n_out, 29) / 29**0.5
    bk = banks(5, 29, n_out, k, bias=bias)
    assert_close(hf.perturbed_linear_mt(x, ids, W, *bk), linear_mt(x, ids, W, *bk), torch.float32)


def test_linear_mt_rows_equal_single_task_op(provider):
    provider.require("perturbed_linear_mt", torch.float32)
    ids = torch.tensor([2, 0, 2, 1, 0])
    x = torch.randn(5, 3, 9)  # (M, L, in): a task per sample, several rows each
    W = torch.randn(6, 9)
    R, S, U, V, B = banks(3, 9, 6, 4)
    y = hf.perturbed_linear_mt(x, ids, W, R, S, U, V, B)
    for m, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[m], hf.perturbed_linear(x[m], W, R[t], S[t], U[t], V[t], B[t]))


@pytest.mark.parametrize("case", ["unsorted", "single", "one_row", "empty"])
@pytest.mark.parametrize("k", [0, 2, 70])
def test_conv_mt_matches_oracle(case, k, provider):
    provider.require("perturbed_conv2d_mt", torch.float32)
    ids = torch.tensor(ID_CASES[case], dtype=torch.int64)
    x = torch.randn(len(ids), 3, 7, 6)
    W = torch.randn(5, 3, 3, 3) / 5
    bk = banks(5, 3, 5, k)
    geo = dict(stride=(2, 1), padding=1, dilation=1)
    y = hf.perturbed_conv2d_mt(x, ids, W, *bk, **geo)
    if len(ids):
        assert_close(y, conv_mt(x, ids, W, *bk, **geo), torch.float32)
    else:
        assert y.shape == (0, 5, 4, 6)


def test_conv_mt_rows_equal_single_task_op(provider):
    provider.require("perturbed_conv2d_mt", torch.float32)
    ids = torch.tensor([1, 0, 1])
    x = torch.randn(3, 4, 8, 8)
    W = torch.randn(6, 4, 3, 3)
    R, S, U, V, B = banks(2, 4, 6, 3)
    y = hf.perturbed_conv2d_mt(x, ids, W, R, S, U, V, B, padding=2, dilation=2)
    for n, t in enumerate(ids.tolist()):
        yn = hf.perturbed_conv2d(x[n:n + 1], W, R[t], S[t], U[t], V[t], B[t], padding=2, dilation=2)
        torch.testing.assert_close(y[n:n + 1], yn)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_linear_mt(bias, provider):
    provider.require("perturbed_linear_mt", torch.float64)
    ids = torch.tensor([1, 0, 1, 2])
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    bk = [None if b is None else b.requires_grad_() for b in banks(3, 5, 3, 2, torch.float64, bias=bias)]
    assert torch.autograd.gradcheck(lambda x, W, *b: hf.perturbed_linear_mt(x, ids, W, *b), (x, W, *bk))


def test_gradcheck_conv_mt(provider):
    provider.require("perturbed_conv2d_mt", torch.float64)
    ids = torch.tensor([1, 0, 1])
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bk = [b.requires_grad_() for b in banks(2, 2, 3, 2, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda x, W, *b: hf.perturbed_conv2d_mt(x, ids, W, *b, stride=2, padding=1), (x, W, *bk))


def test_mixed_gradients_equal_sum_of_per_task_gradients(provider):
    provider.require("perturbed_linear_mt", torch.float64)
    ids = torch.tensor([0, 2, 0, 2, 2])
    x = torch.randn(5, 7, dtype=torch.float64)
    W = torch.randn(4, 7, dtype=torch.float64)
    bk = [b.requires_grad_() for b in banks(3, 7, 4, 3, torch.float64)]
    g = torch.randn(5, 4, dtype=torch.float64)
    grads = torch.autograd.grad(hf.perturbed_linear_mt(x, ids, W, *bk), bk, g)
    leaves = [b.detach().clone().requires_grad_() for b in bk]
    ref = torch.autograd.grad(linear_mt(x, ids, W, *leaves), leaves, g)
    for a, e in zip(grads, ref):
        torch.testing.assert_close(a, e)
    assert grads[0][1].abs().sum() == 0  # task 1 absent from the batch: no gradient


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_mixed(save, provider):
    provider.require("perturbed_linear_mt", torch.float64)
    ids = torch.tensor([1, 0, 1])
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64)
    bk = [b.requires_grad_() for b in banks(2, 5, 4, 2, torch.float64)]
    opcheck(torch.ops.halrp.perturbed_linear_mt.default, (x, ids, W, *bk, save))
    xc = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    Wc = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bkc = [b.requires_grad_() for b in banks(2, 2, 4, 2, torch.float64)]
    geo = ([1, 1], [1, 1], [1, 1])
    opcheck(torch.ops.halrp.perturbed_conv2d_mt.default, (xc, ids, Wc, *bkc, save, *geo))
    g = torch.randn(3, 4, dtype=torch.float64)
    banks_d = [b.detach() for b in bk]
    _, c, xv = torch.ops.halrp.perturbed_linear_mt(x.detach(), ids, W, *banks_d, save)
    opcheck(torch.ops.halrp.perturbed_linear_mt_backward.default,
            (g, x.detach(), ids, W, *banks_d[:4], c, xv, True, [True] * 7))
    gc = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    banks_c = [b.detach() for b in bkc]
    _, cc, pooled = torch.ops.halrp.perturbed_conv2d_mt(xc.detach(), ids, Wc, *banks_c, save, *geo)
    opcheck(torch.ops.halrp.perturbed_conv2d_mt_backward.default,
            (gc, xc.detach(), ids, Wc, *banks_c[:4], cc, pooled, True, *geo, [True] * 7))


def test_mixed_saved_intermediates_match_recomputation(provider):
    provider.require("perturbed_linear_mt", torch.float64)
    ids = torch.tensor([2, 0, 2, 1])
    x, W = torch.randn(4, 3, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    bk = banks(3, 6, 5, 3, torch.float64)
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    _, c, xv = torch.ops.halrp.perturbed_linear_mt(x, ids, W, *bk, True)
    empty = x.new_empty(0)
    op = torch.ops.halrp.perturbed_linear_mt_backward
    saved = op(g, x, ids, W, *bk[:4], c, xv, True, [True] * 7)
    recomputed = op(g, x, ids, W, *bk[:4], empty, empty, True, [True] * 7)
    for a, e in zip(saved, recomputed):
        torch.testing.assert_close(a, e)
