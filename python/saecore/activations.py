"""The activation store: dense activations of one or more hook points, on disk as a Zarr v3 group.

Layout (readable with plain ``zarr.open_group``, no saecore import needed)::

    activations.zarr/
      zarr.json            group; attrs["saecore"] holds the metadata below once the store is complete
      acts/<hook>          [N, d] float16 | bfloat16 | float32, chunks of ``chunk_rows`` rows
      token_ids            [N] int32   token id of each row
      doc_ids              [N] int64   document index in the corpus
      positions            [N] int32   position of the token inside its context
      commit.json          how far a (possibly interrupted) writer got; written by atomic rename

Rows are written in whole batches and a batch becomes part of the store only when ``commit.json`` says
so. zarr-python writes every chunk and metadata document by write-aside-then-rename, so a killed
writer leaves committed rows intact, and a rerun continues at the first uncommitted batch. Readers
refuse an incomplete store instead of silently reading a prefix.

Integrity. Every chunk ends with a CRC-32C (Zarr v3's ``crc32c`` codec, after zstd, so plain
zarr-python still reads the store and checks it too), and every chunk is written, all-zero ones
included, so a chunk missing inside the committed rows is corruption, not zeros. Reads report either
as :class:`~saecore.errors.CorruptDataError` naming the chunk file (``…/acts/<hook>/c/3/0: …``).
Opening checks that the row counts of ``commit.json``, the metadata and the arrays agree and that
each array holds all its chunk files, so a metadata claiming rows that were never written is refused.
Stores written before checksums (no ``crc32c`` codec) are still read: their activation chunks are
not verified, and a missing activation chunk of such a store reads as zeros (zarr's default then).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ._atomic import publish_dir, write_json
from ._digest import file_sha256, json_sha256
from .errors import CorruptDataError, StoreError, StoreMismatchError
from .run import STORE_COMMIT_FILE

FORMAT = "saecore.activations/1"
COMMIT_FILE = STORE_COMMIT_FILE
# zarr skips writing a chunk equal to the fill value; every chunk is written, so a missing one is an error.
_WRITE_EVERY_CHUNK = {"array.write_empty_chunks": True}
_COLUMNS = ("token_ids", "doc_ids", "positions")
DTYPES = ("float16", "bfloat16", "float32")


def _zarr_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"activation dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        # zarr-python 3.1 has no bfloat16 data type, so bfloat16 rows are stored as their raw 16 bits
        # (uint16, the top half of the float32 bit pattern) with attrs["saecore_dtype"] = "bfloat16".
        # Any reader decodes them with: (bits.astype(np.uint32) << 16).view(np.float32).
        return np.dtype(np.uint16)
    return np.dtype(dtype)


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest, ties to even (as torch does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _encode_rows(block: np.ndarray, dtype: str, hook: str) -> np.ndarray:
    """Activations as stored: float16 / float32 / bfloat16 bits; refuses values the dtype cannot hold."""
    if dtype == "bfloat16":
        return float_to_bf16_bits(block)
    with np.errstate(over="ignore"):  # overflow is reported below, by hook name
        out = block.astype(dtype)
    if not np.isfinite(out).all():
        big = float(np.abs(block[np.isfinite(block)]).max())
        raise ValueError(
            f"hook {hook!r}: activations up to {big:.4g} overflow {dtype}; harvest with dtype bfloat16 or float32"
        )
    return out


def hook_array_name(hook: str) -> str:
    """Zarr array name of a hook point (hook names may contain dots, which zarr allows)."""
    return f"acts/{hook}"


def _spec_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: store has {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class CommitState:
    """What an activation-store writer has made durable so far."""

    batches_done: int
    rows_committed: int
    sum_sq_norm: dict[str, float]
    complete: bool = False
    #: Running totals the harvester keeps with each commit (tokens seen, rows excluded and why).
    counters: dict[str, int] = field(default_factory=dict)
    #: Once complete: sha256 of every ``zarr.json`` (store and array metadata) by path in the store.
    metadata_sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The record, sealed with the sha256 of its own canonical form (checked by :meth:`from_file`)."""
        body = {
            "batches_done": self.batches_done,
            "rows_committed": self.rows_committed,
            "sum_sq_norm": self.sum_sq_norm,
            "complete": self.complete,
            "counters": self.counters,
            "metadata_sha256": self.metadata_sha256,
        }
        return {**body, "sha256": json_sha256(body)}

    @classmethod
    def from_file(cls, path: Path) -> CommitState:
        try:
            data = json.loads(path.read_text())
            if "sha256" in data and data.pop("sha256") != json_sha256(data):  # older stores have no seal
                raise CorruptDataError(f"{path}: sha256 does not match its content; the commit record is corrupt")
            return cls(
                batches_done=int(data["batches_done"]),
                rows_committed=int(data["rows_committed"]),
                sum_sq_norm={k: float(v) for k, v in data["sum_sq_norm"].items()},
                complete=bool(data.get("complete", False)),
                counters={k: int(v) for k, v in data.get("counters", {}).items()},
                metadata_sha256={str(k): str(v) for k, v in data.get("metadata_sha256", {}).items()},
            )
        except CorruptDataError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: unreadable commit record ({e}); the store is corrupt") from e


