"""References between sections of stack.toml: names, pins, aliases, runtimes, the router's
listen address, keys."""

from __future__ import annotations

import fnmatch
import re

from agent.mindie_config import MODEL_NAME as MINDIE_MODEL_NAME
from router.config import is_loopback, parse_listen
from stack.config.messages import NAME_HINT
from stack.config.report import Loc, Report, dotted, show, suggest
from stack.selector import SelectorError, parse_selector
from stack.spec import (
    NAME_PATTERN,
    NVIDIA_BRANCH,
    NVIDIA_FULL_VERSION,
    ROCM_RELEASE,
    RuntimeSpec,
    StackSpec,
)
from stack.tomlpos import locate

NAME = re.compile(NAME_PATTERN)
SOURCE_SCHEMES = ("hf://", "modelscope://", "local://")
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")



def reference_problems(spec: StackSpec, report: Report) -> None:
    _check_names(spec, report)
    _check_models(spec, report)
    _check_api_names(spec, report)
    _check_runtimes(spec, report)
    _check_router(spec, report)
    _check_keys(spec, report)
    low, high = spec.stack.port_range
    if low > high:
        report.add(("stack", "port_range"), f"`stack.port_range` starts at {low} but ends at "
                   f"{high}", "write the lower port first, e.g. `port_range = [40000, 40999]`.")
    _check_drivers(spec, report)
    interval, window = spec.monitoring.scrape_interval_seconds, spec.monitoring.rate_window_seconds
    if interval is not None and window < 4 * interval:
        report.add(("monitoring", "rate_window_seconds"), f"`monitoring.rate_window_seconds` "
                   f"is {window} s, shorter than 4 scrape intervals of {interval} s",
                   "a rate needs several samples: set `rate_window_seconds` to at least "
                   f"{4 * interval}, or a shorter `scrape_interval_seconds`.")
    if spec.stack.inventory is not None and spec.hosts:
        report.add(("stack", "inventory"), "`stack.inventory` and `[hosts]` both list hosts",
                   "keep one: the inventory file or the inline `[hosts.NAME]` tables.")


def _check_names(spec: StackSpec, report: Report) -> None:
    sections = (("hosts", spec.hosts), ("models", spec.models), ("runtimes", spec.runtimes))
    for section, names in sections:
        for name in names:
            if not NAME.match(name):
                report.add((section, name), f"`{dotted((section, name))}` is not a valid "
                           f"{section[:-1]} name", NAME_HINT, at_key=True)


def _check_models(spec: StackSpec, report: Report) -> None:
    for name, model in spec.models.items():
        base: Loc = ("models", name)
        if not _valid_source(model.source):
            report.add((*base, "source"), f"`{dotted((*base, 'source'))}` is not a model "
                       f"source: {show(model.source)}",
                       'write `hf://ORG/NAME`, `modelscope://ORG/NAME`, `local://models/x.gguf` '
                       '(beside stack.toml) or an absolute path on the hosts, without spaces '
                       'or `..`.')
        try:
            parse_selector(model.selector)
        except SelectorError as exc:
            report.add((*base, "selector", exc.index),
                       f"`{dotted((*base, 'selector', exc.index))}`: {exc}", exc.hint)
        if model.pin is not None:
            _check_pin(spec, base, model.pin.node, model.pin.gpus, model.gpus_per_replica,
                       report)
        if model.backend == "mindie" and not MINDIE_MODEL_NAME.match(name):
            report.add(base, f"`{dotted(base)}` cannot be served by MindIE, which refuses "
                       f"it as `modelName`", "MindIE takes letters, digits, `.`, `_` and "
                       "`-`, not first or last: rename the model.", at_key=True)


def _valid_source(source: str) -> bool:
    """A source the agent can fetch into, or read from, a path it builds: hub repositories
    are `ORG/NAME` of plain names, and no path has a `.` or `..` folder in it."""
    if any(c.isspace() for c in source):
        return False
    for scheme in ("hf://", "modelscope://"):
        if source.startswith(scheme):
            repo = source[len(scheme):].split("@", 1)[0].split("/")
            return (len(repo) >= 2 and all(_REPO_PART.match(part) for part in repo[:2])
                    and _plain(repo[2:]))
    if source.startswith("local://"):
        return len(source) > len("local://")
    return source.startswith("/") and _plain(source.split("/"))


