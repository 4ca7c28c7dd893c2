"""Steering, ablation, attribution and concept probes through the SAE splice.

Fast tests use the tiny randomly initialised Llama (real tokenizer) and an SAE with random weights
built through the real SAE class; a few slow ones use the real SmolLM2 model.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from saecore import hooks, interventions, models
from saecore.interventions import ClampEdit, PointEdit, splice

torch.set_num_threads(2)

PROMPT = "John says, 'I want to be alone right now.' John feels"


def make_sae(d_in: int, d_sae: int, hook: str, model_name: str = "tiny", seed: int = 0, dtype=torch.float32):
    """A ReLU SAE with random weights (encoder = decoder transpose, so features respond to inputs)."""
    from saecore.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, hook_name=hook, model_name=model_name))
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T * 3.0)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.01)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.01)
    return sae.to(dtype).eval()


@pytest.fixture(scope="module")
def tiny():
    model, tok = models.tiny_llama(seed=0)
    return model, tok


@pytest.fixture(scope="module")
def sae_mid(tiny):
    model, _ = tiny
    return make_sae(model.config.hidden_size, 256, "blocks.2.hook_resid_post")


def _ids(tok, prompt=PROMPT):
    return tok(prompt, return_tensors="pt")["input_ids"]


# ----------------------------------------------------------------------------- the splice


@torch.no_grad()
def test_unclamped_splice_reproduces_clean_logits(tiny, sae_mid):
    model, tok = tiny
    ids = _ids(tok)
    clean = model(input_ids=ids).logits
    with splice(model, sae_mid) as fn:
        spliced = model(input_ids=ids).logits
    # The SAE really ran (its features were computed), and yet nothing changed.
    assert fn.last_features is not None and fn.last_features.shape == (1, ids.shape[1], 256)
    assert (fn.last_features > 0).any()
    torch.testing.assert_close(spliced, clean, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_clamp_edits_f_and_keeps_the_clean_error_term(sae_mid):
    torch.manual_seed(1)
    x = torch.randn(2, 5, sae_mid.cfg.d_in) * 0.5
    feats = {3: 4.0, 17: 0.0}
    out = ClampEdit(sae_mid, feats)(x)
    f = sae_mid.encode(x)
    f_clamped = f.clone()
    f_clamped[..., 3], f_clamped[..., 17] = 4.0, 0.0
    error = x - sae_mid.decode(f)
    # x' = decode(f') + (x - decode(f)): the error term is the clean one, so the edit survives in full.
    torch.testing.assert_close(out, sae_mid.decode(f_clamped) + error, rtol=1e-5, atol=1e-5)
    expected_shift = (4.0 - f[..., 3:4]) * sae_mid.W_dec[3] + (0.0 - f[..., 17:18]) * sae_mid.W_dec[17]
    torch.testing.assert_close(out - x, expected_shift, rtol=1e-4, atol=1e-5)
    # Re-encoding the result shows feature 3 near its clamp (the random encoder is not exactly the inverse).
    assert float((sae_mid.encode(out)[..., 3] - f[..., 3]).mean()) > 1.0


@torch.no_grad()
def test_clamp_only_at_chosen_positions(sae_mid):
    x = torch.randn(1, 6, sae_mid.cfg.d_in) * 0.5
    out = ClampEdit(sae_mid, {5: 3.0}, positions=[1, -1], prompt_length=6)(x)
    changed = (out - x).abs().amax(-1)[0] > 0  # [T]
    assert changed.tolist() == [False, True, False, False, False, True]


@torch.no_grad()
def test_kv_cache_generation_matches_full_recompute_under_a_positional_clamp(tiny, sae_mid):
    """The edit tracks absolute positions across KV-cache steps: same tokens as recomputing from scratch."""
    model, tok = tiny
    ids = _ids(tok, "The cat sat on the")
    T, n_new = ids.shape[1], 6
    clamp = {7: 6.0}
    with splice(model, sae_mid, ClampEdit(sae_mid, clamp, positions=[2, T + 1, T + 3])):
        cached = interventions.greedy_generate(model, ids, n_new)
    seq = ids
    for _ in range(n_new):  # no cache: each step a fresh edit over the whole sequence
        with splice(model, sae_mid, ClampEdit(sae_mid, clamp, positions=[2, T + 1, T + 3])):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert cached.tolist() == seq[0, T:].tolist()


def test_steer_at_last_layer_emits_the_features_top_promoted_token(tiny):
    """Clamping hard just before the unembedding makes the feature's top logit-lens token the argmax."""
    from saecore.logit_lens import lens_scores

    model, tok = tiny
    last = f"blocks.{model.config.num_hidden_layers - 1}.hook_resid_post"
    sae = make_sae(model.config.hidden_size, 64, last, seed=3)
    feature = 11
    top_token = int(lens_scores(sae.W_dec[feature : feature + 1], model)[0].argmax())
    res = interventions.steer(model, tok, sae, "Once upon a time", feature, value=500.0, max_new_tokens=5)
    assert res.clamps == {feature: 500.0}
    assert res.steered_ids == [top_token] * 5
    assert res.baseline_ids != res.steered_ids
    assert res.steered == tok.decode([top_token] * 5)


