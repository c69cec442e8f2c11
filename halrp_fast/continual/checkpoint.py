"""Checkpoints: one safetensors file per task and a JSON manifest, every file written atomically.

Layout of a checkpoint directory::

    manifest.json            format, versions, head name, classes per task, ranks, per-file sha256
                             and tensor shapes, plus whatever the caller adds (config, reports, ...)
    task_0000.safetensors    the base (task 0) and all shared state
    task_0001.safetensors    task 1's r, s, U, V, biases, BatchNorm and head
    ...

A task file is rewritten only when its content changed.  Loading verifies every file's sha256 and every
tensor's shape against the manifest before anything is copied into a model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .._version import __version__
from ..nn import TaskModel

FORMAT = "halrp_fast-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupted or does not match the model."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def task_file(t: int) -> str:
    return f"task_{t:04d}.safetensors"


def save_checkpoint(directory: str | os.PathLike, model: TaskModel, extra: dict | None = None) -> dict:
    """Write ``model`` (all tasks; lazily added ones are read first) to ``directory``; returns the manifest."""
    from safetensors.torch import save as st_save

    model.ensure_loaded()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (directory / MANIFEST).exists():
        try:
            previous = {e["file"]: e["sha256"] for e in read_manifest(directory)["tasks"]}
        except CheckpointError:
            previous = {}
    entries = []
    for t, tensors in model.split_state_dict().items():
        payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        data = st_save(payload, metadata={"format": FORMAT, "task": str(t)})
        sha = hashlib.sha256(data).hexdigest()
        name = task_file(t)
        if previous.get(name) != sha or not (directory / name).exists():
            atomic_write_bytes(directory / name, data)
        shapes = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in payload.items()}
        entries.append({"task": t, "file": name, "sha256": sha, "tensors": shapes})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "halrp_fast": __version__,
        "torch": torch.__version__,
        "head_name": model.head_name,
        "num_classes": model.num_classes,
        "ranks": {str(t): model.ranks(t) for t in range(1, model.num_tasks)},
        "tasks": entries,
        **(extra or {}),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {directory}: expected {MANIFEST} and task_NNNN.safetensors files")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (corrupted checkpoint): {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a halrp_fast checkpoint (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {manifest.get('version')}, this library reads {VERSION}")
    for key in ("head_name", "num_classes", "tasks"):
        if key not in manifest:
            raise CheckpointError(f"{path} lacks the field {key!r}")
    if len(manifest["tasks"]) != len(manifest["num_classes"]):
        raise CheckpointError(f"{path} lists {len(manifest['tasks'])} task files for "
                              f"{len(manifest['num_classes'])} tasks")
    return manifest


def read_task_file(directory: str | os.PathLike, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors of one task file, verified against its manifest ``entry`` (sha256, names, shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(directory) / entry["file"]
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupted (sha256 differs from the manifest)")
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from None
    expected = entry["tensors"]
    if set(tensors) != set(expected):
        raise CheckpointError(f"{path} holds tensors {sorted(set(tensors) ^ set(expected))[:5]} "
                              f"that differ from the manifest")
    for k, v in tensors.items():
        if list(v.shape) != expected[k][0]:
            raise CheckpointError(f"{path}: tensor {k} has shape {list(v.shape)}, manifest says {expected[k][0]}")
    return tensors


def load_state(directory: str | os.PathLike, manifest: dict) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (verified against the manifest), plus the model's extra state."""
    state: dict[str, torch.Tensor] = {}
    for entry in manifest["tasks"]:
        state.update(read_task_file(directory, entry))
    state["_extra_state"] = {"num_classes": list(manifest["num_classes"])}
    return state


def load_into(model: TaskModel, directory: str | os.PathLike, manifest: dict | None = None,
              lazy: bool = False) -> dict:
    """Load a checkpoint into a freshly converted ``model`` (one task); returns the manifest.

    ``lazy=True`` reads only the base file now; every other task is added with
    :meth:`~halrp_fast.nn.TaskModel.add_lazy_task` and its file is read (and verified) when the task is first
    used, so opening a checkpoint of hundreds of tasks costs the base plus the manifest.
    """
    manifest = manifest or read_manifest(directory)
    if model.head_name != manifest["head_name"]:
        raise CheckpointError(f"checkpoint head {manifest['head_name']!r} != model head {model.head_name!r}")
    if not lazy:
        state = load_state(directory, manifest)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {directory} does not match the model: {exc}") from None
        return manifest
    if model.num_tasks != 1:
        raise CheckpointError("load into a freshly converted model (with task 0 only)")
    entries = sorted(manifest["tasks"], key=lambda e: e["task"])
    if [e["task"] for e in entries] != list(range(len(entries))):
        raise CheckpointError(f"{directory}: the manifest's task files are not numbered 0..{len(entries) - 1}")
    base = read_task_file(directory, entries[0])
    wanted = model.task_state_dict(0)
    if set(base) != set(wanted):
        raise CheckpointError(f"checkpoint {directory} does not match the model: base tensors "
                              f"{sorted(set(base) ^ set(wanted))[:5]} differ")
    try:
        model.load_state_dict(base, strict=False)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory} does not match the model: {exc}") from None
    for entry, num_classes in zip(entries[1:], manifest["num_classes"][1:], strict=True):
        shapes = {k: (shape, getattr(torch, dtype)) for k, (shape, dtype) in entry["tensors"].items()}
        try:
            model.add_lazy_task(num_classes, functools.partial(read_task_file, directory, entry), shapes)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {directory} does not match the model: {exc}") from None
    return manifest
