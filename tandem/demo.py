"""The demo models: small classifiers (fraud, churn; ``demo_data.py``) trained on synthetic data.

``network`` (the default kind): a PyTorch network trained on the data encoded by the same
:class:`shared.features.Encoder` the app server uses, exported to ONNX with a dynamic batch axis, written
as an MLflow model folder carrying the feature spec and an input example with the outputs ONNX Runtime
gives for it. ``xgboost``, ``lightgbm``, ``sklearn``: gradient-boosted trees in a scikit-learn pipeline
over the same raw fields, saved the ordinary MLflow way (a signature and an input example, no Tandem
file), so the same JSON instance can be sent to both and the answers compared. Everything is derived
from ``seed``.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from shared import registry
from shared.errors import TandemError
from shared.features import FeatureSpec, predictions_from
from tandem.demo_data import DATASETS

logger = logging.getLogger(__name__)

SIZES = {"small": (256, 256), "large": (2048, 2048, 2048, 2048), "xlarge": (4096, 4096, 4096, 4096)}
"""Hidden layers. ``xlarge`` (about 200 MB of weights, 100 MFLOP a row) is sized for a GPU, where
``large`` may be too small to keep one busy; loadtest/gpu_check.py registers it untrained."""
DEFAULT_NAMES = {
    ("fraud", "small"): "demo",
    ("fraud", "large"): "demo-large",
    ("fraud", "xlarge"): "demo-xlarge",
    ("churn", "small"): "churn",
}
"""Registered names of the demo models (``tandem up`` serves ``demo`` and ``churn``)."""
KINDS = ("network", "xgboost", "lightgbm", "sklearn")
TREES_EXTRA = "pip install 'tandem-serve[trees]'"


class MissingDependency(TandemError):
    """A demo kind whose library is not installed."""

    code = "missing_dependency"


def train(
    size: str = "small",
    *,
    seed: int = 7,
    variant: bool = False,
    rows: int | None = None,
    epochs: int | None = None,
    dataset: str = "fraud",
) -> tuple[Any, FeatureSpec, dict[str, np.ndarray]]:
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n = rows or (20_000 if size == "small" else 8_000)
    synthesize, make_spec = DATASETS[dataset]
    cols, labels = synthesize(n, rng, variant=variant)
    spec = make_spec(cols)
    x = torch.from_numpy(spec.encoder.encode_columns(cols, n))
    y = torch.from_numpy(labels).unsqueeze(1)
    layers: list[Any] = []
    width = spec.width
    for hidden in SIZES[size]:
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3 if size == "small" else 3e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    n_epochs = epochs if epochs is not None else (4 if size == "small" else 1)
    loss = None
    for _ in range(n_epochs):  # 0: the untrained network, for tests and benchmarks that need no accuracy
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, 256):
            idx = order[i : i + 256]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model = torch.nn.Sequential(net, torch.nn.Sigmoid()).eval()
    if loss is not None:
        logger.info("trained %s model: final batch loss %.4f", size, loss.item())
    return model, spec, cols


def export_onnx(model: Any, width: int) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, width),),
        buf,
        dynamo=False,
        input_names=["input"],
        output_names=["probability"],
        opset_version=17,
        dynamic_axes={"input": {0: "batch"}, "probability": {0: "batch"}},
    )
    return buf.getvalue()


def example_instances(cols: dict[str, np.ndarray], k: int = 4) -> list[dict[str, Any]]:
    out = []
    for i in range(k):
        row = {}
        for name, col in cols.items():
            v = col[i].item()
            row[name] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
        out.append(row)
    return out


def build_model_dir(
    out: Path,
    size: str = "small",
    *,
    seed: int = 7,
    variant: bool = False,
    rows: int | None = None,
    epochs: int | None = None,
    dataset: str = "fraud",
) -> Path:
    """Train and write an MLflow ONNX model folder with Tandem's extra files into ``out``."""
    import onnx
    import onnxruntime as ort

    from tandem.model_folder import save_onnx_folder

    model, spec, cols = train(size, seed=seed, variant=variant, rows=rows, epochs=epochs, dataset=dataset)
    onnx_bytes = export_onnx(model, spec.width)
    instances = example_instances(cols)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": spec.encoder.encode(instances)})[0]
    profile = reference_of(spec, cols, session)
    return save_onnx_folder(
        onnx.load_from_string(onnx_bytes), spec, instances, predictions_from(expected), out, profile=profile
    )


def reference_of(spec: FeatureSpec, cols: dict[str, np.ndarray], session: Any) -> Any:
    """The reference profile of the training columns, with the exported model's predictions on them
    (what drift is measured against: ``shared/reference_profile.py``)."""
    from shared.reference_profile import kinds_of_spec, profile_columns

    n = len(next(iter(cols.values())))
    x = spec.encoder.encode_columns(cols, n)
    predictions = np.concatenate([session.run(None, {"input": x[i : i + 4096]})[0] for i in range(0, n, 4096)])
    return profile_columns(cols, kinds_of_spec(spec), predictions_from(predictions))


def write_fault(folder: Path, fail_percent: float) -> None:
    """Make ``folder`` a drill version: it passes its checks, then fails ``fail_percent``% of requests
    (read by the worker at load: ``ml_worker.versions.FAULT_FILE``)."""
    from ml_worker.versions import FAULT_FILE

    if not 0 <= fail_percent <= 100:
        raise ValueError(f"fail_percent must be within 0-100, not {fail_percent:g}")
    (folder / "extra_files" / FAULT_FILE).write_text(json.dumps({"fail_percent": fail_percent}))


