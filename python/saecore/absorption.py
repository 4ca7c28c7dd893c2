"""SAEBench's feature-absorption eval (first letters), scaled down to a sample of the vocabulary.

Following ``sae_bench/evals/absorption`` (Chanin et al.'s metric, with Till's absorption fraction):

1. Words: single tokens of the model's vocabulary made of letters only (an optional leading space). Each
   is put in an in-context prompt, 10 examples ``"{word} has the first letter: X"`` of the same split, then
   ``"{word} has the first letter:"``; the residual at the word (token position −6) is read at the SAE's hook.
   The words are split 80/20 into train and test.
2. A 26-way linear probe (one logistic output per letter; BCE with pos_weight, Adam 50 epochs, lr 1e-2
   decayed to 1e-5, weight decay 1e-4) on the residual: the ground-truth letter direction. A letter is
   evaluated only when this probe's test F1 exceeds 0.6.
3. k-sparse probes on the SAE latents: an L1-penalised 26-way probe on the latents (l1 0.01) ranks them; for
   k = 1..10 the k highest-weighted latents of a letter get a class-balanced logistic regression. The
   letter's *main latents* are those of the largest k reached while the test F1 keeps rising by more than
   0.03 per step (SAEBench's feature-split rule).
4. For each test word the probe classifies correctly (a probe true positive), with p the unit probe
   direction, a = x·p the residual's projection, and each latent's projection fᵢ·cos(p, W_dec,i):
   * absorption fraction: 0 when the main latents' projection reaches a, or the largest (≤ 3) positive
     projections of other latents with cos ≥ 0.1 sum to under 0.4·a; 1 when the main latents' projection
     is ≤ 0; else min(absorbers, a − main) / (min(absorbers, a − main) + main), clipped to [0, 1];
   * full absorption: no main latent fires, a > 0, and the top-projecting latent has cos ≥ 0.025 and a
     projection ≥ 0.4·a.
   Per letter, both are averaged over its probe true positives; the scores are the means over letters.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .hooks import run_to_hooks
from .probes import LinearProbe, f1_score, fit_logistic, train_multi_probe

EVAL_TYPE_ID = "absorption_first_letter"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPT_TEMPLATE = "{word} has the first letter:"
PROMPT_TOKEN_POS = -6
ICL_EXAMPLES = 10
# SAEBench's thresholds (feature_absorption.py, eval_config.py).
FULL_ABSORPTION_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
TOP_PROJECTION_FEATS = 10
EPS = 1e-8
SAEBENCH_BATCH = 4096  # its probe-training batch size


def alpha_tokens(tokenizer: Any) -> list[tuple[str, int]]:
    """(text, id) of every vocabulary token made of ASCII letters only, after an optional leading space."""
    out = []
    for token, tid in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = tokenizer.convert_tokens_to_string([token])
        core = word.removeprefix(" ")
        if core and core.isascii() and core.isalpha():
            out.append((word, tid))
    return out


def first_letter_class(word: str) -> int:
    return LETTERS.index(word.strip()[0].lower())


def build_prompt(word: str, examples: Sequence[str], rng: random.Random) -> str:
    """SAEBench's ICL prompt (separator prepended, examples not containing the word)."""
    pool = [e for e in examples if e != word]
    shots = rng.sample(pool, min(ICL_EXAMPLES, len(pool)))
    lines = [PROMPT_TEMPLATE.format(word=e) + " " + e.strip()[0].upper() for e in shots]
    return "\n" + "\n".join([*lines, PROMPT_TEMPLATE.format(word=word)])


@torch.no_grad()
def word_activations(
    model: Any, tokenizer: Any, hook: str, words: Sequence[tuple[str, int]], seed: int, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """``(residual [n, d] at each word's token, kept [n] bool)``; a word whose prompt does not put its own
    token at position −6 (tokenizer merges) is not kept."""
    rng = random.Random(seed)
    texts = [w for w, _ in words]
    dev = next(model.parameters()).device
    acts, kept = [], []
    for i in range(0, len(words), batch_size):
        chunk = words[i : i + batch_size]
        rows = [tokenizer(build_prompt(w, texts, rng), add_special_tokens=False)["input_ids"] for w, _ in chunk]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)  # right padding: earlier positions never see it
        out = run_to_hooks(model, ids.to(dev), [hook])[hook].float().cpu()
        for j, (r, (_, tid)) in enumerate(zip(rows, chunk)):
            pos = len(r) + PROMPT_TOKEN_POS
            kept.append(r[pos] == tid)
            acts.append(out[j, pos])
    return torch.stack(acts).double().numpy(), np.array(kept, dtype=bool)


