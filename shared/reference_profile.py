"""The reference profile of a model version: what its training data and its predictions looked like.

Stored as ``reference_profile.json`` beside the feature spec (``extra_files/``), so whatever compares live
traffic with training (the app servers' drift gauges, ``tandem drift report``) compares against the data
this very version was trained on, not against a reference someone remembered to save elsewhere.

Schema (``format`` ``tandem-reference-profile/1``)::

    {"format": "tandem-reference-profile/1",
     "rows": 20000,                                   # rows it was taken from
     "features": [                                    # one per feature (spec) or input column (signature)
       {"name": "amount", "kind": "numeric",
        "edges": [9.1, 15.0, ...],                    # decile edges, strictly increasing (at most 9)
        "fractions": [0.1, 0.1, ...],                 # len(edges) + 1 bins: x < edges[0], ..., x >= edges[-1]
        "missing": 0.0},                              # share of rows without a value (fractions are of the rest)
       {"name": "channel", "kind": "categorical",
        "frequencies": {"pos": 0.5, "web": 0.3, ...}, # the most frequent values (at most 20), booleans as
        "other": 0.0,                                 # "true"/"false"; other: every value not listed
        "missing": 0.0}],
     "prediction": {"kind": "numeric", ...} | null}   # the model's predictions on those rows (the last
                                                      # column of a row of several: a classifier's positive class)

A numeric value ``x`` falls in bin ``searchsorted(edges, x, side="right")``; the bins are the same for the
reference and for live values, so the population stability index (:func:`psi`) compares like with like.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT = "tandem-reference-profile/1"
FILE = "reference_profile.json"
MAX_VALUES = 20
"""Categorical values listed by name; the rest share ``other`` (hashed ids would otherwise list thousands)."""
DECILES = np.linspace(0.1, 0.9, 9)
PSI_FLOOR = 1e-4
"""Bin shares below this count as this much in the PSI: an empty bin would otherwise make it infinite."""


class ProfileError(ValueError):
    """A profile that is unreadable or does not fit the version it is stored with."""


def _close_to_one(total: float, what: str) -> None:
    if not math.isclose(total, 1.0, abs_tol=1e-3):
        raise ValueError(f"{what} sum to {total:.4f}, not 1")


class NumericProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    kind: Literal["numeric"] = "numeric"
    edges: list[float] = Field(max_length=9)
    fractions: list[Annotated[float, Field(ge=0, le=1)]]
    missing: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> NumericProfile:
        if any(not math.isfinite(e) for e in self.edges) or any(b <= a for a, b in itertools.pairwise(self.edges)):
            raise ValueError(f"{self.name}: edges must be finite and strictly increasing")
        if len(self.fractions) != len(self.edges) + 1:
            raise ValueError(f"{self.name}: {len(self.edges)} edges need {len(self.edges) + 1} fractions")
        if self.missing < 1:
            _close_to_one(sum(self.fractions), f"{self.name}: fractions")
        return self

    @property
    def expected(self) -> np.ndarray:
        """Share of rows per bin, the missing ones last: what live shares are compared with."""
        return np.append(np.asarray(self.fractions) * (1 - self.missing), self.missing)


class CategoricalProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    kind: Literal["categorical"] = "categorical"
    frequencies: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(max_length=MAX_VALUES)
    other: float = Field(0.0, ge=0, le=1)
    missing: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> CategoricalProfile:
        if self.missing < 1:
            _close_to_one(sum(self.frequencies.values()) + self.other, f"{self.name}: frequencies and other")
        return self

    @property
    def expected(self) -> np.ndarray:
        """Share of rows per value, then other, then missing."""
        shares = [*self.frequencies.values(), self.other]
        return np.append(np.asarray(shares) * (1 - self.missing), self.missing)


ColumnProfile = Annotated[NumericProfile | CategoricalProfile, Field(discriminator="kind")]


class ReferenceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["tandem-reference-profile/1"] = FORMAT
    rows: int = Field(ge=1)
    features: list[ColumnProfile]
    prediction: ColumnProfile | None = None

    def feature(self, name: str) -> NumericProfile | CategoricalProfile | None:
        return next((f for f in self.features if f.name == name), None)

    def check(self, kinds: Mapping[str, str]) -> None:
        """Raise :class:`ProfileError` unless it profiles exactly these features (``name -> numeric |
        categorical``), each of its kind: a profile of other data would make every gauge meaningless."""
        mine = {f.name: f.kind for f in self.features}
        if set(mine) != set(kinds):
            extra, lacking = sorted(set(mine) - set(kinds)), sorted(set(kinds) - set(mine))
            raise ProfileError(
                "its features are not the version's: "
                + "; ".join(
                    p for p in (f"not inputs: {extra}" if extra else "", f"absent: {lacking}" if lacking else "") if p
                )
            )
        wrong = [f"{n} ({mine[n]}, the version has {k})" for n, k in kinds.items() if mine[n] != k]
        if wrong:
            raise ProfileError(f"kinds differ: {', '.join(wrong)}")

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def kinds_of_spec(spec: Any) -> dict[str, str]:
    """``name -> numeric | categorical`` for a feature spec: hashed and boolean features are profiled by value."""
    return {f.name: "numeric" if f.type == "numeric" else "categorical" for f in spec.features}


NUMERIC_COLUMN_TYPES = frozenset({"double", "float", "long", "integer"})


def kinds_of_signature(columns: Iterable[Any]) -> dict[str, str]:
    """The same for a version described by its MLflow signature (``shared.signature.Column`` or dicts)."""
    out = {}
    for c in columns:
        name, ctype = (c["name"], c["type"]) if isinstance(c, Mapping) else (c.name, c.type)
        out[name] = "numeric" if ctype in NUMERIC_COLUMN_TYPES else "categorical"
    return out


def parse(data: Any) -> ReferenceProfile:
    """A profile from its JSON text or parsed dict; :class:`ProfileError` saying what is wrong."""
    try:
        if isinstance(data, str | bytes):
            return ReferenceProfile.model_validate_json(data)
        return ReferenceProfile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"not a {FORMAT}: {where}: {err['msg']}") from None


def read(path: Path) -> dict[str, Any] | None:
    """The profile stored at ``path`` as plain JSON (what workers pass on), ``None`` when there is none."""
    if not path.exists():
        return None
    return json.loads(path.read_text())


# -- making one ----------------------------------------------------------------------------------------


def category(v: Any) -> str | None:
    """A value as profiled by name: booleans as ``true``/``false``, missing (None, NaN) as ``None``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    return str(v)


