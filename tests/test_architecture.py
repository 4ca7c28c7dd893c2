"""The package's shape, checked from its source with ``ast`` (nothing is imported):

* no import cycle between saecore's modules, counting function-local imports too (a cycle hidden
  inside a function still means neither module can be understood or tested without the other);
* only ``saecore/run.py`` spells the run layout's file and folder names (``cfg.json``, ``stats.parquet``,
  ``runs/NAME/index`` …): every other module asks :class:`saecore.run.Run` or uses its constants.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "saecore"

# File names of the run layout; a module other than run.py writing one of these as a literal is
# joining a path by hand.
LAYOUT_FILES = {
    "cfg.json", "sae_weights.safetensors", "metrics.json", "trainer_state.safetensors", "trainer_state.pt", "meta.json", "commit.json",
    "activations.zarr", "stats.parquet", "histograms.parquet", "topk.parquet", "samples.parquet",
    "density_histogram.parquet", "neighbours.parquet", "map.parquet", "enc_dec_cosine.parquet",
    "logit_lens.parquet", "splitting.parquet", "splitting_families.parquet", "geometry.parquet",
    "explanations.parquet", "autointerp_scores.parquet", "specificity.parquet", "autointerp.json", "llm_cache",
}
# Folder names of the run layout: flagged only as the right operand of ``/`` (``run / "index"``);
# the same words appear legitimately as verb names, dict keys and log text.
LAYOUT_DIRS = {"index", "saes", "features", "pages"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """saecore modules ``name`` imports anywhere in its source (module level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` / `from .pkg import sub` name submodules; `from .x import f` names x.
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the saecore modules it imports. The package ``saecore`` itself (its ``__init__`` re-exports
    the public API) is left out of the edges: importing ``saecore.x`` runs it, but it is the top, not a layer."""
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) - {"saecore"} for name, path in mods.items() if name != "saecore"}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(_cycle_in(sorted(comp), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle a → b → … → a inside a strongly connected component (for the message)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [n for n in nxt if n not in seen]
        if not fresh:  # closes on a module met earlier: cut the path there
            n = nxt[0]
            return path[path.index(n):] + [n]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_graph_sees_function_local_imports(tmp_path):
    """The checker itself: an import inside a function is an edge, and a two-module cycle is found."""
    graph = {"saecore.a": {"saecore.b"}, "saecore.b": {"saecore.a"}, "saecore.c": {"saecore.a"}}
    assert find_cycles(graph) == [["saecore.a", "saecore.b", "saecore.a"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .sae import SAE\n    import saecore.index\n")
    assert _imports("saecore.m", src, {"saecore.sae", "saecore.index", "saecore.m"}) == {"saecore.sae", "saecore.index"}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 10  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in saecore:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
        if isinstance(node, (ast.Module, ast.ClassDef)):  # attribute docstrings: a string after an assignment
            for prev, cur in zip(node.body, node.body[1:]):
                if isinstance(prev, (ast.Assign, ast.AnnAssign)) and isinstance(cur, ast.Expr) \
                        and isinstance(cur.value, ast.Constant):
                    out.add(id(cur.value))
    return out


def layout_literals(path: Path) -> list[str]:
    """``line: literal`` for each layout file name spelled as a string literal (not in a docstring, help
    text or message: those are whole sentences, never equal to the bare name) and each layout folder
    name joined with ``/``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstring_nodes(tree)
    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and node.value in LAYOUT_FILES):
            hits.append(f"{node.lineno}: {node.value!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in LAYOUT_DIRS:
                hits.append(f"{node.lineno}: / {right.value!r}")
            if isinstance(right, ast.JoinedStr) and right.values and isinstance(right.values[-1], ast.Constant) \
                    and str(right.values[-1].value).endswith((".parquet", ".zarr", ".json")):
                hits.append(f"{node.lineno}: / f-string ending {right.values[-1].value!r}")
    return hits


def test_layout_checker_flags_hand_joins(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""cfg.json is named in the docstring."""\n'
                   'def f(run, name):\n'
                   '    """Reads stats.parquet."""\n'
                   '    print("no cfg.json in this folder")\n'
                   '    return run / "index" / name / "stats.parquet", run / f"{name}.parquet", {"index": 1}\n')
    assert sorted(layout_literals(src)) == ["5: 'stats.parquet'", "5: / 'index'", "5: / f-string ending '.parquet'"]


def test_only_run_py_spells_the_layout():
    offenders = {}
    for name, path in _modules().items():
        if name == "saecore.run":
            continue
        hits = layout_literals(path)
        if hits:
            offenders[name] = hits
    assert not offenders, "run-layout names spelled outside saecore/run.py (use saecore.run):\n" + "\n".join(
        f"{m}: {', '.join(h)}" for m, h in offenders.items())
