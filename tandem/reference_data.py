"""``tandem register --reference DATA``: the reference profile of a version, taken from its training data
with the checked model's own predictions on it, stored beside the feature spec before registration.

Works for every format: a feature-spec version is profiled per feature of its spec (its predictions by
the encoder and the loaded runner, as a worker computes them); a version described by its MLflow
signature per input column (its predictions by the model's ``predict``). At most
:data:`PREDICTED_ROWS` rows are run through the model: a distribution needs no more, and a big table
should not make registering slow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared import registry
from shared.errors import TandemError
from shared.features import predictions_from
from shared.reference_profile import ProfileError, ReferenceProfile, kinds_of_signature, profile_frame
from tandem.register_errors import RegisterError, RegisterUsageError

logger = logging.getLogger(__name__)

PREDICTED_ROWS = 10_000
CHUNK = 1024


def read_reference(path: Path) -> Any:
    """The reference data as a DataFrame (CSV with a header, or Parquet), or a usage error."""
    from tandem.spec_cli import read_frame

    try:
        frame = read_frame(path)
    except (OSError, ValueError) as exc:
        raise RegisterUsageError(f"--reference {path}: {exc}") from None
    if frame.empty:
        raise RegisterUsageError(f"--reference {path}: no rows")
    return frame


def profile_of(loaded: Any, frame: Any, say: Callable[[str], None] = logger.info) -> ReferenceProfile:
    """The profile of ``frame`` for the loaded (checked) version ``loaded``, with its predictions."""
    if len(frame) > PREDICTED_ROWS:
        frame = frame.sample(PREDICTED_ROWS, random_state=0).reset_index(drop=True)
        say(f"--reference: profiled on a random {PREDICTED_ROWS} of its rows")
    try:
        if loaded.spec is not None:
            predictions = _spec_predictions(loaded, frame)
            return loaded.spec.reference_profile(frame, predictions)
        kinds = kinds_of_signature(loaded.columns or [])
        return profile_frame(frame, kinds, _signature_predictions(loaded, frame, list(kinds), say))
    except ProfileError as exc:
        raise RegisterUsageError(f"--reference: {exc}") from None
    except (TandemError, ValueError) as exc:
        message = exc.message if isinstance(exc, TandemError) else str(exc)
        raise RegisterUsageError(f"--reference: the model cannot take its rows: {message}") from None


def _spec_predictions(loaded: Any, frame: Any) -> list[Any]:
    x = loaded.spec.encoder.encode_frame(frame)
    out = []
    for i in range(0, len(x), CHUNK):
        try:
            result = loaded.runner.run(np.ascontiguousarray(x[i : i + CHUNK]))
        except Exception as exc:
            raise RegisterError(f"--reference: running the model on the reference rows failed: {exc}") from None
        out.extend(predictions_from(result[loaded.spec.output_name]))
    return out


def _signature_predictions(loaded: Any, frame: Any, columns: list[str], say: Callable[[str], None]) -> Any:
    """Predictions of a signature version (its ``predict``); ``None`` (no prediction profile) when the
    model answers a frame of several columns: which one is "the" prediction is not ours to guess."""
    runner = loaded.runner
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ProfileError(f"the reference data has no column {missing[0]!r}")
    try:
        outputs = runner.outputs(runner.model.predict(frame[columns]))
    except Exception as exc:
        raise RegisterError(f"--reference: the model's predict failed on the reference rows: {exc}") from None
    if len(outputs) != 1:
        say("--reference: the model answers several columns; no prediction distribution is profiled")
        return None
    return predictions_from(next(iter(outputs.values())))


def store(folder: Path, profile: ReferenceProfile) -> Path:
    """Write ``profile`` where workers look for it (``extra_files/reference_profile.json``)."""
    path = registry.model_files(folder)["reference_profile"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json() + "\n")
    return path
