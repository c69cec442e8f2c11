"""The floor of bench/bench_end_to_end.py: the plain network does exactly each phase's dense work.

If it did less (an epoch short, a split skipped) the floor would understate the method's unavoidable time and
the bound it gives would be wrong; the counts below fail on any such drift.
"""
import sys
from pathlib import Path

import pytest
import torch

from halrp_fast import models
from halrp_fast.continual import HALRPConfig
from halrp_fast.data.digits import permuted_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_end_to_end import plain_phases  # noqa: E402


@pytest.mark.parametrize("epochs,est", [(3, 1), (4, 2)])
def test_plain_phases_run_each_phase_once_over_its_split(epochs, est):
    task = permuted_digits(2, 32, seed=0, max_per_task=150)[1]
    cfg = HALRPConfig(epochs=epochs, est_rank_epochs=est, seed=0)
    torch.manual_seed(0)
    net = models.lenet(1, 8, task.num_classes)
    before = [p.detach().clone() for p in net.parameters()]
    seen = {"train": 0, "eval_grad": 0, "eval_nograd": 0}

    def count(module, inputs, output):
        key = "train" if module.training else ("eval_grad" if torch.is_grad_enabled() else "eval_nograd")
        seen[key] += len(inputs[0])

    net.register_forward_hook(count)
    seconds = plain_phases(net, task, cfg, compiled=False)

    assert set(seconds) == {"free_training", "importance", "training", "evaluation"}
    assert all(s > 0 for s in seconds.values()), seconds
    n_train, n_val, n_test = (sum(len(x) for x, _ in loader) for loader in (task.train, task.val, task.test))
    # eager: each phase once; free model's and perturbation's epochs together are all the task's epochs
    assert seen == {"train": epochs * n_train, "eval_grad": n_val, "eval_nograd": n_test}
    assert net.training  # left as it was given
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # it trained
