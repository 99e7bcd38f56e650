"""The feature spec and the one vectorised encoder used by training and serving alike.

A model version ships ``feature_spec.json``. Training encodes its data through :class:`Encoder`, and the
app server encodes requests through the very same class, so training/serving skew cannot creep in.
Requests are validated by a pydantic model generated from the spec, which also documents the fields.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    create_model,
    field_validator,
)

from shared.errors import InvalidInput

ENTITY_KEY = "entity_id"
FLOAT32_LIMIT = 1e38
ROW_PATH_MAX_ROWS = 16
"""Requests up to this many rows are encoded value by value; bigger ones (and training data) by column."""
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class NumericFeature(BaseModel):
    name: str
    type: Literal["numeric"] = "numeric"
    mean: float = 0.0
    std: float = 1.0
    clip: tuple[float, float] | None = None
    """Raw values are clipped into this range before any transform."""
    transform: Literal["none", "log1p"] = "none"
    default: float | None = None
    description: str = ""

    @property
    def width(self) -> int:
        return 1


class CategoricalFeature(BaseModel):
    """One-hot over a vocabulary, plus one out-of-vocabulary slot at the end."""

    name: str
    type: Literal["categorical"] = "categorical"
    vocabulary: list[str]
    default: str | None = None
    description: str = ""

    @property
    def width(self) -> int:
        return len(self.vocabulary) + 1


class HashedFeature(BaseModel):
    """One-hot over ``buckets`` by a stable hash (crc32): open-ended categories, no vocabulary."""

    name: str
    type: Literal["hashed"] = "hashed"
    buckets: int = Field(ge=1)
    default: str | None = None
    description: str = ""

    @property
    def width(self) -> int:
        return self.buckets


class BooleanFeature(BaseModel):
    name: str
    type: Literal["boolean"] = "boolean"
    default: bool | None = None
    description: str = ""

    @property
    def width(self) -> int:
        return 1


Feature = Annotated[NumericFeature | CategoricalFeature | HashedFeature | BooleanFeature, Field(discriminator="type")]


class FeatureSpec(BaseModel):
    """Ordered features of one model version, and the tensor names its model uses."""

    model_config = ConfigDict(frozen=True)

    features: list[Feature]
    entity: str | None = None
    """Entity whose stored features live in Redis at ``tandem:{entity}:{entity_id}``."""
    input_name: str = "input"
    output_name: str = "probability"
    _fitted_profile: Any = PrivateAttr(None)

    @property
    def fitted_profile(self) -> Any:
        """The reference profile of the data :meth:`fit` fitted this spec on (``None`` for a spec made
        otherwise): what ``reference_profile.json`` beside it should hold (``shared/reference_profile.py``)."""
        return self._fitted_profile

    def keep_profile(self, profile: Any) -> None:
        """Remember the profile :meth:`fit` took (a private attribute: the spec itself stays frozen)."""
        assert self.__pydantic_private__ is not None
        self.__pydantic_private__["_fitted_profile"] = profile

    def reference_profile(self, frame: Any, predictions: Any = None) -> Any:
        """The reference profile of training data ``frame`` (a DataFrame), with the model's ``predictions``
        for its rows when given (:func:`shared.spec_fit.reference_profile`)."""
        from shared.spec_fit import reference_profile

        return reference_profile(self, frame, predictions)

    @field_validator("features")
    @classmethod
    def _usable_names(cls, features: list[Any]) -> list[Any]:
        """Names become request fields: refuse the ones pydantic cannot use, and duplicates, when the
        spec is loaded rather than on every request."""
        seen: set[str] = set()
        for f in features:
            if not _NAME.fullmatch(f.name) or hasattr(BaseModel, f.name) or f.name == ENTITY_KEY:
                raise ValueError(
                    f"feature name {f.name!r}: use letters, digits and _, starting with a letter, "
                    f"not a pydantic attribute nor {ENTITY_KEY!r}"
                )
            if f.name in seen:
                raise ValueError(f"feature {f.name!r} appears twice")
            seen.add(f.name)
        return features

    @cached_property
    def width(self) -> int:
        return sum(f.width for f in self.features)

    @cached_property
    def encoder(self) -> Encoder:
        return Encoder(self)

    @cached_property
    def instance_model(self) -> type[BaseModel]:
        """Pydantic model of one request instance: every feature optional (defaults, stored features)."""
        fields: dict[str, Any] = {}
        for f in self.features:
            py_type: Any = {
                "numeric": Annotated[float, Field(allow_inf_nan=False, strict=True)],
                "categorical": StrictStr,
                "hashed": StrictStr,
                "boolean": StrictBool,
            }[f.type]
            fields[f.name] = (py_type | None, Field(None, description=f.description or None))
        if self.entity:
            fields[ENTITY_KEY] = (
                StrictStr | StrictInt | None,
                Field(None, description=f"id of the {self.entity} whose stored features fill gaps"),
            )
        return create_model("Instance", __config__=ConfigDict(extra="forbid"), **fields)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def fit(cls, frame: Any, *, target: str | None = None, **options: Any) -> FeatureSpec:
        """Infer a spec from training data (a pandas DataFrame) rather than writing its JSON by hand.

        ``target`` (the label) is left out. The rules and the options (``drop``, ``kinds``, ``max_vocab``,
        ``min_count``, ``hash_threshold``, ``max_buckets``, ``clip_quantiles``, ``log1p``, ``defaults``,
        ``entity``...) are in :mod:`shared.spec_fit`, imported here only when used: serving never needs pandas.
        """
        from shared.spec_fit import fit_spec

        return fit_spec(frame, target=target, **options)


class Encoder:
    """Turns raw feature values into the model's float32 input matrix, a column at a time."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.width = spec.width
        self._offsets: list[int] = []
        offset = 0
        for f in spec.features:
            self._offsets.append(offset)
            offset += f.width
        self._vocab = {
            f.name: {v: i for i, v in enumerate(f.vocabulary)}
            for f in spec.features
            if isinstance(f, CategoricalFeature)
        }

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Encode request rows (``None`` or absent means missing). Raises InvalidInput with a path."""
        if len(rows) <= ROW_PATH_MAX_ROWS:
            return self.encode_rows(rows)
        columns = {f.name: [row.get(f.name) for row in rows] for f in self.spec.features}
        return self.encode_columns(columns, len(rows))

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The same encoding as :meth:`encode_columns`, computed with Python floats one value at a time.

        A serving request is usually one row, and for one row numpy's per-call overhead (a dozen
        small arrays, clips and fancy indexing per feature) is most of the cost: this path is about
        six times cheaper there, and it is the app server's hottest code. It gives the same bits as
        the vectorised path (float64 arithmetic is the same IEEE arithmetic in both; NaN passes clips
        and ``max``, infinities clamp to the float32 range), which a property test checks.
        """
        width = self.width
        index: list[int] = []
        value: list[float] = []
        for r, row in enumerate(rows):
            base = r * width
            for f, offset in zip(self.spec.features, self._offsets, strict=True):
                v = row.get(f.name)
                if v is None:
                    if f.default is None:
                        raise _required(r, f.name)
                    v = f.default
                if isinstance(f, NumericFeature):
                    x = float(v)
                    if f.clip is not None:
                        lo, hi = f.clip
                        x = lo if x < lo else hi if x > hi else x
                    if f.transform == "log1p":
                        # numpy's log1p, not math's: they can differ in the last bit, and training used numpy.
                        x = float(np.log1p(max(x, 0.0)))  # max(nan, 0.0) is nan, as np.maximum's
                    x = (x - f.mean) / (f.std or 1.0)
                    index.append(base + offset)
                    value.append(FLOAT32_LIMIT if x > FLOAT32_LIMIT else -FLOAT32_LIMIT if x < -FLOAT32_LIMIT else x)
                elif isinstance(f, BooleanFeature):
                    index.append(base + offset)
                    value.append(1.0 if v else 0.0)
                elif isinstance(f, CategoricalFeature):
                    index.append(base + offset + self._vocab[f.name].get(v, len(f.vocabulary)))
                    value.append(1.0)
                else:
                    index.append(base + offset + zlib.crc32(str(v).encode()) % f.buckets)
                    value.append(1.0)
        out = np.zeros(len(rows) * width, dtype=np.float32)
        out[index] = value
        return out.reshape(len(rows), width)

    def encode_frame(self, frame: Any) -> np.ndarray:
        """Encode a pandas DataFrame of raw columns, the way training code and batch jobs hold data.

        Missing cells (NaN, None, NA) take the feature's default as an absent request field does, and
        text is read as a client would send it (:func:`shared.spec_fit.frame_columns`).
        """
        from shared.spec_fit import frame_columns

        return self.encode_columns(frame_columns(self.spec, frame), len(frame))

    def encode_columns(self, columns: Mapping[str, Sequence[Any] | np.ndarray], n: int) -> np.ndarray:
        out = np.zeros((n, self.width), dtype=np.float32)
        for f, offset in zip(self.spec.features, self._offsets, strict=True):
            values = _fill_missing(f, columns.get(f.name), n)
            if isinstance(f, NumericFeature):
                x = np.asarray(values, dtype=np.float64)
                if f.clip is not None:
                    x = np.clip(x, f.clip[0], f.clip[1])
                if f.transform == "log1p":
                    x = np.log1p(np.maximum(x, 0.0))
                # Clamped into float32's finite range: a huge but valid number (1e300) must not reach
                # the model as inf (and overflowing on the way there is expected, not worth a warning).
                with np.errstate(over="ignore"):
                    out[:, offset] = np.clip((x - f.mean) / (f.std or 1.0), -FLOAT32_LIMIT, FLOAT32_LIMIT)
            elif isinstance(f, BooleanFeature):
                out[:, offset] = np.asarray(values, dtype=bool)
            else:
                if isinstance(f, CategoricalFeature):
                    oov = len(f.vocabulary)
                    lookup = self._vocab[f.name]
                    idx = np.fromiter((lookup.get(v, oov) for v in values), np.int64, n)
                else:
                    idx = np.fromiter((zlib.crc32(str(v).encode()) % f.buckets for v in values), np.int64, n)
                out[np.arange(n), offset + idx] = 1.0
        return out


def _fill_missing(f: Any, values: Sequence[Any] | np.ndarray | None, n: int) -> Sequence[Any]:
    if values is None:
        values = [None] * n
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values
    if any(v is None for v in values):
        if f.default is None:
            raise _required(next(i for i, v in enumerate(values) if v is None), f.name)
        values = [f.default if v is None else v for v in values]
    return values


def _required(row: int, name: str) -> InvalidInput:
    return InvalidInput(
        f"instances[{row}].{name}: required (no value given, stored or default)",
        details=[{"loc": f"instances[{row}].{name}", "msg": "required"}],
    )


def predictions_from(out: np.ndarray) -> list[Any]:
    """One JSON-able prediction per row: a scalar for a single output column, else a list."""
    if out.ndim == 2 and out.shape[1] == 1:
        return out[:, 0].tolist()
    if out.ndim == 1:
        return out.tolist()
    return out.reshape(out.shape[0], -1).tolist()


def load_spec(text: str | bytes) -> FeatureSpec:
    return FeatureSpec.model_validate_json(text)
