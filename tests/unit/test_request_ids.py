"""Request ids made by the app server: unique within a process and across processes (replicas)."""

from __future__ import annotations

import re
import subprocess
import sys

from app_server.http_io import new_request_id


def test_ids_are_32_hex_digits_and_never_repeat_in_a_process() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_two_processes_never_share_ids() -> None:
    code = "from app_server.http_io import new_request_id as n; print(*(n() for _ in range(100)))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in range(2)]
    first, second = (set(r.stdout.split()) for r in runs)
    assert len(first) == len(second) == 100
    assert not first & second


def test_a_forked_child_gets_its_own_prefix() -> None:
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send one id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child[:16] != new_request_id()[:16]
