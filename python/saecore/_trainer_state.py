"""The trainer state on disk: tensors in safetensors, everything else as JSON in its header. No pickle.

A trainer state is a nested structure of dicts, lists, numbers, strings and tensors (the SAE's
``state_dict``, Adam's ``state_dict``, counters). :func:`save_state` stores each tensor under a dotted
path (``optimizer.state.0.exp_avg``) and the structure, with each tensor replaced by
``{"__tensor__": path}``, as JSON in the file's ``__metadata__``. :func:`load_state` parses both with
safetensors' reader and ``json.loads`` only — loading runs no code from the file, unlike
``torch.load`` of a pickle. A file that is not such a state (a planted pickle included) is refused
with :class:`~saecore.errors.CorruptDataError` naming it.

The whole file is covered by a sha256 of the tensor bytes and the structure, kept in the header, so
a flipped byte anywhere is reported rather than resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_target
from .errors import CorruptDataError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_HEADER_KEY = "saecore_trainer_state"
_STRUCTURE_KEY = "structure"
_DIGEST_KEY = "sha256"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor moved into ``tensors`` (keyed by its path) and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()} | (
            {"__int_keys__": True} if obj and all(isinstance(k, int) for k in obj) else {})
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: cannot store {type(obj).__name__} at {prefix!r}")


def _join(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    """Inverse of :func:`_split`."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            if obj[_TENSOR] not in tensors:
                raise CorruptDataError(f"{path}: trainer state names a tensor {obj[_TENSOR]!r} it does not hold")
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_join(v, tensors, path) for v in obj[_TUPLE])
        int_keys = obj.get("__int_keys__") is True
        return {(int(k) if int_keys else k): _join(v, tensors, path) for k, v in obj.items() if k != "__int_keys__"}
    if isinstance(obj, list):
        return [_join(v, tensors, path) for v in obj]
    return obj


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(structure.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically (aside, then renamed)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_split(state, "state", tensors), sort_keys=True, allow_nan=False)
    # One header key: safetensors writes its metadata map in hash order, so two keys would make the
    # bytes differ from run to run.
    meta = {_HEADER_KEY: json.dumps({_STRUCTURE_KEY: structure, _DIGEST_KEY: _digest(structure, tensors)})}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`save_state`; CorruptDataError naming ``path`` for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptDataError(f"{path}: not a saecore trainer state (unreadable safetensors: {e}); "
                               "delete it to restart the run") from e
    try:
        header = json.loads(meta[_HEADER_KEY])
        structure, digest = header[_STRUCTURE_KEY], header[_DIGEST_KEY]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptDataError(f"{path}: not a saecore trainer state (no readable {_HEADER_KEY} in its header)") from e
    if not isinstance(structure, str) or digest != _digest(structure, tensors):
        raise CorruptDataError(f"{path}: checksum mismatch; the trainer state is corrupt (delete it to restart)")
    try:
        state = _join(json.loads(structure), tensors, path)
    except ValueError as e:
        raise CorruptDataError(f"{path}: trainer state structure is not valid JSON ({e})") from e
    if not isinstance(state, dict):
        raise CorruptDataError(f"{path}: trainer state is not a mapping")
    return _to_device(state, torch.device(device))


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj
