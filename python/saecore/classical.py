"""``saecore classical``: is an SAE better than a classical dictionary (PCA, ICA) on the same activations?

**Fits** (PyTorch; on the GPU when present, float64 eigendecompositions):

* PCA: the top ``c`` eigenvectors of the activations' covariance (:func:`pca`).
* ICA: parallel (symmetric) FastICA with the logcosh contrast (Hyvärinen 1999), after PCA whitening to
  unit variance (:func:`fastica`): W ← sym(E[g(Wz) zᵀ] − diag E[g'(Wz)] W), g = tanh,
  sym(W) = (WWᵀ)^-½ W, until max |1 − |diag(W_new Wᵀ)|| < tol. Sources s = W K (x − x̄), K the whitening
  matrix; the dictionary's directions are the columns of the mixing matrix A = (W K)⁺.

**As an SAE.** Each dictionary is saved as an ordinary SAE folder ``RUN/saes/NAME`` (``pca-C`` or
``ica-C``), so ``encode``, ``index``, ``token-scores``, ``pages`` and ``steer --feature`` use it
unchanged. The feature store holds non-negative activations, so each component i is split by sign into
two latents, i (coefficient > 0) and c + i (coefficient < 0, the negated direction); a TopK keeps the
``k`` largest, which is the ``k`` components of largest |coefficient| along their unit decoder direction.
In SAE terms it is a ``topk`` SAE with W_dec = [Â; −Â] (unit rows), W_enc = [E; −E] with E the
correspondingly scaled unmixing rows, b_dec = x̄ and b_enc = −x̄ W_enc. For PCA the encoder is the
transposed decoder and keeping the largest |coefficients| is the best ``k``-term reconstruction; for ICA
(non-orthogonal directions) it is the natural greedy rule, not the optimum.

**The comparison** (``RUN/experiments/classical/``), on the compared SAE's held-out rows: explained
variance at the SAE's L0 and over a sweep of L0 (the pinned definition of
:func:`saecore.evaluate.reconstruction_metrics`), the spectrum of per-latent firing densities, and the
decoder-geometry baselines of ``saecore geometry``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from . import run as layout
from ._atomic import atomic_target, write_parquet
from .activations import ActivationStore
from .config import add_arguments, from_args, option, validate
from .devices import default_device
from .evaluate import reconstruction_metrics
from .geometry import (
    SAEDirections,
    activation_covariance,
    baseline_quantiles,
    geometry_baselines,
)
from .sae import SAE, SAEConfig
from .training import training_rows

METHODS = ("pca", "ica")


# -- PCA and FastICA -------------------------------------------------------------------------------------
class Whitening(NamedTuple):
    """PCA of the rows of x: mean [d], components [c, d] (orthonormal rows, by variance), variances [c]."""

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor


def pca(x: torch.Tensor, n_components: int) -> Whitening:
    """Top ``n_components`` principal directions of the rows of ``x`` [n, d] (covariance with 1/n;
    eigendecomposition in float64; each direction's sign makes its largest-|entry| positive)."""
    n, d = x.shape
    if not 1 <= n_components <= d:
        raise ValueError(f"classical: {n_components} components must be between 1 and the width {d}")
    mean = x.double().mean(0)
    xc = x.double() - mean  # (n, d)
    lam, vec = torch.linalg.eigh(xc.T @ xc / n)  # ascending
    lam, vec = lam.flip(0)[:n_components], vec.flip(1)[:, :n_components].T  # (c,), (c, d)
    sign = torch.sign(vec.gather(1, vec.abs().argmax(1, keepdim=True)))
    return Whitening(mean.to(x.dtype), (vec * sign).to(x.dtype), lam.clamp_min(0).to(x.dtype))


def sym_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """(W Wᵀ)^-½ W: the nearest matrix with orthonormal rows (eigendecomposition in float64)."""
    s, u = torch.linalg.eigh((w @ w.T).double())
    s = s.clamp_min(torch.finfo(torch.float64).tiny)
    return ((u * s.rsqrt()) @ u.T).to(w.dtype) @ w


def ica_par(z: torch.Tensor, w_init: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, int, bool]:
    """Parallel FastICA with logcosh on whitened ``z`` [n, c] from ``w_init`` [c, c]:
    ``(W [c, c] orthonormal rows, iterations, converged)``."""
    w = sym_decorrelation(w_init.to(z.dtype))
    n = z.shape[0]
    for it in range(1, max_iter + 1):
        g = torch.tanh(z @ w.T)  # (n, c): g(wᵢᵀ z) for every sample and source
        g_prime = (1 - g * g).mean(0)  # (c,)
        w_new = sym_decorrelation(g.T @ z / n - g_prime[:, None] * w)
        lim = float(((w_new * w).sum(1).abs() - 1).abs().max())
        w = w_new
        if lim < tol:
            return w, it, True
    return w, max_iter, False


class ICAResult(NamedTuple):
    """A FastICA fit: sources s = unmixing (x − mean); x ≈ mean + mixing s."""

    mean: torch.Tensor
    """[d]"""
    unmixing: torch.Tensor
    """[c, d] = W K (K the whitening matrix)."""
    mixing: torch.Tensor
    """[d, c] = (W K)⁺ = V diag(√λ) Wᵀ (W orthonormal)."""
    iterations: int
    converged: bool


def fastica(x: torch.Tensor, n_components: int, *, max_iter: int = 200, tol: float = 1e-4, seed: int = 0,
            w_init: torch.Tensor | None = None) -> ICAResult:
    """FastICA of the rows of ``x`` [n, d] on its device and dtype: PCA whitening to unit variance, then
    :func:`ica_par`; ``w_init`` [c, c] defaults to a seeded standard normal (as scikit-learn's)."""
    pc = pca(x, n_components)
    scale = pc.variances.clamp_min(torch.finfo(x.dtype).tiny).sqrt()  # (c,)
    z = (x - pc.mean) @ pc.components.T / scale  # (n, c) unit variance, uncorrelated
    if w_init is None:
        w_init = torch.randn(n_components, n_components, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    w, iterations, converged = ica_par(z, w_init.to(x.device, x.dtype), max_iter, tol)
    unmixing = w @ (pc.components / scale[:, None])  # (c, d)
    mixing = (pc.components.T * scale) @ w.T  # (d, c)
    return ICAResult(pc.mean, unmixing, mixing, iterations, converged)


def amari_distance(unmixing: torch.Tensor | np.ndarray, mixing: torch.Tensor | np.ndarray) -> float:
    """Amari distance of P = unmixing · mixing to a scaled permutation, in [0, 1] (0: sources recovered
    exactly up to order and scale); the normalised form of Amari et al. (1996)."""
    p = np.abs(np.asarray(unmixing, dtype=np.float64) @ np.asarray(mixing, dtype=np.float64))
    c = p.shape[0]
    rows = (p.sum(1) / p.max(1) - 1).sum()
    cols = (p.sum(0) / p.max(0) - 1).sum()
    return float((rows + cols) / (2 * c * (c - 1)))


# -- a dictionary as an SAE ----------------------------------------------------------------------------
def dictionary_sae(mean: torch.Tensor, encoder: torch.Tensor, decoder: torch.Tensor, k: int,
                   hook_name: str = "", model_name: str = "") -> SAE:
    """A ``topk`` SAE with sign-split latents: component i → latents i (+) and c + i (−).

    ``encoder`` [c, d] gives coefficients z = encoder (x − mean); ``decoder`` [c, d] the directions, so
    x ≈ mean + Σ zᵢ decoderᵢ. Decoder rows are scaled to unit norm and the encoder rows by the inverse,
    so an activation is the coefficient along a unit direction.
    """
    c, d = decoder.shape
    if not 1 <= k <= c:
        raise ValueError(f"classical: L0 k = {k} must be between 1 and the {c} components")
    norms = decoder.double().norm(dim=1).clamp_min(1e-12)  # (c,)
    dec = (decoder.double() / norms[:, None]).float()
    enc = (encoder.double() * norms[:, None]).float()
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=2 * c, k=k, hook_name=hook_name, model_name=model_name),
              seed=None)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([enc, -enc]).T)  # (d, 2c)
        sae.W_dec.copy_(torch.cat([dec, -dec]))  # (2c, d)
        sae.b_dec.copy_(mean.float())
        sae.b_enc.copy_(-(mean.float() @ sae.W_enc))
    return sae.eval()


