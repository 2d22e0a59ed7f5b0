"""`dptrain finetune` runs unchanged under torchrun with 2 CPU processes (gloo)."""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from tests.helpers.abort_backtrace import preload_env


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_finetune_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --tee 2: each rank's stderr reaches ours (a rank's own error, not only the launcher's summary, on failure)
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           "--log-dir", str(tmp_path / "logs"), "--tee", "2", "-m", "dptrain.cli", "finetune", "--model", "tiny",
           "--max-steps", "3", "--pretrain-steps", "2", "--output-dir", str(out), "--json"]
    # a rare abort of one rank at interpreter exit (README, torchrun section) shows its backtrace
    env = preload_env({**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    ranks_said = [line for line in proc.stderr.splitlines() if line.startswith("[default")]  # --tee's prefix
    aborted = next((i for i, line in enumerate(ranks_said) if "=== SIGABRT" in line), len(ranks_said))
    assert proc.returncode == 0, "\n".join(ranks_said[max(0, aborted - 20):] + [proc.stderr[-1000:]])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "only rank 0 reports"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] <= report["target_epsilon"] + 1e-9
    assert json.loads(lines[0])["epsilon"] == pytest.approx(report["epsilon"])
    # one secret checkpoint (every rank's generator states), owner-only and apart from the release
    assert report["secret_files"] == ["private/checkpoint.pt"] and not (out / "checkpoint.pt").exists()
    assert stat.S_IMODE((out / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "private" / "checkpoint.pt").stat().st_mode) == 0o600
    assert report["privacy"]["private"] and report["privacy"]["ranks_trusted"]


def test_the_preloaded_handler_prints_an_aborting_process_backtrace(tmp_path):
    env = preload_env(dict(os.environ), tmp_path)
    if "LD_PRELOAD" not in env:
        pytest.skip("the handler needs Linux and a C compiler")
    proc = subprocess.run([sys.executable, "-c", "import os; os.abort()"], capture_output=True, text=True, env=env)
    assert proc.returncode == -6, proc.stderr  # still killed by SIGABRT
    assert "=== SIGABRT in thread" in proc.stderr and "(abort+" in proc.stderr  # the native frames
    assert re.search(r"^thread \d+ python", proc.stderr, flags=re.M), proc.stderr  # the threads' names
