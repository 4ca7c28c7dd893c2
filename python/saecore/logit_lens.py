"""Logit lens of SAE features: the tokens each decoder direction most promotes and suppresses.

For feature i with decoder direction d_i (row i of ``W_dec``, in the raw hook-activation space), the
score of token t is

    lens[i, t] = (d_i ⊙ g) · W_U[t]

where ``W_U`` is the model's unembedding and ``g`` the weight (gain) of the model's final norm
(``1 + weight`` for Gemma-style RMSNorm). The norm's division by the RMS of the whole residual stream
is left out: it rescales all tokens of one position by the same positive factor and so does not change
which tokens a direction promotes; its gain does, per dimension, hence it is applied by default
(``apply_norm_weight=False`` gives the plain ``W_dec @ W_U``). A LayerNorm's bias and the mean
subtraction are also left out: they do not depend on the feature.

Table ``index/SAE/logit_lens.parquet`` (one row per feature, direction and rank):
``feature u32, kind str ("promote"|"suppress"), rank u16, token_id u32, token str, value f32``.
``rank 0`` is the most promoted (largest score) or most suppressed (most negative score) token.
Features are processed ``batch_features`` at a time, so memory is ``batch_features × vocab`` floats
whatever ``d_sae`` is, and each batch is streamed to the file as a row group.

Encoder directions (``source="encoder"``, table ``index/SAE/logit_lens_encoder.parquet``, same columns):
the same lens applied to what the feature *reads*, its encoder column ``W_enc[:, i]``, rescaled to the
norm of its decoder row (:func:`feature_directions`), so that values of the two tables are on one scale.
Where the encoder and decoder directions differ (cosine well below 1) the two lists show what the
feature detects beside what it writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tables
from ._atomic import atomic_target
from .config import SAEModelOptions, add_arguments, from_args, option, validate
from .run import sae_index_dir
from .sae import SAE
from .sae_model import load_model_for, model_device

KINDS = ("promote", "suppress")
SOURCES = ("decoder", "encoder")


def feature_directions(sae: Any, source: str = "decoder", features: Any = None) -> torch.Tensor:
    """Rows ``[n, d_in]`` of the features' directions in raw activation space: the decoder rows, or the
    encoder columns each rescaled to its decoder row's norm (a zero encoder column stays zero)."""
    if source not in SOURCES:
        raise ValueError(f"direction source must be one of {SOURCES}, got {source!r}")
    idx = slice(None) if features is None else torch.as_tensor(features, dtype=torch.long, device=sae.W_dec.device)
    dec = sae.W_dec.detach()[idx]  # [n, d_in]
    if source == "decoder":
        return dec
    enc = sae.W_enc.detach()[:, idx].T  # [n, d_in]
    return enc * (dec.norm(dim=1, keepdim=True) / enc.norm(dim=1, keepdim=True).clamp_min(1e-30))


