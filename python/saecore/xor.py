"""``saecore xor``: is A XOR B linearly readable because of superposition?

The toy is built so that nothing in it computes an XOR. ``n`` boolean features ``b`` are written into
``d`` dimensions along unit directions ``W [d, n]`` (``h = W b``, the "residual stream"), and a ReLU
readout recovers each feature on its own (``r = ReLU(Wᵀ h − β)``, Elhage et al.'s toy model of
superposition). Two features, A = ``b[0]`` and B = ``b[1]``, are on with probability ½ each; the other
``n − 2`` are on with probability ``active / (n − 2)``.

A linear probe then tries to read A, B and A XOR B from ``h`` and from ``r``. XOR is not linearly
separable in (A, B): on the four equally likely (A, B) cells a linear rule gets at most 3 of 4 right, so
75 % is the ceiling of any representation that is linear in the features. ``h`` is linear in ``b`` by
construction, so its XOR accuracy stays at that ceiling — a probe that reads more there is broken. In
``r``, when ``n = d`` the directions are orthonormal and each readout unit sees its own feature only, so
XOR stays at the ceiling too. Only with superposition (``n > d``) does a readout unit of some third
feature see ``w_kᵀ w_A · A + w_kᵀ w_B · B`` cross its threshold when both A and B are on and not when one
is: an AND appears as a by-product of interference, and with it XOR = A + B − 2·(A∧B) becomes linear.
The sweep over ``n / d`` and the number of other active features shows when that happens.

On a real model (``--run RUN`` or ``--model``), the same three probes are fitted at every layer's
residual stream on two properties of the text that anyone can recompute from the tokens:

- A: the token starts with a capital letter (after its leading space);
- B: the token is inside parentheses (more ``(`` than ``)`` since the context's last document boundary).

Both are common in the built-in corpus (Python's docs and Shakespeare). A shuffled-label control (the
XOR labels permuted) fits the same probe; its accuracy is what "reading nothing" looks like.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import run as layout
from ._atomic import atomic_target, write_parquet
from .config import add_arguments, from_args, option, validate

#: The best accuracy a rule linear in (A, B) can reach on XOR with the four cells equally likely.
LINEAR_XOR_CEILING = 0.75


@dataclass(kw_only=True)
class XorConfig:
    """Options of ``saecore xor``: the toy sweep, and (with a run or a model) the real-model probes."""

    run: Path | None = None
    """Run folder: results go to RUN/experiments/xor; its store names the model and corpus."""
    out: Path | None = None
    """Output folder (default: RUN/experiments/xor, or runs/xor without a run)."""
    d: int = option(32, ge=2, le=4096)
    """Toy: dimensions of the residual stream the features are written into."""
    ratios: list[float] = option(default_factory=lambda: [1.0, 2.0, 4.0, 8.0], append=True, ge=1, le=64, flag="--ratio")
    """Toy: a value of n / d (features per dimension) to sweep; 1 means no superposition (repeatable)."""
    active: list[float] = option(default_factory=lambda: [0.0, 1.0, 4.0, 16.0], append=True, ge=0, le=1024)
    """Toy: an expected number of other features on at once, to sweep (repeatable)."""
    threshold: float = option(0.5, ge=0, le=10)
    """Toy: β of the readout ReLU(Wᵀh − β); a feature's unit fires when its input exceeds this."""
    samples: int = option(8192, ge=64, le=1 << 22)
    """Toy: examples per setting (half train, half held out)."""
    model: str | None = None
    """Real model to probe (default: the run's model; without a run or model only the toy runs)."""
    corpus: str | None = None
    """Corpus for the real-model probes (default: the run's corpus, else the built-in one)."""
    contexts: int = option(128, ge=2, le=100_000)
    """Real model: contexts of text probed (even ones train, odd ones held out)."""
    context_length: int = option(128, ge=8, le=8192)
    """Real model: tokens per context."""
    device: str | None = None
    """torch device for the real model (default: CUDA when present)."""
    seed: int = option(0, ge=0, lt=1 << 31)
    """Seeds the toy and the shuffled-label control."""

    def __post_init__(self) -> None:
        validate(self)
        if not self.ratios or not self.active:
            raise ValueError("xor: give at least one --ratio and one --active value")


