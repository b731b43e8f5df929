"""Write the monitoring files of the fleet into DIR (default: ./monitoring):

  prometheus.yml          Prometheus config: scrapes the routers' and the agents' /metrics,
                          labelled by node, and loads alerts.yml
  alerts.yml              alerting rules: targets and instances down, crash loops, models
                          without a ready replica, hot GPUs, 5xx ratio, slow first tokens
                          (thresholds: the [monitoring] table of stack.toml)
  grafana-dashboard.json  the Grafana dashboard (import it; pick the Prometheus data source)

Hosts come from stack.toml (`[hosts]` or the inventory file; no SSH needed), or from a
facts snapshot with `--facts FILE`. The agents' API needs a bearer token that differs
per node: each agent job reads it from TOKEN_DIR/NODE.token (default: DIR/tokens).
`--write-tokens` writes those files (mode 0600) from the stack secret; without it, copy
each host's PREFIX/etc/agent.token there. Tokens are never printed. Example:

  stack monitoring --out /etc/prometheus/modelstack --write-tokens
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from stack.errors import ConfigError
from stack.snapshot import Observed
from stack.spec import StackSpec

HELP = "write a Prometheus config, alerting rules and the Grafana dashboard for the fleet"
DASHBOARD = Path(__file__).resolve().parents[2] / "templates" / "grafana-dashboard.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="monitoring", metavar="DIR",
                        help="folder to write into (default: ./monitoring)")
    parser.add_argument("--facts", metavar="FILE",
                        help="take the hosts from this facts snapshot (`stack facts --out`)")
    parser.add_argument("--token-dir", metavar="PATH",
                        help="where Prometheus finds the agents' token files "
                             "(default: DIR/tokens, made absolute)")
    parser.add_argument("--write-tokens", action="store_true",
                        help="write each agent's token file (mode 0600) from the stack secret")


def _observed(spec: StackSpec, stack_dir: Path, facts: str | None) -> Observed:
    """The nodes and their addresses: a facts snapshot, else stack.toml's hosts (no SSH)."""
    from stack.observe import build_inventory
    from stack.pipeline import read_facts
    from stack.snapshot import NodeFacts

    if facts:
        return read_facts(Path(facts))
    _, addresses = build_inventory(spec, stack_dir)
    return Observed(nodes={n: NodeFacts(address=a) for n, a in addresses.items()})


def _secret(stack_dir: Path) -> bytes:
    from stack.secrets import SECRET_ENV, SECRET_FILE, stack_secret

    if not os.environ.get(SECRET_ENV) and not (stack_dir / SECRET_FILE).exists():
        raise ConfigError(f"`--write-tokens` needs the stack secret, and neither `{SECRET_ENV}` "
                          f"nor `{stack_dir / SECRET_FILE}` exists",
                          hint="run it where `stack apply` ran (or set STACK_SECRET), or leave "
                               "`--write-tokens` out and copy each host's agent.token.")
    return stack_secret(stack_dir)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    from stack.alerts import RULES_FILE, render_alert_rules
    from stack.config import load
    from stack.monitoring import render_scrape_config, scrape_targets, token_path

    path = Path(args.file)
    spec = load(path)
    stack_dir = path.resolve().parent
    observed = _observed(spec, stack_dir, args.facts)
    out = Path(args.out)
    token_dir = args.token_dir or str((out / "tokens").resolve())
    targets = scrape_targets(spec, observed)
    secret = _secret(stack_dir) if args.write_tokens else None  # before writing anything
    out.mkdir(parents=True, exist_ok=True)
    (out / RULES_FILE).write_text(render_alert_rules(spec))
    (out / "prometheus.yml").write_text(render_scrape_config(
        targets, token_dir, (RULES_FILE,), spec.monitoring.scrape_interval_seconds))
    shutil.copyfile(DASHBOARD, out / "grafana-dashboard.json")
    print(f"wrote {out / 'prometheus.yml'} ({len(targets.routers)} router and "
          f"{len(targets.agents)} agent targets), {out / RULES_FILE} and "
          f"{out / 'grafana-dashboard.json'}")
    if secret is not None:
        from stack.secrets import derive_key

        for target in targets.agents:
            _write_private(Path(token_path(token_dir, target.node)),
                           derive_key(secret, f"agent:{target.node}") + "\n")
        print(f"wrote {len(targets.agents)} agent token files (mode 0600) into {token_dir}")
    elif targets.agents:
        print(f"the agent jobs read bearer tokens from {token_path(token_dir, 'NODE')}: copy "
              "each host's PREFIX/etc/agent.token there (mode 0600, readable by Prometheus), "
              "or run again with `--write-tokens`")
    return 0
