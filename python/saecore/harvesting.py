"""Harvest: capture hook-point activations of a causal LM over a corpus into a Zarr activation store.

The corpus is tokenized into fixed-length contexts (a BOS token, then ``context_length - 1`` tokens of
the concatenated documents, separated by the EOS token), contexts are grouped into a fixed grid of
batches, and each batch runs through the model only up to the last hooked layer. Rows that are excluded
(BOS, special tokens, norm outliers) are dropped; the rest go to an :class:`ActivationStoreWriter`.

Resuming relies on the batch grid: batch ``i`` always holds contexts ``i*B .. i*B+B-1``, and the writer
commits whole batches, so a rerun skips the committed batches and produces the same bits an
uninterrupted run does (activations can differ in their last bits between batch compositions, which is
why the grid never changes). Memory holds one batch of activations plus one store chunk.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import cluster, models
from . import corpus as corpus_mod
from . import hooks as hooks_mod
from ._atomic import publish_dir, read_json_object, write_json
from .activations import ActivationStore, ActivationStoreWriter, remove_store
from .config import add_arguments, from_args, option, validate
from .errors import CorruptDataError, StoreError
from .run import RAY_PART_FILE, RAY_PARTS_DIR, STORE_COMMIT_FILE, ray_part_dir

DEFAULT_HOOK = "blocks.6.hook_resid_post"


@dataclass
class Batch:
    """One batch of contexts: token ids and the document of each token, both ``[B, T]``."""

    index: int
    input_ids: np.ndarray  # (B, T) int64
    doc_ids: np.ndarray  # (B, T) int64


# -- step 1: text → contexts → batches -------------------------------------------------------------
def iter_contexts(docs: Iterator[str], tokenizer: Any, context_length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(token ids [T], doc ids [T])`` of each full context; the last partial context is dropped."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to start contexts with")
    body = context_length - 1
    ids_buf: list[int] = []
    doc_buf: list[int] = []
    for doc_id, text in enumerate(docs):
        if ids_buf:
            ids_buf.append(sep)  # document boundary; a special token, excluded by default
            doc_buf.append(doc_id - 1)
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids_buf.extend(toks)
        doc_buf.extend([doc_id] * len(toks))
        while len(ids_buf) >= body:
            ids = np.array([bos, *ids_buf[:body]], dtype=np.int64)
            dids = np.array([doc_buf[0], *doc_buf[:body]], dtype=np.int64)
            del ids_buf[:body], doc_buf[:body]
            yield ids, dids


def iter_batches(
    contexts: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, max_contexts: int | None
) -> Iterator[Batch]:
    """Group contexts into the fixed batch grid (the last batch may be smaller)."""
    ids: list[np.ndarray] = []
    dids: list[np.ndarray] = []
    index = 0
    for taken, (c_ids, c_dids) in enumerate(contexts):
        if max_contexts is not None and taken >= max_contexts:
            break
        ids.append(c_ids)
        dids.append(c_dids)
        if len(ids) == batch_size:
            yield Batch(index, np.stack(ids), np.stack(dids))  # (B, T)
            ids, dids, index = [], [], index + 1
    if ids:
        yield Batch(index, np.stack(ids), np.stack(dids))


# -- step 2: exclusions ----------------------------------------------------------------------------
@dataclass
class Exclusions:
    """Which rows to drop before storing."""

    bos: bool
    special_ids: np.ndarray  # token ids treated as special (empty when special tokens are kept)
    norm_outlier_factor: float | None
    #: hook -> norm above which a token is an outlier (factor × median norm of batch 0)
    norm_threshold: dict[str, float] | None = None

    def keep_mask(self, batch: Batch, acts: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
        """Boolean ``[B*T]`` mask of rows to keep, and how many rows each rule dropped.

        Rules apply in order (BOS, special, norm), each counting only rows the earlier ones kept.
        """
        ids = batch.input_ids.reshape(-1)  # (B*T,)
        positions = np.tile(np.arange(batch.input_ids.shape[1]), batch.input_ids.shape[0])
        keep = np.ones(ids.shape, dtype=bool)
        counts = {"tokens_seen": int(ids.size), "excluded_bos": 0, "excluded_special": 0, "excluded_norm": 0}
        if self.bos:
            drop = keep & (positions == 0)
            counts["excluded_bos"] = int(drop.sum())
            keep &= ~drop
        if self.special_ids.size:
            drop = keep & np.isin(ids, self.special_ids)
            counts["excluded_special"] = int(drop.sum())
            keep &= ~drop
        if self.norm_threshold:
            outlier = np.zeros_like(keep)
            for hook, limit in self.norm_threshold.items():
                outlier |= np.linalg.norm(acts[hook].astype(np.float32), axis=1) > limit
            drop = keep & outlier
            counts["excluded_norm"] = int(drop.sum())
            keep &= ~drop
        counts["rows_kept"] = int(keep.sum())
        return keep, counts


def _calibrate_norms(exclusions: Exclusions, batch: Batch, acts: dict[str, np.ndarray]) -> dict[str, float]:
    """Median token norm per hook over batch 0's rows that survive the BOS/special rules.

    Batch 0 is fixed by the grid, so a resumed run recomputes exactly the same thresholds.
    """
    base = Exclusions(exclusions.bos, exclusions.special_ids, None)
    keep, _ = base.keep_mask(batch, acts)
    medians = {}
    for hook, a in acts.items():
        norms = np.linalg.norm(a[keep].astype(np.float32), axis=1)
        if norms.size == 0:
            raise ValueError("norm outlier calibration: batch 0 has no rows left after BOS/special exclusion")
        medians[hook] = float(np.median(norms))
    return medians


# -- step 3: forward ---------------------------------------------------------------------------------
def forward_batch(model: Any, batch: Batch, hook_names: Sequence[str], device: torch.device) -> dict[str, np.ndarray]:
    """Activations ``[B*T, d]`` (float32 NumPy) at each hook for one batch."""
    input_ids = torch.from_numpy(batch.input_ids).to(device)
    acts = hooks_mod.run_to_hooks(model, input_ids, hook_names)
    out = {}
    for name, a in acts.items():
        out[name] = a.reshape(-1, a.shape[-1]).float().cpu().numpy()  # (B, T, d) -> (B*T, d)
    return out


# -- validation (before anything is written) --------------------------------------------------------
def _check_output(out: Path) -> None:
    """Fail early, naming the path, when the store cannot be written there."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder; choose another output path")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".saecore-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out}: cannot write the activation store here ({e.strerror or e})") from e