def with_k(sae: SAE, k: int) -> SAE:
    """The same sign-split dictionary keeping ``k`` latents per token."""
    other = SAE(SAEConfig.from_dict({**sae.cfg.to_dict(), "k": k}), seed=None)
    other.load_state_dict(sae.state_dict())
    return other.to(sae.device).eval()


# -- the verb's configuration ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class ClassicalConfig:
    """Options of ``saecore classical``."""

    run: Path
    """Run folder: its activation store is fitted, dictionaries go to RUN/saes, the report to RUN/experiments/classical."""
    method: list[Literal["pca", "ica"]] = option(default_factory=lambda: ["pca", "ica"], append=True)
    """A dictionary to fit: pca or ica (repeatable; default both)."""
    sae: str | None = None
    """The SAE to compare with, a name in RUN/saes (default: the run's only SAE that is not a classical one)."""
    components: int = option(0, ge=0, le=1 << 16)
    """Components of each dictionary (twice as many sign-split latents); 0 → the activation width."""
    k: int = option(0, ge=0, le=1 << 16)
    """Latents kept per token (L0) by the saved dictionaries; 0 → the compared SAE's L0, rounded."""
    sweep_k: list[int] = option(default_factory=lambda: [8, 16, 32, 64, 128], append=True, ge=1, le=1 << 16)
    """An L0 at which to also measure the classical dictionaries' explained variance (repeatable)."""
    fit_tokens: int = option(32_768, ge=16, le=1 << 26)
    """Training rows of the activation store the dictionaries are fitted on (the first ones)."""
    max_iter: int = option(200, ge=1, le=100_000)
    """FastICA: iteration limit."""
    tol: float = option(1e-4, gt=0, lt=1)
    """FastICA: convergence tolerance on max |1 − |wᵢ_new · wᵢ||."""
    index: bool = option(True, flag="--no-index")
    """Encode and index each dictionary in the run (--no-index: fit and compare only)."""
    device: str | None = None
    """torch device (default: CUDA when present)."""
    seed: int = option(0, ge=0, lt=1 << 31)
    """Seeds FastICA's initial unmixing matrix and the random baselines."""

    def __post_init__(self) -> None:
        validate(self)
        if not self.method:
            raise ValueError("classical: give at least one --method")


