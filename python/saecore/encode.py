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
import itertools
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import cluster, features
from ._atomic import (
    publish_dir,
    read_json_object,
    remove_dead_writers_files,
    write_text,
)
from ._digest import file_sha256
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .errors import CorruptDataError
from .features import FeatureStore, build_csc, dense_to_csr, open_writer
from .run import (
    FEATURE_SHARDS_DIR,
    RAY_PARTS_DIR,
    WEIGHTS_FILE,
    ZARR_NODE_FILE,
    feature_store_staging,
    ray_part_dir,
    record_path,
)


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

    ray: str | None = option(None, const="local", metavar="ADDRESS")
    """Encode on a Ray cluster: join ADDRESS (HOST:PORT, auto, ray://…), or start a local one when no address is given."""

    ray_workers: int | None = option(None, ge=1, le=1 << 16)
    """With --ray: SAE-holding workers (default: one per GPU of the cluster, else one per CPU)."""

    shards_per_part: int = option(4, ge=1, le=1 << 20)
    """With --ray: shards per part, the unit a worker writes and the driver commits."""

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
    if cfg.ray is not None:
        _encode_on_ray(store, sae, Path(out), cfg)
        if cfg.csc:
            build_csc(out, mem_budget_bytes=cfg.csc_mem_budget_bytes)
        return FeatureStore(out)
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
    remove_dead_writers_files(out)  # what a killed Rust writer was staging
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
    store: ActivationStore, sae: Any, hook: str, writer: Any, batch_rows: int, dev: torch.device, progress: bool,
    stop: int | None = None,
) -> None:
    """Encode rows from the first uncommitted shard to ``stop`` (default: the end), reading the next block
    from Zarr on a helper thread while the current one is encoded."""
    from tqdm.auto import tqdm

    start, n = writer.rows_at_open, store.num_rows if stop is None else stop
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


# --- on a Ray cluster (--ray) -------------------------------------------------------------------
# Shard i always holds rows [i*shard_rows, (i+1)*shard_rows) and its files do not depend on any other
# shard, so workers (Ray actors holding the SAE) can write disjoint shard ranges. Each part is a
# complete sub-store under STORE/.ray-parts/part-<first shard>/ whose manifest starts with
# placeholder entries for shards 0..first: the Rust writer, opened on it, resumes at shard `first`
# and writes shards with their final index and rows (so the same bytes), committing each with its
# CRC-32C. The driver checks every chunk of a finished part against those CRCs, hard-links its shard
# folders into the store and appends their entries to the store's manifest (an atomic rewrite, the
# same JSON the Rust committer writes). A killed worker's part resumes in the next attempt at its
# first missing shard; a killed driver's rerun commits the parts it finds finished.


@dataclass
class EncodePart:
    """Shards ``key .. end`` (``last``: the store's final part), written by one worker into ``folder``."""

    key: int
    end: int
    last: bool
    folder: Path
    store: Path


class EncodeWorker:
    """What each Ray actor holds: the activation store and the SAE, opened once; :meth:`run` writes a part."""

    def __init__(self, store: str, sae_dir: str, hook: str, spec: dict[str, Any], cfg: EncodeConfig):
        from .sae import SAE

        self.store, self.dev = ActivationStore(store), default_device(cfg.device)
        self.sae = SAE.load(Path(sae_dir), device=self.dev).to(self.dev).eval()
        self.hook, self.spec, self.cfg = hook, spec, cfg

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.dev)}

    def run(self, part: EncodePart) -> None:
        cfg = self.cfg
        if not (part.folder / ZARR_NODE_FILE).exists():
            _seed_part_store(part.store, part.folder, part.key)
        writer = open_writer(part.folder, self.sae.cfg.d_sae, self.spec, value_dtype=cfg.value_dtype,
                             shard_rows=cfg.shard_rows, threads=cfg.writer_threads)
        try:
            stop = min(part.end * cfg.shard_rows, self.store.num_rows)
            if writer.rows_at_open < stop:
                _encode_rows(self.store, self.sae, self.hook, writer, cfg.batch_rows, self.dev, False, stop)
            if part.last and not writer.complete:
                writer.finish()
        finally:
            writer.close()


def _manifest_doc(store: Path) -> dict[str, Any]:
    """The root ``zarr.json`` of a feature store (its manifest under ``attributes.saecore``)."""
    return read_json_object(store / ZARR_NODE_FILE)


