"""The learner end to end on tiny real data: determinism, checkpoints, resume, corruption, export, CLI."""
import copy
import json
import shutil
import time

import numpy as np
import pytest
import torch

import halrp_fast as hf
from halrp_fast.continual import CheckpointError, HALRPConfig, HALRPLearner
from halrp_fast.continual.runner import run_stream
from halrp_fast.data import permuted_digits

CFG = dict(epochs=3, lr=2e-3, est_rank_epochs=1, approx_rate=0.8, upper_rank=20, prune="mixAR_AllLayer",
           prune_value=(1e-5, 0.2), prune_bound_all_tasks=False)


@pytest.fixture(scope="module")
def tasks():
    return permuted_digits(3, batch_size=32, max_per_task=160)


def new_learner(**over):
    torch.manual_seed(0)
    return HALRPLearner(hf.models.lenet(1, 8, 10), HALRPConfig(**{**CFG, **over}))


def run_all(tasks, out=None, **over):
    return run_stream(lambda: new_learner(**over), tasks, out, log=lambda s: None)


@pytest.fixture(scope="module")
def finished(tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    learner, results = run_all(tasks, out)
    return learner, results, out


def test_three_tasks_end_to_end(finished):
    learner, results, out = finished
    A = np.array(results["acc_matrix"], dtype=float)
    assert A.shape == (3, 3) and np.isfinite(np.diag(A)).all()
    assert A[0, 0] > 40 and A[2, 2] > 40  # 10 classes: chance is 10%; 160 samples, 3 epochs
    assert results["BWT"] == pytest.approx(0.0, abs=1e-9)  # old tasks are frozen; per-task pruning is idempotent
    r = learner.reports[2]
    assert set(r.ranks) == set(learner.model.perturbed_layers()) and all(k >= 1 for k in r.ranks.values())
    assert set(r.explained) == set(r.ranks) and all(0 <= v <= 1 for v in r.explained.values())
    assert r.importance and r.params_added > 0 and r.bytes_added > 0 and r.prune_rate == 0.2
    assert {"free_training", "importance", "svd_allocation", "training", "pruning", "evaluation"} <= set(r.seconds)
    saved = json.loads((out / "results.json").read_text())
    assert saved["ACC"] == pytest.approx(results["ACC"])
    assert (out / "checkpoint" / "manifest.json").exists()


@pytest.mark.reruns
def test_same_seed_same_ranks_and_accuracies(tasks, finished):
    _, results, _ = finished
    _, again = run_all(tasks)
    assert again["acc_matrix"] == results["acc_matrix"]
    assert again["ranks"] == results["ranks"]


def test_checkpoint_round_trip(finished, tasks):
    learner, results, out = finished
    loaded = HALRPLearner.load(out / "checkpoint")
    assert loaded.num_learned == 3 and loaded.model.ranks(2) == learner.model.ranks(2)
    for t in range(3):
        assert loaded.evaluate(tasks[t].test, t) == pytest.approx(results["acc_matrix"][2][t])
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.reruns
def test_a_resumed_run_reports_the_wall_time_of_all_its_processes(tasks, tmp_path):
    """The first process started 100 s ago and stops after task 0; the resuming one started 50 s ago: the results
    hold both sessions, their sum as the wall time and one resume, and the run report counts two processes."""
    from halrp_fast.report import build_report

    def run(stream, ago):
        return run_stream(lambda: new_learner(epochs=2), stream, tmp_path, log=lambda s: None,
                          started=time.perf_counter() - ago)

    run(tasks[:1], 100)
    _, results = run(tasks[:2], 50)
    meta = results["meta"]
    assert [(s["first_task"], s["tasks"]) for s in meta["sessions"]] == [(0, 1), (1, 1)]
    first, second = (s["seconds"] for s in meta["sessions"])
    assert first >= 100 and second >= 50
    assert meta["wall_seconds"] == pytest.approx(first + second) and meta["resumes"] == 1
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["wall_seconds"] == meta["wall_seconds"]
    _, csv, _ = build_report([tmp_path])
    header, row = csv.splitlines()[:2]
    assert dict(zip(header.split(","), row.split(","), strict=True))["processes"] == "2"


@pytest.mark.reruns
def test_resume_gives_the_uninterrupted_result(tasks, finished, tmp_path):
    _, results, _ = finished
    run_all(tasks[:2], tmp_path)  # "interrupted" after two tasks
    learner, resumed = run_all(tasks, tmp_path)
    assert learner.num_learned == 3
    assert resumed["acc_matrix"] == results["acc_matrix"]
    assert resumed["ranks"] == results["ranks"]


def test_corrupted_and_mismatched_checkpoints(finished, tmp_path):
    _, _, out = finished
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint", ckpt)
    (f,) = ckpt.glob("task_0001-*.safetensors")
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"task_0001-[0-9a-f]{16}\.safetensors is corrupted"):
        HALRPLearner.load(ckpt)
    f.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        HALRPLearner.load(ckpt)
    (ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HALRPLearner.load(ckpt)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        HALRPLearner.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not match the model"):
        HALRPLearner.load(out / "checkpoint", model=hf.models.lenet(1, 16, 10))
    assert not list(ckpt.glob("*.tmp"))


def test_export_task_matches(finished, tasks):
    learner, _, _ = finished
    plain = learner.export_task(2)
    x, _ = next(iter(tasks[2].test))
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), learner.model(x, 2), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="has not been learned"):
        learner.export_task(3)


