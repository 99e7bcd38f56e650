"""deploy/grafana/tandem.json: it loads as a Grafana dashboard, and every panel's query names only series
that Tandem really exports, with labels those metrics really carry.

The real names come from prometheus_client's REGISTRY after importing both tiers' metric modules, so a
renamed metric breaks this test instead of silently emptying a panel in production.
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

# DESIGN §7, as series names: every one must be on the dashboard.
DESIGN_METRICS = {
    "tandem_http_requests_total",
    "tandem_request_duration_seconds",
    "tandem_encode_duration_seconds",
    "tandem_feature_store_duration_seconds",
    "tandem_worker_rtt_seconds",
    "tandem_workers_ready",
    "tandem_retries_total",
    "tandem_batch_size",
    "tandem_queue_wait_seconds",
    "tandem_inference_duration_seconds",
    "tandem_queue_depth",
    "tandem_worker_requests_total",
    "tandem_model_info",
    "tandem_model_swaps_total",
    "tandem_model_load_seconds",
}
# Labels Prometheus attaches on scrape, and the bucket label of histograms.
SCRAPE_LABELS = {"instance", "job"}
# Series a metric of each type exposes (prometheus_client keeps a counter's name without ``_total``).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count"),
}


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for every ``tandem_`` metric registered in this process."""
    series: dict[str, set[str]] = {}
    # The collectors themselves, not REGISTRY.collect(): a labelled metric with no children yet exposes
    # no samples, so its labels would be invisible.
    for collector in set(REGISTRY._names_to_collectors.values()):
        if not isinstance(collector, MetricWrapperBase) or not collector._name.startswith("tandem_"):
            continue
        labels = set(collector._labelnames)
        for suffix in SUFFIXES[collector._type]:
            name = collector._name + suffix
            series[name] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, rows' nested panels included."""
    found = []
    for panel in dashboard()["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            found += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return found


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btandem_[a-zA-Z0-9_:]+", expr))


def test_registry_holds_what_design_lists():
    series = exported_series()
    for name in DESIGN_METRICS:
        assert name in series or f"{name}_bucket" in series, name


def test_dashboard_is_importable_grafana_json():
    d = dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids = []
    for p in d["panels"]:
        ids.append(p["id"])
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${" + var["name"] + "}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    assert len(set(ids)) == len(ids)


def test_every_query_names_only_real_series():
    series = exported_series()
    for title, expr in expressions():
        names = metric_names(expr)
        assert names, (title, expr)
        unknown = names - set(series)
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which no Tandem process exports"


def test_every_design_metric_is_on_the_dashboard():
    used = set().union(*(metric_names(e) for _, e in expressions()))
    for name in DESIGN_METRICS:
        assert {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} & used, f"{name} is on no panel"


def test_queries_parse_and_use_real_labels():
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser for the PromQL syntax check")
    series = exported_series()

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
            used = {m.name for m in sel.matchers.matchers}
            assert used <= series.get(sel.name, set()) | SCRAPE_LABELS, f"{title!r}: {sel.name} has no label {used}"
        check(ast, title)
