"""``tandem spec fit``: a feature spec inferred from a CSV or Parquet file of training data (docs/features.md).

The spec goes to stdout unless ``--out`` names a file, so it composes (``> feature_spec.json``) and never
overwrites a file nobody named; what was inferred, and every column left out and why, goes to stderr.
pandas is imported inside the command: ``tandem`` starts quickly for every other command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import pandas as pd

    from shared.features import FeatureSpec

app = typer.Typer(help="Feature specs: infer one from training data.", no_args_is_help=True)

CSV_MISSING = ["", "nan", "NaN", "NULL", "null"]
"""Cells a CSV means as missing. Not pandas' whole list: "NA" is a country code (Namibia), "None" a value."""


def read_frame(path: Path) -> pd.DataFrame:
    """A Parquet (``.parquet``/``.pq``) or CSV file with a header, as ``tandem features load`` reads them."""
    import pandas as pd

    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False, na_values=CSV_MISSING, low_memory=False)


def _split(values: list[str] | None) -> list[str]:
    """Repeated options and comma lists alike: ``--drop a,b --drop c``."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _kinds(values: list[str] | None) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for item in _split(values):
        column, sep, kind = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--kind takes COLUMN=KIND, not {item!r}")
        kinds[column.strip()] = kind.strip()
    return kinds


def _quantiles(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--clip-quantiles takes LOW,HIGH (e.g. 0.001,0.999) or none, not {text!r}") from None
    return lo, hi


def describe(spec: FeatureSpec) -> list[str]:
    """One line per feature: what was inferred, the figures a reviewer would check."""
    lines = []
    for f in spec.features:
        if f.default is None:
            default = "required"
        else:
            default = f"default {f.default:.6g}" if f.type == "numeric" else f"default {f.default!r}"
        if f.type == "numeric":
            clip = f" clip [{f.clip[0]:.4g}, {f.clip[1]:.4g}]" if f.clip else ""
            log = " log1p" if f.transform == "log1p" else ""
            what = f"mean {f.mean:.4g} std {f.std:.4g}{clip}{log}"
        elif f.type == "categorical":
            shown = ", ".join(f.vocabulary[:5]) + (", ..." if len(f.vocabulary) > 5 else "")
            what = f"{len(f.vocabulary)} values + OOV ({shown})"
        elif f.type == "hashed":
            what = f"{f.buckets} buckets"
        else:
            what = ""
        lines.append(f"  {f.name:<24} {f.type:<12} " + "  ".join(filter(None, [what, default])))
    return lines


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV (with a header) or Parquet file.")],
    target: Annotated[str, typer.Option(help="The label column: never a feature.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the spec here (default: stdout).")] = None,
    drop: Annotated[list[str] | None, typer.Option(help="Columns that are not features (repeat, or a,b).")] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(help="COLUMN=KIND forces numeric, categorical, hashed or boolean (e.g. integer codes)."),
    ] = None,
    max_vocab: Annotated[int, typer.Option(min=1, help="Most values in a vocabulary; rarer ones share OOV.")] = 100,
    min_count: Annotated[int, typer.Option(min=1, help="Rows a value needs to get its own slot.")] = 5,
    hash_threshold: Annotated[
        int, typer.Option(min=1, help="Text with more distinct values than this is hashed, not one-hot.")
    ] = 100,
    max_buckets: Annotated[int, typer.Option(min=1, help="Most buckets of a hashed feature.")] = 1024,
    clip_quantiles: Annotated[
        str, typer.Option(help="Numbers are clipped at these quantiles of the training values, or none.")
    ] = "0.001,0.999",
    log1p: Annotated[
        list[str] | None, typer.Option(help="Columns standardised as log(1+x) (repeat, or a,b), or auto: skewed ones.")
    ] = None,
    defaults: Annotated[
        str, typer.Option(help="all: every feature may be left out of a request; gaps: only those with gaps here.")
    ] = "all",
    entity: Annotated[str | None, typer.Option(help="Entity whose stored features fill gaps (e.g. account).")] = None,
    input_name: Annotated[str, typer.Option(help="The model's input tensor name.")] = "input",
    output_name: Annotated[str, typer.Option(help="The model's output tensor name.")] = "probability",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print no summary.")] = False,
    profile: Annotated[
        Path | None,
        typer.Option(help="Also write the data's reference profile here (reference_profile.json, for drift)."),
    ] = None,
) -> None:
    """Infer a feature spec from DATA: numbers standardised and clipped, booleans, categories, hashed text."""
    from shared.spec_fit import fit_with_notes

    log1p_cols = _split(log1p)
    options: dict[str, Any] = {
        "drop": _split(drop),
        "kinds": _kinds(kind),
        "max_vocab": max_vocab,
        "min_count": min_count,
        "hash_threshold": hash_threshold,
        "max_buckets": max_buckets,
        "clip_quantiles": _quantiles(clip_quantiles),
        "log1p": "auto" if log1p_cols == ["auto"] else log1p_cols,
        "defaults": defaults,
        "entity": entity,
        "input_name": input_name,
        "output_name": output_name,
    }
    frame = read_frame(data)
    try:
        spec, notes = fit_with_notes(frame, target=target, **options)
        # The spec must encode the very data it came from; better to learn here than in training code.
        encoded = spec.encoder.encode_frame(frame)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if profile is not None:
        profile.write_text(spec.reference_profile(frame).to_json() + "\n")
    text = spec.to_json() + "\n"
    if out is None or str(out) == "-":
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
    if not quiet:
        typer.echo(f"{len(frame)} rows, target {target}: {len(spec.features)} features, width {spec.width}", err=True)
        for line in describe(spec):
            typer.echo(line, err=True)
        for note in notes:
            typer.echo(f"  note: {note}", err=True)
        where = "stdout" if out is None or str(out) == "-" else str(out)
        typer.echo(f"encoded the {encoded.shape[0]} training rows without error; spec written to {where}", err=True)
