"""The demo model: a card-transaction fraud classifier trained on synthetic but plausible data.

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
from shared.features import (
    BooleanFeature,
    CategoricalFeature,
    FeatureSpec,
    HashedFeature,
    NumericFeature,
    predictions_from,
)

logger = logging.getLogger(__name__)

MERCHANTS = ["grocery", "electronics", "travel", "restaurants", "fuel", "gaming", "fashion", "pharmacy"]
RISKY_MERCHANTS = {"electronics": 1.2, "gaming": 1.0, "travel": 0.6}
CHANNELS = ["pos", "web", "app"]
COUNTRIES = ["US", "GB", "DE", "FR", "NL", "BR", "IN", "NG", "CN", "MX", "CA", "JP"]
SIZES = {"small": (256, 256), "large": (2048, 2048, 2048, 2048)}


def synthesize(n: int, rng: np.random.Generator, *, variant: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw feature columns and fraud labels."""
    cols: dict[str, np.ndarray] = {
        "amount": np.round(rng.lognormal(3.6, 1.1, n), 2),
        "tx_count_24h": rng.poisson(3.0, n).astype(np.float64),
        "account_age_days": np.round(rng.exponential(500.0, n)),
        "hour": rng.integers(0, 24, n).astype(np.float64),
        "merchant_category": rng.choice(MERCHANTS, n),
        "channel": rng.choice(CHANNELS, n, p=[0.5, 0.3, 0.2]),
        "country": rng.choice(COUNTRIES, n),
        "is_international": rng.random(n) < 0.15,
        "card_present": rng.random(n) < 0.55,
    }
    if variant:
        cols["device_risk"] = np.round(rng.beta(1.2, 6.0, n), 3)
    night = (cols["hour"] < 6) | (cols["hour"] >= 23)
    logit = (
        -5.0
        + 0.55 * np.log1p(cols["amount"])
        + 0.18 * cols["tx_count_24h"]
        - 0.6 * np.log1p(cols["account_age_days"]) / np.log(10)
        + 0.9 * night
        + 1.1 * cols["is_international"]
        - 0.9 * cols["card_present"]
        + np.vectorize(RISKY_MERCHANTS.get)(cols["merchant_category"], 0.0)
        + 0.4 * (cols["channel"] == "web")
    )
    if variant:
        logit = logit + 3.0 * cols["device_risk"]
    labels = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return cols, labels.astype(np.float32)


def make_spec(cols: dict[str, np.ndarray]) -> FeatureSpec:
    """Standardisation statistics come from the training columns, through the same transform."""
    log_amount = np.log1p(cols["amount"])
    features: list[Any] = [
        NumericFeature(
            name="amount",
            transform="log1p",
            clip=(0.0, 1e6),
            mean=float(log_amount.mean()),
            std=float(log_amount.std()),
            description="transaction amount in the card's currency",
        ),
        NumericFeature(
            name="tx_count_24h",
            mean=float(cols["tx_count_24h"].mean()),
            std=float(cols["tx_count_24h"].std()),
            default=0.0,
            description="transactions on this account in the last 24 h",
        ),
        NumericFeature(
            name="account_age_days",
            clip=(0.0, 20000.0),
            mean=float(cols["account_age_days"].mean()),
            std=float(cols["account_age_days"].std()),
            default=365.0,
        ),
        NumericFeature(
            name="hour", clip=(0.0, 23.0), mean=11.5, std=6.9, default=12.0, description="local hour of day, 0-23"
        ),
        CategoricalFeature(name="merchant_category", vocabulary=MERCHANTS),
        CategoricalFeature(name="channel", vocabulary=CHANNELS, default="pos"),
        HashedFeature(name="country", buckets=16, default="US", description="ISO 3166 alpha-2 country"),
        BooleanFeature(name="is_international", default=False),
        BooleanFeature(name="card_present", default=True),
    ]
    if "device_risk" in cols:
        features.append(
            NumericFeature(
                name="device_risk",
                mean=float(cols["device_risk"].mean()),
                std=float(cols["device_risk"].std()),
                clip=(0.0, 1.0),
                default=0.0,
                description="device fingerprint risk score, 0-1",
            )
        )
    return FeatureSpec(features=features, entity="account")


def train(
    size: str = "small", *, seed: int = 7, variant: bool = False, rows: int | None = None, epochs: int | None = None
) -> tuple[Any, FeatureSpec, dict[str, np.ndarray]]:
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n = rows or (20_000 if size == "small" else 8_000)
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
    n_epochs = epochs or (4 if size == "small" else 1)
    for _ in range(n_epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, 256):
            idx = order[i : i + 256]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model = torch.nn.Sequential(net, torch.nn.Sigmoid()).eval()
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
) -> Path:
    """Train and write an MLflow ONNX model folder with Tandem's extra files into ``out``."""
    import mlflow.onnx
    import onnx
    import onnxruntime as ort

    model, spec, cols = train(size, seed=seed, variant=variant, rows=rows, epochs=epochs)
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
) -> registry.VersionRef:
    name = name or ("demo" if size == "small" else "demo-large")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_dir(Path(tmp) / "model", size, seed=seed, variant=variant, rows=rows, epochs=epochs)
        tags = {"size": size, "seed": str(seed), "variant": str(variant).lower()}
        return registry.register(
            uri, name, folder, tags=tags, description=f"Tandem demo fraud model ({size}, seed {seed})"
        )
