"""Feature pages: the generated files hold the index data, correctly placed, for any subset of tables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pages_testdata import (
    BRIDGE,
    DEAD,
    N_FEATURES,
    OTHER,
    SAE,
    WORDS,
    make_run,
    reseal,
    word_tokenizer,
)
from saecore import CorruptDataError, index, pages
from saecore.pages import build_pages, feature_href, make_server


def feature_json(run: Path, sae: str, feature: int) -> dict:
    html = (run / "pages" / sae / feature_href(feature)).read_text()
    m = re.search(r"window\.SAECORE_FEATURE=(.*?);</script>", html, re.DOTALL)
    assert m, "feature data missing from the page"
    return json.loads(m.group(1))


def summary_rows(run: Path, sae: str) -> list[list]:
    html = (run / "pages" / sae / "index.html").read_text()
    chunks = json.loads(re.search(r"window\.SAECORE_CHUNKS=(.*?);</script>", html).group(1))
    rows = []
    for name in chunks:
        text = (run / "pages" / sae / name).read_text()
        rows += json.loads(re.search(r"\.push\((.*)\);\s*$", text, re.DOTALL).group(1))
    return rows


def texts(page: dict, ex: dict) -> list[str]:
    """The token texts of an example window (pages store ids once and their text in the page's vocab)."""
    return [page["vocab"][str(i)] for i in ex["id"]]


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = make_run(tmp_path_factory.mktemp("pages"))
    build_pages(data.run, tokenizer=word_tokenizer(), activations=data.activations, progress=False)
    return data


def test_site_layout_and_every_feature_has_a_page(built):
    root = built.run / "pages"
    assert (root / "index.html").exists()
    for name in pages.ASSET_FILES:
        assert (root / "assets" / name).stat().st_size > 0
    for f in range(N_FEATURES):
        assert (root / SAE / feature_href(f)).exists()
    for f in range(4):
        assert (root / OTHER / feature_href(f)).exists()
    assert (root / SAE / "map.js").exists() and not (root / OTHER / "map.js").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "staging folders left behind"
    index = (root / "index.html").read_text()
    assert f'href="{SAE}/index.html"' in index and f'href="{OTHER}/index.html"' in index


def test_no_page_refers_to_the_network(built):
    for path in (built.run / "pages").rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), path
            urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}  # a namespace, not a fetch
            assert not urls, (path, urls)
            assert "fetch(" not in text and "XMLHttpRequest" not in text, path


def test_top_example_window_matches_the_store_and_reference_activations(built):
    data = feature_json(built.run, SAE, BRIDGE)
    best = int(np.argmax(built.acts[:, BRIDGE]))
    top = data["top"][0]
    assert top["row"] == best and top["v"] == sig(built.acts[best, BRIDGE])
    assert texts(data, top)[top["c"]] == " bridge"
    # The window is the same document, tokens in store order, every activation from the reference.
    lo = best - top["c"]
    rows = np.arange(lo, lo + len(top["id"]))
    assert (built.doc_ids[rows] == built.doc_ids[best]).all()
    assert top["id"] == built.token_ids[rows].tolist()
    assert texts(data, top) == [WORDS[i] for i in top["id"]]
    assert top["a"] == [sig(a, 3) for a in built.acts[rows, BRIDGE]]
    assert data["per_token"] == "all"
    assert top["a"][top["c"] + 1] == 0.5  # the " gate" after " bridge" is shaded too


def test_window_stops_at_the_document_boundary(built):
    # Row 0 is the first row of doc 0: nothing before it may be shown; the last row of a doc likewise.
    data = feature_json(built.run, SAE, BRIDGE)
    for ex in data["top"] + [e for b in data["samples"] for e in b["examples"]]:
        lo = ex["row"] - ex["c"]
        rows = np.arange(lo, lo + len(ex["id"]))
        assert (built.doc_ids[rows] == ex["doc"]).all()
        assert built.positions[ex["row"]] == ex["pos"]
        before = lo - 1
        after = lo + len(ex["id"])
        full_before = ex["c"] == pages.CONTEXT_BEFORE
        assert full_before or before < 0 or built.doc_ids[before] != ex["doc"]
        assert len(ex["id"]) - ex["c"] - 1 == pages.CONTEXT_AFTER or after >= len(built.doc_ids) or built.doc_ids[after] != ex["doc"]


