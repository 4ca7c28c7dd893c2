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

Each file is written aside and renamed into place; ``meta.json`` last, so its presence means the tables
are complete. Other stages add their own tables to the same folder. A rerun recomputes everything (the
mining is two passes over the store; there is nothing worth resuming).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import _atomic, _native
from .activations import ActivationStore
from .features import Activations, FeatureStore, build_csc

FORMAT = "saecore.index/1"
META_FILE = "meta.json"
DEFAULTS = {"k": 20, "hist_bins": 32, "sample_bins": 10, "samples_per_bin": 10, "density_bins": 40, "seed": 0}


# --- writing ------------------------------------------------------------------------------------


def _write_parquet(table: pa.Table, path: Path) -> None:
    _atomic.write_parquet(table, path)


def _write_json(payload: dict[str, Any], path: Path) -> None:
    _atomic.write_json(path, payload)


def _mine_with_progress(path: Path, params: dict[str, Any], passes: int, shards: int, progress: bool) -> dict[str, Any]:
    """Run the Rust mining on a helper thread (it releases the GIL) and drive a tqdm bar meanwhile."""
    from tqdm.auto import tqdm

    counter = _native.Progress()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = _native.mine(str(path), progress=counter, **params)
        except BaseException as e:  # re-raised on the calling thread
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


