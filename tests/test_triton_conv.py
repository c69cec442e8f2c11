"""Triton conv epilogue (HALRP_FAST_BACKEND=triton) against the float64 oracle, in the interpreter or on a GPU."""
import pytest
import torch
from oracle import assert_close, conv, conv_mt
from triton_env import DEVICE, INTERPRETED, use_triton  # noqa: F401  (autouse fixture)

import halrp_fast as hf

pytestmark = pytest.mark.triton


def rnd(*shape):
    return torch.randn(*shape, device=DEVICE)


def test_env_report_names_triton_for_conv():
    assert f"perturbed_conv2d               {DEVICE:<5} -> triton" in hf.env_report()


@pytest.mark.parametrize("N", [0, 1, 3])
@pytest.mark.parametrize("c_in,c_out", [(3, 5), (7, 67)])
@pytest.mark.parametrize("k", [0, 1, 40])
@pytest.mark.parametrize("geo", [dict(stride=1, padding=1, dilation=1), dict(stride=(2, 1), padding=(2, 0),
                                                                             dilation=(2, 1))], ids=str)
def test_single_task_matches_oracle(N, c_in, c_out, k, geo):
    args = (rnd(N, c_in, 9, 7), rnd(c_out, c_in, 3, 3) / 5, 1 + 0.3 * rnd(c_out), 1 + 0.3 * rnd(c_in),
            0.3 * rnd(c_out, k), 0.3 * rnd(c_in, k), rnd(c_out))
    y = hf.perturbed_conv2d(*args, **geo)
    if N:
        assert_close(y, conv(*args, **geo), torch.float32)
    else:
        assert y.shape[0] == 0


def test_no_bias_channels_last_input():
    x = rnd(2, 4, 8, 8).to(memory_format=torch.channels_last)
    args = (x, rnd(6, 4, 3, 3), rnd(6), rnd(4), rnd(6, 2), rnd(4, 2))
    assert_close(hf.perturbed_conv2d(*args, padding=1), conv(*args, padding=1), torch.float32)


def test_poisoned_output_is_fully_written():
    from halrp_fast.kernels.perturbed_conv2d import conv_epilogue

    c, pooled = rnd(2, 19, 5, 3), rnd(2, 3, 5, 3)
    r, U, b = rnd(19), rnd(19, 3), rnd(19)
    out = torch.full_like(c, float("nan"))
    conv_epilogue(c, pooled, r, U, b, out=out)
    expected = c * r[:, None, None] + torch.einsum("ok,nkhw->nohw", U, pooled) + b[:, None, None]
    assert_close(out, expected.double(), torch.float32)


@pytest.mark.parametrize("ids", [[1, 0, 1, 2], [2, 2], [0]], ids=str)
def test_mixed_matches_oracle(ids):
    task_ids = torch.tensor(ids, device=DEVICE)
    x, W = rnd(len(ids), 3, 7, 6), rnd(5, 3, 3, 3) / 5
    banks = (1 + 0.3 * rnd(3, 5), 1 + 0.3 * rnd(3, 3), 0.3 * rnd(3, 5, 4), 0.3 * rnd(3, 3, 4), rnd(3, 5))
    y = hf.perturbed_conv2d_mt(x, task_ids, W, *banks, stride=2, padding=1)
    assert_close(y, conv_mt(x, task_ids, W, *banks, stride=2, padding=1), torch.float32)


def test_gradients_use_the_saved_intermediates():
    args = [a.requires_grad_() for a in (rnd(2, 3, 6, 6), rnd(4, 3, 3, 3), rnd(4), rnd(3), rnd(4, 2), rnd(3, 2),
                                         rnd(4))]
    y = hf.perturbed_conv2d(*args, padding=1)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    leaves = [a.detach().double().requires_grad_() for a in args]
    ref = torch.autograd.grad(conv(*leaves, padding=1), leaves, g.double())
    for a, e in zip(grads, ref):
        assert_close(a, e, torch.float32)
