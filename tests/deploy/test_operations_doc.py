"""docs/operations.md names only metrics the code defines and paths that exist."""

from __future__ import annotations

import re

import pytest
from k8s_manifests import REPO

DOC = (REPO / "docs" / "operations.md").read_text()
METRIC_SOURCES = [REPO / "app_server" / "metrics.py", REPO / "ml_worker" / "metrics.py"]


def test_every_metric_in_the_runbook_exists() -> None:
    defined = set(re.findall(r'"(tandem_\w+)"', "".join(p.read_text() for p in METRIC_SOURCES)))
    named = {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"\btandem_\w+", DOC)}
    assert named, "the runbook names no metric"
    assert named - defined == set()


def test_every_repository_path_in_the_runbook_exists() -> None:
    paths = set(re.findall(r"\b((?:deploy/k8s|deploy/docker|docs|shared|tests)/[\w./-]*\w)", DOC))
    assert "deploy/k8s/overlays/gpu" in paths
    assert [p for p in sorted(paths) if not (REPO / p).exists()] == []


def test_every_alert_expression_parses() -> None:
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser for the PromQL syntax check")
    section = DOC.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| Tandem")]
    assert rows, "the Alerts section has no alert"
    for row in rows:
        name, expr = re.match(r"\| (\w+) \| `(.+?)` \|", row).groups()
        try:
            promql.parse(expr.replace("\\|", "|"))  # a table cell escapes the regex alternation as \|
        except ValueError as exc:
            pytest.fail(f"alert {name}: {exc}")
