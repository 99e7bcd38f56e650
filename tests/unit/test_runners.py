"""OnnxRunner on a tiny model built in the test: results, shapes, threads, and failure modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ml_worker import runners
from ml_worker.runners import OnnxRunner, default_intra_op_threads
from shared.errors import ModelError

W = np.array([[0.5], [-1.0], [2.0], [0.25]], dtype=np.float32)
B = np.array([0.1], dtype=np.float32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sigmoid(x @ W + b) with a dynamic batch dimension, the shape of a served classifier."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logit0"]),
            helper.make_node("Add", ["logit0", "B"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["probability"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(model, str(path))
    return path


def expected(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ W + B)))


def test_runs_variable_batch_sizes(model_path: Path) -> None:
    runner = OnnxRunner(model_path, device="cpu")
    assert (runner.device, runner.input_name, runner.input_width, runner.output_names) == (
        "cpu",
        "input",
        4,
        ["probability"],
    )
    rng = np.random.default_rng(0)
    for rows in (1, 3, 64, 1, 17):
        x = rng.normal(size=(rows, 4)).astype(np.float32)
        out = runner.run(x)["probability"]
        assert out.shape == (rows, 1)
        np.testing.assert_allclose(out, expected(x), rtol=1e-5, atol=1e-6)


def test_outputs_of_one_batch_survive_the_next(model_path: Path) -> None:
    # The server sends output slices zero-copy; a runner that reused its output buffer would
    # overwrite a reply still in flight.
    runner = OnnxRunner(model_path, device="cpu")
    first = runner.run(np.ones((8, 4), np.float32))["probability"]
    kept = first.copy()
    runner.run(np.full((8, 4), -3.0, np.float32))
    np.testing.assert_array_equal(first, kept)


def test_threads_leave_a_core_for_the_event_loop(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runners.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert default_intra_op_threads("cpu") == 1
    monkeypatch.setattr(runners.os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert default_intra_op_threads("cpu") == 7
    assert default_intra_op_threads("cuda") == 1
    assert OnnxRunner(model_path, device="cpu").intra_op_threads == 7
    assert OnnxRunner(model_path, device="cpu", intra_op_threads=2).intra_op_threads == 2


def test_unloadable_file_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxRunner(bad, device="cpu")


def test_cuda_demanded_without_a_gpu_is_a_model_error(model_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime build has CUDA; the GPU path is exercised on a GPU machine")
    with pytest.raises(ModelError, match="cuda"):
        OnnxRunner(model_path, device="cuda")
