"""The documented instance schema and the validator the app server uses admit exactly the same instances,
with and without a feature store; and the v2 tensor schema's bounds are the decoder's."""

from __future__ import annotations

import sys

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app_server.schemas import instance_schema, request_model
from app_server.v2_tensors import FLOAT32_MAX, decode_input, infer_body_schema
from shared.errors import InvalidInput, TooLarge
from shared.features import BooleanFeature, CategoricalFeature, FeatureSpec, HashedFeature, NumericFeature

SPEC = FeatureSpec(
    features=[
        NumericFeature(name="amount"),
        NumericFeature(name="hour", default=12.0),
        CategoricalFeature(name="kind", vocabulary=["a", "b"]),
        HashedFeature(name="country", buckets=4, default="US"),
        BooleanFeature(name="flag", default=False),
    ],
    entity="account",
)
NAMES = ["amount", "hour", "kind", "country", "flag", "entity_id", "other"]

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False, allow_infinity=False).map(float.__floor__).map(float),  # 7.0: a JSON integer
    st.text(max_size=4),
    st.lists(st.integers(), max_size=1),
)
instances = st.dictionaries(st.sampled_from(NAMES), values, max_size=6)


@pytest.mark.parametrize("entities", [False, True])
@settings(max_examples=400, deadline=None)
@given(instance=instances)
def test_the_schema_admits_what_the_validator_accepts(entities, instance):
    schema = instance_schema(SPEC, entities, "instance")
    documented = jsonschema.Draft202012Validator(schema).is_valid(instance)
    try:
        request_model(SPEC, entities).model_validate(instance)
        accepted = True
    except ValidationError:
        accepted = False
    assert documented == accepted, (schema, instance)


def test_without_a_store_entity_id_cannot_stand_in_for_a_feature():
    assert set(instance_schema(SPEC, False, "i")["required"]) == {"amount", "kind"}
    with_store = instance_schema(SPEC, True, "i")
    assert "required" not in with_store and with_store["anyOf"][0]["required"] == ["entity_id"]
    request_model(SPEC, True).model_validate({"entity_id": 7.0})
    with pytest.raises(ValidationError):
        request_model(SPEC, False).model_validate({"entity_id": 7})
    with pytest.raises(ValidationError, match="required without an entity_id"):
        request_model(SPEC, True).model_validate({"amount": 1.0})
    assert request_model(SPEC, False).model_validate({"amount": sys.float_info.max, "kind": "zz"}).kind == "zz"


SIGNATURE = {"name": "input", "datatype": "FP32", "shape": [-1, 3]}


@pytest.mark.parametrize(
    ("tensor", "valid"),
    [
        ({"shape": [2, 3], "data": [0.5] * 6}, True),
        ({"shape": [2.0, 3], "data": [[1, 2, 3], [4, 5, 6]]}, True),  # 2.0 is a JSON integer
        ({"shape": [1, 3], "data": [FLOAT32_MAX, -FLOAT32_MAX, 0]}, True),
        ({"shape": [1, 3], "data": [1e39, 0, 0]}, False),  # beyond float32
        ({"shape": [1, 3], "data": [True, 1.5, 2]}, False),  # numpy would read true as 1
        ({"shape": [1, 3], "data": [[[1, 2, 3]]]}, False),  # nested deeper than the shape
        ({"shape": [1, 3], "data": [1, 2, 3], "parameters": None}, False),
        ({"shape": [5, 3], "data": [0] * 15}, False),  # more rows than max_rows (413)
    ],
)
def test_the_tensor_schema_and_the_decoder_agree(tensor, valid):
    tensor = {"name": "input", "datatype": "FP32", **tensor}
    body = {"inputs": [tensor]}
    schema = infer_body_schema(SIGNATURE, ["probability"], max_rows=4)
    assert jsonschema.Draft202012Validator(schema).is_valid(body) is valid
    try:
        decode_input(body, b"", SIGNATURE, max_rows=4)
        decoded = True
    except (InvalidInput, TooLarge):
        decoded = False
    assert decoded is valid