def _tables(r: dict[str, Any], store: ActivationStore | None, params: dict[str, Any], density_bins: int) -> dict[str, pa.Table]:
    d, n_rows = int(r["d_sae"]), int(r["n_rows"])
    count = r["count"]
    feature_ids = np.arange(d, dtype=np.uint32)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_nonzero = np.where(count > 0, r["sum"] / np.maximum(count, 1), 0.0)
    stats = pa.table({
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
    histograms = pa.table({
        "feature": np.repeat(fired.astype(np.uint32), hb),
        "bin": np.tile(np.arange(hb, dtype=np.uint16), len(fired)),
        "lo": edges[fired, :-1].reshape(-1).astype(np.float32),
        "hi": edges[fired, 1:].reshape(-1).astype(np.float32),
        "count": r["hist_counts"].reshape(d, hb)[fired].reshape(-1).astype(np.uint64),
    })
    top_doc, top_pos = _doc_positions(store, r["top_row"])
    topk = pa.table({
        "feature": r["top_feature"], "rank": r["top_rank"], "row": r["top_row"],
        "doc_id": top_doc, "position": top_pos, "value": r["top_value"],
    })
    s_doc, s_pos = _doc_positions(store, r["sample_row"])
    samples = pa.table({
        "feature": r["sample_feature"], "bin": r["sample_bin"], "row": r["sample_row"],
        "doc_id": s_doc, "position": s_pos, "value": r["sample_value"],
    })
    lo, hi, dcount = _native.density_histogram(count.astype(np.uint64), max(n_rows, 1), density_bins)
    density = pa.table({"lo_log10": lo, "hi_log10": hi, "count": dcount})
    return {"stats": stats, "histograms": histograms, "topk": topk, "samples": samples, "density_histogram": density}


def index(
    features: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    activations: str | os.PathLike[str] | None = None,
    k: int = DEFAULTS["k"],
    hist_bins: int = DEFAULTS["hist_bins"],
    sample_bins: int = DEFAULTS["sample_bins"],
    samples_per_bin: int = DEFAULTS["samples_per_bin"],
    density_bins: int = DEFAULTS["density_bins"],
    seed: int = DEFAULTS["seed"],
    progress: bool = True,
    ray: str | None = None,
    shards_per_task: int | None = None,
) -> FeatureIndex:
    """Mine the feature store ``features`` and write the index tables into the folder ``out``.

    ``activations`` (the activation store the features were encoded from) defaults to the one recorded
    by ``saecore encode``; it supplies each example's document id and position.

    ``ray`` runs the mining on a Ray cluster (an address, or ``"local"`` to start one; see
    :mod:`saecore.distributed`), ``shards_per_task`` shards per task; the tables are identical.
    """
    fs_path, out = Path(features), Path(out)
    fs = FeatureStore(fs_path)
    if not fs.complete:
        raise ValueError(f"{fs_path}: the feature store is incomplete; rerun `saecore encode` to finish it")
    act_path = activations or fs.spec.get("activation_store")
    store = ActivationStore(act_path) if act_path else None
    if store is not None and store.num_rows != fs.n_rows:
        raise ValueError(f"{act_path} has {store.num_rows} rows but the feature store {fs_path} has {fs.n_rows}")
    if not fs.has_csc:
        build_csc(fs_path)  # FeatureIndex.activations reads the feature-major copy
    params = {"k": k, "hist_bins": hist_bins, "sample_bins": sample_bins, "samples_per_bin": samples_per_bin, "seed": seed}
    started = time.time()
    if ray is not None:
        from . import distributed

        address = None if ray == "local" else ray
        r = distributed.mine(fs_path, fs.num_shards, params, address=address, shards_per_task=shards_per_task, progress=progress)
    else:
        r = _mine_with_progress(fs_path, params, 2, fs.num_shards, progress)
    tables = _tables(r, store, params, density_bins)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the tables below are about to change
    for name, table in tables.items():
        _write_parquet(table, out / f"{name}.parquet")
    meta = {
        "format": FORMAT,
        "feature_store": str(fs_path.resolve()),
        "activation_store": str(Path(act_path).resolve()) if act_path else None,
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
    _write_json(meta, out / META_FILE)
    return FeatureIndex(out)


# --- reading ------------------------------------------------------------------------------------


@dataclass
class Example:
    """One activation of a feature with its context, decoded to text.

    ``tokens`` are the context's tokens as text, ``highlight`` the index of the activating one, and
    ``text`` the context with that token marked as ``«token»``.
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


class FeatureIndex:
    """The tables written by :func:`index`, with examples decoded to text.

    >>> idx = FeatureIndex("runs/demo/index/sae")        # doctest: +SKIP
    >>> idx.top(12, k=5)[0].text                          # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, tokenizer: Any = None, context: tuple[int, int] = (12, 4)):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path}: no feature index here (no {META_FILE}); run `saecore index`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.d_sae = int(self.meta["d_sae"])
        self.n_tokens = int(self.meta["n_tokens"])
        self.context = context
        self._tokenizer = tokenizer
        self._tables: dict[str, pa.Table] = {}
        self._features: FeatureStore | None = None
        self._store: ActivationStore | None = None

    def __repr__(self) -> str:
        return f"FeatureIndex({str(self.path)!r}, d_sae={self.d_sae}, n_tokens={self.n_tokens})"

    def _table(self, name: str) -> pa.Table:
        if name not in self._tables:
            self._tables[name] = pq.read_table(self.path / f"{name}.parquet")
        return self._tables[name]

    def _check_feature(self, feature: int) -> int:
        f = int(feature)
        if not 0 <= f < self.d_sae:
            raise ValueError(f"feature id {feature} outside the valid range 0..{self.d_sae - 1} (d_sae={self.d_sae})")
        return f

    def _rows_of(self, name: str, feature: int) -> pa.Table:
        """Rows of a table sorted by feature, for one feature (binary search, no scan)."""
        table = self._table(name)
        ids = table.column("feature").to_numpy()
        lo, hi = np.searchsorted(ids, feature, "left"), np.searchsorted(ids, feature, "right")
        return table.slice(lo, hi - lo)

    def stats(self) -> pa.Table:
        """Per-feature count, density, sum, max and mean of nonzero activations."""
        return self._table("stats")

    def density_histogram(self) -> pa.Table:
        """Features per log10-density bin; the first row counts features that never fire."""
        return self._table("density_histogram")

    def histogram(self, feature: int) -> pa.Table:
        """The log-spaced activation histogram of ``feature`` (no rows when it never fires)."""
        return self._rows_of("histograms", self._check_feature(feature))

    def top(self, feature: int, k: int | None = None, *, context: bool = True) -> list[Example]:
        """The ``k`` strongest activations of ``feature`` (all stored when ``k`` is None), strongest first."""
        rows = self._rows_of("topk", self._check_feature(feature))
        if k is not None:
            rows = rows.slice(0, k)
        return self._examples(rows, feature, context, rank=True)

    def samples(self, feature: int, *, context: bool = True) -> list[Example]:
        """Quantile samples of ``feature``: examples drawn evenly across activation levels."""
        rows = self._rows_of("samples", self._check_feature(feature))
        return self._examples(rows, feature, context, rank=False)

    def activations(self, feature: int) -> Activations:
        """Every activation of ``feature`` (token rows, values) from the feature-major copy."""
        f = self._check_feature(feature)
        if self._features is None:
            self._features = FeatureStore(self.meta["feature_store"])
        return self._features.activations(f)

    # -- context decoding -------------------------------------------------------------------------
    def _activation_store(self) -> ActivationStore:
        if self._store is None:
            if not self.meta.get("activation_store"):
                raise ValueError(f"{self.path}: the index records no activation store; contexts are unavailable")
            self._store = ActivationStore(self.meta["activation_store"])
        return self._store

    def tokenizer(self) -> Any:
        """The tokenizer of the model the activations came from (loaded on first use)."""
        if self._tokenizer is None:
            from . import models

            name = str(self._activation_store().attrs.get("model", ""))
            try:
                self._tokenizer = models.load_tokenizer(name)
            except (ValueError, OSError) as e:
                if not name.startswith("tiny-llama"):
                    raise ValueError(f"cannot load the tokenizer of model {name!r} ({e}); pass FeatureIndex(..., tokenizer=...)") from e
                self._tokenizer = models.load_tokenizer(models.BUILTIN_MODEL)  # tiny_llama uses SmolLM2's tokenizer
        return self._tokenizer

    def _examples(self, rows: pa.Table, feature: int, context: bool, *, rank: bool) -> list[Example]:
        cols = rows.to_pydict()
        out = []
        for i in range(rows.num_rows):
            ex = Example(
                feature=int(feature), row=int(cols["row"][i]), doc_id=int(cols["doc_id"][i]),
                position=int(cols["position"][i]), value=float(cols["value"][i]),
                rank=int(cols["rank"][i]) if rank else None, bin=None if rank else int(cols["bin"][i]),
            )
            if context:
                self._add_context(ex)
            out.append(ex)
        return out

    def _add_context(self, ex: Example) -> None:
        store = self._activation_store()
        before, after = self.context
        lo, hi = max(0, ex.row - before), min(store.num_rows, ex.row + after + 1)
        docs = np.asarray(store.doc_ids[lo:hi])
        ids = np.asarray(store.token_ids[lo:hi])
        keep = docs == ex.doc_id  # rows of other documents are not context
        tok = self.tokenizer()
        pieces = [tok.decode([int(t)]) for t in ids[keep]]
        ex.highlight = int(np.count_nonzero(keep[: ex.row - lo]))
        ex.tokens = pieces
        ex.text = "".join(pieces[: ex.highlight]) + "«" + pieces[ex.highlight] + "»" + "".join(pieces[ex.highlight + 1 :])


# --- CLI ----------------------------------------------------------------------------------------


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="feature store written by `saecore encode` (…/features/SAE.zarr)")
    parser.add_argument("--out", required=True, help="index folder to write (…/index/SAE)")
    parser.add_argument("--activations", default=None, help="activation store (default: the one the encode recorded)")
    parser.add_argument("--k", type=int, default=DEFAULTS["k"], help="top examples per feature")
    parser.add_argument("--hist-bins", type=int, default=DEFAULTS["hist_bins"], help="log-spaced histogram bins")
    parser.add_argument("--sample-bins", type=int, default=DEFAULTS["sample_bins"], help="activation-level bins (fractions of max)")
    parser.add_argument("--samples-per-bin", type=int, default=DEFAULTS["samples_per_bin"])
    parser.add_argument("--density-bins", type=int, default=DEFAULTS["density_bins"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="mine on a Ray cluster: join ADDRESS (HOST:PORT, auto, ray://…), or start a local one when no address is given")
    parser.add_argument("--shards-per-task", type=int, default=None, help="with --ray: shards per task (default: ~4 tasks per CPU)")


def cli_run(args: argparse.Namespace) -> int:
    from .errors import SaecoreError

    try:
        idx = index(
            args.features, args.out, activations=args.activations, k=args.k, hist_bins=args.hist_bins,
            sample_bins=args.sample_bins, samples_per_bin=args.samples_per_bin, density_bins=args.density_bins,
            seed=args.seed, progress=not args.no_progress, ray=args.ray, shards_per_task=args.shards_per_task,
        )
    except SaecoreError as e:  # e.g. --ray without Ray installed, or an unreachable cluster: one line
        print(f"saecore index: error: {e}", file=sys.stderr)
        return 2
    stats = idx.stats()
    dead = int(np.count_nonzero(stats.column("count").to_numpy() == 0))
    print(f"{idx.path}: {idx.d_sae} features over {idx.n_tokens} tokens; {dead} never fire; "
          f"mined in {idx.meta['mining_seconds']:.2f} s")
    return 0
