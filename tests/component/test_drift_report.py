"""``tandem drift report``: a payload log folder written by the real file sink, the demo model's reference
profile from a real registry, and the HTML parsed back."""

from __future__ import annotations

import time
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from app_server.payload_sinks import FileSink
from tandem.cli import app as cli_app
from tandem.demo_data import synthesize_fraud
from tandem.drift_report import parse_since


class Sections(HTMLParser):
    """The report's column sections in order, with their charts' bar counts."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.notes: list[str] = []
        self._in_note = False
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append({"feature": a["data-feature"], "psi": float(a["data-psi"]), "bars": 0, "svg": 0})
        elif tag == "svg" and self.sections:
            self.sections[-1]["svg"] += 1
        elif tag == "rect" and self.sections:
            self.sections[-1]["bars"] += 1
        elif tag == "p" and a.get("class") == "note":
            self._in_note = True
        if tag in ("script", "link", "img") or any(k in ("src", "href") for k in a):
            self.external.append(tag)

    def handle_data(self, data):
        if self._in_note:
            self.notes.append(data)
            self._in_note = False


def records(n: int, seed: int, version: str, when: float, shift: float = 1.0) -> list[dict]:
    cols, _ = synthesize_fraud(n, np.random.default_rng(seed))
    out = []
    for i in range(n):
        instance = {k: v[i].item() for k, v in cols.items()}
        instance["amount"] *= shift
        out.append({"time": when, "request_id": f"r{i}", "model": "demo", "version": version,
                    "variant": "production", "instance": instance, "entities_resolved": False,
                    "prediction": 0.01 + 0.001 * (i % 10), "latency_ms": 3.0})  # fmt: skip
    return out


def test_the_report_names_the_drifted_feature_first_with_charts(demo_registry, tmp_path):
    log = tmp_path / "log"
    sink = FileSink(log)
    now = time.time()
    sink.write(records(500, seed=1, version="1", when=now - 7200))  # before --since: left out
    sink.write(records(1500, seed=2, version="1", when=now, shift=100.0))
    sink.write(records(50, seed=3, version="9", when=now))  # a version the registry does not have
    sink.write([{**records(1, seed=4, version="1", when=now)[0], "model": "churn"}])  # another model
    sink.close()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(
        cli_app,
        ["drift", "report", "demo", "--log", str(log), "--since", "1h", "--out", str(out),
         "--registry-uri", demo_registry.uri],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "demo v1: 1500 instances; amount" in result.output
    page = Sections()
    page.feed(out.read_text())
    assert page.external == []  # self-contained
    columns = [s for s in page.sections if s["feature"] != "prediction"]
    assert columns[0]["feature"] == "amount" and columns[0]["psi"] > 0.25
    assert all(s["psi"] < 0.1 for s in columns[1:]), columns
    assert len(columns) == 9 and all(s["svg"] == 1 and s["bars"] >= 4 for s in columns)
    assert page.sections[0]["feature"] == "prediction"  # the predictions' chart leads the version
    assert any("v9 is not in the registry" in n for n in page.notes)


def test_since_takes_durations_and_iso_times():
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 172_800
    assert parse_since("2026-12-01T00:00:00Z") == 1796083200.0
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_since("yesterday")
