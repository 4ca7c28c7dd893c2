"""The corruption matrix: every artefact kind × (flip a byte, truncate, delete) → the reader raises a
:class:`saecore.SaecoreError` (CorruptDataError for damage) naming the damaged file. Nothing is read
silently, nothing escapes as a bare library error.

One small real run (toy activation store → trained SAE → feature store → index) is built once; each
case damages a copy of it and calls the reader a user's command would call.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from saecore import geometry, tables
from saecore._trainer_state import load_state
from saecore.activations import ActivationStore
from saecore.encode import encode
from saecore.errors import SaecoreError
from saecore.features import FeatureStore
from saecore.index import FeatureIndex, index
from saecore.run import Run
from saecore.sae import SAE
from saecore.toy import ToyConfig, write_toy_store
from saecore.training import TrainConfig, train

SAE_NAME = "s"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    run = Run(tmp_path_factory.mktemp("corruption") / "run")
    store = write_toy_store(run.activations, ToyConfig(n_features=32, d=16, seed=3), rows=2048, chunk_rows=512)
    train(store, run.sae(SAE_NAME), TrainConfig(architecture="topk", k=4, d_sae=48, batch_size=256, progress=False,
                                                shuffle_buffer_rows=1024, dead_window_tokens=1024))
    encode(store, run.sae(SAE_NAME), run.features(SAE_NAME), batch_rows=256, shard_rows=512, progress=False)
    index(run.features(SAE_NAME), run.index(SAE_NAME), progress=False)
    directions = geometry.load_directions(run.sae(SAE_NAME))  # the tables geometry verbs write beside the index
    tables.NEIGHBOURS.write(geometry.neighbours_table(directions, [], k=4), tables.NEIGHBOURS.path(run.index(SAE_NAME)))
    tables.ENC_DEC_COSINE.write(geometry.enc_dec_cosine(directions), tables.ENC_DEC_COSINE.path(run.index(SAE_NAME)))
    tables.MAP.write(geometry.feature_map([directions], "pca")[0], tables.MAP.path(run.index(SAE_NAME)))
    return run.root


def _read_store(run: Run) -> None:
    store = ActivationStore(run.activations)
    for _ in store.iter_blocks("toy"):
        pass
    store.token_ids[:], store.doc_ids[:], store.positions[:]


def _read_features(run: Run) -> None:
    fs = FeatureStore(run.features(SAE_NAME))
    fs.read_csr()
    fs.verify()


def _read_index(run: Run) -> None:
    idx = FeatureIndex(run.index(SAE_NAME))
    for spec in tables.ALL:
        if spec.mined:
            idx._table(spec)


def _read_verb_tables(run: Run) -> None:
    for spec in (tables.NEIGHBOURS, tables.ENC_DEC_COSINE, tables.MAP):
        assert spec.read(run.index(SAE_NAME)) is not None


# artefact kind → (file inside the run, the reader a command calls)
ARTEFACTS: dict[str, tuple[str, Callable[[Run], object]]] = {
    "activation chunk": ("activations.zarr/acts/toy/c/2/0", _read_store),
    "activation column chunk": ("activations.zarr/doc_ids/c/1", _read_store),
    "activation store commit record": ("activations.zarr/commit.json", _read_store),
    "activation store metadata": ("activations.zarr/zarr.json", _read_store),
    "activation array metadata": ("activations.zarr/doc_ids/zarr.json", _read_store),
    "SAE weights": (f"saes/{SAE_NAME}/sae_weights.safetensors", lambda run: SAE.load(run.sae(SAE_NAME))),
    "SAE config": (f"saes/{SAE_NAME}/cfg.json", lambda run: SAE.load(run.sae(SAE_NAME))),
    "trainer state": (f"saes/{SAE_NAME}/trainer_state.safetensors",
                      lambda run: load_state(run.sae(SAE_NAME) / "trainer_state.safetensors")),
    "feature shard": (f"features/{SAE_NAME}.zarr/shards/000001/value/c/0", _read_features),
    "feature manifest": (f"features/{SAE_NAME}.zarr/zarr.json", _read_features),
    "index table (topk)": (f"index/{SAE_NAME}/topk.parquet", _read_index),
    "index table (stats)": (f"index/{SAE_NAME}/stats.parquet", _read_index),
    "index metadata": (f"index/{SAE_NAME}/meta.json", _read_index),
    "geometry table (neighbours)": (f"index/{SAE_NAME}/neighbours.parquet", _read_verb_tables),
    "geometry table (enc_dec_cosine)": (f"index/{SAE_NAME}/enc_dec_cosine.parquet", _read_verb_tables),
    "geometry table (map)": (f"index/{SAE_NAME}/map.parquet", _read_verb_tables),
    "geometry table checksum": (f"index/{SAE_NAME}/map.parquet.sha256", _read_verb_tables),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": _flip, "truncate": _truncate, "delete": Path.unlink}


def _outcome(run: Run, rel: str, reader: Callable[[Run], object]) -> tuple[str, str]:
    """("clean", message) when the reader raised a SaecoreError naming the file, else ("other", what happened)."""
    try:
        reader(run)
    except SaecoreError as e:
        named = rel in str(e) or str(run.root / rel) in str(e)
        return ("clean" if named else "other", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - classified, not swallowed: the assertion below reports it
        return "other", f"{type(e).__name__} (not a SaecoreError): {e}"
    return "other", "read without an error"


def test_every_damaged_artefact_is_reported_naming_its_file(built, tmp_path, capsys):
    counts: Counter[str] = Counter()
    failures = []
    for kind, (rel, reader) in ARTEFACTS.items():
        for how, damage in DAMAGE.items():
            run = Run(tmp_path / f"{kind}-{how}".replace(" ", "_").replace("(", "").replace(")", ""))
            shutil.copytree(built, run.root)
            reader(run)  # the undamaged copy reads fine
            damage(run.root / rel)
            outcome, message = _outcome(run, rel, reader)
            counts["tried"] += 1
            counts[outcome] += 1
            if outcome != "clean":
                failures.append(f"{kind} / {how}: {message}")
            print(f"{kind:<24} {how:<8} {outcome:<6} {message.splitlines()[0][:160]}")
    with capsys.disabled():
        print(f"\ncorruption matrix: tried {counts['tried']}, reported cleanly {counts['clean']}, "
              f"other {counts['other']}")
    assert not failures, "\n".join(failures)