@given(same=hnp.arrays(bool, st.tuples(st.integers(1, 6), st.integers(1, 9))), data=st.data())
@settings(max_examples=200, deadline=None)
def test_contiguous_span_matches_a_loop(same, data):
    centre = data.draw(st.integers(0, same.shape[1] - 1))
    same[:, centre] = True
    lo, hi = index._contiguous_span(same, centre)
    for r in range(same.shape[0]):
        a = centre
        while a > 0 and same[r, a - 1]:
            a -= 1
        b = centre + 1
        while b < same.shape[1] and same[r, b]:
            b += 1
        assert (lo[r], hi[r]) == (a, b)


def test_context_windows_do_not_depend_on_the_block_size(built):
    from saecore.activations import ActivationStore

    store = ActivationStore(built.run / "activations.zarr")
    rows = np.flatnonzero(built.acts.max(1) > 0)
    examples = [pages.Example(feature=0, row=int(r), doc_id=int(built.doc_ids[r]), position=int(built.positions[r]),
                              value=1.0, rank=0) for r in rows]
    small = pages.ContextReader(store, block_rows=16)  # many blocks, windows across block edges
    whole = pages.ContextReader(store)
    for reader in (small, whole):
        reader.prefetch(rows)
    assert small.block_rows == 16 and whole.block_rows >= len(built.doc_ids)
    for ex in examples:
        (r1, t1, c1), (r2, t2, c2) = small.window(ex, "t"), whole.window(ex, "t")
        assert c1 == c2 and r1.tolist() == r2.tolist() and t1.tolist() == t2.tolist()
        assert t1.tolist() == built.token_ids[r1].tolist() and r1[c1] == ex.row
    with pytest.raises(ValueError, match="outside the activation store"):
        whole.prefetch([len(built.doc_ids)])


def test_round_array_matches_scalar_rounding():
    x = np.array([0.0, 1.23456, -0.000123456, 98765.4, 5.0, 0.1 + 0.2, 1e-9, 3.999999])
    assert pages._round_array(x, 3).tolist() == [pages._round(v, 3) for v in x]
    assert json.dumps(pages._round_array(x, 3).tolist()) == "[0.0, 1.23, -0.000123, 98800.0, 5.0, 0.3, 1e-09, 4.0]"


def test_samples_are_grouped_by_bin_strongest_first(built):
    data = feature_json(built.run, SAE, 5)
    t = pq.read_table(built.run / "index" / SAE / "samples.parquet").to_pydict()
    expected_bins = sorted({b for f, b in zip(t["feature"], t["bin"]) if f == 5}, reverse=True)
    assert [b["bin"] for b in data["samples"]] == expected_bins
    for b in data["samples"]:
        ref = sorted(sig(v) for f, bb, v in zip(t["feature"], t["bin"], t["value"]) if f == 5 and bb == b["bin"])
        assert sorted(e["v"] for e in b["examples"]) == ref[: pages.MAX_SAMPLES_PER_BIN]
        assert b["lo"] == min(ref) and b["hi"] == max(ref)


def test_stats_histogram_lens_and_cosine_come_from_the_tables(built):
    data = feature_json(built.run, SAE, 5)
    count = int((built.acts[:, 5] > 0).sum())
    assert data["stats"]["count"] == count
    assert data["stats"]["density"] == pytest.approx(count / len(built.acts))
    assert data["stats"]["max"] == sig(built.acts[:, 5].max())
    assert sum(b[2] for b in data["histogram"]) == count
    assert data["enc_dec_cosine"] == sig(0.9 - 0.05 * 5)
    assert [r[0] for r in data["logit_lens"]["promote"]] == [WORDS[(15 + r) % len(WORDS)] for r in range(3)]
    assert [r[2] for r in data["logit_lens"]["suppress"]] == [-3.0, -2.0, -1.0]


