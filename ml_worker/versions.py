"""A loaded version of a model: load, check and warm it off the hot path, and measure what it takes.

Where versions live once loaded (the live pointer, the previous one kept for stragglers, unloading to
stay within the memory budget) is the model slot's business (``slots.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_worker.mlflow_runner import MLflowRunner
from ml_worker.runners import OnnxRunner, Runner, TorchScriptRunner
from shared import reference_profile
from shared.errors import ModelError
from shared.features import FeatureSpec, load_spec, predictions_from
from shared.protocol import wire_dtype
from shared.registry import VersionRef, cache_key, model_files, read_input_example
from shared.signature import TABLE_INPUT, V2_DATATYPES, Column, to_record_batch

logger = logging.getLogger(__name__)

WARM_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InjectedFault(ModelError):
    """A request failed on purpose by a drill version (``fault.json``)."""


FAULT_FILE = "fault.json"
"""In a version's ``extra_files/``: ``{"fail_percent": P}`` makes it fail P% of requests once serving."""


class ModelCheckFailed(ModelError):
    """A version failed load, warm-up or its checks; it is never swapped in."""


@dataclass(frozen=True, slots=True)
class WireInput:
    """What a version takes on the wire: a float32 matrix of its feature spec's width, or (no spec) one
    Arrow table of its signature's columns. Kept for unloaded versions too: requests are checked first."""

    name: str
    width: int = 0
    schema: Any = None
    """The ``pyarrow.Schema`` of a signature version; ``None`` for a feature-spec version."""

    def refusal(self, x: Any) -> str | None:
        """Why ``x`` cannot be this version's input, or ``None`` when it can."""
        if self.schema is None:
            ok = isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] and x.shape[1] == self.width
            if ok and x.dtype == np.float32:
                return None
            got = f"{x.dtype}{list(x.shape)}" if isinstance(x, np.ndarray) else "no tensor" if x is None else "a table"
            return f"{self.name!r} must be float32[n, {self.width}], n >= 1, got {got}"
        if isinstance(x, np.ndarray) or x is None or x.num_rows == 0 or not x.schema.equals(self.schema):
            return f"{self.name!r} must be an Arrow table of the signature's columns ({self.schema}) with rows"
        return None


@dataclass(slots=True)
class LoadedVersion:
    """One version of a registered model, in memory and checked: what a batch runs on."""

    name: str
    version: str
    runner: Runner
    spec: FeatureSpec | None
    """The feature spec; ``None`` for a model described by its MLflow signature (``columns``)."""
    input_example: dict[str, Any]
    model_dir: Path
    wire_input: WireInput
    columns: list[Column] | None = None
    warm_timings: dict[int, float] = field(default_factory=dict)
    """Seconds per batch size measured at warm-up: the batcher's cost-model seed."""
    origin: str = ""
    """``registry.cache_key`` of the registry entry it was loaded from ("" when loaded from a folder)."""
    size_bytes: int = 0
    """Memory it takes: the process's resident memory grown by loading and warming it, at least the
    size of its files (see :func:`measure_load`)."""
    load_s: float = 0.0
    """Seconds its load, check and warm-up took (download excluded): what loading it again costs."""
    output_datatypes: dict[str, str] = field(default_factory=dict)
    """Open Inference Protocol datatype of each output, as the check's run gave it."""
    fail_percent: float = 0.0
    """Share of requests answered with an error after running (``tandem demo-model --fail-percent``: a
    version that passes its checks and then fails in service, for rollout drills); 0 for real models."""
    reference_profile: dict[str, Any] | None = None
    """Its ``reference_profile.json`` as stored, passed on to app servers (which check it) in ``describe``."""

    def is_(self, ref: VersionRef) -> bool:
        """Whether this is the registry entry ``ref``: the same number and, when known, the same files."""
        return self.version == ref.version and (not self.origin or self.origin == cache_key(ref))

    @property
    def device(self) -> str:
        return self.runner.device

    def describe(self) -> dict[str, Any]:
        outputs = [
            {"name": n, "datatype": self.output_datatypes.get(n, "FP32"), "shape": shape}
            for n, shape in zip(self.runner.output_names, self.runner.output_shapes, strict=True)
        ]
        common = {
            "model": self.name,
            "version": self.version,
            "device": self.device,
            "outputs": outputs,
            "reference_profile": self.reference_profile,
        }
        if self.spec is None:
            runner: Any = self.runner
            columns = self.columns or []
            return {
                **common,
                "feature_spec": None,
                "signature": [c.as_dict() for c in columns],
                "flavour": runner.flavour,
                "call": runner.call,
                "frame_output": runner.frame_output,
                "input_example": self.input_example.get("instances", []),
                "inputs": [{"name": c.name, "datatype": V2_DATATYPES[c.type], "shape": [-1]} for c in columns],
            }
        return {
            **common,
            "feature_spec": self.spec.model_dump(mode="json"),
            "input_example": self.input_example.get("instances", []),
            "inputs": [{"name": self.spec.input_name, "datatype": "FP32", "shape": [-1, self.spec.width]}],
        }


