"""The demo models: small classifiers (fraud, churn; ``demo_data.py``) trained in PyTorch on synthetic data.

Training encodes its data with the same :class:`shared.features.Encoder` the app server uses, then
exports ONNX with a dynamic batch axis and writes an MLflow model folder carrying the feature spec and
an input example with the outputs ONNX Runtime gives for it. Everything is derived from ``seed``.
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
    import mlflow.onnx
    import onnx
    import onnxruntime as ort

    model, spec, cols = train(size, seed=seed, variant=variant, rows=rows, epochs=epochs, dataset=dataset)
    onnx_bytes = export_onnx(model, spec.width)
    instances = example_instances(cols)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": spec.encoder.encode(instances)})[0]
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / registry.FEATURE_SPEC
        spec_path.write_text(spec.to_json())
        example_path = Path(tmp) / registry.INPUT_EXAMPLE
        example_path.write_text(
            json.dumps({"instances": instances, "predictions": predictions_from(expected)}, indent=2)
        )
        mlflow.onnx.save_model(
            onnx.load_from_string(onnx_bytes),
            str(out),
            save_as_external_data=False,
            extra_files=[str(spec_path), str(example_path)],
            pip_requirements=["onnxruntime"],
        )
    return out


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
) -> registry.VersionRef:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, not {dataset!r}")
    name = name or DEFAULT_NAMES.get((dataset, size)) or f"{dataset}-{size}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_dir(
            Path(tmp) / "model", size, seed=seed, variant=variant, rows=rows, epochs=epochs, dataset=dataset
        )
        tags = {"size": size, "seed": str(seed), "variant": str(variant).lower(), "dataset": dataset}
        return registry.register(
            uri,
            name,
            folder,
            tags=tags,
            description=f"Tandem demo {dataset} model ({size}, seed {seed})",
            alias_if_first=alias_if_first,
        )
