"""Patterns of third-party model zoos, restated in a few lines each: in-place activations after task layers,
layers without bias in mixed batches with autograd on, BatchNorm subclasses with a built-in activation, conv
classifiers, and several unsupported layers reported at once."""
import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close
from torch import nn

import halrp_fast as hf


def _perturb(model: hf.TaskModel, t: int, k: int = 2) -> None:
    gen = torch.Generator().manual_seed(t)
    for layer in model.perturbed_layers().values():
        layer.set_rank(t, 0.3 * torch.randn(layer.out_features, k, generator=gen),
                       0.3 * torch.randn(layer.in_features, k, generator=gen))
        with torch.no_grad():
            layer.r[str(t)].add_(0.1 * torch.randn(layer.out_features, generator=gen))


@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["rows", "sequence"])
def test_inplace_activation_after_a_task_linear(provider, lead):
    """torchvision's classifiers put ReLU(inplace=True) right after a Linear: a task ≥ 1 trains through it."""
    provider.require("perturbed_linear")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(inplace=True), nn.Linear(5, 3))
    model = hf.convert(net, head="2")
    t = model.add_task(3)
    _perturb(model, t)
    x = torch.randn(*lead, 6)
    out_place = model(x, t)
    out_place.sum().backward()
    grads = [p.grad.clone() for p in model.task_parameters(t)]
    model.zero_grad()
    plain = hf.convert(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)), head="2")
    plain.load_state_dict(model.state_dict())
    expected = plain(x, t)
    expected.sum().backward()
    assert_close(out_place, expected, torch.float32)
    for g, p in zip(grads, plain.task_parameters(t), strict=True):
        assert_close(g, p.grad, torch.float32)


def test_inplace_activation_after_a_task_conv_and_in_mixed_batches(provider):
    provider.require("perturbed_conv2d")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 3))
    model = hf.convert(net, head="3")
    t = model.add_task(3)
    _perturb(model, t)
    for ids in (t, torch.tensor([t, 0, t])):
        model(torch.randn(3, 3, 6, 6), ids).sum().backward()
        assert all(p.grad is not None for p in model.task_parameters(t))
        model.zero_grad()


def test_mixed_batch_with_autograd_on_after_a_task_is_frozen():
    """Layers without bias (every torchvision CNN) in a mixed batch while autograd records: no crash, and each row
    equals its task's single-task output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 5, bias=False), nn.ReLU(), nn.Linear(5, 3))
    model = hf.convert(net, head="6")
    model.freeze_task(0)  # as after learning the base
    for _ in range(2):
        t = model.add_task(3)
        _perturb(model, t)
        model.freeze_task(t)
    model.eval()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0])
    y = model(x, ids)
    y.sum().backward()  # the input still gets its gradient through frozen tasks
    assert x.grad is not None
    for i, task in enumerate(ids.tolist()):
        assert_close(y[i], model(x[i:i + 1], task)[0], torch.float32)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward also applies an activation."""

    def forward(self, x):
        return F.relu6(super().forward(x) * 3.0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_subclass_keeps_its_own_forward_in_mixed_batches(training):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Flatten(), nn.Linear(64, 3))
    model = hf.convert(net, head="3")
    t = model.add_task(3)
    _perturb(model, t)
    with torch.no_grad():
        bn = model.model[1].bns[t]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.train(training)
    x = torch.randn(6, 3, 6, 6)
    ids = torch.tensor([t, 0, t, 0, t, 0])
    with torch.no_grad():
        mixed = model(x, ids)
        for task in (0, t):
            rows = (ids == task).nonzero().flatten()
            assert_close(mixed[rows], model(x[rows], task), torch.float32)


