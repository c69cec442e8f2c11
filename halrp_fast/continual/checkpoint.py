"""Checkpoints: one safetensors file per task and a JSON manifest, every file written atomically.

Layout of a checkpoint directory::

    manifest.json                   format, versions, head name, classes per task, ranks, per-file sha256
                                    and tensor shapes, whatever the caller adds (config, reports, ...), and
                                    the sha256 of all of that (``checksum``)
    task_0000-<sha256[:16]>.safetensors   the base (task 0) and all shared state
    task_0001-<sha256[:16]>.safetensors   task 1's r, s, U, V, biases, BatchNorm and head
    ...

Crash consistency: task files are named by their content, so a save writes only files whose content is new
(identical tensors give identical bytes), never over a file the current manifest names; then it replaces the
manifest (write to a temporary file, fsync, rename, fsync the directory), and only then removes the files no
manifest names and the temporary files of interrupted saves.  A process killed at any instant leaves the
previous checkpoint or the new one, complete.  Loading verifies the manifest's checksum, every file's sha256
and every tensor's shape before anything is copied into a model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from .._version import __version__
from ..nn import TaskModel

FORMAT = "halrp_fast-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: fixed file names, no manifest checksum
MANIFEST = "manifest.json"
_TASK_FILE = re.compile(r"task_\d{4}(-[0-9a-f]{16})?\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupted or does not match the model.

    ``problem`` says what is wrong, ``remedy`` (or ``None``) how to go on, and ``start_over`` (set by the code that
    chose the directory, e.g. :func:`~halrp_fast.continual.runner.run_stream`) how to start again instead; both are
    worded for the library's API, and the CLI words them with its own flags.
    """

    def __init__(self, problem: str, remedy: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.remedy = problem, remedy
        self.start_over: str | None = None

    def __str__(self) -> str:
        return "; ".join(part for part in (self.problem, self.remedy, self.start_over) if part)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename: a reader sees the
    old content or the new one, never a part."""
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
    _fsync_directory(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def task_file(t: int, sha256: str) -> str:
    """The name of task ``t``'s file with content hash ``sha256`` (hex)."""
    return f"task_{t:04d}-{sha256[:16]}.safetensors"


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shared_tensors(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: the key it shares its tensor with}`` for every entry of ``state`` that is the same tensor as an
    earlier one (the same storage, offset, shape and strides: tied weights such as an embedding and a language-model
    head); the earlier key is the one stored."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, value in state.items():
        if value.device.type == "meta" or value.numel() == 0:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                 value.dtype, value.device)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def _serialise(t: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str] | None = None
               ) -> tuple[bytes, dict]:
    """Task ``t``'s safetensors bytes (the same tensors always give the same bytes: one metadata key, as
    safetensors writes several in a varying order) and its manifest entry without the file name.  ``aliases``
    (key → the key whose tensor it is, from :func:`shared_tensors`): those keys are not stored; the entry names
    them under ``"aliases"``."""
    from safetensors.torch import save as st_save

    aliases = {k: v for k, v in (aliases or {}).items() if k in tensors}
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in aliases}
    data = st_save(payload, metadata={FORMAT: str(t)})
    shapes = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in payload.items()}
    entry = {"task": t, "sha256": hashlib.sha256(data).hexdigest(), "tensors": shapes}
    if aliases:
        entry["aliases"] = dict(sorted(aliases.items()))
    return data, entry


def _holds(path: Path, sha256: str) -> bool:
    return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def save_checkpoint(directory: str | os.PathLike, model: TaskModel, extra: dict | None = None) -> dict:
    """Write ``model`` (all tasks; lazily added ones are read first) to ``directory``; returns the manifest.

    Crash-consistent (see the module docstring): unchanged task files are kept as they are, new ones written
    before the manifest that names them, and leftovers of this or an interrupted earlier save removed last.
    """
    model.ensure_loaded()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    parts = model.split_state_dict()
    aliases = shared_tensors({k: v for part in parts.values() for k, v in part.items()})
    for t, tensors in parts.items():
        data, entry = _serialise(t, tensors, aliases)
        name = task_file(t, entry["sha256"])
        if not _holds(directory / name, entry["sha256"]):
            atomic_write_bytes(directory / name, data)
        entries.append({"task": t, "file": name, **{k: v for k, v in entry.items() if k != "task"}})
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
    manifest["checksum"] = manifest_checksum(manifest)
    atomic_write_json(directory / MANIFEST, manifest)
    remove_leftovers(directory, {e["file"] for e in entries})
    return manifest