def _load_model(model: Any, device: str | torch.device | None, model_dtype: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, the name the store records so later stages can load the model again)."""
    if isinstance(model, models.LoadedModel):
        return model.model, model.tokenizer, model.name
    if isinstance(model, (tuple, list)):
        m, tok = model
        return m, tok, models.name_of(m)
    path = Path(str(model)).expanduser()
    m, tok = models.load(model, device=device, dtype=model_dtype)
    if path.is_dir():
        return m, tok, str(path.resolve())
    return m, tok, f"{model}@{models.model_dir(model).name.rsplit('-', 1)[-1][:16]}"  # name + GGUF checksum


def _special_ids(tokenizer: Any) -> np.ndarray:
    """BOS/EOS/PAD/UNK and every added token flagged special (chat markers, code-metadata tokens …)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return np.array(sorted(ids), dtype=np.int64)


# -- the config ----------------------------------------------------------------------------------------
@dataclass
class HarvestConfig:
    """What a harvest captures and how (the model, corpus and output store aside)."""

    hooks: list[str] = option(default_factory=lambda: [DEFAULT_HOOK], flag="--hook", append=True)
    """Hook point to capture, e.g. blocks.6.hook_resid_post."""

    context_length: int = option(128, ge=2, le=1 << 17)
    """Tokens per context, the BOS token included."""

    batch_size: int = option(8, ge=1, le=1 << 16)
    """Contexts per forward pass (fixes the batch grid a resumed run relies on)."""

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the activations."""

    max_tokens: int | None = option(None, ge=1, le=1 << 48)
    """Stop after this many tokens (whole contexts, at least one); unset: the whole corpus."""

    exclude_bos: bool = option(True, flag="--keep-bos")
    """Drop the BOS row of each context (--keep-bos stores it)."""

    exclude_special: bool = option(True, flag="--keep-special")
    """Drop rows of special tokens (--keep-special stores them)."""

    norm_outlier_factor: float | None = option(None, gt=1.0)
    """Drop tokens whose norm exceeds this many times the median norm of batch 0."""

    device: str | None = None
    """Torch device; unset: CUDA when present, else the CPU."""

    model_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Dtype the model runs in; unset: the loader's choice for the device."""

    text_field: str = "text"
    """JSONL field / table column holding the text."""

    chunk_rows: int = option(4096, ge=1, le=1 << 24)
    """Rows per stored chunk; rows are committed a chunk at a time."""

    progress: bool = True
    """Show a progress bar."""

    ray: str | None = option(None, const="local", metavar="ADDRESS")
    """Harvest on a Ray cluster: join ADDRESS (HOST:PORT, auto, ray://…), or start a local one when no address is given."""

    ray_workers: int | None = option(None, ge=1, le=1 << 16)
    """With --ray: model-holding workers (default: one per GPU of the cluster, else one per CPU)."""

    batches_per_part: int = option(8, ge=1, le=1 << 20)
    """With --ray: batches per part, the unit a worker computes and the driver commits."""

    def __post_init__(self) -> None:
        self.hooks = list(dict.fromkeys(self.hooks))
        if not self.hooks:
            raise ValueError("give at least one hook name, e.g. blocks.6.hook_resid_post")
        validate(self)

    @property
    def max_contexts(self) -> int | None:
        """Contexts to harvest (None: all); ``max_tokens`` rounded down to whole contexts, at least one."""
        return None if self.max_tokens is None else max(1, self.max_tokens // self.context_length)


# -- the public entry point --------------------------------------------------------------------------
def harvest(
    model: Any = models.BUILTIN_MODEL,
    corpus: Any = "default",
    out: str | os.PathLike[str] = "runs/harvest/activations.zarr",
    cfg: HarvestConfig | None = None,
) -> ActivationStore:
    """Harvest activations of ``model`` over ``corpus`` into the Zarr store ``out`` and return it.

    ``model``: a built-in name, a local HF folder, or a ``(model, tokenizer)`` pair (recorded under the
    ``name`` of a :class:`saecore.models.LoadedModel`, else its config's ``name_or_path``). ``corpus``: a built-in
    corpus name, path(s), or a :class:`saecore.corpus.Corpus`. ``cfg`` (:class:`HarvestConfig`): hooks,
    context length, storage dtype, exclusions… Rerunning the same call resumes an interrupted harvest; a
    different call into an existing store raises :class:`saecore.StoreMismatchError` naming the differences.
    """
    cfg = cfg or HarvestConfig()
    out = Path(out)
    _check_output(out)
    corp = corpus if isinstance(corpus, corpus_mod.Corpus) else corpus_mod.load(corpus, text_field=cfg.text_field)
    corp.check_nonempty()
    if cfg.ray is not None:
        return _harvest_on_ray(model, corp, out, cfg)
    m, tok, model_name = _load_model(model, cfg.device, cfg.model_dtype)
    points = [hooks_mod.resolve(m, h) for h in cfg.hooks]
    # Tokenize the first batch before creating anything, so a too-short corpus leaves no store behind.
    first, batches = _first_batch(corp, tok, cfg)
    created = not (out / STORE_COMMIT_FILE).exists()
    writer = _open_writer(out, _store_spec(cfg, _model_dtype(m), model_name, corp), int(m.config.hidden_size), cfg)
    if writer.state.complete:
        return ActivationStore(out)
    exclusions = Exclusions(
        cfg.exclude_bos, _special_ids(tok) if cfg.exclude_special else np.zeros(0, np.int64), cfg.norm_outlier_factor
    )
    forward = _Forward(m, cfg.hooks, int(m.config.hidden_size), exclusions)
    if cfg.norm_outlier_factor is not None and writer.batches_done > 0:
        forward(first)  # a resumed run recomputes batch 0's thresholds (the grid makes them identical)
    try:
        _run_batches(writer, forward, exclusions, _chain_first(first, batches), cfg)
        return writer.finish(_store_attrs(corp, exclusions, forward.medians, {p.name: p.layer for p in points}, tok))
    except StoreError:
        if created and writer.state.rows_committed == 0:
            remove_store(out)  # nothing was harvested; leave no empty store behind
        raise


def _first_batch(corp: corpus_mod.Corpus, tok: Any, cfg: HarvestConfig) -> tuple[Batch, Iterator[Batch]]:
    """Batch 0 and the rest: tokenized before anything is created, so a too-short corpus leaves no store."""
    batches = iter_batches(iter_contexts(iter(corp), tok, cfg.context_length), cfg.batch_size, cfg.max_contexts)
    first = next(batches, None)
    if first is None:
        raise corpus_mod.CorpusError(
            f"corpus {corp.name!r} is too short: it does not fill one context of {cfg.context_length} tokens"
        )
    return first, batches


def _model_dtype(model: Any) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def _store_spec(cfg: HarvestConfig, model_dtype: str, model_name: str, corp: corpus_mod.Corpus) -> dict[str, Any]:
    """Everything that determines the store's content; a rerun must match it to resume."""
    return {
        "model": model_name,
        "model_dtype": model_dtype,
        "hooks": cfg.hooks,
        "corpus_fingerprint": corp.fingerprint,
        "context_length": cfg.context_length,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "max_tokens": cfg.max_tokens,
        "prepend_bos": True,
        "exclude_bos": cfg.exclude_bos,
        "exclude_special": cfg.exclude_special,
        "norm_outlier_factor": cfg.norm_outlier_factor,
    }


def _open_writer(out: Path, spec: dict[str, Any], d_model: int, cfg: HarvestConfig) -> ActivationStoreWriter:
    """Create the store, or reopen it to resume (refused when ``spec`` differs from the stored one)."""
    return ActivationStoreWriter.open(
        out,
        spec,
        dict.fromkeys(cfg.hooks, d_model),
        capacity_rows=min(cfg.max_contexts or 1024, 1024) * cfg.context_length,  # grows by doubling: a huge --max-tokens costs nothing
        chunk_rows=cfg.chunk_rows,
    )


class _Forward:
    """Runs one batch to the hooks; on batch 0 it checks the widths and calibrates the norm threshold."""

    def __init__(self, model: Any, hooks: list[str], d_model: int, exclusions: Exclusions):
        self.model, self.hooks, self.d_model, self.exclusions = model, hooks, d_model, exclusions
        self.device = next(model.parameters()).device
        self.medians: dict[str, float] | None = None

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        acts = forward_batch(self.model, batch, self.hooks, self.device)
        if batch.index == 0:
            for h, a in acts.items():
                if a.shape[1] != self.d_model:
                    raise ValueError(f"hook {h!r} gives width {a.shape[1]}, the model's hidden size is {self.d_model}")
            factor = self.exclusions.norm_outlier_factor
            if factor is not None:
                self.medians = _calibrate_norms(self.exclusions, batch, acts)
                self.exclusions.norm_threshold = {h: factor * v for h, v in self.medians.items()}
        return acts


def _store_attrs(
    corp: corpus_mod.Corpus, exclusions: Exclusions, medians: dict[str, float] | None, hook_layers: dict[str, int],
    tok: Any,
) -> dict[str, Any]:
    """Metadata recorded when the store completes (beyond the spec): sources, exclusions, layers, tokens."""
    return {
        "corpus": corp.name,
        "corpus_sources": [s.name for s in corp.sources],
        "exclusions": {
            "bos": exclusions.bos,
            "special_token_ids": exclusions.special_ids.tolist(),
            "norm_outlier_factor": exclusions.norm_outlier_factor,
            "norm_median": medians,
            "norm_threshold": exclusions.norm_threshold,
            "norm_reference": "median token norm over batch 0 after BOS/special exclusion" if medians else None,
        },
        "hook_layers": hook_layers,
        "bos_token_id": tok.bos_token_id,
        "separator_token_id": tok.eos_token_id,
    }


def _run_batches(
    writer: ActivationStoreWriter,
    forward: Callable[[Batch], dict[str, np.ndarray]],
    exclusions: Exclusions,
    batches: Iterator[Batch],
    cfg: HarvestConfig,
) -> None:
    """Forward, filter and append every batch not yet committed."""
    done = writer.batches_done
    with _token_bar(cfg, done, "harvest") as bar:
        for batch in batches:
            if batch.index < done:
                continue  # committed by an earlier, interrupted run
            kept, counts = _kept_rows(batch, forward(batch), exclusions)
            writer.append(*kept, counters=counts)
            bar.update(batch.input_ids.size)
    writer.flush()


def _token_bar(cfg: HarvestConfig, done: int, desc: str) -> Any:
    """The driver's progress bar in tokens, starting at the ``done`` batches committed earlier."""
    from tqdm.auto import tqdm

    total = None if cfg.max_contexts is None else cfg.max_contexts * cfg.context_length
    return tqdm(
        total=total,
        initial=min(done * cfg.batch_size * cfg.context_length, total or 10**18),
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not cfg.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _kept_rows(
    batch: Batch, acts: dict[str, np.ndarray], exclusions: Exclusions
) -> tuple[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray], dict[str, int]]:
    """``((acts, token ids, doc ids, positions), counters)`` of the rows of ``batch`` the exclusions keep."""
    keep, counts = exclusions.keep_mask(batch, acts)
    positions = np.tile(np.arange(batch.input_ids.shape[1], dtype=np.int32), batch.input_ids.shape[0])
    kept = (
        {h: a[keep] for h, a in acts.items()},
        batch.input_ids.reshape(-1)[keep].astype(np.int32),
        batch.doc_ids.reshape(-1)[keep],
        positions[keep],
    )
    return kept, counts


def _chain_first(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest


# -- on a Ray cluster (--ray) --------------------------------------------------------------------------
# The driver tokenizes (cheap) and cuts the fixed batch grid into parts of ``batches_per_part``
# batches; each worker (a Ray actor holding the model) forwards a part's batches exactly as the
# one-process loop does and stages the kept rows as checksummed .npy files under
# ``STORE/.ray-parts/part-<first batch>/``; the driver appends the parts' batches to the one writer in
# batch order. The writer then flushes and commits at exactly the rows it would in one process, so the
# store is the same bytes. A part is deleted once the store's commit record covers its batches, so a
# killed driver's rerun finds every batch either committed or staged (or still to compute).


@dataclass
class HarvestPart:
    """Batches ``batches[0].index ..`` of the grid, computed by one worker into ``folder``."""

    key: int
    batches: list[Batch]
    folder: Path


class HarvestWorker:
    """What each Ray actor holds: the model, loaded once; :meth:`run` stages one part."""

    def __init__(self, model: str, cfg: HarvestConfig, first: Batch):
        m, tok, self.model_name = _load_model(model, cfg.device, cfg.model_dtype)
        self.points = [hooks_mod.resolve(m, h) for h in cfg.hooks]
        special = _special_ids(tok) if cfg.exclude_special else np.zeros(0, np.int64)
        self.exclusions = Exclusions(cfg.exclude_bos, special, cfg.norm_outlier_factor)
        self.forward = _Forward(m, cfg.hooks, int(m.config.hidden_size), self.exclusions)
        self.hooks, self.dtype = cfg.hooks, _model_dtype(m)
        if cfg.norm_outlier_factor is not None:
            self.forward(first)  # batch 0 fixes the thresholds, in every worker as in one process

    def describe(self) -> dict[str, Any]:
        """What the driver records in the store: model name and dtype, width, layers, norm thresholds."""
        return {"model": self.model_name, "model_dtype": self.dtype, "d_model": self.forward.d_model,
                "hook_layers": {p.name: p.layer for p in self.points}, "medians": self.forward.medians,
                "norm_threshold": self.exclusions.norm_threshold}

    def run(self, part: HarvestPart) -> None:
        """Forward and filter every batch of ``part``; stage the kept rows (one atomic folder)."""
        cols: dict[str, list[np.ndarray]] = {name: [] for name in _part_arrays(self.hooks)}
        rows, counters = [], []
        for batch in part.batches:
            (acts, ids, docs, positions), counts = _kept_rows(batch, self.forward(batch), self.exclusions)
            for name, a in zip(cols, [*(acts[h] for h in self.hooks), ids, docs, positions]):
                cols[name].append(a)
            rows.append(len(ids))
            counters.append(list(counts.items()))  # pairs: the store records them in this order
        arrays = {name: np.concatenate(parts) for name, parts in cols.items()}
        meta = {"batches": [b.index for b in part.batches], "rows": rows, "counters": counters}
        write_part(part.folder, arrays, meta)


def _part_arrays(hooks: list[str]) -> list[str]:
    return [f"acts-{i}" for i in range(len(hooks))] + ["token_ids", "doc_ids", "positions"]


def write_part(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Stage ``arrays`` as .npy files with their CRC-32C in ``part.json`` (the folder appears whole)."""
    import google_crc32c

    with publish_dir(folder) as staging:
        files = {}
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            (staging / f"{name}.npy").write_bytes(buf.getvalue())
            files[name] = google_crc32c.value(buf.getvalue())
        write_json(staging / RAY_PART_FILE, {**meta, "files": files})


def read_part(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A staged part's record and arrays, each file checked against its CRC-32C. A damaged part is
    deleted and :class:`cluster.PartRefused` raised, so it is computed again and never merged."""
    import google_crc32c

    try:
        meta = read_json_object(folder / RAY_PART_FILE)
        arrays = {}
        for name, crc in meta["files"].items():
            data = (folder / f"{name}.npy").read_bytes()
            if google_crc32c.value(data) != crc:
                raise CorruptDataError(f"{folder / name}.npy fails its CRC-32C")
            arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
        return meta, arrays
    except (OSError, ValueError, KeyError, TypeError, CorruptDataError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise cluster.PartRefused(f"staged part {folder.name} refused ({e})") from e


class _PartCommitter:
    """Appends staged parts to the writer in batch order; deletes a part once its batches are durable."""

    def __init__(self, writer: ActivationStoreWriter, hooks: list[str], bar: Any):
        self.writer, self.hooks, self.bar = writer, hooks, bar
        self.appended: list[tuple[int, Path]] = []  # (end batch, folder) of parts not yet deleted

    def __call__(self, part: HarvestPart) -> None:
        meta, arrays = read_part(part.folder)
        want = [b.index for b in part.batches]
        if meta["batches"] != want:
            shutil.rmtree(part.folder, ignore_errors=True)
            raise cluster.PartRefused(f"staged part {part.folder.name} holds batches {meta['batches'][:1]}.., not {want[:1]}..")
        edges = np.cumsum([0, *meta["rows"]])
        for i, b in enumerate(want):
            if b < self.writer.batches_done:
                continue  # committed before a driver was killed
            rows = slice(int(edges[i]), int(edges[i + 1]))
            acts = {h: arrays[f"acts-{j}"][rows] for j, h in enumerate(self.hooks)}
            counts = {str(k): int(v) for k, v in meta["counters"][i]}
            self.writer.append(acts, *(arrays[n][rows] for n in ("token_ids", "doc_ids", "positions")), counters=counts)
            self.bar.update(counts["tokens_seen"])
        self.appended.append((want[-1] + 1, part.folder))
        durable = self.writer.state.batches_done
        while self.appended and self.appended[0][0] <= durable:
            shutil.rmtree(self.appended.pop(0)[1], ignore_errors=True)


def _parts(batches: Iterator[Batch], per_part: int, done: int, store: Path) -> Iterator[HarvestPart]:
    """The grid cut into parts of ``per_part`` batches; parts wholly committed already are skipped."""
    for _, group in itertools.groupby(batches, key=lambda b: b.index // per_part):
        chunk = list(group)
        if chunk[-1].index >= done:
            yield HarvestPart(chunk[0].index, chunk, ray_part_dir(store, chunk[0].index))


def _start_harvest_workers(model: str, cfg: HarvestConfig, first: Batch) -> tuple[Any, list[Any], dict[str, Any]]:
    """Join or start the cluster, start the workers (each loads the model) and ask one what it loaded."""
    ray = cluster.connect(None if cfg.ray == "local" else cfg.ray)
    actors = cluster.start_workers(ray, HarvestWorker, (model, cfg, first), cfg.ray_workers)
    try:
        info = ray.get(actors[0].describe.remote())
    except ray.exceptions.RayError as e:
        raise cluster.worker_error("a harvest worker could not load the model", e) from None
    return ray, actors, info


def _harvest_on_ray(model: Any, corp: corpus_mod.Corpus, out: Path, cfg: HarvestConfig) -> ActivationStore:
    """:func:`harvest` with the forward passes on Ray workers; the same store, byte for byte."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError("--ray needs a model name or a folder every worker can load, not a model object")
    folder = Path(model).expanduser()
    model = str(folder.resolve()) if folder.is_dir() else str(model)  # workers may run elsewhere
    out = out.resolve()
    tok = models.load_tokenizer(model)
    first, batches = _first_batch(corp, tok, cfg)
    ray, actors, info = _start_harvest_workers(model, cfg, first)
    spec = _store_spec(cfg, info["model_dtype"], info["model"], corp)
    writer = _open_writer(out, spec, info["d_model"], cfg)
    if writer.state.complete:
        return ActivationStore(out)
    special = _special_ids(tok) if cfg.exclude_special else np.zeros(0, np.int64)
    exclusions = Exclusions(cfg.exclude_bos, special, cfg.norm_outlier_factor, info["norm_threshold"])
    parts = _parts(_chain_first(first, batches), cfg.batches_per_part, writer.batches_done, out)
    with _token_bar(cfg, writer.batches_done, "harvest (ray)") as bar:
        stats = cluster.run_parts(ray, actors, parts, lambda p: (p.folder / RAY_PART_FILE).exists(),
                                  _PartCommitter(writer, cfg.hooks, bar), bar)
    writer.flush()
    store = writer.finish(_store_attrs(corp, exclusions, info["medians"], info["hook_layers"], tok))
    shutil.rmtree(out / RAY_PARTS_DIR, ignore_errors=True)
    print(f"saecore harvest: {stats.summary()}", file=sys.stderr)
    return store


# -- CLI ---------------------------------------------------------------------------------------------
def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=models.BUILTIN_MODEL, help="built-in model name or local HF folder (default: %(default)s)"
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        help="built-in corpus (default, pydoc, shakespeare, fortunes) or .txt/.jsonl/.parquet/.arrow files or folders",
    )
    parser.add_argument("--out", required=True, help="output activation store, e.g. runs/NAME/activations.zarr")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    add_arguments(parser, HarvestConfig)


def cli_run(args: argparse.Namespace) -> int:
    cfg = from_args(HarvestConfig, args)
    if args.overwrite:
        remove_store(args.out)
    store = harvest(args.model, args.corpus if len(args.corpus) > 1 else args.corpus[0], args.out, cfg)
    c = store.attrs.get("counters", {})
    print(
        f"{store.path}: {store.num_rows} rows x {', '.join(f'{h} [{store.d_model(h)}]' for h in store.hooks)}, "
        f"{store.attrs['dtype']}; {c.get('tokens_seen', 0)} tokens seen, excluded: bos {c.get('excluded_bos', 0)}, "
        f"special {c.get('excluded_special', 0)}, norm {c.get('excluded_norm', 0)}"
    )
    return 0
