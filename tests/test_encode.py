"""``saecore encode``: the feature store equals the SAE's dense encoding; a SIGKILLed run resumes to
exactly the bytes of an uninterrupted one; mismatched inputs are refused with clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from saecore.encode import encode
from saecore.features import FeatureStore
from saecore.sae import SAE, SAEConfig
from saecore.toy import ToyConfig, write_toy_store


def make_sae(folder: Path, d_in: int, d_sae: int, k: int, seed: int = 0) -> Path:
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name="toy"), seed=seed)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)  # not all zero, so some latents never win
    sae.save(folder)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    store = write_toy_store(root / "activations.zarr", ToyConfig(n_features=32, d=16, seed=3), rows=3000, chunk_rows=512)
    return store, make_sae(root / "sae", 16, 64, 4)


def dense_of(fs: FeatureStore) -> np.ndarray:
    row_ptr, feature, value = fs.read_csr()
    out = np.zeros((fs.n_rows, fs.d_sae), np.float32)
    out[np.repeat(np.arange(fs.n_rows), np.diff(row_ptr)), feature] = value
    return out


def test_encoded_store_equals_the_dense_encoding(toy, tmp_path):
    store, sae_dir = toy
    fs = encode(store, sae_dir, tmp_path / "f.zarr", batch_rows=256, shard_rows=1024, progress=False)
    sae = SAE.load(sae_dir)
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(store.read("toy", 0, store.num_rows))).numpy()
    assert (fs.n_rows, fs.d_sae, fs.complete, fs.has_csc) == (3000, 64, True, True)
    np.testing.assert_array_equal(dense_of(fs), want.astype(np.float16).astype(np.float32))
    assert fs.spec["hook"] == "toy" and fs.spec["sae"] == str(sae_dir.resolve())
    rows, _values = fs.activations(5)
    np.testing.assert_array_equal(rows, np.flatnonzero(want[:, 5].astype(np.float16)))
    # rerunning a finished encode changes nothing
    before = {p: p.read_bytes() for p in (tmp_path / "f.zarr").rglob("*") if p.is_file()}
    encode(store, sae_dir, tmp_path / "f.zarr", batch_rows=256, shard_rows=1024, progress=False)
    assert before == {p: p.read_bytes() for p in (tmp_path / "f.zarr").rglob("*") if p.is_file()}


def test_a_rerun_removes_what_a_killed_writer_was_staging(toy, tmp_path):
    """SIGKILL between the Rust writer's ``.zarr.json.<pid>.partial`` and its rename leaves that file; the
    next encode of the store removes it (its process is gone) and keeps one a live process holds."""
    store, sae_dir = toy
    out = tmp_path / "f.zarr"
    encode(store, sae_dir, out, batch_rows=256, shard_rows=1024, progress=False)
    reference = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = out / f".zarr.json.{gone.pid}.partial"
    dead.write_bytes(b"")
    (out / "shards").mkdir(exist_ok=True)
    dead_deep = out / "shards" / f".zarr.json.{gone.pid}.partial"
    dead_deep.write_bytes(b"{")
    live = out / f".zarr.json.{os.getpid()}.partial"
    live.write_bytes(b"")
    encode(store, sae_dir, out, batch_rows=256, shard_rows=1024, progress=False)
    assert not dead.exists() and not dead_deep.exists() and live.exists()
    live.unlink()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == reference


def test_mismatched_inputs_are_refused(toy, tmp_path):
    store, sae_dir = toy
    with pytest.raises(ValueError, match=r"shard_rows \(1000\) must be a positive multiple of batch_rows \(256\)"):
        encode(store, sae_dir, tmp_path / "a.zarr", batch_rows=256, shard_rows=1000, progress=False)
    wide = make_sae(tmp_path / "wide", 8, 16, 2)
    with pytest.raises(ValueError, match="SAE d_in=8 does not match the store's width 16"):
        encode(store, wide, tmp_path / "b.zarr", progress=False)
    encode(store, sae_dir, tmp_path / "c.zarr", batch_rows=512, shard_rows=1024, progress=False, csc=False)
    other = make_sae(tmp_path / "other", 16, 64, 4, seed=1)
    with pytest.raises(ValueError, match="spec.sae"):
        encode(store, other, tmp_path / "c.zarr", batch_rows=512, shard_rows=1024, progress=False)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def committed(path: Path) -> dict | None:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["saecore"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_sigkilled_encode_resumes_to_the_same_store(tmp_path):
    store = write_toy_store(tmp_path / "acts.zarr", ToyConfig(n_features=64, d=32, seed=4), rows=160_000, chunk_rows=8192)
    sae_dir = make_sae(tmp_path / "sae", 32, 512, 8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAECORE_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "saecore.cli", "encode", "--store", str(store.path), "--sae", str(sae_dir),
                "--out", str(out), "--batch-rows", "2048", "--shard-rows", "4096", "--device", "cpu", "--no-progress"]

    subprocess.run(command(tmp_path / "clean.zarr"), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        m = committed(killed)
        if m is not None and len(m["shards"]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        assert proc.poll() is None, "encode finished before it could be killed"
        assert time.monotonic() < deadline, "encode made no progress"
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    m = committed(killed)
    assert not m["complete"] and 2 <= len(m["shards"]) < 40, len(m["shards"])
    done = subprocess.run(command(killed), env=env, check=True, capture_output=True, text=True)
    assert "160000 tokens x 512 features" in done.stdout
    assert files_of(killed) == files_of(tmp_path / "clean.zarr")
    FeatureStore(killed).verify()
