"""The text a language model reads about a feature: decoded contexts from the index, split by document.

**The split.** Whole documents are divided between the explainer and the scorers, by the same rule as
:mod:`saecore.token_scores`: a document is *held out* (scoring side) iff
``(mix64(seed ^ doc_id) >> 11) · 2⁻⁵³ < held_out_fraction``. The explainer reads only examples from the
other documents, so no scored context — nor any other token of its document — was ever in an
explanation prompt. The rule depends only on the document id, so it holds for every feature at once.

* explainer: the feature's top-k examples on the explain side (strongest first), filled up with its
  explain-side quantile samples (strongest first) when fewer than ``n``;
* activating scoring contexts: held-out quantile samples, up to ``per_bin`` from every activation bin
  (spread over the bin's values);
* non-activating contexts: windows around seeded random rows of the activation store in which the
  feature does not fire on any token (checked against the feature store's feature-major copy).

A context is a same-document window of ``before`` + 1 + ``after`` tokens around its row, with the
feature's activation on each token (from the feature store; without one, only the centre is known).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tables
from .activations import ActivationStore
from .features import FeatureStore
from .index import ContextReader, Example, load_tokenizer
from .run import Run

NEGATIVE_BIN = -1
"""The ``bin`` of a context where the feature is silent."""
TOP_BIN = -2
"""The ``bin`` of a top-k example (the explainer's)."""


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (the same mix as the Rust core's document split)."""
    z = np.asarray(z, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def held_out(doc_ids: Any, held_out_fraction: float, seed: int) -> np.ndarray:
    """Whether each document is on the scoring side (rule in the module docstring)."""
    docs = np.asarray(doc_ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        u = (mix64(docs ^ np.uint64(seed)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u < held_out_fraction


@dataclass
class Context:
    """One window of text around a row, with the feature's activation on each token."""

    feature: int
    row: int
    doc_id: int
    value: float
    """The feature's activation on the centre token (0 for a non-activating context)."""
    bin: int
    """Quantile-sample bin, :data:`TOP_BIN` for a top-k example, :data:`NEGATIVE_BIN` when silent."""
    tokens: list[str] = field(default_factory=list)
    acts: list[float] = field(default_factory=list)
    centre: int = 0

    def marked(self, threshold: float) -> list[int]:
        """Tokens to mark: those with activation >= ``threshold``, and the centre of an activating context."""
        out = {i for i, a in enumerate(self.acts) if a > 0 and a >= threshold}
        if self.value > 0:
            out.add(self.centre)
        return sorted(out)

    def render(self, marks: list[int] | set[int] = ()) -> str:
        """The window as one line of text, the tokens in ``marks`` wrapped in ``<<`` ``>>``."""
        marks = set(marks)
        pieces = [f"<<{t}>>" if i in marks else t for i, t in enumerate(self.tokens)]
        return " ".join("".join(pieces).split())  # newlines and runs of spaces: one space


@dataclass
class Selection:
    """Rows chosen for one feature before their windows are read."""

    explain: list[Example]
    scoring: list[Example]
    negative_rows: list[int]


class ContextSource:
    """Reads one SAE's index, activation store and feature store, and builds :class:`Context` windows."""

    def __init__(self, run: str | os.PathLike[str], sae: str, before: int = 12, after: int = 4, tokenizer: Any = None):
        self.run = Run(run)
        self.index_dir = self.run.index(sae)
        self.meta = tables.read_meta(self.index_dir)
        self.d_sae = int(self.meta["d_sae"])
        store_path = _existing(self.meta.get("activation_store"), self.run.activations)
        if store_path is None:
            raise FileNotFoundError(f"{self.index_dir}: its activation store is missing; the contexts need its tokens")
        self.store = ActivationStore(store_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(self.store.attrs.get("model", "")))
        fs_path = _existing(self.meta.get("feature_store"), self.run.features(sae))
        self.features = FeatureStore(fs_path) if fs_path is not None else None
        if self.features is not None and not (self.features.complete and self.features.has_csc):
            self.features = None
        self.reader = ContextReader(self.store, before, after)
        self.stats = tables.STATS.read(self.index_dir)
        self.topk = tables.TOPK.read(self.index_dir)
        self.samples = tables.SAMPLES.read(self.index_dir)
        if self.stats is None or self.topk is None or self.samples is None:
            raise FileNotFoundError(f"{self.index_dir}: stats, topk or samples table missing; rerun `saecore index`")
        self._max = self.stats.column("max").to_numpy()
        self._count = self.stats.column("count").to_numpy()
        self._text: dict[int, str] = {}

    def max_activation(self, feature: int) -> float:
        return float(self._max[feature])

    def count(self, feature: int) -> int:
        return int(self._count[feature])

    def check_feature(self, feature: int) -> int:
        if not 0 <= int(feature) < self.d_sae:
            raise ValueError(f"feature id {feature} outside the valid range 0..{self.d_sae - 1} (d_sae={self.d_sae})")
        return int(feature)

    def feature_rows(self, feature: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Every activation (sorted rows, values) of ``feature``; None without a feature store."""
        if self.features is None:
            return None
        got = self.features.activations(int(feature))
        rows = np.asarray(got.rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        return rows[order], np.asarray(got.values, dtype=np.float32)[order]

    def select(self, feature: int, *, n_explain: int, per_bin: int, n_negative: int,
               held_out_fraction: float, seed: int, firing: tuple[np.ndarray, np.ndarray] | None) -> Selection:
        """The rows of one feature's explainer examples, scoring samples and non-activating candidates."""
        top = _examples(self.topk, feature, "rank")
        samples = _examples(self.samples, feature, "bin")
        top_side = held_out([e.doc_id for e in top], held_out_fraction, seed)
        sample_side = held_out([e.doc_id for e in samples], held_out_fraction, seed)
        explain = [e for e, h in zip(top, top_side) if not h]
        seen = {e.row for e in explain}
        spare = sorted((e for e, h in zip(samples, sample_side) if not h and e.row not in seen), key=lambda e: -e.value)
        explain = (explain + spare)[:n_explain]
        scoring = _spread_per_bin([e for e, h in zip(samples, sample_side) if h], per_bin)
        negatives = self._negative_rows(feature, n_negative, seed, firing)
        return Selection(explain, scoring, negatives)

    def _negative_rows(self, feature: int, n: int, seed: int, firing: tuple[np.ndarray, np.ndarray] | None) -> list[int]:
        """Up to 3n seeded random rows whose whole window (either side) holds no activation of ``feature``."""
        if n == 0 or self.store.num_rows == 0:
            return []
        rng = np.random.default_rng([seed, feature, 1])
        cand = rng.choice(self.store.num_rows, size=min(self.store.num_rows, 8 * n), replace=False).astype(np.int64)
        if firing is not None and len(firing[0]):
            rows = firing[0]
            lo = np.searchsorted(rows, cand - self.reader.before, "left")
            hi = np.searchsorted(rows, cand + self.reader.after, "right")
            cand = cand[lo == hi]
        else:  # no feature store: only the rows the index recorded are known to fire
            known = np.concatenate([_examples_rows(self.topk, feature), _examples_rows(self.samples, feature)])
            cand = cand[~np.isin(cand, known)]
        return cand[: 3 * n].tolist()

    def contexts(self, feature: int, examples: list[Example], bin_of: Any,
                 firing: tuple[np.ndarray, np.ndarray] | None) -> list[Context]:
        """Windows of ``examples`` (prefetched), each token's activation filled in from ``firing``."""
        out = []
        for ex in examples:
            window = self.reader.window(ex, str(self.index_dir))
            assert window is not None  # the reader has a store
            rows, ids, centre = window
            acts = _lookup(firing, rows)
            acts[centre] = ex.value
            out.append(Context(feature, ex.row, ex.doc_id, ex.value, bin_of(ex), [self.text(int(t)) for t in ids],
                               acts.tolist(), centre))
        return out

    def negative_examples_for(self, candidates: dict[int, list[int]], n: int) -> dict[int, list[Example]]:
        """Examples (value 0) of the first ``n`` candidate rows of each feature (one read of their doc ids)."""
        flat = np.asarray([r for rows in candidates.values() for r in rows[:n]], dtype=np.int64)
        if not len(flat):
            return {f: [] for f in candidates}
        docs = np.asarray(self.store.doc_ids.get_coordinate_selection(flat), dtype=np.int64)
        pos = np.asarray(self.store.positions.get_coordinate_selection(flat), dtype=np.int64)
        out, at = {}, 0
        for f, rows in candidates.items():
            k = len(rows[:n])
            out[f] = [Example(feature=f, row=int(flat[i]), doc_id=int(docs[i]), position=int(pos[i]), value=0.0)
                      for i in range(at, at + k)]
            at += k
        return out

    def text(self, token_id: int) -> str:
        t = self._text.get(token_id)
        if t is None:
            t = self._text[token_id] = self.tokenizer.decode([token_id])
        return t


def _existing(recorded: Any, fallback: Path) -> Path | None:
    for p in (Path(recorded) if isinstance(recorded, str) and recorded else None, fallback):
        if p is not None and p.exists():
            return p
    return None


def _examples(table: Any, feature: int, key: str) -> list[Example]:
    rows = tables.feature_rows(table, feature).to_pydict()
    return [Example(feature=feature, row=int(rows["row"][i]), doc_id=int(rows["doc_id"][i]),
                    position=int(rows["position"][i]), value=float(rows["value"][i]), **{key: int(rows[key][i])})
            for i in range(len(rows["row"]))]


def _examples_rows(table: Any, feature: int) -> np.ndarray:
    return tables.feature_rows(table, feature).column("row").to_numpy().astype(np.int64)


def _spread_per_bin(examples: list[Example], per_bin: int) -> list[Example]:
    """Up to ``per_bin`` examples of every bin, spread evenly over the bin's values (strongest bin first)."""
    by_bin: dict[int, list[Example]] = {}
    for e in examples:
        by_bin.setdefault(int(e.bin or 0), []).append(e)
    out = []
    for b in sorted(by_bin, reverse=True):
        exs = sorted(by_bin[b], key=lambda e: (-e.value, e.row))
        pick = np.unique(np.linspace(0, len(exs) - 1, min(per_bin, len(exs))).round().astype(int))
        out += [exs[i] for i in pick]
    return out


def _lookup(firing: tuple[np.ndarray, np.ndarray] | None, rows: np.ndarray) -> np.ndarray:
    """The feature's activation on each of ``rows`` (0 where it is silent or unknown)."""
    out = np.zeros(len(rows), dtype=np.float64)
    if firing is None or not len(firing[0]):
        return out
    frows, fvals = firing
    idx = np.minimum(np.searchsorted(frows, rows), len(frows) - 1)
    hit = frows[idx] == rows
    out[hit] = fvals[idx[hit]]
    return out
