"""Many tasks in one TaskModel: per-task state, lazy loading from a checkpoint, memory per task."""
import json

import pytest
import torch

from halrp_fast import convert, models
from halrp_fast.continual import paper_parameter_count, stored_bytes
from halrp_fast.continual.checkpoint import CheckpointError, load_into, save_checkpoint


def random_tasks(model, n_tasks: int, seed: int = 0, max_rank: int = 5):
    """Add ``n_tasks`` tasks with random r, s, U, V, biases, BatchNorm statistics and heads."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_tasks):
        t = model.add_task(10)
        for i, L in enumerate(model.perturbed_layers().values()):
            k = int(torch.randint(0, max_rank + 1, (1,), generator=g)) if i else max_rank
            with torch.no_grad():
                L.r[str(t)].uniform_(0.5, 1.5, generator=g)
                L.s[str(t)].uniform_(0.5, 1.5, generator=g)
                if L.bias is not None:
                    L.task_bias[str(t)].normal_(generator=g)
            L.set_rank(t, 0.1 * torch.randn(L.out_features, k, generator=g),
                       0.1 * torch.randn(L.in_features, k, generator=g))
        with torch.no_grad():
            for m in model.task_modules().values():
                for bn in getattr(m, "bns", [])[t:t + 1]:
                    bn.running_mean.normal_(generator=g)
                    bn.running_var.uniform_(0.5, 2, generator=g)
        model.freeze_task(t)
    return model.eval()


def lenet():
    return convert(models.lenet(1, 8, 10))


@pytest.fixture
def saved(tmp_path):
    model = random_tasks(lenet(), 5)
    save_checkpoint(tmp_path, model)
    return model, tmp_path


def test_task_state_dict_visits_only_the_task_and_equals_the_split(saved):
    model, _ = saved
    split = model.split_state_dict()
    for t in range(model.num_tasks):
        mine = model.task_state_dict(t)
        assert mine.keys() == split[t].keys()
        for k, v in mine.items():
            assert torch.equal(v, split[t][k])


def test_lazy_load_reads_a_task_on_first_use_only(saved):
    model, directory = saved
    lazy = lenet()
    load_into(lazy, directory, lazy=True)
    assert lazy.num_tasks == 6 and lazy.unloaded_tasks == [1, 2, 3, 4, 5]
    assert lazy.ranks(3) == model.ranks(3)  # shapes come from the manifest
    nbytes = stored_bytes(lazy)
    assert nbytes["base"] > 0 and all(nbytes[f"task_{t}"] == 0 for t in range(1, 6))
    x = torch.randn(7, 1, 8, 8)
    lazy.eval()
    torch.testing.assert_close(lazy(x, 2), model(x, 2))
    assert lazy.unloaded_tasks == [1, 3, 4, 5]
    assert stored_bytes(lazy)["task_2"] == stored_bytes(model)["task_2"]
    ids = torch.tensor([4, 0, 4, 2, 0, 4, 2])
    torch.testing.assert_close(lazy(x, ids), model(x, ids))
    assert lazy.unloaded_tasks == [1, 3, 5]
    plain = lazy.export_task(5)
    torch.testing.assert_close(plain.eval()(x), model(x, 5))
    assert lazy.unloaded_tasks == [1, 3]
    assert paper_parameter_count(lazy) == paper_parameter_count(model)  # needs the values: reads the rest
    assert lazy.unloaded_tasks == []
    assert all(not p.requires_grad for t in range(1, 6) for p in lazy.task_parameters(t))


def test_lazy_tasks_follow_dtype_changes_and_save_back(saved, tmp_path_factory):
    model, directory = saved
    lazy = lenet()
    load_into(lazy, directory, lazy=True)
    lazy.double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    out = lazy(x, 4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model.double()(x, 4))
    again = tmp_path_factory.mktemp("again")
    save_checkpoint(again, lazy)  # reads every task first
    assert lazy.unloaded_tasks == []
    assert json.loads((again / "manifest.json").read_text())["ranks"] == \
        json.loads((directory / "manifest.json").read_text())["ranks"]


def test_a_corrupted_task_file_fails_when_the_task_is_first_used(saved):
    _, directory = saved
    (path,) = directory.glob("task_0003-*.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    lazy = lenet()
    load_into(lazy, directory, lazy=True)  # opening reads the base only
    lazy.eval()
    lazy(torch.randn(2, 1, 8, 8), 2)
    with pytest.raises(CheckpointError, match="task_0003.*corrupted"):
        lazy(torch.randn(2, 1, 8, 8), 3)
    assert 3 in lazy.unloaded_tasks


def test_add_lazy_task_refuses_a_wrong_description_and_leaves_the_model_unchanged():
    model = lenet()
    before = model.num_classes
    with pytest.raises(ValueError, match="shapes names tensors"):
        model.add_lazy_task(10, dict, shapes={"model.nonsense": ((3,), torch.float32)})
    assert model.num_classes == before and model.num_tasks == 1
    assert all(m.num_tasks == 1 for m in model.task_modules().values())
    assert model.add_task(10) == 1  # still consistent
    with pytest.raises(TypeError, match="load must be callable"):
        model.add_lazy_task(10, None)


def test_a_loader_returning_wrong_tensors_is_refused():
    state = random_tasks(lenet(), 2).task_state_dict(2)
    model = random_tasks(lenet(), 1)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    t = model.add_lazy_task(10, lambda: bad, {k: (v.shape, v.dtype) for k, v in state.items()})
    with pytest.raises(ValueError, match="state for task 2 has tensors"):
        model.ensure_loaded([t])


def test_two_hundred_lazy_tasks_cost_only_what_is_read(tmp_path):
    model = random_tasks(lenet(), 200, seed=1, max_rank=3)
    save_checkpoint(tmp_path, model)
    lazy = lenet()
    load_into(lazy, tmp_path, lazy=True)
    held = stored_bytes(lazy)
    assert held["total"] == held["base"]
    picked = [3, 77, 150, 199]
    x = torch.randn(8, 1, 8, 8)
    lazy.eval()
    out = lazy(x, torch.tensor(picked * 2))
    torch.testing.assert_close(out, model(x, torch.tensor(picked * 2)))
    held = stored_bytes(lazy)
    assert {k for k, v in held.items() if v and k.startswith("task_")} == {f"task_{t}" for t in picked}
    # per task: its parameters (the paper's count, 4 bytes each) plus its biases (stored, not in the paper's count)
    # and its BatchNorm running statistics
    counts = paper_parameter_count(model)
    for t in picked:
        state = model.task_state_dict(t)
        bn_stats = sum(v.numel() * v.element_size() for k, v in state.items() if "running" in k or "num_batches" in k)
        biases = sum(v.numel() * v.element_size() for k, v in state.items() if ".task_bias." in k)
        rank_books = sum(8 for k in state if ".allocated." in k)
        assert biases > 0
        assert held[f"task_{t}"] == 4 * counts[f"task_{t}"] + biases + bn_stats + rank_books


@pytest.mark.parametrize("path", ["merged groups", "mixed op"])
def test_mixed_inference_paths_agree_with_per_task_forwards(path, monkeypatch):
    """Inference on a mixed batch picks, per layer, merged weights per task group or the mixed op; both must
    give every row its own task's output, for unsorted, sorted and repeated task ids."""
    from halrp_fast.nn.perturbed import PerturbedLayer

    model = random_tasks(lenet(), 4, seed=5)
    costs = (0.0, 1.0) if path == "merged groups" else (1.0, 0.0)
    monkeypatch.setattr(PerturbedLayer, "_mixed_costs", lambda self, x, tasks, k: costs)
    x = torch.randn(9, 1, 8, 8)
    for ids in ([3, 0, 3, 1, 4, 4, 2, 0, 1], [0, 0, 1, 2, 2, 2, 3, 4, 4], [4, 4, 4, 4, 4, 2, 2, 2, 2]):
        ids = torch.tensor(ids)
        with torch.no_grad():
            got = model(x, ids)
            want = torch.stack([model(x[i:i + 1], int(t))[0] for i, t in enumerate(ids)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_forward_restores_the_batch_order_of_every_output():
    """TaskModel groups the rows by task once; tensors of batch size in a tuple output come back in order."""
    from torch import nn

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.last = nn.Linear(6, 3)

        def forward(self, x):
            h = self.body(x)
            return self.last(h), h.sum(), h

    model = convert(TwoOutputs())
    model.add_task(3)
    with torch.no_grad():
        model.model.body.r["1"].uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(5, 4)
    ids = torch.tensor([1, 0, 1, 0, 0])
    with torch.no_grad():
        logits, total, h = model(x, ids)
        for i, t in enumerate(ids.tolist()):
            one_logits, _, one_h = model(x[i:i + 1], t)
            torch.testing.assert_close(logits[i], one_logits[0])
            torch.testing.assert_close(h[i], one_h[0])
    assert total.dim() == 0
