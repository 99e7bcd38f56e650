"""The GPU check: one command that proves the CUDA path end to end and measures it, within a time budget.

    python -m loadtest.gpu_check [--device auto|cpu|cuda] [--quick] [--out DIR] [--budget-s S]

``loadtest/gpu_check.sh`` installs what the GPU path needs and then runs this. A GPU machine is lent
rarely and briefly, so everything happens in one call, in this order, each phase bounded:

1. The ``cuda``-marked tests (tests/gpu) on the device: a worker process that says ``device=cuda`` in
   its heartbeat and ``tandem_model_info``, answers equal to a CPU session's, several batches in
   flight, a hot swap under load; the runner's I/O binding.
2. Per model (``large``, and ``xlarge`` sized for a GPU): the raw engine ceiling (a bare ONNX Runtime
   session on the device, rows/s at its best batch), Tandem's runner at the same batch sizes, the
   rows/s one worker serves over its wire with that batch as its largest (``served.py``), and the
   bench's HTTP search for ``baseline`` and ``tandem_adaptive``, both with the model on the device.

On the CPU (``--device cpu``, or no GPU) the same code runs as a dry run, seconds long (``--quick``,
which ``--full`` turns off), and CI runs it so this command works the day a GPU is there. The result goes to
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` after every phase, so a run cut short still reports
what it measured; what the budget left out is listed as skipped. Exit status 0 only when the tests
passed and every phase that ran worked on the device asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from loadtest import bench, engine, gpu_report, served, servers

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each measurement runs: a GPU run fits in its lease, a quick CPU run in seconds."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    seconds_per_size: float
    served_s: float
    served_warmup_s: float
    http_step_s: float
    http_warmup_s: float
    http_max_steps: int
    tests_timeout_s: float
    register: dict[str, dict[str, int]] = field(default_factory=dict)


GPU_BATCH_SIZES = (1, 4, 16, 64, 256, 512, 1024, 2048)
UNTRAINED = {"rows": 2000, "epochs": 0}  # figures need no accuracy; training would cost the lease time

PLANS = {
    "cuda": Plan(("large", "xlarge"), GPU_BATCH_SIZES, 0.3, 4.0, 1.0, 2.5, 1.0, 7, 240.0, {"*": UNTRAINED}),
    "cpu": Plan(("large",), engine.BATCH_SIZES, 0.3, 4.0, 1.0, 2.5, 1.0, 7, 240.0, {"*": UNTRAINED}),
    "quick": Plan(("small",), (1, 4, 16, 64), 0.05, 1.0, 0.3, 0.8, 0.3, 2, 150.0, {"*": UNTRAINED}),
}
NEED_S = {"model": 30.0, "ceiling": 20.0, "served": 30.0, "http": 45.0}
"""Rough cost of each step on a GPU machine: a step starts only with this much of the budget left."""


class OutOfTime(Exception):
    """The check's budget ran out in the middle of a step."""