def test_conv_classifier_pads_missing_classes_along_the_channels():
    """A 1×1 conv classifier (squeezenet): a mixed batch of tasks with different class counts is padded with
    -inf along the class channels, not along a spatial dimension."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
            self.classifier = nn.Sequential(nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            return torch.flatten(self.classifier(self.features(x)), 1)

    model = hf.convert(Net(), head="classifier",
                       head_factory=lambda c: nn.Sequential(nn.Conv2d(8, c, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
    assert model.num_classes == [5]
    t = model.add_task(3)
    model.eval()
    x = torch.randn(4, 3, 7, 7)
    with torch.no_grad():
        y = model(x, torch.tensor([0, t, t, 0]))
        assert y.shape == (4, 5)
        assert torch.isinf(y[1, 3:]).all() and torch.isinf(y[2, 3:]).all()
        assert_close(y[1, :3], model(x[1:2], t)[0], torch.float32)
        assert_close(y[0], model(x[0:1], 0)[0], torch.float32)


def test_every_unconvertible_layer_is_named_in_one_error():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Conv2d(4, 8, 1),
                        nn.Conv1d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                        nn.Linear(8, 3))
    with pytest.raises(ValueError) as info:
        hf.convert(net)
    message = str(info.value)
    assert "3 module(s)" in message
    for name in ("'0'", "'2'", "'3'"):
        assert name in message
    assert "exclude=['0', '2', '3']" in message
    hf.convert(net, exclude=["0", "2", "3"])  # and the exclusion the message suggests works


class ReadsWeights(nn.Module):
    """torchvision swin_t's pattern: attention passes its projections' weights to a function instead of calling
    them, so a converted projection's forward never runs."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.qkv.weight, self.qkv.bias)), self.proj.weight, self.proj.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.attn = ReadsWeights()
        self.aux = nn.Linear(6, 2)  # an auxiliary classifier that the forward never calls
        self.last = nn.Linear(6, 3)

    def forward(self, x):
        return self.last(self.attn(self.embed(x)))


def test_convert_with_an_example_names_layers_that_would_not_be_task_aware():
    with pytest.raises(ValueError) as info:
        hf.convert(Net(), example_input=torch.randn(2, 4))
    message = str(info.value)
    assert "3 converted layer(s)" in message
    assert "never ran in the forward: ['attn.qkv', 'attn.proj', 'aux']" in message
    assert "read directly" in message and "'attn.qkv'" in message and "'attn.proj'" in message
    model = hf.convert(Net(), exclude=["attn", "aux"], example_input=torch.randn(2, 4))
    assert sorted(model.perturbed_layers()) == ["embed"]


def test_a_weight_read_behind_the_layer_is_an_error_for_later_tasks():
    """Without an example input the first forward of a later task stops, naming the layers; the base still runs
    (its weights are the base's)."""
    model = hf.convert(Net(), exclude=["aux"])
    x = torch.randn(2, 4)
    base = model(x, 0)
    t = model.add_task(3)
    with pytest.raises(RuntimeError, match=r"\['attn.proj', 'attn.qkv'\] had their weights read by other code"):
        model(x, t)
    with pytest.raises(RuntimeError, match="attn.qkv"):
        model(x, torch.tensor([0, t]))
    assert_close(model(x, 0), base, torch.float32)
    assert model.perturbed_layers()["attn.qkv"].weight.shape == (6, 6)  # reading outside a forward is fine


class Conv1D(nn.Module):
    """transformers' GPT-2 projection (transformers.pytorch_utils.Conv1D): a Linear with its weight transposed."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_weight_layers_that_cannot_be_perturbed_are_refused_not_left_shared():
    net = nn.Sequential(nn.Linear(4, 6), Conv1D(6, 6), nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 1, 3), nn.Flatten(),
                        nn.Linear(4, 3))
    with pytest.raises(ValueError) as info:
        hf.convert(net)
    message = str(info.value)
    assert "1 module(s)" in message and "Conv1d is a weight layer" in message
    assert "exclude=['3']" in message
    model = hf.convert(net, exclude=["3"])
    assert sorted(model.perturbed_layers()) == ["0", "1"]


def test_transformers_style_conv1d_is_a_task_linear_with_its_weight_transposed():
    """Conv1D (y = x W + b, W (in, out)): task 0 is the original's addmm exactly, a later task the float64 formula
    on W_t = diag(r) Wᵀ diag(s) + U Vᵀ, and the exported layer is a Conv1D again."""
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(5, 6), nn.ReLU(), nn.Linear(5, 3))
    model = hf.convert(net, head="2")
    x = torch.randn(4, 2, 6)
    assert torch.equal(model(x, 0), net(x))
    t = model.add_task(3)
    _perturb(model, t)
    layer = model.perturbed_layers()["0"]
    r, s, U, V, b = (p.detach().double() for p in layer.task_tensors(t))
    W_t = r[:, None] * net[0].weight.detach().double().T * s[None, :] + U @ V.T
    hidden = torch.relu(x.double() @ W_t.T + b)
    head = model.heads.heads[t]
    expected = hidden @ head.weight.detach().double().T + head.bias.detach().double()
    assert_close(model(x, t), expected, torch.float32)
    exported = model.export_task(t)
    assert type(exported[0]) is Conv1D and exported[0].weight.shape == (6, 5)
    assert_close(exported(x), model(x, t), torch.float32)


class TinyTransformer(nn.Module):
    """A pre-norm transformer block over token sequences (ViT/BERT pattern): LayerNorms around linear layers."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.norm1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm2 = nn.LayerNorm(d)
        self.last = nn.Linear(d, classes)

    def forward(self, x):  # (M, L, 5) → (M, classes)
        h = self.embed(x)
        h = h + self.mlp(self.norm1(h))
        return self.last(self.norm2(h).mean(1))


