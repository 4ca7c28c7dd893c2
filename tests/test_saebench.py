"""SAEBench-style evals (``saecore eval --suite``, ``--compare``): each metric held to a direct
re-implementation on crafted inputs, sparse probing where one latent carries the label (k=1 ≈ 1) and where
none does (≈ 0.5), absorption on a crafted dictionary whose absorbed words are known, the result files in
SAEBench's schema, and the ``--compare`` table on two tiny SAEs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_HOOK
from saecore import absorption as ab
from saecore import saebench
from saecore.cli import main
from saecore.evaluate import evaluate, reconstruction_metrics
from saecore.probes import f1_score, fit_logistic, top_k_mean_diff
from saecore.sae import SAE, SAEConfig
from saecore.sparse_probing import one_vs_rest, probe_class

# SAEBench 0.6.0's output schema: the base fields and, per eval type, each category's metric names.
BASE_FIELDS = {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
               "eval_result_details", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id",
               "sae_lens_version", "sae_cfg_dict", "eval_result_unstructured"}
SCHEMA = {
    "core": {
        "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
        "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                           "ce_loss_without_sae"},
        "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
        "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
        "sparsity": {"l0", "l1"},
        "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
        "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                         "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                         "average_max_decoder_cosine_sim", "frac_alive"},
    },
    "sparse_probing": {
        "llm": {"llm_test_accuracy"} | {f"llm_top_{k}_test_accuracy" for k in (1, 2, 5, 10, 20, 50, 100)},
        "sae": {"sae_test_accuracy"} | {f"sae_top_{k}_test_accuracy" for k in (1, 2, 5, 10, 20, 50, 100)},
    },
    "absorption_first_letter": {
        "mean": {"mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                 "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features"},
    },
}
DETAIL_FIELDS = {
    "core": {"index", "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
             "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim"},
    "sparse_probing": {"dataset_name"} | SCHEMA["sparse_probing"]["llm"] | SCHEMA["sparse_probing"]["sae"],
    "absorption_first_letter": {"first_letter", "mean_absorption_fraction", "full_absorption_rate",
                                "num_full_absorption", "num_probe_true_positives", "num_split_features"},
}


# -- probes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("balanced", [False, True])
def test_fit_logistic_matches_scikit_learn(balanced):
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)) * [1, 2, 0.5, 3, 1, 1]
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(size=120) > 0.8).astype(int)
    ref = sklearn.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10,
                                     class_weight="balanced" if balanced else None).fit(x, y)
    probe = fit_logistic(x, y, balanced=balanced)
    np.testing.assert_allclose(probe.weight[:, 0].numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)
    assert float(probe.bias[0]) == pytest.approx(ref.intercept_[0], rel=1e-3, abs=1e-4)


def test_top_k_mean_diff_and_f1_match_direct_computations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 9))
    y = rng.integers(0, 2, 50)
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    assert list(top_k_mean_diff(x, y, 4)) == list(np.argsort(-diff)[:4])
    pred = rng.integers(0, 2, 50).astype(bool)
    tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
    assert f1_score(y, pred) == pytest.approx(2 * tp / (2 * tp + fp + fn))


# -- sparse probing ----------------------------------------------------------------------------------
def _classes(rng: np.random.Generator, n: int, carrier: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three classes of (residual [n, 8], latents [n, 40]); with ``carrier`` latent 3·c fires only for class c."""
    out = {}
    for c, name in enumerate("abc"):
        lat = np.abs(rng.normal(size=(n, 40)))
        if carrier:
            lat[:, 3 * c] += 4.0
        out[name] = (rng.normal(size=(n, 8)), lat)
    return out


@pytest.mark.parametrize("carrier", [True, False])
def test_sparse_probing_accuracy_when_one_latent_carries_the_label_and_when_none_does(carrier):
    rng = np.random.default_rng(2)
    train, test = _classes(rng, 80, carrier), _classes(rng, 200, carrier)
    for cls in "abc":
        acc = probe_class(train, test, cls, ks=[1, 2], seed=0)
        if carrier:
            assert acc["sae_top_1_test_accuracy"] > 0.97
        else:
            assert abs(acc["sae_top_1_test_accuracy"] - 0.5) < 0.1
        assert abs(acc["llm_test_accuracy"] - 0.5) < 0.12  # the residual here is pure noise