def test_steer_scale_uses_max_activation_from_index_then_prompt(tiny, sae_mid, tmp_path):
    model, tok = tiny
    ids = _ids(tok, "Once upon a time")
    f = interventions.feature_activations(model, sae_mid, ids)[0]
    feature = int(f.max(0).values.argmax())
    res = interventions.steer(model, tok, sae_mid, "Once upon a time", feature, scale=2.0, max_new_tokens=2)
    assert res.max_source == "prompt"
    assert res.clamps[feature] == pytest.approx(2.0 * float(f[:, feature].max()), rel=1e-5)
    # With an index, its stats table wins.
    index_dir = tmp_path / "index" / "sae"
    n = sae_mid.cfg.d_sae
    _write_stats_index(index_dir, np.full(n, 1.5, np.float32), complete=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):  # an interrupted `saecore index` is refused
        interventions.steer(model, tok, sae_mid, "Once upon a time", feature, scale=10.0, max_new_tokens=2,
                            index_dir=index_dir)
    _write_stats_index(index_dir, np.full(n, 1.5, np.float32))
    res = interventions.steer(
        model, tok, sae_mid, "Once upon a time", feature, scale=10.0, max_new_tokens=2, index_dir=index_dir
    )
    assert res.max_source == "index" and res.clamps == {feature: pytest.approx(15.0)}


def test_steer_rejects_scaling_a_feature_that_never_fires(tiny, sae_mid):
    model, tok = tiny
    f = interventions.feature_activations(model, sae_mid, _ids(tok, "Hi"))[0]
    silent = int((f.max(0).values <= 0).nonzero()[0])
    with pytest.raises(ValueError, match=rf"features \[{silent}\] have max activation 0"):
        interventions.steer(model, tok, sae_mid, "Hi", silent, scale=10.0, max_new_tokens=2)


