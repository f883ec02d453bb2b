"""The Grafana dashboard and Prometheus alerts in istio/observability/ query what the processor exports.

A renamed metric or label would otherwise leave an empty panel or an alert that can never fire, and
nobody notices until the incident. Every metric and label in every dashboard query, variable,
legend and alert (expression and annotations) is checked against ``Metrics().registry``; PromQL is
checked for balanced brackets and known functions. ``promtool`` and ``kubectl`` are used when present.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from extproc.telemetry.metrics import Metrics

OBSERVABILITY = Path(__file__).resolve().parents[2] / "istio" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
RULES = OBSERVABILITY / "prometheus-rules.yaml"

# Labels Prometheus attaches to every scraped series (the PodMonitor keeps the metrics' own
# service/namespace with honorLabels, so those two are never target labels here).
TARGET_LABELS = frozenset({"job", "instance", "pod", "container"})
# Series not in our registry: Prometheus' own `up`, and usage-event metrics another change adds
# (their labels are not known here, so only their names are accepted).
EXTERNAL = {"up": TARGET_LABELS | {"namespace", "service", "endpoint"}}
EXTERNAL_PREFIXES = ("ai_extproc_events_",)
ANY_LABELS = frozenset({"*"})  # stands for "labels unknown": label checks are skipped

FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "day_of_month", "day_of_week", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "holt_winters", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log2",
    "log10", "max_over_time", "min_over_time", "predict_linear", "present_over_time", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "time", "timestamp", "vector",
    # aggregation operators
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
})
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                      "offset", "atan2", "inf", "nan"})
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)")
GRAFANA_RANGES = re.compile(r"\$__(?:rate_interval|interval|range)\b|\$\{__(?:rate_interval|interval|range)\}")
TEMPLATE_LABEL = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")
AGGREGATION = re.compile(r"\b(?:sum|min|max|avg|group|stddev|stdvar|count|count_values|bottomk|topk|quantile)\s*\(")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def registry_series() -> dict[str, frozenset[str]]:
    """Every series name the processor exposes, with its label names, as Prometheus stores them."""
    metrics = Metrics()
    families = {family.name: family.type for family in metrics.registry.collect()}
    series: dict[str, frozenset[str]] = {}
    for wrapper in vars(metrics).values():
        if not isinstance(wrapper, MetricWrapperBase):
            continue
        name = next(iter(wrapper.describe())).name
        assert name in families, f"{name} is not registered in Metrics().registry"
        labels = frozenset(wrapper._labelnames)  # no public accessor; stable across prometheus_client releases
        kind = families[name]
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels}
        else:
            series[name] = labels
    assert len(series) > 10, "the registry scan found too few metrics"
    return series


SERIES = registry_series()


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _strip_strings(expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def analyse(expr: str) -> tuple[dict[str, set[str]], set[str], list[str]]:
    """(metric → labels used in its selectors, labels used in by/on/... clauses, problems)."""
    problems: list[str] = []
    if not _balanced(expr):
        problems.append(f"unbalanced brackets in {expr!r}")
    text = _strip_strings(GRAFANA_RANGES.sub("5m", expr))
    grouping: set[str] = set()
    for _, labels in GROUPING.findall(text):
        grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    text = GROUPING.sub(" ", text)
    selectors: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(text):
        if not name:
            problems.append(f"selector without a metric name in {expr!r}")
            continue
        selectors.setdefault(name, set()).update(MATCHER.findall(matchers))
    text = SELECTOR.sub(lambda m: f" {m.group(1)} ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for match in IDENTIFIER.finditer(text):
        name = match.group(1)
        following = text[match.end():].lstrip()[:1]
        if following == "(":
            if name not in FUNCTIONS:
                problems.append(f"unknown function {name!r} in {expr!r}")
        elif name not in KEYWORDS:
            selectors.setdefault(name, set())
    for name, labels in selectors.items():
        known = _labels_of(name)
        if known is None:
            problems.append(f"unknown metric {name!r} in {expr!r}")
        elif known is not ANY_LABELS and labels - known:
            problems.append(f"{name} has no label(s) {sorted(labels - known)} in {expr!r}")
    known_sets = [_labels_of(name) for name in selectors]
    used = set().union(*(labels for labels in known_sets if labels))
    if known_sets and ANY_LABELS not in known_sets and grouping - used - {"le"}:
        problems.append(f"grouping by label(s) {sorted(grouping - used - {'le'})} no metric has in {expr!r}")
    return selectors, grouping, problems


def _labels_of(name: str) -> frozenset[str] | None:
    if name in SERIES:
        return SERIES[name] | TARGET_LABELS
    if name in EXTERNAL:
        return frozenset(EXTERNAL[name])
    if name.startswith(EXTERNAL_PREFIXES):
        return ANY_LABELS
    return None


def result_labels(expr: str) -> set[str]:
    """Labels an expression's result keeps: its by/on clauses; none after a plain aggregation; else its
    metrics' labels. An approximation, strict enough to catch a legend or summary naming a dropped label."""
    selectors, grouping, _ = analyse(expr)
    if grouping:
        return grouping
    if AGGREGATION.search(_strip_strings(expr)):
        return set()
    return set().union(*(_labels_of(name) or set() for name in selectors))


