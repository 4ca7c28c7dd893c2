"""Scaling-law sweep (Scaling Monosemanticity's recipe, small): train a grid over dictionary size ×
training tokens, measure each SAE's loss on held-out rows, fit loss against compute as a power law on
the compute-optimal frontier, and report the compute-optimal allocation. ``saecore sweep``.

* Compute of a run: C = d_sae × training tokens (∝ FLOPs, which are ≈ 6·d_in·d_sae per token for
  forward + backward of both matrices; the constant 6·d_in is the same for every run).
* Loss: the training objective on the held-out rows in the trainer's scaled units —
  relu: mean ‖s·x − s·x̂‖² + λ·Σᵢ fᵢ‖W_dec,i‖ (λ at its final value); other architectures: the MSE.
* Frontier: runs whose loss is lower than that of every run with less or equal compute. The fit is
  log L = log A + b·log C on the frontier; the allocation fits log d_sae and log tokens against log C
  on it (exponents α and β, α + β = 1 when the frontier is well resolved).

Outputs in OUT: one SAE folder per run (resumable: finished runs are skipped), ``sweep.json``,
``sweep.csv`` (the table) and ``sweep.svg`` (loss vs compute, log-log, frontier and fit).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_target, write_text
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .run import record_path
from .sae import SAE
from .saelens import read_cfg
from .training import (
    TrainConfig,
    open_store,
    train,
    training_rows,
)


@torch.no_grad()
def heldout_loss(sae: SAE, store: ActivationStore, hook: str, start: int, stop: int, input_scale: float,
                 l1_coefficient: float) -> float:
    """The training objective of ``sae`` (saved, folded) on rows ``start:stop``, in scaled units."""
    total, n = 0.0, 0
    dec_norms = sae.W_dec.norm(dim=1) * input_scale  # folded W_dec = scaled W_dec / s
    for _, block in store.iter_blocks(hook, 8192, start, stop):
        x = torch.from_numpy(block).to(sae.device)
        f = sae.encode(x)
        err = (x - sae.decode(f)).pow(2).sum(-1) * input_scale**2
        total += float(err.sum())
        if sae.cfg.architecture == "relu":
            total += l1_coefficient * float((f @ dec_norms).sum())
        n += x.shape[0]
    return total / n


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of least squares y ≈ slope·x + intercept (needs ≥ 2 distinct x)."""
    if len(np.unique(x)) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def frontier(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with lower loss than every run of less or equal compute (sorted by compute)."""
    out: list[dict[str, Any]] = []
    best = math.inf
    for r in sorted(runs, key=lambda r: (r["compute"], r["loss"])):
        if r["loss"] < best:
            out.append(r)
            best = r["loss"]
    return out


def fit(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Power-law fits on the frontier: loss, optimal d_sae and optimal tokens against compute."""
    front = frontier(runs)
    logc = np.log([r["compute"] for r in front])
    b, loga = _fit_line(logc, np.log([r["loss"] for r in front]))
    alpha, logk = _fit_line(logc, np.log([r["d_sae"] for r in front]))
    beta, logt = _fit_line(logc, np.log([r["tokens"] for r in front]))
    return {
        "loss_vs_compute": {"A": math.exp(loga) if math.isfinite(loga) else None, "exponent": b},
        "d_sae_opt": {"coefficient": math.exp(logk) if math.isfinite(logk) else None, "exponent": alpha},
        "tokens_opt": {"coefficient": math.exp(logt) if math.isfinite(logt) else None, "exponent": beta},
        "frontier": [{k: r[k] for k in ("d_sae", "tokens", "compute", "loss")} for r in front],
    }


def svg_plot(runs: list[dict[str, Any]], fitted: dict[str, Any], title: str) -> str:
    """Loss vs compute on log-log axes: every run (labelled by d_sae), the frontier, the power-law fit."""
    W, H, m = 640, 420, 60
    cs = np.log10([r["compute"] for r in runs])
    ls = np.log10([r["loss"] for r in runs])
    cx0, cx1 = cs.min() - 0.1, cs.max() + 0.1
    ly0, ly1 = ls.min() - 0.05, ls.max() + 0.05

    def px(c: float) -> float:
        return m + (c - cx0) / (cx1 - cx0) * (W - 2 * m)

    def py(v: float) -> float:
        return H - m - (v - ly0) / (ly1 - ly0) * (H - 2 * m)

    sizes = sorted({r["d_sae"] for r in runs})
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{m}" y1="{H - m}" x2="{W - m}" y2="{H - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{H - m}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">log10 compute (d_sae × tokens)</text>',
             f'<text x="15" y="{H / 2}" text-anchor="middle" transform="rotate(-90 15 {H / 2})">log10 held-out loss</text>']
    for t in np.linspace(cx0, cx1, 5):
        parts.append(f'<text x="{px(t):.1f}" y="{H - m + 15}" text-anchor="middle">{t:.2f}</text>')
    for t in np.linspace(ly0, ly1, 5):
        parts.append(f'<text x="{m - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.2f}</text>')
    for r, c, v in zip(runs, cs, ls):
        color = palette[sizes.index(r["d_sae"]) % len(palette)]
        parts.append(f'<circle cx="{px(c):.1f}" cy="{py(v):.1f}" r="4" fill="{color}"/>')
    front = fitted["frontier"]
    pts = " ".join(f"{px(math.log10(r['compute'])):.1f},{py(math.log10(r['loss'])):.1f}" for r in front)
    parts.append(f'<polyline points="{pts}" fill="none" stroke="black" stroke-dasharray="4 3"/>')
    law = fitted["loss_vs_compute"]
    if law["A"] is not None and math.isfinite(law["exponent"]):
        y0 = math.log10(law["A"]) + law["exponent"] * cx0
        y1 = math.log10(law["A"]) + law["exponent"] * cx1
        parts.append(f'<line x1="{px(cx0):.1f}" y1="{py(y0):.1f}" x2="{px(cx1):.1f}" y2="{py(y1):.1f}" stroke="#d62728"/>')
        parts.append(f'<text x="{W - m}" y="{m}" text-anchor="end" fill="#d62728">L ∝ C^{law["exponent"]:.3f}</text>')
    for i, s in enumerate(sizes):
        parts.append(f'<circle cx="{m + 10}" cy="{m + 15 * i}" r="4" fill="{palette[i % len(palette)]}"/>'
                     f'<text x="{m + 18}" y="{m + 15 * i + 4}">d_sae {s}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def sweep(
    store: ActivationStore | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    d_saes: list[int],
    token_counts: list[int],
    cfg: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train every (d_sae, tokens) pair into ``out_dir``, fit the scaling laws, write the table and plot."""
    store = open_store(store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg or TrainConfig()
    hook = base.hook or store.hooks[0]
    n_train = training_rows(store, base.holdout_fraction)
    if n_train == store.num_rows:
        raise ValueError(f"{store.path}: no held-out rows to measure the loss on; set holdout_fraction > 0")
    runs = []
    for d_sae in d_saes:
        for tokens in token_counts:
            run_cfg = TrainConfig(**{**base.to_dict(), "d_sae": d_sae, "num_tokens": tokens})
            folder = out / f"{base.architecture}-{d_sae}-{tokens}"
            sae = train(store, folder, run_cfg)
            facts = read_cfg(folder)["metadata"]["saecore"]
            # relu's λ is the run's own (the steered one when l1_coefficient is 0, automatic).
            lam = facts.get("sparsity_coefficient", base.l1_coefficient)
            loss = heldout_loss(sae, store, hook, n_train, store.num_rows, facts["input_scale"], lam)
            runs.append({"d_sae": d_sae, "tokens": tokens, "compute": d_sae * tokens, "loss": loss, "sae": str(folder)})
    fitted = fit(runs)
    result = {"architecture": base.architecture, "store": record_path(store.path), "runs": runs, "fit": fitted,
              "compute": "d_sae x tokens", "loss": "held-out training objective, scaled units"}
    write_text(out / "sweep.json", json.dumps(result, indent=2))
    rows = [["d_sae", "tokens", "compute", "heldout_loss", "on_frontier"]]
    on_front = {(r["d_sae"], r["tokens"]) for r in fitted["frontier"]}
    rows += [[r["d_sae"], r["tokens"], r["compute"], f"{r['loss']:.6g}", (r["d_sae"], r["tokens"]) in on_front] for r in runs]
    with atomic_target(out / "sweep.csv") as tmp, tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    write_text(out / "sweep.svg", svg_plot(runs, fitted, f"{base.architecture} SAE: loss vs compute"))
    return result


def format_report(result: dict[str, Any]) -> str:
    f = result["fit"]
    lines = [f"{'d_sae':>8} {'tokens':>10} {'compute':>12} {'loss':>10}"]
    lines += [f"{r['d_sae']:>8} {r['tokens']:>10} {r['compute']:>12.3g} {r['loss']:>10.4g}" for r in result["runs"]]
    lines.append(f"loss ∝ compute^{f['loss_vs_compute']['exponent']:.3f} on the frontier "
                 f"({len(f['frontier'])} of {len(result['runs'])} runs)")
    lines.append(f"compute-optimal: d_sae ∝ C^{f['d_sae_opt']['exponent']:.3f}, tokens ∝ C^{f['tokens_opt']['exponent']:.3f}")
    best = f["frontier"][-1]
    lines.append(f"best at the largest compute: d_sae {best['d_sae']}, tokens {best['tokens']} (loss {best['loss']:.4g})")
    return "\n".join(lines)


@dataclass
class SweepConfig:
    """The grid of a ``saecore sweep`` (every other training option comes from :class:`TrainConfig`)."""

    d_sae: list[int] = option(default_factory=lambda: [1024, 2048, 4096], ge=1, le=1 << 24)
    """Dictionary sizes of the grid."""

    tokens: list[int] = option(default_factory=lambda: [2**18, 2**19, 2**20], ge=1, le=1 << 50)
    """Training token counts of the grid."""

    holdout_fraction: float = option(0.05, gt=0, lt=1)
    """Trailing fraction of the store held out to measure each run's loss on."""

    def __post_init__(self) -> None:
        validate(self)


# SweepConfig sets these per grid point; the rest of TrainConfig is shared by every run.
_GRID_FIELDS = ("d_sae", "num_tokens", "holdout_fraction")


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="activation store or run directory")
    parser.add_argument("out", help="output folder (one SAE per grid point, sweep.json/.csv/.svg)")
    add_arguments(parser, SweepConfig)
    add_arguments(parser, TrainConfig, skip=_GRID_FIELDS)


def cli_run(args: argparse.Namespace) -> int:
    grid = from_args(SweepConfig, args)
    cfg = from_args(TrainConfig, args, d_sae=TrainConfig.d_sae, num_tokens=0, holdout_fraction=grid.holdout_fraction)
    result = sweep(args.store, args.out, grid.d_sae, grid.tokens, cfg)
    print(format_report(result))
    print(f"wrote {Path(args.out) / 'sweep.csv'} and {Path(args.out) / 'sweep.svg'}")
    return 0
