"""saecore vs SAELens on the same SynthSAEBench-style data, every architecture, in one run.

Both sides train on the same training samples (the store ``saecore bench-synth`` writes), in the same
order (saecore's seeded ``ShuffledBatches`` feeds SAELens' trainer too), with the same batch, the same
number of samples, the same width, k / target L0 and learning rate; everything else is each library's
own default. SAELens' side is its trainer (``SAETrainer``) with the trainer settings of its synthetic
runner (``SyntheticSAERunnerConfig``: Adam 0.9/0.999, constant lr, no warm-up, gradient clipping 1,
no input normalisation, dead window 1000 steps). Both sides' SAEs are scored by
``saecore.synth.evaluate_synth`` on the same evaluation samples; SAELens' in its inference form (what
``save_inference_model`` writes: batchtopk and matryoshka become JumpReLU with the learned threshold),
as saecore's are (batchtopk/matryoshka use their learned threshold at inference).

relu and jumprelu: saecore steers λ to L0 = k; SAELens gets its default coefficients
(``l1_coefficient`` 1.0, ``l0_coefficient`` 1.0, step loss) unless ``--saelens-l1`` / ``--saelens-l0``
say otherwise, or ``--saelens-jumprelu-quadratic`` switches SAELens' jumprelu to its own L0 steering
(the quadratic loss around ``target_l0`` = k); the table flags an L0 far from k.

    PYTHONPATH=python python bench/synth_vs_saelens.py [--preset small] [--archs relu,topk,...]
        [--seed 42] [--samples N] [--eval-samples N] [--lr LR] [--out runs/synth-vs-saelens]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from saecore import run as layout
from saecore.bench_synth import (
    HOOK,
    BenchSynthConfig,
    target_l0,
    train_config,
    write_training_store,
)
from saecore.sae import ARCHITECTURES, default_matryoshka_groups
from saecore.synth import SynthConfig, SynthModel, evaluate_synth
from saecore.training import ShuffledBatches, TrainConfig, train, training_rows

RESULT_FILE = "synth_vs_saelens.json"
SIDES = ("saecore", "SAELens")
METRICS = ("mcc", "f1", "explained_variance", "l0", "dead_fraction")
L0_OFF_FACTOR = 1.5  # an L0 outside [k/1.5, 1.5k] is flagged as off target


def saelens_default(config_class: type, name: str) -> Any:
    """A field's default in one of SAELens' config dataclasses (its documented default)."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def saelens_training_sae(arch: str, d_in: int, width: int, k: int, coefficients: dict[str, float]) -> Any:
    """SAELens' training SAE for a saecore architecture name, its defaults apart from width and k."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    shape = {"d_in": d_in, "d_sae": width}
    # SAELens' own L0 steering (Gemma Scope 2's quadratic penalty around target_l0), when asked for.
    jumprelu_mode = {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(k)} if coefficients.get("quadratic") else {}
    # The same nested prefixes as saecore's matryoshka (Bussmann et al.'s d/16, d/8, d/4, d/2, d).
    widths = list(itertools.accumulate(default_matryoshka_groups(width)))
    cfg = {
        "relu": lambda: StandardTrainingSAEConfig(**shape, l1_coefficient=coefficients["l1"]),
        "topk": lambda: TopKTrainingSAEConfig(**shape, k=k),
        "batchtopk": lambda: BatchTopKTrainingSAEConfig(**shape, k=float(k)),
        "jumprelu": lambda: JumpReLUTrainingSAEConfig(**shape, l0_coefficient=coefficients["l0"], **jumprelu_mode),
        "matryoshka": lambda: MatryoshkaBatchTopKTrainingSAEConfig(**shape, k=float(k), matryoshka_widths=widths),
    }[arch]()
    return get_sae_training_class(cfg.architecture())[0](cfg)


def saelens_trainer_config(sae_cfg: Any, samples: int, batch_size: int, lr: float) -> Any:
    """The trainer settings of SAELens' synthetic-data runner (no wandb, no checkpoints, no evals)."""
    from sae_lens.config import LoggingConfig
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunnerConfig

    runner = SyntheticSAERunnerConfig(synthetic_model="unused: the data come from saecore's store", sae=sae_cfg,
                                      training_samples=samples, batch_size=batch_size, lr=lr, device="cpu",
                                      checkpoint_path=None, output_path=None,
                                      logger=LoggingConfig(log_to_wandb=False))
    return runner.to_sae_trainer_config()


def same_batches(store: Any, cfg: TrainConfig) -> Iterator[torch.Tensor]:
    """The batches saecore's trainer reads under ``cfg`` (rows, batch, shuffle window, seed), in its order."""
    rows = training_rows(store, cfg.holdout_fraction)
    stream = ShuffledBatches(store, HOOK, rows, cfg.batch_size, cfg.shuffle_buffer_rows, cfg.seed).batches(0)
    return (torch.from_numpy(x) for x, _ in stream)


def train_saelens(arch: str, store: Any, folder: Path, tcfg: TrainConfig, run: dict[str, Any]) -> tuple[Any, float, int]:
    """Train SAELens' SAE with its own trainer on saecore's batches (``tcfg``'s order, saecore's lr);
    return its inference SAE, the training seconds and the samples it trained on."""
    from sae_lens.saes.sae import SAE
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(run["seed"])
    sae = saelens_training_sae(arch, store.d_model(HOOK), run["width"], run["k"], run["saelens_coefficients"])
    trainer_cfg = saelens_trainer_config(sae.cfg, run["samples"], run["batch_size"], run["lr"])
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=same_batches(store, tcfg))
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    sae.save_inference_model(folder)
    return SAE.load_from_disk(folder), seconds, trainer.n_training_samples


