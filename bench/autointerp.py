"""Benchmark: model-free feature scores (token- and pair-simulator correlations), saecore vs pandas.

Synthetic data: N tokens in documents of ``--doc-len`` tokens (Zipf-distributed token ids over a
``--vocab`` vocabulary), D features with ~L nonzeros per token (Zipf feature frequencies, the same
generator as bench/index.py). Both methods compute, for every feature, the held-out Pearson correlation
of the token simulator and of the (previous token, token) simulator (definitions in
``saecore.token_scores``), from the same sums:

* saecore — one Rust pass over the on-disk feature store (read + CRC + zstd decode + sparse hash
  tables), all cores, ``saecore._native.token_scores``
* pandas  — a ``groupby([feature, key]).sum()`` of the nonzeros per side, merged with the per-key row
  counts, starting from the CSR arrays already in RAM (no I/O, no decompression)

The results are asserted equal (NaN pattern identical, ``rtol 1e-6``) before any time is reported.
Throughput: features/s = D / wall seconds and tokens/s = N / wall seconds; CPU seconds (all threads)
are printed too, as the steadier figure on a shared machine.

    python bench/autointerp.py                          # 200k tokens × 4096 features × 32 nnz/token
    python bench/autointerp.py --tokens 1000000 --features 16384

With ``--llm-run RUN`` it also times the language-model part on a real indexed run: ``explain`` then
``score`` (detection, fuzzing, rubric, both baselines) of ``--llm-features`` features with the built-in
SmolLM2-135M-Instruct, from an empty answer cache, and reports features explained+scored per minute.
The baseline beside it scores the same prompts again (fresh cache) with every prompt run in full
instead of running each batch's shared prefix once, and checks the two agree. The run is not written
to: its index folder is copied into a temporary run (the index records where its stores are).

    python bench/autointerp.py --no-model-free --llm-run runs/quickstart --llm-features 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from index import synth
from saecore import _native
from saecore.features import open_writer


def keys(n_tokens: int, vocab: int, doc_len: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (Zipf over the vocabulary), document ids and positions of ``n_tokens`` rows."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1))
    toks = np.searchsorted(cdf / cdf[-1], rng.random(n_tokens)).astype(np.int32)
    docs = (np.arange(n_tokens) // doc_len).astype(np.int64)
    pos = (np.arange(n_tokens) % doc_len).astype(np.int32)
    return toks, docs, pos


def mix64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def pearson(n: float, sx, sy, sxx, syy, sxy) -> np.ndarray:
    """The core's formula and constant-side guard, vectorised."""
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((sxy - sx * sy / n) / np.sqrt(vx * vy), -1, 1)
    return np.where((vx <= 1e-12 * sxx) | (vy <= 1e-12 * syy), np.nan, r)


