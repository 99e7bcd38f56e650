"""CURVE keys for the ZeroMQ hop between app servers and workers: making them, reading them, and setting
them on a socket.

ZeroMQ's CURVE mechanism (libsodium, bundled with pyzmq) encrypts a connection and authenticates both
ends: a client must know the server's public key to complete the handshake, and the server asks a ZAP
handler whether the client's public key may come in (``ml_worker/auth.py``). Key files are ZeroMQ's own
format, as ``zmq.auth.create_certificates`` writes them: ``NAME.key`` holds a public key (safe to hand
out), ``NAME.key_secret`` the whole pair (never leaves the process that owns it).

Every way a key file can be wrong (missing, empty, unreadable, not a key file, a key that is not 32
bytes, a public file where the pair is needed, a pair whose halves do not match) is a
:class:`~shared.errors.ConfigError` naming the file, raised before any socket exists: a process set up
for CURVE runs with it or does not start, never open to anyone by accident.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from shared.errors import ConfigError

if TYPE_CHECKING:
    from shared.settings import AppSettings, WorkerSettings

logger = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
MAKE_KEYS = "make a pair with: tandem keys generate DIR --name NAME"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A process's own CURVE pair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback
    path: Path = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """A worker's ROUTER: a CURVE server with its own pair. Which clients get in is the ZAP handler's call."""

    own: KeyPair

    def apply(self, sock: zmq.Socket) -> None:
        """Set before bind: a socket bound without them would accept plain connections."""
        sock.curve_server = True
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """An app server's DEALER to a worker: its own pair and the workers' public key."""

    own: KeyPair
    server: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Set before connect: the handshake starts at connect."""
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public
        sock.curve_serverkey = self.server


