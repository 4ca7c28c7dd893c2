"""Type stubs of the Rust extension module saecore._native (kept in step by hand; checked by stubtest)."""

__version__: str

class CorruptDataError(ValueError):
    """Data on disk failed a checksum, is truncated, or does not parse."""

def num_threads() -> int:
    """Number of threads the core's pool uses (SAECORE_NUM_THREADS caps it)."""
