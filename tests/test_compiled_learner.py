"""HALRPConfig(compile=...): the training passes (base, free model, perturbation) and evaluation through one compiled
graph per structure, reused by every task, equal to the eager run.

The equality and reuse checks compile with the ``aot_eager`` backend (dynamo + AOTAutograd, no code generation: the
graphs, guards and recompilations are the ones inductor gets, in a fraction of the time); one run uses inductor."""
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import halrp_fast as hf
from halrp_fast.continual import HALRPConfig, HALRPLearner
from halrp_fast.continual import compiled as compiled_module


def _net():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def _stream(tasks=3, n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        x = torch.randn(n, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        x[torch.arange(n), 0, y + t % 3, y] += 2.0  # learnable
        batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
        out.append((batches, batches[:1]))
    return out


def _run(compile_mode, dtype="float64", tasks=3):
    torch.manual_seed(0)
    learner = HALRPLearner(hf.convert(_net(), head="10"),
                           HALRPConfig(epochs=2, seed=0, n_tasks=tasks, dtype=dtype, compile=compile_mode))
    stream = _stream(tasks)
    reports = [learner.learn_task(train, val, num_classes=3) for train, val in stream]
    accs = [learner.evaluate(val, t) for t, (_, val) in enumerate(stream)]
    return learner, reports, accs


@pytest.fixture
def aot_eager(monkeypatch):
    init = compiled_module.CompiledTasks.__init__
    monkeypatch.setattr(compiled_module.CompiledTasks, "__init__",
                        lambda self, model, mode="default", backend="aot_eager": init(self, model, mode, backend))
    torch._dynamo.reset()
    counters.clear()


def test_compiled_run_equals_the_eager_run_in_float64(aot_eager):
    eager, eager_reports, eager_accs = _run("off")
    comp, comp_reports, comp_accs = _run("default")
    assert [r.ranks for r in comp_reports] == [r.ranks for r in eager_reports]
    assert comp_accs == eager_accs
    for a, b in zip(comp_reports, eager_reports, strict=True):
        torch.testing.assert_close(torch.tensor(a.train_loss), torch.tensor(b.train_loss), rtol=1e-9, atol=1e-12)
    for t in range(3):
        for (na, pa), (nb, pb) in zip(comp.model.named_task_parameters(t).items(),
                                      eager.model.named_task_parameters(t).items(), strict=True):
            assert na == nb
            torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ranks", ["hessian", "flat_1"])
def test_tasks_after_the_first_reuse_the_compiled_graphs(aot_eager, ranks):
    """Every task ≥ 1 has the structure of task 1: once task 1 has compiled its passes, later tasks (whatever their
    ranks; rank 1, padded, included) compile nothing."""
    torch.manual_seed(0)
    extra = dict(rank_mode="flat", upper_rank=1) if ranks == "flat_1" else {}
    learner = HALRPLearner(hf.convert(_net(), head="10"),
                           HALRPConfig(epochs=2, seed=0, n_tasks=4, compile="default", **extra))
    stream = _stream(4)
    graphs = []
    for t, (train, val) in enumerate(stream):
        learner.learn_task(train, val, num_classes=3)
        learner.evaluate(val, t)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] > 0  # the base's passes, then the perturbation's
    assert graphs[2] == graphs[1] and graphs[3] == graphs[1], graphs
    all_ranks = {k for t in (1, 2, 3) for k in learner.model.ranks(t).values()}
    assert all_ranks == {1} if ranks == "flat_1" else len(all_ranks) > 1


def test_importance_pass_runs_through_the_compiled_free_model(aot_eager, monkeypatch):
    """The empirical Fisher of each free model is computed through the compiled template (in eval mode, with
    gradients), and its values equal the eager pass's."""
    from halrp_fast.continual import estimation, importance

    calls = []

    def spy(model, weights, loader, device="cpu", dist=None, forward=None):
        calls.append(forward is not None)
        got = importance.empirical_fisher(model, weights, loader, device, dist, forward)
        if forward is not None:
            eager = importance.empirical_fisher(model, weights, loader, device, dist)
            assert got.keys() == eager.keys()
            for k in got:
                assert got[k] == pytest.approx(eager[k], rel=1e-9, abs=1e-15)
        return got

    monkeypatch.setattr(estimation, "empirical_fisher", spy)
    _run("default", tasks=3)
    assert calls == [True, True]  # tasks 1 and 2


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_every_mode_reaches_torch_compile(mode, monkeypatch):
    """Each HALRPConfig(compile=mode) is a torch.compile mode of the inductor graphs ("reduce-overhead": CUDA graphs
    on CUDA), fullgraph."""
    from halrp_fast.continual.config import COMPILE_MODES

    assert mode in COMPILE_MODES
    seen = []
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **options: seen.append(options) or fn)
    compiled_module.CompiledTasks(hf.convert(_net(), head="10"), HALRPConfig(compile=mode).compile)
    assert seen and all(o == {"fullgraph": True, "backend": "inductor", "mode": mode} for o in seen)


def test_compile_is_refused_for_an_unknown_mode():
    with pytest.raises(ValueError, match="compile must be one of"):
        HALRPConfig(compile="fast")


def test_inductor_run_agrees_with_eager():
    """The real backend: a two-task run compiled by inductor takes the eager run's ranks, and its accuracies agree."""
    torch._dynamo.reset()
    _, eager_reports, eager_accs = _run("off", "float32", tasks=2)
    _, comp_reports, comp_accs = _run("default", "float32", tasks=2)
    assert [r.ranks for r in comp_reports] == [r.ranks for r in eager_reports]
    assert max(abs(a - b) for a, b in zip(comp_accs, eager_accs, strict=True)) <= 100 / 16 + 1e-9
