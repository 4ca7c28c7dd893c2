"""Evaluate an SAE: reconstruction and sparsity on stored activations, and the model's loss with the SAE
spliced in at its hook on held-out text. ``saecore eval SAE_DIR``.

Definitions (pinned; also in docs/training.md). Sums run over the evaluated tokens t and dimensions:

* ``l0``: mean over tokens of the number of latents with f_i(x_t) > 0.
* ``explained_variance`` = 1 − Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − x̄‖², x̄ the mean activation over the
  evaluated tokens. Relative to the mean, not to zero: residual streams carry a large constant offset
  that any b_dec reproduces for free, and measuring against zero would credit the SAE with it.
  (``fraction_variance_unexplained`` is 1 − this; ``normalized_mse`` = Σ‖x − x̂‖² / Σ‖x‖² is the
  relative-to-zero figure other libraries report.)
* ``mse``: Σ_t‖x_t − x̂_t‖² / N, raw activation units (summed over dimensions, averaged over tokens).
* ``dead_fraction``: fraction of latents that never fire on the evaluated tokens (window = those tokens,
  stated as ``dead_window_tokens``); ``train_dead_fraction`` is the trainer's over its own window.
* ``ce_loss_recovered`` = (CE_zero − CE_sae) / (CE_zero − CE_clean): next-token cross-entropy of the
  model with the hook's activation zeroed (CE_zero), replaced by the SAE reconstruction (CE_sae), or
  untouched (CE_clean). Position 0 (BOS) keeps its clean activation in both edits — it is excluded
  from training data, as in the harvest.
* ``kl_div``: mean over predicted tokens of KL(p_clean ‖ p_sae) in nats.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models
from ._atomic import write_json
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .run import METRICS_FILE, record_path, resolve_recorded
from .sae import SAE
from .saelens import read_cfg

METRICS_FILENAME = METRICS_FILE


def _same_path(recorded: object, anchor: Path, path: Path) -> bool:
    """Whether the store ``cfg.json`` recorded is ``path`` (the held-out rows apply only to that store)."""
    found = resolve_recorded(recorded, anchor)
    return found is not None and found.resolve() == Path(path).resolve()


def _training_facts(sae_dir: Path) -> dict[str, Any]:
    cfg = read_cfg(sae_dir)
    return ((cfg.get("metadata") or {}).get("saecore") or {})


def _check_finite(store: ActivationStore, hook: str, first: int, block: np.ndarray) -> None:
    """Refuse NaN/Inf rows (as train and encode do) instead of writing NaN into metrics.json."""
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = first + int(np.argmin(finite))
        raise ValueError(f"{store.path}: hook {hook!r} holds a non-finite activation at store row {row}")


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, store: ActivationStore, hook: str, start: int, stop: int, block_rows: int = 8192
) -> dict[str, float]:
    """L0, explained variance, MSE, normalised MSE and dead fraction over store rows ``start:stop``
    (streamed in blocks; float64 accumulators)."""
    if stop <= start:
        raise ValueError(f"{store.path}: no rows to evaluate ({start}:{stop})")
    d_model = store.d_model(hook)
    if d_model != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {hook!r} of {store.path} has d_model={d_model}")
    dev = sae.device
    n = 0
    sum_err = sum_sq = active = 0.0
    sum_x = torch.zeros(d_model, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=dev)
    for first, block in store.iter_blocks(hook, block_rows, start, stop):
        _check_finite(store, hook, first, block)
        x = torch.from_numpy(block).to(dev)  # (n, d)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sum_err += float((x - x_hat).double().pow(2).sum())
        sum_sq += float(x.double().pow(2).sum())
        sum_x += x.double().sum(0).cpu()
        active += float((f > 0).sum())
        fired |= (f > 0).any(0)
        n += x.shape[0]
    # Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖², from the streamed sums.
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    return {
        "l0": active / n,
        "explained_variance": 1.0 - sum_err / total_var if total_var > 0 else float("nan"),
        "mse": sum_err / n,
        "normalized_mse": sum_err / sum_sq if sum_sq > 0 else float("nan"),
        "dead_fraction": float((~fired).float().mean()),
        "dead_window_tokens": n,
        "tokens": n,
    }


def held_out_contexts(
    store: ActivationStore, tokenizer: Any, n_contexts: int, context_length: int | None = None, corpus: Any = None
) -> tuple[np.ndarray, bool]:
    """``([n, T] token ids, held_out)``: contexts of the store's corpus after those it harvested (held out
    from training), or of ``corpus`` when given. ``held_out`` is False when the store consumed the whole
    corpus and the contexts are re-read from its start."""
    from . import corpus as corpus_mod
    from .harvesting import iter_contexts

    T = int(context_length or store.attrs.get("context_length") or 128)
    if corpus is None:
        name = store.attrs.get("corpus")
        if name is None:
            raise ValueError(f"{store.path}: records no corpus; pass corpus= for the held-out text")
        corp = corpus_mod.load(name)
        max_tokens = store.attrs.get("max_tokens")
        skip = int(max_tokens) // int(store.attrs.get("context_length", T)) if max_tokens else 0
    else:
        corp = corpus if isinstance(corpus, corpus_mod.Corpus) else corpus_mod.load(corpus)
        skip = 0
    contexts = []
    for i, (ids, _) in enumerate(iter_contexts(iter(corp), tokenizer, T)):
        if i >= skip:
            contexts.append(ids)
        if len(contexts) == n_contexts:
            break
    # With no max_tokens the harvest read the whole corpus: nothing after it is held out.
    held_out = corpus is not None or skip > 0
    if len(contexts) < n_contexts and skip:  # corpus exhausted: fall back to its beginning, and say so
        held_out = False
        contexts = [ids for _, (ids, _) in zip(range(n_contexts), iter_contexts(iter(corp), tokenizer, T))]
    if not contexts:
        raise ValueError(f"corpus too short for one context of {T} tokens")
    return np.stack(contexts), held_out


@torch.no_grad()
def spliced_metrics(model: Any, sae: SAE, input_ids: np.ndarray, batch_size: int = 8) -> dict[str, float]:
    """CE loss clean / with SAE / zero-ablated, CE-loss recovered and KL(clean ‖ SAE), over ``input_ids``."""
    from .hooks import edit

    hook = sae.cfg.hook_name
    dev = next(model.parameters()).device
    sae_dev = sae.device

    def splice(act: torch.Tensor) -> torch.Tensor:  # act: (B, T, d)
        out = act.clone()
        out[:, 1:] = sae.decode(sae.encode(act[:, 1:].to(sae_dev).float())).to(act.device, act.dtype)
        return out

    def zero(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[:, 1:] = 0
        return out

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for i in range(0, len(input_ids), batch_size):
        ids = torch.from_numpy(input_ids[i : i + batch_size]).to(dev)  # (B, T)
        targets = ids[:, 1:]
        logp_clean = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)  # (B, T-1, V)
        with edit(model, hook, splice):
            logp_sae = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        with edit(model, hook, zero):
            logp_zero = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        for key, lp in (("clean", logp_clean), ("sae", logp_sae), ("zero", logp_zero)):
            totals[key] -= float(lp.gather(-1, targets[..., None]).sum())
        totals["kl"] += float((logp_clean.exp() * (logp_clean - logp_sae)).sum())
        count += targets.numel()
    ce = {k: totals[k] / count for k in ("clean", "sae", "zero")}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-9 else float("nan"),
        "kl_div": totals["kl"] / count,
        "ce_tokens": count,
    }


@dataclass
class EvalConfig:
    """How ``saecore eval`` measures an SAE (the SAE, store, model and corpus aside)."""

    n_contexts: int = option(16, ge=1, le=1 << 20, flag="--contexts")
    """Held-out contexts for the CE-loss recovered and KL."""

    context_length: int | None = option(None, ge=2, le=1 << 17)
    """Tokens per held-out context; unset: the store's context length."""

    splice: bool = option(True, flag="--no-splice")
    """Splice the SAE into the model for CE-loss recovered and KL (--no-splice: no model needed)."""

    device: str | None = None
    """Torch device; unset: CUDA when present, else the CPU."""

    def __post_init__(self) -> None:
        validate(self)


