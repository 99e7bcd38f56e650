"""Tandem model folders from a bare ``model.onnx`` or TorchScript ``model.pt`` and a feature spec: the
model, the spec, an input example with the predictions computed here, and (given reference data) the
reference profile, laid out as workers read them (``shared/registry.py``, ``model_files``).

The spec's tensor names are taken from the ONNX file where the spec left them at their defaults,
because a model exported with another output name (``output``) was the usual reason a version never
served.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import registry
from shared.errors import TandemError
from shared.features import FeatureSpec, predictions_from
from tandem.register_errors import RegisterError, RegisterUsageError

logger = logging.getLogger(__name__)

SYNTHETIC_ROWS = 3
DEFAULT_INPUT, DEFAULT_OUTPUT = (
    FeatureSpec.model_fields["input_name"].default,
    FeatureSpec.model_fields["output_name"].default,
)

Say = Callable[[str], None]


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
    model: Any,
    spec: FeatureSpec,
    instances: list[dict[str, Any]],
    predictions: list[Any],
    out: Path,
    profile: Any = None,
) -> Path:
    """An MLflow ONNX model folder with Tandem's extra files; ``model`` is an ``onnx.ModelProto``.

    Saved with its weights inline: MLflow's default moves large ones to external data and changes the
    model object as it does, so saving the same object twice gave a folder ONNX Runtime refused.
    """
    import mlflow.onnx

    with tempfile.TemporaryDirectory() as tmp:
        files = _extra_files(Path(tmp), spec, instances, predictions)
        if profile is not None:  # the reference profile (shared/reference_profile.py), beside the spec
            (Path(tmp) / registry.REFERENCE_PROFILE).write_text(profile.to_json())
            files.append(str(Path(tmp) / registry.REFERENCE_PROFILE))
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
