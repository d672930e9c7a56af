"""Writes rnnserve.json, the Grafana dashboard, from the panel list below.

    python deploy/monitoring/grafana/generate.py

Edit the panels here, not the JSON: a test checks that the committed JSON is this
script's output, and runs every panel's expression against a real Prometheus that
scrapes a real rnnserve. Variables: $datasource, $model, $instance (multi-value,
"All" = ".*"), and Grafana's $__rate_interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("rnnserve.json")
SEL = 'model=~"$model", instance=~"$instance"'
STORE = 'instance=~"$instance"'  # the store's series have no model label
RATE = "[$__rate_interval]"
DS = {"type": "prometheus", "uid": "${datasource}"}


def q(quantile: float, metric: str, by: str, where: str = SEL) -> str:
    return (f"histogram_quantile({quantile}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{where}}}{RATE})))")


# (title, unit, [(expr, legend)], width, kind); rows are ("row", title)
Panel = tuple[str, str, list[tuple[str, str]], int, str]
LAYOUT: list[Panel | tuple[str, str]] = [
    ("row", "Latency"),
    ("Chunk latency by model (p50, p90, p99)", "s", [
        (q(0.5, "rnnserve_chunk_latency_seconds", "model"), "{{model}} p50"),
        (q(0.9, "rnnserve_chunk_latency_seconds", "model"), "{{model}} p90"),
        (q(0.99, "rnnserve_chunk_latency_seconds", "model"), "{{model}} p99"),
    ], 12, "timeseries"),
    ("Chunks answered within 100 ms (SLO 99%)", "percentunit", [
        (f'sum by (model) (rate(rnnserve_chunk_latency_seconds_bucket{{le="0.1", {SEL}}}{RATE}))'
         f" / sum by (model) (rate(rnnserve_chunk_latency_seconds_count{{{SEL}}}{RATE}))",
         "{{model}}"),
    ], 6, "timeseries"),
    # the worst version of each model: a ratio summed over versions side by side (v1
    # and v2 each at 1%) would read twice the budget
    ("SLO burn rate, 1 h (1 = on budget)", "none", [
        ('max by (model) (model_version:rnnserve_chunk_latency_slo_misses:ratio_rate1h'
         '{model=~"$model"}) / 0.01', "{{model}}"),
    ], 6, "timeseries"),
    ("Where the time goes: queue wait and compute (p50, p99)", "s", [
        (q(0.5, "rnnserve_queue_wait_seconds", "model"), "{{model}} queue p50"),
        (q(0.99, "rnnserve_queue_wait_seconds", "model"), "{{model}} queue p99"),
        (q(0.5, "rnnserve_compute_seconds", "model"), "{{model}} compute p50"),
        (q(0.99, "rnnserve_compute_seconds", "model"), "{{model}} compute p99"),
    ], 12, "timeseries"),
    ("Time to first output (p50, p99)", "s", [
        (q(0.5, "rnnserve_time_to_first_output_seconds", "model"), "{{model}} p50"),
        (q(0.99, "rnnserve_time_to_first_output_seconds", "model"), "{{model}} p99"),
    ], 12, "timeseries"),
    ("row", "Traffic and errors"),
    ("Answered chunks per second by model", "ops", [
        (f'sum by (model) (rate(rnnserve_chunks_total{{code="OK", {SEL}}}{RATE}))', "{{model}}"),
    ], 8, "timeseries"),
    ("Rejected chunks per second by code", "ops", [
        (f'sum by (code) (rate(rnnserve_chunks_total{{code!="OK", {SEL}}}{RATE}))', "{{code}}"),
    ], 8, "timeseries"),
    ("Chunk error ratio (all errors, server errors)", "percentunit", [
        ('model_version:rnnserve_chunks_errors:ratio_rate5m{model=~"$model"}',
         "{{model}} v{{version}} all"),
        ('model_version:rnnserve_chunks_server_errors:ratio_rate5m{model=~"$model"}',
         "{{model}} v{{version}} server"),
    ], 8, "timeseries"),
    ("RPCs per second by api, method and code", "reqps", [
        (f"sum by (api, method, code) (rate(rnnserve_requests_total{{{SEL}}}{RATE}))",
         "{{api}} {{method}} {{code}}"),
    ], 12, "timeseries"),
    ("Open streams", "short", [
        ('sum by (api, method) (rnnserve_open_streams{instance=~"$instance"})',
         "{{api}} {{method}}"),
    ], 12, "timeseries"),
    ("row", "Batching and queue"),
    ("Batch size (mean, p99)", "short", [
        (f"sum by (model) (rate(rnnserve_batch_size_sum{{{SEL}}}{RATE}))"
         f" / sum by (model) (rate(rnnserve_batch_size_count{{{SEL}}}{RATE}))", "{{model}} mean"),
        (q(0.99, "rnnserve_batch_size", "model"), "{{model}} p99"),
    ], 8, "timeseries"),
    ("Batch fill (mean batch / max batch size)", "percentunit", [
        ('model_version:rnnserve_batch_fill:ratio_rate5m{model=~"$model"}',
         "{{model}} v{{version}}"),
    ], 8, "timeseries"),
    ("Queued steps", "short", [
        (f"sum by (model, instance) (rnnserve_queue_depth{{{SEL}}})", "{{model}} {{instance}}"),
        (f"max by (model) (rnnserve_queue_capacity{{{SEL}}})", "{{model}} capacity"),
    ], 8, "timeseries"),
    ("row", "Sessions"),
    ("Live sessions by model", "short", [
        (f"sum by (model) (rnnserve_active_sessions{{{SEL}}})", "{{model}}"),
    ], 6, "timeseries"),
    ("Sessions started and ended per second", "ops", [
        (f"sum by (model) (rate(rnnserve_sessions_started_total{{{SEL}}}{RATE}))",
         "{{model}} started"),
        (f"sum by (model, reason) (rate(rnnserve_sessions_ended_total{{{SEL}}}{RATE}))",
         "{{model}} {{reason}}"),
    ], 6, "timeseries"),
    ("Evicted sessions", "short", [
        (f'sum by (model, instance) (increase(rnnserve_sessions_ended_total{{reason="evicted", '
         f"{SEL}}}{RATE}))", "{{model}} {{instance}}"),
    ], 6, "timeseries"),
    ("Recurrent state memory", "bytes", [
        (f"sum by (model) (rnnserve_state_bytes{{{SEL}}})", "{{model}}"),
    ], 6, "timeseries"),
    # the shared session store (--session-store): empty on servers without one. Its
    # series have no model label (one write carries many models' steps); shard is the
    # store's index in the list of URLs
    ("row", "Session store"),
    ("Store round trips by op and shard (p50, p99)", "s", [
        (q(0.5, "rnnserve_store_seconds", "op, shard", STORE), "{{op}} shard {{shard}} p50"),
        (q(0.99, "rnnserve_store_seconds", "op, shard", STORE), "{{op}} shard {{shard}} p99"),
    ], 8, "timeseries"),
    ("Store calls and failures per second by shard", "ops", [
        (f"sum by (op, shard) (rate(rnnserve_store_seconds_count{{{STORE}}}{RATE}))",
         "{{op}} shard {{shard}}"),
        (f"sum by (op, shard) (rate(rnnserve_store_errors_total{{{STORE}}}{RATE}))",
         "{{op}} shard {{shard}} failed"),
    ], 8, "timeseries"),
    ("Writes refused and steps not durable per second", "ops", [
        (f"sum by (reason) (rate(rnnserve_store_refusals_total{{{STORE}}}{RATE}))",
         "refused: {{reason}}"),
        (f"sum by (op) (rate(rnnserve_store_degraded_total{{{STORE}}}{RATE}))",
         "from memory only: {{op}}"),
    ], 8, "timeseries"),
    ("Sessions resumed per second by where the state came from", "ops", [
        (f"sum by (model, source) (rate(rnnserve_session_resumes_total{{{SEL}}}{RATE}))",
         "{{model}} from {{source}}"),
    ], 12, "timeseries"),
    ("Store round trips by instance (p99)", "s", [
        (q(0.99, "rnnserve_store_seconds", "instance", STORE), "{{instance}}"),
    ], 12, "timeseries"),
    ("row", "Per instance"),
    ("Answered chunks per second by instance", "ops", [
        (f'sum by (instance) (rate(rnnserve_chunks_total{{code="OK", {SEL}}}{RATE}))',
         "{{instance}}"),
    ], 6, "timeseries"),
    ("p99 chunk latency by instance", "s", [
        (q(0.99, "rnnserve_chunk_latency_seconds", "instance"), "{{instance}}"),
    ], 6, "timeseries"),
    ("p99 queue wait by instance (scaling signal)", "s", [
        ('instance_model_version:rnnserve_queue_wait_seconds:p99_rate1m'
         '{model=~"$model", instance=~"$instance"}', "{{instance}} {{model}}"),
    ], 6, "timeseries"),
    ("Live sessions by instance", "short", [
        (f"sum by (instance) (rnnserve_active_sessions{{{SEL}}})", "{{instance}}"),
    ], 6, "timeseries"),
    ("Served models", "none", [
        (f"max by (instance, model, version, arch, task, input_kind, provider) "
         f"(rnnserve_model_info{{{SEL}}})", ""),
    ], 12, "table"),
    ("Server builds", "none", [
        ('max by (instance, version, onnxruntime, grpcio, python) '
         '(rnnserve_build_info{instance=~"$instance"})', ""),
    ], 12, "table"),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], width: int,
          kind: str, x: int, y: int) -> dict[str, Any]:
    p: dict[str, Any] = {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend,
                     "refId": chr(ord("A") + i), "range": kind != "table",
                     "instant": kind == "table"}
                    for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}
    else:
        p["transformations"] = [{"id": "labelsToFields", "options": {}}]
    return p


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-var"},
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    panels, x, y, pid = [], 0, 0, 1
    for item in LAYOUT:
        if item[0] == "row":
            if x:
                x, y = 0, y + 8
            panels.append({"id": pid, "type": "row", "title": item[1], "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
        else:
            title, unit, targets, width, kind = item  # type: ignore[misc]
            if x + width > 24:
                x, y = 0, y + 8
            panels.append(panel(pid, title, unit, targets, width, kind, x, y))
            x += width
        pid += 1
    return {
        "uid": "rnnserve-overview", "title": "rnnserve: streaming inference",
        "description": "Latency, traffic, errors, batching, sessions and the session store, per "
                       "model and per pod. "
                       "Built by deploy/monitoring/grafana/generate.py.",
        "tags": ["rnnserve"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "graphTooltip": 1,
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            variable("model", "Model", "label_values(rnnserve_model_info, model)"),
            variable("instance", "Instance",
                     'label_values(rnnserve_model_info{model=~"$model"}, instance)'),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
