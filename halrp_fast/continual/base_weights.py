"""A network's weights from a file, as the given base of a run (``halrp-fast run --base-weights FILE``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: a ``.safetensors`` file, or a state dict saved by ``torch.save`` (read with
    ``weights_only=True``: no code runs).  ``ValueError`` naming the file when it holds anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--base-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: one line naming it
        raise ValueError(f"--base-weights {path} cannot be read as a state dict: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"--base-weights {path} holds a {type(state).__name__}, not a state dict (names → tensors): "
                         f"save it with torch.save(model.state_dict(), path)")
    return state


def load_base_weights(net: nn.Module, path: str | Path) -> None:
    """Put the weights of ``path`` into ``net`` (every parameter and buffer, with their shapes), or raise
    ``ValueError`` naming the file and every missing, unexpected or mis-shaped entry."""
    state = read_state(path)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{what}: {names[:8]}{' …' if len(names) > 8 else ''}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if names]
        raise ValueError(f"--base-weights {path} does not fit the {type(net).__name__} network: {'; '.join(parts)}")
    net.load_state_dict(state)