def directions(n: int, d: int, seed: int) -> torch.Tensor:
    """``[d, n]`` unit columns: orthonormal when ``n <= d`` (no interference), random otherwise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, n, generator=gen, dtype=torch.float64)
    if n <= d:
        w, _ = torch.linalg.qr(w)  # (d, n) orthonormal columns
        return w[:, :n]
    return w / w.norm(dim=0, keepdim=True)


def sample_features(n: int, active: float, samples: int, seed: int) -> torch.Tensor:
    """``[samples, n]`` booleans: A and B fair coins, the others on with probability active/(n-2)."""
    gen = torch.Generator().manual_seed(seed + 1)
    b = torch.zeros(samples, n, dtype=torch.float64)
    b[:, :2] = (torch.rand(samples, 2, generator=gen) < 0.5).double()
    if n > 2 and active > 0:
        p = min(1.0, active / (n - 2))
        b[:, 2:] = (torch.rand(samples, n - 2, generator=gen) < p).double()
    return b


def representations(w: torch.Tensor, b: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """The residual ``h = W b`` and the ReLU readout ``r = ReLU(Wᵀ h − β)``."""
    h = b @ w.T  # (samples, d)
    r = torch.relu(h @ w - threshold)  # (samples, n)
    return {"residual": h, "readout": r}


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (L-BFGS, standardised inputs folded back): returns ``(weight [f], bias)``."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-9)
    xs = (x - mean) / std
    wt = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([wt, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ wt + bias, y) + l2 * wt.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = wt.detach() / std  # undo the standardisation so the probe applies to raw x
    return w, bias.detach() - (mean * w).sum()


def cell_balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the four (A, B) cells of the accuracy within the cell (cells weigh equally)."""
    accs = []
    for va in (0.0, 1.0):
        for vb in (0.0, 1.0):
            cell = (a == va) & (b == vb)
            if cell.any():
                accs.append(float((pred[cell] == y[cell]).double().mean()))
    return float(np.mean(accs))


def class_balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the label's classes of the accuracy within the class."""
    return float(np.mean([float((pred[y == c] == c).double().mean()) for c in (0.0, 1.0) if (y == c).any()]))


def probe_row(x: torch.Tensor, feats: torch.Tensor, target: str, half: int | None = None, seed: int = 0) -> dict[str, float]:
    """Fit a probe for ``target`` (A, B, XOR, or XOR-shuffled: the control) on rows ``[:half]``, score it
    on the rest (``half`` defaults to the middle)."""
    a, b = feats[:, 0], feats[:, 1]
    xor_labels = (a != b).double()
    if target == "XOR-shuffled":
        gen = torch.Generator().manual_seed(seed)
        xor_labels = xor_labels[torch.randperm(len(xor_labels), generator=gen)]
    y = {"A": a, "B": b, "XOR": xor_labels, "XOR-shuffled": xor_labels}[target]
    half = x.shape[0] // 2 if half is None else half
    w, bias = fit_probe(x[:half], y[:half])
    logit = x[half:] @ w + bias
    pred = (logit > 0).double()
    yt, at, bt = y[half:], a[half:], b[half:]
    margin = logit / w.norm().clamp_min(1e-12)  # signed distance to the probe's boundary
    both, a_only = (at == 1) & (bt == 1), (at == 1) & (bt == 0)
    # The control's labels are not a function of the (A, B) cell: balance over its two classes instead.
    accuracy = class_balanced_accuracy(pred, yt) if target == "XOR-shuffled" else cell_balanced_accuracy(pred, yt, at, bt)
    return {
        "accuracy": accuracy,
        "margin_a_and_b": float(margin[both].mean()) if both.any() else float("nan"),
        "margin_a_not_b": float(margin[a_only].mean()) if a_only.any() else float("nan"),
    }


def sweep(cfg: XorConfig) -> list[dict[str, object]]:
    """One row per (n/d, active, representation, target): held-out cell-balanced probe accuracy."""
    rows: list[dict[str, object]] = []
    for i, ratio in enumerate(cfg.ratios):
        n = max(2, round(ratio * cfg.d))
        w = directions(n, cfg.d, cfg.seed + 1000 * i)
        for j, active in enumerate(cfg.active):
            feats = sample_features(n, active, cfg.samples, cfg.seed + 1000 * i + j)
            for rep, x in representations(w, feats, cfg.threshold).items():
                for target in ("A", "B", "XOR"):
                    row = {"n": n, "d": cfg.d, "ratio": n / cfg.d, "active": active, "representation": rep, "target": target}
                    rows.append(row | probe_row(x, feats, target))
    return rows


def write_results(rows: list[dict[str, object]], table_path: Path, plot_path: Path, draw: Any) -> list[Path]:
    """The rows as Parquet and their plot, both written atomically."""
    import pyarrow as pa

    write_parquet(pa.Table.from_pylist(rows), table_path)
    with atomic_target(plot_path) as tmp:
        draw(rows, tmp)
    return [table_path, plot_path]


