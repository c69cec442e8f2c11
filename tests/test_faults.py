"""Faults a run must survive: kills at any instant of a checkpoint save, edited and corrupted files."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import halrp_fast as hf
from halrp_fast.continual.checkpoint import MANIFEST, CheckpointError, load_into, read_manifest, save_checkpoint


def model_with_tasks(tasks: int = 3) -> hf.TaskModel:
    torch.manual_seed(0)
    model = hf.convert(hf.models.lenet(1, 8, 10))
    for _ in range(tasks):
        t = model.add_task(10)
        for name, layer in model.perturbed_layers().items():
            model.set_rank(t, name, torch.randn(layer.out_features, 2), torch.randn(layer.in_features, 2))
    return model


def set_generation(model: hf.TaskModel, g: int) -> None:
    """Every parameter of tasks 1 and 2 becomes ``g``; task 3 and the base stay (their files are reused)."""
    with torch.no_grad():
        for t in (1, 2):
            for p in model.task_parameters(t):
                p.fill_(float(g))


def check_generation(directory) -> int:
    """Load ``directory`` into a fresh model and return the generation it holds (all its tensors agree)."""
    manifest = read_manifest(directory)
    fresh = hf.convert(hf.models.lenet(1, 8, 10))
    load_into(fresh, directory, manifest)
    g = manifest["generation"]
    for t in (1, 2):
        for p in fresh.task_parameters(t):
            assert bool((p == float(g)).all()), (t, g)
    return g


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_checkpoint_survives_kills_at_random_instants_of_its_saves(tmp_path):
    """A child process saves generation after generation into one directory; it is killed (SIGKILL) at a random
    instant, 200 times. After every kill the directory loads, complete, as one generation, and the generation
    never goes back."""
    model = model_with_tasks()
    set_generation(model, 0)
    save_checkpoint(tmp_path, model, {"generation": 0})
    tic = time.perf_counter()
    for g in range(1, 4):
        set_generation(model, g)
        save_checkpoint(tmp_path, model, {"generation": g})
    one_save = (time.perf_counter() - tic) / 3
    rng = random.Random(0)
    last, survived, next_gen = 3, 0, 4
    for _ in range(200):  # bounded by kills, not by this machine's speed
        start = next_gen
        pid = os.fork()
        if pid == 0:  # child: save until killed
            try:
                g = start
                while True:
                    set_generation(model, g)
                    save_checkpoint(tmp_path, model, {"generation": g})
                    g += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 2.5 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        g = check_generation(tmp_path)
        assert g >= last
        last, survived = g, survived + 1
        next_gen = max(next_gen, g + 1) + 50  # generations of later children never collide with earlier ones
    assert survived == 200
    # the next save removes what interrupted saves left (temporary files, files no manifest names)
    set_generation(model, next_gen)
    save_checkpoint(tmp_path, model, {"generation": next_gen})
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {MANIFEST} | {e["file"] for e in read_manifest(tmp_path)["tasks"]}


def test_unchanged_task_files_are_kept_and_bytes_are_deterministic(tmp_path):
    model = model_with_tasks()
    first = save_checkpoint(tmp_path / "a", model)
    stat = {e["file"]: (tmp_path / "a" / e["file"]).stat() for e in first["tasks"]}
    second = save_checkpoint(tmp_path / "a", model)
    assert [e["file"] for e in first["tasks"]] == [e["file"] for e in second["tasks"]]
    for e in second["tasks"]:  # not rewritten: same inode, same modification time
        now = (tmp_path / "a" / e["file"]).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat[e["file"]].st_ino, stat[e["file"]].st_mtime_ns)
    # another process (another hash seed for safetensors' metadata map) writes the same bytes
    script = ("import torch, halrp_fast as hf, sys; sys.path.insert(0, 'tests'); from test_faults import "
              "model_with_tasks; from halrp_fast.continual.checkpoint import save_checkpoint; "
              f"save_checkpoint({str(tmp_path / 'b')!r}, model_with_tasks())")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    other = read_manifest(tmp_path / "b")
    assert [e["sha256"] for e in other["tasks"]] == [e["sha256"] for e in first["tasks"]]


def test_an_edited_manifest_is_refused(tmp_path):
    model = model_with_tasks(1)
    save_checkpoint(tmp_path, model, {"acc_matrix": [[90.0]]})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["acc_matrix"] = [[99.0]]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="modified or corrupted .*checksum"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_eager_and_lazy_loads_refuse_classes_that_disagree_with_the_head(tmp_path, lazy):
    model = model_with_tasks(2)
    manifest = save_checkpoint(tmp_path, model)
    manifest["num_classes"][2] = 7
    manifest.pop("checksum")
    from halrp_fast.continual.checkpoint import atomic_write_json, manifest_checksum

    manifest["checksum"] = manifest_checksum(manifest)  # a consistent manifest that disagrees with its tensors
    atomic_write_json(tmp_path / MANIFEST, manifest)
    with pytest.raises(CheckpointError, match="task 2 has num_classes 7 but its head .* has 10 rows"):
        load_into(hf.convert(hf.models.lenet(1, 8, 10)), tmp_path, lazy=lazy)


# --------------------------------------------------------------------------- a whole run, killed and resumed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["demo", "--tasks", "2", "--epochs", "2", "--max-per-task", "200", "--batch-size", "32", "--no-progress",
        "--quiet"]


def cli(out, fault=None, fsize=None):
    env = {k: v for k, v in os.environ.items() if k not in ("FAULT", "FSIZE")}
    if fault:
        env["FAULT"] = fault
    if fsize:
        env["FSIZE"] = str(fsize)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"), *DEMO, "--out", str(out)],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


def results(out) -> dict:
    r = json.loads((out / "results.json").read_text())
    return {k: r[k] for k in ("acc_matrix", "ranks", "params", "ACC", "BWT")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    done = cli(out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def reference(finished):
    return results(finished)


# 12 optimiser steps per task; evaluations: 1 after task 0, 2 after task 1; writes: the base's file and the
# manifest, task 1's file and the manifest, results.json
@pytest.mark.parametrize("fault", ["training:5", "training:20", "evaluation:2", "evaluation:3", "save:1", "save:3",
                                   "save:4"])
def test_a_run_killed_anywhere_resumes_to_the_same_result(reference, tmp_path, fault):
    """Killed (SIGKILL) in training, in evaluation, or between the files of a checkpoint save: the next run of the
    same command resumes from the last complete checkpoint and ends with the uninterrupted run's results."""
    killed = cli(tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert results(tmp_path) == reference


def test_ctrl_c_says_what_was_saved_and_rerunning_resumes(reference, tmp_path):
    stopped = cli(tmp_path, "interrupt:20")  # the 20th optimiser step: in task 1, task 0 saved
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert stopped.returncode == 130 and len(lines) == 1, stopped.stderr
    assert lines[0] == (f"halrp-fast: interrupted; {tmp_path / 'checkpoint'} holds 1 completed task(s): rerun the "
                        f"same command to resume from there")
    assert cli(tmp_path).returncode == 0 and results(tmp_path) == reference


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(reference, tmp_path):
    full = cli(tmp_path, fsize=1_000_000)  # the base's file (2.4 MB) cannot be written
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], full.stderr
    assert not [p.name for p in (tmp_path / "checkpoint").iterdir()]  # neither a task file nor a temporary one
    assert cli(tmp_path).returncode == 0 and results(tmp_path) == reference


