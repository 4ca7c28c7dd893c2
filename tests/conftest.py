"""Shared fixtures: a tiny model, a small corpus, a small activation store, and the real SmolLM2.

Session-scoped so each is built once per pytest run. The tiny model uses SmolLM2's real tokenizer
(cached under $SAECORE_CACHE after the first run); the real model is converted from its GGUF once per
machine (~100 s) and then loads in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Many tiny matmuls: extra threads only add synchronisation cost, and on a shared 2-core machine they
# spin against other processes (20x slower seen). Real-model tests raise this locally where it pays;
# SAECORE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SAECORE_TEST_THREADS", "1")))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def tiny_model():
    """``(model, tokenizer)``: a 4-layer, d_model=64 random LlamaForCausalLM with the real SmolLM2 tokenizer.

    Shared by many tests: do not modify its weights (use ``saecore.models.tiny_llama()`` for a private copy).
    """
    from saecore import models

    return models.tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved as a local Hugging Face folder (for CLI tests and ``models.load(path)``)."""
    model, tok = tiny_model
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory) -> Path:
    """A folder of 12 .txt files (~60 k characters of Python's pydoc topics); nothing downloaded."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("small-corpus")
    keys = sorted(k for k in topics if len(topics[k]) > 2000)[:12]
    for i, key in enumerate(keys):
        (folder / f"{i:02d}-{key}.txt").write_text(topics[key][:5000], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def small_corpus(small_corpus_dir):
    """:class:`saecore.corpus.Corpus` over :func:`small_corpus_dir`."""
    from saecore import corpus

    return corpus.load(small_corpus_dir)


@pytest.fixture(scope="session")
def tiny_store(tiny_model, small_corpus_dir, tmp_path_factory):
    """A complete float32 activation store of the tiny model at ``blocks.1.hook_resid_post``: 64 contexts
    of 32 tokens from the small corpus, BOS and separator rows excluded (about 1,980 rows x 64). Read-only for tests."""
    from saecore.harvesting import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("tiny-store") / "activations.zarr"
    cfg = HarvestConfig(
        hooks=[TINY_HOOK], context_length=32, batch_size=8, dtype="float32", max_tokens=64 * 32, chunk_rows=512, progress=False
    )
    return harvest(model=tiny_model, corpus=small_corpus_dir, out=out, cfg=cfg)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: the real SmolLM2-135M-Instruct on CPU in float32 (slow tests only)."""
    from saecore import models

    return models.load("smollm2-135m", device="cpu", dtype=torch.float32)
