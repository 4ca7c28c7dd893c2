"""``saecore index --ray``: the index mined on a local Ray cluster (real worker processes) equals the
in-process index table for table; partials merge exactly in any grouping; a corrupt partial is refused
and recomputed; a worker SIGKILLed mid-task is retried with the same result; bad addresses and a
missing Ray give one clear error."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore import _native
from saecore.encode import encode
from saecore.errors import CorruptDataError
from saecore.index import index
from saecore.sae import SAE, SAEConfig
from saecore.toy import ToyConfig, write_toy_store

ray = pytest.importorskip("ray")
from saecore import cluster as distributed  # after the skip: it is only useful with ray

TABLES = ["stats", "histograms", "topk", "samples", "density_histogram"]
PARAMS = {"k": 5, "hist_bins": 8, "sample_bins": 4, "samples_per_bin": 3, "seed": 7}
N_SHARDS = 10


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def ray_cluster(hold_dir):
    """One local Ray runtime (2 CPUs, real worker processes) for the whole module."""
    os.environ[distributed.HOLD_DIR_ENV] = str(hold_dir)  # inherited by the workers; inert unless armed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    os.environ.pop(distributed.HOLD_DIR_ENV, None)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A 10-shard float32 feature store (float32, so sums would show any order dependence) and its
    in-process index."""
    root = tmp_path_factory.mktemp("dist")
    store = write_toy_store(root / "activations.zarr", ToyConfig(n_features=32, d=16, seed=5), rows=2500, chunk_rows=500)
    sae = SAE(SAEConfig(architecture="topk", d_in=16, d_sae=48, k=3, hook_name="toy"), seed=2)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.0)
        sae.b_enc[:6] = -100.0  # dead features
    sae.save(root / "sae")
    fs = root / "features.zarr"
    encode(store, root / "sae", fs, batch_rows=250, shard_rows=250, value_dtype="float32", progress=False)
    index(fs, root / "ref", **PARAMS, progress=False)
    return fs, root


def assert_same_index(a, b):
    for name in TABLES:
        ta, tb = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert ta.equals(tb), name
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for m in (ma, mb):  # the run time, and the record's own hash over it, differ between runs
        m.pop("mining_seconds"), m.pop("sha256")
    assert ma == mb


@pytest.mark.parametrize("per_task", [1, 3, N_SHARDS])
def test_ray_index_equals_in_process(ray_cluster, features, per_task):
    fs, root = features
    out = root / f"ray-{per_task}"
    index(fs, out, **PARAMS, progress=False, ray="local", shards_per_task=per_task)
    assert_same_index(root / "ref", out)


def _partials(fs, pass_, extrema=None, ranges=None):
    ranges = ranges or [(i, i + 1) for i in range(N_SHARDS)]
    return ranges, [_native.mine_partial(str(fs), a, b, pass_=pass_, extrema=extrema, **PARAMS) for a, b in ranges]


def _finish(fs, p1, p2):
    return _native.finish_partials(str(fs), p1, p2)


def _same_result(x, y):
    for key in x:
        if not key.startswith("t_"):
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


@pytest.fixture(scope="module")
def shard_partials(features):
    fs, _ = features
    _, p1 = _partials(fs, 1)
    extrema = _native.mine_extrema(_native.merge_partials(p1), N_SHARDS)
    _, p2 = _partials(fs, 2, extrema)
    return p1, p2, _native.mine(str(fs), **PARAMS, second_pass=True, progress=None)


def _merge_grouped(parts, order, cuts):
    """Merge ``parts`` taken in ``order``, first in groups split at ``cuts``, then the groups."""
    taken = [parts[i] for i in order]
    edges = [0, *sorted(set(cuts)), len(taken)]
    groups = [_native.merge_partials(taken[a:b]) for a, b in itertools.pairwise(edges) if b > a]
    return _native.merge_partials(groups[::-1])


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_merge_in_any_grouping_equals_the_one_pass_result(features, shard_partials, data):
    fs, _ = features
    p1, p2, one_pass = shard_partials
    order = data.draw(st.permutations(range(N_SHARDS)))
    cuts = data.draw(st.lists(st.integers(1, N_SHARDS - 1), max_size=4))
    m1, m2 = _merge_grouped(p1, order, cuts), _merge_grouped(p2, order, cuts)
    assert m1 == _native.merge_partials(p1) and m2 == _native.merge_partials(p2)  # same bytes
    _same_result(_finish(fs, m1, m2), one_pass)


def test_merge_refuses_overlap_and_incomplete_coverage(features, shard_partials):
    fs, _ = features
    p1, _p2, _ = shard_partials
    with pytest.raises(ValueError, match="covered twice"):
        _native.merge_partials([p1[0], p1[0]])
    with pytest.raises(ValueError, match="not all of 0..10"):
        _finish(fs, _native.merge_partials(p1[:9]), None)