def test_learning_the_base_twice_is_refused(finished, tasks):
    learner, _, _ = finished
    holding_tasks = HALRPLearner(copy.deepcopy(learner.model), HALRPConfig(**CFG))
    with pytest.raises(ValueError, match=r"base \(task 0\) is already learned"):
        holding_tasks.learn_task(tasks[0].train, None, num_classes=10)
    frozen_base = new_learner()
    frozen_base.model.freeze_task(0)
    with pytest.raises(ValueError, match=r"base \(task 0\) is already learned"):
        frozen_base.learn_task(tasks[0].train, None, num_classes=10)


def test_learner_argument_errors(tasks):
    learner = new_learner()
    with pytest.raises(ValueError, match="num_classes=5 but the model's head has 10"):
        learner.learn_task(tasks[0].train, None, num_classes=5)
    with pytest.raises(ValueError, match="has not been learned"):
        learner.evaluate(tasks[0].test, 0)
    with pytest.raises(ValueError, match="epochs=2 leaves no epoch to train the perturbation"):
        HALRPConfig(epochs=2, est_rank_epochs=3)
    with pytest.raises(ValueError, match="prune must be None or one of"):
        HALRPConfig(prune="magic")
    with pytest.raises(ValueError, match="paper_schedule needs n_tasks"):
        HALRPConfig(paper_schedule=True, n_tasks=None)
    with pytest.raises(ValueError, match=r"adam_eps must be in \(0, ∞\), got 0.0"):
        HALRPConfig(adam_eps=0.0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        HALRPConfig(dtype="float16")


def test_float64_run_resumes_in_float64(tasks, tmp_path):
    # float32 batches go in as float64; a resumed run reloads its float64 checkpoint without rounding it to float32
    learner, whole = run_all(tasks, dtype="float64")
    state = {k: v for k, v in learner.model.state_dict().items() if isinstance(v, torch.Tensor)}
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float64 for v in floats)
    run_all(tasks[:2], tmp_path, dtype="float64")
    resumed_learner, resumed = run_all(tasks, tmp_path, dtype="float64")
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["ranks"] == whole["ranks"]
    resumed_state = resumed_learner.model.state_dict()
    for k, a in state.items():
        torch.testing.assert_close(resumed_state[k], a, rtol=1e-12, atol=1e-12, msg=k)


def test_paper_schedule_gamma():
    cfg = HALRPConfig(paper_schedule=True, n_tasks=10, train_frac=1.0, valid_frac=0.1)
    # 50000/10·1·0.9 = 4500 samples per task: one epoch of batches of 64 decays the lr by 0.95
    assert cfg.schedule_gamma(64) ** (4500 / 64) == pytest.approx(0.95)


def test_cli_demo_small(tmp_path):
    from halrp_fast.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--tasks", "2", "--epochs", "2", "--max-per-task", "100",
               "--batch-size", "32",
               "--no-progress", "--quiet"])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["acc_matrix"]) == 2 and "ACC" in results and results["config"]["epochs"] == 2
    assert (tmp_path / "acc_matrix.png").stat().st_size > 0 and (tmp_path / "ranks.png").stat().st_size > 0
