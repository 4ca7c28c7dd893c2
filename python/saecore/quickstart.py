"""``saecore quickstart``: the whole pipeline on the built-in model and corpus, in minutes on a CPU.

The pipeline is a list of named :class:`Step`\\ s. Each step knows its output and whether that output is
complete, so a rerun (after an interruption, say) skips finished steps and resumes the unfinished one.
Later stages add themselves by appending to :data:`STEPS`.

Sizing: the default (65,536 tokens at ``blocks.6.hook_resid_post``). Measured on the 2-core machine:
stopping after block 6, SmolLM2 costs ~0.7 ms of CPU per token (≈1,400 tokens/s on one core), so the
harvest takes about a minute on an idle machine, leaving the later stages most of the 10-minute budget.
Under heavy contention (load average 9-14 from other jobs) the harvest alone took 7.7 min (1.6 GB peak
RSS); lower ``--tokens`` on a busy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import tables
from .config import add_arguments, from_args, option, validate
from .errors import SaecoreError
from .run import METRICS_FILE, PAGES_INDEX_FILE, Run
from .saelens import read_cfg


@dataclass
class QuickstartConfig:
    """What the quickstart runs on; every step reads what it needs from here."""

    run: Path = Path("runs/quickstart")
    """The run directory (``runs/NAME/`` layout)."""
    model: str = "smollm2-135m"
    """Built-in model name or local HF folder."""
    corpus: str = "default"
    """Built-in corpus name or path."""
    hook: str = "blocks.6.hook_resid_post"
    """Hook point harvested (an early-middle layer keeps the forward pass short)."""
    tokens: int = option(65_536, ge=1, le=1 << 40)
    """Tokens fed to the model (512 contexts of 128)."""
    context_length: int = option(128, ge=2, le=1 << 17)
    """Tokens per context, BOS included."""
    batch_size: int = option(8, ge=1, le=1 << 16)
    """Contexts per forward pass."""
    dtype: str = "float16"
    """Storage dtype of the activations."""
    norm_outlier_factor: float | None = 10.0
    """Drop tokens whose norm exceeds this multiple of the median (attention-sink tokens)."""

    d_sae: int = option(4096, ge=1, le=1 << 24)
    """Latents of the quickstart's TopK SAE."""
    k: int = option(32, ge=1, le=1 << 24)
    """Active latents per token."""
    train_epochs: int = option(8, ge=1, le=10_000)
    """Passes over the harvested tokens (the quickstart's store is small; more passes, better features)."""
    train_batch_size: int = option(2048, ge=1, le=1 << 24)
    """Tokens per training step."""
    sae_name: str = "topk-4k"
    """Folder name of the SAE under ``saes/``, ``features/`` and ``index/``."""
    ray: str | None = option(None, const="local", metavar="ADDRESS")
    """Run harvest, encode, index and pages on a Ray cluster: join ADDRESS, or start a local one when no address is given."""

    def __post_init__(self) -> None:
        self.run = Path(self.run)
        validate(self)
        if self.tokens < self.context_length:
            raise ValueError(f"tokens ({self.tokens}) must be at least one context ({self.context_length})")

    @property
    def layout(self) -> Run:
        """Where the run keeps things (:class:`saecore.run.Run`)."""
        return Run(self.run)

    @property
    def activations(self) -> Path:
        return self.layout.activations

    @property
    def sae_dir(self) -> Path:
        return self.layout.sae(self.sae_name)

    @property
    def features(self) -> Path:
        return self.layout.features(self.sae_name)

    @property
    def index_dir(self) -> Path:
        return self.layout.index(self.sae_name)

    @property
    def pages(self) -> Path:
        return self.layout.pages


@dataclass
class Step:
    """One named stage of the quickstart."""

    name: str
    """Short name shown in the progress lines."""
    output: Callable[[QuickstartConfig], Path]
    """Where the step writes."""
    is_done: Callable[[QuickstartConfig], bool]
    """True when the output is complete (the step is then skipped)."""
    run: Callable[[QuickstartConfig], None]
    """Make (or resume making) the output."""
    summary: Callable[[QuickstartConfig], str]
    """One line describing the finished output."""


