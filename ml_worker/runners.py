"""Model runners: a model file in, ``run(x) -> {output name: array}`` out.

Runners are called from the worker's executor thread only, one batch at a time per runner.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from shared.errors import ModelError

logger = logging.getLogger(__name__)


class Runner(Protocol):
    device: str
    """Where it really runs: ``cuda`` or ``cpu``."""
    input_name: str
    input_width: int | None
    output_names: list[str]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


class OnnxRunner:
    """ONNX Runtime session.

    Session options: full graph optimisation (constant folding, fusions) once at load; sequential
    execution with one inter-op thread, since an MLP is a chain and extra inter-op threads only contend;
    intra-op threads left to the runtime (one per core) unless set, because batches are where the
    parallelism is.
    """

    def __init__(self, path: Path, *, device: str = "auto", intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = intra_op_threads
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
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

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outputs, strict=True))


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

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            out = self.module(self._torch.from_numpy(np.ascontiguousarray(x)).to(self._device))
        return {self.output_names[0]: out.detach().cpu().numpy()}