def _write_manifest_doc(store: Path, doc: dict[str, Any]) -> None:
    """Rewrite the manifest atomically, as the Rust committer does (compact JSON, keys sorted)."""
    m = doc["attributes"]["saecore"]
    m["n_rows"] = m["shards"][-1]["row_start"] + m["shards"][-1]["rows"] if m["shards"] else 0
    m["nnz"] = sum(s["nnz"] for s in m["shards"])
    write_text(store / ZARR_NODE_FILE, json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def _seed_part_store(store: Path, folder: Path, first: int) -> None:
    """An empty sub-store whose manifest claims shards ``0..first`` (placeholders, never read), so a
    writer opened on it starts at shard ``first``."""
    doc = _manifest_doc(store)
    m = doc["attributes"]["saecore"]
    rows = int(m["shard_rows"])
    m["shards"] = [{"row_start": i * rows, "rows": rows, "nnz": 0, "row_ptr": [0, 0], "feature": None, "value": None}
                   for i in range(first)]
    m["complete"], m["csc"] = False, None
    with publish_dir(folder) as staging:
        (staging / FEATURE_SHARDS_DIR).mkdir()
        shutil.copyfile(store / FEATURE_SHARDS_DIR / ZARR_NODE_FILE, staging / FEATURE_SHARDS_DIR / ZARR_NODE_FILE)
        _write_manifest_doc(staging, doc)


def _part_finished(part: EncodePart) -> bool:
    """Whether a worker (this run's or a killed one's) committed every shard of ``part``."""
    try:
        m = _manifest_doc(part.folder)["attributes"]["saecore"]
    except (OSError, ValueError, KeyError, CorruptDataError):
        return False
    return len(m["shards"]) >= part.end and (m["complete"] or not part.last)


def _verified_entries(part: EncodePart) -> list[dict[str, Any]]:
    """The manifest entries of ``part``'s shards, each chunk file checked against its size and CRC-32C;
    a damaged part is deleted and refused (so it is written again, never merged)."""
    import google_crc32c

    try:
        entries = _manifest_doc(part.folder)["attributes"]["saecore"]["shards"][part.key:part.end]
        if len(entries) != part.end - part.key:
            raise CorruptDataError(f"{len(entries)} shards committed, expected {part.end - part.key}")
        for index, entry in enumerate(entries, start=part.key):
            for array in ("row_ptr", "feature", "value"):
                if entry[array] is None:
                    continue
                chunk = _shard_dir(part.folder, index) / array / "c" / "0"
                data = chunk.read_bytes()
                if [len(data), google_crc32c.value(data)] != entry[array]:
                    raise CorruptDataError(f"{chunk} does not match its size and CRC-32C in the manifest")
        return entries
    except (OSError, ValueError, KeyError, TypeError, CorruptDataError) as e:
        shutil.rmtree(part.folder, ignore_errors=True)
        raise cluster.PartRefused(f"staged part {part.folder.name} refused ({e})") from e


def _shard_dir(store: Path, index: int) -> Path:
    return store / FEATURE_SHARDS_DIR / f"{index:06d}"


def _commit_part(part: EncodePart) -> None:
    """Hard-link ``part``'s verified shards into the store and append them to its manifest."""
    entries = _verified_entries(part)
    for index in range(part.key, part.end):
        target = _shard_dir(part.store, index)
        shutil.rmtree(target, ignore_errors=True)  # linked by a driver killed before it committed
        shutil.copytree(_shard_dir(part.folder, index), target, copy_function=_link_or_copy)
    doc = _manifest_doc(part.store)
    m = doc["attributes"]["saecore"]
    if len(m["shards"]) != part.key:
        raise CorruptDataError(f"{part.store}: {len(m['shards'])} shards committed, part starts at {part.key}")
    m["shards"].extend(entries)
    m["complete"] = part.last
    _write_manifest_doc(part.store, doc)
    shutil.rmtree(part.folder, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # chunk files are never rewritten in place, so sharing them is safe
    except OSError:
        shutil.copy2(src, dst)


def _encode_parts(committed: int, n_shards: int, per_part: int, out: Path) -> list[EncodePart]:
    """The shards after the committed ones, cut at multiples of ``per_part``."""
    edges = sorted({committed, *range(per_part * (committed // per_part + 1), n_shards, per_part), n_shards})
    return [EncodePart(a, b, b == n_shards, ray_part_dir(out, a), out) for a, b in itertools.pairwise(edges)]


def _encode_on_ray(store: ActivationStore, sae: Any, out: Path, cfg: EncodeConfig) -> None:
    """:func:`encode`'s token-major shards written by Ray workers; the same bytes as one process."""
    from tqdm.auto import tqdm

    from .sae import SAE

    if isinstance(sae, torch.nn.Module):
        raise TypeError("--ray needs the SAE's folder (every worker loads it), not an SAE object")
    ray = cluster.connect(None if cfg.ray == "local" else cfg.ray)  # refuse a bad address before writing
    sae_dir, out = Path(sae).resolve(), out.resolve()  # workers may run in another folder, or machine
    loaded = SAE.load(sae_dir, device="cpu")
    hook = _resolve_hook(store, loaded, cfg.hook)
    spec = _spec(store, sae_dir, loaded, hook, cfg.batch_rows)
    writer = open_writer(out, loaded.cfg.d_sae, spec, value_dtype=cfg.value_dtype, shard_rows=cfg.shard_rows,
                         threads=1)  # creates the store (or checks a resumed one's arguments); writes nothing
    committed, complete = writer.shards_committed, writer.complete
    writer.close()
    if complete:
        return
    parts = _encode_parts(committed, -(-store.num_rows // cfg.shard_rows), cfg.shards_per_part, out)
    actors = cluster.start_workers(ray, EncodeWorker, (str(store.path.resolve()), str(sae_dir), hook, spec, cfg), cfg.ray_workers)
    with tqdm(total=parts[-1].end, initial=committed, unit="shard", desc="encode (ray)", disable=not cfg.progress,
              file=sys.stderr) as bar:

        def commit(part: EncodePart) -> None:
            _commit_part(part)
            bar.update(part.end - part.key)

        stats = cluster.run_parts(ray, actors, parts, _part_finished, commit, bar)
    shutil.rmtree(out / RAY_PARTS_DIR, ignore_errors=True)
    shutil.rmtree(feature_store_staging(out), ignore_errors=True)
    print(f"saecore encode: {stats.summary()}", file=sys.stderr)


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
