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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import registry
from shared.errors import IntegrityError, TandemError
from shared.features import FeatureSpec, load_spec, predictions_from
from shared.model_targets import NAME_RE

logger = logging.getLogger(__name__)

SYNTHETIC_ROWS = 3
DEFAULT_INPUT, DEFAULT_OUTPUT = (
    FeatureSpec.model_fields["input_name"].default,
    FeatureSpec.model_fields["output_name"].default,
)
SPEC_HINT = "make one from training data with `tandem spec fit DATA --target COL > feature_spec.json`"


class RegisterError(TandemError):
    """The model would not serve: nothing was registered. Exit status 1."""

    http_status, code = 400, "register_refused"
    exit_code = 1


class RegisterUsageError(RegisterError):
    """The command line, or a file it names, is wrong (a missing ``--spec``, an unreadable example). Exit 2."""

    code = "register_usage"
    exit_code = 2


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


Say = Callable[[str], None]


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
    say: Say = logger.info,
) -> Registered:
    """Check ``source`` as a worker would, then register it as a new version of ``name``.

    ``alias`` is pointed at the new version. Without it, ``production`` is, but only when no version has
    it yet: a fresh model serves at once, and a new version of a serving one waits for ``tandem promote``.
    Raises :class:`RegisterError` (nothing registered) when the model would not serve.
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
    with tempfile.TemporaryDirectory(prefix="tandem-register-") as tmp:
        if kind == "uri":
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
            loaded = check(name, folder)
            ref = registry.register(
                uri, name, folder, tags={"source": Path(source).name}, alias_if_first=alias_if_first
            )
        if alias:
            registry.set_alias(uri, name, alias, ref.version)
            ref = registry.get_version(uri, name, ref.version)
    columns = [f"{c.name} ({c.type}{'' if c.required else ', optional'})" for c in loaded.columns or []]
    return Registered(ref, kind, _served_as(loaded), list(loaded.input_example.get("instances") or []), columns)


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


def synthesise(spec: FeatureSpec, rows: int = SYNTHETIC_ROWS) -> list[dict[str, Any]]:
    """Instances made from the spec alone: each feature's default, else a vocabulary entry (the first,
    then the next), ``0`` for a number (inside its clip range), ``False``/``True`` for a boolean."""
    out = []
    for i in range(rows):
        row: dict[str, Any] = {}
        for f in spec.features:
            if f.type == "categorical":
                row[f.name] = f.vocabulary[i % len(f.vocabulary)] if f.vocabulary else (f.default or "")
            elif f.default is not None:
                row[f.name] = f.default
            elif f.type == "numeric":
                row[f.name] = min(max(0.0, f.clip[0]), f.clip[1]) if f.clip else 0.0
            elif f.type == "boolean":
                row[f.name] = bool(i % 2)
            else:
                row[f.name] = f"value{i}"
        out.append(row)
    return out


def checked_instances(spec: FeatureSpec, instances: list[dict[str, Any]] | None, say: Say) -> list[dict[str, Any]]:
    """The example instances, validated as the app server validates a request to this model."""
    from pydantic import ValidationError

    if instances is None:
        instances = synthesise(spec)
        say(
            f"no --example: checking on {len(instances)} instances made from the spec (defaults, vocabulary "
            "entries, 0 for numbers); pass --example FILE with real instances for a check that means more"
        )
    for i, instance in enumerate(instances):
        try:
            spec.instance_model.model_validate(instance)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RegisterUsageError(f"example instances[{i}].{where}: {err['msg']}") from None
    return instances


def onnx_folder(path: Path, spec: FeatureSpec, instances: list[dict[str, Any]] | None, out: Path, say: Say) -> Path:
    """Write a Tandem folder for an ONNX file: its tensor names checked against (or given to) the spec, and
    the example's expected predictions computed by ONNX Runtime on the spec's encoding."""
    import onnx
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RegisterError(f"ONNX Runtime cannot load {path.name}: {exc}") from None
    spec = _onnx_names(spec, session, say)
    instances = checked_instances(spec, instances, say)
    x = _encode(spec, instances)
    try:
        out_names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(out_names, session.run(None, {spec.input_name: x}), strict=True))
    except Exception as exc:
        raise RegisterError(f"running {path.name} on the example failed: {exc}") from None
    save_onnx_folder(onnx.load(str(path)), spec, instances, predictions_from(outputs[spec.output_name]), out)
    return out


def _onnx_names(spec: FeatureSpec, session: Any, say: Say) -> FeatureSpec:
    """The spec with the model's real input and output names, or why the two cannot go together."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise RegisterError(f"the model takes {len(inputs)} inputs ({names}); Tandem feeds one float32 matrix")
    inp = inputs[0]
    if inp.type != "tensor(float)" or len(inp.shape) != 2:
        raise RegisterError(f"input {inp.name!r} is {inp.type} {inp.shape}; Tandem feeds float32 [batch, width]")
    batch, width = inp.shape
    if isinstance(batch, int):
        raise RegisterError(
            f"input {inp.name!r} has a fixed batch size of {batch}; export it with a dynamic batch axis "
            f"(torch.onnx.export(..., dynamic_axes={{{inp.name!r}: {{0: 'batch'}}}}))"
        )
    if isinstance(width, int) and width != spec.width:
        raise RegisterError(f"the model takes {width} columns but the feature spec encodes {spec.width}")
    not_tensors = [f"{o.name} ({o.type})" for o in outputs if not o.type.startswith("tensor(")]
    if not_tensors:
        raise RegisterError(
            f"outputs that are not tensors: {', '.join(not_tensors)} (skl2onnx classifiers: convert with "
            "options={'zipmap': False})"
        )
    names = [o.name for o in outputs]
    update: dict[str, str] = {}
    if inp.name != spec.input_name:
        if spec.input_name != DEFAULT_INPUT:
            raise RegisterError(f"the spec's input_name is {spec.input_name!r}, the model's input is {inp.name!r}")
        update["input_name"] = inp.name
    if spec.output_name not in names:
        if spec.output_name != DEFAULT_OUTPUT or len(names) != 1:
            raise RegisterError(
                f"the spec's output_name {spec.output_name!r} is not one of the model's outputs "
                f"({', '.join(names)}): set output_name in the spec to the one to serve"
            )
        update["output_name"] = names[0]
    if not update:
        return spec
    say("the spec's " + ", ".join(f"{k} is now {v!r}" for k, v in update.items()) + " (from the model file)")
    return FeatureSpec.model_validate({**spec.model_dump(), **update})


