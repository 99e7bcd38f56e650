"""``tandem register --reference DATA``: the reference profile stored with the version for every kind of
source (an ONNX file with a spec, an MLflow folder, a models:/ URI), against a real sqlite registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flavour_models import frame, log_and_register, pipeline
from test_register_cmd import onnx_file
from typer.testing import CliRunner

from ml_worker.versions import load_version
from shared import registry
from shared.reference_profile import kinds_of_signature, kinds_of_spec, parse
from shared.settings import home_registry_uri
from tandem.cli import app as cli_app
from tandem.demo_data import fraud_spec, synthesize_fraud


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("register-reference")


def register(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["register", *args, "--registry-uri", home_registry_uri(home)])
    return result.exit_code, result.output


def stored(home: Path, name: str, tmp_path: Path):
    uri = home_registry_uri(home)
    ref = registry.get_version(uri, name, "1")
    loaded = load_version(name, "1", registry.download(uri, ref, tmp_path), device="cpu")
    return loaded, loaded.describe()["reference_profile"]


def test_an_onnx_model_with_reference_data_carries_its_profile(home, tmp_path):
    cols, _ = synthesize_fraud(2000, np.random.default_rng(3))
    spec = fraud_spec(cols)
    (tmp_path / "spec.json").write_text(spec.to_json())
    pd.DataFrame(cols).to_csv(tmp_path / "train.csv", index=False)
    model = onnx_file(tmp_path / "m.onnx", spec.width)
    code, out = register(home, str(model), "--name", "ref-onnx", "--spec", str(tmp_path / "spec.json"),
                         "--reference", str(tmp_path / "train.csv"))  # fmt: skip
    assert code == 0, out
    assert "--reference: profiled 2000 rows, 9 features" in out
    loaded, profile = stored(home, "ref-onnx", tmp_path)
    profile = parse(profile)
    profile.check(kinds_of_spec(loaded.spec))
    assert profile.prediction is not None and len(profile.prediction.fractions) > 1  # the model's own outputs
    assert profile.feature("channel").frequencies.keys() == {"pos", "web", "app"}


def test_an_mlflow_folder_is_profiled_by_its_signature_and_left_as_it_was(home, tmp_path):
    import mlflow.sklearn
    from mlflow.models import infer_signature

    x, y = frame(300)
    model = pipeline().fit(x, y)
    folder = tmp_path / "sk"
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(x, model.predict(x)),
                              input_example=x.head(3), pip_requirements=["mlflow", "scikit-learn"])  # fmt: skip
    frame(500, seed=1)[0].to_parquet(tmp_path / "train.parquet")
    code, out = register(home, str(folder), "--name", "ref-sk", "--reference", str(tmp_path / "train.parquet"))
    assert code == 0, out
    assert not (folder / "extra_files").exists()  # the user's folder is not written to
    loaded, profile = stored(home, "ref-sk", tmp_path / "dl")
    profile = parse(profile)
    profile.check(kinds_of_signature(loaded.columns))
    assert profile.feature("age").kind == "numeric" and profile.feature("channel").kind == "categorical"
    assert profile.prediction is not None


def test_a_models_uri_is_registered_as_a_copy_carrying_the_profile(home, tmp_path):
    uri = home_registry_uri(home)
    version = log_and_register(uri, "ref-logged", "sklearn", rows=300)
    frame(400, seed=2)[0].to_csv(tmp_path / "train.csv", index=False)
    code, out = register(home, f"models:/ref-logged/{version}", "--name", "ref-copy",
                         "--reference", str(tmp_path / "train.csv"))  # fmt: skip
    assert code == 0, out
    assert "registered as a copy" in out
    _, profile = stored(home, "ref-copy", tmp_path)
    assert parse(profile).rows == 400


def test_reference_data_without_a_feature_is_refused_and_nothing_registered(home, tmp_path):
    cols, _ = synthesize_fraud(200, np.random.default_rng(4))
    spec = fraud_spec(cols)
    (tmp_path / "spec.json").write_text(spec.to_json())
    pd.DataFrame(cols).drop(columns=["merchant_category"]).to_csv(tmp_path / "train.csv", index=False)
    code, out = register(home, str(onnx_file(tmp_path / "m.onnx", spec.width)), "--name", "ref-bad",
                         "--spec", str(tmp_path / "spec.json"), "--reference", str(tmp_path / "train.csv"))  # fmt: skip
    assert code == 2, out
    assert "--reference" in out and "merchant_category" in out
    assert "ref-bad" not in registry.list_models(home_registry_uri(home))
