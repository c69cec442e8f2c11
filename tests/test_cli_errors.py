"""The command line refuses what it cannot do correctly with one line, ``halrp-fast: error: …``, and exit 2."""
import json

import pytest

from halrp_fast.cli import main

SMALL = ["--tasks", "2", "--epochs", "2", "--max-per-task", "200", "--batch-size", "32", "--no-progress", "--quiet"]


def run(capsys, *args) -> tuple[int, str]:
    """Exit status and standard error of ``halrp-fast args`` (argparse's errors exit from inside main)."""
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("halrp-fast: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    return out


@pytest.mark.parametrize("change,field", [
    (["--seed", "1"], "config.seed 0 ≠ 1"),
    (["--lr", "0.002"], "config.lr 0.001 ≠ 0.002"),
    (["--prune-value", "1e-5", "0.5"], "config.prune_value"),
    (["--data-seed", "3"], "data_seed 0 ≠ 3"),
    (["--scalings", "authors"], "config.scalings 'least_squares' ≠ 'authors'"),
])
def test_resume_refuses_another_run_naming_every_difference(finished_run, tmp_path, capsys, change, field):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    rc, err = run(capsys, "demo", "--out", str(out), *SMALL, *change)
    line = one_error_line(err)
    assert rc == 2 and field in line and "--no-resume" in line and "holds another run" in line


def test_resume_refuses_other_data(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    args = [a if a != "200" else "150" for a in ["demo", "--out", str(out), *SMALL]]
    rc, err = run(capsys, *args)
    assert rc == 2 and "stream" in one_error_line(err)


def test_the_same_command_resumes_and_a_deliberate_change_continues(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = json.loads((out / "results.json").read_text())
    rc = main(["demo", "--out", str(out), *SMALL])
    assert rc == 0 and json.loads((out / "results.json").read_text())["acc_matrix"] == before["acc_matrix"]
    more = ["demo", "--out", str(out), *SMALL, "--epochs", "3", "--tasks", "3"]
    rc, err = run(capsys, *more)
    assert rc == 2 and "config.epochs 2 ≠ 3" in one_error_line(err)
    rc, err = run(capsys, *more, "--allow-change", "config.epochs")
    assert rc == 0, err
    after = json.loads((out / "results.json").read_text())
    assert after["acc_matrix"][1][:2] == before["acc_matrix"][1][:2] and len(after["acc_matrix"]) == 3
    assert after["config"]["epochs"] == 3
    rc, err = run(capsys, *more, "--allow-change", "config.nonsense")
    assert rc == 2 and "--allow-change names no field" in one_error_line(err)


def test_a_checkpoint_without_identity_is_refused(finished_run, tmp_path, capsys):
    import shutil

    from halrp_fast.continual.checkpoint import MANIFEST, atomic_write_json, manifest_checksum

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    manifest = json.loads((out / "checkpoint" / MANIFEST).read_text())
    del manifest["identity"], manifest["checksum"]
    manifest["checksum"] = manifest_checksum(manifest)
    atomic_write_json(out / "checkpoint" / MANIFEST, manifest)
    rc, err = run(capsys, "demo", "--out", str(out), *SMALL)
    assert rc == 2 and "records no run identity" in one_error_line(err)


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--lr", "0"], r"argument --lr: must be in (0, ∞), got 0.0"),
    (["--l1", "nan"], "argument --l1: must be a finite number, got nan"),
    (["--prune-value", "nan", "0.4"], "argument --prune-value: must be a finite number, got nan"),
    (["--prune-value", "1e-5", "1.5"], "prune rate must be in [0, 1], got 1.5"),
    (["--tasks", "-1"], "argument --tasks: must be in [1, ∞], got -1"),
    (["--tasks", "11"], "--tasks 11: the pdigits stream has 10 tasks"),
    (["--max-per-task", "-5"], "argument --max-per-task: must be in [1, ∞], got -5"),
    (["--batch-size", "0"], "argument --batch-size: must be in [1, ∞], got 0"),
    (["--repeats", "0"], "argument --repeats: must be in [1, ∞], got 0"),
    (["--epochs", "abc"], "argument --epochs: expected an integer, got 'abc'"),
    (["--subset", "0"], "argument --subset: must be in (0, 1], got 0.0"),
    (["--approx-rate", "2"], "argument --approx-rate: must be in (0, 1], got 2.0"),
    (["--order", "A"], "unrecognized arguments: --order A"),  # demo: the embedded stream has one order
    (["--device", "cuda:7"], "--device cuda:7: "),
    (["--device", "tpu"], "--device 'tpu' is not a device name"),
    (["--max-per-task", "100"], "100 samples make no full batch of batch_size=128"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    import torch

    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    rc, err = run(capsys, "demo", "--out", str(tmp_path / "o"), "--no-progress", "--quiet", *args)
    assert rc == 2 and message in one_error_line(err)


def test_out_must_be_a_writable_directory(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = run(capsys, "demo", "--out", str(f))
    assert rc == 2 and "is an existing file, not a directory" in one_error_line(err)
    rc, err = run(capsys, "demo", "--out", str(f / "sub"))
    assert rc == 2 and "cannot write there (Not a directory)" in one_error_line(err)


def test_orders_must_be_the_benchmarks(tmp_path, capsys):
    rc, err = run(capsys, "run", "--benchmark", "cifar100-splits", "--out", str(tmp_path), "--orders", "AZ")
    assert rc == 2 and "--orders 'AZ': choose letters among ABCDE" in one_error_line(err)


def test_report_leaves_out_broken_results_naming_them(finished_run, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "good")
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    (runs / "other").mkdir()
    (runs / "other" / "results.json").write_text('{"a": 1}')
    capsys.readouterr()
    assert main(["report", str(runs)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line]
    assert len(warnings) == 2 and all(w.startswith("halrp-fast: warning: left out ") for w in warnings)
    assert "broken/results.json: unreadable" in captured.err and "other/results.json: not a halrp-fast" in captured.err
    assert "good" in captured.out
    rc, err = run(capsys, "report", str(runs / "broken"))
    assert rc == 2 and "no readable results.json" in one_error_line(err) and "broken/results.json" in err


def test_the_stream_fingerprint_sees_another_split_of_the_same_sizes(tmp_path):
    from test_data import write_cifar100

    from halrp_fast.continual.identity import task_fingerprint
    from halrp_fast.data.cifar import cifar100_splits, load_cifar100

    data = load_cifar100(write_cifar100(tmp_path, n_train=1000))
    a, b = (cifar100_splits(data, 16, seed=s)[0] for s in (0, 1))
    assert a.train.dataset_size == b.train.dataset_size
    assert task_fingerprint(a) != task_fingerprint(b)
    assert task_fingerprint(a) == task_fingerprint(cifar100_splits(data, 16, seed=0)[0])


# --------------------------------------------------------------------------- a battery of bad flags and paths
# Each must end in one clear error: exit status 2 (1 for an I/O failure) with exactly one line
# ``halrp-fast: error: …``; each awkward but valid flag set must run.
FAST = ["--no-progress", "--quiet"]
TINY = ["--tasks", "1", "--epochs", "2", "--max-per-task", "64", "--batch-size", "32", *FAST]

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
    ["--epochs", "2", "--est-rank-epochs", "3"], ["--epochs", "1"], ["--est-rank-epochs", "0"],
    ["--lr-decay", "0.9"], ["--order", "A"], ["--orders", "AB"],
    ["--device", "cuda:9"], ["--device", "tpu"], ["--device", "cpu:x"], ["--model", "resnet18"], ["--model", "alexnet"],
    ["--model", "vgg"], ["--dtype", "float16"], ["--scalings", "best"], ["--channels-last", "maybe"],
    ["--rank-mode", "magic"], ["--optimizer", "rmsprop"], ["--schedule", "cosine"], ["--cpu-allocator", "jemalloc"],
    ["--bogus"], ["--lr"], ["--data-dir"],
]


def _clear_cli_error(rc, err) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return rc in (1, 2) and len(lines) == 1 and lines[0].startswith("halrp-fast: error: ") and len(lines[0]) > 25


@pytest.mark.parametrize("args", CLI_BAD, ids=lambda a: " ".join(a) or "empty")
def test_bad_flags(args, tmp_path, capsys):
    rc, err = run(capsys, *["demo", "--out", str(tmp_path / "o"), *FAST, *args])
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
        rc, err = run(capsys, *args)
        assert _clear_cli_error(rc, err), (args, rc, err)


VALID_CLI = [[], ["--max-per-task", "32"], ["--subset", "1.0"], ["--est-rank-epochs", "1"], ["--approx-rate", "1"],
             ["--prune", "none"], ["--l1", "0", "--wd", "0"], ["--seed", "4294967295"], ["--upper-rank", "100000"],
             ["--schedule", "epoch", "--lr-decay", "1"], ["--dtype", "float64"], ["--channels-last", "off"]]


@pytest.mark.parametrize("args", VALID_CLI, ids=lambda a: " ".join(a) or "defaults")
def test_awkward_but_valid_flags_work(args, tmp_path, capsys):
    rc, err = run(capsys, *["demo", "--out", str(tmp_path / "o"), *TINY, *args])
    assert rc == 0, err


def test_library_errors_speak_of_the_api_and_the_cli_of_its_flags(tmp_path):
    import halrp_fast as hf
    from halrp_fast._cli_checks import in_cli_words
    from halrp_fast.continual.checkpoint import CheckpointError, read_manifest, save_checkpoint
    from halrp_fast.continual.identity import RunMismatch, UnknownRunFields, compare

    with pytest.raises(RunMismatch) as mismatch:
        compare({"config.seed": 0}, {"config.seed": 1}, (), "runs/x")
    with pytest.raises(UnknownRunFields) as unknown:
        compare({"config.seed": 0}, {"config.seed": 0}, ["config.nonsense"], "runs/x")
    save_checkpoint(tmp_path, hf.convert(hf.models.lenet(1, 8, 10)))
    manifest = tmp_path / "manifest.json"
    edited_manifest = json.loads(manifest.read_text())
    edited_manifest["head_name"] = "elsewhere"
    manifest.write_text(json.dumps(edited_manifest))
    with pytest.raises(CheckpointError) as edited:
        read_manifest(tmp_path)
    api = [str(e.value) for e in (mismatch, unknown, edited)]
    assert "allow_changes=['config.seed']" in api[0] and "allow_changes names no field" in api[1]
    assert "restore the file" in api[2]
    assert not any("--" in text for text in api), api
    mismatch.value.start_over = "to start over: run_stream(..., resume=False), or another out_dir"
    cli = [in_cli_words(e.value) for e in (mismatch, unknown, edited)]
    assert "--allow-change config.seed" in cli[0] and "--no-resume" in cli[0] and "resume=False" not in cli[0]
    assert "--allow-change names no field" in cli[1] and "restore the file" in cli[2]
    assert in_cli_words(ValueError("plain")) == "plain"
