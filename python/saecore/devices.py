"""The one rule for picking a torch device: what the caller asked for, else CUDA when present, else the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def default_device(requested: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """``requested`` as a ``torch.device``; when it is None or empty, CUDA if PyTorch sees one (GPU
    ``local_rank`` under torchrun), else the CPU."""
    import torch  # here, not at the top: modules that import this stay free of torch until a device is needed

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
    return torch.device("cpu")