def test_one_vs_rest_draws_negatives_evenly_from_the_other_classes():
    acts = {"a": np.zeros((10, 2)), "b": np.ones((9, 2)), "c": 2 * np.ones((9, 2)), "d": 3 * np.ones((9, 2))}
    x, y = one_vs_rest(acts, "a", np.random.default_rng(0))
    assert y.sum() == 10 and len(y) == 10 + 3 * math.ceil(10 / 3)
    assert sorted(np.unique(x[y == 0, 0]).tolist()) == [1.0, 2.0, 3.0]
    assert all((x[y == 0, 0] == v).sum() == 4 for v in (1.0, 2.0, 3.0))


# -- absorption: the per-word rule --------------------------------------------------------------------
def test_word_absorption_rule_on_crafted_latents():
    cos = np.array([1.0, 0.8, 0.05, 0.3])  # main latent 0; 1 and 3 align with the probe, 2 barely
    # Fully absorbed: the main latent is silent and latent 1 carries the whole projection.
    full = ab.word_absorption(np.array([0.0, 5.0, 0.0, 0.0]), cos, probe_proj=4.0, main=[0])
    assert full.fraction == 1.0 and full.full
    # Not absorbed: the main latent alone reaches the probe projection.
    clean = ab.word_absorption(np.array([4.0, 0.0, 3.0, 0.0]), cos, probe_proj=4.0, main=[0])
    assert clean.fraction == 0.0 and not clean.full
    # Partial: main projection 1.5, absorbers 1.6 + 0.9 (latent 2 is under the cos 0.1 bar).
    part = ab.word_absorption(np.array([1.5, 2.0, 10.0, 3.0]), cos, probe_proj=4.0, main=[0])
    absorbed = min(0.8 * 2.0 + 0.3 * 3.0, 4.0 - 1.5)
    assert part.fraction == pytest.approx(absorbed / (absorbed + 1.5))
    assert not part.full  # the main latent fires
    # Too little compensation (under 0.4 of the projection): no absorption at all.
    weak = ab.word_absorption(np.array([0.0, 1.0, 0.0, 0.0]), cos, probe_proj=4.0, main=[0])
    assert weak.fraction == 0.0 and not weak.full