def test_neighbour_links_resolve_to_existing_pages(built):
    page = built.run / "pages" / SAE / feature_href(BRIDGE)
    data = feature_json(built.run, SAE, BRIDGE)
    assert [(n["sae"], n["feature"]) for n in data["neighbours"]] == [(SAE, 4), (SAE, 5), (OTHER, 1)]
    for n in data["neighbours"]:
        target = (page.parent / n["href"]).resolve()
        assert target == (built.run / "pages" / n["sae"] / feature_href(n["feature"])).resolve()
        assert target.exists()


def test_summary_holds_every_feature_and_its_top_tokens(built):
    rows = summary_rows(built.run, SAE)
    assert [r[0] for r in rows] == list(range(N_FEATURES))
    by_f = {r[0]: r for r in rows}
    assert by_f[DEAD][1] == 0
    assert by_f[BRIDGE][5] == "bridge"
    assert by_f[BRIDGE][3] == sig(built.acts[:, BRIDGE].max())


def test_summary_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(pages, "SUMMARY_CHUNK", 3)
    data = make_run(tmp_path, geometry=False)
    build_pages(data.run, saes=[SAE], tokenizer=word_tokenizer(), activations=None, progress=False)
    assert len(list((data.run / "pages" / SAE / "summary").glob("*.js"))) == 3
    assert [r[0] for r in summary_rows(data.run, SAE)] == list(range(N_FEATURES))


def test_missing_tables_leave_their_parts_out(built):
    data = feature_json(built.run, OTHER, 2)  # sae_b has stats, topk and meta only
    assert data["histogram"] is None and data["samples"] is None and data["logit_lens"] is None
    assert data["neighbours"] is None and data["enc_dec_cosine"] is None
    assert texts(data, data["top"][0])[data["top"][0]["c"]] == " gate"
    # No FeatureIndex data for sae_b: only recorded activations are known; the rest are unknown (None).
    assert data["per_token"] == "recorded"
    assert None in data["top"][0]["a"]


def test_partial_shading_without_a_feature_store(tmp_path):
    data = make_run(tmp_path, geometry=False)
    build_pages(data.run, saes=[SAE], tokenizer=word_tokenizer(), activations=None, progress=False)
    page = feature_json(data.run, SAE, BRIDGE)
    assert page["per_token"] == "recorded" and page["neighbours"] is None
    recorded = set(pq.read_table(data.run / "index" / SAE / "topk.parquet").to_pandas().query(f"feature == {BRIDGE}")["row"])
    recorded |= set(pq.read_table(data.run / "index" / SAE / "samples.parquet").to_pandas().query(f"feature == {BRIDGE}")["row"])
    for ex in page["top"]:
        lo = ex["row"] - ex["c"]
        for i, a in enumerate(ex["a"]):
            row = lo + i
            assert (a is None) == (row not in recorded and row != ex["row"])
            if a is not None:
                assert a == sig(data.acts[row, BRIDGE], 3)
    assert not (data.run / "pages" / SAE / "map.js").exists()


def test_full_shading_from_a_real_feature_store(tmp_path):
    from saecore import features

    data = make_run(tmp_path, geometry=False)
    path = data.run / "features" / f"{SAE}.zarr"
    writer = features.open_writer(path, N_FEATURES, {"test": "pages"}, value_dtype="float32", shard_rows=32)
    writer.append(*features.dense_to_csr(data.acts))
    writer.finish()
    features.build_csc(path)
    build_pages(data.run, saes=[SAE], tokenizer=word_tokenizer(), progress=False)  # activations="auto"
    page = feature_json(data.run, SAE, BRIDGE)
    assert page["per_token"] == "all"
    for ex in page["top"] + [e for b in page["samples"] for e in b["examples"]]:
        lo = ex["row"] - ex["c"]
        assert ex["a"] == [sig(a, 3) for a in data.acts[lo:lo + len(ex["id"]), BRIDGE]]


