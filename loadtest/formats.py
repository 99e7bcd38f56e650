"""Model formats: what serving a model logged the ordinary MLflow way costs, per flavour, against ONNX.

    python -m loadtest.formats [--quick] [--json OUT] [--write-doc]

- **Engine** (in process): for a scikit-learn pipeline, XGBoost, LightGBM and a custom pyfunc, logged with
  MLflow and loaded by the worker's own ``load_version``, rows/s at batch 1 and 64 of the library on a
  frame (and on numpy for the tree libraries: their floor), MLflow's full ``predict``, and the runner path
  as a worker's executor runs it (one-row Arrow record batches, ``runners.join``, ``MLflowRunner.run``)
  with each ``call``: the evidence for the runner's per-flavour choice. The XGBoost trees also in ONNX.
- **Served**: one worker serving that XGBoost model beside the ONNX demo, one app server, real processes:
  each model's low-load p50 and the rate it holds at p99 within the SLO (the bench's search, in turns).

Threads as a worker has them on this machine. The configurations of one batch size are interleaved in
many short rounds and each one's median round reported, so a slow spell of a shared machine falls on all
of them alike and their ratios hold when the absolute figures do not. docs/benchmarks.md has the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from loadtest import engine, openloop, report, servers
from loadtest.formats_report import update_doc
from loadtest.search import find_max_rate
from shared import registry
from shared.settings import home_registry_uri

KINDS = ("sklearn", "xgboost", "lightgbm", "pyfunc")
BATCHES = (1, 64)
ONNX_DEMO = "demo"


def flavour_models() -> ModuleType:
    """``tests/flavour_models.py``, the models the flavour tests serve, imported under its own name: the
    custom pyfunc is pickled by reference to that module and shipped with the model as ``code_paths``."""
    if "flavour_models" in sys.modules:
        return sys.modules["flavour_models"]
    path = Path(__file__).resolve().parents[1] / "tests" / "flavour_models.py"
    spec = importlib.util.spec_from_file_location("flavour_models", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path} not found: run from a checkout of the repository")
    module = importlib.util.module_from_spec(spec)
    sys.modules["flavour_models"] = module
    spec.loader.exec_module(module)
    return module


def registered(uri: str, home: Path, kind: str) -> tuple[str, Path]:
    """``formats-<kind>`` trained, logged with its flavour and registered (once per registry), downloaded."""
    name = f"formats-{kind}"
    ref = registry.resolve_alias(uri, name, "production")
    if ref is None:
        flavour_models().log_and_register(uri, name, kind)
        ref = registry.resolve_alias(uri, name, "production")
    assert ref is not None
    return name, registry.download(uri, ref, home / "cache")


def time_rounds(calls: dict[str, Callable[[], Any]], rows: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Rows/s of each call, interleaved: ``rounds`` short slices each, in turn, so a slow spell of a
    shared machine falls on every configuration rather than on whichever ran during it."""
    for fn in calls.values():
        for _ in range(3):
            fn()
    per: dict[str, list[float]] = {k: [] for k in calls}
    slice_s = seconds / rounds
    for _ in range(rounds):
        for name, fn in calls.items():
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < slice_s or n < 2:
                fn()
                n += 1
            per[name].append(n * rows / elapsed)
    return {
        "best": {k: round(max(v), 1) for k, v in per.items()},
        "median": {k: round(statistics.median(v), 1) for k, v in per.items()},
    }


def onnx_session(raw: Any, width: int, threads: int) -> tuple[Any, str]:
    """The XGBoost trees in ONNX, in the worker's own ``OnnxRunner`` (its session options and threads), or
    ``(None, why not)``."""
    try:
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError:
        return None, "onnxmltools not installed (pip install onnxmltools skl2onnx)"
    booster = raw.get_booster().copy()
    booster.feature_names = None  # the converter reads features only as f0, f1, ...
    booster.feature_types = None
    model = onnxmltools.convert_xgboost(
        booster, initial_types=[("input", FloatTensorType([None, width]))], target_opset=15
    )
    from ml_worker.runners import OnnxRunner

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "xgb.onnx"
        path.write_bytes(model.SerializeToString())
        runner = OnnxRunner(path, device="cpu", intra_op_threads=threads)
    return runner, f"onnxmltools {onnxmltools.__version__}"


