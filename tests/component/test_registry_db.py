"""A new sqlite registry starts as a copy of an empty migrated MLflow database (shared/registry_db.py)."""

from __future__ import annotations

from pathlib import Path

from shared import registry, registry_db
from shared.settings import home_registry_uri


def test_a_new_registry_is_a_working_mlflow_database_and_an_old_one_is_left_alone(tmp_path: Path) -> None:
    uri = home_registry_uri(tmp_path / "home")
    registry_db.prepare(uri)
    db = tmp_path / "home" / "registry.db"
    assert db.exists()
    c = registry.client(uri)
    c.create_registered_model("m")
    assert [m.name for m in c.search_registered_models()] == ["m"]
    registry_db.prepare(uri)  # exists: untouched, the model still there
    assert [m.name for m in registry.client(uri).search_registered_models()] == ["m"]
    # MLflow added its default experiment itself, pointing where it would have without the copy.
    assert c.get_experiment("0").artifact_location.endswith("mlruns/0")


def test_other_registries_are_left_to_mlflow(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    registry_db.prepare("sqlite:///relative.db")
    registry_db.prepare("http://127.0.0.1:5000")
    assert list(tmp_path.iterdir()) == []
