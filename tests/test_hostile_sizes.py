"""Huge numbers never abort the process (issue 12, items 6 and 8).

Each case runs the real API in a child process under an address-space limit (``prlimit --as``), so an
allocation the core does not check would abort (exit 134, no message) or be refused by the kernel.
The child must instead raise a clean Python exception whose message names the size or the field:
a manifest claiming ``d_sae = 2**32 - 1`` or ``10**12`` rows, a lying ``shard_rows``, and absurd
``shard_rows``/``threads``/``chunk_elems``/``k``/``n_bins``/``batch_rows`` arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from saecore import CorruptDataError
from saecore.features import FeatureStore, build_csc, open_writer

PRLIMIT = shutil.which("prlimit")
AS_LIMIT = 4 << 30  # bytes of address space for the child: numpy + saecore need well under 1 GiB
D_SAE, ROWS, SHARD_ROWS = 24, 50, 16

CHILD = """
import sys
from saecore import _native
from saecore.features import FeatureStore, build_csc, open_writer
path = sys.argv[1]
def mine(path, **given):  # the binding takes every option explicitly; these are `saecore index`'s defaults
    options = {{"k": 20, "hist_bins": 32, "sample_bins": 10, "samples_per_bin": 10, "seed": 0, "second_pass": True,
               "progress": None}}
    return _native.mine(path, **{{**options, **given}})
try:
    {statement}
except Exception as e:  # MemoryError, ValueError and CorruptDataError are all Exceptions
    print(f"{{type(e).__name__}}: {{e}}", file=sys.stderr)
    sys.exit(3)
