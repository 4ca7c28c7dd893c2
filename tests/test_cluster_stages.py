"""``harvest --ray`` and ``encode --ray`` on a local Ray cluster (real worker processes, 2 CPUs): the
stores equal the one-process stores byte for byte; a staged part that fails its checksum is redone,
never merged; a worker SIGKILLed mid-part is restarted and its part redone; a driver SIGKILLed mid-run
resumes from the committed parts without computing them again; a bad address gives one clear line."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_HOOK
from saecore.encode import encode
from saecore.harvesting import HarvestConfig, harvest
from saecore.run import RAY_PART_FILE, ray_part_dir
from saecore.sae import SAE, SAEConfig
from saecore.toy import ToyConfig, write_toy_store

ray = pytest.importorskip("ray")
from saecore import cluster  # after the skip: it is only useful with ray

# 10 batches of 4 contexts, 5 parts of 2 batches; the norm rule makes every worker calibrate on batch 0.
HARVEST = {"hooks": [TINY_HOOK], "context_length": 32, "batch_size": 4, "max_tokens": 40 * 32, "chunk_rows": 64,
           "dtype": "float16", "norm_outlier_factor": 3.0, "progress": False}
# 2,300 rows: 10 shards of 250 (the last one 50 rows), 5 parts of 2 shards.
ENCODE = {"batch_rows": 125, "shard_rows": 250, "progress": False}


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def ray_cluster(hold_dir):
    """One local Ray runtime (2 CPUs, real worker processes) for the whole module."""
    os.environ[cluster.HOLD_DIR_ENV] = str(hold_dir)  # inherited by the workers; inert unless armed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    os.environ.pop(cluster.HOLD_DIR_ENV, None)


@pytest.fixture
def hold(hold_dir):
    """The hold folder, cleared before and disarmed after each test."""
    for p in hold_dir.iterdir():
        p.unlink()
    yield hold_dir
    (hold_dir / "armed").unlink(missing_ok=True)


def assert_same_tree(a: Path, b: Path) -> None:
    """Every file under ``a`` and ``b`` exists in both with the same bytes."""
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files(a) == files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files(a)], shallow=False)
    assert not mismatch and not errors, mismatch + errors


def _wait_for(predicate, what, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _in_thread(fn):
    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


# -- harvest -----------------------------------------------------------------------------------------
def test_harvest_on_ray_equals_one_process_and_redoes_a_damaged_part(
    ray_cluster, tiny_model_dir, small_corpus_dir, tmp_path, hold, capfd
):
    one = harvest(str(tiny_model_dir), str(small_corpus_dir), tmp_path / "one.zarr", HarvestConfig(**HARVEST))
    out = tmp_path / "ray.zarr"
    # Part 0 waits; parts 2..8 are staged by the other worker and wait for it to be committed. One of
    # them is damaged on disk meanwhile: the driver must refuse it and have it computed again.
    (hold / "armed").write_text("")
    for key in (2, 4, 6, 8):
        (hold / f"release-part-{key}").write_text("")
    cfg = HarvestConfig(**HARVEST, ray="local", ray_workers=2, batches_per_part=2)
    thread, errors = _in_thread(lambda: harvest(str(tiny_model_dir), str(small_corpus_dir), out, cfg))
    staged = ray_part_dir(out, 4)
    _wait_for(lambda: (staged / RAY_PART_FILE).exists(), "part 4 to be staged")
    acts = staged / "acts-0.npy"
    data = bytearray(acts.read_bytes())
    data[-7] ^= 0x10
    acts.write_bytes(bytes(data))
    (hold / "release-part-0").write_text("")
    thread.join(300)
    assert not thread.is_alive() and not errors, errors
    assert "parts: 6 computed, 0 reused from an earlier run, 1 refused and redone" in capfd.readouterr().err
    assert_same_tree(one.path, out)


@pytest.mark.slow
def test_real_smollm2_harvest_on_ray_equals_one_process(ray_cluster, small_corpus_dir, tmp_path):
    kw = {"context_length": 64, "batch_size": 4, "max_tokens": 16 * 64, "chunk_rows": 256, "progress": False}
    one = harvest("smollm2-135m", str(small_corpus_dir), tmp_path / "one.zarr", HarvestConfig(**kw))
    two = harvest("smollm2-135m", str(small_corpus_dir), tmp_path / "ray.zarr",
                  HarvestConfig(**kw, ray="local", ray_workers=2, batches_per_part=1))
    assert two.num_rows == one.num_rows > 900
    assert_same_tree(one.path, two.path)


# -- encode --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encode_inputs(tmp_path_factory):
    """A toy activation store, an SAE folder and the one-process feature store (float32 values)."""
    root = tmp_path_factory.mktemp("encode")
    store = write_toy_store(root / "activations.zarr", ToyConfig(n_features=32, d=16, seed=5), rows=2300, chunk_rows=500)
    sae = SAE(SAEConfig(architecture="topk", d_in=16, d_sae=48, k=3, hook_name="toy"), seed=2)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.0)
    sae.save(root / "sae")
    encode(store, root / "sae", root / "one.zarr", **ENCODE)
    return store, root


def test_encode_on_ray_survives_a_killed_worker_with_the_same_bytes(ray_cluster, encode_inputs, tmp_path, hold):
    store, root = encode_inputs
    (hold / "armed").write_text("")
    out = tmp_path / "ray.zarr"
    thread, errors = _in_thread(lambda: encode(store, root / "sae", out, **ENCODE, ray="local", ray_workers=2,
                                                shards_per_part=2))
    _wait_for(lambda: _held_pids(hold), "a worker to hold a part")
    pid = _held_pids(hold)[0]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    (hold / "armed").unlink()
    thread.join(300)
    assert not thread.is_alive() and not errors, errors
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker really died; Ray restarted it and ran its part again
    assert_same_tree(root / "one.zarr", out)


def _encode_cli(store, root, out, address):
    args = ["encode", "--store", str(store.path), "--sae", str(root / "sae"), "--out", str(out), "--batch-rows", "125",
            "--shard-rows", "250", "--shards-per-part", "2", "--ray-workers", "2", "--no-progress", "--ray", address]
    code = "import sys; from saecore.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def test_killed_driver_resumes_from_the_committed_parts(ray_cluster, encode_inputs, tmp_path, hold):
    store, root = encode_inputs
    out, address = tmp_path / "ray.zarr", ray.get_runtime_context().gcs_address
    (hold / "armed").write_text("")
    (hold / "release-part-0").write_text("")  # part 0 runs; every other part waits
    driver = subprocess.Popen(_encode_cli(store, root, out, address), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_shard = out / "shards" / "000000" / "row_ptr" / "c" / "0"
    _wait_for(lambda: _committed(out) >= 2, "part 0 (shards 0 and 1) to be committed")
    inode = first_shard.stat().st_ino
    driver.send_signal(signal.SIGKILL)
    driver.wait(60)
    # Ray ends a dead driver's workers; only then may the held parts go (else they would run on).
    _wait_for(lambda: not any(_alive(pid) for pid in _held_pids(hold)), "the killed driver's workers to end", 120)
    (hold / "armed").unlink()
    rerun = subprocess.run(_encode_cli(store, root, out, address), capture_output=True, text=True, timeout=300,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr
    # 5 parts: part 0 was committed before the kill, so the rerun computes only the other 4.
    assert "parts: 4 computed, 0 reused from an earlier run, 0 refused and redone" in rerun.stderr
    assert first_shard.stat().st_ino == inode  # the committed shard was not written again
    assert_same_tree(root / "one.zarr", out)


def _held_pids(hold: Path) -> list[int]:
    """PIDs of the workers holding a part (markers whose PID is written), in part order."""
    return [int(text) for p in sorted(hold.glob("task-part-*")) if (text := p.read_text().strip())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _committed(store: Path) -> int:
    """Shards the feature store's manifest commits."""
    try:
        return len(json.loads((store / "zarr.json").read_text())["attributes"]["saecore"]["shards"])
    except (OSError, ValueError, KeyError):
        return 0


