"""A battery of bad inputs and faults, each of which must end in one clear error, and of awkward but valid inputs,
each of which must work. A clear error is, on the command line, exit status 2 (1 for an I/O failure) with exactly
one line ``halrp-fast: error: …``; in the API a ValueError, TypeError or FileNotFoundError with a message. Anything
else (another exception type, a traceback, a silent acceptance) fails its case."""
import math

import pytest
import torch

import halrp_fast as hf
from halrp_fast.cli import main
from halrp_fast.continual import HALRPConfig, HALRPLearner

FAST = ["--no-progress", "--quiet"]
TINY = ["--tasks", "1", "--epochs", "1", "--max-per-task", "64", "--batch-size", "32", *FAST]

# flag → (valid kind, bad values)
FLOAT_BAD = ["nan", "inf", "-inf", "abc", ""]
FLAGS = {
    "--epochs": ["0", "-1", "1.5", "abc", "nan"],
    "--lr": FLOAT_BAD + ["0", "-0.001"],
    "--lr-decay": FLOAT_BAD + ["0", "-1"],
    "--batch-size": ["0", "-4", "2.5", "abc"],
    "--approx-rate": FLOAT_BAD + ["0", "1.01", "-0.5"],
    "--upper-rank": ["0", "-3", "1.5"],
    "--est-rank-epochs": ["-1", "0.5", "abc"],
    "--l1": FLOAT_BAD + ["-1e-6"],
    "--wd": FLOAT_BAD + ["-1"],
    "--seed": ["-1", "4294967296", "1.5", "abc"],
    "--data-seed": ["-2", "1e3", "abc"],
    "--repeats": ["0", "-1", "abc"],
    "--tasks": ["0", "-1", "11", "abc"],
    "--max-per-task": ["0", "-5", "100", "abc"],
    "--subset": FLOAT_BAD + ["0", "1.5", "-0.2"],
}
CLI_BAD = [[flag, value] for flag, values in FLAGS.items() for value in values]
CLI_BAD += [
    ["--prune-value", "nan", "0.4"], ["--prune-value", "inf", "0.4"], ["--prune-value", "1e-5", "nan"],
    ["--prune-value", "1e-5", "1.5"], ["--prune-value", "-1", "0.4"], ["--prune-value", "0.1"],
    ["--prune", "absolute", "--prune-value", "1", "2"], ["--prune", "magic"],
    ["--epochs", "2", "--est-rank-epochs", "3"], ["--order", "A"], ["--orders", "AB"],
    ["--device", "cuda:9"], ["--device", "tpu"], ["--device", "cpu:x"], ["--model", "resnet18"], ["--model", "alexnet"],
    ["--model", "vgg"], ["--dtype", "float16"], ["--scalings", "best"], ["--channels-last", "maybe"],
    ["--rank-mode", "magic"], ["--optimizer", "rmsprop"], ["--schedule", "cosine"], ["--cpu-allocator", "jemalloc"],
    ["--bogus"], ["--lr"], ["--data-dir"],
]


def _cli(capsys, args) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse exits from inside main
        rc = exc.code
    return rc, capsys.readouterr().err


def _clear_cli_error(rc, err) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return rc in (1, 2) and len(lines) == 1 and lines[0].startswith("halrp-fast: error: ") and len(lines[0]) > 25


@pytest.mark.parametrize("args", CLI_BAD, ids=lambda a: " ".join(a) or "empty")
def test_bad_flags(args, tmp_path, capsys):
    rc, err = _cli(capsys, ["demo", "--out", str(tmp_path / "o"), *FAST, *args])
    assert _clear_cli_error(rc, err), (rc, err)


def test_bad_paths(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    cases = [
        ["demo", "--out", str(f), *FAST], ["demo", "--out", str(f / "sub"), *FAST],
        ["run", "--benchmark", "pmnist", "--out", str(tmp_path / "o"), *FAST],
        ["run", "--benchmark", "pmnist", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *FAST],
        ["run", "--benchmark", "pfmnist", "--data-dir", str(f), "--out", str(tmp_path / "o"), *FAST],
        ["run", "--benchmark", "cifar100-splits", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), *FAST],
        ["run", "--benchmark", "five-datasets", "--out", str(tmp_path / "o"), *FAST],
        ["run", "--benchmark", "tinyimagenet-20", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), *FAST],
        ["run", "--benchmark", "nope", "--out", str(tmp_path / "o")],
        ["run", "--out", str(tmp_path / "o")],
        ["report", str(tmp_path / "missing")], ["report", str(tmp_path)],
    ]
    for args in cases:
        rc, err = _cli(capsys, args)
        assert _clear_cli_error(rc, err), (args, rc, err)


VALID_CLI = [[], ["--max-per-task", "32"], ["--subset", "1.0"], ["--est-rank-epochs", "0"], ["--approx-rate", "1"],
             ["--prune", "none"], ["--l1", "0", "--wd", "0"], ["--seed", "4294967295"], ["--upper-rank", "100000"],
             ["--schedule", "epoch", "--lr-decay", "1"], ["--dtype", "float64"], ["--channels-last", "off"]]


