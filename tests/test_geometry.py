"""Geometry analyses and their CLI verbs on small saved SAEs: neighbours.parquet, feature splitting,
decoder-geometry baselines, encoder/decoder cosines and the 2-D map."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_HOOK
from saecore import geometry
from saecore.cli import main
from saecore.sae import SAE, SAEConfig

D_IN = 64


def save_sae(folder: Path, decoder: np.ndarray, encoder: np.ndarray | None = None) -> Path:
    """A relu SAE on the tiny store's hook with the given directions (W_enc defaults to W_decᵀ)."""
    cfg = SAEConfig(architecture="relu", d_in=decoder.shape[1], d_sae=decoder.shape[0], hook_name=TINY_HOOK)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(decoder))
        sae.W_enc.copy_(torch.from_numpy(decoder.T.copy() if encoder is None else encoder))
    return sae.save(folder)


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """runs/demo with a 24-feature SAE and a 48-feature SAE whose features are each small feature
    split in two (small perturbations), plus an unrelated SAE of another width."""
    rng = np.random.default_rng(0)
    small = rng.standard_normal((24, D_IN)).astype(np.float32)
    small /= np.linalg.norm(small, axis=1, keepdims=True)
    children = np.repeat(small, 2, axis=0) + 0.15 * rng.standard_normal((48, D_IN)).astype(np.float32) / np.sqrt(D_IN)
    children = children[rng.permutation(48)]
    encoder = small.T + 0.05 * rng.standard_normal((D_IN, 24)).astype(np.float32)
    run = tmp_path / "runs" / "demo"
    save_sae(run / "saes" / "small", small, encoder)
    save_sae(run / "saes" / "large", children.astype(np.float32))
    save_sae(run / "saes" / "narrow", rng.standard_normal((10, 8)).astype(np.float32))
    return run


def unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_neighbours_cli_writes_the_interface_table(run_dir, capsys):
    saes = run_dir / "saes"
    assert main(["neighbours", "--sae", str(saes / "small"), "--other", str(saes / "large"), "--k", "4",
                 "--device", "cpu"]) == 0
    path = run_dir / "index" / "small" / "neighbours.parquet"
    table = pq.read_table(path)
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("feature", "uint32"), ("rank", "uint16"), ("other_sae", "string"), ("neighbour", "uint32"), ("cosine", "float")]
    assert table.num_rows == 24 * 4 * 2
    assert not list(path.parent.glob(".*partial*")), "temporary file left behind"
    small = geometry.load_directions(saes / "small").decoder
    large = geometry.load_directions(saes / "large").decoder
    other = np.asarray(table["other_sae"].to_pylist())
    for name, ref in (("small", unit(small) @ unit(small).T - 3 * np.eye(24)), ("large", unit(small) @ unit(large).T)):
        sel = other == name
        feat = table["feature"].to_numpy()[sel].reshape(24, 4)
        assert (feat == np.arange(24)[:, None]).all()
        nb = table["neighbour"].to_numpy()[sel].reshape(24, 4)
        cos = table["cosine"].to_numpy()[sel].reshape(24, 4)
        np.testing.assert_allclose(cos, -np.sort(-ref, axis=1)[:, :4], atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(ref, nb.astype(int), 1), cos, atol=1e-5)
    assert "wrote 192 rows" in capsys.readouterr().out


def test_neighbours_cli_rejects_other_width(run_dir, capsys):
    saes = run_dir / "saes"
    assert main(["neighbours", "--sae", str(saes / "small"), "--other", str(saes / "narrow"), "--device", "cpu"]) == 2
    assert re.search(r"saecore neighbours: error: .*narrow has d_in 8.*small has 64", capsys.readouterr().err)


