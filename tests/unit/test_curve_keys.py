"""CURVE key files (shared/curve.py): made in ZeroMQ's format, and every way one can be wrong is an error
naming the file, before any socket exists."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth
from pydantic import ValidationError

from shared import curve
from shared.errors import ConfigError
from shared.settings import AppSettings, WorkerSettings


def test_generate_pair_writes_zeromq_key_files_with_a_private_secret(tmp_path: Path) -> None:
    public, secret = curve.generate_pair(tmp_path / "keys", "worker")
    assert (public.name, secret.name) == ("worker.key", "worker.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(secret)  # ZeroMQ's own reader agrees
    assert zmq.auth.load_certificate(public) == (pub, None)
    pair = curve.read_pair(secret)
    assert (pair.public, pair.secret) == (pub, sec) and zmq.curve_public(sec) == pub
    assert curve.read_public(public) == pub
    assert sec.decode() not in repr(pair)


def test_generate_pair_never_overwrites_a_key(tmp_path: Path) -> None:
    public, secret = curve.generate_pair(tmp_path, "app")
    before = secret.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        curve.generate_pair(tmp_path, "app")
    assert secret.read_bytes() == before and public.exists()
    with pytest.raises(ConfigError, match="key name"):
        curve.generate_pair(tmp_path, "../elsewhere")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return curve.generate_pair(tmp_path / "good", "app")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _damaged(pair: tuple[Path, Path], tmp_path: Path, how: str) -> Path:
    public, secret = pair
    text = secret.read_text()
    bad = tmp_path / "bad" / "x.key_secret"
    if how == "missing":
        return bad
    if how == "empty":
        return _write(bad, "")
    if how == "not a key file":
        return _write(bad, "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n")
    if how == "short key":
        line = next(ln for ln in text.splitlines() if "secret-key" in ln)
        return _write(bad, text.replace(line, line[:-5] + '"'))
    if how == "halves differ":
        other = zmq.curve_keypair()[0].decode()
        line = next(ln for ln in text.splitlines() if "public-key" in ln)
        return _write(bad, text.replace(line, f'    public-key = "{other}"'))
    if how == "public only":
        return public
    if how == "a directory":
        bad.mkdir(parents=True)
        return bad
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("not a key file", "not a ZeroMQ key file"),
        ("short key", "not a 40-character Z85 key"),
        ("halves differ", "not the public half"),
        ("public only", "holds only a public key"),
        ("a directory", "cannot be read"),
    ],
)
def test_a_bad_secret_key_file_is_an_error_naming_it(pair, tmp_path: Path, how: str, says: str) -> None:
    path = _damaged(pair, tmp_path, how)
    with pytest.raises(ConfigError, match=says) as err:
        curve.read_pair(path, "--curve-secret-key")
    assert str(path) in err.value.message and "--curve-secret-key" in err.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_key_file_is_an_error(pair) -> None:
    _, secret = pair
    secret.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read: Permission denied"):
        curve.read_pair(secret)


def test_a_public_key_file_may_be_given_where_a_public_key_is_needed(pair, tmp_path: Path) -> None:
    public, secret = pair
    assert curve.read_public(secret) == curve.read_public(public)  # the public half of a pair, with a warning
    with pytest.raises(ConfigError, match="is empty"):
        curve.read_public(_write(tmp_path / "w.key", ""))


def test_authorized_directory_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        curve.read_authorized(tmp_path / "nowhere")
    folder = tmp_path / "clients"
    folder.mkdir()
    with pytest.raises(ConfigError, match="holds no public key"):
        curve.read_authorized(folder)
    curve.generate_pair(tmp_path / "made", "app")
    (folder / "app.key_secret").write_bytes((tmp_path / "made" / "app.key_secret").read_bytes())
    with pytest.raises(ConfigError, match=r"it holds app.key_secret: authorise the public half"):
        curve.read_authorized(folder)
    (folder / "app.key").write_bytes((tmp_path / "made" / "app.key").read_bytes())
    found = curve.read_authorized(folder)
    assert list(found.keys.values()) == ["app.key"] and found.problems == []
    _write(folder / "broken.key", "metadata\ncurve\n")
    with pytest.raises(ConfigError, match=r"broken\.key is not a ZeroMQ key file"):
        curve.read_authorized(folder)
    scanned = curve.scan_authorized(folder)  # a reload: the bad file is left out, the good one stays
    assert list(scanned.keys.values()) == ["app.key"] and "broken.key" in scanned.problems[0]


def test_fingerprint_changes_when_keys_come_and_go(tmp_path: Path) -> None:
    before = curve.fingerprint(tmp_path)
    public, _ = curve.generate_pair(tmp_path, "a")
    added = curve.fingerprint(tmp_path)
    assert added != before and [e[0] for e in added] == ["a.key"]
    public.unlink()
    assert curve.fingerprint(tmp_path) == before
    assert curve.fingerprint(tmp_path / "gone") is None


@pytest.mark.parametrize(
    ("cls", "given", "missing"),
    [
        (WorkerSettings, "curve_secret_key", "curve_authorized_dir"),
        (WorkerSettings, "curve_authorized_dir", "curve_secret_key"),
        (AppSettings, "curve_secret_key", "curve_worker_key"),
        (AppSettings, "curve_worker_key", "curve_secret_key"),
    ],
)
def test_half_a_curve_configuration_is_refused(cls, given: str, missing: str) -> None:
    with pytest.raises(ValidationError, match=f"--{missing.replace('_', '-')}"):
        cls(**{given: Path("/anywhere")})
    assert cls(**{given: Path("/a"), missing: Path("/b")}) is not None  # paths are read at start-up, not here


def test_local_stack_keys_are_fresh_each_run_and_fit_together(tmp_path: Path) -> None:
    worker_flags, app_flags = curve.local_stack_keys(tmp_path / "curve")
    worker = WorkerSettings(**{k.replace("-", "_"): v for k, v in worker_flags.items()})
    app = AppSettings(**{k.replace("-", "_"): v for k, v in app_flags.items()})
    server, client = curve.server_keys(worker), curve.client_keys(app)
    assert server is not None and client is not None and worker.curve_authorized_dir is not None
    assert client.server == server.own.public
    assert list(curve.read_authorized(worker.curve_authorized_dir).keys) == [client.own.public]
    again, _ = curve.local_stack_keys(tmp_path / "curve")
    assert curve.read_pair(again["curve-secret-key"]).public != server.own.public


def test_tandem_keys_generate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    made = CliRunner().invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "app"])
    assert made.exit_code == 0, made.output
    assert made.stdout.splitlines() == [f"public key: {tmp_path / 'k' / 'app.key'}",
                                        f"secret key: {tmp_path / 'k' / 'app.key_secret'}"]  # fmt: skip
    assert curve.read_pair(tmp_path / "k" / "app.key_secret").public == curve.read_public(tmp_path / "k" / "app.key")
    again = CliRunner().invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "app"])
    assert again.exit_code == 2 and "already exists" in again.stderr