def pandas_scores(csr, toks, docs, pos, d_sae: int, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The same scores by pandas groupby over the nonzeros (the baseline)."""
    row_ptr, feature, value = csr
    n = len(toks)
    held = (mix64(docs.view(np.uint64) ^ np.uint64(seed)) >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction
    linked = np.zeros(n, bool)
    linked[1:] = (docs[1:] == docs[:-1]) & (pos[1:] == pos[:-1] + 1)
    prev = np.where(linked, np.concatenate([[0], toks[:-1]]), -1).astype(np.int64)
    pair = ((prev + 1) << 32) | toks.astype(np.int64)
    rows = np.repeat(np.arange(n), np.diff(row_ptr))
    nz = pd.DataFrame({"f": feature, "v": value.astype(np.float64), "held": held[rows]})
    n_train, n_held = int((~held).sum()), int(held.sum())
    y = nz[nz.held].assign(v2=lambda t: t.v * t.v).groupby("f")[["v", "v2"]].sum().reindex(range(d_sae), fill_value=0.0)
    mu = nz[~nz.held].groupby("f").v.sum().reindex(range(d_sae), fill_value=0.0).to_numpy() / n_train
    out = {}
    for name, key in (("token_corr", toks.astype(np.int64)), ("pair_corr", pair)):
        counts = pd.DataFrame({"k": key, "held": held}).groupby(["k", "held"]).size().unstack(fill_value=0)
        counts = counts.reindex(columns=[False, True], fill_value=0)
        sums = nz.assign(k=key[rows]).groupby(["f", "k", "held"]).v.sum().unstack(fill_value=0.0)
        sums = sums.reindex(columns=[False, True], fill_value=0.0).reset_index()
        kr = counts.loc[sums.k]
        tr, ho = kr[False].to_numpy(), kr[True].to_numpy()
        f = sums.f.to_numpy()
        m = np.where(tr > 0, sums[False].to_numpy() / np.maximum(tr, 1), mu[f])
        seen = tr > 0
        sp = np.bincount(f[seen], ho[seen] * m[seen], d_sae)
        spp = np.bincount(f[seen], ho[seen] * m[seen] ** 2, d_sae)
        spa = np.bincount(f, sums[True].to_numpy() * m, d_sae)
        unseen = float(counts[True][counts[False] == 0].sum())
        out[name] = pearson(n_held, sp + unseen * mu, y.v.to_numpy(), spp + unseen * mu**2, y.v2.to_numpy(), spa)
    return out


def write(path: Path, csr, d_sae: int) -> None:
    row_ptr, feature, value = csr
    w = open_writer(path, d_sae, {"bench": "autointerp"}, value_dtype="float16", shard_rows=16384, threads=2)
    step = 1 << 16
    for start in range(0, len(row_ptr) - 1, step):
        stop = min(start + step, len(row_ptr) - 1)
        lo, hi = row_ptr[start], row_ptr[stop]
        w.append(row_ptr[start : stop + 1] - lo, feature[lo:hi], value[lo:hi])
    w.finish()


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (all threads of this process) over ``repeat`` runs;
    CPU time is the steadier figure on a shared, loaded machine."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best, best_cpu


def llm_part(run: Path, n_features: int, batch_size: int, device: str | None, contexts: tuple[int, int, int]) -> None:
    """Explain and score ``n_features`` features of every SAE of ``run`` with the built-in model; print timings."""
    import shutil

    from saecore import tables
    from saecore.explain import ExplainConfig, explain_sae, open_llm
    from saecore.llm import CachedLM, LocalLM
    from saecore.run import Run
    from saecore.scoring import ScoreConfig, score_sae

    backend = LocalLM(device=device, batch_size=batch_size)
    max_activating, n_negative, n_fuzzing = contexts
    score_cfg = ScoreConfig(per_bin=1, max_activating=max_activating, n_negative=n_negative, n_fuzzing=n_fuzzing,
                            batch_size=batch_size)
    print(f"\nLLM part: {backend.name} on {backend.model.device}, {torch.get_num_threads()} torch threads, batch {batch_size}; "
          f"per feature and explanation {max_activating} activating, {n_negative} silent contexts, {n_fuzzing} fuzzing pairs; "
          "explanation + both baselines; empty answer cache")
    print("| SAE | features | explain s (CPU s) | score s (CPU s) | features/min | score, full prompts s (CPU s) | prefix speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for sae in Run(run).indexed_saes():
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(Run(run).index(sae), Run(tmp).index(sae))
            for spec in (tables.EXPLANATIONS, tables.AUTOINTERP_SCORES, tables.SPECIFICITY):
                spec.path(Run(tmp).index(sae)).unlink(missing_ok=True)
            llm = open_llm(tmp, ExplainConfig(), backend=backend)
            (te, ce), table = _timed_once(explain_sae, tmp, sae, ExplainConfig(limit=n_features, batch_size=batch_size), llm)
            backend.share_prefix = True
            (ts, cs), shared = _timed_once(score_sae, tmp, sae, score_cfg, llm)
            backend.share_prefix = False
            plain_llm = CachedLM(backend, Path(tmp) / "plain-cache")
            (tp, cp), plain = _timed_once(score_sae, tmp, sae, score_cfg, plain_llm)
            backend.share_prefix = True
            for kind, m in shared["kinds"].items():  # the same questions give the same answers either way
                for name, v in m.items():
                    w = plain["kinds"][kind][name]
                    assert (v is None and w is None) or abs(v - w) < 0.02, (kind, name, v, w)
            n = shared["features_scored"]
            print(f"| {sae} | {n} | {te:.0f} ({ce:.0f}) | {ts:.0f} ({cs:.0f}) | {n / ((te + ts) / 60):.2f} | "
                  f"{tp:.0f} ({cp:.0f}) | {tp / ts:.2f}x |")
            del table


def _timed_once(fn, *args):
    """(wall s, CPU s) of one call, and its result."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return (time.perf_counter() - t, time.process_time() - c), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--per-token", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--doc-len", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-model-free", action="store_true", help="skip the model-free part")
    p.add_argument("--llm-run", type=Path, default=None, help="an indexed run: also time explain + score on it")
    p.add_argument("--llm-features", type=int, default=4)
    p.add_argument("--llm-batch", type=int, default=16)
    p.add_argument("--llm-contexts", type=int, nargs=3, default=(3, 3, 1), metavar=("ACTIVATING", "SILENT", "FUZZING"))
    p.add_argument("--device", default=None)
    a = p.parse_args()
    if not a.no_model_free:
        model_free(a)
    if a.llm_run is not None:
        llm_part(a.llm_run, a.llm_features, a.llm_batch, a.device, tuple(a.llm_contexts))


def model_free(a: argparse.Namespace) -> None:
    csr = synth(a.tokens, a.features, a.per_token)
    toks, docs, pos = keys(a.tokens, a.vocab, a.doc_len)
    fraction, seed = 0.5, 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.zarr"
        write(path, csr, a.features)
        rust = lambda: _native.token_scores(str(path), toks, docs, pos, held_out_fraction=fraction, seed=seed)
        base = lambda: pandas_scores(csr, toks, docs, pos, a.features, fraction, seed)
        got, want = rust(), base()
        for name in ("token_corr", "pair_corr"):
            np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(want[name]), err_msg=name)
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)
        t_rust, cpu_rust = timed(rust, a.repeat)
        t_base, cpu_base = timed(base, a.repeat)
    nnz = len(csr[1])
    print(f"{a.tokens} tokens x {a.features} features, {nnz / a.tokens:.1f} nnz/token, vocab {a.vocab}, "
          f"docs of {a.doc_len}; {_native.num_threads()} threads; best of {a.repeat}; results equal")
    print("| method | wall s | CPU s | features/s | tokens/s | vs pandas (wall) |\n|---|---:|---:|---:|---:|---:|")
    for name, t, c in (("saecore (Rust, from disk)", t_rust, cpu_rust), ("pandas groupby (in RAM)", t_base, cpu_base)):
        print(f"| {name} | {t:.3f} | {c:.3f} | {a.features / t:,.0f} | {a.tokens / t:,.0f} | {t_base / t:.1f}x |")


if __name__ == "__main__":
    main()