def test_neighbours_cli_clamps_k_to_a_small_sae(run_dir, tmp_path):
    out = tmp_path / "n.parquet"
    assert main(["neighbours", "--sae", str(run_dir / "saes" / "narrow"), "--k", "50", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert pq.read_table(out).num_rows == 10 * 9


def test_splitting_finds_the_children_by_cosine_and_coactivation(run_dir, tiny_store, capsys):
    saes = run_dir / "saes"
    assert main(["splitting", "--sae", str(saes / "large"), "--sae", str(saes / "small"), "--k", "3",
                 "--store", str(tiny_store.path), "--coact-tokens", "1500", "--device", "cpu"]) == 0
    out = run_dir / "index" / "small"
    table = pq.read_table(out / "splitting.parquet")
    families = pq.read_table(out / "splitting_families.parquet")
    assert (out / "splitting.png").stat().st_size > 1000
    assert set(table["sae"].to_pylist()) == {"small"} and set(table["other_sae"].to_pylist()) == {"large"}
    # Every small feature splits into exactly its two perturbed copies.
    assert families.num_rows == 24
    assert (families["family_size"].to_numpy() == 2).all()
    small = unit(geometry.load_directions(saes / "small").decoder)
    large = unit(geometry.load_directions(saes / "large").decoder)
    for f, members in zip(families["feature"].to_pylist(), families["members"].to_pylist()):
        assert sorted(members) == sorted(np.argsort(-(large @ small[f]))[:2].tolist())
    # Children fire with their parent far more often than the third-nearest direction does.
    rank = table["rank"].to_numpy()
    jac = table["jaccard"].to_numpy()
    assert table["jaccard"].null_count == 0
    assert jac[rank < 2].mean() > jac[rank == 2].mean() + 0.25, (jac[rank < 2].mean(), jac[rank == 2].mean())
    assert "100.0% of features split into 2+" in capsys.readouterr().out


def test_splitting_without_store_leaves_coactivation_null(run_dir):
    saes = run_dir / "saes"
    assert main(["splitting", "--sae", str(saes / "small"), "--sae", str(saes / "large"), "--no-coact",
                 "--device", "cpu"]) == 0
    table = pq.read_table(run_dir / "index" / "small" / "splitting.parquet")
    assert table["jaccard"].null_count == table.num_rows


def test_geometry_cli_baselines_enc_dec_and_map(run_dir, tiny_store, capsys):
    saes = run_dir / "saes"
    assert main(["geometry", "--sae", str(saes / "small"), "--sae", str(saes / "large"),
                 "--store", str(tiny_store.path), "--map", "pca", "--device", "cpu"]) == 0
    out = run_dir / "index" / "small"
    small = geometry.load_directions(saes / "small")

    enc_dec = pq.read_table(out / "enc_dec_cosine.parquet")
    assert [(f.name, str(f.type)) for f in enc_dec.schema] == [("feature", "uint32"), ("cosine", "float")]
    ref = np.sum(unit(small.encoder.T) * unit(small.decoder), axis=1)
    np.testing.assert_allclose(enc_dec["cosine"].to_numpy(), ref, atol=1e-5)
    assert 0.3 < ref.mean() < 0.99  # the fixture's encoder is a noisy copy of the decoder

    base = pq.read_table(out / "geometry.parquet")
    kinds = np.asarray(base["kind"].to_pylist())
    assert set(kinds) == {"decoder", "random", "covariance"}
    dec = base["max_cosine"].to_numpy()[kinds == "decoder"]
    sims = unit(small.decoder) @ unit(small.decoder).T - 3 * np.eye(24)
    np.testing.assert_allclose(dec, sims.max(1), atol=1e-5)
    # Transformer residual activations are anisotropic: directions drawn with their covariance sit
    # closer together than isotropic random ones.
    cov = base["max_cosine"].to_numpy()[kinds == "covariance"]
    rnd = base["max_cosine"].to_numpy()[kinds == "random"]
    assert np.median(cov) > np.median(rnd)
    assert (out / "geometry.png").stat().st_size > 1000

    for sae in ("small", "large"):
        m = pq.read_table(run_dir / "index" / sae / "map.parquet")
        assert [(f.name, str(f.type)) for f in m.schema] == [
            ("feature", "uint32"), ("sae", "string"), ("x", "float"), ("y", "float")]
        assert m.num_rows == 24 + 48 and np.isfinite(m["x"].to_numpy()).all()
        assert (run_dir / "index" / sae / "map.png").exists()
    assert "covariance" in capsys.readouterr().out


def test_activation_covariance_matches_numpy(tiny_store):
    x = tiny_store.read(TINY_HOOK, 0, 1000).astype(np.float64)
    got = geometry.activation_covariance(tiny_store.path, TINY_HOOK, max_tokens=1000, block_rows=300)
    np.testing.assert_allclose(got, np.cov(x, rowvar=False), rtol=1e-6, atol=1e-8)


def test_umap_map_places_split_children_near_each_other(run_dir):
    small = geometry.load_directions(run_dir / "saes" / "small")
    large = geometry.load_directions(run_dir / "saes" / "large")
    table, method = geometry.feature_map([small, large], "umap")
    assert method == "umap"
    xy = np.stack([table["x"].to_numpy(), table["y"].to_numpy()], 1)
    sae = np.asarray(table["sae"].to_pylist())
    # A small feature's nearest point on the map (among large features) is mostly one of its children.
    s_xy, l_xy = xy[sae == "small"], xy[sae == "large"]
    nearest = np.argmin(((s_xy[:, None] - l_xy[None]) ** 2).sum(-1), axis=1)
    truth = np.argsort(-(unit(large.decoder) @ unit(small.decoder).T), axis=0)[:2].T
    hits = np.mean([nearest[f] in truth[f] for f in range(24)])
    assert hits > 0.7


def test_plots_leave_the_process_matplotlib_backend_alone(tmp_path):
    """A library call must not switch the caller's backend (a notebook's, say): plots draw on their own
    Agg canvas and leave no figure open in pyplot. Run in a child so this test's backend stays private."""
    import subprocess
    import sys
    import textwrap

    png = tmp_path / "map.png"
    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        import pyarrow as pa
        from pathlib import Path
        from saecore import geometry
        table = pa.table({{"feature": pa.array([0, 1, 2], pa.uint32()), "sae": ["s", "s", "s"],
                          "x": pa.array([0, 1, 2], pa.float32()), "y": pa.array([1, 0, 2], pa.float32())}})
        geometry.plot_map(table, "pca", Path({str(png)!r}))
        print(matplotlib.get_backend(), len(plt.get_fignums()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["svg", "0"]
    assert png.read_bytes().startswith(b"\x89PNG")
