"""saecore._atomic: files and folders appear whole or not at all, and a killed run's leftovers are swept."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from saecore import _atomic


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_publish_dir_creates_the_folder_whole(tmp_path: Path) -> None:
    out = tmp_path / "site"
    with _atomic.publish_dir(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".site.") and staging.name.endswith(".partial")
        assert not out.exists()  # nothing visible under the final name while writing
        (staging / "a.txt").write_text("A")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("B")
    assert _tree(out) == {"a.txt": "A", "sub/b.txt": "B"}
    assert _siblings(out) == ["site"]


def test_publish_dir_replaces_an_old_folder_and_removes_it(tmp_path: Path) -> None:
    out = tmp_path / "site"
    with _atomic.publish_dir(out) as staging:
        (staging / "old.txt").write_text("old")
    with _atomic.publish_dir(out) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": "new"}
    assert _siblings(out) == ["site"]


def test_exception_mid_write_leaves_the_old_folder_intact(tmp_path: Path) -> None:
    out = tmp_path / "site"
    with _atomic.publish_dir(out) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), _atomic.publish_dir(out) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("disk on fire")
    assert _tree(out) == {"old.txt": "old"}
    assert _siblings(out) == ["site"]  # the staging folder went with the error


def test_a_killed_run_leaves_an_orphan_that_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "site"
    with _atomic.publish_dir(out) as staging:
        (staging / "old.txt").write_text("old")
    # A real SIGKILL mid-write: no finally clause runs, so the staging folder is left behind.
    script = textwrap.dedent(f"""
        import os, signal
        from saecore import _atomic
        with _atomic.publish_dir({str(out)!r}) as staging:
            (staging / "new.txt").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -signal.SIGKILL
    orphans = [n for n in _siblings(out) if n != "site"]
    assert len(orphans) == 1 and orphans[0].startswith(".site.") and orphans[0].endswith(".partial")
    assert _tree(out) == {"old.txt": "old"}

    with _atomic.publish_dir(out) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": "new"}
    assert _siblings(out) == ["site"]


def test_the_sweep_spares_a_folder_another_writer_holds(tmp_path: Path) -> None:
    out = tmp_path / "site"
    stale = tmp_path / ".site.0123abcd.partial"
    stale.mkdir()
    (stale / "x").write_text("left by a killed run")
    unrelated = tmp_path / ".other.0123abcd.partial"
    unrelated.mkdir()
    with _atomic.publish_dir(out) as staging:
        assert not stale.exists()  # swept on entry
        (staging / "a.txt").write_text("A")
        # A second run starting now must not sweep the folder this one is still writing.
        assert _atomic.remove_orphans(out) == []
        assert (staging / "a.txt").exists()
    assert unrelated.exists()  # only siblings of the same name are touched
    assert _tree(out) == {"a.txt": "A"}


@pytest.mark.parametrize("if_exists", ["keep", "error"])
def test_publish_dir_keeps_a_folder_another_process_published_first(tmp_path: Path, if_exists: str) -> None:
    out = tmp_path / "cache"
    with contextlib.ExitStack() as raises:
        if if_exists == "error":
            raises.enter_context(pytest.raises(FileExistsError, match="cache: already exists"))
        with _atomic.publish_dir(out, if_exists=if_exists) as staging:  # type: ignore[arg-type]
            (staging / "mine.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")  # another process finished first
    assert _tree(out) == {"theirs.txt": "theirs"}
    assert _siblings(out) == ["cache"]


@pytest.mark.parametrize("if_exists", ["replace", "keep", "error"])
def test_publish_dir_fills_an_empty_folder(tmp_path: Path, if_exists: str) -> None:
    out = tmp_path / "store"
    out.mkdir()  # e.g. made by the user for us
    with _atomic.publish_dir(out, if_exists=if_exists) as staging:  # type: ignore[arg-type]
        (staging / "data").write_text("d")
    assert _tree(out) == {"data": "d"}
    assert _siblings(out) == ["store"]


def test_atomic_target_removes_its_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "t.json"
    _atomic.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), _atomic.atomic_target(target) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("boom")
    assert target.read_text() == '{\n  "a": 1\n}'
    assert os.listdir(tmp_path) == ["t.json"]
