"""SAEBench's result format for saecore's evals, the one-line summary of each, and ``--compare`` tables.

A result is a dict in SAEBench's ``BaseEvalOutput`` shape (``sae_bench/evals/base_eval_output.py``,
SAEBench 0.6.0): ``eval_type_id``, ``eval_config``, ``eval_id`` (a UUID), ``datetime_epoch_millis``,
``eval_result_metrics`` (categories of flat metrics), ``eval_result_details`` (a list of flat records),
``sae_bench_commit_hash``, ``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version``,
``sae_cfg_dict``, ``eval_result_unstructured``. The metric and category names are SAEBench's, so a
result file reads like one SAEBench wrote; ``sae_bench_commit_hash`` names saecore instead (SAEBench
did not run), and ``eval_result_unstructured.implementation`` says so.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_target, write_json, write_text
from .run import CFG_FILE, saebench_file, saebench_plot, saebench_summary

SAEBENCH_REFERENCE = "SAEBench 0.6.0 (adamkarvonen/SAEBench@8042bb3) definitions"
EVAL_TYPES = {"core": "core", "sparse-probing": "sparse_probing", "absorption": "absorption_first_letter"}
"""``--suite`` name -> SAEBench's ``eval_type_id`` (also the result file's stem)."""

DETAIL_DIGITS = 5  # SAEBench rounds per-feature details (DEFAULT_FLOAT_PRECISION) the same way


def _version() -> str:
    from . import __version__

    return __version__


def _sae_lens_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:  # not installed: SAEBench's field is optional
        return None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (SAEBench writes -1 for NaN in core; null says 'not measured')."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result(
    eval_type_id: str, sae_dir: Path, eval_config: dict[str, Any], metrics: dict[str, dict[str, Any]],
    details: list[dict[str, Any]], unstructured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One eval's result in SAEBench's output schema."""
    return _clean({
        "eval_type_id": eval_type_id,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"saecore-{_version()}",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": _sae_lens_version(),
        "sae_cfg_dict": json.loads((sae_dir / CFG_FILE).read_text()),
        "eval_result_unstructured": {"implementation": f"saecore {_version()}", "follows": SAEBENCH_REFERENCE,
                                     **(unstructured or {})},
    })


def write_result(sae_dir: Path, res: dict[str, Any]) -> Path:
    path = saebench_file(sae_dir, res["eval_type_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, res)
    return path


# -- core ------------------------------------------------------------------------------------------
def _max_cosine_to_others(rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each row, the largest cosine with any other row (``rows`` [n, d])."""
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    out = torch.empty(len(unit), dtype=torch.float64)
    for i in range(0, len(unit), chunk):
        sims = unit[i : i + chunk] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = -math.inf
        out[i : i + chunk] = sims.max(1).values
    return out


def weight_metrics(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor) -> dict[str, np.ndarray]:
    """SAEBench's per-feature weight metrics (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in])."""
    enc = W_enc.detach().cpu().double().T  # (d_sae, d_in)
    dec = W_dec.detach().cpu().double()
    return {
        "encoder_bias": b_enc.detach().cpu().double().numpy(),
        "encoder_norm": enc.norm(dim=1).numpy(),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(enc, dec, dim=1).numpy(),
        "max_encoder_cosine_sim": _max_cosine_to_others(enc).numpy(),
        "max_decoder_cosine_sim": _max_cosine_to_others(dec).numpy(),
    }


def density_metrics(density: np.ndarray) -> dict[str, float]:
    """SAEBench's misc density figures from each latent's firing frequency."""
    total = float(density.sum())
    return {
        "frac_alive": float((density > 0).mean()),
        "freq_over_1_percent": float((density > 0.01).mean()),
        "freq_over_10_percent": float((density > 0.1).mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum() / total) if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum() / total) if total > 0 else 0.0,
    }


def density_histogram(density: np.ndarray, lo: float = -7.0, hi: float = 0.0, bins: int = 28) -> dict[str, Any]:
    """Counts of log10(density) in equal bins over [lo, hi]; dead latents counted apart."""
    alive = density[density > 0]
    counts, edges = np.histogram(np.clip(np.log10(alive), lo, hi), bins=bins, range=(lo, hi))
    return {"log10_edges": edges.round(4).tolist(), "counts": counts.tolist(), "dead": int((density == 0).sum())}


def core_metrics(m: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """SAEBench's core metric categories from :func:`saecore.evaluate.evaluate`'s figures."""
    out: dict[str, dict[str, Any]] = {}
    if "ce_loss_recovered" in m:
        out["model_behavior_preservation"] = {"kl_div_score": m["kl_div_score"],
                                              "kl_div_with_ablation": m["kl_div_with_ablation"],
                                              "kl_div_with_sae": m["kl_div"]}
        out["model_performance_preservation"] = {"ce_loss_score": m["ce_loss_recovered"],
                                                 "ce_loss_with_ablation": m["ce_loss_zero_ablation"],
                                                 "ce_loss_with_sae": m["ce_loss_with_sae"],
                                                 "ce_loss_without_sae": m["ce_loss_clean"]}
    out["reconstruction_quality"] = {k: m[k] for k in ("explained_variance", "explained_variance_legacy", "mse", "cossim")}
    out["shrinkage"] = {k: m[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")}
    out["sparsity"] = {"l0": m["l0"], "l1": m["l1"]}
    out["token_stats"] = {"total_tokens_eval_reconstruction": m.get("ce_tokens", 0),
                          "total_tokens_eval_sparsity_variance": m["tokens"]}
    out["misc_metrics"] = {"average_max_encoder_cosine_sim": float(weights["max_encoder_cosine_sim"].mean()),
                           "average_max_decoder_cosine_sim": float(weights["max_decoder_cosine_sim"].mean()),
                           **density_metrics(m["feature_density"])}
    return out


def core_details(density: np.ndarray, weights: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """SAEBench's per-feature records. ``consistent_activation_heuristic`` (tokens per prompt that fire)
    needs prompt boundaries, which stored activation rows do not keep: it is null."""
    cols = {"feature_density": density, **weights}
    rounded = {k: np.round(np.asarray(v, dtype=np.float64), DETAIL_DIGITS).tolist() for k, v in cols.items()}
    return [{"index": i, "consistent_activation_heuristic": None, **{k: v[i] for k, v in rounded.items()}}
            for i in range(len(density))]


# -- summaries ---------------------------------------------------------------------------------------
SUMMARY_KEYS = {
    "core": [("sparsity", "l0"), ("reconstruction_quality", "explained_variance"),
             ("reconstruction_quality", "cossim"), ("model_performance_preservation", "ce_loss_score"),
             ("model_behavior_preservation", "kl_div_score"), ("shrinkage", "l2_ratio"),
             ("shrinkage", "relative_reconstruction_bias"), ("misc_metrics", "frac_alive"),
             ("misc_metrics", "freq_over_10_percent")],
    "sparse_probing": [("llm", "llm_test_accuracy"), ("llm", "llm_top_1_test_accuracy"),
                       ("sae", "sae_test_accuracy"), ("sae", "sae_top_1_test_accuracy"),
                       ("sae", "sae_top_2_test_accuracy"), ("sae", "sae_top_5_test_accuracy")],
    "absorption_first_letter": [("mean", "mean_absorption_fraction_score"), ("mean", "mean_full_absorption_score"),
                                ("mean", "mean_num_split_features")],
}
"""The headline figures of each eval type, in table order (category, metric)."""


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flat ``{metric: value}`` of the headline figures of the given results (by eval type)."""
    flat: dict[str, Any] = {}
    for eval_type, keys in SUMMARY_KEYS.items():
        res = results.get(eval_type)
        if res is None:
            continue
        for cat, key in keys:
            flat[key] = res["eval_result_metrics"].get(cat, {}).get(key)
    return flat


def read_results(sae_dir: Path) -> dict[str, dict[str, Any]]:
    """The SAEBench result files present for an SAE folder, by eval type."""
    found = {}
    for eval_type in EVAL_TYPES.values():
        path = saebench_file(sae_dir, eval_type)
        if path.exists():
            try:
                found[eval_type] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON result file ({e})") from None
    return found


def write_summary(sae_dir: Path, results: dict[str, dict[str, Any]]) -> Path:
    """The headline figures of every result the SAE folder holds, as the summary JSON pages read."""
    path = saebench_summary(sae_dir)
    write_json(path, _clean(summarize({**read_results(sae_dir), **results})))
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def compare_rows(sae_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per SAE: its name, architecture, width and every headline figure it has."""
    rows = []
    for d in sae_dirs:
        results = read_results(d)
        if not results:
            raise ValueError(f"{d}: no SAEBench results; run 'saecore eval {d} --suite core,sparse-probing,absorption' first")
        cfg = json.loads((d / CFG_FILE).read_text())
        rows.append({"sae": str(d), "architecture": cfg.get("architecture"), "d_sae": cfg.get("d_sae"),
                     **summarize(results)})
    return rows


def table_text(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table (one column per key of the first row, metrics from all rows)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], csv_path: Path, json_path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows([_clean(r) for r in rows])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(csv_path, buf.getvalue())
    write_json(json_path, {"saes": _clean(rows)})


def write_plot(sae_dir: Path, density: np.ndarray, results: dict[str, dict[str, Any]]) -> Path:
    """One figure per SAE: latent density histogram, sparse-probing accuracy against k, absorption by letter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    hist = density_histogram(density)
    edges = np.array(hist["log10_edges"])
    axes[0].bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4c72b0")
    axes[0].set(xlabel="log10 firing density", ylabel="latents", title=f"density ({hist['dead']} dead)")
    _plot_probing(axes[1], results.get("sparse_probing"))
    _plot_absorption(axes[2], results.get("absorption_first_letter"))
    fig.suptitle(sae_dir.name)
    fig.tight_layout()
    path = saebench_plot(sae_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _plot_probing(ax: Any, res: dict[str, Any] | None) -> None:
    ax.set(title="sparse probing", xlabel="k", ylabel="test accuracy")
    if res is None:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
        return
    m = res["eval_result_metrics"]
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if m["sae"].get(f"sae_top_{k}_test_accuracy") is not None]
    for which, colour in (("llm", "#555555"), ("sae", "#c44e52")):
        ax.plot(ks, [m[which][f"{which}_top_{k}_test_accuracy"] for k in ks], "o-", color=colour, label=f"{which} top-k")
        full = m[which][f"{which}_test_accuracy"]
        if full is not None:
            ax.axhline(full, color=colour, ls="--", lw=1, label=f"{which} all dims")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.legend(fontsize=7)


def _plot_absorption(ax: Any, res: dict[str, Any] | None) -> None:
    ax.set(title="absorption (first letter)", ylabel="mean absorption fraction")
    if res is None or not res["eval_result_details"]:
        ax.text(0.5, 0.5, "not run" if res is None else "no letter probe passed", ha="center", transform=ax.transAxes)
        return
    det = res["eval_result_details"]
    ax.bar([d["first_letter"] for d in det], [d["mean_absorption_fraction"] for d in det], color="#55a868")