@dataclass(slots=True)
class Authorized:
    """What a directory of authorised public keys holds: key (Z85 bytes) -> file name, and what was wrong."""

    keys: dict[bytes, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# -- making keys -------------------------------------------------------------------------------------


def generate_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (the pair, 0600) into ``directory``.

    Refuses to overwrite either file: replacing a key in use locks its holder out, so that is a
    deliberate ``rm`` first. The secret file is created with its final mode before anything is written
    into it, so the secret is never readable by others, not even for a moment.
    """
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} already exists; remove it first to replace that key")
    created: list[Path] = []
    try:
        for path, mode in ((secret, 0o600), (public, 0o644)):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            created.append(path)
            os.chmod(path, mode)  # the umask may have taken bits the mode asked for
        # create_certificates opens both with "w": it truncates the files made above and keeps their modes.
        zmq.auth.create_certificates(folder, name)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return public, secret


def local_stack_keys(directory: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Fresh keys for a stack on one machine (``tandem up --secure``), replacing the ones a previous run
    left in ``directory`` (which holds nothing else): a worker pair, an app pair, and an ``authorized``
    folder holding the app's public key. Returns the flags (name without ``--``: value) of the workers
    and of the app server."""
    folder = Path(directory)
    authorized = folder / "authorized"
    for stale in (*(folder / f"{n}{s}" for n in ("worker", "app") for s in (PUBLIC_SUFFIX, SECRET_SUFFIX)),
                  authorized / f"app{PUBLIC_SUFFIX}"):  # fmt: skip
        stale.unlink(missing_ok=True)
    worker_public, worker_secret = generate_pair(folder, "worker")
    app_public, app_secret = generate_pair(folder, "app")
    authorized.mkdir(exist_ok=True)
    (authorized / app_public.name).write_bytes(app_public.read_bytes())
    return (
        {"curve-secret-key": str(worker_secret), "curve-authorized-dir": str(authorized)},
        {"curve-secret-key": str(app_secret), "curve-worker-key": str(worker_public)},
    )


# -- reading keys ------------------------------------------------------------------------------------


def _read(path: Path, what: str) -> tuple[bytes, bytes | None]:
    """Both halves as the file holds them (the secret is None in a public file), each checked."""
    try:
        if path.stat().st_size == 0:
            raise ConfigError(f"{what} {path} is empty; {MAKE_KEYS}")
        public, secret = zmq.auth.load_certificate(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except ValueError:  # load_certificate: no public-key line
        raise ConfigError(f"{what} {path} is not a ZeroMQ key file (no public-key line); {MAKE_KEYS}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    for half, key in (("public-key", public), ("secret-key", secret)):
        if key is not None and not valid_key(key):
            raise ConfigError(
                f"{what} {path}: its {half} is not a 40-character Z85 key (a damaged or hand-edited file)"
            )
    return public, secret


def valid_key(key: bytes) -> bool:
    """A Z85-encoded 32-byte key: 40 characters of the Z85 alphabet."""
    return len(key) == 40 and set(key) <= _Z85


def read_pair(path: str | os.PathLike[str], what: str = "CURVE secret key") -> KeyPair:
    """A process's own pair from a ``.key_secret`` file."""
    path = Path(path)
    public, secret = _read(path, what)
    if secret is None:
        raise ConfigError(f"{what} {path} holds only a public key: give the {SECRET_SUFFIX} file of the pair")
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{what} {path}: its public-key is not the public half of its secret-key")
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        logger.warning("%s %s is readable by every user (mode %o): chmod 600 it", what, path, stat.S_IMODE(mode))
    return KeyPair(public, secret, path=path)


def read_public(path: str | os.PathLike[str], what: str = "CURVE public key") -> bytes:
    """A peer's public key, from its ``.key`` file (a ``.key_secret`` file works, with a warning)."""
    path = Path(path)
    public, secret = _read(path, what)
    if secret is not None:
        logger.warning("%s %s holds a secret key too; only the public half is used: hand out the %s file instead",
                       what, path, PUBLIC_SUFFIX)  # fmt: skip
    return public


def key_files(directory: Path) -> list[Path]:
    """The ``*.key`` files of a directory, by name. Hidden entries are skipped: a Kubernetes Secret mount
    keeps its real files under ``..data``, and its visible names link to them."""
    return sorted(p for p in directory.iterdir() if p.name.endswith(PUBLIC_SUFFIX) and not p.name.startswith("."))


def scan_authorized(directory: str | os.PathLike[str]) -> Authorized:
    """Every public key in ``directory``, and a line for each file that could not be used (skipped)."""
    directory = Path(directory)
    found = Authorized()
    try:
        files = key_files(directory)
    except OSError as exc:
        found.problems.append(f"authorised keys directory {directory} cannot be read: {exc.strerror or exc}")
        return found
    for path in files:
        try:
            public, secret = _read(path, "authorised key")
        except ConfigError as exc:
            found.problems.append(exc.message)
            continue
        if secret is not None:
            logger.warning("authorised key %s holds a secret key too: only public keys belong there", path)
        found.keys.setdefault(public, path.name)
    return found


def read_authorized(directory: str | os.PathLike[str], what: str = "authorised keys directory") -> Authorized:
    """:func:`scan_authorized` at start-up, where any problem, or no key at all, stops the process."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{what} {directory} does not exist or is not a directory")
    found = scan_authorized(directory)
    if found.problems:
        raise ConfigError("; ".join(found.problems))
    if not found.keys:
        stray = [p.name for p in directory.glob(f"*{SECRET_SUFFIX}")]
        hint = f" (it holds {', '.join(stray)}: authorise the public half, NAME{PUBLIC_SUFFIX})" if stray else ""
        raise ConfigError(f"{what} {directory} holds no public key (*{PUBLIC_SUFFIX}){hint}")
    return found


def fingerprint(directory: Path) -> tuple[tuple[str, int, int, int], ...] | None:
    """What changes when a key file is added, removed or rewritten (a Secret update swaps the files a
    mount's names link to: new inodes); None when the directory cannot be listed."""
    try:
        entries = []
        for p in key_files(directory):
            st = p.stat()
            entries.append((p.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(entries)
    except OSError:
        return None


def describe(keys: Iterable[str]) -> str:
    names = sorted(keys)
    return ", ".join(names) if names else "none"


# -- from settings -----------------------------------------------------------------------------------


def server_keys(settings: WorkerSettings) -> ServerKeys | None:
    """The worker's pair, or None when CURVE is off (the settings allow both or neither setting)."""
    if settings.curve_secret_key is None:
        return None
    return ServerKeys(read_pair(settings.curve_secret_key, "--curve-secret-key"))


def client_keys(settings: AppSettings) -> ClientKeys | None:
    """The app server's pair and the workers' public key, or None when CURVE is off."""
    if settings.curve_secret_key is None or settings.curve_worker_key is None:
        return None
    own = read_pair(settings.curve_secret_key, "--curve-secret-key")
    return ClientKeys(own, read_public(settings.curve_worker_key, "--curve-worker-key"))
