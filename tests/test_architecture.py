"""The import rules of DESIGN.md section 2, kept checkable.

- the core package (slofleet/, except the cli composition root) imports no kopf, kubernetes,
  grpc, HTTP framework or vLLM;
- operator/, gateway/ and sidecar/ never import each other;
- only sidecar/vllm_ext/ imports vllm.
Every import statement counts, including ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("kopf", "kubernetes", "grpc", "aiohttp", "httpx", "fastapi", "vllm", "slofleet.api")
RUNTIMES = {"operator": "slofleet.operator", "gateway": "slofleet.gateway", "sidecar": "slofleet.sidecar"}
CORE_EXEMPT = {"cli.py"}  # the composition root wires the runtimes together


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _py_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _py_files("slofleet"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_is_plain_python(path: Path) -> None:
    if path.name in CORE_EXEMPT and path.parent == ROOT / "slofleet":
        return
    bad = {n for n in _imports(path) for f in FRAMEWORKS if _matches(n, f)}
    bad |= {n for n in _imports(path) for r in RUNTIMES.values() if _matches(n, r)}
    bad |= {n for n in _imports(path) if _matches(n, "slofleet.local")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the core must stay plain Python"


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_runtimes_do_not_import_each_other(runtime: str) -> None:
    others = [pkg for name, pkg in RUNTIMES.items() if name != runtime] + ["slofleet.local"]
    for path in _py_files(runtime):
        bad = {n for n in _imports(path) for o in others if _matches(n, o)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_engine_extension_imports_vllm() -> None:
    for folder in ("slofleet", "operator", "gateway", "sidecar", "local"):
        for path in _py_files(folder):
            if (ROOT / "sidecar" / "vllm_ext") in path.parents:
                continue
            bad = {n for n in _imports(path) if _matches(n, "vllm")}
            assert not bad, f"{path.relative_to(ROOT)} imports vllm; only sidecar/vllm_ext may"
