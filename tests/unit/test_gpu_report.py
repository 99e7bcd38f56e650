"""The GPU check's verdict, its JUnit reading and its markdown, on canned results (no GPU, no processes)."""

from __future__ import annotations

import copy
from pathlib import Path

from loadtest.gpu_check import junit_summary, verdict
from loadtest.gpu_report import model_row, render

MODEL = {
    "size": "large",
    "model": "demo-large",
    "onnx_mb": 48.2,
    "ceiling": {"rows_per_s": 400_000.0, "best_batch_size": 1024},
    "runner": {"rows_per_s": 380_000.0, "best_batch_size": 1024, "device": "cuda", "max_abs_diff_vs_cpu": 2.5e-5},
    "served": {"rows_per_s": 200_000.0, "max_batch_size": 1024, "mean_batch_size": 1010.5, "device": "cuda"},
    "http": [
        {"config": "baseline", "max_rate": 1_000.0, "mean_batch_size": 1.0},
        {"config": "tandem_adaptive", "max_rate": 4_000.0, "mean_batch_size": 40.0},
    ],
}
RESULT = {
    "device": "cuda",
    "requested": "auto",
    "quick": False,
    "budget_s": 440.0,
    "elapsed_s": 301.0,
    "gpu": {"name": "NVIDIA H200", "memory_total_mib": 143771.0, "memory_used_mib": 0.0, "driver": "580.1"},
    "install": {"source": "carried wheels", "seconds": 40, "onnxruntime": "1.31.1"},
    "tests": {"command": "pytest tests/gpu", "exit_code": 0, "passed": 8, "failed": 0, "skipped": 0, "cases": []},
    "models": [MODEL],
    "skipped": [],
    "errors": [],
}


def test_a_model_row_puts_served_against_the_ceiling_and_adaptive_against_baseline():
    cells = [c.strip() for c in model_row(MODEL).strip("|").split("|")]
    assert cells[0] == "`demo-large`"
    assert cells[2] == "400,000 (1024)"
    assert cells[4] == "200,000 (1024; 1,010)"
    assert cells[5] == "0.50x"
    assert cells[6] == "2.5e-05"
    assert cells[8:] == ["4,000 (40.00)", "4.00x"]


def test_what_was_not_measured_prints_as_a_dash():
    cells = [c.strip() for c in model_row({"size": "xlarge"}).strip("|").split("|")]
    assert cells[0] == "`xlarge`" and set(cells[1:]) <= {"-", "- (-)", "- (-; -)"}


def test_verdict_needs_passing_tests_no_error_and_the_device_everywhere():
    assert verdict(RESULT)
    failed = copy.deepcopy(RESULT)
    failed["tests"].update(failed=1, exit_code=1)
    assert not verdict(failed)
    none_ran = copy.deepcopy(RESULT)
    none_ran["tests"].update(passed=0, skipped=8)
    assert not verdict(none_ran)
    on_cpu = copy.deepcopy(RESULT)
    on_cpu["models"][0]["served"]["device"] = "cpu"  # a worker that quietly fell back to the CPU
    assert not verdict(on_cpu)
    broken = copy.deepcopy(RESULT)
    broken["errors"].append("large served: RuntimeError: boom")
    assert not verdict(broken)


def test_the_report_says_what_failed_and_what_the_budget_left_out():
    result = copy.deepcopy(RESULT)
    result.update(ok=False, errors=["xlarge served: TimeoutError"], skipped=["xlarge http baseline: 10 s left"])
    result["tests"]["cases"] = [{"name": "test_swap", "outcome": "failed", "message": "AssertionError: 1 != 2"}]
    text = render(result)
    assert text.startswith("## GPU check on cuda: FAILED")
    assert "NVIDIA H200 (143,771 MiB, driver 580.1)" in text
    assert "- failed: `test_swap` AssertionError: 1 != 2" in text
    assert "- xlarge served: TimeoutError" in text and "- xlarge http baseline: 10 s left" in text
    assert "| `demo-large` |" in text


def test_a_result_cut_short_still_renders():
    text = render({"device": "cuda", "ok": None, "models": [], "skipped": [], "errors": []})
    assert text.startswith("## GPU check on cuda: running") and "no GPU" in text


def test_junit_counts_and_names_every_outcome(tmp_path: Path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="a" name="test_ok" time="1"/>'
        '<testcase classname="a" name="test_bad" time="1"><failure message="assert 1 == 2&#10;more">x</failure>'
        "</testcase>"
        '<testcase classname="a" name="test_err" time="1"><error message="fixture broke">x</error></testcase>'
        '<testcase classname="a" name="test_skip" time="0"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    s = junit_summary(xml)
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 2, 1)
    assert {c["name"]: (c["outcome"], c["message"]) for c in s["cases"]} == {
        "test_ok": ("passed", ""),
        "test_bad": ("failed", "assert 1 == 2"),
        "test_err": ("failed", "fixture broke"),
        "test_skip": ("skipped", "no GPU"),
    }
    assert junit_summary(tmp_path / "missing.xml")["passed"] == 0
