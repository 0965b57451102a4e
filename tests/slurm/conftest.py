"""The real local SLURM cluster for these tests: slurm/up.sh (idempotent; installs the Debian packages on
first use), stopped at the end only if this session started it. Nothing here mocks sbatch, squeue or sacct.
Opt out on a machine where it cannot run (no root, not Debian) with TELEPATHY_SKIP_SLURM=1; CI never sets it."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = Path(os.environ.get("TELEPATHY_SLURM_DIR", "/tmp/telepathy-slurm"))


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("TELEPATHY_SKIP_SLURM") == "1":
        pytest.skip("TELEPATHY_SKIP_SLURM=1")
    conf = str(LAB / "etc" / "slurm.conf")
    env = dict(os.environ, SLURM_CONF=conf)
    was_up = subprocess.run([REPO / "slurm" / "up.sh", "--status"], env=env).returncode == 0
    up = subprocess.run([REPO / "slurm" / "up.sh"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"slurm/up.sh failed:\n{up.stdout}\n{up.stderr}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # submitit and the CLI shell out to sbatch/sacct with this environment
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_up and os.environ.get("TELEPATHY_KEEP_SLURM") != "1":
        subprocess.run([REPO / "slurm" / "down.sh"], capture_output=True, timeout=300)
