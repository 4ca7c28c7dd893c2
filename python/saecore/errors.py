"""saecore's exception types. Each message names the file, array, shape, dtype or feature at fault."""

from __future__ import annotations

from ._native import CorruptDataError


class SaecoreError(Exception):
    """Base class of saecore's own errors (bad input that is not a plain ValueError/OSError)."""


class StoreError(SaecoreError):
    """An on-disk store is missing, incomplete, truncated or corrupt."""


class StoreMismatchError(StoreError):
    """An existing store was made with other arguments than the ones given now."""


__all__ = ["CorruptDataError", "SaecoreError", "StoreError", "StoreMismatchError"]
