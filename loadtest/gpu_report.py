"""The GPU check's JSON as markdown: a verdict, what was installed and tested, one table row per model.

Kept apart from the check itself so it can be tested on canned results, and so a partial result (a
run cut short, a step that failed) still renders: every figure that is missing prints as ``-``.
"""

from __future__ import annotations

from typing import Any

HEADER = (
    "| model | weights (MB) | engine ceiling rows/s (batch) | Tandem runner rows/s (batch) "
    "| served rows/s (max batch; mean batch) | served / ceiling | max abs diff vs CPU "
    "| baseline req/s | tandem_adaptive req/s (mean batch) | adaptive / baseline |"
)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            return f"{v:.1e}"
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def http_rate(entry: dict[str, Any], config: str) -> tuple[float | None, float | None]:
    """Max rate and mean batch of one HTTP configuration, or (None, None) when it was not measured."""
    for r in entry.get("http") or []:
        if r.get("config") == config:
            return r.get("max_rate"), r.get("mean_batch_size")
    return None, None


def model_row(m: dict[str, Any]) -> str:
    ceiling, runner, served = m.get("ceiling") or {}, m.get("runner") or {}, m.get("served") or {}
    base, _ = http_rate(m, "baseline")
    adaptive, batch = http_rate(m, "tandem_adaptive")
    cells = [
        f"`{m.get('model', m.get('size'))}`",
        fmt(m.get("onnx_mb")),
        f"{fmt(ceiling.get('rows_per_s'))} ({fmt(ceiling.get('best_batch_size'))})",
        f"{fmt(runner.get('rows_per_s'))} ({fmt(runner.get('best_batch_size'))})",
        f"{fmt(served.get('rows_per_s'))} ({fmt(served.get('max_batch_size'))}; {fmt(served.get('mean_batch_size'))})",
        ratio(served.get("rows_per_s"), ceiling.get("rows_per_s")),
        fmt(runner.get("max_abs_diff_vs_cpu")),
        fmt(base),
        f"{fmt(adaptive)} ({fmt(batch)})",
        ratio(adaptive, base),
    ]
    return "| " + " | ".join(cells) + " |"


def describe_install(install: Any) -> str:
    if not isinstance(install, dict):
        return "no report" if install is None else str(install)
    what = install.get("source") or "nothing installed"
    if install.get("problem"):
        what += f", FAILED: {install['problem']}"
    return f"{what} ({fmt(install.get('seconds'))} s); ONNX Runtime {install.get('onnxruntime', '?')}"


def render(result: dict[str, Any]) -> str:
    gpu, machine = result.get("gpu"), result.get("machine") or {}
    where = f"{gpu['name']} ({fmt(gpu['memory_total_mib'])} MiB, driver {gpu['driver']})" if gpu else "no GPU"
    verdict = {True: "passed", False: "FAILED", None: "running"}[result.get("ok")]
    mode = " (quick)" if result.get("quick") else ""
    lines = [
        f"## GPU check on {result.get('device')}{mode}: {verdict}",
        "",
        f"{where}; {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores; ONNX Runtime "
        f"{machine.get('onnxruntime', '?')} with {', '.join(machine.get('onnxruntime_providers') or []) or '?'}. "
        f"Took {fmt(result.get('elapsed_s'))} s of a {fmt(result.get('budget_s'))} s budget.",
    ]
    if result.get("cuda_problem"):
        lines += ["", f"No CUDA here: {result['cuda_problem']}"]
    lines += ["", f"Install: {describe_install(result.get('install'))}."]
    tests = result.get("tests")
    if tests:
        lines += [
            "",
            f"Tests (`{tests.get('command', 'pytest')}`): {tests.get('passed', 0)} passed, "
            f"{tests.get('failed', 0)} failed, {tests.get('skipped', 0)} skipped in {fmt(tests.get('seconds'))} s"
            + (f", stopped after {tests['timed_out_after_s']} s" if tests.get("timed_out_after_s") else "")
            + ".",
        ]
        not_passed = [c for c in tests.get("cases", []) if c["outcome"] != "passed"]
        lines += [f"- {c['outcome']}: `{c['name']}` {c['message']}".rstrip() for c in not_passed]
    if result.get("models"):
        lines += ["", HEADER, "| --- |" + " ---: |" * 9]
        lines += [model_row(m) for m in result["models"]]
    for title, key in (("Skipped", "skipped"), ("Errors", "errors")):
        if result.get(key):
            lines += ["", f"{title}:"] + [f"- {s}" for s in result[key]]
    return "\n".join(lines)
