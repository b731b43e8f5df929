"""Who may import whom: the agent and the router stand alone, and the pure core does no I/O.

Every module of the project's packages (`packages.find` in pyproject.toml) is read with
`ast`; every `import` and `from ... import` counts, also inside functions (lazy imports)
and under `if TYPE_CHECKING:`. Relative imports are resolved; `from stack import observe`
imports `stack.observe`. Only direct imports count: what an allowed module imports in turn
is that module's own business.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Neither the agent (on every GPU host) nor the router needs the controller, nor the other.
STANDALONE: dict[str, tuple[str, ...]] = {
    "agent": ("stack", "deploys", "router"),
    "router": ("stack", "deploys", "agent"),
}

# The pure core reads no file, network, clock or environment; a prefix also
# covers the package a module may become (`stack.config` -> `stack/config/`).
PURE_CORE = ("stack.config", "stack.spec", "stack.selector", "stack.tomlpos", "stack.estimate",
             "stack.schedule", "stack.plan", "stack.changes", "stack.render",
             "stack.placement", "stack.neighbours", "stack.bundle_target")
IO_MODULES = ("stack.observe", "stack.apply", "stack.remote", "stack.wheelhouse", "stack.lock",
              "stack.secrets", "stack.sshtcp", "stack.commands", "stack.cli",
              "stack.monitoring", "stack.pipeline", "stack.estimate.remote",
              "stack.estimate.read", "stack.sources", "pyinfra", "paramiko", "gevent",
              "httpx", "huggingface_hub", "modelscope", "subprocess", "socket")

# (importing file, imported module): known, to be removed. Nothing under agent/ goes here.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset({
    # The package re-exports the metadata readers (read_metadata, read_path, meta_from_gguf):
    # under TYPE_CHECKING here, and at run time through `__getattr__` on first use.
    ("stack/estimate/__init__.py", "stack.estimate.read"),
})


@dataclass(frozen=True)
class Import:
    """One module imported by one file of the project."""

    path: str  # the importing file, relative to the repository: `stack/plan.py`
    line: int
    module: str  # absolute: `stack.observe`, `subprocess`

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports `{self.module}`"


def _packages() -> tuple[str, ...]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return tuple(pattern.rstrip("*") for pattern in patterns)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_files() -> dict[str, Path]:
    """The project's modules by name: `stack.plan` -> stack/plan.py."""
    files = (path for package in _packages() for path in (ROOT / package).rglob("*.py"))
    return {_module_name(path): path for path in sorted(files)}


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def imports_of(source: str, module: str, is_package: bool, path: str,
               known: Iterable[str] = ()) -> Iterator[Import]:
    """Every module the source imports, anywhere in it; `known` are the project's modules,
    so that `from pkg import name` counts `pkg.name` when that is a module."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield Import(path, node.lineno, target)
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    yield Import(path, node.lineno, f"{target}.{alias.name}")


@functools.cache
def _all_imports() -> tuple[tuple[str, Import], ...]:
    """(importing module, import) for every import in the project."""
    files = _project_files()
    found = []
    for module, path in files.items():
        relative = str(path.relative_to(ROOT))
        for imp in imports_of(path.read_text(), module, path.name == "__init__.py", relative,
                              files):
            found.append((module, imp))
    return tuple(found)


def _standalone_violations() -> list[Import]:
    return [imp for importer, imp in _all_imports()
            for package, forbidden in STANDALONE.items()
            if _within(importer, [package]) and _within(imp.module, forbidden)]


def _pure_core_violations() -> list[Import]:
    return [imp for importer, imp in _all_imports()
            if _within(importer, PURE_CORE) and not _within(importer, IO_MODULES)
            and _within(imp.module, IO_MODULES)]


def _new(violations: Iterable[Import]) -> list[str]:
    return sorted({str(imp) for imp in violations
                   if (imp.path, imp.module) not in KNOWN_VIOLATIONS})


def test_agent_and_router_import_nothing_of_the_controller_or_each_other() -> None:
    new = _new(_standalone_violations())
    assert not new, ("the agent and the router stand alone (no `stack`, `deploys`, nor each "
                     "other), but:\n  " + "\n  ".join(new))


def test_the_pure_core_imports_no_module_that_does_io() -> None:
    new = _new(_pure_core_violations())
    assert not new, ("the pure core (config, spec, selector, tomlpos, estimate, schedule, plan, "
                     "changes, render, placement) does no I/O, but:\n  " + "\n  ".join(new))


def test_every_known_violation_still_exists() -> None:
    found = {(imp.path, imp.module)
             for imp in _standalone_violations() + _pure_core_violations()}
    gone = sorted(KNOWN_VIOLATIONS - found)
    assert not gone, ("fixed, remove from KNOWN_VIOLATIONS in tests/test_imports.py: "
                      + ", ".join(f"{path} -> {module}" for path, module in gone))


@pytest.mark.parametrize(("source", "expected"), [
    ("def f():\n    import subprocess\n", ["subprocess"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stack.lock import Lock\n",
     ["typing", "stack.lock"]),
    ("from . import remote\n", ["stack.estimate", "stack.estimate.remote"]),
    ("from ..observe import observe\n", ["stack.observe"]),
    ("from stack import sshtcp, spec\n", ["stack", "stack.sshtcp", "stack.spec"]),
])
def test_lazy_relative_and_from_package_imports_are_seen(
        source: str, expected: list[str]) -> None:
    known = {"stack.estimate.remote", "stack.sshtcp", "stack.spec"}
    found = imports_of(source, "stack.estimate.memory", False, "stack/estimate/memory.py",
                       known)
    assert [imp.module for imp in found] == expected


# --------------------------------------------------------------------------- the host bundle

# the controller's dependencies that hosts must never need (stack/wheelhouse.py leaves them
# out of the agent bundle)
CONTROLLER_ONLY = ("pyinfra", "gevent", "rich", "jinja2", "tomlkit", "gguf", "paramiko",
                   "numpy")
# extras beside `host` that a stack may add to its hosts (stack.wheelhouse.SOURCE_EXTRAS)
HOST_EXTRAS = ("host", "modelscope")


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _installed_closure(requirements: Iterable[str]) -> set[str]:
    """The distributions `requirements` pull in here (markers of this machine; extras of
    theirs left out), by normalized name."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            continue
    return seen


