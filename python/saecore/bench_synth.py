"""``saecore bench-synth``: train SAEs on SynthSAEBench-style synthetic data and score them against the
ground truth (MCC, F1, explained variance, L0, dead fraction, uniqueness), beside the published numbers.

Steps, each resumable: build the seeded synthetic model (:mod:`saecore.synth`) → write its training
samples as an activation store (``OUT/activations.zarr``, hook ``synth``) → train each architecture with
the ordinary trainer (``OUT/saes/ARCH``) → evaluate on fresh samples → ``OUT/bench_synth.json`` and a
printed table. The ``small`` preset runs on 2 CPU cores in minutes; ``16k`` is the published benchmark
model's recipe (SynthSAEBench-16k, width 4096, L0 25) and wants a GPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import run as layout
from ._atomic import write_json
from .activations import ActivationStore, ActivationStoreWriter
from .config import add_arguments, from_args, option, validate
from .sae import ARCHITECTURES
from .synth import SynthConfig, SynthModel, evaluate_synth
from .training import TrainConfig, train

# SynthSAEBench-16k, SAE width 4096, L0 25 (Chanin & Garriga-Alonso 2026): F1 and MCC.
PUBLISHED = {
    "setting": "SynthSAEBench-16k (16,384 features in 768 dims), width 4096, L0 25, 200M samples, lr 3e-4, batch 1024",
    "matryoshka": {"f1": 0.879, "mcc": 0.793},
    "batchtopk": {"f1": 0.732, "mcc": 0.757},
    "jumprelu": {"f1": 0.732, "mcc": 0.753},
    "relu": {"f1": 0.556, "mcc": 0.604},
}
# Per preset: training samples, evaluation samples, SAE width (published: N/4), learning rate.
PRESET_RUN = {
    "small": {"train_samples": 1 << 19, "eval_samples": 1 << 15, "width": 512, "lr": 0.0},
    "16k": {"train_samples": 200_000_000, "eval_samples": 500_000, "width": 4096, "lr": 3e-4},
}
HOOK = "synth"
CHUNK_ROWS = 8192


@dataclass(kw_only=True)
class BenchSynthConfig:
    """Options of ``saecore bench-synth``."""

    out: Path = Path("runs/bench-synth")
    """Output folder: the training store, one SAE per architecture, bench_synth.json."""

    preset: Literal["small", "16k"] = "small"
    """Synthetic model: ``small`` (2,048 features in 96 dims; minutes on 2 cores) or ``16k`` (published)."""

    architectures: list[Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]] = option(
        default_factory=lambda: ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"], flag="--arch")
    """Architectures to train and score."""

    width: int = option(0, ge=0, le=1 << 24)
    """SAE latents; 0 → the preset's (small 512, 16k 4096: a quarter of the true features)."""

    k: int = option(0, ge=0, le=1 << 16)
    """Target L0 (topk, batchtopk, matryoshka); 0 → the measured mean number of active true features
    among the ``width`` most frequent ones (≈25 for 16k at width 4096, as published)."""

    train_samples: int = option(0, ge=0, le=1 << 40)
    """Training samples (written once, one epoch); 0 → the preset's (small 2^19, 16k 2·10^8)."""

    eval_samples: int = option(0, ge=0, le=1 << 32)
    """Fresh samples for the metrics; 0 → the preset's (small 2^15, 16k 5·10^5)."""

    batch_size: int = option(1024, ge=1, le=1 << 24)
    """Training batch (published: 1024)."""

    lr: float = option(-1.0, ge=-1, le=1)
    """Learning rate; −1 → the preset's (small: saecore's width-scaled default, 16k: 3e-4 as published)."""

    l1_coefficient: float = option(TrainConfig.l1_coefficient, ge=0)
    """relu sparsity λ; 0 → steered to L0 = k (the trainer's automatic λ)."""

    l0_coefficient: float = option(TrainConfig.l0_coefficient, ge=0)
    """jumprelu sparsity λ; 0 → steered to L0 = k (the trainer's automatic λ)."""

    seed: int = option(42, ge=0, lt=1 << 31)
    """Seeds the synthetic model, its samples, and the SAEs."""

    device: str | None = None
    """``cuda`` / ``cpu``; None → CUDA when present."""

    progress: bool = True
    """Progress bars while training."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        validate(self)
        if self.preset not in PRESET_RUN:
            raise ValueError(f"BenchSynthConfig.preset must be one of {sorted(PRESET_RUN)}, got {self.preset!r}")
        bad = [a for a in self.architectures if a not in ARCHITECTURES]
        if bad or not self.architectures:
            raise ValueError(f"BenchSynthConfig.architectures: unknown {bad}; choose from {ARCHITECTURES}")
        for name in ("width", "k", "train_samples", "eval_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"BenchSynthConfig.{name} must be >= 0, got {getattr(self, name)}")

    def resolved(self, name: str) -> Any:
        """A run option with the preset's value where this config leaves it at 0 (−1 for lr)."""
        value = getattr(self, name)
        unset = value < 0 if name == "lr" else value == 0
        return PRESET_RUN[self.preset][name] if unset else value


