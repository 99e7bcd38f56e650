"""The demo models' data: synthetic but plausible, each with the feature spec fitted on it.

``fraud``: card transactions (amount, merchant, channel, country...) labelled fraudulent or not; the
model ``tandem up`` has always served as ``demo``. ``churn``: telecom customers (tenure, charges,
contract...) labelled as leaving or not, served as ``churn``: a second model of another shape (other
features, another entity, another width), so a stack shows many models out of the box.
Everything is derived from the generator passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from shared.features import (
    BooleanFeature,
    CategoricalFeature,
    FeatureSpec,
    HashedFeature,
    NumericFeature,
)

MERCHANTS = ["grocery", "electronics", "travel", "restaurants", "fuel", "gaming", "fashion", "pharmacy"]
RISKY_MERCHANTS = {"electronics": 1.2, "gaming": 1.0, "travel": 0.6}
CHANNELS = ["pos", "web", "app"]
COUNTRIES = ["US", "GB", "DE", "FR", "NL", "BR", "IN", "NG", "CN", "MX", "CA", "JP"]


def synthesize_fraud(
    n: int, rng: np.random.Generator, *, variant: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
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


def fraud_spec(cols: dict[str, np.ndarray]) -> FeatureSpec:
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


CONTRACTS = ["month-to-month", "one-year", "two-year"]
PAYMENTS = ["card", "bank-transfer", "check", "wallet"]
REGIONS = ["north", "south", "east", "west", "central", "islands"]


def synthesize_churn(
    n: int, rng: np.random.Generator, *, variant: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw feature columns and churn labels."""
    cols: dict[str, np.ndarray] = {
        "tenure_months": np.round(rng.exponential(24.0, n)),
        "monthly_charges": np.round(rng.normal(65.0, 25.0, n).clip(10.0, 200.0), 2),
        "support_calls_90d": rng.poisson(1.2, n).astype(np.float64),
        "contract": rng.choice(CONTRACTS, n, p=[0.55, 0.25, 0.2]),
        "payment_method": rng.choice(PAYMENTS, n),
        "has_streaming": rng.random(n) < 0.4,
        "region": rng.choice(REGIONS, n),
    }
    if variant:
        cols["late_payments_12m"] = rng.poisson(0.5, n).astype(np.float64)
    logit = (
        -1.0
        - 0.05 * cols["tenure_months"]
        + 0.015 * (cols["monthly_charges"] - 65.0)
        + 0.45 * cols["support_calls_90d"]
        + 1.2 * (cols["contract"] == "month-to-month")
        - 0.8 * (cols["contract"] == "two-year")
        + 0.5 * (cols["payment_method"] == "check")
        - 0.3 * cols["has_streaming"]
    )
    if variant:
        logit = logit + 0.6 * cols["late_payments_12m"]
    labels = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return cols, labels.astype(np.float32)


def churn_spec(cols: dict[str, np.ndarray]) -> FeatureSpec:
    def numeric(name: str, **kw: Any) -> NumericFeature:
        return NumericFeature(name=name, mean=float(cols[name].mean()), std=float(cols[name].std()), **kw)

    features: list[Any] = [
        numeric("tenure_months", clip=(0.0, 600.0), description="months since the customer signed up"),
        numeric("monthly_charges", clip=(0.0, 1000.0), description="current monthly bill"),
        numeric("support_calls_90d", default=0.0, description="support calls in the last 90 days"),
        CategoricalFeature(name="contract", vocabulary=CONTRACTS, default="month-to-month"),
        CategoricalFeature(name="payment_method", vocabulary=PAYMENTS, default="card"),
        BooleanFeature(name="has_streaming", default=False),
        HashedFeature(name="region", buckets=8, default="central"),
    ]
    if "late_payments_12m" in cols:
        features.append(numeric("late_payments_12m", default=0.0, description="late payments in 12 months"))
    return FeatureSpec(features=features, entity="customer", output_name="probability")


Synthesize = Callable[..., tuple[dict[str, np.ndarray], np.ndarray]]
DATASETS: dict[str, tuple[Synthesize, Callable[[dict[str, np.ndarray]], FeatureSpec]]] = {
    "fraud": (synthesize_fraud, fraud_spec),
    "churn": (synthesize_churn, churn_spec),
}
