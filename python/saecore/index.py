"""``saecore index``: per-feature statistics, histograms, top-k examples and quantile samples.

The mining runs in Rust (``saecore._native.mine``): a mergeable reduction over the feature store's
shards on all cores, memory bounded by shard size × threads + features × (k + bins + samples), never by
the number of tokens (see docs/index.md). This module adds each example's document and position from
the activation store and writes Parquet tables that pyarrow, polars and DuckDB open directly::

    index/SAE/
      stats.parquet              feature u32, count u64, density f64, sum f64, max f32, mean_nonzero f64
      histograms.parquet         feature u32, bin u16, lo f32, hi f32, count u64     (log-spaced bins)
      topk.parquet               feature u32, rank u16, row u64, doc_id i64, position i32, value f32
      samples.parquet            feature u32, bin u16, row u64, doc_id i64, position i32, value f32
      density_histogram.parquet  lo_log10 f64, hi_log10 f64, count u64
      meta.json                  inputs, parameters and bin definitions (written last)

The new index is written into a hidden folder beside ``index/SAE`` and swapped in whole (a kill leaves
the old index, or none, never a mix; the next run removes the leftover). ``meta.json`` records each
table's sha256, checked whenever a table is read. Other stages add their own tables to the same folder
(carried over by a rerun). A rerun recomputes everything (the
mining is two passes over the store; there is nothing worth resuming).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from . import _atomic, _native, tables
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .features import Activations, FeatureStore, build_csc
from .run import INDEX_META_FILE as META_FILE
from .run import record_path, resolve_recorded
from .tables import INDEX_FORMAT as FORMAT

if TYPE_CHECKING:
    from ._native import _MineResult  # the typed shape of mine's dict (stub only)


@dataclass
class IndexConfig:
    """What ``saecore index`` mines from a feature store (the store and the output folder aside)."""

    k: int = option(20, ge=1, le=10_000)
    """Top examples kept per feature."""

    hist_bins: int = option(32, ge=1, le=10_000)
    """Log-spaced bins of each feature's activation histogram."""

    sample_bins: int = option(10, ge=1, le=1_000)
    """Activation-level bins (fractions of the feature's max) the quantile samples are drawn from."""

    samples_per_bin: int = option(10, ge=1, le=10_000)
    """Examples drawn per activation-level bin."""

    density_bins: int = option(40, ge=1, le=10_000)
    """Bins of the histogram of log10 firing densities over features."""

    seed: int = option(0, ge=0, lt=1 << 64)
    """Seeds the choice of the quantile samples."""

    progress: bool = True
    """Show a progress bar."""

    ray: str | None = option(None, const="local", metavar="ADDRESS")
    """Mine on a Ray cluster: join ADDRESS (HOST:PORT, auto, ray://…), or start a local one when no address is given."""

    shards_per_task: int | None = option(None, ge=1, le=1 << 20)
    """With --ray: shards per task (default: about 4 tasks per CPU)."""

    def __post_init__(self) -> None:
        validate(self)

    def mining_params(self) -> dict[str, int]:
        """The options the Rust miner takes (recorded in the index metadata as well)."""
        return {"k": self.k, "hist_bins": self.hist_bins, "sample_bins": self.sample_bins,
                "samples_per_bin": self.samples_per_bin, "seed": self.seed}


# --- writing ------------------------------------------------------------------------------------