def measure_kind(uri: str, home: Path, kind: str, seconds: float, rounds: int, threads: int) -> dict[str, Any]:
    """One flavour: every path of :data:`PATHS` that applies, at each of :data:`BATCHES`."""
    from ml_worker.mlflow_runner import DIRECT_FLAVOURS
    from ml_worker.versions import load_version

    fm = flavour_models()
    name, folder = registered(uri, home, kind)
    runner: Any = load_version(name, "1", folder, max_batch_size=max(BATCHES)).runner
    model = runner.model
    x, _ = fm.frame(max(BATCHES), seed=3)  # rows the model never saw
    x = fm.numeric(x) if kind in ("xgboost", "lightgbm") else x
    out: dict[str, Any] = {"kind": kind, "flavour": runner.flavour, "chosen_call": runner.call}
    direct = getattr(model, "_predict_fn", None) if runner.flavour in DIRECT_FLAVOURS else None
    onnx = None
    if kind == "xgboost":
        raw = model.get_raw_model()
        onnx, out["onnx_conversion"] = onnx_session(raw, x.shape[1], threads)
        if onnx is not None:  # the same trees, or the comparison means nothing
            got = onnx.run(x.to_numpy(np.float32))["probabilities"][:, 1]
            out["onnx_max_abs_diff"] = float(np.abs(got - raw.predict_proba(x)[:, 1]).max())
    by_batch = {}
    for b in BATCHES:
        calls = paths(kind, runner, x.head(b).reset_index(drop=True), direct, onnx)
        by_batch[str(b)] = time_rounds(calls, b, seconds, rounds)
    runner._predict = direct if runner.call == "direct" else model.predict
    out["rows_per_s"] = {b: r["median"] for b, r in by_batch.items()}
    out["rows_per_s_best"] = {b: r["best"] for b, r in by_batch.items()}
    out["ratios"] = {b: ratios(r["median"], runner.call) for b, r in by_batch.items()}
    return out


def paths(kind: str, runner: Any, df: Any, direct: Any, onnx: Any) -> dict[str, Callable[[], Any]]:
    """One batch's calls, by :data:`PATHS` name. The runner's start from one-row Arrow record batches, as
    the app server sends them, and do what ``scheduler._start``'s job does: one request as is, several
    joined, then ``run`` (``to_pandas``, the call, the outputs)."""
    from ml_worker.runners import join
    from ml_worker.versions import _plain
    from shared.signature import to_record_batch

    model = runner.model
    rows = [{c: _plain(v) for c, v in row.items()} for row in df.to_dict("records")]
    requests = [to_record_batch([row], runner.schema) for row in rows]

    def via_runner(fn: Callable[[Any], Any]) -> Callable[[], Any]:
        def call() -> Any:
            runner._predict = fn
            return runner.run(requests[0] if len(requests) == 1 else join(requests))

        return call

    calls: dict[str, Callable[[], Any]] = {}
    if kind == "pyfunc":
        python_model = model.unwrap_python_model()
        calls["library"] = lambda: python_model.predict(None, df)
    else:
        raw = model.get_raw_model()
        calls["library"] = lambda: raw.predict(df)
    if kind in ("xgboost", "lightgbm"):
        numbers = df.to_numpy(np.float64)  # prepared outside the timing: the library's floor
        booster = raw.get_booster().inplace_predict if kind == "xgboost" else raw.booster_.predict
        calls["library_numpy"] = lambda: booster(numbers)
    calls["mlflow_pyfunc"] = lambda: model.predict(df)
    calls["to_pandas"] = lambda: (requests[0] if len(requests) == 1 else join(requests)).to_pandas()
    if direct is not None:
        calls["runner_direct"] = via_runner(direct)
    calls["runner_pyfunc"] = via_runner(model.predict)
    if onnx is not None:
        floats = df.to_numpy(np.float32)
        calls["onnx"] = lambda: onnx.run(floats)
    return calls


