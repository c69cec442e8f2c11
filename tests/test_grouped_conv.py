"""Grouped and depthwise convs (``groups = G > 1``): the block-diagonal case of the conv math.

Every check compares against an independent float64 formulation: the grouped conv as the dense conv of its
block-diagonal weight, task ``t``'s weight being ``diag(r) W_dense diag(s) + M ⊙ (U Vᵀ)`` (``M`` the block mask),
computed with ``groups=1``.  Provider: none — grouped convs always run through PyTorch's grouped conv with the task's
merged weight (no fused op), so these tests check the module's own math.
"""
import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close
from torch import nn

import halrp_fast as hf
from halrp_fast.continual.allocation import allocate_ranks, lowrank_init
from halrp_fast.linalg import discrepancy, fit_scalings, layer_spectra
from halrp_fast.nn import TaskConv2d

# (C_in, C_out, groups, kernel, stride, padding, dilation)
SHAPES = [
    (6, 9, 3, 3, 1, 1, 1),      # grouped
    (5, 5, 5, 3, 2, 1, 1),      # depthwise
    (4, 8, 4, 5, 1, 2, 2),      # depthwise with multiplier 2, dilated
    (8, 6, 2, (3, 1), (2, 1), (1, 0), 1),  # odd kernel, stride
]


def _block_mask(c_out, c_in, groups, dtype=torch.float64):
    return torch.block_diag(*[torch.ones(c_out // groups, c_in // groups, dtype=dtype)] * groups)


def _dense(W, groups):
    """(C_out, C_in/G, kh, kw) → the block-diagonal (C_out, C_in, kh, kw)."""
    c_out, c_in_g = W.shape[:2]
    out = W.new_zeros(c_out, c_in_g * groups, *W.shape[2:])
    a = c_out // groups
    for g in range(groups):
        out[g * a:(g + 1) * a, g * c_in_g:(g + 1) * c_in_g] = W[g * a:(g + 1) * a]
    return out


def _oracle(x, W, r, s, U, V, b, groups, stride, padding, dilation):
    c_out, c_in = W.shape[0], W.shape[1] * groups
    Wd = _dense(W.double(), groups)
    lowrank = _block_mask(c_out, c_in, groups) * (U.double() @ V.double().T)
    Wt = r.double()[:, None, None, None] * Wd * s.double()[None, :, None, None] + lowrank[:, :, None, None]
    return F.conv2d(x.double(), Wt, None if b is None else b.double(), stride, padding, dilation)


def _layer(shape, k, bias=True, seed=0):
    c_in, c_out, groups, kernel, stride, padding, dilation = shape
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=bias)
    layer = TaskConv2d.from_conv(conv)
    t = layer.add_task()
    layer.set_rank(t, 0.3 * torch.randn(c_out, k), 0.3 * torch.randn(c_in, k))
    with torch.no_grad():
        layer.r[str(t)].add_(0.2 * torch.randn(c_out))
        layer.s[str(t)].add_(0.2 * torch.randn(c_in))
        if bias:
            layer.task_bias[str(t)].add_(torch.randn(c_out))
    return layer, t


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 70])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_grouped_conv_single_task_matches_the_block_diagonal_oracle(shape, k, grad):
    layer, t = _layer(shape, k)
    x = torch.randn(3, shape[0], 9, 8)[:, :, :, 1:]  # non-contiguous
    with torch.set_grad_enabled(grad):
        out = layer(x, t)
    expected = _oracle(x, layer.weight, *layer.task_tensors(t), *(shape[2:3] + shape[4:]))
    assert_close(out, expected, torch.float32)
    assert layer.groups == shape[2] and layer.in_features == shape[0]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grouped_conv_gradients_equal_float64_autograd_through_the_oracle(shape):
    layer, t = _layer(shape, 2)
    layer = layer.double()
    x = torch.randn(2, shape[0], 7, 6, dtype=torch.float64)
    probe = torch.randn_like(layer(x, t))
    (layer(x, t) * probe).sum().backward()
    params = [p.detach().clone().requires_grad_(True) for p in layer.task_tensors(t)]
    (_oracle(x, layer.weight, *params, *(shape[2:3] + shape[4:])) * probe).sum().backward()
    for got, ref in zip(layer.task_tensors(t), params, strict=True):
        assert_close(got.grad, ref.grad, torch.float64)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("grouped_layout", [False, True])