def test_token_ids_shown_without_a_tokenizer_and_rows_without_a_store(tmp_path):
    data = make_run(tmp_path, geometry=False)
    build_pages(data.run, saes=[SAE], load_model_tokenizer=False, activations=None, progress=False)
    page = feature_json(data.run, SAE, BRIDGE)
    assert page["tokens"] == "ids"
    assert texts(page, page["top"][0])[page["top"][0]["c"]] == f"#{WORDS.index(' bridge')}"
    import shutil

    shutil.rmtree(data.run / "activations.zarr")
    build_pages(data.run, saes=[SAE], load_model_tokenizer=False, activations=None, progress=False)
    page = feature_json(data.run, SAE, BRIDGE)
    assert page["context"] is False and page["top"][0]["c"] == -1 and "id" not in page["top"][0]


def test_tokenizer_comes_from_the_store_model(tmp_path, capsys):
    from saecore import models

    data = make_run(tmp_path / "real", geometry=False, model="smollm2-135m")
    build_pages(data.run, saes=[SAE], activations=None, progress=False)
    tok = models.load_tokenizer("smollm2-135m")
    page = feature_json(data.run, SAE, BRIDGE)
    ex = page["top"][0]
    assert texts(page, ex) == [tok.decode([i]) for i in ex["id"]]
    # A model name nobody can load: the pages still build, with token ids, and say why on stderr.
    data = make_run(tmp_path / "unknown", geometry=False, model="no-such-model")
    build_pages(data.run, saes=[SAE], activations=None, progress=False)
    assert feature_json(data.run, SAE, BRIDGE)["tokens"] == "ids"
    assert "no-such-model" in capsys.readouterr().err


def test_index_from_another_store_is_reported(tmp_path):
    data = make_run(tmp_path, geometry=False)
    path = data.run / "index" / SAE / "topk.parquet"
    t = pq.read_table(path)
    doc = np.asarray(t.column("doc_id").to_numpy()).copy()
    doc[0] += 1
    pq.write_table(t.set_column(t.schema.get_field_index("doc_id"), "doc_id", pa.array(doc, pa.int64())), path)
    reseal(path.parent)
    with pytest.raises(ValueError, match=r"topk\.parquet: row \d+ says doc"):
        build_pages(data.run, saes=[SAE], tokenizer=word_tokenizer(), activations=None, progress=False)


def test_a_path_as_sae_name_is_refused_and_the_pages_stay(tmp_path):
    data = make_run(tmp_path, geometry=False)
    build_pages(data.run, tokenizer=word_tokenizer(), activations=None, progress=False)
    before = sorted(p.relative_to(data.run) for p in (data.run / "pages").rglob("*"))
    for name in (".", "..", "../x", f"{SAE}/.."):
        with pytest.raises(ValueError, match="is not an SAE name"):
            build_pages(data.run, saes=[name], activations=None, progress=False)
    assert sorted(p.relative_to(data.run) for p in (data.run / "pages").rglob("*")) == before


def test_bad_tables_are_named(tmp_path):
    data = make_run(tmp_path, geometry=False)
    stats = data.run / "index" / SAE / "stats.parquet"
    pq.write_table(pq.read_table(stats).drop(["max"]), stats)
    reseal(stats.parent)
    with pytest.raises(ValueError, match=r"stats\.parquet: missing column\(s\) \['max'\]"):
        build_pages(data.run, saes=[SAE], activations=None, progress=False)
    topk = data.run / "index" / OTHER / "topk.parquet"
    topk.write_bytes(topk.read_bytes()[:40])  # truncated
    reseal(topk.parent)  # past the checksum: the Parquet reader's own error is named too
    with pytest.raises(CorruptDataError, match=r"sae_b/topk\.parquet: unreadable Parquet"):
        build_pages(data.run, saes=[OTHER], activations=None, progress=False)
    with pytest.raises(FileNotFoundError, match="no index for SAE 'nope'"):
        build_pages(data.run, saes=["nope"], progress=False)