@pytest.mark.parametrize("args", VALID_CLI, ids=lambda a: " ".join(a) or "defaults")
def test_awkward_but_valid_flags_work(args, tmp_path, capsys):
    rc, err = _cli(capsys, ["demo", "--out", str(tmp_path / "o"), *TINY, *args])
    assert rc == 0, err


# --------------------------------------------------------------------------- the API
def _learner(**over):
    return HALRPLearner(hf.models.lenet(1, 8, 3), HALRPConfig(**{"epochs": 1, "upper_rank": 4, **over}))


def _batches(n=2, classes=3, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, size, size, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def _learned():
    learner = _learner()
    learner.learn_task(_batches(), None, 3)
    return learner


def _model():
    model = hf.convert(hf.models.lenet(1, 8, 3))
    model.add_task(3)
    return model.eval()


API_BAD = {
    "config lr string": lambda: HALRPConfig(lr="0.1"),
    "config epochs float": lambda: HALRPConfig(epochs=2.0),
    "config prune mode": lambda: HALRPConfig(prune="magic"),
    "config optimizer": lambda: HALRPConfig(optimizer="rmsprop"),
    "config dtype": lambda: HALRPConfig(dtype="float16"),
    "config channels_last": lambda: HALRPConfig(channels_last="yes"),
    "config device": lambda: HALRPConfig(device=0),
    "config nan lr": lambda: HALRPConfig(lr=math.nan),
    "config inf wd": lambda: HALRPConfig(wd=math.inf),
    "config negative seed": lambda: HALRPConfig(seed=-1),
    "config prune value shape": lambda: HALRPConfig(prune="mixAR", prune_value=0.1),
    "config unknown field": lambda: HALRPConfig.from_dict({"lr": 1e-3, "learning_rate": 1}),
    "learn empty loader": lambda: _learner().learn_task([], None, 3),
    "learn NaN pixel": lambda: _learner().learn_task([(torch.full((8, 1, 8, 8), math.nan), torch.zeros(8).long())],
                                                     None, 3),
    "learn labels out of range": lambda: _learner().learn_task([(torch.randn(8, 1, 8, 8), torch.full((8,), 3))],
                                                               None, 3),
    "learn negative labels": lambda: _learner().learn_task([(torch.randn(8, 1, 8, 8), torch.full((8,), -1))], None, 3),
    "learn float labels": lambda: _learner().learn_task([(torch.randn(8, 1, 8, 8), torch.zeros(8))], None, 3),
    "learn wrong image size": lambda: _learner().learn_task(_batches(size=12), None, 3),
    "learn batch of one": lambda: _learner().learn_task([(torch.randn(1, 1, 8, 8), torch.zeros(1).long())], None, 3),
    "learn base class mismatch": lambda: _learner().learn_task(_batches(), None, 5),
    "learn task 1 without classes": lambda: _learned().learn_task(_batches(), None),
    "learn base twice": lambda: HALRPLearner(_learned().model, HALRPConfig(epochs=1)).learn_task(_batches(), None, 3),
    "evaluate unlearned task": lambda: _learner().evaluate(_batches(), 0),
    "evaluate labels out of range": lambda: _learned().evaluate([(torch.randn(4, 1, 8, 8), torch.full((4,), 7))], 0),
    "export unlearned task": lambda: _learner().export_task(2),
    "load nowhere": lambda: HALRPLearner.load("/nonexistent/checkpoint"),
    "forward task out of range": lambda: _model()(torch.randn(2, 1, 8, 8), 5),
    "forward negative task": lambda: _model()(torch.randn(2, 1, 8, 8), -1),
    "forward float task ids": lambda: _model()(torch.randn(2, 1, 8, 8), torch.tensor([0.0, 1.0])),
    "forward task ids shape": lambda: _model()(torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 1])),
    "forward bool task": lambda: _model()(torch.randn(2, 1, 8, 8), True),
    "forward not a tensor": lambda: _model()([[1.0]], 0),
    "forward empty mixed": lambda: _model()(torch.randn(0, 1, 8, 8), torch.tensor([], dtype=torch.long)),
    "add task zero classes": lambda: _model().add_task(0),
    "set rank wrong shape": lambda: _model().set_rank(1, "features.9", torch.randn(3, 2), torch.randn(5, 2)),
    "set rank unknown layer": lambda: _model().set_rank(1, "features.99", torch.randn(800, 2), torch.randn(200, 2)),
    "convert unknown head": lambda: hf.convert(hf.models.lenet(1, 8, 3), head="classifier"),
    "permuted stream no tasks": lambda: hf.data.permuted_digits(num_tasks=0),
    "digits subset 0": lambda: hf.data.permuted_digits(num_tasks=1, subset=0.0),
    "digits no full batch": lambda: hf.data.permuted_digits(num_tasks=1, batch_size=4096),
    "model too small image": lambda: hf.models.alexnet(3, 16, 10),
    "model zero classes": lambda: hf.models.lenet(3, 32, 0),
    "model float size": lambda: hf.models.resnet18(3, 32.0, 10),
}


@pytest.mark.parametrize("case", list(API_BAD))
def test_bad_api_calls(case):
    try:
        API_BAD[case]()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        assert str(exc), case
    else:
        pytest.fail(f"{case}: accepted")