# --- the checker itself -----------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "problem"), [
    ("sum(rate(ai_extproc_calls_total[5m])", "unbalanced"),
    ("sum(rate(ai_extproc_calls[5m]))", "unknown metric 'ai_extproc_calls'"),
    ('sum(rate(ai_extproc_calls_total{model="x"}[5m]))', "has no label(s) ['model']"),
    ("sum by (reason) (rate(ai_extproc_calls_total[5m]))", "grouping by label(s) ['reason']"),
    ("histogram_quantile(0.9, rate(gen_ai_server_request_duration_seconds[5m]))", "unknown metric"),
    ("summ(ai_extproc_streams_in_flight)", "unknown function 'summ'"),
    ('{service="a"}', "selector without a metric name"),
])
def test_the_checker_catches_mistakes(expr: str, problem: str) -> None:
    assert any(problem in p for p in analyse(expr)[2]), analyse(expr)[2]


def test_the_checker_accepts_what_prometheus_exposes() -> None:
    ok = ('histogram_quantile(0.99, sum by (service, le) (rate(gen_ai_server_request_duration_seconds_bucket'
          '{status=~"5..", job="x"}[$__rate_interval] offset 1h))) > 1e3 and on (service) '
          'sum by (service) (ai_extproc_cost_usd_total) + absent(up{job=~".*"} == 1) '
          '+ sum(rate(ai_extproc_events_dropped_total{anything="x"}[5m]))')
    assert analyse(ok)[2] == []


@pytest.mark.parametrize(("expr", "labels"), [
    ("sum by (service, limit) (rate(ai_extproc_quota_rejections_total[5m])) > 1", {"service", "limit"}),
    ("sum(rate(ai_extproc_quota_rejections_total[5m]))", set()),
    ("ai_extproc_bulkhead_rejections_total", {"service", "namespace", *TARGET_LABELS}),
])
def test_result_labels(expr: str, labels: set[str]) -> None:
    assert result_labels(expr) == labels


# --- dashboard --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield from panel.get("panels", [])  # collapsed rows hold their panels
        if panel["type"] != "row":  # rows are headings: no datasource, no queries
            yield panel


