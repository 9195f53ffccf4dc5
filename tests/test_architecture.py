"""The package's shape: the foundation imports no capability, and no module imports form a cycle.

Every ``import`` statement counts, at module level or inside a function (an import inside a function
hides a cycle, it does not remove it). Capabilities are loaded by name through
``kvforge._capabilities`` (a registry of module names), which is how the foundation finds what they
register without importing them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvforge"
FOUNDATION = {"kvforge", "kvforge._capabilities", "kvforge._compat", "kvforge.models", "kvforge.state",
              "kvforge.layers", "kvforge.run", "kvforge.rope", "kvforge.specs", "kvforge.results",
              "kvforge.progress", "kvforge.texts", "kvforge.plots", "kvforge.generate", "kvforge.artifacts",
              "kvforge.describe"}
CAPABILITIES = ("kvforge.cache", "kvforge.peers", "kvforge.quant", "kvforge.mla", "kvforge.translate", "kvforge.eval",
                "kvforge.serve", "kvforge.integrations", "kvforge.cli", "kvforge.demo")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every kvforge module ``path`` imports (resolved relative imports; ``from x import y`` counts ``x.y``
    when ``x.y`` is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kvforge")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("kvforge"):
                continue
            for a in node.names:  # ``from pkg import module`` imports the module; other names need pkg itself
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    out.discard(name)
    return out


FILES = sorted(SRC.rglob("*.py"))
MODULES = {_module_name(p) for p in FILES}
GRAPH = {_module_name(p): {m for m in _imports(p) if m in MODULES} for p in FILES}


def _capability(mod: str) -> str | None:
    return next((c for c in CAPABILITIES if mod == c or mod.startswith(c + ".")), None)


@pytest.mark.parametrize("mod", sorted(m for m in FOUNDATION if m in MODULES and m != "kvforge"))
def test_foundation_imports_no_capability(mod):
    bad = sorted(m for m in GRAPH[mod] if _capability(m))
    assert not bad, f"{mod} (foundation) imports capabilities: {bad}"


def test_every_module_is_foundation_or_capability():
    loose = sorted(m for m in MODULES if m not in FOUNDATION and not _capability(m) and m != "kvforge.__main__")
    assert not loose, f"modules that are neither foundation nor a capability: {loose}"


def test_capabilities_do_not_import_each_others_internals():
    """A capability may use another's public package (``kvforge.quant``), never its modules, and the
    foundation and eval/serve/integrations/cli sit on top: only they and demo may use other capabilities."""
    users = ("kvforge.eval", "kvforge.serve", "kvforge.integrations", "kvforge.cli", "kvforge.demo")
    bad = []
    for mod, deps in GRAPH.items():
        cap = _capability(mod)
        if cap is None or cap in users:
            continue
        bad += [f"{mod} -> {d}" for d in deps if _capability(d) not in (None, cap)]
    assert not bad, "back-edges between capabilities: " + ", ".join(sorted(bad))


def test_no_import_cycles():
    cycles, done = set(), set()

    def visit(mod, stack):
        for dep in sorted(GRAPH[mod]):
            if dep in stack:
                cycles.add(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(mod)

    for mod in sorted(GRAPH):
        if mod not in done:
            visit(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in FILES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_every_file_format_refuses_a_newer_version_with_one_error_type(tmp_path, tiny_llama):
    """KV states, translators and MLA conversions share one version check and one error type."""
    import json

    from safetensors.torch import save_file

    from kvforge.artifacts import ArtifactError
    from kvforge.mla.io import MLA_FILE, read_config
    from kvforge.translate import Translator

    (tmp_path / MLA_FILE).write_text(json.dumps({"format": 99, "config": {}}))
    with pytest.raises(ArtifactError, match="MLA conversion format version 99, newer"):
        read_config(tmp_path)
    save_file({"x": __import__("torch").zeros(1)}, str(tmp_path / "t.safetensors"),
              metadata={"kvforge-translator": json.dumps({"format": 99, "config": {}})})
    with pytest.raises(ArtifactError, match="translator format version 99, newer"):
        Translator.load(tmp_path / "t.safetensors")
