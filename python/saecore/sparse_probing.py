"""SAEBench's sparse-probing eval on classification tasks built from the offline corpora.

SAEBench (``sae_bench/evals/sparse_probing``): each dataset has a few classes; each class is a one-vs-rest
binary task (positives: the class's texts; negatives: an equal number drawn evenly from the other
classes). A text's representation is the mean over its tokens (BOS and padding left out) of the residual
stream at the SAE's hook, or of the SAE's latents on those tokens. Probes: a logistic regression on all
dimensions, and for each k a logistic regression on the k dimensions with the largest
|mean(positive) − mean(negative)| on the training set. Accuracy is averaged over a dataset's classes,
then over datasets.

Datasets (SAEBench's need the hub; these are what the machine holds offline):

* ``corpus-source``: which built-in corpus a passage comes from: Shakespeare, Python's pydoc topics, Debian
  fortunes (the stand-in for SAEBench's github-code and europarl language tasks: style and domain).
* ``fortunes-topic``: which of five fortunes files (computers, politics, science, work, art) an entry comes
  from (the stand-in for ag_news / bias_in_bios: topic within one genre, harder).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import corpus as corpus_mod
from .hooks import run_to_hooks
from .probes import k_sparse_accuracy

EVAL_TYPE_ID = "sparse_probing"
DATASETS = ("corpus-source", "fortunes-topic")
FORTUNE_TOPICS = ("computers", "politics", "science", "work", "art")
PASSAGE_CHARS = (100, 600)
"""A passage: 100 to 600 characters (shorter fortunes are dropped, longer text is cut)."""


def _passages(docs: Any, limit: int) -> list[str]:
    """Up to ``limit`` passages of PASSAGE_CHARS from the documents, in order."""
    lo, hi = PASSAGE_CHARS
    out: list[str] = []
    for doc in docs:
        text = " ".join(doc.split())
        for start in range(0, len(text), hi):
            piece = text[start : start + hi]
            if len(piece) >= lo:
                out.append(piece)
        if len(out) >= limit:
            break
    return out


def _fortune_entries(topic: str) -> list[str]:
    folder = corpus_mod.fortunes_dir()
    if folder is None or not (folder / topic).is_file():
        raise ValueError(f"sparse probing dataset 'fortunes-topic': the Debian fortunes file {topic!r} is unavailable")
    text = (folder / topic).read_text(encoding="utf-8", errors="replace")
    return [e.strip("\n") for e in text.split("\n%\n")]


def dataset_texts(name: str, per_class: int) -> dict[str, list[str]]:
    """Class -> at least ``per_class`` passages of one built-in dataset (a pool to sample from)."""
    pool = 4 * per_class  # read a few times what is needed, so the seeded sample spreads over the source
    if name == "corpus-source":
        sources: dict[str, Callable[[], Any]] = {c: (lambda c=c: iter(corpus_mod.load(c)))
                                                 for c in ("shakespeare", "pydoc", "fortunes")}
    elif name == "fortunes-topic":
        sources = {t: (lambda t=t: iter(_fortune_entries(t))) for t in FORTUNE_TOPICS}
    else:
        raise ValueError(f"unknown sparse probing dataset {name!r}; choose from {', '.join(DATASETS)}")
    out = {}
    for cls, docs in sources.items():
        out[cls] = _passages(docs(), pool)
        if len(out[cls]) < per_class:
            raise ValueError(f"sparse probing dataset {name!r}: class {cls!r} has {len(out[cls])} passages, "
                             f"fewer than the {per_class} asked for (lower --probe-train/--probe-test)")
    return out


def split_classes(texts: dict[str, list[str]], n_train: int, n_test: int, seed: int) -> tuple[dict, dict]:
    """Seeded per-class train/test samples (disjoint)."""
    rng = random.Random(seed)
    train, test = {}, {}
    for cls, items in texts.items():
        picked = rng.sample(items, n_train + n_test)
        train[cls], test[cls] = picked[:n_train], picked[n_train:]
    return train, test


def one_vs_rest(acts: dict[str, np.ndarray], cls: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SAEBench's binary task for ``cls``: its rows (label 1), and ceil(n/m) rows drawn from each of the m
    other classes (label 0)."""
    pos = acts[cls]
    others = [k for k in acts if k != cls]
    per_other = math.ceil(len(pos) / len(others))
    neg = np.concatenate([acts[k][rng.permutation(len(acts[k]))[:per_other]] for k in others])
    return np.concatenate([pos, neg]), np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]).astype(np.int64)


def _tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T] ids, [B, T] mask of the tokens to pool)``: BOS + the text's first tokens, right-padded."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[bos, *tokenizer(t, add_special_tokens=False)["input_ids"][: context_length - 1]] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), bos, dtype=torch.long)
    pool = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        pool[i, 1 : len(r)] = True
    return ids, pool


