"""Static HTML feature pages: browse an SAE's features in a browser, offline.

``saecore pages RUN`` reads whatever index tables exist under ``RUN/index/SAE/`` and writes a static site
under ``RUN/pages/`` that opens straight from disk (``file://``): no server, no CDN, no network fetch.
Every script and style sheet ships inside the package (``saecore/page_assets``)::

    pages/
      index.html                 the SAEs of the run, with links
      assets/                    style.css, common.js, index.js, feature.js (copied from the package)
      SAE/index.html             searchable, sortable feature table + clickable feature map
      SAE/sae.js                 SAE-wide data every page of this SAE loads (density histogram, meta)
      SAE/summary/NNNN.js        the feature table, in chunks of SUMMARY_CHUNK rows
      SAE/map.js                 the 2-D feature map (if map.parquet exists)
      SAE/f/B/F.html             one page per feature F, in folders B = F // 1000; its data inline
      SAE/about.json             counts the root index is made from

Data travels as ``.js`` files loaded by ``<script>`` tags because Chromium forbids ``fetch()`` from
``file://`` pages. Each feature page carries only its own data, so the site scales to tens of
thousands of features; the index loads the compact summary chunk by chunk.

Any table may be missing; that part of the page is then absent (and says why where it matters).
Each SAE's folder is built beside its final name and renamed into place, so an interrupted build never
leaves a half-written site behind.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import index, tables
from ._atomic import publish_dir, read_json_object, write_text
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .errors import CorruptDataError, SaecoreError
from .features import FeatureStore
from .index import ContextReader, Example
from .run import (
    AUTOINTERP_SUMMARY_FILE,
    COMPOSITE_EXPERIMENT,
    PAGES_INDEX_FILE,
    SAEBENCH_PLOT,
    Run,
    maximise_dir,
    maximise_file,
    resolve_recorded,
    saebench_plot,
    saebench_summary,
)

PAGES_FORMAT = "saecore.pages/1"
SUMMARY_CHUNK = 4096
"""Features per summary chunk file; the index page renders after the first chunk arrives."""
FEATURES_PER_FOLDER = 1000
CONTEXT_BEFORE = 16
"""Tokens of the same document shown before an example's activating token."""
CONTEXT_AFTER = 6
MAX_TOP_EXAMPLES = 20
MAX_SAMPLES_PER_BIN = 5
FEATURE_BATCH = 8192
"""Features whose example windows are read from the activation store in one pass (~100 bytes per
example, so a few tens of MB)."""
DENSE_ACTIVATION_LIMIT = 20_000_000
"""Features firing more often than this get partial per-token highlighting (their full activation list
would be too large to hold just to colour a few windows)."""
ASSET_FILES = ("style.css", "common.js", "index.js", "feature.js")
STATS_DIGITS: dict[str, int | None] = {"density": None, "sum": 6}
"""Significant digits of a stats column in the page data (None: exact; default 4)."""

# --------------------------------------------------------------------------------------------------
# Reading the index tables (through saecore.tables: one schema and one reader per table)
# --------------------------------------------------------------------------------------------------
def read_columns(index_dir: Path, spec: tables.TableSpec) -> dict[str, np.ndarray] | None:
    """Columns of one index table as NumPy arrays (strings as object arrays), or None when absent.

    The table is read and checked by ``spec.read``: ValueError naming the file and column when a column
    is missing or unusable, CorruptDataError when the file is not readable Parquet.
    """
    table = spec.read(index_dir)
    if table is None:
        return None
    if spec is tables.DENSITY_HISTOGRAM:
        # `saecore index` puts the features that never fire in a first bin with edges -inf (log10 of 0);
        # the dead count is shown from the stats table, so that bin is left out of the chart.
        table = table.filter(pa.array(~np.isneginf(table.column("lo_log10").to_numpy())))
    return {f.name: (np.asarray(table.column(f.name).to_pylist(), dtype=object) if pa.types.is_string(f.type)
                     else table.column(f.name).to_numpy()) for f in spec.schema}


@dataclass
class Grouped:
    """A table's columns sorted by ``feature``, so one feature's rows are one contiguous slice."""

    columns: dict[str, np.ndarray]
    order_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        keys = [self.columns[c] for c in reversed(self.order_by)] + [self.columns["feature"]]
        order = np.lexsort(keys)
        self.columns = {k: v[order] for k, v in self.columns.items()}
        self._features = self.columns["feature"]

    def slice(self, feature: int) -> slice:
        lo = int(np.searchsorted(self._features, feature, side="left"))
        hi = int(np.searchsorted(self._features, feature, side="right"))
        return slice(lo, hi)

    def features(self) -> np.ndarray:
        return np.unique(self._features)


