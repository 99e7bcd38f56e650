"""Registry helpers against a real sqlite MLflow registry."""

from __future__ import annotations

from shared import registry
from shared.features import load_spec


def test_first_version_gets_the_production_alias_and_resolves(demo_registry):
    ref = registry.resolve(demo_registry.uri, "demo", alias="production")
    assert ref is not None and ref.version == demo_registry.version.version
    assert "production" in ref.aliases
    assert ref.tags["size"] == "small"


def test_missing_alias_or_model_resolves_to_none(demo_registry):
    assert registry.resolve(demo_registry.uri, "demo", alias="nope") is None
    assert registry.resolve(demo_registry.uri, "no-such-model", alias="production") is None
    assert registry.resolve(demo_registry.uri, "demo", tag="stage=never") is None


def test_download_is_cached_by_version_and_complete(demo_registry, tmp_path):
    path = registry.download(demo_registry.uri, demo_registry.version, tmp_path)
    files = registry.model_files(path)
    assert files["onnx"].stat().st_size > 1000
    spec = load_spec(files["feature_spec"].read_text())
    assert spec.entity == "account"
    example = registry.read_input_example(path)
    assert len(example["instances"]) == len(example["predictions"]) > 0
    mtime = files["onnx"].stat().st_mtime_ns
    assert registry.download(demo_registry.uri, demo_registry.version, tmp_path) == path
    assert files["onnx"].stat().st_mtime_ns == mtime  # not fetched twice


def test_register_tag_and_alias_moves(demo_registry, tmp_path):
    path = registry.download(demo_registry.uri, demo_registry.version, tmp_path)
    ref = registry.register(demo_registry.uri, "copy-of-demo", path)
    assert ref.version == "1" and ref.aliases == ["production"]
    second = registry.register(demo_registry.uri, "copy-of-demo", path)
    assert second.version == "2" and second.aliases == []  # only the first version is auto-promoted
    registry.set_tag(demo_registry.uri, "copy-of-demo", "2", "stage=canary")
    assert registry.resolve(demo_registry.uri, "copy-of-demo", tag="stage=canary").version == "2"
    registry.set_alias(demo_registry.uri, "copy-of-demo", "production", "2")
    assert registry.resolve(demo_registry.uri, "copy-of-demo", alias="production").version == "2"
    assert [v.version for v in registry.list_versions(demo_registry.uri, "copy-of-demo")] == ["1", "2"]