# -- errors ----------------------------------------------------------------------------------------------
def test_harvest_and_encode_refuse_an_unreachable_cluster_in_one_line(encode_inputs, tiny_model_dir, small_corpus_dir,
                                                                      tmp_path):
    store, root = encode_inputs
    env = {k: v for k, v in os.environ.items() if k != cluster.HOLD_DIR_ENV}
    code = "import sys; from saecore.cli import main; sys.exit(main(sys.argv[1:]))"
    runs = {
        "encode": _encode_cli(store, root, tmp_path / "f.zarr", "127.0.0.1:1"),
        "harvest": [sys.executable, "-c", code, "harvest", "--model", str(tiny_model_dir), "--corpus",
                    str(small_corpus_dir), "--out", str(tmp_path / "a.zarr"), "--max-tokens", "512", "--no-progress",
                    "--ray", "127.0.0.1:1"],
    }
    for verb, cmd in runs.items():
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines() == [f"saecore {verb}: error: cannot reach the Ray cluster at 127.0.0.1:1: "
                                                 + p.stderr.split("127.0.0.1:1: ", 1)[1].strip()]
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "a.zarr").exists()


# -- pages ---------------------------------------------------------------------------------------------
def test_pages_on_ray_equal_the_serial_pages(ray_cluster, tmp_path):
    import shutil

    from pages_testdata import N_FEATURES, SAE, make_run, word_tokenizer
    from saecore import features
    from saecore.pages import build_pages

    data = make_run(tmp_path / "serial", geometry=True)
    path = data.run / "features" / f"{SAE}.zarr"
    writer = features.open_writer(path, N_FEATURES, {"test": "pages"}, value_dtype="float32", shard_rows=32)
    writer.append(*features.dense_to_csr(data.acts))
    writer.finish()
    features.build_csc(path)
    shutil.copytree(data.run, tmp_path / "ray")
    build_pages(data.run, tokenizer=word_tokenizer(), progress=False)
    build_pages(tmp_path / "ray", tokenizer=word_tokenizer(), progress=False, ray="local")
    assert len(list((data.run / "pages").rglob("f/*/*.html"))) >= N_FEATURES
    assert_same_tree(data.run / "pages", tmp_path / "ray" / "pages")