def test_corrupt_partial_is_refused_and_recomputed_by_a_worker(ray_cluster, features, shard_partials):
    fs, _ = features
    p1, _, _ = shard_partials
    bad = bytearray(p1[3])
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(CorruptDataError, match="partial 1 of 2: checksum mismatch"):
        _native.merge_partials([p1[2], bytes(bad)])
    merge = distributed._remote_functions(ray)["merge"]
    covers = [(2, 3), (3, 4)]
    merged, redone = ray.get(merge.remote(str(fs), 1, PARAMS, None, covers, (p1[2], 0), (bytes(bad), 0)))
    assert redone == 1
    assert merged == _native.merge_partials([p1[2], p1[3]])
    # A valid partial for the wrong shards is refused the same way.
    merged, redone = ray.get(merge.remote(str(fs), 1, PARAMS, None, covers, (p1[2], 0), (p1[5], 0)))
    assert (merged, redone) == (_native.merge_partials([p1[2], p1[3]]), 1)


def test_worker_killed_mid_task_is_retried_with_the_same_tables(ray_cluster, features, hold_dir):
    fs, root = features
    (hold_dir / "armed").write_text("")
    out, errors = root / "ray-killed", []

    def run():
        try:
            index(fs, out, **PARAMS, progress=False, ray="local", shards_per_task=2)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while not list(hold_dir.glob("task-*")) and time.time() < deadline:
        time.sleep(0.05)
    marker = min(hold_dir.glob("task-*"))
    time.sleep(0.1)  # the PID is written before the marker is visible to glob, but be safe
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    (hold_dir / "armed").unlink()
    thread.join(300)
    assert not thread.is_alive() and not errors, errors
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker really died
    assert_same_index(root / "ref", out)


def _cli(args, *, hide_ray=False):
    code = "import sys; from saecore.cli import main; sys.exit(main(sys.argv[1:]))"
    if hide_ray:
        code = "import sys; sys.modules['ray'] = None; " + code
    env = {k: v for k, v in os.environ.items() if k != distributed.HOLD_DIR_ENV}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def test_unreachable_address_and_missing_ray_give_one_clear_error(features):
    fs, root = features
    base = ["index", "--features", str(fs), "--out", str(root / "cli"), "--no-progress"]
    p = _cli([*base, "--ray", "127.0.0.1:1"])
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "saecore index: error: cannot reach the Ray cluster at 127.0.0.1:1" in p.stderr
    p = _cli([*base, "--ray", "not-an-address"])
    assert p.returncode == 2 and "is not HOST:PORT" in p.stderr, p.stderr
    p = _cli([*base, "--ray"], hide_ray=True)
    assert p.returncode == 2 and "needs the `ray` package" in p.stderr, p.stderr
    assert not (root / "cli" / "meta.json").exists()


def _python_without_saecore(root):
    """A real Python environment with everything this one has (Ray, NumPy, torch…) except saecore: a
    venv whose site-packages links every entry of this interpreter's, saecore's own left out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = Path(subprocess.run([str(python), "-c", purelib], capture_output=True, text=True, check=True).stdout.strip())
    for site_dir in site.getsitepackages():
        for entry in Path(site_dir).iterdir():
            if "saecore" not in entry.name.lower() and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return python


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_without_saecore(tmp_path):
    """A one-node Ray cluster started by `ray start --head` from an environment without saecore, in its own
    temp folder (so no other test's `ray.init()` finds it) and its own HOME (its auth token stays there)."""
    python = _python_without_saecore(tmp_path / "venv")
    no_saecore = subprocess.run([str(python), "-c", "import saecore"], capture_output=True, cwd=tmp_path, check=False)
    assert no_saecore.returncode == 1 and b"No module named 'saecore'" in no_saecore.stderr
    port, ray_tmp = _free_port(), Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in (distributed.HOLD_DIR_ENV, "RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(ray_tmp), HOME=str(tmp_path / "home"))
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # `ray start` then requires it
    head = subprocess.Popen([str(python), "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--block", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list(ray_tmp.rglob("ray_current_cluster")) and head.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert head.poll() is None, "ray start --head exited"
        yield f"127.0.0.1:{port}", env
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every Ray process it started
        head.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_worker_without_saecore_gives_one_clear_error(features, head_without_saecore, tmp_path):
    fs, _ = features
    address, env = head_without_saecore
    code = "import sys; from saecore.cli import main; sys.exit(main(sys.argv[1:]))"
    # The driver has saecore; the cluster's workers run the head's Python, which lacks it. The driver
    # finds the cluster's auth token in HOME (set up by `ray start`) by itself.
    p = subprocess.run([sys.executable, "-c", code, "index", "--features", str(fs), "--out", str(tmp_path / "out"),
                        "--no-progress", "--ray", address], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=400, check=False)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("saecore")]
    assert len(lines) == 1, p.stderr
    assert "cannot import saecore (ModuleNotFoundError: No module named 'saecore')" in lines[0]
    assert f"install saecore {_native.__version__} on every node" in lines[0]
    assert not (tmp_path / "out").exists()
    # A driver without the cluster's token (another HOME, RAY_AUTH_MODE unset) is told what to set.
    p = subprocess.run([sys.executable, "-c", code, "index", "--features", str(fs), "--out", str(tmp_path / "out"),
                        "--no-progress", "--ray", address], capture_output=True, text=True,
                       env={**env, "HOME": str(tmp_path / "elsewhere")}, cwd=tmp_path, timeout=400, check=False)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("saecore")]
    assert len(lines) == 1 and f"the Ray cluster at {address} uses token authentication" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()
