"""Distributed SAE training on torch.distributed: data parallel × latent sharded, on a 2-D grid.

``torchrun --nproc-per-node N -m saecore train STORE OUT [--latent-shards S] …`` runs the ``train``
verb on N = D·S processes (gloo on CPU, NCCL on CUDA); one process is the plain :class:`Trainer`.

Grid. Rank ``r`` sits at data index ``r // S`` and latent index ``r % S``. A *latent group* (the S
ranks of one data index) sees the same rows and splits the latents; a *data group* (the D ranks of
one latent index) holds the same latents and splits the rows.

* Data. Every rank streams the same global batch (:class:`ShuffledBatches`, a pure function of the
  seed and the step) and keeps rows ``[d·B/D, (d+1)·B/D)``. Losses are sums over the local rows
  divided by the *global* batch size and gradients are summed over the data group, so the step is the
  one-process step on the global batch. Batch statistics (AuxK's variances, BatchTopK's threshold,
  dead-latent firing, the explained variance) are reduced over the whole batch, not per rank.
* Latents. Rank ``s`` of a latent group holds latents ``[s·L, (s+1)·L)`` (L = d_sae/S): those columns
  of W_enc and entries of b_enc, those rows of W_dec, its threshold and its dead-latent counters;
  b_dec is replicated. Each rank decodes its own latents; the reconstruction is the all-reduced sum
  of the partial decodes (:class:`_SumPartials`; its backward is the identity because every rank of
  the group computes the same loss from the same sum). TopK gathers each rank's k best per row and
  keeps the global k; BatchTopK (and Matryoshka BatchTopK) gathers each rank's B·k best values to find
  the global cut; ReLU and JumpReLU select nothing. Matryoshka decodes each nested group's entries
  apart and all-reduces the stacked [groups, rows, d_in] partials once, so every rank forms every
  prefix's reconstruction and loss. Decoder normalisation and Adam are per row/element, so they stay local;
  gradient clipping uses the global norm. A rank builds only its shard's initial values, equal to the
  one-process SAE's for those latents (:mod:`saecore.seeded_init`).
* Checkpoints. The ranks of data index 0 each write their shard (weights, Adam moments, counters) as
  ``dist/step-N/latent-s-of-S.safetensors``; after a barrier rank 0 commits the step by atomically
  replacing ``dist/MANIFEST.json``, so a rank killed mid-write leaves the previous step in force.
  Resuming needs the same latent shard count (the data shard count may change: replicas are
  identical and the global batch is fixed). At the end rank 0 consolidates the shards into the usual
  ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), which every other verb reads.

Ties between equal pre-activations at the selection boundary may resolve differently than in one
process; with continuous activations they do not occur in practice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._atomic import atomic_target, write_json
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .errors import StoreError
from .run import DIST_CHECKPOINT_DIR as DIST_DIR
from .run import DIST_MANIFEST_FILE as MANIFEST
from .sae import (
    AUXK_FAMILY,
    BATCH_TOPK_FAMILY,
    SAE,
    JumpReLUFunction,
    SAEConfig,
    SelectedPreacts,
    StepFunction,
    by_latent,
    sparse_decode,
)
from .seeded_init import LatentShard
from .training import (
    ConfigMismatchError,
    TrainConfig,
    Trainer,
    describe_differences,
    open_store,
)

MANIFEST_FORMAT = "saecore.dist-checkpoint/1"

# Payload bytes this process handed to collectives (what bench/train_distributed.py reports per step).
COMM_BYTES = [0]


# --- the grid -----------------------------------------------------------------------------------


@dataclass
class Grid:
    """This process's place on the data × latent grid, and the two process groups it belongs to."""

    rank: int
    world: int
    data_shards: int
    latent_shards: int
    data_group: Any  # None when the group has one member (collectives are then skipped)
    latent_group: Any
    world_group: Any

    @property
    def data_index(self) -> int:
        return self.rank // self.latent_shards

    @property
    def latent_index(self) -> int:
        return self.rank % self.latent_shards


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_grid(latent_shards: int, device: torch.device) -> Grid:
    """Join (or reuse) the default process group and build the data and latent groups.

    Every rank must call this with the same ``latent_shards``; it must divide the world size."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if latent_shards < 1 or world % latent_shards:
        raise ValueError(f"--latent-shards {latent_shards} must divide the number of processes ({world})")
    D, S = world // latent_shards, latent_shards
    data_group = latent_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for s in range(S):
        members = [d * S + s for d in range(D)]
        g = dist.new_group(members) if D > 1 else None
        if rank in members:
            data_group = g
    for d in range(D):
        members = [d * S + s for s in range(S)]
        g = dist.new_group(members) if S > 1 else None
        if rank in members:
            latent_group = g
    return Grid(rank, world, D, S, data_group, latent_group, dist.group.WORLD if world > 1 else None)


def _all_reduce(t: Tensor, group: Any, op: Any = None) -> Tensor:
    if group is not None:
        COMM_BYTES[0] += t.numel() * t.element_size()
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def _all_gather(t: Tensor, group: Any, dim: int = 0) -> Tensor:
    """Concatenate ``t`` from every member of ``group`` (in rank order) along ``dim``."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    COMM_BYTES[0] += t.numel() * t.element_size()
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


