"""Harvest: correct rows, exclusions, dtypes, resume after SIGKILL, refusal of mismatches, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import saecore
import torch
import zarr
from saecore import harvesting as harvest_mod
from saecore import hooks
from saecore.activations import ActivationStore, bf16_bits_to_float
from saecore.corpus import CorpusError
from saecore.harvesting import HarvestConfig

HOOK = "blocks.1.hook_resid_post"
SMALL = {"context_length": 32, "batch_size": 4, "max_tokens": 16 * 32, "chunk_rows": 64, "progress": False}


def _leftovers(folder):
    """Anything a failed harvest might have left in ``folder`` (stores, staging folders)."""
    return sorted(p.name for p in folder.iterdir())


def _cli(*args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "saecore.cli", *args], capture_output=True, text=True, env=env, check=False, **kw
    )


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    names = ["token_ids", "doc_ids", "positions"] + [f"acts/{h}" for h in g.attrs["saecore"]["hooks"]]
    return {n: np.asarray(g[n][:]) for n in names}


# -- what a harvest holds ---------------------------------------------------------------------------
def test_rows_equal_a_direct_forward_of_each_context(tiny_model, small_corpus, tmp_path):
    model, tok = tiny_model
    store = saecore.harvest(
        model=tiny_model,
        corpus=small_corpus,
        out=tmp_path / "a.zarr",
        cfg=HarvestConfig(hooks=[HOOK, "blocks.0.hook_mlp_out"], dtype="float32", **SMALL),
    )
    batches = list(harvest_mod.iter_batches(harvest_mod.iter_contexts(iter(small_corpus), tok, 32), 4, 16))
    ids = np.concatenate([b.input_ids for b in batches])  # (16, 32)
    assert ids.shape == (16, 32) and (ids[:, 0] == tok.bos_token_id).all()
    special = set(tok.all_special_ids)
    keep = np.array([[p > 0 and t not in special for p, t in enumerate(row)] for row in ids]).reshape(-1)
    assert store.num_rows == keep.sum() and store.hooks == [HOOK, "blocks.0.hook_mlp_out"]
    np.testing.assert_array_equal(store.token_ids[:], ids.reshape(-1)[keep])
    np.testing.assert_array_equal(store.positions[:], np.tile(np.arange(32), 16)[keep])
    assert (np.diff(store.doc_ids[:]) >= 0).all() and store.doc_ids[0] == 0
    # the same batch composition through the model gives bit-identical activations
    direct = [hooks.run_to_hooks(model, torch.from_numpy(b.input_ids), [HOOK])[HOOK] for b in batches]
    want = torch.cat(direct).reshape(-1, 64).numpy()[keep]
    np.testing.assert_array_equal(store.read(HOOK, 0, store.num_rows), want)
    c = store.attrs["counters"]
    assert c["tokens_seen"] == 512 == store.num_rows + c["excluded_bos"] + c["excluded_special"] + c["excluded_norm"]
    assert c["excluded_bos"] == 16
    assert store.attrs["corpus_fingerprint"] == small_corpus.fingerprint
    assert store.mean_squared_norm(HOOK) == pytest.approx(float((want.astype(np.float64) ** 2).sum(1).mean()), rel=1e-9)


def test_store_opens_with_plain_zarr(tiny_store):
    g = zarr.open_group(str(tiny_store.path), mode="r")
    meta = g.attrs["saecore"]
    acts = g[f"acts/{HOOK}"]
    assert acts.shape == (tiny_store.num_rows, 64) and acts.dtype == np.float32
    for key in ("model", "hooks", "context_length", "dtype", "corpus_fingerprint", "exclusions", "counters"):
        assert key in meta
    assert meta["context_length"] == 32 and meta["exclusions"]["bos"] is True
    assert g["token_ids"].shape == g["doc_ids"].shape == g["positions"].shape == (tiny_store.num_rows,)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_storage_rounds_like_torch(tiny_model, small_corpus, tiny_store, tmp_path, dtype):
    store = saecore.harvest(
        model=tiny_model,
        corpus=small_corpus,
        out=tmp_path / "s.zarr",
        cfg=HarvestConfig(hooks=[HOOK], dtype=dtype, context_length=32, batch_size=8, max_tokens=64 * 32, chunk_rows=512, progress=False),
    )
    exact = torch.from_numpy(tiny_store.read(HOOK, 0, tiny_store.num_rows))
    want = exact.to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(store.read(HOOK, 0, store.num_rows), want)
    raw = zarr.open_group(str(store.path), mode="r")[f"acts/{HOOK}"]
    if dtype == "bfloat16":  # stored as raw bits (zarr 3 has no bfloat16); the documented decode works
        assert raw.dtype == np.uint16 and raw.attrs["saecore_dtype"] == "bfloat16"
        np.testing.assert_array_equal(bf16_bits_to_float(raw[:]), want)
    else:
        assert raw.dtype == np.float16


def test_keep_bos_and_special_keeps_every_token(tiny_model, small_corpus, tmp_path):
    store = saecore.harvest(
        model=tiny_model,
        corpus=small_corpus,
        out=tmp_path / "k.zarr",
        cfg=HarvestConfig(hooks=[HOOK], exclude_bos=False, exclude_special=False, **SMALL),
    )
    assert store.num_rows == 512 and (store.positions[:][::32] == 0).all()


def test_norm_outliers_are_dropped_and_recorded(tiny_model, small_corpus, tiny_store, tmp_path):
    store = saecore.harvest(
        model=tiny_model,
        corpus=small_corpus,
        out=tmp_path / "n.zarr",
        cfg=HarvestConfig(hooks=[HOOK], dtype="float32", norm_outlier_factor=1.05, context_length=32, batch_size=8, max_tokens=64 * 32, chunk_rows=512, progress=False),
    )
    ex = store.attrs["exclusions"]
    limit = ex["norm_threshold"][HOOK]
    assert limit == pytest.approx(1.05 * ex["norm_median"][HOOK])
    all_rows = tiny_store.read(HOOK, 0, tiny_store.num_rows)
    norms = np.linalg.norm(all_rows, axis=1)
    assert store.attrs["counters"]["excluded_norm"] == int((norms > limit).sum()) > 0
    np.testing.assert_array_equal(store.read(HOOK, 0, store.num_rows), all_rows[norms <= limit])


# -- resume and refusal -----------------------------------------------------------------------------
def test_interrupted_harvest_resumes_to_identical_rows(tiny_model, small_corpus, tmp_path, monkeypatch):
    kwargs = {
        "model": tiny_model, "corpus": small_corpus, "cfg": HarvestConfig(hooks=[HOOK], dtype="float16", norm_outlier_factor=1.3, **SMALL)
    }
    whole = saecore.harvest(out=tmp_path / "whole.zarr", **kwargs)
    real_forward = harvest_mod.forward_batch
    calls = []

    def dies_on_batch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_forward(*a, **k)

    monkeypatch.setattr(harvest_mod, "forward_batch", dies_on_batch_3)
    with pytest.raises(KeyboardInterrupt):
        saecore.harvest(out=tmp_path / "cut.zarr", **kwargs)
    monkeypatch.setattr(harvest_mod, "forward_batch", real_forward)
    with pytest.raises(saecore.StoreError, match="incomplete"):
        ActivationStore(tmp_path / "cut.zarr")
    resumed = saecore.harvest(out=tmp_path / "cut.zarr", **kwargs)
    a, b = _arrays(whole.path), _arrays(resumed.path)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.attrs["counters"] == whole.attrs["counters"] and whole.attrs["counters"]["excluded_norm"] > 0
    assert resumed.attrs["exclusions"] == whole.attrs["exclusions"]


def test_rerun_with_other_arguments_is_refused(tiny_model, small_corpus, tmp_path):
    out = tmp_path / "m.zarr"
    saecore.harvest(model=tiny_model, corpus=small_corpus, out=out, cfg=HarvestConfig(hooks=[HOOK], **SMALL))
    before = _arrays(out)
    with pytest.raises(saecore.StoreMismatchError) as e:
        saecore.harvest(
            model=tiny_model,
            corpus=small_corpus,
            out=out,
            cfg=HarvestConfig(hooks=[HOOK], **{**SMALL, "context_length": 16}),
        )
    assert "context_length: store has 32, now 16" in str(e.value)
    with pytest.raises(saecore.StoreMismatchError, match="dtype"):
        saecore.harvest(
            model=tiny_model,
            corpus=small_corpus,
            out=out,
            cfg=HarvestConfig(hooks=[HOOK], dtype="float32", **SMALL),
        )
    again = saecore.harvest(model=tiny_model, corpus=small_corpus, out=out, cfg=HarvestConfig(hooks=[HOOK], **SMALL))  # same args: a no-op
    after = _arrays(again.path)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_sigkilled_cli_harvest_resumes_bit_identically(tiny_model_dir, tmp_path):
    """Kill a real `saecore harvest` process after some batches are committed, rerun it, and compare
    every array bit for bit with an uninterrupted run."""
    args = [
        "harvest",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        "pydoc",
        "--hook",
        HOOK,
        "--hook",
        "blocks.0.hook_attn_out",
        "--context-length",
        "32",
        "--batch-size",
        "4",
        "--max-tokens",
        "12288",
        "--chunk-rows",
        "128",
        "--no-progress",
    ]
    cut = tmp_path / "cut.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saecore.cli", *args, "--out", str(cut)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    state = {}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = json.loads((cut / "commit.json").read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("batches_done", 0) >= 5 and not state.get("complete"):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"harvest ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((cut / "commit.json").read_text())
    assert not killed_at["complete"] and killed_at["batches_done"] < 96
    resumed = _cli(*args, "--out", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    whole = _cli(*args, "--out", str(tmp_path / "whole.zarr"))
    assert whole.returncode == 0, whole.stderr
    a, b = _arrays(tmp_path / "whole.zarr"), _arrays(cut)
    assert len(a["token_ids"]) > 11000
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert ActivationStore(cut).attrs["counters"] == ActivationStore(tmp_path / "whole.zarr").attrs["counters"]


# -- bad input: a clear error and nothing left behind -------------------------------------------------
def test_unknown_model_cli(tmp_path, small_corpus_dir):
    r = _cli(
        "harvest", "--model", "no-such-model", "--corpus", str(small_corpus_dir), "--out", str(tmp_path / "x.zarr")
    )
    assert r.returncode == 2 and "unknown model 'no-such-model'" in r.stderr and "smollm2-135m" in r.stderr
    assert _leftovers(tmp_path) == []


def test_unknown_hook(tiny_model, small_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hook 'blocks\.9\.hook_resid_post'.*0\.\.3"):
        saecore.harvest(
            model=tiny_model,
            corpus=small_corpus,
            out=tmp_path / "x.zarr",
            cfg=HarvestConfig(hooks=["blocks.9.hook_resid_post"], **SMALL),
        )
    assert _leftovers(tmp_path) == []


def test_empty_and_too_short_corpora(tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    empty = tmp_path / "in" / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="empty"):
        saecore.harvest(
            model=tiny_model,
            corpus=empty,
            out=tmp_path / "o" / "x.zarr",
            cfg=HarvestConfig(hooks=[HOOK], **SMALL),
        )
    short = tmp_path / "in" / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(CorpusError, match="too short"):
        saecore.harvest(
            model=tiny_model,
            corpus=short,
            out=tmp_path / "o" / "x.zarr",
            cfg=HarvestConfig(hooks=[HOOK], **SMALL),
        )
    assert _leftovers(tmp_path / "o") == []


def test_unreadable_corpus_file(tiny_model, tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(CorpusError, match=r"broken\.parquet"):
        saecore.harvest(
            model=tiny_model,
            corpus=bad,
            out=tmp_path / "o" / "x.zarr",
            cfg=HarvestConfig(hooks=[HOOK], **SMALL),
        )
    assert _leftovers(tmp_path / "o") == []


def test_unwritable_output(tiny_model, small_corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="a-file/x.zarr: cannot write"):
        saecore.harvest(
            model=tiny_model,
            corpus=small_corpus,
            out=blocker / "x.zarr",
            cfg=HarvestConfig(hooks=[HOOK], **SMALL),
        )
    with pytest.raises(NotADirectoryError, match="a-file: exists and is not a folder"):
        saecore.harvest(model=tiny_model, corpus=small_corpus, out=blocker, cfg=HarvestConfig(hooks=[HOOK], **SMALL))
    assert _leftovers(tmp_path) == ["a-file"]


def test_every_row_excluded_leaves_nothing(tiny_model, tmp_path):
    only_special = tmp_path / "special.txt"
    only_special.write_text("<|endoftext|>" * 200)  # the tokenizer reads these as special token 0
    with pytest.raises(saecore.StoreError, match="no rows"):
        saecore.harvest(
            model=tiny_model,
            corpus=only_special,
            out=tmp_path / "o" / "x.zarr",
            cfg=HarvestConfig(hooks=[HOOK], **SMALL),
        )
    assert _leftovers(tmp_path / "o") == []


def test_cli_harvest_prints_summary(tiny_model_dir, small_corpus_dir, tmp_path):
    out = tmp_path / "c.zarr"
    r = _cli(
        "harvest",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        str(small_corpus_dir),
        "--hook",
        HOOK,
        "--out",
        str(out),
        "--context-length",
        "32",
        "--max-tokens",
        "256",
        "--dtype",
        "bfloat16",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    store = ActivationStore(out)
    assert f"{store.num_rows} rows" in r.stdout and store.attrs["dtype"] == "bfloat16"
    assert store.attrs["model"] == str(tiny_model_dir.resolve())


# -- the real model on real text ------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_harvest_on_real_text(smollm2, tmp_path):
    torch.set_num_threads(2)
    try:
        model, tok = smollm2
        hook = "blocks.3.hook_resid_post"
        store = saecore.harvest(
            model=smollm2,
            corpus="pydoc",
            out=tmp_path / "real.zarr",
            cfg=HarvestConfig(hooks=[hook], context_length=128, batch_size=8, max_tokens=3072, dtype="float16", norm_outlier_factor=20.0, progress=False),
        )
        assert store.d_model() == 576 and 2800 < store.num_rows <= 3072 - 24
        first = torch.from_numpy(store.token_ids[:127].astype(np.int64))[None]
        bos = torch.tensor([[tok.bos_token_id]])
        with torch.no_grad():
            hidden = model(torch.cat([bos, first], 1), output_hidden_states=True).hidden_states[4][0, 1:]
        np.testing.assert_allclose(store.read(hook, 0, 127), hidden.half().float().numpy(), rtol=2e-3, atol=2e-2)
        assert "assert" in tok.decode(store.token_ids[:200])
        # the residual stream's outlier dimensions make the BOS row huge; it was excluded
        assert store.attrs["counters"]["excluded_bos"] == 24 and store.mean_squared_norm() > 1.0
        assert np.isfinite(store.read(hook, 0, store.num_rows)).all()
    finally:
        torch.set_num_threads(1)


def test_peak_memory_does_not_grow_with_tokens(tiny_model, tmp_path):
    """Python/NumPy peak allocation (tracemalloc) for 8x the tokens stays about the same: the corpus is
    streamed and rows go to disk a chunk at a time."""
    import tracemalloc

    def peak(n_contexts: int, name: str) -> int:
        tracemalloc.start()
        saecore.harvest(
            model=tiny_model,
            corpus="pydoc",
            out=tmp_path / name,
            cfg=HarvestConfig(hooks=[HOOK], context_length=32, batch_size=8, max_tokens=n_contexts * 32, chunk_rows=256, progress=False),
        )
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(64, "small.zarr"), peak(512, "large.zarr")
    assert ActivationStore(tmp_path / "large.zarr").num_rows > 7 * ActivationStore(tmp_path / "small.zarr").num_rows
    assert large < 1.5 * small, (small, large)


def test_quickstart_steps_run_once_and_then_skip(tiny_model_dir, small_corpus_dir, tmp_path):
    import io

    from saecore.quickstart import STEPS, QuickstartConfig, Step, run_steps

    cfg = QuickstartConfig(
        run=tmp_path / "qs",
        model=str(tiny_model_dir),
        corpus=str(small_corpus_dir),
        hook=HOOK,
        tokens=1024,
        context_length=32,
        d_sae=256,
        k=8,
    )
    made = []
    extra = Step(
        "count",
        lambda c: c.run / "count.txt",
        lambda c: (c.run / "count.txt").exists(),
        lambda c: (made.append(1), (c.run / "count.txt").write_text("1")),
        lambda c: "a later stage",
    )
    first, second = io.StringIO(), io.StringIO()
    run_steps(cfg, [*STEPS, extra], out=first)
    run_steps(cfg, [*STEPS, extra], out=second)
    n = len(STEPS) + 1
    assert f"[1/{n}] harvest: done" in first.getvalue() and f"[{n}/{n}] count: done" in first.getvalue()
    # Every stage of the pipeline ran on the tiny model, and a rerun skips them all.
    for step in STEPS:
        assert f"{step.name}: already complete, skipped" in second.getvalue(), step.name
    assert made == [1]
    assert (cfg.pages / "index.html").exists() and (cfg.index_dir / "topk.parquet").exists()
    assert str(cfg.activations) in second.getvalue() and "rows x 64" in second.getvalue()
    assert ActivationStore(cfg.activations).attrs["max_tokens"] == 1024


def test_a_huge_max_tokens_harvests_the_corpus_without_a_huge_allocation(tiny_model, small_corpus, tmp_path):
    """--max-tokens 2^48 means "everything": the store grows as rows come, so finishing trims a small
    array, not one sized for 2^48 rows (that ended in a MemoryError, leaving a store every rerun repeated)."""
    cfg = {**SMALL, "max_tokens": 1 << 48, "batch_size": 16, "chunk_rows": 512}
    huge = saecore.harvest(model=tiny_model, corpus=small_corpus, out=tmp_path / "huge.zarr", cfg=HarvestConfig(hooks=[HOOK], **cfg))
    cfg["max_tokens"] = None
    whole = saecore.harvest(model=tiny_model, corpus=small_corpus, out=tmp_path / "all.zarr", cfg=HarvestConfig(hooks=[HOOK], **cfg))
    assert huge.num_rows == whole.num_rows > 16 * 32
    assert zarr.open_group(str(tmp_path / "huge.zarr"), mode="r")["token_ids"].shape[0] == huge.num_rows
    np.testing.assert_array_equal(huge.read(HOOK, 0, huge.num_rows), whole.read(HOOK, 0, whole.num_rows))
