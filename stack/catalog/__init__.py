"""The runtime catalogue (`runtimes.toml` beside this file): a recipe per backend and
accelerator, so a model needs no `[runtimes]` table.

- `recipe(spec, name, version, vendor)`: what one node installs for a runtime version whose
  replica uses `vendor` devices: the folder under `PREFIX/runtimes/NAME/` and the resolved
  recipe (a `RuntimeSpec` with `source` set), or why there is none.
- `parse_folder(spec, name, folder)`: (version, vendor-independent variant) back from a
  folder name, for apply's reading of an instance's runtime path.

A stack.toml recipe (`source` set) is one build on every node: its folder is the version.
A catalogue recipe (no `[runtimes]` table, or one without `source`) is per variant:
`VERSION-VARIANT`, e.g. `0.3.36-cuda`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from pydantic import Field

from deploys.runtimes import runtime_folder
from stack.spec import (
    EnvName,
    EnvValue,
    IndexUrl,
    Interpreter,
    Package,
    Requirement,
    RuntimeSpec,
    SitePath,
    StackSpec,
    VendorName,
    Version,
    _Strict,
)

# keys a variant adds to the common ones instead of replacing them
_ADDED = ("cmake_args", "requires", "requirements")


class Variant(_Strict):
    """One accelerator's recipe: what it adds to or changes in the backend's common one."""

    vendors: list[VendorName] = Field(min_length=1)
    default: Version | None = None
    package: Package | None = None
    extra_index_url: IndexUrl | None = None
    from_extra_index: list[Package] = Field(default_factory=list)
    remove_files: list[SitePath] = Field(default_factory=list)
    python: Interpreter | None = None
    requirements: list[Package] = Field(default_factory=list)
    cmake_args: list[str] = Field(default_factory=list)
    requires: list[Requirement] = Field(default_factory=list)
    build_env: dict[EnvName, EnvValue] = Field(default_factory=dict)


class Entry(RuntimeSpec):
    """One backend in the catalogue: a default version, the common recipe, the variants."""

    versions: list[Version] = Field(default_factory=list)
    source: Literal["pip", "archive", "build", "system"]
    default: Version
    variants: dict[str, Variant] = Field(min_length=1)


@cache
def catalogue() -> dict[str, Entry]:
    """The catalogue shipped with the package, checked once."""
    text = resources.files(__package__).joinpath("runtimes.toml").read_text()
    return {name: Entry.model_validate(table) for name, table in tomllib.loads(text).items()}


@dataclass(frozen=True)
class Recipe:
    """What one node installs: `folder` under `PREFIX/runtimes/NAME/` and how."""

    name: str
    version: str
    variant: str  # "" for a stack.toml recipe (one build everywhere)
    spec: RuntimeSpec

    @property
    def folder(self) -> str:
        return runtime_folder(self.version, self.variant)


def from_catalogue(spec: StackSpec, name: str) -> bool:
    """True when the runtime `name` installs from the catalogue's recipes."""
    table = spec.runtimes.get(name)
    return name in catalogue() and (table is None or table.source is None)


def variant_for(name: str, vendor: str) -> tuple[str, Variant] | None:
    """The catalogue's variant of runtime `name` for `vendor` devices (`cpu`: none)."""
    for variant, v in catalogue()[name].variants.items():
        if vendor in v.vendors:
            return variant, v
    return None


def default_version(name: str, vendor: str) -> str | None:
    """The catalogue's default version of `name` on `vendor` devices."""
    entry = catalogue().get(name)
    if entry is None:
        return None
    found = variant_for(name, vendor)
    return (found[1].default if found and found[1].default else None) or entry.default


