"""Any MLflow model, run through its own flavour: what a version without a Tandem feature spec runs on.

The answer must be exactly what ``mlflow.pyfunc.load_model(uri).predict(frame)`` gives, so the model is
loaded as MLflow's pyfunc, whatever its flavour (XGBoost, LightGBM, scikit-learn, a custom
``python_function``); the only choice made here is how a batch reaches it:

- ``direct``: the flavour's own predict function (``PyFuncModel._predict_fn``: the estimator's
  ``predict``, or the ``pyfunc_predict_fn`` it was logged with, such as ``predict_proba``) on the frame.
  That skips MLflow's per-call schema enforcement, which the app server has already done against the
  same signature (types, required columns, no unknown column) and whose type casts the Arrow columns
  already carry. Taken for the flavours whose pyfunc is a thin wrapper (:data:`DIRECT_FLAVOURS`), and
  only when it gives the same answer as the full ``predict`` on the logged example.
- ``pyfunc``: the full ``predict``, for any other model (a custom ``python_function`` may read the
  frame in ways the direct call would not reproduce).

Which was taken, and why, is in the version's description and the load log; ``loadtest/formats.py``
measures both. Thread pools: tree libraries use every core by default; the worker sets
``OMP_NUM_THREADS`` before any of them loads (``tandem worker``), like ONNX Runtime's intra-op threads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ModelError
from shared.protocol import wire_dtype
from shared.signature import TABLE_INPUT, Column, UnsupportedSignature, arrow_schema, columns_from

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions"
"""Output name of a model whose predict returns one array or series (a frame's outputs are its columns)."""
DIRECT_FLAVOURS = ("sklearn", "xgboost", "lightgbm")


class MLflowRunner:
    """An MLflow pyfunc over a column signature; ``run`` takes a record batch or table of its columns."""

    input_width = None
    input_name = TABLE_INPUT

    def __init__(self, model_dir: Path, *, device: str = "auto") -> None:
        if device == "cuda":
            raise ModelError("--device cuda: MLflow flavour models run on the CPU here")
        self.device = "cpu"
        meta = _metadata(model_dir)
        self.flavour = next((f for f in meta.flavors if f != "python_function"), "python_function")
        signature = meta.signature
        if signature is None or signature.inputs is None:
            raise ModelError(
                f"the {self.flavour} model has no signature: log it with `signature=infer_signature(X, y)` "
                "(or a feature_spec.json) so requests can be validated"
            )
        try:
            self.columns: list[Column] = columns_from(signature.inputs.to_dict())
        except UnsupportedSignature as exc:
            raise ModelError(str(exc)) from None
        self.schema = arrow_schema(self.columns)
        self.model = _load_pyfunc(model_dir, self.flavour, meta)
        self.example = _example(meta, model_dir)
        self.call = "pyfunc"
        self._predict = self.model.predict
        self.output_names: list[str] = [PREDICTIONS]
        self.output_shapes: list[list[int]] = [[-1]]
        self.frame_output = False

    def run(self, table: Any) -> dict[str, np.ndarray]:
        return self.outputs(self._predict(table.to_pandas(use_threads=False)))  # small tables: threads cost more

    def choose_call(self, frame: Any) -> None:
        """Take the direct call where the flavour allows it and it answers ``frame`` exactly as the full
        ``predict`` does; learn the outputs' names and shapes from that answer."""
        reference = self.outputs(self.model.predict(frame))
        direct = getattr(self.model, "_predict_fn", None)
        if self.flavour in DIRECT_FLAVOURS and direct is not None:
            try:
                same = _same(self.outputs(direct(frame)), reference)
            except Exception as exc:  # the full predict works; the shortcut does not: not taken
                logger.info("%s: direct call failed on the example (%s); using the full predict", self.flavour, exc)
                same = False
            if same:
                self.call, self._predict = "direct", direct
        self.output_names = list(reference)
        self.output_shapes = [[-1, *o.shape[1:]] for o in reference.values()]

    def outputs(self, result: Any) -> dict[str, np.ndarray]:
        """``predict``'s answer as named arrays with one row per input row, in types the wire carries."""
        import pandas as pd

        if isinstance(result, pd.DataFrame):
            self.frame_output = True
            return {str(c): _wire_array(result[c].to_numpy(), str(c)) for c in result.columns}
        if isinstance(result, pd.Series):
            return {PREDICTIONS: _wire_array(result.to_numpy(), PREDICTIONS)}
        return {PREDICTIONS: _wire_array(np.asarray(result), PREDICTIONS)}


def warm_mlflow() -> None:
    """Import what every MLflow-flavour model needs (MLflow, pandas, Arrow: about 1.5 s and 150 MB), so
    the first such model's measured memory is its own, as ``runners.warm_runtime`` does for ONNX."""
    import mlflow.pyfunc  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401


def _metadata(model_dir: Path) -> Any:
    from mlflow.models import Model

    try:
        return Model.load(str(model_dir))
    except Exception as exc:
        raise ModelError(f"unreadable MLmodel: {exc}") from exc


def _load_pyfunc(model_dir: Path, flavour: str, meta: Any) -> Any:
    import mlflow.pyfunc

    try:
        return mlflow.pyfunc.load_model(str(model_dir))
    except ModuleNotFoundError as exc:
        python = meta.flavors.get("python_function", {}).get("python_version", "?")
        raise ModelError(
            f"the {flavour} flavour needs the Python package {exc.name!r}, not installed on this worker "
            f"(the model was logged with Python {python}; see its requirements.txt)"
        ) from exc
    except Exception as exc:
        raise ModelError(f"MLflow cannot load the {flavour} model: {exc.__class__.__name__}: {exc}") from exc


def _example(meta: Any, model_dir: Path) -> Any:
    """The ``input_example`` logged with the model as a frame, or ``None``."""
    import pandas as pd

    try:
        example = meta.load_input_example(str(model_dir))
    except Exception as exc:
        raise ModelError(f"unreadable input example: {exc}") from exc
    if example is None:
        return None
    if isinstance(example, dict):
        example = pd.DataFrame(example if all(np.ndim(v) for v in example.values()) else [example])
    return example if isinstance(example, pd.DataFrame) else None


def _wire_array(values: np.ndarray, name: str) -> np.ndarray:
    if wire_dtype(values.dtype) is not None:
        return values
    if values.dtype.kind in "OT" and all(isinstance(v, str) for v in values.ravel()):
        return values.astype(str)  # labels: object or pandas strings become fixed-width unicode
    if values.dtype.kind == "O":
        try:
            return values.astype(np.float64)
        except (TypeError, ValueError):
            pass
    raise ModelError(f"output {name!r} of dtype {values.dtype} cannot be sent (numbers, booleans or strings)")


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a
    )
