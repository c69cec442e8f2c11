"""halrp_fast.perturbed_conv2d (the op halrp::perturbed_conv2d, and its merged-weight form) against the float64
oracle (explicit merged conv weight)."""
import functools

import pytest
import torch
from oracle import assert_close, assert_low_precision, conv
from torch.library import opcheck

import halrp_fast as hf
from halrp_fast import functional


@pytest.fixture(autouse=True, params=["factored", "merged"])
def form(request, monkeypatch, provider):
    """Every functional call runs in both forms: the factored op (on every provider) and the conv by the merged
    weight (no op: once)."""
    if request.param == "merged":
        provider.expect_calls = False
        if provider.name != "reference":
            pytest.skip("the merged form calls no provider: checked once, with 'reference'")
    monkeypatch.setattr(hf, "perturbed_conv2d",
                        functools.partial(functional.perturbed_conv2d, merged=request.param == "merged"))
    return request.param


def make(N, c_in, c_out, kh, kw, k, H=9, W=8, dtype=torch.float32, bias=True):
    g = dict(dtype=dtype)
    x = torch.randn(N, c_in, H, W, **g)
    Wt = torch.randn(c_out, c_in, kh, kw, **g) / (c_in * kh * kw) ** 0.5
    r = 1 + 0.3 * torch.randn(c_out, **g)
    s = 1 + 0.3 * torch.randn(c_in, **g)
    U = 0.3 * torch.randn(c_out, k, **g)
    V = 0.3 * torch.randn(c_in, k, **g)
    b = torch.randn(c_out, **g) if bias else None
    return x, Wt, r, s, U, V, b


GEOMETRIES = [
    dict(stride=1, padding=0, dilation=1),
    dict(stride=1, padding=1, dilation=1),
    dict(stride=2, padding=(1, 0), dilation=1),
    dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1)),  # dilated, padding past half the kernel
    dict(stride=3, padding=3, dilation=1),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 2)])
@pytest.mark.parametrize("k", [0, 1, 5])
def test_forward_matches_oracle(geo, kernel, k, provider):
    provider.require("perturbed_conv2d", torch.float32)
    args = make(3, 5, 7, *kernel, k)
    y = hf.perturbed_conv2d(*args, **geo)
    assert_close(y, conv(*args, **geo), torch.float32)


@pytest.mark.parametrize("N", [0, 1, 4])
@pytest.mark.parametrize("c_in,c_out,k", [(3, 2, 70), (11, 13, 2), (2, 17, 1)])
def test_shapes_and_ranks(N, c_in, c_out, k, provider):
    provider.require("perturbed_conv2d", torch.float64)
    args = make(N, c_in, c_out, 3, 3, k, dtype=torch.float64)
    y = hf.perturbed_conv2d(*args, padding=1)
    assert y.shape == (N, c_out, 9, 8)
    assert_close(y, conv(*args, padding=1), torch.float64)


def test_rank_larger_than_channels_pools_input_first(provider):
    provider.require("perturbed_conv2d", torch.float32)
    # k > C_in takes the branch that sums the input window before the V product.
    args = make(2, 3, 4, 3, 3, 9)
    assert_close(hf.perturbed_conv2d(*args, stride=2, padding=1), conv(*args, stride=2, padding=1), torch.float32)