# -- fitting and saving ------------------------------------------------------------------------------------
@dataclass
class Target:
    """What the dictionaries are fitted on and compared with."""

    store: ActivationStore
    hook: str
    sae_dir: Path
    fit_rows: tuple[int, int]
    eval_rows: tuple[int, int]


def find_target(cfg: ClassicalConfig) -> Target:
    """The run's store, the compared SAE, and the rows to fit on (training rows) and evaluate on (the
    SAE's held-out rows, else the store's trailing 2 %)."""
    from .saelens import read_checkpoint

    run = layout.Run(cfg.run)
    store = ActivationStore(run.activations)
    names = [cfg.sae] if cfg.sae else [n for n in run.sae_names() if "classical" not in _facts(run.sae(n))]
    if len(names) != 1:
        raise ValueError(f"{run.root}: holds SAEs {names or 'none'} to compare with; pick one with --sae")
    sae_dir = run.sae(names[0])
    fields, _ = read_checkpoint(sae_dir)
    hook = store.resolve_hook(fields.get("hook_name") or None if len(store.hooks) > 1 else None)
    held = _facts(sae_dir).get("holdout_rows")
    start = held[0] if held and held[1] > held[0] else training_rows(store, 0.02)
    if start >= store.num_rows:
        raise ValueError(f"{store.path}: no rows held out for the comparison")
    fit = (0, min(start, cfg.fit_tokens))
    if fit[1] < 16:
        raise ValueError(f"{store.path}: only {fit[1]} training rows to fit on")
    return Target(store, hook, sae_dir, fit, (start, store.num_rows))


def _facts(sae_dir: Path) -> dict[str, Any]:
    from ._atomic import read_json_object

    return ((read_json_object(sae_dir / layout.CFG_FILE).get("metadata") or {}).get("saecore") or {})


def fit_dictionary(method: str, x: torch.Tensor, c: int, k: int, cfg: ClassicalConfig, target: Target) -> tuple[SAE, dict[str, Any]]:
    """Fit PCA or FastICA on ``x`` and wrap it as a sign-split SAE; returns it with its fit record."""
    import time

    t0 = time.perf_counter()
    record: dict[str, Any] = {"method": method, "components": c, "fit_rows": list(target.fit_rows), "seed": cfg.seed}
    if method == "pca":
        pc = pca(x, c)
        mean, enc, dec = pc.mean, pc.components, pc.components
        record["variance_fraction"] = float(pc.variances.sum() / x.double().var(0, unbiased=False).sum())
    else:
        ica = fastica(x, c, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed)
        mean, enc, dec = ica.mean, ica.unmixing, ica.mixing.T
        record.update(iterations=ica.iterations, converged=ica.converged, max_iter=cfg.max_iter, tol=cfg.tol)
    record["fit_seconds"] = time.perf_counter() - t0
    fields = _facts(target.sae_dir).get("config") or {}
    sae = dictionary_sae(mean.cpu(), enc.cpu(), dec.cpu(), k, target.hook, str(fields.get("model_name", "")))
    return sae, record


