"""``tandem register``: put a model of one's own in the registry, checked first exactly as a worker checks it.

Why check here: a worker loads, checks and warms a version only after it was registered and promoted, and
one it refuses shows up as a log line and a metric on every worker, while the old version goes on
serving. Loading the version here first, with the workers' own code (``ml_worker.versions.load_version``
on the very files they would download), turns that into an error at the prompt, and nothing is written
to the registry until it passes.

Sources:

- ``model.onnx`` or a TorchScript ``model.pt`` with ``--spec feature_spec.json``: written as a Tandem
  folder (the model, the spec, and an input example whose expected predictions are computed here).
  The spec's tensor names are taken from the ONNX file where the spec left them at their defaults,
  because a model exported with another output name (``output``) was the usual reason a version never
  served.
- an MLflow model folder (has ``MLmodel``), registered as it is: a Tandem folder, or a model logged the
  ordinary MLflow way and served from its signature (docs/models.md).
- ``runs:/RUN/PATH``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/MODEL_ID``: downloaded
  to check, then registered pointing at the same files (no copy), keeping the run they came from.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import registry
from shared.errors import IntegrityError, TandemError
from shared.features import FeatureSpec, load_spec
from shared.model_targets import NAME_RE
from tandem.model_folder import Say, onnx_folder, save_onnx_folder, torchscript_folder
from tandem.register_errors import SPEC_HINT, RegisterError, RegisterUsageError

__all__ = ["RegisterError", "RegisterUsageError", "register_model", "save_onnx_folder", "summary"]

logger = logging.getLogger(__name__)


@dataclass
class Registered:
    ref: registry.VersionRef
    kind: str
    """``onnx``, ``torchscript``, ``folder`` or ``uri``."""
    served_as: str
    """How a worker runs it: ``onnx``, ``torchscript`` or the MLflow flavour."""
    instances: list[dict[str, Any]]
    """What it was checked on (sendable as they are)."""
    columns: list[str] = field(default_factory=list)
    """A signature model's input columns (``name (type)``); empty for a feature-spec model."""


def kind_of(source: str) -> str:
    if source.startswith(("runs:/", "models:/")):
        return "uri"
    path = Path(source)
    if path.is_dir():
        if not (path / "MLmodel").exists():
            raise RegisterUsageError(f"{source} is a folder without an MLmodel file: not an MLflow model folder")
        return "folder"
    if not path.exists():
        raise RegisterUsageError(f"{source}: no such file or folder (nor a runs:/ or models:/ URI)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth"):
        return "torchscript"
    raise RegisterUsageError(
        f"{source}: expected a .onnx file, a TorchScript .pt file, an MLflow model folder, runs:/RUN/PATH or "
        "models:/NAME/VERSION"
    )


def register_model(
    uri: str,
    source: str,
    name: str,
    *,
    spec: Path | None = None,
    example: Path | None = None,
    alias: str | None = None,
    reference: Path | None = None,
    say: Say = logger.info,
) -> Registered:
    """Check ``source`` as a worker would, then register it as a new version of ``name``.

    ``alias`` is pointed at the new version. Without it, ``production`` is, but only when no version has
    it yet: a fresh model serves at once, and a new version of a serving one waits for ``tandem promote``.
    Raises :class:`RegisterError` (nothing registered) when the model would not serve.

    ``reference`` (training data, CSV or Parquet): its profile, with the model's predictions on it, is
    stored beside the spec (``tandem/reference_data.py``). An MLflow folder is then copied first (the
    user's files are not written to), and a URI's files are registered as a copy carrying the profile.
    """
    if not NAME_RE.fullmatch(name):
        raise RegisterUsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it appears in URL paths)")
    kind = kind_of(source)
    if kind in ("folder", "uri") and (spec or example):
        raise RegisterUsageError(
            "--spec and --example are for .onnx and .pt files; an MLflow model is registered as it is: one "
            "without a feature_spec.json is served from its signature and checked on its logged input_example"
        )
    if kind in ("onnx", "torchscript") and spec is None:
        raise RegisterUsageError(
            f"{'an ONNX' if kind == 'onnx' else 'a TorchScript'} model needs --spec FILE: the feature spec that "
            f"turns request fields into its input tensor ({SPEC_HINT})"
        )
    alias_if_first = None if alias else "production"
    frame = None
    if reference is not None:
        from tandem.reference_data import read_reference

        frame = read_reference(reference)
    with tempfile.TemporaryDirectory(prefix="tandem-register-") as tmp:
        if kind == "uri" and frame is not None:
            try:
                where, _, _ = registry.resolve_model_uri(uri, source)
            except LookupError as exc:
                raise RegisterUsageError(str(exc)) from None
            files = download(uri, where, Path(tmp))
            loaded = _with_profile(check(name, files), files, frame, say)
            say(f"--reference: registered as a copy of {source} carrying the profile (its files are not changed)")
            ref = registry.register(uri, name, files, tags={"source": source}, alias_if_first=alias_if_first)
        elif kind == "uri":
            try:
                where, run_id, model_id = registry.resolve_model_uri(uri, source)
            except LookupError as exc:
                raise RegisterUsageError(str(exc)) from None
            files = download(uri, where, Path(tmp))
            loaded = check(name, files)
            try:
                ref = registry.register_source(
                    uri, name, where, run_id=run_id, model_id=model_id, tags={"source": source},
                    alias_if_first=alias_if_first, files=files,  # hashed as checked: the manifest is of these
                )  # fmt: skip
            except IntegrityError as exc:
                raise RegisterError(exc.message) from None
        else:
            folder = Path(source)
            if spec is not None:
                build = onnx_folder if kind == "onnx" else torchscript_folder
                folder = build(folder, read_spec(spec), read_instances(example), Path(tmp) / "model", say)
            elif frame is not None:  # the user's folder stays as it is
                folder = Path(shutil.copytree(folder, Path(tmp) / "model"))
            loaded = check(name, folder)
            if frame is not None:
                loaded = _with_profile(loaded, folder, frame, say)
            ref = registry.register(
                uri, name, folder, tags={"source": Path(source).name}, alias_if_first=alias_if_first
            )
        if alias:
            registry.set_alias(uri, name, alias, ref.version)
            ref = registry.get_version(uri, name, ref.version)
    columns = [f"{c.name} ({c.type}{'' if c.required else ', optional'})" for c in loaded.columns or []]
    return Registered(ref, kind, _served_as(loaded), list(loaded.input_example.get("instances") or []), columns)


