"""CURVE in the manifests: both tiers run with keys, each key file the settings name comes from that
tier's own Secret, mounted read-only and private, and neither tier can read the other's secret key."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from k8s_manifests import OVERLAYS, Obj, container_env, pod_spec, render, tandem_container

SECRETS = {"worker": "tandem-worker-curve", "app": "tandem-app-curve"}
KEY_SETTINGS = {
    "worker": ("TANDEM_CURVE_SECRET_KEY", "TANDEM_CURVE_AUTHORIZED_DIR"),
    "app": ("TANDEM_CURVE_SECRET_KEY", "TANDEM_CURVE_WORKER_KEY"),
}


def _secrets_of(volume: Obj) -> list[tuple[str, int | None]]:
    """(Secret name, file mode) of each Secret a volume projects."""
    if "secret" in volume:
        return [(volume["secret"]["secretName"], volume["secret"].get("defaultMode"))]
    if "projected" in volume:
        mode = volume["projected"].get("defaultMode")
        return [(s["secret"]["name"], mode) for s in volume["projected"]["sources"] if "secret" in s]
    return []


def curve_problems(objs: list[Obj], which: str) -> list[str]:
    """What is wrong with how ``tandem <which>`` gets its CURVE keys (empty: nothing)."""
    workload, container = tandem_container(objs, which)
    env = container_env(objs, container)
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    mounts = container.get("volumeMounts", [])
    problems = []
    for setting in KEY_SETTINGS[which]:
        path = env.get(setting)
        if not path:
            problems.append(f"{which}: {setting} is not set: the ZeroMQ hop would run without CURVE")
            continue
        under = [m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"])]
        if not under:
            problems.append(f"{which}: {setting}={path} is not on a mounted volume")
            continue
        mount = max(under, key=lambda m: len(m["mountPath"]))
        secrets = _secrets_of(volumes.get(mount["name"], {}))
        if [name for name, _ in secrets] != [SECRETS[which]]:
            problems.append(f"{which}: {setting}={path} is not from the Secret {SECRETS[which]} ({secrets})")
        if not mount.get("readOnly"):
            problems.append(f"{which}: the key mount {mount['mountPath']} is not readOnly")
        for name, mode in secrets:
            if mode is None or mode & 0o337:
                problems.append(f"{which}: Secret {name} is mounted with mode {mode and oct(mode)}: want 0400 or 0440")
    for other, secret in SECRETS.items():
        if other != which and any(n == secret for v in volumes.values() for n, _ in _secrets_of(v)):
            problems.append(f"{which}: pods mount {secret}, the {other}'s secret key")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("which", ["app", "worker"])
def test_each_tier_has_its_keys_from_its_own_secret(overlay: str, which: str) -> None:
    assert curve_problems(render(overlay), which) == []


def test_the_check_catches_a_missing_key_a_writable_mount_and_a_borrowed_secret() -> None:
    objs = render(OVERLAYS[0])
    workload, container = tandem_container(objs, "app")
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == "curve"]
    volume["secret"]["defaultMode"] = 0o644
    volume["secret"]["secretName"] = SECRETS["worker"]
    next(m for m in container["volumeMounts"] if m["name"] == "curve")["readOnly"] = False
    container["env"] = [{"name": "TANDEM_CURVE_WORKER_KEY", "value": "/tmp/worker.key"}]
    problems = "\n".join(curve_problems(objs, "app"))
    for expected in ("not from the Secret tandem-app-curve", "not readOnly", "mode 0o644", "TANDEM_CURVE_WORKER_KEY"):
        assert expected in problems
    assert "mount tandem-worker-curve" in problems
