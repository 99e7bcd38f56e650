"""MLflow model registry: register a Tandem model folder, resolve an alias or tag, download a version.

A Tandem model version is an MLflow model folder (``mlflow.onnx`` flavour, ``model.onnx``) whose
``extra_files/`` hold ``feature_spec.json`` and ``input_example.json``. Every call takes an explicit
registry URI: nothing here touches MLflow's process-global tracking URI, so one process can talk to
several registries (tests do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import integrity, registry_db
from shared.errors import IntegrityError
from shared.versions import version_key

logger = logging.getLogger(__name__)

EXPERIMENT = "tandem-models"
FEATURE_SPEC = "feature_spec.json"
INPUT_EXAMPLE = "input_example.json"
REFERENCE_PROFILE = "reference_profile.json"
"""Training and prediction distributions of the version (``shared/reference_profile.py``); optional."""


@dataclass(frozen=True, slots=True)
class VersionRef:
    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]


def client(uri: str) -> Any:
    from mlflow import MlflowClient  # imported lazily: MLflow costs ~1.5 s to import

    registry_db.prepare(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite registry live beside its database file, not in the caller's cwd."""
    db = registry_db.sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").resolve().as_uri()


def _experiment_id(c: Any, uri: str) -> str:
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(EXPERIMENT, artifact_location=_artifact_root(uri))


def _ref(mv: Any) -> VersionRef:
    return VersionRef(
        name=mv.name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id,
        tags=dict(mv.tags or {}),
        aliases=list(getattr(mv, "aliases", []) or []),
    )


def register(
    uri: str,
    name: str,
    model_dir: Path,
    *,
    tags: dict[str, str] | None = None,
    description: str = "",
    alias_if_first: str | None = "production",
) -> VersionRef:
    """Log ``model_dir`` (an MLflow model folder) in a run and register it as a new version of ``name``.

    When ``name`` had no version carrying ``alias_if_first``, the new version gets that alias, so a fresh
    registry serves its first model without a separate promote step. The files' sha256 manifest is
    logged with them and its digest tagged on the version (``shared/integrity.py``).
    """
    c = client(uri)
    run = c.create_run(_experiment_id(c, uri), run_name=f"{name}-register")
    c.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    data = integrity.manifest_bytes(integrity.manifest_of(model_dir))
    with tempfile.TemporaryDirectory(prefix="tandem-manifest-") as tmp:
        (Path(tmp) / integrity.MANIFEST).write_bytes(data)  # replaces one the folder came with
        c.log_artifact(run.info.run_id, str(Path(tmp) / integrity.MANIFEST), artifact_path="model")
    c.set_terminated(run.info.run_id)
    source = f"{run.info.artifact_uri}/model"
    tags = {**(tags or {}), integrity.TAG: integrity.digest(data)}
    return register_source(
        uri, name, source, run_id=run.info.run_id, tags=tags, description=description, alias_if_first=alias_if_first
    )