print("no exception", file=sys.stderr)
"""


def write_small_store(path: Path, *, shard_rows: int = SHARD_ROWS, csc: bool = False) -> Path:
    """50 rows of 24 features, written with plain NumPy CSR (no torch)."""
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((ROWS, D_SAE)) < 0.2, rng.uniform(0.5, 2.0, (ROWS, D_SAE)), 0).astype(np.float32)
    rows, cols = np.nonzero(dense)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=ROWS))]).astype(np.int64)
    w = open_writer(path, D_SAE, {"test": "hostile"}, shard_rows=shard_rows)
    w.append(row_ptr, cols.astype(np.int32), dense[rows, cols])
    w.finish()
    if csc:
        build_csc(path, chunk_elems=32)
    return path


def edit_manifest(path: Path, edit) -> Path:
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc["attributes"]["saecore"])
    (path / "zarr.json").write_text(json.dumps(doc))
    return path


def run_limited(statement: str, path: Path, limit: int = AS_LIMIT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", CHILD.format(statement=statement), str(path)]
    if PRLIMIT:
        cmd = [PRLIMIT, f"--as={limit}", "--", *cmd]
    env = {**os.environ, "SAECORE_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def assert_clean(result: subprocess.CompletedProcess, error: str, *fragments: str) -> None:
    """Exit 3 (the child's own exception handler), not 134/-6 (abort) or -9 (killed)."""
    assert result.returncode == 3, f"exit {result.returncode}, stderr:\n{result.stderr[-2000:]}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{error}: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def set_shard(index: int, **fields):
    return lambda m: m["shards"][index].update(fields)


# (id, store kind, manifest edit, statement, expected exception, message fragments)
MANIFEST_CASES = [
    ("d_sae=2^32-1: mining", "plain", lambda m: m.update(d_sae=2**32 - 1), "mine(path)",
     "MemoryError", ["d_sae = 4294967295", "bytes"]),
    ("d_sae=2^32-1: feature-major build", "plain", lambda m: m.update(d_sae=2**32 - 1), "build_csc(path)",
     "MemoryError", ["d_sae = 4294967295", "bytes"]),
    ("d_sae=2^32-1: activations from the copy", "csc", lambda m: m.update(d_sae=2**32 - 1),
     "FeatureStore(path).activations(0)", "CorruptDataError", ["col_ptr", "34359738368"]),
    ("last shard claims 10^12 rows: read_csr", "one-shard", lambda m: (m.update(shard_rows=10**12), set_shard(0, rows=10**12)(m)),
     "FeatureStore(path).read_csr()", "CorruptDataError", ["row_ptr", "8000000000008"]),
    ("last shard claims 10^12 rows: verify", "one-shard", lambda m: (m.update(shard_rows=10**12), set_shard(0, rows=10**12)(m)),
     "FeatureStore(path).verify()", "CorruptDataError", ["row_ptr"]),
    ("a middle shard claims 10^12 rows", "plain", set_shard(1, rows=10**12), "FeatureStore(path)",
     "CorruptDataError", ["shard 000001", "1000000000000 rows"]),
    ("a shard claims 10^15 activations", "plain", set_shard(0, nnz=10**15), "FeatureStore(path).verify()",
     "CorruptDataError", ["1000000000000000 activations"]),
    ("nnz lie within rows x d_sae", "plain", set_shard(2, nnz=17), "FeatureStore(path).verify()",
     "CorruptDataError", ["shard 000002", "feature"]),
    ("row_start 2^64-1", "plain", set_shard(3, row_start=2**64 - 1), "FeatureStore(path)",
     "CorruptDataError", ["starts at row 18446744073709551615"]),
    ("shard_rows lie (16 -> 8): read_csr", "plain", lambda m: m.update(shard_rows=8), "FeatureStore(path).read_csr()",
     "CorruptDataError", ["shard 000000 holds 16 rows", "8 rows"]),
    ("shard_rows lie (16 -> 32): verify", "plain", lambda m: m.update(shard_rows=32), "FeatureStore(path).verify()",
     "CorruptDataError", ["holds 16 rows", "32 rows"]),
    ("shard_rows 0", "plain", lambda m: m.update(shard_rows=0), "FeatureStore(path)",
     "CorruptDataError", ["shard_rows"]),
    ("csc nnz lie", "csc", lambda m: m["csc"].update(nnz=10**12), "FeatureStore(path)",
     "CorruptDataError", ["csc", "1000000000000"]),
    ("csc chunk_elems 10^15", "csc", lambda m: m["csc"].update(chunk_elems=10**15), "FeatureStore(path).activations(1)",
     "CorruptDataError", ["csc"]),
]

ARGUMENT_CASES = [
    ("shard_rows=10^12", "open_writer(path + '.new', 24, {}, shard_rows=10**12)", "ValueError", ["shard_rows = 1000000000000"]),
    ("threads=10^9", "open_writer(path + '.new', 24, {}, threads=10**9)", "ValueError", ["threads = 1000000000"]),
    ("shard buffers beyond the machine", "open_writer(path + '.new', 24, {}, shard_rows=2**32 - 2, threads=2)",
     "MemoryError", ["shard_rows = 4294967294", "row pointers"]),
    ("chunk_elems=10^15", "build_csc(path, chunk_elems=10**15)", "MemoryError", ["chunk_elems = 1000000000000000"]),
    ("samples_per_bin=10^12", "mine(path, samples_per_bin=10**12)", "ValueError", ["samples_per_bin (1000000000000)"]),
    ("k, bins and samples at their maxima", "mine(path, k=65535, hist_bins=65535, sample_bins=65535, samples_per_bin=65535)",
     "MemoryError", ["k = 65535", "d_sae = 24"]),
    ("density histogram n_bins=10^15",
     "import numpy as np; _native.density_histogram(np.ones(4, np.uint64), 10, 10**15)", "MemoryError", ["n_bins = 1000000000000000"]),
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {
        "plain": write_small_store(root / "plain.zarr"),
        "csc": write_small_store(root / "csc.zarr", csc=True),
        "one-shard": write_small_store(root / "one.zarr", shard_rows=64),
    }


@pytest.mark.parametrize(("kind", "edit", "statement", "error", "fragments"),
                         [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_crafted_manifests_raise_cleanly_under_a_memory_limit(stores, tmp_path, kind, edit, statement, error, fragments):
    path = tmp_path / "crafted.zarr"
    shutil.copytree(stores[kind], path)
    edit_manifest(path, edit)
    assert_clean(run_limited(statement, path), error, *fragments)


@pytest.mark.parametrize(("statement", "error", "fragments"),
                         [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES])
def test_huge_arguments_raise_cleanly_under_a_memory_limit(stores, statement, error, fragments):
    assert_clean(run_limited(statement, stores["plain"]), error, *fragments)


def test_the_untouched_store_reads_under_the_same_limit(stores):
    """The limit is not what makes the cases above fail: the real store reads and mines under it."""
    result = run_limited("s = FeatureStore(path); s.verify(); s.read_csr(); mine(path); raise ValueError('fine')", stores["plain"])
    assert_clean(result, "ValueError", "fine")


def test_a_lying_shard_rows_is_refused_in_process(stores, tmp_path):
    """Item 8: read_csr used to trust ``shard_rows``; the manifest is now checked against the shards."""
    path = tmp_path / "lie.zarr"
    shutil.copytree(stores["plain"], path)
    before = FeatureStore(path).read_csr()
    edit_manifest(path, lambda m: m.update(shard_rows=20))
    with pytest.raises(CorruptDataError, match="shard 000000 holds 16 rows"):
        FeatureStore(path).read_csr()
    edit_manifest(path, lambda m: m.update(shard_rows=16))
    after = FeatureStore(path).read_csr()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)



def test_encode_with_huge_batch_and_shard_rows_raises_cleanly(tmp_path):
    """``encode(batch_rows=10**12, shard_rows=10**12)`` used to reach a multi-TB shard buffer."""
    import torch
    from saecore.sae import SAE, SAEConfig
    from saecore.toy import ToyConfig, write_toy_store

    write_toy_store(tmp_path / "activations.zarr", ToyConfig(n_features=8, d=8, seed=1), rows=64, chunk_rows=32)
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, hook_name="toy"), seed=0)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
    sae.save(tmp_path / "sae")
    statement = (
        "from saecore.encode import encode; "
        "encode(path + '/activations.zarr', path + '/sae', path + '/f.zarr', batch_rows=10**12, shard_rows=10**12, "
        "device='cpu', progress=False)"
    )
    # EncodeConfig's declared ranges refuse it before any buffer exists ...
    assert_clean(run_limited(statement, tmp_path), "ValueError", "EncodeConfig.batch_rows must be in")
    assert not (tmp_path / "f.zarr").exists()
    # ... and the Rust writer, reached without the config, bounds the shard buffer itself.
    writer = "open_writer(path + '/f.zarr', 16, {'test': 'hostile'}, shard_rows=10**12)"
    assert_clean(run_limited(writer, tmp_path), "ValueError", "shard_rows = 1000000000000")
    assert not (tmp_path / "f.zarr").exists()
