"""The crash matrix: a real ``saecore`` process SIGKILLed at several points of harvest, train, encode,
index and pages, then rerun, ends with exactly the files of an uninterrupted run (bytes; JSON compared
as data, minus wall-clock timings and the run folder's own path).

The child process kills itself at a chosen point — just before its N-th file rename (every file and
chunk saecore or zarr writes is renamed into place, so these are the points where a crash can leave
a half state), or at the N-th batch handed to the feature-store writer — so each case is exact and
needs no timing. A killed ``saecore index`` over an older index must leave the old complete index or
none, never a mix, and ``saecore pages`` must then refuse it or render the old one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_HOOK
from saecore import tables
from saecore.cli import main
from saecore.errors import SaecoreError
from saecore.index import FeatureIndex
from saecore.run import Run

SAE = "s"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAECORE_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# Keys whose values are wall-clock measurements, and digests of JSON that holds one or the run's own path
# (the JSON itself is compared, scrubbed).
VOLATILE = {"mining_seconds", "seconds", "elapsed_seconds", "tokens_per_second", "sha256", "metadata_sha256", "cfg_sha256"}

CHILD = r"""
import os, signal, sys
kind, n = sys.argv[1].split(":"); n = int(n)
count = 0
def tick():
    global count
    count += 1
    if count == n:
        os.kill(os.getpid(), signal.SIGKILL)
if kind == "rename":  # just before the n-th rename: the staged file or folder is written, not yet in place
    for name in ("replace", "rename"):
        real = getattr(os, name)
        def wrapped(*a, _real=real, **k):
            tick()
            return _real(*a, **k)
        setattr(os, name, wrapped)
else:  # "append": as the feature-store writer gets its n-th batch
    import saecore.encode as enc
    real_open = enc.open_writer
    class Writer:
        def __init__(self, w): self._w = w
        def __getattr__(self, name): return getattr(self._w, name)
        def append(self, *a, **k):
            tick()
            return self._w.append(*a, **k)
    enc.open_writer = lambda *a, **k: Writer(real_open(*a, **k))
from saecore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def argv_of(stage: str, run: Path, model: Path, corpus: Path, **extra: str) -> list[str]:
    r = Run(run)
    return {
        "harvest": ["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(r.activations),
                    "--hook", TINY_HOOK, "--context-length", "32", "--batch-size", "8", "--dtype", "float32",
                    "--max-tokens", "2048", "--chunk-rows", "256", "--device", "cpu", "--no-progress"],
        "train": ["train", str(r.activations), str(r.sae(SAE)), "--architecture", "topk", "--k", "4", "--d-sae", "64",
                  "--batch-size", "128", "--checkpoint-every-steps", "3", "--dead-window-tokens", "512",
                  "--shuffle-buffer-rows", "512", "--device", "cpu", "--no-progress"],
        "encode": ["encode", "--store", str(r.activations), "--sae", str(r.sae(SAE)), "--out", str(r.features(SAE)),
                   "--batch-rows", "256", "--shard-rows", "512", "--device", "cpu", "--no-progress"],
        "index": ["index", "--features", str(r.features(SAE)), "--out", str(r.index(SAE)), "--k", extra.get("k", "20"),
                  "--no-progress"],
        "pages": ["pages", str(run), "--no-tokenizer"],
    }[stage]


OUTPUT = {"harvest": lambda r: r.activations, "train": lambda r: r.sae(SAE), "encode": lambda r: r.features(SAE),
          "index": lambda r: r.index(SAE), "pages": lambda r: r.pages}
STAGES = list(OUTPUT)


def _scrub(value, root: str):
    if isinstance(value, dict):
        return {k: _scrub(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v, root) for v in value]
    return value.replace(root, "<RUN>") if isinstance(value, str) else value


def snapshot(folder: Path, root: Path) -> dict[str, object]:
    """Every file under ``folder``: JSON as data (timings and the run's path scrubbed), else bytes."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        data = p.read_bytes()
        if p.suffix == ".json":
            out[rel] = _scrub(json.loads(data), str(root.resolve()))
        elif p.suffix in (".html", ".js"):
            out[rel] = data.decode().replace(str(root.resolve()), "<RUN>")
        else:
            out[rel] = data
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, small_corpus_dir, tmp_path_factory) -> Path:
    """The uninterrupted run, every stage in this process."""
    run = tmp_path_factory.mktemp("crash-ref") / "run"
    for stage in STAGES:
        assert main(argv_of(stage, run, tiny_model_dir, small_corpus_dir)) == 0, stage
    return run


def _prepare(reference: Path, run: Path, stage: str, model: Path, corpus: Path) -> None:
    """A run holding the outputs of every stage before ``stage``: the activation store and SAE copied
    from the reference, encode and index rerun here (they record the absolute paths of their inputs)."""
    for before in STAGES[: STAGES.index(stage)]:
        if before in ("harvest", "train"):
            shutil.copytree(OUTPUT[before](Run(reference)), OUTPUT[before](Run(run)))
        else:
            assert main(argv_of(before, run, model, corpus)) == 0, before


def _kill(argv: list[str], at: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, at, *argv], check=False, env=ENV, capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {at} (exit {proc.returncode}): {proc.stderr[-2000:]}"


# (stage, kill point), sized for a 2-core CI runner: harvest mid-run (after some chunks are committed);
# train's rename 5 falls between the second checkpoint's new weights and the cfg.json recording their
# sha256; index's rename 3 is among the new tables, rename 8 after the old index was moved aside;
# pages' rename 2 is the SAE's page folder (after the shared assets).
CASES = [("harvest", "rename:30"), ("train", "rename:5"), ("encode", "append:5"), ("index", "rename:3"),
         ("index", "rename:8"), ("pages", "rename:2")]


@pytest.mark.parametrize(("stage", "at"), CASES, ids=[f"{s}-{a}" for s, a in CASES])
def test_killed_then_rerun_equals_the_uninterrupted_run(reference, tiny_model_dir, small_corpus_dir, tmp_path,
                                                        stage, at):
    run = tmp_path / "run"
    _prepare(reference, run, stage, tiny_model_dir, small_corpus_dir)
    if stage == "index":  # an older complete index (other settings) that the killed rewrite must not mix into
        assert main(argv_of("index", run, tiny_model_dir, small_corpus_dir, k="5")) == 0
    argv = argv_of(stage, run, tiny_model_dir, small_corpus_dir)
    _kill(argv, at)
    if stage == "index":
        _old_index_or_none(run)
    assert main(argv) == 0
    out = OUTPUT[stage]
    assert not [p for p in out(Run(run)).parent.iterdir() if p.name.endswith(".partial")], "orphans left"
    assert snapshot(out(Run(run)), run) == snapshot(out(Run(reference)), reference)


def _old_index_or_none(run: Path) -> None:
    """After a killed rewrite: the old complete index (k=5, every table matching its meta.json) or a
    refusal — and ``saecore pages`` agrees: it renders the old one or fails with one line."""
    path = Run(run).index(SAE)
    try:
        idx = FeatureIndex(path)
    except SaecoreError:
        assert main(["pages", str(run), "--no-tokenizer"]) == 2
        return
    assert idx.meta["k"] == 5
    for spec in tables.ALL:
        if spec.mined:
            idx._table(spec)  # checks each table against meta.json's sha256
    assert main(["pages", str(run), "--no-tokenizer"]) == 0
    shutil.rmtree(Run(run).pages)