def resolve_alias(uri: str, name: str, alias: str) -> VersionRef | None:
    from mlflow.exceptions import MlflowException

    try:
        return _ref(client(uri).get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_tag(uri: str, name: str, tag: str) -> VersionRef | None:
    """The newest version of ``name`` carrying ``KEY=VALUE``."""
    key, _, value = tag.partition("=")
    versions = [v for v in list_versions(uri, name) if v.tags.get(key) == value]
    return max(versions, key=lambda v: version_key(v.version), default=None)


def resolve(uri: str, name: str, *, alias: str | None = None, tag: str | None = None) -> VersionRef | None:
    if tag:
        return resolve_tag(uri, name, tag)
    return resolve_alias(uri, name, alias or "production")


def get_version(uri: str, name: str, version: str) -> VersionRef:
    return _ref(client(uri).get_model_version(name, str(version)))


def models_with_alias(uri: str, alias: str) -> dict[str, str]:
    """Every registered model that has ``alias``, with the version it names (one paged search)."""
    c = client(uri)
    found: dict[str, str] = {}
    token = None
    while True:
        page = c.search_registered_models(max_results=1000, page_token=token)
        for rm in page:
            version = (getattr(rm, "aliases", None) or {}).get(alias)
            if version is not None:
                found[rm.name] = str(version)
        token = page.token
        if not token:
            return found


def list_models(uri: str) -> list[str]:
    """Names of every registered model."""
    c = client(uri)
    names: list[str] = []
    token = None
    while True:
        page = c.search_registered_models(max_results=1000, page_token=token)
        names += [rm.name for rm in page]
        token = page.token
        if not token:
            return sorted(names)


def list_versions(uri: str, name: str) -> list[VersionRef]:
    """Every version with its aliases (an MLflow server leaves aliases out of version searches, so they
    are taken from the registered model)."""
    c = client(uri)
    versions = sorted(
        (_ref(v) for v in c.search_model_versions(f"name='{name}'")), key=lambda v: version_key(v.version)
    )
    if not versions:
        return versions
    by_version: dict[str, list[str]] = {}
    for alias, version in (getattr(c.get_registered_model(name), "aliases", None) or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return [
        VersionRef(v.name, v.version, v.source, v.run_id, v.tags, sorted(by_version.get(v.version, [])))
        for v in versions
    ]


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    client(uri).set_registered_model_alias(name, alias, str(version))


def set_tag(uri: str, name: str, version: str, tag: str) -> None:
    key, _, value = tag.partition("=")
    client(uri).set_model_version_tag(name, str(version), key, value)


def cache_key(ref: VersionRef) -> str:
    """What names a version's files: its number plus where they came from. The number alone repeats:
    a model deleted and registered again, or a wiped registry beside a kept cache, starts at 1 again."""
    origin = hashlib.sha256(f"{ref.run_id}|{ref.source}".encode()).hexdigest()[:12]
    return f"{ref.version}-{origin}"


def download(uri: str, ref: VersionRef, cache_dir: Path) -> Path:
    """The version's model folder in ``cache_dir``; downloaded once, then reused (see :func:`cache_key`)."""
    import mlflow.artifacts

    target = Path(cache_dir) / ref.name / cache_key(ref)
    if (target / "MLmodel").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=target.parent))
    try:
        path = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(staging), tracking_uri=uri)
        )
        if not (target / "MLmodel").exists():  # another worker sharing the cache may have finished first
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover, never a complete version someone loads
            try:
                path.rename(target)  # atomic: a half-downloaded folder is never taken for a complete one
            except OSError:
                if not (target / "MLmodel").exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_files(model_dir: Path) -> dict[str, Path]:
    """Where the pieces of a downloaded Tandem model folder are."""
    extra = model_dir / "extra_files"
    return {
        "onnx": model_dir / "model.onnx",
        "torchscript": model_dir / "model.pt",
        "feature_spec": extra / FEATURE_SPEC,
        "input_example": extra / INPUT_EXAMPLE,
        "reference_profile": extra / REFERENCE_PROFILE,
    }


def read_input_example(model_dir: Path) -> dict[str, Any]:
    return json.loads(model_files(model_dir)["input_example"].read_text())


def resolve_model_uri(uri: str, model_uri: str) -> tuple[str, str | None, str | None]:
    """Where the files of an MLflow model URI really are: ``(source, run_id, model_id)``, as a registry
    version should record them.

    ``runs:/RUN/PATH`` (a model folder among the run's artifacts, or, in MLflow 3, the model logged by
    that run under that name), ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (the version it names
    now: a version must not follow an alias that moves later) and ``models:/MODEL_ID`` (a logged model).
    Raises ``LookupError`` when nothing is there.
    """
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        if model_uri.startswith("runs:/"):
            run_id, _, path = model_uri.removeprefix("runs:/").strip("/").partition("/")
            if not run_id or not path:
                raise LookupError(f"{model_uri}: expected runs:/RUN_ID/PATH")
            run = c.get_run(run_id)
            # The run's own artifacts, as MLflow 2 logged models (the client's listing would also show
            # an MLflow 3 logged model's files, which do not live there).
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            folder = f"{run.info.artifact_uri.rstrip('/')}/{path}"
            if any(a.path.endswith("MLmodel") for a in get_artifact_repository(folder).list_artifacts()):
                return folder, run_id, None
            logged = c.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
                order_by=[{"field_name": "creation_time", "ascending": False}],
            )
            if not logged:
                raise LookupError(f"{model_uri}: run {run_id} has no model at {path!r}")
            model_id = logged[0].model_id  # logged twice under one name: the newest, as MLflow picks
            return f"models:/{model_id}", run_id, model_id
        rest = model_uri.removeprefix("models:/").strip("/")
        if "@" in rest:
            mv = c.get_model_version_by_alias(*rest.split("@", 1))
        elif "/" in rest:
            mv = c.get_model_version(*rest.split("/", 1))
        else:  # a logged model's id
            return f"models:/{rest}", c.get_logged_model(rest).source_run_id, rest
    except MlflowException as exc:
        raise LookupError(f"{model_uri}: {exc.message}") from None
    model_id = getattr(mv, "model_id", None) or (mv.source.removeprefix("models:/") if _logged(mv.source) else None)
    return mv.source, mv.run_id, model_id