def _mine_with_progress(path: Path, params: dict[str, Any], passes: int, shards: int, progress: bool) -> _MineResult:
    """Run the Rust mining on a helper thread (it releases the GIL) and drive a tqdm bar meanwhile."""
    from tqdm.auto import tqdm

    counter = _native.Progress()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = _native.mine(str(path), progress=counter, second_pass=passes == 2, **params)
        except BaseException as e:  # noqa: BLE001 -- re-raised on the calling thread, whatever it is
            box["error"] = e

    thread = threading.Thread(target=work, name="saecore-mine", daemon=True)
    thread.start()
    with tqdm(total=passes * shards, unit="shard", desc="index", disable=not progress, file=sys.stderr) as bar:
        while thread.is_alive():
            thread.join(0.2)
            bar.update(counter.value - bar.n)
        bar.update(counter.value - bar.n)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _doc_positions(store: ActivationStore | None, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """doc_id and position of each token row (only the chunks holding those rows are read)."""
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    if store is None:
        return np.full(len(rows), -1, np.int64), np.full(len(rows), -1, np.int32)
    unique, inverse = np.unique(rows.astype(np.int64), return_inverse=True)
    docs = np.asarray(store.doc_ids.get_coordinate_selection(unique), dtype=np.int64)
    positions = np.asarray(store.positions.get_coordinate_selection(unique), dtype=np.int32)
    return docs[inverse], positions[inverse]


def _tables(r: _MineResult, store: ActivationStore | None, params: dict[str, Any],
            density_bins: int) -> dict[tables.TableSpec, pa.Table]:
    d, n_rows = int(r["d_sae"]), int(r["n_rows"])
    count = r["count"]
    feature_ids = np.arange(d, dtype=np.uint32)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_nonzero = np.where(count > 0, r["sum"] / np.maximum(count, 1), 0.0)
    stats = tables.STATS.table({
        "feature": feature_ids,
        "count": count.astype(np.uint64),
        "density": count / max(n_rows, 1),
        "sum": r["sum"],
        "max": r["max"].astype(np.float32),
        "mean_nonzero": mean_nonzero,
    })
    hb = params["hist_bins"]
    edges = r["hist_edges"].reshape(d, hb + 1)
    fired = np.flatnonzero(count > 0)
    histograms = tables.HISTOGRAMS.table({
        "feature": np.repeat(fired.astype(np.uint32), hb),
        "bin": np.tile(np.arange(hb, dtype=np.uint16), len(fired)),
        "lo": edges[fired, :-1].reshape(-1).astype(np.float32),
        "hi": edges[fired, 1:].reshape(-1).astype(np.float32),
        "count": r["hist_counts"].reshape(d, hb)[fired].reshape(-1).astype(np.uint64),
    })
    top_doc, top_pos = _doc_positions(store, r["top_row"])
    topk = tables.TOPK.table({
        "feature": r["top_feature"], "rank": r["top_rank"], "row": r["top_row"],
        "doc_id": top_doc, "position": top_pos, "value": r["top_value"],
    })
    s_doc, s_pos = _doc_positions(store, r["sample_row"])
    samples = tables.SAMPLES.table({
        "feature": r["sample_feature"], "bin": r["sample_bin"], "row": r["sample_row"],
        "doc_id": s_doc, "position": s_pos, "value": r["sample_value"],
    })
    lo, hi, dcount = _native.density_histogram(count.astype(np.uint64), max(n_rows, 1), density_bins)
    density = tables.DENSITY_HISTOGRAM.table({"lo_log10": lo, "hi_log10": hi, "count": dcount})
    return {tables.STATS: stats, tables.HISTOGRAMS: histograms, tables.TOPK: topk, tables.SAMPLES: samples,
            tables.DENSITY_HISTOGRAM: density}


def index(
    features: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    activations: str | os.PathLike[str] | None = None,
    cfg: IndexConfig | None = None,
    **overrides: Any,
) -> FeatureIndex:
    """Mine the feature store ``features`` and write the index tables into the folder ``out``.

    ``activations`` (the activation store the features were encoded from) defaults to the one recorded
    by ``saecore encode``; it supplies each example's document id and position. ``cfg``
    (:class:`IndexConfig`) or single-field ``overrides`` (``k=5``) set what is mined; ``cfg.ray`` mines
    on a Ray cluster (:mod:`saecore.cluster`) with identical tables.
    """
    cfg = dataclasses.replace(cfg or IndexConfig(), **overrides)
    density_bins = cfg.density_bins
    fs_path, out = Path(features), Path(out)
    fs = FeatureStore(fs_path)
    if not fs.complete:
        raise ValueError(f"{fs_path}: the feature store is incomplete; rerun `saecore encode` to finish it")
    act_path = activations or resolve_recorded(fs.spec.get("activation_store"), fs_path)
    store = ActivationStore(act_path) if act_path else None
    if store is not None and store.num_rows != fs.n_rows:
        raise ValueError(f"{act_path} has {store.num_rows} rows but the feature store {fs_path} has {fs.n_rows}")
    if not fs.has_csc:
        build_csc(fs_path)  # FeatureIndex.activations reads the feature-major copy
    params = cfg.mining_params()
    started = time.time()
    if cfg.ray is not None:
        from . import cluster

        address = None if cfg.ray == "local" else cfg.ray
        r = cluster.mine(fs_path, fs.num_shards, params, address=address, shards_per_task=cfg.shards_per_task,
                         progress=cfg.progress)
    else:
        r = _mine_with_progress(fs_path, params, 2, fs.num_shards, cfg.progress)
    mined = _tables(r, store, params, density_bins)
    meta = {
        "format": FORMAT,
        "feature_store": record_path(fs_path),
        "activation_store": record_path(act_path) if act_path else None,
        "sae": fs.spec.get("sae"),
        "hook": fs.spec.get("hook"),
        "n_tokens": fs.n_rows,
        "d_sae": fs.d_sae,
        "nnz": fs.nnz,
        **params,
        "density_bins": density_bins,
        "hist_bin_rule": "per feature, log-spaced edges from its smallest to its largest nonzero activation; "
        "x falls in the last bin j with lo_j <= x",
        "sample_bin_rule": "per feature, bin b holds activations in [b/sample_bins, (b+1)/sample_bins) x max; "
        "samples_per_bin drawn uniformly without replacement (bottom-s of a seeded hash of (feature, row))",
        "topk_order": "value descending, then row ascending",
        "mining_seconds": round(time.time() - started, 3),
        "saecore_version": _native.__version__,
    }
    _publish(out, mined, meta)
    return FeatureIndex(out)


def _publish(out: Path, mined: dict[tables.TableSpec, pa.Table], meta: dict[str, Any]) -> None:
    """Write the new index aside and swap it in whole: a reader (or a kill) sees the old index or the
    new one, never a mix. Tables other verbs added to the old folder (neighbours, logit lens …) are
    carried over; the mined tables and ``meta.json`` are the new ones."""
    with _atomic.publish_dir(out) as staging:
        written = {spec.file: _atomic.write_parquet(table, spec.path(staging)) for spec, table in mined.items()}
        _carry_over(out, staging, exclude={*written, META_FILE})
        _atomic.write_json(staging / META_FILE, tables.seal_meta(meta, written))


def _carry_over(old: Path, new: Path, exclude: set[str]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` not in ``exclude`` and not hidden."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in exclude or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    try:
        os.link(src, dst)  # files are replaced by rename, never edited in place, so sharing is safe
    except OSError:
        shutil.copy2(src, dst)


# --- reading ------------------------------------------------------------------------------------

CONTEXT = (12, 4)
"""Tokens of the same document shown before and after an example's activating token."""


@dataclass
class Example:
    """One activation of a feature (a row of the topk or samples table), with its context once decoded.

    ``rank`` is set for a top-k example, ``bin`` for a quantile sample. ``tokens`` are the context's
    tokens as text, ``highlight`` the index of the activating one, and ``text`` the context with that
    token marked as ``«token»``.
    """

    feature: int
    row: int
    doc_id: int
    position: int
    value: float
    rank: int | None = None
    bin: int | None = None
    tokens: list[str] | None = None
    highlight: int | None = None
    text: str | None = None


def examples_of(rows: pa.Table, feature: int) -> list[Example]:
    """The Examples of one feature's rows of the topk table (``rank``) or samples table (``bin``)."""
    cols = rows.to_pydict()
    ranks, bins = cols.get("rank"), cols.get("bin")
    return [
        Example(feature=int(feature), row=int(cols["row"][i]), doc_id=int(cols["doc_id"][i]),
                position=int(cols["position"][i]), value=float(cols["value"][i]),
                rank=int(ranks[i]) if ranks is not None else None, bin=int(bins[i]) if bins is not None else None)
        for i in range(rows.num_rows)
    ]


def load_tokenizer(model: str) -> Any:
    """The tokenizer of the model an activation store records (its ``model`` attribute).

    Raises ValueError naming the model when it cannot be loaded.
    """
    from . import models

    try:
        return models.load_tokenizer(model)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"cannot load the tokenizer of model {model!r} ({e})") from e


class ContextReader:
    """Reads the tokens around examples from the activation store, for many examples in one pass.

    ``prefetch`` takes every example row of a group of features, then streams the store's token ids,
    doc ids and positions block by block (skipping blocks with no example) and keeps only each
    example's window. Memory is about 100 bytes per example plus one block, never the whole store:
    reading scattered rows one by one (or by zarr coordinate selection per small batch) would decode
    every chunk of the store again for each batch.
    """

    def __init__(self, store: ActivationStore | None, before: int = CONTEXT[0], after: int = CONTEXT[1],
                 block_rows: int = 1 << 20):
        self.store = store
        self.before = before
        self.after = after
        self.num_rows = int(store.num_rows) if store is not None else 0
        if store is not None:  # whole zarr chunks per read: a block boundary never splits a chunk
            block_rows = max(store.chunk_rows, block_rows // store.chunk_rows * store.chunk_rows)
        self.block_rows = block_rows
        width = before + after + 1
        self._centres = np.zeros(0, dtype=np.int64)
        self._tok = np.zeros((0, width), dtype=np.int32)  # [U, W] token ids of each window
        self._lo = self._hi = np.zeros(0, dtype=np.int64)  # same-document span inside each window
        self._doc = self._pos = np.zeros(0, dtype=np.int64)  # the centre row's doc id and position

    def prefetch(self, rows: Iterable[int]) -> None:
        """Read the same-document window around every row in ``rows``."""
        if self.store is None:
            return
        centres = np.unique(np.fromiter(rows, dtype=np.int64))
        if centres.size and centres[-1] >= self.num_rows:
            raise ValueError(
                f"index row {int(centres[-1])} is outside the activation store {self.store.path} "
                f"({self.num_rows} rows); the index was built from another store"
            )
        parts = [self._read_block(centres[centres // self.block_rows == block], int(block))
                 for block in np.unique(centres // self.block_rows)]
        if parts:
            self._centres, self._tok, self._lo, self._hi, self._doc, self._pos = (
                np.concatenate(col) for col in zip(*parts)
            )

    def _read_block(self, here: np.ndarray, block: int) -> tuple[np.ndarray, ...]:
        """Windows of the rows ``here`` [n], all in block ``block`` (read with the context on either side)."""
        assert self.store is not None
        offsets = np.arange(-self.before, self.after + 1, dtype=np.int64)  # [W]
        first = max(block * self.block_rows - self.before, 0)
        last = min((block + 1) * self.block_rows + self.after, self.num_rows)
        tok = np.asarray(self.store.token_ids[first:last]).astype(np.int32)
        doc = np.asarray(self.store.doc_ids[first:last]).astype(np.int64)
        pos = np.asarray(self.store.positions[first:last]).astype(np.int64)
        idx = here[:, None] + offsets[None, :]  # [n, W] store rows of each window
        inside = (idx >= 0) & (idx < self.num_rows)
        local = np.clip(idx, first, last - 1) - first
        centre_doc = doc[here - first]  # [n]
        same = inside & (doc[local] == centre_doc[:, None])
        lo, hi = _contiguous_span(same, self.before)
        return here, tok[local], lo, hi, centre_doc, pos[here - first]

    def window(self, ex: Example, table: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(rows, token ids, index of the example's own token) of the same-document window, or None."""
        if self.store is None:
            return None
        i = int(np.searchsorted(self._centres, ex.row))
        if i >= len(self._centres) or self._centres[i] != ex.row:
            raise RuntimeError(f"row {ex.row} was not prefetched")  # a bug here, not bad input
        if self._doc[i] != ex.doc_id or self._pos[i] != ex.position:
            raise ValueError(
                f"{table}: row {ex.row} says doc {ex.doc_id} position {ex.position}, but the activation store "
                f"{self.store.path} has doc {int(self._doc[i])} position {int(self._pos[i])} there; the index "
                "was built from another activation store"
            )
        lo, hi = int(self._lo[i]), int(self._hi[i])
        rows = np.arange(ex.row - self.before + lo, ex.row - self.before + hi, dtype=np.int64)
        return rows, self._tok[i, lo:hi], self.before - lo


def _contiguous_span(same: np.ndarray, centre: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``same`` [n, W], the span [lo, hi) of True around column ``centre`` (which is True).

    Stores hold documents back to back, so a window keeps the run of same-document rows around its
    centre and stops at the first row of another document on either side.
    """
    width = same.shape[1]
    cols = np.arange(width)
    breaks_left = np.where(~same[:, :centre], cols[None, :centre], -1)  # [n, centre]
    lo = breaks_left.max(axis=1, initial=-1) + 1
    breaks_right = np.where(~same[:, centre:], cols[None, centre:], width)  # [n, W - centre]
    hi = breaks_right.min(axis=1, initial=width)
    return lo.astype(np.int64), hi.astype(np.int64)


class FeatureIndex:
    """The tables written by :func:`index`, with examples decoded to text.

    Refuses a folder without ``meta.json`` (no index, or an interrupted one). Every table is read
    through its :mod:`saecore.tables` spec, the same reader the pages use.

    >>> idx = FeatureIndex("runs/demo/index/sae")        # doctest: +SKIP
    >>> idx.top(12, k=5)[0].text                          # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, tokenizer: Any = None, context: tuple[int, int] = CONTEXT):
        self.path = Path(path)
        self.meta: dict[str, Any] = tables.read_meta(self.path)
        self.d_sae = int(self.meta["d_sae"])
        self.n_tokens = int(self.meta["n_tokens"])
        self.context = context
        self._tokenizer = tokenizer
        self._tables: dict[str, pa.Table] = {}
        self._features: FeatureStore | None = None
        self._contexts: ContextReader | None = None

    def __repr__(self) -> str:
        return f"FeatureIndex({str(self.path)!r}, d_sae={self.d_sae}, n_tokens={self.n_tokens})"

    def _table(self, spec: tables.TableSpec | str) -> pa.Table:
        spec = tables.BY_NAME[spec] if isinstance(spec, str) else spec
        if spec.name not in self._tables:
            table = spec.read(self.path)
            if table is None:
                raise FileNotFoundError(f"{spec.path(self.path)}: missing from the index; rerun `saecore index`")
            self._tables[spec.name] = table
        return self._tables[spec.name]

    def _check_feature(self, feature: int) -> int:
        f = int(feature)
        if not 0 <= f < self.d_sae:
            raise ValueError(f"feature id {feature} outside the valid range 0..{self.d_sae - 1} (d_sae={self.d_sae})")
        return f

    def stats(self) -> pa.Table:
        """Per-feature count, density, sum, max and mean of nonzero activations."""
        return self._table(tables.STATS)

    def density_histogram(self) -> pa.Table:
        """Features per log10-density bin; the first row counts features that never fire."""
        return self._table(tables.DENSITY_HISTOGRAM)

    def histogram(self, feature: int) -> pa.Table:
        """The log-spaced activation histogram of ``feature`` (no rows when it never fires)."""
        return tables.feature_rows(self._table(tables.HISTOGRAMS), self._check_feature(feature))

    def top(self, feature: int, k: int | None = None, *, context: bool = True) -> list[Example]:
        """The ``k`` strongest activations of ``feature`` (all stored when ``k`` is None), strongest first."""
        rows = tables.feature_rows(self._table(tables.TOPK), self._check_feature(feature))
        if k is not None:
            rows = rows.slice(0, k)
        return self._with_context(examples_of(rows, feature), tables.TOPK, context)

    def samples(self, feature: int, *, context: bool = True) -> list[Example]:
        """Quantile samples of ``feature``: examples drawn evenly across activation levels."""
        rows = tables.feature_rows(self._table(tables.SAMPLES), self._check_feature(feature))
        return self._with_context(examples_of(rows, feature), tables.SAMPLES, context)

    def activations(self, feature: int) -> Activations:
        """Every activation of ``feature`` (token rows, values) from the feature-major copy."""
        f = self._check_feature(feature)
        if self._features is None:
            self._features = FeatureStore(resolve_recorded(self.meta["feature_store"], self.path))
        return self._features.activations(f)

    # -- context decoding -------------------------------------------------------------------------
    def _context_reader(self) -> ContextReader:
        if self._contexts is None:
            if not self.meta.get("activation_store"):
                raise ValueError(f"{self.path}: the index records no activation store; contexts are unavailable")
            self._contexts = ContextReader(ActivationStore(resolve_recorded(self.meta["activation_store"], self.path)), *self.context)
        return self._contexts

    def tokenizer(self) -> Any:
        """The tokenizer of the model the activations came from (loaded on first use)."""
        if self._tokenizer is None:
            store = self._context_reader().store
            model = str(store.attrs.get("model", "")) if store is not None else ""
            try:
                self._tokenizer = load_tokenizer(model)
            except ValueError as e:
                raise ValueError(f"{e}; pass FeatureIndex(..., tokenizer=...)") from e
        return self._tokenizer

    def _with_context(self, examples: list[Example], spec: tables.TableSpec, context: bool) -> list[Example]:
        if not context or not examples:
            return examples
        reader = self._context_reader()
        reader.prefetch(ex.row for ex in examples)
        tok = self.tokenizer()
        for ex in examples:
            window = reader.window(ex, str(spec.path(self.path)))
            assert window is not None  # the reader has a store
            _, ids, centre = window
            pieces = [tok.decode([int(t)]) for t in ids]
            ex.tokens, ex.highlight = pieces, centre
            ex.text = "".join(pieces[:centre]) + "«" + pieces[centre] + "»" + "".join(pieces[centre + 1:])
        return examples


# --- CLI ----------------------------------------------------------------------------------------


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="feature store written by `saecore encode` (…/features/SAE.zarr)")
    parser.add_argument("--out", required=True, help="index folder to write (…/index/SAE)")
    parser.add_argument("--activations", default=None, help="activation store (default: the one the encode recorded)")
    add_arguments(parser, IndexConfig)


def cli_run(args: argparse.Namespace) -> int:
    idx = index(args.features, args.out, activations=args.activations, cfg=from_args(IndexConfig, args))
    stats = idx.stats()
    dead = int(np.count_nonzero(stats.column("count").to_numpy() == 0))
    print(f"{idx.path}: {idx.d_sae} features over {idx.n_tokens} tokens; {dead} never fire; "
          f"mined in {idx.meta['mining_seconds']:.2f} s")
    return 0