def _with_task_norms(model: hf.TaskModel, t: int) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.task_modules().values():
            if isinstance(m, hf.nn.TaskNorm):
                for p in m.norms[t].parameters():
                    p.add_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_layernorm_and_groupnorm_are_per_task(kind):
    torch.manual_seed(0)
    if kind == "layernorm":
        original, x = TinyTransformer(), torch.randn(6, 4, 5)
    else:
        original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
        x = torch.randn(6, 3, 6, 6)
    model = hf.convert(original, head="last" if kind == "layernorm" else "4")
    assert sum(isinstance(m, hf.nn.TaskNorm) for m in model.task_modules().values()) == (2 if kind == "layernorm"
                                                                                          else 1)
    with torch.no_grad():
        assert torch.equal(model(x, 0), original(x))  # task 0 is the original model exactly
    t = model.add_task(3)
    _perturb(model, t)
    _with_task_norms(model, t)
    ids = torch.tensor([t, 0, t, 0, 0, t])
    for training in (True, False):
        model.train(training)
        mixed = model(x, ids)
        for task in (0, t):
            rows = (ids == task).nonzero().flatten()
            assert_close(mixed[rows], model(x[rows], task), torch.float32)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, t), model(x, 0))  # the task's norms are its own
        assert_close(model.export_task(t)(x), model(x, t), torch.float32)
        fresh = hf.convert(original, head="last" if kind == "layernorm" else "4")
        fresh.add_task(3)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.eval()(x, t), model(x, t))
    names = model.named_task_parameters(t)
    assert any(".norms.1." in name for name in names)  # trained with the task
    model.freeze_task(t)
    assert not any(p.requires_grad for p in model.task_parameters(t))


def test_the_method_learns_tasks_on_a_transformer_with_task_layernorms(tmp_path):
    from halrp_fast.continual import HALRPConfig, HALRPLearner

    g = torch.Generator().manual_seed(0)

    def batches(n=4):
        return [(torch.randn(8, 4, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]

    learner = HALRPLearner(TinyTransformer(), HALRPConfig(epochs=2, upper_rank=4, channels_last=False))
    for _ in range(3):
        learner.learn_task(batches(), batches(2), 3)
    model = learner.model
    assert model.num_tasks == 3
    norms = [m for m in model.task_modules().values() if isinstance(m, hf.nn.TaskNorm)]
    assert norms and all(not torch.equal(m.norms[2].weight, m.norms[0].weight) for m in norms)
    learner.save(tmp_path / "ckpt")
    again = HALRPLearner.load(tmp_path / "ckpt", model=TinyTransformer())
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        for t in range(3):
            assert torch.equal(again.model.eval()(x, t), model.eval()(x, t))


class ReadsMetadata(nn.Module):
    """transformers' ViT patch embedding: reads its projection's weight dtype, then calls the projection."""

    def __init__(self):
        super().__init__()
        self.projection = nn.Linear(4, 6)

    def forward(self, x):
        return self.projection(x.to(self.projection.weight.dtype))


def test_reading_a_weight_next_to_calling_the_layer_is_not_flagged():
    net = nn.Sequential(ReadsMetadata(), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    model = hf.convert(net, head="2", example_input=x)
    t = model.add_task(3)
    _perturb(model, t)
    assert not torch.allclose(model(x, t), model(x, 0))
