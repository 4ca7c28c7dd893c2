"""``saecore score RUN``: how well each explanation predicts its feature, beside two baselines.

Every explained feature is scored on contexts from the held-out documents only (the explainer never
saw them; the split is read from ``explanations.parquet``, see :mod:`saecore.feature_contexts`):

* **detection** — the scorer reads each context (no marks) with the explanation and answers Yes/No:
  does the text contain what the explanation describes? Contexts: up to ``per_bin`` held-out samples
  from every activation bin (label 1) and ``n_negative`` windows where the feature is silent (label 0).
  Reported as balanced accuracy (Yes = probability of "Yes" above ½) and AUROC of P(Yes).
* **fuzzing** — ``n_fuzzing`` activating contexts, each shown twice: with the tokens where the feature
  fires marked ``<<…>>`` (label 1), and with as many randomly chosen other tokens marked (label 0):
  are the marked tokens what the explanation describes? Balanced accuracy and AUROC as above.
* **specificity** — the rubric of Scaling Monosemanticity (Templeton et al. 2024), paraphrased: the
  scorer rates each detection context, its own token marked, 0 (unrelated) … 3 (the explanation
  cleanly describes the marked token). Reported per activation bin (bin −1: silent contexts) and, per
  feature, as the mean rating on activating contexts minus the mean rating on silent ones (−3 … 3).

The local backend gives P(Yes) and the rating's distribution from the next-token logits; the
OpenAI-compatible backend from ``logprobs`` when the server returns them, else from the parsed answer
(then AUROC is computed from 0/1 scores). The rating used is the most probable digit;
``mean_expected_rating`` is the probability-weighted mean.

Each explanation is scored beside two baselines on the very same contexts: ``shuffled`` (another
explained feature's explanation, by a seeded derangement) and ``top_tokens`` (the explanation "the
tokens "a", "b", …": the most frequent activating tokens of the explain-side examples).

Writes, in ``index/SAE/``: ``autointerp_scores.parquet`` (feature × kind), ``specificity.parquet``
(feature × kind × bin), ``autointerp.json`` (means over features, the specificity curve, timings) and
``specificity.png`` (mean rating against activation level, one line per kind).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _atomic, tables
from .config import add_arguments, from_args, option, validate
from .errors import MissingDataError
from .explain import (
    Targets,
    gather_explain_contexts,
    model_label,
    open_llm,
    read_split,
    saes_of,
)
from .feature_contexts import NEGATIVE_BIN, Context, ContextSource
from .llm import CachedLM, Chat, LLMOptions
from .run import AUTOINTERP_SUMMARY_FILE, SPECIFICITY_PLOT, Run

KINDS = ("model", "shuffled", "top_tokens")
YES_NO = ("Yes", "No")
RATINGS = ("0", "1", "2", "3")
SUMMARY_FORMAT = "saecore.autointerp/1"
TOP_TOKENS = 5
"""Distinct tokens named by the ``top_tokens`` baseline."""

SCORER_SYSTEM = "You check whether a text matches a short description of a pattern. Answer Yes or No."
RUBRIC_SYSTEM = (
    "You rate how well a short description fits the token marked <<like this>> in a text. Ratings: "
    "0 = the description has nothing to do with the text; 1 = it relates to the text but not to the marked "
    "token, or only vaguely; 2 = it loosely fits the marked token or the words right around it; "
    "3 = it clearly describes the marked token. Answer with the number only."
)


@dataclass(kw_only=True)
class ScoreConfig(Targets, LLMOptions):
    """Options of ``saecore score`` (the run directory aside)."""

    per_bin: int = option(1, ge=1, le=1000)
    """Held-out activating contexts per activation bin (detection and specificity)."""
    max_activating: int = option(0, ge=0, le=100_000)
    """At most this many activating contexts per feature, spread over the bins strongest first (0: no cap)."""
    n_negative: int = option(10, ge=1, le=10_000)
    """Contexts where the feature is silent, per feature (detection and specificity)."""
    n_fuzzing: int = option(5, ge=0, le=1000)
    """Activating contexts shown correctly and randomly marked, per feature (fuzzing)."""
    baselines: bool = True
    """Also score the shuffled and top-tokens baseline explanations (--no-baselines skips them)."""

    def __post_init__(self) -> None:
        validate(self)


# ------------------------------------------------------------------------------------------------
# The arithmetic (held to independent references in tests/test_autointerp.py)
# ------------------------------------------------------------------------------------------------
def balanced_accuracy(labels: Any, predicted: Any) -> float:
    """Mean of the true-positive and true-negative rates; NaN when a class is absent."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    return float(0.5 * (p[y].mean() + (~p[~y]).mean()))


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting ½; NaN when
    a class is absent."""
    y, s = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    # Rank form of the Mann-Whitney U (average ranks for ties), so memory stays linear.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + b - 1) + 1
    u = ranks[y].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def rating_means(bins: Any, ratings: Any) -> dict[int, tuple[int, float]]:
    """Per bin: (number of ratings, their mean)."""
    b, r = np.asarray(bins, dtype=np.int64), np.asarray(ratings, dtype=np.float64)
    return {int(k): (int((b == k).sum()), float(r[b == k].mean())) for k in np.unique(b)}


def specificity_score(bins: Any, ratings: Any) -> float:
    """Mean rating on activating contexts minus mean rating on silent ones (NaN when a side is empty)."""
    b, r = np.asarray(bins, dtype=np.int64), np.asarray(ratings, dtype=np.float64)
    act, silent = r[b != NEGATIVE_BIN], r[b == NEGATIVE_BIN]
    if not len(act) or not len(silent):
        return float("nan")
    return float(act.mean() - silent.mean())


# ------------------------------------------------------------------------------------------------
# Prompts and baselines
# ------------------------------------------------------------------------------------------------
def detection_prompt(explanation: str, text: str) -> Chat:
    user = (f"Description: {explanation}\n\nText: {text}\n\n"
            "Does the text contain what the description says? Answer Yes or No.")
    return [{"role": "system", "content": SCORER_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_prompt(explanation: str, text: str) -> Chat:
    user = (f"Description: {explanation}\n\nSome tokens of this text are marked <<like this>>.\nText: {text}\n\n"
            "Are the marked tokens what the description says? Answer Yes or No.")
    return [{"role": "system", "content": SCORER_SYSTEM}, {"role": "user", "content": user}]


def rubric_prompt(explanation: str, text: str) -> Chat:
    user = f"Description: {explanation}\n\nText: {text}\n\nRating (0, 1, 2 or 3):"
    return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": user}]


def top_tokens_explanation(contexts: list[Context]) -> str:
    """``the tokens "a", "b" and "c"``: the most frequent activating tokens of ``contexts``."""
    counts = Counter(c.tokens[c.centre].strip() or repr(c.tokens[c.centre]) for c in contexts if c.tokens)
    names = [f'"{t}"' for t, _ in counts.most_common(TOP_TOKENS)]
    if not names:
        return "(no tokens)"
    return "the token " + names[0] if len(names) == 1 else "the tokens " + ", ".join(names[:-1]) + " and " + names[-1]


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (i → the next element of a random cycle); n ≥ 2."""
    perm = np.random.default_rng([seed, 11]).permutation(n)
    out = [0] * n
    for i in range(n):
        out[int(perm[i])] = int(perm[(i + 1) % n])
    return out


