"""``saecore maximise``: greedy coordinate gradient finds a token pattern planted in an SAE's encoder.

The ground truth: on the tiny model, feature 3's encoder row is the hook-point direction of the token
" bridge" at the last position (the mean activation over random contexts ending in it, minus the mean
over random contexts), and feature 5's is that plus the direction " golden" adds before it. The optimiser
must put " bridge" last (feature 3) and " golden bridge" last (feature 5); random search with the same
number of exact evaluations must do no better.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TINY_HOOK
from saecore import hooks
from saecore.maximise import (
    MaximiseConfig,
    Objective,
    allowed_tokens,
    maximise_feature,
    search,
)
from saecore.sae import SAE, SAEConfig

TOKEN_FEATURE, BIGRAM_FEATURE = 3, 5


def _last(model, ids):
    return hooks.run_to_hooks(model, ids, [TINY_HOOK])[TINY_HOOK][:, -1]


@pytest.fixture(scope="module")
def planted(tiny_model):
    """``(sae, A, B)``: an 8-feature SAE on the tiny model with features 3 (reads B) and 5 (reads A B) planted."""
    return plant(*tiny_model)


def plant(model, tok):
    """The planted SAE (see :func:`planted`)."""
    a = tok.encode(" golden", add_special_tokens=False)[0]
    b = tok.encode(" bridge", add_special_tokens=False)[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = torch.randint(0, len(tok), (64, 6), generator=gen)
        ctx[:, 0] = tok.bos_token_id
        ends_b = ctx.clone()
        ends_b[:, -1] = b
        ends_ab = ends_b.clone()
        ends_ab[:, -2] = a
        x_all, x_b, x_ab = _last(model, ctx).mean(0), _last(model, ends_b).mean(0), _last(model, ends_ab).mean(0)
        w_token = (x_b - x_all) / (x_b - x_all).norm()
        w_bigram = w_token + (x_ab - x_b) / (x_ab - x_b).norm()
        sae = SAE(SAEConfig(architecture="relu", d_in=64, d_sae=8, hook_name=TINY_HOOK, model_name="tiny")).eval()
        sae.W_enc[:, TOKEN_FEATURE] = w_token
        sae.W_enc[:, BIGRAM_FEATURE] = w_bigram / w_bigram.norm()
    return sae, a, b


def _cfg(feature: int) -> MaximiseConfig:
    return MaximiseConfig(sae="unused", feature=[feature], length=4, steps=20, top_k=32, candidates=64, restarts=2,
                          examples=0)


@pytest.mark.parametrize(("feature", "pattern"), [(TOKEN_FEATURE, "B"), (BIGRAM_FEATURE, "AB")])
def test_gcg_finds_the_planted_pattern_and_beats_random_search(tiny_model, planted, feature, pattern):
    model, tok = tiny_model
    sae, a, b = planted
    want = {"B": [b], "AB": [a, b]}[pattern]
    result = maximise_feature(model, tok, sae, feature, _cfg(feature))
    best, rand = result["gcg"][0], result["random"][0]
    assert best["ids"][-len(want):] == want, (best["text"], [tok.decode([t]) for t in want])
    assert rand["activation"] <= best["activation"]
    assert rand["ids"][-len(want):] != want  # 2 × 1,281 uniform draws: finding it would be a 1-in-1,000 fluke
    assert result["evaluations_per_search"] == 2 * (1 + 20 * 64)


def test_scores_equal_a_plain_torch_reference(tiny_model, planted):
    model, tok = tiny_model
    sae, _, _ = planted
    ids = torch.randint(10, 5000, (5, 4), generator=torch.Generator().manual_seed(1))
    full = torch.cat([torch.full((5, 1), tok.bos_token_id), ids], 1)
    with torch.no_grad():
        x = hooks.run_to_hooks(model, full, [TINY_HOOK])[TINY_HOOK][:, 1:]  # [5, 4, 64]
        pre = x @ sae.W_enc[:, BIGRAM_FEATURE] + sae.b_enc[BIGRAM_FEATURE]  # [5, 4]
        logits = model(input_ids=full).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), full[:, 1:], reduction="none").mean(1)
    last = Objective(model, sae, BIGRAM_FEATURE, tok.bos_token_id, "last", batch_size=2).score(ids)
    torch.testing.assert_close(last.pre, pre[:, -1].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last.activation, torch.relu(pre[:, -1]).double(), rtol=1e-5, atol=1e-6)
    best = Objective(model, sae, BIGRAM_FEATURE, tok.bos_token_id, "max", fluency=0.5).score(ids)
    torch.testing.assert_close(best.pre, pre.max(1).values.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(best.nll, nll.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(best.objective, best.pre - 0.5 * best.nll)


@pytest.mark.parametrize("fluency", [0.0, 0.3])
def test_one_hot_gradient_equals_the_embedding_gradient_of_a_full_forward(tiny_model, planted, fluency):
    # Reference: the whole model on inputs_embeds, the hook read from hidden_states (no hooks, no early
    # stop), and d/d(one-hot) = d/d(embeddings) @ W_Eᵀ plus, with fluency, the NLL's dependence on its targets.
    model, tok = tiny_model
    sae, _, _ = planted
    ids = torch.tensor([11, 222, 3333, 4444])
    full = torch.cat([torch.tensor([tok.bos_token_id]), ids])
    emb = model.get_input_embeddings().weight.detach()
    onehot = torch.nn.functional.one_hot(full, emb.shape[0]).float().requires_grad_(True)
    out = model(inputs_embeds=(onehot @ emb)[None], output_hidden_states=True)
    x = out.hidden_states[2][0, -1]  # output of decoder layer 1 = blocks.1.hook_resid_post
    value = x @ sae.W_enc[:, TOKEN_FEATURE].detach() + sae.b_enc[TOKEN_FEATURE].detach()
    logp = torch.log_softmax(out.logits[0, :-1], -1)
    nll = -(logp * onehot[1:]).sum(-1).mean()
    (want,) = torch.autograd.grad(value - fluency * nll, onehot)
    got = Objective(model, sae, TOKEN_FEATURE, tok.bos_token_id, "last", fluency=fluency).gradient(ids)
    torch.testing.assert_close(got, want[1:], rtol=1e-4, atol=1e-6)


def test_search_is_deterministic_and_uses_allowed_tokens_only(tiny_model, planted):
    model, tok = tiny_model
    sae, _, _ = planted
    allowed = allowed_tokens(tok, model.get_input_embeddings().weight.shape[0])
    assert not allowed[tok.bos_token_id] and not allowed[tok.eos_token_id] and allowed.sum() > 40_000
    objective = Objective(model, sae, TOKEN_FEATURE, tok.bos_token_id)
    runs = [search(objective, allowed, 4, 3, 16, 8, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(allowed[t] for t in runs[0].ids)


@pytest.fixture(scope="module")
def run_with_index(tiny_model, tiny_model_dir, tiny_store, planted, tmp_path_factory):
    """A run folder with the planted SAE (model_name = the tiny model's folder), encoded and indexed."""
    from saecore.encode import encode
    from saecore.index import index

    sae, _, _ = planted
    run = tmp_path_factory.mktemp("maximise") / "runs" / "demo"
    sae.cfg.model_name = str(tiny_model_dir)
    sae_dir = sae.save(run / "saes" / "tiny")
    features = run / "features" / "tiny.zarr"
    encode(tiny_store, sae_dir, features, batch_rows=256, shard_rows=512, progress=False, device="cpu")
    index(features, run / "index" / "tiny", progress=False)
    return run


def test_the_verb_writes_the_result_and_the_feature_page_shows_it(tiny_model, run_with_index, capsys):
    from saecore.cli import main
    from saecore.pages import build_pages

    _, tok = tiny_model
    run = run_with_index
    argv = ["maximise", "--sae", str(run / "saes" / "tiny"), "--feature", str(TOKEN_FEATURE), "--length", "3",
            "--steps", "4", "--candidates", "16", "--restarts", "1", "--examples", "3", "--device", "cpu"]
    assert main(argv) == 0
    path = run / "experiments" / "maximise" / "tiny" / f"{TOKEN_FEATURE}.json"
    result = json.loads(path.read_text())
    assert "GCG" in capsys.readouterr().out
    assert len(result["gcg"]) == 1 and len(result["random"]) == 1
    assert len(result["dataset_top"]) == 3 and "«" in result["dataset_top"][0]["text"]
    values = [e["value"] for e in result["dataset_top"]]
    assert values == sorted(values, reverse=True) and values[0] > 0
    build_pages(run, tokenizer=tok, progress=False)
    page = (run / "pages" / "tiny" / "f" / "0" / f"{TOKEN_FEATURE}.html").read_text()
    data = json.loads(re.search(r"window\.SAECORE_FEATURE=(.*?);</script>", page).group(1))
    assert data["maximise"]["gcg"][0]["tokens"] == result["gcg"][0]["tokens"]
    assert data["maximise"]["dataset"][0]["text"] == result["dataset_top"][0]["text"]
    other = (run / "pages" / "tiny" / "f" / "0" / f"{BIGRAM_FEATURE}.html").read_text()
    assert '"maximise":null' in other
