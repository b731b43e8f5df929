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

from deploys.runtimes import recipe_digest, runtime_folder
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

    vendors: list[VendorName] = Field(default_factory=list)  # whose default it is
    # vendors whose nodes take it when `[runtimes.NAME] variant` names it for them
    chosen_by: list[VendorName] = Field(default_factory=list)
    # the variable that picks its devices, set beside the vendor's (Vulkan's own numbering)
    device_env: EnvName | None = None
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
    device_env: str = ""  # the variant's own devices variable (`Variant.device_env`)

    @property
    def folder(self) -> str:
        return runtime_folder(self.version, self.variant)

    @property
    def digest(self) -> str:
        """What the folder's marker records (`deploys.runtimes.recipe_digest`)."""
        return recipe_digest(self.spec, self.version, self.variant)


def from_catalogue(spec: StackSpec, name: str) -> bool:
    """True when the runtime `name` installs from the catalogue's recipes."""
    table = spec.runtimes.get(name)
    return name in catalogue() and (table is None or table.source is None)


def variant_for(name: str, vendor: str) -> tuple[str, Variant] | None:
    """The catalogue's default variant of runtime `name` for `vendor` devices (`cpu`: none)."""
    for variant, v in catalogue()[name].variants.items():
        if vendor in v.vendors:
            return variant, v
    return None


def variant_refusal(name: str, vendor: str, variant: str) -> str | None:
    """Why `[runtimes.NAME] variant` cannot give `vendor` nodes `variant`, or None."""
    entry = catalogue()[name]
    found = entry.variants.get(variant)
    if found is None:
        return (f"the runtime catalogue has no {name} variant `{variant}` (it has "
                f"{', '.join(sorted(entry.variants))})")
    if vendor not in (*found.vendors, *found.chosen_by):
        takers = ", ".join([*found.vendors, *found.chosen_by])
        return f"{name}'s `{variant}` variant is for {takers} devices, not {vendor}"
    return None


def _chosen(spec: StackSpec, name: str, vendor: str) -> tuple[str, Variant] | None:
    """The variant `vendor` nodes get: the one `[runtimes.NAME] variant` names for them
    (checked by stack.config), else the catalogue's default for them."""
    table = spec.runtimes.get(name)
    choice = next((v for k, v in table.variant.items() if k == vendor), None) \
        if table is not None else None
    if choice is not None and variant_refusal(name, vendor, choice) is None:
        return choice, catalogue()[name].variants[choice]
    return variant_for(name, vendor)


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
    found = _chosen(spec, name, vendor)
    if found is None:
        return (f"the runtime catalogue has no {name} build for {vendor} devices "
                f"(it has {', '.join(sorted(entry.variants))}; a `[runtimes]` recipe with "
                "`source` can add one)")
    return _catalogue_recipe(spec, name, version, found[0])


def _catalogue_recipe(spec: StackSpec, name: str, version: str, variant: str) -> Recipe:
    entry = catalogue()[name]
    chosen = entry.variants[variant]
    return Recipe(name, version, variant, _merged(entry, chosen, spec.runtimes.get(name),
                                                  version), chosen.device_env or "")


def _merged(entry: Entry, variant: Variant, table: RuntimeSpec | None,
            version: str) -> RuntimeSpec:
    common: dict[str, Any] = entry.model_dump(
        exclude={"default", "variants", "variant", "versions"})
    for key, value in variant.model_dump(exclude={"vendors", "chosen_by", "default", "device_env"},
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


def recipe_of_folder(spec: StackSpec, name: str, folder: str) -> Recipe | None:
    """The recipe that makes `PREFIX/runtimes/NAME/FOLDER` for this stack, or None."""
    parsed = parse_folder(spec, name, folder) if folder else None
    if parsed is None:
        return None
    version, variant = parsed
    if not variant:
        found = recipe(spec, name, version, "cpu")
        return found if isinstance(found, Recipe) else None
    return _catalogue_recipe(spec, name, version, variant)


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

