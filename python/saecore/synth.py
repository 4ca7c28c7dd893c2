"""SynthSAEBench-style synthetic activations with known ground truth, and the metrics that score an SAE
against it (Chanin & Garriga-Alonso 2026, arXiv:2602.14687; SAELens ``sae_lens.synthetic``).

The generator follows the published recipe, step by step (:class:`SynthModel`):

1. **Firing probabilities** — Zipfian over feature rank r = 1…N: pᵣ ∝ r^(−exponent), rescaled linearly so
   the most frequent feature fires with ``max_prob`` and the rarest with ``min_prob``.
2. **Hierarchy** — a forest built breadth-first over the feature ids in frequency order: features
   0…R−1 are roots, each parent gets ``branching`` children (the next unused ids), down to ``max_depth``.
   A child fires only when its parent fires; with ``scale_children_by_parent`` its magnitude is
   multiplied by parent value / parent mean magnitude. Siblings under a mutually exclusive parent (all
   parents, at ``mutually_exclusive_portion = 1``) keep one active child, chosen uniformly at random.
   ``compensate_probabilities`` raises each child's base probability by 1/p(parent) and, inside a
   mutually exclusive group, by (1 + Σ other siblings' p / p(parent)), clamped to 1, so the effective
   firing rates stay near the Zipf targets.
3. **Correlation** — a Gaussian copula with low-rank covariance FFᵀ + diag(1 − ‖Fᵢ‖²), F ~ N(0, scale²)
   of shape [N, rank] (rows whose diagonal would fall below 0.01 are shrunk): feature i fires when its
   latent Gaussian exceeds Φ⁻¹(1 − pᵢ).
4. **Magnitudes** — when firing, a = ReLU(μᵢ + σᵢ·ε): μ linear from ``mean_start`` (most frequent) to
   ``mean_end``; σᵢ = |N(std_mean, std_std²)| per feature.
5. **Superposition** — unit feature directions dᵢ ~ N(0, I_D) normalised, then ``ortho_steps`` Adam steps
   (lr ``ortho_lr``) on Σ_{i≠j}(dᵢ·dⱼ)² + N·Σᵢ(‖dᵢ‖² − 1)², renormalised; x = Σ aᵢdᵢ + b with a random
   bias b of norm ``bias_norm``.

Where saecore differs from SAELens (also in ``docs/benchmarks.md``): the random streams are saecore's
own (same seed ≠ same model as SAELens'), the ME winner is drawn with ``torch.rand`` per (row, group)
rather than per conflict, and the hierarchy is applied to dense [B, N] blocks. Distributions, structure
and the metric definitions below are the published ones.

Metrics (:func:`evaluate_synth`), as SAELens' ``eval_sae_on_synthetic_data`` defines them:

* **MCC**: one-to-one matching of decoder rows to true directions maximising Σ|cos| (Hungarian,
  ``scipy.optimize.linear_sum_assignment`` on 1 − |cos|); the mean |cos| over the min(d_sae, N) pairs.
* **Uniqueness**: #distinct best-matching true features (argmax |cos| per latent) / d_sae.
* **Precision / recall / F1**: each latent is a detector of its best-matching true feature: fires
  (> 0) vs the feature is active (> 0) on each sample; per-latent values are 0 where undefined; means
  over all d_sae latents (dead ones count as 0).
* **Explained variance** = 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²); **L0**; **dead** = latents never active
  on the evaluation samples; **shrinkage** = mean ‖x̂‖/‖x‖ over samples with ‖x‖ > 10⁻⁶.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

# The SynthSAEBench-16k configuration (SAELens docs, "SynthSAEBench-16k Model").
PRESETS: dict[str, dict[str, Any]] = {
    "16k": {"num_features": 16384, "hidden_dim": 768, "hierarchy_roots": 128},
    # Scaled down for 2 CPU cores: N/8 features, roots N/128 (same share in the hierarchy), N/D = 16.
    "small": {"num_features": 2048, "hidden_dim": 128, "hierarchy_roots": 16},
}


@dataclass
class SynthConfig:
    """Everything that determines a synthetic model (defaults: SynthSAEBench-16k's recipe)."""

    num_features: int = 16384
    """N, the number of ground-truth features."""

    hidden_dim: int = 768
    """D, the dimension the features are superposed in."""

    zipf_exponent: float = 0.5
    """Exponent of the Zipfian firing probabilities."""

    max_prob: float = 0.4
    """Firing probability of the most frequent feature."""

    min_prob: float = 5e-4
    """Firing probability of the rarest feature."""

    hierarchy_roots: int = 128
    """Root nodes of the hierarchy forest (0 → no hierarchy)."""

    branching: int = 4
    """Children per parent."""

    max_depth: int = 3
    """Depth of each tree (1 = roots with leaf children)."""

    mutually_exclusive_portion: float = 1.0
    """Fraction of parents whose children are mutually exclusive."""

    compensate_probabilities: bool = True
    """Raise children's base probabilities so their effective firing rates stay near the Zipf targets."""

    scale_children_by_parent: bool = True
    """Scale a child's magnitude by its parent's value / the parent's mean magnitude."""

    correlation_rank: int = 25
    """Rank of the copula's low-rank correlation factor (0 → independent firing)."""

    correlation_scale: float = 0.1
    """Standard deviation of the correlation factor's entries."""

    ortho_steps: int = 100
    """Adam steps pushing the feature directions apart."""

    ortho_lr: float = 3e-4
    """Learning rate of those steps."""

    mean_start: float = 5.0
    """Mean magnitude of the most frequent feature (linear to ``mean_end`` for the rarest)."""

    mean_end: float = 4.0
    """Mean magnitude of the rarest feature."""

    std_mean: float = 0.5
    """Per-feature magnitude std is |N(std_mean, std_std²)|."""

    std_std: float = 0.5
    """See ``std_mean``."""

    bias_norm: float = 1.0
    """Norm of the constant bias added to every activation (SAELens' default ``bias=1.0``)."""

    seed: int = 42
    """Seeds the model (directions, hierarchy, correlation, magnitudes) and, per block, the samples."""

    def __post_init__(self) -> None:
        for name in ("num_features", "hidden_dim", "branching", "max_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SynthConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (0 < self.min_prob < self.max_prob <= 1):
            raise ValueError(f"SynthConfig needs 0 < min_prob < max_prob <= 1, got {self.min_prob}, {self.max_prob}")
        if self.hierarchy_roots < 0 or self.correlation_rank < 0 or self.ortho_steps < 0:
            raise ValueError("SynthConfig.hierarchy_roots, correlation_rank and ortho_steps must be >= 0")
        if not (0.0 <= self.mutually_exclusive_portion <= 1.0):
            raise ValueError("SynthConfig.mutually_exclusive_portion must be in [0, 1]")
        if self.mean_start <= 0 or self.mean_end <= 0:
            raise ValueError("SynthConfig.mean_start and mean_end must be positive")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        """``16k`` (the published benchmark model's recipe) or ``small`` (scaled down), plus overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown synthetic preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- construction -------------------------------------------------------------------------------


def zipf_probabilities(n: int, exponent: float, max_prob: float, min_prob: float) -> torch.Tensor:
    """[n] probabilities ∝ rank^(−exponent), rescaled linearly onto [min_prob, max_prob], descending."""
    if n == 1:
        return torch.tensor([max_prob])
    raw = torch.arange(1, n + 1, dtype=torch.float64) ** (-exponent)
    scaled = (raw - raw.min()) / (raw.max() - raw.min())
    return (min_prob + (max_prob - min_prob) * scaled).float()


@dataclass
class Hierarchy:
    """A breadth-first forest over feature ids: ``levels[l]`` lists (child ids, parent ids) at depth l+1;
    ``groups[l]`` the sibling groups (parent id, child ids) whose children are mutually exclusive."""

    levels: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    groups: list[list[tuple[int, list[int]]]] = field(default_factory=list)

    @property
    def parent(self) -> dict[int, int]:
        return {int(c): int(p) for cs, ps in self.levels for c, p in zip(cs, ps)}


def build_hierarchy(cfg: SynthConfig) -> Hierarchy:
    """The forest of :class:`SynthConfig` (ids assigned breadth-first, roots = the most frequent)."""
    h = Hierarchy()
    if cfg.hierarchy_roots == 0:
        return h
    n = cfg.num_features
    next_id = min(cfg.hierarchy_roots, n)
    frontier = list(range(next_id))
    parents: list[tuple[int, list[int]]] = []
    for _ in range(cfg.max_depth):
        children, of, level_groups, new_frontier = [], [], [], []
        for p in frontier:
            kids = list(range(next_id, min(next_id + cfg.branching, n)))
            next_id += len(kids)
            children += kids
            of += [p] * len(kids)
            new_frontier += kids
            if len(kids) >= 2:
                level_groups.append((p, kids))
        if not children:
            break
        h.levels.append((torch.tensor(children), torch.tensor(of)))
        parents.append(level_groups)  # type: ignore[arg-type]
        frontier = new_frontier
    # Mutually exclusive parents: a seeded choice of the given portion of all parents with ≥ 2 children.
    flat = [(lvl, i) for lvl, gs in enumerate(parents) for i in range(len(gs))]
    n_me = int(len(flat) * cfg.mutually_exclusive_portion)
    rng = np.random.default_rng([cfg.seed, 3])
    chosen = {flat[i] for i in rng.choice(len(flat), size=n_me, replace=False)} if n_me else set()
    h.groups = [[g for i, g in enumerate(gs) if (lvl, i) in chosen] for lvl, gs in enumerate(parents)]
    return h


def compensated_probabilities(base: torch.Tensor, h: Hierarchy) -> torch.Tensor:
    """SAELens' correction: child ×1/p(parent); inside a mutually exclusive group also
    ×(1 + Σ other siblings' p / p(parent)); then clamped to 1 (base probabilities, not corrected ones)."""
    factor = torch.ones_like(base, dtype=torch.float64)
    for children, parents in h.levels:
        factor[children] = 1.0 / base[parents].double()
    for level_groups in h.groups:
        for p, kids in level_groups:
            total = float(base[kids].double().sum())
            for c in kids:
                factor[c] *= 1.0 + max(0.0, total - float(base[c])) / float(base[p])
    return (base.double() * factor).clamp(max=1.0).float()


def orthogonalized_directions(n: int, d: int, steps: int, lr: float, gen: torch.Generator) -> torch.Tensor:
    """[n, d] unit directions pushed apart by ``steps`` Adam steps on the off-diagonal Gram energy."""
    w = torch.randn(n, d, generator=gen)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if steps:
        w.requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            gram = w @ w.t()
            diag = gram.diagonal()
            # Σ_{i≠j} G_ij² written as ‖G‖² − Σ G_ii² (no [n, n] boolean mask to gather through).
            loss = gram.pow(2).sum() - diag.pow(2).sum() + n * (diag - 1).pow(2).sum()
            loss.backward()
            opt.step()
        w = w.detach()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)


class SynthModel:
    """A seeded synthetic model: :meth:`sample` draws (activations, ground-truth feature activations)."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        n = cfg.num_features
        gen = torch.Generator().manual_seed(cfg.seed)
        self.directions = orthogonalized_directions(n, cfg.hidden_dim, cfg.ortho_steps, cfg.ortho_lr, gen)
        bias = torch.randn(cfg.hidden_dim, generator=gen)
        self.bias = bias / bias.norm().clamp_min(1e-8) * cfg.bias_norm
        self.hierarchy = build_hierarchy(cfg)
        self.target_probs = zipf_probabilities(n, cfg.zipf_exponent, cfg.max_prob, cfg.min_prob)
        self.base_probs = (compensated_probabilities(self.target_probs, self.hierarchy)
                           if cfg.compensate_probabilities and self.hierarchy.levels else self.target_probs)
        self.mean_magnitudes = torch.linspace(cfg.mean_start, cfg.mean_end, n) if n > 1 else torch.tensor([cfg.mean_start])
        gen_std = torch.Generator().manual_seed(cfg.seed + 1)
        self.std_magnitudes = (cfg.std_mean + cfg.std_std * torch.randn(n, generator=gen_std)).abs()
        self.corr_factor, self.corr_diag_sqrt = self._correlation()
        # Φ⁻¹(1 − p): the copula threshold of each feature.
        self.thresholds = math.sqrt(2) * torch.erfinv(1 - 2 * self.base_probs.double()).float()

    def _correlation(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        cfg = self.cfg
        n = cfg.num_features
        if cfg.correlation_rank == 0:
            return None, torch.ones(n)
        gen = torch.Generator().manual_seed(cfg.seed + 4)
        f = torch.randn(n, cfg.correlation_rank, generator=gen) * cfg.correlation_scale
        sq = f.pow(2).sum(1)
        capped = 1 - sq < 0.01  # keep every latent Gaussian's own variance ≥ 0.01
        f[capped] *= torch.sqrt(0.99 / sq[capped]).unsqueeze(1)
        return f, (1 - f.pow(2).sum(1)).sqrt()

    def correlation_matrix(self) -> torch.Tensor:
        """[N, N] correlation of the copula's latent Gaussians (unit diagonal)."""
        n = self.cfg.num_features
        if self.corr_factor is None:
            return torch.eye(n)
        return self.corr_factor @ self.corr_factor.t() + torch.diag(self.corr_diag_sqrt.pow(2))

    def sample_features(self, rows: int, gen: torch.Generator) -> torch.Tensor:
        """[rows, N] ground-truth feature activations (non-negative, hierarchy applied; a transposed view
        of a feature-major array, in which the hierarchy's gathers and scatters move whole rows)."""
        n = self.cfg.num_features
        z = torch.randn(n, rows, generator=gen).mul_(self.corr_diag_sqrt[:, None])
        if self.corr_factor is not None:
            z.addmm_(self.corr_factor, torch.randn(self.cfg.correlation_rank, rows, generator=gen))
        fires = z > self.thresholds[:, None]
        acts = torch.randn(n, rows, generator=gen, out=z)  # z is no longer needed: reuse its memory
        acts.mul_(self.std_magnitudes[:, None]).add_(self.mean_magnitudes[:, None]).relu_().mul_(fires)
        return self._apply_hierarchy(acts, gen).t()

    def _apply_hierarchy(self, acts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """On feature-major [N, rows] activations, level by level: gate (or scale) children by their
        parent, then keep one active child per mutually exclusive group, chosen uniformly among the
        active ones."""
        for (children, parents), groups in zip(self.hierarchy.levels, self.hierarchy.groups):
            pv = acts[parents]
            if self.cfg.scale_children_by_parent:
                factor = pv / self.mean_magnitudes[parents, None]
            else:
                factor = (pv > 0).to(acts.dtype)
            acts[children] = acts[children] * factor
            for size in sorted({len(g[1]) for g in groups}):  # groups of equal size together
                kids = torch.tensor([g[1] for g in groups if len(g[1]) == size])  # [G, size]
                sub = acts[kids]  # [G, size, rows]
                self._keep_one_active(sub, gen)
                acts[kids.reshape(-1)] = sub.reshape(-1, sub.shape[-1])
        return acts

    @staticmethod
    def _keep_one_active(sub: torch.Tensor, gen: torch.Generator) -> None:
        """In place on [G, size, rows]: per (group, row) zero all active siblings but one, the j-th active
        with j uniform in 0…count−1 (the same law as SAELens' argmax of uniform scores)."""
        active = sub > 0
        count = active.sum(1)  # [G, rows]
        chosen = (torch.rand(count.shape, generator=gen) * count).floor()
        seen = torch.zeros_like(chosen)
        for j in range(sub.shape[1]):
            a = active[:, j]
            sub[:, j] *= a & (seen == chosen)
            seen += a

    def sample(self, rows: int, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [rows, D], feature activations [rows, N]) from the seeded stream ``block``."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.cfg.seed, 7, block]).generate_state(1)[0]))
        f = self.sample_features(rows, gen)
        return f @ self.directions + self.bias, f


# --- metrics ------------------------------------------------------------------------------------


def abs_cosines(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """[len(a), len(b)] |cos| between the rows of a and b (float64)."""
    ta = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    tb = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    ta = ta / ta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    tb = tb / tb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (ta @ tb.t()).abs().numpy()


def mcc(decoder: Any, truth: Any) -> float:
    """Mean |cos| over the optimal one-to-one matching of decoder rows to true directions."""
    from scipy.optimize import linear_sum_assignment

    cos = abs_cosines(decoder, truth)
    rows, cols = linear_sum_assignment(1.0 - cos)
    return float(cos[rows, cols].mean())


def uniqueness(decoder: Any, truth: Any) -> float:
    """Distinct best-matching true features over the number of latents."""
    best = abs_cosines(decoder, truth).argmax(1)
    return float(len(np.unique(best)) / max(len(best), 1))


@dataclass
class DetectionCounts:
    """Per-latent confusion counts of each latent as a detector of its best-matching true feature."""

    best_match: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def start(cls, decoder: Any, truth: Any) -> DetectionCounts:
        best = abs_cosines(decoder, truth).argmax(1)
        z = np.zeros(len(best), dtype=np.int64)
        return cls(best, z.copy(), z.copy(), z.copy())

    def add(self, latents: torch.Tensor, features: torch.Tensor) -> None:
        fires = (latents > 0).numpy()
        truth = (features[:, torch.as_tensor(self.best_match)] > 0).numpy()
        self.tp += (fires & truth).sum(0)
        self.fp += (fires & ~truth).sum(0)
        self.fn += (~fires & truth).sum(0)

    def scores(self) -> dict[str, float]:
        """Mean precision, recall and F1 over latents (each 0 where its denominator is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(self.tp + self.fp > 0, self.tp / (self.tp + self.fp), 0.0)
            r = np.where(self.tp + self.fn > 0, self.tp / (self.tp + self.fn), 0.0)
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f1.mean())}


@torch.no_grad()
def evaluate_synth(sae: Any, model: SynthModel, samples: int, block: int, batch: int = 8192) -> dict[str, float]:
    """Every metric of the module docstring for ``sae`` (a saecore SAE) on fresh samples of ``model``."""
    sae = sae.eval()
    W = sae.W_dec.detach().cpu()
    counts = DetectionCounts.start(W, model.directions)
    fired = torch.zeros(W.shape[0], dtype=torch.bool)
    sum_x = torch.zeros(model.cfg.hidden_dim, dtype=torch.float64)
    sq_x = sq_err = l0 = true_l0 = shrink = 0.0
    done = shrink_rows = 0
    for i in range(0, samples, batch):
        x, f = model.sample(min(batch, samples - i), block=block * 1_000_003 + i // batch)
        z = sae.encode(x.to(sae.device)).cpu()
        x_hat = sae.decode(z.to(sae.device)).cpu()
        counts.add(z, f)
        fired |= (z > 0).any(0)
        sum_x += x.double().sum(0)
        sq_x += float(x.double().pow(2).sum())
        sq_err += float((x - x_hat).double().pow(2).sum())
        l0 += float((z > 0).sum())
        true_l0 += float((f > 0).sum())
        norms = x.norm(dim=1)
        valid = norms > 1e-6  # as SAELens: the ratio is undefined for a zero input
        shrink += float((x_hat.norm(dim=1)[valid] / norms[valid]).sum())
        shrink_rows += int(valid.sum())
        done += x.shape[0]
    var = sq_x / done - float((sum_x / done).pow(2).sum())
    return {
        "mcc": mcc(W, model.directions),
        **counts.scores(),
        "explained_variance": 1.0 - (sq_err / done) / var,
        "l0": l0 / done,
        "true_l0": true_l0 / done,
        "dead_fraction": float((~fired).float().mean()),
        "uniqueness": uniqueness(W, model.directions),
        "shrinkage": shrink / max(shrink_rows, 1),
    }
