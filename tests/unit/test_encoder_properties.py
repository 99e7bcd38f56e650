"""Property tests of validation + encoding (hypothesis): admitted input encodes, anything else is a 422.

Everything goes through ``Predictor.prepare`` (the serving path: pydantic validator generated from the
spec, then the vectorised encoder) with a fake worker pool that only describes a spec. A failure is
only ever an InvalidInput whose message names the offending field, never another exception (a 500).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app_server.error_render import format_loc
from app_server.feature_store import format_value, parse_value
from app_server.predict import Predictor
from shared.errors import InvalidInput
from shared.features import (
    ENTITY_KEY,
    BooleanFeature,
    CategoricalFeature,
    FeatureSpec,
    HashedFeature,
    NumericFeature,
)
from shared.settings import AppSettings
from tandem.demo_data import fraud_spec as make_spec
from tandem.demo_data import synthesize_fraud as synthesize

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Feature names start with a letter: pydantic cannot make a field of "_x" (see the report on issue 6).
names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
labels = st.text(max_size=6)


@st.composite
def feature_specs(draw: st.DrawFn) -> FeatureSpec:
    features: list[Any] = []
    for name in draw(st.lists(names.filter(lambda n: n != ENTITY_KEY), min_size=1, max_size=6, unique=True)):
        kind = draw(st.sampled_from(["numeric", "categorical", "hashed", "boolean"]))
        if kind == "numeric":
            lo = draw(st.floats(-1e6, 1e6))
            clip = draw(st.none() | st.just((lo, lo + draw(st.floats(0, 1e6)))))
            features.append(
                NumericFeature(
                    name=name,
                    mean=draw(st.floats(-1e3, 1e3)),
                    std=draw(st.floats(0, 1e3)),
                    clip=clip,
                    transform=draw(st.sampled_from(["none", "log1p"])),
                    default=draw(st.none() | st.floats(-1e6, 1e6)),
                )
            )
        elif kind == "categorical":
            vocab = draw(st.lists(labels, min_size=1, max_size=5, unique=True))
            features.append(CategoricalFeature(name=name, vocabulary=vocab, default=draw(st.none() | labels)))
        elif kind == "hashed":
            features.append(
                HashedFeature(name=name, buckets=draw(st.integers(1, 40)), default=draw(st.none() | labels))
            )
        else:
            features.append(BooleanFeature(name=name, default=draw(st.none() | st.booleans())))
    return FeatureSpec(features=features, entity=draw(st.none() | st.just("account")))


def value_for(feature: Any) -> st.SearchStrategy[Any]:
    """Values the generated schema admits for one feature (JSON types, as a request carries them)."""
    return {
        "numeric": finite | st.integers(-(10**15), 10**15),
        "categorical": labels | st.sampled_from(getattr(feature, "vocabulary", ["x"])),
        "hashed": st.text(max_size=20),
        "boolean": st.booleans(),
    }[feature.type]


@st.composite
def admitted_instances(draw: st.DrawFn, spec: FeatureSpec) -> list[dict[str, Any]]:
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        row = {f.name: draw(value_for(f)) for f in spec.features if draw(st.booleans()) or f.default is None}
        for f in spec.features:  # explicit nulls mean "missing" too
            if f.name not in row and draw(st.booleans()):
                row[f.name] = None
        if spec.entity and draw(st.booleans()):
            row[ENTITY_KEY] = draw(st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1))  # the schema's range
        rows.append(row)
    return rows


json_values = st.recursive(
    st.none() | st.booleans() | finite | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


class SpecPool:
    """Just enough of WorkerPool for ``Predictor.prepare``: it describes one spec."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec

    async def describe(self, conn: Any, model: str, version: str) -> dict[str, Any]:
        return {"feature_spec": self.spec.model_dump()}


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def prepare(loop: asyncio.AbstractEventLoop, spec: FeatureSpec, instances: list[Any]) -> np.ndarray:
    predictor = Predictor(AppSettings(), SpecPool(spec))  # type: ignore[arg-type]
    return loop.run_until_complete(predictor.prepare(object(), "m", "1", instances)).x  # type: ignore[arg-type]


def assert_one_hot_blocks(spec: FeatureSpec, x: np.ndarray) -> None:
    offset = 0
    for f in spec.features:
        if f.type in ("categorical", "hashed"):
            np.testing.assert_array_equal(x[:, offset : offset + f.width].sum(axis=1), 1.0)
        offset += f.width