class _SumPartials(torch.autograd.Function):
    """Forward: the sum of every latent shard's partial decode. Backward: the identity, because each
    rank of the latent group computes the same loss from the same sum, so its upstream gradient
    already is the gradient of that loss with respect to its own partial."""

    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: Any) -> Tensor:
        return _all_reduce(partial.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


# --- the sharded forward ------------------------------------------------------------------------


class GridStep:
    """The SAE math of one training step on this rank's rows and latents (see the module docstring).

    ``local`` is an :class:`SAE` holding this rank's latents (its own cfg has d_sae = L); ``full`` is
    the configuration of the whole SAE, whose k, aux_k and d_sae the selections use."""

    def __init__(self, grid: Grid, full: SAEConfig, local: SAE, global_batch: int):
        self.grid, self.full, self.local, self.B = grid, full, local, global_batch
        self.L = local.cfg.d_sae
        self.lo = grid.latent_index * self.L

    def centered_sq_sum(self, t: Tensor) -> Tensor:
        """Σ‖t_row − mean‖² over the global batch (the mean taken over the global batch too)."""
        mean = _all_reduce(t.sum(0), self.grid.data_group) / self.B
        return _all_reduce((t - mean).pow(2).sum(), self.grid.data_group)

    def _top_per_row(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(rows, local latents), rows ascending, of the k largest entries of each row over ALL latents:
        each shard offers its min(k, L) best per row, the group keeps the k best of those."""
        vals, idx = pre.topk(min(k, self.L), dim=-1, sorted=False)  # (Bl, k')
        vals = _all_gather(vals, self.grid.latent_group, dim=1)  # (Bl, S·k')
        ids = _all_gather(idx + self.lo, self.grid.latent_group, dim=1)
        chosen = ids.gather(1, vals.topk(k, dim=-1, sorted=False).indices)  # (Bl, k) global ids
        mine = (chosen >= self.lo) & (chosen < self.lo + self.L)
        rows = torch.arange(pre.shape[0], device=pre.device)[:, None].expand_as(chosen)[mine]
        return rows, chosen[mine] - self.lo

    def _top_of_batch(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, local latents) of the B·k largest entries of the global [B, d_sae] block: every rank
        offers its own best B·k values; the (B·k)-th best of all of them is the cut."""
        want = self.B * self.full.k
        cand = pre.reshape(-1).topk(min(want, pre.numel()), sorted=False).values
        cand = _all_gather(cand, self.grid.world_group)
        cut = cand.topk(want, sorted=False).values.min()
        rows, latents = (pre >= cut).nonzero(as_tuple=True)  # row-major: rows ascending
        return rows, latents

    def _decode_selected(self, xs: Tensor, pre: Tensor, rows: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(values, partial decode) of the selected entries, with the sparse backward of :mod:`saecore.sae`."""
        m = self.local
        order = by_latent(latents, self.L)
        pre_sel = pre[rows, latents]
        vals = F.relu(SelectedPreacts.apply(pre_sel, xs, m.W_enc, m.b_enc, rows, latents, *order))
        return vals, sparse_decode(rows, latents, vals, m.W_dec, xs.shape[0], order)

    def forward(self, xs: Tensor, dead: Tensor | None, sparsity_coefficient: float, aux_coefficient: float,
                per_row: bool = False, jumprelu_l1: bool = False) -> dict[str, Any]:
        """Loss to backpropagate on this rank, plus the pieces of the global statistics. ``per_row``:
        batchtopk selects the k largest per row (see :attr:`SAE.select_per_row`); ``jumprelu_l1``: jumprelu's
        sparsity term is Σ fᵢ/θ̄ (see :attr:`SAE.jumprelu_l1`)."""
        m, arch, g = self.local, self.full.architecture, self.grid
        pre = torch.addmm(m.b_enc, xs, m.W_enc)  # (Bl, L)
        sparsity = xs.new_zeros(())
        if arch in ("relu", "jumprelu"):
            if arch == "relu":
                f = F.relu(pre)
                sparsity = (f @ m.W_dec.norm(dim=1)).sum()  # Anthropic's Σᵢ fᵢ‖W_dec,i‖ over local latents
            else:
                eps = self.full.jumprelu_bandwidth
                f = JumpReLUFunction.apply(pre, m.threshold, eps)
                if jumprelu_l1:  # the mean threshold over every latent shard
                    theta_mean = _all_reduce(m.threshold.detach().sum(), g.latent_group) / self.full.d_sae
                    sparsity = (f / theta_mean).sum()
                else:
                    sparsity = StepFunction.apply(pre, m.threshold, eps).sum()
            partial = f @ m.W_dec
            active = f.detach() > 0
            n_active, fired = active.sum(), active.any(0)
            vals = None
        else:
            pre = pre.detach()
            with torch.no_grad():
                per_row = per_row or arch == "topk"
                rows, latents = self._top_per_row(pre, self.full.k) if per_row else self._top_of_batch(pre)
            vals, partial = self._decode_selected(xs, pre, rows, latents)
            if arch == "matryoshka":
                partial = self._group_partials(xs, rows, latents, vals)  # (G, Bl, d_in)
            kept = vals.detach() > 0
            n_active = kept.sum()
            fired = torch.zeros(self.L, dtype=torch.bool, device=xs.device)
            fired[latents[kept]] = True
        summed = _SumPartials.apply(partial, g.latent_group)
        if arch == "matryoshka":
            xs_hat, recon_sum = self._prefix_losses(xs, summed)
            mse_sum = (xs_hat - xs).pow(2).sum()
        else:
            xs_hat = summed + m.b_dec  # (Bl, d_in)
            mse_sum = recon_sum = (xs_hat - xs).pow(2).sum()
        aux = self._aux(xs, xs_hat, dead) if dead is not None else xs.new_zeros(())
        loss = (recon_sum + sparsity_coefficient * sparsity) / self.B + aux_coefficient * aux
        if arch in BATCH_TOPK_FAMILY and vals is not None and not per_row:
            self._update_threshold(vals.detach())
        return {"loss": loss, "mse_sum": mse_sum.detach(), "sparsity_sum": sparsity.detach(), "aux": aux.detach(),
                "n_active": n_active, "fired": fired, "xs_hat": xs_hat.detach()}

    def _group_partials(self, xs: Tensor, rows: Tensor, latents: Tensor, vals: Tensor) -> Tensor:
        """matryoshka: this shard's partial decode of each nested group's entries, stacked [G, Bl, d_in]
        (one all-reduce sums them over the shards; a group this shard holds no latent of is zeros)."""
        ids, start, parts = latents + self.lo, 0, []
        for end in self.full.matryoshka_prefixes:
            in_group = (ids >= start) & (ids < end)  # keeps rows ascending
            parts.append(sparse_decode(rows[in_group], latents[in_group], vals[in_group], self.local.W_dec, xs.shape[0]))
            start = end
        return torch.stack(parts)

    def _prefix_losses(self, xs: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """matryoshka: (x̂ of the whole dictionary, the mean over nested prefixes of Σ‖x̂_m − x‖²) —
        :meth:`SAE._prefix_mses`'s sums, accumulated group by group in the same order."""
        recon, sums = self.local.b_dec.expand_as(xs), []
        for part in groups:
            recon = recon + part
            sums.append((recon - xs).pow(2).sum())
        return recon, torch.stack(sums).mean()

    def _aux(self, xs: Tensor, xs_hat: Tensor, dead: Tensor) -> Tensor:
        """AuxK over the global batch and all latents; mirrors :meth:`SAE._aux_loss` (same scaling)."""
        g = self.grid
        n_dead = int(_all_reduce(dead.sum(), g.latent_group))
        if n_dead == 0:
            return xs.new_zeros(())
        k_aux = min(self.full.effective_aux_k, n_dead)
        residual = (xs - xs_hat).detach()
        with torch.no_grad():
            pre = torch.addmm(self.local.b_enc, xs, self.local.W_enc).masked_fill(~dead, float("-inf"))
            rows, latents = self._top_per_row(pre, k_aux)  # k_aux <= n_dead: only finite entries win
        _, partial = self._decode_selected(xs, pre, rows, latents)
        recon = _SumPartials.apply(partial, g.latent_group)
        with torch.no_grad():
            denom = self.centered_sq_sum(residual).clamp_min(1e-12)
            var_x = self.centered_sq_sum(xs) / self.B
        return (recon - residual).pow(2).sum() * (var_x / denom)

    @torch.no_grad()
    def _update_threshold(self, vals: Tensor) -> None:
        """BatchTopK's EMA towards the smallest kept positive activation of the GLOBAL batch."""
        positive = vals[vals > 0]
        low = positive.min() if positive.numel() else vals.new_tensor(float("inf"))
        low = _all_reduce(low.reshape(1).clone(), self.grid.world_group, dist.ReduceOp.MIN)[0]
        if torch.isfinite(low):
            mom = self.full.batchtopk_threshold_momentum
            current = self.local.threshold[0]
            self.local.threshold.fill_(float(low if current == 0 else (1 - mom) * current + mom * low))


# --- the trainer --------------------------------------------------------------------------------


class DistributedTrainer(Trainer):
    """:class:`Trainer` on a data × latent grid: same schedules, config identity and data order."""

    def __init__(self, store: ActivationStore, out_dir: Path, cfg: TrainConfig, grid: Grid, on_step: Any = None):
        self.grid = grid
        if cfg.batch_size % grid.data_shards:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {grid.data_shards} data shards")
        if cfg.d_sae % grid.latent_shards:
            raise ValueError(f"d_sae {cfg.d_sae} is not divisible by --latent-shards {grid.latent_shards}")
        super().__init__(store, out_dir, cfg, on_step=on_step)

    # -- set-up ------------------------------------------------------------------------------------
    def _build(self) -> None:
        g, full = self.grid, self._sae_config()
        L = full.d_sae // g.latent_shards
        lo = g.latent_index * L
        # Only this shard is built, with the values the one-process SAE has for these latents (seeded per
        # init chunk; θ₀ counted over every shard): equal runs start equal, and no rank holds the whole.
        # (matryoshka's nested groups are the whole SAE's; the step reads them from ``full``.)
        groups = {"matryoshka_groups": [L]} if full.architecture == "matryoshka" else {}
        local_cfg = SAEConfig.from_dict({**full.to_dict(), "d_sae": L, "k": min(full.k, L), **groups})
        self.sae = SAE(local_cfg, seed=self.cfg.seed, first_latent=lo).to(self.device)
        self._initialise(self.sae, LatentShard(lo, full.d_sae, self.cfg.seed,
                                               lambda t: _all_reduce(t, g.latent_group)))
        # The calibrated jumprelu values are the whole SAE's (saved in the manifest, used by the step).
        full.jumprelu_init_threshold = self.sae.cfg.jumprelu_init_threshold
        full.jumprelu_bandwidth = self.sae.cfg.jumprelu_bandwidth
        self.full_cfg = full
        self.sae.train()
        self.stepper = GridStep(g, full, self.sae, self.cfg.batch_size)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.effective_lr, betas=(0.9, 0.999))
        self.step = 0
        self.tokens_since_fired = torch.zeros(L, dtype=torch.long, device=self.device)
        self.complete = False
        if (self.out_dir / DIST_DIR / MANIFEST).exists():
            self._resume_shard()

    def _rows(self) -> slice:
        Bl = self.cfg.batch_size // self.grid.data_shards
        return slice(self.grid.data_index * Bl, (self.grid.data_index + 1) * Bl)

    # -- statistics --------------------------------------------------------------------------------
    def dead_fraction(self) -> float:
        n = _all_reduce(self.dead_mask().sum(), self.grid.latent_group)
        return float(n) / self.cfg.d_sae

    # -- one step ----------------------------------------------------------------------------------
    def _reduce_gradients(self) -> None:
        """Sum gradients over the data group (one flat buffer, one collective)."""
        params = [p for p in self.sae.parameters() if p.grad is not None]
        if self.grid.data_group is None or not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        _all_reduce(flat, self.grid.data_group)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def _clip_gradients(self) -> None:
        """torch.nn.utils.clip_grad_norm_ with the norm of the WHOLE SAE's gradient."""
        sq_sharded = torch.zeros((), device=self.device)
        sq_replicated = torch.zeros((), device=self.device)
        for name, p in self.sae.named_parameters():
            if p.grad is None:
                continue
            if name == "b_dec":
                sq_replicated = sq_replicated + p.grad.pow(2).sum()
            else:
                sq_sharded = sq_sharded + p.grad.pow(2).sum()
        total = (_all_reduce(sq_sharded, self.grid.latent_group) + sq_replicated).sqrt()
        coef = (self.cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
        for p in self.sae.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    def _train_step(self, x: Tensor, interrupt: bool = False) -> dict[str, float]:  # type: ignore[override]
        step, arch, cfg = self.step, self.cfg.architecture, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        lam = self.sparsity_coefficient_at(step)
        xs = x.to(self.sae.W_enc.dtype) * self.sae.cfg.input_scale
        dead = self.dead_mask() if arch in AUXK_FAMILY else None
        out = self.stepper.forward(xs, dead, lam, cfg.aux_coefficient, self.selects_per_row(step),
                                   self.jumprelu_l1_at(step))
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self._reduce_gradients()
        stats = self._global_stats(xs, out, lam, interrupt)
        self.steer_sparsity(step, stats["l0"])
        if not math.isfinite(stats["loss"]):
            self.save_checkpoint()
            raise FloatingPointError(f"loss became {stats['loss']} at step {step} (inputs were finite); "
                                     f"checkpoint saved in {self.out_dir}; lower the learning rate")
        self.sae.remove_parallel_decoder_grad()
        self._clip_gradients()
        self.opt.step()
        self.sae.normalize_decoder()
        self.sae.clamp_threshold()
        fired = _all_reduce(out["fired"].to(torch.int32), self.grid.data_group, dist.ReduceOp.MAX).bool()
        self.tokens_since_fired += cfg.batch_size
        self.tokens_since_fired[fired] = 0
        resampled = 0
        if arch == "relu" and cfg.resample_dead and self._resample_due(step):
            resampled = self._resample_global(xs, out["xs_hat"])
        stats["dead_fraction"] = self.dead_fraction()
        stats["resampled"] = float(resampled)
        return stats

    def _global_stats(self, xs: Tensor, out: dict[str, Any], lam: float, interrupt: bool) -> dict[str, float]:
        """One world all-reduce of the step's sums (terms replicated over a group are divided by its size)."""
        g, B = self.grid, self.cfg.batch_size
        var = self.stepper.centered_sq_sum(xs) / B
        v = torch.stack([out["mse_sum"] / g.latent_shards, out["sparsity_sum"],
                         out["aux"] / g.latent_shards, out["n_active"].to(xs.dtype),
                         torch.tensor(float(interrupt), device=xs.device)])
        v = _all_reduce(v, g.world_group)
        mse, sparsity, aux, n_active = (float(t) for t in v[:4])
        mse, sparsity = mse / B, sparsity / B
        self.interrupted = bool(v[4] > 0)
        return {"loss": mse + lam * sparsity + self.cfg.aux_coefficient * aux, "mse": mse, "l0": n_active / B,
                "explained_variance": 1.0 - mse / max(float(var), 1e-12)}

    def _resample_due(self, step: int) -> bool:
        # The schedule of Trainer._train_step: once per dead window, never in the final decay.
        B, cfg = self.cfg.batch_size, self.cfg
        return ((step + 1) * B % self.dead_window < B and (step + 1) < self.total_steps * (1 - cfg.lr_decay_frac)
                and (step + 1) * B >= self.dead_window)

    @torch.no_grad()
    def _resample_global(self, xs: Tensor, xs_hat: Tensor) -> int:
        """:meth:`Trainer._resample` over the global batch and all latents (same draws as one process)."""
        g, sae, L = self.grid, self.sae, self.stepper.L
        lo = self.stepper.lo
        dead_local = self.dead_mask()
        dead_all = _all_gather(dead_local.to(torch.int32), g.latent_group).bool()  # (d_sae,)
        dead_ids = dead_all.nonzero().flatten()
        if dead_ids.numel() == 0:
            return 0
        xs_all = _all_gather(xs, g.data_group)  # (B, d_in)
        err = _all_gather((xs - xs_hat).pow(2).sum(1), g.data_group)  # (B,)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + self.step)
        pick = torch.multinomial(err.cpu() + 1e-12, dead_ids.numel(), replacement=True, generator=gen).to(xs.device)
        dirs = xs_all[pick] - sae.b_dec
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_dead, d_in)
        mine = (dead_ids >= lo) & (dead_ids < lo + L)
        dead, dirs = dead_ids[mine] - lo, dirs[mine]
        live = ~dead_local
        sums = torch.stack([sae.W_enc[:, live].norm(dim=0).sum(), sae.W_dec[live].norm(dim=1).sum(),
                            live.sum().to(xs.dtype)])
        enc_sum, dec_sum, n_live = (float(t) for t in _all_reduce(sums, g.latent_group))
        enc_norm = enc_sum / n_live if n_live else 1.0
        dec_norm = dec_sum / n_live if n_live else 0.1
        sae.W_dec[dead] = dirs * dec_norm
        sae.W_enc[:, dead] = dirs.t() * 0.2 * enc_norm
        sae.b_enc[dead] = 0.0
        for p, dim in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].index_fill_(dim, dead, 0.0)
        self.tokens_since_fired[dead] = 0
        return int(dead_ids.numel())

    # -- the loop (Trainer's, with these pieces) ---------------------------------------------------
    def _step_batch(self, x: Tensor, interrupt: bool) -> dict[str, float]:
        return self._train_step(x[self._rows()], interrupt=interrupt)  # sets self.interrupted (all ranks)

    def stop_requested(self, interrupt: bool) -> bool:
        return self.interrupted  # only the flag all ranks agreed on in the step's all-reduce

    def bar_label(self) -> str:
        return f"{super().bar_label()} on {self.grid.world} ranks"

    def _result(self) -> SAE:
        """Rank 0 consolidates (also after a crash between the last commit and consolidation, or over a
        partial checkpoint exported by ``saecore consolidate``); every rank returns the whole SAE."""
        if self.grid.rank == 0:  # always: the folder may hold a partial export (saecore consolidate)
            consolidate(self.out_dir)
        if self.grid.world > 1:
            dist.barrier()
        return consolidate(self.out_dir, write=False).eval()

    # -- checkpoints -------------------------------------------------------------------------------
    def _shard_tensors(self) -> dict[str, Tensor]:
        out = {f"param.{k}": v.detach() for k, v in self.sae.state_dict().items()}
        for name, p in self.sae.named_parameters():
            for key, value in self.opt.state.get(p, {}).items():
                out[f"adam.{name}.{key}"] = value.detach().reshape(value.shape)
        out["tokens_since_fired"] = self.tokens_since_fired
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def save_checkpoint(self) -> None:
        """Each shard written by its data-index-0 rank, then the step committed by rank 0's manifest."""
        from safetensors.torch import save_file

        g = self.grid
        step_dir = self.out_dir / DIST_DIR / f"step-{self.step:09d}"
        name = f"latent-{g.latent_index:05d}-of-{g.latent_shards:05d}.safetensors"
        facts = self._training_facts()  # collective (dead fraction): every rank computes it
        if g.data_index == 0:
            with atomic_target(step_dir / name) as tmp:
                save_file(self._shard_tensors(), str(tmp))
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
        if g.world > 1:
            dist.barrier()
        if g.rank == 0:
            manifest = {
                "format": MANIFEST_FORMAT, "step": self.step, "complete": self.complete,
                "data_shards": g.data_shards, "latent_shards": g.latent_shards,
                "files": [f"{step_dir.name}/latent-{s:05d}-of-{g.latent_shards:05d}.safetensors"
                          for s in range(g.latent_shards)],
                "identity": self.identity, "sae_config": self.full_cfg.to_dict(), "training": facts,
            }
            write_json(self.out_dir / DIST_DIR / MANIFEST, manifest)
            for old in (self.out_dir / DIST_DIR).glob("step-*"):
                if old.name != step_dir.name:
                    shutil.rmtree(old, ignore_errors=True)
        if g.world > 1:
            dist.barrier()  # nobody runs ahead (and may die) before the step is committed

    def _resume_shard(self) -> None:
        from safetensors.torch import load_file

        manifest = read_manifest(self.out_dir)
        old = manifest["identity"]
        diffs = describe_differences(old, self.identity)
        if diffs:
            raise ConfigMismatchError(
                f"{self.out_dir}: holds a run made with other settings; use another output folder or delete it.\n  "
                + "\n  ".join(diffs))
        if manifest["latent_shards"] != self.grid.latent_shards:
            raise ConfigMismatchError(
                f"{self.out_dir}: the checkpoint at step {manifest['step']} was written with --latent-shards "
                f"{manifest['latent_shards']}; resume with the same --latent-shards (the number of data-parallel "
                f"processes may change), or consolidate it and start a new run")
        path = self.out_dir / DIST_DIR / manifest["files"][self.grid.latent_index]
        tensors = load_file(str(path), device=str(self.device))
        self.sae.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})
        for name, p in self.sae.named_parameters():
            state = {key.split(".")[-1]: v for key, v in tensors.items() if key.startswith(f"adam.{name}.")}
            if state:
                state["step"] = state["step"].cpu()  # Adam keeps its step count on the CPU
                self.opt.state[p] = state
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        self.step, self.complete = int(manifest["step"]), bool(manifest["complete"])
        self.sparsity_coefficient = float(manifest["training"].get("sparsity_coefficient", self.sparsity_coefficient))


