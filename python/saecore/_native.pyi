"""Type stubs of the Rust extension module saecore._native (kept in step by hand; checked by stubtest)."""

import numpy

__version__: str

class CorruptDataError(ValueError):
    """Data on disk failed a checksum, is truncated, or does not parse."""

def num_threads() -> int:
    """Number of threads the core's pool uses (SAECORE_NUM_THREADS caps it)."""

# --- neighbours (geometry helper) ---
def neighbours_top_k(
    a: numpy.ndarray, b: numpy.ndarray | None, k: int, *, tile: int | None = None, name_a: str = "a", name_b: str = "b"
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Top-k cosine neighbours of a's rows in b (or in a, itself excluded): (indices u32 [n,k], cosines f32 [n,k]).
    a, b: C-contiguous float32, or uint16 holding float16 bits."""

def neighbours_threshold(
    a: numpy.ndarray,
    b: numpy.ndarray | None,
    threshold: float,
    *,
    max_pairs: int = 100_000_000,
    tile: int | None = None,
    name_a: str = "a",
    name_b: str = "b",
) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """All pairs with cosine >= threshold: (rows u32, cols u32, cosines f32), by row, cosine desc, col."""