@dataclass
class IndexTables:
    """Every index table of one SAE that exists (None for the absent ones) plus ``meta.json``."""

    sae: str
    index_dir: Path
    meta: dict[str, Any]
    stats: Grouped | None = None
    histograms: Grouped | None = None
    topk: Grouped | None = None
    samples: Grouped | None = None
    neighbours: Grouped | None = None
    enc_dec_cosine: Grouped | None = None
    logit_lens: Grouped | None = None
    logit_lens_encoder: Grouped | None = None
    token_scores: Grouped | None = None
    explanations: Grouped | None = None
    autointerp_scores: Grouped | None = None
    specificity: Grouped | None = None
    density_histogram: dict[str, np.ndarray] | None = None
    map: dict[str, np.ndarray] | None = None

    @classmethod
    def load(cls, index_dir: Path) -> IndexTables:
        """Read the tables under ``index_dir`` (``RUN/index/SAE``); refuses a folder without ``meta.json``."""
        out = cls(sae=index_dir.name, index_dir=index_dir, meta=tables.read_meta(index_dir))
        for spec in tables.ALL:
            columns = read_columns(index_dir, spec)
            if columns is not None:
                setattr(out, spec.name, Grouped(columns, spec.order) if spec in tables.PER_FEATURE else columns)
        return out

    def present(self) -> list[str]:
        """Names of the tables this index has."""
        return [spec.name for spec in tables.ALL if getattr(self, spec.name) is not None]

    def feature_ids(self) -> np.ndarray:
        """Every feature id to write a page for: all of ``0..d_sae-1`` (``meta.json`` records d_sae)."""
        return np.arange(int(self.meta["d_sae"]), dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Token text and example contexts
# --------------------------------------------------------------------------------------------------
class TokenText:
    """Token id -> display text, cached; shows ``#id`` when no tokenizer is available."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"#{token_id}"
            else:
                # decode() of one id gives the text a reader sees ("Ġthe" from convert_ids_to_tokens does not).
                text = self.tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def load_tokenizer(model_name: str | None) -> Any | None:
    """The tokenizer of ``model_name`` (the activation store's "model" attribute), or None if unavailable."""
    if not model_name:
        return None
    try:
        return index.load_tokenizer(model_name)
    except ValueError as e:
        print(f"saecore pages: {e}; showing token ids", file=sys.stderr)
        return None


def open_activation_store(run: Path, meta: dict[str, Any]) -> ActivationStore | None:
    """The activation store the index was built from (else the run's), or None when it cannot be found."""
    for path in (resolve_recorded(meta.get("activation_store"), run), Run(run).activations):
        if path is not None and path.exists():
            return ActivationStore(path)
    return None


ActivationLookup = Callable[[int], "tuple[np.ndarray, np.ndarray] | None"]


def feature_activation_lookup(run: Path, index_dir: Path, meta: dict[str, Any]) -> tuple[ActivationLookup | None, str]:
    """A function feature -> (sorted rows, values) of all its activations, and a note when there is none.

    Reads the feature store the index was built from (``meta["feature_store"]``, else
    ``RUN/features/SAE.zarr``), feature-major copy. Without it, pages shade only the activations the
    index recorded.
    """
    path = next((p for p in (resolve_recorded(meta.get("feature_store"), run), Run(run).features(index_dir.name))
                 if p is not None and p.exists()), None)
    if path is None:
        return None, "no feature store found"
    try:
        store = FeatureStore(path)
    except (OSError, ValueError, SaecoreError, CorruptDataError) as e:
        print(f"saecore pages: {path}: per-token activations unavailable ({e})", file=sys.stderr)
        return None, f"{type(e).__name__}: {e}"
    if not (store.complete and store.has_csc):
        return None, f"{path}: incomplete or without its feature-major copy"
    failed: list[str] = []

    def lookup(feature: int) -> tuple[np.ndarray, np.ndarray] | None:
        if failed:  # one failure means every later call fails the same way
            return None
        try:
            rows, values = _rows_values(store.activations(int(feature)))
        except (OSError, ValueError, SaecoreError, CorruptDataError) as e:
            failed.append(f"{type(e).__name__}: {e}")
            print(f"saecore pages: {path}: per-token activations unavailable ({e})", file=sys.stderr)
            return None
        order = np.argsort(rows, kind="stable")
        return rows[order], values[order]

    return lookup, ""


def _bound_lookup(activations: Callable[[str, int], Any], sae: str) -> ActivationLookup:
    def lookup(feature: int) -> tuple[np.ndarray, np.ndarray] | None:
        result = activations(sae, feature)
        if result is None:
            return None
        rows, values = _rows_values(result)
        order = np.argsort(rows, kind="stable")
        return rows[order], values[order]

    return lookup


def _rows_values(result: Any) -> tuple[np.ndarray, np.ndarray]:
    """Normalise what an activations callback returns: a (rows, values) pair, a dict or an Arrow table."""
    if isinstance(result, tuple) and len(result) == 2:
        rows, values = result
    elif hasattr(result, "column"):  # pyarrow Table / RecordBatch
        rows, values = result.column("row").to_numpy(), result.column("value").to_numpy()
    else:
        rows, values = result["row"], result["value"]
    return np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Building one SAE's pages
# --------------------------------------------------------------------------------------------------
def feature_href(feature: int) -> str:
    """Path of a feature's page relative to its SAE's folder."""
    return f"f/{feature // FEATURES_PER_FOLDER}/{feature}.html"


def _script_json(value: Any) -> str:
    """JSON safe to place inside a <script> element (no '</script>' or '<!--' can appear)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _round(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (keeps the page data small)."""
    x = float(x)
    if x == 0 or not math.isfinite(x):  # tables are checked finite on reading; this guards derived values
        return x if x == 0 else 0.0
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _round_array(x: np.ndarray, digits: int) -> np.ndarray:
    """``_round`` for an array: ``digits`` significant digits, as float64 with short decimal reprs."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    nz = x != 0
    k = digits - 1 - np.floor(np.log10(np.abs(x[nz]))).astype(np.int64)
    # Dividing an integer by an exact power of ten gives the double nearest the decimal, so JSON
    # prints "0.123", not "0.12300000000000001".
    scale = 10.0 ** np.abs(k)
    out[nz] = np.where(k >= 0, np.round(x[nz] * scale) / scale, np.round(x[nz] / scale) * scale)
    return out


def _template(name: str) -> str:
    return resources.files("saecore.page_assets").joinpath(name).read_text(encoding="utf-8")


def _fill(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("@@" + key + "@@", value)
    return template


@dataclass
class SaeBuild:
    """Everything one SAE's page writer needs; ``write_into`` builds the folder."""

    run: Path
    tables: IndexTables
    tokens: TokenText
    context: ContextReader
    lookup: ActivationLookup | None
    lookup_note: str
    linkable_saes: set[str]
    model: str = ""
    summary_top_tokens: dict[int, str] = field(default_factory=dict)
    lookup_mode: Any = "auto"
    """How ``lookup`` was made (the ``activations`` argument of :func:`build_pages`), for Ray tasks to redo."""
    _decomposition: Any = field(default=False, repr=False)
    """The ``saecore composite`` result, read on first use (False: not read yet; None: there is none)."""

    @property
    def sae(self) -> str:
        return self.tables.sae

    # -- examples --------------------------------------------------------------------------------
    def _examples(self, grouped: Grouped | None, feature: int, key: str, limit: int | None) -> list[Example]:
        if grouped is None:
            return []
        s = grouped.slice(feature)
        c = grouped.columns
        out = [
            Example(feature=feature, row=int(c["row"][i]), doc_id=int(c["doc_id"][i]), position=int(c["position"][i]),
                    value=float(c["value"][i]), **{key: int(c[key][i])})
            for i in range(s.start, s.stop)
        ]
        return out[:limit] if limit is not None else out

    def _samples_by_bin(self, feature: int) -> dict[int, list[Example]]:
        by_bin: dict[int, list[Example]] = {}
        for ex in self._examples(self.tables.samples, feature, "bin", None):
            by_bin.setdefault(int(ex.bin or 0), []).append(ex)
        # Within a bin, spread the shown examples over its value range instead of taking the lowest few.
        for b, exs in by_bin.items():
            if len(exs) > MAX_SAMPLES_PER_BIN:
                pick = np.linspace(0, len(exs) - 1, MAX_SAMPLES_PER_BIN).round().astype(int)
                by_bin[b] = [exs[i] for i in sorted(set(pick.tolist()))]
        return by_bin

    def _known_values(self, feature: int, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, bool]:
        """(sorted rows, values) of this feature's activations to colour tokens with, and whether complete."""
        count = self._count(feature)
        if self.lookup is not None and count <= DENSE_ACTIVATION_LIMIT:
            got = self.lookup(feature)
            if got is not None:
                return got[0], got[1], True
        rows = np.array([e.row for e in examples], dtype=np.int64)
        values = np.array([e.value for e in examples], dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        return rows[order], values[order], False

    def _count(self, feature: int) -> int:
        if self.tables.stats is None:
            return 0
        s = self.tables.stats.slice(feature)
        return int(self.tables.stats.columns["count"][s.start]) if s.stop > s.start else 0

    def _render_examples(
        self, examples: Sequence[Example], known: tuple[np.ndarray, np.ndarray], table: str, complete: bool
    ) -> list[dict[str, Any]]:
        """JSON of examples: each window's token ids and the feature's activation on every token."""
        windows = [self.context.window(ex, table) for ex in examples]
        if not examples or windows[0] is None:
            return [{"row": ex.row, "doc": ex.doc_id, "pos": ex.position, "v": _round(ex.value), "c": -1}
                    for ex in examples]
        # One lookup and one rounding for all windows of the feature (per-window NumPy calls dominate).
        rows = np.concatenate([w[0] for w in windows])
        lengths = [len(w[0]) for w in windows]
        krows, kvals = known
        if len(krows):
            idx = np.minimum(np.searchsorted(krows, rows), len(krows) - 1)
            hit = krows[idx] == rows
            values = np.where(hit, kvals[idx], 0.0)
        else:
            hit, values = np.zeros(len(rows), dtype=bool), np.zeros(len(rows))
        starts = np.cumsum([0] + lengths[:-1])
        centres = starts + np.array([w[2] for w in windows])
        values[centres] = [ex.value for ex in examples]
        hit[centres] = True
        rounded = _round_array(values, 3).tolist()
        if not complete:  # only recorded activations are known; other tokens are unknown (None), not zero
            rounded = [v if h else None for v, h in zip(rounded, hit.tolist())]
        out = []
        for ex, (_, toks, centre), start, n in zip(examples, windows, starts.tolist(), lengths):
            out.append({"row": ex.row, "doc": ex.doc_id, "pos": ex.position, "v": _round(ex.value), "c": centre,
                        "id": toks.tolist(),  # their text is in the page's "vocab", once per distinct token
                        "a": rounded[start:start + n]})
        return out

    # -- one feature's data ----------------------------------------------------------------------
    def feature_data(self, feature: int, n_features: int) -> dict[str, Any]:
        """The JSON embedded in a feature's page."""
        t = self.tables
        top = self._examples(t.topk, feature, "rank", MAX_TOP_EXAMPLES)
        samples = self._samples_by_bin(feature)
        all_examples = top + [e for exs in samples.values() for e in exs]
        krows, kvals, complete = self._known_values(feature, all_examples)
        known = (krows, kvals)
        data: dict[str, Any] = {
            "sae": self.sae,
            "feature": feature,
            "n_features": n_features,
            "href": {"prev": feature_href(feature - 1) if feature > 0 else None,
                     "next": feature_href(feature + 1) if feature + 1 < n_features else None},
            "stats": self._stats(feature),
            "enc_dec_cosine": self._enc_dec(feature),
            "histogram": self._histogram(feature),
            "top": self._render_examples(top, known, tables.TOPK.file, complete) if t.topk is not None else None,
            "samples": self._samples_json(samples, known, complete) if t.samples is not None else None,
            "logit_lens": self._logit_lens(feature),
            "logit_lens_encoder": self._logit_lens(feature, tables.LOGIT_LENS_ENCODER),
            "neighbours": self._neighbours(feature),
            "maximise": self._maximise(feature),
            "composite": self._composite(feature),
            "token_scores": self._row_of(self.tables.token_scores, feature),
            "autointerp": self._autointerp(feature),
            "per_token": "all" if complete else "recorded",
            "per_token_note": "" if complete else self.lookup_note,
            "tokens": "text" if self.tokens.available else "ids",
            "context": self.context.store is not None,
        }
        shown = {i for group in (data["top"] or [], *[b["examples"] for b in data["samples"] or []])
                 for e in group for i in e.get("id", ())}
        data["vocab"] = {str(i): self.tokens(i) for i in sorted(shown)}
        if top and self.context.store is not None:
            counts = Counter(self.tokens(e["id"][e["c"]]).strip() or repr(self.tokens(e["id"][e["c"]]))
                             for e in data["top"] if e["c"] >= 0)
            self.summary_top_tokens[feature] = " · ".join(tok for tok, _ in counts.most_common(3))
        return data

    def _stats(self, feature: int) -> dict[str, float] | None:
        if self.tables.stats is None:
            return None
        s = self.tables.stats.slice(feature)
        if s.stop == s.start:
            return None
        c = self.tables.stats.columns
        i = s.start
        # Every column the stats schema declares reaches the page data, so a new column needs no edit here.
        out: dict[str, float] = {}
        for col in tables.STATS.schema:
            if col.name == "feature":
                continue
            value, digits = c[col.name][i], STATS_DIGITS.get(col.name, 4)
            if pa.types.is_integer(col.type):
                out[col.name] = int(value)
            else:
                out[col.name] = float(value) if digits is None else _round(value, digits)
        return out

    def _enc_dec(self, feature: int) -> float | None:
        g = self.tables.enc_dec_cosine
        if g is None:
            return None
        s = g.slice(feature)
        return _round(g.columns["cosine"][s.start]) if s.stop > s.start else None

    def _histogram(self, feature: int) -> list[list[float]] | None:
        g = self.tables.histograms
        if g is None:
            return None
        s = g.slice(feature)
        c = g.columns
        return [[_round(c["lo"][i]), _round(c["hi"][i]), int(c["count"][i])] for i in range(s.start, s.stop)]

    def _samples_json(
        self, samples: dict[int, list[Example]], known: tuple[np.ndarray, np.ndarray], complete: bool
    ) -> list[dict]:
        bins = sorted(samples, reverse=True)  # strongest activations first, as in the paper's figures
        per_bin = [sorted(samples[b], key=lambda e: -e.value) for b in bins]
        rendered = self._render_examples([e for exs in per_bin for e in exs], known, tables.SAMPLES.file, complete)
        out, start = [], 0
        for b, exs in zip(bins, per_bin):
            out.append({"bin": b, "lo": _round(min(e.value for e in exs)), "hi": _round(max(e.value for e in exs)),
                        "examples": rendered[start:start + len(exs)]})
            start += len(exs)
        return out

    def _logit_lens(self, feature: int, spec: tables.TableSpec = tables.LOGIT_LENS) -> dict[str, list] | None:
        g = getattr(self.tables, spec.name)
        if g is None:
            return None
        s = g.slice(feature)
        c = g.columns
        out: dict[str, list] = {"promote": [], "suppress": []}
        for i in range(s.start, s.stop):
            kind = str(c["kind"][i])
            if kind not in out:
                raise ValueError(f"{spec.path(self.tables.index_dir)}: kind {kind!r} for feature "
                                 f"{feature}; expected 'promote' or 'suppress'")
            out[kind].append([str(c["token"][i]), int(c["token_id"][i]), _round(c["value"][i])])
        return out

    def _neighbours(self, feature: int) -> list[dict[str, Any]] | None:
        g = self.tables.neighbours
        if g is None:
            return None
        s = g.slice(feature)
        c = g.columns
        out = []
        for i in range(s.start, s.stop):
            other = str(c["other_sae"][i]) or self.sae
            n = int(c["neighbour"][i])
            if other == self.sae:
                href = "../../" + feature_href(n)
            elif other in self.linkable_saes:
                href = f"../../../{other}/" + feature_href(n)
            else:
                href = None
            out.append({"sae": other, "feature": n, "cosine": _round(c["cosine"][i]), "href": href})
        return out

    def _composite(self, feature: int) -> dict[str, Any] | None:
        """The feature's meta-SAE decomposition when ``saecore composite`` ran on this SAE, with links."""
        if self._decomposition is False:
            from .composite import read_decomposition

            self._decomposition = read_decomposition(Run(self.run).experiment(COMPOSITE_EXPERIMENT) / self.sae)
        found = self._decomposition.of(feature) if self._decomposition is not None else None
        if found is not None:
            for m in found["meta"]:
                m["others"] = [{"feature": f, "href": "../../" + feature_href(f)} for f in m["others"]]
        return found

    def _maximise(self, feature: int) -> dict[str, Any] | None:
        """The feature's ``saecore maximise`` result when the run has one (synthetic max-activating text)."""
        path = maximise_dir(Run(self.run).sae(self.sae)) / maximise_file(feature)
        if not path.exists():
            return None
        data = read_json_object(path)
        try:
            def seqs(key: str) -> list[dict[str, Any]]:
                return [{"tokens": [str(t) for t in s["tokens"]], "a": _round(s["activation"]), "pre": _round(s["pre"]),
                         "retok": _round(s["retokenized_activation"]),
                         "nll": None if s.get("nll") is None else _round(s["nll"])} for s in data[key]]

            return {"gcg": seqs("gcg"), "random": seqs("random"), "evaluations": int(data["evaluations_per_search"]),
                    "position": str(data["config"]["position"]), "fluency": float(data["config"]["fluency"]),
                    "dataset": [{"v": _round(e["value"]), "text": str(e["text"] or "")} for e in data["dataset_top"]],
                    "dataset_note": str(data.get("dataset_note", ""))}
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptDataError(f"{path}: not a saecore maximise result ({type(e).__name__}: {e})") from e
    # -- automated interpretability (saecore token-scores, explain, score) --------------------------
    def _row_of(self, g: Grouped | None, feature: int) -> dict[str, Any] | None:
        """The one row of a per-feature table for ``feature`` (NaN as None), or None."""
        rows = self._rows_of(g, feature)
        return rows[0] if rows else None

    def _rows_of(self, g: Grouped | None, feature: int) -> list[dict[str, Any]]:
        if g is None:
            return []
        s = g.slice(feature)
        return [{k: _json_safe(_plain(v[i])) for k, v in g.columns.items() if k != "feature"} for i in range(s.start, s.stop)]

    def _autointerp(self, feature: int) -> dict[str, Any] | None:
        """This feature's explanation, its scores beside the baselines, and its specificity by bin."""
        explanation = self._row_of(self.tables.explanations, feature)
        scores = self._rows_of(self.tables.autointerp_scores, feature)
        if explanation is None and not scores:
            return None
        return {"explanation": explanation, "scores": scores,
                "specificity": self._rows_of(self.tables.specificity, feature)}

    def _summary_scores(self, feature: int) -> list[Any]:
        """Summary columns 6..10: explanation, detection AUROC, fuzzing AUROC, specificity, taxonomy."""
        e = self._row_of(self.tables.explanations, feature)
        model = next((r for r in self._rows_of(self.tables.autointerp_scores, feature) if r["kind"] == "model"), {})
        t = self._row_of(self.tables.token_scores, feature)
        return [e["explanation"] if e else "", _round_or_none(model.get("detection_auroc")),
                _round_or_none(model.get("fuzzing_auroc")), _round_or_none(model.get("specificity")),
                t["taxonomy"] if t else ""]

    # -- the SAE folder ---------------------------------------------------------------------------
    def write_into(self, out: Path, progress: bool = True, ray: str | None = None) -> dict[str, Any]:
        """Write this SAE's folder into ``out`` (a fresh staging folder); returns its about.json.
        ``ray``: write the feature pages in parallel batches on a Ray cluster ("local" starts one)."""
        features = self.tables.feature_ids()
        n_features = int(features[-1]) + 1 if len(features) else 0
        (out / "f").mkdir(parents=True)
        if ray is None:
            self._write_feature_pages(out, features, n_features, progress)
        else:
            self._write_feature_pages_on_ray(out, features, n_features, progress, ray)
        summary_files = self._write_summary(out, features)
        has_map = self._write_map(out)
        about = self._about(features, n_features, has_map)
        (out / "sae.js").write_text("window.SAECORE_SAE=" + _script_json(self._sae_data(about, out)) + ";\n")
        (out / "index.html").write_text(_fill(
            _template("sae_index.html"),
            TITLE=_html_escape(f"{self.sae} · saecore features"),
            SCRIPTS="\n".join(f'<script src="{p}"></script>' for p in (["map.js"] if has_map else [])),
            CHUNKS=_script_json(summary_files),
        ))
        (out / "about.json").write_text(json.dumps(about, indent=2))
        return about

    def _write_feature_pages(self, out: Path, features: np.ndarray, n_features: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        template = _template("feature.html")
        bar = tqdm(total=len(features), desc=f"pages {self.sae}", unit="feature", disable=not progress)
        for start in range(0, len(features), FEATURE_BATCH):
            batch = [int(f) for f in features[start:start + FEATURE_BATCH]]
            rows: list[int] = []
            for f in batch:
                rows += [e.row for e in self._examples(self.tables.topk, f, "rank", MAX_TOP_EXAMPLES)]
                rows += [e.row for exs in self._samples_by_bin(f).values() for e in exs]
            self.context.prefetch(rows)
            for f in batch:
                data = self.feature_data(f, n_features)
                path = out / feature_href(f)
                path.parent.mkdir(exist_ok=True)
                path.write_text(_fill(
                    template,
                    TITLE=_html_escape(f"{self.sae} · feature {f}"),
                    DATA=_script_json(data),
                ), encoding="utf-8")
            bar.update(len(batch))
        bar.close()

    def _write_feature_pages_on_ray(self, out: Path, features: np.ndarray, n_features: int, progress: bool,
                                    address: str) -> None:
        """The feature pages written by Ray tasks, a contiguous batch of features each (about four per
        CPU); each task rebuilds this SAE's tables and readers from the run, so pages are the same bytes."""
        from tqdm.auto import tqdm

        from . import cluster

        ray = cluster.connect(None if address == "local" else address)
        tasks = max(1, min(len(features), 4 * int(ray.cluster_resources().get("CPU", 1))))
        batches = [b for b in np.array_split(features, tasks) if len(b)]
        remote = ray.remote(num_cpus=1, max_retries=cluster.TASK_RETRIES)(_feature_pages_task)
        build = (str(self.run.resolve()), self.sae, self.tokens.tokenizer, self.lookup_mode, self.linkable_saes)
        refs = {remote.remote(build, str(out.resolve()), b, n_features): len(b) for b in batches}
        with tqdm(total=len(features), desc=f"pages {self.sae} (ray)", unit="feature", disable=not progress) as bar:
            for top_tokens, done in cluster.gather(ray, refs):
                self.summary_top_tokens.update(top_tokens)
                bar.update(done)

    def _write_summary(self, out: Path, features: np.ndarray) -> list[str]:
        """Compact rows [feature, count, density, max, mean_nonzero, top tokens, explanation, detection AUROC,
        fuzzing AUROC, specificity, taxonomy] in chunk files."""
        (out / "summary").mkdir()
        stats = self.tables.stats
        names = []
        for k, start in enumerate(range(0, max(len(features), 1), SUMMARY_CHUNK)):
            rows = []
            for f in features[start:start + SUMMARY_CHUNK]:
                f = int(f)
                st = self._stats(f) if stats is not None else None
                rows.append([f, st["count"] if st else None, st["density"] if st else None,
                             st["max"] if st else None, st["mean_nonzero"] if st else None,
                             self.summary_top_tokens.get(f, ""), *self._summary_scores(f)])
            name = f"summary/{k:04d}.js"
            (out / name).write_text("(window.SAECORE_SUMMARY=window.SAECORE_SUMMARY||[]).push("
                                    + _script_json(rows) + ");\n", encoding="utf-8")
            names.append(name)
        return names

    def _write_map(self, out: Path) -> bool:
        m = self.tables.map
        if m is None or len(m["feature"]) == 0:
            return False
        saes = sorted({str(s) for s in m["sae"]})
        sae_index = {s: i for i, s in enumerate(saes)}
        links = {s: (s == self.sae or s in self.linkable_saes) for s in saes}
        data = {
            "sae": self.sae,
            "saes": saes,
            "linked": [links[s] for s in saes],
            "f": m["feature"].astype(int).tolist(),
            "s": [sae_index[str(s)] for s in m["sae"]],
            "x": [_round(v) for v in m["x"]],
            "y": [_round(v) for v in m["y"]],
            "per_folder": FEATURES_PER_FOLDER,
        }
        (out / "map.js").write_text("window.SAECORE_MAP=" + _script_json(data) + ";\n", encoding="utf-8")
        return True

    def _about(self, features: np.ndarray, n_features: int, has_map: bool) -> dict[str, Any]:
        stats = self.tables.stats
        alive = int((stats.columns["count"] > 0).sum()) if stats is not None else None
        present = self.tables.present()
        return {"format": PAGES_FORMAT, "sae": self.sae, "n_features": n_features, "pages": len(features),
                "alive": alive, "model": self.model, "tables": present, "map": has_map,
                "n_tokens": self.tables.meta.get("n_tokens"), "per_folder": FEATURES_PER_FOLDER}

    def _saebench(self, out: Path) -> dict[str, Any] | None:
        """The SAE's SAEBench summary (``saecore eval --suite``), its plot copied beside the page."""
        sae_dir = Run(self.run).sae(self.sae)
        if not saebench_summary(sae_dir).is_file():
            return None
        plot = saebench_plot(sae_dir)
        if plot.is_file():
            (out / SAEBENCH_PLOT).write_bytes(plot.read_bytes())
        return {"metrics": json.loads(saebench_summary(sae_dir).read_text()), "plot": SAEBENCH_PLOT if plot.is_file() else None}

    def _sae_data(self, about: dict[str, Any], out: Path) -> dict[str, Any]:
        dh = self.tables.density_histogram
        summary_path = self.tables.index_dir / AUTOINTERP_SUMMARY_FILE
        autointerp = read_json_object(summary_path) if summary_path.exists() else None
        return {**about, "saebench": self._saebench(out), "autointerp": _json_safe(autointerp),
                "density_histogram": None if dh is None else [
                    [float(a), float(b), int(c)] for a, b, c in zip(dh["lo_log10"], dh["hi_log10"], dh["count"])],
                "tokens": "text" if self.tokens.available else "ids"}


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python value JSON writes."""
    return value.item() if isinstance(value, np.generic) else value


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (the page data is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _round_or_none(value: Any) -> float | None:
    return None if value is None else _round(value, 3)


def _html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# --------------------------------------------------------------------------------------------------
# The whole site
# --------------------------------------------------------------------------------------------------
def _write_assets(pages: Path) -> None:
    src = resources.files("saecore.page_assets")
    with publish_dir(pages / "assets") as staging:
        for name in ASSET_FILES:
            (staging / name).write_bytes(src.joinpath(name).read_bytes())


def _write_root_index(pages: Path) -> None:
    abouts = []
    for d in sorted(p for p in pages.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / "about.json").exists():
            abouts.append(json.loads((d / "about.json").read_text()))
    items = []
    for a in abouts:
        alive = "" if a.get("alive") is None else f" · {a['alive']:,} alive"
        name = _html_escape(a["sae"])
        items.append(f'<li><a href="{name}/index.html">{name}</a> <span class="muted">{a["n_features"]:,} features'
                     f'{alive}{" · map" if a.get("map") else ""}</span></li>')
    body = "\n".join(items) or "<li>No SAE has an index yet: run <code>saecore index</code>.</li>"
    write_text(pages / PAGES_INDEX_FILE, _fill(_template("root_index.html"), ITEMS=body))


def available_saes(run: Path) -> list[str]:
    """SAE names with an index folder in the run."""
    return Run(run).indexed_saes()


def build_pages(
    run: str | os.PathLike[str],
    saes: Sequence[str] | None = None,
    tokenizer: Any | None = None,
    load_model_tokenizer: bool = True,
    activations: Callable[[str, int], tuple[np.ndarray, np.ndarray] | None] | None | str = "auto",
    progress: bool = True,
    ray: str | None = None,
) -> Path:
    """Write ``RUN/pages/`` for the SAEs in ``RUN/index/`` (or only ``saes``); returns pages/index.html.

    ``tokenizer`` decodes token ids for display; when None, the tokenizer of the activation store's
    model is loaded (``load_model_tokenizer``), and without one the pages show token ids.
    ``activations(sae, feature) -> (rows, values) | None`` gives every activation of a feature, to shade
    each token of an example's window (None: not known for this SAE); "auto" reads the SAE's feature store, None shades only the
    activations the index tables recorded. ``ray`` writes the feature pages in parallel batches on a Ray
    cluster (an address, or "local" to start one); the pages are the same bytes.
    """
    run = Path(run)
    layout = Run(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no run directory here")
    names = list(saes) if saes else layout.indexed_saes()
    if not names:
        raise FileNotFoundError(f"{layout.index_root}: no SAE index found; run 'saecore index' first")
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"{name!r} is not an SAE name (a folder name under {layout.index_root})")
        if not layout.index(name).is_dir():
            raise FileNotFoundError(f"{layout.index(name)}: no index for SAE {name!r} "
                                    f"(have: {', '.join(layout.indexed_saes()) or 'none'})")
    pages = layout.pages
    pages.mkdir(exist_ok=True)
    linkable = set(layout.indexed_saes()) | {p.name for p in pages.iterdir() if (p / "about.json").exists()}
    _write_assets(pages)
    token_text: TokenText | None = TokenText(tokenizer) if tokenizer is not None else None
    for name in names:
        build = _sae_build(run, name, token_text, load_model_tokenizer, activations, linkable)
        token_text = build.tokens
        with publish_dir(pages / name) as staging:  # on error the old pages of this SAE stay as they were
            build.write_into(staging, progress=progress, ray=ray)
    _write_root_index(pages)
    return pages / PAGES_INDEX_FILE


def _sae_build(run: Path, name: str, token_text: TokenText | None, load_model_tokenizer: bool, activations: Any,
               linkable: set[str]) -> SaeBuild:
    """One SAE's page writer: its index tables, activation store, tokenizer and activation lookup."""
    layout = Run(run)
    loaded = IndexTables.load(layout.index(name))
    store = open_activation_store(run, loaded.meta)
    model = str(store.attrs.get("model", "")) if store is not None else ""
    if token_text is None:
        token_text = TokenText(load_tokenizer(model) if (load_model_tokenizer and store is not None) else None)
    if activations == "auto":
        lookup, note = feature_activation_lookup(run, layout.index(name), loaded.meta)
    elif activations is None:
        lookup, note = None, "no feature store given"
    else:
        lookup, note = _bound_lookup(activations, name), ""
    return SaeBuild(run, loaded, token_text, ContextReader(store, CONTEXT_BEFORE, CONTEXT_AFTER), lookup, note,
                    linkable, model, lookup_mode=activations)


def _feature_pages_task(build: tuple[Any, ...], out: str, features: np.ndarray, n_features: int) -> tuple[dict[int, str], int]:
    """A Ray task of ``pages --ray``: one batch of feature pages; returns their summary top tokens."""
    run, name, tokenizer, activations, linkable = build
    sae = _sae_build(Path(run), name, TokenText(tokenizer), False, activations, linkable)
    sae._write_feature_pages(Path(out), features, n_features, progress=False)
    return sae.summary_top_tokens, len(features)


# --------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------
def make_server(pages: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``pages`` bound to 127.0.0.1 only (port 0 picks a free port)."""
    handler = functools.partial(_QuietHandler, directory=str(pages))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def list_directory(self, path: str | os.PathLike[str]) -> Any:
        # Only folders with an index.html are pages (served by the base class before it gets here);
        # a listing would expose whatever else lies in pages/.
        self.send_error(404, "No page here")
        return None


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
@dataclass
class PagesConfig:
    """Options of ``saecore pages`` (the run directory aside)."""

    sae: list[str] | None = option(None, append=True)
    """Only this SAE; unset: every indexed SAE."""

    tokenizer: bool = option(True, flag="--no-tokenizer")
    """Load the model's tokenizer to show text (--no-tokenizer shows token ids)."""

    ray: str | None = option(None, const="local", metavar="ADDRESS")
    """Write the feature pages on a Ray cluster: join ADDRESS (HOST:PORT, auto, ray://…), or start a local one when no address is given."""


@dataclass
class ServeConfig:
    """Options of ``saecore serve`` (the run directory aside)."""

    port: int = option(8000, ge=0, le=65535)
    """Port on 127.0.0.1 (0 picks a free one)."""

    def __post_init__(self) -> None:
        validate(self)


def cli_configure_pages(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory (holds index/SAE/ tables)")
    add_arguments(parser, PagesConfig)


def cli_run_pages(args: argparse.Namespace) -> int:
    cfg = from_args(PagesConfig, args)
    root = build_pages(args.run, saes=cfg.sae, load_model_tokenizer=cfg.tokenizer, ray=cfg.ray)
    print(f"feature pages written; open file://{root.resolve()}")
    return 0


def cli_configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory (its pages/ are served; built first if absent)")
    add_arguments(parser, ServeConfig)


def cli_run_serve(args: argparse.Namespace) -> int:
    pages = Run(args.run).pages
    if not (pages / PAGES_INDEX_FILE).exists():
        build_pages(args.run)
    server = make_server(pages, from_args(ServeConfig, args).port)
    print(f"serving {pages} at http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
