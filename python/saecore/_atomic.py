"""Write-aside-then-rename: every file and folder saecore writes appears whole or not at all.

A crash or SIGKILL mid-write leaves at most a hidden ``.NAME.<uuid>.partial`` file or folder beside the
target, never a truncated target, so a reader (or a resumed job) can trust whatever it finds. Files go
through :func:`atomic_target` (or :func:`write_text`, :func:`write_json`, :func:`write_parquet`);
folders through :func:`publish_dir`, which also removes the ``.partial`` folders a killed run left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from .errors import CorruptDataError


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


_STAGED_FILE = re.compile(r"^\..+\.[0-9a-f]{32}\.partial(\.[^.]*)?$")


def remove_partial_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging files (``.NAME.<uuid>.partial.EXT``) a killed :func:`atomic_target` left in
    ``folder``; returns them. Call it where one process owns the folder (a resumed training run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if _STAGED_FILE.match(p.name) and p.is_file() and not p.is_symlink()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


_RUST_STAGED_FILE = re.compile(r"^\..+\.(\d+)\.partial$")  # the Rust core's ``write_atomic``: .NAME.<pid>.partial


def remove_dead_writers_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove, anywhere under ``folder``, the staging files the Rust core's writer left when its process was
    killed between writing ``.NAME.<pid>.partial`` and renaming it; one whose process still runs is kept."""
    removed = []
    for p in Path(folder).rglob("*.partial"):
        m = _RUST_STAGED_FILE.match(p.name)
        if m and p.is_file() and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Atomically write ``payload`` as indented, key-sorted JSON."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path`` (what :func:`write_json` wrote): CorruptDataError naming the file when
    the bytes do not parse or hold another JSON value; FileNotFoundError when it is missing."""
    try:
        data = json.loads(Path(path).read_bytes())
    except ValueError as e:  # UnicodeDecodeError too
        raise CorruptDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CorruptDataError(f"{path}: expected a JSON object")
    return data


def write_parquet(table: Any, path: str | os.PathLike[str], compression: str = "zstd") -> Path:
    """Atomically write a pyarrow Table as Parquet."""
    import pyarrow.parquet as pq

    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)



# -- folders --------------------------------------------------------------------------------------
# A staging folder is held under an exclusive flock (on its directory fd) while it is written, so the
# orphan sweep can tell a folder a killed run left (lock free) from one another process is writing now.
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so no sweep (a leftover stays until removed)
    fcntl = None  # type: ignore[assignment]


def _partial_siblings(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    return [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".partial")]


def remove_orphans(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``.NAME.<uuid>.partial`` sibling folders of ``path`` no live writer holds; returns them."""
    removed = []
    for p in _partial_siblings(Path(path)):
        if not p.is_dir() or p.is_symlink():
            continue  # a file: atomic_target's staging file of a file of the same name, not ours
        fd = _lock_dir(p, blocking=False)
        if fd is None:
            continue  # another process is writing it now
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(p)
    return removed


def _lock_dir(path: Path, blocking: bool) -> int | None:
    """Open ``path`` and flock it; None if ``blocking`` is False and another process holds the lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if fcntl is None:
        if blocking:
            return fd
        os.close(fd)  # without flock a live writer cannot be told apart, so never sweep
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _new_staging_dir(path: Path) -> tuple[Path, int]:
    """Make and lock a fresh ``.NAME.<uuid>.partial`` folder beside ``path``."""
    while True:
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        staging.mkdir()
        fd = _lock_dir(staging, blocking=True)
        # A sweep in another process may have taken it between mkdir and flock: then it is gone.
        if fd is not None and os.fstat(fd).st_nlink > 0:
            return staging, fd
        if fd is not None:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


IfExists = Literal["replace", "keep", "error"]


def _swap_into_place(staging: Path, path: Path, if_exists: IfExists) -> None:
    if if_exists != "replace":
        try:
            os.rename(staging, path)  # POSIX: succeeds over an empty folder, fails over a full one
        except OSError as e:
            if not path.exists():
                raise
            if if_exists == "error":
                raise FileExistsError(f"{path}: already exists (another process made it first)") from e
        return  # "keep": the finally clause of publish_dir removes our copy
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    had_old = path.exists()
    if had_old:
        os.rename(path, old)  # from here until the next rename a reader finds no folder, never a half one
    os.rename(staging, path)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def publish_dir(path: str | os.PathLike[str], if_exists: IfExists = "replace") -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``path``; when the block ends, publish it as ``path``.

    The staging folder is ``.NAME.<uuid>.partial``; leftovers of killed runs are removed first. If the
    block raises, the staging folder is removed and ``path`` is left as it was. On success the staging
    folder is renamed to ``path``. An empty folder at ``path`` is always replaced; a non-empty one is,
    by ``if_exists``: ``"replace"`` renames it aside and deletes it (a reader sees the old folder or
    the new one, never a mix); ``"keep"`` keeps it and drops ours (a cache another process filled
    first); ``"error"`` keeps it and raises :class:`FileExistsError`.
    """
    if if_exists not in ("replace", "keep", "error"):
        raise ValueError(f"if_exists must be 'replace', 'keep' or 'error', got {if_exists!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    staging, fd = _new_staging_dir(path)
    try:
        yield staging
        _fsync_dir(staging)
        _swap_into_place(staging, path, if_exists)
        _fsync_dir(path.parent)
    finally:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish
