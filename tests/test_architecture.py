"""docs/ARCHITECTURE.md's import rules, read from the source (no module is imported): the light
layers import no megatron-core or ModelOpt at module level, io and the checkpoint tools stay
below the rest of the toolkit, runtime depends on nothing above it, nothing imports cli."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "post_training"
HEAVY = ("megatron", "modelopt")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) of every import in a file; relative ones resolved."""
    tree = ast.parse(path.read_text())
    pkg = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try))
                                        for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out += [(f"{base}.{a.name}" if a.name != "*" else base, id(node) in top) for a in node.names]
    return out


def _files(*rel: str) -> list[Path]:
    out = []
    for r in rel:
        p = PKG / r
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    return out


def _toolkit(name: str) -> str | None:
    return name if name.startswith("post_training") else None


def test_light_layers_import_no_megatron_or_modelopt_at_module_level():
    light = _files("config", "utils", "io", "hf", "data", "arguments", "evaluation/inputs", "cli")
    bad = [(f.name, m) for f in light for m, top in _imports(f) if top and m.split(".")[0] in HEAVY]
    assert not bad


def test_io_and_checkpoint_tools_stay_below_the_toolkit():
    allowed = ("post_training.utils", "post_training.io", "post_training.checkpointing.tools")
    bad = []
    for f in _files("io", "checkpointing/tools"):
        for m, _ in _imports(f):
            if _toolkit(m) and not m.startswith(allowed):
                bad.append((str(f.relative_to(PKG)), m))
    assert not bad


def test_runtime_depends_on_nothing_above_it():
    """runtime/ may use config, utils, io and itself; registering the toolkit's own attention
    with ModelOpt (quant_modules, attention) is the one entry that must name a module above,
    and does so inside its apply function, not at import."""
    allowed = ("post_training.config", "post_training.utils", "post_training.io", "post_training.runtime")
    bad = []
    for f in _files("runtime"):
        for m, top in _imports(f):
            if not _toolkit(m) or m.startswith(allowed):
                continue
            if not top and m.startswith(("post_training.quant_modules", "post_training.attention")):
                continue
            bad.append((str(f.relative_to(PKG)), m))
    assert not bad


def test_nothing_imports_cli_and_entries_do_not_import_each_other():
    bad = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).parts
        for m, _ in _imports(f):
            if not m.startswith("post_training.cli"):
                continue
            if rel[0] != "cli" or (m != "post_training.cli.run_entry" and m.count(".") >= 2
                                   and not m.startswith("post_training.cli.run_entry")):
                bad.append(("/".join(rel), m))
    assert not bad


def test_architecture_doc_names_every_package():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for p in sorted(PKG.iterdir()):
        if p.name.startswith("_"):
            continue
        name = p.name + ("/" if p.is_dir() else "")
        if p.is_dir() and not (p / "__init__.py").exists() and p.name != "resources":
            continue
        assert name in doc, name
