"""The run folder: where every stage reads and writes, and every file name saecore gives a file.

One run directory holds a whole study::

    runs/NAME/
      activations.zarr/     the activation store (``saecore harvest``)
      saes/SAE/             cfg.json, sae_weights.safetensors, metrics.json, trainer_state.safetensors
      features/SAE.zarr/    the sparse feature store (``saecore encode``)
      index/SAE/            the index tables (see :mod:`saecore.tables`) and meta.json
      pages/                the feature pages (``saecore pages``)
      llm_cache/            language-model answers of ``saecore explain`` / ``score``, by request hash
      experiments/NAME/     tables and plots of the experiment verbs (``saecore xor``, …)

:class:`Run` is the only place that joins these paths; every verb, the quick start and the pages ask
it. The constants below are the only place a file name is spelled (``tests/test_architecture.py``
holds the rest of the package to that).

An SAE folder outside a run (``some/where/SAE`` whose parent is not called ``saes``) is still usable:
its index then lives inside it, in ``SAE/index/``, and it has no run activation store or feature store
to default to (the verbs ask for them explicitly). Decided once, here, in :func:`sae_index_dir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# -- folders of a run --------------------------------------------------------------------------------
ACTIVATIONS_DIR = "activations.zarr"
SAES_DIR = "saes"
FEATURES_DIR = "features"
INDEX_DIR = "index"
PAGES_DIR = "pages"
EXPERIMENTS_DIR = "experiments"
FEATURE_STORE_SUFFIX = ".zarr"

# -- files of an SAE folder (SAELens' checkpoint layout, plus saecore's own) ------------------------
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
METRICS_FILE = "metrics.json"
TRAINER_STATE_FILE = "trainer_state.safetensors"
LEGACY_TRAINER_STATE_FILE = "trainer_state.pt"
"""A pickle written by saecore before 0.2: refused, never loaded (unpickling can run code)."""

DIST_CHECKPOINT_DIR = "dist"
"""Per-rank shards of a distributed training checkpoint, inside the SAE folder."""
DIST_MANIFEST_FILE = "MANIFEST.json"
"""Commits one step of a distributed checkpoint: written last, atomically, by rank 0."""

# -- completion markers ------------------------------------------------------------------------------
STORE_COMMIT_FILE = "commit.json"
"""The activation store's commit record; a folder without it is not (yet) a store."""
INDEX_META_FILE = "meta.json"
"""Written last by ``saecore index``: the mined tables of a folder without it are incomplete."""
CHECKSUM_SUFFIX = ".sha256"
"""Beside a table a verb writes on its own (not ``saecore index``): ``FILE.sha256`` holds the file's sha256."""
PAGES_INDEX_FILE = "index.html"
"""The root page of ``pages/``, written after every SAE's folder is in place."""
RAY_PARTS_DIR = ".ray-parts"
"""Inside a store being written with ``--ray``: the parts workers computed and the driver has not
committed yet (one folder per part, named by :func:`ray_part_dir`); removed when the store completes."""
ZARR_NODE_FILE = "zarr.json"
"""Zarr v3's metadata document of a group or array; a feature store keeps its manifest in the root's."""
FEATURE_SHARDS_DIR = "shards"
"""The feature store's token-major shards, ``shards/NNNNNN/{row_ptr,feature,value}/c/0``."""
RAY_PART_FILE = "part.json"
"""Written last into a staged part: its batches or shards, counters and each file's CRC-32C."""

