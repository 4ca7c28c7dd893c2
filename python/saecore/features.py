"""The sparse feature store (``features/SAE.zarr``): token-major CSR shards and a feature-major copy.

Layout (a Zarr v3 hierarchy; zarr-python opens every array with no saecore import)::

    SAE.zarr/
      zarr.json               group; attributes["saecore"] is the manifest: d_sae, value dtype,
                              shard_rows, the encode spec, and per shard its rows, nnz and the length
                              and CRC-32C of each chunk file; "complete" once the writer finished
      shards/NNNNNN/          one group per committed block of ``shard_rows`` tokens
        row_ptr [rows+1] uint64, feature [nnz] uint32, value [nnz] float16|float32
      csc/                    feature-major copy: col_ptr [d_sae+1] uint64, row [nnz] uint64, value [nnz]

A shard becomes visible only when the manifest naming it is renamed into place, so a reader sees whole
shards or nothing, and a killed writer resumes at the first missing shard. Every chunk is checked
against its CRC-32C before it is decoded: damage raises :class:`saecore.CorruptDataError` naming the
shard and array. The Rust core (``saecore._native``) does the writing, verifying and decoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from . import _native
from .errors import MissingDataError


class CSRShard(NamedTuple):
    """One token-major shard: row ``row_start + i`` owns ``feature/value[row_ptr[i]:row_ptr[i+1]]``."""

    row_start: int
    row_ptr: np.ndarray  # uint64 [rows + 1]
    feature: np.ndarray  # uint32 [nnz]
    value: np.ndarray  # float32 [nnz]


class Activations(NamedTuple):
    """Every activation of one feature: token rows (ascending) and values."""

    rows: np.ndarray  # uint64 [count]
    values: np.ndarray  # float32 [count]


class FeatureStore:
    """Read-only view of a feature store, fixed to the shards committed when it was opened.

    >>> store = FeatureStore("runs/demo/features/sae.zarr")   # doctest: +SKIP
    >>> rows, values = store.activations(123)                  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._reader = _native.FeatureStoreReader(str(self.path))
        except FileNotFoundError as e:
            if not self.path.is_dir():
                raise
            raise MissingDataError(str(e)) from e  # a store folder without its manifest

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"FeatureStore({str(self.path)!r}, rows={self.n_rows}, d_sae={self.d_sae}, nnz={self.nnz}, {state})"

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return self._reader.d_sae

    @property
    def n_rows(self) -> int:
        """Token rows in the committed shards."""
        return self._reader.n_rows

    @property
    def nnz(self) -> int:
        """Stored (nonzero) activations."""
        return self._reader.nnz

    @property
    def num_shards(self) -> int:
        return self._reader.num_shards

    @property
    def complete(self) -> bool:
        """Whether the encode that wrote the store finished."""
        return self._reader.complete

    @property
    def has_csc(self) -> bool:
        """Whether the feature-major copy exists."""
        return self._reader.has_csc

    @property
    def value_dtype(self) -> str:
        return self._reader.value_dtype

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (also readable as ``zarr.open_group(path).attrs["saecore"]``)."""
        return json.loads(self._reader.manifest_json())

    @property
    def spec(self) -> dict[str, Any]:
        """What was encoded: SAE, activation store, hook (written by ``saecore encode``)."""
        return dict(self.manifest.get("spec") or {})

    def shard(self, index: int) -> CSRShard:
        """Shard ``index``, checksum-verified."""
        return CSRShard(*self._reader.read_shard(index))

    def iter_shards(self) -> Iterator[CSRShard]:
        """Every committed shard in row order; memory is one shard."""
        for i in range(self.num_shards):
            yield self.shard(i)

    def activations(self, feature: int) -> Activations:
        """Every activation of ``feature`` from the feature-major copy (one contiguous read)."""
        return Activations(*self._reader.activations(int(feature)))

    def verify(self) -> None:
        """Check every chunk's length, CRC-32C and decodability; raises CorruptDataError."""
        self._reader.verify()

    def read_csr(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``start:stop`` as one CSR triple ``(row_ptr int64, feature uint32, value float32)``."""
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"{self.path}: rows {start}:{stop} outside 0:{self.n_rows}")
        shard_rows = int(self.manifest["shard_rows"])
        ptrs, feats, vals, offset = [np.zeros(1, np.int64)], [], [], 0
        for i in range(start // shard_rows, (stop + shard_rows - 1) // shard_rows):
            s = self.shard(i)
            lo, hi = max(start, s.row_start) - s.row_start, min(stop, s.row_start + len(s.row_ptr) - 1) - s.row_start
            a, b = int(s.row_ptr[lo]), int(s.row_ptr[hi])
            ptrs.append(s.row_ptr[lo + 1 : hi + 1].astype(np.int64) - a + offset)
            feats.append(s.feature[a:b])
            vals.append(s.value[a:b])
            offset += b - a
        feature = np.concatenate(feats) if feats else np.zeros(0, np.uint32)
        value = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        return np.concatenate(ptrs), feature, value


# The store's defaults, declared once: EncodeConfig and these functions use them; the binding has none.
VALUE_DTYPE: Final = "float16"
SHARD_ROWS = 16384
WRITER_THREADS = 2
CSC_MEM_BUDGET_BYTES = 1 << 30
CSC_CHUNK_ELEMS = 1 << 20


def build_csc(
    path: str | os.PathLike[str], *, mem_budget_bytes: int = CSC_MEM_BUDGET_BYTES, chunk_elems: int = CSC_CHUNK_ELEMS
) -> dict[str, Any]:
    """Build the feature-major copy of a complete store (a no-op when it exists); returns the manifest.

    A streaming transpose: memory is about ``mem_budget_bytes`` whatever the number of tokens.
    """
    return json.loads(_native.build_csc(str(path), mem_budget_bytes=mem_budget_bytes, chunk_elems=chunk_elems))


def open_writer(
    path: str | os.PathLike[str],
    d_sae: int,
    spec: dict[str, Any],
    *,
    value_dtype: str = VALUE_DTYPE,
    shard_rows: int = SHARD_ROWS,
    threads: int = WRITER_THREADS,
) -> _native.FeatureStoreWriter:
    """Create or resume a store. Reopening with another ``spec``/``d_sae``/dtype/shard size raises
    ValueError naming each difference."""
    return _native.FeatureStoreWriter(
        str(path),
        int(d_sae),
        value_dtype=value_dtype,
        shard_rows=int(shard_rows),
        spec_json=json.dumps(spec, sort_keys=True),
        threads=int(threads),
    )


def dense_to_csr(dense: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense ``[rows, d_sae]`` torch tensor or ndarray → ``(row_ptr int64, feature int32, value float32)``.

    The work happens on the tensor's device; only the nonzeros cross to the host.
    """
    import torch

    t = torch.as_tensor(dense)
    mask = t != 0  # (B, d_sae)
    row_ptr = torch.zeros(t.shape[0] + 1, dtype=torch.int64, device=t.device)
    torch.cumsum(mask.sum(dim=1), dim=0, out=row_ptr[1:])
    feature = mask.nonzero()[:, 1].to(torch.int32)  # row-major order, ascending within a row
    value = t[mask].to(torch.float32)
    return row_ptr.cpu().numpy(), feature.cpu().numpy(), value.cpu().numpy()


__all__ = ["Activations", "CSRShard", "FeatureStore", "build_csc", "dense_to_csr", "open_writer"]
