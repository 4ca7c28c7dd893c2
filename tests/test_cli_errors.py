"""Every verb, given a bad path, a bad feature id or a bad number, fails the same way: exit code 2, one
line ``saecore VERB: error: …`` on stderr, no traceback, and no file written.

The cases run in this process through :func:`saecore.cli.main` (the function the ``saecore`` script
calls), with stderr captured at the file-descriptor level so that native output would count too. A few
cases, one per kind of error, also run the real ``saecore`` entry point as a process. The data is tiny
(the tiny model saved as a folder, a 64-feature SAE on its hook, the tiny activation store, a feature
store and an index made from them), built once for the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_HOOK
from saecore.cli import VERBS, main

D_SAE = 64


@pytest.fixture(scope="module")
def data(tiny_model_dir, tiny_store, tmp_path_factory) -> dict[str, str]:
    """Paths the cases refer to by name: ``{sae}``, ``{run}``, ``{store}``, ``{features}``, ``{index}``…"""
    from saecore.encode import encode
    from saecore.index import index
    from saecore.sae import SAE, SAEConfig

    run = tmp_path_factory.mktemp("cli-errors") / "runs" / "demo"
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="relu", d_in=64, d_sae=D_SAE, hook_name=TINY_HOOK, model_name=str(tiny_model_dir))
    sae_dir = SAE(cfg).save(run / "saes" / "tiny")
    SAE(SAEConfig(architecture="relu", d_in=64, d_sae=2 * D_SAE, hook_name=TINY_HOOK)).save(run / "saes" / "wide")
    features = run / "features" / "tiny.zarr"
    encode(tiny_store, sae_dir, features, batch_rows=256, shard_rows=512, progress=False, device="cpu")
    index(features, run / "index" / "tiny", progress=False)
    prompts = run / "prompts.txt"
    prompts.write_text("The bridge\n")
    np.save(run / "nan-direction.npy", np.full(64, np.nan))
    np.save(run / "wrong-shape-direction.npy", np.zeros((2, 3)))
    return {
        "nan_direction": str(run / "nan-direction.npy"), "shape_direction": str(run / "wrong-shape-direction.npy"),
        "run": str(run), "sae": str(sae_dir), "wide": str(run / "saes" / "wide"), "store": str(tiny_store.path),
        "features": str(features), "prompts": str(prompts), "model": str(tiny_model_dir), "missing": str(run / "nope"),
    }


# (verb, what is wrong, argv). {name} is a path from `data`; {out} is inside the case's own empty folder.
CASES: list[tuple[str, str, list[str]]] = [
    ("quickstart", "bad path", ["--run", "{out}/run", "--corpus", "{missing}/corpus.txt", "--model", "{model}"]),
    ("quickstart", "zero", ["--run", "{out}/run", "--tokens", "0"]),
    ("quickstart", "negative", ["--run", "{out}/run", "--tokens", "-5"]),
    ("harvest", "bad path", ["--model", "{model}", "--corpus", "{missing}/corpus.txt", "--out", "{out}/a.zarr"]),
    ("harvest", "bad model path", ["--model", "{missing}", "--corpus", "pydoc", "--out", "{out}/a.zarr"]),
    ("harvest", "zero", ["--model", "{model}", "--batch-size", "0", "--out", "{out}/a.zarr"]),
    ("harvest", "too small", ["--model", "{model}", "--context-length", "1", "--out", "{out}/a.zarr"]),
    ("harvest", "huge", ["--model", "{model}", "--chunk-rows", "1000000000000", "--out", "{out}/a.zarr"]),
    ("harvest", "NaN", ["--model", "{model}", "--norm-outlier-factor", "nan", "--out", "{out}/a.zarr"]),
    ("harvest", "negative", ["--model", "{model}", "--max-tokens", "-5", "--out", "{out}/a.zarr"]),
    ("train", "bad path", ["{missing}", "{out}/sae"]),
    ("train", "zero", ["{store}", "{out}/sae", "--k", "0"]),
    ("train", "negative", ["{store}", "{out}/sae", "--seed", "-1"]),
    ("train", "NaN", ["{store}", "{out}/sae", "--lr", "nan"]),
    ("train", "huge", ["{store}", "{out}/sae", "--d-sae", "1000000000000"]),
    ("train", "bad SAE spec", ["--model", "{model}", "--corpus", "pydoc", "--sae", "batch_size=8", "{out}/run"]),
    ("train", "on the fly, two folders", ["--model", "{model}", "--hooks", TINY_HOOK, "{out}/a", "{out}/b"]),
    ("consolidate", "bad path", ["{missing}"]),
    ("consolidate", "not a distributed run", ["{sae}", "--out", "{out}/sae"]),
    ("eval", "bad path", ["{missing}", "--no-splice"]),
    ("eval", "bad store path", ["{sae}", "--store", "{missing}", "--no-splice"]),
    ("eval", "zero", ["{sae}", "--contexts", "0"]),
    ("eval", "unknown suite", ["{sae}", "--no-splice", "--suite", "core,bogus"]),
    ("eval", "unknown probing dataset", ["{sae}", "--suite", "sparse-probing", "--probe-datasets", "imdb"]),
    ("eval", "zero probe k", ["{sae}", "--suite", "sparse-probing", "--probe-k", "0"]),
    ("eval", "compare without results", ["--compare", "{sae}", "{wide}"]),
    ("eval", "compare bad path", ["--compare", "{missing}"]),
    ("eval", "no SAE", ["--no-splice"]),
    ("sweep", "bad path", ["{missing}", "{out}/sweep"]),
    ("sweep", "zero", ["{store}", "{out}/sweep", "--tokens", "0"]),
    ("sweep", "negative", ["{store}", "{out}/sweep", "--d-sae", "-4"]),
    ("sweep", "NaN", ["{store}", "{out}/sweep", "--holdout-fraction", "nan"]),
    ("encode", "bad path", ["--store", "{missing}", "--sae", "{sae}", "--out", "{out}/f.zarr"]),
    ("encode", "zero parts", ["--store", "{store}", "--sae", "{sae}", "--out", "{out}/f.zarr", "--ray", "--shards-per-part", "0"]),
    ("harvest", "zero workers", ["--model", "{model}", "--ray", "--ray-workers", "0", "--out", "{out}/a.zarr"]),
    ("encode", "bad SAE path", ["--store", "{store}", "--sae", "{missing}", "--out", "{out}/f.zarr"]),
    ("encode", "zero", ["--store", "{store}", "--sae", "{sae}", "--out", "{out}/f.zarr", "--batch-rows", "0"]),
    ("encode", "huge", ["--store", "{store}", "--sae", "{sae}", "--out", "{out}/f.zarr", "--shard-rows", "10" + "0" * 12]),
    ("encode", "huge threads", ["--store", "{store}", "--sae", "{sae}", "--out", "{out}/f.zarr", "--writer-threads",
                                "1000000000"]),
    ("index", "bad path", ["--features", "{missing}", "--out", "{out}/ix"]),
    ("index", "bad activations path", ["--features", "{features}", "--activations", "{missing}", "--out", "{out}/ix"]),
    ("index", "zero", ["--features", "{features}", "--out", "{out}/ix", "--hist-bins", "0"]),
    ("index", "zero bins", ["--features", "{features}", "--out", "{out}/ix", "--sample-bins", "0"]),
    ("index", "negative", ["--features", "{features}", "--out", "{out}/ix", "--k", "-1"]),
    ("neighbours", "bad path", ["--sae", "{missing}", "--out", "{out}/n.parquet"]),
    ("neighbours", "zero", ["--sae", "{sae}", "--k", "0", "--out", "{out}/n.parquet"]),
    ("neighbours", "negative", ["--sae", "{sae}", "--k", "-3", "--out", "{out}/n.parquet"]),
    ("splitting", "bad path", ["--sae", "{sae}", "--sae", "{missing}", "--no-coact", "--out", "{out}/s"]),
    ("splitting", "one SAE", ["--sae", "{sae}", "--no-coact", "--out", "{out}/s"]),
    ("splitting", "NaN", ["--sae", "{sae}", "--sae", "{wide}", "--min-cosine", "nan", "--out", "{out}/s"]),
    ("splitting", "zero", ["--sae", "{sae}", "--sae", "{wide}", "--coact-tokens", "0", "--out", "{out}/s"]),
    ("geometry", "bad path", ["--sae", "{missing}"]),
    ("geometry", "zero", ["--sae", "{sae}", "--max-tokens", "0"]),
    ("geometry", "negative", ["--sae", "{sae}", "--seed", "-1"]),
    ("steer", "bad path", ["--sae", "{missing}", "--feature", "1", "--prompt", "Hi"]),
    ("steer", "bad feature id", ["--sae", "{sae}", "--feature", str(D_SAE), "--prompt", "Hi", "--device", "cpu"]),
    ("steer", "negative feature id", ["--sae", "{sae}", "--feature", "-1", "--prompt", "Hi"]),
    ("steer", "NaN", ["--sae", "{sae}", "--feature", "1", "--value", "nan", "--prompt", "Hi"]),
    ("steer", "infinite", ["--sae", "{sae}", "--feature", "1", "--value", "inf", "--prompt", "Hi"]),
    ("steer", "negative", ["--sae", "{sae}", "--feature", "1", "--max-new-tokens", "-1", "--prompt", "Hi"]),
    ("steer", "bad direction path", ["--sae", "{sae}", "--feature", "1", "--direction", "{missing}/d.npy", "--prompt", "Hi"]),
    ("steer", "bad direction shape", ["--sae", "{sae}", "--feature", "1", "--direction", "{shape_direction}", "--prompt",
                                      "Hi"]),
    ("steer", "NaN direction", ["--sae", "{sae}", "--feature", "1", "--direction", "{nan_direction}", "--prompt", "Hi"]),
    ("attribute", "bad path", ["--sae", "{missing}", "--prompt", "Hi", "--target", " a", "--baseline", " b"]),
    ("attribute", "zero", ["--sae", "{sae}", "--prompt", "Hi", "--target", " a", "--baseline", " b", "--top", "0"]),
    ("attribute", "negative", ["--sae", "{sae}", "--prompt", "Hi", "--target", " a", "--baseline", " b",
                               "--batch-size", "-2"]),
    ("probe", "bad path", ["--sae", "{missing}", "--prompt", "Hi"]),
    ("probe", "bad prompts path", ["--sae", "{sae}", "--prompts", "{missing}/prompts.txt"]),
    ("probe", "zero", ["--sae", "{sae}", "--prompts", "{prompts}", "--top", "0"]),
    ("logit-lens", "bad path", ["--sae", "{missing}", "--out", "{out}/l.parquet"]),
    ("logit-lens", "bad feature id", ["--sae", "{sae}", "--show", str(D_SAE), "--out", "{out}/l.parquet", "--device", "cpu"]),
    ("logit-lens", "zero", ["--sae", "{sae}", "--top", "0", "--out", "{out}/l.parquet"]),
    ("logit-lens", "huge", ["--sae", "{sae}", "--top", "1000000000", "--out", "{out}/l.parquet"]),
    ("bench-synth", "zero", ["--out", "{out}/b", "--batch-size", "0"]),
    ("bench-synth", "negative", ["--out", "{out}/b", "--width", "-1"]),
    ("bench-synth", "NaN", ["--out", "{out}/b", "--lr", "nan"]),
    ("bench-synth", "unknown architecture", ["--out", "{out}/b", "--arch", "nope"]),
    ("token-scores", "bad path", ["--features", "{missing}", "--out", "{out}/t"]),
    ("token-scores", "bad SAE path", ["--features", "{features}", "--sae", "{missing}", "--out", "{out}/t"]),
    ("token-scores", "zero", ["--features", "{features}", "--held-out-fraction", "0", "--out", "{out}/t"]),
    ("token-scores", "negative", ["--features", "{features}", "--seed", "-1", "--out", "{out}/t"]),
    ("explain", "bad path", ["{missing}"]),
    ("explain", "bad SAE name", ["{run}", "--sae", "nope"]),
    ("explain", "bad URL", ["{run}", "--url", "ftp://127.0.0.1/v1"]),
    ("explain", "zero", ["{run}", "--n-examples", "0"]),
    ("explain", "negative feature id", ["{run}", "--feature", "-1"]),
    ("explain", "NaN", ["{run}", "--held-out-fraction", "nan"]),
    ("score", "bad path", ["{missing}"]),
    ("score", "not explained yet", ["{run}"]),
    ("score", "zero", ["{run}", "--per-bin", "0"]),
    ("score", "negative", ["{run}", "--n-negative", "-1"]),
    ("score", "zero timeout", ["{run}", "--timeout", "0"]),
    ("xor", "bad path", ["--run", "{missing}", "--out", "{out}/x"]),
    ("xor", "bad model path", ["--model", "{missing}", "--out", "{out}/x"]),
    ("xor", "too small", ["--d", "1", "--out", "{out}/x"]),
    ("xor", "NaN", ["--threshold", "nan", "--out", "{out}/x"]),
    ("xor", "negative", ["--ratio", "-1", "--out", "{out}/x"]),
    ("maximise", "bad path", ["--sae", "{missing}", "--feature", "1", "--out", "{out}/m"]),
    ("maximise", "bad feature id", ["--sae", "{sae}", "--feature", str(D_SAE), "--out", "{out}/m", "--device", "cpu"]),
    ("maximise", "zero", ["--sae", "{sae}", "--feature", "1", "--length", "0", "--out", "{out}/m"]),
    ("maximise", "NaN", ["--sae", "{sae}", "--feature", "1", "--fluency", "nan", "--out", "{out}/m"]),
    ("maximise", "bad position", ["--sae", "{sae}", "--feature", "1", "--position", "first", "--out", "{out}/m"]),
    ("composite", "bad path", ["--run", "{missing}", "--out", "{out}/c"]),
    ("composite", "bad SAE path", ["--sae", "{missing}", "--out", "{out}/c"]),
    ("composite", "zero", ["--meta-k", "0", "--out", "{out}/c"]),
    ("composite", "too small", ["--toy-d", "4", "--toy-group-size", "6", "--out", "{out}/c"]),
    ("classical", "bad path", ["--run", "{missing}"]),
    ("classical", "no store", ["--run", "{run}", "--no-index"]),
    ("classical", "zero", ["--run", "{run}", "--fit-tokens", "0"]),
    ("classical", "unknown method", ["--run", "{run}", "--method", "svd"]),
    ("pages", "bad path", ["{missing}"]),
    ("pages", "bad SAE name", ["{run}", "--sae", "nope", "--no-tokenizer"]),
    ("serve", "bad path", ["{missing}"]),
    ("serve", "huge", ["{run}", "--port", "70000"]),
    ("serve", "negative", ["{run}", "--port", "-1"]),
]


def test_every_verb_has_cases():
    assert {verb for verb, _, _ in CASES} == set(VERBS)


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (to see anything written or rewritten)."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _args(argv: list[str], out: Path, data: dict[str, str]) -> list[str]:
    return [a.format(out=out, **data) for a in argv]


def _assert_one_line_error(verb: str, code: int, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith(f"saecore {verb}: error: "), stderr


@pytest.fixture
def case_dir(tmp_path, monkeypatch) -> Path:
    """The case's own empty folder, also the working directory (a default output path would land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize(("verb", "what", "argv"), CASES, ids=[f"{v}-{w.replace(' ', '_')}" for v, w, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(data, case_dir, capfd, verb, what, argv):
    watched = Path(data["run"]).parent
    before = _files(watched)
    code = main([verb, *_args(argv, case_dir / "out", data)])
    captured = capfd.readouterr()
    _assert_one_line_error(verb, code, captured.err)
    assert _files(case_dir) == {}, f"{verb} wrote files for bad input: {sorted(_files(case_dir))}"
    assert _files(watched) == before


