"""Meta-SAEs and planted composites: a meta-SAE must take a dictionary of composites apart into the
planted atoms; small SAEs on the toy learn atoms, large ones composites; the verb writes its tables."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from saecore import composite


def _toy(g: int = 4, d: int = 16, seed: int = 0) -> composite.ComposedToy:
    return composite.composed_toy(g, d, samples=4096, alone=0.25, seed=seed)


def test_toy_is_what_it_says():
    toy = _toy()
    g = 4
    torch.testing.assert_close(toy.atoms @ toy.atoms.T, torch.eye(2 * g), atol=1e-5, rtol=0)
    # Composite i*g + j is (a_i + b_j)/√2: cosine 1/√2 to each of its two atoms, 0 to the others.
    cos = toy.composites @ toy.atoms.T  # (g², 2g)
    i, j = 1, 3
    want = torch.zeros(2 * g)
    want[i], want[g + j] = 2**-0.5, 2**-0.5
    torch.testing.assert_close(cos[i * g + j], want, atol=1e-5, rtol=0)
    # Every sample is (close to) a positive multiple of one atom or one composite.
    planted = torch.cat([toy.atoms, toy.composites])
    best = (composite.unit_rows(toy.x) @ planted.T).max(1).values
    assert float(best.min()) > 0.99


def test_meta_sae_takes_planted_composites_apart_into_their_atoms():
    # The dictionary that learned composites, as the toy's large SAEs do: all g² composites and the
    # atoms. (Composites alone fix the atoms only up to a shift, a_i + v and b_j − v: the lone atoms pin it.)
    g = 6
    toy = _toy(g, d=32)
    dictionary = torch.cat([toy.composites, toy.atoms])
    meta = composite.fit_meta_sae(dictionary, 2 * g, 2, composite.FitOptions(600, 256, 3e-3, seed=0))
    found = composite.match_counts(meta.W_dec.detach(), toy)
    assert found["atoms_found"] >= 2 * g - 2 and found["atom_mean_max_cosine"] > 0.95, found
    # A composite whose two atoms were both found is described by exactly those two meta-latents.
    acts, cos = composite.decompose(meta, toy.composites)
    to_atoms = composite.unit_rows(meta.W_dec.detach()) @ toy.atoms.T  # (meta-latents, atoms)
    meta_of_atom = {int(a): int(m) for m, a in enumerate(to_atoms.argmax(1)) if to_atoms[m].max() >= 0.9}
    checked = 0
    for i in range(g):
        for j in range(g):
            if i in meta_of_atom and g + j in meta_of_atom:
                assert set(acts[i * g + j].topk(2).indices.tolist()) == {meta_of_atom[i], meta_of_atom[g + j]}
                checked += 1
    assert checked >= g * g // 2
    assert float(cos.median()) > 0.95


def test_the_match_counts_are_not_met_by_chance():
    # The control: random directions, or the composites themselves, are not atoms.
    toy = _toy(6, d=32)
    random_rows = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    assert composite.match_counts(random_rows, toy)["atoms_found"] == 0
    assert composite.match_counts(toy.composites, toy)["atoms_found"] == 0
    assert composite.match_counts(toy.composites, toy)["composites_found"] == 36


@pytest.mark.slow  # three SAE fits of 1,000 steps: about a minute on two cores
def test_small_saes_learn_atoms_large_ones_composites_and_the_meta_sae_recovers_atoms():
    cfg = composite.CompositeConfig(toy_group_size=6, toy_d=64, toy_sizes=[12, 96], toy_samples=16384,
                                    toy_steps=1000, seed=0, device="cpu")
    rows, meta, geometry = composite.toy_sweep(cfg)
    small, large = rows
    # Room for the 12 atoms only: its matched rows are mostly atoms (9 atoms and 2 composites at 1 torch
    # thread, 9 and 3 at 2: one borderline row changes class with the matmul's summation order).
    assert small["atoms_found"] >= 5 and small["rows_atom"] > 2 * small["rows_composite"], small
    # Room for the 36 composites: most of them, more composites than atoms.
    assert large["composites_found"] >= 27 and large["rows_composite"] > large["rows_atom"], large
    # The meta-SAE on the composite dictionary finds the atoms again.
    assert meta["atoms_found"] >= 9 and meta["atom_mean_max_cosine"] > 0.9, meta
    kinds = {(g["dictionary"], g["kind"]) for g in geometry}
    assert {("toy-12", "decoder"), ("toy-12", "random"), ("toy-12", "covariance")} <= kinds


def test_feature_table_counts_and_sharing():
    acts = torch.tensor([[0.5, 0.0, 0.2, 0.0],
                         [0.0, 0.0, 0.3, 0.9],
                         [0.0, 0.1, 0.0, 0.0]])
    table = composite.feature_table(acts, torch.tensor([0.9, 0.8, 0.7])).to_pylist()
    assert [r["n_meta"] for r in table] == [2, 2, 1]
    assert table[0]["meta_latents"] == [0, 2] and table[1]["meta_latents"] == [3, 2]
    assert table[1]["weights"] == pytest.approx([0.9, 0.3])
    assert [r["n_sharing"] for r in table] == [1, 1, 0]
    assert table[0]["most_shared_with"] == 1 and table[0]["most_shared_jaccard"] == pytest.approx(1 / 3)
    assert table[2]["most_shared_with"] == -1
    metas = composite.meta_latent_table(acts).to_pylist()
    assert [m["n_features"] for m in metas] == [1, 1, 2, 1]
    assert metas[2]["top_features"] == [1, 0]


def test_verb_on_a_run(tiny_store, tmp_path):
    import shutil

    from saecore.cli import main
    from saecore.run import Run
    from saecore.sae import SAE, SAEConfig

    run = Run(tmp_path / "run")
    shutil.copytree(tiny_store.path, run.activations)
    SAE(SAEConfig(architecture="topk", d_in=64, d_sae=96, k=8, hook_name=tiny_store.hooks[0])).save(run.sae("tiny"))
    argv = ["composite", "--run", str(run.root), "--meta-latents", "16", "--steps", "100", "--toy-group-size", "2",
            "--toy-d", "8", "--toy-size", "4", "--toy-size", "8", "--toy-steps", "50", "--toy-samples", "512",
            "--device", "cpu"]
    assert main(argv) == 0
    out = run.experiment("composite")
    features = pq.read_table(out / "tiny" / "composite_features.parquet").to_pylist()
    assert len(features) == 96
    for r in features:
        assert r["n_meta"] == len(r["meta_latents"]) == len(r["weights"]) <= 16
        assert -1 <= r["reconstruction_cosine"] <= 1 + 1e-6
    assert pq.read_table(out / "tiny" / "composite_meta_latents.parquet").num_rows == 16
    assert [r["d_sae"] for r in pq.read_table(out / "composite_toy.parquet").to_pylist()] == [4, 8]
    geometry = pq.read_table(out / "composite_geometry.parquet").to_pylist()
    assert {"decoder", "random", "covariance"} <= {g["kind"] for g in geometry if g["dictionary"] == "tiny"}
    for plot in ("tiny/composite_meta.png", "composite_toy.png"):
        assert (out / plot).stat().st_size > 0
    assert np.isfinite([g["median"] for g in geometry]).all()


def test_the_feature_pages_show_the_decomposition(tiny_store, tmp_path):
    """A feature page carries its meta-latents (the table's own row), their users and links to the features
    that share them; a damaged table is reported by name, not shown."""
    import json
    import re
    import shutil

    from saecore.cli import main
    from saecore.encode import encode
    from saecore.errors import CorruptDataError
    from saecore.index import index
    from saecore.pages import build_pages
    from saecore.run import Run
    from saecore.sae import SAE, SAEConfig

    run = Run(tmp_path / "run")
    shutil.copytree(tiny_store.path, run.activations)
    SAE(SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name=tiny_store.hooks[0])).save(run.sae("tiny"))
    encode(run.activations, run.sae("tiny"), run.features("tiny"), batch_rows=512, shard_rows=1024, progress=False)
    index(run.features("tiny"), run.index("tiny"), progress=False)
    assert main(["composite", "--run", str(run.root), "--meta-latents", "8", "--meta-k", "2", "--steps", "60",
                 "--no-toy", "--device", "cpu"]) == 0
    table = pq.read_table(run.experiment("composite") / "tiny" / "composite_features.parquet").to_pylist()
    build_pages(run.root, load_model_tokenizer=False, progress=False)
    for row in table[:6]:
        f = row["feature"]
        page = (run.pages / "tiny" / "f" / "0" / f"{f}.html").read_text()
        shown = json.loads(re.search(r"window\.SAECORE_FEATURE=(.*?);</script>", page).group(1))["composite"]
        assert [m["m"] for m in shown["meta"]] == row["meta_latents"] and shown["n_meta"] == row["n_meta"]
        users = [r["feature"] for r in table]
        for m in shown["meta"]:
            holders = [r["feature"] for r in table if m["m"] in r["meta_latents"]]
            assert m["users"] == len(holders) and all(o["feature"] in holders and o["feature"] != f for o in m["others"])
            assert all((run.pages / "tiny" / "f" / "0" / o["href"].removeprefix("../../f/0/")).exists() for o in m["others"])
        assert len(users) == 32
    path = run.experiment("composite") / "tiny" / "composite_meta_latents.parquet"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptDataError, match="composite_meta_latents.parquet"):
        build_pages(run.root, load_model_tokenizer=False, progress=False)
