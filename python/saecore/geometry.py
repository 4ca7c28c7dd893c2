"""Feature geometry: cosine neighbours of decoder directions, feature splitting, geometry baselines, maps.

Scaling Monosemanticity reads a dictionary through the geometry of its decoder directions: each
feature's nearest features by cosine, within one SAE and across SAEs of different sizes ("feature
splitting"), and 2-D maps of the directions. This module serves three CLI verbs:

``saecore neighbours``  top-k decoder neighbours within an SAE and against others → ``index/SAE/neighbours.parquet``
``saecore splitting``   each feature of the smallest SAE with its nearest features in the larger ones
                        (decoder cosine, and co-activation on the activation store) → ``splitting.parquet`` + plot
``saecore geometry``    max-cosine distribution vs random and covariance-shaped random directions,
                        encoder/decoder cosine per feature, a 2-D map (UMAP, cosine metric) → tables + plots

The neighbour search itself is :func:`neighbours`: the Rust core on CPU (row-normalise, blocked GEMM
tiles, bounded per-row lists; never an n × n matrix) or, with ``device="cuda"``, the same blocks as
PyTorch matmul + topk on the GPU. Both give the same answer: best first, ties to the smaller index, zero
vectors at cosine 0, NaN an error naming the row, ``k`` outside ``1..n-1`` (``1..n_b`` for A-vs-B) an
error.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _native, run, tables
from ._atomic import atomic_target, write_parquet
from .config import add_arguments, from_args, option, validate
from .devices import default_device

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

DEFAULT_MAX_PAIRS = 100_000_000
"""Threshold mode's cap on the number of pairs returned (the output can grow with n²)."""



# ------------------------------------------------------------------------------------------------
# The neighbour search
# ------------------------------------------------------------------------------------------------
def neighbours(
    a: Any,
    b: Any | None = None,
    k: int = 10,
    threshold: float | None = None,
    device: str | None = None,
    *,
    tile: int | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    names: tuple[str, str] = ("a", "b"),
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine neighbours of the rows of ``a`` among the rows of ``b`` (or of ``a``, each row excluding itself).

    ``a``, ``b``: 2-D arrays (numpy or torch; float32, float16 or bfloat16) with the same width.
    Top-k mode (``threshold=None``) returns ``(indices uint32 [n, k], cosines float32 [n, k])``, best
    first, ties to the smaller index. Threshold mode returns every pair with cosine ≥ ``threshold`` as
    ``(rows uint32 [m], cols uint32 [m], cosines float32 [m])`` sorted by row, cosine descending,
    column; A-vs-A lists both (i, j) and (j, i); more than ``max_pairs`` pairs is an error.

    ``device``: ``None`` picks CUDA when PyTorch sees one, else the CPU; ``"cpu"`` runs the Rust core
    (threads: ``SAECORE_NUM_THREADS``); ``"cuda"``/``"cuda:N"`` runs the blocks through PyTorch.
    A zero row has cosine 0 with everything; a NaN or infinite element is a ValueError naming the row.
    """
    dev = default_device(device)
    if dev.type != "cpu":
        return _torch_neighbours(a, b, k, threshold, dev, max_pairs=max_pairs, names=names)
    na, nb = names
    a_in = _native_input(a, na)
    b_in = None if b is None else _native_input(b, nb)
    if threshold is None:
        return _native.neighbours_top_k(a_in, b_in, int(k), tile=tile, name_a=na, name_b=nb)
    return _native.neighbours_threshold(
        a_in, b_in, float(threshold), max_pairs=int(max_pairs), tile=tile, name_a=na, name_b=nb
    )


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view of an array-like; torch tensors (bfloat16 included) come over as float32/float16."""
    if type(x).__module__.startswith("torch"):
        torch = _torch()
        t = x.detach()
        if t.dtype not in (torch.float16, torch.float32):
            t = t.float()  # bfloat16 and friends have no numpy dtype
        x = t.cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"matrix {name}: expected a 2-D array [rows, d], got shape {x.shape}")
    return x


def _torch() -> Any:
    import torch

    return torch


