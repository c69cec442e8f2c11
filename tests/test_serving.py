"""Single-task inference through stand-ins (``halrp_fast/nn/stand_ins.py``): the task-aware wrappers out of the call
path in every forward without autograd, and every task-aware module prepared once inside ``model.serving()``.

Each result is compared bit for bit with the same forward through the task-aware modules themselves
(``_forward(..., stand_ins=False)``) on a model holding every kind of stand-in: a conv, BatchNorm, LayerNorm,
``nn.MultiheadAttention`` (its weights placed), a linear layer and the head.  Provider: whatever ``auto`` picks on
CPU (the merged-weight path calls plain ``F.linear``/``F.conv2d``; the ops' own tests check every provider).
"""
import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import halrp_fast as hf
from halrp_fast.nn import _cache
from halrp_fast.nn.perturbed import PerturbedLayer


class _Net(nn.Module):
    """``x (N, 3, 4, 4)`` → conv, BatchNorm, ReLU → tokens → LayerNorm → self-attention (residual) → mean → linear,
    ReLU → ``head`` (5 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.norm(torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2))
        seq = seq + self.mha(seq, seq, seq, need_weights=False)[0]
        return self.head(torch.relu(self.fc(seq.mean(1))))


def _model(tasks: int = 2) -> hf.TaskModel:
    """The converted :class:`_Net` (float64) with ``tasks`` later tasks, each perturbed and with its own statistics."""
    torch.manual_seed(0)
    model = hf.convert(_Net().double(), head="head").eval()
    gen = torch.Generator().manual_seed(1)
    for _ in range(tasks):
        t = model.add_task(4)
        with torch.no_grad():
            for layer in model.perturbed_layers().values():
                layer.set_rank(t, 0.1 * torch.randn(layer.out_features, 2, generator=gen, dtype=torch.float64),
                               0.1 * torch.randn(layer.in_features, 2, generator=gen, dtype=torch.float64))
                layer.r[str(t)].add_(0.1 * torch.randn(layer.out_features, generator=gen, dtype=torch.float64))
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(generator=gen)
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(generator=gen)
    return model


def _x() -> torch.Tensor:
    return torch.randn(6, 3, 4, 4, dtype=torch.float64)


def _reference(model: hf.TaskModel, x: torch.Tensor, t: int) -> torch.Tensor:
    """The same forward through the task-aware modules themselves."""
    with torch.no_grad():
        return model._forward((x,), {}, t, stand_ins=False)


def _structure(model: hf.TaskModel) -> list:
    return [(name, id(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_stand_ins_equal_the_modules_own_forwards(mode):
    """Every task, without and inside a serving session (twice: prepared, then reused), eval and train mode (BatchNorm
    on batch statistics); the model's modules are its own again afterwards."""
    model, x = _model(), _x()
    model.train(mode == "train")
    before = _structure(model)
    for t in range(model.num_tasks):
        expected = _reference(model, x, t)
        with torch.no_grad():
            assert torch.equal(model(x, t), expected)
            with model.serving():
                assert torch.equal(model(x, t), expected)
                assert torch.equal(model(x, t), expected)
    assert _structure(model) == before
    assert not torch.equal(_reference(model, x, 1), _reference(model, x, 2))  # the tasks differ


def test_a_serving_session_prepares_each_task_once(monkeypatch):
    """After a task's first forward in a session, its forwards check no cache and merge nothing."""
    model, x = _model(), _x()
    calls = []
    for name in ("get", "lookup"):
        original = getattr(_cache.DerivedCache, name)
        monkeypatch.setattr(_cache.DerivedCache, name,
                            lambda self, *a, _f=original, **k: calls.append(1) or _f(self, *a, **k))
    with torch.no_grad(), model.serving():
        model(x, 1)
        model(x, 2)
        prepared = len(calls)
        assert prepared > 0
        for _ in range(3):
            model(x, 1)
            model(x, 2)
        assert len(calls) == prepared
    with torch.no_grad():  # outside a session every forward checks its caches
        model(x, 1)
    assert len(calls) > prepared


def test_a_serving_session_follows_the_librarys_changes():
    """set_rank, load_state_dict and to() inside a session: the next forward serves the new tensors."""
    model, x = _model(), _x()
    other = _model()
    with torch.no_grad():
        for layer in other.perturbed_layers().values():
            layer.r["1"].mul_(1.5)
    with torch.no_grad(), model.serving():
        model(x, 1)
        layer = model.perturbed_layers()["fc"]
        layer.set_rank(1, torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))
        assert torch.equal(model(x, 1), _reference(model, x, 1))
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x, 1), _reference(other, x, 1))
        model.float()
        assert torch.equal(model(x.float(), 1), _reference(model, x.float(), 1))


