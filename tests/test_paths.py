"""Paths one run file records of another (cfg.json's training store, the feature store's activation store,
the index's feature and activation stores) work from any working folder: they are recorded absolute, and
a relative one written by an older saecore is resolved against the run, not the working folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from saecore import run as layout
from saecore.cli import main
from saecore.index import FeatureIndex
from saecore.run import CFG_FILE, INDEX_META_FILE, Run, record_path, resolve_recorded

SAE = "s"


@pytest.fixture(scope="module")
def relative_run(tiny_store, tmp_path_factory) -> Path:
    """A run built with relative paths from its parent folder: train, encode, index."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_store.path, home / "r" / layout.ACTIVATIONS_DIR)
    r = Run("r")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        for argv in (
            ["train", str(r.activations), str(r.sae(SAE)), "--architecture", "topk", "--k", "4", "--d-sae", "64",
             "--batch-size", "128", "--tokens", "1024", "--device", "cpu", "--no-progress"],
            ["encode", "--store", str(r.activations), "--sae", str(r.sae(SAE)), "--out", str(r.features(SAE)),
             "--device", "cpu", "--no-progress"],
            ["index", "--features", str(r.features(SAE)), "--out", str(r.index(SAE)), "--k", "5", "--no-progress"],
        ):
            assert main(argv) == 0, argv
    return home / "r"


def test_recorded_paths_are_absolute(relative_run: Path):
    cfg = json.loads((relative_run / layout.SAES_DIR / SAE / CFG_FILE).read_text())
    meta = json.loads((Run(relative_run).index(SAE) / INDEX_META_FILE).read_text())
    recorded = [cfg["metadata"]["saecore"]["store"], meta["feature_store"], meta["activation_store"]]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in recorded), recorded


def test_verbs_read_the_run_from_another_folder(relative_run: Path, tiny_model, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the run is reachable from here by a relative path
    r = Run(relative_run)
    assert main(["eval", str(r.sae(SAE)), "--no-splice", "--device", "cpu"]) == 0
    idx = FeatureIndex(r.index(SAE), tokenizer=tiny_model[1])
    feature = int(next(f for f in range(idx.d_sae) if idx.top(f, context=False)))
    assert idx.top(feature)[0].tokens  # decoded from the recorded activation store
    assert len(idx.activations(feature).values) > 0  # read from the recorded feature store
    assert main(["pages", str(relative_run), "--no-tokenizer"]) == 0


def test_an_older_relative_record_resolves_against_the_run(relative_run: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    anchor = Run(relative_run).index(SAE)
    assert resolve_recorded("r/" + layout.ACTIVATIONS_DIR, anchor) == relative_run.parent / "r" / layout.ACTIVATIONS_DIR
    assert resolve_recorded(layout.ACTIVATIONS_DIR, anchor) == relative_run / layout.ACTIVATIONS_DIR
    assert resolve_recorded("no/such/store", anchor) == tmp_path / "no/such/store"  # as written: the error names it
    assert resolve_recorded(None, anchor) is None and resolve_recorded("", anchor) is None
    assert record_path("x") == str(tmp_path / "x")
