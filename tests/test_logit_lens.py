"""The logit-lens table: per feature, the tokens its decoder direction promotes and suppresses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore import models
from saecore.logit_lens import (
    final_norm_gain,
    iter_logit_lens,
    lens_scores,
    read_logit_lens,
    write_logit_lens,
)

torch.set_num_threads(2)


def make_sae(d_in: int, d_sae: int, hook: str = "blocks.3.hook_resid_post", seed: int = 0):
    from saecore.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, hook_name=hook, model_name="tiny"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
    return sae.eval()


@pytest.fixture(scope="module")
def tiny():
    model, tok = models.tiny_llama(seed=0)
    with torch.no_grad():  # a non-trivial final-norm gain, so applying it matters
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size))
    return model, tok


def _reference(sae, model, apply_norm_weight: bool) -> torch.Tensor:
    W_dec = sae.W_dec.detach().double()
    if apply_norm_weight:
        W_dec = W_dec * model.model.norm.weight.detach().double()
    return W_dec @ model.lm_head.weight.detach().double().T  # [d_sae, vocab]


def test_table_matches_dense_reference_and_schema(tiny, tmp_path):
    model, tok = tiny
    sae = make_sae(model.config.hidden_size, 37)
    path = write_logit_lens(
        sae, model, tok, tmp_path / "index" / "s" / "logit_lens.parquet", top=4, batch_features=10, progress=False
    )
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == pa.schema(
        [
            ("feature", pa.uint32()),
            ("kind", pa.string()),
            ("rank", pa.uint16()),
            ("token_id", pa.uint32()),
            ("token", pa.string()),
            ("value", pa.float32()),
        ]
    )
    assert table.num_rows == 37 * 2 * 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["logit_lens.parquet", "logit_lens.parquet.sha256"]  # no partial file
    ref = _reference(sae, model, apply_norm_weight=True)
    rows = table.to_pylist()
    for r in rows:
        f, rank = r["feature"], r["rank"]
        order = ref[f].argsort(descending=r["kind"] == "promote")
        assert r["token_id"] == int(order[rank])
        assert r["value"] == pytest.approx(float(ref[f, r["token_id"]]), rel=1e-4, abs=1e-4)
        assert r["token"] == tok.decode([r["token_id"]])
    promote = [r for r in rows if r["kind"] == "promote" and r["feature"] == 5]
    assert [r["value"] for r in promote] == sorted((r["value"] for r in promote), reverse=True)
    assert read_logit_lens(path, [5], top=2) == {5: [r["token"] for r in promote[:2]]}
    suppress = read_logit_lens(path, [5], kind="suppress")[5]
    assert suppress == [tok.decode([int(i)]) for i in ref[5].argsort()[:4]]


def test_norm_weight_changes_scores_and_can_be_left_out(tiny):
    model, _ = tiny
    sae = make_sae(model.config.hidden_size, 8)
    with_gain = lens_scores(sae.W_dec.detach(), model, apply_norm_weight=True)
    plain = lens_scores(sae.W_dec.detach(), model, apply_norm_weight=False)
    torch.testing.assert_close(plain.double(), _reference(sae, model, False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_gain.double(), _reference(sae, model, True), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(with_gain, plain)
    torch.testing.assert_close(final_norm_gain(model), model.model.norm.weight.detach())


@settings(max_examples=15, deadline=None)
@given(d_sae=st.integers(1, 40), batch=st.integers(1, 50), top=st.integers(1, 6))
def test_batching_does_not_change_results(tiny, d_sae, batch, top):
    model, _ = tiny
    sae = make_sae(model.config.hidden_size, d_sae, seed=d_sae)
    chunks = list(iter_logit_lens(sae, model, top=top, batch_features=batch))
    assert len(chunks) == -(-d_sae // batch)
    feats = np.concatenate([c[0] for c in chunks])
    assert feats.tolist() == list(range(d_sae))
    ref = _reference(sae, model, True)
    promote_ids = np.concatenate([c[1] for c in chunks])
    suppress_vals = np.concatenate([c[4] for c in chunks])
    np.testing.assert_array_equal(promote_ids[:, 0], ref.argmax(1).numpy())
    np.testing.assert_allclose(suppress_vals[:, 0], ref.min(1).values.numpy(), rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named(tiny, tmp_path):
    model, tok = tiny
    sae = make_sae(model.config.hidden_size, 8)
    with pytest.raises(ValueError, match="top must be at least 1"):
        next(iter_logit_lens(sae, model, top=0))
    with pytest.raises(ValueError, match=r"feature id 8 is out of range \(valid ids are 0\.\.7\)"):
        next(iter_logit_lens(sae, model, features=[1, 8]))
    wide = make_sae(576, 4)
    with pytest.raises(ValueError, match="d_in=576 but the model's d_model is 64"):
        write_logit_lens(wide, model, tok, tmp_path / "x.parquet", progress=False)
    assert not any(Path(tmp_path).iterdir())
    with pytest.raises(ValueError, match="kind must be one of"):
        read_logit_lens(tmp_path / "x.parquet", kind="boost")
