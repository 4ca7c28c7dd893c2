"""``saecore explain RUN``: one short language-model explanation per feature, from its examples.

For each chosen feature the explainer reads up to ``n_examples`` contexts from the explain side of the
document split (:mod:`saecore.feature_contexts`: top-k examples first, then quantile samples), each one
line of text with the tokens where the feature fires marked ``<<like this>>`` and the snippet's
activation on a 1–10 scale of the feature's maximum (delphi's explainer prompt, shortened for small
models). Its reply is cut to one short phrase (:func:`parse_explanation`) and written to
``index/SAE/explanations.parquet``: feature, explanation, model, prompt_hash (the request's sha256,
also the name of its file in ``runs/NAME/llm_cache/``).

Every request goes through :class:`saecore.llm.CachedLM`, so rerunning costs nothing; rows of
features not explained this time are kept from an earlier table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import _atomic, tables
from .config import add_arguments, from_args, option, validate
from .feature_contexts import TOP_BIN, Context, ContextSource
from .llm import CachedLM, Chat, LLMOptions, LocalLM, OpenAIChatLM, make_backend
from .run import Run

EXPLAINER_SYSTEM = (
    "You explain what a hidden feature of a language model detects. You are shown text snippets in which "
    "the feature is active. In each snippet the tokens where it fires are marked like <<this>>, and the "
    "snippet starts with its activation from 1 (weak) to 10 (strongest). Reply with one short phrase that "
    "says what the marked tokens have in common, for example: the word \"the\" after a comma; names of "
    "cities; closing brackets in code. Give only the phrase."
)
MAX_WORDS = 25
SPLIT_KEY = b"saecore.explain"
NO_EXPLANATION = "(no explanation)"


@dataclass(kw_only=True)
class Targets:
    """Which SAEs and features (shared by ``saecore explain`` and ``saecore score``)."""

    sae: list[str] | None = option(None, append=True)
    """Only this SAE (an index folder name); unset: every indexed SAE."""
    feature: list[int] | None = option(None, append=True, ge=0)
    """Only this feature id (repeatable); unset: explain picks --limit features, score takes every explained one."""


@dataclass(kw_only=True)
class FeatureChoice(Targets):
    """How ``saecore explain`` picks features and splits their examples (score reads the split from its table)."""

    limit: int = option(32, ge=0, le=1 << 32)
    """Features to choose when no --feature is given (0: every feature that fires often enough)."""
    min_activations: int = option(20, ge=1)
    """A feature is chosen only if it fires on at least this many indexed tokens."""
    held_out_fraction: float = option(0.5, gt=0, lt=1)
    """Fraction of documents held out for scoring; the explainer never sees them (split by a hash of the document id)."""
    seed: int = option(0, ge=0, lt=1 << 63)
    """Seeds the feature choice, the document split and the non-activating contexts."""
    mark_fraction: float = option(0.25, ge=0, le=1)
    """Mark tokens whose activation is at least this fraction of the feature's maximum (and every example's own token)."""


@dataclass(kw_only=True)
class ExplainConfig(FeatureChoice, LLMOptions):
    """Options of ``saecore explain`` (the run directory aside)."""

    n_examples: int = option(10, ge=1, le=1000)
    """Examples shown to the explainer per feature."""
    max_new_tokens: int = option(40, ge=1, le=4096)
    """Longest reply generated per feature, in tokens."""

    def __post_init__(self) -> None:
        validate(self)


def chosen_features(source: ContextSource, choice: FeatureChoice) -> list[int]:
    """The explicit ``--feature`` ids (checked), else a seeded sample of the features that fire often enough."""
    if choice.feature:
        return sorted({source.check_feature(f) for f in choice.feature})
    counts = np.array([source.count(f) for f in range(source.d_sae)])
    eligible = np.flatnonzero(counts >= choice.min_activations)
    if choice.limit and len(eligible) > choice.limit:
        eligible = np.random.default_rng([choice.seed, 7]).choice(eligible, size=choice.limit, replace=False)
    return sorted(int(f) for f in eligible)


def explainer_prompt(contexts: list[Context], max_activation: float, mark_fraction: float) -> Chat:
    """The explainer's conversation for one feature's contexts."""
    lines = []
    for i, c in enumerate(contexts, 1):
        level = max(1, min(10, round(10 * c.value / max_activation))) if max_activation > 0 else 1
        lines.append(f"{i}. (activation {level}) {c.render(c.marked(mark_fraction * max_activation))}")
    user = "Snippets:\n" + "\n".join(lines) + "\n\nWhat do the marked tokens have in common?"
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


_LABEL = re.compile(r"^\s*(\[?\s*(explanation|answer|phrase|the phrase is|common pattern)\s*\]?\s*[:\-]\s*)", re.IGNORECASE)


def parse_explanation(reply: str) -> str:
    """One short phrase from a reply: its first line with content (a heading line ending in ":" is
    skipped when more follows), the **bold** part of a list item if it has one, else its first sentence;
    labels, list marks and quotes removed, at most MAX_WORDS words; :data:`NO_EXPLANATION` when nothing is left."""
    lines = [ln.strip() for ln in reply.splitlines() if ln.strip(" \t*-#>\"'`")]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    line = lines[0] if lines else ""
    line = re.sub(r"^(\d+[.)]|[-*•])\s+", "", _LABEL.sub("", line).strip())
    bold = re.match(r"^\*\*(.+?)\*\*", line)
    line = bold.group(1).rstrip(":") if bold else re.split(r"(?<=[a-z0-9\"')])\.\s", line)[0]
    line = _unquote(line.strip(" \t*_`.:")).strip(" \t.")
    words = line.split()
    return " ".join(words[:MAX_WORDS]) if words else NO_EXPLANATION


def _unquote(text: str) -> str:
    """``text`` without one pair of quotes around all of it."""
    for a, b in (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’")):
        if len(text) >= 2 and text.startswith(a) and text.endswith(b):
            return text[1:-1]
    return text


def model_label(llm: CachedLM) -> str:
    """The model as recorded in the tables: its name, and the server's URL for a remote one."""
    backend = llm.backend
    return f"{backend.name} @ {backend.url}" if isinstance(backend, OpenAIChatLM) else backend.name