def load_version(
    name: str,
    version: str,
    model_dir: Path,
    *,
    device: str = "auto",
    intra_op_threads: int = 0,
    max_batch_size: int = 64,
) -> LoadedVersion:
    """Build, check and warm a version, measuring its memory. Raises ModelCheckFailed naming the step
    that failed.

    The size is the growth of resident memory with the C heap trimmed on both sides: without the trims
    it read 90-150 MB for a model whose weights are 48 MB (the parsed model file and the optimiser's
    buffers are freed after the load but stay in the heap), and varied from load to load; with them it
    reads the same 52 MB every time, what the allocator really holds for it. Trimming releases the GIL
    (a foreign call), so serving goes on meanwhile.
    """
    t0 = time.monotonic()
    trim_heap()
    before = resident_bytes()
    loaded = _build(name, version, model_dir, device, intra_op_threads, max_batch_size)
    loaded.reference_profile = _reference_profile(name, version, model_dir)
    trim_heap()
    loaded.size_bytes = max(resident_bytes() - before, files_bytes(model_dir))
    loaded.load_s = time.monotonic() - t0
    return loaded


def _reference_profile(name: str, version: str, model_dir: Path) -> dict[str, Any] | None:
    """The stored profile as JSON, unchecked (the app servers check it against the spec); an unreadable
    one is left out with a warning: drift is off for the version, serving is not affected."""
    try:
        return reference_profile.read(model_files(model_dir)["reference_profile"])
    except (OSError, ValueError) as exc:
        logger.warning("%s v%s: unreadable %s, no drift for it: %s", name, version, reference_profile.FILE, exc)
        return None


def _build(
    name: str, version: str, model_dir: Path, device: str, intra_op_threads: int, max_batch_size: int
) -> LoadedVersion:
    files = model_files(model_dir)
    if not files["feature_spec"].exists():
        return _build_from_signature(name, version, model_dir, device, max_batch_size)
    try:
        spec = load_spec(files["feature_spec"].read_bytes())
        example = read_input_example(model_dir)
    except Exception as exc:
        raise ModelCheckFailed(f"{name} v{version}: unreadable feature spec or input example: {exc}") from exc
    try:
        if files["onnx"].exists():
            runner: Runner = OnnxRunner(files["onnx"], device=device, intra_op_threads=intra_op_threads)
        elif files["torchscript"].exists():
            runner = TorchScriptRunner(
                files["torchscript"], device=device, input_name=spec.input_name, output_name=spec.output_name
            )
        else:
            raise ModelError("no model.onnx or model.pt in the version's folder")
    except ModelError as exc:
        raise ModelCheckFailed(f"{name} v{version}: {exc.message}") from exc
    model = LoadedVersion(name, version, runner, spec, example, model_dir, WireInput(spec.input_name, spec.width))
    _check(model)
    _warm(model, max_batch_size)
    model.fail_percent = _fail_percent(model_dir)
    return model