def feature_split(f1_by_k: Sequence[float], feats_by_k: Sequence[Sequence[int]], jump: float = 0.03) -> list[int]:
    """SAEBench's rule: the latents of the largest k reached while F1 rises by more than ``jump`` per step."""
    best, split = -100.0, []
    for f1, feats in zip(f1_by_k, feats_by_k):
        if f1 <= best + jump:
            break
        best, split = f1, list(feats)
    return split


@dataclass
class WordAbsorption:
    fraction: float
    full: bool


def word_absorption(latents: np.ndarray, cos: np.ndarray, probe_proj: float, main: Sequence[int]) -> WordAbsorption:
    """SAEBench's absorption fraction and full-absorption test for one word (``latents`` [d_sae], ``cos``
    the cosine of each decoder row with the probe, ``probe_proj`` the residual's projection)."""
    proj = latents * cos
    main_proj = float(proj[list(main)].sum())
    others = np.ones(len(proj), dtype=bool)
    others[list(main)] = False
    others &= (cos >= FRACTION_COS) & (proj > 0)
    absorbers = float(np.sort(proj[others])[::-1][:MAX_ABSORBERS].sum())
    if main_proj >= probe_proj or absorbers / probe_proj < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, probe_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(np.argsort(-proj, kind="stable")[0])
    full = (all(latents[m] < EPS for m in main) and cos[top] >= FULL_ABSORPTION_COS and probe_proj >= 0
            and proj[top] / probe_proj >= PROJECTION_SHARE)
    return WordAbsorption(fraction, bool(full))


def letter_absorption(
    latents: np.ndarray, resid: np.ndarray, probe_dir: np.ndarray, W_dec: np.ndarray, main: Sequence[int]
) -> dict[str, Any]:
    """Absorption over one letter's probe true positives (rows of ``latents``/``resid``)."""
    unit = probe_dir / np.linalg.norm(probe_dir)
    cos = (W_dec @ unit) / np.linalg.norm(W_dec, axis=1).clip(min=1e-12)
    words = [word_absorption(lat, cos, float(x @ unit), main) for lat, x in zip(latents, resid)]
    n = len(words)
    return {"mean_absorption_fraction": sum(w.fraction for w in words) / n if n else 0.0,
            "full_absorption_rate": sum(w.full for w in words) / n if n else 0.0,
            "num_full_absorption": sum(w.full for w in words), "num_probe_true_positives": n,
            "num_split_features": len(main)}


def k_sparse_f1(
    train_lat: np.ndarray, y_train: np.ndarray, test_lat: np.ndarray, y_test: np.ndarray, ranking: torch.Tensor,
    letter: int, max_k: int,
) -> tuple[list[float], list[list[int]]]:
    """Test F1 and latents of the k-sparse probes of one letter, k = 1..max_k (``ranking``: the L1 probe's
    weights [d_sae, 26])."""
    f1s, feats = [], []
    for k in range(1, max_k + 1):
        ids = ranking[:, letter].topk(k).indices.numpy()
        probe = fit_logistic(train_lat[:, ids], y_train == letter, balanced=True, max_iter=500)
        f1s.append(f1_score(y_test == letter, probe.score(test_lat[:, ids])[:, 0].numpy() > 0))
        feats.append(ids.tolist())
    return f1s, feats


@dataclass
class AbsorptionConfig:
    n_words: int = 2000
    max_k: int = 10
    f1_jump: float = 0.03
    min_probe_f1: float = 0.6
    min_letters: int = 20
    seed: int = 42
    steps_per_epoch: int = 10
    """Probe-training steps per epoch: what SAEBench's batch of 4096 takes over the full letter vocabulary
    (80% of it); :func:`absorption` sets it from the tokenizer."""