def explain_sae(run: str | Path, sae: str, cfg: ExplainConfig, llm: CachedLM, progress: bool = True,
                tokenizer: Any = None) -> pa.Table:
    """Explain the chosen features of one SAE; writes ``explanations.parquet`` and returns it.

    ``tokenizer`` decodes the activation store's tokens (default: its model's tokenizer)."""
    source = ContextSource(run, sae, tokenizer=tokenizer)
    features = chosen_features(source, cfg)
    prompts: list[tuple[int, Chat]] = []
    for f, examples in zip(features, gather_explain_contexts(source, features, cfg)):
        if examples:
            prompts.append((f, explainer_prompt(examples, source.max_activation(f), cfg.mark_fraction)))
    started = time.time()
    replies, keys = llm.generate([p for _, p in prompts], cfg.max_new_tokens) if prompts else ([], [])
    if progress:
        print(f"saecore explain {sae}: {len(prompts)} features explained in {time.time() - started:.1f} s "
              f"({llm.hits} cached, {llm.misses} generated); {len(features) - len(prompts)} without "
              "explain-side examples", file=sys.stderr)
    rows = {"feature": [f for f, _ in prompts], "explanation": [parse_explanation(r) for r in replies],
            "model": [model_label(llm)] * len(prompts), "prompt_hash": keys}
    split = {"held_out_fraction": cfg.held_out_fraction, "seed": cfg.seed, "mark_fraction": cfg.mark_fraction,
             "n_examples": cfg.n_examples}
    old = tables.EXPLANATIONS.read(source.index_dir)
    if old is not None and _split_or_none(source.index_dir) != split:
        old = None  # explained under another split: those rows would leak scoring examples, so drop them
    table = _merge(old, rows).replace_schema_metadata({SPLIT_KEY: json.dumps(split, sort_keys=True).encode()})
    _atomic.write_parquet(table, tables.EXPLANATIONS.path(source.index_dir))
    tables.seal_file(tables.EXPLANATIONS.path(source.index_dir))
    return table