def test_dashboard_model(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


def test_every_panel_has_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    panels = list(query_panels(dashboard))
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("datasource", {}).get("uid") == "${datasource}", panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no targets"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{panel['title']} has an empty query"
            assert target.get("datasource") == panel["datasource"], panel["title"]


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("service", "namespace"):
        query = variables[name]["query"]["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match and match.group(2) == name, query
        selectors, _, problems = analyse(match.group(1))
        assert problems == [] and set(selectors) == {"ai_extproc_calls_total"}, (query, problems)
        assert name in SERIES["ai_extproc_calls_total"]


def test_dashboard_queries_use_only_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    problems = []
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            problems += [f"{panel['title']}: {p}" for p in analyse(target["expr"])[2]]
            # A legend naming a label the query drops shows up as an empty string in every series.
            missing = set(LEGEND_LABEL.findall(target.get("legendFormat", ""))) - result_labels(target["expr"])
            if missing:
                problems.append(f"{panel['title']}: legend uses {sorted(missing)} the query does not keep")
    assert problems == []


def test_service_panels_follow_the_variables(dashboard: dict[str, Any]) -> None:
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            selectors = analyse(target["expr"])[0]
            if any("service" in SERIES.get(name, ()) for name in selectors):
                assert '$service' in target["expr"] and '$namespace' in target["expr"], panel["title"]


def test_dashboard_covers_what_operators_need(dashboard: dict[str, Any]) -> None:
    used = {name for panel in query_panels(dashboard) for target in panel["targets"]
            for name in analyse(target["expr"])[0]}
    assert {
        "gen_ai_client_token_usage_sum", "ai_extproc_cost_usd_total", "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_request_duration_seconds_count", "gen_ai_server_time_to_first_token_seconds_bucket",
        "ai_extproc_fallbacks_total", "ai_extproc_quota_rejections_total", "ai_extproc_cache_lookups_total",
        "ai_extproc_breaker_state", "ai_extproc_bulkhead_rejections_total", "ai_extproc_streams_in_flight",
        "ai_extproc_processing_seconds_bucket", "ai_extproc_calls_total",
    } <= used


# --- alerts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["spec"]["groups"] for rule in group["rules"]]


def test_rules_object(rules: dict[str, Any]) -> None:
    assert rules["apiVersion"] == "monitoring.coreos.com/v1" and rules["kind"] == "PrometheusRule"
    assert rules["metadata"]["name"] and rules["metadata"]["namespace"] == "ai-system"
    names = [rule["alert"] for rule in alert_rules(rules)]
    assert len(names) == len(set(names))
    groups = [group["name"] for group in rules["spec"]["groups"]]
    assert len(groups) == len(set(groups))
    for rule in alert_rules(rules):
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alerts_use_only_exported_metrics_and_labels(rules: dict[str, Any]) -> None:
    problems = []
    for rule in alert_rules(rules):
        problems += [f"{rule['alert']}: {p}" for p in analyse(rule["expr"])[2]]
        referenced = {label for text in rule["annotations"].values() for label in TEMPLATE_LABEL.findall(text)}
        if referenced - result_labels(rule["expr"]):
            problems.append(f"{rule['alert']}: annotations use {sorted(referenced - result_labels(rule['expr']))}, "
                            "which the expression does not keep")
    assert problems == []


def test_the_alerts_operators_asked_for(rules: dict[str, Any]) -> None:
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for rule in alert_rules(rules):
        for name in analyse(rule["expr"])[0]:
            by_metric.setdefault(name, []).append(rule)
    assert by_metric["ai_extproc_breaker_state"][0]["for"] == "5m"
    for needed in ("gen_ai_server_request_duration_seconds_count", "gen_ai_server_request_duration_seconds_bucket",
                   "gen_ai_server_time_to_first_token_seconds_bucket", "ai_extproc_fallbacks_total",
                   "ai_extproc_quota_rejections_total", "ai_extproc_cost_usd_total", "up",
                   "ai_extproc_events_dropped_total"):
        assert needed in by_metric, f"no alert on {needed}"


def test_promtool_accepts_the_rules(tmp_path: Path, rules: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (optional: the checks above cover metric and label names)")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# --- the kustomization ------------------------------------------------------------------------


def test_kustomize_builds_dashboard_configmap_rules_and_monitor() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    run = subprocess.run([kubectl, "kustomize", str(OBSERVABILITY)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(run.stdout)}
    assert set(objects) == {("ConfigMap", "ai-extproc-grafana-dashboard"), ("PrometheusRule", "ai-extproc"),
                            ("PodMonitor", "ai-extproc")}
    configmap = objects["ConfigMap", "ai-extproc-grafana-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["ai-extproc.json"]) == json.loads(DASHBOARD.read_text())
    # Without honorLabels the caller's service/namespace labels become exported_*: every query breaks.
    assert all(e["honorLabels"] for e in objects["PodMonitor", "ai-extproc"]["spec"]["podMetricsEndpoints"])
