"""Under torchrun a bad command fails with ONE line on stderr (rank 0's), and torchrun's failure summary shows that
line as the root cause instead of a pointer to enable tracebacks (slow: starts two processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_resume_without_checkpoint_under_torchrun_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "dptrain.cli", "finetune", "--model", "tiny",
           "--output-dir", str(tmp_path / "ddp"), "--resume"]
    done = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    line = f"dptrain finetune: error: no checkpoint to resume from: {tmp_path}/ddp/private/checkpoint.pt does not exist"
    assert done.returncode != 0
    ours = [entry for entry in done.stderr.splitlines() if entry.startswith("dptrain finetune:")]
    assert ours == [line], done.stderr[-3000:]  # printed once (rank 0), not once per rank
    summary = done.stderr.split("Root Cause")[-1]
    assert f"traceback : {line}" in summary and "To enable traceback" not in done.stderr.split("Failures:")[-1]
