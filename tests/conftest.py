import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Under pytest-xdist two workers share the cores with the processes they start: torch in each takes one
# thread (a thread per core in every process oversubscribes them, and idle OpenMP threads spin).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the groups into node ids
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`make test`: -n 2 --dist loadgroup --no-loadscope-reorder) each group runs whole on
    one worker, the groups in collection order (the long SLURM and torchrun groups first): the SLURM tests
    share one cluster and submit from one process, the torchrun tests share their reference runs and
    DeepSpeed's one JIT build, every other module its module-scoped fixtures (built once, not per worker)."""
    for item in items:
        marked = [g for g in ("slurm", "distributed") if item.get_closest_marker(g) is not None]
        item.add_marker(pytest.mark.xdist_group(marked[0] if marked else item.path.stem))


def pytest_xdist_node_collection_finished(node, ids):
    """xdist groups by a suffix on the node id (every test has a group, above); on pytest 9.2 that suffix
    silently does not stick (pytest-xdist#1386), and two workers would each start and stop the one SLURM cluster."""
    lost = [i for i in ids if "@" not in i]
    if node.config.getoption("dist") == "loadgroup" and lost:
        raise pytest.UsageError(f"--dist loadgroup does not group {lost[0]} on this pytest: pip install 'pytest<9.2'")