def register_demo(
    uri: str,
    size: str = "small",
    *,
    seed: int = 7,
    variant: bool = False,
    rows: int | None = None,
    epochs: int | None = None,
    name: str | None = None,
    dataset: str = "fraud",
    alias_if_first: str | None = "production",
    kind: str = "network",
    fail_percent: float = 0.0,
) -> registry.VersionRef:
    """Train, write and register a demo model; a tree kind is first checked as a worker loads it (its
    folder is not a Tandem one, so this is where a pipeline MLflow cannot serve would show)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, not {dataset!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    name = name or DEFAULT_NAMES.get((dataset, size)) or f"{dataset}-{size}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        if kind == "network":
            folder = build_model_dir(out, size, seed=seed, variant=variant, rows=rows, epochs=epochs, dataset=dataset)
        else:
            from tandem.register import check

            folder = build_trees_dir(out, kind, seed=seed, variant=variant, rows=rows, dataset=dataset)
            check(name, folder)
        tags = {"size": size, "seed": str(seed), "variant": str(variant).lower(), "dataset": dataset, "kind": kind}
        if fail_percent:
            if kind != "network":
                raise ValueError("fail_percent is for kind network")
            write_fault(folder, fail_percent)
            tags["fail_percent"] = f"{fail_percent:g}"
        return registry.register(
            uri,
            name,
            folder,
            tags=tags,
            description=f"Tandem demo {dataset} model ({kind}, {size}, seed {seed})",
            alias_if_first=alias_if_first,
        )


def fill_defaults(frame: Any, defaults: dict[str, Any], booleans: list[str]) -> Any:
    """The tree pipelines' first step: a field left out of a request (optional in the signature) takes its
    feature spec default, as the network's encoder gives it, and booleans become 0/1 for the trees.

    A module-level function so the saved pipeline names it: skops loads only names it was told to trust.
    """
    return frame.fillna(defaults).astype({b: "float64" for b in booleans})


def train_trees(
    kind: str, *, seed: int = 7, variant: bool = False, rows: int | None = None, dataset: str = "fraud"
) -> tuple[Any, FeatureSpec, Any]:
    """A pipeline (defaults, one-hot text, gradient-boosted trees) fitted on the raw columns; returns it,
    the spec of the same data (for its defaults) and the raw frame."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    synthesize, make_spec = DATASETS[dataset]
    cols, labels = synthesize(rows or 20_000, np.random.default_rng(seed), variant=variant)
    spec = make_spec(cols)
    frame = pd.DataFrame(cols)
    defaults = {f.name: f.default for f in spec.features if f.default is not None}
    booleans = [f.name for f in spec.features if f.type == "boolean"]
    text = [f.name for f in spec.features if f.type in ("categorical", "hashed")]
    steps = [
        ("defaults", FunctionTransformer(fill_defaults, kw_args={"defaults": defaults, "booleans": booleans})),
        (
            "columns",
            ColumnTransformer(
                [("text", OneHotEncoder(handle_unknown="ignore", sparse_output=False), text)], remainder="passthrough"
            ),
        ),
        ("trees", _trees(kind, seed)),
    ]
    return Pipeline(steps).fit(frame, labels), spec, frame


def _trees(kind: str, seed: int) -> Any:
    """XGBoost and LightGBM with a logistic objective, whose ``predict`` is the probability of the positive
    class (one number, like the network's); one thread each, as a worker pins them."""
    try:
        if kind == "xgboost":
            import xgboost

            return xgboost.XGBRegressor(
                objective="binary:logistic", n_estimators=100, max_depth=4, n_jobs=1, random_state=seed
            )
        if kind == "lightgbm":
            import lightgbm

            return lightgbm.LGBMRegressor(
                objective="binary", n_estimators=100, num_leaves=15, n_jobs=1, random_state=seed, verbose=-1
            )
    except ImportError as exc:
        raise MissingDependency(f"--kind {kind} needs the {exc.name} package: {TREES_EXTRA}") from None
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=100, max_depth=4, random_state=seed)


def build_trees_dir(
    out: Path, kind: str, *, seed: int = 7, variant: bool = False, rows: int | None = None, dataset: str = "fraud"
) -> Path:
    """Train a tree demo and save it with ``mlflow.sklearn``: the signature takes the raw fields, those with
    a spec default optional (so an instance the network takes is taken here too); the input example is
    the network demo's. ``sklearn`` answers ``predict_proba``: [P(no), P(yes)]."""
    import mlflow.sklearn
    import skops.io
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    pipeline, spec, frame = train_trees(kind, seed=seed, variant=variant, rows=rows, dataset=dataset)
    predict_fn = "predict_proba" if kind == "sklearn" else "predict"
    example = frame.head(4)
    inferred = infer_signature(example, getattr(pipeline, predict_fn)(example))
    optional = {f.name for f in spec.features if f.default is not None}
    inputs = Schema([ColSpec(c.type, c.name, required=c.name not in optional) for c in inferred.inputs.inputs])
    mlflow.sklearn.save_model(
        pipeline,
        str(out),
        signature=ModelSignature(inputs, inferred.outputs),
        input_example=example,
        pyfunc_predict_fn=predict_fn,
        pip_requirements=["mlflow", "scikit-learn", "pandas", "skops", "tandem-serve", *_packages(kind)],
        # Built here from known parts, so every type in it is trusted (our fill_defaults, the tree classes).
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)),
    )
    from shared.reference_profile import kinds_of_spec, profile_frame
    from tandem.reference_data import store

    predicted = getattr(pipeline, predict_fn)(frame)  # the raw fields are the signature's columns
    store(out, profile_frame(frame, kinds_of_spec(spec), predictions_from(np.asarray(predicted))))
    return out


def _packages(kind: str) -> list[str]:
    return {"xgboost": ["xgboost"], "lightgbm": ["lightgbm"]}.get(kind, [])