def test_leaving_a_session_names_what_changed_inside_it():
    """An in-place step on a task's tensors, or a replaced head, inside the session is named on leaving; an error
    raised inside the session is not masked; nothing changed, nothing raised."""
    model, x = _model(), _x()
    with torch.no_grad(), model.serving():
        model(x, 1)
        model(x, 2)
    with pytest.raises(RuntimeError, match=r"2 task-aware module\(s\).*\['fc', 'head'\]"):
        with torch.no_grad(), model.serving():
            model(x, 1)
            model.perturbed_layers()["fc"].U["1"].add_(1.0)
            model.heads.heads[1] = nn.Linear(8, 4).double()
    with pytest.raises(KeyError, match="inner"):
        with torch.no_grad(), model.serving():
            model(x, 2)
            model.perturbed_layers()["fc"].U["2"].add_(1.0)
            raise KeyError("inner")
    model.perturbed_layers()["fc"].clear_caches()
    with torch.no_grad(), model.serving(), model.serving():  # re-entrant: checked once, on leaving the outer one
        assert torch.equal(model(x, 2), _reference(model, x, 2))


def test_hooks_keep_the_ordinary_path():
    """A forward hook on a task-aware module, or a global one, runs as registered (no stand-in replaces it)."""
    model, x = _model(), _x()
    seen = []
    norm = model.task_modules()["norm"]
    handle = norm.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    with torch.no_grad():
        model(x, 1)
        with model.serving():
            assert torch.equal(model(x, 1), _reference(model, x, 1))
    assert seen == ["TaskNorm", "TaskNorm", "TaskNorm"]
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad(), model.serving():
            model(x, 1)
    finally:
        handle.remove()
    assert {"TaskNorm", "TaskBatchNorm", "TaskHeads", "TaskReparametrized", "TaskLinear"} <= set(seen)


def test_an_error_inside_leaves_the_model_whole_and_names_the_layer():
    """A wrong input raises the library's error naming the layer, with and without a session, and the model holds
    its own modules afterwards; a changed structure is walked again."""
    model = _model()
    before = _structure(model)
    wrong = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for session in (False, True):
        with torch.no_grad(), (model.serving() if session else torch.no_grad()):
            with pytest.raises(ValueError, match="layer 'conv' takes inputs with 3 channels"):
                model(wrong, 1)
        assert _structure(model) == before
    x = _x()
    with torch.no_grad():
        model(x, 1)
        model.model.norm = nn.Identity()
        assert torch.equal(model(x, 1), _reference(model, x, 1))
        with model.serving():
            model(x, 1)
            model.model.fc = nn.Linear(8, 8).double()
            assert torch.equal(model(x, 1), _reference(model, x, 1))


def test_a_layers_stand_in_answers_for_the_layer():
    """Inside a session, code reading a layer's attributes through its parent gets the layer's (its task's weight)."""
    model, x = _model(), _x()
    seen = {}

    def probe(module, args):
        fc = module.fc
        seen.update(training=fc.training, in_features=fc.in_features, weight=fc.weight)

    handle = model.model.register_forward_pre_hook(probe)  # a hook on a plain module: stand-ins stay in use
    with torch.no_grad(), model.serving():
        model(x, 1)
    handle.remove()
    layer = model.perturbed_layers()["fc"]
    assert seen["training"] is False and seen["in_features"] == 8
    assert torch.equal(seen["weight"], layer.merged_weight(1))


def test_a_session_with_autograd_trains_the_task():
    """With autograd on inside a session the task-aware modules run themselves: the task's parameters get
    gradients."""
    model, x = _model(), _x()
    with model.serving():
        model(x, 1).sum().backward()
    layer = model.perturbed_layers()["fc"]
    assert layer.U["1"].grad is not None and layer.r["1"].grad is not None
    assert all(isinstance(m, PerturbedLayer) for m in model.perturbed_layers().values())


def test_clear_caches_makes_a_change_through_data_seen():
    """An in-place change through ``.data`` keeps the version counter (PyTorch gives ``.data`` its own): the merged
    weight of the layer and of the attention's projections stay stale until ``model.clear_caches()``."""
    model, x = _model(), _x()
    with torch.no_grad():
        model(x, 1)
        for layer in model.perturbed_layers().values():
            layer.r["1"].data.mul_(2.0)
        stale = model(x, 1)
        model.clear_caches()
        fresh = model(x, 1)
    assert not torch.equal(stale, fresh)
    with torch.enable_grad():  # through the op with autograd: no cache involved
        assert torch.allclose(model(x, 1), fresh)


def test_forwards_from_several_threads_take_turns():
    """Two threads serving different tasks of one model (the selection and the stand-ins' places are shared by its
    modules): every output is its task's, with and without a session; copies and pickles get their own lock."""
    model, x = _model(), _x()
    expected = {t: _reference(model, x, t) for t in (1, 2)}
    wrong = []

    def serve(t):
        with torch.no_grad():
            for _ in range(150):
                if not torch.equal(model(x, t), expected[t]):
                    wrong.append(t)

    for session in (False, True):
        with model.serving() if session else torch.no_grad():
            threads = [threading.Thread(target=serve, args=(t,)) for t in (1, 2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    assert not wrong
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # torch.save(model) pickles it
        assert clone._ctx.lock is not model._ctx.lock
        with torch.no_grad():
            assert torch.equal(clone(x, 1), expected[1])