def fitted_dictionaries(cfg: ClassicalConfig, target: Target, k: int) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """Fit each method (or reuse a folder fitted with the same settings) and save it into the run."""
    dev = default_device(cfg.device)
    c = cfg.components or target.store.d_model(target.hook)
    x = None
    for method in dict.fromkeys(cfg.method):
        name = f"{method}-{c}"
        folder = layout.Run(cfg.run).sae(name)
        wanted = {"method": method, "components": c, "fit_rows": list(target.fit_rows), "seed": cfg.seed, "k": k}
        if method == "ica":
            wanted.update(max_iter=cfg.max_iter, tol=cfg.tol)
        old = _facts(folder).get("classical") if (folder / layout.CFG_FILE).exists() else None
        if old is not None and {key: old.get(key) for key in wanted} == wanted:
            yield name, folder, old
            continue
        if (folder / layout.CFG_FILE).exists():
            raise ValueError(f"{folder}: holds a dictionary fitted with other settings; delete it (and its "
                             "feature store and index) or choose other settings")
        if x is None:
            x = torch.from_numpy(target.store.read(target.hook, *target.fit_rows)).to(dev)  # (n, d)
        sae, record = fit_dictionary(method, x, c, k, cfg, target)
        record["k"] = k
        sae.save(folder, extra_metadata={"classical": record, "store": str(target.store.path)})
        yield name, folder, record


def encode_and_index(run: layout.Run, name: str, device: str | None) -> None:
    """``saecore encode`` then ``saecore index`` on a saved dictionary, into the run's usual places."""
    from .encode import encode
    from .index import index

    encode(run.activations, run.sae(name), run.features(name), progress=False, device=device)
    index(run.features(name), run.index(name), progress=False)


