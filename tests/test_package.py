"""The package imports, the native module loads, and the CLI describes every verb."""

import os
import subprocess
import sys

import saecore
from saecore import _native
from saecore.cli import VERBS


def test_native_module_reports_version_and_threads():
    assert saecore.__version__ == _native.__version__
    assert _native.num_threads() >= 1


def test_cli_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "saecore.cli", "--help"], capture_output=True, text=True, check=True)
    for verb in VERBS:
        assert verb in out.stdout


def test_cli_rejects_unknown_verb():
    proc = subprocess.run([sys.executable, "-m", "saecore.cli", "frobnicate"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0
    assert "frobnicate" in proc.stderr


def test_every_verb_describes_its_options():
    from saecore.cli import build_parser

    for verb, (_module, help_) in VERBS.items():
        text = " ".join(build_parser(verb).format_help().split())  # argparse wraps a long description
        assert f"saecore {verb}" in text and " ".join(help_.split()) in text, verb
        assert "--" in text, f"{verb} documents no options"


def test_type_stubs_match_the_native_module(tmp_path):
    """_native.pyi is written by hand; stubtest compares it with the compiled module's signatures."""
    # A private mypy cache: a shared one can be left half-written by another run (sqlite "malformed").
    env = {**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache")}
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "saecore._native"], capture_output=True, text=True, timeout=600,
        check=False, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
