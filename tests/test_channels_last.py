"""Channels-last layout: the conv ops keep it (outputs and gradients in the layouts their fake kernels state, values
equal to the float64 oracle), and a learner run in channels-last equals the same run in the default layout."""
import pytest
import torch
from oracle import assert_close, conv, conv_mt
from torch.library import opcheck

import halrp_fast as hf
from halrp_fast.continual import HALRPConfig, HALRPLearner
from halrp_fast.ops import layout_of

CL, NCHW = torch.channels_last, torch.contiguous_format
LAYOUTS = [(NCHW, CL), (CL, NCHW), (CL, CL)]


def make(N=3, c_in=5, c_out=7, kernel=3, k=4, H=9, dtype=torch.float32, tasks=None):
    g = dict(dtype=dtype)
    bank = () if tasks is None else (tasks,)
    x = torch.randn(N, c_in, H, H + 1, **g)
    W = torch.randn(c_out, c_in, kernel, kernel, **g) / (c_in * kernel * kernel) ** 0.5
    r = 1 + 0.3 * torch.randn(*bank, c_out, **g)
    s = 1 + 0.3 * torch.randn(*bank, c_in, **g)
    U = 0.3 * torch.randn(*bank, c_out, k, **g)
    V = 0.3 * torch.randn(*bank, c_in, k, **g)
    b = torch.randn(*bank, c_out, **g)
    return x, W, r, s, U, V, b


def expected_layout(x_layout, w_layout):
    return CL if CL in (x_layout, w_layout) else NCHW


def check_layouts(layouts, op, oracle, x, W, banks, ids=(), **geo):
    """``op`` on ``x``, ``W`` stored in ``layouts`` against ``oracle`` on the plain tensors: values, gradients of
    ``x`` and every bank, the layout of ``y`` and of ``dx``."""
    xl, Wl = x.contiguous(memory_format=layouts[0]), W.contiguous(memory_format=layouts[1])
    leaves = [t.clone().requires_grad_() for t in (xl, *banks)]
    y = op(leaves[0], *ids, Wl, *leaves[1:], **geo)
    assert layout_of(y) == expected_layout(*layouts)
    ref_leaves = [t.clone().requires_grad_() for t in (x, *banks)]
    y_ref = oracle(ref_leaves[0], *ids, W, *ref_leaves[1:], **geo)
    assert_close(y, y_ref, torch.float64)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert layout_of(leaves[0].grad) == layouts[0]
    for a, e in zip(leaves, ref_leaves, strict=True):
        assert_close(a.grad, e.grad, torch.float64)


@pytest.mark.parametrize("layouts", LAYOUTS, ids=str)
def test_single_task_forward_and_gradients(layouts):
    x, W, *banks = make(dtype=torch.float64)
    check_layouts(layouts, hf.perturbed_conv2d, conv, x, W, banks, stride=2, padding=1)


@pytest.mark.parametrize("layouts", LAYOUTS, ids=str)
def test_mixed_task_forward_and_gradients(layouts):
    x, W, *banks = make(N=5, tasks=3, dtype=torch.float64)
    ids = torch.tensor([2, 0, 2, 1, 0])
    check_layouts(layouts, hf.perturbed_conv2d_mt, conv_mt, x, W, banks, (ids,), padding=1)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_channels_last(save):
    """The fake kernels state the real outputs' strides (what torch.compile relies on)."""
    x, W, r, s, U, V, b = make(N=2, c_in=3, c_out=4, H=6, dtype=torch.float64)
    geo = ([1, 1], [1, 1], [1, 1])
    for xl, Wl in [(x.contiguous(memory_format=a), W.contiguous(memory_format=w)) for a, w in LAYOUTS]:
        args = [t.clone().requires_grad_() for t in (xl, Wl, r, s, U, V, b)]
        opcheck(torch.ops.halrp.perturbed_conv2d.default, (*args, save, *geo))
        _, c, pooled = torch.ops.halrp.perturbed_conv2d(xl, Wl, r, s, U, V, b, True, *geo)
        g = torch.randn(2, 4, 6, 7, dtype=torch.float64).contiguous(memory_format=layout_of(c))
        opcheck(torch.ops.halrp.perturbed_conv2d_backward.default,
                (g, xl, Wl, r, s, U, V, c, pooled, True, *geo, [True] * 7))
    x, W, R, S, U, V, B = make(N=3, c_in=3, c_out=4, H=6, tasks=2, dtype=torch.float64)
    ids = torch.tensor([1, 0, 1])
    opcheck(torch.ops.halrp.perturbed_conv2d_mt.default,
            (x.contiguous(memory_format=CL), ids, W, R, S, U, V, B, save, *geo))