# --- consolidation ------------------------------------------------------------------------------


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The committed step of a distributed run folder (raises naming the file when absent/corrupt)."""
    path = Path(out_dir) / DIST_DIR / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: no readable distributed-checkpoint manifest ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StoreError(f"{path}: not a saecore distributed checkpoint (format {manifest.get('format')!r})")
    return manifest


def consolidate(out_dir: str | os.PathLike[str], *, write: bool = True, to: str | os.PathLike[str] | None = None,
                extra_metadata: dict[str, Any] | None = None) -> SAE:
    """Join the shards of the committed step into one SAE (input scale folded); with ``write``, save it
    as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) in ``to`` (default: ``out_dir``)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    shards = [load_file(str(out_dir / DIST_DIR / f)) for f in manifest["files"]]
    cfg = SAEConfig.from_dict(manifest["sae_config"])
    sae = SAE(cfg, seed=None)
    with torch.no_grad():
        for name, p in sae.state_dict().items():
            parts = [s[f"param.{name}"] for s in shards]
            p.copy_(parts[0] if name == "b_dec" else torch.cat(parts, 1 if name == "W_enc" else 0))
    if write:
        sae.save(to or out_dir, extra_metadata={**manifest.get("training", {}), **(extra_metadata or {}),
                                          "distributed": {k: manifest[k] for k in ("data_shards", "latent_shards")}})
    return sae.folded()