@torch.no_grad()
def pooled_activations(
    model: Any, tokenizer: Any, sae: Any, texts: Sequence[str], context_length: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled residual ``[n, d]`` and mean-pooled SAE latents ``[n, d_sae]`` of each text."""
    dev = next(model.parameters()).device
    hook = sae.cfg.hook_name
    resid, latents = [], []
    for i in range(0, len(texts), batch_size):
        ids, pool = _tokenize(tokenizer, texts[i : i + batch_size], context_length)
        acts = run_to_hooks(model, ids.to(dev), [hook])[hook].float()  # right padding: causal, so harmless
        mask = pool.to(acts.device)[..., None].float()  # (B, T, 1)
        count = mask.sum(1)
        resid.append((acts * mask).sum(1) / count)
        f = sae.encode(acts.reshape(-1, acts.shape[-1]).to(sae.device)).reshape(*acts.shape[:2], -1)
        latents.append((f * mask.to(f.device)).sum(1) / count.to(f.device))
    return torch.cat(resid).double().cpu().numpy(), torch.cat(latents).double().cpu().numpy()


def probe_class(train: dict, test: dict, cls: str, ks: Sequence[int], seed: int) -> dict[str, float]:
    """Every probe's test accuracy for one class's one-vs-rest task (``train``/``test``: class -> (resid,
    latents))."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for which, col in (("llm", 0), ("sae", 1)):
        xtr, ytr = one_vs_rest({k: v[col] for k, v in train.items()}, cls, rng)
        xte, yte = one_vs_rest({k: v[col] for k, v in test.items()}, cls, rng)
        out[f"{which}_test_accuracy"] = k_sparse_accuracy(xtr, ytr, xte, yte, None)
        for k in ks:
            out[f"{which}_top_{k}_test_accuracy"] = k_sparse_accuracy(xtr, ytr, xte, yte, k)
    return out


def _mean(records: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def run_dataset(
    name: str, texts: dict[str, list[str]], encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    n_train: int, n_test: int, ks: Sequence[int], seed: int,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over classes, per class) accuracies of one dataset; ``encode`` maps texts to pooled
    (residual, latents)."""
    train_txt, test_txt = split_classes(texts, n_train, n_test, seed)
    train = {c: encode(t) for c, t in train_txt.items()}
    test = {c: encode(t) for c, t in test_txt.items()}
    per_class = {c: probe_class(train, test, c, ks, seed) for c in texts}
    return _mean(list(per_class.values())), per_class


def metrics_from(per_dataset: dict[str, dict[str, float]], ks: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """SAEBench's categories: the mean over datasets of each probe's accuracy (k values not run: null)."""
    mean = _mean(list(per_dataset.values()))
    llm: dict[str, float | None] = {"llm_test_accuracy": mean["llm_test_accuracy"]}
    sae: dict[str, float | None] = {"sae_test_accuracy": mean["sae_test_accuracy"]}
    for k in (1, 2, 5, 10, 20, 50, 100):
        llm[f"llm_top_{k}_test_accuracy"] = mean.get(f"llm_top_{k}_test_accuracy")
        sae[f"sae_top_{k}_test_accuracy"] = mean.get(f"sae_top_{k}_test_accuracy")
    return {"llm": llm, "sae": sae}


def load_datasets(datasets: Sequence[str], per_class: int) -> dict[str, dict[str, list[str]]]:
    """Dataset -> class -> passages (cheap; lets a caller fail on a bad dataset before any model runs)."""
    if not datasets:
        raise ValueError("sparse probing: no dataset named")
    return {name: dataset_texts(name, per_class) for name in datasets}


def sparse_probing(
    model: Any, tokenizer: Any, sae: Any, *, datasets: Sequence[str] = DATASETS, n_train: int = 100,
    n_test: int = 50, ks: Sequence[int] = (1, 2, 5), context_length: int = 128, seed: int = 42,
    texts: dict[str, dict[str, list[str]]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """``(eval_result_metrics, eval_result_details, per-class results)`` of the sparse-probing eval on the
    built-in datasets; ``n_train``/``n_test`` passages per class (``texts``: :func:`load_datasets`'s)."""
    texts = texts if texts is not None else load_datasets(datasets, n_train + n_test)
    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return pooled_activations(model, tokenizer, sae, texts, context_length)

    per_dataset, details, per_class = {}, [], {}
    for name in datasets:
        per_dataset[name], per_class[name] = run_dataset(name, texts[name], encode, n_train, n_test, ks, seed)
        details.append({"dataset_name": name, **metrics_from({name: per_dataset[name]}, ks)["llm"],
                        **metrics_from({name: per_dataset[name]}, ks)["sae"]})
    return metrics_from(per_dataset, ks), details, per_class
