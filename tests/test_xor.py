"""The XOR-in-superposition toy: XOR is readable only where superposition and a ReLU put it there."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from saecore import xor


def _acc(rows, ratio, active, rep, target):
    (row,) = [r for r in rows if r["ratio"] == ratio and r["active"] == active and r["representation"] == rep and r["target"] == target]
    return row["accuracy"]


@pytest.fixture(scope="module")
def rows():
    return xor.sweep(xor.XorConfig(d=16, ratios=[1.0, 4.0], active=[0.0, 1.0], samples=4096, seed=3))


def test_residual_never_reads_xor_above_the_linear_ceiling(rows):
    # h = W b is linear in the features: a probe reading XOR there would be reading something absent.
    for r in rows:
        if r["representation"] == "residual" and r["target"] == "XOR":
            assert r["accuracy"] <= xor.LINEAR_XOR_CEILING + 0.03, r


def test_no_superposition_no_xor(rows):
    # n = d: orthonormal directions, each readout unit sees its own feature only.
    assert _acc(rows, 1.0, 0.0, "readout", "XOR") <= xor.LINEAR_XOR_CEILING + 0.03
    assert _acc(rows, 1.0, 1.0, "readout", "XOR") <= xor.LINEAR_XOR_CEILING + 0.03


def test_superposition_makes_xor_readable(rows):
    assert _acc(rows, 4.0, 0.0, "readout", "XOR") >= 0.95
    # A and B themselves stay readable where XOR is.
    assert _acc(rows, 4.0, 0.0, "readout", "A") >= 0.95
    assert _acc(rows, 4.0, 0.0, "readout", "B") >= 0.95


def test_and_is_further_from_the_boundary_on_the_other_side():
    # Where XOR is read, A∧B examples sit on the "no" side and A∧¬B on the "yes" side of the probe.
    cfg = xor.XorConfig(d=16, ratios=[4.0], active=[0.0], samples=4096, seed=5)
    (row,) = [r for r in xor.sweep(cfg) if r["representation"] == "readout" and r["target"] == "XOR"]
    assert row["margin_a_and_b"] < 0 < row["margin_a_not_b"]


def test_probe_matches_a_closed_form_on_separable_data():
    # The probe itself: on a linearly separable problem it must reach (near) perfect held-out accuracy.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, generator=gen, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64) > 0.3).double()
    w, b = xor.fit_probe(x[:1000], y[:1000])
    assert float((((x[1000:] @ w + b) > 0).double() == y[1000:]).double().mean()) > 0.97


def test_class_balanced_accuracy_ignores_the_majority_class():
    y = torch.tensor([0.0] * 90 + [1.0] * 10, dtype=torch.float64)
    assert xor.class_balanced_accuracy(torch.zeros(100, dtype=torch.float64), y) == 0.5
    assert xor.class_balanced_accuracy(y.clone(), y) == 1.0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="ratio"):
        xor.XorConfig(ratios=[0.5])


def test_token_properties_follow_the_text(tiny_model):
    _, tokenizer = tiny_model
    ids = np.array([tokenizer("a (Bb c) D", add_special_tokens=False)["input_ids"]])
    a, b = xor.token_properties(tokenizer, ids, boundary_ids=set())
    pieces = [tokenizer.decode([t]) for t in ids[0]]
    depth, want_b = 0, []
    for p in pieces:
        want_b.append(depth > 0)
        depth = max(0, depth + p.count("(") - p.count(")"))
    assert a[0].tolist() == [p.lstrip()[:1].isupper() for p in pieces]
    assert b[0].tolist() == want_b and any(want_b)


def test_verb_runs_the_toy_and_every_layer_of_a_model(tiny_model_dir, small_corpus_dir, tmp_path):
    from saecore.cli import main

    out = tmp_path / "xor"
    argv = ["xor", "--model", str(tiny_model_dir), "--corpus", str(small_corpus_dir), "--contexts", "8",
            "--context-length", "32", "--d", "8", "--samples", "512", "--ratio", "1", "--ratio", "4",
            "--active", "0", "--out", str(out)]
    assert main(argv) == 0
    toy = pq.read_table(out / "xor_toy.parquet").to_pylist()
    assert len(toy) == 2 * 1 * 2 * 3  # ratios x active x representations x targets
    real = pq.read_table(out / "xor_model.parquet").to_pylist()
    n_layers = len({r["layer"] for r in real})
    assert n_layers >= 2 and len(real) == 4 * n_layers
    for r in real:
        assert 0.0 <= r["accuracy"] <= 1.0
    # The shuffled-label control reads nothing: class-balanced accuracy near chance at every layer.
    control = [r["accuracy"] for r in real if r["target"] == "XOR-shuffled"]
    assert max(control) < 0.72, control
    assert (out / "xor_toy.png").stat().st_size > 0 and (out / "xor_model.png").stat().st_size > 0
