"""The alerting rules of `stack monitoring`, checked by Prometheus' own `promtool`.

`promtool check rules` and `check config` load the files `stack monitoring` writes;
`promtool test rules` runs every case in `alerts/` (input series -> the alerts that must
fire, with their labels and annotations, and the times they must not) against the rules
rendered with the default `[monitoring]` thresholds. scripts/setup installs promtool
(Debian's `prometheus`); CI fails without it, a run by hand skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_monitoring_command import stack, write_stack

from stack.alerts import RULES_FILE, alert_rules, render_alert_rules
from stack.config import load_text

CASES = sorted((Path(__file__).parent / "alerts").glob("*.yml"))
DEFAULTS = '[stack]\nname = "prod"\n'  # the cases' series carry stack="prod"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: scripts/setup installs it (Debian's `prometheus`)")
        pytest.skip("promtool is missing (apt-get install prometheus, or scripts/setup)")
    return path


def run_unit_test(promtool: str, case: Path, rules_text: str, tmp: Path
                  ) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` of one case file against `rules_text`."""
    (tmp / RULES_FILE).write_text(rules_text)
    test: dict[str, Any] = yaml.safe_load(case.read_text())
    test["rule_files"] = [RULES_FILE]
    test["evaluation_interval"] = "1m"
    (tmp / "test.yml").write_text(yaml.safe_dump(test, allow_unicode=True))
    return subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_alert_fires_when_it_should_and_not_otherwise(promtool: str, case: Path,
                                                      tmp_path: Path) -> None:
    result = run_unit_test(promtool, case, render_alert_rules(load_text(DEFAULTS)), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_case() -> None:
    tested = set()
    for case in CASES:
        for test in yaml.safe_load(case.read_text())["tests"]:
            tested |= {t["alertname"] for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {rule.name for rule in alert_rules(load_text(DEFAULTS))}


def test_a_threshold_from_stack_toml_reaches_the_rules(promtool: str, tmp_path: Path) -> None:
    """A GPU at 90 °C fires at the default 85 °C (the case above) but not at 95 °C."""
    spec = load_text(DEFAULTS + "\n[monitoring]\ngpu_temperature_celsius = 95\n")
    result = run_unit_test(promtool, Path(__file__).parent / "alerts" / "gpu_hot.yml",
                           render_alert_rules(spec), tmp_path)
    assert result.returncode == 1, result.stdout
    assert "alertname: ModelstackGpuHot" in result.stdout + result.stderr


def test_rule_durations_and_labels_come_from_the_monitoring_table() -> None:
    spec = load_text(DEFAULTS + "\n[monitoring]\ninstance_down_for_seconds = 7\n"
                     "alert_for_seconds = 42\ntarget_down_for_seconds = 0\n"
                     "rate_window_seconds = 60\n")
    groups = yaml.safe_load(render_alert_rules(spec))["groups"]
    assert [g["name"] for g in groups] == ["modelstack-prod"]
    rules = {r["alert"]: r for r in groups[0]["rules"]}
    assert rules["ModelstackInstanceDown"]["for"] == "7s"
    assert rules["ModelstackTargetDown"]["for"] == "0s"
    for name, rule in rules.items():
        if name not in ("ModelstackInstanceDown", "ModelstackTargetDown"):
            assert rule["for"] == "42s", name
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert set(rule["annotations"]) == {"summary", "description"}
        assert 'stack="prod"' in rule["expr"]
        assert "[300s]" not in rule["expr"]
    assert "[60s]" in rules["ModelstackRouter5xx"]["expr"]


def test_stack_monitoring_writes_rules_and_a_config_that_promtool_accepts(
        promtool: str, tmp_path: Path) -> None:
    write_stack(tmp_path)
    with (tmp_path / "stack.toml").open("a") as toml:
        toml.write("\n[monitoring]\nscrape_interval_seconds = 5\n")
    result = stack(tmp_path, "monitoring", "--out", "mon", "--write-tokens")
    assert result.returncode == 0, result.stderr
    assert "mon/alerts.yml" in result.stdout
    mon = tmp_path / "mon"
    config = yaml.safe_load((mon / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert config["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    rules = subprocess.run([promtool, "check", "rules", str(mon / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules(load_text(DEFAULTS)))} rules found" in rules.stdout
    # from another folder: the rule file is found beside prometheus.yml
    checked = subprocess.run([promtool, "check", "config", str(mon / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60, cwd="/")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout


def test_promtool_refuses_a_config_whose_rule_file_is_missing(promtool: str,
                                                             tmp_path: Path) -> None:
    """The check above would notice a rule file that is not where prometheus.yml says."""
    write_stack(tmp_path)
    assert stack(tmp_path, "monitoring", "--out", "mon", "--write-tokens").returncode == 0
    (tmp_path / "mon" / "alerts.yml").unlink()
    config = tmp_path / "mon" / "prometheus.yml"
    checked = subprocess.run([promtool, "check", "config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0
    assert "alerts.yml" in checked.stdout + checked.stderr
