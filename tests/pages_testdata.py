"""A small synthetic run for the feature-page tests: a real activation store, a real (word-level)
tokenizer, and index tables computed with NumPy from a known dense feature-activation matrix, in
exactly the schemas of the shared interfaces (#4 index, #5 geometry, #6 logit lens)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from saecore import tables
from saecore.activations import ActivationStoreWriter

WORDS = [" the", " a", " river", " bridge", " gate", " golden", " city", " of", " and", " water",
         " tower", " red", " car", " road", " <tag>", "\n", " walk", " over", " under", " big"]
SAE = "sae_a"
OTHER = "sae_b"
N_FEATURES = 8
DEAD = 7
BRIDGE = 3  # fires on " bridge" strongly and on the token after it weakly
DOCS, DOC_LEN = 3, 40
TOP_K = 5
HOOK = "blocks.0.hook_resid_post"


def word_tokenizer():
    """A real Hugging Face fast tokenizer over WORDS (word-level model, no network)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["[UNK]"] = len(vocab)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]")


@dataclass
class SyntheticRun:
    run: Path
    token_ids: np.ndarray  # [N]
    doc_ids: np.ndarray
    positions: np.ndarray
    acts: np.ndarray  # [N, N_FEATURES] the ground-truth feature activations

    def activations(self, sae: str, feature: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Every activation of a feature of sae_a (what a feature-major store would return)."""
        if sae != SAE:
            return None
        rows = np.flatnonzero(self.acts[:, feature] > 0)
        return rows, self.acts[rows, feature]


def _corpus(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    toks, docs, pos = [], [], []
    for d in range(DOCS):
        words = rng.integers(0, len(WORDS), size=DOC_LEN)
        words[words == WORDS.index(" bridge")] = WORDS.index(" road")
        for p in (5 + 7 * d, 20 + d, 33):  # " bridge" at known places, followed by " gate"
            words[p], words[p + 1] = WORDS.index(" bridge"), WORDS.index(" gate")
        # Position 0 (a BOS) is excluded from the store, as a harvest does: row != doc * DOC_LEN + position.
        for p in range(1, DOC_LEN):
            toks.append(words[p]); docs.append(d); pos.append(p)
    return np.array(toks, np.int32), np.array(docs, np.int64), np.array(pos, np.int32)


def _feature_acts(rng: np.random.Generator, toks: np.ndarray) -> np.ndarray:
    n = len(toks)
    acts = np.zeros((n, N_FEATURES), np.float32)
    bridge = np.flatnonzero(toks == WORDS.index(" bridge"))
    acts[bridge, BRIDGE] = 4.0 + np.arange(len(bridge), dtype=np.float32) * 0.25
    acts[bridge + 1, BRIDGE] = 0.5  # the " gate" after it
    for f in range(N_FEATURES):
        if f in (BRIDGE, DEAD):
            continue
        fires = rng.random(n) < 0.05 + 0.04 * f
        acts[fires, f] = rng.gamma(2.0, 0.5 + 0.2 * f, size=int(fires.sum())).astype(np.float32) + 0.01
    return acts


def _table(path: Path, columns: dict[str, tuple[list | np.ndarray, pa.DataType]]) -> None:
    pq.write_table(pa.table({k: pa.array(list(v), type=t) for k, (v, t) in columns.items()}), path)


def write_store(run: Path, toks: np.ndarray, docs: np.ndarray, pos: np.ndarray, model: str = "synthetic-words",
                chunk_rows: int = 16) -> None:
    spec = {"model": model, "hooks": [HOOK], "dtype": "float32", "context_length": DOC_LEN}
    writer = ActivationStoreWriter.open(run / "activations.zarr", spec, {HOOK: 4}, capacity_rows=len(toks), chunk_rows=chunk_rows)
    x = np.random.default_rng(1).normal(size=(len(toks), 4)).astype(np.float32)
    writer.append({HOOK: x}, toks, docs, pos)
    writer.finish()


def write_index(index: Path, acts: np.ndarray, docs: np.ndarray, pos: np.ndarray, full: bool = True) -> None:
    """Reference index tables from a dense activation matrix (NumPy, the definitions of interface #4)."""
    index.mkdir(parents=True)
    n, f_count = acts.shape
    u4, u8, u2, f4, f8, i8, i4 = pa.uint32(), pa.uint64(), pa.uint16(), pa.float32(), pa.float64(), pa.int64(), pa.int32()
    count = (acts > 0).sum(0)
    sums = acts.astype(np.float64).sum(0)
    _table(index / "stats.parquet", {
        "feature": (np.arange(f_count), u4), "count": (count, u8), "density": (count / n, f8), "sum": (sums, f8),
        "max": (acts.max(0), f4), "mean_nonzero": (np.where(count > 0, sums / np.maximum(count, 1), 0.0), f8)})
    top = {k: [] for k in ("feature", "rank", "row", "doc_id", "position", "value")}
    for f in range(f_count):
        rows = [r for r in np.argsort(-acts[:, f], kind="stable")[:TOP_K] if acts[r, f] > 0]
        for rank, r in enumerate(rows):
            for k, v in zip(top, (f, rank, r, docs[r], pos[r], acts[r, f])):
                top[k].append(v)
    _table(index / "topk.parquet", {k: (v, t) for (k, v), t in zip(top.items(), (u4, u2, u8, i8, i4, f4))})
    meta = {"format": tables.INDEX_FORMAT, "activation_store": "activations.zarr", "n_tokens": n, "k": TOP_K,
            "d_sae": f_count, "n_bins": 4}
    if not full:
        _seal(index, meta)
        return
    hist = {k: [] for k in ("feature", "bin", "lo", "hi", "count")}
    samp = {k: [] for k in ("feature", "bin", "row", "doc_id", "position", "value")}
    for f in range(f_count):
        nz = np.flatnonzero(acts[:, f] > 0)
        if not len(nz):
            continue
        edges = np.geomspace(acts[nz, f].min(), acts[nz, f].max() * 1.0001, 5)
        which = np.clip(np.searchsorted(edges, acts[nz, f], side="right") - 1, 0, 3)
        for b in range(4):
            hist["feature"].append(f); hist["bin"].append(b); hist["lo"].append(edges[b]); hist["hi"].append(edges[b + 1])
            hist["count"].append(int((which == b).sum()))
            for r in nz[which == b][:3]:
                for k, v in zip(samp, (f, b, r, docs[r], pos[r], acts[r, f])):
                    samp[k].append(v)
    _table(index / "histograms.parquet", {k: (v, t) for (k, v), t in zip(hist.items(), (u4, u2, f4, f4, u8))})
    _table(index / "samples.parquet", {k: (v, t) for (k, v), t in zip(samp.items(), (u4, u2, u8, i8, i4, f4))})
    dens = np.log10(count[count > 0] / n)
    edges = np.linspace(dens.min() - 0.1, dens.max() + 0.1, 6)
    # As `saecore index` writes it: a first bin with edges -inf holds the features that never fire.
    lo = np.concatenate([[-np.inf], edges[:-1]])
    hi = np.concatenate([[-np.inf], edges[1:]])
    dead_and_live = np.concatenate([[int((count == 0).sum())], np.histogram(dens, edges)[0]])
    _table(index / "density_histogram.parquet", {"lo_log10": (lo, f8), "hi_log10": (hi, f8),
                                                  "count": (dead_and_live, u8)})
    _seal(index, meta)


def reseal(index: Path) -> None:
    """Record the tables' current sha256 in meta.json, as if `saecore index` had written them as they are now
    (for tests of the checks behind the checksum: schema, values, provenance)."""
    meta = json.loads((index / "meta.json").read_text())
    _seal(index, {k: v for k, v in meta.items() if k not in (tables.META_TABLES_KEY, tables.META_DIGEST_KEY)})


def _seal(index: Path, meta: dict) -> None:
    """meta.json as `saecore index` writes it: with the sha256 of each mined table present, and its own."""
    written = {spec.file: spec.path(index) for spec in tables.ALL if spec.mined and spec.path(index).exists()}
    (index / "meta.json").write_text(json.dumps(tables.seal_meta(meta, written)))


def write_geometry(index: Path) -> None:
    """neighbours (within sae_a and across to sae_b), map, enc_dec_cosine and logit_lens tables."""
    u4, u2, f4 = pa.uint32(), pa.uint16(), pa.float32()
    nb = {k: [] for k in ("feature", "rank", "other_sae", "neighbour", "cosine")}
    for f in range(N_FEATURES):
        for rank, (other, n, c) in enumerate([(SAE, (f + 1) % N_FEATURES, 0.8), (SAE, (f + 2) % N_FEATURES, 0.6),
                                              (OTHER, f // 2, 0.7)]):
            for k, v in zip(nb, (f, rank, other, n, c - 0.01 * f)):
                nb[k].append(v)
    _table(index / "neighbours.parquet", {k: (v, t) for (k, v), t in zip(nb.items(), (u4, u2, pa.string(), u4, f4))})
    angles = np.arange(N_FEATURES) / N_FEATURES * 2 * np.pi
    feats = list(range(N_FEATURES)) + list(range(4))
    _table(index / "map.parquet", {
        "feature": (feats, u4), "sae": ([SAE] * N_FEATURES + [OTHER] * 4, pa.string()),
        "x": (np.concatenate([np.cos(angles), np.linspace(-0.5, 0.5, 4)]), f4),
        "y": (np.concatenate([np.sin(angles), np.zeros(4)]), f4)})
    _table(index / "enc_dec_cosine.parquet", {"feature": (range(N_FEATURES), u4),
                                              "cosine": (0.9 - 0.05 * np.arange(N_FEATURES), f4)})
    ll = {k: [] for k in ("feature", "kind", "rank", "token_id", "token", "value")}
    for f in range(N_FEATURES):
        for kind, sign in (("promote", 1), ("suppress", -1)):
            for rank in range(3):
                tid = (f * 3 + rank + (0 if sign > 0 else 10)) % len(WORDS)
                for k, v in zip(ll, (f, kind, rank, tid, WORDS[tid], sign * (3.0 - rank))):
                    ll[k].append(v)
    _table(index / "logit_lens.parquet", {k: (v, t) for (k, v), t in zip(ll.items(), (u4, pa.string(), u2, u4, pa.string(), f4))})
    for spec in (tables.NEIGHBOURS, tables.MAP, tables.ENC_DEC_COSINE, tables.LOGIT_LENS):
        tables.seal_file(spec.path(index))  # as the verbs that write them do


def make_run(root: Path, geometry: bool = True, model: str = "synthetic-words") -> SyntheticRun:
    """runs/NAME with an activation store, a full index of sae_a (+ geometry) and a minimal one of sae_b."""
    rng = np.random.default_rng(0)
    run = root / "run"
    toks, docs, pos = _corpus(rng)
    acts = _feature_acts(rng, toks)
    write_store(run, toks, docs, pos, model)
    write_index(run / "index" / SAE, acts, docs, pos)
    if geometry:
        write_geometry(run / "index" / SAE)
    other = np.zeros((len(toks), 4), np.float32)
    other[toks == WORDS.index(" gate"), 2] = 2.0
    other[toks == WORDS.index(" river"), 1] = 1.5
    write_index(run / "index" / OTHER, other, docs, pos, full=False)
    return SyntheticRun(run, toks, docs, pos, acts)
