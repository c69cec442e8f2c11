"""Each step of the rank estimation against small hand-computed cases."""
import pytest
import torch
from torch import nn

import halrp_fast as hf
from halrp_fast.continual import allocate_ranks, empirical_fisher, lowrank_init
from halrp_fast.linalg import LayerSpectrum, discrepancy, fit_scalings, layer_spectra


def test_scalings_and_discrepancy_by_hand():
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    Wf = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    r, s = fit_scalings(Wf, W)
    # r_0 = <[2,1],[1,0]>/1 = 2;  r_1 = <[0,3],[1,1]>/2 = 1.5
    torch.testing.assert_close(r, torch.tensor([2.0, 1.5]))
    # rW = [[2,0],[1.5,1.5]];  s_0 = (2·2 + 1.5·0)/(4 + 2.25) = 0.64;  s_1 = (1.5·3)/2.25 = 2
    torch.testing.assert_close(s, torch.tensor([0.64, 2.0]))
    torch.testing.assert_close(discrepancy(Wf, W, r, s), torch.tensor([[0.72, 1.0], [-0.96, 0.0]]))


def test_scalings_3x4_recover_exact_row_scaling():
    W = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 1.0, 1.0]])
    r_true = torch.tensor([2.0, -1.0, 0.5])
    r, s = fit_scalings(r_true[:, None] * W, W)
    torch.testing.assert_close(r, r_true)
    torch.testing.assert_close(s, torch.ones(4))
    assert discrepancy(r_true[:, None] * W, W, r, s).abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3, 3)], ids=["linear", "conv"])
