"""The runtime catalogue: every recipe resolves, covers the vendors its backend runs on,
and installs with exactly the commands in `cases/` (one per backend and accelerator: the
GPU recipes cannot be built here, so their commands are what is checked).
`STACK_UPDATE_GOLDEN=1` rewrites the cases; review the diff before committing it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deploys.runtimes import RuntimeInstall, install_script
from stack.catalog import (
    Recipe,
    catalogue,
    default_version,
    listed_folders,
    parse_folder,
    prebuilt_on_controller,
    recipe,
)
from stack.config import load_text
from stack.estimate.compat import SUPPORT
from stack.schedule.runtimes import choose_runtime, runtime_refusal

CASES = Path(__file__).parent / "cases"
TWO_LINES = """[stack]
name = "lab"

[models.qwen]
source = "hf://Qwen/Qwen2.5-7B-Instruct"
backend = "vllm"
"""
VARIANTS = [(name, variant) for name, entry in catalogue().items() for variant in entry.variants]
# vendors a backend runs on (stack.estimate.compat) that the catalogue has no recipe for:
# Hygon's vLLM builds come from Hygon's own index, not from PyPI
NOT_IN_CATALOGUE = {"vllm": {"hygon"}}


def test_every_vendor_a_backend_runs_on_has_a_recipe_and_no_recipe_is_for_others() -> None:
    for name, entry in catalogue().items():
        have = {v for variant in entry.variants.values() for v in variant.vendors}
        assert SUPPORT[name].vendors - have == NOT_IN_CATALOGUE.get(name, set()), name
        chosen = {v for variant in entry.variants.values() for v in variant.chosen_by}
        assert have | chosen <= SUPPORT[name].vendors, name
        for variant, v in entry.variants.items():
            assert v.vendors or v.chosen_by, f"{name} {variant} is for no vendor"


def test_a_vendor_has_one_variant_per_backend() -> None:
    for name, entry in catalogue().items():
        vendors = [v for variant in entry.variants.values() for v in variant.vendors]
        assert len(vendors) == len(set(vendors)), name


@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_install_commands_per_accelerator(name: str, variant: str) -> None:
    entry = catalogue()[name].variants[variant]
    vendor = (entry.vendors or entry.chosen_by)[0]
    version = default_version(name, vendor)
    assert version is not None
    # a variant no vendor defaults to is picked in stack.toml
    spec = load_text(TWO_LINES + (f'\n[runtimes."{name}"]\nversions = ["{version}"]\n'
                                  f'variant = {{ {vendor} = "{variant}" }}\n'
                                  if not entry.vendors else ""))
    assert version is not None
    found = recipe(spec, name, version, vendor)
    assert isinstance(found, Recipe), found
    assert found.folder == f"{version}-{variant}"
    assert parse_folder(spec, name, found.folder) == (version, variant)
    sha256 = found.spec.sha256.get(version)
    install = RuntimeInstall(name, version, found.spec, "/opt/stack", sha256=sha256,
                             upload=f"/opt/stack/runtimes/.uploads/{name}-{found.folder}"
                             if found.spec.source == "build" else None, variant=variant)
    got = install_script(install).splitlines()
    case = CASES / f"{name}-{variant}.json"
    if os.environ.get("STACK_UPDATE_GOLDEN"):
        case.parent.mkdir(exist_ok=True)
        case.write_text(json.dumps({"vendor": vendor, "version": version, "script": got},
                                   indent=2) + "\n")
    assert got == json.loads(case.read_text())["script"]


def test_the_docs_two_line_vllm_model_gets_the_catalogue_default() -> None:
    spec = load_text(TWO_LINES)
    assert choose_runtime(spec, "vllm", None) == ("vllm", catalogue()["vllm"].default)
    assert choose_runtime(spec, "vllm", "0.30.0") == ("vllm", "0.30.0")  # any version pinned
    assert runtime_refusal(spec, ("vllm", "0.33.0"), "nvidia") is None
    why = runtime_refusal(spec, ("vllm", "0.33.0"), "hygon")
    assert why is not None and "no vllm build for hygon devices" in why


def test_vendors_lagging_behind_get_their_own_default() -> None:
    # vLLM's ROCm wheels end at 0.18.0 (rocm700); CUDA follows PyPI
    assert default_version("vllm", "amd") == "0.18.0"
    assert default_version("vllm", "nvidia") == catalogue()["vllm"].default


def test_a_runtimes_table_without_source_pins_versions_of_the_catalogue_recipe() -> None:
    spec = load_text(TWO_LINES + '\n[runtimes.vllm]\nversions = ["0.30.0"]\n')
    assert choose_runtime(spec, "vllm", None) == ("vllm", "0.30.0")
    found = recipe(spec, "vllm", "0.30.0", "amd")
    assert isinstance(found, Recipe) and found.folder == "0.30.0-rocm"
    assert listed_folders(spec)["vllm"] == ["0.30.0-cuda", "0.30.0-rocm", "0.30.0-ascend"]


def test_a_runtimes_table_with_source_is_one_recipe_everywhere() -> None:
    spec = load_text(TWO_LINES + '\n[runtimes.vllm]\nversions = ["0.11.0"]\nsource = "pip"\n'
                     'package = "vllm=={version}"\n')
    for vendor in ("nvidia", "amd"):
        found = recipe(spec, "vllm", "0.11.0", vendor)
        assert isinstance(found, Recipe) and (found.folder, found.variant) == ("0.11.0", "")
    assert runtime_refusal(spec, ("vllm", "0.11.0"), "hygon") is None  # the user's own call
    assert parse_folder(spec, "vllm", "0.11.0-cuda") == ("0.11.0-cuda", "")


@pytest.mark.parametrize(("name", "version", "script", "version_var"), [
    ("llama.cpp", "0.3.36", "setup-llama-cpp", "LLAMA_CPP_PYTHON_VERSION"),
    ("stable-diffusion.cpp", "0.4.7", "setup-sd-cpp", "SD_CPP_PYTHON_VERSION"),
])
def test_the_cpu_recipe_is_the_build_the_setup_script_makes(
    name: str, version: str, script: str, version_var: str,
) -> None:
    """So an apply of the default stack uploads the machine's own build (the suite's,
    the quickstart's) instead of building for 8 minutes on the host: the script's cmake
    args, targets, sdist and folder are the CPU recipe's (`stack.wheelhouse.SETUP_BUILDS`)."""
    from stack.wheelhouse import SETUP_BUILDS

    found = recipe(load_text(TWO_LINES), name, version, "cpu")
    assert isinstance(found, Recipe)
    [build] = [b for b in SETUP_BUILDS if b.folder == name]
    assert found.spec.package is not None
    dist = found.spec.package.split("==", 1)[0].replace("-", "_")
    assert build.sdist == f"{dist}-"
    assert (found.spec.subdir, tuple(found.spec.cmake_args), tuple(found.spec.targets)) == (
        build.subdir, build.args, build.targets)
    text = (Path(__file__).parents[2] / "scripts" / script).read_text()
    flat = " ".join(text.replace("\\\n", " ").split())
    assert " ".join(build.args) in flat
    assert "--target " + " ".join(build.targets) in flat
    assert f'version="${{{version_var}:-{version}}}"' in text
    assert f'/{build.subdir}"' in text and f'dest="$cache/{name}/$version"' in text
    assert catalogue()[name].default == version
    digest = found.spec.sha256.get(version)
    assert digest is None or f'"{digest}"' in text  # a pinned sdist is checked by the script