def test_feature_split_rule():
    assert ab.feature_split([0.5, 0.7, 0.72, 0.9], [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert ab.feature_split([0.8, 0.81], [[7], [7, 8]]) == [7]


# -- absorption: end to end on a crafted dictionary ---------------------------------------------------
def _crafted_dictionary(n_letters: int, n_per_letter: int, absorbed: int, rng: np.random.Generator):
    """Words of the first ``n_letters`` letters: residual = 4·e_letter (+ e_token for the ``absorbed`` words
    of letter a, each with its own token direction) + a little noise; plus 100 words of the other letters
    with no letter direction (so a probe must find its letter's direction, not "none of the others").
    The SAE: one latent per letter (letter a's is switched off by any token direction), and one latent
    per absorbed word whose decoder is that word's whole direction (4·e_a + e_token)/√17."""
    n_tok, noise_dims = absorbed, 2
    d = 26 + n_tok + noise_dims
    rows, labels, tok_of = [], [], []
    for letter in [*np.repeat(np.arange(n_letters), n_per_letter), *rng.integers(n_letters, 26, size=100)]:
        x = np.zeros(d)
        x[26 + n_tok :] = rng.normal(scale=0.1, size=noise_dims)
        if letter < n_letters:
            x[letter] = 4.0
        tok = int((np.array(labels) == 0).sum()) if letter == 0 else -1
        tok = tok if 0 <= tok < absorbed else -1
        if tok >= 0:
            x[26 + tok] = 1.0
        rows.append(x)
        labels.append(int(letter))
        tok_of.append(tok)
    W_enc = np.zeros((d, 26 + n_tok))
    W_dec = np.zeros((26 + n_tok, d))
    for letter in range(26):
        W_enc[letter, letter] = W_dec[letter, letter] = 1.0
    W_enc[26 : 26 + n_tok, 0] = -5.0  # a token present switches letter a's latent off
    for t in range(n_tok):
        W_enc[26 + t, 26 + t] = math.sqrt(17.0)  # fires √17 on its word
        W_dec[26 + t, 0], W_dec[26 + t, 26 + t] = 4 / math.sqrt(17.0), 1 / math.sqrt(17.0)

    def encode(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ W_enc, 0.0)

    return np.array(rows), np.array(labels), np.array(tok_of), encode, W_dec


def test_absorption_on_a_crafted_dictionary_finds_the_absorbed_words():
    """The absorbed words are test words (as unseen vocabulary is in SAEBench's split): the probes learn
    the letter from the others, and on the absorbed ones the letter latent is silent while the word's own
    latent carries the letter direction."""
    rng = np.random.default_rng(3)
    x, y, tok, encode, W_dec = _crafted_dictionary(n_letters=5, n_per_letter=30, absorbed=12, rng=rng)
    plain = rng.permutation(np.flatnonzero(tok < 0))
    train, test = plain[: int(0.7 * len(plain))], np.concatenate([plain[int(0.7 * len(plain)) :], np.flatnonzero(tok >= 0)])
    cfg = ab.AbsorptionConfig(min_letters=5, seed=0, steps_per_epoch=20)
    metrics, details, extra = ab.absorption_from_activations(x[train], y[train], x[test], y[test], encode, W_dec, cfg)
    assert extra["enough_letters"] and extra["letters_evaluated"] == 5
    by_letter = {d["first_letter"]: d for d in details}
    a_test = test[y[test] == 0]
    expected = float((tok[a_test] >= 0).mean())  # every letter-a test word is a probe true positive here
    assert by_letter["a"]["num_probe_true_positives"] == len(a_test)
    assert by_letter["a"]["num_split_features"] == 1
    assert by_letter["a"]["mean_absorption_fraction"] == pytest.approx(expected)
    assert by_letter["a"]["full_absorption_rate"] == pytest.approx(expected)
    assert by_letter["a"]["num_full_absorption"] == 12
    assert all(d["mean_absorption_fraction"] == 0.0 for k, d in by_letter.items() if k != "a")
    assert metrics["mean"]["mean_absorption_fraction_score"] == pytest.approx(expected / 5)


# -- core metrics --------------------------------------------------------------------------------------
def test_core_metrics_match_their_definitions(tiny_store):
    d = tiny_store.d_model(TINY_HOOK)
    sae = SAE(SAEConfig("topk", d_in=d, d_sae=4 * d, k=4, hook_name=TINY_HOOK, model_name="tiny"), seed=2)
    m = reconstruction_metrics(sae, tiny_store, TINY_HOOK, 100, 900, block_rows=800)  # one block (legacy EV)
    x = torch.from_numpy(tiny_store.read(TINY_HOOK, 100, 900)).double()
    f = sae.encode(x.float()).double()
    xh = sae.decode(f.float()).double()
    n_in, n_out = x.norm(dim=1), xh.norm(dim=1)
    assert m["l2_norm_in"] == pytest.approx(float(n_in.mean()), rel=1e-6)
    assert m["l2_ratio"] == pytest.approx(float((n_out / n_in).mean()), rel=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(
        float(n_out.pow(2).mean() / (x * xh).sum(1).mean()), rel=1e-6)
    assert m["cossim"] == pytest.approx(float(torch.nn.functional.cosine_similarity(x, xh).mean()), rel=1e-6)
    assert m["l1"] == pytest.approx(float(f.abs().sum(1).mean()), rel=1e-6)
    err = (x - xh).pow(2).sum(1)
    assert m["explained_variance_legacy"] == pytest.approx(
        float((1 - err / (x - x.mean(0)).pow(2).sum(1)).mean()), rel=1e-6)
    np.testing.assert_allclose(m["feature_density"], (f != 0).double().mean(0).numpy(), atol=1e-12)


def test_density_and_weight_metrics_match_direct_computations():
    density = np.array([0.0, 0.0, 0.005, 0.02, 0.2, 0.5])
    got = saebench.density_metrics(density)
    assert got["frac_alive"] == pytest.approx(4 / 6)
    assert got["freq_over_1_percent"] == pytest.approx(3 / 6) and got["freq_over_10_percent"] == pytest.approx(2 / 6)
    assert got["normalized_freq_over_10_percent"] == pytest.approx(0.7 / density.sum())
    hist = saebench.density_histogram(density)
    assert hist["dead"] == 2 and sum(hist["counts"]) == 4
    torch.manual_seed(0)
    W_enc, W_dec, b = torch.randn(5, 7), torch.randn(7, 5), torch.randn(7)
    w = saebench.weight_metrics(W_enc, b, W_dec)
    unit = torch.nn.functional.normalize(W_dec.double(), dim=1)
    sims = unit @ unit.T - 3 * torch.eye(7, dtype=torch.float64)
    np.testing.assert_allclose(w["max_decoder_cosine_sim"], sims.max(1).values.numpy(), atol=1e-12)
    np.testing.assert_allclose(w["encoder_norm"], W_enc.double().norm(dim=0).numpy(), atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(W_enc.T.double(), W_dec.double(), dim=1)
    np.testing.assert_allclose(w["encoder_decoder_cosine_sim"], cos.numpy(), atol=1e-12)


# -- end to end: schema, summary, plot, --compare -------------------------------------------------------
def _check_schema(res: dict, eval_type: str) -> None:
    assert set(res) == BASE_FIELDS
    assert res["eval_type_id"] == eval_type
    assert isinstance(res["datetime_epoch_millis"], int) and 0 < res["datetime_epoch_millis"] <= 9999999999999
    cats = res["eval_result_metrics"]
    for cat, names in SCHEMA[eval_type].items():
        if eval_type == "core" and cat.startswith("model_") and cat not in cats:
            continue  # CE/KL are measured only with the model spliced in
        assert set(cats[cat]) == names, cat
        assert all(not isinstance(v, dict) for v in cats[cat].values())  # SAEBench: metrics are flat
    for detail in res["eval_result_details"]:
        assert set(detail) == DETAIL_FIELDS[eval_type]


def test_suites_write_saebench_results_and_compare_reads_them(tiny_model, tiny_store, tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    d = tiny_store.d_model(TINY_HOOK)
    for name, seed in (("a", 0), ("b", 1)):
        SAE(SAEConfig("topk", d_in=d, d_sae=4 * d, k=4, hook_name=TINY_HOOK, model_name="tiny"), seed=seed).save(
            run / "saes" / name)
    m = evaluate(run / "saes" / "a", tiny_store, tiny_model, n_contexts=2, context_length=32, corpus="pydoc",
                 suite="all", probe_datasets="corpus-source", probe_train=6, probe_test=4, probe_k=[1, 2],
                 absorption_words=60)
    out = run / "saes" / "a" / "saebench"
    for eval_type in ("core", "sparse_probing", "absorption_first_letter"):
        on_disk = json.loads((out / f"{eval_type}.json").read_text())
        _check_schema(on_disk, eval_type)
        assert on_disk["eval_id"] == m["saebench"][eval_type]["eval_id"]
    core = json.loads((out / "core.json").read_text())
    assert len(core["eval_result_details"]) == 4 * d
    assert core["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(m["l0"])
    assert core["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == pytest.approx(
        m["ce_loss_recovered"])
    assert json.loads((out / "summary.json").read_text())["l0"] == pytest.approx(m["l0"])
    assert (out / "saebench.png").stat().st_size > 1000
    evaluate(run / "saes" / "b", tiny_store, splice=False, suite="core")
    capsys.readouterr()
    assert main(["eval", "--compare", str(run / "saes" / "a"), str(run / "saes" / "b")]) == 0
    printed = capsys.readouterr().out
    assert "sae_top_1_test_accuracy" in printed and "explained_variance" in printed
    with open(run / "saebench" / "compare.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["sae"].rsplit("/", 1)[-1] for r in rows] == ["a", "b"]
    assert float(rows[0]["l0"]) == pytest.approx(m["l0"])
    assert rows[1]["sae_top_1_test_accuracy"] == ""  # b ran only the core eval
    assert len(json.loads((run / "saebench" / "compare.json").read_text())["saes"]) == 2


def test_pages_show_the_saebench_summary_of_an_sae_that_has_one(tmp_path):
    from pages_testdata import OTHER, SAE, make_run, word_tokenizer
    from saecore.pages import build_pages
    from saecore.run import Run, saebench_plot, saebench_summary

    data = make_run(tmp_path)
    sae_dir = Run(data.run).sae(SAE)
    saebench_summary(sae_dir).parent.mkdir(parents=True)
    saebench_summary(sae_dir).write_text(json.dumps({"l0": 31.5, "mean_absorption_fraction_score": None}))
    saebench_plot(sae_dir).write_bytes(b"\x89PNG fake")
    build_pages(data.run, tokenizer=word_tokenizer(), activations=data.activations, progress=False)

    def sae_js(name: str) -> dict:
        text = (Run(data.run).pages / name / "sae.js").read_text()
        return json.loads(text.removeprefix("window.SAECORE_SAE=").rstrip().removesuffix(";"))

    assert sae_js(SAE)["saebench"] == {"metrics": {"l0": 31.5, "mean_absorption_fraction_score": None},
                                       "plot": "saebench.png"}
    assert (Run(data.run).pages / SAE / "saebench.png").read_bytes() == b"\x89PNG fake"
    assert sae_js(OTHER)["saebench"] is None
