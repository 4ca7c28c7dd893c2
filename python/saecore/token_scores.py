"""Model-free scores of every feature: token-simulator correlations and a feature taxonomy.

The Rust core (``saecore._native.token_scores``) streams the feature store once and, for every
feature, measures how well two simulators predict its activation on held-out documents:

* **token**: predict each row by the feature's mean activation over training rows with the same token;
* **pair**: the same keyed by (previous token, token).

The score is the Pearson correlation of prediction and activation over *all* held-out rows (rows where
the feature does not fire count as 0; NaN when either side is constant). Whole documents are held out
— a row is held out iff ``(mix64(seed ^ doc_id) >> 11) · 2⁻⁵³ < held_out_fraction`` — so no document is
split between the sides. A row's previous token is the row before it when both have the same document
id and adjacent positions; otherwise (document or context start, or a dropped row such as BOS in
between) its pair key is "(no previous token, token)", a key of its own. A held-out key never seen in
training is predicted by the feature's mean over all training rows. Memory is sparse in (feature, key)
pairs that occur, never ``rows × d_sae`` (see docs/autointerp.md).

Table ``index/SAE/token_scores.parquet``, one row per feature::

    feature u32, token_corr f64, pair_corr f64, fires_train u64, fires_held u64,
    distinct_tokens u64, distinct_pairs u64, logit_skew f64, logit_kurtosis f64,
    input_class str, output_class str, taxonomy str

with the split, the row counts and the taxonomy thresholds (:mod:`saecore.taxonomy`) in the schema
metadata under ``saecore.token_scores``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import _atomic, _native
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .features import FeatureStore
from .run import TOKEN_SCORES_FILE, features_index_dir, resolve_recorded
from .tables import seal_file
from .taxonomy import THRESHOLDS, LogitShape, input_class, output_class, taxonomy

META_KEY = b"saecore.token_scores"
SPLIT_RULE = (
    "held out iff (mix64(seed ^ doc_id) >> 11) * 2^-53 < held_out_fraction (whole documents); "
    "previous token = the row before when it has the same doc_id and position - 1, else none"
)


@dataclass(kw_only=True)
class TokenScoresConfig:
    """Options of ``saecore token-scores``."""

    features: Path
    """Feature store written by saecore encode (runs/NAME/features/SAE.zarr)."""
    activations: Path | None = None
    """Activation store with the rows' token ids, doc ids and positions (default: the one the encode recorded)."""
    out: Path | None = None
    """Folder for token_scores.parquet (default: the run's index/SAE)."""
    held_out_fraction: float = option(0.5, gt=0, lt=1)
    """Fraction of documents held out for scoring (split by a hash of the document id)."""
    seed: int = option(0, ge=0, lt=1 << 63)
    """Seed of the document hash."""
    sae: Path | None = None
    """SAE folder: when given, add the logit-lens skew/kurtosis columns (loads the SAE's model)."""
    model: str | None = None
    """Model for the logit lens (default: the SAE's model_name)."""
    device: str | None = None
    """Torch device for the logit lens (default: CUDA when present)."""

    def __post_init__(self) -> None:
        validate(self)


def score_arrays(
    features: str | os.PathLike[str],
    token_ids: np.ndarray,
    doc_ids: np.ndarray,
    positions: np.ndarray,
    *,
    held_out_fraction: float = TokenScoresConfig.held_out_fraction,
    seed: int = TokenScoresConfig.seed,
    logit: LogitShape | None = None,
) -> pa.Table:
    """Score every feature of the feature store ``features`` given its rows' keys (no file written).

    ``token_ids``, ``doc_ids`` and ``positions`` are row-aligned with the store (as in the activation
    store it was encoded from). ``logit`` adds the logit-lens shape columns and the output side of the
    taxonomy (see :func:`saecore.taxonomy.logit_shape`).
    """
    toks = np.ascontiguousarray(_integer(token_ids, "token_ids"), dtype=np.int32)
    docs = np.ascontiguousarray(_integer(doc_ids, "doc_ids"), dtype=np.int64)
    pos = np.ascontiguousarray(_integer(positions, "positions"), dtype=np.int32)
    r = _native.token_scores(str(features), toks, docs, pos, held_out_fraction=held_out_fraction, seed=seed)
    d = len(r["token_corr"])
    if logit is not None and (len(logit.skew) != d or len(logit.kurtosis) != d):
        raise ValueError(f"logit shape statistics cover {len(logit.skew)} features but the feature store {features} has {d}")
    skew = logit.skew if logit is not None else np.full(d, np.nan)
    kurt = logit.kurtosis if logit is not None else np.full(d, np.nan)
    inputs = input_class(r["token_corr"], r["pair_corr"])
    outputs = output_class(logit.skew if logit else None, logit.kurtosis if logit else None, d)
    table = pa.table({
        "feature": pa.array(np.arange(d, dtype=np.uint32)),
        "token_corr": r["token_corr"], "pair_corr": r["pair_corr"],
        "fires_train": r["fires_train"], "fires_held": r["fires_held"],
        "distinct_tokens": r["distinct_tokens"], "distinct_pairs": r["distinct_pairs"],
        "logit_skew": pa.array(np.asarray(skew, np.float64)), "logit_kurtosis": pa.array(np.asarray(kurt, np.float64)),
        "input_class": pa.array(list(inputs), pa.string()), "output_class": pa.array(list(outputs), pa.string()),
        "taxonomy": pa.array(list(taxonomy(inputs, outputs)), pa.string()),
    })
    counts = {k: int(v) for k, v in r.items() if not isinstance(v, np.ndarray)}
    meta = {**counts, "held_out_fraction": held_out_fraction, "seed": seed, "split_rule": SPLIT_RULE,
            "thresholds": THRESHOLDS, "logit_lens": logit is not None}
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


