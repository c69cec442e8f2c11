"""halrp::perturbed_linear against the float64 oracle: values, gradients, opcheck, awkward inputs."""
import pytest
import torch
from oracle import assert_close, assert_low_precision, linear
from torch.library import opcheck

import halrp_fast as hf


def make(M, n_in, n_out, k, dtype=torch.float32, bias=True, lead=()):
    g = dict(dtype=dtype)
    x = torch.randn(*lead, M, n_in, **g)
    W = torch.randn(n_out, n_in, **g) / n_in**0.5
    r = 1 + 0.3 * torch.randn(n_out, **g)
    s = 1 + 0.3 * torch.randn(n_in, **g)
    U = torch.randn(n_out, k, **g) * 0.3
    V = torch.randn(n_in, k, **g) * 0.3
    b = torch.randn(n_out, **g) if bias else None
    return x, W, r, s, U, V, b


@pytest.mark.parametrize("M", [0, 1, 7, 65])
@pytest.mark.parametrize("n_in,n_out", [(13, 11), (31, 37), (64, 5)])
@pytest.mark.parametrize("k", [0, 1, 3, 17, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_oracle(M, n_in, n_out, k, dtype, provider):
    provider.require("perturbed_linear", dtype)
    args = make(M, n_in, n_out, k, dtype)
    y = hf.perturbed_linear(*args)
    assert y.shape == (M, n_out) and y.dtype == dtype
    assert_close(y, linear(*args), dtype)


@pytest.mark.parametrize("k", [0, 1, 8, 24, 40])
@pytest.mark.parametrize("n_in,n_out", [(7, 3), (29, 37), (301, 1001)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (1, 1)])
def test_one_row_values_and_gradients_match_oracle(k, n_in, n_out, bias, lead, provider):
    """One row (the serving case; cpp: the fused row kernels, four outputs at a time with an odd tail, the
    vectorised rank forms at 8-32, outputs split over threads at 1001×301), as (in,), (1, in) and (1, 1, in), forward
    and backward (the saved intermediates) against the float64 oracle."""
    provider.require("perturbed_linear", torch.float32)
    args = list(make(1, n_in, n_out, k, bias=bias))
    args[0] = args[0].reshape(*lead, n_in)
    y = hf.perturbed_linear(*args)
    assert y.shape == (*lead, n_out)
    assert_close(y, linear(*args), torch.float32)
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    grad = torch.randn(*lead, n_out)
    hf.perturbed_linear(*leaves).backward(grad)
    expected = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    linear(*expected).backward(grad.double())
    for name, got, want in zip("x W r s U V b".split(), leaves, expected, strict=True):
        if got is not None:
            try:
                assert_close(got.grad, want.grad, torch.float32)
            except AssertionError as err:
                raise AssertionError(f"gradient of {name}: {err}") from None


def test_no_bias_and_leading_dims(provider):
    provider.require("perturbed_linear", torch.float32)
    x, W, r, s, U, V, _ = make(5, 9, 4, 2, lead=(3, 2))
    y = hf.perturbed_linear(x, W, r, s, U, V)
    assert y.shape == (3, 2, 5, 4)
    assert_close(y, linear(x, W, r, s, U, V), torch.float32)


def test_one_dimensional_input(provider):
    provider.require("perturbed_linear", torch.float32)
    x, W, r, s, U, V, b = make(1, 9, 4, 2)
    y = hf.perturbed_linear(x[0], W, r, s, U, V, b)
    assert y.shape == (4,)
    assert_close(y, linear(x[0], W, r, s, U, V, b), torch.float32)


def test_non_contiguous_inputs(provider):
    provider.require("perturbed_linear", torch.float32)
    x, W, r, s, U, V, b = make(8, 12, 6, 3)
    xt = torch.randn(12, 16)[:, ::2].T  # (8, 12), strided
    Wt = torch.randn(12, 6).T  # transposed weight
    Ut = torch.randn(3, 6).T
    Vt = torch.randn(24, 3)[::2]
    assert not (xt.is_contiguous() or Wt.is_contiguous() or Ut.is_contiguous() or Vt.is_contiguous())
    y = hf.perturbed_linear(xt, Wt, r, s, Ut, Vt, b)
    assert_close(y, linear(xt, Wt, r, s, Ut, Vt, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(dtype, provider):
    provider.require("perturbed_linear", dtype)
    args64 = [a.double() for a in make(33, 40, 24, 5, torch.float64)]
    expected = linear(*args64)
    low = [a.to(dtype) for a in args64]
    y = hf.perturbed_linear(*low)
    assert y.dtype == dtype
    x, W, r, s, U, V, b = low
    baseline = torch.nn.functional.linear(x, (r[:, None] * W * s) + U @ V.T, b)  # same math, merged, at dtype
    assert_low_precision(y, baseline, expected)


@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(k, bias, provider):
    provider.require("perturbed_linear", torch.float64)
    args = [None if a is None else a.requires_grad_() for a in make(4, 6, 5, k, torch.float64, bias=bias)]
    assert torch.autograd.gradcheck(lambda *a: hf.perturbed_linear(*a), tuple(args))


def test_gradients_match_oracle_autograd(provider):
    provider.require("perturbed_linear", torch.float64)
    args = [a.requires_grad_() for a in make(9, 11, 7, 3, torch.float64)]
    g = torch.randn(9, 7, dtype=torch.float64)
    grads = torch.autograd.grad(hf.perturbed_linear(*args), args, g)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    ref = torch.autograd.grad(linear(*leaves), leaves, g)
    for a, e in zip(grads, ref):
        torch.testing.assert_close(a, e)


def test_partial_gradients_frozen_weight(provider):
    provider.require("perturbed_linear", torch.float64)
    x, W, r, s, U, V, b = make(6, 8, 5, 2, torch.float64)
    U.requires_grad_()
    x.requires_grad_()
    y = hf.perturbed_linear(x, W, r, s, U, V, b)
    y.sum().backward()
    assert W.grad is None and r.grad is None and U.grad is not None and x.grad is not None


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("save", [True, False])
def test_opcheck(k, save, provider):
    provider.require("perturbed_linear", torch.float64)
    args = [a.requires_grad_() for a in make(5, 7, 4, k, torch.float64)]
    opcheck(torch.ops.halrp.perturbed_linear.default, (*args, save))
    opcheck(torch.ops.halrp.perturbed_linear.default, (*[a.detach() for a in args[:-1]], None, save))


def test_opcheck_backward_op(provider):
    provider.require("perturbed_linear", torch.float64)
    x, W, r, s, U, V, b = make(5, 7, 4, 2, torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    _, c, xv = torch.ops.halrp.perturbed_linear(x, W, r, s, U, V, b, True)
    empty = x.new_empty(0)
    op = torch.ops.halrp.perturbed_linear_backward.default
    opcheck(op, (g, x, W, r, s, U, V, c, xv, True, [True] * 7))
    opcheck(op, (g, x, W, r, s, U, V, empty, empty, False, [False, False, True, True, False, True, False]))


@pytest.mark.parametrize("k", [0, 4])
def test_saved_and_recomputed_intermediates_give_the_same_gradients(k, provider):
    provider.require("perturbed_linear", torch.float64)
    x, W, r, s, U, V, b = make(6, 9, 5, k, torch.float64, lead=(2,))
    g = torch.randn(2, 6, 5, dtype=torch.float64)
    y, c, xv = torch.ops.halrp.perturbed_linear(x, W, r, s, U, V, b, True)
    y2, c0, xv0 = torch.ops.halrp.perturbed_linear(x, W, r, s, U, V, b, False)
    assert c.shape == (2, 6, 5) and xv.shape == (2, 6, k) and c0.numel() == 0 and xv0.numel() == 0
    torch.testing.assert_close(y, y2)
    needs = [True] * 7
    saved = torch.ops.halrp.perturbed_linear_backward(g, x, W, r, s, U, V, c, xv, True, needs)
    recomputed = torch.ops.halrp.perturbed_linear_backward(g, x, W, r, s, U, V, c0, xv0, True, needs)
    for a, e in zip(saved, recomputed):
        torch.testing.assert_close(a, e)


def test_torch_compile_no_graph_break(provider):
    provider.require("perturbed_linear", torch.float32)
    args = make(6, 8, 5, 2)
    compiled = torch.compile(lambda *a: hf.perturbed_linear(*a), fullgraph=True, backend="aot_eager")
    assert_close(compiled(*args), linear(*args), torch.float32)