# ----------------------------------------------------------------------------- attribution / ablation


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model and an SAE in float64, so linear estimates can be checked to many digits."""
    model, tok = models.tiny_llama(seed=0)
    model = model.double()
    sae = make_sae(model.config.hidden_size, 128, "blocks.1.hook_resid_post", seed=5, dtype=torch.float64)
    return model, tok, sae


def test_attribution_equals_measured_effect_of_a_small_scaling(tiny64):
    """attribution x eps ≈ logit_diff(clean) - logit_diff(feature scaled by 1-eps), unit by unit."""
    model, tok, sae = tiny64
    target, baseline = " sad", " happy"
    att = interventions.attribution(model, tok, sae, PROMPT, target, baseline)
    T = len(att.tokens)
    assert att.attribution.shape == (T, 128)
    # The largest |attribution| units at the last position and at earlier ones (effects through attention).
    last = att.attribution[-1].abs().topk(4).indices
    earlier = att.attribution[:-1].abs().flatten().topk(4).indices
    units = [(T - 1, int(i)) for i in last] + [(int(i) // 128, int(i) % 128) for i in earlier]
    # eps trades the second-order term against rounding: Llama's RMSNorm computes in float32 even in a
    # float64 model, which adds ~1e-8 of noise to any measured effect.
    eps = 1e-3
    measured = interventions.ablation_effects(model, tok, sae, PROMPT, target, baseline, units, factor=1 - eps)
    predicted = np.array([float(att.attribution[p, i]) * eps for p, i in units])
    np.testing.assert_allclose(measured, predicted, rtol=1e-2, atol=1e-12)
    # Inactive features have zero attribution (and their ablation changes nothing).
    assert float(att.attribution[att.activations == 0].abs().max()) == 0.0


def test_attribution_logit_diff_is_the_clean_models(tiny64):
    model, tok, sae = tiny64
    t, b = tok.encode(" sad", add_special_tokens=False)[0], tok.encode(" happy", add_special_tokens=False)[0]
    with torch.no_grad():
        logits = model(input_ids=_ids(tok)).logits[0, -1]
    att = interventions.attribution(model, tok, sae, PROMPT, " sad", " happy")
    assert att.logit_diff == pytest.approx(float(logits[t] - logits[b]), rel=1e-9)


def test_ablation_keeps_error_term_and_zeroes_one_unit(tiny64):
    """Ablating (p, i) equals a forward where x[p] is shifted by exactly -f[p, i] * W_dec[i]."""
    model, tok, sae = tiny64
    ids = _ids(tok)
    f = interventions.feature_activations(model, sae, ids)[0]
    p, i = 4, int(f[4].argmax())
    t, b = tok.encode(" sad", add_special_tokens=False)[0], tok.encode(" happy", add_special_tokens=False)[0]

    def shift(act):
        act = act.clone()
        act[0, p] -= f[p, i] * sae.W_dec[i]
        return act

    with torch.no_grad():
        clean = model(input_ids=ids).logits[0, -1]
        with hooks.edit(model, sae.cfg.hook_name, shift):
            ref = model(input_ids=ids).logits[0, -1]
    expected = float((clean[t] - clean[b]) - (ref[t] - ref[b]))
    got = interventions.ablation_effects(model, tok, sae, PROMPT, " sad", " happy", [(p, i)])
    assert got[0] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert abs(expected) > 0


def test_attribute_report_rankings_and_overlaps(tiny64):
    model, tok, sae = tiny64
    pos = list(range(6, 14))  # the prompt's last 8 tokens keep the exhaustive pass below cheap
    rep = interventions.attribute(model, tok, sae, PROMPT, " sad", " happy", top=5, candidates=8, positions=pos)
    assert {r.position for r in rep.by_activation + rep.by_attribution + rep.by_ablation} <= set(pos)
    assert len(rep.by_activation) == len(rep.by_attribution) == len(rep.by_ablation) == 5
    acts = [r.activation for r in rep.by_activation]
    assert acts == sorted(acts, reverse=True)
    assert all(r.ablation is not None for r in rep.by_ablation)
    abl = [abs(r.ablation) for r in rep.by_ablation]
    assert abl == sorted(abl, reverse=True)
    assert 5 < rep.n_ablated <= 16 and rep.n_active > rep.n_ablated

    def top(rows):
        return {(r.position, r.feature) for r in rows}

    assert rep.overlaps["attribution∩ablation"] == len(top(rep.by_attribution) & top(rep.by_ablation))
    assert rep.overlaps["activation∩ablation"] == len(top(rep.by_activation) & top(rep.by_ablation))
    # Exhaustive ablation measures every active unit; its top unit is the true argmax of |effect|.
    full = interventions.attribute(
        model, tok, sae, PROMPT, " sad", " happy", top=5, exhaustive=True, batch_size=64, positions=pos
    )
    assert full.n_ablated == full.n_active == rep.n_active
    best = full.by_ablation[0]
    assert abs(best.ablation) >= max(abs(r.ablation) for r in rep.by_ablation) - 1e-12
    # By default every position but the first (the attention sink) counts.
    default = interventions.attribute(model, tok, sae, PROMPT, " sad", " happy", top=3, candidates=2)
    f = interventions.feature_activations(model, sae, _ids(tok))[0]
    assert default.n_active == int((f[1:] > 0).sum())
    assert min(r.position for r in default.by_activation + default.by_attribution + default.by_ablation) >= 1


# ----------------------------------------------------------------------------- probe


def test_probe_lists_top_features_on_the_final_token(tiny, sae_mid):
    model, tok = tiny
    prompts = ["The Golden Gate Bridge", "def main():"]
    rows = interventions.probe(model, tok, sae_mid, prompts, top=3)
    for prompt in prompts:
        f = interventions.feature_activations(model, sae_mid, _ids(tok, prompt))[0, -1]
        mine = [r for r in rows if r.prompt == prompt]
        assert [r.rank for r in mine] == [0, 1, 2]
        assert [r.feature for r in mine] == f.topk(3).indices.tolist()
        assert [r.activation for r in mine] == pytest.approx(f.topk(3).values.tolist())


def _write_stats_index(index_dir, maxes, complete=True):
    """A stats table in the declared schema (only ``max`` matters here) and, if complete, its meta.json."""
    from saecore import tables

    index_dir.mkdir(parents=True, exist_ok=True)
    n = len(maxes)
    zeros = np.zeros(n)
    stats = tables.STATS.table({"feature": np.arange(n), "count": np.ones(n, np.uint64), "density": zeros, "sum": zeros,
                                "max": maxes, "mean_nonzero": zeros})
    pq.write_table(stats, tables.STATS.path(index_dir))
    if complete:
        meta = tables.seal_meta({"format": tables.INDEX_FORMAT, "d_sae": n, "n_tokens": 1},
                                {tables.STATS.file: tables.STATS.path(index_dir)})
        (index_dir / "meta.json").write_text(json.dumps(meta))


def test_probe_reads_max_activation_and_logit_lens_from_the_index(tiny, sae_mid, tmp_path):
    from saecore.logit_lens import read_logit_lens, write_logit_lens

    model, tok = tiny
    n = sae_mid.cfg.d_sae
    maxes = np.linspace(1.0, 2.0, n).astype(np.float32)
    _write_stats_index(tmp_path, maxes)
    write_logit_lens(sae_mid, model, tok, tmp_path / "logit_lens.parquet", top=5, progress=False)
    rows = interventions.probe(model, tok, sae_mid, ["The Golden Gate Bridge"], top=3, index_dir=tmp_path)
    lens = read_logit_lens(tmp_path / "logit_lens.parquet", kind="promote")
    for r in rows:
        assert r.fraction_of_max == pytest.approx(r.activation / float(maxes[r.feature]), rel=1e-5)
        assert r.promotes == " ".join(repr(t) for t in lens[r.feature])


# ----------------------------------------------------------------------------- errors


def test_bad_feature_id_names_the_id_and_the_range(tiny, sae_mid):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"feature id 256 is out of range .*valid ids are 0\.\.255"):
        interventions.steer(model, tok, sae_mid, "Hi", 256, value=1.0)
    with pytest.raises(ValueError, match=r"feature id -1 is out of range"):
        ClampEdit(sae_mid, {-1: 1.0})
    with pytest.raises(ValueError, match=r"feature id 999"):
        PointEdit(sae_mid, [0], [999])


def test_hook_mismatch_names_both(tiny):
    model, tok = tiny
    sae = make_sae(model.config.hidden_size, 32, "blocks.12.hook_resid_post", model_name="smollm2-135m")
    with pytest.raises(ValueError, match=r"blocks\.12\.hook_resid_post.*smollm2-135m.*not a hook point of model.*tiny"):
        interventions.steer(model, tok, sae, "Hi", 0, value=1.0)
    wide = make_sae(576, 32, "blocks.1.hook_resid_post", model_name="smollm2-135m")
    with pytest.raises(ValueError, match=r"d_in=576 but model .* has d_model=64"):
        interventions.attribution(model, tok, wide, "Hi there", " sad", " happy")


def test_prompt_longer_than_context(tiny, sae_mid):
    model, tok = tiny  # 512 positions
    long_prompt = " word" * 600
    with pytest.raises(ValueError, match=r"prompt is 600 tokens.*longer than the context .*512 positions"):
        interventions.probe(model, tok, sae_mid, [long_prompt])
    with pytest.raises(ValueError, match=r"prompt is 500 tokens \+ 30 new tokens = 530"):
        interventions.steer(model, tok, sae_mid, " word" * 500, 0, value=1.0, max_new_tokens=30)


def test_multi_token_target_is_rejected(tiny, sae_mid):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"'xylophonically' is \d+ tokens"):
        interventions.attribution(model, tok, sae_mid, PROMPT, "xylophonically", " happy")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny, sae_mid):
    """A run directory with the tiny model saved as a local HF folder and the SAE under saes/."""
    model, tok = tiny
    root = tmp_path_factory.mktemp("run")
    model_dir = root / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sae_dir = root / "saes" / "mid"
    saved_name, sae_mid.cfg.model_name = sae_mid.cfg.model_name, str(model_dir)
    try:
        sae_mid.save(sae_dir)
    finally:
        sae_mid.cfg.model_name = saved_name
    return root, sae_dir


def _cli(argv):
    from saecore import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_steer_prints_both_completions(tiny_run):
    _, sae_dir = tiny_run
    code, out, err = _cli(
        [
            "steer",
            "--sae",
            str(sae_dir),
            "--feature",
            "3",
            "--value",
            "40",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, err
    assert "baseline" in out and "steered" in out and "#3=40" in out


def test_cli_attribute_and_probe(tiny_run):
    root, sae_dir = tiny_run
    code, out, err = _cli(
        [
            "attribute",
            "--sae",
            str(sae_dir),
            "--prompt",
            PROMPT,
            "--target",
            " sad",
            "--baseline",
            " happy",
            "--top",
            "5",
            "--candidates",
            "6",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, err
    assert "by |attribution|" in out and "attribution∩ablation" in out
    prompts = root / "prompts.txt"
    prompts.write_text("The Golden Gate Bridge\n\ndef main():\n")
    code, out, err = _cli(
        [
            "probe",
            "--sae",
            str(sae_dir),
            "--prompts",
            str(prompts),
            "--logit-lens",
            "--logit-lens-top",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, err
    lens = root / "index" / "mid" / "logit_lens.parquet"
    assert lens.exists() and pq.read_table(lens).num_rows == 256 * 2 * 3
    assert "Golden Gate" in out and "def main" in out


def test_cli_logit_lens_writes_the_table_and_shows_features(tiny_run, tmp_path):
    _, sae_dir = tiny_run
    out = tmp_path / "lens.parquet"
    code, stdout, err = _cli(
        ["logit-lens", "--sae", str(sae_dir), "--top", "3", "--out", str(out), "--show", "5", "--device", "cpu"]
    )
    assert code == 0, err
    table = pq.read_table(out)
    assert table.num_rows == 256 * 2 * 3
    from saecore.logit_lens import read_logit_lens

    promoted = read_logit_lens(out, [5], "promote")[5]
    assert len(promoted) == 3 and f"promotes:  {promoted!r}" in stdout
    code, _, err = _cli(["logit-lens", "--sae", str(sae_dir), "--show", "256", "--out", str(out), "--device", "cpu"])
    assert code == 2 and "feature id 256 is outside the valid range 0..255" in err
    assert pq.read_table(out).num_rows == 256 * 2 * 3  # a refused run leaves the table as it was


def test_cli_errors_exit_2_with_message(tiny_run):
    _, sae_dir = tiny_run
    code, _, err = _cli(
        ["steer", "--sae", str(sae_dir), "--feature", "1000", "--value", "1", "--prompt", "Hi", "--device", "cpu"]
    )
    assert code == 2 and "feature id 1000 is out of range" in err


# ----------------------------------------------------------------------------- real model (slow)

# A late layer, so that a decoder direction's logit lens says what it does to the output (a direction
# written at an early layer passes through many blocks before reaching the unembedding).
REAL_HOOK = "blocks.26.hook_resid_post"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 and an SAE briefly trained on its real activations (a few thousand tokens, CPU)."""
    from saecore.harvesting import HarvestConfig, harvest
    from saecore.training import train

    loaded = models.load("smollm2-135m", device="cpu", dtype=torch.float32)
    model, tok = loaded
    root = tmp_path_factory.mktemp("smol-run")
    store = harvest(
        loaded,  # recorded as "smollm2-135m", its LoadedModel name
        "default",
        out=root / "activations.zarr",
        cfg=HarvestConfig(
            hooks=[REAL_HOOK], context_length=64, batch_size=8, dtype="float32", max_tokens=4096, device="cpu", progress=False
        ),
    )
    sae = train(
        store,
        root / "saes" / "topk",
        architecture="topk",
        d_sae=512,
        k=16,
        batch_size=256,
        num_tokens=4 * store.num_rows,
        holdout_fraction=0.0,
        device="cpu",
        progress=False,
        checkpoint_every_steps=10_000,
    )
    return model, tok, sae.eval()


