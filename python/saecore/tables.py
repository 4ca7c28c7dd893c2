"""The index tables: one schema and one reader per table.

Every table under ``runs/NAME/index/SAE/`` is declared once here, as a :class:`TableSpec`: its file, its
columns and their Arrow types, and the order of one feature's rows. Writers build their table through
:meth:`TableSpec.table` (so what is written is exactly the declared schema) and every reader — the
pages, the interventions, the logit lens, the quick start, :class:`saecore.index.FeatureIndex` — goes
through :meth:`TableSpec.read`, which checks the columns and refuses a half-written index.

Completeness and integrity. ``saecore index`` writes a whole new index folder aside and swaps it in
(:func:`saecore._atomic.publish_dir`), so a reader sees the old index or the new one, never a mix. The
tables it mines (stats, histograms, topk, samples, density_histogram) are read only from a folder with
``meta.json``, which records each one's sha256 (``tables``) and its own (``sha256``, over the rest of
the JSON); every read checks both and reports a mismatch as :class:`CorruptDataError` naming the file.
The other tables are written by their own verbs, each atomically (aside, then renamed), so a present
file is complete, with its sha256 in ``FILE.sha256`` beside it (:meth:`TableSpec.write`,
:func:`seal_file`); every read checks it, so a damaged or unsealed table is reported, never read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import _atomic
from . import run as layout
from ._atomic import read_json_object
from ._digest import file_sha256, json_sha256
from .errors import CorruptDataError, MissingDataError

INDEX_FORMAT = "saecore.index/2"
"""``meta.json``'s ``format``: the layout of the mined tables below, with their sha256 digests."""
META_TABLES_KEY = "tables"
"""``meta.json`` key: file name → sha256 of each mined table."""
META_DIGEST_KEY = "sha256"
"""``meta.json`` key: sha256 of the rest of ``meta.json`` in canonical form (:func:`seal_meta`)."""