# -- the comparison ----------------------------------------------------------------------------------------
@torch.no_grad()
def firing_density(sae: SAE, store: ActivationStore, hook: str, rows: tuple[int, int]) -> np.ndarray:
    """Fraction of the rows on which each latent is active, [d_sae]."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for _, block in store.iter_blocks(hook, 4096, *rows):
        counts += (sae.encode(torch.from_numpy(block).to(sae.device)) > 0).sum(0).double().cpu()
    return (counts / max(1, rows[1] - rows[0])).numpy()


def compare(target: Target, dictionaries: list[tuple[str, Path, dict[str, Any]]], cfg: ClassicalConfig,
            dev: torch.device) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(reconstruction rows, density rows, geometry rows) for the SAE and every dictionary."""
    sae = SAE.load(target.sae_dir, device=dev)
    cov = activation_covariance(target.store.path, target.hook, max_tokens=target.fit_rows[1])
    recon, density, geometry = [], [], []
    for name, folder, record in [(target.sae_dir.name, target.sae_dir, {"method": "sae"}), *dictionaries]:
        model = sae if folder == target.sae_dir else SAE.load(folder, device=dev)
        ks = [model.cfg.k] if record["method"] == "sae" else sorted({model.cfg.k, *cfg.sweep_k})
        for k in ks:
            if record["method"] != "sae" and k > model.cfg.d_sae // 2:
                continue
            m = model if k == model.cfg.k else with_k(model, k)
            metrics = reconstruction_metrics(m, target.store, target.hook, *target.eval_rows)
            recon.append({"dictionary": name, "method": record["method"], "k": k, "saved": k == model.cfg.k,
                          **{key: metrics[key] for key in ("l0", "explained_variance", "normalized_mse", "dead_fraction")}})
        freq = firing_density(model, target.store, target.hook, target.eval_rows)
        density += [{"dictionary": name, "latent": i, "density": float(f)} for i, f in enumerate(freq)]
        # The sign-split twins (rows c..2c-1) are the negated directions: geometry counts each once.
        dec = model.W_dec.detach().cpu().numpy()
        dec = dec if record["method"] == "sae" else dec[: model.cfg.d_sae // 2]
        dirs = SAEDirections(name, folder, np.ascontiguousarray(dec), np.ascontiguousarray(dec.T), target.hook)
        geometry += [{"dictionary": name, **row} for row in
                     baseline_quantiles(geometry_baselines(dirs, cov, seed=cfg.seed, device=cfg.device))]
    return recon, density, geometry


def plot_comparison(recon: list[dict[str, Any]], density: list[dict[str, Any]], path: Path) -> None:
    """Explained variance against L0 (classical sweeps as lines, the SAE as a point); density spectra."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)  # an explicit Agg canvas: the process-wide matplotlib backend is never touched
    ax = fig.subplots(1, 2)
    for name in dict.fromkeys(r["dictionary"] for r in recon):
        pts = sorted((r["l0"], r["explained_variance"]) for r in recon if r["dictionary"] == name)
        ax[0].plot(*zip(*pts), "-o" if len(pts) > 1 else "*", ms=4 if len(pts) > 1 else 12, label=name)
        freq = np.array([d["density"] for d in density if d["dictionary"] == name])
        ax[1].hist(np.log10(freq[freq > 0]), bins=50, histtype="step", label=f"{name} ({(freq == 0).mean():.0%} dead)")
    ax[0].set(xscale="log", xlabel="L0 (latents per token)", ylabel="explained variance (held out)")
    ax[1].set(xlabel="log10 firing density", ylabel="latents")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def density_summary(density: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dictionary: dead fraction and the median / 10 % / 90 % of log10 density of live latents."""
    out = {}
    for name in dict.fromkeys(d["dictionary"] for d in density):
        f = np.array([d["density"] for d in density if d["dictionary"] == name])
        live = np.log10(f[f > 0]) if (f > 0).any() else np.array([math.nan])
        out[name] = {"dead": float((f == 0).mean()), "median": float(np.median(live)),
                     "p10": float(np.quantile(live, 0.1)), "p90": float(np.quantile(live, 0.9))}
    return out


def summary_lines(recon: list[dict[str, Any]], density: list[dict[str, Any]], geometry: list[dict[str, Any]]) -> list[str]:
    dens = density_summary(density)
    lines = ["dictionary       L0     explained variance   dead    log10 density median [10 %, 90 %]"]
    for r in recon:
        if r["saved"]:
            d = dens[r["dictionary"]]
            lines.append(f"  {r['dictionary']:<14} {r['l0']:<6.1f} {r['explained_variance']:<20.4f} {d['dead']:<7.3f} "
                         f"{d['median']:.2f} [{d['p10']:.2f}, {d['p90']:.2f}]")
    lines.append("explained variance of the classical dictionaries over L0")
    for name in dict.fromkeys(r["dictionary"] for r in recon if r["method"] != "sae"):
        lines.append(f"  {name:<14} " + "  ".join(f"k={r['k']}: {r['explained_variance']:.3f}"
                                                  for r in recon if r["dictionary"] == name))
    lines.append("decoder max cosine to another direction (median [10 %, 90 %])")
    lines += [f"  {g['dictionary']:<14} {g['kind']:<10} {g['median']:.3f} [{g['p10']:.3f}, {g['p90']:.3f}]" for g in geometry]
    return lines


# -- the verb ----------------------------------------------------------------------------------------------
def _iter_outputs(cfg: ClassicalConfig) -> Iterator[Any]:
    import pyarrow as pa

    target = find_target(cfg)  # first: a bad run or SAE fails before anything is written
    dev = default_device(cfg.device)
    sae_k = SAE.load(target.sae_dir).cfg.k
    k = cfg.k or round(reconstruction_metrics(SAE.load(target.sae_dir, device=dev), target.store, target.hook,
                                              *target.eval_rows)["l0"]) or sae_k
    run = layout.Run(cfg.run)
    dictionaries = []
    for name, folder, record in fitted_dictionaries(cfg, target, max(1, k)):
        yield folder
        if record["method"] == "ica":
            yield f"{name}: FastICA {'converged' if record['converged'] else 'did not converge'} in {record['iterations']} iterations"
        if cfg.index:
            encode_and_index(run, name, cfg.device)
            yield run.index(name)
        dictionaries.append((name, folder, record))
    recon, density, geometry = compare(target, dictionaries, cfg, dev)
    out = run.experiment("classical")
    yield write_parquet(pa.Table.from_pylist(recon), out / layout.CLASSICAL_FILE)
    yield write_parquet(pa.Table.from_pylist(density), out / layout.CLASSICAL_DENSITY_FILE)
    yield write_parquet(pa.Table.from_pylist(geometry), out / layout.CLASSICAL_GEOMETRY_FILE)
    with atomic_target(out / layout.CLASSICAL_PLOT) as tmp:
        plot_comparison(recon, density, tmp)
    yield out / layout.CLASSICAL_PLOT
    yield from summary_lines(recon, density, geometry)


def cli_configure(parser: Any) -> None:
    """Options of ``saecore classical``."""
    add_arguments(parser, ClassicalConfig)


def cli_run(args: Any) -> int:
    """Run ``saecore classical``: fit, save (and index) the dictionaries, then compare them with the SAE."""
    cfg = from_args(ClassicalConfig, args)
    for line in _iter_outputs(cfg):
        print(f"wrote {line}" if isinstance(line, Path) else line, file=sys.stderr if isinstance(line, Path) else sys.stdout)
    return 0