def sample_words(tokenizer: Any, n_words: int, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A seeded sample of ``n_words`` letter tokens, split 80/20 into train and test (SAEBench's fraction)."""
    vocab = alpha_tokens(tokenizer)
    if len(vocab) < 10:
        raise ValueError(f"absorption: the tokenizer has only {len(vocab)} letter-only tokens; the eval needs words")
    picked = random.Random(seed).sample(vocab, min(n_words, len(vocab)))
    cut = int(0.8 * len(picked))
    return picked[:cut], picked[cut:]


def _multi_probe(x: np.ndarray, y: np.ndarray, steps_per_epoch: int, seed: int, **kw: Any) -> LinearProbe:
    # SAEBench's batch of 4096 over the whole letter vocabulary gives some steps per epoch; a sample of the
    # vocabulary keeps that step count (smaller batches) instead of taking one step per epoch.
    batch = max(1, -(-len(x) // steps_per_epoch))
    return train_multi_probe(torch.from_numpy(x), torch.from_numpy(y), len(LETTERS), batch_size=batch, seed=seed, **kw)


def _aggregate(details: list[dict[str, Any]]) -> dict[str, float | None]:
    def stats(key: str) -> tuple[float | None, float | None]:
        vals = [d[key] for d in details]
        return (statistics.mean(vals) if vals else None, statistics.stdev(vals) if len(vals) > 1 else None)

    (fa, fa_sd), (full, full_sd), (split, split_sd) = (
        stats("mean_absorption_fraction"), stats("full_absorption_rate"), stats("num_split_features"))
    return {"mean_absorption_fraction_score": fa, "mean_full_absorption_score": full,
            "mean_num_split_features": split, "std_dev_absorption_fraction_score": fa_sd,
            "std_dev_full_absorption_score": full_sd, "std_dev_num_split_features": split_sd}


def absorption_from_activations(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, encode: Any,
    W_dec: np.ndarray, cfg: AbsorptionConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Steps 2–4 on given residuals and letter ids (``encode``: residual rows -> SAE latents, NumPy)."""
    probe = _multi_probe(x_train, y_train, cfg.steps_per_epoch, cfg.seed)
    scores = probe.score(x_test).numpy()  # (n_test, 26)
    lat_train, lat_test = encode(x_train), encode(x_test)
    ranking = _multi_probe(lat_train, y_train, cfg.steps_per_epoch, cfg.seed, l1=0.01, weight_decay=1e-6).weight
    details, probe_f1 = [], {}
    for i, letter in enumerate(LETTERS):
        if not (y_train == i).any() or not (y_test == i).any():
            continue
        probe_f1[letter] = f1_score(y_test == i, scores[:, i] > 0)
        if probe_f1[letter] <= cfg.min_probe_f1:
            continue
        f1s, feats = k_sparse_f1(lat_train, y_train, lat_test, y_test, ranking, i, cfg.max_k)
        main = feature_split(f1s, feats, cfg.f1_jump)
        tp = (y_test == i) & (scores[:, i] > 0)
        rec = letter_absorption(lat_test[tp], x_test[tp], probe.weight[:, i].numpy(), W_dec, main)
        details.append({"first_letter": letter, **rec})
    unstructured = {"probe_f1": probe_f1, "letters_evaluated": len(details), "min_letters": cfg.min_letters,
                    "enough_letters": len(details) >= cfg.min_letters}
    return {"mean": _aggregate(details)}, details, unstructured


def absorption(
    model: Any, tokenizer: Any, sae: Any, cfg: AbsorptionConfig | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """``(eval_result_metrics, eval_result_details, unstructured)`` of the first-letter absorption eval."""
    cfg = dataclasses.replace(cfg or AbsorptionConfig(),
                              steps_per_epoch=-(-int(0.8 * len(alpha_tokens(tokenizer))) // SAEBENCH_BATCH))
    train_w, test_w = sample_words(tokenizer, cfg.n_words, cfg.seed)
    hook = sae.cfg.hook_name
    x_train, keep_train = word_activations(model, tokenizer, hook, train_w, cfg.seed)
    x_test, keep_test = word_activations(model, tokenizer, hook, test_w, cfg.seed + 1)
    y_train = np.array([first_letter_class(w) for w, _ in train_w])[keep_train]
    y_test = np.array([first_letter_class(w) for w, _ in test_w])[keep_test]

    @torch.no_grad()
    def encode(x: np.ndarray) -> np.ndarray:
        return sae.encode(torch.from_numpy(x).float().to(sae.device)).double().cpu().numpy()

    W_dec = sae.W_dec.detach().double().cpu().numpy()
    metrics, details, extra = absorption_from_activations(
        x_train[keep_train], y_train, x_test[keep_test], y_test, encode, W_dec, cfg)
    extra.update({"words_train": int(keep_train.sum()), "words_test": int(keep_test.sum()),
                  "words_dropped": int((~keep_train).sum() + (~keep_test).sum())})
    return metrics, details, extra