# -- step: harvest ---------------------------------------------------------------------------------
def _harvest_done(cfg: QuickstartConfig) -> bool:
    from .activations import ActivationStore

    try:
        ActivationStore(cfg.activations)
        return True
    except (OSError, SaecoreError):
        return False


def _harvest_run(cfg: QuickstartConfig) -> None:
    from .harvesting import HarvestConfig, harvest

    harvest_cfg = HarvestConfig(
        hooks=[cfg.hook],
        context_length=cfg.context_length,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,  # type: ignore[arg-type]
        max_tokens=cfg.tokens,
        norm_outlier_factor=cfg.norm_outlier_factor,
        ray=cfg.ray,
    )
    harvest(cfg.model, cfg.corpus, cfg.activations, harvest_cfg)


def _harvest_summary(cfg: QuickstartConfig) -> str:
    from .activations import ActivationStore

    s = ActivationStore(cfg.activations)
    c = s.attrs.get("counters", {})
    return (
        f"{s.num_rows:,} rows x {s.d_model()} ({s.attrs['dtype']}) at {cfg.hook} of {s.attrs['model']}; "
        f"excluded {c.get('excluded_bos', 0)} BOS, {c.get('excluded_special', 0)} special, "
        f"{c.get('excluded_norm', 0)} high-norm tokens"
    )


# -- step: train -------------------------------------------------------------------------------------
def _training_facts(cfg: QuickstartConfig) -> dict:

    try:
        meta = read_cfg(cfg.sae_dir).get("metadata") or {}
    except (OSError, ValueError):
        return {}
    return meta.get("saecore") or {}


def _train_run(cfg: QuickstartConfig) -> None:
    from .activations import ActivationStore
    from .training import train

    store = ActivationStore(cfg.activations)
    train(
        store,
        cfg.sae_dir,
        architecture="topk",
        d_sae=cfg.d_sae,
        k=cfg.k,
        num_tokens=cfg.train_epochs * store.num_rows,
        batch_size=cfg.train_batch_size,
        checkpoint_every_steps=50,
    )


def _train_summary(cfg: QuickstartConfig) -> str:
    f = _training_facts(cfg)
    return (
        f"TopK SAE, {cfg.d_sae} latents, k={cfg.k}; {f.get('steps')} steps, {f.get('tokens'):,} tokens; "
        f"dead fraction {f.get('dead_fraction', float('nan')):.3f}"
    )


# -- step: eval --------------------------------------------------------------------------------------
def _eval_run(cfg: QuickstartConfig) -> None:
    from .evaluate import evaluate

    evaluate(cfg.sae_dir, cfg.activations, model=cfg.model)


def _eval_summary(cfg: QuickstartConfig) -> str:
    import json

    m = json.loads((cfg.sae_dir / METRICS_FILE).read_text())
    parts = [f"{k} {m[k]:.3f}" for k in ("l0", "explained_variance", "ce_loss_recovered", "kl_div") if k in m]
    return "held out: " + ", ".join(parts)


# -- step: encode ------------------------------------------------------------------------------------
def _encode_done(cfg: QuickstartConfig) -> bool:
    from .features import FeatureStore

    try:
        fs = FeatureStore(cfg.features)
        return bool(fs.complete and fs.has_csc)
    except (OSError, ValueError, SaecoreError):
        return False


def _encode_run(cfg: QuickstartConfig) -> None:
    from .encode import encode

    encode(cfg.activations, cfg.sae_dir, cfg.features, ray=cfg.ray)


def _encode_summary(cfg: QuickstartConfig) -> str:
    from .features import FeatureStore

    fs = FeatureStore(cfg.features)
    return f"{fs.n_rows:,} tokens x {fs.d_sae} features, {fs.nnz:,} nonzeros in {fs.num_shards} shards"