def _plain(parts: list[str]) -> bool:
    return not any(part in (".", "..") for part in parts)


def _check_pin(spec: StackSpec, base: Loc, node: str, gpus: list[int],
               per_replica: int | str, report: Report) -> None:
    if spec.hosts and node not in spec.hosts:
        guess = suggest(node, list(spec.hosts))
        report.add((*base, "pin", "node"), f"`{dotted((*base, 'pin', 'node'))}` names "
                   f"`{node}`, which is not in `[hosts]`",
                   f"did you mean `{guess}`?" if guess else
                   "pin to one of: " + ", ".join(f"`{h}`" for h in spec.hosts) + ".")
    if gpus and isinstance(per_replica, int) and len(gpus) != per_replica:
        count = f"{len(gpus)} GPU" + ("s" if len(gpus) != 1 else "")
        report.add((*base, "pin", "gpus"), f"`{dotted((*base, 'pin', 'gpus'))}` lists "
                   f"{count} but `gpus_per_replica` is {per_replica}",
                   "list as many GPUs as each replica uses, or drop `gpus_per_replica`.")
    if len(set(gpus)) != len(gpus) or any(g < 0 for g in gpus):
        report.add((*base, "pin", "gpus"), f"`{dotted((*base, 'pin', 'gpus'))}` must list "
                   "distinct GPU indices", "e.g. `gpus = [0, 1]`.")


def check_pins_against(spec: StackSpec, hosts: list[str], text: str = "",
                       filename: str = "stack.toml") -> None:
    """Pins name hosts of the inventory file (only known once it is loaded: `stack plan`);
    `text`, the stack file's, places the error on its line."""
    report = Report(filename, locate(text))
    for name, model in spec.models.items():
        if model.pin is None or model.pin.node in hosts:
            continue
        guess = suggest(model.pin.node, hosts)
        path: Loc = ("models", name, "pin", "node")
        report.add(path, f"`{dotted(path)}` names `{model.pin.node}`, which is not a host of "
                   f"the inventory file `{spec.stack.inventory}`",
                   f"did you mean `{guess}`?" if guess else
                   "pin to one of: " + ", ".join(f"`{h}`" for h in hosts) + ".")
    problems = report.sorted()
    if problems:
        raise problems[0]


def _check_api_names(spec: StackSpec, report: Report) -> None:
    """Each name a client may send (model names and aliases) leads to one model."""
    owner: dict[str, str] = {name: name for name in spec.models}
    for name, model in spec.models.items():
        for index, alias in enumerate(model.aliases):
            path: Loc = ("models", name, "aliases", index)
            if not alias.strip() or any(c.isspace() for c in alias):
                report.add(path, f"`{dotted(path)}` must be a name without spaces, got "
                           f"{show(alias)}", "e.g. `aliases = [\"gpt-4o-mini\"]`.")
                continue
            if alias in owner and alias != name:
                what = ("the name of a model" if alias in spec.models
                        else f"an alias of `{owner[alias]}`")
                report.add(path, f"`{dotted(path)}` is `{alias}`, already {what}",
                           "each name in the API must lead to one model: rename or remove "
                           "one of them.")
                continue
            owner[alias] = name