def _integer(a: Any, name: str) -> np.ndarray:
    """``a`` as a 1-D integer array, or a ValueError naming it (no silent float truncation)."""
    arr = np.asarray(a)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D integer array, got dtype {arr.dtype} with shape {arr.shape}")
    return arr


def token_scores(
    features: str | os.PathLike[str],
    *,
    activations: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    held_out_fraction: float = TokenScoresConfig.held_out_fraction,
    seed: int = TokenScoresConfig.seed,
    logit: LogitShape | None = None,
) -> pa.Table:
    """Score every feature of ``features`` and write ``token_scores.parquet`` (atomically) into ``out``.

    ``activations`` (default: the store recorded by ``saecore encode``) supplies the token ids, document
    ids and positions of the rows; ``out`` defaults to the SAE's index folder in the run layout. Returns
    the table (schema in the module docstring).
    """
    fs = FeatureStore(features)
    if not fs.complete:
        raise ValueError(f"{features}: the feature store is incomplete; rerun `saecore encode` to finish it")
    act_path = activations or resolve_recorded(fs.spec.get("activation_store"), features)
    if not act_path:
        raise ValueError(f"{features}: the feature store records no activation store; pass activations=")
    store = ActivationStore(act_path)
    if store.num_rows != fs.n_rows:
        raise ValueError(f"{act_path} has {store.num_rows} rows but the feature store {features} has {fs.n_rows}")
    keys = (np.asarray(store.token_ids[:]), np.asarray(store.doc_ids[:]), np.asarray(store.positions[:]))
    table = score_arrays(features, *keys, held_out_fraction=held_out_fraction, seed=seed, logit=logit)
    target = Path(out) if out is not None else features_index_dir(features)
    _atomic.write_parquet(table, target / TOKEN_SCORES_FILE)
    seal_file(target / TOKEN_SCORES_FILE)
    return table


def read_meta(table: pa.Table) -> dict[str, Any]:
    """The split, counts and thresholds stored with a token-scores table."""
    return json.loads((table.schema.metadata or {})[META_KEY])


# --- CLI ----------------------------------------------------------------------------------------


def cli_configure(parser: Any) -> None:
    """Flags of ``saecore token-scores``, one per :class:`TokenScoresConfig` field."""
    add_arguments(parser, TokenScoresConfig)


def _logit_shape(cfg: TokenScoresConfig) -> LogitShape | None:
    """The logit-lens shape statistics of ``cfg.sae`` (None without an SAE)."""
    if cfg.sae is None:
        return None
    from .sae import SAE
    from .sae_model import load_model_for, model_device
    from .taxonomy import logit_shape

    sae = SAE.load(cfg.sae).eval()
    model, _ = load_model_for(sae, cfg.model, cfg.device)
    return logit_shape(sae.to(model_device(model)), model)


def cli_run(args: Any) -> int:
    """Run ``saecore token-scores`` and print the taxonomy counts."""
    cfg = from_args(TokenScoresConfig, args)
    table = token_scores(cfg.features, activations=cfg.activations, out=cfg.out,
                         held_out_fraction=cfg.held_out_fraction, seed=cfg.seed, logit=_logit_shape(cfg))
    meta = read_meta(table)
    kinds, counts = np.unique(np.asarray(table["taxonomy"].to_pylist(), dtype=object), return_counts=True)
    print(f"{table.num_rows} features scored on {meta['n_held_rows']} held-out rows "
          f"({meta['n_train_rows']} training): " + ", ".join(f"{k} {c}" for k, c in zip(kinds, counts)))
    return 0
