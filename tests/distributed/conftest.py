import pytest
from tiny_run import Background, tiny_config


@pytest.fixture(scope="session")
def ddp_straight(tmp_path_factory):
    """The uninterrupted 2-worker DDP run (24 steps, 2 accumulation steps) that preempted and fault-injected
    runs of the same config (checkpoint_every aside: saving reads the state, never changes it) must equal
    bitwise. One run for every test that compares with it."""
    run = Background(tiny_config(tmp_path_factory.mktemp("ddp-straight"), steps=24, grad_accum=2))
    yield run
    run.stop()
