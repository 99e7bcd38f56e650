"""Checking a version's files against its manifest, on real folders: what passes, what is refused and named."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import integrity
from shared.errors import IntegrityError


def version_folder(root: Path) -> tuple[Path, str]:
    """A model folder with nested files and its manifest written as registration writes it; its digest."""
    root.mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "model.onnx").write_bytes(bytes(range(256)) * 64)
    (root / "extra_files").mkdir()
    (root / "extra_files" / "feature_spec.json").write_text('{"features": []}')
    data = integrity.manifest_bytes(integrity.manifest_of(root))
    (root / integrity.MANIFEST).write_bytes(data)
    return root, integrity.digest(data)


def refusal(folder: Path, recorded: str) -> str:
    with pytest.raises(IntegrityError) as caught:
        integrity.verify(folder, recorded)
    return caught.value.message


def test_the_files_as_registered_verify_and_the_manifest_lists_each_once(tmp_path):
    folder, recorded = version_folder(tmp_path / "v")
    assert integrity.verify(folder, recorded) is True
    assert list(integrity.manifest_of(folder)) == ["MLmodel", "extra_files/feature_spec.json", "model.onnx"]


def test_nothing_recorded_is_unverified_not_refused(tmp_path):
    folder, _ = version_folder(tmp_path / "v")
    (folder / "model.onnx").write_bytes(b"anything")
    assert integrity.verify(folder, None) is False
    assert integrity.verify(folder, "") is False


def test_a_changed_file_is_refused_by_name(tmp_path):
    folder, recorded = version_folder(tmp_path / "v")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[1000] ^= 1  # one bit, same size, same mtime would not matter either
    (folder / "model.onnx").write_bytes(bytes(data))
    assert refusal(folder, recorded) == "files not as registered: model.onnx (changed since registration)"


def test_a_missing_file_and_an_added_file_are_refused_by_name(tmp_path):
    folder, recorded = version_folder(tmp_path / "v")
    (folder / "extra_files" / "feature_spec.json").unlink()
    (folder / "code").mkdir()
    (folder / "code" / "evil.py").write_text("import os\n")
    message = refusal(folder, recorded)
    assert "extra_files/feature_spec.json (missing)" in message
    assert "code/evil.py (not registered with the version)" in message


def test_a_manifest_rewritten_to_match_changed_files_is_refused(tmp_path):
    """Whoever can write the files can write the manifest too: the registry's tag is what catches it."""
    folder, recorded = version_folder(tmp_path / "v")
    (folder / "model.onnx").write_bytes(b"other weights")
    (folder / integrity.MANIFEST).write_bytes(integrity.manifest_bytes(integrity.manifest_of(folder)))
    assert "does not match the registry's tandem.files.sha256" in refusal(folder, recorded)
    (folder / integrity.MANIFEST).unlink()
    assert f"{integrity.MANIFEST} is missing" in refusal(folder, recorded)


def test_bytecode_is_deleted_before_the_check_and_client_metadata_ignored(tmp_path):
    folder, recorded = version_folder(tmp_path / "v")
    cache = folder / "code" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "planted.cpython-311.pyc").write_bytes(b"\x00" * 16)  # would run instead of a checked .py
    (folder / "registered_model_meta").write_text("model_name: demo\n")  # MLflow's client writes this
    assert integrity.verify(folder, recorded) is True
    assert not cache.exists()


def test_a_refusal_names_a_few_files_and_counts_the_rest(tmp_path):
    folder, recorded = version_folder(tmp_path / "v")
    for i in range(8):
        (folder / f"added{i}.bin").write_bytes(b"x")
    message = refusal(folder, recorded)
    assert message.count("not registered") == integrity.SHOWN and message.endswith("and 3 more")
