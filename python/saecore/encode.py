"""``saecore encode``: stream an activation store through an SAE into a sparse feature store.

Each batch of activations is encoded by PyTorch (on CUDA when present), turned into CSR on the same
device, and handed to the Rust writer, which copies it with the GIL released and compresses and
writes shards on its own threads while PyTorch computes the next batch. Shard ``i`` always holds rows
``[i*shard_rows, (i+1)*shard_rows)``, batches never straddle a shard, and each shard is committed by an
atomic manifest rename — so a killed encode, rerun with the same arguments, resumes at the first
missing shard and ends with exactly the bytes of an uninterrupted run. When every row is written the
feature-major copy is built (a streaming transpose, bounded in memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import features
from ._digest import file_sha256
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .features import FeatureStore, build_csc, dense_to_csr, open_writer
from .run import WEIGHTS_FILE, record_path


def _resolve_hook(store: ActivationStore, sae: Any, hook: str | None) -> str:
    """The hook to encode: the one asked for, else the SAE's own, else the store's only hook."""
    wanted = hook or getattr(sae.cfg, "hook_name", "") or None
    if wanted is not None and wanted not in store.hooks:
        if hook is None and len(store.hooks) == 1:
            wanted = None  # the SAE names a hook the store calls differently; use the only one there
        else:
            raise ValueError(f"{store.path}: no hook {wanted!r}; the store holds {store.hooks}")
    resolved = store.resolve_hook(wanted)
    if store.d_model(resolved) != sae.cfg.d_in:
        raise ValueError(
            f"SAE d_in={sae.cfg.d_in} does not match the store's width {store.d_model(resolved)} at hook {resolved!r}"
        )
    return resolved


def _spec(store: ActivationStore, sae_dir: Path | None, sae: Any, hook: str, batch_rows: int) -> dict[str, Any]:
    """Everything that determines the feature store's bytes; a resume must match it exactly."""
    weights = sae_dir / WEIGHTS_FILE if sae_dir is not None else None
    return {
        "activation_store": record_path(store.path),
        "activation_rows": store.num_rows,
        "hook": hook,
        "sae": record_path(sae_dir) if sae_dir is not None else None,
        "sae_weights_sha256": file_sha256(weights) if weights is not None and weights.exists() else None,
        "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in,
        "batch_rows": batch_rows,
    }


@dataclass
class EncodeConfig:
    """How ``saecore encode`` writes the feature store (the activation store, SAE and output aside)."""

    hook: str | None = None
    """Hook to encode; unset: the SAE's hook, else the store's only hook."""

    batch_rows: int = option(4096, ge=1, le=1 << 22)
    """Tokens per encode batch."""

    shard_rows: int = option(features.SHARD_ROWS, ge=1, le=1 << 28)
    """Tokens per shard (a multiple of --batch-rows, so a resumed run sees the same batches)."""

    value_dtype: Literal["float16", "float32"] = features.VALUE_DTYPE
    """Dtype of the stored activation values."""

    device: str | None = None
    """Torch device; unset: CUDA when present, else the CPU."""

    writer_threads: int = option(features.WRITER_THREADS, ge=1, le=256)
    """Threads compressing and writing shards."""

    csc: bool = True
    """Build the feature-major copy once every row is written (--no-csc skips it)."""

    csc_mem_budget_bytes: int = option(features.CSC_MEM_BUDGET_BYTES, ge=1 << 16, le=1 << 50)
    """Memory the feature-major transpose may use."""

    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        validate(self)
        if self.shard_rows % self.batch_rows:
            raise ValueError(
                f"shard_rows ({self.shard_rows}) must be a positive multiple of batch_rows ({self.batch_rows})"
            )


def encode(
    store: ActivationStore | str | os.PathLike[str],
    sae: Any,
    out: str | os.PathLike[str],
    cfg: EncodeConfig | None = None,
    **overrides: Any,
) -> FeatureStore:
    """Encode ``store`` through ``sae`` (an :class:`saecore.sae.SAE` or its folder) into the feature
    store ``out``; resume ``out`` if an earlier run with the same arguments was interrupted.

    ``cfg`` (:class:`EncodeConfig`) sets batch and shard sizes, dtype, device…; ``overrides`` set single
    fields (``encode(store, sae, out, batch_rows=256)``).
    """
    from .sae import SAE

    cfg = dataclasses.replace(cfg or EncodeConfig(), **overrides)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    dev = default_device(cfg.device)
    sae_dir = None
    if not isinstance(sae, torch.nn.Module):
        sae_dir = Path(sae)
        sae = SAE.load(sae_dir, device=dev)
    sae = sae.to(dev).eval()
    hook = _resolve_hook(store, sae, cfg.hook)
    spec = _spec(store, sae_dir, sae, hook, cfg.batch_rows)
    writer = open_writer(
        out, sae.cfg.d_sae, spec, value_dtype=cfg.value_dtype, shard_rows=cfg.shard_rows, threads=cfg.writer_threads
    )
    try:
        if not writer.complete:
            _encode_rows(store, sae, hook, writer, cfg.batch_rows, dev, cfg.progress)
            writer.finish()
    finally:
        writer.close()
    if cfg.csc:
        build_csc(out, mem_budget_bytes=cfg.csc_mem_budget_bytes)
    return FeatureStore(out)


def _encode_rows(
    store: ActivationStore, sae: Any, hook: str, writer: Any, batch_rows: int, dev: torch.device, progress: bool
) -> None:
    """Encode rows from the first uncommitted shard to the end, reading the next block from Zarr on a
    helper thread while the current one is encoded."""
    from tqdm.auto import tqdm

    start, n = writer.rows_at_open, store.num_rows
    starts = list(range(start, n, batch_rows))
    bar = tqdm(total=n, initial=start, unit="tok", desc="encode", disable=not progress, file=sys.stderr)
    read = lambda a: store.read(hook, a, min(a + batch_rows, n))  # a tiny closure for the prefetcher
    with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
        pending = pool.submit(read, starts[0]) if starts else None
        for i, first in enumerate(starts):
            block: np.ndarray = pending.result()  # (B, d_in) float32
            pending = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
            latents = sae.encode(torch.from_numpy(block).to(dev, non_blocking=True))  # (B, d_sae)
            writer.append(*dense_to_csr(latents))
            bar.update(len(block))
    bar.close()


# --- CLI ----------------------------------------------------------------------------------------


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="activation store (…/activations.zarr)")
    parser.add_argument("--sae", required=True, help="SAE folder (cfg.json + sae_weights.safetensors)")
    parser.add_argument("--out", required=True, help="feature store to write or resume (…/features/SAE.zarr)")
    add_arguments(parser, EncodeConfig)


def cli_run(args: argparse.Namespace) -> int:
    fs = encode(args.store, args.sae, args.out, from_args(EncodeConfig, args))
    mean_l0 = fs.nnz / max(fs.n_rows, 1)
    print(f"{fs.path}: {fs.n_rows} tokens x {fs.d_sae} features, {fs.nnz} activations (mean L0 {mean_l0:.1f})")
    return 0