# ------------------------------------------------------------------------------------------------
# One SAE
# ------------------------------------------------------------------------------------------------
@dataclass
class FeatureCase:
    """One feature's held-out contexts and the explanations to score on them."""

    feature: int
    activating: list[Context]
    negative: list[Context]
    fuzzing: list[tuple[Context, list[int], int]]  # (context, marked tokens, label)
    explanations: dict[str, str]


def build_cases(source: ContextSource, explained: dict[int, str], split: dict[str, Any], cfg: ScoreConfig) -> list[FeatureCase]:
    """The held-out contexts of every explained feature (one prefetch pass over the activation store)."""
    features = sorted(explained)
    firing = {f: source.feature_rows(f) for f in features}
    seed, frac = int(split["seed"]), float(split["held_out_fraction"])
    sel = {f: source.select(f, n_explain=int(split["n_examples"]), per_bin=cfg.per_bin, n_negative=cfg.n_negative,
                            held_out_fraction=frac, seed=seed, firing=firing[f]) for f in features}
    negatives = source.negative_examples_for({f: s.negative_rows for f, s in sel.items()}, cfg.n_negative)
    explain_side = dict(zip(features, gather_explain_contexts(source, features, _ExplainSide(split))))
    source.reader.prefetch([e.row for s in sel.values() for e in s.scoring] + [e.row for exs in negatives.values() for e in exs])
    shuffled = derangement(len(features), seed) if len(features) > 1 else None
    cases = []
    for i, f in enumerate(features):
        act = source.contexts(f, _cap(sel[f].scoring, cfg.max_activating), lambda e: int(e.bin or 0), firing[f])
        neg = source.contexts(f, negatives[f], lambda e: NEGATIVE_BIN, firing[f])
        kinds = {"model": explained[f]}
        if cfg.baselines and shuffled is not None:
            kinds["shuffled"] = explained[features[shuffled[i]]]
        if cfg.baselines:
            kinds["top_tokens"] = top_tokens_explanation(explain_side[f])
        fuzz = _fuzzing_cases(act, cfg.n_fuzzing, float(split["mark_fraction"]) * source.max_activation(f), seed, f)
        cases.append(FeatureCase(f, act, neg, fuzz, kinds))
    return cases