# --- entry points -------------------------------------------------------------------------------


def train_distributed(store: ActivationStore | str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      cfg: TrainConfig, *, latent_shards: int = 1, on_step: Any = None) -> SAE:
    """Train on every rank of the (already launched) process group; see the module docstring."""
    device = default_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    grid = init_grid(latent_shards, device)
    cfg = replace(cfg, device=str(device), progress=cfg.progress and grid.rank == 0)
    trainer = DistributedTrainer(open_store(store), Path(out_dir), cfg, grid, on_step=on_step)
    return trainer.run()


@dataclass(kw_only=True)
class LaunchOptions:
    """How ``saecore train`` spreads over processes (not part of the SAE's config)."""

    latent_shards: int = option(1, ge=1, le=65_536)
    """Split the latents over this many processes (under torchrun; see docs/scale.md)."""

    def __post_init__(self) -> None:
        validate(self)


# --- the consolidate verb ------------------------------------------------------------------------


@dataclass(kw_only=True)
class ConsolidateOptions:
    """Where ``saecore consolidate`` writes (the SAE folder to read is its positional argument)."""

    out: Path | None = None
    """Folder for the SAELens-layout checkpoint; unset: the SAE folder itself."""


def cli_configure_consolidate(parser: Any) -> None:
    parser.add_argument("sae", help="folder of a distributed training run (holding dist/MANIFEST.json)")
    add_arguments(parser, ConsolidateOptions)


def cli_run_consolidate(args: Any) -> int:
    """``saecore consolidate``: join the committed step's shards into cfg.json + sae_weights.safetensors."""
    opts = from_args(ConsolidateOptions, args)
    manifest = read_manifest(args.sae)  # StoreError naming the file when it is not a distributed run
    out = Path(opts.out or args.sae)
    sae = consolidate(args.sae, to=out)
    total = manifest.get("training", {}).get("total_steps", "?")
    state = "complete" if manifest["complete"] else f"partial: step {manifest['step']} of {total}"
    print(f"consolidated {sae.cfg.architecture} SAE (d_sae {sae.cfg.d_sae}, {state}) from "
          f"{manifest['latent_shards']} latent shards into {out}")
    return 0
