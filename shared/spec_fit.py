"""Fit a :class:`~shared.features.FeatureSpec` from training data, and read a DataFrame the encoder's way.

A team adopting Tandem has a table of training data, not a hand-written ``feature_spec.json``. The rules
here are few and predictable on purpose: the spec is a contract with request clients (it becomes the
request schema) as much as an encoder setting, so every choice shows in the spec and each can be
overridden per column (docs/features.md, "Fitting a spec from training data"):

- numbers: clipped at robust bounds (the 0.1st and 99.9th percentiles, rounded inward to observed
  values so one wild outlier cannot drag a bound with it), then standardised with the mean and
  standard deviation of the clipped values (through log1p where asked), missing values given the median;
- booleans (bool columns, or True/False with gaps): the default is the majority value;
- text with at most ``hash_threshold`` distinct values: a vocabulary of the values seen at least
  ``min_count`` times, most frequent first, at most ``max_vocab`` of them; rarer values share the
  out-of-vocabulary slot, which so learns what an unseen value means;
- text with more: hashed into ``2 x distinct`` buckets rounded up to a power of two, between 16 and
  ``max_buckets`` (open-ended values such as ids or postcodes, where a vocabulary would go stale);
- the target, dropped columns, ``entity_id`` (``<entity>_id`` too when an entity is named), constant or
  empty columns, dates, and text unique on every row (an identifier) are not features.

The statistics are taken over the training column exactly as the encoder will see it (gaps filled with
the default, clipped, transformed), so the encoded training matrix has mean 0 and deviation 1 per number.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import ValidationError

from shared.features import (
    ENTITY_KEY,
    BooleanFeature,
    CategoricalFeature,
    FeatureSpec,
    HashedFeature,
    NumericFeature,
)

logger = logging.getLogger(__name__)

Kind = Literal["numeric", "categorical", "hashed", "boolean"]
KINDS: tuple[str, ...] = ("numeric", "categorical", "hashed", "boolean")
SKEW_FOR_LOG1P = 2.0
"""``log1p="auto"`` transforms non-negative columns more skewed than this (an exponential's skew is 2)."""
MIN_BUCKETS = 16
MAX_Z = 10.0
"""A standardised training value further out than this is worth a note: its column's scale is set by outliers."""
ID_MIN_ROWS = 20
"""Text unique on every row is called an identifier only from this many rows (tiny samples are unique anyway)."""
_NUMBER = {"integer", "floating", "mixed-integer-float", "decimal"}
_TEXT = {"string", "categorical", "mixed", "mixed-integer", "bytes"}
_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def fit_spec(frame: pd.DataFrame, *, target: str | None = None, **options: Any) -> FeatureSpec:
    """The spec (notes about skipped columns are logged), carrying the reference profile of ``frame``
    (``spec.fitted_profile``); see :func:`fit_with_notes` for the options."""
    spec, notes = fit_with_notes(frame, target=target, **options)
    for note in notes:
        logger.info("spec fit: %s", note)
    spec.keep_profile(reference_profile(spec, frame))
    return spec


def fit_with_notes(
    frame: pd.DataFrame,
    *,
    target: str | None = None,
    drop: Collection[str] = (),
    kinds: Mapping[str, Kind] | None = None,
    max_vocab: int = 100,
    min_count: int = 5,
    hash_threshold: int = 100,
    max_buckets: int = 1024,
    clip_quantiles: tuple[float, float] | None = (0.001, 0.999),
    log1p: Collection[str] | Literal["auto"] = (),
    defaults: Literal["all", "gaps"] = "all",
    entity: str | None = None,
    input_name: str = "input",
    output_name: str = "probability",
) -> tuple[FeatureSpec, list[str]]:
    """Infer one feature per usable column of ``frame``, in column order, and say what was left out and why.

    ``kinds`` forces a column's kind (e.g. integer codes that are really categories). ``defaults="gaps"``
    gives a default only to columns with missing values in the training data, so requests must carry
    the others (a forgotten field is then a 422 rather than a silent median); ``"all"`` lets every
    feature be left out of a request. ``clip_quantiles=None`` fits no clip bounds.
    """
    kinds = dict(kinds or {})
    _check_options(frame, target, drop, kinds, log1p, max_vocab, min_count, hash_threshold, max_buckets, clip_quantiles)
    if defaults not in ("all", "gaps"):
        raise ValueError(f"defaults must be 'all' or 'gaps', not {defaults!r}")
    skip = {*drop, *([target] if target is not None else [])}
    ids = {ENTITY_KEY, *([f"{entity}_id"] if entity else [])}
    features: list[Any] = []
    notes: list[str] = []
    unusable: list[str] = []
    for name in frame.columns:
        if name in skip:
            continue
        if name in ids and name not in kinds:
            notes.append(f"{name}: skipped, the entity id (sent as {ENTITY_KEY}, not as a feature)")
            continue
        if not _usable_name(name):
            unusable.append(str(name))
            continue
        feature, note = _fit_column(
            name,
            frame[name],
            kinds.get(name),
            max_vocab=max_vocab,
            min_count=min_count,
            hash_threshold=hash_threshold,
            max_buckets=max_buckets,
            clip_quantiles=clip_quantiles,
            log1p=log1p,
            all_defaults=defaults == "all",
        )
        if note:
            notes.append(f"{name}: {note}")
        if feature is not None:
            features.append(feature)
    if unusable:
        raise ValueError(
            f"columns {', '.join(map(repr, unusable))} cannot be feature names (they become request fields: "
            "letters, digits and _, starting with a letter, and not a pydantic attribute): rename or drop them"
        )
    if not features:
        raise ValueError("no column of the data can be a feature: " + ("; ".join(notes) or "the frame has none"))
    spec = FeatureSpec(features=features, entity=entity, input_name=input_name, output_name=output_name)
    return spec, notes


def _check_options(
    frame: pd.DataFrame,
    target: str | None,
    drop: Collection[str],
    kinds: Mapping[str, str],
    log1p: Collection[str] | str,
    *limits: Any,
) -> None:
    """Refuse a misspelt column or kind up front: a typo in --target would silently make the label a feature."""
    named = [*([target] if target is not None else []), *drop, *kinds, *([] if log1p == "auto" else log1p)]
    if frame.columns.has_duplicates:
        raise ValueError(f"columns appear twice: {', '.join(map(str, frame.columns[frame.columns.duplicated()]))}")
    missing = [c for c in named if c not in frame.columns]
    if missing:
        raise ValueError(
            f"no column {', '.join(map(repr, missing))} in the data (columns: {', '.join(map(str, frame.columns))})"
        )
    for col, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"kind of {col!r} must be one of {', '.join(KINDS)}, not {kind!r}")
    max_vocab, min_count, hash_threshold, max_buckets, clip_quantiles = limits
    if min(max_vocab, min_count, hash_threshold, max_buckets) < 1:
        raise ValueError("max_vocab, min_count, hash_threshold and max_buckets must be at least 1")
    if clip_quantiles is not None and not 0.0 <= clip_quantiles[0] < clip_quantiles[1] <= 1.0:
        raise ValueError(f"clip_quantiles must be two increasing fractions in [0, 1], not {clip_quantiles}")