def ratios(rates: dict[str, float], chosen: str) -> dict[str, Any]:
    """The comparisons the issue asks for, from one batch size's rows/s."""

    def over(a: str, b: str) -> float | None:
        return round(rates[a] / rates[b], 2) if rates.get(a) and rates.get(b) else None

    faster = None
    if "runner_direct" in rates:
        faster = "direct" if rates["runner_direct"] >= rates["runner_pyfunc"] else "pyfunc"
    tandem = "runner_direct" if chosen == "direct" else "runner_pyfunc"
    return {
        "faster_call": faster,
        "direct_over_pyfunc": over("runner_direct", "runner_pyfunc"),
        "runner_over_library": over(tandem, "library"),
        "runner_over_mlflow_pyfunc": over(tandem, "mlflow_pyfunc"),
        "onnx_over_library_numpy": over("onnx", "library_numpy"),
        "onnx_over_runner": over("onnx", tandem),
    }


class Turns:
    """Steps of several searches taken one at a time, in turn, so the same spell of a shared machine
    falls on each model's steps alike (a model whose search has ended leaves the rotation)."""

    def __init__(self, names: list[str]) -> None:
        self._queue = deque(names)
        self._cond = threading.Condition()

    @contextmanager
    def turn(self, name: str) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._queue[0] == name)
        try:
            yield
        finally:
            with self._cond:
                self._queue.rotate(-1)
                self._cond.notify_all()

    def leave(self, name: str) -> None:
        with self._cond:
            self._queue.remove(name)
            self._cond.notify_all()


