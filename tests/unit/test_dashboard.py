"""deploy/grafana/tandem.json: it loads as a Grafana dashboard, every panel's query names only series that
Tandem really exports, with labels those metrics really carry, and every per-model series is filtered by the
dashboard's ``model`` variable.

The real names and labels come from prometheus_client's REGISTRY after importing both tiers' metric modules,
so a renamed metric or a dropped label breaks this test instead of silently emptying a panel in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import app_server.metrics  # noqa: F401 - registers the app server's metrics
import ml_worker.metrics  # noqa: F401 - registers the worker's metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tandem.json"

# What an operator must be able to see, as metric names (app server, then worker): each must be exported and
# be on at least one panel. A metric added to either tier that operators need belongs here.
DASHBOARD_METRICS = {
    "tandem_http_requests_total",
    "tandem_request_duration_seconds",
    "tandem_encode_duration_seconds",
    "tandem_feature_store_duration_seconds",
    "tandem_worker_rtt_seconds",
    "tandem_workers_ready",
    "tandem_retries_total",
    "tandem_model_workers",
    "tandem_batch_size",
    "tandem_queue_wait_seconds",
    "tandem_inference_duration_seconds",
    "tandem_queue_depth",
    "tandem_worker_requests_total",
    "tandem_model_info",
    "tandem_model_swaps_total",
    "tandem_model_load_seconds",
    "tandem_registry_poll_errors_total",
    "tandem_model_resident_bytes",
    "tandem_resident_budget_bytes",
    "tandem_model_evictions_total",
    "tandem_model_on_demand_loads_total",
    "tandem_variant_requests_total",
    "tandem_variant_request_duration_seconds",
    "tandem_canary_fallbacks_total",
    "tandem_shadow_requests_total",
    "tandem_shadow_abs_diff",
    "tandem_policy_percent",
    "tandem_policy_errors_total",
    "tandem_worker_shadow_shed_total",
    "tandem_feature_drift_psi",
    "tandem_prediction_drift_psi",
    "tandem_payload_log_written_total",
    "tandem_payload_log_dropped_total",
}
# Labels Prometheus attaches on scrape.
SCRAPE_LABELS = {"instance", "job"}
# Series a metric of each type exposes (prometheus_client keeps a counter's name without ``_total``).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count"),
}
MODEL_SELECTOR = "$model"


def collectors() -> list[MetricWrapperBase]:
    # The collectors themselves, not REGISTRY.collect(): a labelled metric with no children yet exposes
    # no samples, so its labels would be invisible.
    return [
        c
        for c in set(REGISTRY._names_to_collectors.values())
        if isinstance(c, MetricWrapperBase) and c._name.startswith("tandem_")
    ]


def series_of(collector: MetricWrapperBase) -> list[str]:
    return [collector._name + suffix for suffix in SUFFIXES[collector._type]]


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for every ``tandem_`` metric registered in this process (``le`` on buckets)."""
    series: dict[str, set[str]] = {}
    for collector in collectors():
        for name in series_of(collector):
            series[name] = set(collector._labelnames) | ({"le"} if name.endswith("_bucket") else set())
    return series


def known_series() -> dict[str, set[str]]:
    """What the dashboard may use: what the registry exports."""
    return exported_series()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    return [p for panel in dashboard()["panels"] for p in [panel, *panel.get("panels", [])]]


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btandem_[a-zA-Z0-9_:]+", expr))


def families(names: set[str]) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names} | names


def test_registry_holds_every_dashboard_metric():
    series = known_series()
    for name in DASHBOARD_METRICS:
        assert name in series or f"{name}_bucket" in series, name


def test_dashboard_is_importable_grafana_json():
    d = dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids = []
    for p in panels():
        ids.append(p["id"])
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${" + var["name"] + "}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    assert len(set(ids)) == len(ids)


def test_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:  # a collapsed row's nested panels are laid out when it opens
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at x={x} y={y}"
                cells[(x, y)] = p["title"]


def test_model_variable_lists_served_models():
    (var,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "model"]
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    assert query == "label_values(tandem_model_info, model)"
    assert "model" in known_series()["tandem_model_info"]
    assert var["type"] == "query" and var["multi"] and var["includeAll"]
    assert var["datasource"]["uid"] == "${datasource}"


def test_every_query_names_only_real_series():
    series = known_series()
    for title, expr in expressions():
        names = metric_names(expr)
        assert names, (title, expr)
        unknown = names - set(series)
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which no Tandem process exports"


def test_every_dashboard_metric_is_on_the_dashboard():
    used = families(set().union(*(metric_names(e) for _, e in expressions())))
    for name in DASHBOARD_METRICS:
        assert name in used, f"{name} is on no panel"


def test_queries_parse_and_use_real_labels():
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser for the PromQL syntax check")
    series = known_series()

    def selectors(node: Any) -> list[Any]:
        if isinstance(node, promql.VectorSelector):
            return [node]
        found = []
        for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
            if getattr(node, attr, None) is not None:
                found += selectors(getattr(node, attr))
        for arg in getattr(node, "args", None) or []:
            found += selectors(arg)
        return found

    def check(node: Any, title: str) -> None:
        if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            inner = set().union(*(series.get(s.name, set()) for s in selectors(node.expr))) | SCRAPE_LABELS
            assert set(node.modifier.labels) <= inner, f"{title!r}: grouping by {node.modifier.labels}, not on {inner}"
        for attr in ("lhs", "rhs", "expr", "param"):
            if getattr(node, attr, None) is not None:
                check(getattr(node, attr), title)
        for arg in getattr(node, "args", None) or []:
            check(arg, title)

    for title, expr in expressions():
        ast = promql.parse(expr.replace("$__rate_interval", "5m"))  # Grafana's variable, substituted on query
        for sel in selectors(ast):
            matchers = sel.matchers.matchers
            used = {m.name for m in matchers}
            assert used <= series.get(sel.name, set()) | SCRAPE_LABELS, f"{title!r}: {sel.name} has no label {used}"
            # A series carrying ``model`` follows the model picker, so a panel never mixes in unselected models.
            if "model" in series.get(sel.name, set()):
                assert any(
                    m.name == "model" and m.op == promql.MatchOp.Re and m.value == MODEL_SELECTOR for m in matchers
                ), f'{title!r}: {sel.name} is not filtered by model=~"{MODEL_SELECTOR}"'
        check(ast, title)