def evaluate(
    sae_dir: str | os.PathLike[str],
    store: ActivationStore | str | os.PathLike[str] | None = None,
    model: Any = None,
    *,
    rows: tuple[int, int] | None = None,
    corpus: Any = None,
    write: bool = True,
    cfg: EvalConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate the SAE in ``sae_dir``; write ``metrics.json`` beside it (atomically) and return the metrics.

    ``store``: defaults to the one it was trained on; ``rows``: defaults to the trainer's holdout (the
    whole store if it had none). ``model``: a name/path or ``(model, tokenizer)``; defaults to the SAE's
    ``model_name``. ``cfg`` (:class:`EvalConfig`) or single-field ``overrides`` (``splice=False`` skips
    the CE/KL part: no model needed).
    """
    cfg = dataclasses.replace(cfg or EvalConfig(), **overrides)
    sae_dir = Path(sae_dir)
    dev = default_device(cfg.device)
    sae = SAE.load(sae_dir, device=dev)
    facts = _training_facts(sae_dir)
    if store is None:
        if "store" not in facts:
            raise ValueError(f"{sae_dir}: no training store recorded; pass store=")
        store = resolve_recorded(facts["store"], sae_dir)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    hook = sae.cfg.hook_name if sae.cfg.hook_name in store.hooks else (store.hooks[0] if len(store.hooks) == 1 else None)
    if hook is None:
        raise ValueError(f"{store.path}: holds hooks {store.hooks}, none is the SAE's {sae.cfg.hook_name!r}")
    if rows is None:
        held = facts.get("holdout_rows")
        rows = tuple(held) if held and held[1] > held[0] and _same_path(facts.get("store"), sae_dir, store.path) else (0, store.num_rows)
    metrics: dict[str, Any] = {
        "sae": record_path(sae_dir), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "hook": hook, "store": record_path(store.path), "rows": list(rows),
        "rows_held_out": rows == tuple(facts.get("holdout_rows") or ()),
    }
    metrics.update(reconstruction_metrics(sae, store, hook, rows[0], rows[1]))
    if "dead_fraction" in facts:
        metrics["train_dead_fraction"] = facts["dead_fraction"]
        metrics["train_dead_window_tokens"] = facts.get("dead_window_tokens")
    if cfg.splice:
        model = model if model is not None else sae.cfg.model_name
        m, tok = model if isinstance(model, tuple) else models.load(model, device=dev)
        ids, held_out = held_out_contexts(store, tok, cfg.n_contexts, cfg.context_length, corpus)
        metrics.update(spliced_metrics(m, sae, ids))
        metrics["text_held_out"] = held_out
    if write:
        write_json(sae_dir / METRICS_FILENAME, metrics)
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as a two-column text table."""
    keys = ["l0", "explained_variance", "mse", "normalized_mse", "dead_fraction", "dead_window_tokens",
            "train_dead_fraction", "ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered",
            "kl_div", "tokens", "ce_tokens"]
    lines = [f"{'metric':<24} value", f"{'-' * 24} {'-' * 12}"]
    for k in keys:
        if k in metrics and metrics[k] is not None:
            v = metrics[k]
            lines.append(f"{k:<24} {v:.6g}" if isinstance(v, float) and not math.isnan(v) else f"{k:<24} {v}")
    return "\n".join(lines)


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    parser.add_argument("--store", default=None, help="activation store (default: the one it was trained on)")
    parser.add_argument("--model", default=None, help="model name or HF folder (default: the SAE's model_name)")
    parser.add_argument("--corpus", default=None, help="text for CE/KL (default: the store's corpus past the harvested part)")
    add_arguments(parser, EvalConfig)


def cli_run(args: argparse.Namespace) -> int:
    metrics = evaluate(args.sae, args.store, args.model, corpus=args.corpus, cfg=from_args(EvalConfig, args))
    print(format_table(metrics))
    print(f"wrote {Path(args.sae) / METRICS_FILENAME}")
    return 0
