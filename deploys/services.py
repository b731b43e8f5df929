"""Long-running services on hosts (the agent and the router), whatever runs them.

systemd where it runs (`/run/systemd/system` exists), launchd on macOS, otherwise a small
`sh` supervisor loop (templates/supervise.sh.j2) started with `setsid`, which
restarts the process when it exits and keeps pid files under `PREFIX/run`. Everything here
is pure: files to write and commands to run, rendered from templates/.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from stack.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MANAGERS = ("systemd", "launchd", "supervise")
# Open files of the agent (its backends inherit it) and the router (two per proxied
# request): the usual soft limit of 1024 runs out under load.
LIMIT_NOFILE = 65536
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SYSTEMD_PLAIN = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")


@cache
def environment() -> jinja2.Environment:
    """The jinja2 environment of templates/ (undefined names are errors)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False, finalize=_one_line,
    )
    env.filters["shquote"] = shlex.quote
    env.filters["systemd_path"] = systemd_path
    return env


def _one_line(value: Any) -> Any:
    """Every value a template writes: a control character in it would start a new line of
    a script or new directives of a unit file, so none is written (stack.toml refuses
    them before; this holds for any other caller)."""
    if isinstance(value, str) and _CONTROL.search(value):
        raise ConfigError(f"a value for a service file holds a control character: {value!r}",
                          hint="values written to hosts are one line of visible characters; "
                          "check stack.toml's `prefix` and `name`.")
    return value


def systemd_quote(word: str) -> str:
    """One word of a systemd command line: plain words as they are, others in double
    quotes with systemd's escapes (`%%` for its specifiers, `$$` for its variables)."""
    if _SYSTEMD_PLAIN.match(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def systemd_path(path: str) -> str:
    """A path in a systemd setting that takes no quotes (`append:PATH`): `%` escaped."""
    return path.replace("%", "%%")


def render(template: str, **values: object) -> str:
    """Render one template of templates/."""
    return environment().get_template(template).render(**values)


@dataclass(frozen=True)
class Service:
    """One service (`agent` or `router`) of one stack on one host."""

    name: str
    stack: str
    prefix: str
    argv: tuple[str, ...]
    manager: str = "supervise"

    @property
    def run_dir(self) -> str:
        return f"{self.prefix}/run"

    @property
    def log(self) -> str:
        return f"{self.prefix}/logs/{self.name}.log"

    @property
    def label(self) -> str:
        return f"modelstack-{self.stack}-{self.name}"

    @property
    def unit_path(self) -> str:
        """The file that defines the service for its manager."""
        if self.manager == "systemd":
            return f"/etc/systemd/system/{self.label}.service"
        if self.manager == "launchd":
            return f"/Library/LaunchDaemons/dev.{self.label}.plist"
        return f"{self.prefix}/etc/supervise-{self.name}.sh"

    @property
    def pid_file(self) -> str:
        return f"{self.run_dir}/{self.name}.pid"

    @property
    def supervisor_pid_file(self) -> str:
        return f"{self.run_dir}/{self.name}.supervisor.pid"

    def command_line(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)


def unit_file(service: Service) -> str:
    """The content of `service.unit_path`."""
    if service.manager == "systemd":
        return render("service.systemd.j2", name=service.name, stack=service.stack,
                      command=" ".join(systemd_quote(a) for a in service.argv),
                      log=service.log, limit_nofile=LIMIT_NOFILE)
    if service.manager == "launchd":
        return render("service.launchd.plist.j2", name=service.name, stack=service.stack,
                      label=f"dev.{service.label}", argv=service.argv, log=service.log,
                      limit_nofile=LIMIT_NOFILE)
    return render("supervise.sh.j2", name=service.name, run_dir=service.run_dir,
                  command=service.command_line(), log=service.log,
                  limit_nofile=LIMIT_NOFILE)


def start_commands(service: Service, running: bool, restart: bool) -> list[str]:
    """Commands that leave the service running its current definition."""
    q = shlex.quote
    if running and not restart:
        return []
    if service.manager == "systemd":
        verb = "restart" if running else "start"
        return ["systemctl daemon-reload", f"systemctl enable {q(service.label)}",
                f"systemctl {verb} {q(service.label)}"]
    if service.manager == "launchd":
        plist = q(service.unit_path)
        return [f"launchctl unload {plist} 2>/dev/null || true", f"launchctl load -w {plist}"]
    commands = [f"mkdir -p {q(service.run_dir)} {q(service.prefix + '/logs')}"]
    if running:
        commands += stop_commands(service)
    commands.append(
        # no nohup: it would leave SIGHUP ignored, which sh cannot trap (reload needs it);
        # setsid alone detaches from the SSH session, so no hangup reaches it
        f"setsid sh {q(service.unit_path)} >/dev/null 2>&1 </dev/null &"
    )
    return commands


def stop_commands(service: Service) -> list[str]:
    """Commands that stop the service (and keep it stopped)."""
    q = shlex.quote
    if service.manager == "systemd":
        return [f"systemctl disable --now {q(service.label)} 2>/dev/null || true"]
    if service.manager == "launchd":
        return [f"launchctl unload -w {q(service.unit_path)} 2>/dev/null || true"]
    pid = q(service.supervisor_pid_file)
    child = q(service.pid_file)
    return [
        f"if [ -f {pid} ]; then kill -TERM \"$(cat {pid})\" 2>/dev/null || true; "
        f"i=0; while [ -f {pid} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
        f"rm -f {pid}; fi; "
        f"if [ -f {child} ]; then kill -TERM \"$(cat {child})\" 2>/dev/null || true; "
        f"rm -f {child}; fi"
    ]


def reload_commands(service: Service) -> list[str]:
    """Commands that make the service re-read its configuration (SIGHUP)."""
    if service.manager == "systemd":
        return [f"systemctl reload {shlex.quote(service.label)}"]
    if service.manager == "launchd":
        return [f"launchctl kill HUP system/dev.{shlex.quote(service.label)}"]
    pid = shlex.quote(service.pid_file)
    return [f"kill -HUP \"$(cat {pid})\""]