def _check_runtimes(spec: StackSpec, report: Report) -> None:
    from stack.catalog import catalogue
    from stack.spec import BACKENDS

    for name, runtime in spec.runtimes.items():
        if runtime.backend is None and name not in BACKENDS:
            guess = suggest(name, list(BACKENDS))
            report.add(("runtimes", name), f"`{dotted(('runtimes', name))}` is not a backend "
                       "name and has no `backend`",
                       (f'did you mean `[runtimes."{guess}"]`? Otherwise set ' if guess
                        else "set ") + "`backend` to one of: "
                       + ", ".join(f"`{b}`" for b in BACKENDS) + ".", at_key=True)
        if runtime.source is None and name not in catalogue():
            report.add(("runtimes", name), f"`{dotted(('runtimes', name))}` has no "
                       "`source`, and the runtime catalogue has no recipe named "
                       f"`{name}`", "set `source` (and what it needs), or name the "
                       "table after a catalogue runtime: "
                       + ", ".join(f"`{n}`" for n in catalogue()) + ".", at_key=True)
        needs = {"pip": "package", "archive": "url", "build": "url", "system": "path"}
        field = needs.get(runtime.source or "", "")
        if field == "url" and runtime.package is not None:
            field = "package"  # the archive is that package's sdist
        if field and getattr(runtime, field) is None:
            report.add(("runtimes", name, "source"), f"`{dotted(('runtimes', name))}` has "
                       f"`source = \"{runtime.source}\"` but no `{field}`",
                       f"add `{field} = ...`: "
                       f"{type(runtime).model_fields[field].description}"
                       + (" Or name the package whose sdist is the archive: "
                          "`package = \"NAME=={version}\"`." if field == "url" else ""))
        _check_variants(name, runtime, report)
        for version in runtime.sha256:
            if version not in runtime.versions:
                path: Loc = ("runtimes", name, "sha256", version)
                report.add(path, f"`{dotted(path)}` is for version `{version}`, which "
                           f"`{dotted(('runtimes', name, 'versions'))}` does not list",
                           "add the version to `versions`, or remove its sha256.", at_key=True)
    versions: dict[str, set[str]] = {}
    for name, runtime in spec.runtimes.items():
        versions.setdefault(runtime.backend or name, set()).update(runtime.versions)
    for name, model in spec.models.items():
        if model.backend and model.backend_version and model.backend in versions \
                and model.backend_version not in versions[model.backend]:
            at: Loc = ("models", name, "backend_version")
            report.add(at, f"`{dotted(at)}` is `{model.backend_version}`, which no "
                       f"`[runtimes]` table of `{model.backend}` installs",
                       "add it to that runtime's `versions`, or use one of: "
                       + ", ".join(f"`{v}`" for v in sorted(versions[model.backend])) + ".")


def _check_variants(name: str, runtime: RuntimeSpec, report: Report) -> None:
    """`[runtimes.NAME] variant`: a catalogue variant that takes that vendor's nodes."""
    from stack.catalog import catalogue, variant_refusal

    for vendor, choice in runtime.variant.items():
        path: Loc = ("runtimes", name, "variant", vendor)
        if runtime.source is not None or name not in catalogue():
            report.add(path, f"`{dotted(path)}` picks a variant of the runtime catalogue's "
                       f"recipe, but `{dotted(('runtimes', name))}` has its own `source`",
                       "remove `variant`, or remove `source` to install from the catalogue.",
                       at_key=True)
            continue
        why = variant_refusal(name, vendor, choice)
        if why is not None:
            takers = [v for v, entry in catalogue()[name].variants.items()
                      if vendor in (*entry.vendors, *entry.chosen_by)]
            report.add(path, f"`{dotted(path)}` is `{choice}`: {why}",
                       f"use one of: {', '.join(f'`{t}`' for t in takers)}, or remove it."
                       if takers else "remove it.")


def _check_drivers(spec: StackSpec, report: Report) -> None:
    """A driver version as its vendor writes it: NVIDIA's branch, AMD's ROCm release."""
    for pattern, node in spec.nodes.items():
        for vendor, driver in node.drivers.items():
            version = driver.version
            path: Loc = ("nodes", pattern, "drivers", vendor, "version")
            if version is None:
                continue
            if vendor == "nvidia" and not NVIDIA_BRANCH.match(version):
                full = NVIDIA_FULL_VERSION.match(version)
                report.add(path, f"`{dotted(path)}` must be an NVIDIA driver branch (three "
                           f"digits), got {show(version)}",
                           f'write its branch, `version = "{full.group(1)}"`: apply installs '
                           "the newest driver of the branch and holds it." if full else
                           'name the branch to install and hold, e.g. `version = "580"` '
                           "(`nvidia-smi` shows 580.95.05 for it); without `version` the "
                           "driver is only verified.")
            if vendor == "amd" and not ROCM_RELEASE.match(version):
                report.add(path, f"`{dotted(path)}` must be a ROCm release such as `6.4.1`, "
                           f"got {show(version)}",
                           "write the release as repo.radeon.com/amdgpu-install/ names its "
                           'folder, e.g. `version = "6.4.1"`, or `"7.0"` for 7.0.0.')


