"""Type stubs of the Rust extension module saecore._native (kept in step by hand; checked by stubtest).

No argument has a default here: the defaults live once, in the config dataclasses that call these."""

from typing import TypedDict, final

import numpy
import numpy.typing as npt
from typing_extensions import Self

__all__ = [
    "FeatureStoreReader",
    "FeatureStoreWriter",
    "Progress",
    "__version__",
    "build_csc",
    "check_partial",
    "density_histogram",
    "finish_partials",
    "merge_partials",
    "mine",
    "mine_extrema",
    "mine_partial",
    "neighbours_threshold",
    "neighbours_top_k",
    "num_threads",
    "token_scores",
]

__version__: str

def num_threads() -> int:
    """Number of threads the core's pool uses (SAECORE_NUM_THREADS caps it)."""

# --- neighbours (geometry helper) ---
def neighbours_top_k(
    a: numpy.ndarray, b: numpy.ndarray | None, k: int, *, tile: int | None, name_a: str, name_b: str
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Top-k cosine neighbours of a's rows in b (or in a, itself excluded): (indices u32 [n,k], cosines f32 [n,k]).
    a, b: C-contiguous float32, or uint16 holding float16 bits."""

def neighbours_threshold(
    a: numpy.ndarray,
    b: numpy.ndarray | None,
    threshold: float,
    *,
    max_pairs: int,
    tile: int | None,
    name_a: str,
    name_b: str,
) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """All pairs with cosine >= threshold: (rows u32, cols u32, cosines f32), by row, cosine desc, col."""

# --- sparse feature store and mining (index helper) ---
@final
class FeatureStoreWriter:
    """Appends CSR batches to a feature store (creates it, or resumes after its last committed shard)."""

    def __new__(
        cls, path: str, d_sae: int, *, value_dtype: str, shard_rows: int, spec_json: str, threads: int
    ) -> Self: ...
    @property
    def rows_at_open(self) -> int: ...
    @property
    def rows_written(self) -> int: ...
    @property
    def shards_committed(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    def append(self, row_ptr: numpy.ndarray, feature: numpy.ndarray, value: numpy.ndarray) -> None:
        """row_ptr int64|uint64 [rows+1], feature int64|int32|uint32 [nnz], value float32 (or a uint16 view of float16)."""
    def finish(self) -> str:
        """Write the last shard, wait for commits, mark complete; returns the manifest JSON."""
    def close(self) -> None:
        """Stop without finishing (queued shards are committed)."""

@final
class FeatureStoreReader:
    """Read-only view of a feature store, fixed to the shards committed when it was opened."""

    def __new__(cls, path: str) -> Self: ...
    @property
    def d_sae(self) -> int: ...
    @property
    def n_rows(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    @property
    def num_shards(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    @property
    def has_csc(self) -> bool: ...
    @property
    def value_dtype(self) -> str: ...
    def manifest_json(self) -> str: ...
    def read_shard(self, index: int) -> tuple[int, numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """(row_start, row_ptr u64, feature u32, value f32), checksum-verified."""
    def verify(self) -> None: ...
    def activations(self, feature: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(rows u64, values f32) of one feature from the feature-major copy."""

def build_csc(path: str, *, mem_budget_bytes: int, chunk_elems: int) -> str:
    """Build the feature-major copy of a complete store (no-op if present); returns the manifest JSON."""

@final
class Progress:
    """Counter of finished work units, advanced by Rust while Python polls it."""

    def __new__(cls) -> Self: ...
    @property
    def value(self) -> int: ...

class _MineResult(TypedDict):
    """What :func:`mine` returns (a plain dict at runtime; this type exists only for checkers).

    Per feature (``[d_sae]``): ``count``, ``sum``, ``max``, ``min``; ``hist_*`` and ``sample_edges`` are
    ``[d_sae, bins (+1)]`` flattened row-major. ``top_*`` hold one entry per top-k example in (feature,
    rank) order, ``sample_*`` one per quantile sample in (feature, bin, value desc, row asc) order.
    """

    n_rows: int
    """Token rows mined."""
    d_sae: int
    """Features in the store."""
    t_start_ns: int
    """Wall clock (ns since the epoch) when the Rust work began, with the GIL released."""
    t_end_ns: int
    """Wall clock when it ended."""
    count: npt.NDArray[numpy.uint64]
    """Nonzero activations per feature."""
    sum: npt.NDArray[numpy.float64]
    """Sum of each feature's activations."""
    max: npt.NDArray[numpy.float32]
    """Largest activation per feature (0 when it never fires)."""
    min: npt.NDArray[numpy.float32]
    """Smallest nonzero activation per feature (0 when it never fires)."""
    top_feature: npt.NDArray[numpy.uint32]
    top_rank: npt.NDArray[numpy.uint16]
    """Rank within the feature (0 = largest value)."""
    top_row: npt.NDArray[numpy.uint64]
    """Token row of the activation store."""
    top_value: npt.NDArray[numpy.float32]
    hist_edges: npt.NDArray[numpy.float32]
    """``[d_sae * (hist_bins + 1)]`` log-spaced bin edges."""
    hist_counts: npt.NDArray[numpy.uint64]
    """``[d_sae * hist_bins]``."""
    sample_edges: npt.NDArray[numpy.float32]
    """``[d_sae * (sample_bins + 1)]`` sample-bin edges, ``max * b / sample_bins``."""
    sample_feature: npt.NDArray[numpy.uint32]
    sample_bin: npt.NDArray[numpy.uint16]
    sample_row: npt.NDArray[numpy.uint64]
    sample_value: npt.NDArray[numpy.float32]

def mine(
    path: str,
    *,
    k: int,
    hist_bins: int,
    sample_bins: int,
    samples_per_bin: int,
    seed: int,
    second_pass: bool,
    progress: Progress | None,
) -> _MineResult:
    """Statistics, histograms, top-k and quantile samples of every feature (numpy arrays in a dict)."""

def mine_partial(
    path: str,
    first: int,
    end: int,
    *,
    pass_: int,
    k: int,
    hist_bins: int,
    sample_bins: int,
    samples_per_bin: int,
    seed: int,
    extrema: bytes | None = None,
    progress: Progress | None = None,
) -> bytes:
    """Mine shards first..end into an encoded partial (pass 1; pass 2 needs the extrema)."""

def merge_partials(parts: list[bytes]) -> bytes:
    """Merge encoded partials of one pass; a failed checksum raises CorruptDataError naming the part."""

def check_partial(part: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(pass, shard ranges covered) of an encoded partial, after checking its checksum."""

def mine_extrema(pass1: bytes, num_shards: int) -> bytes:
    """The encoded per-feature extrema of a merged pass-1 partial covering every shard."""

def finish_partials(path: str, pass1: bytes, pass2: bytes | None = None) -> dict[str, object]:
    """The dict `mine` returns, from merged partials covering every shard of the store at path."""

def density_histogram(count: numpy.ndarray, n_rows: int, n_bins: int) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(lo_log10, hi_log10, count); row 0 counts features that never fire."""

# --- token scores (model-free autointerp) ---

def token_scores(
    path: str,
    token_ids: numpy.ndarray,
    doc_ids: numpy.ndarray,
    positions: numpy.ndarray,
    *,
    held_out_fraction: float = 0.5,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Token- and (previous, token)-simulator correlations of every feature (counts and numpy arrays in a dict)."""
