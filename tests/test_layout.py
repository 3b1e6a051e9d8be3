"""The package's layout rules (README, Layout), checked on its imports as `ast` reads them.

- nothing under billing/ imports gateway/, runtime/ or cli/;
- nothing outside cli/ imports cli/ (a `__main__` module may: it is a command);
- gateway/ has no SQL: no sqlite3 or asyncpg import, no SELECT/INSERT/UPDATE/DELETE text;
- mock/ imports nothing of the gateway (it stands for a provider);
- admin/ (the admin API) and console/ (the web console) import nothing of runtime/ (serve
  starts them, not the reverse);
- no import cycles between the top-level packages.

An import inside a function counts as much as one at the top: it is still a dependency. A rule
that a later step of issue 12 makes hold is listed in ALLOWED with that step's name, and the
test fails when the entry is no longer needed, so the list only shrinks.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import tokenhub

ROOT = Path(tokenhub.__file__).parent
PACKAGES = (
    "money", "db", "store", "billing", "gateway", "runtime", "cli", "mock", "routing_bench",
    "admin", "tenant", "console",
)  # fmt: skip

# (importing module, imported top-level package) pairs a later step removes.
ALLOWED: dict[tuple[str, str], str] = {}

_SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE)\b.*\b(FROM|INTO|SET)\b", re.I | re.S)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, absolute (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _top(module: str) -> str | None:
    """The top-level package of a tokenhub module (`tokenhub.billing.pots` -> billing)."""
    parts = module.split(".")
    if parts[0] != "tokenhub" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in PACKAGES else None


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}
USED: set[tuple[str, str]] = set()


def _violations(rule: str, importer_in: str, forbidden: set[str]) -> list[str]:
    bad = []
    for name, imported in IMPORTS.items():
        if _top(name) != importer_in:
            continue
        for target in sorted({t for m in imported if (t := _top(m)) in forbidden}):
            if (name, target) in ALLOWED:
                USED.add((name, target))
                continue
            bad.append(f"{name} imports tokenhub.{target} ({rule})")
    return bad


def test_billing_imports_no_gateway_runtime_or_cli() -> None:
    assert _violations("billing owns its rules", "billing", {"gateway", "runtime", "cli"}) == []


def test_only_cli_imports_cli() -> None:
    bad = []
    for name, imported in IMPORTS.items():
        if _top(name) == "cli" or name.endswith("__main__"):
            continue
        if any(_top(m) == "cli" for m in imported):
            bad.append(name)
    assert bad == []


def test_mock_imports_nothing_of_the_gateway() -> None:
    assert _violations("the mock stands for a provider", "mock", {"gateway", "runtime"}) == []


def test_admin_imports_no_runtime() -> None:
    assert _violations("serve starts the admin API", "admin", {"runtime", "cli"}) == []


def test_console_imports_no_runtime() -> None:
    assert _violations("serve starts the console", "console", {"runtime", "cli"}) == []


def test_gateway_has_no_sql() -> None:
    bad = []
    for name, path in MODULES.items():
        if _top(name) != "gateway":
            continue
        if {"sqlite3", "asyncpg"} & {m.split(".")[0] for m in IMPORTS[name]}:
            bad.append(f"{name} imports a database driver")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_str = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_str and _SQL.match(node.value):
                bad.append(f"{name}:{node.lineno} has SQL: {node.value[:40]!r}")
    assert bad == []


def test_no_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, imported in IMPORTS.items():
        src = _top(name)
        if src is None or name.endswith("__main__"):
            continue
        for m in imported:
            dst = _top(m)
            if dst is None or dst == src:
                continue
            if (name, dst) in ALLOWED:
                USED.add((name, dst))
                continue
            edges[src].add(dst)
    # Depth-first search for a back edge; the cycle found is reported in full.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for p in PACKAGES:
        if p not in state:
            visit(p)
    assert cycles == []


def test_allow_list_entries_are_still_needed() -> None:
    test_billing_imports_no_gateway_runtime_or_cli()
    test_no_cycles_between_packages()
    assert set(ALLOWED) - USED == set(), "remove the entries no longer needed"
