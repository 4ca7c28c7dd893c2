"""``saecore maximise``: synthetic max-activating text for an SAE feature, by greedy coordinate gradient.

The question (Scaling Monosemanticity's open list): what text does a feature respond to most, beyond the
examples a corpus happens to contain? A short token sequence ``s`` (``--length`` tokens after the BOS
token every harvested context starts with) is optimised to maximise the feature's encoder
pre-activation ``p(s) = W_enc[:, F] · x(s) + b_enc[F]`` at the SAE's hook, at the last position (or the
largest over the positions, ``--position max``). That pre-activation equals the feature's activation
whenever the feature fires (ReLU, TopK when selected, JumpReLU above its threshold) and, unlike the
activation, it is never flat at zero, so it has a gradient everywhere; the SAE's actual activation
(``SAE.encode``) is reported beside it.

Greedy coordinate gradient (GCG, Zou et al. 2023), one step:

1. the gradient of the objective with respect to the one-hot token matrix ``[L, vocab]`` (the
   sequence goes in as ``one_hot @ W_embed``; the forward stops at the hook, see
   :func:`saecore.hooks.forward_to_hook`);
2. at each position, the ``--top-k`` tokens with the largest gradient: the substitutions a first-order
   model says help most;
3. ``--candidates`` sequences, each the current one with one random position swapped for a random one of
   that position's top-k tokens, evaluated exactly (one batched forward);
4. move to the best candidate (even if it is worse than the current sequence, which lets the search
   leave a local optimum) and remember the best sequence seen.

``--fluency λ`` subtracts λ × the sequence's mean negative log-likelihood under the model itself
(which needs the full forward, not just the layers up to the hook), trading activation for text the
model finds likely. Everything is seeded (``torch.Generator``) and deterministic on the CPU.

A random-search baseline with the same number of exact evaluations (the same loop with the top-k
tokens replaced by tokens drawn uniformly from the vocabulary) shows what the gradient buys.

Output: ``RUN/experiments/maximise/SAE/F.json`` (:func:`saecore.run.maximise_dir`), with the best
sequence of each restart (token ids, their text, activation, pre-activation, and the activation of the
decoded text re-tokenized), the random-search result, and the feature's top dataset examples from the
index; the feature page shows it as "Synthetic max-activating text".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from . import run as layout
from ._atomic import write_json
from .config import SAEModelOptions, add_arguments, from_args, option, validate

MAXIMISE_FORMAT = "saecore.maximise/1"


@dataclass(kw_only=True)
class MaximiseConfig(SAEModelOptions):
    """Options of ``saecore maximise``."""

    feature: list[int] = option(append=True, ge=0, lt=1 << 32)
    """Feature id to maximise (repeatable: each gets its own search and file)."""
    length: int = option(8, ge=1, le=512)
    """Tokens optimised (after the BOS token)."""
    steps: int = option(50, ge=1, le=1_000_000)
    """GCG steps per restart."""
    top_k: int = option(64, ge=1, le=1 << 20)
    """Candidate tokens per position: the ones with the largest gradient."""
    candidates: int = option(64, ge=1, le=1 << 16)
    """Random single-token swaps evaluated exactly per step."""
    restarts: int = option(2, ge=1, le=10_000)
    """Independent searches from random sequences; the best of each is reported."""
    position: Literal["last", "max"] = "last"
    """Where the activation counts: the last token, or the largest over all positions."""
    fluency: float = option(0.0, ge=0, le=1e6)
    """λ: subtract λ x the mean negative log-likelihood of the sequence under the model (full forward)."""
    baseline: bool = option(True, flag="--no-baseline")
    """Also run the random-search baseline with the same number of exact evaluations (--no-baseline: skip)."""
    examples: int = option(5, ge=0, le=1000)
    """Top dataset examples from the index to report beside the synthetic text."""
    batch_size: int = option(256, ge=1, le=1 << 20)
    """Sequences per forward when evaluating candidates."""
    seed: int = option(0, ge=0, lt=1 << 31)
    """Seeds the initial sequences and the candidate draws."""
    out: Path | None = None
    """Output folder (default: RUN/experiments/maximise/SAE, or SAE/maximise outside a run)."""

    def __post_init__(self) -> None:
        validate(self)
        if not self.feature:
            raise ValueError("maximise: give at least one --feature")


# -- the objective ---------------------------------------------------------------------------------
@dataclass
class Scores:
    """Exact values of a batch of sequences ``[N]``: the search objective and what it is made of."""

    objective: torch.Tensor
    pre: torch.Tensor
    """the feature's pre-activation at the scored position"""
    activation: torch.Tensor
    """the SAE's activation (``encode``) at that position"""
    nll: torch.Tensor | None
    """mean negative log-likelihood of the sequence's tokens (with ``fluency`` only)"""