def remove_leftovers(directory: Path, keep: set[str]) -> None:
    """Delete task files not in ``keep`` and temporary files of interrupted writes of this directory."""
    for path in directory.iterdir():
        name = path.name
        stale_tmp = name.startswith((".task_", f".{MANIFEST}.")) and name.endswith(".tmp")
        if stale_tmp or (_TASK_FILE.fullmatch(name) and name not in keep):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


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
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint version {manifest.get('version')}, this library reads "
                              f"{READABLE_VERSIONS}")
    if manifest["version"] >= 2 and manifest.get("checksum") != manifest_checksum(manifest):
        raise CheckpointError(f"{path} was modified or corrupted (its checksum does not match its content)",
                              "restore the file")
    for key in ("head_name", "num_classes", "tasks"):
        if key not in manifest:
            raise CheckpointError(f"{path} lacks the field {key!r}")
    if len(manifest["tasks"]) != len(manifest["num_classes"]):
        raise CheckpointError(f"{path} lists {len(manifest['tasks'])} task files for "
                              f"{len(manifest['num_classes'])} tasks")
    _check_heads(path, manifest)
    return manifest


def _check_heads(path: Path, manifest: dict) -> None:
    """Each task's head (a ``heads.<t>.weight`` tensor, where the head stores one) has ``num_classes[t]`` rows."""
    for entry in manifest["tasks"]:
        t = entry.get("task")
        if not isinstance(t, int) or not 0 <= t < len(manifest["num_classes"]):
            raise CheckpointError(f"{path}: task file entry {entry.get('file')!r} has task {t!r}")
        for key, (shape, _) in entry.get("tensors", {}).items():
            if key.endswith(f".heads.{t}.weight") and shape and shape[0] != manifest["num_classes"][t]:
                raise CheckpointError(f"{path}: task {t} has num_classes {manifest['num_classes'][t]} but its head "
                                      f"{key} has {shape[0]} rows")


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


def with_aliases(tensors: dict[str, torch.Tensor], entry: dict, source: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """``tensors`` of a task file plus the keys its ``entry`` stores as aliases (shared tensors stored once), each
    the tensor of the key it names, taken from ``tensors`` or ``source`` (the rest of the checkpoint, or the model)."""
    out = dict(tensors)
    for key, stored in entry.get("aliases", {}).items():
        value = out.get(stored, source.get(stored))
        if value is None:
            raise CheckpointError(f"checkpoint file {entry['file']}: {key} shares the tensor {stored}, which the "
                                  f"checkpoint does not hold")
        out[key] = value
    return out


def load_state(directory: str | os.PathLike, manifest: dict) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (verified against the manifest; shared ones as one tensor under each of their
    keys), plus the model's extra state."""
    state: dict[str, torch.Tensor] = {}
    files = [(entry, read_task_file(directory, entry)) for entry in manifest["tasks"]]
    for _, tensors in files:
        state.update(tensors)
    for entry, tensors in files:
        state.update(with_aliases(tensors, entry, state))
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
    base = with_aliases(read_task_file(directory, entries[0]), entries[0], {})
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
        if entry.get("aliases"):  # shared with tensors of the base (loaded above) or of another task
            raise CheckpointError(f"{directory}: task {entry['task']} shares tensors with other tasks "
                                  f"({sorted(entry['aliases'])[:3]}); load it with lazy=False")
        try:
            model.add_lazy_task(num_classes, functools.partial(read_task_file, directory, entry), shapes)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {directory} does not match the model: {exc}") from None
    return manifest