# -- index tables (schemas and readers: saecore.tables) ---------------------------------------------
STATS_FILE = "stats.parquet"
HISTOGRAMS_FILE = "histograms.parquet"
TOPK_FILE = "topk.parquet"
SAMPLES_FILE = "samples.parquet"
DENSITY_HISTOGRAM_FILE = "density_histogram.parquet"
NEIGHBOURS_FILE = "neighbours.parquet"
MAP_FILE = "map.parquet"
ENC_DEC_COSINE_FILE = "enc_dec_cosine.parquet"
LOGIT_LENS_FILE = "logit_lens.parquet"
LOGIT_LENS_ENCODER_FILE = "logit_lens_encoder.parquet"
TOKEN_SCORES_FILE = "token_scores.parquet"
# Automated interpretability (``saecore explain``, ``saecore score``), in index/SAE/.
EXPLANATIONS_FILE = "explanations.parquet"
AUTOINTERP_SCORES_FILE = "autointerp_scores.parquet"
SPECIFICITY_FILE = "specificity.parquet"
AUTOINTERP_SUMMARY_FILE = "autointerp.json"
SPECIFICITY_PLOT = "specificity.png"
LLM_CACHE_DIR = "llm_cache"
"""Every language-model request and answer, one JSON file per request hash (see saecore.llm)."""
# Tables and plots of the geometry verbs that nothing else reads.
GEOMETRY_FILE = "geometry.parquet"
GEOMETRY_PLOT = "geometry.png"
MAP_PLOT = "map.png"
SPLITTING_FILE = "splitting.parquet"
SPLITTING_FAMILIES_FILE = "splitting_families.parquet"
SPLITTING_PLOT = "splitting.png"
BENCH_SYNTH_FILE = "bench_synth.json"
# SAEBench-format results of ``saecore eval --suite`` (inside the SAE folder, SAEBENCH_DIR/), and the
# ``--compare`` table (in the run's SAEBENCH_DIR/, or the folder given).
SAEBENCH_DIR = "saebench"
SAEBENCH_SUMMARY_FILE = "summary.json"
SAEBENCH_PLOT = "saebench.png"
SAEBENCH_COMPARE_CSV = "compare.csv"
SAEBENCH_COMPARE_JSON = "compare.json"
# Experiment verbs (under experiments/NAME/).
XOR_TOY_FILE = "xor_toy.parquet"
XOR_TOY_PLOT = "xor_toy.png"
XOR_MODEL_FILE = "xor_model.parquet"
XOR_MODEL_PLOT = "xor_model.png"
MAXIMISE_EXPERIMENT = "maximise"
"""``saecore maximise``: experiments/maximise/SAE/F.json, one file per feature (:func:`maximise_dir`)."""
COMPOSITE_EXPERIMENT = "composite"
"""``saecore composite``: experiments/composite/ (toy), experiments/composite/SAE/ (that SAE's meta-SAE)."""
COMPOSITE_FEATURES_FILE = "composite_features.parquet"
COMPOSITE_META_FILE = "composite_meta_latents.parquet"
COMPOSITE_META_PLOT = "composite_meta.png"
COMPOSITE_TOY_FILE = "composite_toy.parquet"
COMPOSITE_TOY_META_FILE = "composite_toy_meta.parquet"
COMPOSITE_TOY_PLOT = "composite_toy.png"
COMPOSITE_GEOMETRY_FILE = "composite_geometry.parquet"
CLASSICAL_FILE = "classical.parquet"
CLASSICAL_DENSITY_FILE = "classical_density.parquet"
CLASSICAL_GEOMETRY_FILE = "classical_geometry.parquet"
CLASSICAL_PLOT = "classical.png"


