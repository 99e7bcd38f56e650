"""The bench's report: the markdown it writes into docs/benchmarks.md from a result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest import report


def result(model: str = "large", *, quick: bool = True, overhead: dict[str, Any] | None = None) -> dict[str, Any]:
    results = [
        {"config": "baseline", "max_rate": 900.0, "p50_ms": 3.1, "p99_ms": 41.0, "mean_batch_size": None},
        {"config": "baseline_per_core", "max_rate": 1000.0, "p50_ms": 3.0, "p99_ms": 44.0, "mean_batch_size": None},
        {"config": "tandem_batch1", "max_rate": 700.0, "p50_ms": 4.2, "p99_ms": 39.0, "mean_batch_size": 1.0},
        {"config": "tandem_adaptive", "max_rate": 4500.0, "p50_ms": 9.5, "p99_ms": 45.2, "mean_batch_size": 55.4},
    ]
    return {
        "machine": {
            "cpu_model": "Test CPU",
            "cores": 2,
            "memory_gib": 23.5,
            "gpu": None,
            "os": "Linux 6.1",
            "python": "3.11.7",
            "onnxruntime": "1.32.0",
            "numpy": "2.3.0",
            "client_cpus": [0],
            "server_cpus": [0, 1],
            "loadavg_at_start": [0.0, 0.0, 0.0],
            "loadavg_at_end": [1.5, 0.8, 0.3],
        },
        "slo_p99_ms": 50.0,
        "model": model,
        "quick": quick,
        "engine": {"rows_per_s": 6200.0, "best_batch_size": 128, "by_batch_size": {"1": 1400.0, "128": 6200.0}},
        "overhead": overhead,
        "results": results,
        "ratios": report.ratios(results),
        "elapsed_s": 131.0,
    }


OVERHEAD = {
    "model": "small",
    "rate": 50.0,
    "direct_p50_ms": 0.0062,
    "tandem_adaptive_p50_ms": 1.556,
    "baseline_p50_ms": 0.564,
    "overhead_p50_ms": 1.55,
    "split_cost_p50_ms": 0.992,
}


def test_render_has_every_configuration_the_ratios_and_the_overhead():
    text = report.render(result(overhead=OVERHEAD))
    for line in ("| baseline | 900 |", "| tandem_adaptive | 4,500 | 9.50 | 45.20 | 55.40 |"):
        assert line in text
    assert "baseline 5.00x, baseline_per_core 4.50x, tandem_batch1 6.43x" in text
    assert "overhead is **1.55 ms** at p50, the split costs 0.99 ms" in text


def test_update_doc_replaces_only_its_own_block(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nHand-written explanation.\n")
    report.update_doc(doc, result(overhead=OVERHEAD))
    report.update_doc(doc, result("small", quick=False))
    first = doc.read_text()
    assert first.count("<!-- bench:large-quick:begin -->") == 1
    assert first.count("<!-- bench:small:begin -->") == 1
    rerun = result(overhead=OVERHEAD)
    rerun["results"][3]["max_rate"] = 4700.0
    report.update_doc(doc, rerun)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written explanation.\n")
    assert text.count("<!-- bench:large-quick:begin -->") == 1
    block = text.split("<!-- bench:large-quick:begin -->")[1].split("<!-- bench:large-quick:end -->")[0]
    assert "| tandem_adaptive | 4,700 |" in block and "| tandem_adaptive | 4,500 |" not in block
    assert text.split("<!-- bench:small:begin -->")[1] == first.split("<!-- bench:small:begin -->")[1]