def train_saecore(store: Any, folder: Path, cfg: TrainConfig) -> tuple[Any, float, dict[str, Any]]:
    """Train saecore's SAE from scratch; return it, its seconds and its training facts (cfg.json)."""
    shutil.rmtree(folder, ignore_errors=True)  # a finished SAE would be reloaded, not retrained
    t0 = time.perf_counter()
    sae = train(store, folder, cfg)
    seconds = time.perf_counter() - t0
    return sae, seconds, json.loads((folder / layout.CFG_FILE).read_text())["metadata"]["saecore"]


def run_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Write the store, train every architecture on both sides, score both; returns the report."""
    out = Path(args.out)
    bench = BenchSynthConfig(out=out, preset=args.preset, architectures=args.archs, seed=args.seed,
                             lr=args.lr if args.lr else -1.0, progress=False)
    model = SynthModel(SynthConfig.preset(args.preset, seed=args.seed))
    width = bench.resolved("width")
    store = write_training_store(layout.Run(out).activations, model, args.samples or bench.resolved("train_samples"))
    k = max(1, round(target_l0(model, width)))
    # Whole batches: saecore drops a last incomplete one; SAELens' trainer would draw one more.
    run = {"preset": args.preset, "seed": args.seed, "width": width, "k": k, "batch_size": bench.batch_size,
           "samples": store.num_rows // bench.batch_size * bench.batch_size,
           "eval_samples": args.eval_samples or bench.resolved("eval_samples"), "lr": args.lr,
           "saelens_coefficients": {"l1": args.saelens_l1, "l0": args.saelens_l0,
                                    "quadratic": args.saelens_jumprelu_quadratic}}
    results: dict[str, dict[str, Any]] = {}
    for arch in args.archs:
        tcfg = train_config(bench, arch, width, k)
        sae, seconds, facts = train_saecore(store, layout.Run(out).sae(arch), tcfg)
        lr = float(facts["chosen"]["lr"])
        results[arch] = {"saecore": {**evaluate_synth(sae, model, run["eval_samples"], block=1),
                                     "train_seconds": seconds, "lr": lr, "samples_seen": facts["tokens"],
                                     "chosen": facts["chosen"], "sparsity_coefficient": facts["sparsity_coefficient"]}}
        # SAELens gets the learning rate saecore used (its automatic rule's choice, or --lr).
        lens, seconds, seen = train_saelens(arch, store, out / "saelens" / arch, tcfg, {**run, "lr": lr})
        results[arch]["SAELens"] = {**evaluate_synth(lens, model, run["eval_samples"], block=1),
                                    "train_seconds": seconds, "lr": lr, "samples_seen": seen}
        print(format_rows(arch, results[arch], run["k"]), flush=True)
    report = {"run": run, "synth_model": model.cfg.to_dict(), "results": results,
              "saelens_version": _saelens_version(), "torch_threads": torch.get_num_threads()}
    (out / RESULT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _saelens_version() -> str:
    import sae_lens

    return sae_lens.__version__


HEADER = "| arch | side | train s | MCC | F1 | EV | L0 | dead | note |\n|---|---|---|---|---|---|---|---|---|"


def format_rows(arch: str, sides: dict[str, dict[str, Any]], k: int) -> str:
    """Two table rows (saecore, SAELens) and a ratio row (saecore ÷ SAELens) for one architecture."""
    lines = []
    for side in SIDES:
        m = sides[side]
        off = not (k / L0_OFF_FACTOR <= m["l0"] <= k * L0_OFF_FACTOR)
        note = f"L0 far from k = {k}" if off else ""
        lines.append(f"| {arch} | {side} | {m['train_seconds']:.1f} | {m['mcc']:.3f} | {m['f1']:.3f} | "
                     f"{m['explained_variance']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.3f} | {note} |")
    a, b = sides["saecore"], sides["SAELens"]
    ratio = [_ratio(a[c], b[c]) for c in ("train_seconds", *METRICS)]
    lines.append(f"| {arch} | ratio saecore/SAELens | {' | '.join(ratio)} | |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"


def format_table(report: dict[str, Any]) -> str:
    k = report["run"]["k"]
    return "\n".join([HEADER, *(format_rows(a, s, k) for a, s in report["results"].items())])


def parse_args(argv: list[str]) -> argparse.Namespace:
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["small", "16k"], default="small")
    p.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architectures")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--samples", type=int, default=0, help="training samples (both sides); 0 → the preset's")
    p.add_argument("--eval-samples", type=int, default=0, help="evaluation samples; 0 → the preset's")
    p.add_argument("--lr", type=float, default=0.0, help="both sides' lr; 0 → saecore's automatic choice")
    p.add_argument("--saelens-l1", type=float, default=saelens_default(StandardTrainingSAEConfig, "l1_coefficient"),
                   help="SAELens relu l1_coefficient (default: SAELens' own)")
    p.add_argument("--saelens-l0", type=float, default=saelens_default(JumpReLUTrainingSAEConfig, "l0_coefficient"),
                   help="SAELens jumprelu l0_coefficient (default: SAELens' own)")
    p.add_argument("--saelens-jumprelu-quadratic", action="store_true",
                   help="SAELens jumprelu with its quadratic L0 loss around target_l0 = k (its own L0 steering)")
    p.add_argument("--out", default="runs/synth-vs-saelens")
    args = p.parse_args(argv)
    args.archs = args.archs.split(",")
    bad = [a for a in args.archs if a not in ARCHITECTURES]
    if bad:
        p.error(f"--archs: unknown {bad}; choose from {ARCHITECTURES}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    report = run_comparison(args)
    print("\n" + format_table(report))
    print(f"\nwrote {Path(args.out) / RESULT_FILE}")


if __name__ == "__main__":
    main(sys.argv[1:])