def _saecore_script() -> str:
    """The installed ``saecore`` console script of this interpreter (the real entry point)."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "saecore", shutil.which("saecore")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("the saecore console script is not installed (pip install the package)")


# One real process per kind of error: a usage error, a bad path found by a verb, a number out of its
# declared range, and a feature id the SAE does not have (found after loading the model). Only the last
# imports torch (~10 s a process on 2 cores), which is why the rest of the cases run in this process.
PROCESS_CASES: list[tuple[str, str, list[str]]] = [
    ("neighbours", "unknown option", ["--sae", "{sae}", "--no-such-option", "--out", "{out}/n.parquet"]),
    ("index", "bad path", ["--features", "{missing}", "--out", "{out}/ix"]),
    ("index", "zero", ["--features", "{features}", "--out", "{out}/ix", "--hist-bins", "0"]),
    ("logit-lens", "bad feature id", ["--sae", "{sae}", "--show", str(D_SAE), "--out", "{out}/l.parquet", "--device", "cpu"]),
]


@pytest.mark.parametrize(("verb", "what", "argv"), PROCESS_CASES,
                         ids=[f"{v}-{w.replace(' ', '_')}" for v, w, _ in PROCESS_CASES])
def test_the_saecore_process_reports_bad_input_in_one_line(data, tmp_path, verb, what, argv):
    watched = Path(data["run"]).parent
    before = _files(watched)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [_saecore_script(), verb, *_args(argv, tmp_path / "out", data)], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300, check=False,
    )
    _assert_one_line_error(verb, proc.returncode, proc.stderr)
    assert _files(tmp_path) == {}, f"{verb} wrote files for bad input: {sorted(_files(tmp_path))}"
    assert _files(watched) == before


def test_usage_errors_are_returned_not_raised(capfd):
    assert main(["nope"]) == 2
    assert "saecore: error: unknown verb 'nope'" in capfd.readouterr().err
    assert main(["train"]) == 2  # required arguments missing
    _assert_one_line_error("train", 2, capfd.readouterr().err)


@pytest.mark.parametrize("argv", [["--debug", "neighbours", "--sae", "{missing}"],
                                  ["neighbours", "--sae", "{missing}", "--debug"]])
def test_debug_adds_the_traceback(data, case_dir, capfd, argv):
    assert main(_args(argv, case_dir, data)) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("saecore neighbours: error: ")


def test_help_shows_the_declared_ranges(capfd):
    assert main(["index", "--help"]) == 0
    assert "Top examples kept per feature. (in [1, 10000]; default: 20)" in " ".join(capfd.readouterr().out.split())
