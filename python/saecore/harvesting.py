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
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import corpus as corpus_mod
from . import hooks as hooks_mod
from . import models
from .activations import ActivationStore, ActivationStoreWriter, remove_store
from .errors import SaecoreError, StoreError

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
    if isinstance(model, (tuple, list)):
        m, tok = model
        name = getattr(m, "saecore_name", None) or getattr(m.config, "name_or_path", None) or type(m).__name__
        return m, tok, str(name)
    path = Path(str(model)).expanduser()
    name = str(path.resolve()) if path.is_dir() else str(model)
    m, tok = models.load(model, device=device, dtype=model_dtype)
    if not path.is_dir():
        name = f"{model}@{models.model_dir(model).name.rsplit('-', 1)[-1][:16]}"  # name + GGUF checksum
    return m, tok, name


def _special_ids(tokenizer: Any) -> np.ndarray:
    """BOS/EOS/PAD/UNK and every added token flagged special (chat markers, code-metadata tokens …)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return np.array(sorted(ids), dtype=np.int64)


# -- the public entry point --------------------------------------------------------------------------
def harvest(
    model: Any = models.BUILTIN_MODEL,
    corpus: Any = "default",
    hooks: Sequence[str] = (DEFAULT_HOOK,),
    out: str | os.PathLike[str] = "runs/harvest/activations.zarr",
    context_length: int = 128,
    batch_size: int = 8,
    dtype: str = "float16",
    max_tokens: int | None = None,
    exclude_bos: bool = True,
    exclude_special: bool = True,
    norm_outlier_factor: float | None = None,
    device: str | torch.device | None = None,
    model_dtype: str | None = None,
    text_field: str = "text",
    chunk_rows: int = 4096,
    progress: bool = True,
) -> ActivationStore:
    """Harvest activations at ``hooks`` over ``corpus`` into the Zarr store ``out`` and return it.

    ``model``: a built-in name, a local HF folder, or a ``(model, tokenizer)`` pair. ``corpus``: a built-in
    corpus name, path(s), or a :class:`saecore.corpus.Corpus`. ``max_tokens`` caps the tokens fed to the
    model (rounded down to whole contexts, at least one). ``exclude_bos`` / ``exclude_special`` drop those rows;
    ``norm_outlier_factor`` drops tokens whose norm exceeds that many times the median norm (measured on
    the first batch). Rerunning the same call resumes an interrupted harvest; a different call into an
    existing store raises :class:`saecore.StoreMismatchError` naming the differences.
    """
    out = Path(out)
    hooks = list(dict.fromkeys(hooks))
    _check_args(hooks, context_length, batch_size, dtype, max_tokens, norm_outlier_factor)
    _check_output(out)
    corp = corpus if isinstance(corpus, corpus_mod.Corpus) else corpus_mod.load(corpus, text_field=text_field)
    corp.check_nonempty()
    m, tok, model_name = _load_model(model, device, model_dtype)
    dev = next(m.parameters()).device
    points = [hooks_mod.resolve(m, h) for h in hooks]
    max_contexts = None if max_tokens is None else max(1, max_tokens // context_length)

    # Tokenize the first batch before creating anything, so a too-short corpus leaves no store behind.
    batches = iter_batches(iter_contexts(iter(corp), tok, context_length), batch_size, max_contexts)
    first = next(batches, None)
    if first is None:
        raise corpus_mod.CorpusError(
            f"corpus {corp.name!r} is too short: it does not fill one context of {context_length} tokens"
        )
    # Everything that determines the store's content; a rerun must match it to resume.
    spec = {
        "model": model_name,
        "model_dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
        "hooks": hooks,
        "corpus_fingerprint": corp.fingerprint,
        "context_length": context_length,
        "batch_size": batch_size,
        "dtype": dtype,
        "max_tokens": max_tokens,
        "prepend_bos": True,
        "exclude_bos": exclude_bos,
        "exclude_special": exclude_special,
        "norm_outlier_factor": norm_outlier_factor,
    }
    d_model = int(m.config.hidden_size)
    created = not (out / "commit.json").exists()
    writer = ActivationStoreWriter.open(
        out,
        spec,
        dict.fromkeys(hooks, d_model),
        capacity_rows=(max_contexts or 1024) * context_length,
        chunk_rows=chunk_rows,
    )
    if writer.state.complete:
        return ActivationStore(out)

    exclusions = Exclusions(
        exclude_bos, _special_ids(tok) if exclude_special else np.zeros(0, np.int64), norm_outlier_factor
    )
    medians: dict[str, float] | None = None

    def forward(batch: Batch) -> dict[str, np.ndarray]:
        nonlocal medians
        acts = forward_batch(m, batch, hooks, dev)
        if batch.index == 0:
            for h, a in acts.items():
                if a.shape[1] != d_model:
                    raise ValueError(f"hook {h!r} gives width {a.shape[1]}, the model's hidden size is {d_model}")
            if norm_outlier_factor is not None:
                medians = _calibrate_norms(exclusions, batch, acts)
                exclusions.norm_threshold = {h: norm_outlier_factor * v for h, v in medians.items()}
        return acts

    if norm_outlier_factor is not None and writer.batches_done > 0:
        forward(first)  # a resumed run recomputes batch 0's thresholds (the grid makes them identical)
    try:
        _run_batches(
            writer,
            forward,
            exclusions,
            _chain_first(first, batches),
            max_contexts,
            batch_size,
            context_length,
            progress,
        )
        return writer.finish(_store_attrs(corp, exclusions, medians, points, tok))
    except StoreError:
        if created and writer.state.rows_committed == 0:
            remove_store(out)  # nothing was harvested; leave no empty store behind
        raise


def _store_attrs(
    corp: corpus_mod.Corpus, exclusions: Exclusions, medians: dict[str, float] | None, points: list, tok: Any
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
        "hook_layers": {p.name: p.layer for p in points},
        "bos_token_id": tok.bos_token_id,
        "separator_token_id": tok.eos_token_id,
    }


def _check_args(
    hooks: Sequence[str], context_length: int, batch_size: int, dtype: str, max_tokens: int | None, factor: float | None
) -> None:
    if not hooks:
        raise ValueError("give at least one hook name, e.g. blocks.6.hook_resid_post")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (a BOS token and one more), got {context_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if factor is not None and not factor > 1.0:
        raise ValueError(f"norm_outlier_factor must be above 1 (a multiple of the median norm), got {factor}")


def _run_batches(
    writer: ActivationStoreWriter,
    forward: Callable[[Batch], dict[str, np.ndarray]],
    exclusions: Exclusions,
    batches: Iterator[Batch],
    max_contexts: int | None,
    batch_size: int,
    context_length: int,
    progress: bool,
) -> None:
    """Forward, filter and append every batch not yet committed."""
    from tqdm.auto import tqdm

    done = writer.batches_done
    total = None if max_contexts is None else max_contexts * context_length
    bar = tqdm(
        total=total,
        initial=min(done * batch_size * context_length, total or 10**18),
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:
        for batch in batches:
            if batch.index < done:
                continue  # committed by an earlier, interrupted run
            acts = forward(batch)
            keep, counts = exclusions.keep_mask(batch, acts)
            positions = np.tile(np.arange(context_length, dtype=np.int32), batch.input_ids.shape[0])
            writer.append(
                {h: a[keep] for h, a in acts.items()},
                batch.input_ids.reshape(-1)[keep].astype(np.int32),
                batch.doc_ids.reshape(-1)[keep],
                positions[keep],
                counters=counts,
            )
            bar.update(batch.input_ids.size)
    writer.flush()


def _chain_first(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest


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
    parser.add_argument(
        "--text-field", default="text", help="JSONL field / table column holding the text (default: %(default)s)"
    )
    parser.add_argument(
        "--hook", action="append", dest="hooks", help=f"hook point, repeatable (default: {DEFAULT_HOOK})"
    )
    parser.add_argument("--out", required=True, help="output activation store, e.g. runs/NAME/activations.zarr")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="storage dtype")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (whole contexts)")
    parser.add_argument("--keep-bos", action="store_true", help="store the BOS row of each context")
    parser.add_argument("--keep-special", action="store_true", help="store rows of special tokens")
    parser.add_argument(
        "--norm-outlier-factor",
        type=float,
        default=None,
        help="drop tokens whose norm exceeds this many times the median",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=4096,
        help="rows per stored chunk; rows are committed a chunk at a time (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    parser.add_argument("--no-progress", action="store_true")


def cli_run(args: argparse.Namespace) -> int:
    try:
        if args.overwrite:
            remove_store(args.out)
        store = harvest(
            model=args.model,
            corpus=args.corpus if len(args.corpus) > 1 else args.corpus[0],
            hooks=args.hooks or [DEFAULT_HOOK],
            out=args.out,
            context_length=args.context_length,
            batch_size=args.batch_size,
            dtype=args.dtype,
            max_tokens=args.max_tokens,
            exclude_bos=not args.keep_bos,
            exclude_special=not args.keep_special,
            norm_outlier_factor=args.norm_outlier_factor,
            device=args.device,
            model_dtype=args.model_dtype,
            text_field=args.text_field,
            chunk_rows=args.chunk_rows,
            progress=not args.no_progress,
        )
    except (SaecoreError, ValueError, OSError, ModuleNotFoundError) as e:
        print(f"saecore harvest: error: {e}", file=sys.stderr)
        return 2
    c = store.attrs.get("counters", {})
    print(
        f"{store.path}: {store.num_rows} rows x {', '.join(f'{h} [{store.d_model(h)}]' for h in store.hooks)}, "
        f"{store.attrs['dtype']}; {c.get('tokens_seen', 0)} tokens seen, excluded: bos {c.get('excluded_bos', 0)}, "
        f"special {c.get('excluded_special', 0)}, norm {c.get('excluded_norm', 0)}"
    )
    return 0
