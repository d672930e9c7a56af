"""The monitoring configuration in deploy/monitoring: valid for promtool, rules unit
tested, the Grafana dashboard generated from its script."""

from __future__ import annotations

import importlib.util
import json
import re

import yaml

from .prom import MONITORING, promtool


def test_prometheus_config_and_rule_files_are_valid() -> None:
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "2 rule files found" in config.stdout
    rules = promtool("check", "rules", *sorted(p.name for p in (MONITORING / "rules").iterdir()),
                     cwd=MONITORING / "rules")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_rule_unit_tests_pass() -> None:
    tests = sorted(str(p.relative_to(MONITORING)) for p in (MONITORING / "tests").glob("*.yml"))
    assert len(tests) == 2
    run = promtool("test", "rules", *tests)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(tests), run.stdout


def _rules(name: str) -> list[dict]:
    doc = yaml.safe_load((MONITORING / "rules" / name).read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_and_recording_rule_has_a_unit_test() -> None:
    alert_tests = (MONITORING / "tests" / "alerts_test.yml").read_text()
    for rule in _rules("alerts.yml"):
        assert f"alertname: {rule['alert']}\n" in alert_tests, rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket")
        assert {"summary", "description"} <= set(rule["annotations"])
    recording = _rules("recording.yml")
    tested = (MONITORING / "tests" / "recording_test.yml").read_text()
    # a rule counts as tested when a test evaluates it, or a tested rule or alert reads it
    used = " ".join(r["expr"] for r in recording + _rules("alerts.yml"))
    for rule in recording:
        name = rule["record"]
        assert f"expr: {name}\n" in tested or f"({name}" in tested or name in used, name


def test_dashboard_json_is_the_generator_output() -> None:
    path = MONITORING / "grafana" / "generate.py"
    spec = importlib.util.spec_from_file_location("rnnserve_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (MONITORING / "grafana" / "rnnserve.json").read_text()
    assert committed == module.render(), "run python deploy/monitoring/grafana/generate.py"


def test_dashboard_panels_and_variables() -> None:
    board = json.loads((MONITORING / "grafana" / "rnnserve.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "instance"}
    for name in ("model", "instance"):
        assert variables[name]["allValue"] == ".*" and variables[name]["multi"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        # every panel that reads per-pod series can be narrowed to one model and instance
        # (the server-wide series, without a model label: to one instance)
        for t in p["targets"]:
            if re.search(r"rnnserve_\w+\{", t["expr"]) and "build_info" not in t["expr"]:
                assert '"$instance"' in t["expr"], (p["title"], t["expr"])
                if not re.search(r"rnnserve_(open_streams|store_\w+)\{", t["expr"]):
                    assert '"$model"' in t["expr"], (p["title"], t["expr"])
    text = json.dumps(board)
    for need in ("rnnserve_chunk_latency_seconds_bucket", "rnnserve_queue_wait_seconds",
                 "rnnserve_batch_size", "rnnserve_queue_depth", "rnnserve_active_sessions",
                 "evicted", "by (instance", "by (code", "rnnserve_store_seconds_bucket",
                 "by (op, shard", "rnnserve_store_errors_total"):
        assert need in text, need


def test_burn_rate_panel_is_per_version_not_summed_over_versions(tmp_path) -> None:
    """Versions side by side (v1 and v2 each missing 1% of chunks) burn at 1, not 2."""
    board = json.loads((MONITORING / "grafana" / "rnnserve.json").read_text())
    (panel,) = [p for p in board["panels"] if p["title"].startswith("SLO burn rate")]
    (target,) = panel["targets"]
    expr = target["expr"].replace("$model", ".*")
    series = [
        {"series": f'rnnserve_chunk_latency_seconds_{name}{{instance="a", model="m", '
                   f'version="{v}"{le}}}', "values": f"0+{n}x300"}
        for v in (1, 2)
        for name, le, n in (("bucket", ', le="0.1"', 99), ("count", "", 100))]
    test = {
        "rule_files": [str(MONITORING / "rules" / "recording.yml")],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": [{
            "expr": f"round(({expr}) * 100)", "eval_time": "65m",
            "exp_samples": [{"labels": '{model="m"}', "value": 100}]}]}],
    }
    (tmp_path / "burn_test.yml").write_text(yaml.safe_dump(test))
    run = promtool("test", "rules", "burn_test.yml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