# -- step: index (statistics, top-k, samples, logit lens, neighbours, map) -----------------------------
def _index_run(cfg: QuickstartConfig) -> None:
    from . import geometry
    from .index import index
    from .logit_lens import write_logit_lens
    from .models import load
    from .sae import SAE

    index(cfg.features, cfg.index_dir, activations=cfg.activations, ray=cfg.ray)
    model, tokenizer = load(cfg.model)
    sae = SAE.load(cfg.sae_dir, device="cpu")
    write_logit_lens(sae, model, tokenizer, tables.LOGIT_LENS.path(cfg.index_dir))
    write_logit_lens(sae, model, tokenizer, tables.LOGIT_LENS_ENCODER.path(cfg.index_dir), source="encoder")
    directions = geometry.load_directions(cfg.sae_dir)
    tables.NEIGHBOURS.write(geometry.neighbours_table(directions, [], k=10), tables.NEIGHBOURS.path(cfg.index_dir))
    tables.ENC_DEC_COSINE.write(geometry.enc_dec_cosine(directions), tables.ENC_DEC_COSINE.path(cfg.index_dir))
    table, _method = geometry.feature_map([directions], "umap")
    # Written last: its presence marks the whole step complete.
    tables.MAP.write(table, tables.MAP.path(cfg.index_dir))


def _index_summary(cfg: QuickstartConfig) -> str:
    stats = tables.STATS.read(cfg.index_dir)
    if stats is None:
        raise FileNotFoundError(f"{tables.STATS.path(cfg.index_dir)}: missing; rerun `saecore index`")
    alive = sum(1 for c in stats.column("count").to_pylist() if c > 0)
    return f"{alive:,} of {stats.num_rows:,} features fire; tables: " + ", ".join(
        sorted(p.stem for p in cfg.index_dir.glob("*.parquet"))
    )


# -- step: pages -------------------------------------------------------------------------------------
def _pages_run(cfg: QuickstartConfig) -> None:
    from .pages import build_pages

    build_pages(cfg.run, ray=cfg.ray)


def _pages_summary(cfg: QuickstartConfig) -> str:
    return f"open file://{(cfg.pages / PAGES_INDEX_FILE).resolve()}"


STEPS: list[Step] = [
    Step("harvest", lambda c: c.activations, _harvest_done, _harvest_run, _harvest_summary),
    Step("train", lambda c: c.sae_dir, lambda c: bool(_training_facts(c).get("complete")), _train_run, _train_summary),
    Step("eval", lambda c: c.sae_dir / METRICS_FILE, lambda c: (c.sae_dir / METRICS_FILE).exists(), _eval_run,
         _eval_summary),
    Step("encode", lambda c: c.features, _encode_done, _encode_run, _encode_summary),
    Step("index", lambda c: c.index_dir, lambda c: tables.MAP.path(c.index_dir).exists(), _index_run, _index_summary),
    Step("pages", lambda c: c.pages, lambda c: (c.pages / PAGES_INDEX_FILE).exists(), _pages_run, _pages_summary),
]


def run_steps(cfg: QuickstartConfig, steps: list[Step] | None = None, out=sys.stdout) -> None:
    """Run each step whose output is not complete yet, then print what was made and where."""
    steps = STEPS if steps is None else steps
    cfg.run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i, step in enumerate(steps, start=1):
        tag = f"[{i}/{len(steps)}] {step.name}"
        if step.is_done(cfg):
            print(f"{tag}: already complete, skipped ({step.output(cfg)})", file=out, flush=True)
            continue
        print(f"{tag} ...", file=out, flush=True)
        t = time.perf_counter()
        step.run(cfg)
        print(f"{tag}: done in {time.perf_counter() - t:.0f} s", file=out, flush=True)
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f} s; made in {cfg.run}/:", file=out)
    for step in steps:
        print(f"  {step.name:<10} {step.output(cfg)}\n             {step.summary(cfg)}", file=out)


# -- CLI ---------------------------------------------------------------------------------------------
# The quick start's command line stays small; the other fields are its fixed recipe.
CLI_FIELDS = ("run", "tokens", "model", "corpus", "hook", "ray")


def cli_configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, QuickstartConfig, only=CLI_FIELDS)


def cli_run(args: argparse.Namespace) -> int:
    run_steps(from_args(QuickstartConfig, args))
    return 0
