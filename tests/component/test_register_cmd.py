"""``tandem register`` and ``tandem demo-model --kind``, against a real sqlite registry with real libraries.

What matters: a registered version loads as a worker loads it, and one a worker would refuse is refused at
the prompt (exit 1) with nothing written to the registry.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx.helper as h
import pytest
from flavour_models import frame, log_and_register, pipeline
from typer.testing import CliRunner

from ml_worker.versions import load_version
from shared import registry
from shared.features import FeatureSpec
from shared.settings import home_registry_uri
from tandem.cli import app as cli_app
from tandem.demo_data import fraud_spec, synthesize_fraud


@dataclass
class Reg:
    uri: str
    home: Path
    spec: FeatureSpec
    spec_file: Path
    instances: list[dict]

    def register(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli_app, ["register", *args, "--registry-uri", self.uri])
        return result.exit_code, result.output

    def names(self) -> list[str]:
        return registry.list_models(self.uri)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Reg:
    home = tmp_path_factory.mktemp("register")
    cols, _ = synthesize_fraud(400, np.random.default_rng(3))
    spec = fraud_spec(cols)
    spec_file = home / "feature_spec.json"
    spec_file.write_text(spec.to_json())
    instances = [{k: v[i].item() for k, v in cols.items()} for i in range(5)]
    return Reg(home_registry_uri(home), home, spec, spec_file, instances)


WEIGHTS = np.random.default_rng(5).normal(0, 0.5, (35, 1)).astype(np.float32)


def onnx_file(path: Path, width: int, *, inp: str = "input", outputs: tuple[str, ...] = ("probability",)) -> Path:
    """sigmoid(x @ W) under the given tensor names (each output the same), with a dynamic batch axis."""
    w = WEIGHTS[:width]
    nodes = [h.make_node("MatMul", [inp, "w"], ["z"])] + [h.make_node("Sigmoid", ["z"], [o]) for o in outputs]
    graph = h.make_graph(
        nodes,
        "m",
        [h.make_tensor_value_info(inp, 1, [None, width])],
        [h.make_tensor_value_info(o, 1, [None, 1]) for o in outputs],
        [h.make_tensor("w", 1, list(w.shape), w.ravel().tolist())],
    )
    path.write_bytes(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString())
    return path


def served(reg: Reg, name: str, tmp_path: Path, alias: str = "production"):
    ref = registry.resolve(reg.uri, name, alias=alias)
    assert ref is not None
    return load_version(name, ref.version, registry.download(reg.uri, ref, tmp_path), device="cpu")


def test_onnx_with_spec_and_example_loads_as_a_worker_loads_it(reg, tmp_path):
    model = onnx_file(tmp_path / "fraud.onnx", reg.spec.width)
    example = tmp_path / "example.json"
    example.write_text(json.dumps({"instances": reg.instances}))
    code, out = reg.register(
        str(model), "--name", "fraud-onnx", "--spec", str(reg.spec_file), "--example", str(example)
    )
    assert code == 0, out
    assert "registered fraud-onnx version 1 (aliases: production)" in out
    assert "curl -s localhost:8000/v1/models/fraud-onnx/predict" in out
    loaded = served(reg, "fraud-onnx", tmp_path)
    assert loaded.input_example["instances"] == reg.instances
    # The expected predictions were computed by the command; here by hand, from the weights.
    by_hand = 1 / (1 + np.exp(-(reg.spec.encoder.encode(reg.instances) @ WEIGHTS)))
    np.testing.assert_allclose(loaded.input_example["predictions"], by_hand[:, 0], rtol=1e-5)


def test_an_output_named_output_registers_and_serves(reg, tmp_path):
    """The old trap: a spec says ``probability``, the exported model says ``output`` (and ``x``)."""
    model = onnx_file(tmp_path / "m.onnx", reg.spec.width, inp="x", outputs=("output",))
    code, out = reg.register(str(model), "--name", "trap", "--spec", str(reg.spec_file), "--alias", "staging")
    assert code == 0, out
    assert "output_name is now 'output'" in out and "no --example" in out
    loaded = served(reg, "trap", tmp_path, alias="staging")
    assert (loaded.spec.input_name, loaded.spec.output_name) == ("x", "output")
    assert len(loaded.input_example["instances"]) == 3  # made from the spec
    assert registry.resolve(reg.uri, "trap", alias="production") is None  # --alias given: only that one


def test_onnx_without_spec_is_refused_and_nothing_registered(reg, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", reg.spec.width)
    code, out = reg.register(str(model), "--name", "no-spec")
    assert code == 2
    assert "needs --spec" in out and "tandem spec fit DATA --target COL" in out
    assert "no-spec" not in reg.names()


def test_several_outputs_and_none_named_by_the_spec_is_refused(reg, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", reg.spec.width, outputs=("score", "logit"))
    code, out = reg.register(str(model), "--name", "two-outputs", "--spec", str(reg.spec_file))
    assert code == 1
    assert "'probability' is not one of the model's outputs (score, logit)" in out
    assert "two-outputs" not in reg.names()


def test_an_example_the_app_would_refuse_is_refused(reg, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", reg.spec.width)
    example = tmp_path / "example.json"
    example.write_text(json.dumps([{**reg.instances[0], "amount": "a lot"}]))
    code, out = reg.register(
        str(model), "--name", "bad-example", "--spec", str(reg.spec_file), "--example", str(example)
    )
    assert code == 2 and "instances[0].amount" in out
    assert "bad-example" not in reg.names()


def test_torchscript_with_spec_registers_and_loads(reg, tmp_path):
    import torch

    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(reg.spec.width, 1), torch.nn.Sigmoid()))
    module.save(str(tmp_path / "m.pt"))
    code, out = reg.register(str(tmp_path / "m.pt"), "--name", "scripted", "--spec", str(reg.spec_file))
    assert code == 0, out
    assert "checked as a worker loads it (torchscript) on 3 example instances" in out
    assert served(reg, "scripted", tmp_path).runner.output_names == ["probability"]
    narrow = torch.jit.script(torch.nn.Linear(reg.spec.width - 1, 1))
    narrow.save(str(tmp_path / "narrow.pt"))
    code, out = reg.register(str(tmp_path / "narrow.pt"), "--name", "scripted", "--spec", str(reg.spec_file))
    assert code == 1 and "shapes cannot be multiplied" in out
    assert [v.version for v in registry.list_versions(reg.uri, "scripted")] == ["1"]


@pytest.fixture(scope="module")
def sklearn_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scikit-learn pipeline saved the ordinary MLflow way (signature, input example, no Tandem file)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    x, y = frame(300)
    model = pipeline().fit(x, y)
    out = tmp_path_factory.mktemp("sk") / "model"
    mlflow.sklearn.save_model(
        model, str(out), signature=infer_signature(x, model.predict(x)), input_example=x.head(3),
        pip_requirements=["mlflow", "scikit-learn"],
    )  # fmt: skip
    return out


def test_an_mlflow_folder_registers_as_it_is(reg, sklearn_folder, tmp_path):
    code, out = reg.register(str(sklearn_folder), "--name", "sk-folder")
    assert code == 0, out
    assert "checked as a worker loads it (sklearn) on 3 example instances" in out
    loaded = served(reg, "sk-folder", tmp_path)
    assert loaded.spec is None and [c.name for c in loaded.columns] == ["amount", "age", "channel", "is_international"]
    code, out = reg.register(str(sklearn_folder), "--name", "sk-folder", "--spec", str(reg.spec_file))
    assert code == 2 and "--spec and --example are for .onnx and .pt files" in out
    assert [v.version for v in registry.list_versions(reg.uri, "sk-folder")] == ["1"]


@pytest.mark.parametrize("broken", ["sklearn", "onnx"])
def test_a_corrupt_model_file_is_refused_at_once(reg, sklearn_folder, tmp_path, broken):
    if broken == "sklearn":
        folder = shutil.copytree(sklearn_folder, tmp_path / "model")
        (folder / "model.skops").write_bytes(b"not a model")
    else:
        model = onnx_file(tmp_path / "m.onnx", reg.spec.width)
        assert reg.register(str(model), "--name", "to-break", "--spec", str(reg.spec_file))[0] == 0
        folder = registry.download(reg.uri, registry.get_version(reg.uri, "to-break", "1"), tmp_path)
        (folder / "model.onnx").write_bytes(b"not a model")
    before = {n: registry.list_versions(reg.uri, n) for n in reg.names()}
    code, out = reg.register(str(folder), "--name", "to-break")
    assert code == 1
    assert "error: a worker would not serve it: to-break vcandidate:" in out
    assert {n: registry.list_versions(reg.uri, n) for n in reg.names()} == before


def test_runs_and_models_uris_register_the_logged_files(reg, tmp_path):
    """MLflow 3 logs a model as its own entity: ``runs:/RUN/model`` is found through the run."""
    version = log_and_register(reg.uri, "logged", "sklearn", rows=300)
    run_id = registry.get_version(reg.uri, "logged", version).run_id
    for source, name in [(f"runs:/{run_id}/model", "from-run"), ("models:/logged@production", "from-alias")]:
        code, out = reg.register(source, "--name", name)
        assert code == 0, out
        ref = registry.get_version(reg.uri, name, "1")
        assert ref.run_id == run_id and ref.source == registry.get_version(reg.uri, "logged", version).source
        assert served(reg, name, tmp_path / name).runner.flavour == "sklearn"
    code, out = reg.register(f"runs:/{run_id}/elsewhere", "--name", "nothing")
    assert code == 2 and "no model at 'elsewhere'" in out


def test_demo_model_kind_xgboost_answers_as_mlflow_does(reg, tmp_path):
    pytest.importorskip("xgboost")
    import mlflow.pyfunc
    import pyarrow as pa

    from shared.signature import to_record_batch

    result = CliRunner().invoke(
        cli_app, ["demo-model", "--kind", "xgboost", "--name", "trees", "--registry-uri", reg.uri]
    )
    assert result.exit_code == 0, result.output
    ref = registry.resolve(reg.uri, "trees", alias="production")
    assert ref.tags["kind"] == "xgboost"
    folder = registry.download(reg.uri, ref, tmp_path)
    loaded = load_version("trees", ref.version, folder, device="cpu")
    assert loaded.spec is None and loaded.runner.flavour == "sklearn"
    rows = loaded.input_example["instances"]
    table = pa.Table.from_batches([to_record_batch(rows, loaded.runner.schema)])
    expected = mlflow.pyfunc.load_model(str(folder)).predict(table.to_pandas())
    np.testing.assert_array_equal(loaded.runner.run(table)["predictions"], expected)
    # The network demo's instance, with fields left out, is taken as it is: the same JSON serves both kinds.
    readme = {"amount": 912.5, "merchant_category": "electronics", "channel": "web", "country": "NG", "hour": 3.0}
    one = to_record_batch([{c.name: readme.get(c.name) for c in loaded.columns}], loaded.runner.schema)
    assert 0.0 < float(loaded.runner.run(pa.Table.from_batches([one]))["predictions"][0]) < 1.0


def test_demo_kind_lightgbm_loads_as_a_worker_loads_it(tmp_path):
    pytest.importorskip("lightgbm")
    from tandem.demo import build_trees_dir

    loaded = load_version("lgbm", "1", build_trees_dir(tmp_path / "m", "lightgbm", rows=1000), device="cpu")
    assert loaded.runner.flavour == "sklearn" and len(loaded.input_example["instances"]) == 4


def test_demo_model_refuses_an_unknown_kind():
    result = CliRunner().invoke(cli_app, ["demo-model", "--kind", "forest", "--registry-uri", "sqlite:///unused.db"])
    assert result.exit_code == 2 and "--kind must be one of network, xgboost, lightgbm, sklearn" in result.output