def recipe(spec: StackSpec, name: str, version: str, vendor: str) -> Recipe | str:
    """What a node whose replica uses `vendor` devices installs for `name` `version`, or
    why the catalogue has nothing for it."""
    if not from_catalogue(spec, name):
        table = spec.runtimes.get(name)
        if table is None:
            return f"no `[runtimes]` entry named `{name}`"
        return Recipe(name, version, "", table)
    entry = catalogue()[name]
    found = variant_for(name, vendor)
    if found is None:
        return (f"the runtime catalogue has no {name} build for {vendor} devices "
                f"(it has {', '.join(sorted(entry.variants))}; a `[runtimes]` recipe with "
                "`source` can add one)")
    variant, v = found
    return Recipe(name, version, variant, _merged(entry, v, spec.runtimes.get(name), version))


def _merged(entry: Entry, variant: Variant, table: RuntimeSpec | None,
            version: str) -> RuntimeSpec:
    common: dict[str, Any] = entry.model_dump(exclude={"default", "variants", "versions"})
    for key, value in variant.model_dump(exclude={"vendors", "default"},
                                         exclude_unset=True).items():
        if key in _ADDED:
            common[key] = [*common.get(key, []), *value]
        elif key == "build_env":
            common[key] = {**common.get(key, {}), **value}
        else:
            common[key] = value
    if table is not None:  # a pinned table without `source` may still set env and sha256s
        common["env"] = {**common.get("env", {}), **table.env}
        common["sha256"] = {**common.get("sha256", {}), **table.sha256}
    common["versions"] = [version]
    return RuntimeSpec.model_validate(common)


def parse_folder(spec: StackSpec, name: str, folder: str) -> tuple[str, str] | None:
    """(version, variant) of a runtime folder this stack would make, or None."""
    if not from_catalogue(spec, name):
        return (folder, "") if name in spec.runtimes else None
    version, sep, variant = folder.rpartition("-")
    if not sep or variant not in catalogue()[name].variants:
        return None
    return version, variant


def vendor_of(name: str, variant: str) -> str:
    """A vendor a catalogue variant serves (what `recipe` is called with again)."""
    return catalogue()[name].variants[variant].vendors[0]


def recipe_of_folder(spec: StackSpec, name: str, folder: str) -> Recipe | None:
    """The recipe that makes `PREFIX/runtimes/NAME/FOLDER` for this stack, or None."""
    parsed = parse_folder(spec, name, folder) if folder else None
    if parsed is None:
        return None
    version, variant = parsed
    found = recipe(spec, name, version, vendor_of(name, variant) if variant else "cpu")
    return found if isinstance(found, Recipe) else None


def folder(spec: StackSpec, name: str, version: str, vendor: str) -> str:
    """The folder under `PREFIX/runtimes/NAME/` a node using `vendor` devices runs
    `name` `version` from."""
    found = recipe(spec, name, version, vendor)
    return found.folder if isinstance(found, Recipe) else version


def listed_folders(spec: StackSpec) -> dict[str, list[str]]:
    """Per `[runtimes]` table, the folders its versions make (every variant of a
    catalogue recipe): what apply keeps on a host even when no replica uses it."""
    out: dict[str, list[str]] = {}
    for name, table in spec.runtimes.items():
        if from_catalogue(spec, name):
            out[name] = [runtime_folder(v, variant) for v in table.versions
                         for variant in catalogue()[name].variants]
        else:
            out[name] = list(table.versions)
    return out


def prebuilt_on_controller(found: Recipe, platform: str) -> bool:
    """True when apply will upload a finished controller build for this `build` recipe
    (`stack.wheelhouse.prebuilt_bin`) instead of building on the host: known without
    fetching when the recipe pins the archive's sha256."""
    from pathlib import Path

    from stack.wheelhouse import prebuilt_bin

    rt = found.spec
    digest = rt.sha256.get(found.version)
    if rt.source != "build" or not digest:
        return False
    if rt.url:
        name = rt.url.replace("{version}", found.version).rsplit("/", 1)[-1]
    elif rt.package:
        dist = rt.package.split("==", 1)[0].split("[", 1)[0]
        name = f"{dist.replace('-', '_').lower()}-{found.version}.tar.gz"
    else:
        return False
    return prebuilt_bin(Path(name), digest, rt.cmake_args, rt.targets, rt.subdir,
                        platform) is not None