def test_failed_rebuild_keeps_the_old_pages(tmp_path):
    data = make_run(tmp_path, geometry=False)
    build_pages(data.run, tokenizer=word_tokenizer(), activations=None, progress=False)
    before = (data.run / "pages" / SAE / feature_href(BRIDGE)).read_text()
    hist = data.run / "index" / SAE / "histograms.parquet"
    t = pq.read_table(hist)
    lo = t.column("lo").to_numpy().copy()
    lo[2] = np.nan
    pq.write_table(t.set_column(t.schema.get_field_index("lo"), "lo", pa.array(lo, pa.float32())), hist)
    reseal(hist.parent)
    with pytest.raises(ValueError, match=r"histograms\.parquet: column 'lo' holds a non-finite value at row 2"):
        build_pages(data.run, saes=[SAE], tokenizer=word_tokenizer(), activations=None, progress=False)
    assert (data.run / "pages" / SAE / feature_href(BRIDGE)).read_text() == before
    assert (data.run / "pages" / OTHER / "index.html").exists()
    assert not [p for p in (data.run / "pages").iterdir() if p.name.startswith(".")]


def test_rebuilding_one_sae_keeps_the_others(tmp_path):
    data = make_run(tmp_path, geometry=False)
    build_pages(data.run, tokenizer=word_tokenizer(), activations=None, progress=False)
    other_page = (data.run / "pages" / OTHER / feature_href(1)).read_text()
    build_pages(data.run, saes=[SAE], tokenizer=word_tokenizer(), activations=data.activations, progress=False)
    assert (data.run / "pages" / OTHER / feature_href(1)).read_text() == other_page
    assert feature_json(data.run, SAE, BRIDGE)["per_token"] == "all"
    assert f'href="{OTHER}/index.html"' in (data.run / "pages" / "index.html").read_text()


def test_script_json_cannot_close_the_script_element():
    payload = {"t": ["</script><script>alert(1)</script>", "<!--", "\u2028"]}
    text = pages._script_json(payload)
    assert "</" not in text and "<!--" not in text and "\u2028" not in text
    assert json.loads(text) == payload


def test_page_assets_ship_with_the_package():
    from importlib import resources

    files = {p.name for p in resources.files("saecore.page_assets").iterdir()}
    assert set(pages.ASSET_FILES) | {"feature.html", "sae_index.html", "root_index.html"} <= files


def test_cli_writes_pages_and_prints_the_path(tmp_path):
    data = make_run(tmp_path, geometry=False)
    env = {**os.environ, "SAECORE_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "saecore.cli", "pages", str(data.run), "--sae", SAE, "--no-tokenizer"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"file://{(data.run / 'pages' / 'index.html').resolve()}" in proc.stdout
    assert (data.run / "pages" / SAE / feature_href(BRIDGE)).exists()
    proc = subprocess.run([sys.executable, "-m", "saecore.cli", "pages", str(tmp_path / "absent")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode != 0 and "no run directory" in proc.stderr


def test_server_binds_localhost_and_serves_the_pages(built):
    server = make_server(built.run / "pages", port=0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{SAE}/{feature_href(BRIDGE)}", timeout=10) as r:
            assert r.status == 200 and b"SAECORE_FEATURE" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{SAE}/", timeout=10) as r:
            assert r.status == 200 and r.read().startswith(b"<!")  # the SAE's index.html
        (built.run / "pages" / "stray").mkdir(exist_ok=True)  # a folder with no index.html is not listed
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stray/", timeout=10)
    finally:
        (built.run / "pages" / "stray").rmdir()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_density_chart_leaves_out_the_dead_bin(built):
    """`saecore index` writes dead features as a bin with edges -inf; the chart gets only finite bins."""
    text = (built.run / "pages" / SAE / "sae.js").read_text()
    rows = json.loads(re.search(r"window\.SAECORE_SAE=(.*);\s*$", text, re.DOTALL).group(1))["density_histogram"]
    assert rows and all(np.isfinite(lo) and np.isfinite(hi) for lo, hi, _ in rows)
    stats = pq.read_table(built.run / "index" / SAE / "stats.parquet").to_pydict()
    assert sum(c for _, _, c in rows) == sum(1 for c in stats["count"] if c > 0)