@dataclass(frozen=True)
class TableSpec:
    """One index table: file name, schema, and how one feature's rows are ordered."""

    name: str
    """Short name (also the attribute name in :class:`saecore.pages.IndexTables`)."""
    file: str
    """File name inside ``index/SAE/``."""
    schema: pa.Schema
    """Columns and types, in the order written."""
    order: tuple[str, ...] = ()
    """Within one feature, the columns its rows are sorted by when read."""
    mined: bool = False
    """Written by ``saecore index``, so complete only with ``meta.json`` beside it."""
    neg_inf_ok: tuple[str, ...] = ()
    """Float columns where -inf is a value (log10 of a zero density), not corruption."""
    nan_ok: tuple[str, ...] = ()
    """Float columns where NaN is a value (a score that is undefined for this feature), not corruption."""

    def path(self, index_dir: str | os.PathLike[str]) -> Path:
        return Path(index_dir) / self.file

    def table(self, columns: Mapping[str, Any]) -> pa.Table:
        """The table a writer writes: exactly the declared columns, in order, with the declared types."""
        missing = [c for c in self.schema.names if c not in columns]
        if missing:
            raise ValueError(f"{self.name} table: missing column(s) {missing}")
        return pa.table({c: columns[c] for c in self.schema.names}).cast(self.schema)

    def write(self, table: pa.Table, path: str | os.PathLike[str]) -> Path:
        """Write a table of this kind (not a mined one: ``saecore index`` seals those in ``meta.json``)
        atomically, with its sha256 beside it."""
        if table.schema.remove_metadata() != self.schema:
            raise ValueError(f"{path}: a {self.name} table has schema {self.schema}, not {table.schema}")
        _atomic.write_parquet(table, path)
        return seal_file(path)

    def read(self, index_dir: str | os.PathLike[str]) -> pa.Table | None:
        """The table in ``index_dir`` (declared columns, declared types), or None when it is absent.

        Raises FileNotFoundError for a mined table whose index has no ``meta.json`` (incomplete),
        ValueError naming the file and column for a missing column, a wrong type, a null or a
        non-finite number, and CorruptDataError for a file that is not readable Parquet.
        """
        path = self.path(index_dir)
        if (self.mined and (path.exists() or (Path(index_dir) / layout.INDEX_META_FILE).exists())
                and not verify_table(index_dir, path)):
            return None
        if not path.exists():
            if not self.mined and _seal_path(path).exists():
                raise CorruptDataError(f"{path}: missing, though its checksum {_seal_path(path)} is there; "
                                       "rerun the verb that writes it")
            return None
        return self.read_file(path)

    def read_file(self, path: str | os.PathLike[str]) -> pa.Table:
        """Read and check a file holding this table (any name, any folder)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {self.name} table here")
        if not self.mined:
            check_sealed(path)
        try:
            table = pq.read_table(path, columns=self.schema.names)
        except (pa.ArrowInvalid, OSError) as e:
            if isinstance(e, pa.ArrowInvalid) and "No match for FieldRef" in str(e):
                present = pq.read_schema(path).names
                missing = [c for c in self.schema.names if c not in present]
                raise ValueError(f"{path}: missing column(s) {missing}; a {self.name} table has "
                                 f"{self.schema.names}") from e
            raise CorruptDataError(f"{path}: unreadable Parquet table ({e})") from e
        for want in self.schema:
            self._check_column(path, want, table.column(want.name))
        try:
            return table.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{path}: values do not fit the {self.name} schema {self.schema} ({e})") from e

    def _check_column(self, path: Path, want: pa.Field, col: pa.ChunkedArray) -> None:
        name = want.name
        if pa.types.is_string(want.type):
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                raise ValueError(f"{path}: column {name!r} has type {col.type}, expected string")
            return
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise ValueError(f"{path}: column {name!r} has type {col.type}, expected a number ({want.type})")
        if col.null_count:
            raise ValueError(f"{path}: column {name!r} holds {col.null_count} null value(s)")
        if pa.types.is_floating(col.type):
            values = col.to_numpy()
            bad = ~np.isfinite(values)
            if name in self.neg_inf_ok:
                bad &= ~np.isneginf(values)
            if name in self.nan_ok:
                bad &= ~np.isnan(values)
            if bad.any():
                raise ValueError(f"{path}: column {name!r} holds a non-finite value at row {int(np.argmax(bad))}")


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(fields))


u2, u4, u8, i4, i8, f4, f8, s = pa.uint16(), pa.uint32(), pa.uint64(), pa.int32(), pa.int64(), pa.float32(), \
    pa.float64(), pa.string()

STATS = TableSpec("stats", layout.STATS_FILE, _schema(
    ("feature", u4), ("count", u8), ("density", f8), ("sum", f8), ("max", f4), ("mean_nonzero", f8)), mined=True)
"""One row per feature, dead ones too: count of nonzero activations, density = count / tokens."""
HISTOGRAMS = TableSpec("histograms", layout.HISTOGRAMS_FILE, _schema(
    ("feature", u4), ("bin", u2), ("lo", f4), ("hi", f4), ("count", u8)), order=("bin",), mined=True)
"""Log-spaced activation histogram of each feature that fires."""
TOPK = TableSpec("topk", layout.TOPK_FILE, _schema(
    ("feature", u4), ("rank", u2), ("row", u8), ("doc_id", i8), ("position", i4), ("value", f4)),
    order=("rank",), mined=True)
"""The k strongest activations of each feature, rank 0 strongest."""
SAMPLES = TableSpec("samples", layout.SAMPLES_FILE, _schema(
    ("feature", u4), ("bin", u2), ("row", u8), ("doc_id", i8), ("position", i4), ("value", f4)),
    order=("bin", "value"), mined=True)
"""Quantile samples: examples drawn per activation-level bin (fractions of the feature's max)."""
DENSITY_HISTOGRAM = TableSpec("density_histogram", layout.DENSITY_HISTOGRAM_FILE, _schema(
    ("lo_log10", f8), ("hi_log10", f8), ("count", u8)), mined=True, neg_inf_ok=("lo_log10", "hi_log10"))
"""Features per log10-density bin; the first row (edges -inf) counts the features that never fire."""
NEIGHBOURS = TableSpec("neighbours", layout.NEIGHBOURS_FILE, _schema(
    ("feature", u4), ("rank", u2), ("other_sae", s), ("neighbour", u4), ("cosine", f4)), order=("rank",))
"""Top-k decoder-cosine neighbours of each feature, within its SAE and in others (``saecore neighbours``)."""
MAP = TableSpec("map", layout.MAP_FILE, _schema(("feature", u4), ("sae", s), ("x", f4), ("y", f4)))
"""2-D coordinates of the decoder directions of one or more SAEs (``saecore geometry``)."""
ENC_DEC_COSINE = TableSpec("enc_dec_cosine", layout.ENC_DEC_COSINE_FILE, _schema(("feature", u4), ("cosine", f4)))
"""Cosine of each feature's encoder column and decoder row (``saecore geometry``)."""
LOGIT_LENS = TableSpec("logit_lens", layout.LOGIT_LENS_FILE, _schema(
    ("feature", u4), ("kind", s), ("rank", u2), ("token_id", u4), ("token", s), ("value", f4)),
    order=("kind", "rank"))
"""Tokens each feature's decoder direction promotes / suppresses most (``saecore logit-lens``)."""
LOGIT_LENS_ENCODER = TableSpec("logit_lens_encoder", layout.LOGIT_LENS_ENCODER_FILE, LOGIT_LENS.schema,
                               order=("kind", "rank"))
"""The same for each feature's encoder direction, rescaled to its decoder row's norm (``saecore logit-lens``)."""

TOKEN_SCORES = TableSpec("token_scores", layout.TOKEN_SCORES_FILE, _schema(
    ("feature", u4), ("token_corr", f8), ("pair_corr", f8), ("fires_train", u8), ("fires_held", u8),
    ("distinct_tokens", u8), ("distinct_pairs", u8), ("logit_skew", f8), ("logit_kurtosis", f8),
    ("input_class", s), ("output_class", s), ("taxonomy", s)),
    nan_ok=("token_corr", "pair_corr", "logit_skew", "logit_kurtosis"))
"""Model-free scores and the taxonomy of every feature (``saecore token-scores``)."""
EXPLANATIONS = TableSpec("explanations", layout.EXPLANATIONS_FILE, _schema(
    ("feature", u4), ("explanation", s), ("model", s), ("prompt_hash", s)))
"""One language-model explanation per explained feature (``saecore explain``)."""
AUTOINTERP_SCORES = TableSpec("autointerp_scores", layout.AUTOINTERP_SCORES_FILE, _schema(
    ("feature", u4), ("kind", s), ("explanation", s), ("detection_accuracy", f8), ("detection_auroc", f8),
    ("fuzzing_accuracy", f8), ("fuzzing_auroc", f8), ("specificity", f8), ("n_activating", u4),
    ("n_negative", u4), ("n_fuzzing", u4)), order=("kind",),
    nan_ok=("detection_accuracy", "detection_auroc", "fuzzing_accuracy", "fuzzing_auroc", "specificity"))
"""Scores of each explained feature's explanation and its two baselines, one row per kind (``saecore score``)."""
SPECIFICITY = TableSpec("specificity", layout.SPECIFICITY_FILE, _schema(
    ("feature", u4), ("kind", s), ("bin", i4), ("lo", f4), ("hi", f4), ("n", u4), ("mean_rating", f8),
    ("mean_expected_rating", f8)), order=("kind", "bin"))
"""Mean 0-3 specificity rating per activation bin (bin -1: contexts where the feature is silent)."""

ALL: tuple[TableSpec, ...] = (STATS, HISTOGRAMS, TOPK, SAMPLES, DENSITY_HISTOGRAM, NEIGHBOURS, MAP, ENC_DEC_COSINE,
                              LOGIT_LENS, LOGIT_LENS_ENCODER, TOKEN_SCORES, EXPLANATIONS, AUTOINTERP_SCORES, SPECIFICITY)
BY_NAME: dict[str, TableSpec] = {spec.name: spec for spec in ALL}
PER_FEATURE: tuple[TableSpec, ...] = (STATS, HISTOGRAMS, TOPK, SAMPLES, NEIGHBOURS, ENC_DEC_COSINE, LOGIT_LENS,
                                      LOGIT_LENS_ENCODER, TOKEN_SCORES, EXPLANATIONS, AUTOINTERP_SCORES, SPECIFICITY)
"""Tables keyed by feature (the others describe the SAE as a whole)."""


def require_complete(index_dir: str | os.PathLike[str]) -> Path:
    """The path of ``meta.json``; MissingDataError (a FileNotFoundError) when it is missing (no index, or an
    interrupted one)."""
    meta = Path(index_dir) / layout.INDEX_META_FILE
    if not meta.exists():
        raise MissingDataError(f"{meta}: missing, so no complete feature index in {index_dir}; run `saecore index`")
    return meta


def read_meta(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a complete index, its digest checked (FileNotFoundError without one;
    CorruptDataError for a damaged one; ValueError for another format)."""
    path = require_complete(index_dir)
    meta = read_json_object(path)
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {INDEX_FORMAT!r}; rerun `saecore index`")
    body = {k: v for k, v in meta.items() if k != META_DIGEST_KEY}
    if meta.get(META_DIGEST_KEY) != json_sha256(body) or not isinstance(meta.get(META_TABLES_KEY), dict):
        raise CorruptDataError(f"{path}: sha256 does not match its content; the index metadata is corrupt")
    return meta


def seal_meta(meta: dict[str, Any], tables_written: Mapping[str, str | os.PathLike[str]]) -> dict[str, Any]:
    """``meta`` plus the sha256 of each mined table file (name → path) and of itself, as :func:`read_meta` checks."""
    body = {**meta, META_TABLES_KEY: {name: file_sha256(p) for name, p in sorted(tables_written.items())}}
    return {**body, META_DIGEST_KEY: json_sha256(body)}


def verify_table(index_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Check a mined table against the sha256 ``meta.json`` recorded; CorruptDataError naming it if it
    differs, or if the file is missing though listed, or present though not listed. False when the
    table is neither listed nor present (an index without it)."""
    path = Path(path)
    want = read_meta(index_dir)[META_TABLES_KEY].get(path.name)
    if want is None:
        if not path.exists():
            return False
        raise CorruptDataError(f"{path}: not among the tables {layout.INDEX_META_FILE} lists; rerun `saecore index`")
    if not path.exists():
        raise CorruptDataError(f"{path}: missing, though {layout.INDEX_META_FILE} lists it; rerun `saecore index`")
    if file_sha256(path) != want:
        raise CorruptDataError(f"{path}: sha256 differs from the one {layout.INDEX_META_FILE} recorded; "
                               "the table is corrupt (rerun `saecore index`)")
    return True


def seal_file(path: str | os.PathLike[str]) -> Path:
    """Record ``path``'s sha256 in ``path.sha256`` (atomically), as :func:`check_sealed` checks it."""
    path = Path(path)
    _atomic.write_text(_seal_path(path), file_sha256(path) + "\n")
    return path


def check_sealed(path: str | os.PathLike[str]) -> None:
    """CorruptDataError naming ``path`` when its ``.sha256`` is missing, damaged, or differs from its content."""
    path = Path(path)
    seal = _seal_path(path)
    try:
        want = seal.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise CorruptDataError(f"{path}: its checksum {seal} is missing (written by an older saecore, or interrupted); "
                               "rerun the verb that writes it") from None
    except (UnicodeDecodeError, OSError) as e:
        raise CorruptDataError(f"{seal}: unreadable ({e})") from e
    if file_sha256(path) != want:
        raise CorruptDataError(f"{path}: sha256 differs from the one {seal} records; the table or its checksum is "
                               "corrupt (rerun the verb that writes it)")


def _seal_path(path: Path) -> Path:
    return path.with_name(path.name + layout.CHECKSUM_SUFFIX)


def feature_rows(table: pa.Table, feature: int) -> pa.Table:
    """The rows of one feature in a table sorted by feature (binary search, no scan)."""
    ids = table.column("feature").to_numpy()
    lo, hi = np.searchsorted(ids, feature, "left"), np.searchsorted(ids, feature, "right")
    return table.slice(lo, hi - lo)


def max_activations(index_dir: str | os.PathLike[str], features: list[int]) -> dict[int, float] | None:
    """Each feature's largest activation from the stats table; None when the folder has no stats."""
    table = STATS.read(index_dir)
    if table is None:
        return None
    lookup = dict(zip(table.column("feature").to_pylist(), table.column("max").to_pylist()))
    missing = [f for f in features if f not in lookup]
    if missing:
        raise ValueError(f"features {missing} are not in {STATS.path(index_dir)} ({len(lookup)} features listed)")
    return {f: float(lookup[f]) for f in features}
