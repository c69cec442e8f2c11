"""Checks of the command line's arguments: each failure is one line ``halrp-fast: error: …`` and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ._checks import check_int, check_number


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (no usage dump) and exit 2."""

    def error(self, message: str):
        print(f"halrp-fast: error: {message}", file=sys.stderr)
        sys.exit(2)


def _flag_type(convert, expected: str, check):
    """``type=`` that parses ``text`` with ``convert`` and then validates it with ``check(name, value)``: one-line
    errors without the argument's name (argparse puts ``argument --flag:`` in front)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            check("it", value)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("it ")) from None
        return value

    return parse


def integer(low: int | None = None, high: int | None = None):
    """``type=`` for an int flag in ``[low, high]``."""
    return _flag_type(int, "an integer", lambda name, value: check_int(name, value, low=low, high=high))


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """``type=`` for a finite float flag within the bounds."""
    return _flag_type(float, "a number",
                      lambda name, value: check_number(name, value, low, high, low_open, high_open))


def prepare_out_dir(out: Path) -> None:
    """Create ``--out`` and check that files can be written there, before any training."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def check_device(device: str | None) -> None:
    """``--device`` names a device this machine has."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device "
                             f"cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda devices are supported")


def in_cli_words(exc: Exception) -> str:
    """The one-line message of a library error, its ways out named by this CLI's flags instead of the API's
    arguments (a checkpoint's run mismatch, starting over, unknown fields to allow)."""
    from .continual.checkpoint import CheckpointError
    from .continual.identity import RunMismatch, UnknownRunFields

    if isinstance(exc, UnknownRunFields):
        return f"--allow-change names no field of a run: {exc.unknown}; fields: {exc.fields}"
    if not isinstance(exc, CheckpointError):
        return str(exc)
    remedy = exc.remedy
    if isinstance(exc, RunMismatch):
        remedy = "continue it deliberately with " + " ".join(f"--allow-change {name}" for name, _, _ in exc.fields)
    start_over = "to start over: --no-resume, or another --out" if exc.start_over else None
    return "; ".join(part for part in (exc.problem, remedy, start_over) if part)


def interrupted_message(out: str | None) -> str:
    """What a Ctrl-C left: the completed tasks in ``out``'s checkpoint and how to continue."""
    if out is None:
        return "halrp-fast: interrupted"
    from .continual.checkpoint import MANIFEST, CheckpointError, read_manifest

    directory = Path(out) / "checkpoint"
    try:
        done = len(read_manifest(directory)["num_classes"]) if (directory / MANIFEST).exists() else 0
    except CheckpointError:
        done = 0
    if done:
        return (f"halrp-fast: interrupted; {directory} holds {done} completed task(s): rerun the same command to "
                f"resume from there")
    return f"halrp-fast: interrupted before a task was completed; rerun the same command to start again ({out})"