def write_training_store(path: Path, model: SynthModel, rows: int) -> ActivationStore:
    """The model's samples from blocks 0, 1, … as an activation store (resumes a partial one)."""
    spec = {"model": "synth", "hooks": [HOOK], "dtype": "float32", "synth": model.cfg.to_dict(), "rows": rows}
    writer = ActivationStoreWriter.open(path, spec, {HOOK: model.cfg.hidden_dim}, capacity_rows=rows,
                                        chunk_rows=CHUNK_ROWS)
    if writer.state.complete:
        return ActivationStore(path)
    for b in range(writer.batches_done, -(-rows // CHUNK_ROWS)):
        n = min(CHUNK_ROWS, rows - b * CHUNK_ROWS)
        x, _ = model.sample(n, block=b)
        ids = np.arange(b * CHUNK_ROWS, b * CHUNK_ROWS + n)
        writer.append({HOOK: x.numpy()}, np.zeros(n, np.int32), ids, np.zeros(n, np.int32))
    return writer.finish({"context_length": 1})


def target_l0(model: SynthModel, width: int, rows: int = 16384) -> float:
    """Mean number of active true features among the ``width`` most frequent (ids 0…width−1)."""
    _, f = model.sample(rows, block=2_000_000)
    return float((f[:, :width] > 0).sum(1).float().mean())


def train_config(cfg: BenchSynthConfig, arch: str, width: int, k: int) -> TrainConfig:
    """The trainer's config for one architecture of the benchmark (its defaults apart from these)."""
    return TrainConfig(architecture=arch, d_sae=width, k=k, batch_size=cfg.batch_size, lr=cfg.resolved("lr"),
                       l1_coefficient=cfg.l1_coefficient, l0_coefficient=cfg.l0_coefficient, seed=cfg.seed,
                       holdout_fraction=0.0, device=cfg.device, progress=cfg.progress)


def run_bench(cfg: BenchSynthConfig) -> dict[str, Any]:
    """Every step of the module docstring; returns (and writes) the result JSON."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SynthModel(SynthConfig.preset(cfg.preset, seed=cfg.seed))
    width = cfg.resolved("width")
    measured_l0 = target_l0(model, width)
    k = cfg.k or max(1, round(measured_l0))
    store = write_training_store(layout.Run(out).activations, model, cfg.resolved("train_samples"))
    results: dict[str, Any] = {}
    for arch in cfg.architectures:
        t0 = time.time()
        sae = train(store, layout.Run(out).sae(arch), train_config(cfg, arch, width, k))
        metrics = evaluate_synth(sae, model, cfg.resolved("eval_samples"), block=1)
        results[arch] = {**metrics, "train_seconds": round(time.time() - t0, 1)}
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out), "width": width, "k": k, "lr": cfg.resolved("lr"),
                   "train_samples": cfg.resolved("train_samples"), "eval_samples": cfg.resolved("eval_samples")},
        "synth_model": model.cfg.to_dict(),
        "true_l0_top_width": measured_l0,
        "saecore": results,
        "published": PUBLISHED,
        "comparable_to_published": cfg.preset == "16k" and width == 4096,
    }
    write_json(out / layout.BENCH_SYNTH_FILE, report)
    return report


COLUMNS = ("mcc", "f1", "precision", "recall", "explained_variance", "l0", "dead_fraction", "uniqueness")


def format_table(report: dict[str, Any]) -> str:
    """saecore's metrics per architecture, with the published F1 / MCC beside them."""
    head = ["arch", *COLUMNS, "pub. F1", "pub. MCC", "train s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for arch, m in report["saecore"].items():
        pub = report["published"].get(arch, {})
        cells = [arch, *(f"{m[c]:.3f}" if c != "l0" else f"{m[c]:.1f}" for c in COLUMNS),
                 f"{pub['f1']:.3f}" if pub else "–", f"{pub['mcc']:.3f}" if pub else "–", f"{m['train_seconds']:.0f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------


def cli_configure(parser: Any) -> None:
    """Options of ``saecore bench-synth``."""
    add_arguments(parser, BenchSynthConfig)


def cli_run(args: Any) -> int:
    """Run ``saecore bench-synth`` and print the table."""
    cfg = from_args(BenchSynthConfig, args)
    report = run_bench(cfg)
    print(format_table(report))
    note = "" if report["comparable_to_published"] else " (published: a different, larger setting; see docs/benchmarks.md)"
    print(f"\nwrote {Path(cfg.out) / layout.BENCH_SYNTH_FILE}{note}")
    return 0
