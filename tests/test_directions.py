"""Encoder vs decoder directions: ``steer --direction`` and the encoder logit lens, each held to a plain
torch reference on the tiny model; both lists and the synthetic text on the feature page."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from saecore import hooks, interventions, models, tables
from saecore.interventions import ClampEdit, DirectionEdit, splice, steering_directions
from saecore.logit_lens import write_logit_lens

HOOK = "blocks.2.hook_resid_post"
PROMPT = "The cat sat on the mat because"


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def sae(tiny):
    """A ReLU SAE whose encoder columns are NOT its decoder rows (cosine about 0.6), and decoder rows of
    varied norms, so the direction and the norm convention both matter."""
    from saecore.sae import SAE, SAEConfig

    model, _ = tiny
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    out = SAE(SAEConfig(architecture="relu", d_in=d, d_sae=32, hook_name=HOOK, model_name="tiny"))
    dec = torch.randn(32, d, generator=g)
    dec = dec / dec.norm(dim=1, keepdim=True) * torch.linspace(0.5, 2.0, 32)[:, None]
    with torch.no_grad():
        out.W_dec.copy_(dec)
        out.W_enc.copy_((dec + 1.2 * dec.norm(dim=1, keepdim=True) * torch.randn(32, d, generator=g) / d**0.5).T * 3)
    return out.eval()


def _logits(model, ids, sae=None, edit=None):
    with torch.no_grad():
        if edit is None:
            return model(input_ids=ids).logits[0, -1]
        with splice(model, sae, edit):
            return model(input_ids=ids).logits[0, -1]


def test_encoder_direction_is_the_encoder_column_at_the_decoder_norm(sae):
    rows = steering_directions(sae, [4, 9], "encoder")
    for row, f in zip(rows, (4, 9)):
        enc, dec = sae.W_enc[:, f].detach(), sae.W_dec[f].detach()
        torch.testing.assert_close(row.norm(), dec.norm())
        assert float(torch.nn.functional.cosine_similarity(row, enc, dim=0)) == pytest.approx(1.0, abs=1e-6)
    assert steering_directions(sae, [4], "decoder") is None  # the plain clamp, unchanged


def test_encoder_steering_equals_a_plain_reference_and_differs_from_decoder_steering(tiny, sae):
    model, tok = tiny
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    f, value = 7, 30.0
    u = sae.W_enc[:, f].detach() / sae.W_enc[:, f].detach().norm() * sae.W_dec[f].detach().norm()

    def reference(act):  # x + (c - f(x)) * u at every position, written out by hand
        return act + (value - sae.encode(act)[..., f:f + 1]) * u

    with torch.no_grad(), hooks.edit(model, HOOK, reference):
        want = model(input_ids=ids).logits[0, -1]
    base = _logits(model, ids)
    enc = _logits(model, ids, sae, DirectionEdit(sae, {f: value}, steering_directions(sae, [f], "encoder")))
    dec = _logits(model, ids, sae, ClampEdit(sae, {f: value}))
    torch.testing.assert_close(enc, want, rtol=1e-4, atol=1e-4)
    assert float((enc - base).abs().max()) > 0.05  # it steers
    assert float((enc - dec).abs().max()) > 0.05  # and not the way the decoder row does
    dec_as_rows = _logits(model, ids, sae, DirectionEdit(sae, {f: value}, sae.W_dec[[f]].detach()))
    torch.testing.assert_close(dec_as_rows, dec, rtol=1e-5, atol=1e-5)


def test_steer_by_encoder_direction_changes_the_completion(tiny, sae):
    model, tok = tiny
    dec = interventions.steer(model, tok, sae, PROMPT, 7, value=60.0, max_new_tokens=6)
    enc = interventions.steer(model, tok, sae, PROMPT, 7, value=60.0, max_new_tokens=6,
                              directions=steering_directions(sae, [7], "encoder"))
    assert enc.baseline_ids == dec.baseline_ids
    assert enc.steered_ids != enc.baseline_ids and enc.steered_ids != dec.steered_ids


def test_file_direction_is_rescaled_to_the_decoder_norm(tmp_path, sae):
    v = np.arange(sae.cfg.d_in, dtype=np.float32) - 20
    np.save(tmp_path / "v.npy", v)
    (row,) = steering_directions(sae, [5], tmp_path / "v.npy")
    torch.testing.assert_close(row, torch.from_numpy(v) / float(np.linalg.norm(v)) * sae.W_dec[5].detach().norm())
    np.save(tmp_path / "two.npy", np.stack([v, -v]))
    rows = steering_directions(sae, [5, 6], tmp_path / "two.npy")
    torch.testing.assert_close(rows[1] / rows[1].norm(), -rows[0] / rows[0].norm())


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"), (b"not numpy", "not a NumPy"), (np.zeros((3, 7)), "shape"),
    (np.full(64, np.nan), "NaN"), (np.zeros(64), "all zero"), (np.array(["a"] * 64), "real numbers"),
])
def test_bad_direction_files_are_named(tmp_path, sae, content, message):
    path = tmp_path / "d.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(ValueError, match=message) as err:
        steering_directions(sae, [1], path)
    assert str(path) in str(err.value)


def test_encoder_logit_lens_equals_w_enc_times_w_u(tiny, sae, tmp_path):
    model, tok = tiny
    path = write_logit_lens(sae, model, tok, tmp_path / "enc.parquet", top=5, batch_features=7,
                            apply_norm_weight=False, progress=False, source="encoder")
    enc = sae.W_enc.detach().double().T  # [d_sae, d_in]
    enc = enc / enc.norm(dim=1, keepdim=True) * sae.W_dec.detach().double().norm(dim=1, keepdim=True)
    ref = enc @ model.lm_head.weight.detach().double().T  # [d_sae, vocab]
    table = tables.LOGIT_LENS_ENCODER.read_file(path).to_pylist()
    assert len(table) == 32 * 2 * 5
    for r in table:
        order = ref[r["feature"]].argsort(descending=r["kind"] == "promote")
        assert r["token_id"] == int(order[r["rank"]])
        assert r["value"] == pytest.approx(float(ref[r["feature"], r["token_id"]]), rel=1e-4, abs=1e-4)
    meta = json.loads(pq.read_schema(path).metadata[b"saecore.logit_lens"])
    assert meta == {"apply_norm_weight": False, "top": 5, "source": "encoder"}


def test_feature_page_shows_both_lenses_and_escapes_synthetic_text(tmp_path):
    from pages_testdata import SAE, make_run, word_tokenizer
    from saecore.pages import build_pages
    from saecore.run import Run, maximise_dir, maximise_file

    run = make_run(tmp_path).run
    index = Run(run).index(SAE)
    lens = pq.read_table(tables.LOGIT_LENS.path(index))
    upper = [t.upper() for t in lens["token"].to_pylist()]  # tells the encoder table's rows apart
    tables.LOGIT_LENS_ENCODER.write(lens.set_column(4, "token", pa.array(upper)), tables.LOGIT_LENS_ENCODER.path(index))
    hostile = "</script><img src=x onerror=alert(1)>"
    seq = {"tokens": [hostile, " ok"], "activation": 2.5, "pre": 2.5, "retokenized_activation": 2.0, "nll": None}
    result = {"gcg": [seq], "random": [seq | {"activation": 1.0}], "evaluations_per_search": 10,
              "config": {"position": "last", "fluency": 0.0}, "dataset_top": [{"value": 3.0, "text": hostile}]}
    maximise_dir(Run(run).sae(SAE)).mkdir(parents=True)
    (maximise_dir(Run(run).sae(SAE)) / maximise_file(3)).write_text(json.dumps(result))
    build_pages(run, tokenizer=word_tokenizer(), progress=False)
    page = (run / "pages" / SAE / "f" / "0" / "3.html").read_text()
    assert hostile not in page  # inside the page data, "<" is escaped
    data = json.loads(re.search(r"window\.SAECORE_FEATURE=(.*?);</script>", page).group(1))
    assert data["logit_lens"]["promote"]
    for kind in ("promote", "suppress"):
        assert data["logit_lens_encoder"][kind] == [[t.upper(), i, v] for t, i, v in data["logit_lens"][kind]]
    assert data["maximise"]["gcg"][0]["tokens"][0] == hostile and data["maximise"]["dataset"][0]["text"] == hostile
    assert data["maximise"]["random"][0]["a"] == 1.0


def test_cli_steer_by_encoder_direction_names_it(sae, tiny_model_dir, tmp_path, capsys):
    from saecore.cli import main

    saved, sae.cfg.model_name = sae.cfg.model_name, str(tiny_model_dir)
    try:
        sae_dir = sae.save(tmp_path / "saes" / "s")
    finally:
        sae.cfg.model_name = saved
    argv = ["steer", "--sae", str(sae_dir), "--feature", "7", "--value", "60", "--prompt", PROMPT,
            "--max-new-tokens", "3", "--device", "cpu", "--direction", "encoder"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cos = float(torch.nn.functional.cosine_similarity(sae.W_enc[:, 7], sae.W_dec[7], dim=0))
    assert f"direction: encoder columns, rescaled to the decoder rows' norms (cosine with the decoder row: #7 {cos:.3f})" in out


@pytest.mark.parametrize("content", ["[1, 2]", '{"gcg": 5}', "{not json"])
def test_a_damaged_maximise_result_is_named_by_pages(tmp_path, content):
    from pages_testdata import SAE, make_run, word_tokenizer
    from saecore.errors import CorruptDataError
    from saecore.pages import build_pages
    from saecore.run import Run, maximise_dir, maximise_file

    run = make_run(tmp_path).run
    path = maximise_dir(Run(run).sae(SAE)) / maximise_file(2)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(CorruptDataError, match=re.escape(str(path))):
        build_pages(run, tokenizer=word_tokenizer(), progress=False)
