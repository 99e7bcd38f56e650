"""`tandem rollout`'s state in a real sqlite registry: abort from outside, resume after a restart, report
an ended rollout, refuse a second one. No app server: the figures never allow a step to end, so each
run waits until it is stopped."""

from __future__ import annotations

import threading
import time

from shared import registry
from shared.settings import home_registry_uri
from tandem.rollout import ABORTED, RUNNING, Rollout, _end, run
from tandem.rollout_figures import Guards

NOWHERE = ["http://127.0.0.1:9/metrics"]  # discard port: nothing answers


class Lines:
    def __init__(self) -> None:
        self.said: list[str] = []

    def show(self, text: str) -> None:
        pass

    def say(self, text: str) -> None:
        self.said.append(text)


def start(uri: str, version: str, lines: Lines) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(code=run(uri, "demo", version, [10, 100], 60, Guards(), NOWHERE, None, lines)),
        daemon=True,
    )
    t.start()
    return t, out


def wait_until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_abort_resume_report_and_refuse(demo_registry, tmp_path):
    uri = home_registry_uri(tmp_path)
    folder = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "dl")
    registry.register(uri, "demo", folder)
    registry.register(uri, "demo", folder, alias_if_first=None)

    lines = Lines()
    t, out = start(uri, "2", lines)
    wait_until(lambda: Rollout.read(uri, "demo")[0].state == RUNNING)
    aliases, tags = registry.model_state(uri, "demo")
    assert aliases["canary"] == "2" and tags["tandem.canary.percent"] == "10"
    # A second rollout while one runs is refused.
    assert run(uri, "demo", "1", [50], 1, Guards(), NOWHERE, None, Lines()) == 2
    _end(uri, "demo", Rollout.read(uri, "demo")[0], ABORTED, "aborted by the operator")  # `tandem rollout abort`
    t.join(10)
    assert out["code"] == 1 and "stopped from outside: aborted" in lines.said[-1]
    aliases, tags = registry.model_state(uri, "demo")
    assert "canary" not in aliases and tags["tandem.canary.percent"] == "0" and aliases["production"] == "1"

    # Ended: running it again reports how, and changes nothing.
    again = Lines()
    assert run(uri, "demo", "2", [10, 100], 60, Guards(), NOWHERE, None, again) == 1
    assert "already ended: aborted" in again.said[-1]

    # A command that died at step 2 of 2: a new one resumes there.
    Rollout(RUNNING, "2", 1, [10, 100], "").write(uri, "demo")
    registry.set_alias(uri, "demo", "canary", "2")
    resumed = Lines()
    t, out = start(uri, "2", resumed)
    wait_until(lambda: registry.model_state(uri, "demo")[1].get("tandem.canary.percent") == "100")
    assert resumed.said[0] == "resuming the rollout of demo v2 at step 2/2"
    _end(uri, "demo", Rollout.read(uri, "demo")[0], ABORTED, "aborted by the operator")
    t.join(10)
    assert out["code"] == 1
