"""Many SAEs from one model pass, trained on the fly, and the ``saecore train`` verb that picks the path.

``saecore train --model M --corpus C --hooks H1,H2 --sae d_sae=1024,k=16 --sae d_sae=2048,k=32 RUN``
runs the LM once per batch of contexts, stopped after the last hooked layer (:mod:`saecore.hooks`),
tokenised and filtered exactly as ``saecore harvest`` does (:mod:`saecore.harvesting`); the rows go
through one bounded shuffling buffer shared by the hooks, and every SAE (hooks × ``--sae`` specs) takes
one optimisation step per batch. Each SAE is an ordinary :class:`Trainer` (or, under torchrun, a
:class:`DistributedTrainer`) saved in ``RUN/saes/NAME``; nothing else is stored unless ``--write-store``.

* Stream. Rows come in harvest order (LM batch 0, 1, …, the kept rows of each). Window ``w`` is rows
  ``[w·W, (w+1)·W)`` (W = ``--shuffle-buffer-rows``), permuted by a generator seeded with
  ``[seed, 0, 1, w]`` — the row permutation :class:`ShuffledBatches` applies to its windows. Batch ``i``
  is rows ``[i·B, (i+1)·B)`` of the permuted stream, so it is a pure function of the seed, and a store
  harvested with the same settings, read in row order through the same windows, gives the same batches.
  (Store training also permutes the order of its chunks over the epoch, which needs the whole store;
  when the whole run fits one window and one store chunk the two shuffles coincide.)
* Memory per process: the filling window, its permuted copy and one round of LM batches,
  ≈ (2·W + world·contexts·T) × Σ d_hook × 4 bytes (W = 131,072, two hooks of 576: ≈ 1.2 GB).
* Input scale: the mean squared norm of each hook over window 0 (the store path uses the whole store;
  the same when the run fits one window).
* Length: ``--tokens``, else one pass over the corpus, counted by tokenising it first (no forward).
* Several processes (torchrun): LM batches are dealt round-robin over the ranks, each forwards its own
  and the round's kept rows are all-gathered, so every rank sees the one-process stream; each SAE then
  trains on the data × latent grid of :mod:`saecore.distributed` (gradients all-reduced), equal to one
  process. The LM's work divides by the ranks; every rank tokenises the whole corpus.
* Resume: rerun the same command. Each SAE resumes from its checkpoint; the stream skips (without a
  forward, unless ``--norm-outlier-factor`` needs one) the LM batches before the window it restarts in.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import corpus as corpus_mod
from . import harvesting, hooks, models, training
from .activations import ActivationStoreWriter
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .distributed import (
    DistributedTrainer,
    Grid,
    LaunchOptions,
    init_grid,
    launched_distributed,
    train_distributed,
)
from .harvesting import Batch, Exclusions, HarvestConfig
from .run import Run
from .sae import AUXK_FAMILY, SAE
from .training import SigintFlag, TrainConfig, Trainer, cut_batches, show_stats

# TrainConfig fields every SAE of one stream shares (they shape the stream or the run, not one SAE).
SHARED_FIELDS = ("batch_size", "num_tokens", "hook", "shuffle_buffer_rows", "holdout_fraction", "device",
                 "progress", "checkpoint_every_steps")
_SPEC_ALIASES = {"arch": "architecture"}


# --- configuration ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class OnTheFlyConfig:
    """What ``saecore train --model/--corpus`` trains on the fly, besides the TrainConfig flags."""

    hooks: list[str] = option(default_factory=list, flag="--hooks", append=True, metavar="HOOK[,HOOK…]")
    """Hooks to train on, comma-separated or repeated (on the fly; default blocks.6.hook_resid_post)."""

    saes: list[str] = option(default_factory=list, flag="--sae", append=True, metavar="FIELD=VALUE[,…]")
    """One SAE per hook with these train fields changed, e.g. d_sae=2048,k=32 (name=… sets its folder);
    repeatable; none: one SAE per hook with the flags' settings."""

    contexts_per_batch: int = option(8, ge=1, le=1 << 16)
    """Contexts per LM forward (the batch grid of the stream, as harvest's --batch-size)."""

    write_store: bool = False
    """Also write the activations to RUN/activations.zarr (what saecore harvest would write)."""

    def __post_init__(self) -> None:
        self.hooks = list(dict.fromkeys(h.strip() for item in self.hooks for h in item.split(",") if h.strip()))
        self.hooks = self.hooks or [harvesting.DEFAULT_HOOK]
        validate(self)


