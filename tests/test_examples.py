"""The examples run as the README says, and print what it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_fsdp2_example_trains_checkpoints_and_resumes_exactly():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "fsdp2.py"), "--steps", "20"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    saved = next(line for line in lines if line.startswith("saved a DCP checkpoint at step 10 to "))
    assert not Path(saved.split(" to ", 1)[1]).exists()  # the default, temporary checkpoint is removed at the end
    assert any(line.endswith("parameters identical: True") for line in lines), proc.stdout
    per_param = next(float(line.split(": ")[1].split()[0]) for line in lines if line.startswith("optimizer state"))
    assert per_param < 4.0  # 8-bit states: well under fp32's 8 bytes per parameter (small tensors stay fp32)
