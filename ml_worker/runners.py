"""Model runners: a model file in, ``run(x) -> {output name: array}`` out.

Runners are called from the worker's executor threads only (``executor.py``); with several batches
in flight, from several at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.errors import ModelError

logger = logging.getLogger(__name__)


class Runner(Protocol):
    device: str
    """Where it really runs: ``cuda`` or ``cpu``."""
    input_name: str
    input_width: int | None
    output_names: list[str]
    output_shapes: list[list[int]]
    """Per output, its shape with unknown (dynamic) dimensions as -1."""

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


def join(xs: list[Any]) -> Any:
    """The inputs of a batch's requests as one: arrays concatenated, or record batches as one table
    (their columns are not copied; the runner's ``to_pandas`` makes the one copy the flavour needs)."""
    if isinstance(xs[0], np.ndarray):
        return np.concatenate(xs)
    import pyarrow as pa

    return pa.Table.from_batches(xs)


ORT_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
"""numpy type of each ONNX Runtime tensor type a device output buffer may be allocated as."""

MAX_CACHED_SHAPES = 256
"""Device buffer sets kept for distinct batch sizes (one per size up to ``max_batch_size``)."""


def default_intra_op_threads(device: str) -> int:
    """Intra-op threads when the setting is 0: all usable cores but one on CPU, one on CUDA.

    The worker's event loop (ZeroMQ, msgpack, concatenating and splitting batches, replies) runs on
    the same cores as the model. Giving the model every core makes the loop wait for a time slice
    while a batch runs, which delays admissions and the next batch's dispatch: on this 2-core box one
    intra-op thread leaves a core for the loop (and for a co-located app server). On CUDA the CPU
    threads only launch kernels and run the odd host-side op, so one is enough.
    """
    if device == "cuda":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))  # respects taskset / cgroup cpusets
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def pin_openmp_threads(intra_op_threads: int = 0) -> None:
    """Give OpenMP (XGBoost, LightGBM, scikit-learn's tree code, torch) the ONNX intra-op thread count,
    unless ``OMP_NUM_THREADS`` is set already. Tree libraries default to every core, which on a worker
    starves its event loop exactly as :func:`default_intra_op_threads` explains. Set in the environment
    before any of them loads: OpenMP reads it once, and each executor thread starts from it (a
    ``omp_set_num_threads`` call would only reach the thread that made it)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(intra_op_threads or default_intra_op_threads("cpu")))


def warm_runtime(device: str = "auto", intra_op_threads: int = 0) -> None:
    """Create and run one tiny ONNX Runtime session, so the runtime's one-time set-up (about 10-30 MB:
    allocators, thread pools, kernel registries) is paid before any version's memory is measured: it
    would otherwise be charged to whichever model loads first."""
    import onnx.helper as h

    eye = h.make_tensor("w", 1, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = h.make_graph(
        [h.make_node("MatMul", ["input", "w"], ["output"])],
        "warm",
        [h.make_tensor_value_info("input", 1, [None, 4])],
        [h.make_tensor_value_info("output", 1, [None, 4])],
        [eye],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "warm.onnx"
        path.write_bytes(model.SerializeToString())
        OnnxRunner(path, device=device, intra_op_threads=intra_op_threads).run(np.ones((2, 4), np.float32))


class OnnxRunner:
    """ONNX Runtime session, with its options chosen for a batching server.

    - Graph optimisation ``ORT_ENABLE_ALL`` (constant folding, GEMM/activation fusions, layout
      transforms), paid once at load.
    - Sequential execution with one inter-op thread: a served network is mostly a chain of GEMMs,
      and inter-op threads would only contend with intra-op ones.
    - Intra-op threads: see :func:`default_intra_op_threads` (an explicit setting wins).
    - No spinning: idle intra-op threads normally busy-wait for the next op, which on a small box
      burns the very core the event loop needs between batches. Between two batches there is an
      idle gap anyway (replies, the next dispatch), so spinning buys nothing here.
    - CPU: ``session.run`` wraps the contiguous float32 input without a copy, and the CPU arena
      allocator recycles output buffers. Outputs are not written into a reused buffer because the
      server sends slices of them to callers zero-copy; a reused buffer would be overwritten by the
      next batch while ZeroMQ may still be sending the previous one.
    - CUDA: I/O binding with one device input and output buffer per batch size, allocated once and
      reused (the input is copied into it in place), so a batch allocates no device memory; the
      outputs are then copied to fresh host arrays, for the same reason as on CPU.
    """

    def __init__(self, path: Path, *, device: str = "auto", intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        wants_cuda = providers[0] == "CUDAExecutionProvider"
        options.intra_op_num_threads = intra_op_threads or default_intra_op_threads("cuda" if wants_cuda else "cpu")
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        # get_available_providers() lists CUDA even without a GPU; only the session knows for sure.
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise ModelError("--device cuda, but ONNX Runtime could not create a CUDA session")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        width = inp.shape[-1] if len(inp.shape) == 2 else None
        self.input_width = width if isinstance(width, int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = [[d if isinstance(d, int) else -1 for d in o.shape] for o in self.session.get_outputs()]
        self.intra_op_threads = options.intra_op_num_threads
        self._ort = ort
        self._binding = self.session.io_binding() if self.device == "cuda" else None
        # Per-output trailing shape, when static: lets CUDA outputs go into preallocated buffers.
        tails = [o.shape[1:] for o in self.session.get_outputs()]
        self._out_tails = [tuple(t) if all(isinstance(d, int) for d in t) else None for t in tails]
        # Each preallocated output buffer in the type the session declares (a label output is int64):
        # an unknown type leaves that output to the runtime, like a dynamic shape.
        types = [ORT_TYPES.get(o.type) for o in self.session.get_outputs()]
        self._out_tails = [t if dt is not None else None for t, dt in zip(self._out_tails, types, strict=True)]
        self._out_types = [dt or np.float32 for dt in types]
        self._device_buffers: dict[int, tuple[Any, list[Any]]] = {}
        # One binding and one set of device buffers: with several batches in flight, two model
        # threads would overwrite each other's inputs and outputs without this.
        self._cuda_lock = threading.Lock()

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self._binding is not None:
            with self._cuda_lock:
                return self._run_cuda(np.ascontiguousarray(x))
        outputs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outputs, strict=True))

    def _run_cuda(self, x: np.ndarray) -> dict[str, np.ndarray]:
        rows = x.shape[0]
        buffers = self._device_buffers.get(rows)
        if buffers is None or buffers[0].shape() != list(x.shape):
            if len(self._device_buffers) >= MAX_CACHED_SHAPES:  # odd sizes of oversized requests
                self._device_buffers.clear()
            make = self._ort.OrtValue.ortvalue_from_shape_and_type
            outs = [
                make((rows, *t), dt, "cuda", 0) if t is not None else None
                for t, dt in zip(self._out_tails, self._out_types, strict=True)
            ]
            buffers = (make(x.shape, x.dtype, "cuda", 0), outs)
            self._device_buffers[rows] = buffers
        x_dev, outs = buffers
        x_dev.update_inplace(x)  # host -> existing device buffer, no allocation
        binding = self._binding
        binding.bind_ortvalue_input(self.input_name, x_dev)
        for name, out in zip(self.output_names, outs, strict=True):
            if out is None:  # dynamic trailing shape: let the runtime allocate it on the device
                binding.bind_output(name, "cuda", 0)
            else:
                binding.bind_ortvalue_output(name, out)
        self.session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        binding.clear_binding_outputs()
        return dict(zip(self.output_names, results, strict=True))


class TorchScriptRunner:
    """TorchScript module under ``torch.inference_mode()`` (no autograd bookkeeping)."""

    def __init__(
        self, path: Path, *, device: str = "auto", input_name: str = "input", output_name: str = "probability"
    ) -> None:
        import torch

        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if device == "cuda" and not use_cuda:
            raise ModelError("--device cuda, but torch sees no CUDA device")
        self._torch = torch
        self._device = torch.device("cuda" if use_cuda else "cpu")
        self.device = self._device.type
        try:
            self.module = torch.jit.load(str(path), map_location=self._device).eval()
        except Exception as exc:
            raise ModelError(f"torch cannot load {path.name}: {exc}") from exc
        self.input_name = input_name
        self.input_width = None
        self.output_names = [output_name]
        self.output_shapes = [[-1, -1]]  # TorchScript does not declare it

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            out = self.module(self._torch.from_numpy(np.ascontiguousarray(x)).to(self._device))
        return {self.output_names[0]: out.detach().cpu().numpy()}
