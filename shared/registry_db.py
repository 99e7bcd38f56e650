"""A new sqlite registry, created fast: a copy of an empty, fully migrated MLflow database.

MLflow creates a sqlite registry on first use by running every one of its schema migrations (alembic),
which took 4-5 s of CPU on a small VM, each time: every ``tandem up`` in a fresh folder, every
registry a test makes. The result is the same for every registry of one MLflow version, so it is made
once, in the user's cache folder (``mlflow-<version>-empty.db``), and copied. The copy holds tables and
the schema revision only: MLflow then adds its default experiment itself, with the artifact location
it would have chosen. Anything going wrong here (no writable cache, an MLflow that moved its internals)
leaves the registry to MLflow's own, slower creation.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for any other registry)."""
    if not uri.startswith("sqlite:"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_absolute():
        db = Path("/" + uri.removeprefix("sqlite://").lstrip("/"))
    return db


def prepare(uri: str) -> None:
    """Put an empty migrated database where ``uri`` names one that does not exist yet (absolute
    ``sqlite:////PATH`` URIs, as ``--home`` makes; any other is left to MLflow)."""
    if not uri.startswith("sqlite:////"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    try:
        template = _template()
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        try:
            os.link(tmp, db)  # never over a database another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except Exception as exc:  # MLflow's own creation still works, only slower
        logger.debug("no template registry database (%s); MLflow creates %s itself", exc, db)


def _template() -> Path:
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem"
    path = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(tmp, path)  # whole or absent: another process may be making the same file
    return path