@PROPS
@given(st.data())
def test_every_admitted_instance_encodes_or_names_the_missing_required_field(loop, data):
    spec = data.draw(feature_specs())
    instances = data.draw(admitted_instances(spec))
    required_missing = [
        f.name for f in spec.features if f.default is None and any(r.get(f.name) is None for r in instances)
    ]
    try:
        with np.errstate(over="ignore"):  # huge raw values overflow float32 to inf: a value, not an error
            x = prepare(loop, spec, instances)
    except InvalidInput as exc:
        assert required_missing, f"admitted input refused: {exc.message}"
        assert exc.message.split(":")[0].split(".", 1)[1] in required_missing
        assert exc.message.startswith("instances[")
        return
    assert not required_missing
    assert x.dtype == np.float32 and x.shape == (len(instances), spec.width)
    assert_one_hot_blocks(spec, x)


@PROPS
@given(st.data())
def test_anything_else_is_a_422_naming_the_field_never_another_error(loop, data):
    spec = data.draw(feature_specs())
    names = [f.name for f in spec.features] + [ENTITY_KEY]
    instance_strategy = json_values | st.dictionaries(st.sampled_from(names) | st.text(max_size=6), json_values)
    instances = data.draw(st.lists(instance_strategy, min_size=1, max_size=4))
    try:
        with np.errstate(over="ignore"):
            prepare(loop, spec, instances)
    except InvalidInput as exc:
        paths = {f"instances[{i}]" for i in range(len(instances))}
        for i, instance in enumerate(instances):
            keys = set(names) | (set(instance) if isinstance(instance, dict) else set())
            paths |= {format_loc(("instances", i, key)) for key in keys}
        assert any(exc.message.startswith(p + ": ") for p in paths), exc.message


@PROPS
@given(st.data())
def test_stored_text_round_trips_to_the_same_encoding(loop, data):
    """A value written by `tandem features load` and read back by the app encodes like it was sent inline."""
    spec = data.draw(feature_specs())
    row = {f.name: data.draw(value_for(f)) for f in spec.features}
    stored = {}
    for f in spec.features:
        text = format_value(row[f.name])
        stored[f.name] = parse_value(f.type, text) if text is not None else None
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(spec.encoder.encode([stored]), spec.encoder.encode([row]))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 400), st.integers(0, 2**32 - 1), st.booleans())
def test_training_columns_and_serving_requests_encode_identically(loop, n, seed, variant):
    """The demo model's training path (numpy columns) and its serving path (JSON rows through the
    request validator) give the very same matrix: training/serving skew is impossible by construction."""
    cols, _ = synthesize(n, np.random.default_rng(seed), variant=variant)
    spec = make_spec(cols)
    trained = spec.encoder.encode_columns(cols, n)
    rows = [{name: col[i].item() for name, col in cols.items()} for i in range(n)]
    served = prepare(loop, spec, rows)
    np.testing.assert_array_equal(trained, served)
    assert np.isfinite(served).all()


@pytest.mark.parametrize("text", ["1e3", " 2.5", "-0", "1_000"])
def test_numeric_text_forms_python_accepts(text):
    assert math.isclose(parse_value("numeric", text), float(text))


def _encode_both(spec: FeatureSpec, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    """``encode_rows`` and ``encode_columns`` on the same rows: each an array or the InvalidInput raised."""
    encoder = spec.encoder
    results = []
    for encode in (
        lambda: encoder.encode_rows(rows),
        lambda: encoder.encode_columns({f.name: [r.get(f.name) for r in rows] for f in spec.features}, len(rows)),
    ):
        try:
            results.append(encode())
        except InvalidInput as exc:
            results.append(exc)
    return results[0], results[1]


@PROPS
@given(st.data())
def test_row_by_row_encoding_equals_the_vectorised_one(data):
    """The per-value path serving uses for small requests must be the training encoder, bit for bit:
    NaN and infinities included, which stored features can carry."""
    spec = data.draw(feature_specs())
    rows = data.draw(admitted_instances(spec))
    numeric = [f.name for f in spec.features if f.type == "numeric"]
    for row in rows:
        for name in numeric:
            if data.draw(st.integers(0, 4)) == 0:
                row[name] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, -0.0]))
    by_row, by_column = _encode_both(spec, rows)
    if isinstance(by_column, InvalidInput):
        assert isinstance(by_row, InvalidInput)
        assert (by_row.message, by_row.details) == (by_column.message, by_column.details)
        return
    assert not isinstance(by_row, InvalidInput), by_row
    assert by_row.dtype == by_column.dtype == np.float32
    np.testing.assert_array_equal(by_row, by_column)  # NaN equals NaN here


def test_field_paths_drop_union_member_names_but_not_fields_named_like_them():
    assert format_loc(("instances", 0, "amount", "float")) == "instances[0].amount"
    assert format_loc(("instances", 0, "int")) == "instances[0].int"
    assert format_loc(("instances", 0, "bool", "bool")) == "instances[0].bool"
    assert format_loc(("instances", 2, "a.b")) == 'instances[2]["a.b"]'