def _with_profile(loaded: Any, folder: Path, frame: Any, say: Say) -> Any:
    from tandem.reference_data import profile_of, store

    profile = profile_of(loaded, frame, say)
    store(folder, profile)
    say(f"--reference: profiled {profile.rows} rows, {len(profile.features)} features")
    return loaded


def _served_as(loaded: Any) -> str:
    """How a worker runs it: the MLflow flavour (no feature spec), else the Tandem folder's model file."""
    if loaded.spec is None:
        return loaded.runner.flavour
    from ml_worker.runners import OnnxRunner

    return "onnx" if isinstance(loaded.runner, OnnxRunner) else "torchscript"  # its folder may be gone by now


def read_spec(path: Path) -> FeatureSpec:
    try:
        return load_spec(path.read_bytes())
    except OSError as exc:
        raise RegisterUsageError(f"--spec {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise RegisterUsageError(f"--spec {path} is not a valid feature spec ({SPEC_HINT}): {exc}") from None


def read_instances(path: Path | None) -> list[dict[str, Any]] | None:
    """The ``--example`` instances (a JSON list, or ``{"instances": [...]}``), or None: synthesise them."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RegisterUsageError(f"--example {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise RegisterUsageError(f"--example {path} is not JSON: {exc}") from None
    instances = data.get("instances") if isinstance(data, dict) else data
    if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
        raise RegisterUsageError(f'--example {path}: expected a non-empty list of objects, or {{"instances": [...]}}')
    return instances


def download(uri: str, source: str, into: Path) -> Path:
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into), tracking_uri=uri))
    except Exception as exc:
        raise RegisterError(f"cannot download {source}: {exc}") from None


def check(name: str, folder: Path) -> Any:
    """Load, check and warm the folder with the worker's own code, on the CPU; its refusal, word for word."""
    from ml_worker.versions import load_version

    try:
        return load_version(name, "candidate", folder, device="cpu")
    except TandemError as exc:
        raise RegisterError(f"a worker would not serve it: {exc.message}") from None
    except Exception as exc:  # a step the worker does not word (warm-up) fails the same way there
        raise RegisterError(f"a worker would not serve it: {type(exc).__name__}: {exc}") from None


def curl(name: str, instances: list[dict[str, Any]], port: int = 8000) -> str:
    body = json.dumps({"instances": instances[:1]})
    return (
        f"curl -s localhost:{port}/v1/models/{name}/predict -H 'content-type: application/json' -d {shlex.quote(body)}"
    )


def summary(r: Registered, port: int = 8000) -> list[str]:
    """What ``tandem register`` prints: the version, how it was checked, how to promote it and to call it."""
    ref = r.ref
    aliases = f" (aliases: {', '.join(ref.aliases)})" if ref.aliases else ""
    checked = f"on {len(r.instances)} example instances" if r.instances else "(no input example logged: not run)"
    lines = [
        f"registered {ref.name} version {ref.version}{aliases}",
        f"checked as a worker loads it ({r.served_as}) {checked}",
    ]
    if "production" not in ref.aliases:
        lines.append(f"not {ref.name}@production: `tandem promote {ref.name} {ref.version}` serves this one")
    if r.instances:
        lines += [
            "try it on a stack serving it (tandem up serves every model with @production):",
            "  " + curl(ref.name, r.instances, port),
        ]
    else:
        lines.append('send {"instances": [{...}]} with the columns ' + ", ".join(r.columns))
    return lines
