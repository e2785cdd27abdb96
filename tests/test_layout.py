"""Rules of the code base that import-linter cannot express (docs/ARCHITECTURE.md).

- no module over 400 lines and no function over 60 lines in ``flower_split/`` and ``strategies/``;
- no module outside the two registries compares ``security`` or ``label_protection`` strings:
  the rest of the package asks the registries (``flower_split.backends``,
  ``flower_split.protocol.labels``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for package in ("flower_split", "strategies") for p in (ROOT / package).rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
REGISTRIES = {"flower_split/backends", "flower_split/protocol/labels.py"}
# `security == "secure"`, `config.label_protection != "he"`, `protection in ("he", "client")` ...
NAME_COMPARISON = re.compile(
    r"""(security|label_protection)\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[\{]?\s*["'](plain|secure|he|client)["']"""
    r"""|["'](plain|secure|he|client)["']\s*(==|!=)\s*\w*\.?(security|label_protection)\b""")


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_sources_are_found() -> None:
    assert len(SOURCES) > 50 and any(p.name == "contract.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_modules_and_functions_are_short(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert source.count("\n") <= MAX_MODULE_LINES, f"{_relative(path)}: over {MAX_MODULE_LINES} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{_relative(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_only_the_registries_compare_level_names(path: Path) -> None:
    name = _relative(path)
    if any(name == r or name.startswith(r + "/") for r in REGISTRIES):
        return
    hits = [f"line {i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if NAME_COMPARISON.search(line)]
    assert not hits, f"{name} compares security / label-protection names; ask the registry instead: {hits}"


def test_the_name_rule_catches_a_comparison() -> None:
    for line in ('if config.security == "secure":', "if setup.label_protection not in ('he', 'client'):",
                 'he = spec.label_protection == "he"', 'if "secure" == config.security:'):
        assert NAME_COMPARISON.search(line), line
    assert not NAME_COMPARISON.search('protection = label_protection(config.label_protection)')
