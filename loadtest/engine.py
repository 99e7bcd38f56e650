"""The bare engine: what ONNX Runtime alone does on the servers' CPUs, the yardstick for serving.

Two figures: the *ceiling* (rows/s of one session at its best batch size, with the same threads the
worker gets) that no server can beat, and the *direct* p50 of one encoded row, which the serving
overhead is measured against. Both run on ``server_cpus`` (the bench's own process moves there for the
measurement and back afterwards) so they see exactly the CPUs the servers get.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def cuda_problem() -> str | None:
    """Why no model can run on CUDA here, or None when one can. A real session is opened: ONNX Runtime
    lists its CUDA provider wherever the GPU package is installed, GPU and CUDA libraries or not."""
    from ml_worker.runners import warm_runtime
    from shared.errors import ModelError

    try:
        warm_runtime("cuda")
    except ModelError as exc:
        return exc.message
    return None


def resolve_device(wanted: str) -> str:
    """``auto`` is ``cuda`` where a CUDA session opens, else ``cpu``; ``cpu`` and ``cuda`` stay."""
    if wanted != "auto":
        return wanted
    return "cuda" if cuda_problem() is None else "cpu"


@contextlib.contextmanager
def on_cpus(cpus: set[int]) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def session(onnx_path: Path, intra_op_threads: int, device: str = "cpu") -> Any:
    """Built like the worker's runner (full graph optimisation, sequential, one inter-op thread), on the
    CPU or on CUDA; a CUDA session that ONNX Runtime quietly opened on the CPU is an error, not a figure."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = intra_op_threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(onnx_path), options, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise RuntimeError(f"asked for {providers[0]}, ONNX Runtime gave {sess.get_providers()}")
    return sess


def ceiling(
    onnx_path: Path,
    x_row: np.ndarray,
    cpus: set[int],
    *,
    intra_op_threads: int,
    seconds_per_size: float = 0.4,
    device: str = "cpu",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> dict[str, Any]:
    """Rows/s at each batch size (best of a timed loop) and the best of them. On CUDA each call copies
    its input to the device and its outputs back, as a caller of ``session.run`` with numpy arrays pays."""
    with on_cpus(cpus):
        sess = session(onnx_path, intra_op_threads, device)
        name = sess.get_inputs()[0].name
        return rows_per_s(lambda x: sess.run(None, {name: x}), x_row, batch_sizes, seconds_per_size)


def rows_per_s(
    run: Callable[[np.ndarray], Any], x_row: np.ndarray, batch_sizes: tuple[int, ...], seconds_per_size: float
) -> dict[str, Any]:
    """Rows/s of ``run`` at each batch size (a timed loop after three warm-up calls) and the best of them."""
    per_size: dict[str, float] = {}
    for b in batch_sizes:
        x = np.ascontiguousarray(np.repeat(x_row, b, axis=0))
        for _ in range(3):
            run(x)
        runs, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds_per_size or runs < 3:
            run(x)
            runs += 1
        per_size[str(b)] = round(runs * b / elapsed, 1)
    best = max(per_size, key=lambda k: per_size[k])
    return {"rows_per_s": per_size[best], "best_batch_size": int(best), "by_batch_size": per_size}


def direct_p50_ms(
    onnx_path: Path, x_row: np.ndarray, cpus: set[int], *, intra_op_threads: int, n: int = 2000, device: str = "cpu"
) -> float:
    """Median time of ``session.run`` on one encoded row: what a caller would pay with no server at all."""
    with on_cpus(cpus):
        sess = session(onnx_path, intra_op_threads, device)
        name = sess.get_inputs()[0].name
        for _ in range(50):
            sess.run(None, {name: x_row})
        times = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            sess.run(None, {name: x_row})
            times[i] = time.perf_counter() - t0
    return round(float(np.median(times)) * 1000.0, 4)