def _third_party_imports(package: str) -> list[Import]:
    import sys

    own = set(_packages())
    return [imp for importer, imp in _all_imports()
            if _within(importer, [package])
            and imp.module.split(".")[0] not in (*sys.stdlib_module_names, *own, "")]


@pytest.mark.parametrize("package", ["agent", "router"])
def test_the_agent_and_router_import_only_what_the_host_extra_installs(package: str) -> None:
    from importlib import metadata

    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    closure = _installed_closure(r for extra in HOST_EXTRAS for r in optional[extra])
    found = metadata.packages_distributions()

    def dists(imp: Import) -> list[str]:  # a module not installed here: named as its dist
        top = imp.module.split(".")[0]
        return [d.lower().replace("_", "-") for d in found.get(top, [top])]

    outside = sorted({f"{imp} (from {', '.join(dists(imp))})"
                      for imp in _third_party_imports(package) if not set(dists(imp)) & closure})
    assert not outside, ("hosts install only the `host` extra of pyproject.toml (and "
                         "`modelscope`), but:\n  " + "\n  ".join(outside))
    assert not closure & set(CONTROLLER_ONLY), "a host requirement pulls in the controller's: " \
        + ", ".join(sorted(closure & set(CONTROLLER_ONLY)))


def test_the_host_extra_is_a_part_of_the_controllers_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    host = project["optional-dependencies"]["host"]
    assert set(host) <= set(project["dependencies"]), (
        "keep each `host` requirement equal to the one in `dependencies`: "
        + ", ".join(sorted(set(host) - set(project["dependencies"]))))
    assert not {_name(r) for r in host} & set(CONTROLLER_ONLY)