def numeric_profile(values: Any, name: str = "") -> NumericProfile:
    x = np.asarray(values, dtype=np.float64).ravel()
    present = x[np.isfinite(x)]
    missing = 1.0 - present.size / x.size if x.size else 1.0
    if present.size == 0:
        return NumericProfile(name=name, edges=[], fractions=[1.0], missing=1.0)
    edges = np.unique(np.quantile(present, DECILES))
    counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=edges.size + 1)
    return NumericProfile(name=name, edges=edges.tolist(), fractions=(counts / present.size).tolist(), missing=missing)


def categorical_profile(values: Sequence[Any] | np.ndarray, name: str = "") -> CategoricalProfile:
    labels = [category(v) for v in values]
    present = [v for v in labels if v is not None]
    missing = 1.0 - len(present) / len(labels) if len(labels) else 1.0
    if not present:
        return CategoricalProfile(name=name, frequencies={}, other=0.0, missing=1.0)
    uniq, counts = np.unique(np.asarray(present, dtype=object).astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:MAX_VALUES]
    freqs = {str(uniq[i]): float(counts[i] / len(present)) for i in order}
    return CategoricalProfile(name=name, frequencies=freqs, other=max(0.0, 1.0 - sum(freqs.values())), missing=missing)


def prediction_values(predictions: Iterable[Any]) -> np.ndarray | None:
    """One number per prediction (the last of a row of several); ``None`` for predictions that are objects."""
    out = []
    for p in predictions:
        if isinstance(p, Mapping):
            return None
        if isinstance(p, list | tuple | np.ndarray):
            p = p[-1] if len(p) else None
        out.append(np.nan if p is None else float(p))
    return np.asarray(out, dtype=np.float64)


def profile_columns(
    columns: Mapping[str, Any], kinds: Mapping[str, str], predictions: Iterable[Any] | None = None
) -> ReferenceProfile:
    """The profile of raw columns (``name -> values``) as ``kinds`` says to take each, with the predictions
    the model made for those rows when given."""
    features: list[Any] = []
    rows = 0
    for name, kind in kinds.items():
        values = columns.get(name)
        if values is None:
            raise ProfileError(f"the reference data has no column {name!r}")
        values = list(values) if not isinstance(values, np.ndarray) else values
        rows = max(rows, len(values))
        if kind == "numeric":
            as_float = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
            features.append(numeric_profile(as_float, name))
        else:
            features.append(categorical_profile(values, name))
    pred = None
    if predictions is not None:
        values = prediction_values(predictions)
        pred = numeric_profile(values) if values is not None else None
    return ReferenceProfile(rows=max(rows, 1), features=features, prediction=pred)


def profile_frame(frame: Any, kinds: Mapping[str, str], predictions: Iterable[Any] | None = None) -> ReferenceProfile:
    """The same from a pandas DataFrame (missing cells: NaN, None, NA)."""
    columns = {}
    for name in kinds:
        if name not in frame.columns:
            raise ProfileError(f"the reference data has no column {name!r}")
        col = frame[name]
        columns[name] = col.to_numpy(dtype=np.float64, na_value=np.nan) if kinds[name] == "numeric" else col.tolist()
    return profile_columns(columns, kinds, predictions)


# -- comparing -----------------------------------------------------------------------------------------


def psi(expected: np.ndarray, counts: np.ndarray) -> float:
    """Population stability index of live ``counts`` per bin against ``expected`` shares (same bins).

    ``sum((live - ref) * ln(live / ref))``; shares below :data:`PSI_FLOOR` count as it. Read it as the
    industry does: under 0.1 stable, 0.1 to 0.25 a shift worth a look, over 0.25 a different population.
    """
    total = counts.sum()
    if total == 0:
        return 0.0
    live = np.maximum(counts / total, PSI_FLOOR)
    ref = np.maximum(expected, PSI_FLOOR)
    return float(np.sum((live - ref) * np.log(live / ref)))
