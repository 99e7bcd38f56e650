"""``tandem features``: bulk-load entity features into Redis and inspect one entity (see docs/features.md).

Rows become hashes ``tandem:{entity}:{id}``, one field per column, values as text: exactly what the
app server reads. Writes go in pipelined batches (one round trip per ``--batch-size`` rows), because
one round trip per row would cap a load at a few thousand rows per second.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from app_server.feature_store import entity_key, format_id, format_value
from shared.logs import redact

app = typer.Typer(help="Online features in Redis: bulk load, inspect.", no_args_is_help=True)

RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL (else TANDEM_REDIS_URL, else redis://127.0.0.1:6379/0)."),
]


def _client(url: str | None) -> Any:
    """A connected client, or a one-line error (not a traceback) when Redis cannot be reached."""
    import redis

    from shared.settings import AppSettings

    resolved = url or AppSettings().redis_url or "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(resolved, decode_responses=True, socket_timeout=30, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        typer.echo(redact(f"cannot reach Redis at {resolved}: {exc}"), err=True)
        raise typer.Exit(2) from None
    return client


def _csv_rows(path: Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Batches of CSV rows; cells stay text (as Redis stores them), an empty cell is a missing value."""
    with path.open(newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(fh)
        batch: list[dict[str, Any]] = []
        for row in reader:
            batch.append({k: (v if v != "" else None) for k, v in row.items()})
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _parquet_rows(path: Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        yield record_batch.to_pylist()


def _count_rows(path: Path, parquet: bool) -> int | None:
    """Rows for the progress bar: Parquet metadata, or newlines of a CSV (quoted newlines overcount)."""
    if parquet:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
    return max(0, lines - 1)


def _columns(path: Path, parquet: bool) -> list[str]:
    if parquet:
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    with path.open(newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8" starts with a BOM
        return next(csv.reader(fh), [])


def _pick_id_column(columns: list[str], entity: str, given: str | None) -> str:
    candidates = [given] if given else ["entity_id", f"{entity}_id", "id"]
    for name in candidates:
        if name in columns:
            return name
    raise typer.BadParameter(
        f"no id column {' / '.join(candidates)} in the file (columns: {', '.join(columns)}); name it with --id-column"
    )


@app.command()
def load(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV (with a header) or Parquet file.")],
    entity: Annotated[str, typer.Option(help="Entity name, as in the feature spec (e.g. account).")],
    id_column: Annotated[
        str | None, typer.Option(help="Column holding the entity id (default: entity_id, <entity>_id or id).")
    ] = None,
    redis_url: RedisUrl = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per pipelined round trip.")] = 2000,
    replace: Annotated[
        bool, typer.Option(help="Delete each entity's hash before writing it, so no stale field survives.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Load every row of FILE into the hash tandem:ENTITY:ID, one field per other column."""
    parquet = file.suffix.lower() in (".parquet", ".pq")
    id_col = _pick_id_column(_columns(file, parquet), entity, id_column)
    client = _client(redis_url)
    total = _count_rows(file, parquet)
    rows_iter = _parquet_rows(file, batch_size) if parquet else _csv_rows(file, batch_size)
    loaded = skipped = 0
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"tandem:{entity}:*", total=total)
        for batch in rows_iter:
            pipe = client.pipeline(transaction=replace)
            for row in batch:
                entity_id = row.pop(id_col, None)
                fields = {k: text for k, v in row.items() if (text := format_value(v)) is not None}
                if entity_id is None or entity_id == "" or not fields:
                    skipped += 1
                    continue
                key = entity_key(entity, format_id(entity_id))
                if replace:
                    pipe.delete(key)
                pipe.hset(key, mapping=fields)
                loaded += 1
            pipe.execute()
            bar.advance(task, len(batch))
    elapsed = time.perf_counter() - t0
    rate = loaded / elapsed if elapsed > 0 else float("inf")
    note = f", skipped {skipped} rows without an id or values" if skipped else ""
    typer.echo(f"loaded {loaded} rows into tandem:{entity}:* in {elapsed:.2f} s ({rate:,.0f} rows/s){note}")


@app.command()
def get(
    entity: Annotated[str, typer.Argument(help="Entity name (e.g. account).")],
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="Entity id.")],
    redis_url: RedisUrl = None,
) -> None:
    """Print one entity's stored features as JSON (exit status 1 if it has none)."""
    key = entity_key(entity, entity_id)
    found = _client(redis_url).hgetall(key)
    if not found:
        typer.echo(f"{key}: no stored features", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(dict(sorted(found.items())), indent=2))
