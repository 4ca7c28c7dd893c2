"""saecore's exception types, all under one root, :class:`SaecoreError`. Each message names the file,
array, shape, dtype or feature at fault.

The Rust core raises :class:`CorruptDataError` too: the binding imports this class when it first
needs it, so this module imports nothing of saecore's (no cycle with ``_native``).
"""

from __future__ import annotations


class SaecoreError(Exception):
    """Root of every saecore error: ``except saecore.SaecoreError`` catches them all."""


class CorruptDataError(SaecoreError, ValueError):
    """Data on disk failed a checksum, is truncated, or does not parse.

    Also a ValueError, so callers that catch ValueError for bad input keep working.
    """


class MissingDataError(SaecoreError, FileNotFoundError):
    """A file saecore wrote and now needs (weights, a manifest, an index's meta.json) is absent.

    Also a FileNotFoundError, so callers that catch a missing file keep working.
    """


class StoreError(SaecoreError):
    """An on-disk store is missing, incomplete, truncated or corrupt."""


class StoreMismatchError(StoreError):
    """An existing store was made with other arguments than the ones given now."""


__all__ = ["CorruptDataError", "MissingDataError", "SaecoreError", "StoreError", "StoreMismatchError"]