def _usable_name(name: Any) -> bool:
    """The very rule FeatureSpec applies, asked of the spec itself so the two cannot drift apart."""
    try:
        FeatureSpec(features=[NumericFeature(name=name)])
    except (ValidationError, TypeError):
        return False
    return True


def _fit_column(
    name: str, series: pd.Series, kind: str | None, *, all_defaults: bool, **opts: Any
) -> tuple[Any | None, str]:
    """One feature (or None) and a note for the user (empty when there is nothing to say)."""
    present = series.notna().to_numpy()
    if not present.any():
        return None, "skipped, no values"
    if series[present].nunique() < 2:
        return None, "skipped, constant in the training data (it carries no information)"
    gaps = not present.all()
    note = ""
    if kind is None:
        inferred = pd.api.types.infer_dtype(series, skipna=True)
        if inferred == "boolean":
            kind = "boolean"
        elif inferred in _NUMBER:
            kind = "numeric"
            if inferred == "integer" and present.sum() >= ID_MIN_ROWS and series.is_unique:
                note = "every value distinct: if this is an identifier, drop it"
        elif inferred in _TEXT:
            kind = "text"
        else:
            return None, f"skipped, {inferred} values (convert them to numbers or text first)"
    try:
        if kind == "numeric":
            x = pd.to_numeric(series).to_numpy(dtype=np.float64, na_value=np.nan)
            feature, warning = _fit_numeric(name, x, gaps or all_defaults, opts["clip_quantiles"], opts["log1p"])
            return feature, "; ".join(filter(None, [note, warning]))
        if kind == "boolean":
            b = _as_bool(series[present], name)
            return BooleanFeature(name=name, default=bool(b.mean() > 0.5) if gaps or all_defaults else None), note
    except (ValueError, TypeError) as exc:
        raise ValueError(f"column {name!r} as {kind}: {exc}") from None
    return _fit_text(name, _as_text(series[present]), kind, gaps or all_defaults, **opts)