@pytest.mark.slow
def test_real_model_splice_is_exact_and_steering_raises_promoted_tokens(smol):
    from saecore.logit_lens import lens_scores

    model, tok, sae = smol
    prompt = "The capital of France is"
    ids = _ids(tok, prompt)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice(model, sae) as fn:
            spliced = model(input_ids=ids).logits
        x = hooks.run_to_hooks(model, ids, [REAL_HOOK])[REAL_HOOK][0]  # [T, d]
    assert (fn.last_features > 0).any()
    torch.testing.assert_close(spliced, clean, rtol=1e-6, atol=1e-6)
    # The live feature whose decoder direction has the strongest logit-lens effect; clamp it so that its
    # direction is twice as long as the typical residual vector here.
    scores = lens_scores(sae.W_dec.detach(), model)  # [d_sae, vocab]
    feature = int(scores.amax(1).argmax())
    promoted = scores[feature].topk(10).indices
    value = 2.0 * float(x[1:].norm(dim=-1).median()) / float(sae.W_dec[feature].norm())
    res = interventions.steer(model, tok, sae, prompt, feature, value=value, max_new_tokens=8)
    assert res.steered_ids != res.baseline_ids
    with torch.no_grad(), splice(model, sae, ClampEdit(sae, {feature: value})):
        steered = model(input_ids=ids).logits[0, -1]
    shift = steered - clean[0, -1]  # [vocab]
    z = (float(shift[promoted].mean()) - float(shift.mean())) / float(shift.std())
    assert z > 2.0, f"promoted tokens' logits rose only {z:.2f} standard deviations above the vocabulary's"


