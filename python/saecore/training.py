"""Train an SAE on an activation store: ``saecore.train(store, out_dir, cfg)`` and ``saecore train``.

The loop, as named steps (:class:`Trainer`): read a shuffled batch → check it is finite → set the
learning rate and sparsity coefficient for this step → forward/backward → clip, Adam step, decoder
constraint → update dead-latent counters → log / checkpoint.

* Data: :class:`ShuffledBatches` permutes the store's chunks per epoch and rows inside windows of
  ``shuffle_buffer_rows`` (memory: one window plus one batch). Batch ``i`` is a pure function of the
  seed and ``i``, so a resumed run sees exactly the batches the uninterrupted run would have seen.
* Schedules (Anthropic, April 2024): λ warms up linearly from 0 over the first 5% of steps; the
  learning rate decays linearly to 0 over the last 20%; gradient-norm clipping at 1; Adam, no weight
  decay; one epoch by default.
* Defaults from the data (options left at 0): the learning rate from the width and the run's length;
  relu's and jumprelu's λ steered every step towards L0 = k; b_dec at the data's geometric median with
  the pre-activations centred on it; jumprelu's θ₀ and kernel width calibrated on a sample of the
  training rows (:meth:`SAE.initialise_from_data`); the dead window from d_sae/k. What was chosen is
  logged and saved in ``cfg.json`` (``metadata.saecore.chosen``).
* Dead latents: tokens since each latent last fired; a latent is dead once that count reaches the
  dead window (``dead_window_tokens``, Anthropic's 10⁷, capped at the run length for short runs).
  TopK/BatchTopK get the AuxK loss on dead latents; ReLU dead latents are resampled.
* Checkpoints: ``cfg.json`` + ``sae_weights.safetensors`` (loadable by SAELens) and
  ``trainer_state.safetensors`` (unfolded weights, optimizer, counters, step; tensors plus JSON, no
  pickle, so loading runs no code from the file), each written aside and renamed.
  SIGINT finishes the current step, saves, and raises KeyboardInterrupt; the same call resumes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ._atomic import remove_partial_files
from ._trainer_state import load_state, save_state
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .errors import CorruptDataError, SaecoreError, StoreError
from .run import (
    LEGACY_TRAINER_STATE_FILE,
    TRAINER_STATE_FILE,
    record_path,
    store_path,
)
from .sae import AUXK_FAMILY, BATCH_TOPK_FAMILY, SAE, SAEConfig, check_matryoshka_groups
from .saelens import read_cfg
from .seeded_init import LatentShard

if TYPE_CHECKING:
    from typing_extensions import Self

STATE_FILENAME = TRAINER_STATE_FILE
STATE_FORMAT = "saecore.trainer/2"
ANTHROPIC_DEAD_WINDOW = 10_000_000
# Automatic sparsity coefficient: per step, λ ← λ·exp(STEER_RATE·clip(log(L0/k), ±1)) (integral control;
# λ can move by e^10 in 500 steps, yet a 10% L0 error changes it by only 0.2% per step).
STEER_RATE = 0.02
# relu's automatic λ starts at this × √(d_in/k), ≈ the typical scaled activation of a feature when k of them
# share E‖x‖² = d_in: an L1 price that a feature's MSE reduction (≈ its activation²) clearly pays.
RELU_START_LAMBDA = 0.5
SHORT_RUN_LR_FIRINGS = 24.0  # the automatic learning rate is at least this / a latent's firings in the run…
MAX_AUTO_LR = 1e-2  # …and at most this…
MAX_RELATIVE_STEP = 0.07  # …and at most this / √d_in
CALIBRATION_ROWS = 8192  # rows of training data the data-derived initial values are computed from
log = logging.getLogger(__name__)
# Config fields that do not change what is computed, so a resume may change them freely.
_RESUME_FREE_FIELDS = ("device", "checkpoint_every_steps", "progress")


class ConfigMismatchError(SaecoreError):
    """A checkpoint exists in the output folder, made with other settings than the ones given now."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (the store and output folder aside)."""

    architecture: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = option("relu", aliases=("--arch",))
    """SAE architecture: ``relu`` | ``topk`` | ``batchtopk`` | ``jumprelu`` | ``matryoshka`` (see :mod:`saecore.sae`)."""

    d_sae: int = option(4096, ge=1, le=1 << 24)
    """Number of latents."""

    k: int = option(32, ge=1, le=1 << 24)
    """Active latents per token (topk), per token on average (batchtopk, matryoshka), or the L0 that relu's
    and jumprelu's automatic sparsity coefficients steer towards."""

    matryoshka_groups: list[int] = option(default_factory=list, ge=1, le=1 << 24, metavar="SIZE")
    """matryoshka: nested group sizes summing to d_sae; empty → d/16, d/16, d/8, d/4, d/2 (Bussmann et al.)."""

    l1_coefficient: float = option(0.0, ge=0)
    """λ of the relu loss MSE + λ·Σ fᵢ‖W_dec,i‖; 0 → automatic: starts at 5 (Anthropic's, at their input
    scaling) and is steered every step towards L0 = k."""

    l0_coefficient: float = option(0.0, ge=0)
    """λ of the jumprelu loss MSE + λ·L0; 0 → automatic: starts at θ₀² and is steered every step towards L0 = k."""

    aux_coefficient: float = option(1 / 32, ge=0)
    """Weight of the AuxK loss (Gao et al. 2024 use 1/32)."""

    aux_k: int = option(0, ge=0, le=1 << 24)
    """Dead latents per token in the AuxK loss; 0 → d_in // 2."""

    jumprelu_bandwidth: float = option(0.0, ge=0)
    """Rectangle-kernel width of the jumprelu straight-through estimators (scaled units); 0 → θ₀/2."""

    jumprelu_l1_frac: float = option(0.7, ge=0, le=1)
    """jumprelu: initial fraction of steps whose sparsity term is Σᵢ fᵢ/θ̄ (an L1 price in units of the mean
    threshold, so it also shrinks the active values) instead of the L0 count; an entry at θ̄ costs λ in
    both. L0 from the start merges co-active directions (docs/training.md)."""

    jumprelu_init_threshold: float = option(0.0, ge=0)
    """Initial jumprelu threshold θ₀ (scaled units); 0 → calibrated on the data so that ≈ k latents per token
    start above it."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias: the training data's geometric median or mean (b_enc then centres the
    pre-activations on it), or zeros (Anthropic's init)."""

    lr: float = option(0.0, ge=0, le=1)
    """Adam learning rate; 0 → automatic: 2e-4 / sqrt(d_sae / 16384) (the width scaling Gao et al. fit), raised
    for short runs to 24 / (steps·batch·k/d_sae), 24 over a latent's firings in the run, at most min(1e-2, 0.07 / sqrt(d_in))."""

    batch_size: int = option(4096, ge=1, le=1 << 24)
    """Tokens per step."""

    num_tokens: int = option(0, ge=0, le=1 << 50, flag="--tokens")
    """Training tokens; 0 → one epoch over the training rows (Anthropic trained one epoch)."""

    hook: str | None = None
    """Hook to train on; None → the store's only hook."""

    seed: int = option(0, ge=0, lt=1 << 63)
    """Seeds the initialisation and the data order."""

    shuffle_buffer_rows: int = option(131072, ge=1, le=1 << 30)
    """Rows shuffled together (memory ≈ this × d_in × 4 bytes)."""

    holdout_fraction: float = option(0.02, ge=0, lt=1)
    """Trailing fraction of the store (whole chunks) kept out of training for ``saecore eval``."""

    batch_selection_frac: float = option(0.2, gt=0, le=1)
    """batchtopk / matryoshka: final fraction of steps that select the B·k largest of the batch (and learn
    the inference threshold); the steps before select the k largest per row, as topk. Selecting over the
    batch from the start merges co-active directions (docs/training.md, "Defaults derived from the data")."""

    lambda_warmup_frac: float = option(0.05, ge=0, lt=1)
    """Fraction of steps over which the sparsity coefficient rises linearly from 0."""

    lr_decay_frac: float = option(0.2, ge=0, lt=1)
    """Final fraction of steps over which the learning rate falls linearly to 0."""

    grad_clip: float = option(1.0, gt=0)
    """Maximum global gradient norm."""

    dead_window_tokens: int = option(0, ge=0)
    """A latent that has not fired for this many tokens is dead (capped at the run's length); 0 → automatic:
    100 × the mean gap between a latent's firings (100·d_sae/k tokens), at least 5 batches, at most
    Anthropic's 10⁷."""

    resample_dead: bool = True
    """relu only: re-initialise dead latents towards badly reconstructed inputs, once per dead window
    (never during the final learning-rate decay)."""

    checkpoint_every_steps: int = option(1000, ge=1)
    """Steps between checkpoints (a checkpoint is also written at the end and on SIGINT)."""

    device: str | None = None
    """``cuda``, ``cpu``…; None → CUDA when present, else CPU."""

    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        validate(self)  # the declared ranges and choices above
        if self.architecture in AUXK_FAMILY and self.k > self.d_sae:
            raise ValueError(f"TrainConfig.k={self.k} exceeds d_sae={self.d_sae}")
        if self.architecture == "matryoshka":
            self.matryoshka_groups = check_matryoshka_groups(self.matryoshka_groups, self.d_sae, "TrainConfig")
        elif self.matryoshka_groups:
            raise ValueError(f"TrainConfig.matryoshka_groups is set but architecture is {self.architecture!r}")

    @property
    def effective_lr(self) -> float:
        """The learning rate before the short-run floor (see :meth:`lr_for`)."""
        return self.lr or 2e-4 / math.sqrt(self.d_sae / 16384)

    def lr_for(self, total_steps: int, d_in: int) -> float:
        """``lr``, or the automatic rate for a run of ``total_steps``: Gao et al.'s width scaling fits long
        runs; in a short run each latent fires too few times to find its feature at that rate (toy:
        0.71 → 0.92 mean max cosine for batchtopk at 512 steps). The floor counts those firings, about
        tokens·k/d_sae per latent: SHORT_RUN_LR_FIRINGS / that. (A floor of 4/steps, blind to them, put
        bench-synth's 8,192 firings per latent at 6.2e-3 and cost its TopK family MCC.) Capped at 1e-2
        and at MAX_RELATIVE_STEP/√d_in: Adam moves every weight by about lr per step, and a unit-norm
        encoder column's entries are ≈ 1/√d_in, so wide inputs need a smaller rate (the quick start's
        d_in = 576 at 1e-2 left half its latents dead)."""
        if self.lr:
            return self.lr
        cap = min(MAX_AUTO_LR, MAX_RELATIVE_STEP / math.sqrt(d_in))
        firings = max(total_steps, 1) * self.batch_size * self.k / self.d_sae
        return min(cap, max(self.effective_lr, SHORT_RUN_LR_FIRINGS / firings))

    @property
    def auto_sparsity(self) -> bool:
        """Whether the sparsity coefficient is steered towards L0 = k (relu / jumprelu left at 0)."""
        arch = self.architecture
        return (arch == "relu" and self.l1_coefficient == 0) or (arch == "jumprelu" and self.l0_coefficient == 0)

    @property
    def effective_dead_window(self) -> int:
        """``dead_window_tokens``, or the automatic window (before the cap at the run's length)."""
        if self.dead_window_tokens:
            return self.dead_window_tokens
        return min(ANTHROPIC_DEAD_WINDOW, max(5 * self.batch_size, math.ceil(100 * self.d_sae / self.k)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data ---------------------------------------------------------------------------------------


@dataclass
class ShuffledBatches:
    """Deterministic shuffled batches over rows ``[0, n_rows)`` of one hook of a store.

    Epoch ``e`` visits the chunks in a seeded permutation; consecutive groups of chunks form windows
    of about ``buffer_rows`` rows whose rows are permuted again. The stream is the concatenation of
    the windows of epoch 0, 1, …; batch ``i`` is rows ``[i·B, (i+1)·B)`` of it.
    """

    store: ActivationStore
    hook: str
    n_rows: int
    batch_size: int
    buffer_rows: int
    seed: int
    chunk_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.chunk_rows = self.store.chunk_rows

    def _windows(self, epoch: int) -> list[list[tuple[int, int]]]:
        chunks = [(s, min(s + self.chunk_rows, self.n_rows)) for s in range(0, self.n_rows, self.chunk_rows)]
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(chunks))
        per_window = max(1, self.buffer_rows // self.chunk_rows)
        ordered = [chunks[i] for i in order]
        return [ordered[i : i + per_window] for i in range(0, len(ordered), per_window)]

    def _load_window(self, epoch: int, w: int, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([self.store.read(self.hook, a, b) for a, b in spans])  # (W, d)
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans])  # (W,)
        perm = np.random.default_rng([self.seed, epoch, 1, w]).permutation(len(rows))
        return x[perm], rows[perm]

    def batches(self, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x [B, d] float32, store rows [B])`` for steps ``start_step, start_step + 1, …`` (forever)."""
        return cut_batches(self._shuffled_windows(start_step * self.batch_size), self.batch_size)  # type: ignore[return-value]

    def _shuffled_windows(self, pos: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The shuffled windows from stream position ``pos`` on (the first one cut to start there)."""
        epoch, skip = divmod(pos, self.n_rows)
        while True:
            for w, spans in enumerate(self._windows(epoch)):
                size = sum(b - a for a, b in spans)
                if skip >= size:  # this window lies wholly before the resume point
                    skip -= size
                    continue
                x, rows = self._load_window(epoch, w, spans)
                yield x[skip:], rows[skip:]
                skip = 0
            epoch += 1


def cut_batches(windows: Iterator[tuple[np.ndarray, ...]], batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Batches of ``batch_size`` rows cut from a stream of windows, each a tuple of row-aligned arrays
    (a batch may span two windows); a last incomplete batch is dropped."""
    carry: list[tuple[np.ndarray, ...]] = []
    carried = 0
    for window in windows:
        while len(window[0]):
            take = min(batch_size - carried, len(window[0]))
            carry.append(tuple(a[:take] for a in window))
            window = tuple(a[take:] for a in window)
            carried += take
            if carried == batch_size:
                yield tuple(np.concatenate(parts) for parts in zip(*carry, strict=True))
                carry, carried = [], 0


# --- the trainer --------------------------------------------------------------------------------


def sae_step(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    sparsity_coefficient: float,
    aux_coefficient: float,
    dead_mask: torch.Tensor | None,
    grad_clip: float,
) -> tuple[torch.Tensor, Any]:
    """One optimisation step on a batch of raw activations: loss = MSE (matryoshka: the mean of its nested
    prefixes' MSEs) + λ·sparsity + α·AuxK; backward;
    project decoder gradients (unit-norm architectures); clip; Adam; renormalise. Returns (loss, SAEOutput)."""
    use_dead = dead_mask is not None and bool(dead_mask.any())
    out = sae(x, dead_mask=dead_mask if use_dead else None)
    loss = out.reconstruction_loss + sparsity_coefficient * out.sparsity_loss + aux_coefficient * out.aux_loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {float(loss.detach())}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    sae.normalize_decoder()
    sae.clamp_threshold()
    return loss.detach(), out



def open_store(store: ActivationStore | str | os.PathLike[str]) -> ActivationStore:
    """The activation store ``store`` names: an open store, a store path, or a run directory holding one."""
    if isinstance(store, ActivationStore):
        return store
    return ActivationStore(store_path(store))


def training_rows(store: ActivationStore, holdout_fraction: float) -> int:
    """Rows used for training: all but a trailing holdout of whole chunks (none if that leaves nothing)."""
    n = store.num_rows
    if holdout_fraction <= 0:
        return n
    held = math.ceil(n * holdout_fraction / store.chunk_rows) * store.chunk_rows
    return n - held if n - held > 0 else n


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint has {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class SigintFlag:
    """Turns SIGINT into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True
        # A second Ctrl-C should not wait for the checkpoint: hand SIGINT back to its old handler.
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """One training run: build or resume the state, then run the loop (see the module docstring)."""

    def __init__(
        self,
        store: ActivationStore,
        out_dir: Path,
        cfg: TrainConfig,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.store, self.out_dir, self.cfg, self.on_step = store, out_dir, cfg, on_step
        self.hook = self._check_store()
        self.n_train = training_rows(store, cfg.holdout_fraction)
        total = cfg.num_tokens or self.n_train
        self.total_steps = total // cfg.batch_size
        if self.total_steps < 1:
            raise ValueError(
                f"{store.path}: {total} training tokens (of {store.num_rows} rows) is less than one batch of "
                f"{cfg.batch_size}; lower batch_size or harvest more"
            )
        self.device = default_device(cfg.device)
        self.dead_window = min(cfg.effective_dead_window, self.total_steps * cfg.batch_size)
        self.batch_selection_start = self.total_steps - max(1, math.ceil(self.total_steps * cfg.batch_selection_frac))
        self.jumprelu_l0_start = math.ceil(self.total_steps * cfg.jumprelu_l1_frac)
        # What the trainer chose where the config says 0 (automatic); logged, and saved in cfg.json.
        self.base_lr = cfg.lr_for(self.total_steps, store.d_model(self.hook))
        self.chosen: dict[str, float] = {"lr": self.base_lr, "dead_window_tokens": self.dead_window}
        self.sparsity_coefficient = cfg.l1_coefficient if cfg.architecture == "relu" else cfg.l0_coefficient
        self.identity = self._identity()
        self._build()

    # -- set-up ------------------------------------------------------------------------------------
    def _check_store(self) -> str:
        if self.store.num_rows == 0:
            raise StoreError(f"{self.store.path}: the activation store is empty (0 rows)")
        hook = self.cfg.hook or (self.store.hooks[0] if len(self.store.hooks) == 1 else None)
        if hook is None:
            raise ValueError(f"{self.store.path}: store holds hooks {self.store.hooks}; set TrainConfig.hook")
        self.store.d_model(hook)  # raises naming the hooks present
        return hook

    def _identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed with this store and config."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in _RESUME_FREE_FIELDS}
        cfg["hook"] = self.hook
        return {
            **cfg,
            "store_rows": self.store.num_rows,
            "d_in": self.store.d_model(self.hook),
            "mean_squared_norm": self.store.mean_squared_norm(self.hook),
        }

    def _sae_config(self) -> SAEConfig:
        d_in = self.store.d_model(self.hook)
        msn = self.store.mean_squared_norm(self.hook)
        if not (math.isfinite(msn) and msn > 0):
            raise StoreError(f"{self.store.path}: hook {self.hook!r} has mean squared norm {msn}; cannot scale inputs")
        return SAEConfig(
            architecture=self.cfg.architecture,
            d_in=d_in,
            d_sae=self.cfg.d_sae,
            k=self.cfg.k,
            hook_name=self.hook,
            model_name=str(self.store.attrs.get("model", "")),
            input_scale=math.sqrt(d_in / msn),  # Anthropic: E‖s·x‖² = d_in
            # 0 (automatic): a placeholder until SAE.initialise_from_data calibrates it.
            jumprelu_bandwidth=self.cfg.jumprelu_bandwidth or SAEConfig.jumprelu_bandwidth,
            jumprelu_init_threshold=self.cfg.jumprelu_init_threshold or SAEConfig.jumprelu_init_threshold,
            aux_k=self.cfg.aux_k,
            matryoshka_groups=list(self.cfg.matryoshka_groups),
        )

    def calibration_sample(self) -> np.ndarray:
        """Up to CALIBRATION_ROWS raw training rows, read as 8 spans spread evenly over the training rows."""
        # A stream (saecore.onthefly) holds only its first window: calibrate on the rows it can read.
        held = min(self.n_train, getattr(self.store, "rows_readable", self.n_train))
        n = min(held, CALIBRATION_ROWS)
        starts = [i * held // 8 for i in range(8)]
        parts = [self.store.read(self.hook, a, min(a + max(n // 8, 1), held)) for a in starts]
        x = np.concatenate(parts)[:n]
        # A non-finite row is reported by the training loop, naming its store row, when a batch reaches it.
        return x[np.isfinite(x).all(axis=1)]

    def _initialise(self, sae: SAE, shard: LatentShard | None = None) -> None:
        """Data-derived initial values (see :meth:`SAE.initialise_from_data`; ``shard``: ``sae`` is one
        latent shard) and the automatic λ's start. Deterministic, so a resumed run recomputes the same
        ones before loading its state."""
        cfg = self.cfg
        xs = torch.from_numpy(self.calibration_sample()).to(sae.device) * sae.cfg.input_scale
        self.chosen.update(sae.initialise_from_data(xs, cfg.b_dec_init, cfg.k, cfg.jumprelu_init_threshold == 0,
                                                    shard=shard))
        if cfg.auto_sparsity:
            theta = sae.cfg.jumprelu_init_threshold
            start = RELU_START_LAMBDA * math.sqrt(sae.cfg.d_in / cfg.k)
            self.sparsity_coefficient = start if cfg.architecture == "relu" else theta * theta
            self.chosen["initial_sparsity_coefficient"] = self.sparsity_coefficient
        log.info("train %s: chose %s", cfg.architecture, ", ".join(f"{k}={v:.4g}" for k, v in self.chosen.items()))

    def _build(self) -> None:
        self.sae = SAE(self._sae_config(), seed=self.cfg.seed).to(self.device)
        self._initialise(self.sae)
        self.sae.train()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.effective_lr, betas=(0.9, 0.999))
        self.step = 0
        self.tokens_since_fired = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=self.device)
        self.complete = False
        remove_partial_files(self.out_dir)  # what a killed run was writing when it died
        state_path = self.out_dir / STATE_FILENAME
        legacy = self.out_dir / LEGACY_TRAINER_STATE_FILE
        if legacy.exists() and not state_path.exists():
            raise StoreError(f"{legacy}: a pickled trainer state, which saecore no longer loads (unpickling can run "
                             "code); delete it to restart the run from the saved SAE's settings")
        if state_path.exists():
            self._resume(state_path)

    def _resume(self, path: Path) -> None:
        state = load_state(path, self.device)  # CorruptDataError naming the file; runs no code from it
        if state.get("format") != STATE_FORMAT or not isinstance(state.get("identity"), dict):
            raise CorruptDataError(f"{path}: not a saecore trainer state (format {state.get('format')!r})")
        old = state["identity"]
        if old.get("d_in") != self.identity["d_in"]:
            raise ConfigMismatchError(
                f"{self.out_dir}: the checkpoint's SAE has d_in={old.get('d_in')}, but hook {self.hook!r} of "
                f"{self.store.path} has d_model={self.identity['d_in']}"
            )
        diffs = describe_differences(old, self.identity)
        if diffs:
            raise ConfigMismatchError(
                f"{self.out_dir}: holds a run made with other settings; use another output folder or delete it.\n  "
                + "\n  ".join(diffs)
            )
        try:
            self.sae.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
            self.complete = bool(state["complete"])
            self.sparsity_coefficient = float(state.get("sparsity_coefficient", self.sparsity_coefficient))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CorruptDataError(f"{path}: trainer state does not fit this SAE ({e!r})") from e

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write the SAE (SAELens layout) and then the trainer state, each atomically. The state is
        written last and holds its own copy of the weights, so a crash between the two is harmless."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sae.save(self.out_dir, extra_metadata=self._training_facts())
        state = {
            "format": STATE_FORMAT,
            "identity": self.identity,
            "step": self.step,
            "complete": self.complete,
            "model": self.sae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            "sparsity_coefficient": self.sparsity_coefficient,
        }
        save_state(state, self.out_dir / STATE_FILENAME)

    def _training_facts(self) -> dict[str, Any]:
        return {
            "train_config": self.cfg.to_dict(),
            "store": record_path(self.store.path),
            "train_rows": [0, self.n_train],
            "holdout_rows": [self.n_train, self.store.num_rows],
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.step * self.cfg.batch_size,
            "input_scale": self.sae.cfg.input_scale,
            "dead_window_tokens": self.dead_window,
            "dead_fraction": self.dead_fraction(),
            "complete": self.complete,
            "chosen": self.chosen,
            "sparsity_coefficient": self.sparsity_coefficient,
        }

    # -- schedules ---------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Constant, then linear decay to 0 over the final ``lr_decay_frac`` of steps."""
        decay_steps = int(self.total_steps * self.cfg.lr_decay_frac)
        start = self.total_steps - decay_steps
        base = self.base_lr
        return base if step < start or decay_steps == 0 else base * (self.total_steps - step) / decay_steps

    def sparsity_coefficient_at(self, step: int) -> float:
        """λ (fixed, or the steered one), with a linear warm-up from 0 over the first ``lambda_warmup_frac`` of steps."""
        lam = self.sparsity_coefficient if self.cfg.architecture in ("relu", "jumprelu") else 0.0
        warm = int(self.total_steps * self.cfg.lambda_warmup_frac)
        return lam if warm == 0 or step >= warm else lam * (step + 1) / warm

    def steer_sparsity(self, step: int, l0: float) -> None:
        """Automatic λ: after the warm-up, λ ← λ·exp(STEER_RATE·clip(log(L0/k), ±1)) — more sparsity
        pressure while the batch's L0 is above k, less while below (integral control of L0)."""
        if self.cfg.auto_sparsity and step >= int(self.total_steps * self.cfg.lambda_warmup_frac):
            error = max(-1.0, min(1.0, math.log(max(l0, 1e-3) / self.cfg.k)))
            self.sparsity_coefficient *= math.exp(STEER_RATE * error)

    def jumprelu_l1_at(self, step: int) -> bool:
        """Whether a jumprelu step prices activations by Σ fᵢ/θ̄ (before its L0 steps; see SAE.jumprelu_l1)."""
        return self.cfg.architecture == "jumprelu" and step < self.jumprelu_l0_start

    def selects_per_row(self, step: int) -> bool:
        """Whether a batchtopk / matryoshka step selects per row (before the final batch-selection steps)."""
        return self.cfg.architecture in BATCH_TOPK_FAMILY and step < self.batch_selection_start

    # -- dead latents ------------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_window

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for ``dead_window`` tokens (0 until that many are seen)."""
        return float(self.dead_mask().float().mean())

    @torch.no_grad()
    def _resample(self, x: torch.Tensor, xs_hat: torch.Tensor) -> int:
        """Re-initialise dead relu latents (Bricken et al. 2023, simplified): each takes the direction of
        an input drawn with probability ∝ its squared reconstruction error; the encoder gets that
        direction at 0.2 × the mean live encoder norm; Adam's moments for them are zeroed."""
        dead = self.dead_mask().nonzero().flatten()
        if dead.numel() == 0:
            return 0
        sae = self.sae
        xs = x * sae.cfg.input_scale
        err = (xs - xs_hat).pow(2).sum(1)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + self.step)
        pick = torch.multinomial(err.cpu() + 1e-12, dead.numel(), replacement=True, generator=gen).to(x.device)
        dirs = xs[pick] - sae.b_dec
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_dead, d_in)
        live = ~self.dead_mask()
        enc_norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
        dec_norm = sae.W_dec[live].norm(dim=1).mean() if live.any() else torch.tensor(0.1)
        sae.W_dec[dead] = dirs * dec_norm
        sae.W_enc[:, dead] = dirs.t() * 0.2 * enc_norm
        sae.b_enc[dead] = 0.0
        for p, index, dim in ((sae.W_dec, dead, 0), (sae.W_enc, dead, 1), (sae.b_enc, dead, 0)):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].index_fill_(dim, index, 0.0)
        self.tokens_since_fired[dead] = 0
        return int(dead.numel())

    # -- the loop ----------------------------------------------------------------------------------
    def _check_finite(self, x: torch.Tensor, rows: np.ndarray) -> None:
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            self.save_checkpoint()
            raise ValueError(
                f"{self.store.path}: non-finite activation (NaN/Inf) at store row {int(rows[bad])} of hook "
                f"{self.hook!r} (step {self.step}); checkpoint saved in {self.out_dir} before this batch"
            )

    def _train_step(self, x: torch.Tensor) -> dict[str, float]:
        step = self.step
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        lam = self.sparsity_coefficient_at(step)
        arch = self.cfg.architecture
        dead = self.dead_mask() if arch in AUXK_FAMILY else None
        self.sae.select_per_row = self.selects_per_row(step)
        self.sae.jumprelu_l1 = self.jumprelu_l1_at(step)
        try:
            loss, out = sae_step(self.sae, self.opt, x, lam, self.cfg.aux_coefficient, dead, self.cfg.grad_clip)
        except FloatingPointError as e:
            self.save_checkpoint()
            raise FloatingPointError(
                f"{e} at step {step} (inputs were finite); checkpoint saved in {self.out_dir}; lower the learning rate"
            ) from None
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired[out.fired] = 0
        self.steer_sparsity(step, float(out.l0))
        with torch.no_grad():
            xs = x * self.sae.cfg.input_scale
            var = (xs - xs.mean(0)).pow(2).sum(-1).mean()
            ev = 1.0 - out.mse / var.clamp_min(1e-12)
        resampled = 0
        if (
            arch == "relu"
            and self.cfg.resample_dead
            and (step + 1) * self.cfg.batch_size % self.dead_window < self.cfg.batch_size
            and (step + 1) < self.total_steps * (1 - self.cfg.lr_decay_frac)
            and (step + 1) * self.cfg.batch_size >= self.dead_window
        ):
            resampled = self._resample(x, (out.x_hat * self.sae.cfg.input_scale).detach())
        return {
            "loss": float(loss.detach()),
            "mse": float(out.mse.detach()),
            "l0": float(out.l0.detach()),
            "explained_variance": float(ev),
            "dead_fraction": self.dead_fraction(),
            "resampled": float(resampled),
        }

    def run(self) -> SAE:
        """Train to the end (or resume to it); return the trained SAE (input scale folded)."""
        if not self.complete:
            self._loop(self._batches())
        return self._result()

    def _result(self) -> SAE:
        return self.sae.folded().eval()

    def _batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The global batches from this run's step on (a pure function of the seed and the step)."""
        return ShuffledBatches(
            self.store, self.hook, self.n_train, self.cfg.batch_size, self.cfg.shuffle_buffer_rows, self.cfg.seed
        ).batches(self.step)

    def bar_label(self) -> str:
        return f"train {self.cfg.architecture} {self.cfg.d_sae}"

    def _loop(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.cfg.progress, unit="step",
                   desc=self.bar_label())
        self.last_save = self.step
        with SigintFlag() as sigint:
            try:
                while self.step < self.total_steps:
                    stats = self.step_on(*next(batches), interrupt=sigint.raised)
                    bar.update(1)
                    show_stats(bar, self.step, self.total_steps, stats)
                    self.checkpoint_if_due(sigint.raised)
            finally:
                bar.close()
        self.finish()

    # The loop's pieces, public so that one driver can step several trainers on one stream
    # (saecore.onthefly): step_on every trainer, then checkpoint_if_due every trainer.
    interrupted = False  # set by step_on: Ctrl-C was seen (over every rank, when distributed)
    last_save = 0  # the step of the last checkpoint written by checkpoint_if_due

    def step_on(self, x_np: np.ndarray, rows: np.ndarray, interrupt: bool = False) -> dict[str, float]:
        """One optimisation step on the global batch ``x_np`` (``rows``: where each row came from, for
        errors); calls ``on_step``. ``interrupt``: Ctrl-C was seen (acted on by :meth:`checkpoint_if_due`)."""
        x = torch.from_numpy(x_np).to(self.device, non_blocking=True)
        self._check_finite(x, rows)  # the whole batch on every rank: all raise together
        stats = self._step_batch(x, interrupt)
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step, stats)
        return stats

    def _step_batch(self, x: torch.Tensor, interrupt: bool) -> dict[str, float]:
        self.interrupted = interrupt
        return self._train_step(x)

    def stop_requested(self, interrupt: bool) -> bool:
        """Whether to stop after this step: Ctrl-C seen before or during it (``interrupt``: now)."""
        return self.interrupted or interrupt

    def checkpoint_if_due(self, interrupt: bool = False) -> None:
        """After a step: save and raise KeyboardInterrupt if :meth:`stop_requested`; else save every
        ``checkpoint_every_steps`` (the final checkpoint is :meth:`finish`'s)."""
        if self.stop_requested(interrupt):
            self.save_checkpoint()
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved in {self.out_dir}")
        if self.step - self.last_save >= self.cfg.checkpoint_every_steps and self.step < self.total_steps:
            self.save_checkpoint()
            self.last_save = self.step

    def finish(self) -> None:
        """Mark the run complete and write the final checkpoint."""
        self.complete = True
        self.save_checkpoint()


def show_stats(bar: Any, step: int, total_steps: int, stats: dict[str, float]) -> None:
    """The progress bar's loss / L0 / explained variance / dead fraction, every 10 steps and at the end."""
    if step % 10 == 0 or step == total_steps:
        bar.set_postfix(loss=f"{stats['loss']:.4g}", L0=f"{stats['l0']:.1f}",
                        EV=f"{stats['explained_variance']:.3f}", dead=f"{stats['dead_fraction']:.3f}")


def train(
    store: ActivationStore | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: TrainConfig | None = None,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **overrides: Any,
) -> SAE:
    """Train an SAE on ``store`` (an :class:`ActivationStore`, its path, or a run directory) into
    ``out_dir``; resume if ``out_dir`` holds an unfinished run of the same config.

    ``overrides`` set :class:`TrainConfig` fields (``train(store, out, architecture="topk", k=32)``).
    ``on_step(step, stats)`` is called after every step (stats: loss, mse, l0, explained_variance,
    dead_fraction). Returns the trained SAE with its input scale folded (as saved).
    """
    cfg = cfg or TrainConfig()
    if overrides:
        cfg = TrainConfig(**{**cfg.to_dict(), **overrides})
    return Trainer(open_store(store), Path(out_dir), cfg, on_step=on_step).run()


# --- CLI ----------------------------------------------------------------------------------------
# The verb itself lives in saecore.distributed (cli_configure_train / cli_run_train), which picks the
# one-process trainer below or the process grid; this module never imports that one.


def cli_configure(parser: argparse.ArgumentParser) -> None:
    """The one-process options of ``saecore train``."""
    parser.add_argument("store", help="activation store (activations.zarr) or a run directory holding one")
    parser.add_argument("out", help="output folder for the SAE (cfg.json, sae_weights.safetensors, trainer state)")
    add_arguments(parser, TrainConfig)


def cli_run(args: argparse.Namespace, cfg: TrainConfig | None = None) -> int:
    """Train in this process."""
    cfg = cfg or from_args(TrainConfig, args)
    t0 = time.time()
    sae = train(args.store, args.out, cfg)
    print(f"saved {sae.cfg.architecture} SAE (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}) to {args.out} "
          f"in {time.time() - t0:.0f} s")
    facts = read_cfg(args.out)["metadata"]["saecore"]
    print("chosen: " + ", ".join(f"{k} {v:.4g}" for k, v in {**facts["chosen"], "final_sparsity_coefficient":
                                                            facts["sparsity_coefficient"]}.items()))
    return 0
