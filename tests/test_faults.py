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
from halrp_fast.continual.checkpoint import (MANIFEST, CheckpointError, load_into, read_manifest,
                                             save_checkpoint)


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
    deadline = time.perf_counter() + 90
    for _ in range(200):
        assert time.perf_counter() < deadline, f"only {survived} kills in 90 s"
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