def test_channels_last_and_non_contiguous(provider):
    provider.require("perturbed_conv2d", torch.float32)
    x, W, r, s, U, V, b = make(2, 6, 4, 3, 3, 3, H=10, W=10)
    xc = x.to(memory_format=torch.channels_last)
    assert_close(hf.perturbed_conv2d(xc, W, r, s, U, V, b, padding=1), conv(x, W, r, s, U, V, b, padding=1),
                 torch.float32)
    xs = torch.randn(2, 6, 10, 20)[..., ::2]
    Ut = torch.randn(3, 4).T
    assert_close(hf.perturbed_conv2d(xs, W, r, s, Ut, V, b), conv(xs, W, r, s, Ut, V, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(dtype, provider):
    provider.require("perturbed_conv2d", dtype)
    args64 = [a.double() for a in make(2, 6, 5, 3, 3, 3, dtype=torch.float64)]
    expected = conv(*args64, padding=1)
    low = [a.to(dtype) for a in args64]
    y = hf.perturbed_conv2d(*low, padding=1)
    x, W, r, s, U, V, b = low
    merged = r[:, None, None, None] * W * s[:, None, None] + (U @ V.T)[:, :, None, None]
    baseline = torch.nn.functional.conv2d(x, merged, b, padding=1)
    assert_low_precision(y, baseline, expected)


@pytest.mark.parametrize("geo", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[3]], ids=str)
@pytest.mark.parametrize("k", [0, 2])
def test_gradcheck_float64(geo, k, provider):
    provider.require("perturbed_conv2d", torch.float64)
    args = [a.requires_grad_() for a in make(2, 3, 4, 3, 2, k, H=6, W=5, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: hf.perturbed_conv2d(*a, **geo), tuple(args))


def test_gradients_match_oracle_autograd(provider):
    provider.require("perturbed_conv2d", torch.float64)
    args = [a.requires_grad_() for a in make(3, 4, 5, 3, 3, 3, dtype=torch.float64)]
    y = hf.perturbed_conv2d(*args, stride=2, padding=1)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    ref = torch.autograd.grad(conv(*leaves, stride=2, padding=1), leaves, g)
    for a, e in zip(grads, ref):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("which", range(7), ids=["x", "W", "r", "s", "U", "V", "b"])
def test_one_input_needs_a_gradient(which, provider):
    """Each gradient on its own (the backward skips the work of the others)."""
    provider.require("perturbed_conv2d", torch.float64)
    args = list(make(3, 4, 5, 3, 3, 2, dtype=torch.float64))
    args[which] = args[which].clone().requires_grad_()
    y = hf.perturbed_conv2d(*args, padding=1)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, [args[which]], g)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    expected = torch.autograd.grad(conv(*leaves, padding=1), leaves[which], g)[0]
    assert_close(grad, expected, torch.float64)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck(save, provider):
    provider.require("perturbed_conv2d", torch.float64)
    args = [a.requires_grad_() for a in make(2, 3, 4, 3, 3, 2, H=6, W=6, dtype=torch.float64)]
    opcheck(torch.ops.halrp.perturbed_conv2d.default, (*args, save, [2, 1], [1, 1], [1, 2]))
    x, W, r, s, U, V, b = [a.detach() for a in args]
    opcheck(torch.ops.halrp.perturbed_conv2d.default, (x, W, r, s, U, V, None, save, [1, 1], [0, 0], [1, 1]))
    g = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    geo = ([1, 1], [1, 1], [1, 1])
    _, c, pooled = torch.ops.halrp.perturbed_conv2d(x, W, r, s, U, V, b, save, *geo)
    opcheck(torch.ops.halrp.perturbed_conv2d_backward.default, (g, x, W, r, s, U, V, c, pooled, True, *geo, [True] * 7))


def test_saved_and_recomputed_intermediates_give_the_same_gradients(provider):
    provider.require("perturbed_conv2d", torch.float64)
    x, W, r, s, U, V, b = make(2, 3, 4, 3, 3, 5, dtype=torch.float64)
    geo = ([2, 1], [1, 1], [1, 1])
    y, c, pooled = torch.ops.halrp.perturbed_conv2d(x, W, r, s, U, V, b, True, *geo)
    assert pooled.shape == (2, 5, *y.shape[2:]) and c.shape == y.shape
    g = torch.randn_like(y)
    empty = x.new_empty(0)
    op = torch.ops.halrp.perturbed_conv2d_backward
    saved = op(g, x, W, r, s, U, V, c, pooled, True, *geo, [True] * 7)
    recomputed = op(g, x, W, r, s, U, V, empty, empty, True, *geo, [True] * 7)
    for a, e in zip(saved, recomputed):
        torch.testing.assert_close(a, e)


def test_torch_compile_no_graph_break(provider):
    provider.require("perturbed_conv2d", torch.float32)
    args = make(2, 3, 4, 3, 3, 2)
    f = torch.compile(lambda *a: hf.perturbed_conv2d(*a, stride=2, padding=1), fullgraph=True, backend="aot_eager")
    assert_close(f(*args), conv(*args, stride=2, padding=1), torch.float32)