@pytest.mark.parametrize(("name", "version"), [("llama.cpp", "0.3.36"),
                                               ("stable-diffusion.cpp", "0.4.7")])
def test_the_setup_scripts_build_is_the_cpu_recipes_prebuilt_build_only(
    name: str, version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finished `scripts/setup-*` build in the cache (`CACHE/NAME/VERSION/bin`,
    `.complete`) is what apply uploads for the CPU recipe on a host of this OS and arch;
    never for a GPU variant (other cmake args), another OS or arch, or an unfinished build."""
    from stack.wheelhouse import platform_tag

    monkeypatch.setenv("MODELSTACK_CACHE", str(tmp_path))
    spec = load_text(TWO_LINES)
    cpu, gpu = recipe(spec, name, version, "cpu"), recipe(spec, name, version, "nvidia")
    assert isinstance(cpu, Recipe) and isinstance(gpu, Recipe)
    (tmp_path / name / version / "bin").mkdir(parents=True)
    assert not prebuilt_on_controller(cpu, platform_tag())  # no `.complete` yet
    (tmp_path / name / version / ".complete").touch()
    assert prebuilt_on_controller(cpu, platform_tag())
    assert not prebuilt_on_controller(cpu, "plan9-mips")
    assert not prebuilt_on_controller(gpu, platform_tag())
