"""``saecore composite``: are an SAE's features the model's features, or composites of them?

**Meta-SAE** (Bussmann et al. 2024, "Showing SAE latents are not atomic using meta-SAEs"). A small
BatchTopK SAE — saecore's own :class:`~saecore.sae.SAE` and training step — is trained on the
unit-normalised decoder rows of an SAE. Each feature is then described by the meta-latents its decoder
direction activates (the meta-SAE's inference rule, a learned global threshold, so the count varies
per feature), their weights, and the cosine between the direction and its meta-reconstruction. The
meta-SAE has no decoder bias: a feature is a sum of meta-latents, nothing is added to every one.
Features that share meta-latents share a component.

**Planted ground truth.** Two groups of ``g`` atomic directions, A₁…A_g and B₁…B_g (orthonormal). A
sample is one atom alone (probability ``toy_alone``) or a composite: one A and one B firing together
with one magnitude, ``x = c·(a_i + b_j)``. SAEs (ReLU, Anthropic's L1 on decoder norms) of growing size
are trained on it; each decoder row is called an atom or a composite when its cosine to one exceeds
0.9 (an atom and a composite containing it are at cos 0.71). A small SAE has room only for the atoms;
once there is room for the g² composites, the L1 penalty favours them (one latent of norm ‖x‖ costs
less than two of total c·2). A meta-SAE (2g meta-latents, k = 2) on the largest dictionary should
then find the atoms again.

Decoder-cosine statistics of the run's SAE and of the toy SAEs are set beside the random and
covariance-matched baselines of ``saecore geometry`` (:func:`saecore.geometry.geometry_baselines`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import run as layout
from ._atomic import atomic_target, write_parquet
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .errors import CorruptDataError
from .geometry import (
    SAEDirections,
    activation_covariance,
    baseline_quantiles,
    geometry_baselines,
    load_directions,
)
from .sae import SAE, SAEConfig
from .tables import check_sealed, seal_file
from .training import sae_step

#: Cosine above which a decoder row "is" a planted direction (an atom and a composite holding it: 0.71).
MATCH_COSINE = 0.9


@dataclass(kw_only=True)
class CompositeConfig:
    """Options of ``saecore composite``: the meta-SAE on a run's SAE, and the planted-composite toy."""

    run: Path | None = None
    """Run folder: its SAE is decomposed (with --sae to pick one) and results go to RUN/experiments/composite."""
    sae: Path | None = None
    """SAE folder to decompose (default: the run's only SAE; without a run or SAE only the toy runs)."""
    out: Path | None = None
    """Output folder (default: RUN/experiments/composite, or runs/composite without a run)."""
    meta_latents: int = option(0, ge=0, le=1 << 20)
    """Meta-SAE dictionary size; 0 → d_sae / 8."""
    meta_k: int = option(4, ge=1, le=1024)
    """Meta-latents per feature on average (BatchTopK k of the meta-SAE)."""
    steps: int = option(1000, ge=1, le=10_000_000)
    """Meta-SAE training steps."""
    batch_size: int = option(1024, ge=1, le=1 << 20)
    """Decoder directions per meta-SAE training step."""
    lr: float = option(1e-3, gt=0, le=1)
    """Adam learning rate of the meta-SAE."""
    max_tokens: int = option(50_000, ge=2, le=1 << 32)
    """Activation rows read for the covariance-matched baseline."""
    toy: bool = option(True, flag="--no-toy")
    """Run the planted-composite toy (--no-toy: only the run's SAE)."""
    toy_group_size: int = option(6, ge=2, le=64)
    """Toy: atoms per group (g); there are 2g atoms and g² composites."""
    toy_d: int = option(64, ge=4, le=4096)
    """Toy: dimension the atoms live in (at least 2g: they are orthonormal)."""
    toy_sizes: list[int] = option(default_factory=lambda: [6, 12, 24, 48, 96], append=True, ge=1, le=1 << 16,
                                  flag="--toy-size")
    """Toy: a dictionary size to train (repeatable)."""
    toy_alone: float = option(0.25, ge=0, le=1)
    """Toy: probability that a sample is one atom alone rather than a composite."""
    toy_samples: int = option(16_384, ge=256, le=1 << 24)
    """Toy: training samples."""
    toy_steps: int = option(1000, ge=1, le=10_000_000)
    """Toy: training steps of each toy SAE."""
    toy_l1: float = option(10.0, ge=0)
    """Toy: L1 coefficient of the toy SAEs (Anthropic's loss, scaled inputs)."""
    toy_lr: float = option(3e-3, gt=0, le=1)
    """Toy: Adam learning rate of the toy SAEs and their meta-SAE."""
    device: str | None = None
    """torch device (default: CUDA when present)."""
    seed: int = option(0, ge=0, lt=1 << 31)
    """Seeds the toy data, every SAE's initialisation and batch order, and the baselines."""

    def __post_init__(self) -> None:
        validate(self)
        if self.toy and self.toy_d < 2 * self.toy_group_size:
            raise ValueError(f"composite: --toy-d {self.toy_d} is less than 2 x --toy-group-size "
                             f"({2 * self.toy_group_size} orthonormal atoms)")


