"""Models of every MLflow flavour Tandem serves, trained here on data made here and logged the ordinary
MLflow way (``mlflow.<flavour>.log_model`` with a signature and an input example, ``register_model``, an
alias): no Tandem file, no Tandem tag. Tests and the format benchmark use them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

CHANNELS = ["web", "pos", "app", "phone"]


def frame(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """Card payments with numeric, integer, boolean and string columns, and a fraud label."""
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(
        {
            "amount": rng.exponential(120.0, n).round(2),
            "age": rng.integers(18, 90, n).astype(np.int64),
            "channel": rng.choice(CHANNELS, n),
            "is_international": rng.random(n) < 0.2,
        }
    )
    score = x.amount / 300 + x.is_international * 1.5 + (x.channel == "web") * 0.7 - x.age / 80
    y = (score + rng.normal(0, 0.4, n) > 0.9).astype(np.int64)
    return x, y


def pipeline() -> Any:
    """A scikit-learn Pipeline with a ColumnTransformer over string and numeric columns."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = ColumnTransformer(
        [("num", StandardScaler(), ["amount", "age"]), ("cat", OneHotEncoder(handle_unknown="ignore"), ["channel"])],
        remainder="passthrough",
    )
    return Pipeline([("columns", columns), ("model", LogisticRegression(max_iter=500))])


def numeric(x: pd.DataFrame) -> pd.DataFrame:
    """The columns as numbers, for the tree libraries (which take no strings)."""
    out = x.drop(columns=["channel"]).astype({"is_international": np.int64})
    for c in CHANNELS:
        out[f"channel_{c}"] = (x.channel == c).astype(np.int64)
    return out


def log_and_register(
    uri: str, name: str, kind: str, *, rows: int = 2000, seed: int = 0, alias: str = "production"
) -> str:
    """Train a ``kind`` model, log it with its flavour, register it as ``name`` and point ``alias`` at it.
    Returns the version. Kinds: ``sklearn`` (pipeline, labels), ``sklearn_proba`` (the same pipeline
    logged with ``pyfunc_predict_fn="predict_proba"``), ``xgboost``, ``lightgbm``, ``pyfunc`` (a custom
    ``python_function`` answering a frame of two columns)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from shared import registry_db

    x, y = frame(rows, seed)
    registry_db.prepare(uri)  # as Tandem's own registry calls do: a new sqlite registry without migrations
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = _experiment(uri)
    requirements = ["mlflow", "scikit-learn", "pandas"]  # skips the 2-5 s requirement inference
    with mlflow.start_run(experiment_id=experiment):
        if kind in ("sklearn", "sklearn_proba"):
            model = pipeline().fit(x, y)
            predict_fn = "predict_proba" if kind == "sklearn_proba" else "predict"
            out = getattr(model, predict_fn)(x)
            info = mlflow.sklearn.log_model(
                model, name="model", signature=infer_signature(x, out), input_example=x.head(5),
                pyfunc_predict_fn=predict_fn, pip_requirements=requirements,
            )  # fmt: skip
        elif kind == "xgboost":
            import xgboost

            xn = numeric(x)
            model = xgboost.XGBClassifier(n_estimators=40, max_depth=4, n_jobs=1).fit(xn, y)
            info = mlflow.xgboost.log_model(
                model, name="model", signature=infer_signature(xn, model.predict(xn)), input_example=xn.head(5),
                pip_requirements=[*requirements, "xgboost"],
            )  # fmt: skip
        elif kind == "lightgbm":
            import lightgbm

            xn = numeric(x)
            model = lightgbm.LGBMClassifier(n_estimators=40, num_leaves=15, verbose=-1, n_jobs=1).fit(xn, y)
            info = mlflow.lightgbm.log_model(
                model, name="model", signature=infer_signature(xn, model.predict(xn)), input_example=xn.head(5),
                pip_requirements=[*requirements, "lightgbm"],
            )  # fmt: skip
        elif kind == "pyfunc":
            info = mlflow.pyfunc.log_model(
                name="model", python_model=RiskBands(), input_example=x.head(5),
                signature=infer_signature(x, RiskBands().predict(None, x)), pip_requirements=requirements,
                code_paths=[__file__],  # the class is found by module name when the worker loads it
            )  # fmt: skip
        else:
            raise ValueError(kind)
    version = mlflow.register_model(info.model_uri, name).version
    MlflowClient(uri, uri).set_registered_model_alias(name, alias, version)
    return str(version)


def _experiment(uri: str) -> str:
    """An experiment whose artifacts live beside the sqlite registry, not in the caller's cwd."""
    from mlflow import MlflowClient

    from shared.registry import _artifact_root

    client = MlflowClient(uri, uri)
    found = client.get_experiment_by_name("flavours")
    return found.experiment_id if found else client.create_experiment("flavours", artifact_location=_artifact_root(uri))


try:
    import mlflow.pyfunc

    class RiskBands(mlflow.pyfunc.PythonModel):
        """A custom pyfunc answering a frame: a score and a band label per row."""

        def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
            score = model_input["amount"].to_numpy(dtype=np.float64) / 100.0 + model_input["is_international"] * 1.0
            band = np.where(score > 2.0, "high", np.where(score > 1.0, "medium", "low"))
            return pd.DataFrame({"score": score, "band": band})
except ImportError:  # pragma: no cover
    pass
