"""The ONNX runner on the device, in this process: answers against a CPU session, outputs that outlive
the next batch, many threads at once, I/O binding's buffers (CUDA only), and outputs that are not float32."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ml_worker.runners import OnnxRunner
from shared import registry

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def runner(device: str, versions) -> OnnxRunner:
    return OnnxRunner(registry.model_files(versions["1"].folder)["onnx"], device=device)


def test_the_runner_runs_where_asked_and_answers_like_the_cpu(device, tolerance, runner, versions):
    assert runner.device == device
    rng = np.random.default_rng(4)
    for n in (1, 2, 5, 64, 257, 5):  # 5 twice: a batch size seen before
        x = rng.normal(size=(n, versions["1"].width)).astype(np.float32)
        out = runner.run(x)["probability"]
        assert out.shape == (n, 1) and out.dtype == np.float32
        np.testing.assert_allclose(out, versions["1"].expected(x), **tolerance)


def test_outputs_of_one_batch_survive_the_next(runner, versions):
    # Replies are sent zero-copy from these arrays: the next batch must not write into them.
    width = versions["1"].width
    first = runner.run(np.ones((8, width), np.float32))["probability"]
    kept = first.copy()
    runner.run(np.full((8, width), -3.0, np.float32))
    np.testing.assert_array_equal(first, kept)


def test_threads_running_at_once_get_their_own_answers(tolerance, runner, versions):
    v1, errors = versions["1"], []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in range(30):
                x = rng.normal(size=(1 + (seed + i) % 9, v1.width)).astype(np.float32)
                np.testing.assert_allclose(runner.run(x)["probability"], v1.expected(x), **tolerance)
        except Exception as exc:  # collected: an assertion in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


def test_io_binding_allocates_device_buffers_once_per_batch_size(device, versions):
    if device != "cuda":
        pytest.skip("I/O binding is the CUDA path; the CPU path hands numpy arrays to session.run")
    runner = OnnxRunner(registry.model_files(versions["1"].folder)["onnx"], device="cuda")
    width = versions["1"].width
    for n in (4, 8, 4, 8, 4):
        runner.run(np.ones((n, width), np.float32))
    buffers = runner._device_buffers
    assert sorted(buffers) == [4, 8]
    x_dev = buffers[4][0]
    runner.run(np.zeros((4, width), np.float32))
    assert runner._device_buffers[4][0] is x_dev  # reused, not allocated again


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier answering a float32 probability and an int64 label: the wire carries both dtypes."""
    w = numpy_helper.from_array(np.array([[0.5], [-1.0], [2.0], [0.25]], np.float32), "W")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["probability"]),
            helper.make_node("Greater", ["probability", "half"], ["positive"]),
            helper.make_node("Cast", ["positive"], ["label"], to=TensorProto.INT64),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
        ],
        [w, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("two-outputs") / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_outputs_that_are_not_float32_keep_their_type(device, two_outputs):
    runner = OnnxRunner(two_outputs, device=device)
    x = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, -1]], np.float32)
    out = runner.run(x)
    assert out["label"].dtype == np.int64
    assert out["label"][:, 0].tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(out["probability"][:, 0], 1 / (1 + np.exp(-np.array([0.5, -1.0, 2.0, -0.25]))), 1e-3)