# -- fitting an SAE on rows held in memory ----------------------------------------------------------
@dataclass
class FitOptions:
    """How :func:`fit_in_memory` trains: steps, batch, learning rate, sparsity, bias and seed."""

    steps: int
    batch_size: int
    lr: float
    l1: float = 0.0
    """relu: λ of Anthropic's Σ fᵢ‖W_dec,i‖ penalty (warmed up over the first 5 % of steps)."""
    decoder_bias: bool = True
    """False: b_dec stays zero (the meta-SAE: a direction is a sum of meta-latents, nothing added)."""
    seed: int = 0
    device: str | None = None
    history: list[float] = field(default_factory=list)
    """Filled with the loss of every 100th step (for a look at convergence)."""


def fit_in_memory(x: torch.Tensor, cfg: SAEConfig, opts: FitOptions) -> SAE:
    """Train an SAE (saecore's module and :func:`~saecore.training.sae_step`) on the rows of ``x``.

    Inputs are scaled so that E‖s·x‖² = d_in (as the trainer does); batches are seeded permutations,
    epoch after epoch; the learning rate decays linearly to 0 over the last 20 % of steps; dead latents
    (no activation for a whole epoch) feed the AuxK loss of the top-k family. Returns the SAE with
    its input scale folded, in eval mode.
    """
    dev = default_device(opts.device)
    x = x.to(dev, torch.float32)  # (n, d_in)
    scale = math.sqrt(cfg.d_in / float(x.pow(2).sum(1).mean().clamp_min(1e-12)))
    sae = SAE(SAEConfig.from_dict({**cfg.to_dict(), "input_scale": scale}), seed=opts.seed).to(dev).train()
    if not opts.decoder_bias:
        sae.b_dec.requires_grad_(False)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=opts.lr)
    gen = torch.Generator().manual_seed(opts.seed)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=dev)
    order, pos = torch.randperm(len(x), generator=gen), 0
    decay_from = int(opts.steps * 0.8)
    for step in range(opts.steps):
        if pos + opts.batch_size > len(x) and pos > 0:  # next epoch
            order, pos = torch.randperm(len(x), generator=gen), 0
        batch = x[order[pos : pos + opts.batch_size].to(dev)]  # (B, d_in)
        pos += opts.batch_size
        for group in opt.param_groups:
            group["lr"] = opts.lr * min(1.0, (opts.steps - step) / max(1, opts.steps - decay_from))
        lam = opts.l1 * min(1.0, (step + 1) / max(1, opts.steps // 20))
        loss, out = sae_step(sae, opt, batch, lam, 1 / 32, since_fired >= len(x), grad_clip=1.0)
        since_fired += len(batch)
        since_fired[out.fired] = 0
        if step % 100 == 0:
            opts.history.append(float(loss))
    return sae.folded().eval()


def unit_rows(w: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rows scaled to unit norm, float32 (a zero row stays zero)."""
    t = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w).float()
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


# -- the meta-SAE ------------------------------------------------------------------------------------
def fit_meta_sae(decoder: torch.Tensor | np.ndarray, n_meta: int, k: int, opts: FitOptions) -> SAE:
    """A BatchTopK meta-SAE with ``n_meta`` latents, ``k`` per direction on average, no decoder bias,
    trained on the unit-normalised rows of ``decoder`` [d_sae, d_in]."""
    dirs = unit_rows(decoder)
    if not 1 <= k <= n_meta:
        raise ValueError(f"composite: meta k = {k} must be between 1 and the {n_meta} meta-latents")
    cfg = SAEConfig(architecture="batchtopk", d_in=dirs.shape[1], d_sae=n_meta, k=k)
    opts = dataclasses.replace(opts, decoder_bias=False, l1=0.0)
    return fit_in_memory(dirs, cfg, opts)


@torch.no_grad()
def decompose(meta: SAE, decoder: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [d_sae, n_meta], cosine [d_sae])``: each unit decoder direction's meta-latent
    activations (inference rule) and the cosine between the direction and its meta-reconstruction."""
    dirs = unit_rows(decoder).to(meta.device)  # (d_sae, d_in)
    acts = meta.encode(dirs)  # (d_sae, n_meta)
    recon = meta.decode(acts)
    cos = torch.nn.functional.cosine_similarity(recon, dirs, dim=1)
    return acts.cpu(), torch.nan_to_num(cos).cpu()


def feature_table(acts: torch.Tensor, cos: torch.Tensor) -> Any:
    """One row per feature: its meta-latents (by weight, largest first), their weights, how many, the
    reconstruction cosine, how many other features share at least one meta-latent with it, and the
    feature sharing the most (Jaccard of their meta-latent sets)."""
    import pyarrow as pa

    on = acts > 0  # (n, m)
    counts = on.sum(1)
    shared = on.float() @ on.float().T  # (n, n) meta-latents in common
    shared.fill_diagonal_(0)
    union = counts[:, None] + counts[None, :] - shared
    jaccard = torch.where(union > 0, shared / union.clamp_min(1), torch.zeros_like(shared))
    best_j, best = jaccard.max(1)
    lists, weights = [], []
    for row in acts:
        idx = torch.nonzero(row > 0).flatten()
        idx = idx[torch.argsort(row[idx], descending=True)]
        lists.append(idx.tolist())
        weights.append(row[idx].tolist())
    return pa.table({
        "feature": pa.array(np.arange(len(acts), dtype=np.uint32)),
        "n_meta": pa.array(counts.numpy().astype(np.uint32)),
        "meta_latents": pa.array(lists, pa.list_(pa.uint32())),
        "weights": pa.array(weights, pa.list_(pa.float32())),
        "reconstruction_cosine": pa.array(cos.numpy().astype(np.float32)),
        "n_sharing": pa.array((shared > 0).sum(1).numpy().astype(np.uint32)),
        "most_shared_with": pa.array(np.where(best_j.numpy() > 0, best.numpy(), -1).astype(np.int64)),
        "most_shared_jaccard": pa.array(best_j.numpy().astype(np.float32)),
    })


def meta_latent_table(acts: torch.Tensor, top: int = 20) -> Any:
    """One row per meta-latent: how many features use it, and the ``top`` of them by weight."""
    import pyarrow as pa

    on = acts > 0
    feats, weights = [], []
    for col in acts.T:
        idx = torch.nonzero(col > 0).flatten()
        idx = idx[torch.argsort(col[idx], descending=True)][:top]
        feats.append(idx.tolist())
        weights.append(col[idx].tolist())
    return pa.table({
        "meta_latent": pa.array(np.arange(acts.shape[1], dtype=np.uint32)),
        "n_features": pa.array(on.sum(0).numpy().astype(np.uint32)),
        "top_features": pa.array(feats, pa.list_(pa.uint32())),
        "top_weights": pa.array(weights, pa.list_(pa.float32())),
    })


# -- the planted toy -----------------------------------------------------------------------------------
@dataclass
class ComposedToy:
    """The toy's ground truth and samples."""

    atoms: torch.Tensor
    """[2g, d] orthonormal: rows 0..g-1 are the A group, g..2g-1 the B group."""
    composites: torch.Tensor
    """[g², d] unit (a_i + b_j)/√2, row i·g + j."""
    x: torch.Tensor
    """[samples, d] the data."""


def composed_toy(group_size: int, d: int, samples: int, alone: float, seed: int) -> ComposedToy:
    """Atoms in two groups; each sample one atom alone (prob ``alone``) or one A with one B, magnitude
    c ~ U(0.5, 1.5) shared by both (so the composite is a direction), plus noise 0.01 per dimension."""
    g = group_size
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.linalg.qr(torch.randn(d, 2 * g, generator=gen, dtype=torch.float64))[0].T.float()  # (2g, d)
    a, b = atoms[:g], atoms[g:]
    composites = unit_rows((a[:, None, :] + b[None, :, :]).reshape(g * g, d))
    i = torch.randint(g, (samples,), generator=gen)
    j = torch.randint(g, (samples,), generator=gen)
    c = 0.5 + torch.rand(samples, 1, generator=gen)
    single = torch.rand(samples, generator=gen) < alone
    which = torch.rand(samples, generator=gen) < 0.5  # a lone atom: from group A or group B
    pair = a[i] + b[j]  # (samples, d)
    lone = torch.where(which[:, None], a[i], b[j])
    x = c * torch.where(single[:, None], lone, pair) + 0.01 * torch.randn(samples, d, generator=gen)
    return ComposedToy(atoms, composites, x)


def match_counts(decoder: torch.Tensor, toy: ComposedToy) -> dict[str, float]:
    """What a dictionary learned: decoder rows that are atoms / composites (cosine ≥ 0.9), and of the
    planted atoms and composites how many have such a row; mean max cosine of each truth to the rows."""
    w = unit_rows(decoder)
    to_atoms, to_comp = w @ toy.atoms.T, w @ toy.composites.T  # (rows, 2g), (rows, g²)
    return {
        "rows_atom": int((to_atoms.max(1).values >= MATCH_COSINE).sum()),
        "rows_composite": int((to_comp.max(1).values >= MATCH_COSINE).sum()),
        "atoms_found": int((to_atoms.max(0).values >= MATCH_COSINE).sum()),
        "composites_found": int((to_comp.max(0).values >= MATCH_COSINE).sum()),
        "atom_mean_max_cosine": float(to_atoms.max(0).values.mean()),
        "composite_mean_max_cosine": float(to_comp.max(0).values.mean()),
    }


def toy_sweep(cfg: CompositeConfig) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Toy SAEs of each size (what they learned), the meta-SAE on the largest one (does it find the
    atoms?), and each toy SAE's decoder geometry against the baselines."""
    g = cfg.toy_group_size
    toy = composed_toy(g, cfg.toy_d, cfg.toy_samples, cfg.toy_alone, cfg.seed)
    cov = torch.cov(toy.x.T.double()).numpy()
    rows, geometry, saes = [], [], {}
    for size in sorted(set(cfg.toy_sizes)):
        sae = fit_in_memory(toy.x, SAEConfig(architecture="relu", d_in=cfg.toy_d, d_sae=size),
                            FitOptions(cfg.toy_steps, 256, cfg.toy_lr, l1=cfg.toy_l1, seed=cfg.seed, device=cfg.device))
        decoder = sae.W_dec.detach().cpu()
        live = decoder[decoder.norm(dim=1) > 1e-3 * decoder.norm(dim=1).max()]  # L1 shrinks unused rows to ~0
        rows.append({"d_sae": size, "live_rows": len(live), **match_counts(live, toy)})
        saes[size] = live
        geometry += baseline_rows(f"toy-{size}", live.numpy(), cov, cfg.seed, cfg.device)
    largest = max(saes)
    meta = fit_meta_sae(saes[largest], 2 * g, 2, FitOptions(cfg.toy_steps, 256, cfg.toy_lr, seed=cfg.seed, device=cfg.device))
    acts, cos = decompose(meta, saes[largest])
    found = match_counts(meta.W_dec.detach().cpu(), toy)
    meta_row = {"d_sae": largest, "meta_latents": 2 * g, "meta_k": 2, "mean_reconstruction_cosine": float(cos.mean()),
                "mean_meta_per_feature": float((acts > 0).sum(1).float().mean()),
                "atoms_found": found["atoms_found"], "atom_mean_max_cosine": found["atom_mean_max_cosine"],
                "atoms": 2 * g}
    return rows, meta_row, geometry


# -- decoder-geometry baselines (saecore geometry's) -------------------------------------------------
def baseline_rows(name: str, decoder: np.ndarray, covariance: np.ndarray | None, seed: int,
                  device: str | None) -> list[dict[str, Any]]:
    """Max cosine of each decoder row to the others, and of random and covariance-shaped random
    directions (:func:`saecore.geometry.geometry_baselines`): median and 10 % / 90 % quantiles per kind."""
    if len(decoder) < 2:
        return []
    dirs = SAEDirections(name=name, path=Path(name), decoder=np.ascontiguousarray(decoder, dtype=np.float32),
                         encoder=np.ascontiguousarray(decoder.T, dtype=np.float32), hook_name="")
    table = geometry_baselines(dirs, covariance, seed=seed, device=device)
    return [{"dictionary": name, **row} for row in baseline_quantiles(table)]


# -- plots ---------------------------------------------------------------------------------------------
def _figure(size: tuple[float, float]) -> Any:
    # An explicit Agg canvas: the process-wide matplotlib backend is never touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_meta(features: Any, meta_latents: Any, path: Path) -> None:
    """Meta-latents per feature, reconstruction cosine, and features per meta-latent (sorted)."""
    fig = _figure((13, 3.6))
    ax = fig.subplots(1, 3)
    n_meta = features["n_meta"].to_numpy()
    ax[0].hist(n_meta, bins=np.arange(n_meta.max() + 2) - 0.5)
    ax[0].set(xlabel="active meta-latents", ylabel="features")
    ax[1].hist(features["reconstruction_cosine"].to_numpy(), bins=50, range=(0, 1))
    ax[1].set(xlabel="cosine(direction, meta-reconstruction)", ylabel="features")
    ax[2].plot(np.sort(meta_latents["n_features"].to_numpy())[::-1])
    ax[2].set(xlabel="meta-latent (by use)", ylabel="features using it", yscale="symlog")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_toy(rows: list[dict[str, Any]], path: Path) -> None:
    """Decoder rows that are atoms vs composites, against dictionary size."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    sizes = [r["d_sae"] for r in rows]
    ax.plot(sizes, [r["atoms_found"] for r in rows], "-o", label="planted atoms found")
    ax.plot(sizes, [r["composites_found"] for r in rows], "-s", label="planted composites found")
    ax.set(xscale="log", xlabel="dictionary size", ylabel=f"count (cosine ≥ {MATCH_COSINE})")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _write(table: Any, path: Path) -> Path:
    import pyarrow as pa

    write_parquet(table if isinstance(table, pa.Table) else pa.Table.from_pylist(table), path)
    return seal_file(path)  # read back by the feature pages, so checked like every table


@dataclass
class Decomposition:
    """An SAE's meta-SAE decomposition as its feature pages show it (:func:`read_decomposition`)."""

    features: dict[str, list[Any]]
    """Columns of ``composite_features.parquet``, indexed by feature id."""
    meta_users: list[int]
    """Per meta-latent, how many features use it."""
    meta_top: list[list[int]]
    """Per meta-latent, the features that weigh it most."""

    def of(self, feature: int, others: int = 5) -> dict[str, Any] | None:
        """One feature's decomposition: its meta-latents (weight, users, top other users) and overlap."""
        c = self.features
        if not 0 <= feature < len(c["feature"]):
            return None
        metas = [{"m": int(m), "w": float(w), "users": self.meta_users[m],
                  "others": [f for f in self.meta_top[m] if f != feature][:others]}
                 for m, w in zip(c["meta_latents"][feature], c["weights"][feature])]
        return {"n_meta": int(c["n_meta"][feature]), "cosine": float(c["reconstruction_cosine"][feature]),
                "n_sharing": int(c["n_sharing"][feature]), "most_shared_with": int(c["most_shared_with"][feature]),
                "jaccard": float(c["most_shared_jaccard"][feature]), "meta": metas}


def read_decomposition(folder: Path) -> Decomposition | None:
    """The meta-SAE tables ``saecore composite`` wrote into ``folder`` (None when absent); each is
    checked against its sha256, and a damaged or malformed one is a CorruptDataError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [folder / layout.COMPOSITE_FEATURES_FILE, folder / layout.COMPOSITE_META_FILE]
    if not paths[0].exists():
        return None
    tables = []
    for path in paths:
        check_sealed(path)
        try:
            tables.append(pq.read_table(path).to_pydict())
        except (pa.ArrowException, OSError) as e:
            raise CorruptDataError(f"{path}: unreadable Parquet table ({e})") from e
    features, metas = tables
    try:
        if features["feature"] != list(range(len(features["feature"]))):
            raise ValueError("rows are not features 0..n-1 in order")
        return Decomposition(features, [int(n) for n in metas["n_features"]], [list(t) for t in metas["top_features"]])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptDataError(f"{paths[0]}: not a saecore composite result ({type(e).__name__}: {e})") from e


def _write_plot(draw: Any, path: Path, *args: Any) -> Path:
    with atomic_target(path) as tmp:
        draw(*args, tmp)
    return path


# -- the verb ------------------------------------------------------------------------------------------
def output_dir(cfg: CompositeConfig) -> Path:
    """``--out``, else the run's experiments/composite, else runs/composite."""
    if cfg.out is not None:
        return cfg.out
    return layout.Run(cfg.run).experiment(layout.COMPOSITE_EXPERIMENT) if cfg.run is not None else Path("runs/composite")


def sae_folder(cfg: CompositeConfig) -> Path | None:
    """The SAE to decompose: ``--sae``, else the run's only SAE, else none (toy only)."""
    if cfg.sae is not None or cfg.run is None:
        return cfg.sae
    run = layout.Run(cfg.run)
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root}: no run folder here")
    saes = run.sae_names()
    if len(saes) != 1:
        raise ValueError(f"{run.root}: holds SAEs {saes or 'none'}; pick one with --sae")
    return run.sae(saes[0])


def real_sae(cfg: CompositeConfig, sae_dir: Path, out: Path) -> Iterator[Any]:
    """The meta-SAE on ``sae_dir``: tables, plot, summary lines; then its decoder geometry."""
    sae = load_directions(sae_dir)
    n_meta = cfg.meta_latents or max(2, sae.d_sae // 8)
    opts = FitOptions(cfg.steps, cfg.batch_size, cfg.lr, seed=cfg.seed, device=cfg.device)
    meta = fit_meta_sae(sae.decoder, n_meta, min(cfg.meta_k, n_meta), opts)
    acts, cos = decompose(meta, sae.decoder)
    features, metas = feature_table(acts, cos), meta_latent_table(acts)
    per_sae = out / sae_dir.name  # one folder per decomposed SAE; its feature pages read it from here
    yield _write(features, per_sae / layout.COMPOSITE_FEATURES_FILE)
    yield _write(metas, per_sae / layout.COMPOSITE_META_FILE)
    yield _write_plot(plot_meta, per_sae / layout.COMPOSITE_META_PLOT, features, metas)
    n_used = features["n_meta"].to_numpy()
    yield (f"{sae.name}: meta-SAE with {n_meta} meta-latents (k = {cfg.meta_k}) on {sae.d_sae} decoder directions: "
           f"{n_used.mean():.2f} meta-latents per feature (median {np.median(n_used):.0f}), reconstruction cosine "
           f"{float(cos.mean()):.3f} mean, {float(cos.median()):.3f} median; "
           f"{int((metas['n_features'].to_numpy() > 0).sum())} meta-latents in use")
    store = layout.sae_activation_store(sae_dir)
    cov = activation_covariance(store, sae.hook_name or None, cfg.max_tokens) if store is not None else None
    geometry = baseline_rows(sae.name, sae.decoder, cov, cfg.seed, cfg.device)
    geometry += baseline_rows(f"{sae.name}-meta", meta.W_dec.detach().cpu().numpy(), None, cfg.seed, cfg.device)
    yield geometry


def summary_toy(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    lines = ["toy: dictionary size | live rows | atom rows | composite rows | atoms found | composites found"]
    lines += [f"  {r['d_sae']:>5} | {r['live_rows']:>5} | {r['rows_atom']:>5} | {r['rows_composite']:>5} | "
              f"{r['atoms_found']:>3} | {r['composites_found']:>3}" for r in rows]
    lines.append(f"toy meta-SAE on the {meta['d_sae']}-latent dictionary: {meta['atoms_found']} of {meta['atoms']} "
                 f"atoms found (mean max cosine {meta['atom_mean_max_cosine']:.3f}), reconstruction cosine "
                 f"{meta['mean_reconstruction_cosine']:.3f}, {meta['mean_meta_per_feature']:.2f} meta-latents per row")
    return lines


def summary_geometry(rows: list[dict[str, Any]]) -> list[str]:
    return ["decoder max cosine to another direction (median [10 %, 90 %])"] + [
        f"  {r['dictionary']:<16} {r['kind']:<10} {r['median']:.3f} [{r['p10']:.3f}, {r['p90']:.3f}]" for r in rows]


def _iter_outputs(cfg: CompositeConfig, out: Path) -> Iterator[Any]:
    sae_dir = sae_folder(cfg)  # first: a bad run or SAE fails before anything is written
    if sae_dir is not None:
        load_directions(sae_dir)
    elif not cfg.toy:
        raise ValueError("composite: nothing to do: give --run or --sae, or leave the toy on")
    geometry: list[dict[str, Any]] = []
    if sae_dir is not None:
        for item in real_sae(cfg, sae_dir, out):
            if isinstance(item, list):
                geometry += item
            else:
                yield item
    if cfg.toy:
        rows, meta_row, toy_geometry = toy_sweep(cfg)
        geometry += toy_geometry
        yield _write(rows, out / layout.COMPOSITE_TOY_FILE)
        yield _write([meta_row], out / layout.COMPOSITE_TOY_META_FILE)
        yield _write_plot(plot_toy, out / layout.COMPOSITE_TOY_PLOT, rows)
        yield from summary_toy(rows, meta_row)
    yield _write(geometry, out / layout.COMPOSITE_GEOMETRY_FILE)
    yield from summary_geometry(geometry)


def cli_configure(parser: Any) -> None:
    """Options of ``saecore composite``."""
    add_arguments(parser, CompositeConfig)


def cli_run(args: Any) -> int:
    """Run ``saecore composite``: the meta-SAE on the run's SAE, then the planted toy."""
    cfg = from_args(CompositeConfig, args)
    for line in _iter_outputs(cfg, output_dir(cfg)):
        print(f"wrote {line}" if isinstance(line, Path) else line, file=sys.stderr if isinstance(line, Path) else sys.stdout)
    return 0
