"""The import contract: the layers of ``relay/`` as the README's Code layout draws them,
and the size rule: no class over 300 lines, no function over 60 without a reason.

Read from the source with ``ast`` (nothing is imported), so a module that
reaches across a line fails here, naming the module, the line and the import.

Floors, lowest first; a module may import its own floor and those below, never
one above:

    core            pure: no I/O, no clock, no asyncio
    config, files   the one configuration object; reading the files it names
    custody         the spool (the only sqlite3 importer)
    ops, limits     metrics, health, logs, workers, event loop; the fleet's limits
                    (the only redis importer)
    upstream        the provider side (the only aiosmtplib importer)
    inbound         the listener (the only aiosmtpd importer)
    delivery, direct
    intake
    server, startup
    cli, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "relay"

FLOORS: tuple[tuple[str, ...], ...] = (
    ("relay.core",),
    ("relay.config", "relay.files"),
    ("relay.custody",),
    ("relay.ops", "relay.limits"),
    ("relay.upstream",),
    ("relay.inbound",),
    ("relay.delivery", "relay.direct"),
    ("relay.intake",),
    ("relay.server", "relay.startup"),
    ("relay.cli", "relay.__main__"),
)

# What the pure core may import besides itself: the standard library's pure
# modules, and the libraries that do one pure job (IDNA, Unicode regexes, DKIM).
CORE_ALLOWED = frozenset(
    {
        "__future__",
        "binascii",
        "bisect",
        "collections",
        "dataclasses",
        "datetime",
        "email",
        "enum",
        "functools",
        "hashlib",
        "html",
        "itertools",
        "re",
        "textwrap",
        "typing",
        "unicodedata",
        "urllib",
        "dkim",
        "idna",
        "regex",
    }
)

# Each library boundary has one owner.
OWNERS = {
    "aiosmtpd": ("relay.inbound",),
    "aiosmtplib": ("relay.upstream",),
    "redis": ("relay.limits",),
    "sqlite3": ("relay.custody",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth (lazy imports too)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "relay":  # from relay import x: x is the module
                found.extend((node.lineno, f"relay.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, node.module))
    return found


def _floor(module: str) -> int | None:
    for index, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


MODULES = sorted(RELAY.rglob("*.py"))


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def floor_violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """Imports of ``module`` from a floor above its own (or from no floor)."""
    floor = _floor(module)
    if floor is None:
        return [f"{module} is on no floor: add it to FLOORS and the README"]
    wrong: list[str] = []
    for line, imported in imports:
        if imported == "relay.__version__" or not imported.startswith("relay."):
            continue
        target = _floor(imported)
        if target is None or target > floor:
            wrong.append(f"{module}:{line} imports {imported}, a floor above it")
    return wrong


def core_violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """Imports of a core module that are neither the core nor on the pure list."""
    return [
        f"{module}:{line} imports {imported}: the core is pure"
        for line, imported in imports
        if not imported.startswith("relay.core") and imported.split(".")[0] not in CORE_ALLOWED
    ]


def owner_violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """Imports of a boundary library from outside the package that owns it."""
    return [
        f"{module}:{line} imports {imported}, owned by {OWNERS[top]}"
        for line, imported in imports
        if (top := imported.split(".")[0]) in OWNERS and not _within(module, OWNERS[top])
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(RELAY)))
def test_a_module_keeps_to_its_layer(path: Path) -> None:
    module = _module_name(path)
    imports = _imports(path)
    wrong = owner_violations(module, imports)
    if module != "relay":
        wrong += floor_violations(module, imports)
    if module.startswith("relay.core"):
        wrong += core_violations(module, imports)
    assert not wrong, wrong


def test_every_floor_names_modules_that_exist() -> None:
    names = {_module_name(path) for path in MODULES}
    for prefixes in FLOORS:
        for prefix in prefixes:
            assert prefix in names, f"{prefix} is in FLOORS but not in relay/"


def test_the_contract_catches_each_kind_of_crossing() -> None:
    """Each check finds the crossing it names (so a passing run means something)."""
    assert core_violations("relay.core.split", [(3, "asyncio"), (4, "re")]) == [
        "relay.core.split:3 imports asyncio: the core is pure"
    ]
    assert floor_violations("relay.custody.spool", [(7, "relay.upstream.smtp")]) == [
        "relay.custody.spool:7 imports relay.upstream.smtp, a floor above it"
    ]
    assert floor_violations("relay.server", [(7, "relay.upstream.smtp")]) == []
    assert owner_violations("relay.delivery", [(9, "aiosmtplib.errors")]) != []
    assert owner_violations("relay.upstream.smtp", [(9, "aiosmtplib.errors")]) == []
    assert floor_violations("relay.newthing", []) != []


# -- sizes: units small enough to hold in your head --------------------------------

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60
# A longer function says why in its docstring, on a line of its own beginning so.
LENGTH_REASON = "Long because"


def size_violations(path: Path, source: str) -> list[str]:
    """Classes over ``MAX_CLASS_LINES``; functions over ``MAX_FUNCTION_LINES`` with no reason."""
    wrong: list[str] = []
    for node in ast.walk(ast.parse(source, str(path))):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assert node.end_lineno is not None
        lines = node.end_lineno - node.lineno + 1
        where = f"{path.name}:{node.lineno} {node.name} is {lines} lines"
        if isinstance(node, ast.ClassDef):
            if lines > MAX_CLASS_LINES:
                wrong.append(f"{where} (a class holds at most {MAX_CLASS_LINES})")
        elif lines > MAX_FUNCTION_LINES:
            doc = ast.get_docstring(node) or ""
            if not any(line.strip().startswith(LENGTH_REASON) for line in doc.splitlines()):
                wrong.append(
                    f"{where} (over {MAX_FUNCTION_LINES}: split it, or say"
                    f" '{LENGTH_REASON} ...' in its docstring)"
                )
    return wrong


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(RELAY)))
def test_no_unit_is_too_big_to_hold(path: Path) -> None:
    wrong = size_violations(path, path.read_text())
    assert not wrong, wrong


def test_the_size_rule_catches_a_long_unit_and_takes_a_reason() -> None:
    body = "".join(f"    x{n} = {n}\n" for n in range(MAX_FUNCTION_LINES))
    long_function = f"def f():\n{body}"
    assert size_violations(Path("m.py"), long_function) != []
    reasoned = f'def f():\n    """One table.\n\n    {LENGTH_REASON} it is one table."""\n{body}'
    assert size_violations(Path("m.py"), reasoned) == []
    methods = "".join(f"    def m{n}(self):\n        return {n}\n\n" for n in range(110))
    assert size_violations(Path("m.py"), f"class C:\n{methods}") != []
    assert size_violations(Path("m.py"), "class C:\n    pass\n") == []