class Objective:
    """The feature's pre-activation at the SAE's hook (last position or max over positions), minus
    ``fluency`` × mean NLL. Sequences are ``[N, L]`` token ids; the BOS token is put in front here."""

    def __init__(self, model: Any, sae: Any, feature: int, bos: int, position: str = "last",
                 fluency: float = 0.0, batch_size: int = 256) -> None:
        self.model, self.sae, self.feature, self.bos = model, sae, int(feature), int(bos)
        self.position, self.fluency, self.batch_size = position, float(fluency), int(batch_size)
        self.hook = sae.cfg.hook_name
        self.w = sae.W_enc[:, self.feature].detach() * sae.cfg.input_scale  # [d_in]
        self.b = sae.b_enc[self.feature].detach()
        self.embed = model.get_input_embeddings().weight.detach()  # [vocab, d_model]

    def _with_bos(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((ids.shape[0], 1), self.bos, dtype=ids.dtype, device=ids.device), ids], 1)

    def _pick(self, per_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(value [N], position [N])`` from ``[N, L]`` values (BOS column already dropped)."""
        if self.position == "last":
            n = per_position.shape[0]
            return per_position[:, -1], torch.full((n,), per_position.shape[1] - 1, device=per_position.device)
        return per_position.max(dim=1)

    def _terms(self, full_ids: torch.Tensor, onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Pre-activations ``[N, L]`` (BOS dropped), hook activations, and mean NLL (None without fluency).

        With ``onehot [N, L+1, vocab]`` the input is ``onehot @ W_embed`` and the NLL reads its targets
        from ``onehot`` too, so both depend differentiably on it.
        """
        from .hooks import forward_to_hook

        embeds = None if onehot is None else onehot @ self.embed
        x, logits = forward_to_hook(self.model, self.hook, input_ids=full_ids if onehot is None else None,
                                    inputs_embeds=embeds, full=self.fluency > 0)
        x = x[:, 1:].to(self.w.dtype)
        pre = x @ self.w + self.b  # [N, L]
        if logits is None:
            return pre, x, None
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
        if onehot is not None:
            return pre, x, -(logp * onehot[:, 1:].float()).sum(-1).mean(1)
        return pre, x, -logp.gather(-1, full_ids[:, 1:, None]).squeeze(-1).mean(1)

    @torch.no_grad()
    def score(self, ids: torch.Tensor) -> Scores:
        """Exact scores of ``ids [N, L]``, ``batch_size`` sequences per forward."""
        parts: list[Scores] = []
        for start in range(0, ids.shape[0], self.batch_size):
            full = self._with_bos(ids[start:start + self.batch_size])
            pre, x, nll = self._terms(full, None)
            value, pos = self._pick(pre)
            act = self.sae.encode(x[torch.arange(len(pos)), pos])[:, self.feature]
            objective = value - self.fluency * nll if nll is not None else value
            parts.append(Scores(objective.double(), value.double(), act.double(), None if nll is None else nll.double()))
        nlls = [p.nll for p in parts if p.nll is not None]
        return Scores(torch.cat([p.objective for p in parts]), torch.cat([p.pre for p in parts]),
                      torch.cat([p.activation for p in parts]), torch.cat(nlls) if nlls else None)

    def gradient(self, ids: torch.Tensor) -> torch.Tensor:
        """d objective / d one-hot ``[L, vocab]`` of one sequence ``ids [L]`` (float32)."""
        full = self._with_bos(ids[None])  # [1, L+1]
        onehot = torch.nn.functional.one_hot(full[0], self.embed.shape[0]).to(self.embed.dtype)
        onehot.requires_grad_(True)
        with torch.enable_grad():
            pre, _, nll = self._terms(full, onehot[None])
            value, _ = self._pick(pre)
            objective = value[0] - self.fluency * nll[0] if nll is not None else value[0]
            (grad,) = torch.autograd.grad(objective, onehot)
        return grad[1:].float()  # the BOS row is fixed


# -- the searches ----------------------------------------------------------------------------------
def allowed_tokens(tokenizer: Any, vocab: int) -> torch.Tensor:
    """``[vocab]`` bool: tokens the search may use. Special tokens, ids past the tokenizer's vocabulary,
    and tokens that decode to nothing or to a partial UTF-8 character (shown as U+FFFD) are left out."""
    from .harvesting import _special_ids

    ok = torch.zeros(vocab, dtype=torch.bool)
    n = min(vocab, len(tokenizer))
    pieces = tokenizer.batch_decode([[i] for i in range(n)])
    ok[:n] = torch.tensor([bool(p) and "\ufffd" not in p for p in pieces])
    special = torch.as_tensor(_special_ids(tokenizer), dtype=torch.long)
    ok[special[special < vocab]] = False
    return ok


@dataclass
class Found:
    """The best sequence of one restart."""

    ids: list[int]
    objective: float
    pre: float
    activation: float
    nll: float | None


def _best(cands: torch.Tensor, s: Scores) -> tuple[int, Found]:
    j = int(torch.argmax(s.objective))
    nll = None if s.nll is None else float(s.nll[j])
    return j, Found(cands[j].tolist(), float(s.objective[j]), float(s.pre[j]), float(s.activation[j]), nll)


def search(objective: Objective, allowed: torch.Tensor, length: int, steps: int, candidates: int,
           top_k: int | None, gen: torch.Generator) -> Found:
    """One restart of GCG (``top_k`` set) or of random search (``top_k=None``: uniform tokens)."""
    pool = allowed.nonzero().squeeze(1)  # [V'] allowed token ids
    ids = pool[torch.randint(len(pool), (length,), generator=gen)]
    _, best = _best(ids[None], objective.score(ids[None]))
    rows = torch.arange(candidates)
    for _ in range(steps):
        pos = torch.randint(length, (candidates,), generator=gen)
        if top_k is None:
            tokens = pool[torch.randint(len(pool), (candidates,), generator=gen)]
        else:
            grad = objective.gradient(ids).cpu()
            grad[:, ~allowed] = -torch.inf
            top = grad.topk(min(top_k, len(pool)), dim=1).indices  # [L, k]
            tokens = top[pos, torch.randint(top.shape[1], (candidates,), generator=gen)]
        cands = ids.repeat(candidates, 1)
        cands[rows, pos] = tokens
        j, found = _best(cands, objective.score(cands))
        ids = cands[j]
        if found.objective > best.objective:
            best = found
    return best


def run_searches(objective: Objective, allowed: torch.Tensor, cfg: MaximiseConfig, gcg: bool) -> list[Found]:
    """The best sequence of each of ``cfg.restarts`` searches, best first (seeded by ``cfg.seed``)."""
    gen = torch.Generator().manual_seed(cfg.seed + (0 if gcg else 1_000_003))
    found = [search(objective, allowed, cfg.length, cfg.steps, cfg.candidates, cfg.top_k if gcg else None, gen)
             for _ in range(cfg.restarts)]
    return sorted(found, key=lambda f: -f.objective)


# -- one feature -----------------------------------------------------------------------------------
def _describe(found: Found, tokenizer: Any, objective: Objective) -> dict[str, Any]:
    """A found sequence as JSON: ids, token texts, text, values, and the decoded text re-tokenized."""
    text = tokenizer.decode(found.ids)
    retok = tokenizer(text, add_special_tokens=False)["input_ids"] or found.ids
    again = objective.score(torch.tensor([retok]))
    return {**asdict(found), "tokens": [tokenizer.decode([t]) for t in found.ids], "text": text,
            "retokenized_ids": retok, "retokenized_activation": float(again.activation[0])}


def dataset_examples(index_dir: Path, feature: int, k: int, tokenizer: Any) -> tuple[list[dict[str, Any]], str]:
    """The feature's ``k`` strongest dataset examples from the index (text with «token»), and a note
    saying why there are none when the index is absent."""
    from . import tables
    from .index import FeatureIndex

    if k == 0:
        return [], "not asked for (--examples 0)"
    if not (index_dir / layout.INDEX_META_FILE).exists():
        return [], f"no complete index at {index_dir}"
    idx = FeatureIndex(index_dir, tokenizer=tokenizer)
    store = idx.meta.get("activation_store")
    context = bool(store) and Path(store).exists()
    top = idx.top(feature, k, context=context)
    maxes = tables.max_activations(index_dir, [feature]) or {}
    rows = [{"value": ex.value, "text": ex.text, "row": ex.row} for ex in top]
    return rows, "" if maxes.get(feature, 0.0) > 0 else "the feature never fires on the indexed tokens"


def maximise_feature(model: Any, tokenizer: Any, sae: Any, feature: int, cfg: MaximiseConfig,
                     index_dir: Path | None = None) -> dict[str, Any]:
    """GCG (and the random baseline) for one feature; the result as the JSON the file holds."""
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 62)
    if cfg.length + 1 > positions:
        raise ValueError(f"--length {cfg.length} plus the BOS token exceeds the model's {positions} positions")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    objective = Objective(model, sae, feature, bos, cfg.position, cfg.fluency, cfg.batch_size)
    allowed = allowed_tokens(tokenizer, objective.embed.shape[0])
    start = time.perf_counter()
    gcg = run_searches(objective, allowed, cfg, gcg=True)
    gcg_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rand = run_searches(objective, allowed, cfg, gcg=False) if cfg.baseline else []
    examples, note = dataset_examples(index_dir, feature, cfg.examples, tokenizer) if index_dir else ([], "no index")
    return {
        "format": MAXIMISE_FORMAT, "feature": int(feature), "hook": sae.cfg.hook_name,
        "model": str(getattr(sae.cfg, "model_name", "") or ""),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("sae", "out", "feature", "device", "model")},
        "evaluations_per_search": cfg.restarts * (1 + cfg.steps * cfg.candidates),
        "gcg": [_describe(f, tokenizer, objective) for f in gcg], "gcg_seconds": gcg_seconds,
        "random": [_describe(f, tokenizer, objective) for f in rand],
        "random_seconds": time.perf_counter() - start if rand else None,
        "dataset_top": examples, "dataset_note": note,
    }


