"""Reference profiles: made from data, validated, checked against a version's inputs, and the PSI of live
values against them (the drift gauges' arithmetic), on the demo model's own synthetic data."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from app_server.drift import DriftMonitor, window_for
from shared.features import FeatureSpec
from shared.profile_bins import ColumnBins
from shared.reference_profile import (
    ProfileError,
    kinds_of_spec,
    parse,
    profile_columns,
    psi,
)
from tandem.demo_data import fraud_spec, synthesize_fraud


@pytest.fixture(scope="module")
def fraud():
    cols, _ = synthesize_fraud(20_000, np.random.default_rng(7))
    spec = fraud_spec(cols)
    predictions = (np.log1p(cols["amount"]) / 10).tolist()  # any deterministic function of the rows
    return cols, spec, profile_columns(cols, kinds_of_spec(spec), predictions)


def rows_of(cols: dict[str, np.ndarray]) -> list[dict]:
    n = len(cols["amount"])
    return [{k: v[i].item() for k, v in cols.items()} for i in range(n)]


def test_profile_round_trips_and_follows_the_schema(fraud):
    _, spec, profile = fraud
    again = parse(profile.to_json())
    assert again == profile
    amount = profile.feature("amount")
    assert amount.kind == "numeric" and len(amount.edges) == 9 and len(amount.fractions) == 10
    assert amount.fractions == pytest.approx([0.1] * 10, abs=0.01)  # deciles of a continuous column
    channel = profile.feature("channel")
    assert channel.kind == "categorical" and set(channel.frequencies) == {"pos", "web", "app"}
    assert profile.feature("is_international").frequencies.keys() == {"true", "false"}
    assert profile.prediction is not None and profile.prediction.kind == "numeric"
    profile.check(kinds_of_spec(spec))


def test_fit_takes_the_profile_of_its_data(fraud):
    cols, _, _ = fraud
    frame = pd.DataFrame(cols)
    frame.loc[:99, "hour"] = np.nan
    spec = FeatureSpec.fit(frame)
    fitted = spec.fitted_profile
    assert fitted is not None and fitted.rows == len(frame)
    assert fitted.feature("hour").missing == pytest.approx(100 / len(frame))
    fitted.check(kinds_of_spec(spec))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d["features"][0].update(fractions=[0.5] * 10), "sum to"),
        (lambda d: d["features"][0].update(edges=[3.0, 2.0]), "strictly increasing"),
        (lambda d: d.update(format="something/2"), "format"),
    ],
)
def test_a_malformed_profile_is_refused_with_the_reason(fraud, change, error):
    data = json.loads(fraud[2].to_json())
    change(data)
    with pytest.raises(ProfileError, match=error):
        parse(data)


def test_a_profile_of_other_features_does_not_fit(fraud):
    _, spec, profile = fraud
    kinds = kinds_of_spec(spec)
    with pytest.raises(ProfileError, match="absent: \\['device_risk'\\]"):
        profile.check({**kinds, "device_risk": "numeric"})
    with pytest.raises(ProfileError, match="kinds differ: amount"):
        profile.check({**kinds, "amount": "categorical"})


def test_psi_is_low_for_the_same_population_and_high_for_a_shifted_one(fraud):
    _, _, profile = fraud
    live, _ = synthesize_fraud(2000, np.random.default_rng(99))
    for f in profile.features:
        assert ColumnBins(f).psi(ColumnBins(f).bins(list(live[f.name]))) < 0.1, f.name
    amount = ColumnBins(profile.feature("amount"))
    assert amount.psi(amount.bins(live["amount"] * 100)) > 0.25
    assert psi(np.array([0.5, 0.5]), np.array([0, 0])) == 0.0  # nothing seen: no drift claimed


def test_live_values_are_binned_like_the_reference(fraud):
    _, _, profile = fraud
    hour = ColumnBins(profile.feature("hour"))
    assert hour.bins([None, float("nan"), "x"]).tolist() == [hour.missing_bin] * 3  # missing, NaN, not a number
    channel = ColumnBins(profile.feature("channel"))
    names = list(profile.feature("channel").frequencies)
    assert channel.bins(["web", "fax", None]).tolist() == [names.index("web"), len(names), len(names) + 1]
    flag = ColumnBins(profile.feature("card_present"))
    assert flag.bins([True]).tolist() == flag.bins(["true"]).tolist()


def describe(spec: FeatureSpec, profile) -> dict:
    return {"feature_spec": spec.model_dump(mode="json"), "reference_profile": profile}


def test_drift_window_reference_traffic_stays_low_and_amount_x100_crosses_the_page_line(fraud):
    _, spec, profile = fraud
    desc = describe(spec, json.loads(profile.to_json()))
    monitor = DriftMonitor(lambda m, v: desc, window=1000, interval_s=60)
    live, _ = synthesize_fraud(1000, np.random.default_rng(5))
    rows = rows_of(live)
    preds = (np.log1p(live["amount"]) / 10).tolist()
    for i in range(0, 1000, 50):  # as requests of 50 instances
        monitor.offer("demo", "1", rows[i : i + 50], preds[i : i + 50])
    monitor.tick()
    features, prediction = monitor.snapshot()[("demo", "1")]
    assert max(features.values()) < 0.1 and prediction < 0.1, features
    shifted = [{**r, "amount": r["amount"] * 100} for r in rows]
    for i in range(0, 1000, 50):
        monitor.offer("demo", "1", shifted[i : i + 50], preds[i : i + 50])
    monitor.tick()  # one window later
    features, _ = monitor.snapshot()[("demo", "1")]
    assert features["amount"] > 0.25
    assert max(v for k, v in features.items() if k != "amount") < 0.1, features


def test_no_profile_or_a_mismatched_one_turns_drift_off_for_that_version(fraud, caplog):
    _, spec, profile = fraud
    caplog.set_level(logging.WARNING)
    assert window_for("demo", "1", describe(spec, None), 100) is None
    assert "no reference_profile.json" in caplog.text
    other = json.loads(profile.to_json())
    other["features"] = other["features"][1:]
    assert window_for("demo", "2", describe(spec, other), 100) is None
    assert "does not fit" in caplog.text and "absent: ['amount']" in caplog.text
    monitor = DriftMonitor(lambda m, v: describe(spec, other), window=100)
    monitor.offer("demo", "2", [{"amount": 1.0}], [0.5])
    monitor.tick()  # nothing to export, nothing raised
    assert monitor.snapshot() == {}


def test_spec_fit_writes_the_profile_beside_the_spec(fraud, tmp_path):
    from typer.testing import CliRunner

    from tandem.cli import app as cli_app

    cols, _, _ = fraud
    frame = pd.DataFrame(cols).head(3000)
    frame["label"] = 0
    frame.to_csv(tmp_path / "train.csv", index=False)
    result = CliRunner().invoke(
        cli_app,
        ["spec", "fit", str(tmp_path / "train.csv"), "--target", "label", "--out", str(tmp_path / "spec.json"),
         "--profile", str(tmp_path / "reference_profile.json"), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = FeatureSpec.model_validate_json((tmp_path / "spec.json").read_text())
    profile = parse((tmp_path / "reference_profile.json").read_text())
    profile.check(kinds_of_spec(spec))
    assert profile.rows == 3000 and profile.prediction is None  # no model yet: features only


def test_a_version_without_traffic_loses_its_gauges(fraud):
    from prometheus_client import REGISTRY

    from app_server.drift import STALE_S

    _, spec, profile = fraud
    desc = describe(spec, json.loads(profile.to_json()))
    monitor = DriftMonitor(lambda m, v: desc, window=100, interval_s=60)
    live, _ = synthesize_fraud(100, np.random.default_rng(8))
    monitor.offer("retired", "4", rows_of(live), [0.1] * 100)
    monitor.tick(now=1000.0)
    labels = {"model": "retired", "version": "4", "feature": "amount"}
    assert REGISTRY.get_sample_value("tandem_feature_drift_psi", labels) is not None
    monitor.tick(now=1000.0 + STALE_S / 2)
    assert REGISTRY.get_sample_value("tandem_feature_drift_psi", labels) is not None
    monitor.tick(now=1001.0 + STALE_S)
    assert REGISTRY.get_sample_value("tandem_feature_drift_psi", labels) is None
    assert REGISTRY.get_sample_value("tandem_prediction_drift_psi", {"model": "retired", "version": "4"}) is None
    assert monitor.snapshot() == {}