def served(uri: str, starts: dict[str, float], ctx: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Held rate within the SLO and low-load p50 of each model (``starts``: name -> first rate of its
    search), one worker and one app server for all."""
    names = list(starts)
    server = servers.start_tandem(
        "formats", uri, ",".join(names), ctx["logs"], ctx["server_cpus"],
        max_batch_size=64, max_latency_ms=10.0, batcher="adaptive", intra_op_threads=0,
    )  # fmt: skip
    try:
        server.wait_ready()
        bodies = request_bodies(server, names)
        urls = [f"{server.base_url}/v1/models/{n}/predict" for n in names]
        openloop.run_many([(u, bodies[n], 20.0) for u, n in zip(urls, names, strict=True)], 1.0)  # warm paths
        low = openloop.run_many(
            [(u, bodies[n], args.low_rate / len(names)) for u, n in zip(urls, names, strict=True)],
            args.low_s, poisson=True, warmup_s=0.5,
        )  # fmt: skip
        turns = Turns(list(names))

        def search(name: str, url: str) -> tuple[Any, list[Any]]:
            def step(rate: float) -> dict[str, Any]:
                with turns.turn(name):
                    before = server.batch_totals()
                    s = openloop.run(url, bodies[name], rate, ctx["step_s"], warmup_s=ctx["warmup_s"])
                    after = server.batch_totals()
                    server.settle()
                if before and after and after[1] > before[1]:
                    s["mean_batch_size"] = round((after[0] - before[0]) / (after[1] - before[1]), 2)
                print(f"  {name:<18} {rate:>7.0f}/s  p99 {s['p99_ms']} ms  errors {s['errors']}", file=sys.stderr)
                return s

            try:
                return find_max_rate(step, starts[name], args.slo_p99_ms, max_steps=ctx["max_steps"])
            finally:
                turns.leave(name)

        with ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(search, n, u) for n, u in zip(names, urls, strict=True)]
            found = [f.result() for f in futures]
    finally:
        server.stop()
    results = []
    for name, low_s, (best, steps) in zip(names, low, found, strict=True):
        b = best.summary if best else {}
        results.append({
            "model": name,
            "format": "ONNX (Tandem feature spec)" if name == ONNX_DEMO else "XGBoost (MLflow flavour)",
            "low_load": {"rate": round(args.low_rate / len(names), 1), "p50_ms": low_s["p50_ms"],
                         "p99_ms": low_s["p99_ms"], "ok": low_s["ok"], "errors": low_s["errors"]},
            "max_rate": best.rate if best else 0.0,
            "p50_ms": b.get("p50_ms"), "p99_ms": b.get("p99_ms"), "mean_batch_size": b.get("mean_batch_size"),
            "steps": [[s.rate, s.summary["p99_ms"], s.summary["errors"]] for s in steps],
        })  # fmt: skip
    return results


def start_rate(kinds: list[dict[str, Any]], cap: float) -> float:
    """The XGBoost search's first rate: half what its runner does one row at a time, at most ``cap``. A
    guess well inside capacity saves steps, nothing more; the ONNX demo's single row is too cheap to
    bound anything, so its search starts at ``cap``."""
    xgb = next((k for k in kinds if k["kind"] == "xgboost"), None)
    one = xgb["rows_per_s"]["1"].get(f"runner_{xgb['chosen_call']}") if xgb else None
    return float(round(min(cap, 0.5 * one))) if one else cap


def request_bodies(server: servers.Server, names: list[str], timeout_s: float = 90.0) -> dict[str, bytes]:
    """One-row request bodies from each model's served input example, once every model is loaded."""
    import json

    deadline = time.monotonic() + timeout_s
    while True:
        _, text = servers.http_get(f"{server.base_url}/v1/models", timeout=10)
        models = {m["name"]: m for m in json.loads(text).get("models", []) if m.get("version")}
        if all(n in models and models[n].get("input_example") for n in names):
            return {n: json.dumps({"instances": models[n]["input_example"][:1]}).encode() for n in names}
        if time.monotonic() > deadline:
            raise TimeoutError(f"models not all served within {timeout_s:.0f} s:\n{server.log_text()[-3000:]}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.formats", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short timings and steps: under about 3 minutes")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ", ".join(KINDS))
    ap.add_argument("--engine-s", type=float, help="seconds per path and batch size (default 1.5, quick 0.5)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds the engine seconds are cut into")
    ap.add_argument("--no-served", action="store_true", help="the engine part only")
    ap.add_argument("--slo-p99-ms", type=float, default=50.0)
    ap.add_argument("--start-rate", type=float, default=800.0, help="first rate of each served search")
    ap.add_argument("--step-s", type=float, help="measured seconds per search step (default: the bench's)")
    ap.add_argument("--warmup-s", type=float, help="unmeasured seconds before each step")
    ap.add_argument("--max-steps", type=int, help="steps per served search (default: the bench's)")
    ap.add_argument("--low-rate", type=float, default=50.0, help="low load, req/s over both models")
    ap.add_argument("--low-s", type=float, help="seconds of low load (default 6, quick 3)")
    ap.add_argument("--demo-epochs", type=int, help="train the ONNX demo this long (0: untrained, same cost)")
    ap.add_argument("--home", type=Path, help="registry and cache to reuse (default: a fresh temporary one)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--write-doc", action="store_true", help="update the generated block of --doc")
    args = ap.parse_args(argv)
    from loadtest.bench import bench_context
    from ml_worker.runners import default_intra_op_threads, pin_openmp_threads

    threads = default_intra_op_threads("cpu")  # before bench_context pins this process to the client CPU
    pin_openmp_threads(threads)  # before any tree library loads, as `tandem worker` does
    t0 = time.monotonic()
    ctx = bench_context(args.quick)
    ctx["step_s"] = args.step_s or ctx["step_s"]
    ctx["warmup_s"] = args.warmup_s if args.warmup_s is not None else ctx["warmup_s"]
    ctx["max_steps"] = args.max_steps or ctx["max_steps"]
    args.low_s = args.low_s or (3.0 if args.quick else 6.0)
    seconds = args.engine_s or (0.5 if args.quick else 1.5)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    result: dict[str, Any] = {"machine": ctx["machine"], "quick": args.quick, "slo_p99_ms": args.slo_p99_ms}
    result.update(threads=threads, engine_s_per_path=seconds, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="tandem-formats-") as tmp:
        home = args.home or Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        uri = home_registry_uri(home)
        with engine.on_cpus(ctx["server_cpus"]):
            result["engine"] = [measure_kind(uri, home, k, seconds, args.rounds, threads) for k in kinds]
        if not args.no_served:
            from tandem.demo import register_demo

            if registry.resolve_alias(uri, ONNX_DEMO, "production") is None:
                register_demo(uri, "small", epochs=args.demo_epochs, name=ONNX_DEMO)
            name, _ = registered(uri, home, "xgboost")
            starts = {name: start_rate(result["engine"], args.start_rate), ONNX_DEMO: args.start_rate}
            result["served"] = served(uri, starts, ctx, args)
            xgb, onnx = result["served"]
            result["served_xgboost_over_onnx"] = round(xgb["max_rate"] / max(onnx["max_rate"], 1.0), 2)
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    report.emit(result, args.json)
    if args.write_doc:
        update_doc(args.doc, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