def _figure() -> Any:
    # An explicit Agg canvas: the process-wide matplotlib backend is never touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    return fig


def plot_toy(rows: list[dict[str, object]], path: Path) -> None:
    """Held-out XOR accuracy against n/d for the readout (solid) and the residual (dashed)."""
    fig = _figure()
    ax = fig.add_subplot()
    xor = [r for r in rows if r["target"] == "XOR"]
    for active in sorted({r["active"] for r in xor}):
        for rep, style in (("readout", "-o"), ("residual", "--x")):
            pts = sorted((r["ratio"], r["accuracy"]) for r in xor if r["active"] == active and r["representation"] == rep)
            ax.plot(*zip(*pts), style, label=f"{rep}, {active:g} other active")
    ax.axhline(LINEAR_XOR_CEILING, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="features per dimension (n / d)", ylabel="held-out XOR accuracy (cell-balanced)")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def summary_lines(rows: list[dict[str, object]]) -> list[str]:
    """A table of XOR accuracy: rows n/d, columns active count, for each representation."""
    lines = []
    actives = sorted({r["active"] for r in rows})
    for rep in ("residual", "readout"):
        lines.append(f"XOR probe accuracy on the {rep} (linear ceiling {LINEAR_XOR_CEILING:.2f})")
        lines.append("  n/d  | " + " ".join(f"act={a:<5g}" for a in actives))
        for ratio in sorted({r["ratio"] for r in rows}):
            accs = {r["active"]: r["accuracy"] for r in rows if r["ratio"] == ratio and r["representation"] == rep and r["target"] == "XOR"}
            lines.append(f"  {ratio:<4g} | " + " ".join(f"{accs[a]:<9.3f}" for a in actives))
    return lines




