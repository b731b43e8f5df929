"""The one fact `stack` reads from every host, and the pure parsing of what it returns.

`HostFacts` runs deploys/facts.sh (one SSH round trip; pyinfra 3 does not cache facts, so
it is gathered once per host) and returns its JSON as a dict. `node_facts_from(raw)` turns
that dict into a `NodeFacts`, parsing each vendor tool's output with `agent.gpus`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase

from agent.gpus import PCI_VENDORS, TOOLS, TOOLS_BY_NAME, GpuInfo, GpuToolError, parse_hccn_conf
from deploys.runtimes import is_folder_name
from stack.snapshot import AgentFacts, GpuFacts, InstanceFacts, NodeFacts
from stack.spec import NAME_PATTERN, PREFIX_PATTERN

SCRIPT = Path(__file__).with_name("facts.sh")
_DIGEST = re.compile(r"^[0-9a-f]{16}$")  # a runtime recipe's (deploys.runtimes.recipe_digest)


@cache
def facts_script() -> str:
    """The text of deploys/facts.sh."""
    return SCRIPT.read_text()


@cache
def _script_body() -> str:
    # what is sent: the script without its comment-only and blank lines (it has no here-docs
    # or multi-line strings holding such lines)
    lines = facts_script().splitlines()
    return "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("#"))


def facts_command(prefix: str, *, agent_only: bool = False) -> str:
    """The shell command that prints a host's facts JSON (the prefix is quoted).

    The script runs in the `sh -c` that pyinfra wraps every command in (under `sudo` when
    asked), with `STACK_PREFIX` set first: no second shell is started for it. With
    `agent_only`, it prints only `agent_status` (read it with `agent_status_body`).
    """
    mode = "STACK_FACTS=agent\n" if agent_only else ""
    return f"{mode}STACK_PREFIX={shlex.quote(prefix)}\n{_script_body()}\n"


class HostFacts(FactBase[dict[str, Any]]):
    """Everything about a host in one JSON object (see deploys/facts.sh)."""

    def command(self, prefix: str = "/opt/stack") -> str:
        return facts_command(prefix)

    @staticmethod
    def default() -> dict[str, Any]:
        return {}

    def process(self, output: list[str]) -> dict[str, Any]:
        return parse_facts_output("\n".join(output))


def parse_facts_output(text: str) -> dict[str, Any]:
    """The facts script's JSON (anything printed before it, like a login banner, skipped)."""
    start = text.find("{")
    try:
        data = json.loads(text[start:] if start >= 0 else text)
    except json.JSONDecodeError as exc:
        raise FactProcessError(f"the facts script printed no JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FactProcessError("the facts script printed no JSON object")
    return data


def decode_output(entry: dict[str, Any]) -> str:
    """The text a tool printed, from the script's `{"enc", "out"}` encoding."""
    raw = str(entry.get("out", ""))
    try:
        data = bytes.fromhex(raw) if entry.get("enc") == "hex" else base64.b64decode(raw)
    except (ValueError, binascii.Error):
        return ""
    return data.decode("utf-8", errors="replace")


def _gpus_from_tools(raw: dict[str, Any], problems: list[dict[str, str]]) -> list[GpuInfo]:
    tools: dict[str, Any] = raw.get("tools") or {}
    gpus: list[GpuInfo] = []
    for tool in TOOLS:
        entry = tools.get(tool.name)
        if not isinstance(entry, dict):
            continue
        output = decode_output(entry)
        try:
            found = tool.parse(output)
        except GpuToolError as err:
            problems.append({"tool": err.tool, "status": str(err.status),
                             "message": err.message, "hint": err.hint})
            continue
        except (ValueError, KeyError, TypeError) as err:
            problems.append({"tool": tool.name, "status": "unparsable",
                             "message": f"cannot read its output ({err})",
                             "hint": f"run `{' '.join(tool.command)}` on the host by hand."})
            continue
        if not found and entry.get("rc", 0) != 0:
            problems.append({"tool": tool.name, "status": "failed",
                             "message": f"exit status {entry.get('rc')}: {output.strip()[:200]}",
                             "hint": f"run `{' '.join(tool.command)}` on the host by hand."})
        gpus.extend(found)
    return gpus


def _pci_accelerators(raw: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in raw.get("pci") or []:
        vendor = PCI_VENDORS.get(str(entry).split(":")[0].lower())
        if vendor:
            counts[vendor] = counts.get(vendor, 0) + 1
    return counts


def agent_status_body(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The agent's status JSON (its status file, or `stack-agent status --json`) from the
    script's output; None without an agent or when it could not be read."""
    status = raw.get("agent_status")
    if not isinstance(status, dict) or status.get("rc") != 0:
        return None
    try:
        data = json.loads(decode_output(status))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _agent(raw: dict[str, Any]) -> AgentFacts:
    version = raw.get("agent_version") or None
    data = agent_status_body(raw)
    if data is None:
        return AgentFacts(version=version, running=False)
    instances = []
    for item in data.get("instances") or []:
        try:
            instances.append(InstanceFacts.model_validate(item))
        except ValueError:
            continue
    running = bool(data.get("running", True))
    # the installed marker holds the full bundle version (`0.1.0+<source hash>`) that
    # plan compares; the running agent only knows its package version
    return AgentFacts(version=version or data.get("version"), running=running,
                      instances=instances)


def _runtimes(raw: dict[str, Any]) -> dict[str, list[str]]:
    runtimes: dict[str, list[str]] = {}
    for item in raw.get("runtimes") or []:
        name, _, version = str(item).partition("/")
        if name and version:
            runtimes.setdefault(name, []).append(version)
    return {name: sorted(versions) for name, versions in sorted(runtimes.items())}


def _runtime_recipes(raw: dict[str, Any]) -> dict[str, dict[str, str]] | None:
    """`NAME/FOLDER=DIGEST` items: the recipe each runtime folder was made by (None: the
    script did not say, an older one)."""
    items = raw.get("runtime_recipes")
    if not isinstance(items, list):
        return None
    recipes: dict[str, dict[str, str]] = {}
    for item in items:  # what the host printed: only plain names and a digest are kept
        where, _, digest = str(item).rpartition("=")
        name, _, folder = where.partition("/")
        if is_folder_name(name) and is_folder_name(folder) and _DIGEST.match(digest):
            recipes.setdefault(name, {})[folder] = digest
    return recipes


def _managed(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`state/managed` as the script printed it, with the hashes of what is there now."""
    entry = raw.get("managed")
    if not isinstance(entry, dict):
        return {}
    recorded, _, rest = decode_output(entry).partition("--\n")
    now: dict[str, str | None] = {}
    missing: set[str] = set()
    out: dict[str, dict[str, Any]] = {}
    for line in rest.splitlines():
        digest, sep, path = line.partition("  ")
        if sep and len(digest) == 64:
            now[path] = digest
    for line in recorded.splitlines():
        if line.startswith("missing "):
            missing.add(line[len("missing "):])
            continue
        parts = line.split(" ", 3)
        if len(parts) != 4 or parts[0] not in ("file", "upload"):
            continue
        kind, fingerprint, written, path = parts
        out[path] = {"kind": kind, "fingerprint": fingerprint, "written": written,
                     "sha256": now.get(path) if kind == "file" else None}
    for path, item in out.items():
        if item["kind"] == "upload":
            item["sha256"] = None if path in missing else item["written"]
    return out


def _stacks(raw: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stacks recorded on the host; a record that is not what apply writes (a name,
    an absolute path, ports) is left out. None: the script did not say (an older one)."""
    items = raw.get("stacks")
    if not isinstance(items, list):
        return None
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        name, prefix, port, router = (str(item.get(k) or "") for k in
                                      ("name", "prefix", "agent_port", "router_port"))
        if re.match(NAME_PATTERN, name) and re.match(PREFIX_PATTERN, prefix) \
                and _port(port) and (not router or _port(router)):
            out.append({"name": name, "prefix": prefix.rstrip("/"), "agent_port": int(port),
                        "router_port": int(router) if router else None})
    return out


def _port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def node_facts_from(raw: dict[str, Any], *, address: str = "",
                    labels: dict[str, str] | None = None) -> NodeFacts:
    """A host's `NodeFacts` from the facts script's JSON (pure)."""
    problems: list[dict[str, str]] = []
    memory = int(raw.get("memory_bytes") or 0)
    gpus = _gpus_from_tools(raw, problems)
    loaded = str(raw.get("nvidia_module_loaded") or "")
    installed = str(raw.get("nvidia_module_installed") or "")
    reboot = bool(raw.get("reboot_required")) or bool(loaded and installed and loaded != installed)
    reboot = reboot or any(p["status"] == "version-mismatch" for p in problems)
    pci = _pci_accelerators(raw)
    for vendor, count in pci.items():
        seen = sum(1 for g in gpus if g.vendor == vendor)
        if seen == 0 and not any(TOOLS_BY_NAME[p["tool"]].vendor == vendor
                                 for p in problems if p["tool"] in TOOLS_BY_NAME):
            problems.append({
                "tool": "", "status": "no-tool",
                "message": f"{count} {vendor} device(s) on the PCI bus but no working vendor tool",
                "hint": f"install the {vendor} driver (`drivers.{vendor}` in stack.toml).",
            })
    facts_gpus = []
    device_ips = parse_hccn_conf(str(raw.get("hccn_conf") or ""))
    for gpu in gpus:
        data = gpu.to_dict()
        if gpu.vendor == "ascend" and gpu.index in device_ips:
            # hccn.conf numbers devices by physical id, which is the chip's position in
            # `npu-smi info` on Atlas A2/A3 servers (one id per chip, 0 up)
            data["device_ip"] = device_ips[gpu.index]
        if gpu.unified_memory and not gpu.memory_bytes:
            data["memory_bytes"] = memory  # shares the host's RAM
        if gpu.vendor == "nvidia" and not data["driver"] and loaded:
            data["driver"] = loaded
        facts_gpus.append(GpuFacts.model_validate(data))
    distro = " ".join(p for p in (raw.get("distro_id"), raw.get("distro_version")) if p)
    secure = {"enabled": True, "disabled": False}.get(str(raw.get("secure_boot") or ""))
    return NodeFacts.model_validate({
        "address": address,
        "os": str(raw.get("os") or "unknown"),
        "distro": distro,
        "kernel": str(raw.get("kernel") or ""),
        "arch": str(raw.get("arch") or ""),
        "python": str(raw.get("python") or ""),
        "libc": str(raw.get("libc") or ""),
        "cpu_cores": int(raw.get("cpu_cores") or 1),
        "memory_bytes": memory,
        "disk_free_bytes": int(raw.get("disk_free_bytes") or 0),
        "labels": dict(labels or {}),
        "gpus": facts_gpus,
        "runtimes": _runtimes(raw),
        "runtime_recipes": _runtime_recipes(raw),
        "agent": _agent(raw),
        "reboot_required": reboot,
        "secure_boot": secure,
        "managed": _managed(raw),
        "service_manager": raw.get("service_manager") or None,
        "services_alive": {str(k): bool(v) for k, v in
                           (raw.get("services_alive") or {}).items()},
        "ports_in_use": sorted(int(p) for p in raw.get("ports_in_use") or []
                               if isinstance(p, int)),
        "stacks": _stacks(raw),
        "build_tools": ({str(k): v for k, v in raw["build_tools"].items()
                         if isinstance(v, bool)}
                        if isinstance(raw.get("build_tools"), dict) else None),
        # beyond the snapshot contract (kept: unknown fields are allowed)
        "pci_accelerators": pci,
        "gpu_problems": problems,
        "sudo_ok": bool(raw.get("sudo_ok", True)),
        "user": str(raw.get("user") or ""),
    })
