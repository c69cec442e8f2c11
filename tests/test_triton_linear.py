"""Triton perturbed-linear kernels (HALRP_FAST_BACKEND=triton) against the float64 oracle.

Runs on the CPU in the Triton interpreter (TRITON_INTERPRET=1, set by the README's test command) or on a
GPU; skipped when neither is possible.
"""
import pytest
import torch
from oracle import assert_close, assert_low_precision, linear, linear_mt
from triton_env import DEVICE, INTERPRETED, use_triton  # noqa: F401  (autouse fixture)

import halrp_fast as hf

pytestmark = pytest.mark.triton


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def test_env_report_names_triton():
    report = hf.env_report()
    assert f"perturbed_linear               {DEVICE:<5} -> triton" in report
    assert f"perturbed_linear_mt            {DEVICE:<5} -> triton" in report


@pytest.mark.parametrize("M", [0, 1, 7, 65])
@pytest.mark.parametrize("n_in,n_out", [(13, 11), (37, 31)])
@pytest.mark.parametrize("k", [1, 3, 17, 32, 33, 100])  # 32: the largest fused rank, 33: unfused
def test_single_task_matches_oracle(M, n_in, n_out, k):
    args = (rnd(M, n_in), rnd(n_out, n_in) / n_in**0.5, 1 + 0.3 * rnd(n_out), 1 + 0.3 * rnd(n_in),
            0.3 * rnd(n_out, k), 0.3 * rnd(n_in, k), rnd(n_out))
    assert_close(hf.perturbed_linear(*args), linear(*args), torch.float32)


def test_float64_is_served_by_auto_modes_choice_at_float64_accuracy():
    # The kernels accumulate in fp32 (and tl.dot mixes no fp64): float64 calls go where auto mode sends them (the
    # reference on CUDA; the compiled kernels or the reference on CPU), never to Triton.
    args = (rnd(7, 13, dtype=torch.float64), rnd(11, 13, dtype=torch.float64), rnd(11, dtype=torch.float64),
            rnd(13, dtype=torch.float64), rnd(11, 3, dtype=torch.float64), rnd(13, 3, dtype=torch.float64))
    ids = torch.tensor([0, 1, 1, 0, 2, 2, 1], device=DEVICE)
    banks = [torch.stack([a] * 3) + 0.1 * rnd(3, *a.shape, dtype=torch.float64) for a in args[2:]]
    assert_close(hf.perturbed_linear(*args), linear(*args), torch.float64)
    assert_close(hf.perturbed_linear_mt(args[0], ids, args[1], *banks), linear_mt(args[0], ids, args[1], *banks),
                 torch.float64)
    served = hf._backend.select("perturbed_linear", DEVICE, "float64")[0]
    assert served == hf._backend._choose_auto("perturbed_linear", DEVICE, "float64")[0] != "triton"
    assert hf._backend.select("perturbed_linear", DEVICE, "float32")[0] == "triton"


def test_rank_zero_and_no_bias():
    x, W, r, s = rnd(9, 13), rnd(11, 13), rnd(11), rnd(13)
    U, V = rnd(11, 0), rnd(13, 0)
    assert_close(hf.perturbed_linear(x, W, r, s, U, V), linear(x, W, r, s, U, V), torch.float32)


def test_rank_zero_gradients():
    """Rank 0 in training: the forward saves an empty x V (M, 0) for the backward."""
    args = [a.requires_grad_() for a in (rnd(6, 13), rnd(11, 13), rnd(11), rnd(13), rnd(11, 0), rnd(13, 0), rnd(11))]
    g = rnd(6, 11)
    grads = torch.autograd.grad(hf.perturbed_linear(*args), args, g)
    for a, e in zip(grads, _oracle_grads(args, g)):
        assert_close(a, e, torch.float32)


def test_poisoned_output_is_fully_written():
    from halrp_fast.kernels.perturbed_linear import perturbed_linear_fwd

    args = (rnd(33, 13), rnd(29, 13), rnd(29), rnd(13), rnd(29, 5), rnd(13, 5), rnd(29))
    out = torch.full((33, 29), float("nan"), device=DEVICE)
    perturbed_linear_fwd(*args, out=out)
    assert_close(out, linear(*args), torch.float32)


def test_strided_inputs():
    x = rnd(13, 40)[:, ::2].T  # (20, 13), strided
    W = rnd(13, 11).T  # transposed weight, no copy
    args = (x, W, rnd(11), rnd(13), rnd(11, 4), rnd(13, 4), rnd(11))
    assert_close(hf.perturbed_linear(*args), linear(*args), torch.float32)


BF16_IN_INTERPRETER = pytest.mark.skipif(
    INTERPRETED, reason="the Triton interpreter computes bfloat16 on raw uint16 bits (triton-lang/triton#11584); "
                        "the same kernel code is checked in float16 here and in bfloat16 on a GPU")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_IN_INTERPRETER)])
