"""``--models`` and ``--models-config``: every form parses to what it says, and mistakes fail at start-up."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.model_targets import ModelOptions, ModelTarget, parse_model_config, parse_models
from shared.settings import AppSettings, WorkerSettings


def test_every_form_of_an_entry() -> None:
    got = parse_models(" fraud , churn@staging, rank@tag:stage=prod,*@canary", alias="production")
    assert got == [
        ModelTarget("fraud", alias="production"),
        ModelTarget("churn", alias="staging"),
        ModelTarget("rank", alias=None, tag="stage=prod"),
        ModelTarget("*", alias="canary"),
    ]
    assert [str(t) for t in got] == ["fraud@production", "churn@staging", "rank@tag:stage=prod", "*@canary"]
    assert got[3].every and not got[0].every


def test_bare_names_follow_the_worker_wide_pointer() -> None:
    assert parse_models("a", alias=None, tag="k=v") == [ModelTarget("a", alias=None, tag="k=v")]
    assert parse_models("a,*", alias="live")[1] == ModelTarget("*", alias="live")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no model"),
        ("a b", "model name"),
        ("../etc", "model name"),
        ("a/b", "model name"),
        ("a,a@staging", "twice"),
        ("a@", "expected"),
        ("a@tag:novalue", "tag pointer"),
        ("a@tag:=v", "tag pointer"),
        ("a@x=y", "expected"),
        ("*@tag:k=v", "follows an alias"),
        ("x" * 129, "model name"),
    ],
)
def test_mistakes_are_refused_naming_the_entry(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_models(text)


def test_per_model_options_inline_json_and_yaml_file(tmp_path) -> None:
    assert parse_model_config(None) == {}
    inline = parse_model_config(json.dumps({"fraud": {"weight": 3, "max_batch_size": 32}}))
    assert inline == {"fraud": ModelOptions(weight=3, max_batch_size=32)}
    f = tmp_path / "models.yaml"
    f.write_text("churn:\n  max_latency_ms: 2\n  target_utilization: 0.8\nrank: {}\n")
    assert parse_model_config(str(f)) == {
        "churn": ModelOptions(max_latency_ms=2, target_utilization=0.8),
        "rank": ModelOptions(),
    }
    with pytest.raises(ValidationError):
        parse_model_config('{"fraud": {"wieght": 2}}')  # a typo is an error, not a silent default
    with pytest.raises(ValidationError):
        parse_model_config('{"fraud": {"weight": 0}}')


def test_settings_validate_at_start_up_and_keep_the_one_model_form() -> None:
    assert WorkerSettings().targets() == [ModelTarget("demo")]
    assert WorkerSettings(model="fraud", alias="live").targets() == [ModelTarget("fraud", alias="live")]
    assert [t.name for t in WorkerSettings(models="a,b", model="ignored").targets()] == ["a", "b"]
    with pytest.raises(ValidationError, match="model name"):
        WorkerSettings(models="bad name")
    with pytest.raises(ValidationError):
        WorkerSettings(models_config='{"a": {"weight": -1}}')


def test_app_readiness_waits_for_named_models_and_the_default() -> None:
    assert AppSettings().required_models() == []
    assert AppSettings(models="a,b@staging,*").required_models() == ["a", "b"]
    assert AppSettings(models="*", default_model="c").required_models() == ["c"]
    assert AppSettings(model="old").default == "old"
    assert AppSettings(model="old", default_model="new").default == "new"
