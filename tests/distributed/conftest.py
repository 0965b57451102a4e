import subprocess
import sys

import pytest
from tiny_run import Background, tiny_config, worker_env


@pytest.fixture(scope="session")
def ddp_straight(tmp_path_factory):
    """The uninterrupted 2-worker DDP run (24 steps, 2 accumulation steps) that preempted and fault-injected
    runs of the same config (checkpoint_every aside: saving reads the state, never changes it) must equal
    bitwise. One run for every test that compares with it."""
    run = Background(tiny_config(tmp_path_factory.mktemp("ddp-straight"), steps=24, grad_accum=2))
    yield run
    run.stop()


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed JIT-builds its CPU shared-memory comm op at its first init (in ~/.cache/telepathy, kept
    between sessions): built here once, under its own time limit, so no run's timeout includes a compile
    (35-75 s alone, over 2 minutes on a loaded 2-core machine)."""
    pytest.importorskip("deepspeed")
    build = (
        "from deepspeed.accelerator import get_accelerator\n"
        "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
        "b is None or b.load()"
    )
    out = subprocess.run([sys.executable, "-c", build], env=worker_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
