"""The ``loadtest.formats`` tables as markdown, and their block in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATHS = ("library", "library_numpy", "mlflow_pyfunc", "to_pandas", "runner_direct", "runner_pyfunc", "onnx")
"""The measured paths, in the table's column order."""


def _n(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def render(result: dict[str, Any]) -> str:
    """The generated part of the doc's section: machine, engine table, served table."""
    m = result["machine"]
    lines = [
        f"{'--quick' if result['quick'] else 'Full'} run, took {_n(result['elapsed_s'])} s. Machine (measured): "
        f"{m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; {m['os']}; "
        f"Python {m['python']}, ONNX Runtime {m['onnxruntime']}. Load average {m['loadavg_at_start']} at start, "
        f"{m.get('loadavg_at_end')} at end. Model threads: {result['threads']}.",
        "",
        "| format (runner's call) | batch | library, frame | library, numpy | MLflow pyfunc | Arrow to frame "
        "| runner, direct | runner, pyfunc | ONNX | faster call | direct / pyfunc | runner / library "
        "| ONNX / library numpy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for k in result["engine"]:
        for b, rates in k["rows_per_s"].items():
            r = k["ratios"][b]
            cells = [_n(rates.get(p)) for p in PATHS]
            ratio = [_n(r[c]) for c in ("direct_over_pyfunc", "runner_over_library", "onnx_over_library_numpy")]
            row = [f"{k['kind']} ({k['chosen_call']})", b, *cells, r["faster_call"] or "-", *ratio]
            lines.append("| " + " | ".join(row) + " |")
    onnx = next((k for k in result["engine"] if k.get("onnx_conversion")), {})
    diff = f", probabilities within {onnx['onnx_max_abs_diff']:.1e} of XGBoost's" if "onnx_max_abs_diff" in onnx else ""
    conversion = onnx.get("onnx_conversion", "not run")
    lines += ["", f"Rows/s, median of {result['rounds']} interleaved rounds; ONNX: {conversion}{diff}."]
    if result.get("served"):
        lines += [
            "",
            "| model | format | held rate (req/s) | p50 (ms) | p99 (ms) | mean batch | low-load p50 (ms) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in result["served"]:
            cells = [s["max_rate"], s["p50_ms"], s["p99_ms"], s["mean_batch_size"], s["low_load"]["p50_ms"]]
            lines.append(f"| `{s['model']}` | {s['format']} | " + " | ".join(_n(c) for c in cells) + " |")
        lines += ["", f"Held rate, XGBoost over ONNX: {_n(result['served_xgboost_over_onnx'])}x."]
    return "\n".join(lines)


def update_doc(path: Path, result: dict[str, Any]) -> None:
    """Replace the block between the markers (one, quick or full), leaving the text around it alone."""
    begin, end = "<!-- bench:formats:begin -->", "<!-- bench:formats:end -->"  # the block says which run
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{render(result)}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)
