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
* ``kl_div``: mean over predicted tokens of KL(p_clean ‖ p_sae) in nats; ``kl_div_with_ablation`` the same
  with the activation zeroed; ``kl_div_score`` = 1 − kl_div / kl_div_with_ablation (SAEBench's).
* SAELens'/SAEBench's core extras: ``l1`` (mean Σ|f|), ``cossim`` (mean cos(x, x̂)), ``l2_ratio`` (mean
  ‖x̂‖/‖x‖), ``relative_reconstruction_bias`` (E‖x̂‖² / E⟨x, x̂⟩; < 1 is shrinkage) and
  ``explained_variance_legacy`` (mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_block‖²).

``--suite`` adds SAEBench's core, sparse-probing and absorption evals (:func:`run_suites`, written in
SAEBench's result schema; docs/benchmarks.md); ``--compare`` tabulates their results across SAEs.
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
from .run import CFG_FILE, METRICS_FILE, record_path, resolve_recorded, saebench_dir
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


class _ReconstructionSums:
    """Streamed float64 sums over evaluated tokens for :func:`reconstruction_metrics`."""

    def __init__(self, d_model: int, d_sae: int, device: torch.device):
        self.n = 0
        self.sums = dict.fromkeys(
            ("err", "sq", "active", "l1", "norm_in", "norm_out", "ratio", "cossim", "out_sq", "dot", "legacy_ev"), 0.0)
        self.sum_x = torch.zeros(d_model, dtype=torch.float64)
        self.fired_count = torch.zeros(d_sae, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64, xh64 = x.double(), x_hat.double()
        err = (x64 - xh64).pow(2).sum(-1)  # (n,)
        norm_in, norm_out = x64.norm(dim=-1), xh64.norm(dim=-1)
        dot = (x64 * xh64).sum(-1)
        # SAELens' conventions: a near-zero input norm divides as 1; the legacy EV centres on the block mean.
        block_var = (x64 - x64.mean(0)).pow(2).sum(-1)
        add = {"err": err.sum(), "sq": x64.pow(2).sum(), "active": (f != 0).sum(), "l1": f.abs().sum(),
               "norm_in": norm_in.sum(), "norm_out": norm_out.sum(),
               "ratio": (norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum(),
               "cossim": (dot / (norm_in * norm_out)).nan_to_num(0.0).sum(), "out_sq": norm_out.pow(2).sum(),
               "dot": dot.sum(), "legacy_ev": (1 - err / block_var).nan_to_num(0.0).sum()}
        for k, v in add.items():
            self.sums[k] += float(v)
        self.sum_x += x64.sum(0).cpu()
        self.fired_count += (f != 0).sum(0).double()
        self.n += x.shape[0]

    def result(self) -> dict[str, Any]:
        s, n = self.sums, self.n
        # Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖², from the streamed sums.
        total_var = s["sq"] - float(self.sum_x.pow(2).sum()) / n
        density = (self.fired_count / n).cpu()
        return {
            "l0": s["active"] / n,
            "explained_variance": 1.0 - s["err"] / total_var if total_var > 0 else float("nan"),
            "mse": s["err"] / n,
            "normalized_mse": s["err"] / s["sq"] if s["sq"] > 0 else float("nan"),
            "dead_fraction": float((density == 0).double().mean()),
            "dead_window_tokens": n,
            "tokens": n,
            "l1": s["l1"] / n, "cossim": s["cossim"] / n, "explained_variance_legacy": s["legacy_ev"] / n,
            "l2_norm_in": s["norm_in"] / n, "l2_norm_out": s["norm_out"] / n, "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias": s["out_sq"] / s["dot"] if s["dot"] else float("nan"),
            "feature_density": density.numpy(),
        }


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, store: ActivationStore, hook: str, start: int, stop: int, block_rows: int = 8192
) -> dict[str, Any]:
    """Reconstruction, sparsity and shrinkage over store rows ``start:stop`` (streamed in blocks; float64
    sums): L0, L1, explained variance (and SAELens' legacy per-token form), MSE, normalised MSE, cosine,
    the shrinkage figures l2_ratio and relative_reconstruction_bias, the dead fraction, and each latent's
    firing density (``feature_density``, an array)."""
    if stop <= start:
        raise ValueError(f"{store.path}: no rows to evaluate ({start}:{stop})")
    d_model = store.d_model(hook)
    if d_model != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {hook!r} of {store.path} has d_model={d_model}")
    sums = _ReconstructionSums(d_model, sae.cfg.d_sae, sae.device)
    for first, block in store.iter_blocks(hook, block_rows, start, stop):
        _check_finite(store, hook, first, block)
        x = torch.from_numpy(block).to(sae.device)  # (n, d)
        f = sae.encode(x)
        sums.add(x, f, sae.decode(f))
    return sums.result()


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

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
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
        totals["kl_zero"] += float((logp_clean.exp() * (logp_clean - logp_zero)).sum())
        count += targets.numel()
    ce = {k: totals[k] / count for k in ("clean", "sae", "zero")}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-9 else float("nan"),
        "kl_div": totals["kl"] / count,
        "kl_div_with_ablation": totals["kl_zero"] / count,
        # SAEBench's kl_div_score: the share of the zero-ablation KL that the SAE removes.
        "kl_div_score": 1.0 - totals["kl"] / totals["kl_zero"] if totals["kl_zero"] > 0 else float("nan"),
        "ce_tokens": count,
    }


SUITES = ("core", "sparse-probing", "absorption")


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

    suite: str | None = option(None, metavar="NAMES")
    """Also run SAEBench's evals, comma-separated: core, sparse-probing, absorption (or 'all'); each writes
    its SAEBench-format result into SAE_DIR/saebench/ (docs/benchmarks.md)."""

    probe_datasets: str = option("corpus-source,fortunes-topic", metavar="NAMES")
    """Sparse probing: the built-in classification datasets, comma-separated (corpus-source, fortunes-topic)."""

    probe_train: int = option(100, ge=2, le=1 << 20)
    """Sparse probing: training passages per class."""

    probe_test: int = option(50, ge=2, le=1 << 20)
    """Sparse probing: test passages per class."""

    probe_k: list[int] = option(default_factory=lambda: [1, 2, 5], ge=1, le=1 << 20)
    """Sparse probing: the k of the k-sparse probes (SAEBench's default 1 2 5)."""

    absorption_words: int = option(2000, ge=20, le=1 << 22)
    """Absorption: letter-only vocabulary tokens sampled (80% train, 20% test); SAEBench uses them all."""

    seed: int = option(42, ge=0, le=2**32 - 1)
    """Seed of the probing samples, splits and probe training."""

    def __post_init__(self) -> None:
        validate(self)
        for name in self.suites:
            if name not in SUITES:
                raise ValueError(f"EvalConfig.suite: unknown eval {name!r}; choose from {', '.join(SUITES)} or all")

    @property
    def suites(self) -> list[str]:
        names = [n.strip() for n in (self.suite or "").split(",") if n.strip()]
        return list(SUITES) if names == ["all"] else names


def _resolve_store(sae_dir: Path, sae: SAE, store: Any, facts: dict[str, Any]) -> tuple[ActivationStore, str]:
    if store is None:
        if "store" not in facts:
            raise ValueError(f"{sae_dir}: no training store recorded; pass store=")
        store = resolve_recorded(facts["store"], sae_dir)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    hook = sae.cfg.hook_name if sae.cfg.hook_name in store.hooks else (store.hooks[0] if len(store.hooks) == 1 else None)
    if hook is None:
        raise ValueError(f"{store.path}: holds hooks {store.hooks}, none is the SAE's {sae.cfg.hook_name!r}")
    return store, hook


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
    the CE/KL part: no model needed). With ``cfg.suite``, SAEBench's evals run too and the returned dict
    holds their results under ``"saebench"`` (by eval type).
    """
    cfg = dataclasses.replace(cfg or EvalConfig(), **overrides)
    sae_dir = Path(sae_dir)
    probe_texts = _probe_texts(cfg)  # a bad dataset fails now, not after the slow parts
    dev = default_device(cfg.device)
    sae = SAE.load(sae_dir, device=dev)
    facts = _training_facts(sae_dir)
    store, hook = _resolve_store(sae_dir, sae, store, facts)
    if rows is None:
        held = facts.get("holdout_rows")
        rows = tuple(held) if held and held[1] > held[0] and _same_path(facts.get("store"), sae_dir, store.path) else (0, store.num_rows)
    metrics: dict[str, Any] = {
        "sae": record_path(sae_dir), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "hook": hook, "store": record_path(store.path), "rows": list(rows),
        "rows_held_out": rows == tuple(facts.get("holdout_rows") or ()),
    }
    metrics.update(reconstruction_metrics(sae, store, hook, rows[0], rows[1]))
    density = metrics.pop("feature_density")
    if "dead_fraction" in facts:
        metrics["train_dead_fraction"] = facts["dead_fraction"]
        metrics["train_dead_window_tokens"] = facts.get("dead_window_tokens")
    loaded = None
    if cfg.splice or {"sparse-probing", "absorption"} & set(cfg.suites):
        model = model if model is not None else sae.cfg.model_name
        loaded = model if isinstance(model, tuple) else models.load(model, device=dev)
    if cfg.splice:
        ids, held_out = held_out_contexts(store, loaded[1], cfg.n_contexts, cfg.context_length, corpus)
        metrics.update(spliced_metrics(loaded[0], sae, ids))
        metrics["text_held_out"] = held_out
    if write:
        write_json(sae_dir / METRICS_FILENAME, metrics)
    if cfg.suites:
        metrics["saebench"] = run_suites(sae_dir, sae, metrics, density, loaded, cfg, write, probe_texts)
    return metrics


def _probe_texts(cfg: EvalConfig) -> dict[str, Any] | None:
    if "sparse-probing" not in cfg.suites:
        return None
    from .sparse_probing import load_datasets

    return load_datasets([d.strip() for d in cfg.probe_datasets.split(",") if d.strip()], cfg.probe_train + cfg.probe_test)


def _core_config(metrics: dict[str, Any], cfg: EvalConfig, sae: SAE) -> dict[str, Any]:
    """SAEBench's CoreEvalConfig fields that apply, plus where saecore's tokens came from."""
    return {"model_name": sae.cfg.model_name, "context_size": cfg.context_length, "compute_kl": cfg.splice,
            "compute_ce_loss": cfg.splice, "compute_l2_norms": True, "compute_sparsity_metrics": True,
            "compute_variance_metrics": True, "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True, "exclude_special_tokens_from_reconstruction": True,
            "n_eval_reconstruction_contexts": cfg.n_contexts if cfg.splice else 0,
            "activation_store": metrics["store"], "store_rows": metrics["rows"],
            "store_rows_held_out": metrics["rows_held_out"]}


def run_suites(
    sae_dir: Path, sae: SAE, metrics: dict[str, Any], density: np.ndarray, loaded: Any, cfg: EvalConfig, write: bool,
    probe_texts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAEBench's evals named in ``cfg.suite``: result dicts by eval type (written into SAE_DIR/saebench/
    with the summary and plot when ``write``)."""
    from . import saebench
    from .absorption import AbsorptionConfig, absorption
    from .sparse_probing import sparse_probing

    results: dict[str, Any] = {}
    if "core" in cfg.suites:
        weights = saebench.weight_metrics(sae.W_enc, sae.b_enc, sae.W_dec)
        results["core"] = saebench.result(
            "core", sae_dir, _core_config(metrics, cfg, sae), saebench.core_metrics({**metrics, "feature_density": density}, weights),
            saebench.core_details(density, weights), {"density_histogram": saebench.density_histogram(density)})
    if "sparse-probing" in cfg.suites:
        datasets = [d.strip() for d in cfg.probe_datasets.split(",") if d.strip()]
        sp_metrics, details, per_class = sparse_probing(
            loaded[0], loaded[1], sae, datasets=datasets, n_train=cfg.probe_train, n_test=cfg.probe_test,
            ks=cfg.probe_k, seed=cfg.seed, texts=probe_texts)
        sp_cfg = {"random_seed": cfg.seed, "dataset_names": datasets, "probe_train_set_size": cfg.probe_train,
                  "probe_test_set_size": cfg.probe_test, "context_length": 128, "k_values": list(cfg.probe_k),
                  "model_name": sae.cfg.model_name, "sizes_are_per_class": True}
        results["sparse_probing"] = saebench.result("sparse_probing", sae_dir, sp_cfg, sp_metrics, details,
                                                    {"per_class": per_class})
    if "absorption" in cfg.suites:
        ab_cfg = AbsorptionConfig(n_words=cfg.absorption_words, seed=cfg.seed)
        ab_metrics, details, extra = absorption(loaded[0], loaded[1], sae, ab_cfg)
        results["absorption_first_letter"] = saebench.result(
            "absorption_first_letter", sae_dir, {"model_name": sae.cfg.model_name, **dataclasses.asdict(ab_cfg)},
            ab_metrics, details, extra)
    if write:
        for res in results.values():
            saebench.write_result(sae_dir, res)
        saebench.write_summary(sae_dir, results)
        saebench.write_plot(sae_dir, density, results)
    return results


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as a two-column text table."""
    keys = ["l0", "explained_variance", "mse", "normalized_mse", "dead_fraction", "dead_window_tokens",
            "train_dead_fraction", "ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered",
            "kl_div", "kl_div_score", "cossim", "l1", "l2_ratio", "relative_reconstruction_bias", "tokens", "ce_tokens"]
    lines = [f"{'metric':<24} value", f"{'-' * 24} {'-' * 12}"]
    for k in keys:
        if k in metrics and metrics[k] is not None:
            v = metrics[k]
            lines.append(f"{k:<24} {v:.6g}" if isinstance(v, float) and not math.isnan(v) else f"{k:<24} {v}")
    return "\n".join(lines)


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae", nargs="?", default=None, help="SAE folder (cfg.json + sae_weights.safetensors)")
    parser.add_argument("--store", default=None, help="activation store (default: the one it was trained on)")
    parser.add_argument("--model", default=None, help="model name or HF folder (default: the SAE's model_name)")
    parser.add_argument("--corpus", default=None, help="text for CE/KL (default: the store's corpus past the harvested part)")
    parser.add_argument("--compare", nargs="+", metavar="SAE", default=None,
                        help="print one table of the SAEBench results (eval --suite) of these SAE folders and write "
                             "it as CSV and JSON; evaluates nothing")
    parser.add_argument("--out", default=None, help="--compare: folder for the CSV/JSON (default: RUN/saebench "
                                                     "when all the SAEs are in one run)")
    add_arguments(parser, EvalConfig)


def compare(sae_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None) -> tuple[str, list[Path]]:
    """The ``--compare`` table (text) of SAE folders' SAEBench results, and the CSV/JSON files written."""
    from . import saebench
    from .run import saebench_compare_dir, saebench_compare_files

    dirs = [Path(d) for d in sae_dirs]
    for d in dirs:
        if not (d / CFG_FILE).is_file():
            raise FileNotFoundError(f"{d}: not an SAE folder (no {CFG_FILE})")
    rows = saebench.compare_rows(dirs)
    folder = Path(out) if out is not None else saebench_compare_dir(dirs)
    if folder is None:
        raise ValueError("--compare: the SAEs are not all in one run; name a folder for the table with --out")
    csv_path, json_path = saebench_compare_files(folder)
    saebench.write_table(rows, csv_path, json_path)
    return saebench.table_text(rows), [csv_path, json_path]


def cli_run(args: argparse.Namespace) -> int:
    if args.compare:
        text, files = compare(([args.sae] if args.sae else []) + args.compare, args.out)
        print(text)
        print("wrote " + ", ".join(map(str, files)))
        return 0
    if args.sae is None:
        raise ValueError("give an SAE folder to evaluate (or --compare SAE SAE …)")
    metrics = evaluate(args.sae, args.store, args.model, corpus=args.corpus, cfg=from_args(EvalConfig, args))
    print(format_table(metrics))
    print(f"wrote {Path(args.sae) / METRICS_FILENAME}")
    if "saebench" in metrics:
        from . import saebench

        print()
        print(saebench.table_text([saebench.summarize(metrics["saebench"])]))
        print(f"wrote SAEBench results into {saebench_dir(args.sae)}")
    return 0