def test_low_precision_rule(dtype):
    a64 = [torch.randn(*shape, dtype=torch.float64) for shape in ((17, 24), (19, 24), (19,), (24,), (19, 4),
                                                                   (24, 4), (19,))]
    a64[1] /= 24**0.5
    expected = linear(*a64)
    low = [a.to(dtype).to(DEVICE) for a in a64]
    x, W, r, s, U, V, b = low
    baseline = torch.nn.functional.linear(x, r[:, None] * W * s + U @ V.T, b)
    assert_low_precision(hf.perturbed_linear(*low).cpu(), baseline.cpu(), expected)


ID_CASES = {"unsorted_repeated": [3, 0, 2, 0, 1, 3, 3], "single": [2, 2, 2], "one_row": [4],
            "many_rows": [i % 5 for i in range(70)], "empty": []}


@pytest.mark.parametrize("case", list(ID_CASES))
@pytest.mark.parametrize("k", [3, 100])
def test_mixed_matches_oracle(case, k):
    ids = torch.tensor(ID_CASES[case], dtype=torch.int64, device=DEVICE)
    x, W = rnd(len(ids), 13), rnd(11, 13) / 13**0.5
    banks = (1 + 0.3 * rnd(5, 11), 1 + 0.3 * rnd(5, 13), 0.3 * rnd(5, 11, k), 0.3 * rnd(5, 13, k), rnd(5, 11))
    y = hf.perturbed_linear_mt(x, ids, W, *banks)
    assert y.shape == (len(ids), 11)
    if len(ids):
        assert_close(y, linear_mt(x, ids, W, *banks), torch.float32)


def test_mixed_with_sequence_rows():
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    x, W = rnd(3, 4, 9), rnd(6, 9)
    banks = (rnd(2, 6), rnd(2, 9), rnd(2, 6, 2), rnd(2, 9, 2), rnd(2, 6))
    assert_close(hf.perturbed_linear_mt(x, ids, W, *banks), linear_mt(x, ids, W, *banks), torch.float32)


def test_gradients_through_triton_forward():
    args = [a.requires_grad_() for a in (rnd(6, 13), rnd(11, 13), rnd(11), rnd(13), rnd(11, 3), rnd(13, 3), rnd(11))]
    g = rnd(6, 11)
    grads = torch.autograd.grad(hf.perturbed_linear(*args), args, g)
    leaves = [a.detach().double().requires_grad_() for a in args]
    ref = torch.autograd.grad(linear(*leaves), leaves, g.double())
    for a, e in zip(grads, ref):
        assert_close(a, e, torch.float32)


def test_task_model_serves_mixed_batch_with_triton():
    model = hf.convert(torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))).to(DEVICE)
    t = model.add_task(3)
    model.set_rank(t, "0", rnd(7, 2), rnd(13, 2))
    x, ids = rnd(5, 13), torch.tensor([0, 1, 1, 0, 1], device=DEVICE)
    with torch.no_grad():
        y = model(x, ids)
        for m in range(5):
            torch.testing.assert_close(y[m:m + 1], model(x[m:m + 1], int(ids[m])), rtol=1e-4, atol=1e-4)


def _oracle_grads(args, g, fn=linear, **kw):
    leaves = [None if a is None else a.detach().double().requires_grad_() for a in args]
    diff = [a for a in leaves if a is not None and a.is_floating_point()]
    return torch.autograd.grad(fn(*leaves, **kw), diff, g.double())


@pytest.mark.parametrize("M", [1, 7, 65])
@pytest.mark.parametrize("k", [1, 17, 100])
def test_backward_kernel_matches_oracle(M, k):
    args = [a.requires_grad_() for a in (rnd(M, 13), rnd(11, 13), 1 + 0.3 * rnd(11), 1 + 0.3 * rnd(13),
                                         0.3 * rnd(11, k), 0.3 * rnd(13, k), rnd(11))]
    g = rnd(M, 11)
    grads = torch.autograd.grad(hf.perturbed_linear(*args), args, g)
    for a, e in zip(grads, _oracle_grads(args, g)):
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("needs", [[True] * 7, [True, False, False, False, False, False, False],
                                   [False, False, True, True, False, True, False],
                                   [False, True, False, False, True, False, True]], ids=str)
def test_backward_op_masks_and_saved_intermediates(save, needs):
    x, W, r, s, U, V, b = rnd(9, 13), rnd(11, 13), rnd(11), rnd(13), rnd(11, 5), rnd(13, 5), rnd(11)
    g = rnd(9, 11)
    _, c, xv = torch.ops.halrp.perturbed_linear(x, W, r, s, U, V, b, save)
    assert (c.numel() > 0) == save
    got = torch.ops.halrp.perturbed_linear_backward(g, x, W, r, s, U, V, c, xv, True, needs)
    from halrp_fast import reference

    expected = reference.perturbed_linear_backward(g, x, W, r, s, U, V, c, xv, True, needs)
    for a, e, n in zip(got, expected, needs):
        assert a.shape == e.shape
        if n:
            assert_close(a, e.double(), torch.float32)


