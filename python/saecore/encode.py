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
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .activations import ActivationStore
from .features import FeatureStore, build_csc, dense_to_csr, open_writer

WEIGHTS_FILE = "sae_weights.safetensors"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_hook(store: ActivationStore, sae: Any, hook: str | None) -> str:
    """The hook to encode: the one asked for, else the SAE's own, else the store's only hook."""
    wanted = hook or getattr(sae.cfg, "hook_name", "") or None
    if wanted is not None and wanted not in store.hooks:
        if hook is None and len(store.hooks) == 1:
            wanted = None  # the SAE names a hook the store calls differently; use the only one there
        else:
            raise ValueError(f"{store.path}: no hook {wanted!r}; the store holds {store.hooks}")
    resolved = store._check_hook(wanted)
    if store.d_model(resolved) != sae.cfg.d_in:
        raise ValueError(
            f"SAE d_in={sae.cfg.d_in} does not match the store's width {store.d_model(resolved)} at hook {resolved!r}"
        )
    return resolved


def _spec(store: ActivationStore, sae_dir: Path | None, sae: Any, hook: str, batch_rows: int) -> dict[str, Any]:
    """Everything that determines the feature store's bytes; a resume must match it exactly."""
    weights = sae_dir / WEIGHTS_FILE if sae_dir is not None else None
    return {
        "activation_store": str(store.path.resolve()),
        "activation_rows": store.num_rows,
        "hook": hook,
        "sae": str(sae_dir.resolve()) if sae_dir is not None else None,
        "sae_weights_sha256": _file_sha256(weights) if weights is not None and weights.exists() else None,
        "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in,
        "batch_rows": batch_rows,
    }


def encode(
    store: ActivationStore | str | os.PathLike[str],
    sae: Any,
    out: str | os.PathLike[str],
    *,
    hook: str | None = None,
    batch_rows: int = 4096,
    shard_rows: int = 16384,
    value_dtype: str = "float16",
    device: str | torch.device | None = None,
    writer_threads: int = 2,
    csc: bool = True,
    csc_mem_budget_bytes: int = 1 << 30,
    progress: bool = True,
) -> FeatureStore:
    """Encode ``store`` through ``sae`` (an :class:`saecore.sae.SAE` or its folder) into the feature
    store ``out``; resume ``out`` if an earlier run with the same arguments was interrupted.

    ``shard_rows`` must be a multiple of ``batch_rows`` (so a resumed run sees the same batches).
    """
    from .sae import SAE

    if batch_rows < 1 or shard_rows < 1 or shard_rows % batch_rows:
        raise ValueError(f"shard_rows ({shard_rows}) must be a positive multiple of batch_rows ({batch_rows})")
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sae_dir = None
    if not isinstance(sae, torch.nn.Module):
        sae_dir = Path(sae)
        sae = SAE.load(sae_dir, device=dev)
    sae = sae.to(dev).eval()
    hook = _resolve_hook(store, sae, hook)
    spec = _spec(store, sae_dir, sae, hook, batch_rows)
    writer = open_writer(
        out, sae.cfg.d_sae, spec, value_dtype=value_dtype, shard_rows=shard_rows, threads=writer_threads
    )
    try:
        if not writer.complete:
            _encode_rows(store, sae, hook, writer, batch_rows, dev, progress)
            writer.finish()
    finally:
        writer.close()
    if csc:
        build_csc(out, mem_budget_bytes=csc_mem_budget_bytes)
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
    parser.add_argument("--hook", default=None, help="hook to encode (default: the SAE's hook)")
    parser.add_argument("--batch-rows", type=int, default=4096, help="tokens per encode batch")
    parser.add_argument("--shard-rows", type=int, default=16384, help="tokens per shard (a multiple of --batch-rows)")
    parser.add_argument("--value-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when present)")
    parser.add_argument("--writer-threads", type=int, default=2, help="threads compressing and writing shards")
    parser.add_argument("--no-csc", action="store_true", help="skip building the feature-major copy")
    parser.add_argument("--no-progress", action="store_true")


def cli_run(args: argparse.Namespace) -> int:
    fs = encode(
        args.store,
        args.sae,
        args.out,
        hook=args.hook,
        batch_rows=args.batch_rows,
        shard_rows=args.shard_rows,
        value_dtype=args.value_dtype,
        device=args.device,
        writer_threads=args.writer_threads,
        csc=not args.no_csc,
        progress=not args.no_progress,
    )
    mean_l0 = fs.nnz / max(fs.n_rows, 1)
    print(f"{fs.path}: {fs.n_rows} tokens x {fs.d_sae} features, {fs.nnz} activations (mean L0 {mean_l0:.1f})")
    return 0
