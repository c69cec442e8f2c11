"""Pruning modes, the all-task bound, exact quantiles, column dropping and parameter accounting."""
import numpy as np
import pytest
import torch
from torch import nn

import halrp_fast as hf
from halrp_fast.continual import exact_quantile, paper_parameter_count, prune, stored_bytes
from halrp_fast.continual.pruning import growth


def two_layer_model(tasks=2):
    model = hf.convert(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    for _ in range(tasks):
        model.add_task(2)
    return model


def set_uv(model, t, layer, U, V):
    model.set_rank(t, layer, torch.tensor(U), torch.tensor(V))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099])
@pytest.mark.parametrize("q", [0.0, 0.13, 0.5, 0.999, 1.0])
def test_exact_quantile_matches_numpy(n, q):
    x = torch.randn(n, dtype=torch.float64)
    assert float(exact_quantile(x, q)) == pytest.approx(float(np.percentile(x.numpy(), 100 * q)), rel=1e-12, abs=1e-12)


def test_exact_quantile_beyond_torch_quantile_limit():
    x = torch.rand(17_000_000)  # torch.quantile refuses inputs above 16M elements
    assert abs(float(exact_quantile(x, 0.25)) - 0.25) < 1e-3


def test_absolute_mode_and_column_drop():
    model = two_layer_model(1)
    set_uv(model, 1, "0", [[0.5, 0.01], [0.2, 0.02]], [[0.3, 0.5], [0.01, 0.5], [0.9, 0.5]])
    set_uv(model, 1, "2", [[0.05], [0.01]], [[0.3], [0.4]])
    rep = prune(model, "absolute", 0.1)
    L0 = model.perturbed_layers()["0"]
    # column 1 of U is all ≤ 0.1 → that rank-1 term is dropped; U[1,0]=0.2 stays, V[1,0]=0.01 goes
    torch.testing.assert_close(L0.U["1"], torch.tensor([[0.5], [0.2]]))
    torch.testing.assert_close(L0.V["1"], torch.tensor([[0.3], [0.0], [0.9]]))
    assert model.ranks(1) == {"0": 1, "2": 0}  # layer 2's U is entirely below 0.1
    assert rep.thresholds[(1, "0")] == 0.1


def test_relative_per_layer_vs_all_layers_vs_all_tasks():
    base = two_layer_model(2)
    for t, scale in ((1, 1.0), (2, 10.0)):
        set_uv(base, t, "0", (scale * torch.arange(1, 5.0).view(2, 2)).tolist(),
               (scale * torch.arange(5, 11.0).view(3, 2)).tolist())
        set_uv(base, t, "2", (scale * torch.tensor([[0.1], [0.2]])).tolist(),
               (scale * torch.tensor([[0.3], [0.4]])).tolist())
    per_layer = prune(_copy(base), "relative", 0.5)
    all_layer = prune(_copy(base), "relativeAllLayer", 0.5)
    all_task = prune(_copy(base), "relativeAllLayerAllTask", 0.5)
    v0 = torch.arange(1, 11.0)
    assert per_layer.thresholds[(1, "0")] == pytest.approx(float(np.percentile(v0, 50)))
    assert per_layer.thresholds[(1, "2")] == pytest.approx(0.25)
    v_all1 = torch.cat([v0, torch.tensor([0.1, 0.2, 0.3, 0.4])])
    assert all_layer.thresholds[(1, "2")] == pytest.approx(float(np.percentile(v_all1, 50)))
    assert all_layer.thresholds[(2, "0")] == pytest.approx(10 * float(np.percentile(v_all1, 50)))
    v_tasks = torch.cat([v_all1, 10 * v_all1])
    assert all_task.thresholds[(1, "0")] == pytest.approx(float(np.percentile(v_tasks, 50)))
    assert all_task.thresholds[(1, "0")] == all_task.thresholds[(2, "2")]


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_mix_modes_take_the_larger_threshold():
    model = two_layer_model(1)
    set_uv(model, 1, "0", [[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    set_uv(model, 1, "2", [[1.0], [2.0]], [[3.0], [4.0]])
    assert prune(_copy(model), "mixAR", (0.0, 0.5)).thresholds[(1, "0")] == pytest.approx(5.5)
    assert prune(_copy(model), "mixAR", (6.0, 0.5)).thresholds[(1, "0")] == pytest.approx(6.0)
    assert prune(_copy(model), "mixAR_AllLayer", (0.0, 0.0)).thresholds[(1, "2")] == pytest.approx(1.0)
    assert prune(_copy(model), "mixAR_AllLayerAllTask", (100.0, 0.1)).ranks[1] == {"0": 0, "2": 0}


@pytest.mark.parametrize("mode", ["relative", "relativeAllLayer", "relativeAllLayerAllTask"])
def test_relative_pruning_is_idempotent_even_after_dropping_columns(mode):
    model = two_layer_model(1)
    # column 1 is small everywhere: the first pass drops it; its entries still count as zeros afterwards
    set_uv(model, 1, "0", [[1.0, 0.01], [2.0, 0.02]], [[3.0, 0.03], [4.0, 0.04], [5.0, 0.05]])
    set_uv(model, 1, "2", [[1.5], [2.5]], [[3.5], [4.5]])
    prune(model, mode, 0.4)
    assert model.ranks(1)["0"] == 1 and model.perturbed_layers()["0"].allocated_rank(1) == 2
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    prune(model, mode, 0.4)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k])


def test_all_task_bound():
    model = hf.convert(nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 2)))
    model.add_task(2)
    model.set_rank(1, "0", torch.randn(40, 1), torch.randn(50, 1))
    inc = growth(model, dense=True)  # r, s, head, U, V (not the task's biases): (40 + 50 + 82 + 90) / (2040 + 82)
    assert inc == pytest.approx(262 / 2122)
    # below the bound (inc < 1 − p): nothing is pruned, not even by the absolute part
    rep = prune(_copy(model), "mixAR", (10.0, 0.5), bound_all_tasks=True)
    assert rep.skipped and rep.rate is None
    rep = prune(_copy(model), "relative", 0.9, bound_all_tasks=True)
    assert rep.rate == pytest.approx(1 - 0.1 / inc)


def test_bad_prune_values():
    model = two_layer_model(1)
    with pytest.raises(ValueError, match="prune mode must be one of"):
        prune(model, "magnitude", 0.1)
    with pytest.raises(ValueError, match=r"needs prune_value=\(absolute, rate\)"):
        prune(model, "mixAR", 0.1)
    with pytest.raises(ValueError, match="prune rate must be in"):
        prune(model, "relative", 1.5)


def test_parameter_accounting_by_hand():
    model = two_layer_model(1)  # Linear(3,2), Linear(2,2), head Linear(2,2): base = 8 + 6 + 6 = 20
    set_uv(model, 1, "0", [[1.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [0.0, 0.0], [3.0, 9e-9]])
    counts = paper_parameter_count(model)
    # task 1 as the authors count it: layer 0 r(2) s(3); layer 2 r(2) s(2); head 6; entries of U (1) and V (3)
    # above 1e-8 (9e-9 is not); the task's biases (2 + 2) are stored but not counted
    assert counts == {"base": 20, "task_1": 19, "total": 39}
    assert paper_parameter_count(model, dense=True)["task_1"] == 15 + 4 + 6
    nbytes = stored_bytes(model)
    # real bytes: the float tensors plus one int64 allocated-rank record per layer
    assert nbytes["base"] == 20 * 4 and nbytes["task_1"] == (19 + 4 + 6) * 4 + 2 * 8
