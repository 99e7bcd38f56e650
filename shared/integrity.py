"""Model integrity: the sha256 of every file of a version, recorded at registration, checked before a load.

What is recorded where, and why there:

- ``tandem_manifest.json`` in the version's folder maps each file's path (relative, ``/``-separated) to
  its sha256. A folder can hold thousands of files (a pyfunc model with its code, a tokenizer), far
  more than a registry tag holds, so the list lives beside the files.
- The version's tag ``tandem.files.sha256`` holds the sha256 of that manifest's bytes. The tag lives in
  the registry's database, not in the artifact store: whoever can change the files cannot change the
  tag with the same access, so a manifest is trusted only because its digest matches the tag.

A worker checks every load, fresh download or cached copy alike (:func:`verify`): a file changed, a file
missing, or a file the manifest does not list is refused, naming the file. Extra files are refused
whatever their name because which files a version's code reads is the flavour's business (a pyfunc
model's ``code/`` folder goes on ``sys.path``, a custom model may open anything in its folder, ONNX may
read external weight files), so no narrower rule is safe; nothing legitimate adds files to a
registered version. Two exceptions, both derived rather than registered: ``__pycache__`` folders are
deleted before the check (bytecode of the checked sources, written by Python when a pyfunc model's code
is imported; a planted ``.pyc`` would otherwise run instead of the checked ``.py``), and
``registered_model_meta``, which MLflow's client writes into every download of a ``models:/`` URI and
nothing reads.

A version registered by MLflow alone has no tag: it is *unverified* (served, and counted, unless the
worker requires integrity).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from shared.errors import IntegrityError

TAG = "tandem.files.sha256"
MANIFEST = "tandem_manifest.json"
CLIENT_WRITTEN = frozenset({MANIFEST, "registered_model_meta"})
"""Top-level names that are not the version's files: the manifest itself, and what MLflow's client adds
to a download (see the module docstring)."""
SHOWN = 5
"""Most files a refusal names (the count says how many more)."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()  # releases the GIL while it hashes


def manifest_of(folder: Path, *, bytecode: bool = False) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (links followed: what a reader would
    read), the manifest and client-written files excepted. ``__pycache__`` folders are left out unless
    ``bytecode``: they are not the version's files (a check that imported its code may have written
    them), and a worker deletes them before it checks (:func:`verify` lists any left, to refuse them)."""
    folder = Path(folder)
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        if not bytecode and "__pycache__" in dirs:
            dirs.remove("__pycache__")
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel not in CLIENT_WRITTEN:
                found[rel] = file_sha256(path)
    return dict(sorted(found.items()))


def manifest_bytes(manifest: dict[str, str]) -> bytes:
    """The manifest as stored: sorted keys, one file per line, so its digest depends on its content only."""
    return (json.dumps(manifest, sort_keys=True, indent=0) + "\n").encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def differences(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Each file that is not as recorded, worded: changed, missing, or not registered."""
    changed = [f"{p} (changed since registration)" for p in recorded if p in actual and actual[p] != recorded[p]]
    missing = [f"{p} (missing)" for p in recorded if p not in actual]
    extra = [f"{p} (not registered with the version)" for p in actual if p not in recorded]
    return changed + missing + extra


def describe(problems: list[str]) -> str:
    more = len(problems) - SHOWN
    return "; ".join(problems[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def _drop_bytecode(folder: Path) -> None:
    for root, dirs, _files in os.walk(folder):
        if "__pycache__" in dirs:
            shutil.rmtree(Path(root) / "__pycache__", ignore_errors=True)  # what stays is refused as extra
            dirs.remove("__pycache__")


def verify(folder: Path, expected: str | None) -> bool:
    """Check ``folder`` against the manifest whose sha256 is ``expected`` (the version's :data:`TAG`).

    Returns ``True`` when every file is as registered, ``False`` when nothing was recorded (``expected``
    empty: unverified); raises :class:`IntegrityError` naming the files that are not as registered.
    Blocking (it reads every byte): run it in a thread.
    """
    if not expected:
        return False
    folder = Path(folder)
    try:
        data = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(
            f"{MANIFEST} is missing, but the registry recorded one ({TAG}): the version's files cannot be checked"
        ) from None
    if digest(data) != expected:
        raise IntegrityError(f"{MANIFEST} does not match the registry's {TAG} tag: it changed after registration")
    recorded = json.loads(data)
    _drop_bytecode(folder)
    problems = differences(recorded, manifest_of(folder, bytecode=True))
    if problems:
        raise IntegrityError(f"files not as registered: {describe(problems)}")
    return True
