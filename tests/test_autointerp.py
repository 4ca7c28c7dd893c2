"""Automated interpretability: the LLM backends and their cache, the explainer, the scorers.

The scoring arithmetic is held to independent references (scikit-learn, plain NumPy) with hypothesis.
The pipeline runs on a tiny run (the tiny model's activation store, a 64-feature SAE, its feature
store and index): with the tiny random model as the language model for the fast tests (it writes
nonsense, which is enough to check prompts, parsing, tables and the cache), and with the real
SmolLM2-135M-Instruct in the slow ones, including through a real OpenAI-compatible HTTP server on
127.0.0.1.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_HOOK
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore import tables
from saecore.explain import (
    ExplainConfig,
    explain_sae,
    open_llm,
    parse_explanation,
    read_split,
)
from saecore.feature_contexts import NEGATIVE_BIN, ContextSource, held_out
from saecore.llm import CachedLM, LocalLM, OpenAIChatLM, choice_from_reply, parse_choice
from saecore.run import AUTOINTERP_SUMMARY_FILE, SPECIFICITY_PLOT, Run
from saecore.scoring import (
    KINDS,
    ScoreConfig,
    auroc,
    balanced_accuracy,
    derangement,
    rating_means,
    score_sae,
    specificity_score,
    top_tokens_explanation,
)
from test_pages_browser import browser, console_problems, wait_for  # noqa: F401 -- the headless-browser fixture

D_SAE = 64
SEED = 2
"""The tiny store holds two documents; with this seed one is held out and the other is not."""


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    """A run with an encoded and indexed 64-feature SAE on the tiny store (read-only template)."""
    from saecore.encode import encode
    from saecore.index import index
    from saecore.sae import SAE, SAEConfig

    run = tmp_path_factory.mktemp("autointerp") / "run"
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="topk", d_in=64, d_sae=D_SAE, k=3, hook_name=TINY_HOOK)  # sparse: silent windows exist
    sae_dir = SAE(cfg).save(Run(run).sae("tiny"))
    encode(tiny_store, sae_dir, Run(run).features("tiny"), batch_rows=256, shard_rows=512, progress=False, device="cpu")
    index(Run(run).features("tiny"), Run(run).index("tiny"), progress=False)
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    return LocalLM("tiny", loaded=tiny_model, batch_size=4)


# -- arithmetic against references ----------------------------------------------------------------
labels_and_scores = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < len(y)),
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.9]), min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(labels_and_scores)
def test_auroc_and_balanced_accuracy_match_sklearn(data):
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y, s = np.array(data[0]), np.array(data[1])
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert balanced_accuracy(y, s > 0.5) == pytest.approx(balanced_accuracy_score(y, s > 0.5), abs=1e-12)


def test_scores_are_nan_without_both_classes():
    assert np.isnan(auroc([1, 1], [0.2, 0.3])) and np.isnan(balanced_accuracy([0, 0], [1, 0]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 4), st.integers(0, 3)), min_size=1, max_size=50))
def test_rating_aggregation_matches_a_plain_loop(pairs):
    bins, ratings = [b for b, _ in pairs], [r for _, r in pairs]
    got = rating_means(bins, ratings)
    for b in set(bins):
        mine = [r for bb, r in pairs if bb == b]
        assert got[b] == (len(mine), pytest.approx(sum(mine) / len(mine)))
    act = [r for b, r in pairs if b != NEGATIVE_BIN]
    silent = [r for b, r in pairs if b == NEGATIVE_BIN]
    want = (sum(act) / len(act) - sum(silent) / len(silent)) if act and silent else None
    got_s = specificity_score(bins, ratings)
    assert (np.isnan(got_s) if want is None else got_s == pytest.approx(want))


@given(st.integers(2, 50), st.integers(0, 1000))
def test_the_shuffled_baseline_never_keeps_a_features_own_explanation(n, seed):
    d = derangement(n, seed)
    assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))


def test_parse_explanation_keeps_one_short_phrase():
    assert parse_explanation('Explanation: "names of cities".\nMore text') == "names of cities"
    assert parse_explanation("\n\n**The word 'the'**") == "The word 'the'"
    assert parse_explanation("1. closing brackets") == "closing brackets"
    assert parse_explanation("The tokens have these features:\n\n1. **Attribute**: the word") == "Attribute"
    assert parse_explanation("Words about water. They also mark rivers.") == "Words about water"
    assert parse_explanation("   \n") == "(no explanation)"
    assert len(parse_explanation("word " * 100).split()) == 25


def test_choices_from_openai_replies():
    reply = {"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": [
        {"token": "Yes", "logprob": np.log(0.6)}, {"token": " no", "logprob": np.log(0.2)}, {"token": "x", "logprob": -1}]}]}}
    c = choice_from_reply(reply, ("Yes", "No"))
    assert c.soft and c.probs == pytest.approx([0.75, 0.25])
    hard = choice_from_reply({"message": {"content": " no, it does not"}}, ("Yes", "No"))
    assert not hard.soft and hard.probs == [0.0, 1.0]
    assert parse_choice("maybe", ("Yes", "No")) == [0.5, 0.5]


# -- the split -------------------------------------------------------------------------------------
def test_the_explainer_and_the_scorers_see_disjoint_documents(tiny_run, tiny_model):
    source = ContextSource(tiny_run, "tiny", tokenizer=tiny_model[1])
    for f in range(8):
        sel = source.select(f, n_explain=50, per_bin=5, n_negative=0, held_out_fraction=0.5, seed=3, firing=None)
        explain_docs = {e.doc_id for e in sel.explain}
        scoring_docs = {e.doc_id for e in sel.scoring}
        assert not explain_docs & scoring_docs
        assert not held_out(sorted(explain_docs), 0.5, 3).any() and held_out(sorted(scoring_docs), 0.5, 3).all()


# -- the backends and the cache ----------------------------------------------------------------------
def test_a_shared_prefix_gives_the_same_logits_as_separate_forwards(tiny_lm):
    chats = [[{"role": "user", "content": f"Description: a long shared beginning. Text: {t}"}] for t in
             ("one", "two words here", "three")]
    encoded = [tiny_lm.tokenizer.encode(tiny_lm.prompt_text(c), add_special_tokens=False) for c in chats]
    tiny_lm.share_prefix = True
    try:
        shared = tiny_lm.next_token_logits(encoded)
    finally:
        tiny_lm.share_prefix = False
    for e, got in zip(encoded, shared):
        with torch.no_grad():
            want = tiny_lm.model(input_ids=torch.tensor([e])).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_rerun_is_answered_from_the_cache(tiny_model, tmp_path):
    backend = LocalLM("tiny", loaded=tiny_model, batch_size=2)
    chats = [[{"role": "user", "content": f"Say {w}"}] for w in ("a", "b", "c")]
    first = CachedLM(backend, tmp_path / "cache")
    texts, keys = first.generate(chats, 4)
    probs = first.choose(chats, ("Yes", "No"))
    assert backend.calls == 6 and first.misses == 6
    again = CachedLM(backend, tmp_path / "cache")
    assert again.generate(chats, 4) == (texts, keys) and again.choose(chats, ("Yes", "No")) == probs
    assert backend.calls == 6 and again.hits == 6 and again.misses == 0
    assert again.generate(chats, 5)[1] != keys  # another parameter is another request


def test_explain_and_score_write_their_tables(run_copy, tiny_model, tiny_lm):
    calls = tiny_lm.calls
    llm = open_llm(run_copy, ExplainConfig(), backend=tiny_lm)
    cfg = ExplainConfig(limit=4, n_examples=4, max_new_tokens=6, min_activations=5, seed=SEED)
    explanations = explain_sae(run_copy, "tiny", cfg, llm, progress=False, tokenizer=tiny_model[1])
    index_dir = Run(run_copy).index("tiny")
    assert tables.EXPLANATIONS.read(index_dir).equals(explanations)
    assert explanations.num_rows == 4 and set(explanations.column("model").to_pylist()) == {"tiny"}
    assert read_split(index_dir) == {"held_out_fraction": 0.5, "seed": SEED, "mark_fraction": 0.25, "n_examples": 4}
    summary = score_sae(run_copy, "tiny", ScoreConfig(per_bin=1, n_negative=3, n_fuzzing=2), llm, progress=False,
                        tokenizer=tiny_model[1])
    scores = tables.AUTOINTERP_SCORES.read(index_dir)
    assert scores.num_rows == 4 * len(KINDS) and set(scores.column("kind").to_pylist()) == set(KINDS)
    spec = tables.SPECIFICITY.read(index_dir)
    assert NEGATIVE_BIN in spec.column("bin").to_pylist()
    assert json.loads((index_dir / AUTOINTERP_SUMMARY_FILE).read_text())["kinds"] == summary["kinds"]
    assert (index_dir / SPECIFICITY_PLOT).stat().st_size > 0
    asked = tiny_lm.calls - calls
    explain_sae(run_copy, "tiny", cfg, open_llm(run_copy, cfg, backend=tiny_lm), progress=False, tokenizer=tiny_model[1])
    score_sae(run_copy, "tiny", ScoreConfig(per_bin=1, n_negative=3, n_fuzzing=2), open_llm(run_copy, cfg, backend=tiny_lm),
              progress=False, tokenizer=tiny_model[1])
    assert tiny_lm.calls - calls == asked  # the rerun generated nothing


def test_a_run_answered_from_the_cache_never_loads_the_model(tiny_model_dir, tmp_path):
    import shutil

    from saecore.llm import LocalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    lm = LocalLM(str(folder))
    chats = [[{"role": "user", "content": "Say a"}]]
    texts = CachedLM(lm, tmp_path / "cache").generate(chats, 3)
    fresh = LocalLM(str(folder))
    assert CachedLM(fresh, tmp_path / "cache").generate(chats, 3) == texts and fresh._loaded is None
    with pytest.raises(ValueError, match="not a built-in name"):
        LocalLM(str(tmp_path / "nope"))


def test_top_tokens_baseline_names_the_most_frequent_tokens():
    from saecore.feature_contexts import Context

    cs = [Context(0, i, 0, 1.0, 0, tokens=["a", t], centre=1) for i, t in enumerate([" cat", " cat", " dog", "\n"])]
    assert top_tokens_explanation(cs) == 'the tokens "cat", "dog" and "' + repr("\n") + '"'


# -- the real model, and the OpenAI-compatible client against a real local server --------------------
@pytest.fixture(scope="module")
def server_of_smollm2(smollm2):
    from saecore.llm_server import make_server

    lm = LocalLM("smollm2-135m", loaded=smollm2, batch_size=8)
    server = make_server(lm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield lm, server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_the_openai_client_gets_the_local_models_answers_and_never_caches_the_key(server_of_smollm2, tmp_path, monkeypatch):
    lm, server = server_of_smollm2
    monkeypatch.setenv("SAECORE_TEST_KEY", "sk-secret-123")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = OpenAIChatLM(url, "smollm2-135m", api_key_env="SAECORE_TEST_KEY")
    chats = [[{"role": "user", "content": "What is the capital of France? One word."}],
             [{"role": "user", "content": "Is the sky blue? Answer Yes or No."}]]
    cached = CachedLM(client, tmp_path / "cache")
    texts, _ = cached.generate(chats, 8)
    assert texts == lm.generate(chats, 8)  # greedy both ways
    # The server answers one prompt at a time, so compare with the local model's answer to each alone.
    remote, local = cached.choose(chats, ("Yes", "No")), [lm.choose([c], ("Yes", "No"))[0] for c in chats]
    assert all(r.soft for r in remote)
    for r, loc in zip(remote, local):  # the server lists its top 20 tokens: a choice outside them gets 0
        assert r.best == loc.best
        if min(r.probs) > 0:
            assert r.probs == pytest.approx(loc.probs, abs=1e-3)
    assert server.auth_seen and set(server.auth_seen) == {"Bearer sk-secret-123"}
    calls = client.calls
    assert cached.generate(chats, 8)[0] == texts and client.calls == calls  # the cache answers the rerun
    for f in (tmp_path / "cache").rglob("*.json"):
        assert "sk-secret" not in f.read_text()


@pytest.mark.slow
def test_the_real_model_explains_and_scores_end_to_end(run_copy, server_of_smollm2):
    lm, _ = server_of_smollm2
    llm = open_llm(run_copy, ExplainConfig(), backend=lm)
    cfg = ExplainConfig(limit=2, n_examples=4, max_new_tokens=10, min_activations=5, seed=SEED)
    table = explain_sae(run_copy, "tiny", cfg, llm, progress=False, tokenizer=lm.tokenizer)
    assert table.num_rows == 2
    assert all(0 < len(e.split()) <= 25 for e in table.column("explanation").to_pylist())
    summary = score_sae(run_copy, "tiny", ScoreConfig(max_activating=2, n_negative=2, n_fuzzing=1), llm, progress=False,
                        tokenizer=lm.tokenizer)
    assert summary["requests"]["soft"] and set(summary["kinds"]) == set(KINDS)
    scores = tables.AUTOINTERP_SCORES.read(Run(run_copy).index("tiny")).to_pydict()
    assert all(0 <= a <= 1 for a in scores["detection_auroc"] if not np.isnan(a))


# -- pages ------------------------------------------------------------------------------------------
HOSTILE = '</script><img src=x onerror="alert(1)"> & <<bridge>>'


def autointerp_site(tmp_path):
    """The pages test run with explanation, score, specificity, token-score tables and a summary written
    for feature BRIDGE (its explanation hostile HTML), and its pages built."""
    from pages_testdata import BRIDGE, N_FEATURES, SAE, make_run, word_tokenizer
    from saecore import _atomic
    from saecore.pages import build_pages

    data = make_run(tmp_path)
    index_dir = Run(data.run).index(SAE)
    tables.EXPLANATIONS.write(tables.EXPLANATIONS.table({"feature": [BRIDGE], "explanation": [HOSTILE], "model": ["m"],
                                                     "prompt_hash": ["ab"]}), tables.EXPLANATIONS.path(index_dir))
    scores = {"feature": [BRIDGE] * 3, "kind": list(KINDS), "explanation": [HOSTILE, "x", 'the token "bridge"'],
              "detection_accuracy": [0.9, 0.5, 0.8], "detection_auroc": [0.95, float("nan"), 0.85],
              "fuzzing_accuracy": [0.7, 0.5, 0.6], "fuzzing_auroc": [0.75, 0.5, 0.65], "specificity": [2.0, 0.1, 1.5],
              "n_activating": [5] * 3, "n_negative": [5] * 3, "n_fuzzing": [2] * 3}
    tables.AUTOINTERP_SCORES.write(tables.AUTOINTERP_SCORES.table(scores), tables.AUTOINTERP_SCORES.path(index_dir))
    tables.SPECIFICITY.write(tables.SPECIFICITY.table({"feature": [BRIDGE], "kind": ["model"], "bin": [NEGATIVE_BIN],
                                                    "lo": [0.0], "hi": [0.0], "n": [5], "mean_rating": [0.2],
                                                    "mean_expected_rating": [0.4]}), tables.SPECIFICITY.path(index_dir))
    nan = float("nan")
    taxonomy = ["token/unknown" if f == BRIDGE else "context/unknown" for f in range(N_FEATURES)]
    tables.TOKEN_SCORES.write(tables.TOKEN_SCORES.table({
        "feature": list(range(N_FEATURES)), "token_corr": [0.9 if f == BRIDGE else nan for f in range(N_FEATURES)],
        "pair_corr": [0.5] * N_FEATURES, "fires_train": [1] * N_FEATURES, "fires_held": [1] * N_FEATURES,
        "distinct_tokens": [1] * N_FEATURES, "distinct_pairs": [1] * N_FEATURES, "logit_skew": [nan] * N_FEATURES,
        "logit_kurtosis": [nan] * N_FEATURES, "input_class": [t.split("/")[0] for t in taxonomy],
        "output_class": ["unknown"] * N_FEATURES, "taxonomy": taxonomy}), tables.TOKEN_SCORES.path(index_dir))
    curve = {"model": [{"bin": -1, "activation_level": 0.0, "contexts": 5, "mean_rating": 0.2}]}
    _atomic.write_json(index_dir / AUTOINTERP_SUMMARY_FILE, {"kinds": {"model": {"features": 1}}, "specificity_curve": curve,
                                                             "scorer": HOSTILE})
    build_pages(data.run, tokenizer=word_tokenizer(), activations=data.activations, progress=False)

    return data


def test_pages_show_explanations_scores_taxonomy_and_the_curve_as_data(tmp_path):
    from pages_testdata import BRIDGE, SAE
    from test_pages import feature_json, summary_rows

    data = autointerp_site(tmp_path)
    curve = {"model": [{"bin": -1, "activation_level": 0.0, "contexts": 5, "mean_rating": 0.2}]}
    page = feature_json(data.run, SAE, BRIDGE)
    assert page["autointerp"]["explanation"]["explanation"] == HOSTILE
    assert [r["kind"] for r in page["autointerp"]["scores"]] == list(KINDS)
    assert page["autointerp"]["scores"][1]["detection_auroc"] is None  # NaN becomes null, the JSON stays strict
    assert page["token_scores"]["taxonomy"] == "token/unknown" and page["token_scores"]["token_corr"] == 0.9
    assert feature_json(data.run, SAE, 0)["autointerp"] is None
    row = next(r for r in summary_rows(data.run, SAE) if r[0] == BRIDGE)
    assert row[6:] == [HOSTILE, 0.95, 0.75, 2.0, "token/unknown"]
    sae_js = (data.run / "pages" / SAE / "sae.js").read_text()
    assert json.loads(sae_js.split("=", 1)[1].rstrip().rstrip(";"))["autointerp"]["specificity_curve"] == curve
    for html in (data.run / "pages").rglob("*"):
        if html.suffix in (".html", ".js"):
            assert "<img" not in html.read_text()  # model output travels as escaped JSON, drawn with textContent
    js = (Path(__file__).parent.parent / "python" / "saecore" / "page_assets" / "feature.js").read_text()
    assert "innerHTML" not in js


def test_the_browser_draws_model_output_as_text_and_sorts_and_filters_by_score(browser, tmp_path):  # noqa: F811
    from pages_testdata import BRIDGE, SAE
    from saecore.pages import feature_href
    from selenium.webdriver.support.ui import Select

    data = autointerp_site(tmp_path)
    pages = data.run / "pages"
    browser.get((pages / SAE / feature_href(BRIDGE)).resolve().as_uri())
    wait_for(browser, lambda d: d.find_elements("id", "explanation-text"))
    assert browser.find_element("id", "explanation-text").text == HOSTILE
    assert browser.find_elements("css selector", "img") == []  # the markup stayed text
    kinds = [r.get_attribute("data-kind") for r in browser.find_elements("css selector", "#autointerp-scores tr[data-kind]")]
    assert kinds == list(KINDS)
    assert browser.find_element("id", "taxonomy").text.startswith("token/unknown")
    browser.get((pages / SAE / "index.html").resolve().as_uri())
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded") == "true")
    assert browser.find_elements("css selector", "#specificity-card svg path[data-kind=model]")
    Select(browser.find_element("id", "sort")).select_by_value("detection")
    assert browser.find_elements("css selector", "#feature-table tr[data-feature]")[0].get_attribute("data-feature") == str(BRIDGE)
    Select(browser.find_element("id", "taxonomy")).select_by_value("token/unknown")
    rows = browser.find_elements("css selector", "#feature-table tr[data-feature]")
    assert [r.get_attribute("data-feature") for r in rows] == [str(BRIDGE)]
    assert console_problems(browser) == []