def final_norm_gain(model: torch.nn.Module) -> torch.Tensor | None:
    """The per-dimension gain of the model's final norm [d_model], or None if it has none."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        norm = getattr(base, name, None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, torch.Tensor):
            gain = weight.detach().float()
            # Gemma's RMSNorm multiplies by (1 + weight); its weights sit around 0.
            if str(getattr(model.config, "model_type", "")).startswith("gemma"):
                gain = 1.0 + gain
            return gain
    return None


def unembedding(model: torch.nn.Module) -> torch.Tensor:
    """The unembedding matrix W_U [vocab, d_model] (float32)."""
    return model.get_output_embeddings().weight.detach().float()


def lens_scores(directions: torch.Tensor, model: torch.nn.Module, apply_norm_weight: bool = True) -> torch.Tensor:
    """Logit-lens scores [n, vocab] of directions [n, d_model] (see the module docstring)."""
    W_U = unembedding(model)  # [vocab, d]
    d = directions.to(W_U.device, torch.float32)  # [n, d]
    if apply_norm_weight:
        gain = final_norm_gain(model)
        if gain is not None:
            d = d * gain.to(d.device)
    return d @ W_U.T  # [n, vocab]


def iter_logit_lens(
    sae: Any,
    model: torch.nn.Module,
    top: int = 10,
    batch_features: int = 256,
    apply_norm_weight: bool = True,
    features: Sequence[int] | None = None,
    source: str = "decoder",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield per batch: features [b], promote ids/values [b, top], suppress ids/values [b, top] of the
    features' decoder directions (or encoder directions, ``source="encoder"``)."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if batch_features < 1:
        raise ValueError(f"batch_features must be at least 1, got {batch_features}")
    W_dec = sae.W_dec.detach()  # [d_sae, d_in]
    d_model = int(model.config.hidden_size)
    if W_dec.shape[1] != d_model:
        raise ValueError(f"SAE decoder has d_in={W_dec.shape[1]} but the model's d_model is {d_model}")
    feats = np.arange(W_dec.shape[0]) if features is None else np.asarray(list(features), dtype=np.int64)
    if len(feats) and (feats.min() < 0 or feats.max() >= W_dec.shape[0]):
        bad = int(feats[(feats < 0) | (feats >= W_dec.shape[0])][0])
        raise ValueError(f"feature id {bad} is out of range (valid ids are 0..{W_dec.shape[0] - 1})")
    k = min(top, int(unembedding(model).shape[0]))
    with torch.no_grad():
        for start in range(0, len(feats), batch_features):
            chunk = feats[start : start + batch_features]
            scores = lens_scores(feature_directions(sae, source, chunk), model, apply_norm_weight)
            pv, pi = scores.topk(k, dim=1)  # [b, k] largest first
            sv, si = (-scores).topk(k, dim=1)  # [b, k] most negative first
            yield chunk, pi.cpu().numpy(), pv.cpu().numpy(), si.cpu().numpy(), (-sv).cpu().numpy()


def _batch_table(
    chunk: np.ndarray,
    ids: Sequence[np.ndarray],
    vals: Sequence[np.ndarray],
    token_text: Any,
) -> Any:
    import pyarrow as pa

    b, k = ids[0].shape
    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("feature", "kind", "rank", "token_id", "value")}
    for kind, tid, val in zip(KINDS, ids, vals):
        cols["feature"].append(np.repeat(chunk, k))
        cols["kind"].append(np.full(b * k, kind, dtype=object))
        cols["rank"].append(np.tile(np.arange(k), b))
        cols["token_id"].append(tid.reshape(-1))
        cols["value"].append(val.reshape(-1))
    token_ids = np.concatenate(cols["token_id"])
    return pa.table(
        {
            "feature": pa.array(np.concatenate(cols["feature"]).astype(np.uint32)),
            "kind": pa.array(np.concatenate(cols["kind"]), type=pa.string()),
            "rank": pa.array(np.concatenate(cols["rank"]).astype(np.uint16)),
            "token_id": pa.array(token_ids.astype(np.uint32)),
            "token": pa.array([token_text(int(t)) for t in token_ids], type=pa.string()),
            "value": pa.array(np.concatenate(cols["value"]).astype(np.float32)),
        },
        schema=tables.LOGIT_LENS.schema,
    )


def write_logit_lens(
    sae: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    top: int = 10,
    batch_features: int = 256,
    apply_norm_weight: bool = True,
    progress: bool = True,
    source: str = "decoder",
) -> Path:
    """Write the logit-lens table of every feature's decoder (or encoder, ``source``) direction to ``path``
    (atomically); returns the path."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache: dict[int, str] = {}

    def token_text(t: int) -> str:
        if t not in cache:
            cache[t] = tokenizer.decode([t])
        return cache[t]

    schema = tables.LOGIT_LENS.schema.with_metadata(
        {"saecore.logit_lens": json.dumps({"apply_norm_weight": apply_norm_weight, "top": top, "source": source})}
    )
    n_feat = int(sae.W_dec.shape[0])
    with atomic_target(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        batches = iter_logit_lens(sae, model, top, batch_features, apply_norm_weight, source=source)
        total = -(-n_feat // batch_features)
        for chunk, pi, pv, si, sv in tqdm(batches, total=total, desc="logit lens", disable=not progress):
            writer.write_table(_batch_table(chunk, (pi, si), (pv, sv), token_text).cast(schema))
    return tables.seal_file(path)


def read_logit_lens(
    path: str | Path, features: Sequence[int] | None = None, kind: str = "promote", top: int | None = None
) -> dict[int, list[str]]:
    """Token strings per feature from a logit-lens table, best first (``kind``: promote|suppress)."""
    import pyarrow.compute as pc

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    table = tables.LOGIT_LENS.read_file(path)
    mask = pc.equal(table["kind"], kind)
    if features is not None:
        mask = pc.and_(mask, pc.is_in(table["feature"], value_set=_u32(features)))
    if top is not None:
        mask = pc.and_(mask, pc.less(table["rank"], top))
    sub = table.filter(mask).sort_by([("feature", "ascending"), ("rank", "ascending")])
    out: dict[int, list[str]] = {}
    for f, tok in zip(sub["feature"].to_pylist(), sub["token"].to_pylist()):
        out.setdefault(int(f), []).append(tok)
    return out


def _u32(values: Sequence[int]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), type=pa.uint32())


@dataclass(kw_only=True)
class LogitLensConfig(SAEModelOptions):
    """Options of ``saecore logit-lens``."""

    top: int = option(10, ge=1, le=100_000)
    """Tokens per feature and direction."""

    out: Path | None = None
    """Output Parquet file; unset: the run's index/SAE/logit_lens.parquet."""

    norm_weight: bool = option(True, flag="--no-norm-weight")
    """Fold in the final norm's gain (--no-norm-weight: plain W_dec @ W_U)."""

    show: list[int] = option(default_factory=list, append=True, ge=0, lt=1 << 32, metavar="FEATURE")
    """Print this feature's tokens."""

    encoder: bool = option(True, flag="--no-encoder")
    """Also write the encoder directions' table, logit_lens_encoder.parquet, beside the decoder one
    (--no-encoder: only the decoder table)."""

    def __post_init__(self) -> None:
        validate(self)


def cli_configure(parser: Any) -> None:
    """Options of ``saecore logit-lens``."""
    add_arguments(parser, LogitLensConfig)


def cli_run(args: Any) -> int:
    """Run ``saecore logit-lens``: write the table for every feature, then print the ``--show`` features."""
    args = from_args(LogitLensConfig, args)  # checked; the same attribute names
    sae = SAE.load(args.sae).eval()
    d_sae = int(sae.W_dec.shape[0])
    for f in args.show:  # before the model load: a bad id costs no model load
        if not 0 <= f < d_sae:
            raise ValueError(f"feature id {f} is outside the valid range 0..{d_sae - 1} of {args.sae}")
    model, tokenizer = load_model_for(sae, args.model, args.device)
    sae = sae.to(model_device(model))
    out = args.out or tables.LOGIT_LENS.path(sae_index_dir(args.sae))
    paths = {"decoder": write_logit_lens(sae, model, tokenizer, out, args.top, apply_norm_weight=args.norm_weight)}
    if args.encoder:  # beside the decoder table, under its own name
        paths["encoder"] = write_logit_lens(sae, model, tokenizer, tables.LOGIT_LENS_ENCODER.path(Path(out).parent),
                                            args.top, apply_norm_weight=args.norm_weight, source="encoder")
    for path in paths.values():
        print(f"wrote {path} ({d_sae} features x {args.top} tokens, promote and suppress)")
    for f in args.show:
        for source, path in paths.items():
            promote = read_logit_lens(path, [f], "promote").get(f, [])
            suppress = read_logit_lens(path, [f], "suppress").get(f, [])
            print(f"feature {f} ({source} direction)\n  promotes:  {promote!r}\n  suppresses: {suppress!r}")
    return 0
