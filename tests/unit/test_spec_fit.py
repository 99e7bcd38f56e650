"""FeatureSpec.fit and ``tandem spec fit``: kinds, statistics and vocabularies inferred from a training frame.

Expected figures are computed here the plain way (sorted values and indices, explicit counts), not by
calling the fitting code's helpers, and the frame path is checked against the serving path (JSON-like
rows through ``Encoder.encode``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from shared.features import (
    BooleanFeature,
    CategoricalFeature,
    FeatureSpec,
    HashedFeature,
    NumericFeature,
    load_spec,
)
from shared.spec_fit import fit_with_notes
from tandem.cli import app as cli_app
from tandem.spec_cli import read_frame

N = 600
COLOR_COUNTS = {"red": 250, "green": 180, "blue": 100, "black": 60, "teal": 2}  # + 8 missing = 600
OUTLIER_ROWS = [10, 20]  # one above, one below: the 0.1st/99.9th percentiles of 595 values clip both
NAN_ROWS = [1, 2, 3, 30, 31]


def training_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    amount = np.round(rng.lognormal(3.0, 0.8, N), 2)
    amount[OUTLIER_ROWS] = [1e6, -5e4]
    amount[NAN_ROWS] = np.nan
    colors = [c for c, k in COLOR_COUNTS.items() for _ in range(k)] + [None] * (N - sum(COLOR_COUNTS.values()))
    opt_in = list(rng.random(N) < 0.7)
    opt_in[5] = None
    return pd.DataFrame(
        {
            "amount": amount,
            "age": rng.integers(18, 90, N),
            "flag": rng.random(N) < 0.2,
            "opt_in": pd.Series(opt_in, dtype=object),
            "color": pd.Series(colors, dtype=object).sample(frac=1.0, random_state=seed).to_numpy(),
            "user": [f"u{i % 150}" for i in range(N)],  # 150 distinct > hash_threshold 100
            "order_id": [f"o{i}" for i in range(N)],
            "const": "same",
            "label": rng.integers(0, 2, N),
        }
    )


def as_requests(frame: pd.DataFrame, spec: FeatureSpec) -> list[dict]:
    """Rows as a client sends them: JSON types, missing fields absent."""
    rows = []
    for record in frame.to_dict("records"):
        row = {}
        for f in spec.features:
            v = record.get(f.name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            row[f.name] = bool(v) if f.type == "boolean" else float(v) if f.type == "numeric" else str(v)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return training_frame()


@pytest.fixture(scope="module")
def fitted(frame: pd.DataFrame) -> tuple[FeatureSpec, list[str]]:
    return fit_with_notes(frame, target="label")


def by_name(spec: FeatureSpec) -> dict:
    return {f.name: f for f in spec.features}


def test_kinds_are_inferred_and_the_target_ids_and_constants_left_out(fitted):
    spec, notes = fitted
    kinds = {f.name: type(f) for f in spec.features}
    assert kinds == {
        "amount": NumericFeature,
        "age": NumericFeature,
        "flag": BooleanFeature,
        "opt_in": BooleanFeature,
        "color": CategoricalFeature,
        "user": HashedFeature,
    }
    assert any(n.startswith("order_id: skipped") and "identifier" in n for n in notes)
    assert any(n.startswith("const: skipped") and "constant" in n for n in notes)
    assert not any(n.startswith("label") for n in notes)


def test_numeric_clip_bounds_are_robust_percentiles_and_statistics_are_those_of_the_encoded_column(frame, fitted):
    amount = by_name(fitted[0])["amount"]
    values = np.sort(frame["amount"].dropna().to_numpy())
    m = len(values)
    lo, hi = values[math.ceil(0.001 * (m - 1))], values[math.floor(0.999 * (m - 1))]
    assert amount.clip == (lo, hi)
    assert lo > 0 and hi < 1000  # both outliers are clipped
    assert amount.default == float(np.median(values))
    filled = np.clip(frame["amount"].fillna(np.median(values)).to_numpy(), lo, hi)
    assert amount.mean == pytest.approx(filled.mean(), rel=1e-12)
    assert amount.std == pytest.approx(filled.std(), rel=1e-12)
    assert amount.transform == "none"


def test_encoded_training_numbers_are_standardised_and_outliers_clipped(frame, fitted):
    spec = fitted[0]
    x = spec.encoder.encode_frame(frame)
    amount = by_name(spec)["amount"]
    col = x[:, 0].astype(np.float64)
    assert col.mean() == pytest.approx(0.0, abs=1e-6) and col.std() == pytest.approx(1.0, abs=1e-5)
    bottom, top = ((bound - amount.mean) / amount.std for bound in amount.clip)
    assert x[OUTLIER_ROWS, 0].tolist() == pytest.approx([top, bottom], rel=1e-6)
    gap = (amount.default - amount.mean) / amount.std
    assert x[NAN_ROWS, 0].tolist() == pytest.approx([gap] * len(NAN_ROWS), rel=1e-6)


def test_vocabulary_is_frequency_ordered_with_rare_values_and_gaps_handled(fitted):
    spec, notes = fitted
    color = by_name(spec)["color"]
    assert color.vocabulary == ["red", "green", "blue", "black"]  # teal: 2 rows < min_count 5
    assert color.default == "red"
    assert any(n.startswith("color: 1 rarer values") for n in notes)
    user = by_name(spec)["user"]
    assert user.buckets == 512  # 2 x 150 distinct, rounded up to a power of two
    assert by_name(spec)["opt_in"].default is True and by_name(spec)["flag"].default is False


def test_training_frame_encodes_as_the_serving_path_does(frame, fitted):
    spec = fitted[0]
    x = spec.encoder.encode_frame(frame)
    assert x.dtype == np.float32 and x.shape == (N, spec.width) and np.isfinite(x).all()
    requests = as_requests(frame, spec)
    np.testing.assert_array_equal(spec.encoder.encode(requests), x)  # columns path (> 16 rows)
    np.testing.assert_array_equal(spec.encoder.encode(requests[:10]), x[:10])  # row-by-row path


def test_unseen_categories_and_missing_values_encode(fitted):
    spec = fitted[0]
    defaults = {f.name: f.default for f in spec.features}
    x = spec.encoder.encode([{"color": "purple", "user": "never-seen", "amount": 1e9}, {}, defaults])
    offset = sum(f.width for f in spec.features[: [f.name for f in spec.features].index("color")])
    assert x[0, offset : offset + 5].tolist() == [0, 0, 0, 0, 1]  # the OOV slot
    assert np.isfinite(x).all() and x[0, 0] == x[:, 0].max()  # clipped like the outliers
    np.testing.assert_array_equal(x[1], x[2])


def test_spec_round_trips_through_json(frame, fitted):
    spec = fitted[0]
    loaded = load_spec(spec.to_json())
    assert loaded == spec
    np.testing.assert_array_equal(loaded.encoder.encode_frame(frame), spec.encoder.encode_frame(frame))


def test_overrides(frame):
    spec = FeatureSpec.fit(
        frame,
        target="label",
        drop=["flag"],
        max_vocab=2,
        kinds={"age": "categorical"},
        clip_quantiles=None,
        log1p=["amount"],
        defaults="gaps",
        min_count=1,
    )
    f = by_name(spec)
    assert "flag" not in f and f["color"].vocabulary == ["red", "green"]
    by_count = sorted(frame["age"].value_counts().items(), key=lambda kv: (-kv[1], str(kv[0])))  # ties: by text
    assert f["age"].vocabulary == [str(age) for age, _ in by_count[:2]]
    assert f["amount"].clip is None and f["amount"].transform == "log1p"
    finite = frame["amount"].fillna(frame["amount"].median()).to_numpy()
    logs = np.log1p(np.maximum(finite, 0.0))  # the encoder's log1p: negatives (the low outlier) count as 0
    assert f["amount"].mean == pytest.approx(logs.mean(), rel=1e-12) and f["amount"].std == pytest.approx(logs.std())
    assert f["amount"].default is not None and f["age"].default is None  # only columns with gaps have one
    x = spec.encoder.encode_frame(frame)
    assert x.shape == (N, spec.width)
    hashed = FeatureSpec.fit(frame, target="label", hash_threshold=3, max_buckets=64)
    assert isinstance(by_name(hashed)["color"], HashedFeature) and by_name(hashed)["color"].buckets == 16
    assert by_name(hashed)["user"].buckets == 64


def test_integer_codes_with_gaps_read_as_clients_write_them():
    codes = pd.Series([3, 7, None, 3, 7, 3] * 5, dtype="float64")  # a gap turned the integers into floats
    frame = pd.DataFrame({"code": codes, "y": 0})
    spec = FeatureSpec.fit(frame, target="y", kinds={"code": "categorical"}, min_count=1)
    assert spec.features[0].vocabulary == ["3", "7"] and spec.features[0].default == "3"
    np.testing.assert_array_equal(
        spec.encoder.encode_frame(frame)[:3], spec.encoder.encode([{"code": "3"}, {"code": "7"}, {}])
    )


def test_log1p_auto_takes_skewed_non_negative_columns_only(frame):
    f = by_name(FeatureSpec.fit(frame, target="label", log1p="auto"))
    assert f["amount"].transform == "log1p" and f["age"].transform == "none"


def test_a_mostly_zero_count_keeps_its_signal():
    counts = np.zeros(5000)
    counts[:3] = [1, 2, 7]
    spec = FeatureSpec.fit(pd.DataFrame({"chargebacks": counts, "y": 0}), target="y")
    assert spec.features[0].clip == (0.0, 7.0)  # the percentile bounds (0, 0) would flatten it


def test_more_outliers_than_the_percentiles_clip_are_reported():
    values = np.random.default_rng(1).normal(50.0, 5.0, 600)
    values[:3] = 1e6  # 0.5% of rows: the 99.9th percentile is one of them
    spec, notes = fit_with_notes(pd.DataFrame({"x": values, "y": 0}), target="y")
    assert spec.features[0].clip[1] == 1e6
    assert any(n.startswith("x: a few extreme values dominate") for n in notes)
    _, clean = fit_with_notes(pd.DataFrame({"x": values[3:], "y": 0}), target="y")
    assert clean == []


def test_entity_id_columns_are_not_features():
    frame = pd.DataFrame({"account_id": range(50), "entity_id": range(50), "x": np.arange(50.0), "y": 1})
    spec, notes = fit_with_notes(frame, target="y", entity="account")
    assert [f.name for f in spec.features] == ["x"] and spec.entity == "account"
    assert sum("entity id" in n for n in notes) == 2


@pytest.mark.parametrize(
    ("frame", "options", "message"),
    [
        (pd.DataFrame({"x": [1.0, 2.0]}), {"target": "labl"}, "no column 'labl'"),
        (pd.DataFrame({"has space": [1.0, 2.0], "y": 0}), {"target": "y"}, "'has space' cannot be"),
        (pd.DataFrame({"x": [1.0, 2.0], "y": 0}), {"target": "y", "kinds": {"x": "text"}}, "kind of 'x'"),
        (pd.DataFrame({"x": ["a", "b"], "y": 0}), {"target": "y", "kinds": {"x": "numeric"}}, "'x' as numeric"),
        (pd.DataFrame({"x": [1.0, 1.0], "y": 0}), {"target": "y"}, "no column of the data can be a feature"),
        (pd.DataFrame({"x": [1e308, -1e308, 0.0], "y": 0}), {"target": "y", "clip_quantiles": None}, "too large"),
    ],
)
def test_bad_input_is_a_clear_error(frame, options, message):
    with pytest.raises(ValueError, match=message):
        FeatureSpec.fit(frame, **options)


def test_frame_without_a_default_names_the_row():
    spec = FeatureSpec(features=[NumericFeature(name="x")])
    with pytest.raises(Exception, match=r"instances\[1\]\.x: required"):
        spec.encoder.encode_frame(pd.DataFrame({"x": [1.0, None]}))


def test_cli_writes_a_spec_that_loads_and_encodes_the_file(tmp_path, frame):
    data = tmp_path / "train.csv"
    frame.assign(country=np.where(np.arange(N) % 3 == 0, "NA", "US")).to_csv(data, index=False)
    out = tmp_path / "feature_spec.json"
    result = CliRunner().invoke(cli_app, ["spec", "fit", str(data), "--target", "label", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "width" in result.stderr and "order_id: skipped" in result.stderr
    spec = load_spec(out.read_text())
    kinds = {f.name: f.type for f in spec.features}
    assert kinds["color"] == "categorical" and kinds["user"] == "hashed" and kinds["opt_in"] == "boolean"
    assert "label" not in kinds and by_name(spec)["country"].vocabulary == ["US", "NA"]  # "NA" is no gap
    x = spec.encoder.encode_frame(read_frame(data))
    assert x.shape == (N, spec.width) and x.dtype == np.float32 and np.isfinite(x).all()


def test_cli_to_stdout_from_parquet_with_options(tmp_path, frame):
    data = tmp_path / "train.parquet"
    frame.to_parquet(data)
    args = ["spec", "fit", str(data), "--target", "label", "--drop", "age,flag", "--kind", "user=categorical"]
    args += ["--min-count", "2", "-q"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    spec = load_spec(result.stdout)
    assert json.loads(result.stdout)["features"][0]["name"] == "amount"
    assert "age" not in by_name(spec) and len(by_name(spec)["user"].vocabulary) == 100 and not result.stderr
    bad = CliRunner().invoke(cli_app, ["spec", "fit", str(data), "--target", "labl"])
    assert bad.exit_code == 2 and "no column 'labl'" in bad.stderr
