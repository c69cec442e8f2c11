"""A network trained elsewhere as the frozen base (``HALRPLearner(..., base="given")`` / ``"given_head"``): every task
of the stream is a perturbation of it (or the first is the network itself), the base never changes, and the run
checkpoints, reloads and resumes.

Provider: whatever ``auto`` picks on CPU (the learner's protocol is what is checked here).
"""
import pytest
import torch
import torch.nn.functional as F

import halrp_fast as hf
from halrp_fast.continual import HALRPConfig, HALRPLearner
from halrp_fast.continual.checkpoint import CheckpointError
from halrp_fast.continual.runner import run_stream
from halrp_fast.data import permuted_digits

CFG = HALRPConfig(epochs=2, est_rank_epochs=1, upper_rank=4, seed=0)


def _batches(shape, classes, n=48, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _pretrain(model, shape, classes, path, logits=lambda out: out):
    """A few steps of plain PyTorch training, then the state dict saved to ``path`` (as a user's backbone)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x, y in _batches(shape, classes, seed=99):
        opt.zero_grad()
        F.cross_entropy(logits(model(x)), y).backward()
        opt.step()
    torch.save(model.state_dict(), path)


def _accuracy(plain, batches, logits=lambda out: out):
    plain.eval()
    with torch.no_grad():
        hits = sum((logits(plain(x)).argmax(1) == y).sum().item() for x, y in batches)
    return 100.0 * hits / sum(len(y) for _, y in batches)


def _check_given_base(build, head, shape, tmp_path, logits=lambda out: out):
    torch.manual_seed(0)
    _pretrain(build(), shape, 10, tmp_path / "backbone.pt", logits)
    backbone = build()
    backbone.load_state_dict(torch.load(tmp_path / "backbone.pt"))
    saved = {k: v.clone() for k, v in backbone.state_dict().items()}
    learner = HALRPLearner(backbone, CFG, head=head, base="given")
    stream = [(_batches(shape, 4, seed=1), 4), (_batches(shape, 6, seed=2), 6)]
    for data, classes in stream:
        learner.learn_task(data, data, classes)
    model = learner.model
    assert model.num_tasks == 3 and model.num_classes[1:] == [4, 6]
    assert [r.task for r in learner.reports] == [0, 1]
    assert all(sum(r.ranks.values()) > 0 for r in learner.reports)
    # the base is the saved network, untouched: task 0 of the model exports it exactly
    base = model.export_task(0).state_dict()
    assert all(torch.equal(base[k], v) for k, v in saved.items())
    for t, (data, classes) in enumerate(stream):
        plain = learner.export_task(t)
        assert logits(plain(data[0][0])).shape == (16, classes)
        assert learner.evaluate(data, t) == pytest.approx(_accuracy(plain, data, logits))
    learner.save(tmp_path / "ckpt")
    fresh = build()
    loaded = HALRPLearner.load(tmp_path / "ckpt", model=fresh)
    assert loaded.base == "given" and loaded.num_learned == 2
    for t, (data, _) in enumerate(stream):
        assert loaded.evaluate(data, t) == pytest.approx(learner.evaluate(data, t))


def test_a_torchvision_resnet_trained_elsewhere_is_the_base(tmp_path):
    tv = pytest.importorskip("torchvision")
    _check_given_base(lambda: tv.models.resnet18(num_classes=10), "fc", (3, 32, 32), tmp_path)


def test_a_transformers_vit_trained_elsewhere_is_the_base(tmp_path):
    tr = pytest.importorskip("transformers")
    config = tr.ViTConfig(image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                          intermediate_size=32, num_labels=10)
    _check_given_base(lambda: tr.ViTForImageClassification(config), "classifier", (3, 16, 16), tmp_path,
                      logits=lambda out: out.logits)


def test_given_head_keeps_the_network_as_the_first_task():
    """``base="given_head"``: the first task is the network and its head as they are (nothing trains; its classes
    must be the head's); the next one is a perturbation."""
    torch.manual_seed(0)
    net = hf.models.lenet(1, 8, 10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    learner = HALRPLearner(net, CFG, base="given_head")
    data = _batches((1, 8, 8), 10)
    with pytest.raises(ValueError, match="num_classes=3 but the model's head has 10 classes"):
        learner.learn_task(data, data, 3)
    report = learner.learn_task(data, data, 10)
    assert report.task == 0 and report.seconds["training"] == 0.0 and report.ranks == {}
    assert all(torch.equal(learner.model.export_task(0).state_dict()[k], v) for k, v in before.items())
    assert learner.evaluate(data, 0) == pytest.approx(_accuracy(learner.export_task(0), data))
    learner.learn_task(_batches((1, 8, 8), 5, seed=3), None, 5)
    assert learner.model.num_tasks == 2 and sum(learner.reports[1].ranks.values()) > 0


def test_a_given_base_run_resumes_and_refuses_another_base(tmp_path):
    """run_stream with a given base stops after one task and resumes to the uninterrupted result; a checkpoint of a
    learned-base run is not resumed as a given-base one."""
    tasks = permuted_digits(2, batch_size=32, max_per_task=64)

    def make(base):
        def learner():
            torch.manual_seed(0)
            return HALRPLearner(hf.models.lenet(1, 8, 10), CFG, base=base)
        return learner

    _, whole = run_stream(make("given"), tasks, tmp_path / "whole", log=lambda s: None)
    run_stream(make("given"), tasks[:1], tmp_path / "cut", log=lambda s: None)
    _, resumed = run_stream(make("given"), tasks, tmp_path / "cut", log=lambda s: None)
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["base"] == "given"
    assert resumed["meta"]["resumes"] == 1
    with pytest.raises(CheckpointError, match="base='given'.*base='learn'"):
        run_stream(make("learn"), tasks, tmp_path / "cut", log=lambda s: None)


def test_base_argument_errors():
    with pytest.raises(ValueError, match=r"base must be one of \('learn', 'given', 'given_head'\), got 'pretrained'"):
        HALRPLearner(hf.models.lenet(1, 8, 10), CFG, base="pretrained")
    learner = HALRPLearner(hf.models.lenet(1, 8, 10), CFG)
    learner.model.freeze_task(0)
    with pytest.raises(ValueError, match="base='given'"):
        learner.learn_task(_batches((1, 8, 8), 10), None, 10)


def test_the_cli_takes_base_weights_checks_them_first_and_resumes_only_with_the_same_file(tmp_path, capsys):
    """``--base-weights FILE``: the checkpoint's base is the file's network; a file that does not fit, or ``--base
    given`` without a file, is one line before anything is written; a resume with another file names the field."""
    from halrp_fast.cli import main
    from halrp_fast.continual.checkpoint import read_manifest
    from halrp_fast.data import benchmarks

    kwargs = benchmarks.get("pdigits").model_kwargs
    torch.manual_seed(5)
    torch.save(hf.models.lenet(**kwargs).state_dict(), tmp_path / "backbone.pt")
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pt")
    tiny = ["demo", "--tasks", "2", "--epochs", "2", "--max-per-task", "64", "--batch-size", "32", "--no-progress",
            "--quiet"]
    out = tmp_path / "run"
    assert main([*tiny, "--out", str(out), "--base-weights", str(tmp_path / "backbone.pt")]) == 0
    assert read_manifest(out / "checkpoint")["base"] == "given"
    loaded = HALRPLearner.load(out / "checkpoint")
    base = loaded.model.export_task(0).state_dict()
    assert all(torch.equal(base[k], v) for k, v in torch.load(tmp_path / "backbone.pt").items())
    capsys.readouterr()
    for extra, message in ((["--base-weights", str(tmp_path / "other.pt")], "does not fit the LeNet network: missing"),
                           (["--base", "given"], "--base given takes the network's weights from --base-weights"),
                           (["--base-weights", str(tmp_path / "backbone.pt"), "--base", "learn"], "would train")):
        fresh = tmp_path / f"never-{len(message)}"
        assert main([*tiny, "--out", str(fresh), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not fresh.exists()
    torch.manual_seed(6)
    torch.save(hf.models.lenet(**kwargs).state_dict(), tmp_path / "backbone2.pt")
    assert main([*tiny, "--tasks", "2", "--out", str(out), "--base-weights", str(tmp_path / "backbone2.pt")]) == 2
    assert "base_weights" in capsys.readouterr().err


def test_callbacks_hear_every_task_and_epoch_and_the_csv_log_survives_as_a_whole(tmp_path, capsys):
    """A learned base (3 epochs) and a perturbation task (1 free-model epoch, 2 perturbation epochs): the callback
    hears each task's start and end and every epoch of every phase in order; the CSV logger holds the same rows;
    ``progress=True`` draws a bar over the batches."""
    from halrp_fast.continual import Callback, CSVLogger

    heard = []

    class Recorder(Callback):
        def on_task_start(self, task, num_classes):
            heard.append(("start", task, num_classes))

        def on_epoch_end(self, task, phase, epoch, loss, seconds, samples):
            assert loss > 0 and seconds > 0 and samples == 48
            heard.append(("epoch", task, phase, epoch))

        def on_task_end(self, task, report):
            heard.append(("end", task, report.task))

    torch.manual_seed(0)
    config = HALRPConfig(epochs=3, est_rank_epochs=1, upper_rank=4, seed=0, progress=True)
    learner = HALRPLearner(hf.models.lenet(1, 8, 10), config, callbacks=[Recorder(), CSVLogger(tmp_path / "log.csv")])
    learner.learn_task(_batches((1, 8, 8), 10), None, 10)
    learner.learn_task(_batches((1, 8, 8), 5, seed=4), _batches((1, 8, 8), 5, seed=5), 5)
    assert heard == [("start", 0, 10), *[("epoch", 0, "base", e) for e in range(3)], ("end", 0, 0),
                     ("start", 1, 5), ("epoch", 1, "free model", 0),
                     *[("epoch", 1, "perturbation", e) for e in range(2)], ("end", 1, 1)]
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].split(",") == list(CSVLogger.FIELDS) and len(rows) == 1 + 3 + 1 + 1 + 2 + 1
    err = capsys.readouterr().err
    assert rows[-1].startswith("1,task,") and "task 0" in err and "batch/s" in err and "task 1" in err
