"""The queries operators run against /metrics (the Grafana dashboard, the autoscaler's, the alert rules) name metrics,
labels and label values that the service really exports, under the labels Prometheus scrapes them with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from starlette.routing import compile_path

from app.main import create_app
from app.service.metrics import JOB_OUTCOMES, Metrics
from app.settings import Settings

ROOT = Path(__file__).parents[1]
# What Prometheus and the Prometheus Operator's ServiceMonitor put on every series they scrape. A metric's own label
# of one of these names is renamed `exported_<name>` at the scrape (honor_labels is off), and a query on it then
# matches the target's value instead ("http", the port's name, for `endpoint`).
TARGET_LABELS = {"job", "instance", "service", "namespace", "pod", "container", "endpoint"}
QUERIED_TARGET_LABELS = {"service", "namespace", "pod", "instance", "job"}  # the ones a query may select on
SERIES = re.compile(r"\b((?:sea|process)_\w+|up)\b\s*(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every series name a scrape of the service can hold, with its label names."""
    metrics = Metrics()
    metrics.add_shared_queue_depth()  # a shared store's
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))  # a child, so that collect() shows the labelled series
    series: dict[str, set[str]] = {"up": set()}  # Prometheus's own, per target
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def route_templates() -> set[str]:
    app = create_app(Settings())
    return {compile_path(path)[1] for path in app.openapi()["paths"]}


def queries() -> dict[str, str]:
    """Every PromQL expression shipped, by where it is."""
    found = {}
    dashboards = sorted((ROOT / "docker" / "grafana" / "dashboards").glob("*.json"))
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found[f"{path.name}: {panel['title']} {target['refId']}"] = target["expr"]
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "ScaledObject":
                for i, trigger in enumerate(doc["spec"]["triggers"]):
                    found[f"{path.name}: trigger {i}"] = trigger["metadata"]["query"]
            if doc.get("kind") == "PrometheusRule":
                for group in doc["spec"]["groups"]:
                    for rule in group["rules"]:
                        found[f"{path.name}: {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    assert len(dashboards) >= 1 and any("ScaledObject" in p.read_text() for p in (ROOT / "deploy").rglob("*.yaml"))
    return found


def problems(expr: str, series: dict[str, set[str]], routes: set[str]) -> list[str]:
    """What in ``expr`` selects nothing the service exports: an unknown series, label or label value."""
    expr = expr.replace("$__rate_interval", "5m")
    found, used = [], set()
    for name, selector in SERIES.findall(expr):
        if name not in series:
            found.append(f"no series {name}")
            continue
        used |= series[name]
        for label, op, value in MATCHER.findall(selector):
            if label not in series[name] | QUERIED_TARGET_LABELS:
                found.append(f"{name} has no label {label}")
            elif op in ("=", "=~"):
                allowed = {"outcome": set(JOB_OUTCOMES), "route": routes}.get(label)
                for alternative in value.split("|") if allowed is not None else []:
                    if not any(re.fullmatch(alternative if op == "=~" else re.escape(alternative), v) for v in allowed):
                        found.append(f"{name}'s {label} is never {alternative!r}")
    for grouping in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in used | QUERIED_TARGET_LABELS:
                found.append(f"grouping by {label}, which no series here has")
    if not SERIES.search(expr):
        found.append("selects no series of the service")
    return found


def test_no_label_of_ours_is_renamed_at_the_scrape():
    clashes = {name: labels & TARGET_LABELS for name, labels in exported().items() if name != "up" and labels & TARGET_LABELS}
    assert clashes == {}


def test_every_shipped_query_selects_series_labels_and_values_the_service_exports():
    series, routes = exported(), route_templates()
    assert {"/align", "/v1/chat/completions", "/jobs/{job_id}", "/v1/models/{model}"} <= routes
    found = {where: problems(expr, series, routes) for where, expr in queries().items()}
    assert len(found) >= 15 and {where: errors for where, errors in found.items() if errors} == {}


def test_the_error_alert_and_the_latency_panels_cover_every_route_that_runs_a_model():
    """They matched /align and the two completions routes, not /v1/responses: its 500s and 503s never reached the alert."""
    runs_a_model = {path for path, item in create_app(Settings()).openapi()["paths"].items() if "post" in item
                    and path.startswith(("/align", "/jobs", "/v1/"))}
    assert {"/align", "/jobs", "/v1/completions", "/v1/chat/completions", "/v1/responses"} <= runs_a_model
    chosen = {where: expr for where, expr in queries().items() if "SeaServeServerErrors" in where or "latency" in where.lower()}
    assert len(chosen) >= 4, sorted(queries())
    for where, expr in chosen.items():
        for name, selector in SERIES.findall(expr):
            routes = [value for label, op, value in MATCHER.findall(selector) if label == "route" and op == "=~"]
            for pattern in routes:
                missed = {path for path in runs_a_model if not re.fullmatch(pattern, path)}
                if "latency" in where.lower():
                    missed -= {"/jobs"}  # an accepted job answers at once: its latency is not a request's
                assert not missed, (where, missed)


@pytest.mark.parametrize("mistake", [
    'max(sea_queue{service="sea-serve"})',  # no such metric
    'histogram_quantile(0.5, sum by (le) (rate(sea_request_duration_seconds_bucket{endpoint=~"/align"}[5m])))',  # a target's label
    'sum(sea_jobs_running{state="busy"})',  # no such label
    'sum(increase(sea_jobs_total{outcome="failed"}[5m]))',  # no such outcome
    'sum(rate(sea_requests_total{route="/v1/chat"}[5m]))',  # no such route
    'sum by (method) (sea_queue_depth)',  # grouping by a label the series lacks
])
def test_the_query_check_finds_mistakes(mistake):
    assert problems(mistake, exported(), route_templates())
