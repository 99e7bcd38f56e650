"""The encoder: vectorised batches equal a plain row-by-row reference; gaps and bad values are clear."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from pydantic import ValidationError

from shared.errors import InvalidInput
from shared.features import (
    BooleanFeature,
    CategoricalFeature,
    FeatureSpec,
    HashedFeature,
    NumericFeature,
    predictions_from,
)

SPEC = FeatureSpec(
    entity="account",
    features=[
        NumericFeature(name="amount", mean=3.0, std=1.5, clip=(0, 1e4), transform="log1p"),
        NumericFeature(name="count", mean=2.0, std=4.0, default=0.0),
        CategoricalFeature(name="merchant", vocabulary=["a", "b", "c"]),
        CategoricalFeature(name="channel", vocabulary=["pos", "web"], default="pos"),
        HashedFeature(name="country", buckets=8, default="US"),
        BooleanFeature(name="online", default=False),
    ],
)


def reference_row(spec: FeatureSpec, row: dict) -> list[float]:
    """The encoding of one row written the obvious way, independent of the vectorised code."""
    out: list[float] = []
    for f in spec.features:
        v = row.get(f.name)
        if v is None:
            v = f.default
        if isinstance(f, NumericFeature):
            x = float(v)
            if f.clip:
                x = min(max(x, f.clip[0]), f.clip[1])
            if f.transform == "log1p":
                x = math.log1p(max(x, 0.0))
            out.append((x - f.mean) / f.std)
        elif isinstance(f, CategoricalFeature):
            one_hot = [0.0] * (len(f.vocabulary) + 1)
            one_hot[f.vocabulary.index(v) if v in f.vocabulary else len(f.vocabulary)] = 1.0
            out += one_hot
        elif isinstance(f, HashedFeature):
            one_hot = [0.0] * f.buckets
            one_hot[zlib.crc32(str(v).encode()) % f.buckets] = 1.0
            out += one_hot
        else:
            out.append(1.0 if v else 0.0)
    return out


def random_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = {
            "amount": float(rng.lognormal(3, 2)) * (1 if rng.random() > 0.05 else -1),
            "merchant": str(rng.choice(["a", "b", "c", "zzz"])),
        }
        if rng.random() > 0.3:
            row["count"] = int(rng.integers(0, 50))
        if rng.random() > 0.3:
            row["channel"] = str(rng.choice(["pos", "web", "phone"]))
        if rng.random() > 0.3:
            row["country"] = str(rng.choice(["US", "FR", "NG", ""]))
        if rng.random() > 0.3:
            row["online"] = bool(rng.random() > 0.5)
        rows.append(row)
    return rows


def test_width_counts_one_hot_slots_and_oov():
    assert SPEC.width == 1 + 1 + 4 + 3 + 8 + 1


def test_vectorised_batch_equals_row_by_row_reference():
    rows = random_rows(500)
    got = SPEC.encoder.encode(rows)
    want = np.array([reference_row(SPEC, r) for r in rows], dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == (500, SPEC.width)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_training_columns_and_serving_rows_encode_identically():
    rows = [{**{"count": 0, "channel": "pos", "country": "US", "online": False}, **r} for r in random_rows(200, 1)]
    columns = {name: np.array([r[name] for r in rows]) for name in rows[0]}
    np.testing.assert_array_equal(SPEC.encoder.encode_columns(columns, len(rows)), SPEC.encoder.encode(rows))


def test_unknown_category_goes_to_the_oov_slot():
    x = SPEC.encoder.encode([{"amount": 1.0, "merchant": "never-seen"}])
    merchant = x[0, 2:6]
    assert merchant.tolist() == [0, 0, 0, 1]


def test_missing_values_take_defaults():
    full = SPEC.encoder.encode(
        [{"amount": 5.0, "merchant": "a", "count": 0.0, "channel": "pos", "country": "US", "online": False}]
    )
    sparse = SPEC.encoder.encode([{"amount": 5.0, "merchant": "a", "count": None}])
    np.testing.assert_array_equal(full, sparse)


def test_missing_required_value_names_row_and_field():
    with pytest.raises(InvalidInput, match=r"instances\[1\]\.merchant: required"):
        SPEC.encoder.encode([{"amount": 1.0, "merchant": "a"}, {"amount": 2.0}])


@pytest.mark.parametrize(
    ("instance", "loc"),
    [
        ({"amount": "1.0"}, ("amount",)),
        ({"amount": True}, ("amount",)),
        ({"amount": float("inf")}, ("amount",)),
        ({"merchant": 3}, ("merchant",)),
        ({"online": "yes"}, ("online",)),
        ({"bogus": 1}, ("bogus",)),
        ({"entity_id": 1.5}, ("entity_id", "str")),
    ],
)
def test_instance_model_rejects_wrong_types(instance, loc):
    with pytest.raises(ValidationError) as info:
        SPEC.instance_model.model_validate(instance)
    assert info.value.errors()[0]["loc"] == loc


def test_instance_model_accepts_ints_for_numbers_and_entity_ids():
    inst = SPEC.instance_model.model_validate({"amount": 3, "entity_id": 42})
    assert inst.amount == 3.0 and inst.entity_id == 42


def test_spec_round_trips_through_json():
    assert FeatureSpec.model_validate_json(SPEC.to_json()) == SPEC


def test_predictions_are_scalars_for_single_column_outputs():
    assert predictions_from(np.array([[0.25], [0.5]], np.float32)) == [0.25, 0.5]
    assert predictions_from(np.array([[1, 2], [3, 4]], np.float32)) == [[1, 2], [3, 4]]


@pytest.mark.parametrize("name", ["_private", "model_dump", "json", "entity_id", "has space", "1st", ""])
def test_unusable_feature_names_are_refused_when_the_spec_loads(name):
    with pytest.raises(ValidationError, match="feature name"):
        FeatureSpec(features=[NumericFeature(name=name)])


def test_duplicate_feature_names_are_refused():
    with pytest.raises(ValidationError, match="appears twice"):
        FeatureSpec(features=[NumericFeature(name="a"), BooleanFeature(name="a")])


def test_huge_finite_numbers_stay_finite_in_float32():
    x = SPEC.encoder.encode(
        [{"amount": 1.0, "merchant": "a", "count": 1e300}, {"amount": 1.0, "merchant": "a", "count": -1e300}]
    )
    assert np.isfinite(x).all()
    assert x[0, 1] > 1e30 and x[1, 1] < -1e30
