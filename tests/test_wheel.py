"""The package builds as a wheel, and the installed (not editable) package works in a fresh virtual environment.

The fresh environment takes adamkit from the wheel alone; its dependencies (numpy, torch, numba, ...) are made
visible from the test environment with a .pth file instead of being downloaded again.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).parent.parent

SMOKE = r"""
import importlib.resources, pathlib, numpy as np, torch
import adamkit, adamkit.numpy, adamkit.torch
assert "site-packages" in adamkit.__file__ and "/src/" not in adamkit.__file__, adamkit.__file__
p = torch.nn.Parameter(torch.ones(10000)); p.grad = torch.ones(10000)
opt = adamkit.torch.AdamW([p], lr=0.1); opt.step()
assert opt._kernel_plan.batches(), "the compiled kernels ran"
w = np.zeros(3); adamkit.numpy.Adam([w], lr=0.1).step([np.ones(3)])
files = {f.name for f in importlib.resources.files("adamkit").iterdir()}
assert {"torch.pyi", "numpy.pyi", "py.typed"} <= files, files
print("ok", float(p[0]), w[0])
"""


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("adamkit-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # dependencies, not adamkit
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, timeout=300)
    out = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
    cli = subprocess.run([str(env / "bin" / "python"), "-m", "adamkit.cli", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert cli.returncode == 0 and "demo" in cli.stdout