def _metadata_digests(path: Path, hooks: Iterable[str]) -> dict[str, str]:
    """sha256 of the store's and each array's ``zarr.json``, final once the store completes."""
    names = [""] + [hook_array_name(h) for h in hooks] + list(_COLUMNS)
    rels = [f"{name}/zarr.json".lstrip("/") for name in names]
    return {rel: file_sha256(path / rel) for rel in rels}


def _check_metadata(path: Path, digests: Mapping[str, str]) -> None:
    """CorruptDataError naming the metadata file that is missing or differs from the commit record."""
    for rel, want in digests.items():
        file = path / rel
        if not file.exists():
            raise CorruptDataError(f"{file}: missing, though {COMMIT_FILE} records it; the store is corrupt")
        if file_sha256(file) != want:
            raise CorruptDataError(f"{file}: sha256 differs from the one {COMMIT_FILE} recorded; the store's "
                                   "metadata is corrupt")


class ActivationStoreWriter:
    """Creates or resumes an activation store and appends whole batches to it.

    ``spec`` is every argument that determines the store's content (model, hooks, corpus fingerprint,
    context length, dtype, exclusions, batch size …). Reopening a store with a different spec raises
    :class:`StoreMismatchError` naming each difference, so a rerun never mixes two harvests.
    """

    def __init__(self, path: Path, group: zarr.Group, spec: dict[str, Any], state: CommitState, chunk_rows: int):
        self.path = path
        self._group = group
        self.spec = spec
        self.state = state
        self.chunk_rows = chunk_rows
        self.hooks: list[str] = list(spec["hooks"])
        self._buffer: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered_batches = 0
        self._buffered_rows = 0
        self._buffered_counters: dict[str, int] = {}

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        spec: dict[str, Any],
        hook_dims: Mapping[str, int],
        capacity_rows: int,
        chunk_rows: int = 4096,
    ) -> ActivationStoreWriter:
        """Open ``path`` for writing: resume it if it holds the same spec, create it if absent."""
        path = Path(path)
        spec = json.loads(json.dumps(dict(spec)))  # normalise tuples → lists so comparison is exact
        if set(hook_dims) != set(spec["hooks"]):
            raise ValueError(f"hook_dims {sorted(hook_dims)} do not match spec hooks {spec['hooks']}")
        if path.exists() and (path / COMMIT_FILE).exists():
            return cls._resume(path, spec, chunk_rows)
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: exists and is not an activation store (no {COMMIT_FILE}); refusing to overwrite it")
        return cls._create(path, spec, hook_dims, capacity_rows, chunk_rows)

    @classmethod
    def _resume(cls, path: Path, spec: dict[str, Any], chunk_rows: int) -> ActivationStoreWriter:
        group = zarr.open_group(str(path), mode="r+")
        stored_spec = dict(group.attrs.get("saecore_spec", {}))
        differences = _spec_differences(stored_spec, spec)
        if differences:
            raise StoreMismatchError(
                f"{path}: holds a harvest made with other arguments; use a new output path or delete it.\n  "
                + "\n  ".join(differences)
            )
        state = CommitState.from_file(path / COMMIT_FILE)
        _remove_partial_files(path)
        stored_chunk_rows = int(group["token_ids"].chunks[0])
        return cls(path, group, spec, state, stored_chunk_rows if stored_chunk_rows else chunk_rows)

    @classmethod
    def _create(
        cls, path: Path, spec: dict[str, Any], hook_dims: Mapping[str, int], capacity_rows: int, chunk_rows: int
    ) -> ActivationStoreWriter:
        # Build the empty store beside its final name and rename it into place, so a crash during
        # creation never leaves a folder that looks like a store. An empty folder the user made for
        # us is replaced; a store another process published meanwhile is not (FileExistsError).
        with publish_dir(path, if_exists="error") as staging:
            state = cls._create_arrays(staging, spec, hook_dims, max(int(capacity_rows), 1), chunk_rows)
        return cls(path, zarr.open_group(str(path), mode="r+"), spec, state, chunk_rows)

    @staticmethod
    def _create_arrays(
        staging: Path, spec: dict[str, Any], hook_dims: Mapping[str, int], capacity_rows: int, chunk_rows: int
    ) -> CommitState:
        """Write an empty store (arrays, spec, commit record) into ``staging``; returns its commit state."""
        group = zarr.open_group(str(staging), mode="w", zarr_format=3)
        compressors = [zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()]
        for hook in spec["hooks"]:
            arr = group.create_array(
                hook_array_name(hook),
                shape=(capacity_rows, int(hook_dims[hook])),
                chunks=(chunk_rows, int(hook_dims[hook])),
                dtype=_zarr_dtype(spec["dtype"]),
                compressors=compressors,
                fill_value=0,
            )
            arr.attrs["saecore_dtype"] = spec["dtype"]
        for name, dtype in (("token_ids", "int32"), ("doc_ids", "int64"), ("positions", "int32")):
            group.create_array(
                name, shape=(capacity_rows,), chunks=(chunk_rows,), dtype=dtype, compressors=compressors, fill_value=-1
            )
        group.attrs["saecore_spec"] = spec
        state = CommitState(batches_done=0, rows_committed=0, sum_sq_norm={h: 0.0 for h in spec["hooks"]})
        write_json(staging / COMMIT_FILE, state.to_json())
        return state

    # -- writing ---------------------------------------------------------------------------------
    @property
    def batches_done(self) -> int:
        """Batches durably committed; a harvest resumes at this batch index."""
        return self.state.batches_done + self._buffered_batches

    def append(
        self,
        acts: Mapping[str, np.ndarray],
        token_ids: np.ndarray,
        doc_ids: np.ndarray,
        positions: np.ndarray,
        counters: Mapping[str, int] | None = None,
    ) -> None:
        """Queue one batch's kept rows (possibly zero rows); flushes whole chunks as they fill.

        ``counters`` (e.g. tokens seen, rows excluded) are added to running totals committed with the rows.
        """
        rows = len(token_ids)
        for hook in self.hooks:
            a = acts[hook]
            if a.ndim != 2 or a.shape[0] != rows:
                raise ValueError(f"acts[{hook!r}] has shape {a.shape}, expected ({rows}, d)")
            if not np.isfinite(a).all():
                bad = int(np.argwhere(~np.isfinite(a).all(axis=1))[0, 0])
                raise ValueError(
                    f"hook {hook!r}: non-finite activation in batch {self.batches_done}, row {bad} "
                    f"(token id {int(token_ids[bad])}); the model produced NaN/Inf"
                )
        if not (len(doc_ids) == len(positions) == rows):
            raise ValueError("token_ids, doc_ids and positions must have the same length")
        self._buffer.append((dict(acts), token_ids, doc_ids, positions))
        self._buffered_batches += 1
        self._buffered_rows += rows
        for k, v in (counters or {}).items():
            self._buffered_counters[k] = self._buffered_counters.get(k, 0) + int(v)
        if self._buffered_rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches and commit them (atomic rename of the commit record)."""
        if not self._buffered_batches:
            return
        start = self.state.rows_committed
        stop = start + self._buffered_rows
        self._ensure_capacity(stop)
        if self._buffered_rows:
            with zarr.config.set(_WRITE_EVERY_CHUNK):
                sum_sq = self._write_rows(start, stop)
        else:
            sum_sq = self.state.sum_sq_norm
        counters = dict(self.state.counters)
        for k, v in self._buffered_counters.items():
            counters[k] = counters.get(k, 0) + v
        new_state = CommitState(self.state.batches_done + self._buffered_batches, stop, sum_sq, counters=counters)
        write_json(self.path / COMMIT_FILE, new_state.to_json())
        self.state = new_state
        self._buffer.clear()
        self._buffered_batches = 0
        self._buffered_rows = 0
        self._buffered_counters = {}

    def _write_rows(self, start: int, stop: int) -> dict[str, float]:
        """Write the buffered rows to ``start:stop`` of every array; returns the new sums of ‖x‖²."""
        sum_sq = dict(self.state.sum_sq_norm)
        for hook in self.hooks:
            block = np.concatenate([b[0][hook] for b in self._buffer], axis=0)
            self._group[hook_array_name(hook)][start:stop] = _encode_rows(block, self.spec["dtype"], hook)
            sum_sq[hook] += float(np.square(block.astype(np.float64)).sum())
        for i, name in enumerate(("token_ids", "doc_ids", "positions"), start=1):
            self._group[name][start:stop] = np.concatenate([b[i] for b in self._buffer])
        return sum_sq

    def _ensure_capacity(self, rows: int) -> None:
        capacity = self._group["token_ids"].shape[0]
        if rows <= capacity:
            return
        new_capacity = max(rows, 2 * capacity)
        for name in [hook_array_name(h) for h in self.hooks] + ["token_ids", "doc_ids", "positions"]:
            arr = self._group[name]
            arr.resize((new_capacity, *arr.shape[1:]))

    def finish(self, extra_attrs: Mapping[str, Any] | None = None) -> ActivationStore:
        """Flush, trim the arrays to the rows written, record the metadata, and mark the store complete."""
        self.flush()
        rows = self.state.rows_committed
        if rows == 0:
            raise StoreError(f"{self.path}: no rows were harvested (every token was excluded or the corpus is empty)")
        for name in [hook_array_name(h) for h in self.hooks] + ["token_ids", "doc_ids", "positions"]:
            arr = self._group[name]
            if arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))
        meta = dict(self.spec)
        meta.update(extra_attrs or {})
        meta["format"] = FORMAT
        meta["num_rows"] = rows
        meta["d_model"] = {h: int(self._group[hook_array_name(h)].shape[1]) for h in self.hooks}
        meta["mean_squared_norm"] = {h: self.state.sum_sq_norm[h] / rows for h in self.hooks}
        meta["counters"] = dict(self.state.counters)
        self._group.attrs["saecore"] = meta
        self.state = CommitState(
            self.state.batches_done, rows, self.state.sum_sq_norm, complete=True, counters=self.state.counters,
            metadata_sha256=_metadata_digests(self.path, self.hooks),
        )
        write_json(self.path / COMMIT_FILE, self.state.to_json())
        return ActivationStore(self.path)


class ActivationStore:
    """Read-only view of a complete activation store.

    >>> store = ActivationStore("runs/demo/activations.zarr")      # doctest: +SKIP
    >>> x = store.read(store.hooks[0], 0, 4096)                      # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no activation store here")
        commit_path = self.path / COMMIT_FILE
        if not commit_path.exists():
            raise StoreError(f"{commit_path}: missing, so {self.path} is not an activation store (or its commit record was deleted)")
        state = CommitState.from_file(commit_path)
        if not state.complete:
            raise StoreError(
                f"{self.path}: incomplete activation store ({state.rows_committed} rows from "
                f"{state.batches_done} batches committed); rerun the same harvest command to finish it"
            )
        _check_metadata(self.path, state.metadata_sha256)
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
            self.attrs: dict[str, Any] = dict(self._group.attrs["saecore"])
        except Exception as e:  # zarr raises several types for damaged metadata
            raise StoreError(f"{self.path}: unreadable zarr metadata ({e})") from e
        if self.attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path}: format {self.attrs.get('format')!r}, expected {FORMAT!r}")
        self.hooks: list[str] = list(self.attrs["hooks"])
        self.num_rows: int = int(self.attrs["num_rows"])
        if state.rows_committed != self.num_rows:
            raise CorruptDataError(f"{commit_path}: {state.rows_committed} rows committed, but the store's metadata "
                                   f"says {self.num_rows}")
        self._arrays = {name: _CheckedArray(self.path, self._group[name])
                        for name in [hook_array_name(h) for h in self.hooks] + list(_COLUMNS)}
        for name, arr in self._arrays.items():
            if arr.shape[0] != self.num_rows:
                raise StoreError(f"{self.path}: array {name} has {arr.shape[0]} rows, metadata says {self.num_rows}")
            arr.check_all_chunks_present()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        dims = ", ".join(f"{h}: {self.d_model(h)}" for h in self.hooks)
        return f"ActivationStore({str(self.path)!r}, rows={self.num_rows}, {dims})"

    def resolve_hook(self, hook: str | None) -> str:
        """``hook`` checked against the store's hooks; None means the store's only hook."""
        if hook is None:
            if len(self.hooks) != 1:
                raise ValueError(f"{self.path}: store holds hooks {self.hooks}; name one")
            return self.hooks[0]
        if hook not in self.hooks:
            raise KeyError(f"{self.path}: no hook {hook!r}; the store holds {self.hooks}")
        return hook

    def d_model(self, hook: str | None = None) -> int:
        """Width of the activations at ``hook``."""
        return int(self.attrs["d_model"][self.resolve_hook(hook)])

    def mean_squared_norm(self, hook: str | None = None) -> float:
        """Mean ‖x‖² over all rows at ``hook`` (Anthropic's input scaling divides by its square root)."""
        return float(self.attrs["mean_squared_norm"][self.resolve_hook(hook)])

    def array(self, hook: str | None = None) -> _CheckedArray:
        """The activations at ``hook`` ([N, d]; uint16 bit patterns for bfloat16 stores), read with checks."""
        return self._arrays[hook_array_name(self.resolve_hook(hook))]

    @property
    def chunk_rows(self) -> int:
        return int(self._group["token_ids"].chunks[0])

    @property
    def token_ids(self) -> _CheckedArray:
        return self._arrays["token_ids"]

    @property
    def doc_ids(self) -> _CheckedArray:
        return self._arrays["doc_ids"]

    @property
    def positions(self) -> _CheckedArray:
        return self._arrays["positions"]

    def read(self, hook: str | None, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``start:stop`` at ``hook`` as a NumPy array of ``dtype``."""
        if not (0 <= start <= stop <= self.num_rows):
            raise IndexError(f"{self.path}: rows {start}:{stop} outside 0:{self.num_rows}")
        raw = np.asarray(self.array(hook)[start:stop])
        if self.attrs.get("dtype") == "bfloat16":
            raw = bf16_bits_to_float(raw)
        return raw.astype(dtype, copy=False)

    def iter_blocks(
        self, hook: str | None = None, block_rows: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, float32 block)`` over rows ``start:stop``; memory is one block."""
        stop = self.num_rows if stop is None else stop
        block_rows = block_rows or self.chunk_rows
        for first in range(start, stop, block_rows):
            yield first, self.read(hook, first, min(first + block_rows, stop))


def _remove_partial_files(path: Path) -> None:
    """Delete the ``NAME.<uuid>.partial`` files a killed writer left (zarr stages each chunk so, and
    renames it into place); called when a writer reopens the store, the only writer it has."""
    for p in path.rglob("*.partial"):
        if p.is_file():
            p.unlink(missing_ok=True)


class _CheckedArray:
    """A store array read chunk-checked: a damaged or missing chunk raises CorruptDataError naming its file.

    Row selections only (``arr[a:b]``, ``arr.get_coordinate_selection(rows)``), as saecore reads them.
    ``.zarr`` is the zarr array itself, unchecked.
    """

    def __init__(self, root: Path, arr: zarr.Array):
        self.root, self.zarr = root, arr
        self.shape, self.chunks, self.dtype = arr.shape, arr.chunks, arr.dtype
        codecs = getattr(arr.metadata, "codecs", ())
        self.checksummed = any(isinstance(c, zarr.codecs.Crc32cCodec) for c in codecs)
        # Without checksums the store predates "write every chunk": an all-fill chunk may be absent.
        self.every_chunk_written = self.checksummed or arr.fill_value == -1

    def __len__(self) -> int:
        return int(self.shape[0])

    def chunk_file(self, row_chunk: int, col_chunk: int = 0) -> Path:
        coords = (row_chunk,) if len(self.shape) == 1 else (row_chunk, col_chunk)
        return self.root / self.zarr.path / self.zarr.metadata.encode_chunk_key(coords)

    def _chunk_files(self, row_chunks: Iterable[int]) -> Iterator[Path]:
        cols = range(self.zarr.cdata_shape[1]) if len(self.shape) == 2 else range(1)
        for i in row_chunks:
            for j in cols:
                yield self.chunk_file(int(i), j)

    def check_all_chunks_present(self) -> None:
        """Cheap open-time check that the last chunk the shape implies exists: a metadata claiming rows
        that were never written is refused here, before a reader runs over them (chunks in between are
        checked as they are read)."""
        if not self.every_chunk_written or self.shape[0] == 0:
            return
        n = self.zarr.cdata_shape[0]
        last = self.chunk_file(n - 1)
        if not last.exists():
            raise CorruptDataError(f"{last}: missing; {self.zarr.path} claims {self.shape[0]} rows "
                                   f"({n} chunks of {self.chunks[0]})")

    def _read(self, row_chunks: Iterable[int], read: Any) -> np.ndarray:
        row_chunks = list(row_chunks)
        if self.every_chunk_written:
            for f in self._chunk_files(row_chunks):
                if not f.exists():
                    raise CorruptDataError(f"{f}: chunk missing inside the store's committed rows")
        try:
            return np.asarray(read())
        except Exception as e:  # zarr/numcodecs raise ValueError, RuntimeError … for a damaged chunk
            raise CorruptDataError(f"{self._first_bad_chunk(row_chunks)}: {type(e).__name__}: {e}") from e

    def _first_bad_chunk(self, row_chunks: list[int]) -> Path:
        cols = self.zarr.cdata_shape[1] if len(self.shape) == 2 else 1
        for i in row_chunks:
            for j in range(cols):
                sel = slice(i * self.chunks[0], min((i + 1) * self.chunks[0], self.shape[0]))
                try:
                    self.zarr[(sel,) if cols == 1 and len(self.shape) == 1 else (sel, slice(j * self.chunks[1],
                                                                                       (j + 1) * self.chunks[1]))]
                except Exception:  # noqa: BLE001 - any failure of this one chunk is what we look for
                    return self.chunk_file(i, j)
        return self.root / self.zarr.path  # the error was not one chunk's; name the array

    def __getitem__(self, rows: slice | int) -> Any:
        if isinstance(rows, (int, np.integer)):
            row = int(rows) + (self.shape[0] if rows < 0 else 0)
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"{self.root / self.zarr.path}: row {rows} outside 0:{self.shape[0]}")
            return self[row:row + 1][0]
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("store arrays are read by a row or a contiguous row slice")
        start, stop, _ = rows.indices(self.shape[0])
        c = self.chunks[0]
        return self._read(range(start // c, (stop + c - 1) // c) if stop > start else (), lambda: self.zarr[start:stop])

    def get_coordinate_selection(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self._read(np.unique(rows // self.chunks[0]), lambda: self.zarr.get_coordinate_selection(rows))


def remove_store(path: str | os.PathLike[str]) -> None:
    """Delete an activation store (used by ``--overwrite``)."""
    p = Path(path)
    if p.exists():
        if not (p / COMMIT_FILE).exists() and any(p.iterdir()):
            raise StoreError(f"{p}: not an activation store; refusing to delete it")
        shutil.rmtree(p)