def test_grouped_convs_in_a_model_mixed_batches_equal_single_task_rows(grad, grouped_layout):
    """A depthwise-separable block: mixed batches (rows, and the grouped layout of a whole network) equal each task's
    single-task rows; export_task equals model(x, t); a state-dict round trip keeps every task."""
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                             nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 12, 1, groups=2, bias=False), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))

    model = hf.convert(build(), head="9", grouped_mixed_batches=grouped_layout)
    ts = [model.add_task(4), model.add_task(4)]
    gen = torch.Generator().manual_seed(1)
    for t in ts:
        for layer in model.perturbed_layers().values():
            layer.set_rank(t, 0.2 * torch.randn(layer.out_features, 2, generator=gen),
                           0.2 * torch.randn(layer.in_features, 2, generator=gen))
            with torch.no_grad():
                layer.r[str(t)].add_(0.1 * torch.randn(layer.out_features, generator=gen))
    x = torch.randn(6, 3, 8, 8)
    ids = torch.tensor([2, 0, 1, 2, 1, 0])
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.set_grad_enabled(grad):
            mixed = model(x, ids)
            for t in (0, 1, 2):
                rows = ids == t
                if mode == "train":  # batch statistics: the single-task batch is the task's rows
                    assert_close(mixed[rows], model(x[rows], t), torch.float32)
                else:
                    assert_close(mixed[rows], model(x, t)[rows], torch.float32)
    model.eval()
    with torch.no_grad():
        for t in (1, 2):
            assert_close(model.export_task(t).eval()(x), model(x, t), torch.float32)
        fresh = hf.convert(build(), head="9")
        fresh.add_task(4), fresh.add_task(4)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.eval()(x, 2), model(x, 2))
    exported = model.export_task(1)
    assert [m.groups for m in exported.modules() if isinstance(m, nn.Conv2d)] == [1, 6, 2]


@pytest.mark.parametrize("method", ["least_squares", "authors"])
def test_grouped_scalings_and_discrepancy_are_those_of_the_block_diagonal_weight(method):
    torch.manual_seed(0)
    groups, W = 3, torch.randn(9, 2, 3, 3, dtype=torch.float64)
    Wf = 1.3 * W + 0.1 * torch.randn_like(W)
    r, s = fit_scalings(Wf, W, method, groups=groups)
    if method == "least_squares":
        r_dense, s_dense = fit_scalings(_dense(Wf, groups), _dense(W, groups))
        assert_close(r, r_dense, torch.float64)
        assert_close(s, s_dense, torch.float64)
    assert s.shape == (6,)
    D = discrepancy(Wf, W, r, s, groups=groups)
    dense = discrepancy(_dense(Wf, groups), _dense(W, groups), r, s)
    assert D.shape == (3, 3, 2)
    assert_close(torch.block_diag(*D), dense, torch.float64)
    assert_close(dense * (1 - _block_mask(9, 6, groups)), torch.zeros_like(dense), torch.float64)


@pytest.mark.parametrize("method", ["exact", "rsvd"])
def test_grouped_spectrum_initialises_every_block_to_its_best_rank_k_fit(method):
    torch.manual_seed(0)
    D = torch.randn(4, 6, 5, dtype=torch.float64)
    sp = layer_spectra({"g": D}, {"g": 5}, method)["g"]
    assert sp.rank_limit == 5 and sp.complete
    for k in (1, 2, 5):
        U, V = lowrank_init(sp, k)
        for g in range(4):
            u, sv, vh = torch.linalg.svd(D[g], full_matrices=False)
            best = u[:, :k] * sv[:k] @ vh[:k]
            assert_close(U[6 * g:6 * g + 6] @ V[5 * g:5 * g + 5].T, best, torch.float64)
    expected = torch.linalg.svdvals(D).pow(2).sum(0).sqrt()
    assert_close(sp.S, expected, torch.float64)
    assert sp.energy == pytest.approx(float(D.pow(2).sum()))


def test_a_depthwise_layer_takes_at_most_rank_one():
    torch.manual_seed(0)
    mats = {"dw": torch.randn(16, 1, 1, dtype=torch.float64), "dense": torch.randn(5, 4, dtype=torch.float64)}
    spectra = layer_spectra(mats)
    alloc = allocate_ranks(spectra, {"dw": 1.0, "dense": 1e-6}, {"dw": 9, "dense": 1}, 0.99, 8)
    assert alloc.ranks["dw"] == 1 and spectra["dw"].rank_limit == 1


def test_learner_runs_on_a_depthwise_separable_network():
    """The whole method on a network of grouped and depthwise convs: ranks within each layer's per-group limit, the
    task's model reproduces its accuracy after export."""
    from halrp_fast.continual import HALRPConfig, HALRPLearner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 3))
    data = []
    for _ in range(2):
        xs = torch.randn(48, 1, 8, 8)
        ys = torch.randint(0, 3, (48,))
        batches = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 48, 16)]
        data.append(batches)
    cfg = HALRPConfig(epochs=2, seed=0)
    learner = HALRPLearner(hf.convert(net, head="8"), cfg)
    for batches in data:
        learner.learn_task(batches, batches, num_classes=3)
    ranks = learner.model.ranks(1)
    assert ranks["2"] == 1  # depthwise: one rank per group at most
    assert 1 <= ranks["4"] <= 4
    x = data[1][0][0]
    with torch.no_grad():
        assert_close(learner.model.export_task(1).eval()(x), learner.model.eval()(x, 1), torch.float32)
