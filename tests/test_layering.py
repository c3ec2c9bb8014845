"""The floors of the house: the server imports the engine and never a tool; the engine never imports the server;
the server process (its command, its app, its transports) never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bench", "loadtest", "convert", "training", "trimode_cli")


def _imports(package: str) -> dict[str, set[str]]:
    """Each module of `package` -> the top-level packages it imports (at any depth, lazily or not)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_the_server_imports_no_tool_and_the_engine_no_server() -> None:
    server = {path: sorted(names & set(TOOLS)) for path, names in _imports("server").items() if names & set(TOOLS)}
    assert server == {}, f"server modules import tools: {server}"
    engine = {path: sorted(names & {"server", *TOOLS}) for path, names in _imports("engine").items()
              if names & {"server", *TOOLS}}
    assert engine == {}, f"engine modules import the server or tools: {engine}"


def test_the_server_process_modules_import_no_torch() -> None:
    code = ("import sys, server.cli, server.app, server.engine_process, server.async_engine, server.transport; "
            "print(sorted(m for m in ('torch', 'bench', 'loadtest') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