def _fit_numeric(
    name: str, x: np.ndarray, with_default: bool, clip_quantiles: tuple[float, float] | None, log1p: Any
) -> tuple[NumericFeature, str]:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise ValueError("no finite values")
    median = float(np.median(finite))
    clip = None
    filled = np.where(np.isnan(x), median, x)
    if clip_quantiles is not None:
        # Rounded inward to observed values: with linear interpolation a single outlier among a few
        # hundred rows would pull the 99.9th percentile most of the way to itself.
        lo = float(np.quantile(finite, clip_quantiles[0], method="higher"))
        hi = float(np.quantile(finite, clip_quantiles[1], method="lower"))
        if lo >= hi:  # mostly one value (a sparse count): robust bounds would flatten it to a constant
            lo, hi = float(finite.min()), float(finite.max())
        clip = (lo, hi)
        filled = np.clip(filled, lo, hi)
    filled = filled[np.isfinite(filled)]  # unclipped infinities say nothing about the scale
    if log1p == "auto":
        transform = "log1p" if filled.min() >= 0 and _skew(filled) > SKEW_FOR_LOG1P else "none"
    else:
        transform = "log1p" if name in log1p else "none"
    if transform == "log1p":
        filled = np.log1p(np.maximum(filled, 0.0))
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(filled.mean()), float(filled.std())
    if not (np.isfinite(mean) and np.isfinite(std)):  # values near 1e308: JSON and the encoder need finite figures
        raise ValueError("values too large to standardise (clip them, or fit with log1p)")
    std = std if std > 0 else 1.0
    feature = NumericFeature(
        name=name, mean=mean, std=std, clip=clip, transform=transform, default=median if with_default else None
    )
    # Percentile bounds clip 0.1% a side: more outliers than that (sentinels such as 999999) still set the scale.
    z = float(np.abs(filled - mean).max() / std)
    return feature, (
        f"a few extreme values dominate its scale (|z| up to {z:.0f}): consider log1p, tighter "
        "clip quantiles, or cleaning them"
        if z > MAX_Z
        else ""
    )


def _skew(x: np.ndarray) -> float:
    std = x.std()
    return float(((x - x.mean()) ** 3).mean() / std**3) if std > 0 else 0.0


