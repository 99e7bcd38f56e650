"""``tandem rollout``: ramp a canary step by step, roll it back by itself on a breach, promote it at the end.

``tandem rollout NAME VERSION`` points the ``canary`` alias at VERSION and sets
``tandem.canary.percent`` to each step in turn. During each step it compares the canary with
production (``rollout_figures.decide``): a canary error rate above ``--max-error-rate`` or a p99 above
``--max-p99-ratio`` times production's rolls it back at once (percent 0, ``canary`` alias removed,
the reason printed, exit 1); a step that ran its ``--interval`` with enough canary requests moves on;
after the last step ``production`` moves to VERSION and the canary is cleared (exit 0).

Its state lives in registered-model tags (``tandem.rollout.*``), not in this process: ``tandem rollout
status NAME`` shows it from anywhere, ``tandem rollout abort NAME`` stops it (the running command sees
that within a second and exits 1), and a command started again for the same version resumes at the
step it had reached (or reports how the rollout ended).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Annotated

import typer

from shared import registry
from shared.traffic import CANARY, CANARY_PERCENT
from tandem.options import Home, RegistryUri, registry_uri_for_write
from tandem.rollout_figures import Figures, Guards, decide, p99_ratio, prometheus_figures, scrape, step_figures

PREFIX = "tandem.rollout."
STATE, VERSION, STEP, STEPS, REASON, UPDATED = (
    f"{PREFIX}{k}" for k in ("state", "version", "step", "steps", "reason", "updated")
)
RUNNING, PROMOTED, ROLLED_BACK, ABORTED = "running", "promoted", "rolled_back", "aborted"


@dataclass(slots=True)
class Rollout:
    """The rollout state as the registry's tags hold it."""

    state: str | None
    version: str | None
    step: int
    steps: list[float]
    reason: str

    @classmethod
    def read(cls, uri: str, name: str) -> tuple[Rollout, dict[str, str]]:
        aliases, tags = registry.model_state(uri, name)
        try:
            steps = [float(s) for s in tags.get(STEPS, "").split(",") if s.strip()]
            step = int(tags.get(STEP, "0"))
        except ValueError:
            steps, step = [], 0
        return cls(tags.get(STATE), tags.get(VERSION), step, steps, tags.get(REASON, "")), aliases

    def write(self, uri: str, name: str) -> None:
        for key, value in (
            (VERSION, self.version or ""),
            (STEPS, ",".join(f"{s:g}" for s in self.steps)),
            (STEP, str(self.step)),
            (REASON, self.reason),
            (UPDATED, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            (STATE, self.state or ""),  # last: a reader that sees "running" sees the rest of it
        ):
            registry.set_model_tag(uri, name, key, value)


def parse_steps(text: str) -> list[float]:
    try:
        steps = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--steps: {text!r} is not a comma list of percents") from None
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
        raise typer.BadParameter("--steps: rising percents within (0, 100], e.g. 1,5,25,50,100")
    return steps


def note_for_promote(uri: str, name: str) -> str | None:
    """What ``tandem promote`` should say about a canary or rollout in progress, if any."""
    r, aliases = Rollout.read(uri, name)
    if r.state == RUNNING:
        return (
            f"note: a rollout of {name} v{r.version} is in progress (step {r.step + 1}/{len(r.steps)}); "
            f"`tandem rollout abort {name}` stops it"
        )
    if CANARY in aliases:
        _, tags = registry.model_state(uri, name)
        return f"note: {name}@canary is v{aliases[CANARY]} at {tags.get(CANARY_PERCENT, '0')}% of traffic"
    return None


def _end(uri: str, name: str, r: Rollout, state: str, reason: str) -> None:
    """Roll back or abort: no traffic to the canary first, then the alias goes."""
    registry.set_model_tag(uri, name, CANARY_PERCENT, "0")
    registry.delete_alias(uri, name, CANARY)
    r.state, r.reason = state, reason
    r.write(uri, name)


def _promote(uri: str, name: str, r: Rollout) -> None:
    registry.set_alias(uri, name, "production", r.version or "")
    registry.set_model_tag(uri, name, CANARY_PERCENT, "0")
    registry.delete_alias(uri, name, CANARY)
    r.state, r.reason = PROMOTED, f"production moved to v{r.version}"
    r.write(uri, name)


def _fmt(f: Figures) -> str:
    p99 = f"{f.p99_s * 1000:.1f} ms" if f.p99_s is not None else "-"
    return f"{f.requests} req, {f.error_rate:.2%} err, p99 {p99}"


class Display:
    """One live line on a terminal (rewritten in place); a line every few seconds otherwise (logs)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last = 0.0

    def show(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
        elif time.monotonic() - self._last >= 5:
            print(text, flush=True)
            self._last = time.monotonic()

    def say(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)


def run(
    uri: str,
    name: str,
    version: str,
    steps: list[float],
    interval_s: float,
    guards: Guards,
    metrics_urls: list[str],
    prometheus_url: str | None,
    display: Display,
) -> int:
    """The rollout loop; returns the exit code."""
    r, aliases = Rollout.read(uri, name)
    if r.state == RUNNING and r.version != version:
        display.say(f"error: a rollout of {name} v{r.version} is in progress; `tandem rollout abort {name}` first")
        return 2
    if r.state == RUNNING and r.version == version:
        display.say(f"resuming the rollout of {name} v{version} at step {r.step + 1}/{len(r.steps)}")
        steps = r.steps or steps
    elif r.version == version and r.state in (PROMOTED, ROLLED_BACK, ABORTED):
        display.say(f"the rollout of {name} v{version} already ended: {r.state} ({r.reason})")
        return 0 if r.state == PROMOTED else 1
    else:
        if aliases.get("production") is None:
            display.say(f"error: {name} has no production version to compare a canary with")
            return 2
        if aliases.get("production") == version:
            display.say(f"{name} v{version} is production already")
            return 0
        registry.get_version(uri, name, version)  # raises for a version that does not exist
        r = Rollout(RUNNING, version, 0, steps, "")
        registry.set_alias(uri, name, CANARY, version)
        registry.set_model_tag(uri, name, CANARY_PERCENT, f"{steps[0]:g}")
        r.write(uri, name)
        display.say(f"rollout of {name} v{version}: canary at {steps[0]:g}%, steps {','.join(f'{s:g}' for s in steps)}")
    while True:
        percent = r.steps[r.step]
        registry.set_model_tag(uri, name, CANARY_PERCENT, f"{percent:g}")
        started = time.monotonic()
        start = scrape(metrics_urls, name) if not prometheus_url else {}
        while True:
            time.sleep(1.0)
            now_state, _ = Rollout.read(uri, name)
            if now_state.state != RUNNING or now_state.version != version:
                display.say(f"rollout of {name} v{version} stopped from outside: {now_state.state or 'cleared'}")
                return 1
            elapsed = time.monotonic() - started
            if prometheus_url:
                figures = prometheus_figures(prometheus_url, name, elapsed)
            else:
                figures = step_figures(start, scrape(metrics_urls, name))
            canary, production = figures["canary"], figures["production"]
            action, why = decide(canary, production, guards, elapsed, interval_s)
            ratio = p99_ratio(canary, production, guards)
            display.show(
                f"step {r.step + 1}/{len(r.steps)} canary {percent:g}% / production {100 - percent:g}% | "
                f"canary {_fmt(canary)} | production {_fmt(production)} | p99 ratio "
                f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                + (why or f"next step in {max(interval_s - elapsed, 0):.0f} s")
            )
            if action == "rollback":
                _end(uri, name, r, ROLLED_BACK, why)
                display.say(f"rolled back {name} v{version} at {percent:g}%: {why}")
                return 1
            if action == "next":
                break
        display.say(f"step {r.step + 1}/{len(r.steps)} ({percent:g}%) passed: canary {_fmt(canary)}")
        if r.step + 1 >= len(r.steps):
            _promote(uri, name, r)
            display.say(f"promoted {name} v{version} to production")
            return 0
        r.step += 1
        r.write(uri, name)


def rollout(
    name_or_action: Annotated[str, typer.Argument(metavar="NAME|status|abort", help="Model name, or status/abort.")],
    version_or_name: Annotated[str, typer.Argument(metavar="VERSION|NAME", help="Version to roll out (or NAME).")],
    steps: Annotated[str, typer.Option(help="Canary percents, one per step.")] = "1,5,25,50,100",
    interval: Annotated[float, typer.Option(help="Seconds each step runs before the next.")] = 60.0,
    max_error_rate: Annotated[float, typer.Option(help="Canary error rate that rolls back.")] = 0.01,
    max_p99_ratio: Annotated[float, typer.Option(help="Canary p99 / production p99 that rolls back.")] = 1.5,
    min_requests: Annotated[int, typer.Option(help="Canary requests a step needs to be judged.")] = 20,
    metrics_url: Annotated[
        list[str] | None, typer.Option(help="An app server's /metrics (repeat for each replica).")
    ] = None,
    prometheus_url: Annotated[str | None, typer.Option(help="Read the figures from this Prometheus.")] = None,
    registry_uri: RegistryUri = None,
    home: Home = None,
) -> None:
    """Roll VERSION out as a canary, step by step, rolling back on a breach: `tandem rollout NAME VERSION`,
    `tandem rollout status NAME`, `tandem rollout abort NAME`."""
    uri = registry_uri_for_write(registry_uri, home)
    display = Display()
    if name_or_action == "status":
        raise typer.Exit(status(uri, version_or_name))
    if name_or_action == "abort":
        r, _ = Rollout.read(uri, version_or_name)
        if r.state != RUNNING:
            typer.echo(f"no rollout of {version_or_name} in progress ({r.state or 'none'})")
            raise typer.Exit(1)
        _end(uri, version_or_name, r, ABORTED, "aborted by the operator")
        typer.echo(f"aborted the rollout of {version_or_name} v{r.version}: canary at 0%, alias removed")
        return
    guards = Guards(max_error_rate, max_p99_ratio, min_requests)
    urls = metrics_url or ["http://127.0.0.1:8000/metrics"]
    plan = parse_steps(steps)
    raise typer.Exit(run(uri, name_or_action, version_or_name, plan, interval, guards, urls, prometheus_url, display))


def status(uri: str, name: str) -> int:
    r, aliases = Rollout.read(uri, name)
    _, tags = registry.model_state(uri, name)
    typer.echo(f"{name}: production v{aliases.get('production', '-')}, canary v{aliases.get(CANARY, '-')} at "
               f"{tags.get(CANARY_PERCENT, '0')}%")  # fmt: skip
    if r.state is None:
        typer.echo("no rollout recorded")
        return 0
    step = f", step {r.step + 1}/{len(r.steps)} ({r.steps[r.step]:g}%)" if r.steps and r.step < len(r.steps) else ""
    typer.echo(f"rollout of v{r.version}: {r.state}{step}" + (f": {r.reason}" if r.reason else ""))
    return 0