def _encode(spec: FeatureSpec, instances: list[dict[str, Any]]) -> Any:
    try:
        return spec.encoder.encode(instances)
    except TandemError as exc:
        raise RegisterUsageError(f"example {exc.message}") from None


def save_onnx_folder(
    model: Any, spec: FeatureSpec, instances: list[dict[str, Any]], predictions: list[Any], out: Path
) -> Path:
    """An MLflow ONNX model folder with Tandem's extra files; ``model`` is an ``onnx.ModelProto``.

    Saved with its weights inline: MLflow's default moves large ones to external data and changes the
    model object as it does, so saving the same object twice gave a folder ONNX Runtime refused.
    """
    import mlflow.onnx

    with tempfile.TemporaryDirectory() as tmp:
        files = _extra_files(Path(tmp), spec, instances, predictions)
        mlflow.onnx.save_model(
            model, str(out), save_as_external_data=False, extra_files=files, pip_requirements=["onnxruntime"]
        )
    return out


def _extra_files(tmp: Path, spec: FeatureSpec, instances: list[dict[str, Any]], predictions: list[Any]) -> list[str]:
    spec_path = tmp / registry.FEATURE_SPEC
    spec_path.write_text(spec.to_json())
    example_path = tmp / registry.INPUT_EXAMPLE
    example_path.write_text(json.dumps({"instances": instances, "predictions": predictions}, indent=2))
    return [str(spec_path), str(example_path)]


def torchscript_folder(
    path: Path, spec: FeatureSpec, instances: list[dict[str, Any]] | None, out: Path, say: Say
) -> Path:
    """Write a Tandem folder for a TorchScript file: ``model.pt`` beside an ``MLmodel`` naming it (no MLflow
    flavour keeps a TorchScript file where workers read it), with the example's expected predictions."""
    import torch
    from mlflow.models import Model

    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise RegisterError(f"torch cannot load {path.name} as TorchScript: {exc}") from None
    instances = checked_instances(spec, instances, say)
    x = _encode(spec, instances)
    try:
        with torch.inference_mode():
            result = module(torch.from_numpy(x))
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1]  # TorchScript prefixes its own traceback
        raise RegisterError(
            f"running {path.name} on the example ({len(instances)}x{spec.width}) failed: {last}"
        ) from None
    if not isinstance(result, torch.Tensor):
        raise RegisterError(f"{path.name} returns {type(result).__name__}; Tandem serves a module returning one tensor")
    out.mkdir(parents=True)
    shutil.copyfile(path, out / "model.pt")
    (out / "extra_files").mkdir()
    for f in _extra_files(out / "extra_files", spec, instances, predictions_from(result.numpy())):
        logger.debug("wrote %s", f)
    meta = Model()
    meta.add_flavor("torchscript", model_file="model.pt", torch_version=str(torch.__version__))
    meta.save(str(out / "MLmodel"))
    return out


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