def _fail_percent(model_dir: Path) -> float:
    """The drill fault a version asks for (``extra_files/fault.json``), 0 without one."""
    path = model_dir / "extra_files" / FAULT_FILE
    if not path.exists():
        return 0.0
    try:
        value = float(json.loads(path.read_text()).get("fail_percent", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ModelCheckFailed(f"{model_dir.name}: unreadable {FAULT_FILE}: {exc}") from exc
    if value:
        logger.warning("%s is a drill version: it fails %g%% of requests on purpose", model_dir, value)
    return min(max(value, 0.0), 100.0)


def _build_from_signature(name: str, version: str, model_dir: Path, device: str, max_batch_size: int) -> LoadedVersion:
    """A model logged the ordinary MLflow way: its flavour through MLflow, its signature for the input.

    Checked on the ``input_example`` logged with it (the full ``predict`` and the direct call must agree:
    see ``mlflow_runner``); without one it is served unchecked and warmed on nothing, and the log says so.
    """
    where = f"{name} v{version}"
    try:
        runner = MLflowRunner(model_dir, device=device)
    except ModelError as exc:
        raise ModelCheckFailed(f"{where}: {exc.message}") from exc
    model = LoadedVersion(
        name, version, runner, None, {"instances": []}, model_dir, WireInput(TABLE_INPUT, schema=runner.schema),
        columns=runner.columns,
    )  # fmt: skip
    if runner.example is None:
        logger.warning("%s: no input_example was logged with it, so it is served without a check or warm-up", where)
        return model
    rows = runner.example[[c.name for c in runner.columns if c.name in runner.example]].to_dict("records")
    try:
        table = to_record_batch([{c.name: _plain(r.get(c.name)) for c in runner.columns} for r in rows], runner.schema)
        runner.choose_call(table.to_pandas())
        outputs = runner.run(table)
    except Exception as exc:
        raise ModelCheckFailed(f"{where}: running the logged input example failed: {exc}") from exc
    model.input_example = {"instances": [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()]}
    _check_outputs(model, outputs, table.num_rows)
    for b in sorted({b for b in WARM_BATCH_SIZES if b <= max_batch_size} | {max_batch_size}):
        batch = table.take(np.arange(b) % table.num_rows)
        runner.run(batch)
        t0 = time.perf_counter()
        runner.run(batch)
        model.warm_timings[b] = time.perf_counter() - t0
    logger.info("%s: %s model, %s call", where, runner.flavour, runner.call)
    return model


def _plain(value: Any) -> Any:
    """A frame cell as the JSON a caller would send: ``None`` for missing, Python scalars for numpy's."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _check_outputs(model: LoadedVersion, outputs: dict[str, Any], rows: int) -> None:
    where = f"{model.name} v{model.version}"
    bad = {n: o.dtype.name for n, o in outputs.items() if wire_dtype(o.dtype) is None}
    if bad:
        raise ModelCheckFailed(f"{where}: outputs the wire cannot carry: {bad}")
    # Replies are cut from every output row by row; an output without one row per input row (a scalar,
    # say) could not be answered at all.
    unbatched = sorted(n for n, o in outputs.items() if np.ndim(o) == 0 or len(o) != rows)
    if unbatched:
        raise ModelCheckFailed(f"{where}: outputs {unbatched} do not have one row per input row")
    model.output_datatypes = {n: v2_datatype(o.dtype) for n, o in outputs.items()}


def v2_datatype(dtype: np.dtype) -> str:
    """The Open Inference Protocol name of an output dtype the wire carries."""
    if dtype.kind in "Ub":
        return "BYTES" if dtype.kind == "U" else "BOOL"
    return {"f": "FP", "i": "INT", "u": "UINT"}[dtype.kind] + str(dtype.itemsize * 8)


def _check(model: LoadedVersion) -> None:
    where = f"{model.name} v{model.version}"
    runner, spec = model.runner, model.spec
    assert spec is not None
    if runner.input_width is not None and runner.input_width != spec.width:
        raise ModelCheckFailed(f"{where}: model input width {runner.input_width} != feature spec width {spec.width}")
    if spec.output_name not in runner.output_names:
        raise ModelCheckFailed(f"{where}: model has no output {spec.output_name!r} ({runner.output_names})")
    instances = model.input_example.get("instances") or []
    expected = model.input_example.get("predictions")
    if not instances or expected is None:
        raise ModelCheckFailed(f"{where}: input example has no instances or no expected predictions")
    x = spec.encoder.encode(instances)
    try:
        outputs = runner.run(x)
        out = outputs[spec.output_name]
    except Exception as exc:
        raise ModelCheckFailed(f"{where}: running the input example failed: {exc}") from exc
    if out.shape[0] != len(instances):
        raise ModelCheckFailed(f"{where}: {len(instances)} example rows gave output shape {out.shape}")
    _check_outputs(model, outputs, len(instances))
    got = predictions_from(out)
    if not np.allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=1e-3, atol=1e-4):
        raise ModelCheckFailed(f"{where}: outputs do not match the input example's expected predictions")


def _warm(model: LoadedVersion, max_batch_size: int) -> None:
    """Run every batch size the batcher may form, so the first real batch pays no allocation or JIT."""
    width = model.wire_input.width
    sizes = sorted({b for b in WARM_BATCH_SIZES if b <= max_batch_size} | {max_batch_size})
    for b in sizes:
        x = np.zeros((b, width), dtype=np.float32)
        model.runner.run(x)
        t0 = time.perf_counter()
        model.runner.run(x)
        model.warm_timings[b] = time.perf_counter() - t0


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def files_bytes(model_dir: Path) -> int:
    """Bytes of a version's files: the floor of what it takes once loaded."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())


def release_memory() -> None:
    """Give memory freed by an unloaded version back to the system, so resident memory really falls.

    A collection first (a version's Python objects may sit in reference cycles), then :func:`trim_heap`.
    """
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc ``malloc_trim``); freed blocks otherwise stay
    in the process, invisible to the budget and counted by the kernel."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        ctypes.CDLL("libc.so.6").malloc_trim(0)