def _native_input(x: Any, name: str) -> np.ndarray:
    """What the Rust binding takes: C-contiguous float32, or float16 as its uint16 bit pattern."""
    x = _to_numpy(x, name)
    if x.dtype == np.float16:
        return np.ascontiguousarray(x).view(np.uint16)
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"matrix {name}: dtype {x.dtype} is not a number type")
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def _torch_unit_rows(x: Any, name: str, device: str | torch.device) -> torch.Tensor:
    """Rows scaled to unit norm on ``device`` in float32; zero rows stay zero; NaN/inf → ValueError."""
    torch = _torch()
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(_to_numpy(x, name)))
    if t.ndim != 2:
        raise ValueError(f"matrix {name}: expected a 2-D array [rows, d], got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        what = "NaN" if bool(torch.isnan(t[row]).any()) else "an infinite value"
        raise ValueError(f"matrix {name}: row {row} contains {what}")
    norm = t.double().norm(dim=1, keepdim=True).float()
    return torch.where(norm > 0, t / norm.clamp_min(1e-38), torch.zeros_like(t))


def _torch_neighbours(
    a: Any,
    b: Any | None,
    k: int,
    threshold: float | None,
    device: str | torch.device,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    names: tuple[str, str] = ("a", "b"),
    block_elements: int = 1 << 28,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PyTorch path of :func:`neighbours` (any torch device; the GPU path when CUDA is present).

    Row blocks of A times all of Bᵀ, ``block_elements`` scores at most per block, then topk with the
    same tie rule as the Rust core (rows whose k-th score is tied are re-ranked by a stable sort).
    """
    torch = _torch()
    na, nb = names
    ua = _torch_unit_rows(a, na, device)
    ub = ua if b is None else _torch_unit_rows(b, nb, device)
    _check_torch_shapes(ua, ub, k if threshold is None else None, names, itself=b is None)
    blocks = _score_blocks(ua, ub, itself=b is None, rows_per_block=max(1, block_elements // max(ub.shape[0], 1)))
    with torch.no_grad():
        if threshold is None:
            return _top_k_of_blocks(blocks, k)
        return _pairs_of_blocks(blocks, threshold, max_pairs)


def _check_torch_shapes(ua: torch.Tensor, ub: torch.Tensor, k: int | None, names: tuple[str, str], itself: bool) -> None:
    """Same widths, and (top-k mode, ``k`` given) 1 <= k <= the candidates each row has."""
    na, nb = names
    if ua.shape[1] != ub.shape[1]:
        raise ValueError(
            f"matrices {na} ({ua.shape[0]} x {ua.shape[1]}) and {nb} ({ub.shape[0]} x {ub.shape[1]}) "
            "have different vector widths d"
        )
    n_b = ub.shape[0]
    limit = n_b - 1 if itself else n_b
    if k is not None and not 1 <= k <= limit:
        what = f"{n_b} - 1 = {limit} (the other rows of {na})" if itself else f"the {n_b} rows of {nb}"
        raise ValueError(f"k = {k} must be between 1 and {what}")


def _score_blocks(
    ua: torch.Tensor, ub: torch.Tensor, itself: bool, rows_per_block: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, cosines [R, n_b]) of each block of ``rows_per_block`` rows of A against all of B."""
    torch = _torch()
    for r0 in range(0, ua.shape[0], rows_per_block):
        scores = ua[r0 : r0 + rows_per_block] @ ub.T  # (R, n_b)
        if itself:  # a row is not its own neighbour
            diag = torch.arange(scores.shape[0], device=scores.device)
            scores[diag, diag + r0] = -torch.inf
        yield r0, scores


def _top_k_of_blocks(blocks: Iterable[tuple[int, torch.Tensor]], k: int) -> tuple[np.ndarray, np.ndarray]:
    out_i, out_c = [], []
    for _, scores in blocks:
        idx, cos = _topk_ties_to_smaller_index(scores, k)
        out_i.append(idx.to(_torch().int64).cpu().numpy().astype(np.uint32))
        out_c.append(cos.cpu().numpy())
    return np.concatenate(out_i), np.concatenate(out_c)


def _pairs_of_blocks(
    blocks: Iterable[tuple[int, torch.Tensor]], threshold: float, max_pairs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (row, col, cosine) with cosine >= ``threshold``, by row, cosine descending, column."""
    out_r, out_i, out_c = [], [], []
    total = 0
    for r0, scores in blocks:
        rr, cc = (scores >= threshold).nonzero(as_tuple=True)
        total += rr.numel()
        if total > max_pairs:
            raise ValueError(
                f"more than max_pairs = {max_pairs} pairs have cosine >= {threshold}; raise the threshold or max_pairs"
            )
        out_r.append((rr + r0).cpu().numpy().astype(np.uint32))
        out_i.append(cc.cpu().numpy().astype(np.uint32))
        out_c.append(scores[rr, cc].cpu().numpy())
    rows, cols, cos = (np.concatenate(x) if x else np.zeros(0, t) for x, t in
                       ((out_r, np.uint32), (out_i, np.uint32), (out_c, np.float32)))
    order = np.lexsort((cols, -cos.astype(np.float64), rows))
    return rows[order], cols[order], cos[order]


def _topk_ties_to_smaller_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top k of ``scores`` ordered by (score desc, column asc), as the Rust core orders them."""
    torch = _torch()
    cos, idx = torch.topk(scores, k, dim=1)
    # topk's choice among scores tied with the k-th is unspecified: redo those (rare) rows exactly.
    tied = (scores >= cos[:, -1:]).sum(dim=1) > k
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)[0]
        s_cos, s_idx = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        cos[rows], idx[rows] = s_cos[:, :k], s_idx[:, :k]
    # Within the k, order by index, then stably by score: equal scores end up index-ascending.
    by_idx = torch.argsort(idx, dim=1)
    idx, cos = idx.gather(1, by_idx), cos.gather(1, by_idx)
    by_cos = torch.sort(cos, dim=1, descending=True, stable=True).indices
    return idx.gather(1, by_cos), cos.gather(1, by_cos)


# ------------------------------------------------------------------------------------------------
# SAEs on disk and table output
# ------------------------------------------------------------------------------------------------
@dataclass
class SAEDirections:
    """The directions of one saved SAE that geometry needs."""

    name: str
    """The SAE's folder name (``runs/NAME/saes/<name>``); the ``sae``/``other_sae`` column value."""
    path: Path
    """The SAE folder."""
    decoder: np.ndarray
    """W_dec [d_sae, d_in] float32: feature i's decoder direction is row i."""
    encoder: np.ndarray
    """W_enc [d_in, d_sae] float32: feature i's encoder direction is column i."""
    hook_name: str
    """Hook point the SAE reads."""

    @property
    def d_sae(self) -> int:
        return int(self.decoder.shape[0])


def load_directions(sae_dir: str | os.PathLike[str]) -> SAEDirections:
    """Load an SAE folder (``cfg.json`` + ``sae_weights.safetensors``) through :meth:`saecore.sae.SAE.load`."""
    from .sae import SAE

    path = Path(sae_dir)
    if not (path / run.CFG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not an SAE folder (no {run.CFG_FILE})")
    sae = SAE.load(path, device="cpu")
    return SAEDirections(
        name=path.name,
        path=path,
        decoder=sae.W_dec.detach().float().numpy().copy(),
        encoder=sae.W_enc.detach().float().numpy().copy(),
        hook_name=sae.cfg.hook_name,
    )


def index_dir(sae_dir: Path) -> Path:
    """Where an SAE's tables go: :func:`saecore.run.sae_index_dir` (``runs/NAME/index/SAE``, else ``SAE_DIR/index``)."""
    return run.sae_index_dir(sae_dir)


def default_store(sae_dir: Path) -> Path | None:
    """The run's activation store, ``runs/NAME/activations.zarr``, when the SAE sits in a run folder."""
    return run.sae_activation_store(sae_dir)


def _save_figure_atomic(fig: Any, path: Path) -> Path:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure drawn on its own Agg canvas: files only, no display, and no pyplot, so the process-wide
    matplotlib backend (a notebook's, say) is never changed and no figure is left open in pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------------------------------
# neighbours.parquet
# ------------------------------------------------------------------------------------------------
def neighbours_table(sae: SAEDirections, others: list[SAEDirections], k: int = 10,
                     device: str | None = None) -> pa.Table:
    """Top-k decoder neighbours of every feature of ``sae`` within itself and in each of ``others``.

    Columns (interface #5): feature u32, rank u16, other_sae str (``sae.name`` for its own
    neighbours), neighbour u32, cosine f32. ``k`` is clamped to the candidates available (n − 1
    within, n_other across), so a tiny SAE still gets a table.
    """
    import pyarrow as pa

    parts = []
    for other in [None, *others]:
        target = sae if other is None else other
        kk = min(k, sae.d_sae - 1 if other is None else other.d_sae)
        if kk < 1:
            continue
        idx, cos = neighbours(sae.decoder, None if other is None else other.decoder, k=kk, device=device,
                              names=(sae.name, target.name))
        n = idx.shape[0]
        parts.append(pa.table({
            "feature": pa.array(np.repeat(np.arange(n, dtype=np.uint32), kk)),
            "rank": pa.array(np.tile(np.arange(kk, dtype=np.uint16), n)),
            "other_sae": pa.array(np.full(n * kk, target.name, dtype=object), type=pa.string()),
            "neighbour": pa.array(idx.reshape(-1).astype(np.uint32)),
            "cosine": pa.array(cos.reshape(-1).astype(np.float32)),
        }))
    schema = tables.NEIGHBOURS.schema
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


@dataclass
class NeighboursConfig:
    """Options of ``saecore neighbours``."""

    sae: Path
    """SAE folder (runs/NAME/saes/SAE)."""

    other: list[Path] = option(default_factory=list, append=True)
    """Another SAE folder on the same hook to find neighbours in."""

    k: int = option(10, ge=1, le=10_000)
    """Neighbours per feature."""

    out: Path | None = None
    """Output Parquet file; unset: runs/NAME/index/SAE/neighbours.parquet."""

    device: str | None = None
    """cpu (Rust core) or cuda[:N] (PyTorch); unset: CUDA when present."""

    def __post_init__(self) -> None:
        validate(self)


def cli_configure_neighbours(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, NeighboursConfig)


def cli_run_neighbours(args: argparse.Namespace) -> int:
    args = from_args(NeighboursConfig, args)  # checked; the same attribute names
    sae = load_directions(args.sae)
    others = [load_directions(p) for p in args.other]
    for o in others:
        if o.decoder.shape[1] != sae.decoder.shape[1]:
            raise ValueError(f"{o.path} has d_in {o.decoder.shape[1]}, "
                             f"{sae.path} has {sae.decoder.shape[1]}; neighbours need the same hook width")
    table = neighbours_table(sae, others, k=args.k, device=args.device)
    out = args.out or tables.NEIGHBOURS.path(index_dir(sae.path))
    tables.NEIGHBOURS.write(table, out)
    print(f"wrote {table.num_rows} rows to {out}")
    return 0


# ------------------------------------------------------------------------------------------------
# Feature splitting
# ------------------------------------------------------------------------------------------------
def coactivation(saes: list[SAEDirections], pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                 store_path: Path, max_tokens: int = 20_000, block_rows: int = 1024,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Jaccard co-activation of feature pairs over the first ``max_tokens`` rows of the activation store.

    ``pairs[name] = (small_features, large_features)`` lists the pairs to score between ``saes[0]``
    and the SAE called ``name``. Each block of rows is encoded by every SAE (the same encodings the
    feature store holds); only the listed pairs are counted, so memory is one block of latents.
    Returns ``name -> jaccard float32`` aligned with the pairs: |f ∧ g| / |f ∨ g| (0 when neither fires).
    """
    import torch
    from tqdm import tqdm

    from .activations import ActivationStore
    from .sae import SAE

    store = ActivationStore(store_path)
    hook = saes[0].hook_name or None
    models = {s.name: SAE.load(s.path, device="cpu").eval() for s in saes}
    small = saes[0].name
    count = {s.name: torch.zeros(s.d_sae, dtype=torch.float64) for s in saes}
    joint = {name: torch.zeros(len(f), dtype=torch.float64) for name, (f, _) in pairs.items()}
    idx = {name: (torch.from_numpy(f.astype(np.int64)), torch.from_numpy(g.astype(np.int64)))
           for name, (f, g) in pairs.items()}
    n = min(int(store.num_rows), int(max_tokens))
    # Dense latents of the widest SAE bound the block's memory: keep them near 256 MiB.
    block_rows = max(16, min(block_rows, (1 << 26) // max(s.d_sae for s in saes)))
    with torch.no_grad():
        for start in tqdm(range(0, n, block_rows), desc="co-activation", unit="block", disable=not progress):
            x = torch.from_numpy(store.read(hook, start, min(start + block_rows, n)))  # (B, d_in)
            active = {name: m.encode(x) > 0 for name, m in models.items()}  # name -> (B, d_sae) bool
            for name, act in active.items():
                count[name] += act.sum(0, dtype=torch.float64)
            for name, (f, g) in idx.items():
                joint[name] += (active[small][:, f] & active[name][:, g]).sum(0, dtype=torch.float64)
    out = {}
    for name, (f, g) in idx.items():
        union = count[small][f] + count[name][g] - joint[name]
        out[name] = torch.where(union > 0, joint[name] / union.clamp_min(1), torch.zeros_like(union)).float().numpy()
    return out


def splitting_table(saes: list[SAEDirections], k: int = 5, device: str | None = None,
                    store_path: Path | None = None, coact_tokens: int = 20_000,
                    progress: bool = True) -> pa.Table:
    """Each feature of the smallest SAE with its ``k`` nearest decoder directions in every larger SAE.

    Columns: feature u32 (in the smallest SAE), sae str, other_sae str, rank u16, neighbour u32,
    cosine f32, jaccard f32 (co-activation on the activation store; null without a store).
    """
    import pyarrow as pa

    saes = sorted(saes, key=lambda s: s.d_sae)
    small, larger = saes[0], saes[1:]
    found = {}
    for big in larger:
        kk = min(k, big.d_sae)
        found[big.name] = neighbours(small.decoder, big.decoder, k=kk, device=device, names=(small.name, big.name))
    jaccard: dict[str, np.ndarray] = {}
    if store_path is not None:
        pairs = {name: (np.repeat(np.arange(small.d_sae), idx.shape[1]), idx.reshape(-1))
                 for name, (idx, _) in found.items()}
        jaccard = coactivation(saes, pairs, store_path, max_tokens=coact_tokens, progress=progress)
    parts = []
    for big in larger:
        idx, cos = found[big.name]
        n, kk = idx.shape
        jac = jaccard.get(big.name)
        parts.append(pa.table({
            "feature": pa.array(np.repeat(np.arange(n, dtype=np.uint32), kk)),
            "sae": pa.array([small.name] * (n * kk), type=pa.string()),
            "other_sae": pa.array([big.name] * (n * kk), type=pa.string()),
            "rank": pa.array(np.tile(np.arange(kk, dtype=np.uint16), n)),
            "neighbour": pa.array(idx.reshape(-1)),
            "cosine": pa.array(cos.reshape(-1)),
            "jaccard": pa.array(jac, type=pa.float32()) if jac is not None else pa.nulls(n * kk, pa.float32()),
        }))
    return pa.concat_tables(parts)


def splitting_families(table: pa.Table, min_cosine: float = 0.5) -> pa.Table:
    """One row per (small feature, larger SAE): the family = neighbours with cosine ≥ ``min_cosine``.

    Columns: feature u32, other_sae str, family_size u32, best_cosine f32, members list<u32>
    (best first).
    """
    import pyarrow as pa

    other_all = np.asarray(table["other_sae"].to_pylist(), dtype=object)
    parts = []
    for name in dict.fromkeys(other_all):
        sel = other_all == name
        f, g, c = (table[col].to_numpy()[sel] for col in ("feature", "neighbour", "cosine"))
        order = np.lexsort((-c.astype(np.float64), f))  # by feature, best first
        f, g, c = f[order], g[order], c[order]
        feats, first = np.unique(f, return_index=True)
        member = c >= min_cosine
        size = np.add.reduceat(member.astype(np.int64), first)
        offsets = np.concatenate([[0], np.cumsum(size)]).astype(np.int32)
        parts.append(pa.table({
            "feature": pa.array(feats.astype(np.uint32)),
            "other_sae": pa.array([str(name)] * len(feats), pa.string()),
            "family_size": pa.array(size.astype(np.uint32)),
            "best_cosine": pa.array(np.maximum.reduceat(c, first).astype(np.float32)),
            "members": pa.ListArray.from_arrays(pa.array(offsets), pa.array(g[member].astype(np.uint32))),
        }))
    return pa.concat_tables(parts)


def plot_splitting(table: pa.Table, families: pa.Table, path: Path) -> Path:
    """Each small feature's best cosine in every larger SAE; family sizes; cosine vs co-activation."""
    has_jaccard = table["jaccard"].null_count < table.num_rows
    fig = _figure((15 if has_jaccard else 10, 4))
    axes = fig.subplots(1, 3 if has_jaccard else 2)
    other = np.asarray(families["other_sae"].to_pylist(), dtype=object)
    best = families["best_cosine"].to_numpy()
    size = families["family_size"].to_numpy()
    for name in dict.fromkeys(other):
        sel = other == name
        axes[0].hist(best[sel], bins=44, range=(-0.1, 1.0), histtype="step", label=str(name))
        axes[1].hist(size[sel], bins=np.arange(size.max() + 2) - 0.5, histtype="step", label=str(name))
    axes[0].set(xlabel="best decoder cosine in the larger SAE", ylabel="features of the smallest SAE")
    axes[1].set(xlabel="family size (neighbours above the cosine threshold)", ylabel="features")
    axes[0].legend()
    if has_jaccard:
        t_other = np.asarray(table["other_sae"].to_pylist(), dtype=object)
        cos, jac = table["cosine"].to_numpy(), table["jaccard"].to_numpy(zero_copy_only=False)
        for name in dict.fromkeys(t_other):
            sel = t_other == name
            axes[2].scatter(cos[sel], jac[sel], s=3, alpha=0.3, label=str(name))
        axes[2].set(xlabel="decoder cosine", ylabel="co-activation (Jaccard)")
    fig.suptitle("Feature splitting: the smallest SAE's features in the larger SAEs")
    return _save_figure_atomic(fig, path)


@dataclass
class SplittingConfig:
    """Options of ``saecore splitting``."""

    sae: list[Path] = option(append=True)
    """SAE folder; give two or more of increasing size on the same store."""

    k: int = option(5, ge=1, le=10_000)
    """Neighbours per small feature in each larger SAE."""

    min_cosine: float = option(0.5, ge=-1, le=1)
    """Cosine that makes a neighbour a family member."""

    store: Path | None = None
    """Activation store for co-activation; unset: the run's activations.zarr if present."""

    coact_tokens: int = option(20_000, ge=1, le=1 << 32)
    """Tokens encoded for co-activation."""

    coact: bool = option(True, flag="--no-coact")
    """Measure co-activation (--no-coact: decoder cosine only)."""

    out: Path | None = None
    """Output folder; unset: index/<smallest SAE>/."""

    device: str | None = None
    """cpu or cuda[:N]; unset: CUDA when present."""

    def __post_init__(self) -> None:
        validate(self)
        if len(self.sae) < 2:
            raise ValueError("give at least two --sae folders (smallest first or in any order)")


def cli_configure_splitting(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, SplittingConfig)


def cli_run_splitting(args: argparse.Namespace) -> int:
    args = from_args(SplittingConfig, args)  # checked; the same attribute names
    saes = sorted((load_directions(p) for p in args.sae), key=lambda s: s.d_sae)
    widths = {s.decoder.shape[1] for s in saes}
    if len(widths) != 1:
        raise ValueError("the SAEs read different widths: "
                         + ", ".join(f"{s.path} d_in={s.decoder.shape[1]}" for s in saes))
    store = None if not args.coact else (args.store or default_store(saes[0].path))
    table = splitting_table(saes, k=args.k, device=args.device, store_path=store, coact_tokens=args.coact_tokens)
    families = splitting_families(table, args.min_cosine)
    out = args.out or index_dir(saes[0].path)
    write_parquet(table, out / run.SPLITTING_FILE)
    write_parquet(families, out / run.SPLITTING_FAMILIES_FILE)
    plot_splitting(table, families, out / run.SPLITTING_PLOT)
    for name in dict.fromkeys(families["other_sae"].to_pylist()):
        sel = np.asarray(families["other_sae"].to_pylist()) == name
        sizes = families["family_size"].to_numpy()[sel]
        print(f"{saes[0].name} -> {name}: mean family size {sizes.mean():.2f}, "
              f"{(sizes >= 2).mean():.1%} of features split into 2+ (cosine >= {args.min_cosine})")
    print(f"co-activation: {'from ' + str(store) if store else 'not computed (no activation store)'}")
    print(f"wrote splitting.parquet, splitting_families.parquet, splitting.png to {out}")
    return 0


# ------------------------------------------------------------------------------------------------
# Decoder-geometry baselines, encoder/decoder cosine, 2-D map
# ------------------------------------------------------------------------------------------------
def max_cosines(directions: np.ndarray, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's largest cosine to any other row, and that row's index."""
    idx, cos = neighbours(directions, k=1, device=device)
    return cos[:, 0], idx[:, 0]


def activation_covariance(store_path: Path, hook: str | None, max_tokens: int = 50_000,
                          block_rows: int = 4096) -> np.ndarray:
    """Covariance [d, d] (float64) of the first ``max_tokens`` rows of one hook, streamed in blocks."""
    from .activations import ActivationStore

    store = ActivationStore(store_path)
    n = min(int(store.num_rows), int(max_tokens))
    if n < 2:
        raise ValueError(f"{store_path}: needs at least 2 rows for a covariance, has {n}")
    d = store.d_model(hook)
    total, outer = np.zeros(d), np.zeros((d, d))
    for start in range(0, n, block_rows):
        x = store.read(hook, start, min(start + block_rows, n)).astype(np.float64)  # (B, d)
        total += x.sum(0)
        outer += x.T @ x
    mean = total / n
    return (outer - n * np.outer(mean, mean)) / (n - 1)


def geometry_baselines(sae: SAEDirections, covariance: np.ndarray | None = None, seed: int = 0,
                       device: str | None = None) -> pa.Table:
    """Max cosine of each decoder direction to the others, next to the same statistic for as many
    random unit directions (isotropic) and random directions drawn from N(0, Σ_activations).

    Columns: kind str ("decoder" | "random" | "covariance"), index u32, max_cosine f32, nearest u32.
    """
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    n, d = sae.decoder.shape
    sets = {"decoder": sae.decoder, "random": rng.standard_normal((n, d), dtype=np.float32)}
    if covariance is not None:
        # Σ = V diag(λ) Vᵀ; z·sqrt(λ)·Vᵀ ~ N(0, Σ) (eigh tolerates a singular Σ, unlike Cholesky).
        lam, vec = np.linalg.eigh(covariance)
        factor = (vec * np.sqrt(np.clip(lam, 0, None))).T  # (d, d)
        sets["covariance"] = (rng.standard_normal((n, d)) @ factor).astype(np.float32)
    parts = []
    for kind, m in sets.items():
        cos, near = max_cosines(m, device=device)
        parts.append(pa.table({
            "kind": pa.array([kind] * n, pa.string()),
            "index": pa.array(np.arange(n, dtype=np.uint32)),
            "max_cosine": pa.array(cos.astype(np.float32)),
            "nearest": pa.array(near.astype(np.uint32)),
        }))
    return pa.concat_tables(parts)


def baseline_quantiles(table: pa.Table) -> list[dict[str, Any]]:
    """Per kind of a :func:`geometry_baselines` table: median and 10 % / 90 % quantiles of the max cosine."""
    kinds = np.asarray(table["kind"].to_pylist(), dtype=object)
    values = table["max_cosine"].to_numpy()
    return [{"kind": str(kind), "median": float(np.median(values[kinds == kind])),
             "p10": float(np.quantile(values[kinds == kind], 0.1)),
             "p90": float(np.quantile(values[kinds == kind], 0.9))} for kind in dict.fromkeys(kinds)]


def plot_baselines(table: pa.Table, title: str, path: Path) -> Path:
    fig = _figure((6.5, 4))
    ax = fig.subplots()
    kinds = np.asarray(table["kind"].to_pylist(), dtype=object)
    values = table["max_cosine"].to_numpy()
    for kind in dict.fromkeys(kinds):
        ax.hist(values[kinds == kind], bins=60, range=(-0.05, 1.0), histtype="step", label=str(kind), density=True)
    ax.set(xlabel="max cosine to any other direction", ylabel="density", title=title)
    ax.legend()
    return _save_figure_atomic(fig, path)


def enc_dec_cosine(sae: SAEDirections) -> pa.Table:
    """Cosine between each feature's encoder column and decoder row: feature u32, cosine f32 (0 for a zero vector)."""
    import pyarrow as pa

    enc = sae.encoder.T.astype(np.float64)  # (d_sae, d_in)
    dec = sae.decoder.astype(np.float64)
    norms = np.linalg.norm(enc, axis=1) * np.linalg.norm(dec, axis=1)
    dots = np.einsum("ij,ij->i", enc, dec)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return tables.ENC_DEC_COSINE.table({"feature": pa.array(np.arange(len(cos), dtype=np.uint32)),
                                        "cosine": pa.array(cos.astype(np.float32))})


def feature_map(saes: list[SAEDirections], method: str = "umap", seed: int = 0) -> tuple[pa.Table, str]:
    """2-D coordinates of the decoder directions of ``saes`` (one joint embedding).

    ``method="umap"``: UMAP with the cosine metric (umap-learn). ``"pca"``: the top two principal
    components of the unit-normalised directions (fast, deterministic; the fallback when umap-learn
    is not installed). Returns the table (feature u32, sae str, x f32, y f32) and the method used.
    """
    import pyarrow as pa

    dirs = np.concatenate([s.decoder for s in saes]).astype(np.float32)
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    unit = np.divide(dirs, norms, out=np.zeros_like(dirs), where=norms > 0)
    if method == "umap":
        try:
            with warnings.catch_warnings():
                # umap-learn warns at import when its optional TensorFlow extras are missing.
                warnings.simplefilter("ignore", ImportWarning)
                import umap
        except ImportError:
            method = "pca"
    if method == "umap" and len(unit) > 3:
        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_jobs=1,
                            n_neighbors=min(15, len(unit) - 1), init="random" if len(unit) < 20 else "spectral")
        xy = reducer.fit_transform(unit)
    else:
        method = "pca"
        centred = unit - unit.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        if xy.shape[1] < 2:
            xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return tables.MAP.table({
        "feature": pa.array(np.concatenate([np.arange(s.d_sae, dtype=np.uint32) for s in saes])),
        "sae": pa.array([s.name for s in saes for _ in range(s.d_sae)], pa.string()),
        "x": pa.array(xy[:, 0].astype(np.float32)),
        "y": pa.array(xy[:, 1].astype(np.float32)),
    }), method


def plot_map(table: pa.Table, method: str, path: Path) -> Path:
    fig = _figure((6.5, 6))
    ax = fig.subplots()
    sae = np.asarray(table["sae"].to_pylist(), dtype=object)
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    for name in dict.fromkeys(sae):
        sel = sae == name
        ax.scatter(x[sel], y[sel], s=3, alpha=0.6, label=str(name))
    ax.set(title=f"Decoder directions ({method})", xticks=[], yticks=[])
    ax.legend(markerscale=4)
    return _save_figure_atomic(fig, path)


@dataclass
class GeometryConfig:
    """Options of ``saecore geometry``."""

    sae: list[Path] = option(append=True)
    """SAE folder."""

    store: Path | None = None
    """Activation store for the covariance baseline; unset: the run's activations.zarr."""

    max_tokens: int = option(50_000, ge=2, le=1 << 32)
    """Tokens read for the covariance."""

    map: Literal["umap", "pca", "none"] = "umap"
    """2-D map method (umap: cosine metric; pca: fast fallback; none: skip)."""

    seed: int = option(0, ge=0, lt=1 << 32)
    """Seeds the random baselines and the map."""

    device: str | None = None
    """cpu or cuda[:N]; unset: CUDA when present."""

    def __post_init__(self) -> None:
        validate(self)


def cli_configure_geometry(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, GeometryConfig)


def cli_run_geometry(args: argparse.Namespace) -> int:
    args = from_args(GeometryConfig, args)  # checked; the same attribute names
    saes = [load_directions(p) for p in args.sae]
    for sae in saes:
        out = index_dir(sae.path)
        tables.ENC_DEC_COSINE.write(enc_dec_cosine(sae), tables.ENC_DEC_COSINE.path(out))
        store = args.store or default_store(sae.path)
        cov = activation_covariance(store, sae.hook_name or None, args.max_tokens) if store else None
        table = geometry_baselines(sae, cov, seed=args.seed, device=args.device)
        write_parquet(table, out / run.GEOMETRY_FILE)
        plot_baselines(table, f"{sae.name}: decoder geometry vs random baselines", out / run.GEOMETRY_PLOT)
        _print_baseline_summary(sae.name, table)
        if cov is None:
            print("  (no activation store found: covariance baseline skipped; pass --store)")
    if args.map != "none":
        table, method = feature_map(saes, args.map, seed=args.seed)
        for sae in saes:
            tables.MAP.write(table, tables.MAP.path(index_dir(sae.path)))
            plot_map(table, method, index_dir(sae.path) / run.MAP_PLOT)
        print(f"map ({method}) of {table.num_rows} directions written to map.parquet/map.png")
    return 0


def _print_baseline_summary(name: str, table: pa.Table) -> None:
    kinds = np.asarray(table["kind"].to_pylist(), dtype=object)
    values = table["max_cosine"].to_numpy()
    print(f"{name}: max cosine to another direction (median [10%, 90%])")
    for kind in dict.fromkeys(kinds):
        v = values[kinds == kind]
        print(f"  {kind:<10} {np.median(v):.3f} [{np.quantile(v, 0.1):.3f}, {np.quantile(v, 0.9):.3f}]")


__all__ = [
    "SAEDirections", "activation_covariance", "baseline_quantiles", "coactivation", "enc_dec_cosine", "feature_map",
    "geometry_baselines", "load_directions", "max_cosines", "neighbours", "neighbours_table",
    "splitting_families", "splitting_table",
]