def _logged(source: str) -> bool:
    """Whether a version's source is an MLflow 3 logged model (``models:/m-...``), which needs its id."""
    return source.startswith("models:/") and "/" not in source.removeprefix("models:/")


def register_source(
    uri: str,
    name: str,
    source: str,
    *,
    run_id: str | None = None,
    model_id: str | None = None,
    tags: dict[str, str] | None = None,
    description: str = "",
    alias_if_first: str | None = "production",
    files: Path | None = None,
) -> VersionRef:
    """Register files already in the registry's store (see :func:`resolve_model_uri`) as a new version of
    ``name``, without copying them, keeping the run they came from. Aliases as :func:`register`.

    The version is tagged with its files' manifest digest (:func:`seal`) unless ``tags`` carry one;
    ``files`` is a local copy of what ``source`` holds, when the caller has one (else it is downloaded).
    """
    from mlflow.exceptions import MlflowException

    tags = dict(tags or {})
    if integrity.TAG not in tags:
        tags[integrity.TAG] = seal(uri, source, model_id, files)
    c = client(uri)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    mv = c.create_model_version(
        name, source=source, run_id=run_id, tags=tags, description=description, model_id=model_id
    )
    if alias_if_first and resolve_alias(uri, name, alias_if_first) is None:
        c.set_registered_model_alias(name, alias_if_first, mv.version)
    return _ref(c.get_model_version(name, mv.version))


def seal(uri: str, source: str, model_id: str | None = None, files: Path | None = None) -> str:
    """The digest of the manifest of the files at ``source``, writing the manifest beside them if it is not
    there yet. Files that already carry a manifest they no longer match (changed in the store since they
    were first registered) are refused: registering them again must not bless the change."""
    with tempfile.TemporaryDirectory(prefix="tandem-seal-") as tmp:
        if files is None:
            import mlflow.artifacts

            files = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
        actual = integrity.manifest_of(files)
        data = integrity.manifest_bytes(actual)
        stored = files / integrity.MANIFEST
        if stored.exists():
            if stored.read_bytes() != data:
                try:
                    problems = integrity.differences(json.loads(stored.read_bytes()), actual)
                except ValueError:
                    problems = []
                why = integrity.describe(problems) if problems else f"its {integrity.MANIFEST} is not Tandem's"
                raise IntegrityError(f"{source}: the files are not as first registered: {why}")
            return integrity.digest(data)
        location = source
        if _logged(source):  # an MLflow 3 logged model: its files are at the logged model's location
            location = client(uri).get_logged_model(model_id or source.removeprefix("models:/")).artifact_location
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        upload = Path(tmp) / "manifest" / integrity.MANIFEST
        upload.parent.mkdir()
        upload.write_bytes(data)
        get_artifact_repository(location, tracking_uri=uri).log_artifact(str(upload))
    return integrity.digest(data)


# -- traffic policies (shared/traffic.py): registered-model aliases and tags --------------------------


def model_state(uri: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """A registered model's aliases (alias to version) and tags, in one call; both empty when the model
    is not registered."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client(uri).get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return {}, {}
        raise
    aliases = {str(a): str(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}
    return aliases, dict(getattr(rm, "tags", None) or {})


def set_model_tag(uri: str, name: str, key: str, value: str) -> None:
    client(uri).set_registered_model_tag(name, key, str(value))


def delete_model_tag(uri: str, name: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client(uri).delete_registered_model_tag(name, key)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def delete_alias(uri: str, name: str, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client(uri).delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
