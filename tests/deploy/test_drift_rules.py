"""The drift alert rules (a PrometheusRule in the monitoring component): rendered with the overlay that
uses the component, each rule names series the app server really exports, on the PSI bands 0.1 and 0.25."""

from __future__ import annotations

import re

from k8s_manifests import named, render
from prometheus_client import REGISTRY

import app_server.metrics  # noqa: F401 - registers the app server's metrics


def rules() -> dict[str, dict]:
    obj = named(render("gpu-monitoring"), "PrometheusRule", "tandem-drift")
    return {r["alert"]: r for group in obj["spec"]["groups"] for r in group["rules"]}


def test_drift_rules_warn_at_0_1_and_page_at_0_25_on_exported_series():
    found = rules()
    exported = set(REGISTRY._names_to_collectors)
    for alert in found.values():
        for metric in re.findall(r"\btandem_[a-z_]+", alert["expr"]):
            assert metric in exported, (alert["alert"], metric)
    for name, line, severity in [
        ("TandemFeatureDrift", "0.1", "warning"),
        ("TandemFeatureDriftHigh", "0.25", "critical"),
        ("TandemPredictionDrift", "0.1", "warning"),
        ("TandemPredictionDriftHigh", "0.25", "critical"),
    ]:
        assert found[name]["expr"].endswith(f"> {line}") and found[name]["labels"]["severity"] == severity
    assert "TandemPayloadLogDropping" in found
