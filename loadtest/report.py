"""Turn a bench result into the markdown table of docs/benchmarks.md.

The generated part of the document sits between marker comments, one block per model and mode, so a
re-run replaces its own figures and leaves the hand-written explanation (and other runs) alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Every loadtest command's ending: the JSON summary on stdout, and in ``path`` when one is given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


def ratios(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """``tandem_adaptive``'s max rate over each other configuration's (None where one is missing or 0)."""
    by = {r["config"]: r["max_rate"] for r in results}
    top = by.get("tandem_adaptive")
    return {
        f"tandem_adaptive_over_{c}": (round(top / by[c], 2) if top is not None and by.get(c) else None)
        for c in ("baseline", "baseline_per_core", "tandem_batch1")
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
    return str(v)


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    mode = "--quick" if result.get("quick") else "full"
    lines = [
        f"Model `{result['model']}`, {mode} run, SLO p99 ≤ {_fmt(result['slo_p99_ms'])} ms with zero errors, "
        f"took {_fmt(result.get('elapsed_s'))} s.",
        "",
        f"Machine (measured): {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"{m['os']}; Python {m['python']}, ONNX Runtime {m['onnxruntime']}, numpy {m['numpy']}. "
        f"Load generator on CPU(s) {m['client_cpus']}, every configuration on CPU(s) {m['server_cpus']}. "
        f"Load average {m['loadavg_at_start']} at start, {m.get('loadavg_at_end')} at end.",
        "",
        "| config | max rate (req/s) | p50 (ms) | p99 (ms) | mean batch size | generator CPU (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        name = r["config"] + (f" ({r['batcher']})" if r.get("batcher") and r["batcher"] != "adaptive" else "")
        lines.append(
            f"| {name} | {_fmt(r['max_rate'])} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
            f"{_fmt(r['mean_batch_size'])} | {_fmt(r.get('client_cpu_pct'))} |"
        )
    e = result["engine"]
    lines += [
        "",
        f"Raw engine ceiling: **{_fmt(e['rows_per_s'])} rows/s** at batch {e['best_batch_size']} "
        f"(rows/s by batch size: {', '.join(f'{k}: {_fmt(v)}' for k, v in e['by_batch_size'].items())}).",
        "",
        "Ratios of `tandem_adaptive`'s max rate: "
        + ", ".join(f"{k.removeprefix('tandem_adaptive_over_')} {_fmt(v)}x" for k, v in result["ratios"].items())
        + ".",
    ]
    o = result.get("overhead")
    if o:
        lines += [
            "",
            f"Serving overhead, small model at {_fmt(o['rate'])} req/s: `/predict` p50 "
            f"{_fmt(o['tandem_adaptive_p50_ms'])} ms (Tandem) and {_fmt(o['baseline_p50_ms'])} ms (baseline) against "
            f"{_fmt(o['direct_p50_ms'])} ms for the bare session on the same encoded row: Tandem's overhead is "
            f"**{_fmt(o['overhead_p50_ms'])} ms** at p50, the split costs {_fmt(o['split_cost_p50_ms'])} ms "
            "over the in-process baseline.",
        ]
    return "\n".join(lines)


def update_doc(path: Path, result: dict[str, Any]) -> None:
    key = f"{result['model']}{'-quick' if result.get('quick') else ''}"
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    block = f"{begin}\n{render(result)}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n## Measured: {key}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