def test_authors_scalings_reproduce_their_broadcast_loop(shape):
    """``scalings="authors"``: the authors' estimate_ranks loop, restated with its view shapes, on float64.  Their
    ``r.view(-1, 1) * W[:, i]`` is an (out, out) product, so their s is not the column least-squares fit."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    Wf = 1.3 * W + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    out, cin = shape[:2]
    view = (-1, 1) if len(shape) == 2 else (-1, 1, 1, 1)
    r_loop = torch.stack([(Wf[j] * W[j]).sum() / (W[j] ** 2).sum().clamp(min=1e-20) for j in range(out)])
    s_loop = torch.stack([(r_loop.view(view) * W[:, i] * Wf[:, i]).sum()
                          / ((r_loop.view(view) * W[:, i]) ** 2).sum().clamp(min=1e-20) for i in range(cin)])
    r, s = fit_scalings(Wf, W, "authors")
    torch.testing.assert_close(r, r_loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(s, s_loop, rtol=1e-12, atol=0)
    _, s_ls = fit_scalings(Wf, W)
    assert (s_ls - s).abs().max() > 1e-3  # the two fits differ
    with pytest.raises(ValueError, match="method must be one of"):
        fit_scalings(Wf, W, "best")


def test_zero_rows_do_not_divide_by_zero():
    W = torch.zeros(2, 3)
    r, s = fit_scalings(torch.ones(2, 3), W)
    assert torch.isfinite(r).all() and torch.isfinite(s).all()


def test_conv_scalings_match_a_row_by_row_loop():
    W, Wf = torch.randn(5, 3, 3, 2), torch.randn(5, 3, 3, 2)
    r, s = fit_scalings(Wf, W)
    for j in range(5):
        assert torch.isclose(r[j], (Wf[j] * W[j]).sum() / (W[j] ** 2).sum(), rtol=1e-5)
    for i in range(3):
        rw = r.view(-1, 1, 1) * W[:, i]
        assert torch.isclose(s[i], (rw * Wf[:, i]).sum() / (rw ** 2).sum(), rtol=1e-5)
    D = discrepancy(Wf, W, r, s)
    assert D.shape == (5, 3)
    torch.testing.assert_close(D, (Wf - r.view(-1, 1, 1, 1) * W * s.view(1, -1, 1, 1)).mean((2, 3)))


def test_layer_spectra_batched_by_shape_equal_exact_svd():
    mats = {"a": torch.randn(6, 4), "b": torch.randn(6, 4), "c": torch.randn(3, 7)}
    spectra = layer_spectra(mats)
    for n, D in mats.items():
        torch.testing.assert_close(spectra[n].S, torch.linalg.svdvals(D), rtol=1e-5, atol=1e-6)
        sp = spectra[n]
        torch.testing.assert_close(sp.U @ torch.diag(sp.S) @ sp.V.T, D, rtol=1e-4, atol=1e-5)
        assert abs(sp.energy - float(D.pow(2).sum())) < 1e-4


def _spectrum(values):
    S = torch.tensor(values, dtype=torch.float64)
    n = len(values)
    return LayerSpectrum(torch.eye(n, dtype=torch.float64), S, torch.eye(n, dtype=torch.float64),
                         float(S.pow(2).sum()))


@pytest.mark.parametrize("rate,expected", [(0.9, {"a": 1, "b": 2}), (0.5, {"a": 1, "b": 1}),
                                           (0.3, {"a": 1, "b": 1}), (1.0, {"a": 2, "b": 2})])
def test_global_allocation_by_hand(rate, expected):
    # scores: a = 1·1·[9, 1], b = 4·0.5·[4, 4] = [8, 8]; total 26; sorted 9, 8, 8, 1;
    # cumulative shares 0.346, 0.654, 0.962, 1.0
    spectra = {"a": _spectrum([3.0, 1.0]), "b": _spectrum([2.0, 2.0])}
    alloc = allocate_ranks(spectra, {"a": 1.0, "b": 0.5}, {"a": 1, "b": 4}, rate, upper_rank=10)
    assert alloc.ranks == expected  # 0.3 keeps one value of a only; b is clamped up to 1
    assert alloc.explained["a"] == pytest.approx((9 if expected["a"] == 1 else 10) / 10)


def test_allocation_clamps_and_flat_mode():
    spectra = {"a": _spectrum([3.0, 1.0]), "b": _spectrum([2.0, 2.0])}
    args = ({"a": 1.0, "b": 0.5}, {"a": 1, "b": 4})
    assert allocate_ranks(spectra, *args, 0.9, upper_rank=1).ranks == {"a": 1, "b": 1}
    assert allocate_ranks(spectra, *args, 0.9, upper_rank=5, mode="flat").ranks == {"a": 2, "b": 2}


def test_allocation_counts_untruncated_tail_energy():
    # Only the top value of a 3-value spectrum is known; the tail energy still enters the total.
    full = _spectrum([3.0, 2.0, 2.0])
    top = LayerSpectrum(full.U[:, :1], full.S[:1], full.V[:, :1], full.energy)
    alloc = allocate_ranks({"a": top}, {"a": 1.0}, {"a": 1}, 0.5, 10)
    assert alloc.explained["a"] == pytest.approx(9 / 17)


def test_lowrank_init_is_best_rank_k():
    D = torch.randn(8, 5, dtype=torch.float64)
    sp = layer_spectra({"d": D})["d"]
    U, V = lowrank_init(sp, 2)
    u, s, vh = torch.linalg.svd(D)
    torch.testing.assert_close(U @ V.T, u[:, :2] @ torch.diag(s[:2]) @ vh[:2])


def test_empirical_fisher_matches_manual_average():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    weights = {"0": net[0].weight, "2": net[2].weight}
    got = empirical_fisher(net, weights, batches)
    expected = {n: 0.0 for n in weights}
    for xb, yb in batches:
        g = torch.autograd.grad(nn.functional.cross_entropy(net(xb), yb), list(weights.values()))
        for (n, _), gi in zip(weights.items(), g):
            expected[n] += float(gi.pow(2).mean()) * len(xb) / len(batches)
    assert got == pytest.approx(expected, rel=1e-5)
    assert net[0].weight.grad is None and net.training


def test_free_model_and_initialisation_reproduce_the_free_weights_at_full_rank():
    model = hf.convert(hf.models.lenet(1, 8, 4))
    t = model.add_task(3)
    free = hf.continual.free_model(model, t)
    with torch.no_grad():
        for p in free.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))]
    est = hf.continual.estimate_and_initialise(model, t, free, loader, approx_rate=1.0, upper_rank=10_000)
    assert set(est.ranks) == set(model.perturbed_layers())
    for name, layer in model.perturbed_layers().items():
        Wf = free.get_submodule(name).weight.detach()
        merged = layer.merged_weight(t)
        if Wf.dim() == 2:  # linear: r W s + U Vᵀ reproduces W_free exactly at full rank
            torch.testing.assert_close(merged, Wf, rtol=1e-4, atol=1e-4)
    # conv layers only match on average over the kernel; biases, BatchNorm and head come from free
    torch.testing.assert_close(model.heads.heads[t].weight, free.last.weight)
    for name, m in model.task_modules().items():
        if isinstance(m, hf.nn.TaskBatchNorm):
            torch.testing.assert_close(m.bns[t].running_var, free.get_submodule(name).running_var)
            torch.testing.assert_close(m.bns[t].weight, free.get_submodule(name).weight)
    for name, layer in model.perturbed_layers().items():
        torch.testing.assert_close(layer.task_bias[str(t)], free.get_submodule(name).bias)
