"""Sparse autoencoders: one interface for four architectures.

=============  ===================================================================================
``relu``       Anthropic's Scaling Monosemanticity SAE: f = ReLU(W_encᵀx + b_enc); loss = ‖x − x̂‖² +
               λ·Σᵢ fᵢ·‖W_dec,i‖₂ (the L1 penalty weighted by decoder norms, so no norm constraint).
``topk``       Gao et al. 2024: keep the k largest pre-activations per token (then ReLU); AuxK loss
               on dead latents. Decoder rows kept at unit norm.
``batchtopk``  Bussmann et al. 2024: keep the B·k largest over the whole batch while training (saecore's
               trainer keeps the k largest per row until its final steps, :attr:`SAE.select_per_row`); at
               inference a learned global threshold (EMA of the smallest kept activation) replaces it.
``jumprelu``   Rajamanoharan et al. 2024: f = z·H(z − θ) with a learned per-latent θ, trained with
               straight-through estimators (rectangle kernel) and an L0 penalty (saecore's trainer
               uses Σᵢ fᵢ/θ̄, an L1 price in units of the mean threshold, for its first steps,
               :attr:`SAE.jumprelu_l1`).
``matryoshka`` Bussmann et al. 2025 / Nabeshima 2024: BatchTopK whose latents form nested groups
               (``matryoshka_groups``); the reconstruction loss is the mean over the nested prefixes
               m₁ < m₂ < … < d_sae of ‖x − (b_dec + Σ_{i<m} fᵢ·W_dec,i)‖², so each prefix must
               reconstruct on its own. Inference as batchtopk (learned global threshold).
=============  ===================================================================================

Parameters follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (plus ``threshold [d_sae]`` for jumprelu / batchtopk). The encoder does not subtract
``b_dec`` (Anthropic's form; SAELens' ``apply_b_dec_to_input = False``).

Input scaling. Anthropic scales activations by one dataset-wide constant ``s`` so that E‖s·x‖² = d_in
(``s = sqrt(d_in / store.mean_squared_norm(hook))``). While training, the module holds parameters in
the scaled space and applies ``s`` inside :meth:`SAE.encode` / :meth:`SAE.decode`, so both always take
and return RAW hook activations. :meth:`SAE.save` folds ``s`` into the weights (W_enc·s, W_dec/s,
b_dec/s; the latents themselves are unchanged) and writes ``input_scale = 1``: a saved checkpoint is a
plain SAE on raw activations, which is what SAELens and the rest of saecore expect.

Fast paths. TopK and BatchTopK select few latents per token, so their decode is an ``embedding_bag``
over the selected rows of W_dec and their encoder backward touches only the selected columns of W_enc
(:class:`SelectedPreacts`): after the one dense encoder product, a step costs O(k·d_in) per token
instead of O(d_sae·d_in). ``SAE(cfg, fast=False)`` runs the plain dense reference (a dense feature
matrix times W_dec, autograd throughout); tests hold the two to each other.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._atomic import atomic_target, write_json
from ._digest import file_sha256
from .run import CFG_FILE, WEIGHTS_FILE
from .saelens import WEIGHTS_SHA256_KEY, read_checkpoint, saelens_config, seal_cfg
from .seeded_init import LatentShard, chunk_spans, kth_largest, seeded_directions

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
# Architectures that keep a batch top-(B·k) while training and a learned global threshold at inference.
BATCH_TOPK_FAMILY = ("batchtopk", "matryoshka")
# jumprelu's calibrated initial threshold lets this many times the target L0 fire (see initialise_from_data).
JUMPRELU_START_L0_FACTOR = 16
# Architectures with the AuxK loss on dead latents.
AUXK_FAMILY = ("topk", "batchtopk", "matryoshka")


def default_matryoshka_groups(d_sae: int) -> list[int]:
    """Bussmann et al.'s group sizes: d/16, d/16, d/8, d/4, d/2 (remainder to the last), so the nested
    prefixes are d/16, d/8, d/4, d/2, d. Groups that would be empty (tiny d_sae) are dropped."""
    prefixes = sorted({max(1, d_sae // q) for q in (16, 8, 4, 2)} | {d_sae})
    return [b - a for a, b in zip([0, *prefixes[:-1]], prefixes)]


@dataclass
class SAEConfig:
    """Shape and architecture of one SAE (everything needed to rebuild it from its weights)."""

    architecture: str
    """One of ``relu`` | ``topk`` | ``batchtopk`` | ``jumprelu`` | ``matryoshka``."""

    d_in: int
    """Width of the hook activations the SAE reads."""

    d_sae: int
    """Number of latents (dictionary size)."""

    k: int = 32
    """Active latents per token for topk; the batch average for batchtopk. Unused otherwise."""

    hook_name: str = ""
    """Hook point the activations come from (TransformerLens naming, e.g. ``blocks.15.hook_resid_post``)."""

    model_name: str = ""
    """Model the activations come from (HF name or local path)."""

    input_scale: float = 1.0
    """Multiplier applied to raw inputs inside encode (and undone after decode). Training sets it to
    Anthropic's dataset-wide constant; saved checkpoints fold it into the weights and store 1.0."""

    jumprelu_bandwidth: float = 0.05
    """Width ε of the rectangle kernel of JumpReLU's straight-through estimators (scaled units)."""

    jumprelu_init_threshold: float = 0.1
    """Initial θ of every JumpReLU latent (scaled units)."""

    aux_k: int = 0
    """Dead latents used by the AuxK loss per token (topk / batchtopk); 0 → min(d_in // 2, d_sae)."""

    batchtopk_threshold_momentum: float = 0.01
    """EMA rate of the batchtopk inference threshold towards the smallest activation kept in a batch."""

    dec_init_norm: float = 0.0
    """Initial norm of each decoder row; 0 → 0.1 for relu (Anthropic: small), 1.0 for the others
    (their decoder rows are kept at unit norm)."""

    matryoshka_groups: list[int] = field(default_factory=list)
    """matryoshka: sizes of the nested latent groups, in order, summing to d_sae (prefix i is the first
    group_1 + … + group_i latents); empty → :func:`default_matryoshka_groups`. Unused otherwise."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("d_in", "d_sae"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.architecture in AUXK_FAMILY and not (1 <= self.k <= self.d_sae):
            raise ValueError(f"SAEConfig.k must be in 1..d_sae={self.d_sae} for {self.architecture}, got {self.k}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"SAEConfig.input_scale must be a positive finite number, got {self.input_scale}")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise ValueError("SAEConfig.jumprelu_bandwidth and jumprelu_init_threshold must be positive")
        if self.aux_k < 0:
            raise ValueError(f"SAEConfig.aux_k must be >= 0, got {self.aux_k}")
        if not (0.0 < self.batchtopk_threshold_momentum <= 1.0):
            raise ValueError("SAEConfig.batchtopk_threshold_momentum must be in (0, 1]")
        if self.dec_init_norm < 0:
            raise ValueError(f"SAEConfig.dec_init_norm must be >= 0, got {self.dec_init_norm}")
        if self.architecture == "matryoshka":
            self.matryoshka_groups = check_matryoshka_groups(self.matryoshka_groups, self.d_sae, "SAEConfig")
        elif self.matryoshka_groups:
            raise ValueError(f"SAEConfig.matryoshka_groups is set but architecture is {self.architecture!r}")

    @property
    def matryoshka_prefixes(self) -> list[int]:
        """Widths of the nested prefixes (cumulative group sizes; the last is d_sae)."""
        return list(itertools.accumulate(self.matryoshka_groups))

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (all but Anthropic's relu, whose L1 penalty
        is weighted by the decoder norms instead)."""
        return self.architecture != "relu"

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k or max(self.d_in // 2, 1), self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_matryoshka_groups(groups: list[int] | tuple[int, ...], d_sae: int, owner: str) -> list[int]:
    """Validated group sizes (default when empty): positive integers summing to d_sae."""
    groups = [int(g) for g in groups] or default_matryoshka_groups(d_sae)
    if any(g < 1 for g in groups) or sum(groups) != d_sae:
        raise ValueError(
            f"{owner}.matryoshka_groups must be positive group sizes summing to d_sae={d_sae}, got {groups} "
            f"(sum {sum(groups)})"
        )
    return groups


class SAEOutput(NamedTuple):
    """What :meth:`SAE.forward` returns. Loss terms are means over rows, in scaled units."""

    x_hat: Tensor
    """[B, d_in] reconstruction in raw activation units."""
    feature_acts: Tensor | None
    """[B, d_sae] dense latent activations; None on the sparse fast path (use the sparse triple)."""
    rows: Tensor | None
    """[nnz] row of each active latent (sparse architectures), else None."""
    latents: Tensor | None
    """[nnz] latent id of each active entry (sparse architectures), else None."""
    values: Tensor | None
    """[nnz] activation of each active entry (sparse architectures), else None."""
    mse: Tensor
    """Scalar: mean over rows of ‖s·x − s·x̂‖² (s = input_scale)."""
    sparsity_loss: Tensor
    """Scalar: relu → mean Σᵢ fᵢ‖W_dec,i‖; jumprelu → mean L0 (straight-through), or mean Σᵢ fᵢ/θ̄ while
    :attr:`SAE.jumprelu_l1`; topk family → 0."""
    aux_loss: Tensor
    """Scalar: AuxK loss (dead latents reconstructing the residual), 0 without a dead mask."""
    l0: Tensor
    """Scalar: mean number of active latents per row."""
    fired: Tensor
    """[d_sae] bool: latents active on at least one row."""
    prefix_mses: Tensor | None = None
    """matryoshka: [n_prefixes] mean over rows of ‖s·x − s·x̂_m‖² using only the first m latents (plus
    b_dec), one per nested prefix (the last equals ``mse``); None for the other architectures."""

    @property
    def reconstruction_loss(self) -> Tensor:
        """The reconstruction term of the training loss: the MSE, or for matryoshka the mean of the
        nested prefixes' MSEs (Bussmann et al. 2025 average the prefix losses)."""
        return self.mse if self.prefix_mses is None else self.prefix_mses.mean()


# --- autograd pieces ----------------------------------------------------------------------------


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z·H(z − θ): gradient to z through the kept entries; to θ by the rectangle-kernel STE
    (Rajamanoharan et al. 2024, eq. 11): ∂/∂θ ≈ −(θ/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = (-(theta / eps) * _rectangle((z - theta) / eps) * grad).sum(0)
        return grad_z, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(z − θ) for the L0 penalty: gradient only to θ, −(1/ε)·K((z − θ)/ε) (eq. 12)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((z - theta) / eps) * grad).sum(0)
        return None, grad_theta, None


def by_latent(latents: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): a permutation sorting the active entries by latent, and where each latent's
    segment starts in it. Computed once per step and shared by both sparse backward products."""
    order = torch.argsort(latents)
    counts = torch.bincount(latents, minlength=d_sae)
    return order, torch.cumsum(counts, 0) - counts


def segment_matmul(rows: Tensor, weights: Tensor, dense: Tensor, order: Tensor, offsets: Tensor) -> Tensor:
    """[d_sae, d] = Σ over active entries of weight·dense[row], summed per latent: the sparse
    [d_sae, B] × dense [B, d] product of the backward passes. An ``embedding_bag`` over the entries
    sorted by latent does it as one segmented sum (no [nnz, d] temporary, no per-call sort)."""
    return F.embedding_bag(rows[order], dense, offsets, mode="sum", per_sample_weights=weights[order])


class SelectedPreacts(torch.autograd.Function):
    """Pre-activations (x @ W_enc + b_enc)[rows, latents], given ``pre_sel`` already computed densely.

    The backward pass is what makes sparse training cheap: the gradient reaches only the selected
    entries, so ∂W_enc is a sparse [d_sae, B] × dense [B, d_in] product (nnz·d_in multiply-adds)
    rather than the dense xᵀ·∂pre (B·d_sae·d_in).
    """

    @staticmethod
    def forward(
        ctx: Any, pre_sel: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, latents: Tensor,
        order: Tensor, offsets: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, rows, latents, order, offsets)
        return pre_sel.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, rows, latents, order, offsets = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = torch.bincount(latents, weights=grad, minlength=d_sae).to(grad.dtype)
        if ctx.needs_input_grad[2]:
            # (d_in, d_sae), made contiguous: Adam on a transposed view runs several times slower.
            grad_W = segment_matmul(rows, grad, x, order, offsets).t().contiguous()
        if ctx.needs_input_grad[1]:
            g = torch.sparse_coo_tensor(
                torch.stack([rows, latents]), grad, (x.shape[0], d_sae), check_invariants=False
            )
            grad_x = torch.sparse.mm(g, W_enc.t())
        return None, grad_x, grad_W, grad_b, None, None, None, None


class _DecoderGrad(torch.autograd.Function):
    """Adds zero in the forward pass; in the backward pass gives W_dec its gradient Σ value·∂out[row]
    per latent (segmented sum). Lets the decode's ``embedding_bag`` run on a detached W_dec, whose own
    dense weight backward sorts the indices again on every call."""

    @staticmethod
    def forward(ctx: Any, W_dec: Tensor, values: Tensor, rows: Tensor, order: Tensor, offsets: Tensor,
                n_rows: int) -> Tensor:
        ctx.save_for_backward(values, rows, order, offsets)
        return W_dec.new_zeros(n_rows, W_dec.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, rows, order, offsets = ctx.saved_tensors
        return segment_matmul(rows, values, grad, order, offsets), None, None, None, None, None


def sparse_decode(
    rows: Tensor, latents: Tensor, values: Tensor, W_dec: Tensor, n_rows: int,
    latent_order: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Σ over active entries of value·W_dec[latent], per row → [n_rows, d_in] (no bias).

    ``rows`` must be sorted (it is for every selection made here); an ``embedding_bag`` with per-entry
    weights then reads just the selected decoder rows; W_dec's gradient comes from :class:`_DecoderGrad`.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    row_offsets = torch.cumsum(counts, 0) - counts
    if not (W_dec.requires_grad and torch.is_grad_enabled()):
        return F.embedding_bag(latents, W_dec, row_offsets, mode="sum", per_sample_weights=values)
    out = F.embedding_bag(latents, W_dec.detach(), row_offsets, mode="sum", per_sample_weights=values)
    order, offsets = latent_order if latent_order is not None else by_latent(latents, W_dec.shape[0])
    return out + _DecoderGrad.apply(W_dec, values.detach(), rows, order, offsets, n_rows)


def dense_decode(rows: Tensor, latents: Tensor, values: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """Reference for :func:`sparse_decode`: scatter into a dense [n_rows, d_sae] matrix, multiply."""
    f = torch.zeros(n_rows, W_dec.shape[0], dtype=values.dtype, device=values.device)
    f = f.index_put((rows, latents), values, accumulate=True)
    return f @ W_dec


def geometric_median(x: Tensor, iters: int = 50) -> Tensor:
    """The point minimising Σ‖xᵢ − m‖ over rows of ``x`` [n, d] (Weiszfeld's iteration from the mean).
    Unlike the mean it is not dragged by a few huge rows (a residual stream's attention-sink tokens)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-9)
        nxt = (w[:, None] * x).sum(0) / w.sum()
        if float((nxt - m).norm()) <= 1e-7 * max(float(m.norm()), 1.0):
            return nxt.float()
        m = nxt
    return m.float()


def top_share_count(share: float, n: int) -> int:
    """How many of ``n`` values the top ``share`` of them is (at least 1, at most n)."""
    return min(max(1, round(share * n)), n)


def top_quantile(values: Tensor, share: float) -> float:
    """The value exceeded by a fraction ``share`` of ``values`` (any shape); exact (:func:`kth_largest`),
    so it works on tensors larger than :func:`torch.quantile` accepts."""
    flat = values.reshape(-1)
    return kth_largest(lambda: [flat], top_share_count(share, flat.numel()))


# --- the module ---------------------------------------------------------------------------------


class SAE(nn.Module):
    """A sparse autoencoder; see the module docstring for the architectures and the input scaling."""

    def __init__(self, cfg: SAEConfig, *, fast: bool = True, seed: int | None = 0, first_latent: int = 0):
        """``first_latent``: this SAE holds latents [first_latent, first_latent + d_sae) of a larger
        dictionary (one latent shard) and starts with the seeded values the whole one has there."""
        super().__init__()
        self.cfg = cfg
        self.fast = fast
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), float(cfg.jumprelu_init_threshold)))
        elif cfg.architecture in BATCH_TOPK_FAMILY:
            # Not trained by gradient: an EMA updated in forward (training mode), used in eval mode.
            self.register_buffer("threshold", torch.zeros(d_sae))
        self.reset_parameters(seed, first_latent)

    @property
    def dec_init_norm(self) -> float:
        """Norm of the initial decoder rows (``cfg.dec_init_norm``, or 0.1 for relu and 1 otherwise)."""
        return self.cfg.dec_init_norm or (0.1 if self.cfg.architecture == "relu" else 1.0)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0, first_latent: int = 0) -> None:
        """Anthropic's init: decoder rows are random directions of a small fixed norm, W_enc = W_decᵀ,
        biases zero (Circuits Updates, April 2024).

        With a seed, the directions are drawn per init chunk of latents (:mod:`saecore.seeded_init`), so
        latents [first_latent, first_latent + d_sae) get the values the whole dictionary has there,
        while only O(one chunk) is drawn beyond them. Without one (weights about to be overwritten:
        loading, folding), from torch's global generator."""
        d_in, lo, hi = self.cfg.d_in, first_latent, first_latent + self.cfg.d_sae
        if seed is None:
            w = torch.randn(self.cfg.d_sae, d_in)
            self.W_dec.copy_(w * (self.dec_init_norm / w.norm(dim=1, keepdim=True)))
        else:
            for start, stop in chunk_spans(lo, hi, hi):
                a, b = max(lo, start), min(hi, stop)
                self.W_dec[a - lo:b - lo] = seeded_directions(seed, start, stop, d_in, self.dec_init_norm)[a - start:b - start]
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    def _init_chunks(self, shard: LatentShard) -> Iterator[tuple[slice, slice, Tensor]]:
        """For each init chunk overlapping this SAE's latents: (its latents held here, as a slice of the
        chunk; the same latents as a slice of this SAE; the chunk's initial decoder rows, a fresh
        [chunk, d_in] tensor). Rows of a chunk held whole are copied from W_dec (so call this only
        before training); a chunk split with another shard is drawn again. Every holder of a chunk
        thus computes with the same tensor shapes, and so gets the same bits, as one process."""
        lo, hi = shard.first, shard.first + self.cfg.d_sae
        for start, stop in chunk_spans(lo, hi, shard.total):
            a, b = max(lo, start), min(hi, stop)
            if lo <= start and stop <= hi:
                rows = self.W_dec[start - lo:stop - lo].clone()
            elif shard.seed is None:
                raise ValueError(f"SAE.initialise_from_data: latents [{lo}, {hi}) split init chunk "
                                 f"[{start}, {stop}); the shard's seed is needed to draw it")
            else:
                rows = seeded_directions(shard.seed, start, stop, self.cfg.d_in, self.dec_init_norm).to(self.device)
            yield slice(a - start, b - start), slice(a - lo, b - lo), rows

    def _chunk_preacts(self, xs: Tensor, centre: Tensor | None, shard: LatentShard) -> Iterator[Tensor]:
        """Initial pre-activations of ``xs`` [n, d_in] on this SAE's latents, one init chunk at a time."""
        for mine, _, rows in self._init_chunks(shard):
            bias = -(rows @ centre) if centre is not None else rows.new_zeros(rows.shape[0])
            yield torch.addmm(bias, xs, rows.t())[:, mine]

    @torch.no_grad()
    def initialise_from_data(self, xs: Tensor, b_dec_init: str, target_l0: float, calibrate_jumprelu: bool,
                             shard: LatentShard | None = None) -> dict[str, float]:
        """Data-derived initial values from a sample ``xs`` [n, d_in] of SCALED inputs; returns what was chosen.

        ``shard``: this SAE is one latent shard of a larger dictionary (every shard calls this with the
        same ``xs``); the values are those the whole dictionary gets, computed init chunk by init chunk
        (see :mod:`saecore.seeded_init`), θ₀ by an exact count over every shard.

        * ``b_dec`` at the sample's geometric median (or mean; ``zeros`` keeps 0), and ``b_enc = −W_encᵀ·b_dec``,
          so the pre-activations start as W_encᵀ(x − b_dec): the data's constant offset is the decoder
          bias from step 0 instead of a direction a few latents learn to fire on for every token.
        * jumprelu (``calibrate_jumprelu``): θ₀ = the pre-activation value exceeded by a share
          16·target_l0/d_sae (at most 1/4) of the sample's entries, so training starts at L0 ≈ 16·target
          and the steered λ brings it down. A θ₀ fixed in advance fires about half the latents on
          centred data (L0 stuck in the hundreds); one at the target itself leaves most latents below
          θ with no gradient (toy: 0.86 vs 0.94 mean max cosine at 4× vs 16×; 50× did not get down to
          the target in 512 steps). The kernel width ε = θ₀/2, so a share of the entries near θ reach
          the threshold's straight-through gradient whatever the input's scale.
        """
        chosen: dict[str, float] = {}
        if xs.shape[0] == 0:  # nothing finite to calibrate on: keep the fixed init
            return chosen
        shard = shard or LatentShard(0, self.cfg.d_sae)
        centre = None
        if b_dec_init != "zeros":
            centre = geometric_median(xs) if b_dec_init == "geometric_median" else xs.mean(0)
            self.b_dec.copy_(centre)
            for mine, local, rows in self._init_chunks(shard):
                self.b_enc[local] = -(rows @ centre)[mine]
            chosen["b_dec_norm"] = float(centre.norm())
        if calibrate_jumprelu and self.cfg.architecture == "jumprelu":
            share = min(0.25, JUMPRELU_START_L0_FACTOR * target_l0 / shard.total)
            m = top_share_count(share, xs.shape[0] * shard.total)
            theta = max(kth_largest(lambda: self._chunk_preacts(xs, centre, shard), m, shard.reduce), 1e-3)
            self.threshold.fill_(theta)
            self.cfg.jumprelu_init_threshold = theta
            self.cfg.jumprelu_bandwidth = theta / 2
            chosen.update(jumprelu_init_threshold=theta, jumprelu_bandwidth=theta / 2)
        return chosen

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # BatchTopK family, training only: select the k largest per row instead of the B·k largest of the
    # batch (the trainer sets this for all but the final steps; the threshold learns only from batch
    # selections). A batch selection hands rows with large norms many slots, and the latents that fire
    # together on one row each fit that row's residual, so they merge its co-active directions.
    select_per_row = False
    # jumprelu, training only: the sparsity term is Σᵢ fᵢ/θ̄ (θ̄ the mean threshold, detached) instead of the
    # L0 count Σᵢ H(zᵢ − θᵢ). An entry at the mean threshold costs 1 either way, so λ keeps its meaning, and θ
    # gets the L0 form's straight-through gradient scaled by θᵢ/θ̄; the L1 form also shrinks the active
    # values, which keeps the many latents firing together on a row early on from merging its directions
    # (the trainer sets this for its first steps, TrainConfig.jumprelu_l1_frac). Per-latent θᵢ instead of θ̄
    # priced latents with small thresholds out (toy grid 0.957 vs 0.966 mean max cosine).
    jumprelu_l1 = False

    # -- encode / decode (raw activations in and out) -----------------------------------------------
    def _preacts(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x.to(self.W_enc.dtype) * self.cfg.input_scale, self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] → latent activations [..., d_sae] (inference rule)."""
        shape = x.shape
        pre = self._preacts(x.reshape(-1, shape[-1]))  # (N, d_sae)
        arch = self.cfg.architecture
        if arch == "relu":
            f = F.relu(pre)
        elif arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            f = torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))
        else:  # jumprelu and batchtopk (whose learned global threshold is a per-latent vector)
            f = F.relu(pre) * (pre > self.threshold).to(pre.dtype)
        return f.reshape(*shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Latent activations [..., d_sae] → raw-activation reconstruction [..., d_in]."""
        return (f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.cfg.input_scale

    # -- training forward ----------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """Encode and decode a batch of raw activations [B, d_in]; return losses and statistics.

        In training mode batchtopk selects per batch (and updates its threshold); in eval mode every
        architecture uses its inference rule, as :meth:`encode`. ``dead_mask`` [d_sae] bool switches
        on the AuxK loss (topk family) over the latents it marks.
        """
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"SAE.forward expects [batch, d_in={self.cfg.d_in}], got {tuple(x.shape)}")
        xs = x.to(self.W_enc.dtype) * self.cfg.input_scale  # (B, d_in) scaled units
        arch = self.cfg.architecture
        if arch == "relu" and self.fast:
            out = self._forward_relu_adaptive(xs)
        elif arch == "relu" or (arch in BATCH_TOPK_FAMILY and not self.training):
            out = self._forward_dense(xs)
        elif arch == "jumprelu":
            out = self._forward_jumprelu(xs)
        else:
            out = self._forward_selected(xs)
        if dead_mask is not None and arch in AUXK_FAMILY:
            aux = self._aux_loss(xs, out[0], dead_mask)
            out = out._replace(aux_loss=aux)
        return out._replace(x_hat=out.x_hat / self.cfg.input_scale)

    def _finish(
        self, xs: Tensor, xs_hat: Tensor, dense: Tensor | None, sparse: tuple[Tensor, Tensor, Tensor] | None,
        sparsity: Tensor,
    ) -> SAEOutput:
        zero = xs.new_zeros(())
        mse = (xs_hat - xs).pow(2).sum(-1).mean()
        if sparse is not None:
            rows, latents, values = sparse
            active = values > 0
            l0 = active.sum().to(xs.dtype) / xs.shape[0]
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
            fired[latents[active]] = True
            return SAEOutput(xs_hat, None, rows, latents, values, mse, sparsity, zero, l0, fired)
        assert dense is not None
        active = dense > 0
        return SAEOutput(xs_hat, dense, None, None, None, mse, sparsity, zero,
                         active.sum(-1).to(xs.dtype).mean(), active.any(0))

    def _forward_dense(self, xs: Tensor, pre: Tensor | None = None) -> SAEOutput:
        pre = torch.addmm(self.b_enc, xs, self.W_enc) if pre is None else pre  # (B, d_sae)
        if self.cfg.architecture == "relu":
            f = F.relu(pre)
            # Anthropic's penalty: Σᵢ fᵢ·‖W_dec,i‖ — a matrix-vector product, no [B, d_sae] temporary.
            sparsity = (f @ self.W_dec.norm(dim=1)).mean()
        else:
            f = F.relu(pre) * (pre > self.threshold).to(pre.dtype)
            sparsity = xs.new_zeros(())
        return self._finish(xs, torch.addmm(self.b_dec, f, self.W_dec), f, None, sparsity)

    # Above this fraction of active entries the sparse relu path loses to dense products (gathers and
    # scatters of nnz·d_in cost more than the dense GEMMs they replace). Early in training, with
    # Anthropic's init, about half the latents fire; a trained SAE fires a few percent.
    RELU_SPARSE_MAX_DENSITY = 0.05

    def _forward_relu_adaptive(self, xs: Tensor) -> SAEOutput:
        """relu with the sparse path when few latents fire: the same function and gradients as
        :meth:`_forward_dense` (ReLU passes no gradient where it is zero), but only the encoder's
        forward product is dense."""
        B = xs.shape[0]
        pre = torch.addmm(self.b_enc, xs, self.W_enc)  # (B, d_sae), tracked: the dense branch reuses it
        with torch.no_grad():
            active = pre > 0
            density = float(active.sum()) / active.numel()
        if density > self.RELU_SPARSE_MAX_DENSITY:
            del active
            return self._forward_dense(xs, pre)
        pre = pre.detach()
        with torch.no_grad():
            rows, latents = active.nonzero(as_tuple=True)  # row-major: rows ascending
            pre_sel = pre[rows, latents]
        del pre, active
        order = by_latent(latents, self.cfg.d_sae)
        vals = F.relu(SelectedPreacts.apply(pre_sel, xs, self.W_enc, self.b_enc, rows, latents, *order))
        xs_hat = sparse_decode(rows, latents, vals, self.W_dec, B, order) + self.b_dec
        sparsity = (vals * self.W_dec.norm(dim=1)[latents]).sum() / B
        return self._finish(xs, xs_hat, None, (rows, latents, vals), sparsity)

    def _forward_jumprelu(self, xs: Tensor) -> SAEOutput:
        pre = torch.addmm(self.b_enc, xs, self.W_enc)  # (B, d_sae)
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFunction.apply(pre, self.threshold, eps)
        if self.jumprelu_l1:
            sparsity = (f / self.threshold.detach().mean()).sum(-1).mean()
        else:
            sparsity = StepFunction.apply(pre, self.threshold, eps).sum(-1).mean()
        return self._finish(xs, torch.addmm(self.b_dec, f, self.W_dec), f, None, sparsity)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, latents) of the kept entries, rows ascending: per-row top-k, or batch top-(B·k)."""
        B = pre.shape[0]
        k = self.cfg.k
        if self.cfg.architecture == "topk" or self.select_per_row:
            idx = pre.topk(k, dim=-1, sorted=False).indices  # (B, k)
            rows = torch.arange(B, device=pre.device).repeat_interleave(k)
            return rows, idx.reshape(-1)
        flat = pre.reshape(-1).topk(min(B * k, pre.numel()), sorted=False).indices  # (B·k,)
        flat = flat.sort().values  # row-major order → rows ascending
        return flat // self.cfg.d_sae, flat % self.cfg.d_sae

    def _forward_selected(self, xs: Tensor) -> SAEOutput:
        B = xs.shape[0]
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xs, self.W_enc)  # (B, d_sae): the one dense product of the step
            rows, latents = self._select(pre)
            pre_sel = pre[rows, latents]
        del pre
        if self.fast:
            order = by_latent(latents, self.cfg.d_sae)
            vals = F.relu(SelectedPreacts.apply(pre_sel, xs, self.W_enc, self.b_enc, rows, latents, *order))
            xs_hat = sparse_decode(rows, latents, vals, self.W_dec, B, order) + self.b_dec
        else:
            # Reference: gather from a dense, autograd-tracked pre-activation matrix.
            pre_ref = xs @ self.W_enc + self.b_enc
            vals = F.relu(pre_ref[rows, latents])
            xs_hat = dense_decode(rows, latents, vals, self.W_dec, B) + self.b_dec
        if self.training and self.cfg.architecture in BATCH_TOPK_FAMILY and not self.select_per_row:
            self._update_threshold(vals.detach())
        out = self._finish(xs, xs_hat, None, (rows, latents, vals), xs.new_zeros(()))
        if self.cfg.architecture == "matryoshka":
            out = out._replace(prefix_mses=self._prefix_mses(xs, rows, latents, vals))
        return out

    def _prefix_mses(self, xs: Tensor, rows: Tensor, latents: Tensor, vals: Tensor) -> Tensor:
        """[n_prefixes] MSE of each nested prefix's reconstruction b_dec + Σ_{latent < m} f·W_dec.

        Each group's entries are decoded on their own and the partial sums accumulated, so the whole
        costs one pass over the selected entries (O(nnz·d_in)) plus a [B, d_in] add per group."""
        B = xs.shape[0]
        recon = self.b_dec.expand(B, -1)
        mses = []
        start = 0
        for width in self.cfg.matryoshka_prefixes:
            in_group = (latents >= start) & (latents < width)  # keeps rows ascending
            r, lat, v = rows[in_group], latents[in_group], vals[in_group]
            if self.fast:
                recon = recon + sparse_decode(r, lat, v, self.W_dec, B)
            else:
                recon = recon + dense_decode(r, lat, v, self.W_dec, B)
            mses.append((recon - xs).pow(2).sum(-1).mean())
            start = width
        return torch.stack(mses)

    @torch.no_grad()
    def _update_threshold(self, vals: Tensor) -> None:
        positive = vals[vals > 0]
        if positive.numel():
            m = self.cfg.batchtopk_threshold_momentum
            current = self.threshold[0]
            new = positive.min() if current == 0 else (1 - m) * current + m * positive.min()
            self.threshold.fill_(float(new))

    def _aux_loss(self, xs: Tensor, xs_hat: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024, §A.2): the top-k_aux dead latents reconstruct the residual x − x̂;
        the loss is that reconstruction's error normalised by the residual's variance, so dead latents
        get a gradient towards what the live ones miss."""
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return xs.new_zeros(())
        k_aux = min(self.cfg.effective_aux_k, n_dead)
        B = xs.shape[0]
        residual = (xs - xs_hat).detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xs, self.W_enc)  # (B, d_sae)
            pre = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
            idx = pre.topk(k_aux, dim=-1, sorted=False).indices  # (B, k_aux)
            rows = torch.arange(B, device=xs.device).repeat_interleave(k_aux)
            latents = idx.reshape(-1)
            pre_sel = pre[rows, latents]
        del pre
        if self.fast:
            order = by_latent(latents, self.cfg.d_sae)
            vals = F.relu(SelectedPreacts.apply(pre_sel, xs, self.W_enc, self.b_enc, rows, latents, *order))
            recon = sparse_decode(rows, latents, vals, self.W_dec, B, order)
        else:
            vals = F.relu((xs @ self.W_enc + self.b_enc)[rows, latents])
            recon = dense_decode(rows, latents, vals, self.W_dec, B)
        # Gao et al. normalise both losses by a variance: MSE/Var(x) + α·MSE_aux/Var(e). Our main loss is
        # the plain MSE (per row, scaled units), so the AuxK term is multiplied by Var(x) per row to keep
        # their α = 1/32 meaning the same balance (unscaled, it was ~d_in times weaker: with Anthropic's
        # scaling Var(x) ≈ d_in, and dead latents barely moved).
        with torch.no_grad():
            denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
            var_x = (xs - xs.mean(0)).pow(2).sum() / B
        return (recon - residual).pow(2).sum() * (var_x / denom)

    # -- constraints applied by the trainer ------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (architectures other than relu)."""
        if self.cfg.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so an optimiser step
        changes the direction and the renormalisation does not fight it (Bricken et al. 2023)."""
        if self.cfg.unit_norm_decoder and self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        if self.cfg.architecture == "jumprelu":
            self.threshold.clamp_(min=1e-6)

    # -- folding and persistence -----------------------------------------------------------------
    @torch.no_grad()
    def folded(self) -> SAE:
        """A copy whose input scale is folded into the weights (input_scale = 1, same latents)."""
        s = self.cfg.input_scale
        cfg = SAEConfig.from_dict({**self.cfg.to_dict(), "input_scale": 1.0})
        out = SAE(cfg, fast=self.fast, seed=None)
        out.load_state_dict(self.state_dict())
        out.W_enc.mul_(s)
        out.W_dec.div_(s)
        out.b_dec.div_(s)
        return out.to(self.device)

    def save(self, directory: str | os.PathLike[str], extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout, input scale folded), each
        by write-aside-then-rename."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sae = self.folded() if self.cfg.input_scale != 1.0 else self
        tensors, cfg = saelens_config(sae, extra_metadata or {})
        from safetensors.torch import save_file

        with atomic_target(directory / WEIGHTS_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            # Recorded in cfg.json, checked by every load: a flipped byte is an error, not other results.
            cfg["metadata"]["saecore"][WEIGHTS_SHA256_KEY] = file_sha256(tmp)
        write_json(directory / CFG_FILE, seal_cfg(cfg))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str | torch.device | None = None) -> SAE:
        """Load a checkpoint written by :meth:`save` or by SAELens (standard, topk, jumprelu)."""
        fields, tensors = read_checkpoint(Path(directory))
        sae = cls(SAEConfig.from_dict(fields), seed=None)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(sae, name).copy_(tensor)
        sae.eval()
        return sae.to(device) if device is not None else sae