def test_a_read_only_output_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import errno

    import halrp_fast._cli_checks as checks
    from halrp_fast.cli import main

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_training(*args, **kwargs):
        raise AssertionError("a run started training before its output was found unwritable")

    monkeypatch.setattr(checks.tempfile, "mkstemp", read_only)
    monkeypatch.setattr("halrp_fast.continual.runner.run_stream", no_training)
    assert main([*DEMO, "--out", str(tmp_path / "out")]) == 2
    assert "cannot write there (Read-only file system)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["task file", "manifest truncated", "manifest edited", "task file missing"])
def test_a_corrupted_checkpoint_is_one_clear_error_with_the_way_out(finished, reference, tmp_path, kind, capsys):
    import shutil

    from halrp_fast.cli import main

    done = tmp_path / "done"
    shutil.copytree(finished, done)
    ckpt = done / "checkpoint"
    task_file = sorted(ckpt.glob("task_0001-*.safetensors"))[0]
    if kind == "task file":
        data = bytearray(task_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        task_file.write_bytes(bytes(data))
        expected = "is corrupted (sha256 differs from the manifest)"
    elif kind == "task file missing":
        task_file.unlink()
        expected = "is missing"
    elif kind == "manifest truncated":
        text = (ckpt / MANIFEST).read_text()
        (ckpt / MANIFEST).write_text(text[: len(text) // 2])
        expected = "is not valid JSON"
    else:
        m = json.loads((ckpt / MANIFEST).read_text())
        m["ranks"]["1"] = {k: v + 1 for k, v in m["ranks"]["1"].items()}
        (ckpt / MANIFEST).write_text(json.dumps(m))
        expected = "was modified or corrupted"
    capsys.readouterr()
    assert main([*DEMO, "--out", str(done)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "--no-resume" in lines[0]
    if kind == "task file":  # the way out works
        assert main([*DEMO, "--out", str(done), "--no-resume"]) == 0
        assert results(done) == reference


def test_a_corrupted_data_file_is_one_clear_error(tmp_path):
    from halrp_fast.data.cifar import load_cifar100

    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name in ("train", "test"):
        (root / name).write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="cannot read CIFAR-100 pickle .*train"):
        load_cifar100(tmp_path)


def test_every_kind_of_corrupted_pickle_is_one_clear_error(tmp_path):
    """Random bytes, random opcodes after a protocol header, and a valid data pickle with a few bytes flipped:
    whatever pickle or numpy raises deep inside (MemoryError for a huge declared length, LookupError,
    SystemError, ...), the loader reports one ValueError naming the file."""
    import pickle
    import random

    import numpy as np

    from halrp_fast.data import safe_pickle

    good = pickle.dumps({"data": np.arange(10, dtype=np.uint8), "fine_labels": [1, 2]}, protocol=2)
    path = tmp_path / "train"
    for seed in range(600):
        rng = random.Random(seed)
        if seed % 3 == 0:
            data = rng.randbytes(rng.randint(1, 2000))
        elif seed % 3 == 1:
            data = b"\x80" + bytes([rng.choice([2, 3, 4, 5])]) + rng.randbytes(rng.randint(0, 500))
        else:
            flipped = bytearray(good)
            for _ in range(rng.randint(1, 5)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            data = bytes(flipped)
        path.write_bytes(data)
        try:
            safe_pickle.load(path, "CIFAR-100 pickle")
        except ValueError as exc:
            assert str(path) in str(exc)
    path.write_bytes(b"\x80\x04\x8e" + (1 << 62).to_bytes(8, "little"))  # BINBYTES8 of 4 EiB
    with pytest.raises(ValueError, match="cannot read CIFAR-100 pickle"):
        safe_pickle.load(path, "CIFAR-100 pickle")
