"""Write-aside-then-rename: every file saecore writes appears whole or not at all.

A crash or SIGKILL mid-write leaves at most a hidden ``.NAME.<uuid>.partial`` file beside the target,
never a truncated target, so a reader (or a resumed job) can trust whatever file it finds.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix last so writers that pick a format by extension (matplotlib) still can.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Atomically write ``payload`` as indented, key-sorted JSON."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def write_parquet(table: Any, path: str | os.PathLike[str], compression: str = "zstd") -> Path:
    """Atomically write a pyarrow Table as Parquet."""
    import pyarrow.parquet as pq

    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)