def _split_or_none(index_dir: Path) -> dict[str, Any] | None:
    try:
        return read_split(index_dir)
    except ValueError:
        return None


def read_split(index_dir: Path) -> dict[str, Any] | None:
    """The split (held_out_fraction, seed, mark_fraction) the explanations of ``index_dir`` were made with."""
    path = tables.EXPLANATIONS.path(index_dir)
    if not path.exists():
        return None
    raw = (pq.read_schema(path).metadata or {}).get(SPLIT_KEY)
    if raw is None:
        raise ValueError(f"{path}: no {SPLIT_KEY.decode()} metadata (the document split); rerun `saecore explain`")
    return dict(json.loads(raw))


def gather_explain_contexts(source: ContextSource, features: list[int], choice: Any) -> list[list[Context]]:
    """Each feature's explain-side contexts (one prefetch pass over the activation store for all of them)."""
    firing = {f: source.feature_rows(f) for f in features}
    picks = {f: source.select(f, n_explain=choice.n_examples, per_bin=0, n_negative=0,
                              held_out_fraction=choice.held_out_fraction, seed=choice.seed, firing=firing[f]).explain
             for f in features}
    source.reader.prefetch(e.row for exs in picks.values() for e in exs)
    return [source.contexts(f, picks[f], lambda e: TOP_BIN if e.rank is not None else int(e.bin or 0), firing[f])
            for f in features]


def _merge(old: pa.Table | None, rows: dict[str, list[Any]]) -> pa.Table:
    """The new rows plus an earlier table's rows of other features, sorted by feature."""
    new = tables.EXPLANATIONS.table(rows)
    if old is not None and old.num_rows:
        keep = ~np.isin(old.column("feature").to_numpy(), np.asarray(rows["feature"], dtype=np.int64))
        new = pa.concat_tables([old.filter(pa.array(keep)), new])
    return new.sort_by("feature")


def open_llm(run: str | Path, opts: LLMOptions, backend: LocalLM | OpenAIChatLM | None = None,
             progress: bool = False) -> CachedLM:
    """The cached backend of a run (its answers under ``runs/NAME/llm_cache``)."""
    return CachedLM(backend if backend is not None else make_backend(opts), Run(run).llm_cache, progress=progress)


def saes_of(run: str | Path, names: list[str] | None) -> list[str]:
    """The SAEs to work on: ``names`` (checked) or every indexed SAE of the run."""
    layout = Run(run)
    if not Path(run).is_dir():
        raise FileNotFoundError(f"{run}: no run directory here")
    have = layout.indexed_saes()
    for name in names or []:
        if name not in have:
            raise FileNotFoundError(f"{layout.index(name)}: no index for SAE {name!r} (have: {', '.join(have) or 'none'})")
    if not (names or have):
        raise FileNotFoundError(f"{layout.index_root}: no SAE index found; run `saecore index` first")
    return list(names or have)


def cli_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory (holds index/SAE/ tables)")
    add_arguments(parser, ExplainConfig)


def cli_run(args: argparse.Namespace) -> int:
    cfg = from_args(ExplainConfig, args)
    names = saes_of(args.run, cfg.sae)
    llm = open_llm(args.run, cfg, progress=True)
    for name in names:
        table = explain_sae(args.run, name, cfg, llm)
        print(f"{tables.EXPLANATIONS.path(Run(args.run).index(name))}: {table.num_rows} explanations")
    return 0