@pytest.mark.parametrize("k", [3, 100])
def test_mixed_backward_matches_oracle(k):
    ids = torch.tensor([3, 0, 2, 0, 1, 3, 3], device=DEVICE)
    x = rnd(7, 2, 13).requires_grad_()  # two rows per sample
    W = rnd(11, 13)
    banks = [b.requires_grad_() for b in (1 + 0.3 * rnd(5, 11), 1 + 0.3 * rnd(5, 13), 0.3 * rnd(5, 11, k),
                                          0.3 * rnd(5, 13, k), rnd(5, 11))]
    g = rnd(7, 2, 11)
    grads = torch.autograd.grad(hf.perturbed_linear_mt(x, ids, W, *banks), [x, *banks], g)
    leaves = [a.detach().double().requires_grad_() for a in (x, *banks)]
    ref = torch.autograd.grad(linear_mt(leaves[0], ids, W.double(), *leaves[1:]), leaves, g.double())
    for a, e in zip(grads, ref):
        assert_close(a, e, torch.float32)


@pytest.fixture
def tf32_if_interpreted():
    """TF32 allowed in the interpreter (which computes fp32 products exactly either way), as before elsewhere."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = before or INTERPRETED
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("k", [8, 40])  # fused (single task) and unfused
@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed"])
def test_large_row_tiles_match_oracle(k, mixed, tf32_if_interpreted):
    """M above LARGE_M takes the 128-row tiles where products run on tensor cores (fp32: with TF32 allowed, which
    the interpreter computes exactly; on a GPU fp32 keeps IEEE products and the 64 × 64 tiles, and the float16 test
    below takes the large ones): 128 × 128, or 128 × 64 for a mixed TF32 batch (two column tiles here); mixed batches
    take x V and g U from per-task GEMMs; forward and backward, odd sizes."""
    from halrp_fast.kernels.perturbed_linear import LARGE_M, linear_tiles

    M = LARGE_M + 37
    if INTERPRETED:
        tiles = linear_tiles(M, k, True, torch.float32, mixed=mixed, allow_tf32=True)
        assert (tiles.block_m, tiles.block_n) == ((128, 64) if mixed else (128, 128))
    x, W = rnd(M, 37).requires_grad_(), rnd(70, 37) / 37**0.5
    if mixed:
        ids = torch.randint(0, 4, (M,), device=DEVICE)
        banks = [b.requires_grad_() for b in (1 + 0.3 * rnd(4, 70), 1 + 0.3 * rnd(4, 37), 0.3 * rnd(4, 70, k),
                                              0.3 * rnd(4, 37, k), rnd(4, 70))]
        y = hf.perturbed_linear_mt(x, ids, W, *banks)
        leaves = [a.detach().double().requires_grad_() for a in (x, *banks)]
        expected = linear_mt(leaves[0], ids, W.double(), *leaves[1:])
    else:
        banks = [b.requires_grad_() for b in (1 + 0.3 * rnd(70), 1 + 0.3 * rnd(37), 0.3 * rnd(70, k),
                                              0.3 * rnd(37, k), rnd(70))]
        y = hf.perturbed_linear(x, W, *banks)
        leaves = [a.detach().double().requires_grad_() for a in (x, *banks)]
        expected = linear(leaves[0], W.double(), *leaves[1:])
    assert_close(y, expected, torch.float32)
    g = rnd(M, 70)
    grads = torch.autograd.grad(y, [x, *banks], g)
    for a, e in zip(grads, torch.autograd.grad(expected, leaves, g.double())):
        assert_close(a, e, torch.float32)


def test_large_row_tiles_low_precision():
    """The 128 × 128 tiles in float16: the rank-k product on tensor cores in the inputs' type, as PyTorch's
    (x V) Uᵀ — within the low-precision rule of the same math in PyTorch."""
    from halrp_fast.kernels.perturbed_linear import LARGE_M

    M = LARGE_M + 9
    a64 = [torch.randn(*shape, dtype=torch.float64) for shape in ((M, 40), (33, 40), (33,), (40,), (33, 8),
                                                                   (40, 8), (33,))]
    a64[1] /= 40**0.5
    expected = linear(*a64)
    x, W, r, s, U, V, b = (a.half().to(DEVICE) for a in a64)
    baseline = torch.nn.functional.linear(x * s, W) * r + (x @ V) @ U.T + b
    assert_low_precision(hf.perturbed_linear(x, W, r, s, U, V, b).cpu(), baseline.cpu(), expected)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_with_triton_provider(save):
    from torch.library import opcheck

    args = [a.requires_grad_() for a in (rnd(5, 7), rnd(4, 7), rnd(4), rnd(7), rnd(4, 3), rnd(7, 3), rnd(4))]
    opcheck(torch.ops.halrp.perturbed_linear.default, (*args, save))
    ids = torch.tensor([1, 0, 1, 1, 0], device=DEVICE)
    banks = [b.requires_grad_() for b in (rnd(2, 4), rnd(2, 7), rnd(2, 4, 3), rnd(2, 7, 3), rnd(2, 4))]
    opcheck(torch.ops.halrp.perturbed_linear_mt.default, (args[0], ids, args[1].detach(), *banks, save))
