"""The house's shape: the keys page is the code's, packages import each other in one direction only,
and the framework (``oats``) names no method: plugins are reached through ``oats.registry``'s tables."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
PLUGIN_PACKAGES = {"baselines", "sparse_lowrank", "layerwise", "weight_updates", "block_updates", "model_updates"}


def imported_packages(package: str) -> dict[str, set[str]]:
    """{other top-level package: files of ``package`` that import it}, every import statement counted
    (module level and inside functions)."""
    out: dict[str, set[str]] = {}
    for f in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top in PACKAGES and top != package:
                    out.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return out


def test_the_keys_page_is_generated_from_the_code():
    from oats.config import keys_markdown

    page = (ROOT / "docs" / "config-keys.md").read_text()
    assert page == keys_markdown(), ("docs/config-keys.md differs from the key tables; regenerate it: "
                                     "python -c \"import oats.config as c; print(c.keys_markdown(), end='')\" > docs/config-keys.md")


def test_a_key_shared_by_plugins_is_listed_once_with_its_owners():
    from oats.config import key_owners, keys_markdown

    rows = [line for line in keys_markdown().splitlines() if line.startswith("| `")]
    keys = [r.split("`")[1] for r in rows]
    assert len(keys) == len(set(keys))
    shared = {k: owners for k, (_, owners) in key_owners().items() if len(owners) > 1}
    assert "percdamp" in shared and len(shared["percdamp"]) >= 2, shared


def test_no_two_packages_import_each_other():
    graph = {p: set(imported_packages(p)) for p in PACKAGES}
    assert "oats" in graph and "factored" in graph and "sparse_lowrank" in graph
    for a, deps in graph.items():
        for b in deps:
            assert a not in graph[b], f"{a} and {b} import each other: {imported_packages(a)[b]} / {imported_packages(b)[a]}"
    # and no longer circle either: a topological order exists
    seen: dict[str, int] = {}

    def visit(p: str, path: tuple[str, ...]) -> None:
        assert seen.get(p) != 1, f"import cycle: {' -> '.join(path + (p,))}"
        if seen.get(p) == 2:
            return
        seen[p] = 1
        for q in graph[p]:
            visit(q, path + (p,))
        seen[p] = 2

    for p in PACKAGES:
        visit(p, ())


def test_the_framework_imports_no_method_module():
    for framework in ("oats", "factored", "data", "eval", "export"):
        named = {p: files for p, files in imported_packages(framework).items() if p in PLUGIN_PACKAGES}
        assert not named, f"{framework} imports plugin packages by name: {named}"


def test_the_registry_tables_name_modules_that_declare_their_plugin():
    from oats import registry

    for kind, (table, attr, cls) in registry.KINDS.items():
        for name, module in table.items():
            assert module.split(".")[0] in PLUGIN_PACKAGES, (kind, name, module)
            decl = registry.plugin(kind, name)
            assert isinstance(decl, cls) and decl.name == name


def test_plugins_see_only_the_contracts_of_the_framework():
    """A plugin imports ``oats.interface`` and ``oats.keys``, never the pipeline, the config or the lifecycle."""
    allowed = {"oats", "oats.interface", "oats.keys"}
    for package in PLUGIN_PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                bad = [m for m in mods if m.split(".")[0] == "oats" and m not in allowed]
                assert not bad, f"{f.relative_to(ROOT)} imports {bad}; plugins may use {sorted(allowed)}"