@pytest.mark.slow
def test_real_model_attribution_matches_small_ablation_and_errors(smol):
    model, tok, sae = smol
    att = interventions.attribution(model, tok, sae, PROMPT, " sad", " happy")
    d = att.attribution.shape[1]
    flat = att.attribution.abs().flatten().topk(6).indices
    units = [(int(i) // d, int(i) % d) for i in flat]
    eps = 0.01
    measured = interventions.ablation_effects(model, tok, sae, PROMPT, " sad", " happy", units, factor=1 - eps)
    predicted = np.array([float(att.attribution[p, i]) * eps for p, i in units])
    np.testing.assert_allclose(measured, predicted, rtol=0.05, atol=1e-4)
    # Errors on the real model: hook mismatch, bad feature id, prompt over the context.
    other = make_sae(64, 16, "blocks.2.hook_resid_post", model_name="tiny")
    with pytest.raises(ValueError, match=r"expects d_in=64 but model '[^']*smollm2-135m[^']*' has d_model=576"):
        interventions.probe(model, tok, other, ["Hi"])
    deep = make_sae(576, 16, "blocks.40.hook_resid_post", model_name="other-model")
    with pytest.raises(ValueError, match=r"'blocks.40.hook_resid_post' .*'other-model'.* of model '[^']*smollm2-135m[^']*'"):
        interventions.steer(model, tok, deep, "Hi", 0, value=1.0)
    with pytest.raises(ValueError, match=r"feature id 512 is out of range .*valid ids are 0\.\.511"):
        interventions.steer(model, tok, sae, "Hi", 512, value=1.0)
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"longer than the context .*{ctx} positions"):
        interventions.probe(model, tok, sae, [" word" * (ctx + 1)])