def _cap(examples: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``examples`` (all when n is 0), evenly spread over the list."""
    if not n or len(examples) <= n:
        return examples
    return [examples[i] for i in np.unique(np.linspace(0, len(examples) - 1, n).round().astype(int))]


@dataclass
class _ExplainSide:
    """The explain settings a table recorded, shaped like the options gather_explain_contexts reads."""

    split: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.split[name]
        except KeyError:
            raise AttributeError(name) from None


def _fuzzing_cases(act: list[Context], n: int, threshold: float, seed: int, feature: int) -> list[tuple[Context, list[int], int]]:
    """Up to ``n`` activating contexts (spread over their values), each correctly and randomly marked."""
    if not act or n == 0:
        return []
    ordered = sorted(act, key=lambda c: -c.value)
    picks = [ordered[i] for i in np.unique(np.linspace(0, len(ordered) - 1, min(n, len(ordered))).round().astype(int))]
    rng = np.random.default_rng([seed, feature, 2])
    out = []
    for c in picks:
        right = c.marked(threshold)
        others = [i for i, t in enumerate(c.tokens) if i not in right and t.strip()]
        if not others:
            continue
        wrong = sorted(int(i) for i in rng.choice(others, size=min(len(right), len(others)), replace=False))
        out += [(c, right, 1), (c, wrong, 0)]
    return out


def _requests(cases: list[FeatureCase]) -> tuple[list[Chat], list[tuple], list[Chat], list[tuple]]:
    """Yes/No chats (detection, fuzzing) and rating chats, each with its (feature, kind, test, label or bin)."""
    yn: list[Chat] = []
    yn_keys: list[tuple] = []
    rub: list[Chat] = []
    rub_keys: list[tuple] = []
    for case in cases:
        for kind, text in case.explanations.items():  # one explanation's prompts in a row: they share a prefix
            for c in case.activating + case.negative:
                yn.append(detection_prompt(text, c.render()))
                yn_keys.append((case.feature, kind, "detection", int(c.value > 0)))
            for c, marks, label in case.fuzzing:
                yn.append(fuzzing_prompt(text, c.render(marks)))
                yn_keys.append((case.feature, kind, "fuzzing", label))
            for c in case.activating + case.negative:
                rub.append(rubric_prompt(text, c.render([c.centre])))
                rub_keys.append((case.feature, kind, c.bin, c.value))
    return yn, yn_keys, rub, rub_keys


def _per_feature_rows(cases: list[FeatureCase], yn: list[Any], yn_keys: list[tuple], rub: list[Any],
                      rub_keys: list[tuple]) -> tuple[dict[str, list], dict[str, list]]:
    """The scores table (feature × kind) and the specificity table (feature × kind × bin) as columns."""
    answers: dict[tuple, list[tuple[int, float]]] = {}
    for key, choice in zip(yn_keys, yn):
        answers.setdefault(key[:3], []).append((key[3], choice.probs[0]))
    ratings: dict[tuple, list[tuple[int, float, int, float]]] = {}
    for key, choice in zip(rub_keys, rub):
        expected = sum(i * p for i, p in enumerate(choice.probs))
        ratings.setdefault(key[:2], []).append((int(key[2]), float(key[3]), choice.best, expected))
    scores: dict[str, list] = {name: [] for name in tables.AUTOINTERP_SCORES.schema.names}
    spec: dict[str, list] = {name: [] for name in tables.SPECIFICITY.schema.names}
    for case in cases:
        for kind, text in case.explanations.items():
            det = np.array(answers.get((case.feature, kind, "detection"), []), dtype=np.float64).reshape(-1, 2)
            fuz = np.array(answers.get((case.feature, kind, "fuzzing"), []), dtype=np.float64).reshape(-1, 2)
            rated = np.array(ratings.get((case.feature, kind), []), dtype=np.float64).reshape(-1, 4)
            row = {"feature": case.feature, "kind": kind, "explanation": text,
                   "detection_accuracy": balanced_accuracy(det[:, 0], det[:, 1] > 0.5),
                   "detection_auroc": auroc(det[:, 0], det[:, 1]),
                   "fuzzing_accuracy": balanced_accuracy(fuz[:, 0], fuz[:, 1] > 0.5),
                   "fuzzing_auroc": auroc(fuz[:, 0], fuz[:, 1]),
                   "specificity": specificity_score(rated[:, 0], rated[:, 2]),
                   "n_activating": len(case.activating), "n_negative": len(case.negative),
                   "n_fuzzing": len(case.fuzzing) // 2}
            for name, value in row.items():
                scores[name].append(value)
            for b in sorted({int(x) for x in rated[:, 0]}):
                sel = rated[rated[:, 0] == b]
                for name, value in (("feature", case.feature), ("kind", kind), ("bin", b), ("lo", sel[:, 1].min()),
                                    ("hi", sel[:, 1].max()), ("n", len(sel)), ("mean_rating", sel[:, 2].mean()),
                                    ("mean_expected_rating", sel[:, 3].mean())):
                    spec[name].append(value)
    return scores, spec


def summarise(scores: dict[str, list], spec: dict[str, list], sample_bins: int) -> dict[str, Any]:
    """Means over features per kind, and the specificity curve: per kind and bin, the mean rating over
    every rated context (bin -1 at activation level 0, bin b at the centre of [b, b+1) / sample_bins)."""
    kinds = [k for k in KINDS if k in set(scores["kind"])]
    metrics = ("detection_accuracy", "detection_auroc", "fuzzing_accuracy", "fuzzing_auroc", "specificity")
    out: dict[str, Any] = {"kinds": {}, "specificity_curve": {}}
    kind_col = np.asarray(scores["kind"], dtype=object)
    for k in kinds:
        sel = kind_col == k
        out["kinds"][k] = {"features": int(sel.sum()), **{
            m: _finite_or_none(np.nanmean(np.asarray(scores[m], dtype=np.float64)[sel]) if sel.any() else np.nan)
            for m in metrics}}
        sk = np.asarray(spec["kind"], dtype=object) == k
        bins, n, mean = (np.asarray(spec[c])[sk] for c in ("bin", "n", "mean_rating"))
        curve = []
        for b in sorted({int(x) for x in bins}):
            at = bins == b
            level = 0.0 if b == NEGATIVE_BIN else (b + 0.5) / sample_bins
            curve.append({"bin": b, "activation_level": level, "contexts": int(n[at].sum()),
                          "mean_rating": float((mean[at] * n[at]).sum() / n[at].sum())})
        out["specificity_curve"][k] = curve
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def plot_specificity(curve: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Mean 0-3 rating against activation level (fraction of the feature's max), one line per kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))  # an explicit Agg canvas: the process-wide matplotlib backend is never touched
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for kind, points in curve.items():
        if points:
            ax.plot([p["activation_level"] for p in points], [p["mean_rating"] for p in points], "-o", label=kind)
    ax.set(xlabel="activation level (fraction of the feature's max; 0 = silent)", ylabel="mean rating (0-3)",
           ylim=(-0.05, 3.05), title=title)
    ax.legend(fontsize=8)
    with _atomic.atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def score_sae(run: str | Path, sae: str, cfg: ScoreConfig, llm: CachedLM, progress: bool = True,
              tokenizer: Any = None) -> dict[str, Any]:
    """Score the explained features of one SAE; writes the tables, the summary and the plot; returns the summary.

    ``tokenizer`` decodes the activation store's tokens (default: its model's tokenizer)."""
    started = time.time()
    source = ContextSource(run, sae, tokenizer=tokenizer)
    explained = _explained(source.index_dir, cfg.feature)
    split = read_split(source.index_dir)
    assert split is not None  # _explained found the table
    cases = build_cases(source, explained, split, cfg)
    scorable = [c for c in cases if c.activating and c.negative]
    yn_chats, yn_keys, rub_chats, rub_keys = _requests(scorable)
    asked = time.time()
    yn = llm.choose(yn_chats, YES_NO) if yn_chats else []
    rub = llm.choose(rub_chats, RATINGS) if rub_chats else []
    scores, spec = _per_feature_rows(scorable, yn, yn_keys, rub, rub_keys)
    index_dir = source.index_dir
    tables.AUTOINTERP_SCORES.write(tables.AUTOINTERP_SCORES.table(scores), tables.AUTOINTERP_SCORES.path(index_dir))
    tables.SPECIFICITY.write(tables.SPECIFICITY.table(spec), tables.SPECIFICITY.path(index_dir))
    seconds = time.time() - started
    summary = {"format": SUMMARY_FORMAT, "sae": sae, "scorer": model_label(llm),
               "explainer": sorted(set(tables.EXPLANATIONS.read(index_dir).column("model").to_pylist())),
               "features_scored": len(scorable), "skipped": [c.feature for c in cases if c not in scorable],
               "split": split, "options": {"per_bin": cfg.per_bin, "max_activating": cfg.max_activating,
                                           "n_negative": cfg.n_negative,
                                           "n_fuzzing": cfg.n_fuzzing},
               "requests": {"yes_no": len(yn_chats), "rating": len(rub_chats), "soft": all(c.soft for c in yn + rub)},
               "seconds": {"total": round(seconds, 2), "model": round(time.time() - asked, 2)},
               **summarise(scores, spec, int(source.meta.get("sample_bins", 10)))}
    _atomic.write_json(index_dir / AUTOINTERP_SUMMARY_FILE, summary)
    plot_specificity(summary["specificity_curve"], index_dir / SPECIFICITY_PLOT, f"{sae}: specificity by activation level")
    if progress:
        print(f"saecore score {sae}: {len(scorable)} features, {len(yn_chats) + len(rub_chats)} questions in "
              f"{seconds:.1f} s ({llm.hits} cached, {llm.misses} asked)", file=sys.stderr)
    return summary


def _explained(index_dir: Path, only: list[int] | None) -> dict[int, str]:
    """feature → explanation from ``explanations.parquet`` (restricted to ``only``, each of which must be there)."""
    table = tables.EXPLANATIONS.read(index_dir)
    if table is None:
        raise MissingDataError(f"{tables.EXPLANATIONS.path(index_dir)}: missing; run `saecore explain` first")
    explained = dict(zip(table.column("feature").to_pylist(), table.column("explanation").to_pylist()))
    if only:
        missing = sorted(set(only) - set(explained))
        if missing:
            raise ValueError(f"features {missing} have no explanation in {tables.EXPLANATIONS.path(index_dir)}; "
                             "run `saecore explain` for them first")
        explained = {f: explained[f] for f in only}
    return {int(f): str(e) for f, e in explained.items()}


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory (holds index/SAE/ tables and explanations)")
    add_arguments(parser, ScoreConfig)


def cli_run(args: argparse.Namespace) -> int:
    cfg = from_args(ScoreConfig, args)
    names = saes_of(args.run, cfg.sae)
    for name in names:  # every SAE's explanations exist before a model is loaded
        _explained(Run(args.run).index(name), cfg.feature)
    llm = open_llm(args.run, cfg, progress=True)
    for name in names:
        s = score_sae(args.run, name, cfg, llm)
        for kind, m in s["kinds"].items():
            print(f"{name} {kind:>10}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()))
    return 0


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
