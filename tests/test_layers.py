"""Imports run one way (docs/DEVELOPING.md): types ◄ preprocess ◄ runtime ◄ server, never back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "edgevl"
# the server builds its engine here, importing the runtime only when called
ENGINE_BUILDERS = {"load_default_engine", "run_cluster"}


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module imported, enclosing function or None) for every import in a file."""
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                out.append((child.module, func))
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            visit(child, inner)

    visit(ast.parse(path.read_text()), None)
    return out


def _violations(folder: str, banned: tuple[str, ...], allowed_in: set[str] = frozenset()) -> list[str]:
    files = [PKG / folder] if folder.endswith(".py") else sorted((PKG / folder).rglob("*.py"))
    return [f"{f.relative_to(PKG)} imports {mod}" for f in files for mod, func in imports(f)
            if mod.startswith(banned) and func not in allowed_in]


def test_the_engine_interface_depends_on_nothing_of_edgevl():
    assert _violations("types.py", ("edgevl",)) == []


def test_preprocessing_knows_no_runtime_export_or_server():
    assert _violations("preprocess", ("edgevl.runtime", "edgevl.export", "edgevl.server", "onnxruntime")) == []


def test_nothing_below_the_server_imports_it():
    for folder in ("preprocess", "runtime", "export", "ops"):
        assert _violations(folder, ("edgevl.server",)) == []


def test_the_server_reaches_the_runtime_only_to_build_the_engine():
    banned = ("edgevl.runtime", "edgevl.export", "edgevl.demo", "onnxruntime")
    assert _violations("server", banned, ENGINE_BUILDERS) == []
    code = "import sys, edgevl.server.app, edgevl.server.cli; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
