"""The whole method on two third-party models (torchvision resnet18 and a small VisionTransformer, random
initialisation, tiny data): three tasks learned, ranks and growth reported, checkpoint, reload, export."""
import math

import pytest
import torch
from oracle import assert_close

from halrp_fast.continual import HALRPConfig, HALRPLearner

tv = pytest.importorskip("torchvision")


def _stream(tasks=3, n=64, size=32, classes=4, seed=0):
    """Per task: images whose class is the brightest of ``classes`` image quadrants-by-channel patterns (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(tasks):
        x = torch.randn(n, 3, size, size, generator=gen)
        y = torch.randint(0, classes, (n,), generator=gen)
        h = size // 2
        for c in range(classes):  # a task-specific bright patch marks each class
            rows = y == c
            q = (c + t) % 4
            x[rows, t % 3, (q // 2) * h:(q // 2 + 1) * h, (q % 2) * h:(q % 2 + 1) * h] += 1.5
        batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
        stream.append((batches[:3], batches[3:]))
    return stream


MODELS = {
    "resnet18": (lambda: tv.models.resnet18(num_classes=4), "fc"),
    "vit": (lambda: tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=4), "heads.head"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_learner_learns_three_tasks_on_a_torchvision_model_and_survives_a_checkpoint(name, tmp_path):
    build, head = MODELS[name]
    torch.manual_seed(0)
    learner = HALRPLearner(build(), HALRPConfig(epochs=2, seed=0, n_tasks=3), head=head)
    stream = _stream()
    for train, val in stream:
        report = learner.learn_task(train, val, num_classes=4)
        if report.task:
            layers = learner.model.perturbed_layers()
            assert set(report.ranks) == set(layers)
            assert all(1 <= k <= min(L.out_features, L.in_features) for k, L in
                       ((report.ranks[n], L) for n, L in layers.items()))
            assert report.growth > 0 and math.isfinite(report.growth)
            assert report.val_accuracy is not None
    assert learner.model.num_tasks == 3
    growth = learner.parameter_growth()
    assert 0 < growth < 1
    accuracies = [learner.evaluate(val, t) for t, (_, val) in enumerate(stream)]

    learner.save(tmp_path)
    for lazy in (False, True):
        reloaded = HALRPLearner.load(tmp_path, model=build(), lazy=lazy)
        assert [reloaded.evaluate(val, t) for t, (_, val) in enumerate(stream)] == accuracies
        assert [r.ranks for r in reloaded.reports] == [r.ranks for r in learner.reports]
    x = stream[2][1][0][0]
    model = learner.model.eval()
    with torch.no_grad():
        for t in range(3):
            assert_close(learner.export_task(t)(x), model(x, t), torch.float32)
