import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "launcher.cli"]


@pytest.fixture
def launch(tmp_path):
    """Run the real CLI in a subprocess (fresh interpreter: exit codes, stderr and imports as users see them)."""

    def _run(*args, env=None, timeout=120):
        e = dict(os.environ, TELEPATHY_RUNS=str(tmp_path / "runs"), **(env or {}))
        e.pop("TELEPATHY_CLUSTER", None)
        return subprocess.run(LAUNCH + list(args), capture_output=True, text=True, cwd=REPO, env=e, timeout=timeout)

    return _run


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """(HF_HOME, config dir): a hub-layout cache with test models and every shipped task's parquet files, and a
    user configuration folder whose registry names the test models by hub id (tests/hubcache.py)."""
    import hubcache

    return hubcache.build(tmp_path_factory.mktemp("hub"))


@pytest.fixture(autouse=True)
def _no_cluster_outside_slurm_tests(request, monkeypatch):
    """The session's SLURM fixture exports SLURM_CONF for the cluster tests; elsewhere a dry run must not see
    the local test cluster (it would check the default profile's 8-GPU nodes against its small ones)."""
    if request.node.get_closest_marker("slurm") is None:
        monkeypatch.delenv("SLURM_CONF", raising=False)