def _fit_text(
    name: str,
    text: pd.Series,
    kind: str,
    with_default: bool,
    *,
    max_vocab: int,
    min_count: int,
    hash_threshold: int,
    max_buckets: int,
    **_: Any,
) -> tuple[Any | None, str]:
    # Most frequent first, ties by value, so the vocabulary does not depend on the rows' order.
    order = sorted(text.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))
    distinct = len(order)
    mode = order[0][0] if with_default else None
    if kind == "text":
        if distinct <= hash_threshold:
            kind = "categorical"
        elif distinct == len(text) and distinct >= ID_MIN_ROWS:
            return None, "skipped, a different value on every row (an identifier: nothing to learn that generalises)"
        else:
            kind = "hashed"
    if kind == "hashed":
        buckets = min(max_buckets, max(MIN_BUCKETS, 1 << (2 * distinct - 1).bit_length()))
        return HashedFeature(name=name, buckets=buckets, default=mode), ""
    vocabulary = [value for value, count in order if count >= min_count][:max_vocab]
    if not vocabulary:
        return None, f"skipped, no value seen {min_count} times (lower min_count, or hash it)"
    rest = len(text) - sum(count for _, count in order[: len(vocabulary)])
    note = (
        f"{distinct - len(vocabulary)} rarer values ({rest / len(text):.1%} of rows) share the OOV slot" if rest else ""
    )
    return CategoricalFeature(name=name, vocabulary=vocabulary, default=mode), note


def _as_text(values: pd.Series) -> pd.Series:
    """Values as a client sends them in JSON: integers (even those a gap turned into floats) without ``.0``."""

    def text(v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return values.astype(object).map(text)


def _as_bool(values: pd.Series, name: str) -> np.ndarray:
    """True/False, 1/0, or their text in any case (as the feature store reads them); anything else is an error."""

    def one(v: Any) -> bool:
        if isinstance(v, bool | np.bool_):
            return bool(v)
        if isinstance(v, str):
            low = v.strip().lower()
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
        elif isinstance(v, int | float | np.integer | np.floating) and v in (0, 1):
            return bool(v)
        raise ValueError(f"{name}: {v!r} is not a boolean")

    return np.fromiter((one(v) for v in values.astype(object)), dtype=bool, count=len(values))


def frame_columns(spec: FeatureSpec, frame: pd.DataFrame) -> dict[str, Any]:
    """The spec's columns of ``frame`` as :meth:`Encoder.encode_columns` takes them.

    Missing cells (NaN, None, NA) take the feature's default, as an absent field does in a request (a
    feature without one is then the encoder's "required" error, naming the row); text is written as a
    client would send it, so training rows and requests land in the same one-hot slot. A column the
    frame lacks counts as missing on every row.
    """
    columns: dict[str, Any] = {}
    for f in spec.features:
        if f.name not in frame.columns:
            continue
        series = frame[f.name]
        missing = series.isna().to_numpy()
        try:
            if isinstance(f, NumericFeature):
                values: np.ndarray = pd.to_numeric(series).to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
            else:
                values = np.empty(len(series), dtype=bool if isinstance(f, BooleanFeature) else object)
                present = series[~missing]
                values[~missing] = _as_bool(present, f.name) if f.type == "boolean" else _as_text(present).to_numpy()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"column {f.name!r} as {f.type}: {exc}") from None
        if missing.any():
            if f.default is None:
                values = values.astype(object)
                values[missing] = None  # the encoder's required error, with the row
            else:
                values[missing] = f.default
        columns[f.name] = values
    return columns


def reference_profile(spec: FeatureSpec, frame: pd.DataFrame, predictions: Any = None) -> Any:
    """The :class:`~shared.reference_profile.ReferenceProfile` of training data ``frame`` under ``spec``:
    values read as the encoder reads them (text as a client sends it, booleans as booleans), missing
    cells kept as missing (a request may leave out a feature with a default, and that rate is worth
    watching too), with ``predictions`` (the model's, for these rows) when given."""
    from shared.reference_profile import kinds_of_spec, profile_columns

    columns: dict[str, Any] = {}
    for f in spec.features:
        if f.name not in frame.columns:
            columns[f.name] = [None] * len(frame)
            continue
        series = frame[f.name]
        missing = series.isna().to_numpy()
        if isinstance(f, NumericFeature):
            columns[f.name] = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            continue
        values = np.full(len(series), None, dtype=object)
        present = series[~missing]
        values[~missing] = _as_bool(present, f.name) if f.type == "boolean" else _as_text(present).to_numpy()
        columns[f.name] = values
    return profile_columns(columns, kinds_of_spec(spec), predictions)
