"""Prometheus alerting rules for a stack, from stack.toml's `[monitoring]` thresholds.

    alert_rules(spec) -> tuple[AlertRule, ...]    what to alert on (pure)
    render_alert_rules(spec) -> str               the rules file Prometheus loads (pure)

Every expression selects the stack's own series (`stack="NAME"`, the label `stack
monitoring` puts on every target), so the rules of several stacks can share one
Prometheus. Labels `node`, `model` and `instance` (the model instance id) come from the
agent and router series; annotations name them.
"""

from __future__ import annotations

from dataclasses import dataclass

from stack.monitoring import AGENT_JOB, ROUTER_JOB, yaml_quote
from stack.spec import StackSpec

RULES_FILE = "alerts.yml"
# agent states that mean an instance is not serving and is not on its way there
# (downloading and starting have their own time limits in the agent)
DOWN_STATES = ("pending", "unhealthy", "crash-looping", "failed")


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule: a PromQL condition held for `for_seconds`."""

    name: str
    expr: str
    for_seconds: int
    severity: str  # `critical`: users are affected now; `warning`: look soon
    summary: str
    description: str


def _number(value: float) -> str:
    """A PromQL number literal (thresholds are finite: stack.toml refuses inf and nan)."""
    return repr(float(value))


def alert_rules(spec: StackSpec) -> tuple[AlertRule, ...]:
    """The alerts of the stack `spec` describes, thresholds from its `[monitoring]`."""
    mon = spec.monitoring
    own = f"stack={yaml_quote(spec.stack.name)}"  # a Name: letters, digits, `._-` only
    window = f"[{mon.rate_window_seconds}s]"
    instance = "(stack, node, model, instance)"
    ratio = (f"sum by (stack, model) (rate(modelstack_router_requests_total{{{own},"
             f'status="5xx"}}{window}))\n  / sum by (stack, model) '
             f"(rate(modelstack_router_requests_total{{{own}}}{window}))")
    ttft = (f"histogram_quantile(0.95, sum by (stack, model, le) "
            f"(rate(modelstack_router_time_to_first_token_seconds_bucket{{{own}}}{window})))")
    return (
        AlertRule(
            "ModelstackTargetDown",
            f'up{{{own},job=~"{ROUTER_JOB}|{AGENT_JOB}"}} == 0',
            mon.target_down_for_seconds, "critical",
            "{{ $labels.job }} on node {{ $labels.node }} is down",
            "Prometheus cannot scrape {{ $labels.job }} at {{ $labels.instance }} on node "
            "{{ $labels.node }} (stack {{ $labels.stack }}): the process or its host is down, "
            "or the network or token is wrong."),
        AlertRule(
            "ModelstackInstanceDown",
            f"max by {instance} (modelstack_instance_state{{{own},"
            f'state=~"{"|".join(DOWN_STATES)}"}}) == 1',
            mon.instance_down_for_seconds, "warning",
            "Instance {{ $labels.instance }} of {{ $labels.model }} on {{ $labels.node }} "
            "is not ready",
            "Instance {{ $labels.instance }} of model {{ $labels.model }} on node "
            "{{ $labels.node }} has been pending, unhealthy, crash-looping or failed for "
            f"{mon.instance_down_for_seconds} s: `stack status`, `stack logs "
            "{{ $labels.model }}`."),
        AlertRule(
            "ModelstackCrashLooping",
            f"max by {instance} (modelstack_instance_state{{{own},state=\"crash-looping\"}}) "
            f"== 1\nor max by {instance} (increase(modelstack_instance_restarts_total{{{own}}}"
            f"{window})) >= {mon.crash_loop_restarts}",
            mon.alert_for_seconds, "warning",
            "Instance {{ $labels.instance }} of {{ $labels.model }} on {{ $labels.node }} "
            "keeps crashing",
            "The backend of instance {{ $labels.instance }} (model {{ $labels.model }}, node "
            "{{ $labels.node }}) is crash-looping or restarted at least "
            f"{mon.crash_loop_restarts} times in {mon.rate_window_seconds} s: "
            "`stack logs {{ $labels.model }}`."),
        AlertRule(
            "ModelstackModelUnavailable",
            f'sum by (stack, model) (modelstack_instance_state{{{own},state="ready"}}) == 0',
            mon.alert_for_seconds, "critical",
            "Model {{ $labels.model }} has no ready replica",
            "No instance of model {{ $labels.model }} is ready on any node: the router "
            "answers its requests with errors."),
        AlertRule(
            "ModelstackGpuHot",
            f"modelstack_gpu_temperature_celsius{{{own}}} > {_number(mon.gpu_temperature_celsius)}",
            mon.alert_for_seconds, "warning",
            "GPU {{ $labels.gpu }} on {{ $labels.node }} is at {{ $value }} °C",
            "GPU {{ $labels.gpu }} ({{ $labels.name }}) on node {{ $labels.node }} is above "
            f"{_number(mon.gpu_temperature_celsius)} °C: check its cooling; it may throttle."),
        AlertRule(
            "ModelstackRouter5xx",
            f"{ratio}\n  > {_number(mon.router_5xx_ratio)}",
            mon.alert_for_seconds, "critical",
            "{{ $value | humanizePercentage }} of {{ $labels.model }} requests fail with 5xx",
            "The routers answer more than "
            f"{_number(mon.router_5xx_ratio)} of the requests for model {{{{ $labels.model }}}} "
            f"with a 5xx status (over {mon.rate_window_seconds} s): its replicas fail or are "
            "unreachable."),
        AlertRule(
            "ModelstackSlowFirstToken",
            f"{ttft}\n  > {_number(mon.ttft_p95_seconds)}",
            mon.alert_for_seconds, "warning",
            "Time to first token p95 of {{ $labels.model }} is {{ $value | humanizeDuration }}",
            "The 95th percentile of the time to the first token of model "
            f"{{{{ $labels.model }}}} at the routers is above {_number(mon.ttft_p95_seconds)} s "
            f"(over {mon.rate_window_seconds} s): add replicas or look at the queue."),
    )


def render_alert_rules(spec: StackSpec) -> str:
    """The rules file as YAML (every string a double-quoted scalar)."""
    name = spec.stack.name
    out = [
        f"# Prometheus alerting rules for the stack `{name}`, written by `stack monitoring`.",
        "# Thresholds and durations come from the [monitoring] table of stack.toml.",
        "groups:",
        f"  - name: {yaml_quote('modelstack-' + name)}",
        "    rules:",
    ]
    for rule in alert_rules(spec):
        out += [
            f"      - alert: {yaml_quote(rule.name)}",
            f"        expr: {yaml_quote(rule.expr)}",
            f"        for: {yaml_quote(f'{rule.for_seconds}s')}",
            "        labels:",
            f"          severity: {yaml_quote(rule.severity)}",
            "        annotations:",
            f"          summary: {yaml_quote(rule.summary)}",
            f"          description: {yaml_quote(rule.description)}",
        ]
    return "\n".join(out) + "\n"


__all__ = ["DOWN_STATES", "RULES_FILE", "AlertRule", "alert_rules", "render_alert_rules"]