# -- the real model ------------------------------------------------------------------------------------
def token_properties(tokenizer: Any, ids: np.ndarray, boundary_ids: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` booleans ``[n, T]``: A = the token starts with a capital letter; B = it is inside
    parentheses (the depth counted from the context's start or its last document boundary, before it)."""
    text = {int(t): tokenizer.decode([int(t)]) for t in np.unique(ids)}
    a = np.zeros(ids.shape, dtype=bool)
    b = np.zeros(ids.shape, dtype=bool)
    for c in range(ids.shape[0]):
        depth = 0
        for t, tok in enumerate(ids[c].tolist()):
            if tok in boundary_ids:
                depth = 0
                continue
            s = text[tok]
            a[c, t] = s.lstrip()[:1].isupper()
            b[c, t] = depth > 0
            depth = max(0, depth + s.count("(") - s.count(")"))
    return a, b


def residual_hooks(model: Any) -> list[str]:
    """``blocks.L.hook_resid_post`` for every decoder layer, in order."""
    from .hooks import decoder_layers

    return [f"blocks.{i}.hook_resid_post" for i in range(len(decoder_layers(model)))]


@torch.no_grad()
def layer_activations(model: Any, ids: np.ndarray, keep: np.ndarray, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Residual stream at every layer for the kept tokens: ``{hook: [rows, d] float32}``, rows in order."""
    from .hooks import run_to_hooks
    from .sae_model import model_device

    hooks = residual_hooks(model)
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    device = model_device(model)
    for start in range(0, ids.shape[0], batch_size):
        batch = torch.as_tensor(ids[start : start + batch_size], device=device)
        mask = torch.as_tensor(keep[start : start + batch_size])
        acts = run_to_hooks(model, batch, hooks)
        for h in hooks:
            parts[h].append(acts[h].float().cpu()[mask])  # (kept tokens, d)
    return {h: torch.cat(p).double() for h, p in parts.items()}


def probe_layers(acts: dict[str, torch.Tensor], a: np.ndarray, b: np.ndarray, half: int, seed: int) -> list[dict[str, object]]:
    """Held-out probe accuracy for A, B, XOR and the shuffled-XOR control at every layer."""
    feats = torch.as_tensor(np.stack([a, b], axis=1), dtype=torch.float64)
    rows: list[dict[str, object]] = []
    for layer, hook in enumerate(acts):
        for target in ("A", "B", "XOR", "XOR-shuffled"):
            rows.append({"layer": layer, "hook": hook, "target": target} | probe_row(acts[hook], feats, target, half, seed))
    return rows


def model_probes(cfg: XorConfig, model: Any, tokenizer: Any, corpus: Any) -> list[dict[str, object]]:
    """Contexts of ``corpus`` through ``model``; the probes of every layer (first half of contexts train)."""
    from .harvesting import iter_contexts

    contexts = [ids for _, (ids, _) in zip(range(cfg.contexts), iter_contexts(iter(corpus), tokenizer, cfg.context_length))]
    if len(contexts) < 2:
        raise ValueError(f"xor: the corpus has fewer than 2 contexts of {cfg.context_length} tokens")
    # Even contexts train, odd ones are held out: the built-in corpus interleaves its sources, so halves
    # cut by position could put all of one kind of text (Shakespeare, say: no parentheses) on one side.
    ids = np.concatenate([np.stack(contexts[0::2]), np.stack(contexts[1::2])])  # (n, T)
    boundary = {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None}
    keep = ~np.isin(ids, list(boundary))
    keep[:, 0] = False  # the first position sees nothing before it
    a, b = token_properties(tokenizer, ids, boundary)
    half = int(keep[: len(contexts[0::2])].sum())
    acts = layer_activations(model, ids, keep)
    return probe_layers(acts, a[keep], b[keep], half, cfg.seed)


def plot_model(rows: list[dict[str, object]], path: Path) -> None:
    """Held-out accuracy of each probe against layer, with the linear XOR ceiling."""
    fig = _figure()
    ax = fig.add_subplot()
    for target in ("A", "B", "XOR", "XOR-shuffled"):
        pts = sorted((r["layer"], r["accuracy"]) for r in rows if r["target"] == target)
        ax.plot(*zip(*pts), "-o", ms=3, label=target)
    ax.axhline(LINEAR_XOR_CEILING, color="grey", lw=0.8)
    ax.set(xlabel="layer (resid_post)", ylabel="held-out accuracy (cell-balanced)", ylim=(0.3, 1.02))
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def model_summary(rows: list[dict[str, object]]) -> list[str]:
    """One line per layer: the four probes' accuracies."""
    lines = ["layer  A      B      XOR    XOR-shuffled"]
    for layer in sorted({r["layer"] for r in rows}):
        acc = {r["target"]: r["accuracy"] for r in rows if r["layer"] == layer}
        lines.append(f"{layer:<5}  {acc['A']:.3f}  {acc['B']:.3f}  {acc['XOR']:.3f}  {acc['XOR-shuffled']:.3f}")
    return lines


# -- the verb --------------------------------------------------------------------------------------------
def output_dir(cfg: XorConfig) -> Path:
    """Where the tables go: ``--out``, else the run's experiments/xor, else runs/xor."""
    if cfg.out is not None:
        return cfg.out
    return layout.Run(cfg.run).experiment("xor") if cfg.run is not None else Path("runs/xor")


def _model_and_corpus(cfg: XorConfig) -> tuple[Any, Any] | None:
    """The model and corpus to probe: explicit, else the run's store's, else none (toy only)."""
    from . import corpus as corpus_mod
    from . import models

    model_name, corpus_name = cfg.model, cfg.corpus
    if cfg.run is not None:
        from .activations import ActivationStore

        attrs = ActivationStore(layout.Run(cfg.run).activations).attrs
        model_name = model_name or attrs.get("model")
        corpus_name = corpus_name or attrs.get("corpus")
    if model_name is None:
        return None
    return models.load(model_name, device=cfg.device), corpus_mod.load(corpus_name or "default")


def _iter_outputs(cfg: XorConfig, out: Path) -> Iterator[str]:
    loaded = _model_and_corpus(cfg)  # first: a bad run, model or corpus fails before anything is written
    rows = sweep(cfg)
    yield from write_results(rows, out / layout.XOR_TOY_FILE, out / layout.XOR_TOY_PLOT, plot_toy)
    yield from summary_lines(rows)
    if loaded is not None:
        (model, tokenizer), corpus = loaded
        real = model_probes(cfg, model, tokenizer, corpus)
        yield from write_results(real, out / layout.XOR_MODEL_FILE, out / layout.XOR_MODEL_PLOT, plot_model)
        yield from model_summary(real)


def cli_configure(parser: Any) -> None:
    """Options of ``saecore xor``."""
    add_arguments(parser, XorConfig)


def cli_run(args: Any) -> int:
    """Run ``saecore xor``: the toy sweep, then the real model's layers when a run or model is given."""
    cfg = from_args(XorConfig, args)
    for line in _iter_outputs(cfg, output_dir(cfg)):
        print(f"wrote {line}" if isinstance(line, Path) else line, file=sys.stderr if isinstance(line, Path) else sys.stdout)
    return 0