@dataclass
class Check:
    """The run's state: the result written after every step, and the budget it must stay within."""

    device: str
    requested: str
    plan: Plan
    out: Path
    deadline: float
    result: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.result["_t0"], 1)
        public = {k: v for k, v in self.result.items() if not k.startswith("_")}
        (self.out / "gpu_check.json").write_text(json.dumps(public, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(gpu_report.render(public) + "\n")

    @contextlib.contextmanager
    def step(self, name: str, need_s: float, into: dict[str, Any]) -> Iterator[bool]:
        """Run a step if the budget still holds ``need_s``; record an error or a skip under ``name``."""
        if self.left() < need_s:
            left = f"{self.left():.0f} s of the budget left"
            self.result["skipped"].append(f"{name}: {left}, about {need_s:.0f} s needed")
            yield False
            return
        print(f"[gpu_check] {name} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
        try:
            yield True
        except OutOfTime:
            self.result["skipped"].append(f"{name}: stopped, the budget ran out")
            raise
        except Exception as exc:  # one failed step must not cost the figures of the others
            into.setdefault("errors", {})[name.rpartition(" ")[2]] = f"{type(exc).__name__}: {exc}"[:3000]
            self.result["errors"].append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            self.write()


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and driver of the first GPU, from nvidia-smi; None where there is none."""
    query = "name,memory.total,memory.used,driver_version"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, total, used, driver = (s.strip() for s in out.stdout.splitlines()[0].split(","))
    return {"name": name, "memory_total_mib": float(total), "memory_used_mib": float(used), "driver": driver}


def run_tests(check: Check) -> dict[str, Any]:
    """The cuda-marked tests on the device, in a pytest of their own (a crash there is a result here)."""
    junit = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "cuda", "--device", check.device]
    argv += ["-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}", "--timeout=120"]
    timeout = max(10.0, min(check.plan.tests_timeout_s, check.left() - 5))
    t0 = time.monotonic()
    with open(check.out / "pytest.log", "w") as log:
        try:
            proc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    command = " ".join(argv[2:8])  # pytest tests/gpu -m cuda --device D: what to run again by hand
    summary: dict[str, Any] = {"command": command, "exit_code": code, "seconds": round(time.monotonic() - t0)}
    if code is None:
        summary["timed_out_after_s"] = round(timeout)
    summary.update(junit_summary(junit))
    return summary


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and one line per test from pytest's JUnit XML (empty counts if pytest never wrote it)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    cases: list[dict[str, str]] = []
    if not path.exists():
        return {**counts, "cases": cases}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        counts[outcome] += 1
        cases.append({"name": case.get("name", "?"), "outcome": outcome, "message": message})
    return {**counts, "cases": cases}


def runner_figures(model: bench.Model, device: str, check: Check, cpus: set[int]) -> dict[str, Any]:
    """Tandem's own runner (on CUDA: I/O binding) at the ceiling's batch sizes, and how far its answers
    are from a CPU session's on the example rows and on random rows."""
    import onnxruntime as ort

    from ml_worker.runners import OnnxRunner

    with engine.on_cpus(cpus):
        runner = OnnxRunner(model.onnx, device=device)
        figures = engine.rows_per_s(
            lambda x: runner.run(x), model.row, check.plan.batch_sizes, check.plan.seconds_per_size
        )
    cpu = ort.InferenceSession(str(model.onnx), providers=["CPUExecutionProvider"])
    name, out = cpu.get_inputs()[0].name, cpu.get_outputs()[0].name
    rng = np.random.default_rng(0)
    x = np.concatenate([model.row, rng.normal(size=(63, model.row.shape[1])).astype(np.float32)])
    diff = float(np.max(np.abs(runner.run(x)[out] - cpu.run([out], {name: x})[0])))
    return {**figures, "device": runner.device, "max_abs_diff_vs_cpu": diff}


def served_figures(model: bench.Model, device: str, batch: int, check: Check, ctx: dict[str, Any]) -> dict[str, Any]:
    """One worker (and its app server, idle) with ``batch`` as its largest batch, saturated over ZeroMQ."""
    plan = check.plan
    rows_per_request = max(1, batch // 4)
    worker_args = ("--max-queue", str(64 * batch))
    server = servers.start_tandem(
        "served",
        model.uri,
        model.name,
        ctx["logs"],
        ctx["server_cpus"],
        max_batch_size=batch,
        max_latency_ms=10.0,
        batcher="adaptive",
        intra_op_threads=0,
        device=device,
        worker_args=worker_args,
    )
    try:
        server.wait_ready(min(servers.READY_TIMEOUT_S, max(10.0, check.left())))
        x = np.ascontiguousarray(np.repeat(model.row, rows_per_request, axis=0))
        before = server.batch_totals()
        figures = served.measure(
            server.worker_endpoint or "",
            model.name,
            x,
            window=16,
            seconds=plan.served_s,
            warmup_s=plan.served_warmup_s,
        )
        after = server.batch_totals()
        if before and after and after[1] > before[1]:
            figures["mean_batch_size"] = round((after[0] - before[0]) / (after[1] - before[1]), 1)
        gpu = gpu_info()
        figures["gpu_memory_used_mib"] = gpu["memory_used_mib"] if gpu else None
    finally:
        server.stop()
    return {"max_batch_size": batch, **figures}


def bench_model(size: str, check: Check, ctx: dict[str, Any], home: Path) -> None:
    entry: dict[str, Any] = {"size": size}
    check.result["models"].append(entry)
    device, cpus = check.device, ctx["server_cpus"]
    with check.step(f"{size} model", NEED_S["model"], entry) as go:
        if not go:
            return
        register = check.plan.register.get(size, check.plan.register.get("*", {}))
        model = bench.Model(home, size, **register)
        entry.update(model=model.name, version=model.version, onnx_mb=round(model.onnx.stat().st_size / 2**20, 1))
    if "model" not in entry:
        return
    with check.step(f"{size} ceiling", NEED_S["ceiling"], entry) as go:
        if go:
            threads = len(cpus) if device == "cpu" else 1
            entry["ceiling"] = engine.ceiling(
                model.onnx,
                model.row,
                cpus,
                intra_op_threads=threads,
                seconds_per_size=check.plan.seconds_per_size,
                device=device,
                batch_sizes=check.plan.batch_sizes,
            )
            ctx["ceiling"] = entry["ceiling"]
    with check.step(f"{size} runner", NEED_S["ceiling"], entry) as go:
        if go:
            entry["runner"] = runner_figures(model, device, check, cpus)
    best = entry.get("ceiling", {}).get("best_batch_size", 64)
    with check.step(f"{size} served", NEED_S["served"], entry) as go:
        if go:
            entry["served"] = served_figures(model, device, best, check, ctx)
    if "ceiling" not in entry:
        return
    args = SimpleNamespace(slo_p99_ms=50.0)
    entry["http"] = []
    for config in ("baseline", "tandem_adaptive"):
        with check.step(f"{size} http {config}", NEED_S["http"], entry) as go:
            if go:
                entry["http"].append(bench.measure_config(config, model, args, ctx))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--quick", action="store_true", help="seconds-long figures: the dry run, the CPU's default")
    ap.add_argument("--full", action="store_true", help="on the CPU: the large model's figures, not the dry run")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ".tandem/gpu-check"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="the whole check, tests and bench")
    ap.add_argument("--models", help="comma list of demo sizes (default: large,xlarge on CUDA; large on CPU)")
    ap.add_argument("--home", type=Path, default=Path(".tandem/gpu-check-home"), help="registry and model cache")
    ap.add_argument("--install-report", type=Path, help="JSON the installer wrote (gpu_check.sh)")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    device = engine.resolve_device(args.device)
    quick = args.quick or (device == "cpu" and not args.full)
    plan = PLANS["quick"] if quick else PLANS[device]
    if args.models:
        plan = dataclasses.replace(plan, models=tuple(m for m in args.models.split(",") if m))
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(device, args.device, plan, args.out, t0 + args.budget_s)
    check.result.update(
        _t0=t0,
        device=device,
        requested=args.device,
        quick=quick,
        budget_s=args.budget_s,
        gpu=gpu_info(),
        machine=bench.machine(set(), os.sched_getaffinity(0)),  # measured again once the CPUs are split
        cuda_problem=engine.cuda_problem(),
        install=read_json(args.install_report),
        tests=None,
        models=[],
        skipped=[],
        errors=[],
    )

    def out_of_time(_signum: int, _frame: Any) -> None:
        raise OutOfTime

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(args.budget_s + 20)))  # the steps check the budget; this is the backstop
    try:
        if args.skip_tests:
            check.result["skipped"].append("tests: --skip-tests")
        else:
            tests: dict[str, Any] = {}
            with check.step("tests", 30.0, tests) as go:
                if go:
                    tests.update(run_tests(check))
            check.result["tests"] = tests or None
        if device == "cuda" and check.result["cuda_problem"]:
            check.result["errors"].append(f"no CUDA session opens: {check.result['cuda_problem']}")
            check.result["skipped"].append("bench: nothing to measure on CUDA")
            return finish(check, args.out)
        ctx = bench.bench_context(True, device=device)
        ctx.update(step_s=plan.http_step_s, warmup_s=plan.http_warmup_s, max_steps=plan.http_max_steps)
        check.result["machine"] = ctx["machine"]
        args.home.mkdir(parents=True, exist_ok=True)
        for size in plan.models:
            bench_model(size, check, ctx, args.home)
    except OutOfTime:
        print("[gpu_check] out of time: the figures so far are written", file=sys.stderr)
    return finish(check, args.out)


def finish(check: Check, out: Path) -> int:
    signal.alarm(0)
    check.result["ok"] = verdict(check.result)
    check.write()
    print((out / "gpu_check.md").read_text())
    return 0 if check.result["ok"] else 1


def verdict(result: dict[str, Any]) -> bool:
    """Tests passed (and some ran), no step failed, and every runner and worker measured said it ran on
    the device the check is for."""
    tests = result.get("tests") or {}
    tests_ok = tests.get("exit_code") == 0 and tests.get("passed", 0) > 0 and not tests.get("failed")
    if "tests: --skip-tests" in result.get("skipped", []):
        tests_ok = True
    seen = [m[k]["device"] for m in result["models"] for k in ("runner", "served") if k in m]
    return tests_ok and not result["errors"] and all(d == result["device"] for d in seen)


def read_json(path: Path | None) -> Any:
    if path is None or not path.exists():
        return None
    with contextlib.suppress(ValueError):
        return json.loads(path.read_text())
    return {"unreadable": str(path)}


if __name__ == "__main__":
    sys.exit(main())
