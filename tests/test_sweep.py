"""The scaling-law sweep: a small grid trains on this machine, the fit and frontier are right, and the
table and plot are written."""

from __future__ import annotations

import csv
import json

import pytest
from saecore.sweep import fit, frontier, sweep
from saecore.toy import ToyConfig, write_toy_store
from saecore.training import TrainConfig


def test_fit_recovers_a_known_power_law():
    runs = [{"d_sae": d, "tokens": t, "compute": d * t, "loss": 7.0 * (d * t) ** -0.3}
            for d, t in [(8, 100), (16, 200), (32, 400), (64, 800)]]
    runs.append({"d_sae": 64, "tokens": 100, "compute": 6400, "loss": 100.0})  # off the frontier
    f = fit(runs)
    assert f["loss_vs_compute"]["exponent"] == pytest.approx(-0.3)
    assert f["loss_vs_compute"]["A"] == pytest.approx(7.0)
    assert f["d_sae_opt"]["exponent"] == pytest.approx(0.5) and f["tokens_opt"]["exponent"] == pytest.approx(0.5)
    assert len(frontier(runs)) == 4


def test_small_grid_runs_and_writes_table_and_plot(tmp_path):
    store = write_toy_store(tmp_path / "toy.zarr", ToyConfig(n_features=48, d=16, mean_active=2), rows=12288,
                            chunk_rows=1024)
    cfg = TrainConfig(architecture="topk", k=2, batch_size=256, lr=5e-3, progress=False, holdout_fraction=0.1,
                      dead_window_tokens=4096)
    result = sweep(store, tmp_path / "sweep", [8, 32], [2048, 8192], cfg)
    assert len(result["runs"]) == 4
    losses = {(r["d_sae"], r["tokens"]): r["loss"] for r in result["runs"]}
    assert losses[(32, 8192)] < losses[(8, 2048)]  # more compute, lower loss
    assert result["fit"]["loss_vs_compute"]["exponent"] < 0
    rows = list(csv.reader((tmp_path / "sweep" / "sweep.csv").open()))
    assert rows[0][:4] == ["d_sae", "tokens", "compute", "heldout_loss"] and len(rows) == 5
    svg = (tmp_path / "sweep" / "sweep.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") >= 4
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["fit"]["frontier"]
    # Rerunning skips the finished runs and gives the same table.
    again = sweep(store, tmp_path / "sweep", [8, 32], [2048, 8192], cfg)
    assert [r["loss"] for r in again["runs"]] == [r["loss"] for r in result["runs"]]