@dataclass(frozen=True)
class Run:
    """A run directory ``runs/NAME/`` and the path of everything in it (nothing is created or checked).

    >>> run = Run("runs/demo")
    >>> run.index("topk-4k").as_posix()
    'runs/demo/index/topk-4k'
    """

    root: Path

    def __init__(self, root: str | os.PathLike[str]):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_sae(cls, sae_dir: str | os.PathLike[str]) -> Run | None:
        """The run an SAE folder ``runs/NAME/saes/SAE`` belongs to; None for an SAE folder outside a run."""
        sae_dir = Path(sae_dir)
        return cls(sae_dir.parent.parent) if sae_dir.parent.name == SAES_DIR else None

    @property
    def activations(self) -> Path:
        """The activation store, ``runs/NAME/activations.zarr``."""
        return self.root / ACTIVATIONS_DIR

    def sae(self, name: str) -> Path:
        """An SAE folder, ``runs/NAME/saes/SAE``."""
        return self.root / SAES_DIR / name

    def features(self, name: str) -> Path:
        """An SAE's feature store, ``runs/NAME/features/SAE.zarr``."""
        return self.root / FEATURES_DIR / f"{name}{FEATURE_STORE_SUFFIX}"

    @property
    def index_root(self) -> Path:
        """``runs/NAME/index``, one folder per indexed SAE."""
        return self.root / INDEX_DIR

    def index(self, name: str) -> Path:
        """An SAE's index folder, ``runs/NAME/index/SAE``."""
        return self.index_root / name

    @property
    def pages(self) -> Path:
        """The feature pages, ``runs/NAME/pages``."""
        return self.root / PAGES_DIR

    @property
    def llm_cache(self) -> Path:
        """Cached language-model answers of ``saecore explain`` / ``score``, ``runs/NAME/llm_cache``."""
        return self.root / LLM_CACHE_DIR

    def experiment(self, name: str) -> Path:
        """An experiment verb's output folder, ``runs/NAME/experiments/EXPERIMENT``."""
        return self.root / EXPERIMENTS_DIR / name

    def indexed_saes(self) -> list[str]:
        """Names of the SAEs with an index folder, sorted."""
        if not self.index_root.is_dir():
            return []
        return sorted(p.name for p in self.index_root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def sae_names(self) -> list[str]:
        """Names of the SAE folders (those holding a cfg.json), sorted."""
        return sorted(p.parent.name for p in (self.root / SAES_DIR).glob(f"*/{CFG_FILE}"))


def saebench_dir(sae_dir: str | os.PathLike[str]) -> Path:
    """An SAE's SAEBench-format results, ``SAE_DIR/saebench``."""
    return Path(sae_dir) / SAEBENCH_DIR


def saebench_file(sae_dir: str | os.PathLike[str], eval_type_id: str) -> Path:
    """One SAEBench eval's result, ``SAE_DIR/saebench/EVAL_TYPE_ID.json`` (e.g. ``core.json``)."""
    return saebench_dir(sae_dir) / f"{eval_type_id}.json"


def saebench_summary(sae_dir: str | os.PathLike[str]) -> Path:
    """The headline SAEBench figures of an SAE (flat JSON; the pages show it)."""
    return saebench_dir(sae_dir) / SAEBENCH_SUMMARY_FILE


def saebench_plot(sae_dir: str | os.PathLike[str]) -> Path:
    """The SAEBench summary plot of an SAE."""
    return saebench_dir(sae_dir) / SAEBENCH_PLOT


def saebench_compare_files(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(CSV, JSON)`` of an ``eval --compare`` table written into ``folder``."""
    return Path(folder) / SAEBENCH_COMPARE_CSV, Path(folder) / SAEBENCH_COMPARE_JSON


def saebench_compare_dir(sae_dirs: list[Path]) -> Path | None:
    """Where ``eval --compare`` writes by default: ``runs/NAME/saebench`` when every SAE is in that one
    run, else None (the caller must name a folder)."""
    runs = {Run.of_sae(Path(d).resolve()) for d in sae_dirs}
    (run,) = runs if len(runs) == 1 else (None,)
    return None if run is None else run.root / SAEBENCH_DIR


def llm_cache_entry(folder: str | os.PathLike[str], key: str) -> Path:
    """One cached language-model answer in a cache folder: ``KE/KEY.json`` (the key's first two hex digits
    as a subfolder, so no folder holds more than a few thousand files)."""
    return Path(folder) / key[:2] / f"{key}.json"


def sae_index_dir(sae_dir: str | os.PathLike[str]) -> Path:
    """Where an SAE's index tables go: ``runs/NAME/index/SAE`` in a run, else ``SAE_DIR/index``."""
    sae_dir = Path(sae_dir)
    run = Run.of_sae(sae_dir)
    return run.index(sae_dir.name) if run is not None else sae_dir / INDEX_DIR


def maximise_dir(sae_dir: str | os.PathLike[str]) -> Path:
    """Where ``saecore maximise`` writes an SAE's results: ``runs/NAME/experiments/maximise/SAE`` in a run,
    else ``SAE_DIR/maximise``."""
    sae_dir = Path(sae_dir)
    run = Run.of_sae(sae_dir)
    return run.experiment(MAXIMISE_EXPERIMENT) / sae_dir.name if run is not None else sae_dir / MAXIMISE_EXPERIMENT


def maximise_file(feature: int) -> str:
    """The file name of one feature's ``saecore maximise`` result inside :func:`maximise_dir`."""
    return f"{int(feature)}.json"


def features_index_dir(features: str | os.PathLike[str]) -> Path:
    """The index folder of the SAE whose feature store is ``runs/NAME/features/SAE.zarr``."""
    p = Path(features).resolve()
    if p.parent.name != FEATURES_DIR or not p.name.endswith(FEATURE_STORE_SUFFIX):
        raise ValueError(f"{features}: not a feature store in a run's {FEATURES_DIR}/ folder; give the index folder explicitly")
    return Run(p.parent.parent).index(p.name.removesuffix(FEATURE_STORE_SUFFIX))


def sae_activation_store(sae_dir: str | os.PathLike[str]) -> Path | None:
    """The run's activation store for an SAE folder in a run, when it exists; else None."""
    run = Run.of_sae(sae_dir)
    return run.activations if run is not None and run.activations.exists() else None


def ray_part_dir(store: str | os.PathLike[str], key: int) -> Path:
    """The staging folder of part ``key`` (its first batch or shard) of a store written with ``--ray``."""
    return Path(store) / RAY_PARTS_DIR / f"part-{key:09d}"


def feature_store_staging(store: str | os.PathLike[str]) -> Path:
    """The hidden sibling folder where the Rust writer assembles a feature store's new shards."""
    store = Path(store)
    return store.with_name(f".{store.name}.staging")


def store_path(path: str | os.PathLike[str]) -> Path:
    """An activation store path from what a user typed: a run directory means its ``activations.zarr``."""
    path = Path(path)
    inside = Run(path).activations
    return inside if inside.exists() else path


def record_path(path: str | os.PathLike[str]) -> str:
    """How one run file records another's path: absolute, so it reads the same from any working folder."""
    return str(Path(path).resolve())


def resolve_recorded(recorded: object, anchor: str | os.PathLike[str]) -> Path | None:
    """A path a run file recorded, or None when it recorded none.

    Absolute paths are taken as they are. A relative one (written by an older saecore) is resolved
    against ``anchor``, the folder of the file that recorded it or its run, when it exists there;
    else against the working folder, as it was written.
    """
    if not isinstance(recorded, str) or not recorded:
        return None
    p = Path(recorded)
    if p.is_absolute():
        return p
    for base in (Path(anchor), *Path(anchor).resolve().parents):
        if (base / p).exists():
            return base / p
    return Path.cwd() / p