def _check_router(spec: StackSpec, report: Report) -> None:
    router = spec.router
    _check_listen(spec, report)
    if (router.tls_cert is None) != (router.tls_key is None):
        missing = "tls_key" if router.tls_key is None else "tls_cert"
        report.add(("router",), "`router` has only one of `tls_cert` and `tls_key`",
                   f"add `{missing}`, or remove both to serve plain HTTP.", at_key=True)
    if spec.hosts:
        for index, pattern in enumerate(router.hosts):
            if not any(fnmatch.fnmatchcase(h, pattern) for h in spec.hosts):
                guess = suggest(pattern, list(spec.hosts))
                path: Loc = ("router", "hosts", index)
                report.add(path, f"`{dotted(path)}` is `{pattern}`, which matches no host "
                           "in `[hosts]`", f"did you mean `{guess}`?" if guess else
                           "hosts are: " + ", ".join(f"`{h}`" for h in spec.hosts) + ".")


def _check_listen(spec: StackSpec, report: Report) -> None:
    """`router.listen` in the router's own grammar (router.config), so the router.json
    that `stack apply` writes from it is one the router accepts."""
    listen = spec.router.listen
    try:
        host, port = parse_listen(listen)
        if port == 0:  # any free port: fine for testing the router alone, not for a fleet
            raise ValueError("port 0 means any free port, and clients need to know it")
    except ValueError as exc:
        report.add(("router", "listen"), f"`router.listen` must be HOST:PORT, got "
                   f"{show(listen)}: {exc}", 'e.g. `listen = "127.0.0.1:8080"`.')
        return
    if not spec.keys and not is_loopback(host):
        report.add(("router", "listen"), f"`router.listen` is `{listen}`, not a "
                   "loopback address, and stack.toml has no `[[keys]]`",
                   "create a key with `stack keys create NAME` so that only key holders "
                   f'can call the models, or listen on `"127.0.0.1:{port}"`.')


def _check_keys(spec: StackSpec, report: Report) -> None:
    names: set[str] = set()
    hashes: set[str] = set()
    api_names = set(spec.models) | {a for m in spec.models.values() for a in m.aliases}
    for index, key in enumerate(spec.keys):
        if key.name in names:
            report.add(("keys", index, "name"), f"`keys[{index}].name`: two keys are named "
                       f"`{key.name}`", "key names must be unique: rename one, or "
                       f"`stack keys revoke {key.name}`.")
        if key.hash in hashes:
            report.add(("keys", index, "hash"), f"`keys[{index}].hash` is the same as an "
                       "earlier key's", "remove the copy; a key must have one name.")
        names.add(key.name)
        hashes.add(key.hash)
        _check_models_listed(("keys", index, "models"), key.models, api_names, report)
        if key.user is not None and key.user not in spec.users:
            guess = suggest(key.user, sorted(spec.users))
            report.add(("keys", index, "user"), f"`keys[{index}].user` is `{key.user}`, "
                       "which is not a `[users.NAME]` table",
                       f"did you mean `{guess}`?" if guess else
                       f"add `[users.{key.user}]` (its models and quotas), or remove `user`.")
    for name, user in spec.users.items():
        _check_models_listed(("users", name, "models"), user.models, api_names, report)


def _check_models_listed(base: Loc, models: list[str], api_names: set[str],
                         report: Report) -> None:
    for m_index, model in enumerate(models):
        if model not in api_names:
            path: Loc = (*base, m_index)
            guess = suggest(model, sorted(api_names))
            report.add(path, f"`{dotted(path)}` is `{model}`, which is not a model",
                       f"did you mean `{guess}`?" if guess else
                       "list model names or aliases from `[models]`.")