def parse_spec(text: str) -> dict[str, Any]:
    """``"d_sae=2048,k=32"`` → TrainConfig overrides (values typed like the field), plus ``name``."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig()
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = _SPEC_ALIASES.get(key.strip(), key.strip())
        if not sep or not value.strip():
            raise ValueError(f"--sae {text!r}: {item!r} is not FIELD=VALUE")
        if key == "name":
            out["name"] = value.strip()
        elif key in SHARED_FIELDS or key not in fields:
            allowed = sorted(set(fields) - set(SHARED_FIELDS))
            why = "cannot differ between SAEs of one stream" if key in fields else "is not a training field"
            raise ValueError(f"--sae {text!r}: {key!r} {why}; per-SAE fields: {', '.join(allowed)}, name")
        else:
            out[key] = _typed(key, value.strip(), getattr(base, key), text)
    return out


def _typed(key: str, value: str, like: Any, text: str) -> Any:
    try:
        if isinstance(like, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(like, list):
            return [int(v) for v in value.split(":")]  # matryoshka_groups=128:128:256
        return type(like)(value)
    except ValueError:
        raise ValueError(f"--sae {text!r}: {key}={value!r} is not a {type(like).__name__}") from None


@dataclass
class SAEJob:
    """One SAE of the stream: its folder name, hook and full training config."""

    name: str
    hook: str
    cfg: TrainConfig


def plan_saes(base: TrainConfig, hook_names: list[str], specs: list[str]) -> list[SAEJob]:
    """Hooks × specs, each spec's fields over ``base``; names unique (``HOOK-ARCH-D_SAE[-kK][-FIELDVALUE…]``)."""
    jobs = []
    for hook in hook_names:
        for text in specs or [""]:
            over = parse_spec(text)
            name = over.pop("name", None)
            cfg = TrainConfig(**{**base.to_dict(), **over, "hook": hook, "holdout_fraction": 0.0})
            if name is None:
                extra = "".join(f"-{k}{v}" for k, v in over.items() if k not in ("architecture", "d_sae", "k"))
                k_part = f"-k{cfg.k}" if cfg.architecture in AUXK_FAMILY else ""
                name = f"{cfg.architecture}-{cfg.d_sae}{k_part}{extra}"
            jobs.append(SAEJob(f"{hook}-{name}", hook, cfg))
    names = [j.name for j in jobs]
    if len(set(names)) < len(names):
        raise ValueError(f"two --sae specs give the same SAE folder name ({names}); set name=… in them")
    return jobs


# --- the stream ---------------------------------------------------------------------------------