def test_compiled_model_in_channels_last_matches_eager():
    """Inductor lays out the code around the ops from the fake kernels' strides: a wrong one gives wrong numbers."""
    torch.manual_seed(0)
    model = hf.convert(hf.models.lenet(3, 16, 5)).to(memory_format=CL)
    t = model.add_task(5)
    for L in model.perturbed_layers().values():
        with torch.no_grad():
            L.r[str(t)].normal_(1, 0.2)
            L.s[str(t)].normal_(1, 0.2)
        L.set_rank(t, 0.1 * torch.randn(L.out_features, 3), 0.1 * torch.randn(L.in_features, 3))
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(lambda x: model(x, t))
    torch.testing.assert_close(compiled(x), model(x, t), rtol=1e-4, atol=1e-4)


def digits_stream(n_tasks=2, per_task=120):
    g = torch.Generator().manual_seed(0)
    for t in range(n_tasks):
        x = torch.randn(per_task, 3, 12, 12, generator=g)
        y = (x[:, t % 3].mean((1, 2)) > 0).long() + 2 * (x[:, (t + 1) % 3].mean((1, 2)) > 0).long()
        yield [(x[i:i + 40], y[i:i + 40]) for i in range(0, per_task, 40)]


#: float64: float32 summation-order differences between the layouts grow over the training steps to ~4e-5 of a
#: weight (more than the base comparison below allows); in float64 the layouts stay ~1e-15 apart
DTYPE = "float64"


def run(channels_last):
    torch.manual_seed(0)
    # SGD: Adam's normalised steps turn summation-order differences of near-zero gradients into steps of ~lr
    cfg = HALRPConfig(epochs=2, est_rank_epochs=1, channels_last=channels_last, upper_rank=4, seed=0,
                      optimizer="sgd", lr=0.05, dtype=DTYPE)
    learner = HALRPLearner(hf.models.lenet(3, 12, 4), cfg)
    loaders = list(digits_stream())
    for loader in loaders:
        learner.learn_task(loader, num_classes=4)
    return learner, loaders


def test_learner_in_channels_last_equals_the_default_layout():
    fast, loaders = run(True)
    plain, _ = run(False)
    convs = [n for n, L in fast.model.perturbed_layers().items() if L.weight.dim() == 4]
    assert convs and all(layout_of(fast.model.perturbed_layers()[n].weight) == CL for n in convs)
    assert all(layout_of(plain.model.perturbed_layers()[n].weight) == NCHW for n in convs)
    assert fast.model.ranks(1) == plain.model.ranks(1)
    # the base: only summation order differs
    a, b = fast.model.task_state_dict(0), plain.model.task_state_dict(0)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # task 1 went through two trainings and a rank-k truncation, which amplify summation-order differences: the
    # same run on 1 thread instead of 2 (default layout) moves these merged weights by up to 0.7 % of their
    # largest entry and the logits by 0.03; a layout error would move them by O(1)
    for name, layer in fast.model.perturbed_layers().items():
        merged, expected = layer.merged_weight(1), plain.model.perturbed_layers()[name].merged_weight(1)
        torch.testing.assert_close(merged, expected, rtol=0, atol=2e-2 * expected.abs().max().item(), msg=name)
    x = loaders[1][0][0].double()
    torch.testing.assert_close(fast.model.eval()(x, 1), plain.model.eval()(x, 1), rtol=0, atol=0.1)
    exported = fast.export_task(1)
    assert layout_of(exported.features[0].weight) == CL
    torch.testing.assert_close(exported(x), fast.model(x, 1), rtol=1e-5, atol=1e-5)


def test_channels_last_default_follows_device_and_network():
    assert HALRPConfig().memory_format(has_conv=True) == CL
    assert HALRPConfig().memory_format(has_conv=False) == torch.preserve_format
    assert HALRPConfig(device="cuda").memory_format(has_conv=True) == torch.preserve_format
    assert HALRPConfig(device="cuda", channels_last=True).memory_format(has_conv=True) == CL
    assert HALRPConfig(channels_last=False).memory_format(has_conv=True) == torch.preserve_format
    assert HALRPConfig.from_dict(HALRPConfig(channels_last=True).to_dict()).channels_last is True
    with pytest.raises(TypeError, match="channels_last"):
        HALRPConfig(channels_last="yes")
