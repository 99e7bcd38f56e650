"""``tandem up``: the whole stack on one machine, supervised.

Children are plain ``tandem worker`` / ``tandem app`` processes on loopback, exactly what a deployment
runs, so what works here works there. A child that dies is restarted; Ctrl-C or SIGTERM stops every
child (SIGTERM first so they drain, SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared import registry
from shared.logs import redact_url
from shared.model_targets import ModelTarget
from shared.settings import home_registry_uri

logger = logging.getLogger("tandem.up")

READY_TIMEOUT_S = 180.0
STATE_FILE = "up.json"
"""Written into the home while the stack runs, so other commands (``tandem models``) can find it."""
GRACE_S = 15.0
DEFAULT_MODELS = "*"
"""Every model of the registry with the alias: one promoted while the stack runs is served at the next
poll, with no restart."""
FIRST_MODELS = ("demo", "churn")
"""What ``tandem up`` trains and registers into a registry that has no model for ``*`` to serve."""
DEMOS = {"demo": ("fraud", "small"), "demo-large": ("fraud", "large"), "churn": ("churn", "small")}
"""Models ``tandem up`` trains and registers itself when the registry lacks them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


@dataclass
class Stack:
    home: Path
    port: int = 8000
    workers: int = 2
    apps: int = 1
    """App server processes, all on ``port`` (``SO_REUSEPORT``): the kernel spreads connections over them."""
    targets: list[ModelTarget] = field(default_factory=lambda: [ModelTarget("*")])
    registry_uri: str | None = None
    worker_flags: dict[str, str] = field(default_factory=dict)
    app_flags: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    api_key: str | None = None
    """With ``--secure``: the API key of this run, printed once with the ready message."""
    _stopping: bool = False
    _next_refusal_check: float = 0.0
    _refusals_shown: set[tuple[str, str, str]] = field(default_factory=set)
    _expected: list[str] = field(default_factory=list)
    """Models the ready message waits for: those named, or those with the alias when the stack started."""

    def run(self) -> int:
        t0 = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        uri = self.registry_uri or home_registry_uri(self.home)
        self._ensure_models(uri)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._spawn(uri)
        try:
            if not self._wait_ready(t0):
                return 1
            state = self.home / STATE_FILE
            served = [str(t) for t in self.targets]
            state.write_text(json.dumps({"url": f"http://127.0.0.1:{self.port}", "pid": os.getpid(), "models": served}))
            self._supervise()
        finally:
            (self.home / STATE_FILE).unlink(missing_ok=True)
            self._stop()
        return 0

    @property
    def models_flag(self) -> str:
        return ",".join(str(t) for t in self.targets)

    def _ensure_models(self, uri: str) -> None:
        """Every model the stack serves has a version for its pointer: demo models are trained and
        registered when missing (for ``*``, the two default demos when no model has the alias)."""
        wanted = [t for t in self.targets if not t.every]
        every = next((t for t in self.targets if t.every), None)
        if every is not None and not registry.models_with_alias(uri, every.alias or "production"):
            wanted += [ModelTarget(n, alias=every.alias) for n in FIRST_MODELS]
        for target in wanted:
            if registry.resolve(uri, target.name, alias=target.alias, tag=target.tag) is not None:
                continue
            if target.name not in DEMOS or target.tag:
                raise SystemExit(
                    f"registry {redact_url(uri)} has no version of {target.name!r} for {target.pointer}; register one"
                )
            from tandem.demo import register_demo

            dataset, size = DEMOS[target.name]
            logger.info("no %s model in %s yet: training the demo model", target.name, redact_url(uri))
            ref = register_demo(uri, size, name=target.name, dataset=dataset)
            alias = target.alias or "production"
            if alias not in ref.aliases:
                registry.set_alias(uri, target.name, alias, ref.version)
            logger.info("registered %s version %s as @%s", target.name, ref.version, alias)
        self._expected = [t.name for t in self.targets if not t.every]
        if every is not None:
            found = registry.models_with_alias(uri, every.alias or "production")
            self._expected += sorted(n for n in found if n not in self._expected)

    @property
    def default_model(self) -> str | None:
        """What ``POST /predict`` serves unless ``--default-model`` says: the first model named, or for
        ``*`` the fraud demo when it is there."""
        named = [t.name for t in self.targets if not t.every]
        if named:
            return named[0]
        return "demo" if "demo" in self._expected else None

    def _spawn(self, uri: str) -> None:
        base = [sys.executable, "-m", "tandem"]
        endpoints = []
        for i in range(self.workers):
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            endpoints.append(endpoint)
            argv = [
                *base,
                "worker",
                "--bind",
                endpoint,
                "--models",
                self.models_flag,
                "--registry-uri",
                uri,
                "--cache-dir",
                str(self.home / "cache"),
                "--metrics-port",
                str(free_port()),
            ]
            for flag, value in self.worker_flags.items():
                argv += [f"--{flag}", value] if value else [f"--{flag}"]  # "" marks a boolean switch
            self.children.append(Child(f"worker-{i}", argv))
        app_argv = [*base, "app", "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", ",".join(endpoints)]
        app_argv += ["--models", self.models_flag]
        if "default-model" not in self.app_flags and self.default_model:
            app_argv += ["--default-model", self.default_model]
        for flag, value in self.app_flags.items():
            app_argv += [f"--{flag}", value] if value else [f"--{flag}"]
        if self.apps == 1:
            self.children.append(Child("app", app_argv))
        else:
            self.children += [Child(f"app-{i}", [*app_argv, "--reuse-port"]) for i in range(self.apps)]
        for child in self.children:
            child.start()
        logger.info(
            "started %d workers (%s) and %d app server%s on port %d",
            self.workers,
            ", ".join(endpoints),
            self.apps,
            "" if self.apps == 1 else "s",
            self.port,
        )

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def _wait_ready(self, t0: float) -> bool:
        while time.monotonic() - t0 < READY_TIMEOUT_S and not self._stopping:
            for child in self.children:
                if child.exited is not None:
                    logger.error("%s exited with %s before the stack was ready", child.name, child.exited)
                    return False
            if self._get("/readyz")[0] == 200 and self._all_served():
                self._print_ready(time.monotonic() - t0)
                return True
            self._report_refusals()
            time.sleep(0.2)
        if not self._stopping:
            logger.error("stack not ready after %.0f s", READY_TIMEOUT_S)
        return False

    def _report_refusals(self) -> None:
        """Say on the console, once each, which model version a worker refused and why: the operator
        is looking here, not at a worker's JSON log (checked at most every 2 s)."""
        now = time.monotonic()
        if now < self._next_refusal_check:
            return
        self._next_refusal_check = now + 2.0
        status, body = self._get("/v1/models")
        if status != 200:
            return
        for m in json.loads(body)["models"]:
            for w in m.get("workers") or []:
                refused = w.get("refused")
                if not refused or (key := (m["name"], refused["version"], w["endpoint"])) in self._refusals_shown:
                    continue
                self._refusals_shown.add(key)
                serving = f"v{w['live']} keeps serving" if w.get("live") else "nothing serves it yet"
                print(
                    f"\n  ! {m['name']} v{refused['version']} refused by {w['endpoint']} ({serving}; retried "
                    f"with back-off):\n    {refused['error']}\n",
                    flush=True,
                )

    def _all_served(self) -> bool:
        """Every expected model has a live version (with ``*``, ``/readyz`` is ready with the first)."""
        status, body = self._get("/v1/models")
        if status != 200:
            return False
        models = json.loads(body)["models"]
        # A model whose version every worker refused is settled too: the console said why, and the
        # other models should not wait on it.
        settled = {m["name"] for m in models if m.get("version") or any(w.get("refused") for w in m["workers"])}
        return all(name in settled for name in self._expected)

    def _print_ready(self, elapsed: float) -> None:
        status, body = self._get("/v1/models")
        served = json.loads(body)["models"] if status == 200 else []
        order = [self.default_model, *self._expected]  # the default model first, then as configured
        served.sort(key=lambda m: order.index(m["name"]) if m["name"] in order else len(order))
        url = f"http://127.0.0.1:{self.port}"
        lines = [
            f"\nTandem is ready in {elapsed:.1f} s: {url}  ({len(served)} models, {self.workers} workers"
            f"{f', {self.apps} app servers' if self.apps > 1 else ''}; "
            "Ctrl-C stops everything)\n"
        ]
        auth = ""
        if self.api_key:
            lines.append(
                "  Secured: CURVE between the app server and the workers; the HTTP API needs this key, shown only "
                f"now (its sha256 is in {self.home / 'secure' / API_KEYS_FILE}):\n\n    {self.api_key}\n"
            )
            auth = f" -H 'Authorization: Bearer {self.api_key}'"
        for info in served:
            if not info.get("version"):
                lines.append(f"  # {info['name']}: not served (refused, see above)\n")
                continue
            example = (info.get("input_example") or [{}])[0]
            payload = json.dumps({"instances": [example]})
            lines.append(f"  # {info['name']} v{info.get('version')}")
            lines.append(
                f"  curl -s {url}/v1/models/{info['name']}/predict{auth} -H 'content-type: application/json' "
                f"-d '{payload}'\n"
            )
        lines.append(f"  curl -s{auth} {url}/v1/models      # every model: fields, an example, workers")
        print("\n".join(lines) + "\n", flush=True)

    def _supervise(self) -> None:
        while not self._stopping:
            self._report_refusals()
            now = time.monotonic()
            for child in self.children:
                code = child.exited
                if code is None or self._stopping:
                    continue
                if child.next_start == 0.0:
                    child.restarts += 1
                    delay = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                    child.next_start = now + delay
                    logger.warning("%s exited with %s; restarting in %.1f s", child.name, code, delay)
                elif now >= child.next_start:
                    child.next_start = 0.0
                    child.start()
            time.sleep(0.2)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _stop(self) -> None:
        self._stopping = True
        live = [c for c in self.children if c.proc is not None and c.exited is None]
        for c in live:
            os.killpg(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + GRACE_S
        for c in live:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                os.killpg(c.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                c.proc.wait()  # type: ignore[union-attr]
        logger.info("stopped")


API_KEYS_FILE = "api_keys.jsonl"


def secure_flags(home: Path, worker_flags: dict[str, str], app_flags: dict[str, str]) -> str:
    """``tandem up --secure``: fresh CURVE keys for this run's workers and app server, and a fresh API-key
    file holding one key, added to their flags; returns the key (shown once, never stored). Fresh on
    every run, so a key printed by an earlier run stops working when it ends."""
    from app_server.api_keys import new_key
    from shared.curve import local_stack_keys

    folder = home / "secure"
    (folder / "curve").mkdir(parents=True, exist_ok=True)
    worker_curve, app_curve = local_stack_keys(folder / "curve")
    keys_file = folder / API_KEYS_FILE
    keys_file.unlink(missing_ok=True)
    key = new_key(keys_file, "local", None, None)
    worker_flags.update(worker_curve)
    app_flags.update({**app_curve, "api-keys-file": str(keys_file)})
    return key
