"""The host probe of `stack apply`: what apply wrote on a host last time, read in one SSH
round trip (the script and its parser).

`host_files_script` prints, for the files apply manages, each file's sha256 (or null), whether
each supervised service is alive, which service manager runs there, and the current
assignment. Apply compares this with what it would write, so a host already in the
desired state gets only no-ops.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

SCRIPT = r"""
h() { if [ -f "$1" ]; then
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1;
  else shasum -a 256 "$1" | cut -d' ' -f1; fi; fi; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && echo 1 || echo 0; }
if [ -d /run/systemd/system ]; then m=systemd;
elif [ "$(uname -s)" = Darwin ]; then m=launchd; else m=supervise; fi
echo "manager $m"
for f in FILES; do echo "file $(h "$f") $f"; done
for s in SIDECARS; do [ -f "$s" ] && echo "sidecar $(cat "$s") $s"; done
for p in PIDS; do echo "alive $(alive "$p") $p"; done
echo "free $(df -Pk PREFIX 2>/dev/null | awk 'NR==2 {print $4 * 1024}')"
"""


def host_files_script(prefix: str, files: list[str], sidecars: list[str],
                      pids: list[str]) -> str:
    """The script `HostFiles` runs (every path quoted)."""
    def words(paths: list[str]) -> str:
        return " ".join(shlex.quote(p) for p in paths) or "''"

    existing = prefix
    return (SCRIPT.replace("FILES", words(files)).replace("SIDECARS", words(sidecars))
            .replace("PIDS", words(pids)).replace("PREFIX", shlex.quote(existing)))


@dataclass
class HostState:
    """What the host probe found: the service manager, the sha256 of each file asked for
    (None: missing), the sidecars' values, which supervisor pid files are alive, free disk."""

    manager: str = "supervise"
    files: dict[str, str | None] = field(default_factory=dict)
    sidecars: dict[str, str] = field(default_factory=dict)
    alive: dict[str, bool] = field(default_factory=dict)
    free: int | None = None


def parse_host_files(lines: list[str]) -> HostState:
    """The probe script's output, line by line (`KIND VALUE PATH`)."""
    out = HostState()
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "manager":
            out.manager = rest.strip()
        elif kind == "file":
            digest, _, path = rest.partition(" ")
            out.files[path] = digest or None
        elif kind == "sidecar":
            value, _, path = rest.partition(" ")
            out.sidecars[path] = value
        elif kind == "alive":
            flag, _, path = rest.partition(" ")
            out.alive[path] = flag == "1"
        elif kind == "free" and rest.strip().isdigit():
            out.free = int(rest.strip())
    return out


def dumps(value: Any) -> str:
    """Canonical JSON for files apply writes (stable bytes -> stable hashes)."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
