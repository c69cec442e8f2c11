"""The eager baseline of bench/bench_end_to_end.py computes what the library computes, piece by piece.

If it did not, the benchmark would compare two different methods; these tests fail on any drift.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import halrp_fast as hf
from halrp_fast import models
from halrp_fast.continual import HALRPConfig, allocate_ranks
from halrp_fast.continual.pruning import exact_quantile
from halrp_fast.data.digits import permuted_digits
from halrp_fast.linalg import discrepancy, fit_scalings, layer_spectra

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _naive_halrp as naive  # noqa: E402


def _task_params(layer: naive.NaiveLayer, g: torch.Generator, k: int):
    layer.add_task()
    p = layer.tasks[1]
    out_f, in_f = layer.weight.shape[:2]
    with torch.no_grad():
        p.r.copy_(torch.rand(out_f, generator=g) + 0.5)
        p.s.copy_(torch.rand(in_f, generator=g) + 0.5)
        p.U = nn.Parameter(torch.randn(out_f, k, generator=g))
        p.V = nn.Parameter(torch.randn(in_f, k, generator=g))
        if p.bias is not None:
            p.bias.copy_(torch.randn(out_f, generator=g))
    layer.task = 1
    return p


@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("geo", [dict(stride=1, padding=0, dilation=1), dict(stride=2, padding=1, dilation=2)])
def test_naive_conv_layer_equals_the_op(k, geo):
    g = torch.Generator().manual_seed(k)
    conv = nn.Conv2d(3, 7, 3, bias=True, **geo)
    layer = naive.NaiveLayer(conv)
    p = _task_params(layer, g, k)
    x = torch.randn(4, 3, 11, 9, generator=g)
    want = hf.perturbed_conv2d(x.double(), conv.weight.double(), p.r.double(), p.s.double(), p.U.double(),
                               p.V.double(), p.bias.double(), **geo)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [0, 3])
def test_naive_linear_layer_equals_the_op(k):
    g = torch.Generator().manual_seed(10 + k)
    lin = nn.Linear(13, 6, bias=False)
    layer = naive.NaiveLayer(lin)
    p = _task_params(layer, g, k)
    x = torch.randn(5, 13, generator=g)
    want = hf.perturbed_linear(x.double(), lin.weight.double(), p.r.double(), p.s.double(), p.U.double(),
                               p.V.double(), None)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 3, 2)])
def test_naive_scalings_and_discrepancy_equal_the_library(shape):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(shape, generator=g)
    Wf = 1.3 * W + 0.1 * torch.randn(shape, generator=g)
    r, s = naive.scalings_loop(Wf, W)
    r_lib, s_lib = fit_scalings(Wf, W)
    torch.testing.assert_close(r, r_lib, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, s_lib, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(naive.discrepancy_full(Wf, W, r, s), discrepancy(Wf, W, r_lib, s_lib),
                               rtol=1e-5, atol=1e-6)


def test_naive_allocation_equals_the_library():
    g = torch.Generator().manual_seed(2)
    shapes = {"a": (20, 30), "b": (40, 12), "c": (8, 8)}
    mats = {n: torch.randn(s, generator=g) * torch.logspace(0, -3, s[1])[None] for n, s in shapes.items()}
    importance = {"a": 1.0, "b": 0.3, "c": 5.0}
    areas = {"a": 1, "b": 9, "c": 1}
    spectra = layer_spectra(mats)
    for rate, upper in [(0.5, 100), (0.9, 100), (0.99, 6)]:
        want = allocate_ranks(spectra, importance, areas, rate, upper).ranks
        sig = {n: torch.linalg.svdvals(D).numpy() for n, D in mats.items()}
        assert naive.allocate_numpy(sig, importance, areas, shapes, rate, upper) == want


@pytest.mark.parametrize("rate", [0.0, 0.37, 0.9, 1.0])
def test_naive_prune_threshold_equals_the_library_quantile(rate):
    g = torch.Generator().manual_seed(3)
    mags = [torch.rand(17, generator=g), torch.rand(4, 5, generator=g)]
    zeros = 6
    flat = torch.cat([m.reshape(-1) for m in mags])
    want = max(1e-5, float(exact_quantile(flat, rate, zeros)))
    got = naive.prune_threshold([m.numpy() for m in mags] + [np.zeros(zeros, dtype=np.float32)], rate, 1e-5)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_naive_learner_runs_the_method_end_to_end():
    tasks = permuted_digits(3, batch_size=64, seed=0, max_per_task=300)
    cfg = HALRPConfig(epochs=2, est_rank_epochs=1, approx_rate=0.9, upper_rank=8, prune="mixAR_AllLayer",
                      prune_value=(1e-5, 0.4), prune_bound_all_tasks=True)
    learner = hf.continual.HALRPLearner(models.lenet(1, 8, 10), cfg)
    learner.learn_task(tasks[0].train, tasks[0].val, 10)
    base = learner.model.export_task(0)
    impl = naive.NaiveHALRP(base, learner.model.head_name, cfg)
    assert impl.evaluate(tasks[0].test, 0) == pytest.approx(learner.evaluate(tasks[0].test, 0))
    for t in (1, 2):
        seconds = impl.learn_task(tasks[t].train, tasks[t].val, 10)
        assert set(seconds) == {"free_training", "importance", "svd_allocation", "training", "pruning"}
        ranks = impl.ranks(t)
        assert all(0 <= k <= 8 for k in ranks.values()) and any(ranks.values())
        assert impl.evaluate(tasks[t].test, t) > 30  # ten classes: chance is 10 %
    # learning task 2 left task 1 untouched (its parameters are frozen, its BatchNorm and head its own)
    assert all(not p.requires_grad for p in impl.task_params(1))