# -- the verb --------------------------------------------------------------------------------------
def output_dir(cfg: MaximiseConfig) -> Path:
    """``--out``, else the SAE's maximise folder (:func:`saecore.run.maximise_dir`)."""
    return cfg.out if cfg.out is not None else layout.maximise_dir(cfg.sae)


def summary_line(result: dict[str, Any]) -> str:
    """One line per feature: the best activation of GCG, of random search, and of the dataset."""
    best = result["gcg"][0]
    rand = f"{result['random'][0]['activation']:.4g}" if result["random"] else "-"
    data = f"{result['dataset_top'][0]['value']:.4g}" if result["dataset_top"] else "-"
    return (f"feature {result['feature']}: GCG {best['activation']:.4g} {best['text']!r} "
            f"(re-tokenized {best['retokenized_activation']:.4g}); random search {rand}; "
            f"top dataset example {data}; {result['gcg_seconds']:.1f} s")


def cli_configure(parser: Any) -> None:
    """Options of ``saecore maximise``."""
    add_arguments(parser, MaximiseConfig)


def _load(cfg: MaximiseConfig) -> tuple[Any, Any, Any]:
    from .interventions import check_features
    from .sae import SAE
    from .sae_model import load_model_for, model_device

    sae = SAE.load(cfg.sae).eval()
    check_features(sae, cfg.feature)  # before the model load: a bad id costs no model load
    model, tokenizer = load_model_for(sae, cfg.model, cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the one-hot input only
    return model, tokenizer, sae.to(model_device(model))


def maximise(cfg: MaximiseConfig, loaded: tuple[Any, Any, Any] | None = None) -> list[Path]:
    """Run every ``cfg.feature`` and write ``F.json`` for each into :func:`output_dir`; returns the paths."""
    model, tokenizer, sae = loaded if loaded is not None else _load(cfg)
    out = output_dir(cfg)
    index_dir = layout.sae_index_dir(cfg.sae)
    paths = []
    for feature in cfg.feature:
        result = maximise_feature(model, tokenizer, sae, feature, cfg, index_dir)
        path = out / layout.maximise_file(feature)
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        print(summary_line(result))
        print(f"wrote {path}", file=sys.stderr)
        paths.append(path)
    return paths


def cli_run(args: Any) -> int:
    """Run ``saecore maximise``: synthetic max-activating text for each ``--feature``."""
    maximise(from_args(MaximiseConfig, args))
    return 0


__all__: Sequence[str] = ["MaximiseConfig", "Objective", "allowed_tokens", "maximise", "maximise_feature", "search"]
