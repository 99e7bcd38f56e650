"""loadtest/gpu_check.sh as CI runs it: the CPU dry run of the one command meant for a GPU machine.

Not marked ``cuda``: it runs on every CI machine, so the script, the cuda-marked tests it starts (on
``--device cpu``) and every bench step it takes are known to work before a GPU is ever lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_cpu_dry_run_tests_and_measures_everything_it_would_on_a_gpu(tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    argv = ["bash", "loadtest/gpu_check.sh", "--device", "cpu", "--home", str(tmp_path / "home")]  # quick on a CPU
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert (result["device"], result["quick"], result["ok"]) == ("cpu", True, True)
    assert (result["skipped"], result["errors"]) == ([], [])
    tests = result["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == 0 and tests["passed"] >= 6, tests
    assert [c["name"] for c in tests["cases"] if c["outcome"] == "skipped"] == [
        "test_io_binding_allocates_device_buffers_once_per_batch_size"  # the one CUDA-only test
    ]
    (model,) = result["models"]
    assert model["model"] == "demo" and model["ceiling"]["rows_per_s"] > 0
    assert model["runner"]["device"] == "cpu" and model["runner"]["max_abs_diff_vs_cpu"] < 1e-5
    served = model["served"]
    assert served["device"] == "cpu" and served["rows_per_s"] > 0 and set(served["statuses"]) == {"ok"}
    assert served["max_batch_size"] == model["ceiling"]["best_batch_size"]
    assert [h["config"] for h in model["http"]] == ["baseline", "tandem_adaptive"]
    assert all(h["steps"] for h in model["http"])  # measured; a rate on a busy CI box is not the point
    report = (out / "gpu_check.md").read_text()
    assert report.startswith("## GPU check on cpu (quick): passed") and "| `demo` |" in report
    # What comes back from a device call: at most 8 files.
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "install.json",
        "pytest.log",
    ]