@dataclass
class StreamInfo:
    """What a :class:`Trainer` asks of its data (the part of :class:`ActivationStore`'s interface it
    uses), for rows streamed from the model instead of read from a store."""

    path: str  # "MODEL on CORPUS", in messages
    hooks: list[str]
    num_rows: int
    dims: dict[str, int]
    norms: dict[str, float]
    attrs: dict[str, Any]
    first_window: dict[str, np.ndarray]
    """Window 0's rows per hook, in stream order: what the trainer may read (its calibration sample)."""
    chunk_rows: int = 1

    @property
    def rows_readable(self) -> int:
        return len(next(iter(self.first_window.values())))

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the stream, from window 0 (the only rows held when training starts)."""
        if stop > self.rows_readable:
            raise ValueError(f"{self.path}: rows {start}..{stop} are past the first window ({self.rows_readable} rows)")
        return self.first_window[hook][start:stop]

    def d_model(self, hook: str | None = None) -> int:
        return self.dims[hook or self.hooks[0]]

    def mean_squared_norm(self, hook: str | None = None) -> float:
        return self.norms[hook or self.hooks[0]]


class ModelStream:
    """The kept rows of every hook, in harvest order, as ``(first row, {hook: rows})`` blocks.

    LM batches are dealt round-robin over the ``world`` ranks; each rank forwards its own and the round's
    rows are all-gathered, so every rank yields the same blocks. ``writer`` (rank 0's, when a store is
    written) receives every batch it has not committed yet, as ``saecore harvest`` would write it;
    ``stored_batches`` (the same on every rank) is how many it held at the start: later batches are
    never skipped."""

    def __init__(self, model: Any, tokenizer: Any, corp: corpus_mod.Corpus, hcfg: HarvestConfig,
                 exclusions: Exclusions, rank: int = 0, world: int = 1,
                 writer: ActivationStoreWriter | None = None, stored_batches: int | None = None,
                 model_name: str = ""):
        self.model, self.tok, self.corp, self.hcfg, self.exclusions = model, tokenizer, corp, hcfg, exclusions
        self.model_name = model_name or models.name_of(model)
        self.label = f"{self.model_name} on {corp.name}"  # names the data in messages
        self.rank, self.world, self.writer, self.stored_batches = rank, world, writer, stored_batches
        self.forward = harvesting._Forward(model, hcfg.hooks, int(model.config.hidden_size), exclusions)

    def batches(self) -> Iterator[Batch]:
        contexts = harvesting.iter_contexts(iter(self.corp), self.tok, self.hcfg.context_length)
        return harvesting.iter_batches(contexts, self.hcfg.batch_size, self.hcfg.max_contexts)

    def count_rows(self) -> int:
        """Rows one pass keeps, from the tokens alone (the norm rule would need the forward)."""
        if self.exclusions.norm_outlier_factor is not None:
            raise ValueError("--norm-outlier-factor on the fly needs --tokens (its rows are known only after "
                             "the forward pass)")
        return sum(int(self.exclusions.keep_mask(b, {})[0].sum()) for b in self.batches())

    def blocks(self, start_row: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Blocks from the one holding ``start_row`` on (LM batches wholly before it are skipped)."""
        pos, pending = 0, []
        norm_rule = self.exclusions.norm_outlier_factor is not None
        for batch in self.batches():
            if norm_rule and batch.index == 0:
                self.forward(batch)  # every rank calibrates the norm threshold on batch 0 (as harvest)
            to_store = self.stored_batches is not None and batch.index >= self.stored_batches
            if not norm_rule and not to_store:
                n = int(self.exclusions.keep_mask(batch, {})[0].sum())
                if pos + n <= start_row:
                    pos += n
                    continue
            pending.append(batch)
            if len(pending) == self.world:
                for first, block in self._round(pending, pos):
                    yield first, block
                    pos = first + len(next(iter(block.values())))
                pending = []
        if pending:
            yield from self._round(pending, pos)

    def _round(self, batches: list[Batch], pos: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        mine = batches[self.rank] if self.rank < len(batches) else None
        local = self._kept(mine) if mine is not None else None
        parts = [local] if self.world == 1 else _gather_objects(local, self.world)
        out = []
        for batch, (acts, keep, counts) in zip(batches, parts, strict=False):
            if self.writer is not None and batch.index >= self.writer.batches_done:
                positions = np.tile(np.arange(batch.input_ids.shape[1], dtype=np.int32), batch.input_ids.shape[0])
                self.writer.append(acts, batch.input_ids.reshape(-1)[keep].astype(np.int32),
                                   batch.doc_ids.reshape(-1)[keep], positions[keep], counters=counts)
            out.append((pos, acts))
            pos += int(keep.sum())
        return out

    def _kept(self, batch: Batch) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
        acts = self.forward(batch)
        keep, counts = self.exclusions.keep_mask(batch, acts)
        return {h: a[keep] for h, a in acts.items()}, keep, counts


def _gather_objects(obj: Any, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def windows(blocks: Iterator[tuple[int, dict[str, np.ndarray]]], window_rows: int,
            first_window: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(w, {hook: rows [w·W, (w+1)·W)})`` in stream order from window ``first_window`` (the last one may
    be short); memory: one window plus one block."""
    start = first_window * window_rows
    parts: list[dict[str, np.ndarray]] = []
    held, w = 0, first_window
    for first, block in blocks:
        n = len(next(iter(block.values())))
        cut = max(0, start - first)  # rows of this block before the first window
        if cut >= n:
            continue
        block = {h: a[cut:] for h, a in block.items()}
        parts.append(block)
        held += n - cut
        start = 0
        while held >= window_rows:
            joined = {h: np.concatenate([p[h] for p in parts]) for h in block}
            yield w, {h: a[:window_rows] for h, a in joined.items()}
            parts, held, w = [{h: a[window_rows:] for h, a in joined.items()}], held - window_rows, w + 1
    if held:
        yield w, {h: np.concatenate([p[h] for p in parts]) for h in parts[0]}


def shuffled_batches(wins: Iterator[tuple[int, dict[str, np.ndarray]]], hook_names: list[str], window_rows: int,
                     batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """``(x of each hook [B, d] float32…, stream rows [B])`` for steps ``start_step, …`` (see the module
    docstring); ``wins`` must start at the window holding row ``start_step·B``."""

    def permuted() -> Iterator[tuple[np.ndarray, ...]]:
        skip = start_step * batch_size
        for w, block in wins:
            perm = np.random.default_rng([seed, 0, 1, w]).permutation(len(block[hook_names[0]]))
            rows = w * window_rows + perm
            lead = max(0, skip - w * window_rows)
            yield (*(block[h][perm][lead:] for h in hook_names), rows[lead:])

    return cut_batches(permuted(), batch_size)


def mean_squared_norms(block: dict[str, np.ndarray]) -> dict[str, float]:
    return {h: float(np.square(a.astype(np.float64)).sum() / max(len(a), 1)) for h, a in block.items()}


# --- training -----------------------------------------------------------------------------------


def train_on_the_fly(
    model: Any = models.BUILTIN_MODEL,
    corpus: Any = "default",
    run_dir: str | Path = "runs/onthefly",
    cfg: TrainConfig | None = None,
    otf: OnTheFlyConfig | None = None,
    hcfg: HarvestConfig | None = None,
    *,
    latent_shards: int = 1,
    on_step: Callable[[str, int, dict[str, float]], None] | None = None,
) -> dict[str, SAE]:
    """Train every SAE of ``otf`` (hooks × specs over ``cfg``) on ``model`` run over ``corpus``, on the fly,
    into ``run_dir/saes/NAME``; returns ``{NAME: SAE}`` (input scale folded, as saved).

    ``hcfg`` sets the tokenisation and exclusions as for ``saecore harvest`` (its hooks, batch size and
    device come from ``otf`` and ``cfg``). Under an initialised process group with several ranks (or
    ``latent_shards`` > 1) the ranks split the LM work and train on the grid. ``on_step(name, step, stats)``
    runs after each SAE's step. Rerunning the same call resumes."""
    cfg, otf = cfg or TrainConfig(), otf or OnTheFlyConfig()
    jobs = plan_saes(cfg, otf.hooks, otf.saes)  # a bad spec fails before the model loads
    grid, device = _grid_and_device(cfg, latent_shards)
    jobs = [replace(job, cfg=replace(job.cfg, device=str(device))) for job in jobs]
    hcfg = replace(hcfg or HarvestConfig(), hooks=otf.hooks, batch_size=otf.contexts_per_batch, device=str(device),
                   progress=False)
    run = Run(run_dir)
    stream, finish_store = _open_stream(model, corpus, run, otf, hcfg, device, grid)
    W, B = cfg.shuffle_buffer_rows, cfg.batch_size
    blocks = stream.blocks(0)
    wins = windows(blocks, W)
    first = next(wins, None)  # window 0 sets each hook's input scale
    if first is None:
        raise corpus_mod.CorpusError(f"{stream.label}: no rows (contexts of {hcfg.context_length} tokens)")
    info = StreamInfo(stream.label, list(hcfg.hooks), cfg.num_tokens or stream.count_rows(),
                      {h: int(a.shape[1]) for h, a in first[1].items()}, mean_squared_norms(first[1]),
                      {"model": stream.model_name}, first[1])
    trainers = [_trainer(job, info, run, grid, on_step) for job in jobs]
    start = min(t.step for t in trainers)
    if not all(t.complete for t in trainers):
        if start * B >= W:  # resuming past window 0: skip the LM batches before the window of `start`
            blocks = stream.blocks(start * B // W * W)
            wins = windows(blocks, W, start * B // W)
        else:
            wins = _chain(first, wins)
        batches = shuffled_batches(wins, list(hcfg.hooks), W, B, cfg.seed, start)
        drive(trainers, batches, start, list(hcfg.hooks), show=cfg.progress and stream.rank == 0)
    finish_store(blocks)
    return {job.name: t._result() for job, t in zip(jobs, trainers, strict=True)}


def _open_stream(model: Any, corpus: Any, run: Run, otf: OnTheFlyConfig, hcfg: HarvestConfig, device: torch.device,
                 grid: Grid | None) -> tuple[ModelStream, Callable[[Iterator[Any]], None]]:
    """The model's stream over the corpus, and what completes the store (``--write-store``) from the
    stream's remaining blocks once training is done."""
    corp = corpus if isinstance(corpus, corpus_mod.Corpus) else corpus_mod.load(corpus, text_field=hcfg.text_field)
    corp.check_nonempty()
    m, tok, model_name = harvesting._load_model(model, device, hcfg.model_dtype)
    points = [hooks.resolve(m, h) for h in hcfg.hooks]  # a bad hook name fails before any work
    exclusions = Exclusions(hcfg.exclude_bos, harvesting._special_ids(tok) if hcfg.exclude_special
                            else np.zeros(0, np.int64), hcfg.norm_outlier_factor)
    rank, world = (grid.rank, grid.world) if grid is not None else (0, 1)
    writer, stored = _store_writer(otf, run, hcfg, m, model_name, corp, rank, world)
    stream = ModelStream(m, tok, corp, hcfg, exclusions, rank, world, writer, stored, model_name=model_name)

    def finish_store(rest: Iterator[Any]) -> None:
        if stored is None:
            return
        for _ in rest:  # the store holds the whole pass, as saecore harvest would write it
            pass
        if writer is not None:
            writer.finish(harvesting._store_attrs(corp, exclusions, stream.forward.medians, {p.name: p.layer for p in points}, tok))

    return stream, finish_store


def _grid_and_device(cfg: TrainConfig, latent_shards: int) -> tuple[Grid | None, torch.device]:
    import os

    several = launched_distributed() or latent_shards > 1 or (dist.is_initialized() and dist.get_world_size() > 1)
    device = default_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")) if several else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return (init_grid(latent_shards, device) if several else None), device


def _store_writer(otf: OnTheFlyConfig, run: Run, hcfg: HarvestConfig, m: Any, model_name: str,
                  corp: corpus_mod.Corpus, rank: int, world: int) -> tuple[ActivationStoreWriter | None, int | None]:
    """With ``--write-store``: rank 0's writer of RUN/activations.zarr and the batches it already holds
    (told to every rank); (None, None) without, or when that store is complete."""
    if not otf.write_store:
        return None, None
    writer = None
    if rank == 0:
        harvesting._check_output(run.activations)
        writer = harvesting._open_writer(run.activations, harvesting._store_spec(hcfg, harvesting._model_dtype(m), model_name, corp),
                                         int(m.config.hidden_size), hcfg)
    done = [-1 if writer is None or writer.state.complete else writer.batches_done]
    if world > 1:
        dist.broadcast_object_list(done, src=0)
    return (None, None) if done[0] < 0 else (writer, int(done[0]))


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _trainer(job: SAEJob, info: StreamInfo, run: Run, grid: Grid | None,
             on_step: Callable[[str, int, dict[str, float]], None] | None) -> Trainer:
    callback = None if on_step is None else (lambda step, stats: on_step(job.name, step, stats))
    # StreamInfo stands in for the ActivationStore: the trainer asks it for rows, widths and norms only.
    if grid is None:
        return Trainer(info, run.sae(job.name), job.cfg, on_step=callback)  # type: ignore[arg-type]
    return DistributedTrainer(info, run.sae(job.name), job.cfg, grid, on_step=callback)  # type: ignore[arg-type]


def drive(trainers: list[Trainer], batches: Iterator[tuple[np.ndarray, ...]], step: int, hook_names: list[str],
          show: bool = False) -> None:
    """Step every trainer on each batch of the shared stream (a trainer ahead of ``step`` — its last
    checkpoint is newer — waits until the stream reaches it); checkpoints and Ctrl-C act on all of them."""
    from tqdm.auto import tqdm

    total = trainers[0].total_steps
    column = {h: i for i, h in enumerate(hook_names)}
    bar = tqdm(total=total, initial=step, disable=not show, unit="step", desc=f"train {len(trainers)} SAEs on the fly")
    for t in trainers:
        t.last_save = t.step
    with SigintFlag() as sigint:
        try:
            while step < total:
                got = next(batches, None)
                if got is None:
                    t = trainers[0]
                    raise ValueError(f"{t.store.path}: the stream ended at step {step} of {total}; --tokens "
                                     f"{t.cfg.num_tokens} asks for more rows than one pass keeps (leave it 0)")
                *xs, rows = got
                for t in trainers:
                    if t.step == step:
                        stats = t.step_on(xs[column[t.hook]], rows, interrupt=sigint.raised)
                step += 1
                bar.update(1)
                show_stats(bar, step, total, stats)
                if any(t.stop_requested(sigint.raised) for t in trainers):
                    for t in trainers:
                        t.save_checkpoint()
                    raise KeyboardInterrupt(f"interrupted at step {step}; checkpoints saved")
                for t in trainers:
                    t.checkpoint_if_due()
        finally:
            bar.close()
    for t in trainers:
        if not t.complete:
            t.finish()


# --- the train verb -----------------------------------------------------------------------------


def cli_configure_train(parser: argparse.ArgumentParser) -> None:
    """``saecore train STORE OUT`` (from a store) or ``saecore train --model/--corpus/--hooks … RUN`` (on the fly)."""
    parser.add_argument("store", nargs="?", help="activation store (activations.zarr) or a run directory holding "
                        "one; on the fly: the run folder the SAEs go to (RUN/saes/NAME)")
    parser.add_argument("out", nargs="?", help="output folder for the SAE (cfg.json, sae_weights.safetensors, "
                        "trainer state); not on the fly")
    add_arguments(parser, TrainConfig)
    add_arguments(parser, LaunchOptions)
    group = parser.add_argument_group("on the fly (any of these: train from the model, no store)")
    group.add_argument("--model", default=None, help=f"built-in model name or local HF folder (default: "
                       f"{models.BUILTIN_MODEL})")
    group.add_argument("--corpus", nargs="+", default=None, help="built-in corpus (default, pydoc, shakespeare, "
                       "fortunes) or .txt/.jsonl/.parquet/.arrow files or folders (default: default)")
    add_arguments(group, OnTheFlyConfig)
    add_arguments(group, HarvestConfig, skip=("hooks", "batch_size", "device", "progress"))


def cli_run_train(args: argparse.Namespace) -> int:
    """Train from a store (one process, or the grid under torchrun) or on the fly."""
    cfg = from_args(TrainConfig, args)
    launch = from_args(LaunchOptions, args)
    if any(getattr(args, k) is not None for k in ("model", "corpus", "hooks", "saes")):
        return _cli_run_on_the_fly(args, cfg, launch)
    if args.store is None or args.out is None:
        raise ValueError("give STORE and OUT (train from an activation store), or --model/--corpus/--hooks and "
                         "RUN (train on the fly)")
    if not (launched_distributed() or launch.latent_shards > 1):
        return training.cli_run(args, cfg)
    t0 = time.time()
    sae = train_distributed(args.store, args.out, cfg, latent_shards=launch.latent_shards)
    if dist.get_rank() == 0:
        print(f"saved {sae.cfg.architecture} SAE (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}) to {args.out} "
              f"from {dist.get_world_size()} processes ({launch.latent_shards} latent shards) in {time.time() - t0:.0f} s")
    dist.destroy_process_group()
    return 0


def _cli_run_on_the_fly(args: argparse.Namespace, cfg: TrainConfig, launch: LaunchOptions) -> int:
    if args.store is None or args.out is not None:
        raise ValueError("on the fly, give one folder: the run the SAEs go to (saecore train --model M --corpus C "
                         "--hooks H RUN)")
    otf, hcfg = from_args(OnTheFlyConfig, args), from_args(HarvestConfig, args, hooks=["unused"], batch_size=1, device=None, progress=False)
    corpus = args.corpus or ["default"]
    t0 = time.time()
    saes = train_on_the_fly(args.model or models.BUILTIN_MODEL, corpus if len(corpus) > 1 else corpus[0], args.store,
                            cfg, otf, hcfg, latent_shards=launch.latent_shards)
    several = dist.is_initialized()
    if not several or dist.get_rank() == 0:
        names = ", ".join(f"{n} (d_sae {s.cfg.d_sae})" for n, s in saes.items())
        print(f"saved {len(saes)} SAEs to {Run(args.store).sae('')}: {names}; one model pass, "
              f"{time.time() - t0:.0f} s")
    if several:
        dist.destroy_process_group()
    return 0
